"""Cost of the top-k/top-p/min-p filter per step: full-vocabulary sort vs the top-256 prefilter.

    .venv/bin/python bench/sampler_filter.py

Rows use SmolLM2's chat defaults (temperature 0.2, top_p 0.9) on logits shaped like its vocabulary
(49,152). Logits are random with a spread like a chat model's; both paths give the same filter
(tests/unit/test_sampler.py). Writes bench/results/sampler_filter.md.
"""

from __future__ import annotations

import time

import torch

from common import print_json, write_markdown
from service.engine.sampler import PREFILTER_K, SamplingRow, _filter
from service.engine.types import SamplingParams

VOCAB = 49_152


def timed(fn, reps: int = 10) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    results, rows = [], []
    for batch in (1, 8, 32):
        logits = torch.randn(batch, VOCAB) * 3
        sampling = [SamplingRow(SamplingParams(temperature=0.2, top_p=0.9), None, [], [], []) for _ in range(batch)]
        full = timed(lambda: _filter(logits, sampling, prefilter_k=0))
        fast = timed(lambda: _filter(logits, sampling, prefilter_k=PREFILTER_K))
        results.append({"batch": batch, "full_sort_ms": round(full, 2), "prefilter_ms": round(fast, 2),
                        "speedup": round(full / fast, 1)})
        rows.append([batch, f"{full:.2f}", f"{fast:.2f}", f"{full / fast:.1f}x"])
    write_markdown("sampler_filter", "Sampling filter per step (temperature 0.2, top_p 0.9, 49,152 tokens)",
                   ["rows", "full sort ms", f"top-{PREFILTER_K} prefilter ms", "speedup"], rows,
                   "2 threads, shared machine.")
    print_json({"bench": "sampler_filter", "results": results})


if __name__ == "__main__":
    main()
