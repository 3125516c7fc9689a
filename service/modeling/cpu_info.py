"""What CPU (and which of its features) the process runs on: logged at load, shown on the model
card and written next to every benchmark number. Containers often hide the model name, and env
settings can narrow what the kernels use, so both are reported."""
from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")


def _proc_cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if model != "unknown" and flags:
                    break
    except OSError:  # not Linux: the model name from platform, no flags
        pass
    return model, flags


@lru_cache(maxsize=1)
def cpu_summary() -> dict:
    from service.modeling.int8_linear import kernel_saturates

    model, flags = _proc_cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "cores": cores,
        "torch": torch.__version__,
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
        "int8_kernel_saturates": kernel_saturates(),
    }


def cpu_signature() -> str:
    """A short key for caches of per-CPU choices (kernel timings)."""
    s = cpu_summary()
    env = ",".join(f"{k}={v}" for k, v in sorted(s["isa_env"].items()))
    return f"{s['cpu']}|{'+'.join(s['flags'])}|{s['cores']}|{s['torch']}|{s['aten_capability']}|{env}"
