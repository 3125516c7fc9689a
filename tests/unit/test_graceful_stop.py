"""Graceful stop, in-process (the signal-driven whole is tests/integration/test_sigterm.py): once the
drain begins new requests get 503 + Retry-After in the envelope, generations that finish in time
finish, the rest end with an SSE error event and [DONE] (streams) or a 503 envelope (non-streamed)
and free their KV, RAG writes are never cut, and a stopped engine ends the requests it still holds."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from service.engine.types import FinishReason, GenerationRequest, SamplingParams
from tests.unit.rag_fakes import FakeEmbedder as RagFakeEmbedder
from tests.unit.test_admission import (assert_idle, build_app, completion, engine, serve, slow_down,  # noqa: F401
                                       tiny_dir, until)


def _events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _assert_envelope(body: dict, code: str = "server_shutting_down") -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["type"] == "server_error"


def test_drain_ends_streams_and_refuses_new_requests(tmp_path, engine):
    slow_down(engine, 0.02)
    app = build_app(tmp_path, engine)
    drain = app.state.frontier.drain

    async def scenario(client):
        short = asyncio.create_task(client.post("/v1/completions", json=completion(stream=True, max_tokens=3)))
        long_ = asyncio.create_task(client.post("/v1/completions", json=completion(stream=True, max_tokens=400)))
        plain = asyncio.create_task(client.post("/v1/completions", json=completion(max_tokens=400)))
        await until(lambda: engine.stats()["num_requests_running"] + engine.stats()["num_requests_waiting"] >= 3)
        drain.begin()
        late = await client.post("/v1/completions", json=completion())
        health = await client.get("/health")
        t0 = time.monotonic()
        await drain.run(1.0)
        elapsed = time.monotonic() - t0
        results = await asyncio.gather(short, long_, plain)
        await until(lambda: engine.block_manager.num_used_blocks == 0)
        return late, health, elapsed, results

    late, health, elapsed, (short, long_, plain) = serve(app, engine, scenario)
    assert late.status_code == 503 and int(late.headers["retry-after"]) >= 1
    assert late.headers["connection"] == "close"
    _assert_envelope(late.json())
    assert health.status_code == 200
    assert 0.9 < elapsed < 5
    ev = _events(short.text)  # finished within the drain time
    assert ev[-1] == "[DONE]" and ev[-2]["choices"][0]["finish_reason"] == "length"
    ev = _events(long_.text)  # ended by the drain: tokens so far, then one error event, then [DONE]
    assert long_.status_code == 200 and ev[-1] == "[DONE]"
    _assert_envelope(ev[-2])
    assert any(e["choices"] and e["choices"][0]["text"] for e in ev[:-2])
    assert plain.status_code == 503 and plain.headers["retry-after"]
    _assert_envelope(plain.json())
    assert_idle(engine)


def test_drain_returns_as_soon_as_nothing_is_in_flight(tmp_path, engine):
    app = build_app(tmp_path, engine)
    drain = app.state.frontier.drain

    async def scenario(client):
        r = asyncio.create_task(client.post("/v1/completions", json=completion(max_tokens=4)))
        await until(lambda: bool(drain.flights))
        t0 = time.monotonic()
        await drain.run(30.0)
        return await r, time.monotonic() - t0

    r, elapsed = serve(app, engine, scenario)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert elapsed < 10


class SlowEmbedder(RagFakeEmbedder):
    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    async def encode(self, texts):
        await asyncio.sleep(self.delay)
        return await super().encode(texts)


def test_drain_never_cuts_a_rag_write(tmp_path):
    """A RAG write that outlasts the drain time still completes (cancelling it while SQLite commits
    in a thread could answer "failed" for a stored document); the lifespan then saves the index."""
    app = build_app(tmp_path, embedder=SlowEmbedder(1.0))
    drain = app.state.frontier.drain

    async def scenario(client):
        async with app.router.lifespan_context(app):
            r = await client.post("/v1/rag/collections", json={"name": "c"})
            assert r.status_code == 200, r.text
            add = asyncio.create_task(client.post("/v1/rag/collections/c/documents",
                                                  json={"documents": [{"id": "d", "text": "keep me please"}]}))
            await until(lambda: bool(drain.flights))
            await drain.run(0.1)
            refused = await client.get("/v1/rag/collections/c")
            added = await add
        return refused, added

    refused, added = serve(app, None, scenario)
    assert refused.status_code == 503
    _assert_envelope(refused.json())
    assert added.status_code == 200, added.text
    assert added.json()["data"][0]["id"] == "d"
    assert (tmp_path / "rag" / "c").is_dir()


def test_engine_shutdown_ends_the_requests_it_holds(engine):
    """threaded.py: a consumer of a stopped engine gets an error output per open sequence, not a hang."""
    slow_down(engine, 0.02)

    async def main():
        req = GenerationRequest(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=400, temperature=0,
                                                                                   ignore_eos=True, n=2))
        outs = []

        async def consume():
            async for out in engine.generate(req):
                outs.append(out)

        task = asyncio.create_task(consume())
        await until(lambda: len(outs) >= 2)
        await engine.shutdown()
        await asyncio.wait_for(task, 10)
        return outs

    outs = asyncio.run(main())
    finals = [o for o in outs if o.finished]
    assert sorted(o.index for o in finals) == [0, 1]
    assert all(o.finish_reason is FinishReason.ERROR and "stopped" in o.error for o in finals)


@pytest.mark.parametrize("sig_count, force", [(1, False), (3, True)])
def test_draining_server_signals(sig_count, force):
    """The uvicorn.Server subclass: a signal only flags (the tick starts the drain); it is never
    re-raised after the stop (exit code 0); the third forces."""
    import uvicorn

    from service.api.drain import Drain, DrainingServer

    server = DrainingServer(uvicorn.Config(lambda *a: None), Drain(0.0))
    for _ in range(sig_count):
        server.handle_exit(15, None)
    assert server._captured_signals == []
    assert server.force_exit is force

    async def tick():
        await server.on_tick(1)
        await server._drainer
        return server.should_exit

    assert asyncio.run(tick()) is True
