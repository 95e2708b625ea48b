"""Shared fixtures: tiny randomly initialised BERT models built in-process (no download)."""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from indexer.corpus_store import CorpusStore, Document
from indexer.release_store import ReleaseStore
from training.bi_encoder import BiEncoder, EncoderSettings
from training.pooling import Pooling

WORDS = (
    "the a of and to in is for on with protein cell cells gene genes cancer risk study trial patients "
    "search index model vector query document release python library function class error data train "
    "test quick brown fox jumps over lazy dog apple banana cherry red green blue small large fast slow"
).split()
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return specials + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits] + WORDS


def build_tiny_model(folder: Path, seed: int = 0, pooling: Pooling = Pooling.MEAN) -> Path:
    """A 2-layer, 32-wide BERT with a small WordPiece vocabulary, saved in our layout."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(_vocab()) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    encoder = BiEncoder(model, tokenizer, EncoderSettings(pooling, 64, 128), name=f"tiny-bert-{seed}")
    encoder.save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("other-model"), seed=1)


@pytest.fixture
def tiny_model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy a test may modify."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model-copy"))


@pytest.fixture
def tiny_encoder(tiny_model_dir) -> BiEncoder:
    return BiEncoder.load(tiny_model_dir)


SAMPLE_DOCS = [
    Document(id="d1", title="Quick fox", text="the quick brown fox jumps over the lazy dog"),
    Document(id="d2", title="Proteins", text="protein study of cancer cells and genes"),
    Document(id="d3", title="Fruit", text="apple banana cherry red green"),
    Document(id="d4", title="Search", text="a vector index answers a query with a document"),
    Document(id="d5", title="Python", text="python library function class error", metadata={"lang": "py"}),
]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def corpus(data_dir) -> CorpusStore:
    store = CorpusStore(data_dir / "corpus.sqlite3")
    yield store
    store.close()


@pytest.fixture
def releases(data_dir) -> ReleaseStore:
    return ReleaseStore(data_dir)


def require_shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip with the reason when this checkout lacks it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared datasets are only present beside the project in CI")
    return path
