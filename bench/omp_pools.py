"""Small-kernel latency in a worker thread, with and without a second live OpenMP pool.

    .venv/bin/python bench/omp_pools.py

The engine runs its steps in a worker thread. This measures one decode-sized int8 GEMM
([1, 576] x [576, 3072], `torch._int_mm`) and one 32-row fp32 GEMM in a worker thread when
(a) no other thread has run a parallel torch op, and (b) another thread that did is still alive
(what `asyncio.to_thread` model loading left behind). Each case runs in a fresh subprocess, since
libgomp's thread accounting is process-wide. Writes bench/results/omp_pools.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

from common import print_json, write_markdown

CHILD = r"""
import json, sys, threading, time, torch
torch.set_num_threads(2)
x = torch.randint(-127, 127, (1, 576), dtype=torch.int8)
w = torch.randint(-127, 127, (3072, 576), dtype=torch.int8)
xf, wf = torch.randn(32, 576), torch.randn(3072, 576)

def timed(f, n):
    for _ in range(20): f()
    t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e6

release = threading.Event()
def other_pool():
    xf @ wf.t()  # a parallel op: this thread now owns an OpenMP pool
    release.wait()
if sys.argv[1] == "live":
    t = threading.Thread(target=other_pool); t.start(); time.sleep(0.2)
res = {}
def worker():
    res["int8_1row_us"] = timed(lambda: torch._int_mm(x, w.t()), 2000)
    res["fp32_32rows_us"] = timed(lambda: xf @ wf.t(), 300)
t2 = threading.Thread(target=worker); t2.start(); t2.join()
release.set()
print(json.dumps(res))
"""


def run(case: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, case], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    cases = {"one pool (worker only)": run("none"), "second pool alive": run("live")}
    base = cases["one pool (worker only)"]
    rows = [[name, round(r["int8_1row_us"], 1), round(r["fp32_32rows_us"], 1),
             round(r["int8_1row_us"] / base["int8_1row_us"], 2)] for name, r in cases.items()]
    write_markdown("omp_pools", "Kernel latency in a worker thread vs live OpenMP pools (2 threads)",
                   ["case", "int8 1-row GEMM (us)", "fp32 32-row GEMM (us)", "int8 slowdown"], rows)
    print_json({"bench": "omp_pools", **{k: v for k, v in cases.items()}})


if __name__ == "__main__":
    main()
