"""Issue #10: a failed engine step ends requests with an error, never a hang, and the engine serves
the next request. Failures are injected on purpose: the native engine's model forward with requests
running and more waiting; the transformers backend's forward (its active request's failure alone),
its whole `_step` (every request it holds), and a step whose cleanup fails too (open streams are
still ended). Tiny random Llama (tests/golden/test_native_golden.py builders) and the tiny model of
tests/unit/conftest.py."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.config import EngineConfig
from service.engine.hf_backend import HFEngine
from service.engine.types import FinishReason, GenerationRequest, RequestOutput, SamplingParams
from tests.golden.test_native_golden import _save_tiny, make_engine

TIMEOUT = 60  # far above the real time: a hang fails instead of blocking the suite


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _save_tiny("llama", path)
    return path


def _req(max_tokens=48, n=1, prompt=(5, 6, 7, 8), rid=None) -> GenerationRequest:
    r = GenerationRequest(list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n))
    if rid:
        r.request_id = rid
    return r


async def _collect(engine, req) -> list[RequestOutput]:
    return [out async for out in engine.generate(req)]


def _serve(engine, reqs, then=()):
    """Run `reqs` concurrently, then `then` one by one, then shut down; every request's outputs."""

    async def main():
        try:
            first = await asyncio.wait_for(asyncio.gather(*(_collect(engine, r) for r in reqs)), TIMEOUT)
            later = [await asyncio.wait_for(_collect(engine, r), TIMEOUT) for r in then]
            return first, later
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def _finals(outs: list[RequestOutput]) -> dict[int, RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    for o in outs:
        if o.finished:
            assert o.index not in finals, "two final outputs for one sequence"
            finals[o.index] = o
    return finals


def _assert_failed(outs, message: str, n: int = 1) -> None:
    finals = _finals(outs)
    assert sorted(finals) == list(range(n)), finals
    for f in finals.values():
        assert f.finish_reason is FinishReason.ERROR and message in (f.error or ""), f


def _assert_completed(outs, max_tokens: int, n: int = 1) -> None:
    finals = _finals(outs)
    assert sorted(finals) == list(range(n))
    assert all(f.finish_reason is FinishReason.LENGTH and f.error is None for f in finals.values())
    assert sum(len(o.token_ids) for o in outs) == max_tokens * n


# ---- native engine ----

def test_native_failed_forward_ends_running_and_waiting_requests(tiny_dir):
    """max_num_seqs 2 with 4 requests (one of n=2): the forward raises while two run and the rest
    wait; every sequence ends with the error, every KV block comes back, the next request is served."""
    engine = make_engine(tiny_dir, max_num_seqs=2)
    real_run, seen = engine.runner.run, {}

    def flaky_run(batch):
        s = engine.scheduler
        if not seen and len(s.running) == 2 and engine._num_requests == 4:
            seen.update(running=len(s.running), waiting=len(s.waiting), requests=engine._num_requests)
            raise RuntimeError("injected forward failure")
        return real_run(batch)

    engine.runner.run = flaky_run
    reqs = [_req(), _req(), _req(n=2), _req(prompt=(9, 10, 11))]
    outs, [after] = _serve(engine, reqs, then=[_req(max_tokens=8)])
    assert seen == {"running": 2, "waiting": 3, "requests": 4}  # the failure hit a full engine
    for r, o in zip(reqs, outs):
        _assert_failed(o, "injected forward failure", n=r.sampling.n)
    _assert_completed(after, 8)
    assert engine.block_manager.num_used_blocks == 0 and engine._num_requests == 0
    assert not engine._has_work() and engine.runner.prompt_logits == []
    stats = engine.stats()
    assert stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0


def test_native_failed_step_after_tokens_were_streamed(tiny_dir):
    """The failure comes mid-generation (the first requests have streamed tokens): they still end
    with one final error output each, after their tokens."""
    engine = make_engine(tiny_dir, max_num_seqs=2)
    real_run, calls, failed = engine.runner.run, [], []

    def flaky_run(batch):
        calls.append(len(batch))
        if len(calls) >= 6 and engine._num_requests == 3 and not failed:
            failed.append(len(calls))
            raise RuntimeError("injected late failure")
        return real_run(batch)

    engine.runner.run = flaky_run
    outs, [after] = _serve(engine, [_req(), _req(), _req()], then=[_req(max_tokens=4)])
    for o in outs:
        _assert_failed(o, "injected late failure")
    assert failed and any(o.token_ids for o in outs[0])  # the first request had streamed tokens before it
    _assert_completed(after, 4)
    assert engine.block_manager.num_used_blocks == 0 and engine._num_requests == 0


def test_native_failure_that_cannot_be_cleaned_up_still_ends_streams(tiny_dir):
    """The step raises and dropping the requests raises too (broken engine state): the open streams
    are ended from the bridge all the same, and the worker lives on."""
    engine = make_engine(tiny_dir, max_num_seqs=2)
    real_run, real_abort, armed = engine.runner.run, engine.scheduler.abort, [True]

    def flaky_run(batch):
        if armed and engine._num_requests == 2:
            raise RuntimeError("injected forward failure")
        return real_run(batch)

    def broken_abort(request_id):
        if armed:
            raise RuntimeError("scheduler state broken")
        return real_abort(request_id)

    def clear_after(fn):
        def wrapped():
            fn()
            armed.clear()  # the next steps work again
        return wrapped

    engine.runner.run, engine.scheduler.abort = flaky_run, broken_abort
    engine._after_failed_step = clear_after(engine._after_failed_step)
    outs, [after] = _serve(engine, [_req(), _req()], then=[_req(max_tokens=4)])
    for o in outs:
        _assert_failed(o, "injected forward failure")
    _assert_completed(after, 4)


# ---- transformers backend ----

class _FailingForward:
    """Wraps a model: its forward raises once, on the call number `at` (1-based)."""

    def __init__(self, model, at: int):
        self.model, self.at, self.calls = model, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("injected forward failure")
        return self.model(*args, **kwargs)


@pytest.fixture
def hf_engine(tiny_model, tiny_tokenizer):
    return HFEngine(tiny_model, tiny_tokenizer, set(), EngineConfig(max_model_len=256))


def test_hf_failed_forward_fails_the_active_request_only(hf_engine):
    """One request runs at a time: a forward that raises is the active request's failure; the
    request waiting behind it runs to completion, and so does the next one."""
    hf_engine.model = _FailingForward(hf_engine.model, at=3)
    outs, [after] = _serve(hf_engine, [_req(max_tokens=12, n=2), _req(max_tokens=12)], then=[_req(max_tokens=5)])
    _assert_failed(outs[0], "injected forward failure", n=2)
    _assert_completed(outs[1], 12)
    _assert_completed(after, 5)
    assert not hf_engine._has_work()


def test_hf_failed_step_ends_active_and_waiting_requests(hf_engine):
    """A failure in `_step` itself (outside its per-request handling) cannot be traced to one
    request: the active and the waiting requests all end with the error; the engine serves on."""
    real_step, armed = hf_engine._step, [True]

    def flaky_step():
        if armed and hf_engine.num_steps >= 2 and hf_engine._waiting:
            armed.clear()
            raise RuntimeError("injected step failure")
        return real_step()

    hf_engine._step = flaky_step
    outs, [after] = _serve(hf_engine, [_req(max_tokens=24), _req(max_tokens=24, n=2)], then=[_req(max_tokens=5)])
    assert not armed  # the failure happened with a request waiting
    _assert_failed(outs[0], "injected step failure")
    _assert_failed(outs[1], "injected step failure", n=2)
    _assert_completed(after, 5)
    assert not hf_engine._has_work() and hf_engine._num_waiting_seqs == 0


def test_hf_failed_step_and_failed_cleanup_still_end_streams(hf_engine):
    real_step, real_drop, armed = hf_engine._step, hf_engine._drop, [True]

    def flaky_step():
        if armed and hf_engine.num_steps >= 1 and hf_engine._waiting:
            raise RuntimeError("injected step failure")
        return real_step()

    def broken_drop(request_id):
        if armed:
            armed.clear()
            raise RuntimeError("engine state broken")
        return real_drop(request_id)

    hf_engine._step, hf_engine._drop = flaky_step, broken_drop
    outs, [after] = _serve(hf_engine, [_req(max_tokens=24), _req(max_tokens=24)], then=[_req(max_tokens=5)])
    for o in outs:
        _assert_failed(o, "injected step failure")
    _assert_completed(after, 5)


def test_hf_abort_of_a_waiting_request_builds_no_controller(hf_engine):
    """Aborting a request that never started must not run its controller factory (which may raise:
    that used to escape the worker's inbox handling)."""
    built = []

    def factory():
        built.append(1)
        raise RuntimeError("factory must not run for an aborted waiting request")

    waiting = _req(max_tokens=8, n=2)
    waiting.controller_factory = factory

    async def main():
        try:
            active = asyncio.ensure_future(_collect(hf_engine, _req(max_tokens=24)))
            outs = []
            async for out in hf_engine.generate(waiting):
                outs.append(out)
            return await active, outs
        finally:
            await hf_engine.shutdown()

    real_add = hf_engine._add

    def add_then_abort(req):
        real_add(req)
        if req is waiting:
            hf_engine.abort(req.request_id)  # processed with the next inbox drain, before it starts

    hf_engine._add = add_then_abort
    active, outs = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    _assert_completed(active, 24)
    finals = _finals(outs)
    assert sorted(finals) == [0, 1] and all(f.finish_reason is FinishReason.ABORT for f in finals.values())
    assert not built


def test_publish_to_a_closed_event_loop_does_not_kill_the_worker(hf_engine):
    from service.engine.threaded import _Stream

    loop = asyncio.new_event_loop()
    stream = _Stream(loop, 1)
    loop.close()
    hf_engine._streams["gone"] = stream
    hf_engine._publish([RequestOutput("gone", 0, "", [], finished=True)])  # must not raise
    del hf_engine._streams["gone"]
    [outs], _ = _serve(hf_engine, [_req(max_tokens=3)])
    _assert_completed(outs, 3)
