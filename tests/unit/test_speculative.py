"""Speculative decoding (issue #11): n-gram proposals verified in the batched native engine give the
same output as plain decoding: greedy token for token, seeded sampling token for token (a point-mass
proposal verified by drawing from the target is the rejection rule), alone, batched with plain
requests, with n > 1, through preemption; KV blocks all come back. A tiny random Llama (fp32)."""

from __future__ import annotations

import pytest
import torch

from service.engine.speculative import AdaptiveLength, NgramProposer, rejection_sample
from service.engine.types import GenerationRequest, SamplingParams, SpeculativeParams
from tests.golden.test_native_golden import GREEDY, _save_tiny, generate, make_engine

NGRAM = SpeculativeParams("ngram", 4)
# Repetitive prompts: the random model falls into loops and copies, so drafts get accepted.
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [10, 11, 12, 10, 11, 12, 10], list(range(3, 30)),
           [40, 41, 42, 43, 40, 41, 42, 43, 40, 41, 42, 43, 40, 41]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec-llama")
    _save_tiny("llama", path)
    return path


def engine_for(tiny_dir, **kw):
    kw.setdefault("spec_max_batch", 64)  # speculate at any batch size (the load policy has its own test)
    return make_engine(tiny_dir, **kw)


def requests(spec, max_tokens=40, **params) -> list[GenerationRequest]:
    return [GenerationRequest(p, SamplingParams(max_tokens=max_tokens, speculative=spec, **params)) for p in PROMPTS]


def accepted(results) -> int:
    return sum(r.get("spec_accepted_tokens", 0) for _, reports in results for r in reports.values())


def test_ngram_proposes_the_latest_continuation_of_the_longest_suffix():
    p = NgramProposer()
    assert p.propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]  # latest "1 2 3" was followed by 7 5
    assert p.propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3, 7], 9) == [5, 1, 2, 3, 7]  # clipped at the end
    assert NgramProposer().propose([1, 2, 3, 4], 3) == []  # nothing repeats
    q = NgramProposer()  # incremental: tokens arriving one by one index the same as all at once
    seq = [4, 5, 6, 4, 5]
    for i in range(1, len(seq) + 1):
        out = q.propose(seq[:i], 3)
    assert out == [6, 4, 5]


def test_adaptive_length_grows_shrinks_and_pauses():
    a = AdaptiveLength(4)
    a.update(4, 0)
    assert a.current() == 2
    a.update(2, 2)
    assert a.current() == 3
    for _ in range(AdaptiveLength.PAUSE_AFTER):
        a.update(a.k, 0)
    assert [a.current() for _ in range(AdaptiveLength.PAUSE_STEPS)] == [0] * AdaptiveLength.PAUSE_STEPS
    assert a.current() >= 1


def test_greedy_identical_alone_and_batched_and_kv_returns(tiny_dir):
    plain = generate(engine_for(tiny_dir), requests(None, **GREEDY))
    engine = engine_for(tiny_dir)
    spec = generate(engine, requests(NGRAM, **GREEDY))
    assert [t for t, _ in spec] == [t for t, _ in plain]
    assert accepted(spec) > 20  # speculation really ran (a test that cannot pass without it)
    assert engine.block_manager.num_used_blocks == 0
    stats = engine.stats()
    assert stats["spec_decode_num_accepted_tokens_total"] == accepted(spec)
    assert stats["spec_decode_num_draft_tokens_total"] >= stats["spec_decode_num_accepted_tokens_total"]
    # mixed: speculating and plain requests in one batch
    mixed = requests(NGRAM, **GREEDY)[:2] + requests(None, **GREEDY)[2:]
    assert [t for t, _ in generate(engine_for(tiny_dir), mixed)] == [t for t, _ in plain]
    for p, (t, _) in zip(PROMPTS, plain):  # alone
        alone = generate(engine_for(tiny_dir), [GenerationRequest(p, SamplingParams(max_tokens=40, speculative=NGRAM,
                                                                                     **GREEDY))])
        assert alone[0][0] == t


def test_seeded_sampling_with_penalties_identical_and_n_gt_1(tiny_dir):
    params = dict(temperature=0.5, top_k=3, seed=7, n=3, presence_penalty=0.05, repetition_penalty=1.02,
                  ignore_eos=True, logprobs=True, top_logprobs=2)
    plain = generate(engine_for(tiny_dir), requests(None, **params))
    spec = generate(engine_for(tiny_dir), requests(NGRAM, **params))
    assert [t for t, _ in spec] == [t for t, _ in plain]
    assert accepted(spec) > 0


