"""service/engine/hf_backend.py (+ threaded.py) on a tiny random Llama, driven through the async
`generate()` exactly as the API drives it."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from service.engine.config import EngineConfig
from service.engine.hf_backend import HFEngine
from service.engine.types import FinishReason, GenerationRequest, RequestTooLarge, SamplingParams

TIMEOUT = 30  # seconds for one request: far above the real time, only to fail instead of hanging
PROMPT = "Hello world, this is"


@pytest.fixture
def prompt_ids(tiny_tokenizer):
    return tiny_tokenizer.encode(PROMPT)


@pytest.fixture
def make_engine(tiny_model, tiny_tokenizer):
    def make(max_model_len=256, eos=None):
        eos_ids = {tiny_tokenizer.eos_token_id} if eos is None else eos
        return HFEngine(tiny_model, tiny_tokenizer, eos_ids, EngineConfig(max_model_len=max_model_len))

    return make


def run(engine, *requests):
    """Collect every output of the requests (concurrently), then shut the engine down."""

    async def one(req):
        return [out async for out in engine.generate(req)]

    async def main():
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(r) for r in requests)), TIMEOUT)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def by_index(outs):
    seqs: dict[int, dict] = {}
    for o in outs:
        s = seqs.setdefault(o.index, {"ids": [], "text": "", "final": None})
        s["ids"] += o.token_ids
        s["text"] += o.text
        if o.finished:
            assert s["final"] is None, "two final outputs for one sequence"
            s["final"] = o
    return seqs


def req(prompt_ids, **params):
    return GenerationRequest(prompt_token_ids=list(prompt_ids), sampling=SamplingParams(**params))


@torch.no_grad()
def hf_greedy(model, prompt_ids, n):
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_matches_transformers_generate(make_engine, tiny_model, tiny_tokenizer, prompt_ids):
    n = 12
    expected = hf_greedy(tiny_model, prompt_ids, n)
    assert len(set(expected)) > 1  # not a degenerate model
    [outs] = run(make_engine(eos=set()), req(prompt_ids, temperature=0.0, max_tokens=n))
    seq = by_index(outs)[0]
    assert seq["ids"] == expected
    assert seq["final"].finish_reason == FinishReason.LENGTH
    assert seq["final"].num_generated_tokens == n and seq["final"].num_prompt_tokens == len(prompt_ids)
    assert seq["text"] == tiny_tokenizer.decode(expected)


def test_n2_gives_two_finished_sequences(make_engine, prompt_ids):
    [outs] = run(make_engine(eos=set()), req(prompt_ids, temperature=1.0, seed=3, n=2, max_tokens=6))
    seqs = by_index(outs)
    assert sorted(seqs) == [0, 1]
    for s in seqs.values():
        assert s["final"] is not None and s["final"].finish_reason == FinishReason.LENGTH
        assert len(s["ids"]) == 6
    assert seqs[0]["ids"] != seqs[1]["ids"]  # seed + index: different draws per sequence


def test_same_seed_same_tokens(make_engine, prompt_ids):
    params = dict(temperature=1.0, seed=1234, max_tokens=10)
    [a] = run(make_engine(eos=set()), req(prompt_ids, **params))
    [b] = run(make_engine(eos=set()), req(prompt_ids, **params))
    [c] = run(make_engine(eos=set()), req(prompt_ids, **{**params, "seed": 99}))
    ids = by_index(a)[0]["ids"]
    assert ids == by_index(b)[0]["ids"] and len(ids) == 10
    assert ids != by_index(c)[0]["ids"]


def test_max_tokens_respected_and_eos_stops(make_engine, tiny_model, prompt_ids):
    [outs] = run(make_engine(eos=set()), req(prompt_ids, temperature=0.0, max_tokens=3))
    assert len(by_index(outs)[0]["ids"]) == 3
    # make the 2nd greedy token the eos: generation stops there with reason "stop"
    second = hf_greedy(tiny_model, prompt_ids, 2)[1]
    [outs] = run(make_engine(eos={second}), req(prompt_ids, temperature=0.0, max_tokens=10))
    seq = by_index(outs)[0]
    assert len(seq["ids"]) == 2 and seq["final"].finish_reason == FinishReason.STOP


def test_context_limit(make_engine, prompt_ids):
    limit = len(prompt_ids) + 4
    [outs] = run(make_engine(max_model_len=limit, eos=set()), req(prompt_ids, temperature=0.0, max_tokens=100))
    seq = by_index(outs)[0]
    assert len(seq["ids"]) == 4 and seq["final"].finish_reason == FinishReason.LENGTH
    engine = make_engine(max_model_len=len(prompt_ids))
    with pytest.raises(RequestTooLarge):
        run(engine, req(prompt_ids, max_tokens=1))


def test_abort_mid_generation_leaves_the_engine_idle(make_engine, prompt_ids):
    engine = make_engine(eos=set())

    async def main():
        got = []
        r = req(prompt_ids, temperature=1.0, max_tokens=200)
        async for out in engine.generate(r):
            got.append(out)
            if len(got) == 2:
                break
        deadline = time.monotonic() + 10
        while engine._active is not None or engine._waiting:
            assert time.monotonic() < deadline, "engine still busy after the consumer went away"
            await asyncio.sleep(0.01)
        steps = engine.num_steps
        await asyncio.sleep(0.1)
        assert engine.num_steps == steps  # no more forwards for the aborted request
        assert engine.stats()["num_requests_running"] == 0.0
        assert not engine._streams
        # the engine still serves the next request
        outs = [o async for o in engine.generate(req(prompt_ids, temperature=0.0, max_tokens=3))]
        await engine.shutdown()
        return got, steps, outs

    got, steps, outs = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert len(got) == 2 and steps < 200
    assert outs[-1].finished and outs[-1].num_generated_tokens == 3


class ForceAndBan:
    """Forces `forced` right after the first token; bans `banned` at every step."""

    def __init__(self, forced, banned):
        self.forced, self.banned = list(forced), list(banned)
        self.seen = []

    def rewrite(self, token_id, num_generated):
        return [token_id]

    def on_token(self, token_id, num_generated):
        self.seen.append((token_id, num_generated))
        return list(self.forced) if num_generated == 1 else []

    def banned_tokens(self, num_generated):
        return self.banned


def test_token_controller_forces_and_bans(make_engine, tiny_model, tiny_tokenizer, prompt_ids):
    free = hf_greedy(tiny_model, prompt_ids, 8)
    banned = list(dict.fromkeys(free))[:3]  # tokens greedy decoding would pick, the first one included
    forced = [t for t in tiny_tokenizer.encode("zq") if t not in banned]
    assert len(forced) == 2 and free[1:3] != forced
    controllers = []

    def factory():
        controllers.append(ForceAndBan(forced, banned))
        return controllers[-1]

    r = req(prompt_ids, temperature=0.0, max_tokens=8, n=2)
    r.controller_factory = factory
    [outs] = run(make_engine(eos=set()), r)
    seqs = by_index(outs)
    assert len(controllers) == 2 and controllers[0] is not controllers[1]  # one per sequence
    for s in seqs.values():
        ids = s["ids"]
        assert len(ids) == 8
        assert ids[1:1 + len(forced)] == forced  # forced tokens follow the first one
        assert not set(ids) & set(banned)
    assert [g for _, g in controllers[0].seen] == list(range(1, 8))  # called after every token but the last


def test_forced_tokens_report_their_own_logprobs(make_engine, tiny_model, tiny_tokenizer, prompt_ids):
    forced = tiny_tokenizer.encode("zq")
    r = req(prompt_ids, temperature=0.0, max_tokens=5, logprobs=True, top_logprobs=2)
    r.controller_factory = lambda: ForceAndBan(forced, [])
    [outs] = run(make_engine(eos=set()), r)
    ids = [t for o in outs for t in o.token_ids]
    lps = [lp for o in outs for lp in o.logprobs]
    assert ids[1:3] == forced
    assert [lp.token_id for lp in lps] == ids  # a forced token's entry names the forced token
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt_ids + ids])).logits[0].float()
    ref = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)  # the distribution each token was drawn from
    for k, (tok, lp) in enumerate(zip(ids, lps)):
        assert lp.logprob == pytest.approx(float(ref[k, tok]), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[k].topk(2).indices.tolist()


class Rewriter(ForceAndBan):
    """Replaces the 2nd sampled token by `replacement` (first accepted now, the rest forced next)."""

    def __init__(self, replacement):
        super().__init__([], [])
        self.replacement = list(replacement)

    def rewrite(self, token_id, num_generated):
        return list(self.replacement) if num_generated == 1 else [token_id]


def test_token_controller_rewrite(make_engine, tiny_model, tiny_tokenizer, prompt_ids):
    free = hf_greedy(tiny_model, prompt_ids, 2)
    replacement = tiny_tokenizer.encode("zq")
    assert free[1] != replacement[0]
    r = req(prompt_ids, temperature=0.0, max_tokens=5, logprobs=True)
    r.controller_factory = lambda: Rewriter(replacement)
    [outs] = run(make_engine(eos=set()), r)
    ids = [t for o in outs for t in o.token_ids]
    assert ids[0] == free[0] and ids[1:3] == replacement and len(ids) == 5
    assert [lp.token_id for o in outs for lp in o.logprobs] == ids
