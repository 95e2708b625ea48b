"""The bi-encoder: loading rules, batching invariance, normalisation, saving, fingerprints."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, BertConfig, BertModel, RobertaConfig, RobertaModel

from training.bi_encoder import BiEncoder
from training.errors import InvalidInput
from training.fingerprint import model_fingerprints
from training.pooling import Pooling

TEXTS = [
    "the quick brown fox",
    "protein study of cancer cells and genes in a large trial of patients with risk",
    "apple",
    "a vector index answers a query with a document " * 10,
]


def test_vectors_are_unit_float32_in_input_order(tiny_encoder):
    vectors = tiny_encoder.encode(TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (4, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    singles = np.stack([tiny_encoder.encode([text])[0] for text in TEXTS])
    assert np.allclose(vectors, singles, atol=1e-5), "sorting and per-batch padding changed the vectors"


def test_batch_size_does_not_change_vectors(tiny_encoder):
    """Guards against padding or sorting bugs that make a text's vector depend on its batch."""
    assert np.allclose(tiny_encoder.encode(TEXTS, batch_size=1), tiny_encoder.encode(TEXTS, batch_size=3), atol=1e-5)


def test_batches_are_capped_by_padded_tokens_and_keep_the_vectors(tiny_encoder):
    """Long texts go in small batches, short ones in full batches, and no cap changes a vector."""
    texts = TEXTS * 4
    lengths = sorted((len(ids) for ids in tiny_encoder.tokenize(texts, "document")), reverse=True)
    done: list[int] = []
    capped = tiny_encoder.encode(texts, batch_size=8, max_batch_tokens=2 * lengths[0],
                                 progress=lambda count, total: done.append(count))
    sizes = np.diff([0, *done]).tolist()
    assert done[-1] == len(texts) and sizes[0] == 2, "the longest texts must fill at most the token budget"
    start = 0
    for size in sizes:
        assert size == 1 or size * lengths[start] <= 2 * lengths[0]
        start += size
    assert max(sizes) == 8, "short texts must fill the batch up to batch_size"
    assert np.allclose(capped, tiny_encoder.encode(texts, batch_size=8), atol=1e-5)
    single = tiny_encoder.encode(texts, batch_size=8, max_batch_tokens=1)
    assert np.allclose(single, capped, atol=1e-5), "a budget below one text still encodes each text alone"


def test_query_and_document_max_lengths_are_separate(tiny_model_dir):
    encoder = BiEncoder.load(tiny_model_dir, query_max_length=8, document_max_length=64)
    long_text = TEXTS[3]
    assert len(encoder.tokenize([long_text], "query")[0]) == 8
    assert len(encoder.tokenize([long_text], "document")[0]) == 64
    assert not np.allclose(encoder.encode([long_text], "query"), encoder.encode([long_text], "document"))


def test_norms_are_reported_before_normalisation(tiny_encoder):
    encoded = tiny_encoder.encode_with_norms(TEXTS)
    raw = []
    with torch.inference_mode():
        for text in TEXTS:
            batch = tiny_encoder.tokenizer([text], return_tensors="pt", truncation=True, max_length=128)
            raw.append(tiny_encoder.embed(batch["input_ids"], batch["attention_mask"]).norm().item())
    assert np.allclose(encoded.norms, raw, rtol=1e-4)
    assert encoded.tokens == sum(len(ids) for ids in tiny_encoder.tokenize(TEXTS, "document"))


def test_saved_model_loads_in_sentence_transformers_with_identical_outputs(tiny_encoder, tmp_path):
    """Guards against a layout sentence-transformers reads differently (pooling, normalisation)."""
    tiny_encoder.save(tmp_path / "saved")
    oracle = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    theirs = oracle.encode(TEXTS[:3], normalize_embeddings=True, convert_to_numpy=True)
    assert np.allclose(tiny_encoder.encode(TEXTS[:3]), theirs, atol=1e-5)


def test_save_then_load_keeps_fingerprint(tiny_encoder, tmp_path):
    tiny_encoder.save(tmp_path / "again")
    assert BiEncoder.load(tmp_path / "again").fingerprint == tiny_encoder.fingerprint


