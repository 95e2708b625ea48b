"""Long texts are cut before tokenizing without changing a single token the models see."""

import random

import pytest
from transformers import AutoTokenizer

from tests.conftest import WORDS
from training.bi_encoder import BiEncoder
from training.cross_encoder import CrossEncoder
from training.default_model import default_model_path
from training.token_prefix import CHARS_PER_TOKEN, token_prefixes


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(default_model_path()))


def _texts(seed: int) -> list[str]:
    """Texts around and far past the cut: prose with punctuation and accents, long words, runs of spaces,
    a text without spaces, and one whose prefix holds too few tokens (long URL-like words)."""
    rng = random.Random(seed)
    vocabulary = [*WORDS, "Émile,", "naïve.", "(CD4+)", "x" * 40, "3.14159", "—", "\t", "  "]
    prose = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(50, 3000))) for _ in range(12)]
    return [
        *prose,
        "é" * 9000,
        " ".join("https://example.org/" + "a" * 120 for _ in range(60)),
        "short text",
        " " * 5000 + "late words " * 300,
    ]


@pytest.mark.parametrize("max_tokens", [8, 128, 256])
def test_cut_texts_tokenize_to_the_same_tokens_as_whole_ones(tokenizer, max_tokens):
    """Guards against a cut that drops, splits or changes a kept token (a cut inside a word, or a prefix that
    holds fewer tokens than are kept): the ids must equal those of the whole text, truncated alike."""
    texts = _texts(max_tokens)
    cut = token_prefixes(tokenizer, texts, max_tokens)
    assert any(len(c) < len(t) for c, t in zip(cut, texts)), "no text was long enough to be cut"
    assert any(len(t) > max_tokens * CHARS_PER_TOKEN and c == t for c, t in zip(cut, texts)), "no fallback exercised"
    assert all(c == t or (t.startswith(c) and t[len(c)] == " ") for c, t in zip(cut, texts)), "cut inside a word"
    whole = tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]
    assert tokenizer(cut, truncation=True, max_length=max_tokens)["input_ids"] == whole


@pytest.mark.parametrize("max_tokens", [128, 511, 512])
def test_cut_documents_of_pairs_keep_longest_first_truncation(tokenizer, max_tokens):
    """Guards against a pair truncated differently: longest_first takes each token from the longer side, so a
    document cut shorter than its (long) query would hand the query the odd leftover token."""
    texts = [*_texts(max_tokens), "international " * 5000]
    queries = [f"query {i}" if i % 2 else "a " * 600 for i in range(len(texts))]
    query_tokens = [len(ids) for ids in tokenizer(queries, add_special_tokens=False)["input_ids"]]
    cut = token_prefixes(tokenizer, texts, max_tokens, query_tokens)
    assert any(len(c) < len(t) for c, t in zip(cut, texts)), "no document was long enough to be cut"
    pairs = tokenizer(queries, texts, truncation="longest_first", max_length=max_tokens)["input_ids"]
    assert tokenizer(queries, cut, truncation="longest_first", max_length=max_tokens)["input_ids"] == pairs


def test_the_encoders_tokenize_long_texts_as_the_whole_text(tokenizer, tiny_model_dir):
    """Guards against the bi-encoder or the reranker seeing other tokens for a long document than for the
    same document untouched, which would break agreement with sentence-transformers."""
    texts = _texts(7)
    encoder = BiEncoder.load(tiny_model_dir)
    limit = encoder.settings.max_length("document")
    assert any(len(c) < len(t) for c, t in zip(token_prefixes(encoder.tokenizer, texts, limit), texts))
    expected = encoder.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
    assert encoder.tokenize(texts, "document") == expected
    reranker = CrossEncoder.load(tiny_model_dir)
    queries = ["query", " ".join(WORDS) * 20] * (len(texts) // 2 + 1)
    pairs = list(zip(queries, texts))
    whole = reranker.tokenizer([q for q, _ in pairs], texts, truncation="longest_first",
                               max_length=reranker.max_length)["input_ids"]
    assert reranker._tokenize(pairs)["input_ids"] == whole
