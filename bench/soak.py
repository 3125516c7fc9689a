"""Soak test: mixed traffic against a real server on loopback for N minutes, bounded concurrency.

Traffic (weighted, seeded): chat, streamed chat, streams cancelled mid-way, RAG ingest (upserts over a
bounded id space, so the collection stops growing) and search, embeddings, and bad input (invalid
JSON, out-of-range parameters, lone surrogates, a body past the size limit). Every request has a
client deadline; one that passes it, or a connection error, counts as unanswered.

Reported: status counts per kind, unanswered requests, 5xx, streams without a final event, the
server's RSS after warm-up and at the end, KV blocks still in use and requests still running or
waiting once traffic stopped (all should be 0), and the server's exit code after SIGTERM (the
graceful stop: 0). One JSON line (bench.common.print_json) and bench/results/soak.md.

    .venv/bin/python bench/soak.py --minutes 20            # the full run
    .venv/bin/python bench/soak.py --minutes 2 --concurrency 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Server, print_json, write_markdown  # noqa: E402

COLLECTION = "soak"
TIMEOUT_S = 180.0  # per request: past it, a request counts as unanswered
WORDS = ("lighthouse keeper storm harbor lantern ship rope tide cliff gull signal night fog bell map "
         "engine kernel cache token batch stream queue index vector search query answer source").split()


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def metric(text: str, name: str) -> float | None:
    """Sum of a gauge over its label sets (one chat model here)."""
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)]
    return sum(values) if values else None


class Soak:
    def __init__(self, base: str, seed: int, stream_tokens: int):
        self.base = base
        self.rng = random.Random(seed)
        self.stream_tokens = stream_tokens
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.unanswered: Counter = Counter()
        self.no_final_event = 0
        self.rss_samples: list[float | None] = []  # the server's RSS (MB) every 30 s of the run

    def text(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    # ---- one request of each kind: returns the status (or raises httpx errors) ----
    async def chat(self, c: httpx.AsyncClient) -> int:
        r = await c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"Say something about the {self.text(3)}."}],
            "max_tokens": self.rng.randint(4, 32), "temperature": self.rng.choice([0, 0.7])})
        return r.status_code

    async def stream(self, c: httpx.AsyncClient, cancel: bool = False) -> int:
        body = {"messages": [{"role": "user", "content": f"Tell a story about the {self.text(4)}."}],
                "max_tokens": self.stream_tokens, "stream": True, "temperature": 0.7,
                "stream_options": {"include_usage": True}}
        stop_after = self.rng.randint(2, 8) if cancel else None
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if stop_after is not None and len(events) >= stop_after:
                        return 200  # leaving the block closes the connection mid-stream
            if len(events) < 2 or events[-1] != "[DONE]" or '"error"' in events[-2]:
                self.no_final_event += 1
            return r.status_code

    async def ingest(self, c: httpx.AsyncClient) -> int:
        docs = [{"id": f"doc-{i}", "text": f"# {self.text(2)}\n\n{self.text(60)}.\n\n{self.text(40)}.",
                 "metadata": {"n": self.rng.randrange(10), "tag": self.rng.choice(WORDS)}}
                for i in self.rng.sample(range(200), self.rng.randint(1, 4))]  # distinct ids: a repeat is a 400
        r = await c.post(f"/v1/rag/collections/{COLLECTION}/documents", json={"documents": docs, "upsert": True})
        return r.status_code

    async def search(self, c: httpx.AsyncClient) -> int:
        body = {"query": self.text(4), "top_k": self.rng.randint(1, 8),
                "mode": self.rng.choice(["hybrid", "dense", "keyword"])}
        if self.rng.random() < 0.3:
            body["filter"] = {"n": {"$lt": self.rng.randrange(10)}}
        r = await c.post(f"/v1/rag/collections/{COLLECTION}/search", json=body)
        return r.status_code

    async def embed(self, c: httpx.AsyncClient) -> int:
        r = await c.post("/v1/embeddings", json={"input": [self.text(12) for _ in range(self.rng.randint(1, 8))]})
        return r.status_code

    async def bad(self, c: httpx.AsyncClient) -> int:
        kind = self.rng.randrange(6)
        headers = {"content-type": "application/json"}
        if kind == 0:
            r = await c.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"',
                             headers=headers)
        elif kind == 1:
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2**70})
        elif kind == 2:
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "top_k": 2**64, "n": 10**6, "temperature": -5})
        elif kind == 3:  # a lone surrogate, as JSON escapes it
            r = await c.post("/v1/chat/completions", headers=headers,
                             content=b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}')
        elif kind == 4:
            r = await c.post(f"/v1/rag/collections/{COLLECTION}/search",
                             json={"query": "x", "filter": {"$or": [{"n": {"$regex": 1}}]}})
        else:  # past FRONTIER_MAX_REQUEST_BYTES (set small below)
            r = await c.post("/v1/embeddings", content=b'{"input": "' + b"a" * 300_000 + b'"}', headers=headers)
        return r.status_code

    # ---- the run ----
    async def one(self, c: httpx.AsyncClient, kind: str) -> None:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                if kind == "stream":
                    status = await self.stream(c)
                elif kind == "stream_cancelled":
                    status = await self.stream(c, cancel=True)
                else:
                    status = await getattr(self, kind)(c)
        except (httpx.HTTPError, TimeoutError) as exc:
            self.unanswered[kind] += 1
            self.status[kind][type(exc).__name__] += 1
            return
        self.status[kind][str(status)] += 1
        self.latency[kind].append(time.monotonic() - t0)

    async def run(self, minutes: float, concurrency: int, mix: dict[str, float], pid: int) -> float:
        """Traffic until the deadline; the server's RSS sampled every 30 s meanwhile (self.rss_samples)."""
        kinds, weights = list(mix), list(mix.values())
        deadline = time.monotonic() + minutes * 60

        async def sample():
            while True:
                self.rss_samples.append(rss_mb(pid))
                await asyncio.sleep(30)
        limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)

        async def worker():
            async with httpx.AsyncClient(base_url=self.base, timeout=TIMEOUT_S, limits=limits) as c:
                while time.monotonic() < deadline:
                    await self.one(c, self.rng.choices(kinds, weights)[0])

        t0 = time.monotonic()
        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        sampler.cancel()
        return time.monotonic() - t0


