"""service/rag/grounding.py: the chat `rag` extension's validation and its token-budgeted prompt."""

from __future__ import annotations

import asyncio

import pytest

from service.rag.errors import RagError
from service.rag.grounding import ground, parse_spec
from service.rag.prompt import INSTRUCTIONS


class FakeStore:
    def __init__(self, results):
        self.results, self.calls = results, []

    async def search(self, name, query, top_k, mode, flt):
        self.calls.append((name, query, top_k, mode, flt))
        return self.results[:top_k]


def render(tokenizer):
    return lambda msgs: "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in msgs) + "<assistant>"


RESULTS = [{"document_id": f"d{i}", "chunk_id": 100 - i, "score": 1.0 - i / 100,
            "text": f"Source {i}. " + "Hello world, this is a test. " * 8} for i in range(20)]


def test_parse_spec_validates():
    assert parse_spec({"collection": "docs"}).top_k == 4
    for bad, param in [({}, "rag.collection"), ({"collection": "d", "top_k": 0}, "rag.top_k"),
                       ({"collection": "d", "mode": "fuzzy"}, "rag.mode"), ({"collection": "d", "x": 1}, "rag"),
                       ({"collection": "d", "filter": []}, "rag.filter"), ("docs", "rag.collection")]:
        with pytest.raises(RagError) as e:
            parse_spec(bad)
        assert e.value.status == 400 and e.value.param == param


def test_sources_first_and_trimmed_to_the_context(tiny_tokenizer):
    store = FakeStore(RESULTS)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the test say?"}]

    def run(max_model_len, max_tokens):
        return asyncio.run(ground(store, {"collection": "c", "top_k": 20, "mode": "dense"}, messages,
                                  tiny_tokenizer, render(tiny_tokenizer), max_model_len, max_tokens, 512))

    full, cites_full = run(100_000, 100)
    assert len(cites_full) == 20 and store.calls[-1] == ("c", "What does the test say?", 20, "dense", None)
    assert full[0]["role"] == "system" and full[0]["content"].startswith(INSTRUCTIONS) and full[1:] == messages
    n_full = len(tiny_tokenizer.encode(render(None)(full), add_special_tokens=False))
    limit = n_full // 3
    trimmed, cites = run(limit + 100, 100)
    assert 0 < len(cites) < 20
    assert len(tiny_tokenizer.encode(render(None)(trimmed), add_special_tokens=False)) + 100 <= limit + 100
    kept = {c["document_id"] for c in cites}
    assert kept == {f"d{i}" for i in range(len(cites))}  # the best ones, whole
    for c in cites:
        assert c["text"].strip() in trimmed[0]["content"]
    none, cites_none = run(50, 10)  # no room at all: no sources, still a valid prompt
    assert cites_none == [] and none[1:] == messages


def test_needs_a_user_message_and_a_store(tiny_tokenizer):
    with pytest.raises(RagError):
        asyncio.run(ground(FakeStore(RESULTS), {"collection": "c"}, [{"role": "system", "content": "x"}],
                           tiny_tokenizer, render(None), 1000, 10, 10))
    with pytest.raises(RagError):
        asyncio.run(ground(None, {"collection": "c"}, [{"role": "user", "content": "x"}],
                           tiny_tokenizer, render(None), 1000, 10, 10))
