"""The chat `rag` extension: retrieve for the last user message, put the numbered sources first.

    {"rag": {"collection": "docs", "top_k": 4, "mode": "hybrid", "filter": {...}}}

The sources go in a system message before all other messages (stable across turns and requests:
the prefix cache reuses it), trimmed to what fits beside the conversation and the answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from service.rag.errors import RagError
from service.rag.prompt import drop_weakest, select_sources, sources_message
from service.rag.validate import check_collection_name, check_json

MAX_TOP_K = 50
TEMPLATE_MARGIN = 16  # tokens the chat template adds around one more message
DEFAULT_ANSWER_RESERVE = 512


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


async def ground(store, raw_spec, messages: list[dict], tokenizer, render: Callable[[list[dict]], str],
                 max_model_len: int, max_tokens: int | None, default_max_tokens: int) -> tuple[list[dict], list[dict]]:
    """(messages with the sources system message first, citations)."""
    if store is None:
        raise RagError(400, "RAG is not enabled on this server", param="rag")
    spec = parse_spec(raw_spec)
    results = await store.search(spec.collection, last_user_text(messages), spec.top_k, spec.mode, spec.filter)
    reserve = max_tokens if max_tokens is not None else min(default_max_tokens, DEFAULT_ANSWER_RESERVE)

    def build():
        def n_tokens(msgs):
            return len(tokenizer.encode(render(msgs), add_special_tokens=False))

        budget = max_model_len - reserve - n_tokens(messages) - TEMPLATE_MARGIN
        chosen = select_sources(results, tokenizer, budget)
        while True:  # the per-source counts are close, not exact: check the rendered prompt
            content, citations = sources_message(chosen)
            grounded = [{"role": "system", "content": content}] + messages
            if not chosen or n_tokens(grounded) + reserve <= max_model_len:
                return grounded, citations
            chosen = drop_weakest(chosen)

    return await asyncio.to_thread(build)
