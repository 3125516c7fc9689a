"""The native engine's greedy tokens equal transformers' greedy tokens on the same weights.

Tiny random Llama (GQA, untied, llama3 RoPE scaling) and Qwen2 (q/k/v biases, tied) models are built
from configs, saved and loaded back through our loader. SmolLM2 runs only when FRONTIER_TEST_MODEL_DIR
points at its converted directory (marked slow).
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from service.engine.config import EngineConfig
from service.engine.loading import load_native_engine
from service.engine.types import EngineOverloaded, GenerationRequest, RequestTooLarge, SamplingParams
from service.modeling.loader import load_model

VOCAB = 256
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _save_tiny(arch: str, path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
    else:
        cfg = Qwen2Config(**common, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random init gives near-uniform logits: sharpen them to avoid greedy ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w1", unk_token="w0").save_pretrained(path)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp(request.param)
    _save_tiny(request.param, path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def make_engine(path, **kw):
    kw.setdefault("kv_cache_bytes", 4 << 20)
    kw.setdefault("block_size", 4)  # small blocks: short prompts still span several blocks
    kw.setdefault("max_num_batched_tokens", 32)  # small budget: prompts are chunked
    return load_native_engine(path, "cpu", torch.float32, EngineConfig(max_model_len=512, max_waiting=64, **kw))


def generate(engine, reqs: list[GenerationRequest]) -> list[tuple[dict[int, list[int]], dict[int, dict]]]:
    """Generate all requests concurrently, then shut the engine down. Per request: ({sequence index:
    generated token ids}, {sequence index: its final report})."""

    async def one(req):
        toks: dict[int, list[int]] = {}
        reports: dict[int, dict] = {}
        async for out in engine.generate(req):
            toks.setdefault(out.index, []).extend(out.token_ids)
            if out.finished:
                reports[out.index] = out.report or {}
        return toks, reports

    async def all_():
        try:
            return await asyncio.gather(*(one(r) for r in reqs))
        finally:
            await engine.shutdown()

    return asyncio.run(all_())


def run(engine, reqs: list[GenerationRequest]) -> list[dict[int, list[int]]]:
    """Per request, {sequence index: generated token ids}."""
    return [toks for toks, _ in generate(engine, reqs)]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        return hf.generate(ids, generation_config=gc, attention_mask=torch.ones_like(ids))[0, len(prompt):].tolist()


def prompts(k: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


def test_logits_match_transformers(tiny):
    path, hf = tiny
    model = load_model(path)
    ids = torch.tensor(prompts(1)[0] + prompts(1, seed=2)[0])
    with torch.inference_mode():
        ours = model.compute_logits(model(ids, torch.arange(len(ids))))
        ref = hf(ids[None]).logits[0]
    assert (ours - ref).abs().max().item() < 1e-3


def test_paged_decode_logits_match_transformers(tiny):
    """Teacher-forced decode through the paged runner, one token at a time after a chunked prefill."""
    from service.engine.kv_cache import BlockManager
    from service.engine.runner import ModelRunner
    from service.engine.scheduler import ScheduledSeq, Sequence

    path, hf = tiny
    ids = prompts(1, seed=3)[0] + prompts(1, seed=4)[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    runner, bm = ModelRunner(load_model(path), 64, 4), BlockManager(64, 4)
    seq = Sequence("r", 0, ids[:7], 7)
    bm.allocate(seq)
    _, logits = runner.run([ScheduledSeq(seq, 3, 0)])  # a chunk that does not sample
    assert logits.shape[0] == 0
    for pos in range(7, len(ids)):
        start = 3 if pos == 7 else pos - 1
        _, logits = runner.run([ScheduledSeq(seq, pos - start, start)])
        assert (logits[0] - ref[pos - 1]).abs().max().item() < 1e-3
        seq.token_ids.append(ids[pos])
        bm.append(seq)


def test_greedy_matches_hf_alone_and_batched(tiny):
    path, hf = tiny
    ps = prompts(16)
    n = 12
    expected = [hf_greedy(hf, p, n) for p in ps]
    alone = run(make_engine(path), [GenerationRequest(ps[0], SamplingParams(max_tokens=n, **GREEDY))])
    assert alone[0][0] == expected[0]
    batched = run(make_engine(path), [GenerationRequest(p, SamplingParams(max_tokens=n, **GREEDY)) for p in ps])
    assert [b[0] for b in batched] == expected


def test_preemption_keeps_greedy_output(tiny):
    path, hf = tiny
    ps = prompts(6, seed=5)
    engine = make_engine(path, kv_cache_bytes=40 * 2 * 2 * 4 * 2 * 16 * 4)  # 40 blocks of 4 tokens
    out = run(engine, [GenerationRequest(p, SamplingParams(max_tokens=20, **GREEDY)) for p in ps])
    assert engine.stats()["num_preemptions_total"] > 0
    assert [o[0] for o in out] == [hf_greedy(hf, p, 20) for p in ps]


def test_seeded_sampling_same_alone_and_batched(tiny):
    path, _ = tiny
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=123, ignore_eos=True)
    target = prompts(1, seed=7)[0]
    alone = run(make_engine(path), [GenerationRequest(target, sp)])[0]
    others = [GenerationRequest(p, SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)) for p in prompts(15)]
    batched = run(make_engine(path), others[:7] + [GenerationRequest(target, sp)] + others[7:])[7]
    assert alone == batched


def test_n_sequences_share_prompt_blocks(tiny):
    path, hf = tiny
    p = prompts(1, seed=8)[0] + prompts(1, seed=9)[0]
    engine = make_engine(path)
    out = run(engine, [GenerationRequest(p, SamplingParams(max_tokens=8, n=3, **GREEDY))])[0]
    assert out[0] == out[1] == out[2] == hf_greedy(hf, p, 8)
    assert engine.stats()["prefix_cache_hits_total"] >= 2 * ((len(p) - 1) // 4) * 4


class Controller:
    """Bans token `ban` for the first sample, forces [5, 6] after the first token."""

    def __init__(self, ban: int):
        self.ban = ban

    def on_token(self, token_id, num_generated):
        return [5, 6] if num_generated == 1 else []

    def banned_tokens(self, num_generated):
        return [self.ban] if num_generated == 0 else []


def test_token_controllers_force_and_ban(tiny):
    path, hf = tiny
    p = prompts(1, seed=10)[0]
    greedy_first = hf_greedy(hf, p, 1)[0]
    req = GenerationRequest(p, SamplingParams(max_tokens=6, **GREEDY), controller_factory=lambda: Controller(greedy_first))
    toks = run(make_engine(path), [req])[0][0]
    assert toks[0] != greedy_first and toks[1:3] == [5, 6] and len(toks) == 6


def test_abort_frees_blocks(tiny):
    path, _ = tiny
    engine = make_engine(path)

    async def go():
        req = GenerationRequest(prompts(1)[0], SamplingParams(max_tokens=400, **GREEDY))
        got = 0
        async for out in engine.generate(req):
            got += len(out.token_ids)
            if got >= 3:
                break  # consumer goes away: the engine aborts the request
        for _ in range(200):
            await asyncio.sleep(0.01)
            if engine.stats()["kv_cache_usage_perc"] == 0.0 and not engine.scheduler.has_work():
                break
        await engine.shutdown()

    asyncio.run(go())
    assert engine.block_manager.num_used_blocks == 0


def test_admission_limits(tiny):
    path, _ = tiny
    small = make_engine(path, kv_cache_bytes=8 * 2 * 2 * 4 * 2 * 16 * 4)  # 8 blocks = 32 tokens
    assert small.max_model_len == 32
    with pytest.raises(RequestTooLarge, match="KV cache holds 32 tokens"):
        small._validate(GenerationRequest(list(range(3, 40))))
    busy = load_native_engine(path, "cpu", torch.float32,
                              EngineConfig(max_model_len=512, max_waiting=1, kv_cache_bytes=1 << 20))
    busy._inbox.put(("add", GenerationRequest([3])))
    with pytest.raises(EngineOverloaded):
        busy._validate(GenerationRequest([3]))
