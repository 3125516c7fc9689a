"""`frontier distill`: teacher answers -> teacher hidden states -> KL training -> the two outputs.

The held-out prompts (service/distill/data.py `split`) are answered by the teacher too but never
trained on; the student is scored on them before training (its teacher-layer initialisation) and
after (the fp16-rounded tensors that ship).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from service.distill import data as D
from service.distill import student as S
from service.distill.train import TrainConfig, evaluate, train

SAMPLED_TEMPERATURE = 0.7
DATA_VERSION = 2  # bump when what prepare() generates changes: older caches are then ignored


@dataclass(frozen=True)
class DistillConfig:
    layers: int = 2
    init: tuple[int, ...] | None = None  # teacher layer indices to start from (default_init)
    max_tokens: int = 160  # longest teacher answer
    prompts: Path | None = None  # default: service/distill/prompts.txt
    quantization: str = "int8"  # the teacher engine that writes the answers
    kernel_cache: Path | None = None  # int8 kernel choices (the server's models_dir/kernels.json)
    train: TrainConfig = field(default_factory=TrainConfig)


def _jobs(prompts: list[list[int]], held_out: bool) -> list[tuple[list[int], float]]:
    """Training prompts get one answer each, greedy and sampled alternating (more prompts for the
    same generation time); held-out prompts a greedy one: agreement with greedy answers is what a
    greedy draft's acceptance rate is."""
    if held_out:
        return [(p, 0.0) for p in prompts]
    return [(p, 0.0 if i % 2 == 0 else SAMPLED_TEMPERATURE) for i, p in enumerate(prompts)]


def prepare(teacher_dir: Path, cfg: DistillConfig, cache: Path | None = None, log=print):
    """(train examples, held-out examples, their teacher hidden states), from `cache` when it was
    written for the same teacher, prompts and settings."""
    from transformers import AutoTokenizer

    prompts = D.load_prompts(cfg.prompts)
    key = hashlib.sha256(repr((DATA_VERSION, str(Path(teacher_dir).resolve()), prompts, cfg.max_tokens,
                               cfg.quantization, cfg.train.seed)).encode()).hexdigest()[:16]
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=False)
        if saved.get("key") == key:
            log(f"teacher data from {cache}")
            return saved["train"], saved["held"], saved["hidden"]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    train_p, held_p = D.split(prompts)
    if not held_p:
        raise ValueError(f"{len(prompts)} prompts: at least {D.HELD_OUT_EVERY} are needed (every "
                         f"{D.HELD_OUT_EVERY}th is held out for evaluation)")
    jobs = _jobs(D.render(tokenizer, train_p), False) + _jobs(D.render(tokenizer, held_p), True)
    t0 = time.perf_counter()
    examples = D.generate(teacher_dir, jobs, cfg.max_tokens, cfg.train.seed, cfg.quantization, cfg.kernel_cache)
    n = sum(len(e.response) for e in examples)
    log(f"teacher answers: {len(examples)} ({n} tokens) in {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    hidden = D.teacher_hidden(teacher_dir, examples)
    log(f"teacher hidden states: {sum(len(e.ids) for e in examples)} positions in {time.perf_counter() - t0:.0f}s")
    train_ex, held_ex = examples[: len(train_p)], examples[len(train_p):]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "train": train_ex, "held": held_ex, "hidden": hidden}, cache)
    return train_ex, held_ex, hidden


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return max(n - 1, 0)


def _scores(model, held, hidden) -> dict:
    return evaluate(model, [(torch.tensor(e.ids), h, len(e.prompt)) for e, h in zip(held, hidden)])


def distill(teacher_dir: Path, out: Path, compact: Path, cfg: DistillConfig, teacher_id: str = "",
            cache: Path | None = None, log=print) -> dict:
    """Train a cfg.layers-layer student of the teacher; write the compact file and the full model
    directory assembled from it (so both are exactly what a pull of the shipped file gives)."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    train_ex, held_ex, hidden = prepare(Path(teacher_dir), cfg, cache, log)
    t_data = time.perf_counter() - t_start
    init = list(cfg.init) if cfg.init else S.default_init(cfg.layers)
    if len(init) != cfg.layers:
        raise ValueError(f"--init names {len(init)} teacher layers for a {cfg.layers}-layer student")
    model = S.build_student(Path(teacher_dir), init)
    held_hidden = hidden[len(train_ex):]
    before = _scores(model, held_ex, held_hidden)
    log(f"init (teacher layers {init}): {before}")
    # The system header every rendered prompt starts with is one context, not hundreds: it is
    # trained on once (first example), skipped in the others.
    shared = _common_prefix([e.prompt for e in train_ex])
    rows = [(torch.tensor(e.ids), h[f:], f) for e, h in zip(train_ex, hidden)
            for f in [0 if e is train_ex[0] else shared]]
    stats = train(model, rows, cfg.train, log)
    tensors = S.trained_tensors(model)
    model.load_state_dict({n: t.float() for n, t in tensors.items()}, strict=False)  # score what ships
    after = _scores(model, held_ex, held_hidden)
    log(f"trained: {after}")
    S.save_compact(tensors, compact, {"teacher": teacher_id, "teacher_layers": ",".join(map(str, init)),
                                    "steps": str(cfg.train.steps), "seed": str(cfg.train.seed)})
    S.assemble(Path(teacher_dir), compact, out)
    sha = hashlib.sha256(Path(compact).read_bytes()).hexdigest()
    log(f"wrote {compact} (sha256 {sha}) and {out}")
    return {"teacher": teacher_id, "layers": cfg.layers, "init": init, "train_examples": len(train_ex),
            "train_positions": sum(len(r[0]) - r[2] for r in rows), "held_out_examples": len(held_ex),
            "before": before, "after": after, "training": stats, "data_seconds": round(t_data, 1),
            "seconds": round(time.perf_counter() - t_start, 1), "compact": str(compact),
            "compact_bytes": Path(compact).stat().st_size, "compact_sha256": sha, "out": str(out),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}}
