"""``Linear``: ``nn.Linear`` whose CPU bf16-autocast forward adds the bias inside the GEMM (oneDNN epilogue).

Under CPU bf16 autocast, ``F.linear`` with a bias runs ``addmm``, which first copies the broadcast bias into
the output and then accumulates the product onto it: one extra write + read of the [N, out] result (for
ELECTRA-small's FFN, [4096, 1024] per layer: ~25% of the GEMM's time on this CPU). oneDNN's matmul adds the
bias in its epilogue instead (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor emits for CPU
linears). Same casts as autocast (input, weight and bias to bf16), same products, bf16 output; the backward
is ``addmm``'s (dX = dY W, dW = dY^T X, db = sum dY).

:func:`gelu_mlp` (a feed-forward block, erf GELU) adds to that path the GELU's backward as the epilogue of the
second product's input gradient (``_GeluMLP``; its forward keeps gelu'(z) from ``electra_fast_cpp::gelu_and_grad``
instead of z).

Anywhere else - fp32, CUDA, the eager twin (``eager_twin_mode()``), torch.compile tracing, a build
without oneDNN, a CPU where oneDNN has no native bf16 GEMM (it then cannot create these primitives at all: asked
once per process by ``_cpu.onednn_bf16_linear``, which probes the ops) - it is ``nn.Linear``. Parameter names,
init and ``isinstance(m, nn.Linear)`` are unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _cpu, _extension
from .dropout import eager_twin

_MIN_OUT = 16  # a [N, 1] prediction layer gains nothing from the epilogue


class _EpilogueLinear(torch.autograd.Function):
    """x [N, in], weight [out, in], bias [out] or None, one dtype -> [N, out] (bias added by the GEMM)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dx = grad.mm(weight) if ctx.needs_input_grad[0] else None
        dw = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class _GeluMLP(torch.autograd.Function):
    """x [N, in] -> (gelu(x w1^T + b1)) w2^T + b2, one dtype (bf16), erf GELU.

    The forward keeps gelu'(z) (``gelu_and_grad``: one pass writes gelu(z) and gelu'(z); z itself is dropped), so
    the backward's dz = (dY w2) * gelu'(z) is the epilogue of the dY w2 product (oneDNN's binary-mul post-op)
    instead of a separate gelu_backward pass over [N, intermediate]: ~1 ms per ELECTRA-small layer. Rounding:
    gelu'(z) is rounded to bf16 where the unfused backward rounds dY w2 instead (one bf16 rounding either way).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        z = torch.ops.mkldnn._linear_pointwise(x, w1, b1, "none", [], "")
        a, s = _GELU_AND_GRAD(z)
        del z
        ctx.save_for_backward(x, w1, a, s, w2)
        ctx.has_bias = (b1 is not None, b2 is not None)
        return torch.ops.mkldnn._linear_pointwise(a, w2, b2, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, w1, a, s, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        dw2 = grad.t().mm(a) if need[3] else None
        db2 = grad.sum(0) if ctx.has_bias[1] and need[4] else None
        dz = torch.ops.mkldnn._linear_pointwise.binary(grad, s, w2.t().contiguous(), None, "mul")
        dx = dz.mm(w1) if need[0] else None
        dw1 = dz.t().mm(x) if need[1] else None
        db1 = dz.sum(0) if ctx.has_bias[0] and need[2] else None
        return dx, dw1, db1, dw2, db2


_GELU_AND_GRAD = _extension.cpp_op("gelu_and_grad")


def _fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() >= 2 and weight.shape[0] >= _MIN_OUT
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.compiler.is_compiling() and not eager_twin() and _cpu.onednn_bf16_linear()[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x [..., in] -> [..., out]. See the module docstring for the fast path."""
    if _fast_path(x, weight):
        bf16 = torch.bfloat16
        with torch.autocast("cpu", enabled=False):  # the casts autocast would make, done once here
            x2 = x.reshape(-1, x.shape[-1]).to(bf16).contiguous()
            out = _EpilogueLinear.apply(x2, weight.to(bf16), None if bias is None else bias.to(bf16))
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.bfloat16)


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
             b2: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear(F.gelu(linear(x, w1, b1)), w2, b2)`` (a transformer's feed-forward block, erf GELU); x [..., in]
    -> [..., out]. Under the fast path (with the C++ extension) the GELU's backward runs inside the second
    product's (``_GeluMLP``)."""
    if _GELU_AND_GRAD is not None and _fast_path(x, w1) and w2.shape[0] >= _MIN_OUT:
        with torch.autocast("cpu", enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
            out = _GeluMLP.apply(x2, _cast(w1), _cast(b1), _cast(w2), _cast(b2))
        return out.view(*x.shape[:-1], w2.shape[0])
    return linear(F.gelu(linear(x, w1, b1)), w2, b2)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and init) with :func:`linear`'s CPU bf16-autocast fast path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
