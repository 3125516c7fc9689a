"""One model forward over a flattened, mixed batch (decode rows + prefill chunks) on a paged KV cache.

Tokens of all scheduled sequences are concatenated: decode rows first, then prefill chunks. Each
layer writes the new K/V into the pool at `slot_mapping`, then attends per group of rows:
  - decode group: one query token per row; rows are batched, the kv heads' query heads are folded
    into the query-length axis ([B, Hkv, rep, D]) so GQA needs no K/V repeat; a speculating
    sequence's last token and proposals are one row each (service/engine/spec_step.py); while few
    sequences decode, each row is its own call (numerics independent of the batch);
  - prefill group: each chunk attends causally to its cached prefix + itself (padded if several).
A group's K/V are gathered block-wise with one `index_select` into a reused workspace (measured
~3x faster than advanced indexing into a fresh tensor on this CPU), then torch SDPA with an additive
mask (padding, causality, sliding window) built once per step, not per layer. No device-specific
code: the same path runs on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.engine.kv_cache import allocate_kv_pool
from service.engine.scheduler import ScheduledSeq


@dataclass
class _Group:
    start: int  # first flat token of the group
    num_tokens: int
    num_rows: int  # B
    q_len: int  # T (1 for decode)
    num_blocks: int  # nb: blocks per row after padding
    block_ids: torch.Tensor  # [B * nb]
    mask: torch.Tensor  # [B, 1, rep * T (1 for decode), nb * block_size] additive (0 / -inf)
    pad_index: torch.Tensor | None  # [B * T] group-local token per padded query slot (None: no padding)
    valid_rows: torch.Tensor | None  # [num_tokens] padded slot of each real token


class PagedAttention:
    """The `attn(layer_idx, q, k, v)` callable the model uses for one step."""

    def __init__(self, runner: "ModelRunner", slot_mapping: torch.Tensor, groups: list[_Group]):
        self.r, self.slot_mapping, self.groups = runner, slot_mapping, groups

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [N, Hq, D]; k, v: [N, Hkv, D] -> [N, Hq, D]
        r = self.r
        cache = r.kv_pool[layer]  # [2, num_blocks, block_size, Hkv, D]
        slots = cache.view(2, -1, r.num_kv_heads, r.head_dim)
        slots[0].index_copy_(0, self.slot_mapping, k)
        slots[1].index_copy_(0, self.slot_mapping, v)
        outs = [self._attend(cache, g, q[g.start : g.start + g.num_tokens]) for g in self.groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _attend(self, cache: torch.Tensor, g: _Group, q: torch.Tensor) -> torch.Tensor:
        r = self.r
        B, T, hkv, rep, D = g.num_rows, g.q_len, r.num_kv_heads, r.rep, r.head_dim
        n = B * g.num_blocks
        ws = r.workspace(2 * n * r.block_numel).view(2, n, r.block_numel)
        torch.index_select(cache.view(2, cache.shape[1], -1), 1, g.block_ids, out=ws)
        kv = ws.view(2, B, g.num_blocks * r.block_size, hkv, D).transpose(2, 3)  # [2, B, Hkv, L, D]
        if g.pad_index is not None:
            q = q.index_select(0, g.pad_index)  # [B * T, Hq, D]
        q = q.view(B, T, hkv, rep, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, rep * T, D)
        o = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=g.mask)  # [B, Hkv, rep*T, D]
        o = o.view(B, hkv, rep, T, D).permute(0, 3, 1, 2, 4).reshape(B * T, hkv * rep, D)
        return o if g.valid_rows is None else o.index_select(0, g.valid_rows)


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        cfg = model.config
        self.model = model
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.block_size = block_size
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        self.rep = cfg.num_heads // cfg.num_kv_heads
        self.block_numel = block_size * cfg.num_kv_heads * cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.kv_pool = allocate_kv_pool(
            cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device
        )
        self._ws = torch.empty(0, dtype=self.dtype, device=self.device)
        # Up to this many decoding sequences, each decode row attends in a call of its own (see run);
        # the engine sets it to its speculation limit.
        self.row_exact_max = 0
        # Set by each `run`: for the items whose sequence asked for prompt logprobs, the logits at the
        # chunk's positions that predict a prompt token: (item, [m, V] float32), row j = position
        # item.start + j, predicting prompt token item.start + j + 1. Empty for all other steps.
        self.prompt_logits: list[tuple[ScheduledSeq, torch.Tensor]] = []

    def workspace(self, numel: int) -> torch.Tensor:
        if self._ws.numel() < numel:  # grow geometrically; reused by every layer and step
            self._ws = torch.empty(max(numel, 2 * self._ws.numel()), dtype=self.dtype, device=self.device)
        return self._ws[:numel]

    def _group(self, rows: list[tuple[list[int], int, int]], start: int) -> _Group:
        """rows: (block table, first query position, query tokens) per attention row."""
        bs, T = self.block_size, max(n for _, _, n in rows)
        B = len(rows)
        nb = max((first + n + bs - 1) // bs for _, first, n in rows)
        block_ids, q_pos, ctx, pad_index, valid_rows, offset = [], [], [], [], [], 0
        for row, (table, first, n) in enumerate(rows):
            need = (first + n + bs - 1) // bs
            block_ids += table[:need] + [0] * (nb - need)  # padding reads block 0, masked
            q_pos += [first + t for t in range(n)] + [0] * (T - n)
            ctx.append(first + n)
            pad_index += list(range(offset, offset + n)) + [offset] * (T - n)
            valid_rows += range(row * T, row * T + n)
            offset += n
        dev = self.device
        qp = torch.tensor(q_pos, device=dev).view(B, T, 1)
        kp = torch.arange(nb * bs, device=dev).view(1, 1, -1)
        allowed = (kp <= qp) & (kp < torch.tensor(ctx, device=dev).view(B, 1, 1))  # [B, T, L]
        if self.sliding_window:
            allowed &= kp > qp - self.sliding_window
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        if T == 1:  # decode: [B, 1, 1, L] broadcasts over the folded query heads
            mask = mask.unsqueeze(1)
        else:  # query slots are ordered (rep, t): repeat the causal rows once per folded head
            mask = mask.unsqueeze(1).expand(B, self.rep, T, nb * bs).reshape(B, 1, self.rep * T, nb * bs)
        padded = offset != B * T
        return _Group(
            start, offset, B, T, nb, torch.tensor(block_ids, device=dev), mask,
            torch.tensor(pad_index, device=dev) if padded else None,
            torch.tensor(valid_rows, device=dev) if padded else None,
        )

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Forward the step. Returns (the items that sample, their next-token logits float32): one row
        per item, in order, except an item with proposed tokens (num_spec k), which gets k + 1 rows
        (after its last accepted token and after each proposed token)."""
        # Decode rows: one query token each; a speculating sequence's last token and proposals are one
        # row per token, each attending to its own prefix. While few sequences decode (where
        # speculation runs) every row is its own attention call over its own context: torch's SDPA
        # result for a row otherwise varies with its neighbours (their masks, the batch's padded
        # length), and verification must compute exactly what plain decoding computes, token for
        # token. Above that, one batched call. Prefill chunks follow.
        decode = [it for it in batch if it.num_tokens == 1 or it.num_spec]
        prefill = [it for it in batch if it.num_tokens > 1 and not it.num_spec]
        bs = self.block_size
        input_ids, positions, slots, logits_index, samplers, prompt_rows = [], [], [], [], [], []
        image_at, image_rows = [], []  # flat index -> an image's encoder row (early fusion)

        def add(it: ScheduledSeq, pos: int) -> None:
            base = it.start + it.num_tokens - it.num_spec  # positions from here hold proposed tokens
            slots.append(it.seq.block_table[pos // bs] * bs + pos % bs)
            positions.append(pos)
            input_ids.append(it.seq.token_ids[pos] if pos < base else it.seq.spec_tokens[pos - base])
            for im in it.seq.images:  # a chunk may start or end anywhere inside an image's span
                if im.start <= pos < im.start + im.length:
                    image_at.append(len(input_ids) - 1)
                    image_rows.append(im.embeds[pos - im.start])

        rows = [(it, it.start + j) for it in decode for j in range(it.num_tokens)]
        attn_rows = [(it.seq.block_table, pos, 1) for it, pos in rows]
        if len(decode) <= self.row_exact_max:  # rows sit first in the flat batch: row i is token i
            groups = [self._group([r], i) for i, r in enumerate(attn_rows)]
        else:
            groups = [self._group(attn_rows, 0)] if rows else []
        for it, pos in rows:
            add(it, pos)
        offset = 0  # decode rows sit in item order, num_tokens each
        for it in decode:
            if it.samples:
                logits_index += range(offset + it.num_tokens - it.num_spec - 1, offset + it.num_tokens)
                samplers.append(it)
            offset += it.num_tokens
        if prefill:
            prefill_rows = [(it.seq.block_table, it.start, it.num_tokens) for it in prefill]
            groups.append(self._group(prefill_rows, len(input_ids)))
        for it in prefill:
            if it.seq.prompt_logprobs is not None:  # rows of positions start.. that predict a prompt token
                m = min(it.num_tokens, it.seq.num_prompt_tokens - 1 - it.start)
                if m > 0:
                    prompt_rows.append((it, len(input_ids), m))
            for pos in range(it.start, it.start + it.num_tokens):
                add(it, pos)
            if it.samples:
                logits_index.append(len(input_ids) - 1)
                samplers.append(it)
        dev = self.device
        attn = PagedAttention(self, torch.tensor(slots, device=dev), groups)
        embeds_at = (torch.tensor(image_at, device=dev), torch.stack(image_rows).to(dev)) if image_at else None
        hidden = self.model(torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev), attn, embeds_at)
        # hidden: [num_tokens, hidden]
        self.prompt_logits = [(it, self.model.compute_logits(hidden[off : off + m])) for it, off, m in prompt_rows]
        if not samplers:
            return [], hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        return samplers, self.model.compute_logits(hidden.index_select(0, torch.tensor(logits_index, device=dev)))
