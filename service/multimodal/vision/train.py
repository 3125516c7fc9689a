"""Training the adapter into a frozen LM, in two stages.

Warm-up (no LM forward: cheap, a quarter of an LM step's time for a batch of four times the
images): the encoder learns to see through classifiers (AuxHeads, one per task, over its N rows;
dropped afterwards), and the projector gets a start the LM can read: slot k (row k < len(TASKS))
is pulled towards the LM's own input embedding of the scene's task-k label (the colour word, the
shape word, the count digit, the position word, the written word; the mean embedding when a label
is several tokens) by a cosine cross-entropy over the task's label words plus a squared error.
A cheap stand-in for LLaVA's caption pre-training stage.

LM stage: the answer tokens' cross-entropy through the frozen LM (inputs_embeds with the image rows
spliced in, prompt.py), gradients into the adapter only, with the warm-up loss kept as a small
regularizer. The chat prefix every prompt shares (system prompt, "<|im_start|>user\\n") is run once
and its KV cache reused by every batch. Matmuls run in bf16 (autocast) where the CPU has native bf16.

Both stages: AdamW, linear warm-up then cosine decay over progress = max(step / steps,
elapsed / seconds), so a time cap ends the schedule rather than cutting it (with no cap binding,
a run is a pure function of its seeds).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from service.multimodal.vision import synth
from service.multimodal.vision.prompt import IMAGE_TOKEN_ID, splice_image_embeds


@dataclass(frozen=True)
class TrainConfig:
    warmup_steps: int = 800
    warmup_batch: int = 64
    warmup_lr: float = 2e-3
    warmup_seconds: float = math.inf
    align_weight: float = 1.0  # slot alignment with the LM's label embeddings (warm-up)
    steps: int = 600  # LM steps
    batch: int = 16
    lr: float = 1e-3  # projector; the encoder gets lr * encoder_lr_scale
    encoder_lr_scale: float = 0.3
    aux_weight: float = 0.1  # the warm-up loss, as a regularizer in the LM stage
    seconds: float = math.inf  # LM stage cap
    seed: int = 0
    bf16: bool | None = None  # None: where the CPU has native bf16 (AVX-512 BF16 / AMX)


@dataclass
class Pool:
    """Preprocessed images and their labels, in memory."""
    pixels: torch.Tensor  # [M, 3, S, S] uint8
    labels: torch.Tensor  # [M, len(TASKS)] long: index into synth.LABELS[task], -1 where undefined
    tasks: list[str]
    questions: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.tasks)


def _render(job: tuple[str, int, int]):
    from service.multimodal.vision.model import to_uint8

    split, index, size = job
    ex = synth.example(split, index)
    labels = [ex.labels.get(t, -1) for t in synth.TASKS]
    return to_uint8(ex.image, size).numpy(), ex.task, ex.question, ex.answer, labels


def make_pool(split: str, count: int, image_size: int, start: int = 0, workers: int = 1) -> Pool:
    """Examples start..start+count-1 of `split`, rendered (in `workers` processes) and resized."""
    import multiprocessing

    import numpy as np

    jobs = [(split, i, image_size) for i in range(start, start + count)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as p:
            rows = p.map(_render, jobs, chunksize=64)
    else:
        rows = [_render(j) for j in jobs]
    pixels = torch.from_numpy(np.stack([r[0] for r in rows])) if rows else torch.zeros(0, 3, image_size, image_size,
                                                                                        dtype=torch.uint8)
    return Pool(pixels, torch.tensor([r[4] for r in rows], dtype=torch.long).view(-1, len(synth.TASKS)),
                [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer.encode(answer, add_special_tokens=False)


def label_targets(tokenizer, embed_weight: torch.Tensor) -> list[torch.Tensor]:
    """Per task (synth.TASKS order): [num_labels, H], the mean input embedding of each label's tokens."""
    return [torch.stack([embed_weight[answer_ids(tokenizer, label)].float().mean(0) for label in synth.LABELS[t]])
            for t in synth.TASKS]


class AuxHeads(nn.Module):
    """Warm-up classifiers, one per task, over the encoder's N rows flattened (position-aware).
    Used in training only; not part of the adapter."""

    def __init__(self, config: dict):
        super().__init__()
        width = config["num_image_tokens"] * config["encoder_dim"]
        self.heads = nn.ModuleList(nn.Linear(width, len(synth.LABELS[t])) for t in synth.TASKS)

    def forward(self, enc: torch.Tensor) -> list[torch.Tensor]:
        # enc: [B, N, d] -> per task [B, num_labels]
        flat = enc.flatten(1)
        return [head(flat) for head in self.heads]


