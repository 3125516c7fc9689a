"""Draft-model speculation (issue #11) in the batched native engine: the same output as plain
decoding (greedy token for token, seeded sampling token for token), alone, batched with n-gram and
plain requests, with n > 1, through preemption; the draft's own KV blocks and the target's all
come back; a draft that fails costs speed, never output. Tiny random Llamas (fp32): the target as
its own draft (nearly every proposal accepted) and a perturbed copy (many rejected)."""

from __future__ import annotations

import pytest
import torch

from service.engine.types import GenerationRequest, SamplingParams, SpeculativeParams
from service.modeling.loader import load_model
from tests.golden.test_native_golden import GREEDY
from tests.unit.test_speculative import NGRAM, PROMPTS, accepted, engine_for, generate, requests, tiny_dir  # noqa: F401

SAME = SpeculativeParams("draft", 4, "same")
NOISY = SpeculativeParams("draft", 4, "noisy")


def engine_with_drafts(tiny_dir, **kw):
    engine = engine_for(tiny_dir, **kw)
    engine.attach_draft("same", load_model(tiny_dir))
    noisy = load_model(tiny_dir)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std())
    engine.attach_draft("noisy", noisy)
    return engine


def draft_blocks(engine) -> int:
    return sum(d.block_manager.num_used_blocks for d in engine.speculation.drafts.values())


@pytest.mark.parametrize("spec", [SAME, NOISY], ids=["same", "noisy"])
def test_greedy_identical_alone_and_batched_and_all_kv_returns(tiny_dir, spec):
    plain = generate(engine_for(tiny_dir), requests(None, **GREEDY))
    engine = engine_with_drafts(tiny_dir)
    out = generate(engine, requests(spec, **GREEDY))
    assert [t for t, _ in out] == [t for t, _ in plain]
    stats = engine.stats()
    assert accepted(out) == stats["spec_decode_num_accepted_tokens_total"] > 20
    rejected = stats["spec_decode_num_draft_tokens_total"] - stats["spec_decode_num_accepted_tokens_total"]
    assert rejected > (20 if spec is NOISY else -1)  # the noisy draft really gets rejected
    assert engine.block_manager.num_used_blocks == 0 and draft_blocks(engine) == 0
    # one batch: both drafts, n-gram and plain requests side by side
    mixed = [GenerationRequest(p, SamplingParams(max_tokens=40, speculative=s, **GREEDY))
             for p, s in zip(PROMPTS, (SAME, NOISY, NGRAM, None))]
    engine = engine_with_drafts(tiny_dir)
    assert [t for t, _ in generate(engine, mixed)] == [t for t, _ in plain]
    assert draft_blocks(engine) == 0
    alone = generate(engine_with_drafts(tiny_dir), [GenerationRequest(PROMPTS[2], SamplingParams(
        max_tokens=40, speculative=spec, **GREEDY))])
    assert alone[0][0] == plain[2][0]


def test_the_same_model_as_draft_is_accepted_almost_always(tiny_dir):
    engine = engine_with_drafts(tiny_dir)
    generate(engine, requests(SAME, **GREEDY))
    s = engine.stats()
    assert s["spec_decode_num_accepted_tokens_total"] >= 0.9 * s["spec_decode_num_draft_tokens_total"]


def test_a_long_prompt_is_caught_up_on_in_chunks(tiny_dir):
    plain = generate(engine_for(tiny_dir), requests(None, **GREEDY))
    engine = engine_with_drafts(tiny_dir)
    engine.speculation.drafts["same"].max_chunk = 3  # a 27-token prompt: many rounds before the first proposal
    rounds = []
    real_propose = engine.speculation.drafts["same"].propose
    engine.speculation.drafts["same"].propose = lambda wants: rounds.append(out := real_propose(wants)) or out
    out = generate(engine, requests(SAME, **GREEDY)[2:3])
    assert out[0][0] == plain[2][0]
    first = next(i for i, r in enumerate(rounds) if r)  # the view gains 3 tokens a round, the target 1
    assert first >= 27 // 3 and all(rounds[first : first + 3]) and accepted(out) >= 10


def test_seeded_sampling_with_penalties_and_n_gt_1_identical(tiny_dir):
    params = dict(temperature=0.5, top_k=3, seed=7, n=3, presence_penalty=0.05, repetition_penalty=1.02,
                  ignore_eos=True, logprobs=True, top_logprobs=2)
    plain = generate(engine_for(tiny_dir), requests(None, **params))
    engine = engine_with_drafts(tiny_dir)
    out = generate(engine, requests(SAME, **params))
    assert [t for t, _ in out] == [t for t, _ in plain]
    assert accepted(out) > 0 and draft_blocks(engine) == 0


def test_preemption_in_the_middle_keeps_output_and_frees_blocks(tiny_dir):
    small = dict(kv_cache_bytes=40 * 4 * 2 * 2 * 2 * 16 * 4)  # 40 blocks of 4 tokens: not all four stay resident
    plain = generate(engine_for(tiny_dir, **small), requests(None, max_tokens=48, **GREEDY))
    engine = engine_with_drafts(tiny_dir, **small)
    out = generate(engine, requests(NOISY, max_tokens=48, **GREEDY))
    assert engine.scheduler.num_preemptions > 0 and accepted(out) > 0
    assert [t for t, _ in out] == [t for t, _ in plain]
    assert engine.block_manager.num_used_blocks == 0 and draft_blocks(engine) == 0


def test_a_failing_draft_costs_speed_not_output(tiny_dir):
    plain = generate(engine_for(tiny_dir), requests(None, **GREEDY))
    engine = engine_with_drafts(tiny_dir)
    calls = {"n": 0}
    draft = engine.speculation.drafts["same"]
    real_run = draft.runner.run

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("draft forward failed")
        return real_run(batch)

    draft.runner.run = flaky
    out = generate(engine, requests(SAME, **GREEDY))
    assert [t for t, _ in out] == [t for t, _ in plain]
    assert all(r.get("finish_reason") != "error" for _, reports in out for r in reports.values())
    assert accepted(out) > 0 and draft_blocks(engine) == 0


def test_unknown_draft_id_is_rejected_by_the_sequence():
    from service.engine.speculative import SequenceSpeculation

    with pytest.raises(ValueError):
        SequenceSpeculation("draft", 4, None)
