"""The cross-encoder: loading rules, batching invariance, sentence-transformers parity, training, teacher cache."""

import hashlib
import random
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sentence_transformers import CrossEncoder as SentenceTransformersCrossEncoder
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from tests.conftest import WORDS
from training.bi_encoder import BiEncoder
from training.cross_encoder import CrossEncoder
from training.cross_encoder_training import (
    CrossEncoderTrainingConfig,
    RerankGroup,
    bce_loss,
    build_reranker_optimizer,
    group_scores,
    listwise_loss,
    train_cross_encoder,
)
from training.default_model import default_model_path
from training.dev_eval import DevSet
from training.errors import InvalidInput
from training.fingerprint import compute_fingerprints
from training.evaluation import evaluate_run
from training.examples import examples_from_qrels, known_positives
from training.recipe import TeacherConfig
from training.rerank_eval import evaluate_reranked, reranked_run
from training.teacher import train_teacher
from training.teacher_cache import TeacherScoreCache

PAIRS = [
    ("quick fox", "the quick brown fox jumps over the lazy dog"),
    ("protein", "protein study of cancer cells and genes in a large trial of patients with risk " * 6),
    ("apple", "apple"),
    ("search index", "a vector index answers a query with a document"),
    ("python error", "python library function class error data"),
]
CONTENT_WORDS = [word for word in WORDS if len(word) > 3]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine spinning threads make them 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reranker(tiny_model_dir) -> CrossEncoder:
    return CrossEncoder.load(tiny_model_dir)


def _synthetic_groups(count: int = 40, seed: int = 0) -> list[RerankGroup]:
    """Query: one of six topic words. Positive: it plus two filler words. Negatives: two filler-only docs."""
    rng = random.Random(seed)
    topics, fillers = CONTENT_WORDS[:6], CONTENT_WORDS[6:]
    groups = []
    for _ in range(count):
        query = rng.choice(topics)
        positive = rng.sample(fillers, 2)
        positive.insert(rng.randrange(3), query)
        negatives = tuple(" ".join(rng.sample(fillers, 3)) for _ in range(2))
        groups.append(RerankGroup(query, " ".join(positive), negatives))
    return groups


def _ranking_accuracy(model: CrossEncoder, groups: list[RerankGroup]) -> float:
    """Share of groups whose positive scores above every one of its negatives."""
    wins = [(scores := model.score(group.pairs()))[0] > scores[1:].max() for group in groups]
    return float(np.mean(wins))


def test_scores_are_float32_in_input_order_and_independent_of_batch_size(reranker):
    """Guards against length sorting or per-batch padding returning a pair's score at another pair's position."""
    scores = reranker.score(PAIRS, batch_size=2)
    assert scores.dtype == np.float32 and scores.shape == (len(PAIRS),)
    singles = np.array([reranker.score([pair])[0] for pair in PAIRS])
    assert np.allclose(scores, singles, atol=1e-5)
    assert np.allclose(reranker.score(PAIRS, batch_size=1), reranker.score(PAIRS, batch_size=32), atol=1e-5)
    assert reranker.score([]).shape == (0,)


def test_single_pair_or_string_is_refused(reranker):
    """Guards against a bare (query, document) tuple being scored as two malformed pairs of characters."""
    with pytest.raises(InvalidInput, match="list of"):
        reranker.score(("quick fox", "the quick brown fox"))
    with pytest.raises(InvalidInput, match="pair 1"):
        reranker.score([("a", "b"), ("only one",)])
    with pytest.raises(InvalidInput, match="batch_size"):
        reranker.score(PAIRS, batch_size=0)


def test_long_pairs_are_truncated_from_the_longer_side(tiny_model_dir):
    """Guards against long documents overflowing the position limit or cutting the query away."""
    model = CrossEncoder.load(tiny_model_dir, max_length=16)
    batch = model.batch([PAIRS[1]])
    assert batch.input_ids.shape == (1, 16)
    query_tokens = len(model.tokenizer.tokenize(PAIRS[1][0]))
    assert int((batch.token_type_ids[0] == 0).sum()) == query_tokens + 2, "the query lost tokens to truncation"
    assert np.isfinite(model.score([PAIRS[1]])).all()


