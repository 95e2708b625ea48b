"""Reading a user's line-based input file (JSONL, TSV), every problem reported as `file:line: what to fix`.

Bytes that are not UTF-8 and a file that cannot be read are reported with the file;
for JSONL, besides malformed JSON, `json.loads` refuses an integer longer than Python
converts (a ValueError) and nesting deeper than the recursion limit (a RecursionError).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from training.errors import InvalidInput

T = TypeVar("T")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """`(line number, text stripped of surrounding whitespace)` for each non-blank line of `path`; InvalidInput as
    `path:line: problem` for bytes that are not UTF-8, and as `path: problem` when the file cannot be read."""
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise InvalidInput(f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode "
                                       "the file as UTF-8, or decompress it") from exc
                if line:
                    yield number, line
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot be read ({exc.strerror}); check the file's permissions and "
                           "that it is a regular file") from exc


def read_jsonl(path: Path, parse: Callable[[object], T]) -> Iterator[tuple[int, T]]:
    """`(line number, parse(value))` for each non-blank line of `path` (see `read_lines`); InvalidInput as
    `path:line: problem` when a line is not JSON or `parse` raises InvalidInput."""
    for number, line in read_lines(path):
        value = _json_value(path, number, line)
        try:
            parsed = parse(value)
        except InvalidInput as exc:
            raise InvalidInput(f"{path}:{number}: {exc}") from exc
        yield number, parsed


def _json_value(path: Path, number: int, line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    except RecursionError as exc:
        raise InvalidInput(f"{path}:{number}: JSON nested too deeply to parse; flatten it") from exc
    except ValueError as exc:
        raise InvalidInput(f"{path}:{number}: a number has more than {sys.get_int_max_str_digits()} digits; "
                           "write long numbers, such as ids, as strings") from exc
