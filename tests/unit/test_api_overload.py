"""A full queue is a real 429 with Retry-After, streamed or not, decided before the first byte and
counted in /metrics (issue #10). The scripted engine's gate holds every step, so the queue fills
deterministically: admission counts waiting sequences, and an empty queue always takes one."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.fake_engine import CHAT, ScriptedEngine, assert_envelope, build_app, metric, run, sse_events, user

CHAT_PATH, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def body(path: str, stream: bool, **extra) -> dict:
    base = {"messages": user("hi")} if path == CHAT_PATH else {"prompt": "hi"}
    return {"model": CHAT, **base, "stream": stream, **extra}


def assert_served(r, stream: bool) -> None:
    assert r.status_code == 200, r.text
    if stream:
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1] if isinstance(e, dict))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS])
def test_full_queue_is_429_with_retry_after_and_counted(tmp_path, chat_tokenizer, path, stream):
    engine = ScriptedEngine(chat_tokenizer, "ok.", gated=True, max_waiting=2)
    app = build_app(tmp_path, engine)

    async def scenario(client):
        first = asyncio.create_task(client.post(path, json=body(path, stream)))
        await engine.until(lambda s: s["num_waiting_seqs"] == 1)
        second = asyncio.create_task(client.post(path, json=body(path, stream)))
        await engine.until(lambda s: s["num_waiting_seqs"] == 2)
        before = (await client.get("/metrics")).text
        refused = await client.post(path, json=body(path, stream))
        after = (await client.get("/metrics")).text
        engine.gate.set()
        return refused, before, after, await asyncio.gather(first, second)

    refused, before, after, served = run(app, scenario)
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/json"  # not a 200 stream carrying the error
    err = assert_envelope(refused.json(), "rate_limit_error", "server_overloaded", None)
    assert "limit 2" in err["message"]
    labels = dict(route=path, model=CHAT, status="429")
    assert metric(before, "frontier_requests_total", **labels) == 0
    assert metric(after, "frontier_requests_total", **labels) == 1
    assert metric(after, "frontier_num_requests_waiting", model=CHAT) == 2  # engine gauges at scrape time
    for r in served:
        assert_served(r, stream)
    assert len(engine.requests) == 2  # the refused request never reached the engine


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_is_admitted_all_or_nothing(tmp_path, chat_tokenizer, stream):
    """Three prompts when two places are left: 429, and none of the three is queued."""
    engine = ScriptedEngine(chat_tokenizer, "ok.", gated=True, max_waiting=3)
    app = build_app(tmp_path, engine)

    async def scenario(client):
        first = asyncio.create_task(client.post(COMPLETIONS, json=body(COMPLETIONS, False)))
        await engine.until(lambda s: s["num_waiting_seqs"] == 1)
        refused = await client.post(COMPLETIONS, json=body(COMPLETIONS, stream, prompt=["a", "b", "c"]))
        fits = asyncio.create_task(client.post(COMPLETIONS, json=body(COMPLETIONS, stream, prompt=["a", "b"])))
        await engine.until(lambda s: s["num_waiting_seqs"] == 3)
        engine.gate.set()
        return refused, await first, await fits

    refused, first, fits = run(app, scenario)
    assert refused.status_code == 429, refused.text
    assert_envelope(refused.json(), "rate_limit_error", "server_overloaded")
    assert first.status_code == 200
    assert_served(fits, stream)
    assert [r.prompt_token_ids for r in engine.requests[1:]] == [
        chat_tokenizer.encode("a"), chat_tokenizer.encode("b")]


def test_sequences_count_not_requests(tmp_path, chat_tokenizer):
    """n=3 takes three places; an empty queue takes a request however many sequences it has."""
    engine = ScriptedEngine(chat_tokenizer, "ok.", gated=True, max_waiting=2)
    app = build_app(tmp_path, engine)

    async def scenario(client):
        big = asyncio.create_task(client.post(CHAT_PATH, json=body(CHAT_PATH, False, n=3)))
        await engine.until(lambda s: s["num_waiting_seqs"] == 3)
        refused = await client.post(CHAT_PATH, json=body(CHAT_PATH, True))
        engine.gate.set()
        return refused, await big

    refused, big = run(app, scenario)
    assert refused.status_code == 429
    assert big.status_code == 200 and len(big.json()["choices"]) == 3
