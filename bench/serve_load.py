"""OpenAI-compatible streaming load generator: the native engine and the transformers backend
side by side in one run, at several concurrency levels, fixed prompts, ignore_eos for fixed lengths.

    .venv/bin/python bench/serve_load.py [--levels 1,8,32] [--max-tokens 128]

Prints one JSON line; writes bench/results/serve_load.md and serve_load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, Server, print_json, write_markdown  # noqa: E402

PROMPTS = [
    "Explain how a refrigerator works.", "Write a short story about a lighthouse keeper.",
    "List the steps to bake bread.", "Describe the city of Paris.", "What is machine learning?",
    "Give advice for a job interview.", "Summarize the history of the bicycle.", "How do plants grow?",
]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# Sampling fields of every request: greedy by default; --sampled leaves them to the model's defaults.
REQUEST_SAMPLING: dict = {"temperature": 0}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, **REQUEST_SAMPLING,
            "logit_bias": {"2": -100},  # <|im_end|>: peers without ignore_eos still run to max_tokens
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return {"error": repr(exc)}
    end = time.perf_counter()
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    tokens = tokens or len(stamps)  # a peer without streamed usage: one content chunk per token
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "itl": itl, "e2e": end - t0, "tokens": tokens}


async def level(base_url: str, concurrency: int, num_requests: int, max_tokens: int) -> dict:
    url = f"{base_url}/v1/chat/completions"
    queue = list(range(num_requests))
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(900)) as client:
        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(client, url, PROMPTS[i % len(PROMPTS)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    itl = [x for r in ok for x in r["itl"]]
    return {
        "concurrency": concurrency, "requests": num_requests, "errors": len(results) - len(ok),
        "output_tok_s": sum(r["tokens"] for r in ok) / wall, "wall_s": wall,
        "ttft_p50_ms": 1e3 * pct([r["ttft"] for r in ok], 0.5), "ttft_p95_ms": 1e3 * pct([r["ttft"] for r in ok], 0.95),
        "itl_p50_ms": 1e3 * pct(itl, 0.5), "itl_p95_ms": 1e3 * pct(itl, 0.95),
        "e2e_p50_s": pct([r["e2e"] for r in ok], 0.5), "e2e_p95_s": pct([r["e2e"] for r in ok], 0.95),
    }


def run_engine(name: str, env: dict, levels: list[int], max_tokens: int, waves: int,
               cmd: list[str] | None = None) -> list[dict]:
    with Server(env, log_name=f"serve_load_{name}", cmd=cmd, ready_path="/v1/models" if cmd else "/ready") as srv:
        asyncio.run(level(srv.base_url, 2, 2, 8))  # warm-up, discarded
        points = []
        for c in levels:
            p = asyncio.run(level(srv.base_url, c, c * waves, max_tokens))
            p["engine"] = name
            points.append(p)
            print(json.dumps(p), file=sys.stderr)
        return points


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in sorted({p["engine"] for p in points}):
        ps = [p for p in points if p["engine"] == engine]
        ax.plot([p["concurrency"] for p in ps], [p["output_tok_s"] for p in ps], marker="o", label=engine)
    ax.set(xlabel="concurrent streams", ylabel="aggregate output tokens/s", xscale="log",
           title="SmolLM2-135M, 2 CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--waves", type=int, default=1, help="requests per level = concurrency x waves")
    ap.add_argument("--engines", default="native-int8,native-fp32,hf",
                    help="any of native-int8 (kernels chosen by measurement), native-int8-only, native-fp16w, "
                         "native-fp32, hf, llamacpp (llama.cpp's server on the Q4_1 GGUF)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the llama.cpp peer")
    ap.add_argument("--out-name", default="", help="results name (default serve_load / serve_load_sampled)")
    ap.add_argument("--sampled", action="store_true",
                    help="no temperature in the requests: the manifest's sampling defaults apply "
                         "(SmolLM2: temperature 0.2, top_p 0.9); results go to serve_load_sampled.*")
    args = ap.parse_args()
    global REQUEST_SAMPLING
    out_name = args.out_name or ("serve_load_sampled" if args.sampled else "serve_load")
    if args.sampled:
        REQUEST_SAMPLING = {}
    levels = [int(x) for x in args.levels.split(",")]
    configs = {"native-int8": {"FRONTIER_ENGINE": "native", "FRONTIER_QUANTIZATION": "int8"},  # kernels: auto
               "native-int8-only": {"FRONTIER_ENGINE": "native", "FRONTIER_QUANTIZATION": "int8",
                                    "FRONTIER_CPU_KERNELS": "int8"},
               "native-fp16w": {"FRONTIER_ENGINE": "native", "FRONTIER_QUANTIZATION": "int8",
                                "FRONTIER_CPU_KERNELS": "fp16"},
               "native-fp32": {"FRONTIER_ENGINE": "native", "FRONTIER_QUANTIZATION": "none"},
               "hf": {"FRONTIER_ENGINE": "hf", "FRONTIER_QUANTIZATION": "none"}}
    points = []
    for name in args.engines.split(","):
        if name == "llamacpp":  # the peer: same prompts, same client, same run
            from bench.llamacpp_peer import peer_command

            points += run_engine(name, {}, levels, args.max_tokens, args.waves, cmd=peer_command(args.threads))
            continue
        points += run_engine(name, {**configs[name], "FRONTIER_MODELS": '["smollm2-135m-instruct"]'},
                             levels, args.max_tokens, args.waves)
    def baseline(engine):
        return {p["concurrency"]: p["output_tok_s"] for p in points if p["engine"] == engine}

    hf, peer = baseline("hf"), baseline("llamacpp")
    rows = []
    for p in points:
        c = p["concurrency"]
        ratio = f"{p['output_tok_s'] / hf[c]:.1f}x" if hf.get(c) else "-"
        vs_peer = f"{p['output_tok_s'] / peer[c]:.2f}x" if peer.get(c) else "-"
        rows.append([p["engine"], c, p["requests"], p["errors"], f"{p['output_tok_s']:.1f}",
                     ratio, vs_peer, f"{p['ttft_p50_ms']:.0f}", f"{p['ttft_p95_ms']:.0f}", f"{p['itl_p50_ms']:.0f}",
                     f"{p['itl_p95_ms']:.0f}", f"{p['e2e_p50_s']:.2f}", f"{p['e2e_p95_s']:.2f}"])
    write_markdown(out_name, f"Streaming load: {args.max_tokens} output tokens per request (ignore_eos)",
                   ["engine", "streams", "requests", "errors", "output tok/s", "vs hf", "vs llama.cpp", "TTFT p50 ms",
                    "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms", "e2e p50 s", "e2e p95 s"], rows,
                   f"One server per engine, same prompts, {'model default sampling' if args.sampled else 'temperature 0'}; "
                   "2 shared CPU cores, so read the ratios.")
    plot(points, RESULTS / f"{out_name}.png")
    print_json({"bench": "serve_load", "max_tokens": args.max_tokens, "points": points})


if __name__ == "__main__":
    main()
