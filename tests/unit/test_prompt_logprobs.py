"""Issue #9, engine side: SamplingParams.prompt_logprobs gives each prompt token's logprob (the first
None) equal to log_softmax of transformers' full-sequence logits, in the native engine (chunked
prefill, prefix cache bypassed for that request only) and in the transformers backend; max_tokens 0
ends a request after its prefill. Tiny random models built from configs; nothing is downloaded."""

from __future__ import annotations

import asyncio

import pytest
import torch

from service.engine.config import EngineConfig
from service.engine.hf_backend import HFEngine
from service.engine.types import FinishReason, GenerationRequest, SamplingParams
from tests.golden.test_native_golden import VOCAB, _save_tiny, hf_greedy, make_engine

ATOL = 1e-4
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp(request.param)
    _save_tiny(request.param, path)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids_of(seed: int, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(hf, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits over the whole sequence at once: [T, V]."""
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def check(values, ids: list[int], ref: torch.Tensor, k: int) -> None:
    assert values is not None and len(values) == len(ids) and values[0] is None
    for t in range(1, len(ids)):
        v = values[t]
        assert v.token_id == ids[t]
        assert abs(v.logprob - ref[t - 1, ids[t]].item()) < ATOL, t
        assert len(v.top) == k
        if k:
            vals, top_ids = ref[t - 1].topk(k)
            assert [i for i, _ in v.top] == top_ids.tolist()
            assert torch.allclose(torch.tensor([x for _, x in v.top]), vals, atol=ATOL)


def collect(engine, reqs: list[GenerationRequest], shutdown: bool = True) -> list[list]:
    """All outputs of each request (run concurrently)."""

    async def one(req):
        return [out async for out in engine.generate(req)]

    async def main():
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(r) for r in reqs)), 60)
        finally:
            if shutdown:
                await engine.shutdown()

    return asyncio.run(main())


def req(ids, k=None, **kw) -> GenerationRequest:
    return GenerationRequest(list(ids), SamplingParams(**{**GREEDY, "max_tokens": 3, **kw}, prompt_logprobs=k))


def prompt_values(outs, index: int = 0):
    """The prompt logprobs of one sequence: exactly one of its outputs carries them, the first."""
    seq = [o for o in outs if o.index == index]
    carried = [o.prompt_logprobs for o in seq if o.prompt_logprobs is not None]
    assert len(carried) == 1 and seq[0].prompt_logprobs is not None
    return carried[0]


def generated(outs, index: int = 0) -> list[int]:
    return [t for o in outs if o.index == index for t in o.token_ids]


# ---- native engine ----

def test_native_long_prompt_chunked_matches_transformers(tiny):
    """A prompt of 75 tokens over a 32-token step budget: logits of every chunk's positions."""
    path, hf = tiny
    ids = ids_of(1, 75)
    engine = make_engine(path)
    [outs] = collect(engine, [req(ids, 3)])
    check(prompt_values(outs), ids, reference(hf, ids), 3)
    assert generated(outs) == hf_greedy(hf, ids, 3)  # sampling unaffected
    assert outs[-1].num_prompt_tokens == 75 and outs[-1].finish_reason is FinishReason.LENGTH


def test_native_bypasses_prefix_cache_for_prompt_logprobs_only(tiny):
    path, hf = tiny
    prefix = ids_of(2, 24)
    first, second, third = prefix + ids_of(3, 5), prefix + ids_of(4, 7), prefix + ids_of(5, 6)
    engine = make_engine(path)
    [plain] = collect(engine, [req(first)], shutdown=False)  # caches the prefix's blocks
    assert all(o.prompt_logprobs is None for o in plain)
    [scored] = collect(engine, [req(second, 0)], shutdown=False)
    check(prompt_values(scored), second, reference(hf, second), 0)
    assert scored[0].num_cached_tokens == 0  # computed every position, not read from the cache
    assert generated(scored) == hf_greedy(hf, second, 3)
    [again] = collect(engine, [req(third)])
    assert again[0].num_cached_tokens >= 20  # other requests still hit the cache
    assert generated(again) == hf_greedy(hf, third, 3)


def test_native_batch_mixed_with_plain_requests_and_n(tiny):
    """Prompt-logprob requests next to plain ones in the same steps; n=2 shares one computation."""
    path, hf = tiny
    a, b, c = ids_of(6, 40), ids_of(7, 9), ids_of(8, 33)
    engine = make_engine(path)
    outs = collect(engine, [req(a, 2), req(b), req(c, 1, n=2)])
    check(prompt_values(outs[0]), a, reference(hf, a), 2)
    assert all(o.prompt_logprobs is None for o in outs[1])
    ref_c = reference(hf, c)
    for i in (0, 1):
        check(prompt_values(outs[2], i), c, ref_c, 1)
    assert generated(outs[1]) == hf_greedy(hf, b, 3)
    assert generated(outs[2], 0) == generated(outs[2], 1) == hf_greedy(hf, c, 3)


def test_native_max_tokens_zero_and_one_token_prompt(tiny):
    path, hf = tiny
    ids = ids_of(9, 50)
    engine = make_engine(path)
    zero, single, echo_only = collect(engine, [req(ids, 1, max_tokens=0), req(ids[:1], 2, max_tokens=1),
                                               req(ids[:10], None, max_tokens=0)])
    assert len(zero) == 1 and zero[0].finished and zero[0].finish_reason is FinishReason.LENGTH
    assert zero[0].token_ids == [] and zero[0].num_generated_tokens == 0 and zero[0].text == ""
    check(zero[0].prompt_logprobs, ids, reference(hf, ids), 1)
    assert prompt_values(single) == [None] and len(generated(single)) == 1
    assert len(echo_only) == 1 and echo_only[0].finished and echo_only[0].prompt_logprobs is None
    assert engine.stats()["num_requests_running"] == 0 and engine.block_manager.num_used_blocks == 0


# ---- transformers backend ----

@pytest.fixture
def hf_engine(tiny_model, tiny_tokenizer):
    return HFEngine(tiny_model, tiny_tokenizer, {tiny_tokenizer.eos_token_id}, EngineConfig(max_model_len=256))


def test_hf_prompt_logprobs_match_full_forward(hf_engine, tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog. Hello world, this is a test.")
    ref = reference(tiny_model, ids)
    scored, plain, zero, pair = collect(hf_engine, [req(ids, 4), req(ids), req(ids, 0, max_tokens=0),
                                                    req(ids, 2, n=2, temperature=1.0, seed=3)])
    check(prompt_values(scored), ids, ref, 4)
    assert all(o.prompt_logprobs is None for o in plain)
    assert generated(scored) == generated(plain)  # the full-logits prefill samples the same token
    assert len(zero) == 1 and zero[0].finish_reason is FinishReason.LENGTH and zero[0].token_ids == []
    check(zero[0].prompt_logprobs, ids, ref, 0)
    for i in (0, 1):
        check(prompt_values(pair, i), ids, ref, 2)


def test_hf_one_token_prompt(hf_engine, tiny_tokenizer):
    ids = tiny_tokenizer.encode("Hello")[:1]
    [outs] = collect(hf_engine, [req(ids, 1, max_tokens=2)])
    assert prompt_values(outs) == [None] and len(generated(outs)) == 2


def test_native_preemption_mid_prefill_recomputes_prompt_logprobs(tiny):
    """A KV pool of 40 blocks (4 tokens each), 8 tokens a step: the decoding request runs out of blocks
    while the prompt-logprob request is mid-prefill; that one is preempted, recomputed, still exact."""
    path, hf = tiny
    engine = make_engine(path, kv_cache_bytes=40 * 2048, max_num_batched_tokens=8, max_num_seqs=2)
    assert engine.block_manager.num_blocks == 40
    preempt, owed = engine.scheduler._preempt, []

    def spy(seq):
        owed.append(seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens)
        preempt(seq)

    engine.scheduler._preempt = spy
    a, b = ids_of(30, 56), ids_of(31, 100)
    out_a, out_b = collect(engine, [req(a, max_tokens=20), req(b, 2, max_tokens=4)])
    # the scenario must preempt the prompt-logprob request mid-prefill, or it tests nothing
    assert any(owed), f"no preemption while prompt logprobs were owed ({len(owed)} preemptions)"
    check(prompt_values(out_b), b, reference(hf, b), 2)
    assert generated(out_b) == hf_greedy(hf, b, 4) and generated(out_a) == hf_greedy(hf, a, 20)
