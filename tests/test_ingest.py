"""Ingesting JSONL corpora: formats accepted, and malformed files refused with file:line, committing nothing."""

import json

import pytest

from indexer.ingest import ingest_file, read_corpus
from training.errors import InvalidInput


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_beir_and_plain_jsonl(tmp_path, corpus):
    path = _write(
        tmp_path / "c.jsonl",
        [
            {"_id": "a", "title": "T", "text": "alpha", "metadata": {}},
            {"id": 7, "text": "seven"},
            "",
            {"id": "m", "title": "only a title", "metadata": {"k": 1}},
        ],
    )
    result = ingest_file(corpus, path)
    assert result.inserted == 3
    assert corpus.get("7").text == "seven" and corpus.get("m").metadata == {"k": 1}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"title": "x", "text": "y"}), "missing document id"),
        (json.dumps({"id": "x", "text": 5}), '"text" of document'),
        (json.dumps({"id": "x"}), "neither"),
        (json.dumps({"id": "x", "text": "t", "metadata": [1]}), '"metadata"'),
        (json.dumps(["a"]), "expected a JSON object"),
        (json.dumps({"id": "a", "text": "dup"}), "duplicate id 'a' (first at line 1)"),
        ('{"id": "s", "text": "broken \\ud800 pair"}', "lone surrogate"),
        ('{"id": "m", "text": "ok", "metadata": {"k": ["\\udfff"]}}', "lone surrogate"),
        pytest.param('{"id": ' + "9" * 5000 + ', "text": "long id"}', "more than 4300 digits; write long numbers, "
                     "such as ids, as strings", id="integer-too-long"),
        pytest.param('{"id": "deep", "text": "t", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}",
                     "nested too deeply", id="nesting-too-deep"),
        (json.dumps({"id": "x", "text": "t", "metadata": []}), "\"metadata\" of document 'x' must be a JSON object"),
        (json.dumps({"id": "x", "text": "t", "metadata": 0}), "must be a JSON object, got int"),
        (json.dumps({"id": "x", "text": "t", "metadata": ""}), "must be a JSON object, got str"),
        pytest.param(json.dumps({"id": "a\u0000", "text": "t"}), "document id 'a\\x00' holds a control character",
                     id="nul-in-id"),
        pytest.param(json.dumps({"id": "a\tb", "text": "t"}), "holds a control character (a tab", id="tab-in-id"),
    ],
)
def test_malformed_line_names_file_and_line_and_commits_nothing(tmp_path, corpus, bad_line, message):
    """Guards against partial ingests: the good first line must not be committed either."""
    path = _write(tmp_path / "c.jsonl", [{"id": "a", "text": "fine"}, {"id": "b", "text": "fine"}, bad_line])
    with pytest.raises(InvalidInput) as raised:
        ingest_file(corpus, path)
    assert str(raised.value).startswith(f"{path}:3: ")
    assert message in str(raised.value)
    assert corpus.count() == 0 and corpus.seq == 0


def test_invalid_utf8_is_reported_with_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "\xff"}\n')
    with pytest.raises(InvalidInput, match=r"c\.jsonl:2: not valid UTF-8"):
        read_corpus(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InvalidInput, match="no such file"):
        read_corpus(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidInput, match="no documents"):
        read_corpus(tmp_path / "empty.jsonl")


def test_null_metadata_means_none(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"id": "a", "text": "t", "metadata": None}])
    assert read_corpus(path)[0].metadata == {}


def test_an_unreadable_file_is_refused_with_its_path(tmp_path, monkeypatch):
    """Guards against a raw PermissionError traceback from `lockstep ingest` (tests run as root, so it is simulated)."""
    path = _write(tmp_path / "c.jsonl", [{"id": "a", "text": "t"}])

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "open", denied)
    with pytest.raises(InvalidInput, match=r"c\.jsonl: cannot be read \(Permission denied\); check the file's"):
        read_corpus(path)
