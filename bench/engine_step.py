"""NativeEngine throughput without HTTP, next to transformers generate() in the same process.

    .venv/bin/python bench/engine_step.py --model-dir /tmp/smol_st [--quant int8] [--batches 1,8,32]

B concurrent requests (random 32-token prompts, fixed seed, greedy, ignore_eos) each generate
--max-tokens tokens; tok/s = B * max_tokens / wall time (prefill included, warm-up discarded).
The HF baseline uses fewer tokens (--hf-tokens) to stay short. Prints one JSON line and writes a
Markdown table to bench/results/engine_step.md. Ratios matter more than absolute numbers here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, machine_line  # noqa: E402
from service.engine.fresh_thread import run_in_fresh_thread
from service.engine.config import EngineConfig
from service.engine.loading import load_native_engine
from service.engine.types import GenerationRequest, SamplingParams

PROMPT_LEN = 32


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, PROMPT_LEN), generator=g).tolist()


async def run_native(engine, prompts, max_tokens: int) -> dict:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    first: list[float] = []

    async def one(p):
        n, t0 = 0, time.perf_counter()
        async for out in engine.generate(GenerationRequest(p, sp)):
            if n == 0:
                first.append(time.perf_counter() - t0)
            n += len(out.token_ids)
        return n

    steps0, t0 = engine.num_steps, time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    steps = engine.num_steps - steps0
    return {"engine": "native", "batch": len(prompts), "tokens": sum(counts), "seconds": round(wall, 3),
            "tok_s": round(sum(counts) / wall, 1), "ms_per_step": round(1000 * wall / max(steps, 1), 1),
            "ttft_s_max": round(max(first), 3)}


def run_hf(hf, prompts, max_tokens: int) -> dict:
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        hf.generate(ids[:, :8], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0))
        t0 = time.perf_counter()
        out = hf.generate(ids, generation_config=gc, attention_mask=torch.ones_like(ids))
        wall = time.perf_counter() - t0
    n = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"engine": "hf", "batch": len(prompts), "tokens": n, "seconds": round(wall, 3),
            "tok_s": round(n / wall, 1), "ms_per_step": round(1000 * wall / max_tokens, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=os.environ.get("FRONTIER_TEST_MODEL_DIR", "/tmp/smol_st"))
    ap.add_argument("--quant", default=None, help="quantization mode for the native model (e.g. int8)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--hf-tokens", type=int, default=32)
    ap.add_argument("--hf-batches", default="1,8")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--int8-scheme", default="auto", help="auto | a8w8 | a7w8r (service/modeling/int8_linear.py)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_step.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # Loaded in a thread that ends, as the server does: a live second OpenMP pool (the main
    # thread's) would slow the engine worker's kernels (bench/omp_pools.py).
    engine = asyncio.run(run_in_fresh_thread(
        load_native_engine, args.model_dir, "cpu", torch.float32,
        EngineConfig(max_model_len=2048, max_waiting=256, kv_cache_bytes=512 << 20,
                     quantization=args.quant or "none", int8_scheme=args.int8_scheme)))
    kernels = engine.kernels
    vocab = engine.model.config.vocab_size
    batches = [int(b) for b in args.batches.split(",") if b]
    results = []

    async def native_all():
        await run_native(engine, make_prompts(2, vocab, seed=99), 8)  # warm-up
        for b in batches:
            results.append(await run_native(engine, make_prompts(b, vocab), args.max_tokens))
        await engine.shutdown()

    asyncio.run(native_all())
    del engine

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    hf_batches = [int(b) for b in args.hf_batches.split(",") if b]
    hf_results = [run_hf(hf, make_prompts(b, vocab), args.hf_tokens) for b in hf_batches]

    hf_by_batch = {r["batch"]: r["tok_s"] for r in hf_results}
    for r in results:
        if r["batch"] in hf_by_batch:
            r["vs_hf"] = round(r["tok_s"] / hf_by_batch[r["batch"]], 2)
    line = {"bench": "engine_step", "model": Path(args.model_dir).name, "quant": args.quant or "fp32",
            "threads": args.threads, "max_tokens": args.max_tokens, "hf_tokens": args.hf_tokens,
            "native": results, "hf": hf_results, "machine": machine(), "kernels": kernels}
    print(json.dumps(line))

    rows = ["| engine | quant | batch | tokens | seconds | tok/s | ms/step | vs HF |", "|---|---|---|---|---|---|---|---|"]
    for r in results + hf_results:
        q = (args.quant or "fp32") if r["engine"] == "native" else "fp32"
        rows.append(f"| {r['engine']} | {q} | {r['batch']} | {r['tokens']} | {r['seconds']} | {r['tok_s']} "
                    f"| {r['ms_per_step']} | {r.get('vs_hf', '')} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# engine_step: {Path(args.model_dir).name}, {args.threads} threads, "
              f"{PROMPT_LEN}-token prompts, native {args.max_tokens} / HF {args.hf_tokens} new tokens\n\n"
              f"{machine_line()} Native kernels: {kernels}.\n\n")
    out.write_text(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