def test_rerank_returns_document_indices_best_first(reranker):
    """Guards against rerank reporting positions in the sorted list instead of indices into the caller's docs."""
    docs = [doc for _, doc in PAIRS]
    scores = reranker.score([("quick fox", doc) for doc in docs])
    ranked = reranker.rerank("quick fox", docs)
    assert [index for index, _ in ranked] == list(np.argsort(-scores, kind="stable"))
    assert np.allclose([score for _, score in ranked], np.sort(scores)[::-1], atol=1e-6)
    assert len(reranker.rerank("quick fox", docs, top_n=2)) == 2
    with pytest.raises(InvalidInput, match="top_n"):
        reranker.rerank("quick fox", docs, top_n=0)


def test_reranked_run_scores_each_bi_encoder_candidate_with_its_own_document(tiny_model_dir):
    """Guards against reranked evaluation attaching a pair's score to another candidate's id, or reranking
    documents the bi-encoder did not retrieve, so that its metrics say nothing about the reranker."""
    encoder, reranker = BiEncoder.load(tiny_model_dir), CrossEncoder.load(tiny_model_dir, seed=4)
    documents = {f"d{i}": text for i, (_, text) in enumerate(PAIRS)}
    documents.update({f"s{i}": " ".join(random.Random(i).sample(CONTENT_WORDS, 4)) for i in range(6)})
    queries = {"q1": "quick fox", "q2": "protein cancer", "q3": "python error"}
    dev = DevSet(queries=queries, qrels={"q1": {"d0": 1}, "q2": {"d1": 1}, "q3": {"d4": 1}}, documents=documents)
    alone = reranked_run(encoder, reranker, dev, candidates=4, weight=1.0, batch_size=2)
    fused = reranked_run(encoder, reranker, dev, candidates=4, weight=0.3, batch_size=2)
    doc_ids = list(documents)
    similarity = encoder.encode(list(queries.values()), "query") @ encoder.encode(list(documents.values()), "document").T
    for row, (query_id, query) in enumerate(queries.items()):
        top = np.argsort(-similarity[row])[:4]
        assert list(alone[query_id]) == list(fused[query_id]) == [doc_ids[j] for j in top]
        ce = reranker.score([(query, documents[doc_ids[j]]) for j in top])
        assert np.allclose(list(alone[query_id].values()), ce, atol=1e-5)
        z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
        expected = 0.3 * z(ce.astype(np.float64)) + 0.7 * z(similarity[row, top].astype(np.float64))
        assert np.allclose(list(fused[query_id].values()), expected, atol=1e-4)
    assert evaluate_reranked(encoder, reranker, dev, candidates=4, weight=1.0, batch_size=2) == evaluate_run(alone, dev.qrels)


def test_saved_model_loads_in_sentence_transformers_with_identical_scores(tiny_model_dir, tmp_path):
    """Guards against a saved folder that sentence-transformers truncates, activates or pools differently."""
    ours = CrossEncoder.load(tiny_model_dir, max_length=32, seed=5)
    ours.save(tmp_path / "reranker")
    oracle = SentenceTransformersCrossEncoder(str(tmp_path / "reranker"), device="cpu")
    assert oracle.num_labels == 1 and oracle.max_seq_length == 32
    theirs = oracle.predict(PAIRS, batch_size=2, convert_to_numpy=True, show_progress_bar=False)
    assert np.allclose(ours.score(PAIRS), theirs, atol=1e-5)


