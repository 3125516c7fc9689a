"""Quantized linear layers and SmoothQuant-style smoothing (CPU int8 via fbgemm, engine 'x86').

Int8 scheme (measured on SmolLM2-135M, see bench/results/perplexity.md):
- weights: symmetric int8 per output channel, prepacked once for fbgemm;
- activations: quantized dynamically by `quantized::linear_dynamic`, which picks ONE scale for the
  whole input tensor. One outlier token would spoil that scale for every token, so each row is
  first divided by its max-abs (per-token scaling) and the output rows are multiplied back;
  how many activation bits are safe depends on the kernel the CPU runs (int8_linear.py);
- smoothing moves per-channel activation outliers into the weights before quantization
  (s_j = max|X_j|^a / max|W_j|^(1-a); X/s folded into the producer, W*s into the consumers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from service.engine.config import Quantization  # the one quantization enum (manifest, Settings, here)
from service.modeling.int8_linear import Int8Linear, Int8Scheme  # noqa: F401 (re-exported)


# ---------------------------------------------------------------- smoothing


@dataclass
class SmoothGroup:
    """`linears` all consume the same input, produced by `prev` (an RMSNorm-like module with a
    `.weight` vector, or an nn.Linear whose output rows feed it, possibly through an operation
    that is linear in those rows). rows[j] = the row of `prev` feeding consumer input channel j;
    channels sharing a row (GQA: q heads sharing one v head) get one shared scale."""
    prev: nn.Module
    linears: list[nn.Linear]
    rows: torch.Tensor | None = None  # [in] long; None = arange(in)

    def row_index(self) -> torch.Tensor:
        n = self.linears[0].in_features
        return torch.arange(n) if self.rows is None else self.rows


def _head_dim(model: nn.Module, attn: nn.Module) -> int:
    hd = getattr(attn, "head_dim", None)
    if hd is None:
        cfg = getattr(attn, "config", None) or getattr(model, "config", None)
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(hd)


def llama_smooth_groups(model: nn.Module, smooth_o_proj: bool = True, lm_head: bool = False) -> list[SmoothGroup]:
    """Groups for every decoder layer, HF Llama layout (q/k/v_proj, gate/up_proj) or the fused
    native layout (qkv_proj, gate_up_proj with gate rows first), detected by attribute names.
    lm_head=True adds the final norm -> lm_head pair (untying a tied lm_head from the embedding
    first: the embedding lookup must keep the unscaled rows)."""
    groups = []
    for layer in model.modules():
        if not all(hasattr(layer, a) for a in ("input_layernorm", "self_attn",
                                                "post_attention_layernorm", "mlp")):
            continue
        attn, mlp = layer.self_attn, layer.mlp
        fused_qkv, fused_mlp = hasattr(attn, "qkv_proj"), hasattr(mlp, "gate_up_proj")
        qkv = [attn.qkv_proj] if fused_qkv else [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_up_proj] if fused_mlp else [mlp.gate_proj, mlp.up_proj]
        groups.append(SmoothGroup(layer.input_layernorm, qkv))
        groups.append(SmoothGroup(layer.post_attention_layernorm, gate_up))
        # down_proj input = silu(gate) * up: linear in the up rows, so 1/s folds into them.
        inter = mlp.down_proj.in_features
        up_off = inter if fused_mlp else 0
        groups.append(SmoothGroup(gate_up[-1], [mlp.down_proj], up_off + torch.arange(inter)))
        if smooth_o_proj:
            # o_proj input channel (head h, dim d) = softmax(...) @ v of kv head h // group:
            # linear in v's rows. With GQA the q heads of one group share the v row -> tied scale.
            hd = _head_dim(model, attn)
            nh = attn.o_proj.in_features // hd
            v_out = (qkv[0].out_features - nh * hd) // 2 if fused_qkv else attn.v_proj.out_features
            group = nh // (v_out // hd)
            v_off = nh * hd + v_out if fused_qkv else 0
            j = torch.arange(nh * hd)
            rows = v_off + (j // hd // group) * hd + j % hd
            groups.append(SmoothGroup(qkv[-1], [attn.o_proj], rows))
    if lm_head:
        head, embed = model.lm_head, model.model.embed_tokens
        if head.weight is embed.weight:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        groups.append(SmoothGroup(model.model.norm, [head]))
    return groups


def _prev_size(prev: nn.Module) -> int:
    return prev.weight.shape[0]


@torch.no_grad()
def collect_act_amax(model: nn.Module, groups: list[SmoothGroup], calib_batches: Iterable,
                     forward_fn: Callable | None = None) -> list[torch.Tensor]:
    """Per-input-channel max |x| seen by each group's consumers over the calibration batches."""
    stats: list[torch.Tensor | None] = [None] * len(groups)

    def hook(i):
        def fn(_mod, args):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float().cpu()
            stats[i] = a if stats[i] is None else torch.maximum(stats[i], a)
        return fn

    handles = [g.linears[0].register_forward_pre_hook(hook(i)) for i, g in enumerate(groups)]
    try:
        for batch in calib_batches:
            if forward_fn is not None:
                forward_fn(batch)
            elif isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    if any(s is None for s in stats):
        raise ValueError("calibration did not reach every smoothed layer (empty calib_batches?)")
    return stats


