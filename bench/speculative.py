"""Speculative decoding (n-gram prompt lookup, a draft model) against plain decoding, over the OpenAI API.

One server; three prompt sets (bench/data/speculative_prompts.yaml): extractive (sources in the
prompt, an answer that quotes them), code edit (a ~40-line function returned with a small change),
open chat (short open questions). Each set runs with `speculative: {"method": "off"}`,
`{"method": "ngram", "num_tokens": k}` and `{"method": "draft", "model": <--draft>, "num_tokens": k}`
(--methods) at each concurrency level, greedy (temperature 0), requests = max(prompts, streams)
with the prompts cycled. Before a set is measured its prompts run once for 8 tokens with each method
(discarded), so that all find the prompts in the prefix cache and run warm (and the draft is
loaded); then the methods alternate `--repeats` times and the median run (by tok/s) is kept.

Reported per set / method / streams: tok/s (completion tokens / wall time), method/off, acceptance
(accepted / draft tokens, from usage.completion_tokens_details.{accepted,rejected}_prediction_tokens),
accepted tokens per draft (deltas of frontier_spec_decode_num_accepted_tokens_total /
frontier_spec_decode_num_drafts_total in /metrics; tokens per verify step = 1 + that) and how many
greedy texts differ from the same request without speculation.

    .venv/bin/python bench/speculative.py [--methods off,ngram,draft] [--draft smollm2-135m-draft] [--num-tokens 4]
        [--draft-tokens 2]
        [--max-tokens 128] [--streams 1,8] [--repeats 3]
    .venv/bin/python bench/speculative.py --max-tokens 32 --streams 1 --limit 2 --repeats 1   # smoke run

FRONTIER_* variables in the environment reach the server (FRONTIER_DEVICE, FRONTIER_QUANTIZATION...).
Prints one JSON line; writes bench/results/speculative.md (--out-name to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Server, print_json, write_markdown  # noqa: E402

PROMPTS = Path(__file__).resolve().parent / "data" / "speculative_prompts.yaml"
SETS = ("extractive", "code_edit", "open_chat")
DRAFTS, ACCEPTED = "frontier_spec_decode_num_drafts_total", "frontier_spec_decode_num_accepted_tokens_total"


def load_sets(limit: int | None) -> dict[str, list[str]]:
    data = yaml.safe_load(PROMPTS.read_text())
    return {name: data[name][:limit] if limit else data[name] for name in SETS}


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, spec: dict,
                      max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "seed": 0, "speculative": spec}
    try:
        r = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        return {"error": repr(exc)}
    if r.status_code != 200:
        return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
    out = r.json()
    details = out["usage"].get("completion_tokens_details") or {}
    return {"text": out["choices"][0]["message"]["content"], "tokens": out["usage"]["completion_tokens"],
            "accepted": details.get("accepted_prediction_tokens", 0),
            "rejected": details.get("rejected_prediction_tokens", 0)}


async def batch(base_url: str, model: str, prompts: list[str], spec: dict, streams: int,
                max_tokens: int) -> tuple[list[dict], float]:
    """max(len(prompts), streams) requests, `streams` at a time; results in request order."""
    url = f"{base_url}/v1/chat/completions"
    todo = list(range(max(len(prompts), streams)))
    results: dict[int, dict] = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(900)) as client:
        async def worker():
            while todo:
                i = todo.pop(0)
                results[i] = await one_request(client, url, model, prompts[i % len(prompts)], spec, max_tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        wall = time.perf_counter() - t0
    return [results[i] for i in sorted(results)], wall


def counters(base_url: str, model: str) -> dict[str, float]:
    """The two speculative counters of this model in /metrics (0 when the engine has none)."""
    values = {DRAFTS: 0.0, ACCEPTED: 0.0}
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        name, _, rest = line.partition("{")
        if name in values and f'model="{model}"' in rest.split("}")[0]:
            values[name] = float(rest.rsplit(" ", 1)[1])
    return values


def measure(base_url: str, model: str, name: str, prompts: list[str], method: str, spec: dict, streams: int,
            max_tokens: int) -> dict:
    before = counters(base_url, model)
    results, wall = asyncio.run(batch(base_url, model, prompts, spec, streams, max_tokens))
    after = counters(base_url, model)
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    accepted, rejected = sum(r["accepted"] for r in ok), sum(r["rejected"] for r in ok)
    drafts = after[DRAFTS] - before[DRAFTS]
    point = {"set": name, "method": method, "streams": streams, "requests": len(results),
             "errors": len(results) - len(ok), "completion_tokens": tokens, "wall_s": wall,
             "tok_s": tokens / wall if wall else 0.0, "accepted_tokens": accepted, "draft_tokens": accepted + rejected,
             "acceptance_rate": accepted / (accepted + rejected) if accepted + rejected else None,
             "num_drafts": drafts,
             "accepted_per_draft": (after[ACCEPTED] - before[ACCEPTED]) / drafts if drafts else None,
             "texts": [r.get("text") for r in results]}
    for r in results:
        if "error" in r:
            print(f"{name}/{method}/{streams}: {r['error']}", file=sys.stderr)
    return point


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(points: list[dict]) -> list[list]:
    base = {(p["set"], p["streams"]): p for p in points if p["method"] == "off"}
    rows = []
    for p in points:
        off = base[(p["set"], p["streams"])]
        ratio = p["tok_s"] / off["tok_s"] if p["method"] != "off" and off["tok_s"] else None
        mismatches = sum(a != b for a, b in zip(p["texts"], off["texts"])) if p["method"] != "off" else None
        rows.append([p["set"], p["method"], p["streams"], p["requests"], p["errors"], p["completion_tokens"],
                     f"{p['tok_s']:.1f}", fmt(ratio, ".2f", "x"), fmt(p["acceptance_rate"], ".0%"),
                     fmt(p["accepted_per_draft"], ".2f"), "-" if mismatches is None else mismatches])
        p["vs_off"], p["mismatches_vs_off"] = ratio, mismatches
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--num-tokens", type=int, default=4, help="k of ngram: most tokens proposed per step")
    ap.add_argument("--draft-tokens", type=int, default=2, help="k of draft (each proposed token costs a draft step)")
    ap.add_argument("--methods", default="off,ngram,draft", help="off is always measured (the baseline)")
    ap.add_argument("--draft", default="smollm2-135m-draft", help="the draft model of method draft")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--streams", default="1,8", help="concurrency levels (a smoke run: --streams 1)")
    ap.add_argument("--sets", default=",".join(SETS), help="prompt sets to run")
    ap.add_argument("--limit", type=int, default=None, help="at most this many prompts per set (smoke runs)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per set/method/streams (the median is kept)")
    ap.add_argument("--out-name", default="speculative")
    args = ap.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    sets = {k: v for k, v in load_sets(args.limit).items() if k in args.sets.split(",")}
    k = args.num_tokens
    known = {"off": {"method": "off"}, "ngram": {"method": "ngram", "num_tokens": k},
             "draft": {"method": "draft", "model": args.draft, "num_tokens": args.draft_tokens}}
    methods = {m: known[m] for m in ["off", *(x for x in args.methods.split(",") if x != "off")]}
    points = []
    with Server({"FRONTIER_MODELS": json.dumps([args.model])}, log_name="speculative") as srv:
        for name, prompts in sets.items():
            for spec in methods.values():  # warm-up, discarded: the prompts' prefix cache, both decode paths
                asyncio.run(batch(srv.base_url, args.model, prompts, spec, 1, 8))
            for streams in levels:
                runs = {m: [] for m in methods}
                for _ in range(args.repeats):  # the methods alternate: drift on a shared machine hits all
                    for method, spec in methods.items():
                        p = measure(srv.base_url, args.model, name, prompts, method, spec, streams, args.max_tokens)
                        runs[method].append(p)
                        print(json.dumps({k: v for k, v in p.items() if k != "texts"}), file=sys.stderr)
                for method, ps in runs.items():  # the median run by tok/s
                    points.append(sorted(ps, key=lambda p: p["tok_s"])[len(ps) // 2])
    rows = table(points)
    write_markdown(args.out_name, f"Speculative decoding: {', '.join(m for m in methods if m != 'off')} "
                   f"(k={k}, draft k={args.draft_tokens}) vs off",
                   ["set", "method", "streams", "requests", "errors", "completion tokens", "tok/s", "vs off",
                    "acceptance", "accepted/draft", "texts differing from off"], rows,
                   f"{args.model} (draft: {args.draft}), one server, temperature 0, max_tokens {args.max_tokens}, median of {args.repeats} "
                   "alternating runs, prompts per set: "
                   f"{', '.join(f'{k} {len(v)}' for k, v in sets.items())} (requests = max(prompts, streams)). "
                   "tok/s = completion tokens / wall time of the batch; acceptance = accepted / draft tokens "
                   "(usage); accepted/draft = accepted tokens per draft from /metrics (a verify step emits "
                   "1 + that). Shared machine: read the ratios.")
    print_json({"bench": "speculative", "model": args.model, "draft": args.draft, "num_tokens": k,
                "draft_tokens": args.draft_tokens,
                "max_tokens": args.max_tokens, "streams": levels, "repeats": args.repeats,
                "points": [{k: v for k, v in p.items() if k != "texts"} for p in points]})


if __name__ == "__main__":
    main()