def aux_loss(enc: torch.Tensor, out: torch.Tensor, labels: torch.Tensor, heads: AuxHeads, targets: list[torch.Tensor],
             align_weight: float = 1.0, scale: float = 20.0) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """enc: [B, N, d] encoder rows; out: [B, N, H] adapter rows; labels: [B, K].

    The classifiers' cross-entropy plus, times align_weight, slot k's alignment with the LM's
    embedding of task k's label (cosine cross-entropy over the task's labels + squared error to the
    target row). Returns (loss, {task: (classifier correct, counted)})."""
    total, stats = enc.new_zeros((), dtype=torch.float32), {}
    for k, (task, logits) in enumerate(zip(synth.TASKS, heads(enc.float()))):
        valid = labels[:, k] >= 0
        if not bool(valid.any()):
            continue
        y = labels[valid, k]
        total = total + F.cross_entropy(logits[valid], y)
        stats[task] = (int((logits[valid].argmax(-1) == y).sum()), int(valid.sum()))
        if align_weight:
            tgt = targets[k]
            v = out[valid, k].float()
            cos = F.normalize(v, dim=-1) @ F.normalize(tgt, dim=-1).T * scale
            total = total + align_weight * (F.cross_entropy(cos, y) + ((v - tgt[y]) ** 2).mean() / tgt.pow(2).mean())
    return total, stats


