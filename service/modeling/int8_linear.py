"""Int8 linear layers on CPU (fbgemm via `quantized::linear_dynamic`, engine 'x86'), in schemes
that are exact on the kernel the CPU really runs.

fbgemm multiplies u8 activations by s8 weights. With AVX-512 VNNI (vpdpbusd) the products are
summed in int32: exact. Without it (AVX2, AVX-512 without VNNI, or FBGEMM_ENABLE_INSTRUCTIONS=AVX2)
pairs of products are summed in *saturating int16* (vpmaddubsw): 8-bit activations times 8-bit
weights overflow (2 * 255 * 127 > 32767) and the layer's output is wrong by up to ~15%. The
schemes below keep every pair sum in range, so their numerics are the same on every x86 CPU:

- a8w8: 8-bit activations, 8-bit weights. Exact only on a non-saturating kernel (VNNI).
- a7w8: 7-bit activations (`reduce_range`), 8-bit weights: 2 * 127 * 127 fits in int16.
- a7w8r: a7w8 plus a second pass over the activation rounding error (each row's residual, scaled
  to its own max, is appended as an extra row of the same GEMM): ~14-bit activations for one
  GEMM call with twice the rows (weights are read once; batch-1 decode costs about the same).

Which schemes a CPU can run is decided by probing the kernel (`kernel_saturates`), not by flags:
containers and env settings can make fbgemm run other code than the CPU's flags suggest.
"""
from __future__ import annotations

import enum
import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class Int8Scheme(str, enum.Enum):
    A8W8 = "a8w8"
    A7W8 = "a7w8"
    A7W8_RESIDUAL = "a7w8r"

    @property
    def reduce_range(self) -> bool:
        return self is not Int8Scheme.A8W8

    @property
    def residual(self) -> bool:
        return self is Int8Scheme.A7W8_RESIDUAL

    @property
    def needs_exact_kernel(self) -> bool:
        return self is Int8Scheme.A8W8


def _set_x86_engine() -> None:
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"


def _prepack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    # q: [out, in] int8, scale: [out] -> fbgemm packed weight (a ScriptObject)
    _set_x86_engine()
    zp = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensor constructors are flagged deprecated
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zp, 0)
        return torch.ops.quantized.linear_prepack(qw, bias)


@functools.lru_cache(maxsize=None)
def kernel_saturates() -> bool:
    """True when the int8 kernel sums u8*s8 pairs in saturating int16 (no VNNI on the path fbgemm
    takes). Probed with a product that overflows int16: all activations at 255, weights at 127."""
    k = 64
    packed = _prepack(torch.full((4, k), 127, dtype=torch.int8), torch.full((4,), 1.0 / 127), None)
    x = torch.ones(1, k)
    x[0, 0] = 0.0  # range [0, 1]: every other activation quantizes to 255
    y = torch.ops.quantized.linear_dynamic(x, packed, False)  # [1, 4]; exact answer k - 1
    return bool((y - (k - 1)).abs().max().item() > 0.5)


def default_scheme() -> Int8Scheme:
    """The most accurate scheme that is exact here: a8w8 on VNNI, else the residual 7-bit one."""
    return Int8Scheme.A7W8_RESIDUAL if kernel_saturates() else Int8Scheme.A8W8


# What fbgemm's ChooseQuantizationParams picks for 7-bit activations over the pinned range [-1, 1]:
# scale 2/127, zero point 63.5 rounded half to even.
A7_QMAX = 127
A7_SCALE, A7_ZERO_POINT = 2.0 / A7_QMAX, round(A7_QMAX / 2)


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with int8 weights and dynamically quantized activations.

    per_token=True divides each row by its max-abs and multiplies the output back; two constant
    columns (+1, -1, zero weights) pin the kernel's per-tensor range to exactly [-1, 1], so a row's
    result does not depend on its batch-mates (prefill == decode, speculative verify == plain).
    """

    def __init__(self, linear: nn.Linear, per_channel: bool = True, per_token: bool = True,
                 scheme: Int8Scheme | str | None = None, reduce_range: bool | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.per_channel, self.per_token = per_channel, per_token
        if scheme is None:  # reduce_range: the older knob, kept for benchmarks and tests
            scheme = default_scheme() if reduce_range is None else (
                Int8Scheme.A7W8 if reduce_range else Int8Scheme.A8W8)
        self.scheme = Int8Scheme(scheme)
        if self.scheme.residual and not per_token:
            raise ValueError("the residual scheme needs per-token scaling")
        w = linear.weight.detach().float().cpu()  # [out, in]
        amax = w.abs().amax(1) if per_channel else w.abs().amax().expand(w.shape[0])
        scale = amax.clamp_min(1e-8) / 127.0  # [out]
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale.contiguous())
        bias = None if linear.bias is None else linear.bias.detach().float().cpu().clone()
        self.register_buffer("bias", bias)
        self._packed = None
        self._pin = torch.tensor([1.0, -1.0])  # values of the two range-pinning columns
        self.register_load_state_dict_post_hook(lambda mod, _keys: mod._pack())
        self._pack()

    @property
    def reduce_range(self) -> bool:
        return self.scheme.reduce_range

    def _pack(self) -> None:
        # The packed object is a ScriptObject: not moved by .to(), not in state_dict; rebuilt here.
        q = self.qweight.cpu()
        if self.per_token:  # zero weight columns for the two range-pinning input columns
            q = torch.cat([q, q.new_zeros(q.shape[0], 2)], dim=1)
        bias = None if self.per_token or self.bias is None else self.bias.cpu()
        self._packed = _prepack(q, self.weight_scale.cpu(), bias)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def _pinned(self, rows: torch.Tensor) -> torch.Tensor:
        # rows: [n, in] in [-1, 1] -> [n, in + 2] with the range-pinning columns
        xs = rows.new_empty(rows.shape[0], self.in_features + 2)
        xs[:, : self.in_features] = rows
        xs[:, self.in_features :] = self._pin
        return xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        if x.device.type != "cpu":  # no fbgemm off-CPU: dequantized weights (weight-only int8)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features).float()  # [n, in]
        if not self.per_token:
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self._packed, self.reduce_range)
            return y.reshape(*lead, self.out_features).to(dtype)
        r = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12)  # [n, 1]
        xn = x2 / r  # [n, in] in [-1, 1]
        if self.scheme.residual:
            y = self._residual_gemm(xn)
        else:
            y = torch.ops.quantized.linear_dynamic(self._pinned(xn), self._packed, self.reduce_range)
        y.mul_(r)  # in place: these small ops cost as much as the GEMM at decode batch sizes
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*lead, self.out_features).to(dtype)

    def _residual_gemm(self, xn: torch.Tensor) -> torch.Tensor:
        # xn: [n, in] -> [n, out]. Rows n..2n-1 carry the rounding error of rows 0..n-1 (as the
        # kernel will round them), each scaled to its own max; one GEMM computes both.
        n = xn.shape[0]
        deq = (torch.round(xn / A7_SCALE) + A7_ZERO_POINT).clamp_(0, A7_QMAX).sub_(A7_ZERO_POINT).mul_(A7_SCALE)
        err = xn - deq  # [n, in]; |err| <= scale / 2 where the kernel rounds as emulated
        r2 = err.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12)  # [n, 1]
        y = torch.ops.quantized.linear_dynamic(self._pinned(torch.cat([xn, err / r2])),
                                               self._packed, True)  # [2n, out]
        return y[:n].addcmul_(y[n:], r2)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"per_channel={self.per_channel}, per_token={self.per_token}, scheme={self.scheme.value}")
