"""An engine failure mid-batch ends every request it holds, running and waiting, with an error
(issue #10): a non-streamed request gets a 5xx envelope, a streamed one an SSE error event and then
[DONE]; nothing hangs, and the engine serves the next request."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.fake_engine import (CHAT, ScriptedEngine, assert_envelope, build_app, metric, run, sse_events,
                                    user)

CHAT_PATH, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
REPLY = "a reply long enough to still be running when the third step fails"


def body(path: str, i: int, stream: bool) -> dict:
    base = {"messages": user(f"question {i}")} if path == CHAT_PATH else {"prompt": f"question {i}",
                                                                            "max_tokens": 64}
    return {"model": CHAT, **base, "stream": stream}


def assert_stream_failed(r) -> None:
    assert r.status_code == 200  # the stream had started (role chunk) before the failure
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    errors = [e for e in events[:-1] if "error" in e]
    assert len(errors) == 1 and events[-2] is errors[0], events[-3:]
    err = assert_envelope(errors[0], "server_error")
    assert "scripted engine failure at step 3" in err["message"]
    assert not any(c.get("choices") and c["choices"][0].get("finish_reason") for c in events[:-2])


@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS])
def test_failure_mid_batch_ends_running_and_waiting_requests(tmp_path, chat_tokenizer, path):
    engine = ScriptedEngine(chat_tokenizer, REPLY, gated=True, max_num_seqs=2, fail_at_step=3)
    app = build_app(tmp_path, engine)
    streamed = [True, False, True, False]

    async def scenario(client):
        tasks = [asyncio.create_task(client.post(path, json=body(path, i, s))) for i, s in enumerate(streamed)]
        await engine.until(lambda s: s["num_waiting_seqs"] == 4)  # all four queued before any step
        engine.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)  # no request may hang
        idle = engine.stats()
        after = await client.post(path, json=body(path, 9, False))
        return results, idle, after, (await client.get("/metrics")).text

    results, idle, after, metrics = run(app, scenario)
    assert engine.failed_with == (2, 2)  # two running, two waiting when the step failed
    for r, stream in zip(results, streamed):
        if stream:
            assert_stream_failed(r)
        else:
            assert r.status_code == 500, r.text
            err = assert_envelope(r.json(), "server_error")
            assert "scripted engine failure at step 3" in err["message"]
    assert idle["num_requests_running"] == 0 and idle["num_requests_waiting"] == 0
    assert after.status_code == 200, after.text  # the worker survived and serves the next request
    choice = after.json()["choices"][0]
    assert (choice["message"]["content"] if path == CHAT_PATH else choice["text"]) == REPLY
    assert metric(metrics, "frontier_requests_total", route=path, model=CHAT, status="500") == 2
    assert metric(metrics, "frontier_request_success_total", model=CHAT, finish_reason="error") == 4


def test_failure_of_a_multi_prompt_request_fails_all_its_choices(tmp_path, chat_tokenizer):
    """One request, three prompts: one runs, two wait when the step fails; the request fails whole."""
    engine = ScriptedEngine(chat_tokenizer, REPLY, gated=True, max_num_seqs=1, fail_at_step=2)
    app = build_app(tmp_path, engine)

    async def scenario(client):
        task = asyncio.create_task(client.post(COMPLETIONS, json={"prompt": ["a", "b", "c"], "max_tokens": 32,
                                                                   "stream": True}))
        await engine.until(lambda s: s["num_waiting_seqs"] == 3)
        engine.gate.set()
        return await asyncio.wait_for(task, 10)

    r = run(app, scenario)
    assert engine.failed_with == (1, 2)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert "scripted engine failure at step 2" in events[-2]["error"]["message"]