def test_save_then_load_keeps_fingerprint_and_scores(tiny_model_dir, tmp_path):
    """Guards against a save that drops the head or the max length, so the reloaded reranker is another model.

    Two loads of the same weights may differ in the last bit (BLAS kernels can depend on
    where the weights sit in memory), so scores are compared to a tolerance a lost head
    or length would exceed by orders of magnitude."""
    original = CrossEncoder.load(tiny_model_dir, max_length=48, seed=2)
    reloaded = CrossEncoder.load(original.save(tmp_path / "again"))
    assert reloaded.max_length == 48
    assert reloaded.fingerprint == original.fingerprint
    np.testing.assert_allclose(reloaded.score(PAIRS), original.score(PAIRS), rtol=1e-5, atol=1e-6)


def test_refuses_folders_without_safetensors(tiny_model_copy):
    """Guards against loading pickled weights (arbitrary code on load) or a folder with no weights at all."""
    (tiny_model_copy / "model.safetensors").unlink()
    with pytest.raises(InvalidInput, match="safetensors"):
        CrossEncoder.load(tiny_model_copy)
    with pytest.raises(InvalidInput, match="does not exist"):
        CrossEncoder.load(tiny_model_copy / "missing")


def test_refuses_weights_that_do_not_fit_the_encoder(tiny_model_copy):
    """Guards against transformers silently re-initialising encoder layers whose names it does not recognise."""
    weights = load_file(tiny_model_copy / "model.safetensors")
    renamed = {f"renamed.{name}": tensor for name, tensor in weights.items()}
    save_file(renamed, tiny_model_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidInput, match="encoder weights"):
        CrossEncoder.load(tiny_model_copy)


def test_refuses_a_classifier_with_several_labels(tiny_model_dir, tmp_path):
    """Guards against turning an NLI-style classifier into a reranker by silently dropping its trained head."""
    config = BertConfig.from_pretrained(tiny_model_dir, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "nli")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "nli")
    with pytest.raises(InvalidInput, match="3 labels"):
        CrossEncoder.load(tmp_path / "nli")


def test_refuses_a_classifier_folder_without_its_head_and_loads_a_half_precision_one_in_fp32(tiny_model_dir, tmp_path):
    """Guards against a reranker whose head weights are missing or renamed silently ranking by a random head, and
    against an fp16 checkpoint running in fp16 while the release records its precision."""
    config = BertConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(3)
    BertForSequenceClassification(config).half().save_pretrained(tmp_path / "reranker")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "reranker")
    loaded = CrossEncoder.load(tmp_path / "reranker")
    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.float32}
    as_stored = BertForSequenceClassification.from_pretrained(tmp_path / "reranker", dtype=torch.float16)
    settings = {"kind": "cross-encoder", "max_length": loaded.max_length}
    assert loaded.fingerprints.by_version == compute_fingerprints(as_stored, loaded.tokenizer, settings)
    weights = load_file(tmp_path / "reranker" / "model.safetensors")
    headless = {name: tensor for name, tensor in weights.items() if not name.startswith("classifier.")}
    save_file(headless, tmp_path / "reranker" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidInput, match=r"missing \['classifier\.bias', 'classifier\.weight'\]"):
        CrossEncoder.load(tmp_path / "reranker")


def test_bi_encoder_folder_keeps_encoder_and_seeds_new_head(tiny_model_dir):
    """Guards against a randomly initialised encoder, or a fresh head that differs between identical runs."""
    first = CrossEncoder.load(tiny_model_dir, seed=7)
    again = CrossEncoder.load(tiny_model_dir, seed=7)
    other = CrossEncoder.load(tiny_model_dir, seed=8)
    assert torch.equal(first.model.classifier.weight, again.model.classifier.weight)
    assert not torch.equal(first.model.classifier.weight, other.model.classifier.weight)
    encoder = BiEncoder.load(tiny_model_dir).model.state_dict()
    for name, tensor in first.model.base_model.state_dict().items():
        assert torch.equal(tensor, encoder[name]), f"{name} was not loaded from the bi-encoder folder"