def test_fingerprint_changes_with_weights_pooling_and_lengths(tiny_model_dir, tiny_model_copy):
    base = BiEncoder.load(tiny_model_dir).fingerprint
    assert BiEncoder.load(tiny_model_dir, pooling=Pooling.CLS).fingerprint != base
    assert BiEncoder.load(tiny_model_dir, query_max_length=16).fingerprint != base
    assert BiEncoder.load(tiny_model_dir, document_max_length=100).fingerprint != base
    weights = load_file(tiny_model_copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, tiny_model_copy / "model.safetensors", metadata={"format": "pt"})
    assert BiEncoder.load(tiny_model_copy).fingerprint != base


def test_pooling_is_read_from_the_folder(tiny_model_copy):
    config = tiny_model_copy / "1_Pooling" / "config.json"
    data = json.loads(config.read_text())
    data.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    config.write_text(json.dumps(data))
    assert BiEncoder.load(tiny_model_copy).settings.pooling is Pooling.CLS


def test_refuses_folders_without_safetensors(tiny_model_copy):
    """Guards against loading pickled weights (arbitrary code on load)."""
    (tiny_model_copy / "model.safetensors").unlink()
    with pytest.raises(InvalidInput, match="safetensors"):
        BiEncoder.load(tiny_model_copy)


