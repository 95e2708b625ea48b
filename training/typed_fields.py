"""Checking parsed data (a TOML section, a JSON object) against a dataclass's field types before building it.

TOML and JSON values keep their types (`hard_negatives = "1"` is a string), and a
dataclass does not check them, so a wrong type would surface later as a TypeError deep
in validation or training. This checks the plain types recipes and manifests use: bool,
int, float (an int is accepted), str, Literal choices, optional (`| None`) fields,
nested dataclasses and containers (the container only, not its items).
"""

from __future__ import annotations

import types
from dataclasses import fields
from typing import Literal, Union, get_args, get_origin, get_type_hints

from training.errors import InvalidInput


def check_fields(cls: type, data: dict, where: str) -> None:
    """InvalidInput naming `where` for names in `data` that are not fields of `cls` (so a typo never falls back to a
    default), then as `check_field_types` does."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInput(f"{where}: unknown settings {unknown}; known: {sorted(known)}")
    check_field_types(cls, data, where)


def check_field_types(cls: type, data: dict, where: str) -> None:
    """InvalidInput naming `where`, the field, the expected type and the value, for the first value in `data` whose
    type does not match `cls`'s field of that name (unknown names are left to the caller)."""
    hints = get_type_hints(cls)
    for name, value in data.items():
        hint = hints.get(name)
        if hint is not None and not _matches(value, hint):
            raise InvalidInput(f"{where}: {name} must be {_describe(hint)}, got {value!r}")


def _matches(value: object, hint: object) -> bool:
    origin = get_origin(hint)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in get_args(hint))
    if origin in (Union, types.UnionType):
        return any(_matches(value, option) for option in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: object) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in get_args(hint))
    if hint is type(None):
        return "unset"
    if origin is not None:
        hint = origin
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
             list: "a list"}
    return names.get(hint) or getattr(hint, "__name__", str(hint))
