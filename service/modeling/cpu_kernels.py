"""Linear kernels for CPU inference, chosen per layer shape at load by measurement.

Candidates for each nn.Linear shape: int8 (Int8Linear in the most accurate scheme that is exact on
this CPU's kernel) and fp16 weights (fbgemm `linear_dynamic_fp16`: half the bytes of fp32, fp32
activations and accumulation, so no activation rounding). Which is faster depends on the CPU and
the batch: on AVX2 fp16 weights win the decoder layers at decode batch sizes, int8 wins the large
lm_head; with VNNI int8 wins more (bench/int8_schemes.py). Both pass the quality bar (perplexity
within 3% of fp32: bench/results/perplexity.md), so the faster one is used.

One choice per shape, not per batch size: a row's numbers must not depend on its batch-mates
(prefill == decode, speculative verify == plain decode). The choice minimises the summed time of one
call at each batch bucket (decode batches and a prefill chunk). Timings are cached per CPU signature
so a restart does not measure again.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from service.modeling.cpu_info import cpu_signature
from service.modeling.int8_linear import Int8Linear, Int8Scheme

log = logging.getLogger(__name__)
BATCH_BUCKETS = (1, 8, 32, 256)  # decode batches, and a prefill chunk (max_num_batched_tokens)
KERNELS = ("int8", "fp16")
FP16_MAX = 65000.0  # fp16 saturates at 65504: larger weights are not eligible


class Fp16Linear(nn.Module):
    """nn.Linear with fp16 weights (fbgemm packed) and fp32 activations/accumulation."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight16", linear.weight.detach().to(torch.float16).cpu())
        bias = None if linear.bias is None else linear.bias.detach().float().cpu().clone()
        self.register_buffer("bias", bias)
        self.register_load_state_dict_post_hook(lambda mod, _keys: mod._pack())
        self._pack()

    def _pack(self) -> None:
        with warnings.catch_warnings():  # the fp16 prepack warns about deprecated quantized APIs
            warnings.simplefilter("ignore")
            self._packed = torch.ops.quantized.linear_prepack_fp16(self.weight16.float(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        if x.device.type != "cpu":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight16.to(x.dtype), bias)
        lead, dtype = x.shape[:-1], x.dtype
        y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features).float(), self._packed)
        return y.reshape(*lead, self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16"


def fp16_eligible(linear: nn.Linear) -> bool:
    return linear.weight.detach().abs().max().item() < FP16_MAX


def make_kernel(kind: str, linear: nn.Linear, scheme: Int8Scheme) -> nn.Module:
    if kind == "int8":
        return Int8Linear(linear, scheme=scheme)
    if kind == "fp16":
        return Fp16Linear(linear)
    raise ValueError(f"unknown CPU kernel {kind!r} (choose from {', '.join(KERNELS)})")


@torch.inference_mode()
def time_kernels(linear: nn.Linear, scheme: Int8Scheme, reps: int = 9) -> dict[str, dict[int, float]]:
    """Fastest ms per call of each candidate at each batch bucket (other load only adds time);
    calls alternate between candidates. "disturbed" is set when the median of some candidate was
    over twice its fastest call: a busy machine, whose numbers are used now but not cached."""
    mods = {k: make_kernel(k, linear, scheme) for k in KERNELS}  # times do not depend on the values
    out: dict = {k: {} for k in mods}
    disturbed = False
    for b in BATCH_BUCKETS:
        x = torch.randn(b, linear.in_features)
        ts: dict[str, list[float]] = {k: [] for k in mods}
        for m in mods.values():
            m(x)  # warm-up (packing caches, page faults) discarded
        for _ in range(reps):
            for k, m in mods.items():
                t = time.perf_counter()
                m(x)
                ts[k].append(time.perf_counter() - t)
        for k in mods:
            out[k][b] = round(1e3 * min(ts[k]), 4)
            disturbed |= statistics.median(ts[k]) > 2 * min(ts[k])
    if disturbed:
        out["disturbed"] = True
    return out


def pick(times: dict[str, dict[int, float]]) -> str:
    """The candidate with the least time for one call at every bucket together (ties: int8 first):
    a loaded server spends its time in large batches and prefill chunks, where one slow kernel costs
    the most. (Picking the smallest worst ratio per bucket instead chose fp16 weights for qkv/o on a
    VNNI CPU: +9% at one stream, -24% at 32 streams in bench/serve_load.py.)"""
    times = {k: v for k, v in times.items() if k in KERNELS}
    return min(times, key=lambda k: (sum(times[k].values()), KERNELS.index(k)))


class KernelCache:
    """{cpu signature: {"in x out": {"choice", "ms"}}} in one JSON file; unreadable = empty."""

    def __init__(self, path: Path | None):
        self.path = path
        self.key = cpu_signature() + f"|threads={torch.get_num_threads()}"
        self.data: dict = {}
        if path is not None and path.exists():
            try:
                self.data = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("kernel cache %s is unreadable; measuring again", path)

    def get(self, shape: str) -> dict | None:
        return self.data.get(self.key, {}).get(shape)

    def put(self, shape: str, entry: dict) -> None:
        self.data.setdefault(self.key, {})[shape] = entry

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError as exc:  # a read-only cache dir costs a measurement next start, nothing more
            log.warning("could not save kernel cache %s: %s", self.path, exc)


def choose_kernels(model: nn.Module, scheme: Int8Scheme, forced: str = "auto",
                   cache_path: Path | None = None) -> dict[str, str]:
    """{"in x out": kernel} for every distinct nn.Linear shape; measured unless forced or cached."""
    cache = KernelCache(cache_path)
    choices, dirty = {}, False
    for name, lin in model.named_modules():
        if not isinstance(lin, nn.Linear):
            continue
        shape = f"{lin.in_features}x{lin.out_features}"
        if shape in choices:
            continue
        if forced != "auto":
            choices[shape] = forced
            continue
        hit = cache.get(shape)
        if hit is None or hit.get("scheme") != scheme.value:
            hit = {"scheme": scheme.value, "ms": time_kernels(lin, scheme)}
            hit["choice"] = pick(hit["ms"])
            if not hit["ms"].get("disturbed"):  # a noisy measurement is used once, never kept
                cache.put(shape, hit)
                dirty = True
        choices[shape] = hit["choice"]
        log.info("linear %s (%s): %s; ms per call at batch %s: %s", shape, name, choices[shape],
                 "/".join(map(str, BATCH_BUCKETS)), hit["ms"])
    if dirty:
        cache.save()
    return choices


def settle_fp16(model: nn.Module, choices: dict[str, str]) -> dict[str, str]:
    """A shape with any weight past fp16's range runs int8 instead. Checked on the weights as they
    will be converted, i.e. after smoothing (which scales consumer columns up to 1e4x)."""
    settled = dict(choices)
    for lin in model.modules():
        shape = f"{lin.in_features}x{lin.out_features}" if isinstance(lin, nn.Linear) else None
        if shape is not None and settled.get(shape) == "fp16" and not fp16_eligible(lin):
            settled[shape] = "int8"
    return settled


def swap_kernels(model: nn.Module, choices: dict[str, str], scheme: Int8Scheme) -> None:
    from service.modeling.quant import swap_linears

    swap_linears(model, lambda lin: make_kernel(choices[f"{lin.in_features}x{lin.out_features}"], lin, scheme),
                 skip=())


def prepare_for_cpu(model: nn.Module, tokenizer, max_positions: int, int8_scheme: str = "auto",
                    kernels: str = "auto", cache_path: Path | None = None) -> dict:
    """Swap every linear (lm_head included) for its chosen CPU kernel, smoothing first when any
    layer runs int8 (calibrated on the packaged text, at most max_positions tokens per batch).
    Returns what was chosen, for the log and the model card."""
    from service.modeling.calibration import calibration_batches
    from service.modeling.int8_linear import default_scheme, kernel_saturates
    from service.modeling.quant import llama_smooth_groups, smooth_model

    scheme = default_scheme() if int8_scheme in (None, "", "auto") else Int8Scheme(int8_scheme)
    if scheme.needs_exact_kernel and kernel_saturates():
        raise ValueError(f"int8 scheme {scheme.value} needs an int8 kernel that sums in int32 (AVX-512 "
                         "VNNI); this CPU's kernel saturates: use auto or a7w8r")
    t0 = time.perf_counter()
    choices = choose_kernels(model, scheme, kernels, cache_path)
    with torch.inference_mode():
        if "int8" in choices.values():  # function-preserving: harmless to the fp16 layers
            batches = calibration_batches(tokenizer, seq_len=min(512, max_positions))
            smooth_model(model, batches, groups=llama_smooth_groups(model, lm_head=True),
                         forward_fn=lambda ids: model.compute_logits(model(ids)))
        choices = settle_fp16(model, choices)
        swap_kernels(model, choices, scheme)
    chosen = {"quantization": "int8", "linears": choices, "int8_scheme": scheme.value,
              "int8_kernel_saturates": kernel_saturates(), "selected_by": kernels if kernels != "auto" else
              "measurement"}
    log.info("CPU kernels chosen in %.1fs: %s", time.perf_counter() - t0, chosen)
    return chosen
