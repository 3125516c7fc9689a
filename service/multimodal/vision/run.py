"""`frontier train-vision`: synthetic images -> warm-up -> answer loss through the frozen LM -> the adapter.

Time: the run is bounded by `minutes` (everything: rendering, both stages, the check, saving).
Rendering is measured first; the warm-up gets up to `warmup_share` of what is left and the LM stage
the rest less a reserve for the held-out check and saving. Each stage stops at its step count or
its time, whichever comes first, its schedule compressed to fit (train.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from service.multimodal.vision import synth
from service.multimodal.vision import train as T
from service.multimodal.vision.model import VisionAdapter, num_parameters, save_adapter
from service.multimodal.vision.prompt import IMAGE_TOKEN, build_prompt, end_of_turn_ids, image_token_id

RESERVE_SECONDS = 75.0  # the held-out check and saving


@dataclass(frozen=True)
class VisionConfig:
    train_images: int = 20000
    heldout_images: int = 1000  # warm-up diagnostics (classifier accuracy on unseen images)
    check_per_task: int = 16  # held-out greedy answers per task after training (the bench does more)
    minutes: float = 20.0
    warmup_share: float = 0.3
    workers: int = 2  # rendering processes
    adapter: dict = field(default_factory=dict)  # overrides of model.DEFAULT_CONFIG
    train: T.TrainConfig = field(default_factory=T.TrainConfig)


def load_lm(lm_dir: Path):
    """The frozen fp32 LM and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, AutoTokenizer.from_pretrained(lm_dir)


def lm_rows(tokenizer, pool: T.Pool, num_image_tokens: int) -> tuple[list[int], list[tuple[list[int], int]]]:
    """(the prefix every prompt shares, per example: the ids after it with the answer, answer length)."""
    from service.multimodal.vision.prompt import expand_image_placeholders

    image_id, end = image_token_id(tokenizer), end_of_turn_ids(tokenizer)
    cache: dict[str, list[int]] = {}
    prompts = []
    for q in pool.questions:
        if q not in cache:
            ids = tokenizer.encode(build_prompt(tokenizer, q), add_special_tokens=False)
            cache[q] = expand_image_placeholders(ids, num_image_tokens, image_id)
        prompts.append(cache[q])
    p = min(ids.index(image_id) for ids in cache.values())
    prefix = prompts[0][:p]
    if any(ids[:p] != prefix for ids in cache.values()):
        raise ValueError("the rendered prompts do not share their text before the image")
    rows = []
    for ids, a in zip(prompts, pool.answers):
        ans = T.answer_ids(tokenizer, a) + end
        rows.append((ids[p:] + ans, len(ans)))
    return prefix, rows


def check(lm, tokenizer, adapter, per_task: int, start: int = 0, batch: int = 32) -> dict[str, float]:
    """Held-out greedy accuracy per task (examples start.. of each task, never trained on)."""
    from service.multimodal.vision.generate import ask

    out = {}
    for task in synth.TASKS:
        exs = [synth.example("heldout", start + i, task) for i in range(per_task)]
        answers = ask(lm, tokenizer, adapter, [e.image for e in exs], [e.question for e in exs], batch=batch)
        out[task] = round(sum(synth.matches(a, e.answer) for a, e in zip(answers, exs)) / max(per_task, 1), 3)
    return out


def train_vision(lm_dir: Path, out: Path, cfg: VisionConfig, lm_id: str = "", log=print) -> dict:
    t_start = time.perf_counter()
    budget = cfg.minutes * 60.0
    torch.manual_seed(cfg.train.seed)
    lm, tokenizer = load_lm(Path(lm_dir))
    adapter = VisionAdapter(cfg.adapter, hidden_size=lm.config.hidden_size)
    log(f"adapter: {num_parameters(adapter) / 1e6:.2f} M parameters, {adapter.num_image_tokens} image tokens "
        f"at {adapter.image_size}px")
    t0 = time.perf_counter()
    pool = T.make_pool("train", cfg.train_images, adapter.image_size, workers=cfg.workers)
    held = T.make_pool("heldout", cfg.heldout_images, adapter.image_size, start=10**6, workers=cfg.workers)
    t_render = time.perf_counter() - t0
    log(f"rendered {len(pool)} train + {len(held)} held-out images in {t_render:.0f}s")
    targets = T.label_targets(tokenizer, lm.get_input_embeddings().weight)
    left = budget - (time.perf_counter() - t_start) - RESERVE_SECONDS
    tc = replace(cfg.train, warmup_seconds=min(cfg.train.warmup_seconds, max(1.0, cfg.warmup_share * left)))
    heads = T.AuxHeads(adapter.config)
    w = T.warmup(adapter, heads, pool, targets, tc, log)
    w["heldout_classifier_accuracy"] = T.aux_accuracy(adapter, heads, held)
    log(f"warm-up: {w}")
    prefix, rows = lm_rows(tokenizer, pool, adapter.num_image_tokens)
    tc = replace(tc, seconds=min(cfg.train.seconds, max(1.0, budget - (time.perf_counter() - t_start)
                                                       - RESERVE_SECONDS)))
    s = T.train_lm(lm, adapter, heads, pool, T.PrefixCache.build(lm, prefix), rows, targets, tc,
                   image_token_id(tokenizer), log)
    log(f"LM stage: {s}")
    meta = {"lm": lm_id, "image_token": IMAGE_TOKEN, "image_token_id": image_token_id(tokenizer),
            "placement": "image placeholder line(s) first in the user message, then the question"}
    save_adapter(adapter, out, meta)
    from service.multimodal.vision.model import load_adapter

    shipped = load_adapter(out)  # check what ships (fp16-rounded)
    acc = check(lm, tokenizer, shipped, cfg.check_per_task) if cfg.check_per_task else {}
    log(f"held-out greedy accuracy ({cfg.check_per_task} per task): {acc}")
    seconds = round(time.perf_counter() - t_start, 1)
    report = {"lm": lm_id, "out": str(out), "seconds": seconds, "render_seconds": round(t_render, 1),
              "warmup": w, "lm_stage": s, "heldout_check": acc, "parameters": num_parameters(adapter),
              "weights_bytes": (Path(out) / "adapter.safetensors").stat().st_size,
              "config": {**asdict(cfg), "adapter": adapter.config}}
    save_adapter(shipped, out, {**meta, "training": {k: report[k] for k in
                                                     ("seconds", "render_seconds", "warmup", "lm_stage",
                                                      "heldout_check")}})
    return report
