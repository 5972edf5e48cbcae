"""``Linear``: ``nn.Linear`` whose CPU bf16-autocast forward adds the bias inside the GEMM (oneDNN epilogue).

Under CPU bf16 autocast, ``F.linear`` with a bias runs ``addmm``, which first copies the broadcast bias into
the output and then accumulates the product onto it: one extra write + read of the [N, out] result (for
ELECTRA-small's FFN, [4096, 1024] per layer: ~25% of the GEMM's time on this CPU). oneDNN's matmul adds the
bias in its epilogue instead (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor emits for CPU
linears). Same casts as autocast (input, weight and bias to bf16), same products, bf16 output; the backward
is ``addmm``'s (dX = dY W, dW = dY^T X, db = sum dY).

Anywhere else - fp32, CUDA, the eager twin (``use_backend("reference")``), torch.compile tracing, a build
without oneDNN - it is ``nn.Linear``. Parameter names, init and ``isinstance(m, nn.Linear)`` are unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import eager_twin

_MIN_OUT = 16  # a [N, 1] prediction layer gains nothing from the epilogue


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _has_onednn_linear()


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x [..., in] -> [..., out]. See the module docstring for the fast path."""
    if (_ONEDNN and x.device.type == "cpu" and x.dim() >= 2 and weight.shape[0] >= _MIN_OUT
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.compiler.is_compiling() and not eager_twin()):
        bf16 = torch.bfloat16
        with torch.autocast("cpu", enabled=False):  # the casts autocast would make, done once here
            x2 = x.reshape(-1, x.shape[-1]).to(bf16).contiguous()
            out = _EpilogueLinear.apply(x2, weight.to(bf16), None if bias is None else bias.to(bf16))
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and init) with :func:`linear`'s CPU bf16-autocast fast path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
