"""Training (KL to the teacher's full next-token distribution) and the draft-quality numbers.

Why KL on the whole distribution at every position, not cross-entropy on the sampled tokens: each
position then carries the teacher's full preference (49152 targets rather than one), which is what
lets a few hundred steps on a few hundred answers move a draft; and a draft judged by greedy
agreement mostly needs the teacher's top token ranked first, which the full distribution teaches.

Cost: with frozen tied embeddings the vocabulary projections (teacher logits, student logits and
their gradient) are most of the work; they run in bf16 where the CPU has native bf16 (autocast),
the softmaxes in fp32.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    tokens_per_step: int = 320  # whole sequences, at least one per step
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool | None = None  # None: where the CPU has native bf16 (AVX-512 BF16 / AMX)


def native_bf16() -> bool:
    from service.modeling.cpu_info import cpu_summary

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_summary()["flags"]))


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def kl_rows(h_student: torch.Tensor, h_teacher: torch.Tensor, embed: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """KL(teacher || student) per row, from final hidden states [N, H] and the shared lm_head [V, H]."""
    with _autocast(bf16):
        zs = h_student @ embed.T
        with torch.no_grad():
            zt = h_teacher.to(h_student.dtype) @ embed.T
    return kl_logits(zs.float(), zt.float())


def kl_logits(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    lt = F.log_softmax(zt, dim=-1)
    return (lt.exp() * (lt - F.log_softmax(zs, dim=-1))).sum(-1)


def _batches(lengths: list[int], tokens_per_step: int, gen: torch.Generator):
    """Endless shuffled batches of example indices, each up to tokens_per_step tokens (at least one)."""
    while True:
        batch, used = [], 0
        for i in torch.randperm(len(lengths), generator=gen).tolist():
            if batch and used + lengths[i] > tokens_per_step:
                yield batch
                batch, used = [], 0
            batch.append(i)
            used += lengths[i]
        if batch:
            yield batch


def _forward(model, seqs: list[torch.Tensor], bf16: bool, first: list[int] | None = None) -> torch.Tensor:
    """Final hidden states of positions first[r].. of each (unpadded) row, concatenated: [N, H]."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = s, 1
    with _autocast(bf16):
        h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    if first is not None:
        for r, f in enumerate(first):
            mask[r, :f] = 0
    return h[mask.bool()].float()


def train(model, data: list[tuple[torch.Tensor, torch.Tensor, int]], cfg: TrainConfig, log=print) -> dict:
    """data: (token ids [T], teacher hidden [T - F, H] at positions F.., F) per sequence. AdamW on
    every trainable parameter (the embeddings are frozen), linear warm-up then cosine decay,
    seeded batches."""
    bf16 = native_bf16() if cfg.bf16 is None else cfg.bf16
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    embed = model.model.embed_tokens.weight
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1))
                                              * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0))))
    batches = _batches([len(ids) - f for ids, _, f in data], cfg.tokens_per_step, gen)
    model.train()
    t0, tokens, recent = time.perf_counter(), 0, []
    for step in range(cfg.steps):
        idx = next(batches)
        h = _forward(model, [data[i][0] for i in idx], bf16, [data[i][2] for i in idx])
        loss = kl_rows(h, torch.cat([data[i][1] for i in idx]), embed, bf16).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        tokens += h.shape[0]
        recent.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps}  KL {sum(recent) / len(recent):.3f}  "
                f"{tokens / (time.perf_counter() - t0):.0f} tok/s")
            recent = []
    model.eval()
    return {"steps": cfg.steps, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1), "bf16": bf16}


def runs(agree: torch.Tensor) -> torch.Tensor:
    """Consecutive agreements starting at each position (0 where the first disagrees)."""
    out = torch.zeros(len(agree) + 1, dtype=torch.long)
    for t in range(len(agree) - 1, -1, -1):
        out[t] = out[t + 1] + 1 if agree[t] else 0
    return out[:-1]


@torch.inference_mode()
def evaluate(model, data: list[tuple[torch.Tensor, torch.Tensor, int]], k: int = 4) -> dict:
    """data: (ids [T], teacher hidden [T, H], prompt length P) per held-out sequence, scored where
    the answer is generated (positions P-1 .. T-2 predict its tokens), all in fp32.

    kl: mean KL(teacher || student) there. agreement: how often the student's greedy token equals
    the teacher's (the per-token acceptance rate of greedy drafts). accepted_at_k: mean over those
    positions of the run of agreements starting there, capped at k: the tokens a k-token draft
    starting there gets accepted (the target adds one of its own per step)."""
    embed = model.model.embed_tokens.weight.float()
    kls, agrees, accepted = [], [], []
    for ids, h_teacher, p in data:
        h = _forward(model, [ids[: len(ids) - 1]], bf16=False, first=[p - 1])
        zs, zt = h @ embed.T, h_teacher[p - 1 : len(ids) - 1].float() @ embed.T
        kls.append(kl_logits(zs, zt))
        a = zs.argmax(-1) == zt.argmax(-1)
        agrees.append(a)
        accepted.append(runs(a).clamp(max=k))
    a, acc = torch.cat(agrees).float(), torch.cat(accepted).float()
    return {"kl": round(torch.cat(kls).mean().item(), 4), "agreement": round(a.mean().item(), 4),
            f"accepted_at_{k}": round(acc.mean().item(), 3), "positions": len(a)}
