"""Reading a corpus file: BEIR `corpus.jsonl` or plain JSONL, checked line by line.

Each line is an object with `_id` or `id`, optional `title`, `text` and `metadata` (a
JSON object; absent or null means none). The whole file is parsed and validated before
anything is written, and then written in one transaction, so a malformed line (invalid
UTF-8 or JSON, an integer too long to convert, nesting too deep, a bad field) aborts
with `file:line: what is wrong` and commits nothing; a file that cannot be opened or
read is refused with its path and the reason.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from indexer.corpus_store import CorpusStore, Document, WriteResult
from training.errors import InvalidInput
from training.input_file import read_jsonl

MAX_ID_LENGTH = 512


def parse_document(obj: object) -> Document:
    """Validate one JSON object as a document; raises InvalidInput naming the bad field."""
    if not isinstance(obj, dict):
        raise InvalidInput(f"expected a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("_id", obj.get("id"))
    if raw_id is None:
        raise InvalidInput('missing document id: add an "id" (or BEIR "_id") field')
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise InvalidInput(f"document id must be a string or an integer, got {type(raw_id).__name__}")
    doc_id = str(raw_id)
    if not doc_id.strip() or len(doc_id) > MAX_ID_LENGTH:
        raise InvalidInput(f"document id must be 1..{MAX_ID_LENGTH} characters and not blank")
    if any(unicodedata.category(char) == "Cc" for char in doc_id):
        raise InvalidInput(f"document id {doc_id!r} holds a control character (a tab, line break or NUL); "
                           "ids are printable text")
    title, text = obj.get("title", ""), obj.get("text", "")
    for name, value in (("title", title), ("text", text)):
        if not isinstance(value, str):
            raise InvalidInput(f'"{name}" of document {doc_id!r} must be a string, got {type(value).__name__}')
    if not (title.strip() or text.strip()):
        raise InvalidInput(f'document {doc_id!r} has neither "title" nor "text"; give it some text to embed')
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise InvalidInput(f'"metadata" of document {doc_id!r} must be a JSON object, got {type(metadata).__name__}')
    try:
        json.dumps([doc_id, title, text, metadata], ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"document {doc_id!r} holds {exc.object[exc.start:exc.end]!r}, a lone surrogate that UTF-8 "
                           "cannot store; fix the text's encoding (a \\udXXX escape outside a pair)") from exc
    return Document(id=doc_id, title=title, text=text, metadata=metadata)


def read_corpus(path: str | Path) -> list[Document]:
    """Parse a JSONL corpus file; raises InvalidInput as `file:line: problem`, or `file: problem` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file; pass a JSONL corpus such as BEIR's corpus.jsonl")
    documents: list[Document] = []
    first_line: dict[str, int] = {}
    for number, doc in read_jsonl(path, parse_document):
        if doc.id in first_line:
            raise InvalidInput(f"{path}:{number}: duplicate id {doc.id!r} (first at line {first_line[doc.id]})")
        first_line[doc.id] = number
        documents.append(doc)
    if not documents:
        raise InvalidInput(f"{path}: the file holds no documents")
    return documents


def ingest_file(store: CorpusStore, path: str | Path) -> WriteResult:
    """Validate the whole file, then upsert it in one transaction."""
    return store.upsert(read_corpus(path))
