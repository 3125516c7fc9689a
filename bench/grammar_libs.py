"""Which constrained-decoding library: llguidance vs xgrammar on the default model's tokenizer.

For each JSON Schema: compile time (cold), and the per-token cost of computing the allowed-token
mask while walking a valid instance's tokens (the work a decode step adds per constrained row),
plus the cost of applying a batch's mask to the logits. Prints one JSON line; writes
bench/results/grammar_libs.md. Either library may be missing: its rows are skipped.

    .venv/bin/python bench/grammar_libs.py [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_json, write_markdown  # noqa: E402

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}, {"name": "Ada Lovelace", "age": 36}),
    "nested": ({"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0},
                                                  "tags": {"type": "array", "items": {"type": "string"}}},
                 "required": ["id", "tags"]},
        "status": {"enum": ["active", "disabled"]}}, "required": ["user", "status"]},
        {"user": {"id": 7, "tags": ["admin", "ops", "night shift"]}, "status": "active"}),
    "anyof": ({"type": "object", "properties": {"value": {"anyOf": [{"type": "number"}, {"type": "string"}]},
                                                 "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
               "required": ["value", "code"]}, {"value": 3.25, "code": "ABC-123"}),
    "json_object": (None, {"answer": "Paris", "confidence": 0.9, "sources": [1, 2]}),
}


def walk(tokens, make, fill, consume) -> list[float]:
    """Per-token mask times along a valid instance."""
    times = []
    state = make()
    for t in tokens:
        t0 = time.perf_counter()
        fill(state)
        times.append(time.perf_counter() - t0)
        consume(state, t)
    return times


def bench_llguidance(tokenizer, vocab):
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt
    tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    mask = llt.allocate_token_bitmask(1, vocab)
    rows = {}
    for name, (schema, instance) in SCHEMAS.items():
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"}, defaults={"whitespace_flexible": False})
        llguidance.LLMatcher(tok, grammar)  # the matcher builds its lexer lazily: part of the cost
        compile_s = time.perf_counter() - t0
        ids = tokenizer.encode(json.dumps(instance, separators=(",", ":")), add_special_tokens=False)
        times = walk(ids, lambda: llguidance.LLMatcher(tok, grammar),
                     lambda s: llt.fill_next_token_bitmask(s, mask, 0), lambda s, t: s.consume_token(t))
        rows[name] = (compile_s, times)
    return rows, llt.apply_token_bitmask_inplace


def bench_xgrammar(tokenizer, vocab):
    import xgrammar as xgr
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    mask = xgr.allocate_token_bitmask(1, vocab)
    rows = {}
    for name, (schema, instance) in SCHEMAS.items():
        t0 = time.perf_counter()
        cg = (compiler.compile_json_schema(json.dumps(schema), any_whitespace=False) if schema is not None
              else compiler.compile_builtin_json_grammar())
        compile_s = time.perf_counter() - t0
        ids = tokenizer.encode(json.dumps(instance, separators=(",", ":")), add_special_tokens=False)
        times = walk(ids, lambda: xgr.GrammarMatcher(cg), lambda s: s.fill_next_token_bitmask(mask, 0),
                     lambda s, t: s.accept_token(t))
        rows[name] = (compile_s, times)
    return rows, xgr.apply_token_bitmask_inplace


def apply_cost(apply, vocab, batch=8, reps=50) -> float:
    logits = torch.randn(batch, vocab)
    mask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32)
    apply(logits, mask)  # warm-up (a compiled kernel compiles on first use)
    t0 = time.perf_counter()
    for _ in range(reps):
        apply(logits, mask)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache/frontier/models/smollm2-135m-instruct"))
    args = ap.parse_args()
    from transformers import AutoTokenizer
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    vocab = len(tokenizer)
    results, table = {}, []
    for lib, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            rows, apply = fn(tokenizer, vocab)
        except ImportError:
            continue
        apply_ms = apply_cost(apply, vocab) * 1e3
        for name, (compile_s, times) in rows.items():
            p50, mx = statistics.median(times) * 1e3, max(times) * 1e3
            results[f"{lib}/{name}"] = {"compile_ms": round(compile_s * 1e3, 1), "mask_p50_ms": round(p50, 3),
                                        "mask_max_ms": round(mx, 3)}
            table.append([lib, name, f"{compile_s * 1e3:.1f}", f"{p50:.3f}", f"{mx:.3f}", f"{apply_ms:.3f}"])
    print_json({"bench": "grammar_libs", "vocab": vocab, "results": results})
    write_markdown("grammar_libs", "Constrained decoding libraries on the SmolLM2 tokenizer",
                   ["library", "schema", "compile ms", "mask p50 ms/token", "mask max ms", "apply ms (batch 8)"], table)


if __name__ == "__main__":
    main()
