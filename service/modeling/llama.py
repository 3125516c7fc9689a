"""Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral) for the native engine.

The model works on a flat, varlen batch: `input_ids: [num_tokens]` with per-token positions; how
tokens attend (paged KV cache, one sequence per row) is delegated to an attention context the
runner supplies, so this file holds no cache logic. q/k/v and gate/up are fused into one matmul each
(fewer, larger GEMMs: on CPU the per-call overhead matters at small batch). Module names follow HF so
quantization and weight loading can address them: `model.layers[i].self_attn.qkv_proj`, ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the cos/sin scale, computed as transformers does
    (same op order, so fp32 results are bit-identical). Only position-independent variants."""
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default")) or "default"
    dim, base = cfg.head_dim, cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if kind == "default":
        return inv, 1.0
    if kind == "freq_factors":  # GGUF: llama3 scaling stored as one divisor per frequency
        return inv / torch.tensor(s["factors"], dtype=torch.float32), 1.0
    factor = float(s["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        lo_f, hi_f = s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > old / lo_f, inv / factor, inv)
        smooth = (old / wavelen - lo_f) / (hi_f - lo_f)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / hi_f) * ~(wavelen > old / lo_f)
        return torch.where(medium, smoothed, out), 1.0
    if kind == "yarn":
        return _yarn(s, dim, base, factor)
    raise ValueError(f"rope_type {kind!r} is not supported by the native engine")


def _yarn(s: dict, dim: int, base: float, factor: float) -> tuple[torch.Tensor, float]:
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    orig = s["original_max_position_embeddings"]

    def corr(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = corr(fast), corr(slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra
    return inv, attn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # fused kernel; bit-identical to the formula below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, 1, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn) -> torch.Tensor:
        # x: [num_tokens, hidden]
        n, qk_size = x.shape[0], self.q_size + self.kv_size
        qkv = self.qkv_proj(x)  # [num_tokens, (Hq + 2 * Hkv) * head_dim]
        # q and k are adjacent columns: rotate both with one set of ops (fewer kernel launches)
        qk = apply_rope(qkv[:, :qk_size].view(n, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, qk_size:].view(n, self.num_kv_heads, self.head_dim)
        o = attn(self.layer_idx, q, k, v)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(o.reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # RoPE tables [max_positions, head_dim]; built on the real device by init_rope().
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rope(self, max_positions: int) -> None:
        device = self.model.embed_tokens.weight.device
        dtype = self.model.embed_tokens.weight.dtype
        inv, scale = rope_inv_freq(self.config)
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv.to(device="cpu")
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.rope_cos = (emb.cos() * scale).to(device=device, dtype=dtype)
        self.rope_sin = (emb.sin() * scale).to(device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, attn=None,
                embeds_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> final hidden states [num_tokens, hidden].

        `attn(layer_idx, q, k, v) -> o` does the attention; None = one causal sequence, no cache
        (then input_ids may also be [B, T]: B independent sequences, e.g. calibration batches).
        embeds_at = (index [M], rows [M, hidden]): input rows that replace the token embeddings at
        those flat positions (early fusion: an image's encoder rows at its placeholder positions)."""
        if input_ids.dim() == 2:
            return torch.stack([self(row) for row in input_ids])
        if positions is None:
            positions = torch.arange(input_ids.shape[0], device=input_ids.device)
        attn = attn or causal_attention
        x = self.model.embed_tokens(input_ids)
        if embeds_at is not None:
            x = x.index_copy(0, embeds_at[0], embeds_at[1].to(x.dtype))
        cos = self.rope_cos[positions].unsqueeze(1)  # [num_tokens, 1, head_dim]
        sin = self.rope_sin[positions].unsqueeze(1)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [rows, hidden] -> logits [rows, vocab] (float32 for the sampler)
        return self.lm_head(hidden).float()


def causal_attention(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention over one sequence. q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    return o.transpose(0, 1)
