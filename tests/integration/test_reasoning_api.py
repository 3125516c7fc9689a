"""Reasoning mode over HTTP with the default model: budgets, split, usage, votes, errors."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import CHAT_MODEL

pytestmark = pytest.mark.slow
Q = [{"role": "user", "content": "A shop sells 3 apples for 2 dollars. How much do 9 apples cost?"}]


def _post(server, body):
    return httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": CHAT_MODEL, "messages": Q, **body},
                      timeout=300)


def test_max_budget_is_never_exceeded_and_usage_counts_it(server, chat_tokenizer):
    r = _post(server, {"reasoning": {"max_tokens": 24}, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    msg, u = body["choices"][0]["message"], body["usage"]
    reasoning_tokens = u["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < reasoning_tokens <= 24
    assert msg["reasoning_content"] == msg["reasoning"] and msg["reasoning_content"]
    assert "</think>" not in msg["content"] and "</think>" not in msg["reasoning_content"]
    assert u["completion_tokens"] >= reasoning_tokens
    assert u["completion_tokens"] <= 24 + 12


def test_streamed_split_matches_and_respects_budget(client):
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=Q, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"reasoning": {"max_tokens": 20}})
    reasoning, content, usage = "", "", None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    full = client.chat.completions.create(model=CHAT_MODEL, messages=Q, max_tokens=12, temperature=0,
                                          extra_body={"reasoning": {"max_tokens": 20}})
    assert reasoning == full.choices[0].message.reasoning_content
    assert content == full.choices[0].message.content
    assert 0 < usage.completion_tokens_details.reasoning_tokens <= 20
    assert usage.completion_tokens == full.usage.completion_tokens


def test_min_budget_is_respected(server):
    r = _post(server, {"reasoning": {"max_tokens": 80, "min_tokens": 40}, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 40


def test_effort_none_gives_no_reasoning_and_thinking_alias_works(server):
    r = _post(server, {"reasoning_effort": "none", "max_tokens": 8}).json()
    assert "reasoning_content" not in r["choices"][0]["message"]
    # no reasoning counted (the details object may still carry speculative decoding's prediction counts)
    assert "reasoning_tokens" not in r["usage"].get("completion_tokens_details", {})
    r = _post(server, {"thinking": {"type": "enabled", "budget_tokens": 16}, "max_tokens": 4}).json()
    assert 0 < r["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 16


def test_self_consistency_votes_over_every_path(server):
    r = _post(server, {"reasoning": {"max_tokens": 16, "strategy": "self_consistency", "samples": 5},
                       "max_tokens": 8, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1
    assert sum(v["count"] for v in body["reasoning_votes"]) == 5
    # usage counts every path: at least one token per path, at most the budgets of all five
    assert 5 <= body["usage"]["completion_tokens"] <= 5 * (16 + 8)
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 5 * 16


# Invalid reasoning fields (400 naming the field): tests/unit/test_api_reasoning.py, in-process.


def _prefix_hits(server) -> float:
    for line in httpx.get(f"{server.base_url}/metrics").text.splitlines():
        if line.startswith("frontier_prefix_cache_hits_total{") and CHAT_MODEL in line:
            return float(line.rsplit(" ", 1)[1])
    pytest.fail("the native engine exports frontier_prefix_cache_hits_total")


def test_self_consistency_paths_share_the_prompt_blocks(server):
    before = _prefix_hits(server)
    question = [{"role": "user", "content": "Unique question 7781: what is 40 + 2? " + "Think carefully. " * 12}]
    r = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=300, json={
        "model": CHAT_MODEL, "messages": question, "max_tokens": 4,
        "reasoning": {"max_tokens": 8, "strategy": "self_consistency", "samples": 5}})
    assert r.status_code == 200, r.text
    # The prompt is new, so every hit comes from the 4 sibling paths reusing path 0's full blocks.
    assert _prefix_hits(server) - before >= 4
