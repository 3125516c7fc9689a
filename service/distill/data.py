"""Distillation data: shipped prompts, the teacher's own answers, and its final hidden states.

Why the teacher's own answers: a draft is only ever asked to continue text the target wrote, so
it should learn the target's distribution on the target's outputs, not on some corpus. Greedy
answers are what temperature-0 requests verify against; sampled ones (temperature 0.7) widen the
coverage to the prefixes sampled requests produce.

Why final hidden states instead of logits: the student shares the teacher's (tied, frozen)
embeddings, so teacher logits are `hidden @ E^T`, recomputed per batch from 576 floats a token
rather than stored as 49152.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS = Path(__file__).with_name("prompts.txt")
HELD_OUT_EVERY = 8  # prompt index % 8 == 7 is held out for evaluation


@dataclass
class Example:
    prompt: list[int]  # the rendered chat prompt's token ids
    response: list[int]  # the teacher's answer (its end-of-turn token included when it stopped)
    temperature: float

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.response


def load_prompts(path: Path | None = None) -> list[str]:
    """One user message per line; "\\n" is a newline; blank lines and "#" comments are skipped."""
    lines = Path(path or PROMPTS).read_text(encoding="utf-8").splitlines()
    return [line.replace("\\n", "\n") for line in lines if line.strip() and not line.startswith("#")]


def split(prompts: list[str]) -> tuple[list[str], list[str]]:
    """(train, held out): a fixed interleaved split, so both sides cover every prompt category."""
    held = [p for i, p in enumerate(prompts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [p for i, p in enumerate(prompts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


def render(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids exactly as the server renders a one-message chat (service/serving/chat.py)."""
    from service.serving.chat import render_chat

    return [tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": p}], "teacher"),
                             add_special_tokens=False) for p in prompts]


def generate(model_dir: Path, jobs: list[tuple[list[int], float]], max_tokens: int, seed: int = 0,
             quantization: str = "int8", kernel_cache: Path | None = None,
             max_num_seqs: int = 128) -> list[Example]:
    """The teacher's answers to (prompt ids, temperature) jobs through the project's native engine
    (continuous batching, int8 on CPU: several times faster than a loop over transformers), all
    submitted at once. Sampling is seeded per job; batched numerics follow the batch's composition,
    so a rerun can differ in a few tokens (the CLI's --cache keeps one run's data)."""
    from service.engine.config import EngineConfig
    from service.engine.fresh_thread import run_in_fresh_thread
    from service.engine.kv_cache import kv_bytes_per_block
    from service.engine.loading import load_native_engine
    from service.engine.types import GenerationRequest, SamplingParams
    from service.modeling.loader import read_config

    longest = max(len(p) for p, _ in jobs) + max_tokens
    # A KV pool that holds every running sequence at full length: preemption (recomputing evicted
    # sequences) would cost more than the memory.
    mc = read_config(model_dir)
    kv_bytes = kv_bytes_per_block(mc.num_layers, 1, mc.num_kv_heads, mc.head_dim, torch.float32) * (longest + 32) \
        * max_num_seqs
    config = EngineConfig(max_model_len=longest, max_waiting=len(jobs) + 1, kv_cache_bytes=kv_bytes,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=512, quantization=quantization,
                          kernel_cache=kernel_cache)

    async def run() -> list[Example]:
        # Loaded in a thread that ends, as the server does (service/engine/fresh_thread.py).
        engine = await run_in_fresh_thread(load_native_engine, model_dir, "cpu", torch.float32, config)

        async def one(i: int, prompt: list[int], temperature: float) -> Example:
            sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
            tokens: list[int] = []
            async for out in engine.generate(GenerationRequest(prompt, sp)):
                if out.error:
                    raise RuntimeError(f"teacher generation failed: {out.error}")
                tokens += out.token_ids
            return Example(prompt, tokens, temperature)

        try:
            return list(await asyncio.gather(*(one(i, p, t) for i, (p, t) in enumerate(jobs))))
        finally:
            await engine.shutdown()

    return asyncio.run(run())


@torch.inference_mode()
def teacher_hidden(model_dir: Path, examples: list[Example]) -> list[torch.Tensor]:
    """The fp32 teacher's final (normed) hidden states at every position, one [T, H] each."""
    from service.modeling.loader import load_model

    longest = max(len(e.ids) for e in examples)
    model = load_model(model_dir, max_positions=longest)
    return [model(torch.tensor(e.ids)) for e in examples]