def test_refuses_a_pipeline_step_or_default_prompt_it_would_skip(tiny_model_copy, caplog):
    """Guards against silently encoding a model whose sentence-transformers pipeline projects (Dense) or prefixes a
    default prompt: its vectors would differ from sentence-transformers' with no error anywhere."""
    modules_file = tiny_model_copy / "modules.json"
    modules = json.loads(modules_file.read_text())
    modules_file.write_text(json.dumps([*modules, {"idx": 3, "name": "3", "path": "3_Dense",
                                                   "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(InvalidInput, match=r"includes sentence_transformers\.models\.Dense, which Lockstep does not run"):
        BiEncoder.load(tiny_model_copy)
    modules_file.write_text(json.dumps(modules))
    config_file = tiny_model_copy / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prompts": {"query": "query: "}, "default_prompt_name": "query"}))
    with pytest.raises(InvalidInput, match=r"prepends its default prompt 'query' \('query: '\) to every text"):
        BiEncoder.load(tiny_model_copy)
    config_file.write_text(json.dumps({**config, "prompts": {"passage": "", "clustering": "topic: "},
                                       "default_prompt_name": None}))
    assert BiEncoder.load(tiny_model_copy).dim > 0
    assert "declares prompts ['clustering']" in caplog.text


def test_query_and_document_prompts_are_applied_as_sentence_transformers_does(tiny_model_copy, tmp_path):
    """Guards against dropping an e5- or bge-style model's prompts: sentence-transformers' encode_query and
    encode_document put them before every text, so Lockstep's vectors differed from the model's own."""
    plain = BiEncoder.load(tiny_model_copy)
    config_file = tiny_model_copy / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prompts": {"query": "query: ", "passage": "passage: "}}))
    encoder = BiEncoder.load(tiny_model_copy)
    assert (encoder.settings.query_prompt, encoder.settings.document_prompt) == ("query: ", "passage: ")
    assert encoder.fingerprint != plain.fingerprint
    oracle = SentenceTransformer(str(tiny_model_copy), device="cpu")
    short = TEXTS[:3]  # within the query length, which sentence-transformers' single max length does not apply
    assert np.allclose(encoder.encode(short, "query"), oracle.encode_query(short), atol=1e-5)
    passages = oracle.encode(TEXTS, prompt_name="passage", normalize_embeddings=True)
    assert np.allclose(encoder.encode(TEXTS, "document"), passages, atol=1e-5)
    assert not np.allclose(encoder.encode(TEXTS, "query"), plain.encode(TEXTS, "query"), atol=1e-3)
    encoder.save(tmp_path / "saved")
    again = BiEncoder.load(tmp_path / "saved")
    assert again.fingerprint == encoder.fingerprint and again.settings == encoder.settings
    saved_oracle = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert saved_oracle.prompts["document"] == "passage: ", "saved under the name every version's encode_document reads"
    assert np.allclose(again.encode(TEXTS, "document"), saved_oracle.encode_document(TEXTS), atol=1e-5)
    pooling_file = tiny_model_copy / "1_Pooling" / "config.json"
    pooling_file.write_text(json.dumps({**json.loads(pooling_file.read_text()), "include_prompt": False}))
    with pytest.raises(InvalidInput, match=r"leaves the prompt's tokens out \(include_prompt false\)"):
        BiEncoder.load(tiny_model_copy)


def test_refuses_lower_casing_and_uncosine_scoring_it_would_not_reproduce(tiny_model_copy):
    """Guards against silently encoding a model sentence-transformers lower-cases text for, or one that ranks by
    dot product over unnormalised vectors, where Lockstep normalises and ranks by cosine."""
    st_file = tiny_model_copy / "sentence_bert_config.json"
    st_config = json.loads(st_file.read_text())
    st_file.write_text(json.dumps({**st_config, "do_lower_case": True}))
    with pytest.raises(InvalidInput, match="sets do_lower_case, so sentence-transformers lower-cases every text"):
        BiEncoder.load(tiny_model_copy)
    st_file.write_text(json.dumps(st_config))
    config_file = tiny_model_copy / "config_sentence_transformers.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "similarity_fn_name": "dot"}))
    assert BiEncoder.load(tiny_model_copy).dim == 32, "dot product over normalised vectors is cosine"
    modules_file = tiny_model_copy / "modules.json"
    modules_file.write_text(json.dumps([m for m in json.loads(modules_file.read_text()) if m["path"] != "2_Normalize"]))
    with pytest.raises(InvalidInput, match="scores with 'dot' similarity over vectors its pipeline does not normalise"):
        BiEncoder.load(tiny_model_copy)


def test_a_half_precision_checkpoint_encodes_in_fp32(tiny_model_copy):
    """Guards against an fp16 checkpoint running in fp16 while the release records fp32 (transformers 5 keeps a
    checkpoint's dtype), which also made the int8 gate's fp32 reference an fp16 one."""
    BiEncoder.load(tiny_model_copy).model.half().save_pretrained(tiny_model_copy, safe_serialization=True)
    encoder = BiEncoder.load(tiny_model_copy)
    assert {parameter.dtype for parameter in encoder.model.parameters()} == {torch.float32}
    as_stored = AutoModel.from_pretrained(tiny_model_copy, dtype=torch.float16)
    assert encoder.fingerprints.by_version == model_fingerprints(as_stored, encoder.tokenizer, encoder.settings), \
        "the fingerprint hashes the weights as stored, so releases built before the fp32 load still match"
    oracle = SentenceTransformer(str(tiny_model_copy), device="cpu", model_kwargs={"dtype": torch.float32})
    assert np.allclose(encoder.encode(TEXTS), oracle.encode(TEXTS, normalize_embeddings=True), atol=1e-5)


def test_a_folder_declaring_no_length_uses_the_position_embeddings_as_sentence_transformers_does(tiny_model_copy):
    """Guards against capping such a model at 512 tokens where sentence-transformers encodes up to its position
    embeddings, so long texts got different vectors."""
    BertModel(BertConfig.from_pretrained(tiny_model_copy, max_position_embeddings=640)).save_pretrained(tiny_model_copy)
    st_file = tiny_model_copy / "sentence_bert_config.json"
    st_file.write_text(json.dumps({"do_lower_case": False}))
    tokenizer_file = tiny_model_copy / "tokenizer_config.json"
    tokenizer_file.write_text(json.dumps({k: v for k, v in json.loads(tokenizer_file.read_text()).items()
                                          if k != "model_max_length"}))
    (tiny_model_copy / "lockstep.json").unlink()
    encoder = BiEncoder.load(tiny_model_copy)
    oracle = SentenceTransformer(str(tiny_model_copy), device="cpu")
    assert encoder.settings.document_max_length == oracle.max_seq_length == 640


def test_a_roberta_style_model_is_capped_where_its_position_ids_run_out(tiny_model_copy):
    """Guards against defaulting a RoBERTa-family model to all its position embeddings: its position ids start
    after the padding index, so the last two would index past the table and long texts crashed the encoder."""
    config = RobertaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=20, pad_token_id=1)
    RobertaModel(config).save_pretrained(tiny_model_copy)
    (tiny_model_copy / "sentence_bert_config.json").write_text(json.dumps({"do_lower_case": False}))
    tokenizer_file = tiny_model_copy / "tokenizer_config.json"
    tokenizer_file.write_text(json.dumps({k: v for k, v in json.loads(tokenizer_file.read_text()).items()
                                          if k != "model_max_length"}))
    (tiny_model_copy / "lockstep.json").unlink()
    encoder = BiEncoder.load(tiny_model_copy)
    assert encoder.settings.document_max_length == 18
    assert encoder.encode([TEXTS[3]]).shape == (1, 32)
    with pytest.raises(InvalidInput, match="between 2 and the model's limit 18"):
        BiEncoder.load(tiny_model_copy, document_max_length=20)


def test_a_tokenizer_truncating_from_the_left_sees_the_end_of_a_long_text(tiny_model_copy):
    """Guards against the long-text shortcut (tokenizing a prefix) feeding a left-truncating tokenizer the wrong end
    of the text."""
    tokenizer_file = tiny_model_copy / "tokenizer_config.json"
    tokenizer_file.write_text(json.dumps({**json.loads(tokenizer_file.read_text()), "truncation_side": "left"}))
    encoder = BiEncoder.load(tiny_model_copy, document_max_length=8)
    text = "apple banana " * 200 + "cherry red green blue small large"
    expected = encoder.tokenizer([text], truncation=True, max_length=8)["input_ids"]
    assert encoder.tokenize([text], "document") == expected
    assert encoder.tokenizer.convert_ids_to_tokens(expected[0])[-2] == "large"


def test_refuses_missing_folder(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        BiEncoder.load(tmp_path / "nope")


def test_refuses_max_length_beyond_the_model(tiny_model_dir):
    with pytest.raises(InvalidInput, match="max length"):
        BiEncoder.load(tiny_model_dir, document_max_length=4096)


def test_single_string_is_refused(tiny_encoder):
    with pytest.raises(InvalidInput, match="list of texts"):
        tiny_encoder.encode("just one string")


def test_empty_list_gives_empty_matrix(tiny_encoder):
    assert tiny_encoder.encode([]).shape == (0, 32)


def test_copied_folder_keeps_name(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "renamed")
    assert BiEncoder.load(copy).name == "tiny-bert-0"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_16_bit_encoding_agrees_with_fp32(tiny_encoder, precision):
    """Guards against a precision path that changes the vectors beyond rounding, or leaves them in fp32."""
    reference = tiny_encoder.encode(TEXTS)
    tiny_encoder.precision = precision
    lowered = tiny_encoder.encode(TEXTS)
    assert lowered.dtype == np.float32 and np.allclose(np.linalg.norm(lowered, axis=1), 1.0, atol=1e-5)
    assert (reference * lowered).sum(axis=1).min() >= 0.999 and not np.array_equal(lowered, reference)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_serving_in_16_bits_stores_linear_weights_once_and_changes_no_output(tiny_model_dir, precision, dtype):
    """Guards against a serving shortcut that moves the vectors or the fingerprint by a single bit."""
    reference = BiEncoder.load(tiny_model_dir)
    reference.precision = precision
    expected = reference.encode(TEXTS, "query")
    served = BiEncoder.load(tiny_model_dir)
    served.precision = precision
    served.prepare_for_serving()
    linear = [m for m in served.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == dtype for m in linear)
    assert np.array_equal(served.encode(TEXTS, "query"), expected)
    assert np.array_equal(served.encode(TEXTS[:1], "query"), reference.encode(TEXTS[:1], "query"))
    assert served.fingerprint == reference.fingerprint


def test_an_encoder_prepared_for_serving_keeps_its_precision(tiny_model_dir):
    served = BiEncoder.load(tiny_model_dir)
    served.precision = "bf16"
    served.prepare_for_serving()
    served.precision = "fp32"
    with pytest.raises(InvalidInput, match="prepared to serve in bf16"):
        served.encode(TEXTS)


def test_serving_in_fp32_keeps_fp32_weights(tiny_model_dir):
    served = BiEncoder.load(tiny_model_dir)
    served.prepare_for_serving()
    assert all(p.dtype == torch.float32 for p in served.model.parameters())
    assert np.array_equal(served.encode(TEXTS), BiEncoder.load(tiny_model_dir).encode(TEXTS))
