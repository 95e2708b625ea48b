"""Refusing text that UTF-8 cannot hold: a lone surrogate, such as a JSON `\\ud800` escape outside a pair.

JSON parsers accept such escapes and Python keeps them in `str`, but the tokenizer
raises an opaque TypeError on them and SQLite cannot store them, so every text a user
sends is checked where it enters, with a message that names it.
"""

from __future__ import annotations

from training.errors import InvalidInput


def require_utf8(text: str, what: str) -> str:
    """`text` unchanged, or InvalidInput naming `what` (e.g. "query", "input 3") and the offending character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} holds {exc.object[exc.start:exc.end]!r}, a lone surrogate that UTF-8 cannot "
                           "hold; fix the text's encoding (a \\udXXX escape outside a pair)") from exc
    return text
