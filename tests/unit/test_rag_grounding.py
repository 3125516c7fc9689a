"""The chat `rag` extension: its validation (service/rag/grounding.py) and the grounding stage's
token-budgeted sources (service/serving/stages/grounding.py) in the one-render pipeline."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from service.rag.errors import RagError
from service.rag.grounding import parse_spec
from service.rag.prompt import INSTRUCTIONS
from service.serving.budget import TokenBudget
from service.serving.chat import _tokenize
from service.serving.job import ChatJob
from service.serving.stages import GroundingStage


class FakeStore:
    def __init__(self, results):
        self.results, self.calls = results, []

    async def search(self, name, query, top_k, mode, flt):
        self.calls.append((name, query, top_k, mode, flt))
        return self.results[:top_k]


class TemplateTokenizer:
    """The tiny tokenizer with a plain chat template (role tags around each message)."""

    chat_template = "tags"

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in msgs) + "<assistant>"


def ground(store, spec, messages, tokenizer, max_model_len, max_tokens, thinking=0):
    """(rendered prompt ids, messages, citations) after the grounding stage and the pipeline's render."""
    tok = TemplateTokenizer(tokenizer)
    model = SimpleNamespace(id="m", tokenizer=tok, vision=None)
    budget = TokenBudget(max_model_len, max_tokens, 512, thinking=thinking)
    job = ChatJob(SimpleNamespace(rag=spec), model, list(messages), budget)
    asyncio.run(GroundingStage(store).apply(job))
    ids = _tokenize(job)
    return ids, job.messages, job.response_fields["citations"]


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
    spec = {"collection": "c", "top_k": 20, "mode": "dense"}

    ids, full, cites_full = ground(store, spec, messages, tiny_tokenizer, 100_000, 100)
    assert len(cites_full) == 20 and store.calls[-1] == ("c", "What does the test say?", 20, "dense", None)
    assert full[0]["role"] == "system" and full[0]["content"].startswith(INSTRUCTIONS) and full[1:] == messages
    limit = len(ids) // 3
    ids, trimmed, cites = ground(store, spec, messages, tiny_tokenizer, limit + 100, 100)
    assert 0 < len(cites) < 20
    assert len(ids) + 100 <= limit + 100
    kept = {c["document_id"] for c in cites}
    assert kept == {f"d{i}" for i in range(len(cites))}  # the best ones, whole
    for c in cites:
        assert c["text"].strip() in trimmed[0]["content"]
    _, none, cites_none = ground(store, spec, messages, tiny_tokenizer, 50, 10)  # no room at all: still a prompt
    assert cites_none == [] and none[1:] == messages


def test_sources_leave_room_for_thinking_and_answer(tiny_tokenizer):
    """rag + reasoning: the thinking budget is reserved before sources are chosen, so the answer keeps
    its max_tokens (nothing is clamped) and fewer sources fit."""
    store = FakeStore(RESULTS)
    messages = [{"role": "user", "content": "What does the test say?"}]
    spec = {"collection": "c", "top_k": 20}
    full, _, _ = ground(store, spec, messages, tiny_tokenizer, 1_000_000, 100)
    context = len(full) // 2 + 300  # room for about half the sources
    ids, _, plain = ground(store, spec, messages, tiny_tokenizer, context, 100)
    ids_t, _, thinking = ground(store, spec, messages, tiny_tokenizer, context, 100, thinking=200)
    assert 0 < len(thinking) < len(plain) < 20
    assert len(ids_t) + 200 + 100 <= context and len(ids) + 100 <= context


def test_needs_a_user_message_and_a_store(tiny_tokenizer):
    with pytest.raises(RagError):
        ground(FakeStore(RESULTS), {"collection": "c"}, [{"role": "system", "content": "x"}], tiny_tokenizer, 1000, 10)
    with pytest.raises(RagError):
        ground(None, {"collection": "c"}, [{"role": "user", "content": "x"}], tiny_tokenizer, 1000, 10)
