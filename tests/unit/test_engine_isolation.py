"""Issue #16, engine side: one request's failure is its own. A row whose sampling or controller
raises, or whose setup fails, ends that request with an error while the others in flight finish;
the waiting limit counts sequences (prompts x n), not requests. Native and transformers engines,
tiny random Llama saved and loaded back (tests/golden/test_native_golden.py builders)."""

from __future__ import annotations


import pytest
import torch

from service.engine.config import EngineConfig
from service.engine.hf_backend import HFEngine
from service.engine.types import EngineOverloaded, FinishReason, GenerationRequest, SamplingParams
from tests.golden.test_native_golden import _save_tiny, make_engine
from tests.unit.test_hf_engine import run

HUGE = 2**70  # "Overflow when unpacking long long" inside the batched sampler


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _save_tiny("llama", path)
    return path


@pytest.fixture(params=["native", "hf"])
def engine(request, tiny_dir):
    if request.param == "native":
        return make_engine(tiny_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return HFEngine(model, AutoTokenizer.from_pretrained(tiny_dir), set(), EngineConfig(max_model_len=512))


def _good(max_tokens=24):
    return GenerationRequest([5, 6, 7, 8], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def _run(engine, reqs):
    """All requests concurrently (in order); per request its outputs."""
    return run(engine, *reqs)


def _assert_completed(outs, n_tokens):
    assert not any(o.error for o in outs), [o.error for o in outs if o.error]
    assert sum(len(o.token_ids) for o in outs) == n_tokens
    assert outs[-1].finished and outs[-1].finish_reason == FinishReason.LENGTH


def _assert_failed(outs, n=1):
    finals = [o for o in outs if o.finished]
    assert len(finals) == n and all(o.finish_reason == FinishReason.ERROR and o.error for o in finals)


def _assert_idle(engine):
    if hasattr(engine, "block_manager"):  # native: every KV block back, no request counted
        assert engine.block_manager.num_used_blocks == 0 and engine._num_requests == 0
    assert not engine._has_work()


def test_overflowing_top_k_fails_only_its_request(engine):
    """Reproducer 1 past the API's validation: the batched draw overflows; rows retry alone."""
    bad = GenerationRequest([9, 10], SamplingParams(max_tokens=24, temperature=1.0, top_k=HUGE, n=2))
    bad_outs, good_outs, later = _run(engine, [bad, _good(), _good(8)])
    _assert_failed(bad_outs, n=2)
    _assert_completed(good_outs, 24)
    _assert_completed(later, 8)
    _assert_idle(engine)


class _Boom:
    """A token controller that raises after `after` tokens (a bug in one request's own code)."""

    def __init__(self, after: int):
        self.after = after

    def banned_tokens(self, num_generated):
        return []

    def on_token(self, token_id, num_generated):
        if num_generated >= self.after:
            raise RuntimeError("controller bug")
        return []


def test_controller_failure_mid_generation_fails_only_its_request(engine):
    bad = GenerationRequest([9, 10], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                            controller_factory=lambda: _Boom(after=3))
    bad_outs, good_outs = _run(engine, [bad, _good()])
    _assert_failed(bad_outs)
    assert "controller bug" in bad_outs[-1].error
    _assert_completed(good_outs, 24)
    _assert_idle(engine)


def test_failing_setup_fails_only_its_request(engine):
    """A request whose setup raises (here its controller factory) must not kill the worker thread
    (native: every later request hung) nor fail the requests queued with it (transformers)."""

    def factory():
        raise RuntimeError("no controller for you")

    bad = GenerationRequest([9, 10], SamplingParams(max_tokens=8, n=2), controller_factory=factory)
    bad_outs, good_outs = _run(engine, [bad, _good()])
    _assert_failed(bad_outs, n=2)
    _assert_completed(good_outs, 24)
    _assert_idle(engine)


def test_waiting_limit_counts_sequences(engine):
    """Reproducer 3: requests of many sequences were counted as one each, so 100 prompts x n=16
    queued 1,600 sequences past a limit of 256, and everyone else got 429 until they drained."""
    engine.max_waiting = 16
    engine._inbox.put(("add", GenerationRequest([3], SamplingParams(n=16))))  # queued, not yet seen
    with pytest.raises(EngineOverloaded, match="16 sequences are waiting"):
        engine.check_admission([GenerationRequest([3])])
    engine._inbox.get()
    engine.check_admission([GenerationRequest([3], SamplingParams(n=16))])  # an empty queue takes one
    four = [GenerationRequest([3], SamplingParams(n=4)) for _ in range(4)]
    engine.check_admission(four)  # 16 sequences together: fits
    with pytest.raises(EngineOverloaded):  # all or nothing: one more sequence does not
        engine.check_admission(four + [GenerationRequest([3])])
