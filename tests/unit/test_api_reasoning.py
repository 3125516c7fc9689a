"""Reasoning mode over the scripted engine (issue #10): the thought split from the answer,
reasoning_tokens counted by the real budget controller, budgets forced both ways, streamed deltas
that add up to the non-streamed message, self-consistency votes. The same shapes the slow
tests/integration/test_reasoning_api.py checks against the real model."""

from __future__ import annotations

import pytest

from tests.unit.fake_engine import metric, run, scripted_app, sse_events, user

THOUGHT, ANSWER = "2 plus 2 is 4, so the sum is 4.", "The answer is 4."
REPLY = f"<think>{THOUGHT}</think>{ANSWER}"


@pytest.fixture
def make(tmp_path, chat_tokenizer):
    return lambda script=REPLY, **engine_kw: scripted_app(tmp_path, chat_tokenizer, script, **engine_kw)


def thinking_tokens(tokenizer, reply: str) -> int:
    """Tokens of the reply up to the one that completes the end tag: what the controller counts."""
    toks = tokenizer.encode(reply, add_special_tokens=False)
    return next(k for k in range(1, len(toks) + 1) if "</think>" in tokenizer.decode(toks[:k]))


def chat(body, *extra_paths):
    async def scenario(client):
        r = await client.post("/v1/chat/completions", json={"messages": user("What is 2 + 2?"), **body})
        return r, *[(await client.get(p)).text for p in extra_paths]

    return scenario


@pytest.mark.parametrize("fields", [{"reasoning_effort": "low"}, {"reasoning": {"max_tokens": 64}},
                                    {"thinking": {"type": "enabled", "budget_tokens": 64}}])
