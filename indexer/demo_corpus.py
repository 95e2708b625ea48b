"""A demo corpus built offline from the Python standard library's docstrings.

`lockstep up` ingests it when the corpus is empty, so a first run has something to
search without any download. Sources are parsed with `ast`, never imported, so no
module's import-time side effects run.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

from indexer.corpus_store import Document

MIN_DOCSTRING_CHARS = 120


def _docstrings(path: Path, module: str) -> list[Document]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = []
    module_doc = ast.get_docstring(tree)
    if module_doc and len(module_doc) >= MIN_DOCSTRING_CHARS:
        found.append(Document(id=module, title=module, text=module_doc, metadata={"kind": "module"}))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                name = f"{module}.{node.name}"
                found.append(Document(id=name, title=name, text=doc, metadata={"kind": kind}))
    return found


def stdlib_documents(limit: int = 1500) -> list[Document]:
    """Up to `limit` documents: module, class and function docstrings of top-level stdlib modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents: list[Document] = []
    for path in sorted(stdlib.glob("*.py")):
        if path.stem.startswith("_") or path.stem in {"this", "antigravity"}:
            continue
        documents.extend(_docstrings(path, path.stem))
        if len(documents) >= limit:
            break
    return documents[:limit]
