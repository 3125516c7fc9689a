"""Metadata filters -> a SQL condition on documents.metadata (JSON), evaluated by SQLite.

Shape (MongoDB-like, a subset): {"key": value} is equality; {"key": {"$op": value}} with $eq, $ne,
$gt, $gte, $lt, $lte, $in, $nin, $exists; several keys are ANDed; {"$and": [f, ...]} and
{"$or": [f, ...]} combine filters. Keys may be dotted paths into nested objects ("author.name").
"""

from __future__ import annotations

import json
import math
import re

from service.rag.errors import RagError
from service.rag.validate import INT64_MAX, INT64_MIN, bad_unicode_at, check_json

_KEY = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")  # fullmatch: '$' would let "key\n" through
_CMP = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
MAX_DEPTH = 8


def _bad(message: str) -> RagError:
    return RagError(400, f"invalid filter: {message}", param="filter", code="invalid_filter")


def _path(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise _bad(f"key {ascii(key[:60])} must be letters, digits, '_' or '-', dotted for nested fields")
    return "$." + ".".join(f'"{part}"' for part in key.split("."))


def _scalar(value):
    if isinstance(value, bool):
        return int(value)  # json_extract gives 1/0 for true/false
    # What SQLite cannot bind (or binds as something else) is the client's error, not a 500.
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise _bad("an integer is out of range (signed 64 bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad("NaN and Infinity are not JSON numbers")
    if isinstance(value, str) and bad_unicode_at(value) is not None:
        raise _bad("a string value is not valid Unicode (lone surrogate)")
    if value is None or isinstance(value, (int, float, str)):
        return value
    raise _bad(f"value {json.dumps(value)[:60]} must be a string, number, boolean or null")


def _field(column: str, key: str, cond, params: list) -> str:
    expr = f"json_extract({column}, ?)"
    path = _path(key)
    if not isinstance(cond, dict):
        cond = {"$eq": cond}
    parts = []
    for op, value in cond.items():
        if op in _CMP:
            if value is None:
                parts.append(f"{expr} IS {'NOT ' if op == '$ne' else ''}NULL")
                params.append(path)
                continue
            parts.append(f"{expr} {_CMP[op]} ?")
            params += [path, _scalar(value)]
        elif op in ("$in", "$nin"):
            if not isinstance(value, list) or not value or len(value) > 1000:
                raise _bad(f"{op} needs a list of 1 to 1000 values")
            marks = ", ".join("?" * len(value))
            parts.append(f"{expr} {'NOT ' if op == '$nin' else ''}IN ({marks})")
            params += [path] + [_scalar(v) for v in value]
        elif op == "$exists":
            parts.append(f"json_type({column}, ?) IS {'NOT ' if value else ''}NULL")
            params.append(path)
        else:
            raise _bad(f"unknown operator {op!r} for key {key!r}")
    return " AND ".join(parts) or "1"


def filter_sql(flt: dict | None, column: str = "d.metadata", depth: int = 0) -> tuple[str, list]:
    """(condition, params) for a filter; ("1", []) when there is none."""
    if not flt:
        return "1", []
    if not isinstance(flt, dict):
        raise _bad("a filter is an object")
    if depth > MAX_DEPTH:
        raise _bad("nested too deeply")
    if depth == 0:  # depth, Unicode, integer range of the whole filter, before any recursion over it
        check_json(flt, "filter", code="invalid_filter")
    parts, params = [], []
    for key, cond in flt.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, list) or not cond:
                raise _bad(f"{key} needs a non-empty list of filters")
            subs = []
            for sub in cond:
                sql, p = filter_sql(sub, column, depth + 1)
                subs.append(f"({sql})")
                params += p
            parts.append("(" + (" AND " if key == "$and" else " OR ").join(subs) + ")")
        elif key.startswith("$"):
            raise _bad(f"unknown operator {key!r}")
        else:
            parts.append(_field(column, key, cond, params))
    return " AND ".join(parts), params
