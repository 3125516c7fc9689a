"""Issue #16, API side: hostile generation parameters are 400s naming the field, one request cannot
fill the queue for everyone, a client that leaves a non-streamed request frees its sequences and
KV, and a deadline stops a generation. The real app (create_app) in-process over ASGI, with a tiny
random Llama native engine injected into the pool; nothing loads from a model hub."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from service.api.app import create_app
from service.config import Settings
from service.pool.manifest import Manifest, Task
from service.pool.pool import LoadedModel
from tests.golden.test_native_golden import _save_tiny, make_engine
from tests.unit.rag_fakes import TokenizerEmbedder

HUGE = 2**70
PROMPT = "w5 w6 w7 w8"  # the tiny WordLevel tokenizer: word "wI" is token id I (vocabulary 256)
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # chat for a template-less model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _save_tiny("llama", path)
    return path


@pytest.fixture
def engine(tiny_dir):
    eng = make_engine(tiny_dir)
    eng.tokenizer.chat_template = PLAIN_TEMPLATE
    return eng


def build_app(tmp_path, engine=None, embedder=None, **settings):
    app = create_app(Settings(models=[], data_dir=tmp_path, default_chat_model="tiny",
                              default_embedding_model="tiny-embed", **settings))
    pool = app.state.frontier.pool
    for model_id, task, model in (("tiny", Task.COMPLETION, engine), ("tiny-embed", Task.EMBEDDING, embedder)):
        if model is not None:
            m = Manifest(id=model_id, task=task, architecture="llama", license="apache-2.0",
                         source={"kind": "local", "path": str(tmp_path)})
            pool.loaded[model_id] = LoadedModel(m, tmp_path, 0, engine=engine if engine is model else None,
                                                embedder=embedder if embedder is model else None,
                                                tokenizer=model.tokenizer, engine_kind="native", pinned=True)
    return app


def serve(app, engine, scenario):
    """Run `scenario(client)` against the app in this event loop, then stop the engine."""

    async def main():
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://frontier", timeout=60) as client:
                return await asyncio.wait_for(scenario(client), 60)
        finally:
            if engine is not None:
                await engine.shutdown()

    return asyncio.run(main())


async def until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def slow_down(engine, seconds: float = 0.02) -> None:
    """Each model step takes at least `seconds`: a 400-token generation then needs 8 s or more."""
    run = engine.runner.run

    def slowed(batch):
        time.sleep(seconds)
        return run(batch)

    engine.runner.run = slowed


def completion(**fields):
    return {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **fields}


def assert_idle(engine):
    stats = engine.stats()
    assert stats["num_requests_running"] == 0 and stats["kv_cache_usage_perc"] == 0
    assert engine.block_manager.num_used_blocks == 0 and not engine.scheduler.has_work()


# ---- 6: out-of-range integers are 400s naming the field ----
@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"top_k": HUGE}, "top_k"),
    ("/v1/completions", {"seed": HUGE}, "seed"),
    ("/v1/completions", {"seed": -HUGE}, "seed"),
    ("/v1/completions", {"max_tokens": HUGE}, "max_tokens"),
    ("/v1/completions", {"n": HUGE}, "n"),
    ("/v1/completions", {"logprobs": HUGE}, "logprobs"),
    ("/v1/completions", {"stop_token_ids": [HUGE]}, "stop_token_ids"),
    ("/v1/completions", {"stop": ["x" * 257]}, "stop"),
    ("/v1/completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"stop_token_ids": [256]}, "stop_token_ids"),  # past the vocabulary
    ("/v1/completions", {"stop_token_ids": list(range(257))}, "stop_token_ids"),
    ("/v1/completions", {"prompt": [5, HUGE]}, "prompt"),
    ("/v1/completions", {"prompt": [[5], [-1]]}, "prompt"),
    ("/v1/chat/completions", {"top_k": HUGE}, "top_k"),
    ("/v1/chat/completions", {"max_completion_tokens": HUGE}, "max_completion_tokens"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": HUGE}, "top_logprobs"),
])
def test_out_of_range_integers_are_400_naming_the_field(tmp_path, engine, path, fields, param):
    body = completion(**fields)
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": PROMPT}], **{k: v for k, v in body.items() if k != "prompt"}}

    async def scenario(client):
        return await client.post(path, json=body)

    r = serve(build_app(tmp_path, engine), engine, scenario)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].split(".")[0] == param


# ---- 1: a bad parameter fails its own request at admission, never the batch ----
def test_overflowing_top_k_is_a_400_while_others_generate(tmp_path, engine):
    async def scenario(client):
        other = asyncio.create_task(client.post("/v1/completions", json=completion(max_tokens=200)))
        await until(lambda: engine.stats()["num_requests_running"] >= 1)
        bad = await client.post("/v1/completions", json=completion(top_k=HUGE, temperature=1.0))
        return bad, await other

    bad, other = serve(build_app(tmp_path, engine), engine, scenario)
    assert other.status_code == 200, other.text  # before #16: 500, the engine step failed for all
    assert other.json()["usage"]["completion_tokens"] == 200
    assert other.json()["choices"][0]["finish_reason"] == "length"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"


# ---- 3: bounded work; one request cannot lock everyone out ----
def test_many_prompts_times_n_is_a_400_and_others_are_served(tmp_path, engine):
    engine.max_waiting = 256  # the default: 100 prompts x n=16 used to pass it, counted as 100

    async def scenario(client):
        big = asyncio.create_task(client.post("/v1/completions", json=completion(prompt=[PROMPT] * 100, n=16)))
        await until(lambda: big.done() or engine.scheduler.num_waiting > 0)
        other = await client.post("/v1/completions", json=completion())
        return await big, other

    big, other = serve(build_app(tmp_path, engine), engine, scenario)
    assert other.status_code == 200, other.text  # before #16: 429 while 1,600 sequences waited
    assert big.status_code == 400, big.text
    err = big.json()["error"]
    assert err["param"] == "n" and "max_sequences_per_request" in err["message"] and "1600" in err["message"]


def test_full_queue_is_a_429_before_the_stream_starts(tmp_path, engine):
    """Queue admission counts sequences and is decided before the first byte: a streamed request
    gets a real 429, not a 200 whose stream then carries the error."""
    engine.max_waiting = 4  # (the engine's copy of settings.max_waiting_requests)
    engine._inbox.put(("add", engine_request(n=4)))  # 4 sequences queued (the worker is not started)

    async def scenario(client):
        return await client.post("/v1/completions", json=completion(stream=True))

    r = serve(build_app(tmp_path, engine), engine, scenario)
    assert r.status_code == 429 and r.json()["error"]["code"] == "server_overloaded"


def engine_request(n: int):
    from service.engine.types import GenerationRequest, SamplingParams

    return GenerationRequest([5, 6], SamplingParams(max_tokens=4, n=n))


# ---- 4: a non-streamed request whose client leaves is aborted, its KV freed ----
def _asgi_call(app, path: str, body: dict, gone: asyncio.Event):
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"frontier"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("frontier", 80)}
    first = True

    async def receive():  # as uvicorn: the body, then http.disconnect once the client is gone
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    return app(scope, receive, send)


@pytest.mark.parametrize("path, base_http_middleware", [
    ("/v1/completions", False), ("/v1/completions", True), ("/v1/chat/completions", True)])
def test_disconnect_aborts_non_streamed_generation(tmp_path, engine, path, base_http_middleware):
    """With a BaseHTTPMiddleware in front (app.py's @app.middleware("http") before #16),
    request.is_disconnected() never saw the disconnect: the generation ran to its end."""
    slow_down(engine)
    app = build_app(tmp_path, engine)
    if base_http_middleware:
        app.middleware("http")(lambda request, call_next: call_next(request))
    body = completion(max_tokens=400)
    if "chat" in path:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 400, "temperature": 0,
                "ignore_eos": True}

    async def scenario(client):
        gone = asyncio.Event()
        call = asyncio.create_task(_asgi_call(app, path, body, gone))
        await until(lambda: engine.stats()["num_requests_running"] >= 1 and engine.num_steps >= 3)
        gone.set()
        t0 = time.monotonic()
        await until(lambda: engine.block_manager.num_used_blocks == 0 and not engine.scheduler.has_work(), 3.0)
        freed_s = time.monotonic() - t0
        await asyncio.wait_for(call, 5)
        await asyncio.sleep(0.1)  # the worker publishes its stats after the abort
        assert_idle(engine)
        steps = engine.num_steps
        other = await client.post("/v1/completions", json=completion())  # the next client is served
        return freed_s, steps, other

    freed_s, steps, other = serve(app, engine, scenario)
    assert freed_s < 2.0 and steps < 100  # 400 tokens would take 400 steps (8 s)
    assert other.status_code == 200


# ---- deadline ----
def test_request_timeout_stops_the_generation(tmp_path, engine):
    slow_down(engine)

    async def scenario(client):
        t0 = time.monotonic()
        r = await client.post("/v1/completions", json=completion(max_tokens=400))
        elapsed = time.monotonic() - t0
        await until(lambda: not engine.scheduler.has_work() and engine.block_manager.num_used_blocks == 0, 3.0)
        return r, elapsed

    r, elapsed = serve(build_app(tmp_path, engine, request_timeout_s=0.3), engine, scenario)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
    assert "request_timeout_s" in r.json()["error"]["message"] and elapsed < 3.0


# ---- 6: embeddings ----
@pytest.mark.parametrize("inputs, needle", [
    ([-1], "token ids"), ([HUGE], "token ids"), ([[3, 4], [5, HUGE]], "token ids"),
    (["a", "b", "c", "d"], "max_embedding_inputs"), (["Hello world, this is a test."] * 3, "max_embedding_tokens"),
])
def test_embedding_inputs_are_400_naming_the_limit(tmp_path, tiny_tokenizer, inputs, needle):
    app = build_app(tmp_path, embedder=TokenizerEmbedder(tiny_tokenizer, max_seq_length=16), max_embedding_inputs=3, max_embedding_tokens=20)

    async def scenario(client):
        bad = await client.post("/v1/embeddings", json={"input": inputs})
        good = await client.post("/v1/embeddings", json={"input": [[3, 4], [5, 6]]})
        return bad, good

    bad, good = serve(app, None, scenario)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input", bad.text
    assert needle in bad.json()["error"]["message"]
    assert good.status_code == 200 and len(good.json()["data"]) == 2
