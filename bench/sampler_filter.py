"""Cost of drawing sampled tokens per step: full-vocabulary sort vs the top-256 candidate path.

    .venv/bin/python bench/sampler_filter.py

Rows use SmolLM2's chat defaults (temperature 0.2, top_p 0.9) on logits shaped like its vocabulary
(49,152). Logits are random with a spread like a chat model's; where the candidate path is taken it
gives the same filter as the sort (tests/unit/test_sampler.py). Both columns include the draw. Writes bench/results/sampler_filter.md.
"""

from __future__ import annotations

import time

import torch

from common import print_json, write_markdown
from service.engine.sampler import PREFILTER_K, SamplingRow, _filter, _race, _sample_rows
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
        full = timed(lambda: _race(_filter(logits, sampling).softmax(dim=-1), sampling))
        fast = timed(lambda: _sample_rows(logits, sampling))
        results.append({"batch": batch, "full_sort_ms": round(full, 2), "candidates_ms": round(fast, 2),
                        "speedup": round(full / fast, 1)})
        rows.append([batch, f"{full:.2f}", f"{fast:.2f}", f"{full / fast:.1f}x"])
    write_markdown("sampler_filter", "Sampled draw per step (temperature 0.2, top_p 0.9, 49,152 tokens)",
                   ["rows", "full sort ms", f"top-{PREFILTER_K} candidates ms", "speedup"], rows,
                   "2 threads, shared machine.")
    print_json({"bench": "sampler_filter", "results": results})


if __name__ == "__main__":
    main()
