"""Metadata filters for search: which documents a query may return, by the metadata they were stored with.

The language is the one MongoDB, Chroma and Pinecone share, so it needs no new learning:

    {"lang": "en"}                                  equal (an array field matches if any element does)
    {"year": {"$gte": 2015, "$lt": 2020}}           $eq $ne $gt $gte $lt $lte, on numbers or strings
    {"tags": {"$in": ["bio", "med"]}}               $in $nin, up to MAX_VALUES values
    {"source": {"$exists": true}}
    {"$or": [{"lang": "en"}, {"lang": "de"}]}       $and $or; several keys in one object are ANDed

A field is a dotted path into nested objects (`"author.name"`), each part of letters,
digits, `_` or `-`. Comparisons are typed: a number never equals or orders against a
string, nor a boolean against a number (SQLite would, by its type order). `$ne` and
`$nin` also match documents without the field, as MongoDB's do. A filter is parsed
into a tree once (`parse_filter`, refusing anything else with the path of the bad part)
and compiled to one SQL condition over the corpus store's metadata column (`to_sql`),
which reads a field's index (`indexer.field_index`) where it has one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from training.errors import InvalidInput

MAX_VALUES = 1024  # values in one $in / $nin
MAX_CONDITIONS = 64  # conditions in one filter, so a request cannot make a query of unbounded size
MAX_DEPTH = 8  # nesting of $and / $or
FIELD_PART = re.compile(r"[A-Za-z0-9_-]+")
COMPARISONS = {"$eq": "=", "$ne": "=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
MEMBERSHIP = ("$in", "$nin")
OPERATORS = (*COMPARISONS, *MEMBERSHIP, "$exists")
Scalar = str | int | float | bool


@dataclass(frozen=True)
class Condition:
    """One test on one field: `operator` (one of OPERATORS) against `values` (one value, or the $in / $nin list)."""

    field: str
    operator: str
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Junction:
    """All (`kind` "and") or any (`kind` "or") of `parts`."""

    kind: str
    parts: tuple[Condition | Junction, ...]


Filter = Condition | Junction


def parse_filter(raw: object) -> Filter:
    """The filter tree of a parsed JSON filter; InvalidInput naming the bad part (`filter.year.$gte`) and what it
    must be otherwise."""
    if not isinstance(raw, dict) or not raw:
        raise InvalidInput(f'filter must be a non-empty JSON object such as {{"lang": "en"}}, got {raw!r}')
    parsed = _parse_object(raw, "filter", 0)
    count = _count(parsed)
    if count > MAX_CONDITIONS:
        raise InvalidInput(f"filter has {count} conditions; at most {MAX_CONDITIONS} are allowed")
    return parsed


def parse_filter_text(text: str, name: str = "filter") -> Filter:
    """The filter tree of a filter written as JSON text (a CLI option, a query parameter called `name`); InvalidInput
    saying where the JSON breaks, or what `parse_filter` finds wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{name} is not JSON: {exc.msg} at column {exc.colno}; write it as {{\"lang\": \"en\"}}") from None
    return parse_filter(raw)


def _parse_object(raw: dict, where: str, depth: int) -> Filter:
    if depth > MAX_DEPTH:
        raise InvalidInput(f"{where} nests $and / $or deeper than {MAX_DEPTH} levels")
    parts: list[Filter] = []
    for key, value in raw.items():
        here = f"{where}.{key}"
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value or not all(isinstance(item, dict) and item for item in value):
                raise InvalidInput(f"{here} must be a non-empty list of non-empty filter objects, got {value!r}")
            parts.append(Junction(key[1:], tuple(_parse_object(item, f"{here}[{i}]", depth + 1) for i, item in enumerate(value))))
        elif key.startswith("$"):
            raise InvalidInput(f"{here}: unknown operator at the top of a filter; use $and or $or there, and "
                               f"{', '.join(OPERATORS)} inside a field's object")
        else:
            check_field(key, where)
            parts.extend(_parse_field(key, value, here))
    return parts[0] if len(parts) == 1 else Junction("and", tuple(parts))


def check_field(field: str, where: str) -> None:
    if not all(FIELD_PART.fullmatch(part) for part in field.split(".")):
        raise InvalidInput(f"{where}: field {field!r} must be a dotted path of names made of letters, digits, _ or - "
                           "(such as author.name)")


def _parse_field(field: str, value: object, where: str) -> list[Condition]:
    if not isinstance(value, dict):
        return [Condition(field, "$eq", (_scalar(value, where),))]
    if not value:
        raise InvalidInput(f"{where} must hold at least one operator ({', '.join(OPERATORS)}), got {{}}")
    conditions = []
    for operator, operand in value.items():
        here = f"{where}.{operator}"
        if operator in COMPARISONS:
            operand = _scalar(operand, here)
            if operator not in ("$eq", "$ne") and isinstance(operand, bool):
                raise InvalidInput(f"{here} orders numbers or strings; a boolean has no order, got {operand!r}")
            conditions.append(Condition(field, operator, (operand,)))
        elif operator in MEMBERSHIP:
            if not isinstance(operand, list) or not 0 < len(operand) <= MAX_VALUES:
                raise InvalidInput(f"{here} must be a list of 1 to {MAX_VALUES} values, got {operand!r}")
            conditions.append(Condition(field, operator, tuple(_scalar(item, f"{here}[{i}]") for i, item in enumerate(operand))))
        elif operator == "$exists":
            if not isinstance(operand, bool):
                raise InvalidInput(f"{here} must be true or false, got {operand!r}")
            conditions.append(Condition(field, operator, (operand,)))
        else:
            raise InvalidInput(f"{here}: unknown operator; use one of {', '.join(OPERATORS)} (a field's value that is "
                               "an object is read as operators)")
    return conditions


def _scalar(value: object, where: str) -> Scalar:
    if isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidInput(f"{where} is an integer beyond 64 bits, got {value!r}; compare with a float instead")
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise InvalidInput(f"{where} must be a string, a finite number or a boolean, got {value!r}; "
                       "match a missing field with $exists: false")


def _count(node: Filter) -> int:
    return 1 if isinstance(node, Condition) else sum(_count(part) for part in node.parts)


def json_path(field: str) -> str:
    """The SQLite JSON path of a dotted field name (checked by `check_field`)."""
    return "$." + ".".join(f'"{part}"' for part in field.split("."))


def to_sql(node: Filter, indexed: frozenset[str] = frozenset(), table: str = "documents") -> tuple[str, list]:
    """One SQL condition over `table`'s JSON metadata that holds where `node` matches, and its parameters. Field
    paths are bound as parameters too (they were checked by `parse_filter`). A comparison on a field in `indexed`
    looks its values up in `indexer.field_index` instead, with the same answers."""
    if isinstance(node, Junction):
        pieces = [to_sql(part, indexed, table) for part in node.parts]
        joiner = " AND " if node.kind == "and" else " OR "
        return "(" + joiner.join(sql for sql, _ in pieces) + ")", [param for _, params in pieces for param in params]
    column, path = f"{table}.metadata", json_path(node.field)
    if node.operator == "$exists":
        present = f"COALESCE(json_type({column}, ?), 'null') != 'null'"
        return (present if node.values[0] else f"NOT {present}"), [path]
    operator = COMPARISONS.get(node.operator, "=")
    if node.field in indexed:
        tests = [_element_test(value, operator, "kind", "'number'") for value in node.values]
        sql = (f"{table}.id IN (SELECT id FROM field_values WHERE field = ? AND "
               f"({' OR '.join(test for test, _ in tests)}))")
        params = [node.field]
    else:
        tests = [_element_test(value, operator, "type", "'integer', 'real'") for value in node.values]
        sql = (f"(COALESCE(json_type({column}, ?), 'object') != 'object' AND EXISTS (SELECT 1 FROM json_each({column}, ?) "
               f"WHERE {' OR '.join(test for test, _ in tests)}))")
        params = [path, path]
    params += [param for _, values in tests for param in values]
    return (f"NOT {sql}" if node.operator in ("$ne", "$nin") else sql), params


def _element_test(value: Scalar, operator: str, kind: str, numbers: str) -> tuple[str, list]:
    """A test on one value of the field (itself, or one element of its array) that holds where it is of `value`'s
    JSON kind and compares to it by `operator`: `kind` names the column holding the JSON kind and `numbers` lists
    the kinds a number may have there, quoted."""
    if isinstance(value, bool):
        return f"{kind} = '{'true' if value else 'false'}'", []
    if isinstance(value, str):
        return f"({kind} = 'text' AND value {operator} ?)", [value]
    return f"({kind} IN ({numbers}) AND value {operator} ?)", [value]
