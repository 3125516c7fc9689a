"""Per-layer cost of each linear kernel scheme on SmolLM2-135M's shapes, at decode batch sizes.

    .venv/bin/python bench/int8_schemes.py [--batches 1,8,32] [--reps 15]

Candidates: fp32 (nn.Linear), fp16 weights (fbgemm `linear_dynamic_fp16`: half the bytes, no
activation rounding), and every int8 scheme of service/modeling/int8_linear.py that is exact on
this CPU's kernel (a8w8 only where it does not saturate). Calls alternate between candidates so
machine noise hits all alike; median per call. Run it again with FBGEMM_ENABLE_INSTRUCTIONS=AVX2
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 to see the AVX2 kernels on a newer CPU.
Prints one JSON line; writes bench/results/int8_schemes.md (--out-name to keep several runs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_json, write_markdown  # noqa: E402
from service.modeling.int8_linear import Int8Linear, Int8Scheme, kernel_saturates  # noqa: E402

# SmolLM2-135M: fused qkv, o, fused gate_up, down (x30 layers), lm_head (x1)
SHAPES = {"qkv": (576, 960), "o_proj": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
          "lm_head": (576, 49152)}
PER_STEP = {"qkv": 30, "o_proj": 30, "gate_up": 30, "down": 30, "lm_head": 1}


class Fp16Linear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.packed = torch.ops.quantized.linear_prepack_fp16(lin.weight.detach(), None)

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


def candidates(lin: nn.Linear) -> dict[str, nn.Module]:
    out = {"fp32": lin, "fp16w": Fp16Linear(lin)}
    for s in Int8Scheme:
        if not (s.needs_exact_kernel and kernel_saturates()):
            out[s.value] = Int8Linear(lin, scheme=s)
    return out


@torch.inference_mode()
def time_shape(k: int, n: int, batch: int, reps: int) -> dict[str, float]:
    lin = nn.Linear(k, n, bias=False)
    mods = candidates(lin)
    x = torch.randn(batch, k)
    ts = {name: [] for name in mods}
    for m in mods.values():
        m(x), m(x)  # warm-up discarded
    for _ in range(reps):
        for name, m in mods.items():
            t = time.perf_counter()
            m(x)
            ts[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(v) for name, v in ts.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-name", default="int8_schemes", help="results file name (e.g. int8_schemes_avx2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results, rows = {}, []
    for b in (int(x) for x in args.batches.split(",")):
        step = {}
        for name, (k, n) in SHAPES.items():
            ms = time_shape(k, n, b, args.reps)
            results[f"{name}_b{b}"] = {c: round(v, 4) for c, v in ms.items()}
            for c, v in ms.items():
                step[c] = step.get(c, 0.0) + v * PER_STEP[name]
            best = min(ms, key=ms.get)
            rows.append([b, name, *(f"{ms[c]:.3f}" for c in ms), best])
        results[f"step_b{b}"] = {c: round(v, 2) for c, v in step.items()}
        rows.append([b, "**all linears of a step**", *(f"**{step[c]:.1f}**" for c in step),
                     min(step, key=step.get)])
    names = list(results[next(iter(results))])
    write_markdown(args.out_name, "Linear kernels per layer shape (ms per call, median; step = all 211 linears)",
                   ["batch", "layer", *names, "fastest"], rows,
                   "fp16w: fp16 weights via fbgemm; a8w8: 8-bit activations (only where the kernel is exact); "
                   "a7w8: 7-bit activations; a7w8r: 7-bit plus the residual pass (two rows per token).")
    print_json({"bench": "int8_schemes", "results": results})


if __name__ == "__main__":
    main()