def native_bf16() -> bool:
    from service.modeling.cpu_info import cpu_summary

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_summary()["flags"]))


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _schedule(progress: float, warmup: float = 0.05) -> float:
    return min(1.0, (progress + 1e-9) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _batches(n: int, size: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            yield perm[i: i + size]


def _pixels(adapter, pool: Pool, idx: torch.Tensor) -> torch.Tensor:
    from service.multimodal.vision.model import normalize

    return normalize(pool.pixels[idx], adapter.mean, adapter.std)


def _add_stats(acc: dict, stats: dict) -> None:
    for k, (c, n) in stats.items():
        a = acc.setdefault(k, [0, 0])
        a[0] += c
        a[1] += n


def _fmt(acc: dict) -> str:
    return " ".join(f"{k} {c / max(n, 1):.2f}" for k, (c, n) in acc.items())


@torch.inference_mode()
def aux_accuracy(adapter, heads: AuxHeads, pool: Pool, batch: int = 128) -> dict[str, float]:
    """The warm-up classifiers' accuracy per task on `pool`."""
    acc: dict = {}
    for i in range(0, len(pool), batch):
        idx = torch.arange(i, min(i + batch, len(pool)))
        enc = adapter.encoder(_pixels(adapter, pool, idx))
        _add_stats(acc, aux_loss(enc, enc, pool.labels[idx], heads, [], align_weight=0.0)[1])
    return {k: round(c / max(n, 1), 4) for k, (c, n) in acc.items()}


def _encode(adapter, pixels: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder rows [B, N, d], adapter rows [B, N, H]), float32."""
    with _autocast(bf16):
        enc = adapter.encoder(pixels)
        out = adapter.projector(enc)
    return enc.float(), out.float()


def warmup(adapter, heads: AuxHeads, pool: Pool, targets: list[torch.Tensor], cfg: TrainConfig, log=print) -> dict:
    if cfg.align_weight and adapter.num_image_tokens < len(synth.TASKS):
        raise ValueError(f"slot alignment needs num_image_tokens >= {len(synth.TASKS)} (one slot per task)")
    bf16 = native_bf16() if cfg.bf16 is None else cfg.bf16
    gen = torch.Generator().manual_seed(cfg.seed)
    params = list(adapter.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.warmup_lr, weight_decay=0.01)
    batches = _batches(len(pool), min(cfg.warmup_batch, len(pool)), gen)
    adapter.train()
    t0, step, acc, losses = time.perf_counter(), 0, {}, []
    while True:
        progress = max(step / cfg.warmup_steps, (time.perf_counter() - t0) / cfg.warmup_seconds)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.warmup_lr * _schedule(progress)
        idx = next(batches)
        enc, out = _encode(adapter, _pixels(adapter, pool, idx), bf16)
        loss, stats = aux_loss(enc, out, pool.labels[idx], heads, targets, cfg.align_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        _add_stats(acc, stats)
        if step % 50 == 0:
            log(f"warm-up {step}/{cfg.warmup_steps}  loss {sum(losses) / len(losses):.3f}  train acc {_fmt(acc)}  "
                f"{time.perf_counter() - t0:.0f}s")
            acc, losses = {}, []
    adapter.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "bf16": bf16}


@dataclass
class PrefixCache:
    """The KV of the token prefix every prompt shares, computed once (fp32, no grad)."""
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, kv_heads, P, head_dim]

    @classmethod
    @torch.no_grad()
    def build(cls, lm, ids: list[int]) -> "PrefixCache":
        from service.multimodal.vision.generate import lm_cache

        cache = lm_cache()
        if ids:
            lm.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
        return cls(list(ids), [(layer.keys, layer.values) for layer in cache.layers] if ids else [])

    def expand(self, batch: int):
        from service.multimodal.vision.generate import lm_cache

        cache = lm_cache()
        for i, (k, v) in enumerate(self.kv):
            cache.update(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous(), i)
        return cache


def lm_loss(lm, prefix: PrefixCache, img: torch.Tensor, rows: list[tuple[list[int], int]], bf16: bool = False,
            image_token_id: int = IMAGE_TOKEN_ID) -> torch.Tensor:
    """Mean answer-token cross-entropy. img: the adapter's rows [B, N, H]; rows: per example, the ids
    after the shared prefix (placeholders expanded, the answer and its end token last) and the
    answer's length in tokens."""
    width, p = max(len(r) for r, _ in rows), len(prefix.ids)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, T]
    mask = torch.zeros(len(rows), p + width, dtype=torch.long)  # [B, P + T]
    mask[:, :p] = 1
    target = torch.full((len(rows), width), -100, dtype=torch.long)  # [B, T]: the token each position predicts
    for r, (seq, n) in enumerate(rows):
        ids[r, : len(seq)], mask[r, p: p + len(seq)] = torch.tensor(seq), 1
        target[r, len(seq) - n - 1: len(seq) - 1] = torch.tensor(seq[len(seq) - n:])
    with _autocast(bf16):
        x = splice_image_embeds(lm.get_input_embeddings()(ids), ids, img, image_token_id)
        pos = torch.arange(p, p + width).expand(len(rows), -1)
        h = lm.model(inputs_embeds=x, attention_mask=mask, position_ids=pos,
                     cache=prefix.expand(len(rows)) if p else None, use_cache=bool(p)).last_hidden_state
        sel = target != -100
        logits = lm.get_output_embeddings()(h[sel])
    return F.cross_entropy(logits.float(), target[sel])


def train_lm(lm, adapter, heads: AuxHeads, pool: Pool, prefix: PrefixCache, rows: list[tuple[list[int], int]],
             targets: list[torch.Tensor], cfg: TrainConfig, image_token_id: int = IMAGE_TOKEN_ID, log=print) -> dict:
    """rows[i] belongs to pool example i (lm_loss). The LM's parameters get no gradient."""
    bf16 = native_bf16() if cfg.bf16 is None else cfg.bf16
    for prm in lm.parameters():
        prm.requires_grad_(False)
    lm.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    groups = [{"params": list(adapter.encoder.parameters()) + list(heads.parameters()), "scale": cfg.encoder_lr_scale},
              {"params": list(adapter.projector.parameters()), "scale": 1.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)
    batches = _batches(len(pool), min(cfg.batch, len(pool)), gen)
    adapter.train()
    t0, step, losses, curve = time.perf_counter(), 0, [], []
    while True:
        progress = max(step / cfg.steps, (time.perf_counter() - t0) / cfg.seconds)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g["scale"] * _schedule(progress)
        idx = next(batches)
        enc, img = _encode(adapter, _pixels(adapter, pool, idx), bf16)
        loss = lm_loss(lm, prefix, img, [rows[i] for i in idx.tolist()], bf16, image_token_id)
        total = loss
        if cfg.aux_weight:
            total = total + cfg.aux_weight * aux_loss(enc, img, pool.labels[idx], heads, targets, cfg.align_weight)[0]
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 25 == 0:
            curve.append(round(sum(losses) / len(losses), 4))
            log(f"lm {step}/{cfg.steps}  answer CE {curve[-1]:.3f}  {(time.perf_counter() - t0) / step:.2f} s/step")
            losses = []
    adapter.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "bf16": bf16, "loss_every_25": curve}
