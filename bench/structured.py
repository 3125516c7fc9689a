"""Structured output: schema-valid rate and throughput with and without constraints, over the API.

The 30 JSON Schemas of bench/data/json_schemas.json are asked through /v1/chat/completions with
`response_format: json_schema` (constrained), then the same prompts without it (unconstrained) with
`max_tokens` set to each constrained answer's length and `ignore_eos`, so both modes generate the
same number of tokens for the same prompts and tok/s compares the decode cost alone. Speculative
decoding is off in both (it would blur the grammar's cost). Each mode runs at 1 and 8 concurrent
streams, `--repeats` times alternating, median taken. Prints one JSON line; writes
bench/results/structured.md.

    .venv/bin/python bench/structured.py [--streams 1,8] [--repeats 2]
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
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Server, print_json, write_markdown  # noqa: E402

SCHEMAS = json.loads((Path(__file__).resolve().parent / "data" / "json_schemas.json").read_text())
MODEL = "smollm2-135m-instruct"


def body(case: dict, constrained: bool, max_tokens: int) -> dict:
    b = {"model": MODEL, "temperature": 0, "max_tokens": max_tokens, "speculative": {"method": "off"},
         "messages": [{"role": "user", "content": f"{case['prompt']} Reply in JSON following this schema: "
                                                  f"{json.dumps(case['schema'])}"}]}
    if constrained:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "out", "schema": case["schema"]}}
    else:
        b["ignore_eos"] = True
    return b


async def run(base_url: str, bodies: list[dict], streams: int) -> tuple[list[dict], float]:
    todo, results = list(range(len(bodies))), {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
        async def worker():
            while todo:
                i = todo.pop(0)
                r = await client.post(f"{base_url}/v1/chat/completions", json=bodies[i])
                results[i] = r.json() if r.status_code == 200 else {"error": r.text[:200]}

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        return [results[i] for i in range(len(bodies))], time.perf_counter() - t0


def valid(case: dict, out: dict) -> bool:
    try:
        jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), case["schema"])
        return True
    except (KeyError, ValueError, jsonschema.ValidationError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=400)
    args = ap.parse_args()
    rows, points = [], []
    with Server({"FRONTIER_MODELS": json.dumps([MODEL])}, log_name="structured") as srv:
        asyncio.run(run(srv.base_url, [body(SCHEMAS[0], True, 32)], 1))  # warm-up (grammar tokenizer, caches)
        for streams in (int(s) for s in args.streams.split(",")):
            rates: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
            valid_n = total = 0
            for rep in range(args.repeats):
                outs, wall = asyncio.run(run(srv.base_url, [body(c, True, args.max_tokens) for c in SCHEMAS], streams))
                lengths = [o["usage"]["completion_tokens"] for o in outs]
                valid_n += sum(valid(c, o) for c, o in zip(SCHEMAS, outs))
                total += len(SCHEMAS)
                free, free_wall = asyncio.run(run(srv.base_url, [body(c, False, n) for c, n in zip(SCHEMAS, lengths)],
                                                  streams))
                assert [o["usage"]["completion_tokens"] for o in free] == lengths
                rates["constrained"].append(sum(lengths) / wall)
                rates["unconstrained"].append(sum(lengths) / free_wall)
            c, u = statistics.median(rates["constrained"]), statistics.median(rates["unconstrained"])
            point = {"streams": streams, "valid_rate": valid_n / total, "constrained_tok_s": round(c, 1),
                     "unconstrained_tok_s": round(u, 1), "ratio": round(c / u, 3)}
            points.append(point)
            rows.append([streams, f"{valid_n}/{total}", f"{c:.1f}", f"{u:.1f}", f"{c / u:.2f}x"])
    print_json({"bench": "structured", "model": MODEL, "points": points})
    write_markdown("structured", "Structured output: validity and throughput (response_format json_schema)",
                   ["streams", "schema-valid (constrained)", "constrained tok/s", "unconstrained tok/s", "ratio"],
                   rows, "Same prompts and token counts in both modes (unconstrained: max_tokens = the constrained "
                         "answer's length, ignore_eos); greedy; speculative decoding off; median of the repeats.")


if __name__ == "__main__":
    main()
