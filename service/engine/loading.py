"""Checkpoint directory -> running engine: the native engine (Llama family, safetensors or GGUF) and
the transformers backend (anything AutoModelForCausalLM loads; vision-language models through
AutoModelForImageTextToText + AutoProcessor).

Both loaders take one `EngineConfig` (service/engine/config.py) and fix everything at load: the
context limit, the quantization and CPU kernels (native), and the EOS ids: the checkpoint's
generation config, the tokenizer's eos token and `config.extra_eos_tokens` (the manifest's
end-of-turn tokens) resolved to ids. What the loader chose is the engine's `kernels`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import torch

from service.engine.config import EngineConfig, Quantization
from service.engine.hf_backend import HFEngine
from service.engine.native import NativeEngine

log = logging.getLogger(__name__)


def resolve_eos(tokenizer, generation_eos: int | Iterable[int] | None, extra_tokens: Iterable[str]) -> frozenset[int]:
    """The ids that end a sequence: the generation config's eos (an id or a list), the tokenizer's
    eos token and each extra token string the vocabulary knows (unknown ones are logged, skipped)."""
    ids: set[int] = set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos is not None:
        ids.update(int(x) for x in generation_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in extra_tokens:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and (tid != unk or tok == getattr(tokenizer, "unk_token", None)):
            ids.add(tid)
        else:
            log.warning("extra EOS token %r is not in the vocabulary; ignored", tok)
    return frozenset(ids)


def _generation_eos(model_dir: Path) -> int | list[int] | None:
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model_dir).eos_token_id
    except Exception:  # no generation_config.json (GGUF, bare checkpoints): the tokenizer decides
        return None


def _quantize(model, config: EngineConfig, tokenizer, limit: int) -> dict[str, Any]:
    from service.modeling.quant import quantize_model

    if config.quantization is not Quantization.INT8 or next(model.parameters()).device.type != "cpu":
        quantize_model(model, config.quantization)
        return {"quantization": config.quantization.value}
    from service.modeling.cpu_kernels import prepare_for_cpu

    return prepare_for_cpu(model, tokenizer, limit, config.int8_scheme, config.cpu_kernels, config.kernel_cache)


def load_tokenizer(model_dir):
    """The tokenizer of a model directory or GGUF file."""
    from transformers import AutoTokenizer

    from service.modeling.loader import find_gguf

    path = Path(model_dir)
    gguf = find_gguf(path)
    if gguf is not None:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(path)


def load_native_model(model_dir, device: torch.device | str, dtype: torch.dtype, config: EngineConfig,
                      tokenizer=None):
    """(model, tokenizer, kernels): a Llama-family model (safetensors dir or GGUF) built, quantized as
    `config` says and ready to run (the engine's target, or a draft model for one)."""
    from service.modeling.loader import load_model, read_config

    path = Path(model_dir)
    cfg = read_config(path)  # raises UnsupportedArchitecture before any weight is read
    limit = min(cfg.max_position_embeddings, config.max_model_len or cfg.max_position_embeddings)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    model = load_model(path, device, dtype, max_positions=limit)
    kernels: dict[str, Any] = {"quantization": "none", "dtype": str(dtype).removeprefix("torch.")}
    if config.quantization is not Quantization.NONE:
        kernels.update(_quantize(model, config, tokenizer, limit))
    return model, tokenizer, kernels


def load_native_engine(model_dir, device: torch.device | str, dtype: torch.dtype,
                       config: EngineConfig | None = None) -> NativeEngine:
    """Load a Llama-family model (safetensors dir or GGUF) into a NativeEngine.

    quantization int8 on CPU: each linear shape gets the faster of int8 and fp16-weight kernels,
    measured at load (or forced by cpu_kernels; cached in kernel_cache): service/modeling/cpu_kernels.py.
    Raises `service.modeling.loader.UnsupportedArchitecture` for models the native code cannot run."""
    from service.modeling.loader import find_gguf

    config = config or EngineConfig()
    path = Path(model_dir)
    model, tokenizer, kernels = load_native_model(path, device, dtype, config)
    gguf = find_gguf(path)
    eos = resolve_eos(tokenizer, _generation_eos(path if gguf is None else gguf.parent), config.extra_eos_tokens)
    return NativeEngine(model, tokenizer, eos, config, kernels)


def load_hf_engine(model_dir, device: torch.device | str, dtype: torch.dtype,
                   config: EngineConfig | None = None) -> HFEngine:
    """Load a causal LM and its tokenizer from a local directory into an HFEngine (weights in
    `dtype`; the config's quantization and native-engine options do not apply)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or EngineConfig()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    gen = model.generation_config.eos_token_id if model.generation_config else None
    eos = resolve_eos(tokenizer, gen, config.extra_eos_tokens)
    kernels = {"backend": "transformers", "dtype": str(dtype).removeprefix("torch.")}
    return HFEngine(model, tokenizer, eos, config, kernels)


def model_input_names(model) -> frozenset[str]:
    """The keyword arguments a model's forward names (where processor outputs may go)."""
    import inspect

    params = inspect.signature(model.forward).parameters.values()
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def load_hf_vision_engine(model_dir, device: torch.device | str, dtype: torch.dtype,
                          config: EngineConfig | None = None, processor=None, max_images: int | None = None):
    """(HFEngine, HFVisionPrep): an image-text-to-text model (LLaVA, Idefics3/SmolVLM, Qwen2-VL, Mllama...)
    and its processor from a local directory. The engine's tokenizer is the processor's (given the
    processor's chat template if it has none); EOS ids are resolved as for load_hf_engine.
    processor: an already built processor instead of AutoProcessor's (tests; custom processors).
    Note: in transformers 5.x, processors with a video processor (Qwen2-VL) need torchvision;
    AutoProcessor raises ImportError without it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from service.multimodal.hf_prep import HFVisionPrep

    config = config or EngineConfig()
    if processor is None:
        processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    if getattr(tokenizer, "chat_template", None) is None and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template  # the serving layer renders with the tokenizer
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device)
    gen = model.generation_config.eos_token_id if model.generation_config else None
    eos = resolve_eos(tokenizer, gen, config.extra_eos_tokens)
    kernels = {"backend": "transformers", "dtype": str(dtype).removeprefix("torch."),
               "architecture": type(model).__name__}
    engine = HFEngine(model, tokenizer, eos, config, kernels)
    return engine, HFVisionPrep(processor, max_images, model_input_names(model))
