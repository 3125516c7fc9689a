"""Images in the transformers backend: a request's processor outputs (MultimodalInput.processor_inputs,
made by service/multimodal/hf_prep.py) turned into the keyword arguments of each forward.

What goes where, as transformers' own `generate` does it (5.x):
- the prefill (the request's first forward) gets every processor output: pixel_values and their
  companions (pixel_attention_mask for Idefics3/SmolVLM; image_grid_thw and mm_token_type_ids for
  Qwen2-VL; aspect_ratio_ids/_mask and cross_attention_mask for Mllama; image_sizes...);
- decode steps get none of them (the image is in the KV cache by then: placeholder rows for early
  fusion, the cross-attention layers' keys/values for Mllama), except Mllama's cross_attention_mask,
  which gains one row per generated token, a copy of the prompt's last row
  (MllamaForConditionalGeneration._update_model_kwargs_for_generation);
- these tensors are shaped per image, per patch or per sample depending on the family, so a
  request's n sequences are not batched at the prefill: it runs once, at batch 1, and the cache is
  then repeated n times (`expand_cache`), as generate's expansion would give, without recomputing
  the vision tower n times.
Qwen2-VL keeps the M-RoPE offset of the last prefill on the model (`model.model.rope_deltas`) and
reads it at every decode step: `rope_state_modules` finds such state so the engine clears it before
each prefill (a text-only request must not inherit an image request's offset).
"""

from __future__ import annotations

from typing import Any

import torch

# Processor outputs with one row per token that a decode step extends by repeating the last row
# (Mllama: every generated token attends to the images the prompt's last token attended to).
GROWING_MASKS = ("cross_attention_mask",)
# Never keyword arguments: the engine passes the ids itself and runs without padding.
NOT_FORWARDED = frozenset({"input_ids", "attention_mask"})


def prefill_kwargs(processor_inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The prefill's image arguments: tensors on the model's device, floating ones in its dtype."""
    out: dict[str, Any] = {}
    for key, value in processor_inputs.items():
        if key in NOT_FORWARDED or value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        out[key] = value
    return out


def decode_kwargs(prefill: dict[str, Any], num_seqs: int) -> dict[str, Any]:
    """The image arguments of every decode step (one new token per sequence), from the prefill's."""
    out: dict[str, Any] = {}
    for key in GROWING_MASKS:
        mask = prefill.get(key)  # [1, T, ...]
        if isinstance(mask, torch.Tensor):
            last = mask[:, -1:]  # [1, 1, ...]
            out[key] = last.repeat(num_seqs, *([1] * (last.dim() - 1)))  # [n, 1, ...]
    return out


def expand_cache(cache, num_seqs: int) -> None:
    """A batch-1 prefill's cache -> num_seqs identical rows (in place)."""
    if num_seqs > 1:
        cache.batch_repeat_interleave(num_seqs)


def rope_state_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that keep position state between forwards (Qwen2-VL's `rope_deltas`)."""
    return [m for m in model.modules() if "rope_deltas" in vars(m)]


def clear_rope_state(modules: list[torch.nn.Module]) -> None:
    for m in modules:
        m.rope_deltas = None


def token_id_bound(model) -> int | None:
    """One past the largest token id the model embeds: the text vocabulary, or the input embedding's
    rows where they are more (Mllama's image token sits past its text vocabulary)."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    bounds = [getattr(text, "vocab_size", None) or getattr(cfg, "vocab_size", None)]
    try:
        bounds.append(getattr(model.get_input_embeddings(), "num_embeddings", None))
    except (AttributeError, NotImplementedError):
        pass
    bounds = [b for b in bounds if b]
    return max(bounds) if bounds else None


def max_positions(model) -> int | None:
    """The model's own context limit (the text model's, for a vision-language model)."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "max_position_embeddings", None) or getattr(cfg, "max_position_embeddings", None)
