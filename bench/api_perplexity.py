"""Perplexity through the API: /v1/completions with echo + logprobs and max_tokens 0, per precision.

    .venv/bin/python bench/api_perplexity.py [fp32 int8 bf16 ...] [--num-docs 20] [--tokens 512]

For each precision (fp32 = FRONTIER_QUANTIZATION=none, int8, bf16) a server is started (bench/common.py
Server), the first --num-docs docs of bench/data/eval.jsonl are cut to --tokens tokens and sent as
token-id prompts (echo, logprobs 0, max_tokens 0, temperature 0: what lm-evaluation-harness
loglikelihood requests look like), and perplexity = exp(mean NLL of tokens 2..T) over all docs, the
same definition as bench/perplexity.py. As a baseline in the same script, transformers' fp32 forward
over the same ids (--no-reference skips it). Prints one JSON line; writes bench/results/api_perplexity.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, Server, print_json, write_markdown  # noqa: E402

QUANTIZATION = {"fp32": "none", "none": "none", "int8": "int8", "bf16": "bf16"}


def load_ids(tokenizer, num_docs: int, num_tokens: int) -> list[list[int]]:
    rows = [json.loads(line)["text"] for line in (ROOT / "bench/data/eval.jsonl").read_text().splitlines()]
    ids = [tokenizer(t)["input_ids"][:num_tokens] for t in rows[:num_docs]]
    assert len(ids) == num_docs and all(len(i) == num_tokens for i in ids), "corpus too small for these sizes"
    return ids


def score(base_url: str, model: str, ids: list[int]) -> list[float]:
    """The logprobs of tokens 2..T of one prompt, through the API."""
    body = {"model": model, "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0, "temperature": 0}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    lps = choice["logprobs"]["token_logprobs"]
    assert choice["finish_reason"] == "length" and len(lps) == len(ids) and lps[0] is None, choice
    return lps[1:]


def api_nll(precision: str, model: str, docs: list[list[int]], concurrency: int) -> dict:
    env = {"FRONTIER_QUANTIZATION": QUANTIZATION[precision], "FRONTIER_MODELS": json.dumps([model]),
           "FRONTIER_DEFAULT_CHAT_MODEL": model, "FRONTIER_DATA_DIR": tempfile.mkdtemp(prefix="api_ppl_")}
    t_start = time.perf_counter()
    with Server(env, log_name=f"api_perplexity_{precision}") as srv:
        t_ready = time.perf_counter()
        score(srv.base_url, model, docs[0][:16])  # warm-up, discarded
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            per_doc = list(pool.map(lambda d: score(srv.base_url, model, d), docs))
        seconds = time.perf_counter() - t0
    return {"per_doc": per_doc, "seconds": seconds, "startup_s": t_ready - t_start}


def reference_nll(model_dir: Path, docs: list[list[int]]) -> list[list[float]]:
    """transformers fp32, whole sequences at once: the baseline the fp32 API numbers must match."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for ids in docs:
            x = torch.tensor([ids])
            lp = torch.log_softmax(hf(x).logits[0, :-1].float(), -1)
            out.append(lp.gather(1, x[0, 1:, None]).squeeze(1).tolist())
    return out


def ppl(per_doc: list[list[float]]) -> float:
    flat = [v for doc in per_doc for v in doc]
    return math.exp(-sum(flat) / len(flat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("precisions", nargs="*", default=["fp32", "int8"], choices=sorted(QUANTIZATION))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--num-docs", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight (the engine batches them)")
    ap.add_argument("--no-reference", action="store_true", help="skip the in-process transformers fp32 baseline")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from service.config import Settings

    model_dir = Settings().models_dir / args.model
    docs = load_ids(AutoTokenizer.from_pretrained(model_dir), args.num_docs, args.tokens)
    results: dict[str, dict] = {}
    per_doc_fp32 = None
    if not args.no_reference:
        t0 = time.perf_counter()
        ref = reference_nll(model_dir, docs)
        results["transformers fp32 (in-process)"] = {"ppl": ppl(ref), "seconds": time.perf_counter() - t0}
        per_doc_fp32 = ref
    for precision in args.precisions:
        run = api_nll(precision, args.model, docs, args.concurrency)
        row = {"ppl": ppl(run["per_doc"]), "seconds": run["seconds"], "startup_s": run["startup_s"],
               "tokens_per_s": len(docs) * args.tokens / run["seconds"]}
        if per_doc_fp32 is not None:  # per-token agreement with transformers fp32
            row["max_abs_logprob_diff_vs_transformers"] = max(
                abs(a - b) for got, want in zip(run["per_doc"], per_doc_fp32) for a, b in zip(got, want))
        results[f"api {precision}"] = row
        print(f"api {precision}: ppl {row['ppl']:.3f} ({run['seconds']:.1f}s)", file=sys.stderr)
    report(args, results)


def report(args, results: dict[str, dict]) -> None:
    base = results.get("api fp32", results.get("transformers fp32 (in-process)", {})).get("ppl")
    for row in results.values():
        row["vs_fp32"] = row["ppl"] / base - 1 if base else None
    rounded = {k: {f: (float(f"{v:.5g}") if isinstance(v, float) else v) for f, v in r.items()}
               for k, r in results.items()}
    print_json({"bench": "api_perplexity", "model": args.model, "num_docs": args.num_docs, "tokens": args.tokens,
                "concurrency": args.concurrency, "results": rounded})
    rows = []
    for name, r in results.items():
        diff, vs = r.get("max_abs_logprob_diff_vs_transformers"), r["vs_fp32"]
        rows.append([name, f"{r['ppl']:.3f}", f"{100 * vs:+.2f}%" if vs is not None else "-",
                     f"{diff:.2e}" if diff is not None else "-", f"{r['seconds']:.1f}",
                     f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"])
    header = ["run", "ppl", "vs fp32", "max abs logprob diff vs transformers fp32", "seconds", "prompt tokens/s"]
    notes = (f"First {args.num_docs} docs of bench/data/eval.jsonl x {args.tokens} tokens, sent as token-id prompts, "
             f"{args.concurrency} requests in flight; ppl over tokens 2..{args.tokens} of every doc. Rows 'api *': "
             "a live server per precision (FRONTIER_QUANTIZATION); the transformers row: the in-process fp32 "
             "baseline on the same ids (its seconds include loading the model). Shared machine: times are indicative.")
    write_markdown("api_perplexity", f"{args.model} perplexity through the API (echo + logprobs, max_tokens 0)",
                   header, rows, notes=notes)

if __name__ == "__main__":
    main()