async def warm_up(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        r = await c.post("/v1/rag/collections", json={"name": COLLECTION, "chunk_size": 64})
        assert r.status_code in (200, 409), r.text
        s = Soak(base, 0, 16)
        for kind in ("chat", "stream", "ingest", "search", "embed"):
            await s.one(c, kind)
        await asyncio.gather(*(s.one(c, "stream") for _ in range(4)))


async def settled(base: str, timeout: float = 30) -> dict:
    """Engine gauges once traffic stopped (waiting for aborts and the last steps to land)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        while True:
            text = (await c.get("/metrics")).text
            out = {k: metric(text, f"frontier_{k}") for k in
                   ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_num_blocks")}
            idle = not (out["num_requests_running"] or out["num_requests_waiting"] or out["kv_cache_usage_perc"])
            if idle or time.monotonic() > deadline:
                return out
            await asyncio.sleep(0.5)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--stream-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    mix = {"chat": 3, "stream": 3, "stream_cancelled": 2, "ingest": 1, "search": 2, "embed": 2, "bad": 2}

    with tempfile.TemporaryDirectory(prefix="frontier-soak-") as data:
        env = {"FRONTIER_DATA_DIR": data, "FRONTIER_MAX_REQUEST_BYTES": str(256 * 1024),
               "FRONTIER_RAG_SAVE_INTERVAL_S": "5", "FRONTIER_SHUTDOWN_DRAIN_S": "10"}
        server = Server(env, log_name="soak")
        with server:
            asyncio.run(warm_up(server.base_url))
            rss_start = rss_mb(server.proc.pid)
            soak = Soak(server.base_url, args.seed, args.stream_tokens)
            elapsed = asyncio.run(soak.run(args.minutes, args.concurrency, mix, server.proc.pid))
            end = asyncio.run(settled(server.base_url))
            rss_end = rss_mb(server.proc.pid)
        exit_code = server.proc.returncode

    total = sum(sum(c.values()) for c in soak.status.values())
    five_xx = sum(n for c in soak.status.values() for s, n in c.items() if s.startswith("5"))
    kv_blocks = None
    if end["kv_cache_usage_perc"] is not None and end["kv_cache_num_blocks"] is not None:
        kv_blocks = round(end["kv_cache_usage_perc"] * end["kv_cache_num_blocks"])
    record = {
        "bench": "soak", "minutes": round(elapsed / 60, 2), "concurrency": args.concurrency, "seed": args.seed,
        "requests": total, "requests_per_s": round(total / elapsed, 2),
        "status": {k: dict(v) for k, v in soak.status.items()},
        "unanswered": sum(soak.unanswered.values()), "server_errors_5xx": five_xx,
        "streams_without_final_event": soak.no_final_event,
        "rss_mb_start": rss_start, "rss_mb_end": rss_end,
        "rss_mb_growth": round(rss_end - rss_start, 1) if rss_start and rss_end else None,
        "rss_mb_every_30s": soak.rss_samples,
        "kv_blocks_in_use_end": kv_blocks, "kv_cache_usage_perc_end": end["kv_cache_usage_perc"],
        "requests_running_end": end["num_requests_running"], "requests_waiting_end": end["num_requests_waiting"],
        "server_exit_code": exit_code,
        "latency_s": {k: {"p50": pct(v, 0.5), "p95": pct(v, 0.95)} for k, v in soak.latency.items()},
    }
    print_json(record)
    rows = [[k, sum(soak.status[k].values()), ", ".join(f"{s}: {n}" for s, n in sorted(soak.status[k].items())),
             soak.unanswered[k], pct(soak.latency[k], 0.5), pct(soak.latency[k], 0.95)] for k in mix]
    notes = (f"{record['minutes']} min at concurrency {args.concurrency} (seed {args.seed}), {total} requests "
             f"({record['requests_per_s']}/s). Unanswered: {record['unanswered']}; 5xx: {five_xx}; streams without a "
             f"final event: {soak.no_final_event}. Server RSS after warm-up {rss_start} MB, at the end {rss_end} MB "
             f"(every 30 s: {', '.join(str(x) for x in soak.rss_samples)}). "
             f"Once traffic stopped: KV blocks in use {kv_blocks}, requests running {end['num_requests_running']}, "
             f"waiting {end['num_requests_waiting']}. Exit code after SIGTERM: {exit_code}. "
             "`bad` mixes invalid JSON, out-of-range parameters, a lone surrogate, an invalid filter and a body "
             "past FRONTIER_MAX_REQUEST_BYTES (256 KiB here): all should be 4xx.")
    path = write_markdown("soak", "Soak: mixed traffic, hostile input included",
                          ["kind", "requests", "status counts", "unanswered", "p50 s", "p95 s"], rows, notes)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