def test_fingerprint_follows_in_place_weight_changes_and_max_length(tiny_model_dir):
    """Guards against a cached fingerprint that still names the model as it was before training."""
    model = CrossEncoder.load(tiny_model_dir)
    before = model.fingerprint
    assert CrossEncoder.load(tiny_model_dir, max_length=64).fingerprint != before
    with torch.no_grad():
        model.model.classifier.bias.add_(1.0)
    edited = model.fingerprint
    assert edited != before
    train_cross_encoder(model, _synthetic_groups(count=4), CrossEncoderTrainingConfig(learning_rate=1e-3))
    assert model.fingerprint != edited
    with pytest.raises(InvalidInput, match="max length 0"):
        CrossEncoder.load(tiny_model_dir, max_length=0)


def test_listwise_loss_matches_a_per_group_cross_entropy_loop():
    """Guards against -inf padding of ragged groups leaking into the softmax or the mean."""
    generator = torch.Generator().manual_seed(0)
    sizes = [3, 2, 4]
    flat = torch.randn(sum(sizes), generator=generator, requires_grad=True)
    loss = listwise_loss(*group_scores(flat, sizes))
    expected, start = [], 0
    for size in sizes:
        expected.append(F.cross_entropy(flat[start : start + size].unsqueeze(0), torch.tensor([0])))
        start += size
    assert torch.allclose(loss, torch.stack(expected).mean())
    loss.backward()
    assert torch.isfinite(flat.grad).all()


def test_bce_loss_labels_each_positive_one_and_each_negative_zero():
    """Guards against padded slots being scored as negatives or the positive sitting in the wrong column."""
    generator = torch.Generator().manual_seed(1)
    sizes = [3, 2, 4]
    flat = torch.randn(sum(sizes), generator=generator, requires_grad=True)
    labels = torch.cat([torch.tensor([1.0] + [0.0] * (size - 1)) for size in sizes])
    loss = bce_loss(*group_scores(flat, sizes))
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(flat, labels))
    loss.backward()
    assert torch.isfinite(flat.grad).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("loss", ["bce", "listwise"])
def test_training_ranks_positives_above_negatives(tiny_model_dir, loss, precision):
    """Guards against a loss wired to the wrong target, sign or group so that training changes nothing useful.

    At 5e-3 the fresh head fell to a constant score on one seed in ten (bce's loss stuck at 0.636), whichever dropout
    masks were drawn; 2e-3 converged on every seed tried."""
    model = CrossEncoder.load(tiny_model_dir)
    groups, held_out = _synthetic_groups(), _synthetic_groups(seed=1)
    before = _ranking_accuracy(model, held_out)
    config = CrossEncoderTrainingConfig(loss=loss, epochs=30, learning_rate=2e-3, batch_size=8, precision=precision)
    history = train_cross_encoder(model, groups, config)
    after = _ranking_accuracy(model, held_out)
    assert before < 0.5, "the untrained model should be near chance (1 in 3)"
    assert after >= 0.9, f"{loss}, {precision}: held-out ranking accuracy {before:.2f} -> {after:.2f}"
    assert [record["step"] for record in history] == list(range(1, 30 * 5 + 1))
    assert not model.model.training, "training left dropout switched on"


def test_bf16_training_follows_fp32_training(tiny_model_dir):
    """Guards against bf16 steps computing their loss on stale weights (an autocast region held across steps
    keeps serving the bf16 copies it cast at the first step), which left the SciFact teacher untrained."""

    def losses(precision: str) -> np.ndarray:
        model = CrossEncoder.load(tiny_model_dir)
        config = CrossEncoderTrainingConfig(
            epochs=8, learning_rate=5e-3, batch_size=8, head_learning_rate_factor=1.0, precision=precision
        )
        return np.array([record["loss"] for record in train_cross_encoder(model, _synthetic_groups(), config)])

    full, half = losses("fp32"), losses("bf16")
    assert full[-5:].mean() < 0.5 * full[:5].mean(), "fp32 training should make progress in 40 steps"
    assert np.abs(half - full).max() < 0.1, f"bf16 losses {half.round(3)} left fp32's {full.round(3)}"