@torch.no_grad()
def apply_smoothing(group: SmoothGroup, act_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scale consumer columns by s and the producer rows by 1/s (function-preserving)."""
    rows = group.row_index()
    n_rows = _prev_size(group.prev)
    w_amax = torch.stack([l.weight.detach().abs().amax(0).float().cpu() for l in group.linears]).amax(0)
    # Reduce over channels tied to one producer row (max is what quantization cares about).
    a_r = torch.zeros(n_rows).scatter_reduce(0, rows, act_amax, "amax", include_self=False)
    w_r = torch.zeros(n_rows).scatter_reduce(0, rows, w_amax, "amax", include_self=False)
    used = torch.zeros(n_rows, dtype=torch.bool)
    used[rows] = True
    s_r = (a_r.clamp_min(1e-5).pow(alpha) / w_r.clamp_min(1e-5).pow(1 - alpha)).clamp(1e-4, 1e4)
    s_r = torch.where(used, s_r, torch.ones_like(s_r))  # rows feeding nothing here: untouched
    s = s_r[rows]  # [in]
    for lin in group.linears:
        lin.weight.mul_(s.to(lin.weight)[None, :])
    prev = group.prev
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s_r.to(prev.weight)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s_r.to(prev.bias))
    else:  # RMSNorm / LayerNorm-like: y = weight * normalized(x) (+ bias)
        prev.weight.div_(s_r.to(prev.weight))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s_r.to(prev.bias))
    return s


def smooth_model(model: nn.Module, calib_batches: Iterable | None, alpha: float = 0.65,
                 groups: list[SmoothGroup] | None = None, forward_fn: Callable | None = None,
                 smooth_o_proj: bool = True, act_amax: list[torch.Tensor] | None = None,
                 ) -> list[SmoothGroup]:
    """SmoothQuant-style smoothing in place; the fp32 function is unchanged (up to rounding).

    calib_batches: input_ids tensors ([B, T]) or kwargs dicts for model(...), or anything
    forward_fn accepts. act_amax: statistics from collect_act_amax on an identical model (skips
    calibration, e.g. to try several alphas). Returns the groups that were smoothed.
    """
    groups = llama_smooth_groups(model, smooth_o_proj) if groups is None else groups
    if not groups:
        raise ValueError("no smoothable (norm -> linear) groups found in the model")
    stats = act_amax if act_amax is not None else collect_act_amax(model, groups, calib_batches,
                                                                   forward_fn)
    if len(stats) != len(groups):
        raise ValueError(f"{len(stats)} activation statistics for {len(groups)} groups")
    for g, a in zip(groups, stats):
        apply_smoothing(g, a, alpha)
    return groups


def _skipped(name: str, skip: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(s in parts or name.endswith(s) for s in skip)


def swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module],
                 skip: Iterable[str] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear (except those named in skip) with make(linear); returns names."""
    swapped = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and not _skipped(name, skip):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, make(mod))
            swapped.append(name)
    return swapped


def quantize_model(model: nn.Module, mode: Quantization | str, calib_batches: Iterable | None = None,
                   alpha: float = 0.65, lm_head: bool = False,
                   forward_fn: Callable | None = None, **int8_kwargs) -> nn.Module:
    """Apply a quantization mode in place. INT8 smooths first when calib_batches are given.
    lm_head=True quantizes the output projection too (smoothed with the final norm when
    calibrated); int8_kwargs go to Int8Linear (per_channel, per_token, scheme)."""
    mode = Quantization(mode)
    if mode is Quantization.BF16:
        return model.to(torch.bfloat16)
    if mode is Quantization.INT8:
        if calib_batches is not None:
            groups = llama_smooth_groups(model, lm_head=lm_head)
            smooth_model(model, calib_batches, alpha, groups=groups, forward_fn=forward_fn)
        swap_linears(model, lambda lin: Int8Linear(lin, **int8_kwargs), skip=() if lm_head else ("lm_head",))
    return model
