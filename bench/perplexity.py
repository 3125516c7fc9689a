"""Perplexity and decode-step speed of SmolLM2-135M-Instruct: fp32 vs int8 variants vs bf16.

    .venv/bin/python bench/perplexity.py [--model-dir DIR] [--num-docs 20] [--decode-tokens 128]

Eval: bench/data/eval.jsonl (20 docs x 512 tokens), whole sequences at once ("prefill"). A subset of
configs is also run token by token with a KV cache over the first --decode-tokens tokens, all docs
batched per step (as the engine batches decodes), next to prefill ppl over the same tokens.
Calibration (smoothing): bench/data/calib.jsonl, other packages than the eval text.
Prints one JSON line; writes bench/results/perplexity.md.
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from service.modeling.calibration import calibration_batches  # noqa: E402
from service.modeling.int8_linear import Int8Scheme, kernel_saturates  # noqa: E402
from service.modeling.quant import (Int8Linear, collect_act_amax, llama_smooth_groups,  # noqa: E402
                                    quantize_model, smooth_model, swap_linears)

DATA, RESULTS = ROOT / "bench" / "data", ROOT / "bench" / "results"
DECODE_CONFIGS = ("fp32", "int8 per-tensor (naive)", "int8 per-channel + per-token",
                  "int8 per-token + lm_head int8", "int8 per-token + smooth a=0.65",
                  *(f"serving int8 {s.value} (packaged calibration + int8 lm_head)" for s in Int8Scheme))


def load_ids(tok, path: Path, n_docs: int, n_tokens: int) -> torch.Tensor:
    rows = [json.loads(l)["text"] for l in path.read_text().splitlines()][:n_docs]
    ids = [tok(t)["input_ids"][:n_tokens] for t in rows]
    assert all(len(i) == n_tokens for i in ids), "corpus doc shorter than n_tokens"
    return torch.tensor(ids)  # [n_docs, n_tokens]


@torch.inference_mode()
def nll_prefill(model, ids: torch.Tensor, bs: int = 2) -> torch.Tensor:
    out = []
    for i in range(0, ids.shape[0], bs):
        x = ids[i : i + bs]
        logits = model(x).logits[:, :-1].float()  # [b, T-1, V]
        out.append(F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none"))
    return torch.cat(out)  # [n_docs, T-1] per-token NLL


@torch.inference_mode()
def nll_decode(model, ids: torch.Tensor, n_tokens: int) -> torch.Tensor:
    from transformers import DynamicCache
    cache, out = DynamicCache(config=model.config), []
    for t in range(n_tokens - 1):  # one token per sequence per step, all docs batched
        logits = model(ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1].float()
        out.append(F.cross_entropy(logits, ids[:, t + 1], reduction="none"))
    return torch.stack(out, 1)  # [n_docs, n_tokens-1]


def ppl(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())


def int8(model, lm_head=False, **kw):
    swap_linears(model, lambda lin: Int8Linear(lin, **kw), skip=() if lm_head else ("lm_head",))
    return model


class NativeLogits(torch.nn.Module):
    """The native model (the engine's own load path) behind HF's `model(ids).logits` interface."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids):  # ids: [B, T]
        from types import SimpleNamespace
        return SimpleNamespace(logits=torch.stack([self.m.compute_logits(self.m(row)) for row in ids]))


def native_serving(model_dir: str, tok, kernels: str, scheme: str = "auto"):
    """What the native engine loads for quantization int8: cpu_kernels.prepare_for_cpu."""
    from service.modeling.cpu_kernels import prepare_for_cpu
    from service.modeling.loader import load_model

    def make(_hf_model):
        m = load_model(model_dir, max_positions=2048)
        chosen = prepare_for_cpu(m, tok, 2048, scheme, kernels)
        print(f"native kernels: {chosen['linears']} ({chosen['int8_scheme']})", file=sys.stderr)
        return NativeLogits(m)
    return make


def build_configs(stats, head_stats, tok, model_dir):
    schemes = [s for s in Int8Scheme if not (s.needs_exact_kernel and kernel_saturates())]

    def serving(scheme):
        return lambda m: quantize_model(m, "int8", calibration_batches(tok), lm_head=True, scheme=scheme)

    def smoothed(alpha, **kw):
        def f(m):
            smooth_model(m, None, alpha, act_amax=stats)
            return int8(m, **kw)
        return f

    def smoothed_head(alpha):
        def f(m):
            groups = llama_smooth_groups(m, lm_head=True)
            smooth_model(m, None, alpha, groups=groups, act_amax=stats + head_stats)
            return int8(m, lm_head=True)
        return f
    return {
        "fp32": lambda m: m,
        "int8 per-tensor (naive)": lambda m: int8(m, per_channel=False, per_token=False),
        "int8 per-channel": lambda m: int8(m, per_token=False),
        "int8 per-channel + per-token": lambda m: int8(m),
        "int8 per-token + lm_head int8": lambda m: int8(m, lm_head=True),
        "int8 per-token + smooth a=0.5": smoothed(0.5),
        "int8 per-token + smooth a=0.65": smoothed(0.65),
        "int8 per-token + smooth a=0.8": smoothed(0.8),
        "int8 smooth a=0.65 + lm_head int8": smoothed(0.65, lm_head=True),
        "int8 smooth a=0.65 + smoothed int8 lm_head": smoothed_head(0.65),
        # what the native engine does at load: calibrated on the text shipped in the package,
        # in each int8 scheme the engine can select (int8_linear.py); a8w8 only where exact
        **{f"serving int8 {s.value} (packaged calibration + int8 lm_head)": serving(s) for s in schemes},
        "int8 smooth a=0.65, a7w8": smoothed(0.65, scheme="a7w8"),
        # the native engine's load path: fp16 weights everywhere, and the per-shape choice by measurement
        "native serving: all fp16 weights": native_serving(model_dir, tok, "fp16"),
        "native serving: kernels chosen by measurement (auto)": native_serving(model_dir, tok, "auto"),
        "bf16": lambda m: m.to(torch.bfloat16),
    }


def paired_times(fns: dict, reps: int) -> dict:
    """Median seconds per fn; calls alternate so load from other work hits both sides alike."""
    for fn in fns.values():
        fn(), fn()  # warm-up discarded
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


@torch.inference_mode()
def time_decode_step(fp_model, q_model, batches=(1, 32), reps=7) -> dict:
    """Per decode step: (a) the decoder's linear layers only, (b) whole model on one token."""
    res = {}
    models = {"fp32": fp_model, "int8": q_model}
    lins = {k: [mod for n, mod in m.named_modules()
                if isinstance(mod, (nn.Linear, Int8Linear)) and "lm_head" not in n]
            for k, m in models.items()}
    for b in batches:
        xs = [torch.randn(b, mod.in_features) for mod in lins["fp32"]]
        ids = torch.randint(0, 1000, (b, 1))
        fns = {}
        for k in models:
            fns[f"linears_b{b}_{k}_ms"] = lambda k=k: [m(x) for m, x in zip(lins[k], xs)]
            fns[f"model_b{b}_{k}_ms"] = lambda k=k: models[k](ids)
        res.update({k: 1e3 * v for k, v in paired_times(fns, reps).items()})
        for kind in ("linears", "model"):
            res[f"{kind}_b{b}_speedup"] = res[f"{kind}_b{b}_fp32_ms"] / res[f"{kind}_b{b}_int8_ms"]
    return {k: round(v, 2) for k, v in res.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=os.environ.get("FRONTIER_BENCH_MODEL", "/tmp/smol_st"))
    ap.add_argument("--num-docs", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--calib-docs", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=128, help="0 disables the decode check")
    ap.add_argument("--configs", default="", help="comma-separated subset of config names")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    ids = load_ids(tok, DATA / "eval.jsonl", args.num_docs, args.tokens)
    calib = load_ids(tok, DATA / "calib.jsonl", args.calib_docs, args.tokens)
    # Activation statistics do not depend on alpha: calibrate once on the fp32 model.
    with torch.inference_mode():
        stats = collect_act_amax(base, llama_smooth_groups(base), calib.split(4))
        untied = copy.deepcopy(base)  # the lm_head group unties the head from the embedding
        head_stats = collect_act_amax(untied, llama_smooth_groups(untied, lm_head=True)[-1:], calib.split(4))
        del untied
    configs = build_configs(stats, head_stats, tok, args.model_dir)
    if args.configs:
        configs = {k: v for k, v in configs.items() if k in args.configs.split(",")}
    rows, timing, T = {}, {}, args.decode_tokens
    for name, make in configs.items():
        t0 = time.perf_counter()
        model = make(copy.deepcopy(base))
        nll = nll_prefill(model, ids)
        row = {"ppl": ppl(nll), "ppl_first_T": ppl(nll[:, : T - 1]) if T else None}
        if T and name in DECODE_CONFIGS:
            row["decode_ppl_first_T"] = ppl(nll_decode(model, ids, T))
        if name == "int8 per-token + smooth a=0.65":
            timing = time_decode_step(base, model)
        rows[name] = {k: (round(v, 3) if v is not None else None) for k, v in row.items()}
        print(f"{name}: {rows[name]} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        del model
    write_report(rows, timing, args)


def write_report(rows, timing, args):
    fp = rows.get("fp32", {})
    pct = lambda v, ref: f"{100 * (v / ref - 1):+.1f}%" if v and ref else "-"
    T = args.decode_tokens
    from bench.common import machine, machine_line

    lines = [f"# SmolLM2-135M-Instruct perplexity: fp32 vs int8 vs bf16", "", machine_line(), "",
             f"{args.num_docs} held-out docs x {args.tokens} tokens (bench/data/eval.jsonl), "
             f"calibration on {args.calib_docs} other docs (calib.jsonl); lm_head stays fp32 in "
             f"every int8 row unless the row says otherwise. Decode = token by token with a KV cache over the first {T} tokens, "
             f"all docs batched per step; compare it with prefill over the same {T} tokens.", "",
             f"| config | ppl (prefill, {args.tokens}) | vs fp32 | ppl (prefill, first {T}) "
             f"| ppl (decode, first {T}) | decode vs fp32 decode |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        dec = r.get("decode_ppl_first_T")
        lines.append(f"| {name} | {r['ppl']:.3f} | {pct(r['ppl'], fp.get('ppl'))} | "
                     f"{r['ppl_first_T'] or '-'} | {dec or '-'} | "
                     f"{pct(dec, fp.get('decode_ppl_first_T'))} |")
    if timing:
        lines += ["", "Decode-step time (median of 7, fp32/int8 calls interleaved, 2 threads, shared machine; ratios matter), "
                  "int8 = per-token + smooth a=0.65:", "",
                  "| batch | what | fp32 ms | int8 ms | speedup |", "|---|---|---|---|---|"]
        for b in (1, 32):
            for kind, label in (("linears", "decoder linears only"),
                                ("model", "whole model, 1 token, no cache")):
                lines.append(f"| {b} | {label} | {timing[f'{kind}_b{b}_fp32_ms']} | "
                             f"{timing[f'{kind}_b{b}_int8_ms']} | {timing[f'{kind}_b{b}_speedup']}x |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "perplexity.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"bench": "perplexity", "model": Path(args.model_dir).name, "machine": machine(),
                      "num_docs": args.num_docs, "tokens": args.tokens, "results": rows,
                      "timing": timing}))


if __name__ == "__main__":
    main()