def test_teacher_trained_in_bf16_learns_its_training_queries(tiny_model_dir, tmp_path):
    """Guards against the teacher a recipe trains being left untrained: the SciFact teacher, trained in bf16,
    reranked dev queries at random because none of its steps saw the weights the previous ones updated.
    At a learning rate of 5e-3 this tiny model's training is chaotic enough that bf16 rounding alone, on a CPU
    whose kernels round differently, leaves it at chance while fp32 learns; at 2e-3 both learn."""
    rng = random.Random(3)
    topics = ["protein", "cancer", "python", "apple", "search", "vector"]
    fillers = [word for word in CONTENT_WORDS if word not in topics and not word.startswith(("cell", "gene"))]
    documents = {f"filler-{i}": " ".join(rng.sample(fillers, 3)) for i in range(40)}
    qrels: dict[str, dict[str, int]] = {}
    for topic in topics:
        for i in range(4):
            documents[f"{topic}-{i}"] = " ".join([topic, *rng.sample(fillers, 2)])
            qrels.setdefault(topic, {})[f"{topic}-{i}"] = 1
    examples = examples_from_qrels({topic: topic for topic in topics}, qrels, documents)
    config = TeacherConfig(init=str(tiny_model_dir), epochs=20, learning_rate=2e-3, batch_size=4, negatives=2, max_length=32)
    teacher = train_teacher(
        config, BiEncoder.load(tiny_model_dir), examples, documents, known_positives(examples), tmp_path / "teacher", "bf16"
    )
    saved = CrossEncoder.load(tmp_path / "teacher")
    assert saved.fingerprint == teacher.fingerprint
    beaten = []
    for example in examples:
        others = [text for doc_id, text in documents.items() if doc_id not in qrels[example.query_id]]
        scores = saved.score([(example.query, example.positive.text)] + [(example.query, text) for text in others])
        beaten.append(float((scores[0] > scores[1:]).mean()))
    assert np.mean(beaten) >= 0.7, f"positives outscore {np.mean(beaten):.2f} of the other documents (chance: 0.5)"


def test_same_seed_gives_identical_weights(tiny_model_dir):
    """Guards against unseeded shuffling or dropout that makes a training run impossible to reproduce."""
    groups = _synthetic_groups(count=12)

    def trained(seed: int) -> dict[str, torch.Tensor]:
        model = CrossEncoder.load(tiny_model_dir)
        config = CrossEncoderTrainingConfig(epochs=2, learning_rate=1e-3, batch_size=4, seed=seed)
        calls = []
        train_cross_encoder(model, groups, config, progress=lambda step, total, loss: calls.append((step, total)))
        assert calls[-1] == (6, 6)
        return model.model.state_dict()

    first, again, other = trained(13), trained(13), trained(14)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_head_trains_at_a_multiple_of_the_encoder_rate(reranker):
    """Guards against the freshly initialised classifier and pooler training at the encoder's fine-tuning rate,
    which held a MiniLM-initialised reranker's loss at chance through the few hundred steps a teacher gets."""
    head = {name for name, _ in reranker.model.named_parameters() if reranker.is_head_parameter(name)}
    assert head == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    config = CrossEncoderTrainingConfig(learning_rate=1e-4, head_learning_rate_factor=20.0)
    groups = build_reranker_optimizer(reranker, config).param_groups
    rates = {id(param): (group["lr"], group["weight_decay"]) for group in groups for param in group["params"]}
    parameters = dict(reranker.model.named_parameters())
    assert len(rates) == len(parameters)
    for name, param in parameters.items():
        decay = 0.0 if name.endswith("bias") or "LayerNorm" in name else 0.01
        assert rates[id(param)] == pytest.approx((2e-3 if name in head else 1e-4, decay)), name


def test_learning_rate_warms_up_then_decays(reranker):
    """Guards against a schedule that starts at the full rate or never decays."""
    config = CrossEncoderTrainingConfig(epochs=5, learning_rate=1e-3, batch_size=4, warmup_ratio=0.2)
    rates = [record["lr"] for record in train_cross_encoder(reranker, _synthetic_groups(count=8), config)]
    assert len(rates) == 10
    assert rates[0] < rates[1] and max(rates) <= 1e-3 and rates[-1] < rates[2]


