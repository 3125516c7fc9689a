"""Engine configuration: one frozen dataclass with every option an engine takes, and the one
quantization enum (manifests, Settings and the quantized modules all use it).

Torch-free on purpose: Settings and manifests import this module. The pool builds an
`EngineConfig` from Settings + the model's manifest (service/pool/pool.py `engine_config`);
engines never read Settings. Runtime measurements (KV blocks that fit, the kernels chosen) are
engine attributes, never written back here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

MAX_SPECULATIVE_TOKENS = 16  # most tokens one speculative step may propose (request, setting, manifest)
DEFAULT_KV_CACHE_BYTES = 512 * 1024 * 1024  # the native engine's paged KV pool per model
INT8_SCHEMES = ("auto", "a8w8", "a7w8r")  # service/modeling/int8_linear.py (a7w8: bench only)
CPU_KERNELS = ("auto", "int8", "fp16")  # service/modeling/cpu_kernels.py


class Quantization(str, enum.Enum):
    """How the weights are stored and run (chosen explicitly in a manifest, never guessed)."""

    NONE = "none"  # the dtype setting's weights
    INT8 = "int8"  # per-channel weights, per-token dynamic activations (+ smoothing if calibrated)
    BF16 = "bf16"


@dataclass(frozen=True)
class EngineConfig:
    # Cap on context length (prompt + generated); None = the model's own limit. The native engine
    # also caps it at what its KV cache holds.
    max_model_len: int | None = None
    max_waiting: int = 256  # sequences (prompts x n) queued before admission answers 429
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES  # native: the paged KV pool
    block_size: int = 16  # native: tokens per KV block
    max_num_seqs: int = 64  # native: sequences running in one step
    max_num_batched_tokens: int = 256  # native: tokens per step (decode rows + prefill chunks)
    enable_prefix_caching: bool = True  # native: share computed prompt blocks across requests
    quantization: Quantization = Quantization.NONE  # native loader
    int8_scheme: str = "auto"  # auto | a8w8 | a7w8r (quantization int8 on CPU)
    cpu_kernels: str = "auto"  # auto (measured per linear shape) | int8 | fp16 (quantization int8 on CPU)
    kernel_cache: Path | None = None  # where measured kernel choices are cached (JSON)
    extra_eos_tokens: tuple[str, ...] = ()  # token strings that also end generation (manifest eos_tokens)
    # native: no sequence speculates while more than this many decode in one step (bench/speculative.py)
    spec_max_batch: int = 1

    def __post_init__(self) -> None:
        # Accept plain values where callers naturally have them ("int8", a list of tokens).
        object.__setattr__(self, "quantization", Quantization(self.quantization or Quantization.NONE))
        object.__setattr__(self, "extra_eos_tokens", tuple(self.extra_eos_tokens))
        if self.kernel_cache is not None:
            object.__setattr__(self, "kernel_cache", Path(self.kernel_cache))
        for name in ("kv_cache_bytes", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be at least 0, got {self.max_waiting}")
        if self.int8_scheme not in INT8_SCHEMES:
            raise ValueError(f"int8_scheme must be one of {', '.join(INT8_SCHEMES)}, got {self.int8_scheme!r}")
        if self.cpu_kernels not in CPU_KERNELS:
            raise ValueError(f"cpu_kernels must be one of {', '.join(CPU_KERNELS)}, got {self.cpu_kernels!r}")