def test_preemption_in_the_middle_keeps_output_and_frees_blocks(tiny_dir):
    # A KV pool of 40 blocks of 4 tokens: four 60-token sequences cannot all stay resident.
    plain = generate(engine_for(tiny_dir, kv_cache_bytes=40 * 4 * 2 * 2 * 2 * 16 * 4),
                     requests(None, max_tokens=48, **GREEDY))
    engine = engine_for(tiny_dir, kv_cache_bytes=40 * 4 * 2 * 2 * 2 * 16 * 4)
    spec = generate(engine, requests(NGRAM, max_tokens=48, **GREEDY))
    assert engine.scheduler.num_preemptions > 0
    assert [t for t, _ in spec] == [t for t, _ in plain]
    assert engine.block_manager.num_used_blocks == 0


def test_stop_and_max_tokens_are_exact_under_speculation(tiny_dir):
    plain = generate(engine_for(tiny_dir), requests(None, max_tokens=13, **GREEDY))
    spec = generate(engine_for(tiny_dir), requests(NGRAM, max_tokens=13, **GREEDY))
    assert [t for t, _ in spec] == [t for t, _ in plain]
    assert all(len(t[0]) == 13 for t, _ in spec)
    stop_id = plain[0][0][0][5]  # a token the first request emits: it must end the sequence there
    reqs = [GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=40, stop_token_ids=(stop_id,), speculative=s,
                                                         **GREEDY)) for s in (None, NGRAM)]
    a, b = generate(engine_for(tiny_dir), reqs)
    assert a[0] == b[0] and a[0][0][-1] == stop_id


def test_rejection_sample_matches_the_target_distribution():
    """The general rule (a proposal with a full distribution q): chi-square of 20k draws against p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.5, 0.1, 0.2, 0.1])
    counts = torch.zeros(5)
    n = 20_000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        tok, _ = rejection_sample(p, q, d, g)
        counts[tok] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 18.47  # p = 0.001 critical value, 4 degrees of freedom


def test_unseeded_sampling_has_the_same_distribution_with_and_without_speculation(tiny_dir):
    """Unseeded draws (different random streams): the tokens at positions 2-4, most of them emitted
    by verification rows under speculation, have the same distribution as plain decoding's
    (two-sample chi-square over 600 requests each)."""
    params = dict(max_tokens=5, temperature=0.3, top_k=4, ignore_eos=True)
    greedy = generate(engine_for(tiny_dir), [GenerationRequest(PROMPTS[1], SamplingParams(max_tokens=20, **GREEDY))])
    context = PROMPTS[1] + greedy[0][0][0]  # the model's own loop: drafts from it are often right

    def tokens(spec):
        engine = engine_for(tiny_dir, max_num_seqs=64, max_num_batched_tokens=512)
        torch.manual_seed(1 if spec else 2)
        out = []
        for _ in range(10):  # 60 at a time: the engine queues at most 64
            reqs = [GenerationRequest(context, SamplingParams(speculative=spec, **params)) for _ in range(60)]
            out += [t[0][2:5] for t, _ in generate(engine, reqs)]
        return out, engine.stats().get("spec_decode_num_accepted_tokens_total", 0)

    plain, _ = tokens(None)
    spec, num_accepted = tokens(NGRAM)
    assert num_accepted > 300  # most of these positions came out of verification
    for pos in range(3):
        a = torch.bincount(torch.tensor([t[pos] for t in plain]), minlength=256).float()
        b = torch.bincount(torch.tensor([t[pos] for t in spec]), minlength=256).float()
        common = (a + b) >= 10  # bins with enough draws; the rest pooled
        a = torch.cat([a[common], a[~common].sum(0, keepdim=True)])
        b = torch.cat([b[common], b[~common].sum(0, keepdim=True)])
        keep = (a + b) > 0
        chi2 = float(((a[keep] - b[keep]) ** 2 / (a[keep] + b[keep])).sum())
        df = int(keep.sum()) - 1
        assert chi2 < {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}.get(df, 3 * df), (pos, chi2, df)


def test_no_speculation_above_the_batch_limit(tiny_dir):
    engine = engine_for(tiny_dir, spec_max_batch=3)
    results = generate(engine, requests(NGRAM, **GREEDY))  # 4 decoding sequences > 3
    assert accepted(results) == 0 and engine.stats()["spec_decode_num_drafts_total"] == 0
    engine = engine_for(tiny_dir, spec_max_batch=4)
    assert accepted(generate(engine, requests(NGRAM, **GREEDY))) > 0