def test_thought_and_answer_are_split_and_counted(make, chat_tokenizer, fields):
    engine, app = make()
    r, metrics = run(app, chat({**fields, "max_tokens": 32}, "/metrics"))
    assert r.status_code == 200, r.text
    body = r.json()
    msg = body["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT, "reasoning": THOUGHT}
    assert body["choices"][0]["finish_reason"] == "stop"
    n_think = thinking_tokens(chat_tokenizer, REPLY)
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": n_think}
    assert body["usage"]["completion_tokens"] == len(chat_tokenizer.encode(REPLY, add_special_tokens=False)) + 1
    assert metric(metrics, "frontier_reasoning_tokens_total", model="fake-chat") == n_think
    # the scaffold: the instruction in a system message, the thought opened in the prompt
    prompt = chat_tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert "think step by step inside <think> and </think>" in prompt and prompt.endswith("<think>\n")


@pytest.mark.parametrize("max_tokens", [3, 8])
def test_max_tokens_bounds_the_answer_after_an_early_thought(make, chat_tokenizer, max_tokens):
    """A short thought leaves most of the thinking budget unused: the answer still gets max_tokens,
    not the budget's leftovers (issue #18: 'What is 2+3?' with max_tokens 8 gave 254 answer tokens)."""
    rambling = "The answer is 4. " * 20
    engine, app = make(f"<think>{THOUGHT}</think>{rambling}")
    body = run(app, chat({"reasoning_effort": "low", "max_tokens": max_tokens}))[0].json()
    n_think = thinking_tokens(chat_tokenizer, f"<think>{THOUGHT}</think>{rambling}")
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": n_think}
    assert body["usage"]["completion_tokens"] == n_think + max_tokens
    answer = body["choices"][0]["message"]["content"]
    assert len(chat_tokenizer.encode(answer, add_special_tokens=False)) <= max_tokens


def test_effort_none_is_plain_chat(make):
    engine, app = make("Just 4.")
    body = run(app, chat({"reasoning_effort": "none"}))[0].json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Just 4."}
    assert "completion_tokens_details" not in body["usage"]
    assert engine.requests[0].controller_factory is None


def test_max_budget_forces_the_end_of_the_thought(make, chat_tokenizer):
    script = "one two three four five six seven eight nine ten eleven twelve</think>done"
    engine, app = make(script)
    r, metrics = run(app, chat({"reasoning": {"max_tokens": 8}, "max_tokens": 4}, "/metrics"))
    body = r.json()
    msg = body["choices"][0]["message"]
    end = chat_tokenizer.encode("</think>", add_special_tokens=False)
    own = 8 - len(end)  # the scripted tokens the budget leaves room for, then the forced end tag
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 8
    scripted = chat_tokenizer.encode(script, add_special_tokens=False)
    assert msg["reasoning_content"] == chat_tokenizer.decode(scripted[:own])
    assert body["usage"]["completion_tokens"] <= 8 + 4 + 1  # the answer's max_tokens comes on top (+ transition)
    assert metric(metrics, "frontier_reasoning_budget_forced_total", model="fake-chat") == 1


def test_min_budget_keeps_thinking_with_wait_cues(make):
    engine, app = make("short.</think>4")  # tries to end the thought after a few tokens
    r, metrics = run(app, chat({"reasoning": {"max_tokens": 60, "min_tokens": 20}, "max_tokens": 8}, "/metrics"))
    body = r.json()
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 20
    assert "Wait," in body["choices"][0]["message"]["reasoning_content"]
    assert metric(metrics, "frontier_reasoning_extensions_total", model="fake-chat") >= 1


def test_streamed_reasoning_deltas_match_the_message(make, chat_tokenizer):
    _, app = make()
    body = {"reasoning": {"max_tokens": 64}, "max_tokens": 32}
    full = run(app, chat(body))[0].json()
    _, app2 = make()
    r = run(app2, chat({**body, "stream": True, "stream_options": {"include_usage": True}}))[0]
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert sum(1 for d in deltas if d.get("reasoning_content")) > 1  # streamed as it is thought
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    msg = full["choices"][0]["message"]
    assert (reasoning, content) == (msg["reasoning_content"], msg["content"]) == (THOUGHT, ANSWER)
    assert chunks[-1]["usage"] == full["usage"]
    assert "</think>" not in reasoning + content


def test_self_consistency_votes_over_the_paths(make):
    answers = ["4", "5", "4"]
    engine, app = make(lambda req, i: f"thinking path {i}.</think>It is {answers[i]}.")
    r = run(app, chat({"reasoning": {"max_tokens": 32, "strategy": "self_consistency", "samples": 3},
                       "max_tokens": 8, "seed": 1}))[0]
    assert r.status_code == 200, r.text
    body = r.json()
    assert engine.requests[0].sampling.n == 3
    assert [c["index"] for c in body["choices"]] == [0]
    assert body["choices"][0]["message"]["content"] == "It is 4."
    assert body["reasoning_votes"] == [{"answer": "4", "count": 2}, {"answer": "5", "count": 1}]
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


def test_self_consistency_streamed_replays_the_winner(make):
    answers = ["7", "7", "9"]
    _, app = make(lambda req, i: f"path {i}.</think>{answers[i]}")
    r = run(app, chat({"reasoning": {"max_tokens": 32, "strategy": "self_consistency", "samples": 3},
                       "stream": True, "stream_options": {"include_usage": True}}))[0]
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in events[:-1] if c["choices"]]
    assert "".join(d.get("content", "") for d in deltas) == "7"
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "path 0."
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


@pytest.mark.parametrize("effort,thinking", [("minimal", 64), ("low", 256), ("medium", 1024), ("high", 1024),
                                             ("xhigh", 1024), ("max", 1024)])
def test_every_sdk_effort_value_is_a_budget_capped_at_half_the_context(make, effort, thinking):
    engine, app = make()  # a 2048-token context: presets take at most 1024
    r = run(app, chat({"reasoning_effort": effort, "max_tokens": 4}))[0]
    assert r.status_code == 200, r.text
    assert engine.requests[0].sampling.max_tokens == 4 + thinking


@pytest.mark.parametrize("extra, param", [
    ({"reasoning": {"max_tokens": 10, "min_tokens": 20}}, "reasoning.min_tokens"),
    ({"reasoning": {"strategy": "self_consistency", "samples": 0}}, "reasoning.samples"),
    ({"reasoning": {"max_tokens": 100000}}, "reasoning.max_tokens"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"reasoning": {"strategy": "best"}}, "reasoning.strategy"),
    ({"reasoning": {"strategy": "self_consistency"}, "n": 2}, "n"),
])
def test_invalid_reasoning_requests_are_400_naming_the_field(make, extra, param):
    engine, app = make()
    r = run(app, chat({**extra, "max_tokens": 4}))[0]
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    assert engine.requests == []