@pytest.mark.parametrize(
    "settings",
    [
        {"loss": "pairwise"},
        {"epochs": 0},
        {"learning_rate": 0.0},
        {"learning_rate": float("nan")},
        {"batch_size": 0},
        {"warmup_ratio": 1.0},
        {"weight_decay": -0.1},
        {"max_grad_norm": 0.0},
        {"head_learning_rate_factor": 0.0},
        {"precision": "int8"},
    ],
)
def test_invalid_training_settings_are_refused(settings):
    """Guards against settings that train nothing or diverge being accepted and failing deep inside a run."""
    with pytest.raises(ValueError):
        CrossEncoderTrainingConfig(**settings)


def test_invalid_groups_are_refused():
    """Guards against groups that give the listwise loss nothing to compare, or teach a positive to lose."""
    with pytest.raises(ValueError, match="at least one negative"):
        RerankGroup("q", "positive", ())
    with pytest.raises(ValueError, match="among the negatives"):
        RerankGroup("q", "positive", ("other", "positive"))
    with pytest.raises(ValueError, match="not a single string"):
        RerankGroup("q", "positive", "negative")
    assert RerankGroup("q", "p", ["n"]).negatives == ("n",)


def test_teacher_cache_scores_each_pair_once(reranker, tmp_path):
    """Guards against a cache that re-scores what it holds, or answers with scores of a different teacher.

    Scores of the same pairs in different batches may differ in the last bit, hence the tolerance
    where the cache scored a different batch than the reference."""
    path = tmp_path / "teacher.sqlite3"
    with TeacherScoreCache(path) as cache:
        first = cache.get_or_score(reranker, PAIRS[:3])
        assert np.array_equal(first, reranker.score(PAIRS[:3]))
        assert len(cache) == 3
        # A tampered row proves the second call reads the cache instead of scoring again.
        query_hash = hashlib.sha256(PAIRS[0][0].encode()).hexdigest()
        with sqlite3.connect(path) as db:
            db.execute("UPDATE teacher_scores SET score = 42.0 WHERE query_sha256 = ?", (query_hash,))
        db.close()
        mixed = cache.get_or_score(reranker, [PAIRS[0], *PAIRS[3:], PAIRS[3]])
        assert mixed[0] == 42.0, "a cached pair was scored again"
        assert len(cache) == 5, "only the two new pairs may be inserted, the repeated one once"
        np.testing.assert_allclose(mixed[1:], reranker.score([*PAIRS[3:], PAIRS[3]]), rtol=1e-5, atol=1e-6)
        assert 42.0 in cache.get_or_score(reranker, PAIRS[:3])
        with torch.no_grad():
            reranker.model.classifier.bias.add_(1.0)
        retrained = cache.get_or_score(reranker, PAIRS[:3])
        assert len(cache) == 8 and 42.0 not in retrained, "a changed teacher must not reuse old scores"
    with TeacherScoreCache(path) as reopened:
        assert np.array_equal(reopened.get_or_score(reranker, PAIRS[:3]), retrained)
        assert len(reopened) == 8


@pytest.mark.integration
def test_minilm_bi_encoder_folder_initialises_a_reranker():
    """Guards against the packaged MiniLM losing its encoder weights when loaded with a classification head."""
    model = CrossEncoder.load(default_model_path(), seed=0)
    assert model.max_length == 512
    encoder = BiEncoder.load(default_model_path()).model.state_dict()
    for name, tensor in model.model.base_model.state_dict().items():
        assert torch.equal(tensor, encoder[name]), name
    scores = model.score([("What causes scurvy?", "Scurvy is caused by a lack of vitamin C."), ("a", "b")])
    assert scores.dtype == np.float32 and np.isfinite(scores).all()
    assert np.array_equal(scores, CrossEncoder.load(default_model_path(), seed=0).score(
        [("What causes scurvy?", "Scurvy is caused by a lack of vitamin C."), ("a", "b")]))
