"""Build a native Llama-family model from a HF safetensors directory or a GGUF file.

The model is built on the meta device (no init cost, no double memory), materialized once with
`to_empty`, then filled tensor by tensor: HF q/k/v and gate/up weights are written into row slices
of the fused `qkv_proj` / `gate_up_proj`. Architectures we do not implement raise
`UnsupportedArchitecture`, which the pool treats as "use the transformers backend".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from service.modeling.llama import LlamaForCausalLM, ModelConfig, rope_inv_freq

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedArchitecture(Exception):
    """The native engine cannot run this model; fall back to the transformers backend."""


def config_from_hf(d: dict) -> ModelConfig:
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(f"model_type {mt!r} is not native (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if d.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitecture(f"hidden_act {d.get('hidden_act')!r} is not supported natively")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    if float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedArchitecture("partial rotary embeddings are not supported natively")
    heads = d["num_attention_heads"]
    window = d.get("sliding_window") if mt == "mistral" else None
    if mt == "qwen2" and d.get("use_sliding_window") and "sliding_attention" in (d.get("layer_types") or ["sliding_attention"]):
        raise UnsupportedArchitecture("Qwen2 sliding-window layers are not supported natively")
    cfg = ModelConfig(
        model_type=mt,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rope_scaling=rope,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or bool(d.get("attention_bias", False)),
        o_bias=mt != "qwen2" and bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        sliding_window=window,
    )
    try:
        rope_inv_freq(cfg)
    except (ValueError, KeyError) as exc:
        raise UnsupportedArchitecture(f"RoPE scaling {rope!r}: {exc}") from exc
    return cfg


def _hf_target(name: str, cfg: ModelConfig) -> tuple[str, int, int] | None:
    """HF tensor name -> (our parameter name, row offset, row count) in the fused layout."""
    m = re.match(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|gate|up)_proj\.(weight|bias)$", name)
    if not m:
        return name, 0, -1
    layer, block, which, kind = m.groups()
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    fused, offset, rows = {
        "q": ("qkv_proj", 0, q), "k": ("qkv_proj", q, kv), "v": ("qkv_proj", q + kv, kv),
        "gate": ("gate_up_proj", 0, inter), "up": ("gate_up_proj", inter, inter),
    }[which]
    return f"model.layers.{layer}.{block}.{fused}.{kind}", offset, rows


def _materialize(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each module its own storage; re-share lm_head/embeddings
    return model.eval().requires_grad_(False)


def _fill(model: LlamaForCausalLM, tensors, cfg: ModelConfig) -> None:
    """tensors: iterable of (HF name, tensor). Every parameter must be written exactly once."""
    params = dict(model.named_parameters(remove_duplicate=False))
    remaining = {n: p.shape[0] if p.dim() else 1 for n, p in params.items()}
    if cfg.tie_word_embeddings:
        remaining.pop("lm_head.weight", None)
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        target, offset, rows = _hf_target(name, cfg)
        if target not in params:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        dst = params[target]
        rows = dst.shape[0] if rows < 0 else rows
        dst[offset : offset + rows].copy_(t.reshape(dst[offset : offset + rows].shape))
        remaining[target] -= rows
    missing = [n for n, r in remaining.items() if r != 0]
    if missing:
        raise ValueError(f"checkpoint lacks tensors for {missing[:5]}")


def _safetensors_tensors(model_dir: Path):
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def find_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if ggufs else None
    return None


def read_config(path) -> ModelConfig:
    """The model's config (config.json or GGUF metadata); raises UnsupportedArchitecture early."""
    path = Path(path)
    gguf_path = find_gguf(path)
    if gguf_path is not None:
        return gguf_config(gguf_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has neither config.json nor a .gguf file")
    return config_from_hf(json.loads((path / "config.json").read_text()))


def load_model(path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               max_positions: int | None = None) -> LlamaForCausalLM:
    """A safetensors model directory (config.json + *.safetensors) or a .gguf file / directory."""
    path, device = Path(path), torch.device(device)
    cfg = read_config(path)
    gguf_path = find_gguf(path)
    tensors = gguf_tensors(gguf_path, cfg) if gguf_path is not None else _safetensors_tensors(path)
    model = _materialize(cfg, device, dtype)
    with torch.no_grad():
        _fill(model, tensors, cfg)
    model.init_rope(max_positions or cfg.max_position_embeddings)
    return model


# ---- GGUF (llama.cpp) ----
_GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _gguf_reader(path: Path):
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a declared dependency
        raise UnsupportedArchitecture("the gguf package is not installed") from exc
    return gguf.GGUFReader(str(path))


def gguf_config(path: Path) -> ModelConfig:
    r = _gguf_reader(path)

    def get(key, default=None):
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    arch = get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise UnsupportedArchitecture(f"GGUF architecture {arch!r} is not native")
    names = {t.name for t in r.tensors}
    heads = get(f"{arch}.attention.head_count")
    hidden = get(f"{arch}.embedding_length")
    rope: dict = {}
    kind = get(f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        rope = {"rope_type": kind, "factor": get(f"{arch}.rope.scaling.factor"),
                "original_max_position_embeddings": get(f"{arch}.rope.scaling.original_context_length")}
    elif kind not in (None, "none"):
        raise UnsupportedArchitecture(f"GGUF rope scaling {kind!r} is not native")
    if "rope_freqs.weight" in names:  # llama3-style per-frequency divisors, stored precomputed
        t = next(t for t in r.tensors if t.name == "rope_freqs.weight")
        rope = {"rope_type": "freq_factors", "factors": [float(x) for x in t.data]}
    vocab = get(f"{arch}.vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        model_type=_GGUF_ARCHS[arch], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=get(f"{arch}.feed_forward_length"), num_layers=get(f"{arch}.block_count"),
        num_heads=heads, num_kv_heads=get(f"{arch}.attention.head_count_kv") or heads,
        head_dim=get(f"{arch}.attention.key_length") or hidden // heads,
        rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=get(f"{arch}.context_length", 2048),
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)), rope_scaling=rope,
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names, sliding_window=get(f"{arch}.attention.sliding_window"),
    )


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF's split halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(path: Path, cfg: ModelConfig):
    """Yield (HF name, float32 tensor), dequantizing quantized GGUF blocks with gguf-py."""
    from gguf import GGMLQuantizationType, quants

    r = _gguf_reader(path)
    permuted = cfg.model_type in ("llama", "mistral")  # llama.cpp permutes q/k only for these
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue
        parts = t.name.split(".")
        if parts[0] == "blk":
            layer, base, kind = parts[1], parts[2], parts[3]
            name = f"model.layers.{layer}.{_GGUF_NAMES[base]}.{kind}"
        else:
            base, kind = parts[0], parts[1]
            name = f"{_GGUF_NAMES[base]}.{kind}"
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = t.data
        else:
            data = quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(data.copy()).float().reshape([int(x) for x in reversed(t.shape)])
        if permuted and base == "attn_q":
            w = _unpermute(w, cfg.num_heads)
        elif permuted and base == "attn_k":
            w = _unpermute(w, cfg.num_kv_heads)
        yield name, w
