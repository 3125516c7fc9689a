"""The chat `rag` extension's request part: which collection, how many sources, what to search with.

    {"rag": {"collection": "docs", "top_k": 4, "mode": "hybrid", "filter": {...}}}

Retrieval and the token-budgeted sources message are the grounding stage of the serving layer
(service/serving/stages/grounding.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from service.rag.errors import RagError
from service.rag.validate import check_collection_name, check_json

MAX_TOP_K = 50


@dataclass
class RagSpec:
    collection: str
    top_k: int = 4
    mode: str = "hybrid"
    filter: dict | None = None


def parse_spec(raw) -> RagSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("collection"), str) or not raw["collection"]:
        raise RagError(400, "rag needs {\"collection\": \"<name>\"} (optional top_k, mode, filter)",
                       param="rag.collection")
    unknown = set(raw) - {"collection", "top_k", "mode", "filter"}
    if unknown:
        raise RagError(400, f"unknown rag fields: {', '.join(sorted(unknown))}", param="rag")
    top_k = raw.get("top_k", 4)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise RagError(400, f"rag.top_k must be an integer from 1 to {MAX_TOP_K}", param="rag.top_k")
    mode = raw.get("mode", "hybrid")
    if mode not in ("dense", "keyword", "hybrid"):
        raise RagError(400, "rag.mode must be one of dense, keyword, hybrid", param="rag.mode")
    flt = raw.get("filter")
    if flt is not None and not isinstance(flt, dict):
        raise RagError(400, "rag.filter must be an object", param="rag.filter")
    check_collection_name(raw["collection"], "rag.collection")
    if flt is not None:
        check_json(flt, "rag.filter", code="invalid_filter")
    return RagSpec(raw["collection"], top_k, mode, flt)


def last_user_text(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m["role"] == "user" and m["content"].strip():
            return m["content"]
    raise RagError(400, "rag needs a user message to search with", param="messages")
