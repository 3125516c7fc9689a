"""service/engine/sampler.py: each sampling parameter's effect on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from service.engine.sampler import SamplingRow, _filter, apply_penalties, make_generator, sample
from service.engine.types import SamplingParams

CPU = torch.device("cpu")
DRAWS = 2000  # rows per batched call when counting draws


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def row(generator=None, output=(), prompt=(), banned=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), generator, list(output), list(prompt), list(banned))


def logits_from_probs(probs) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float32).log()


def draws(logits_1xv: torch.Tensor, n: int = DRAWS, **params) -> set[int]:
    """The set of token ids sampled in n independent draws (one batched call of n equal rows)."""
    tokens, _ = sample(logits_1xv.expand(n, -1).clone(), [row(**params) for _ in range(n)])
    return set(tokens.tolist())


LOGITS = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0, 0.0, -2.0, 2.5]])
ARGMAX = 1


# ---------------------------------------------------------------- greedy, top-k, top-p, min-p


def test_temperature_zero_is_argmax():
    tokens, logprobs = sample(LOGITS.clone(), [row(temperature=0.0)])
    assert tokens.tolist() == [ARGMAX] and logprobs is None
    assert draws(LOGITS, n=200, temperature=0.0) == {ARGMAX}


def test_top_k_1_is_argmax_even_at_high_temperature():
    assert SamplingParams(top_k=1, temperature=5.0).greedy
    assert draws(LOGITS, temperature=5.0, top_k=1) == {ARGMAX}


@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_never_samples_outside_the_top_k(k):
    top = set(LOGITS[0].topk(k).indices.tolist())
    got = draws(LOGITS, temperature=3.0, top_k=k)  # flattened: every kept token gets drawn
    assert got == top


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = logits_from_probs([0.1, 0.5, 0.15, 0.25])  # sorted: 1 (.5), 3 (.25), 2 (.15), 0 (.1)
    assert draws(logits, top_p=0.3) == {1}
    assert draws(logits, top_p=0.6) == {1, 3}  # .5 < .6 <= .75
    assert draws(logits, top_p=0.8) == {1, 3, 2}  # .75 < .8 <= .9
    assert draws(logits, top_p=1.0) == {0, 1, 2, 3}


def test_top_p_filter_renormalizes_the_kept_set():
    logits = logits_from_probs([0.1, 0.5, 0.15, 0.25])
    probs = _filter(logits, [row(top_p=0.6)]).softmax(-1)[0]
    assert torch.allclose(probs, torch.tensor([0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75]), atol=1e-6)


def test_min_p_drops_tokens_below_min_p_times_p_max():
    logits = logits_from_probs([0.05, 0.5, 0.3, 0.15])
    # threshold 0.2 * 0.5 = 0.1: token 0 (0.05) goes, token 3 (0.15) stays
    filtered = _filter(logits, [row(min_p=0.2)])[0]
    assert filtered[0] == float("-inf") and torch.isfinite(filtered[1:]).all()
    assert draws(logits, min_p=0.2) == {1, 2, 3}
    # threshold 0.5 * 0.5 = 0.25: only 1 (0.5) and 2 (0.3) stay
    assert draws(logits, min_p=0.5) == {1, 2}


def test_filter_always_keeps_the_best_token():
    assert draws(LOGITS, n=200, top_p=0.0) == {ARGMAX}
    assert draws(LOGITS, n=200, min_p=1.0) == {ARGMAX}


# ---------------------------------------------------------------- penalties and bans


def test_presence_and_frequency_penalties_numerically():
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0, 0.5, 0.0]])
    r = row(output=[2, 2, 4, 2], prompt=[0, 1], presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), [r])[0]
    expected = logits[0].clone()
    expected[2] -= 3 * 0.25 + 0.5  # generated three times
    expected[4] -= 1 * 0.25 + 0.5  # generated once
    # prompt tokens 0 and 1 are not penalized by presence/frequency (output tokens only)
    assert torch.allclose(out, expected)


def test_negative_presence_penalty_raises_logits():
    logits = torch.zeros(1, 4)
    out = apply_penalties(logits, [row(output=[3], presence_penalty=-1.0)])[0]
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0]])
    r = row(prompt=[0], output=[1], repetition_penalty=2.0)
    out = apply_penalties(logits.clone(), [r])[0]
    assert torch.allclose(out, torch.tensor([1.0, -2.0, 0.5, -0.5, 3.0]))  # 2, 3, 4 unseen


def test_penalties_are_per_row():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rows = [row(output=[2]), row(output=[2], frequency_penalty=1.0), row(output=[1], repetition_penalty=4.0)]
    out = apply_penalties(logits.clone(), rows)
    assert out[0].tolist() == [1.0, 2.0, 3.0]
    assert out[1].tolist() == [1.0, 2.0, 2.0]
    assert out[2].tolist() == [1.0, 0.5, 3.0]


def test_penalty_changes_the_greedy_choice():
    tokens, _ = sample(LOGITS.clone(), [row(temperature=0.0, output=[ARGMAX], presence_penalty=1.0)])
    assert tokens.tolist() == [7]  # 3.0 - 1.0 = 2.0 < 2.5


def test_banned_tokens_are_never_sampled():
    banned = [ARGMAX, 7, 3]
    tokens, _ = sample(LOGITS.clone(), [row(temperature=0.0, banned=banned)])
    assert tokens.tolist() == [4]  # the best of the rest
    got = draws(LOGITS, temperature=5.0, banned=banned)
    assert not got & set(banned) and len(got) >= 3


def test_bans_do_not_leak_to_other_rows():
    logits = LOGITS.expand(2, -1).clone()
    tokens, _ = sample(logits, [row(temperature=0.0, banned=[ARGMAX]), row(temperature=0.0)])
    assert tokens.tolist() == [7, ARGMAX]


# ---------------------------------------------------------------- batching and seeds


def test_greedy_row_and_sampling_row_in_one_batch_are_independent():
    n = 500
    logits = LOGITS.expand(2 * n, -1).clone()
    rows = [row(temperature=0.0) if i % 2 == 0 else row(temperature=2.0) for i in range(2 * n)]
    tokens, _ = sample(logits, rows)
    greedy, sampled = tokens[0::2].tolist(), tokens[1::2].tolist()
    assert set(greedy) == {ARGMAX}
    assert len(set(sampled)) >= 4  # the sampling rows really sample


def _seeded_draws(steps: int, seed: int, companions) -> list[int]:
    """Tokens drawn by one seeded row over `steps` calls, batched with `companions` rows."""
    gen = make_generator(seed, 0, CPU)
    flat = torch.zeros(1, 50)  # uniform: every draw is decided by the generator alone
    out = []
    for _ in range(steps):
        rows = [row(generator=gen, temperature=1.0)] + companions()
        tokens, _ = sample(flat.expand(len(rows), -1).clone(), rows)
        out.append(int(tokens[0]))
    return out


def test_seeded_row_gives_the_same_draws_alone_and_in_a_batch():
    alone = _seeded_draws(20, 42, lambda: [])
    again = _seeded_draws(20, 42, lambda: [])
    batched = _seeded_draws(20, 42, lambda: [
        row(temperature=0.7),  # unseeded
        row(generator=make_generator(7, 0, CPU), temperature=1.3),
        row(temperature=0.0),  # greedy
        row(temperature=1.0, top_k=5, top_p=0.9, min_p=0.05),  # forces the filter path for the batch
    ])
    assert alone == again == batched
    assert len(set(alone)) > 5  # it really samples
    assert _seeded_draws(20, 43, lambda: []) != alone


def test_make_generator_seed_plus_index():
    assert make_generator(None, 0, CPU) is None
    a = torch.rand(5, generator=make_generator(10, 3, CPU))
    b = torch.rand(5, generator=make_generator(13, 0, CPU))
    c = torch.rand(5, generator=make_generator(10, 0, CPU))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_of_the_raw_logits_and_top_sorted():
    raw = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0, 0.0, -2.0, 2.5],
                        [1.0, 0.0, 4.0, -3.0, 2.0, 2.0, 0.5, 1.5]])
    rows = [
        row(temperature=0.0, logprobs=True, top_logprobs=3, output=[1], presence_penalty=2.0),
        row(temperature=0.5, logprobs=True, top_logprobs=5, banned=[2]),
    ]
    tokens, logprobs = sample(raw.clone(), rows)
    lp = torch.log_softmax(raw, dim=-1)
    assert len(logprobs) == 2
    for i, (tl, n) in enumerate(zip(logprobs, [3, 5])):
        assert tl.token_id == int(tokens[i])
        assert tl.logprob == pytest.approx(float(lp[i, tl.token_id]), abs=1e-6)
        assert len(tl.top) == n
        values = [v for _, v in tl.top]
        assert values == sorted(values, reverse=True)
        for tid, v in tl.top:
            assert v == pytest.approx(float(lp[i, tid]), abs=1e-6)
        assert [t for t, _ in tl.top] == lp[i].topk(n).indices.tolist()
    assert tokens[0] == 7  # penalty moved the greedy choice; logprob still of the raw logits
    assert logprobs[0].logprob == pytest.approx(2.5 - math.log(raw[0].exp().sum()), abs=1e-5)
    assert tokens[1] != 2  # banned, although it is the raw argmax


def test_logprobs_per_row_request():
    rows = [row(temperature=0.0, logprobs=True, top_logprobs=0), row(temperature=0.0, logprobs=True, top_logprobs=2)]
    _, logprobs = sample(LOGITS.expand(2, -1).clone(), rows)
    assert logprobs[0].top == [] and len(logprobs[1].top) == 2
    _, none = sample(LOGITS.clone(), [row(temperature=0.0)])
    assert none is None


def test_candidate_filter_matches_the_full_sort_where_it_claims_to_be_exact():
    from service.engine.sampler import PREFILTER_K, _candidates, _filter_params

    vocab = 5000
    rows = [row(temperature=0.7, top_p=0.9), row(temperature=1.0, top_k=50), row(temperature=1.0, min_p=0.05),
            row(temperature=1.3, top_p=0.5, top_k=400),
            row(temperature=0.9, top_k=4000, top_p=0.8)]  # top_k past the candidates: top_p must cut
    for scale, expect_exact in ((8.0, True), (0.5, False)):  # peaked: candidates suffice; flat: they do not
        logits = torch.randn(len(rows), vocab) * scale
        temps, top_k, top_p, min_p, _ = _filter_params(rows, vocab, CPU)
        kept, idx, exact = _candidates(logits / temps, top_k, top_p, min_p, PREFILTER_K)
        full = _filter(logits, rows)
        fast = torch.full_like(full, float("-inf")).scatter_(1, idx, kept)
        for i in exact.nonzero().squeeze(1).tolist():
            assert torch.equal(torch.isinf(full[i]), torch.isinf(fast[i]))
            kept_i = ~torch.isinf(full[i])
            torch.testing.assert_close(fast[i][kept_i], full[i][kept_i])
        if expect_exact:
            assert exact.all()
        else:  # the top_p and min_p rows need tokens past the candidates
            assert not exact[0] and not exact[4]
    assert not torch.isinf(_filter(torch.randn(1, vocab) * 8, [row(temperature=1.0)])).any()  # no filter: all kept


def test_seeded_row_on_the_candidate_path_is_the_same_alone_and_in_a_batch():
    vocab = 2000  # past PREFILTER_K: the seeded top_p row draws among its top candidates
    peaked = torch.randn(1, vocab) * 4
    flat = torch.zeros(1, vocab)  # a companion whose top_p row needs the full sort

    def draws(companions):
        gen, out = make_generator(5, 0, CPU), []
        for _ in range(15):
            rows = [row(generator=gen, temperature=1.0, top_p=0.9)] + companions
            logits = torch.cat([peaked] + [flat] * len(companions))
            out.append(int(sample(logits, rows)[0][0]))
        return out

    alone = draws([])
    assert alone == draws([row(temperature=1.0, top_p=0.5), row(temperature=0.8)])
    assert len(set(alone)) > 1
