"""What RAG accepts from clients: names and ids that become URL path segments (and directory names),
and JSON values (metadata, filters) that are stored in SQLite and sent back in later responses.

Why here and not only in the schemas: an accepted value is written once and read by every later
request, so anything that cannot round-trip must be refused before it is stored, whichever way it
came in (JSON body, multipart form, the chat `rag` extension). Refused: lone surrogates (not
encodable as UTF-8: every response carrying them fails), integers SQLite cannot bind (beyond signed
64 bits), NaN/Infinity (not JSON), nesting deeper than MAX_DEPTH (recursive encoders overflow), and
ids a URL cannot carry as one segment ('.', '..', '/', '\\': clients normalise or split them, and
`DELETE .../documents/..` becomes a DELETE of the collection). Every refusal is a 400 naming the field.
Walks are iterative: a hostile depth costs no recursion.
"""

from __future__ import annotations

import json
import math
import re

from service.rag.errors import RagError

MAX_DEPTH = 32  # containers nested in a metadata value or a filter
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # collection names; always fullmatch ('$' allows "\n")
DOC_ID = re.compile(r"[^/\\\x00-\x1f\x7f]{1,256}")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
NAME_RULE = "collection names are 1-64 letters, digits, '_' or '-', starting with a letter or digit"
DOC_ID_RULE = "document ids are 1-256 characters, not '.' or '..', without '/', '\\' or control characters"


def bad_unicode_at(s: str) -> int | None:
    """Index of the first lone surrogate in s, or None when s encodes as UTF-8."""
    if s.isascii():
        return None
    m = _SURROGATE.search(s)
    return m.start() if m else None


def check_text(s, param: str) -> None:
    if not isinstance(s, str):
        raise RagError(400, f"{param} must be a string", param=param)
    at = bad_unicode_at(s)
    if at is not None:
        raise RagError(400, f"{param}: invalid Unicode at character {at} (lone surrogate "
                       f"{ascii(s[at])}); send UTF-8 text", param=param, code="invalid_unicode")


def check_collection_name(name, param: str = "collection") -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RagError(400, f"{_shown(name)}: {NAME_RULE}", param=param, code="invalid_name")


def check_document_id(doc_id, param: str = "document_id") -> None:
    if (not isinstance(doc_id, str) or not DOC_ID.fullmatch(doc_id) or doc_id in (".", "..")
            or bad_unicode_at(doc_id) is not None):
        raise RagError(400, f"document id {_shown(doc_id)}: {DOC_ID_RULE}", param=param, code="invalid_document_id")


def check_documents(inputs, ids: list[str]) -> None:
    """DocInputs (text, metadata, source) and their ids: all of what would be stored, before any of it is."""
    for i, (d, doc_id) in enumerate(zip(inputs, ids)):
        check_document_id(doc_id, f"documents.{i}.id")
        if not isinstance(d.text, str) or not d.text.strip():
            raise RagError(400, f"document {_shown(d.source or doc_id)} has no text", param=f"documents.{i}.text",
                           code="empty_document")
        check_text(d.text, f"documents.{i}.text")
        if d.metadata is not None and not isinstance(d.metadata, dict):
            raise RagError(400, "metadata must be an object", param=f"documents.{i}.metadata")
        check_json(d.metadata or {}, f"documents.{i}.metadata")
        if d.source is not None:
            check_text(d.source, f"documents.{i}.source")
    if len(set(ids)) != len(ids):
        raise RagError(400, "document ids repeat within the request", param="documents.id")


def _shown(value) -> str:
    return ascii(value[:60]) if isinstance(value, str) else type(value).__name__


def check_json(value, param: str, code: str = "invalid_value", max_depth: int = MAX_DEPTH) -> None:
    """Raise a 400 naming the exact place (e.g. documents.0.metadata.tags.2) of the first bad value."""
    def bad(where: str, why: str) -> RagError:
        return RagError(400, f"{where}: {why}", param=where, code=code)

    stack = [(value, param, 0)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth >= max_depth:
                raise bad(where, f"nested deeper than {max_depth} levels")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, sub in items:
                if isinstance(k, str):
                    if bad_unicode_at(k) is not None:
                        raise bad(where, f"key {ascii(k[:40])} is not valid Unicode (lone surrogate)")
                    k = k[:40]
                stack.append((sub, f"{where}.{k}", depth + 1))
        elif isinstance(v, str):
            if bad_unicode_at(v) is not None:
                raise bad(where, "not valid Unicode (lone surrogate); send UTF-8 text")
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, int):
            if not INT64_MIN <= v <= INT64_MAX:
                raise bad(where, "integer out of range (signed 64 bits); send it as a string")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise bad(where, "NaN and Infinity are not JSON numbers")
        else:
            raise bad(where, f"{type(v).__name__} is not a JSON value")


def readable_json(text: str):
    """Stored JSON -> a value that can be sent back. Rows written before the checks above existed may
    hold lone surrogates or NaN (they made every read a 500): those become U+FFFD and null. The text
    test keeps the walk off the normal path."""
    value = json.loads(text)
    if "\\ud" not in text and "\\uD" not in text and "NaN" not in text and "Infinity" not in text:
        return value
    root = [value]
    stack = [(root, 0)]
    while stack:
        parent, key = stack.pop()
        v = parent[key]
        if isinstance(v, str):
            parent[key] = _SURROGATE.sub("\ufffd", v)
        elif isinstance(v, float) and not math.isfinite(v):
            parent[key] = None
        elif isinstance(v, dict):
            fixed = {_SURROGATE.sub("\ufffd", k): x for k, x in v.items()}
            parent[key] = fixed
            stack.extend((fixed, k) for k in fixed)
        elif isinstance(v, list):
            stack.extend((v, i) for i in range(len(v)))
    return root[0]
