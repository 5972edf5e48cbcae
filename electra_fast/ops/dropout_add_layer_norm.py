"""electra_fast.dropout_add_layer_norm: ``LayerNorm(dropout(input) + residual)`` in one pass forward and one
backward (the post-LN transformer's *SelfOutput / *Output after its dense layer).

Ops (torch.library custom ops with fake kernels, routed to triton / cpp / reference):
  ``electra_fast::dropout_add_layer_norm_fwd``  (out, h, mean, rstd): h = the pre-norm sum, saved for the backward
  ``electra_fast::dropout_add_layer_norm_bwd``  (dinput, dresidual, dweight, dbias)
The dropout mask is the one ``electra_fast.dropout(input, p, seed, stream)`` draws (regenerated in the backward,
nothing stored). Semantics: electra_fast/reference/dropout_add_layer_norm.py.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from .. import _backend, _validate
from ..reference import dropout_add_layer_norm as ref
from ..reference.dropout import keep_scale, keep_threshold
from ..reference.philox import check_seed
from .dropout import SEED_LIMIT, STREAM_LIMIT, _as_int64

_backend.declare("dropout_add_layer_norm", cpp=("dropout_add_layer_norm_fwd", "dropout_add_layer_norm_bwd"),
                 triton="dropout_add_layer_norm")
TRITON_MAX_H = 2048  # kernels.dropout_add_layer_norm.MAX_H (a row is one register tile); larger H: the reference


def _impl(which: str, t: torch.Tensor):
    def supports(backend: str) -> Optional[str]:
        if backend == "triton" and t.shape[-1] > TRITON_MAX_H:
            return f"the Triton kernels hold a row in registers, up to H = {TRITON_MAX_H}; got {t.shape[-1]}"
        return None

    return _backend.implementation("dropout_add_layer_norm", t.device, reference=getattr(ref, which),
                                   cpp=f"dropout_add_layer_norm_{'fwd' if which == 'forward' else 'bwd'}",
                                   triton=f"dropout_add_layer_norm.{which}", supports=supports)


def _forward(x, residual, weight, bias, threshold, scale, seed, stream, eps):
    out, h, mean, rstd = _impl("forward", x)(x, residual, weight, bias, threshold, scale, seed, stream, eps)
    return out, h, mean, rstd


@torch.library.custom_op("electra_fast::dropout_add_layer_norm_fwd", mutates_args=())
def _fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], threshold: int,
         scale: float, seed: int, stream: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    return _forward(x, residual, weight, bias, threshold, scale, seed, stream, eps)


@_fwd.register_fake
def _(x, residual, weight, bias, threshold, scale, seed, stream, eps):
    acc = ref.acc_dtype(x.dtype)
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty((x.shape[0],), dtype=acc),
            x.new_empty((x.shape[0],), dtype=acc))


def _backward_op(grad_out, h, weight, mean, rstd, threshold, scale, seed, stream, has_bias):
    dx, dres, dw, db = _impl("backward", h)(grad_out, h, weight, mean, rstd, threshold, scale, seed, stream, has_bias)
    return dx, dres, dw, (db if db is not None else weight.new_empty(0))  # custom ops return no None


@torch.library.custom_op("electra_fast::dropout_add_layer_norm_bwd", mutates_args=())
def _bwd(grad_out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
         threshold: int, scale: float, seed: int, stream: int,
         has_bias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_op(grad_out, h, weight, mean, rstd, threshold, scale, seed, stream, has_bias)


@_bwd.register_fake
def _(grad_out, h, weight, mean, rstd, threshold, scale, seed, stream, has_bias):
    return (torch.empty_like(h), torch.empty_like(h), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if has_bias else 0))


def _setup_context(ctx, inputs, output):
    _x, _res, weight, bias, ctx.threshold, ctx.scale, ctx.seed, ctx.stream, _eps = inputs
    ctx.has_bias = bias is not None
    _out, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)


def _input_grads(ctx, grad_out, bwd):
    h, weight, mean, rstd = ctx.saved_tensors
    dx, dres, dw, db = bwd(grad_out.contiguous(), h, weight, mean, rstd, ctx.threshold, ctx.scale, ctx.seed,
                           ctx.stream, ctx.has_bias)
    return dx, dres, dw, (db if ctx.has_bias else None), None, None, None, None, None


def _backward(ctx, grad_out, _grad_h, _grad_mean, _grad_rstd):
    return _input_grads(ctx, grad_out, _bwd)


torch.library.register_autograd("electra_fast::dropout_add_layer_norm_fwd", _backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The op outside graph capture: the same bodies, setup and gradients as the custom ops, without their
    dispatch (~0.1 ms per forward + backward: the encoder calls this op twice per layer). torch.compile traces
    the custom ops (their fake kernels describe them to the graph)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, h, mean, rstd = _forward(*inputs)
        _setup_context(ctx, inputs, (out, h, mean, rstd))
        ctx.mark_non_differentiable(h, mean, rstd)
        return out, h, mean, rstd

    @staticmethod
    def backward(ctx, grad_out, _grad_h, _grad_mean, _grad_rstd):
        return _input_grads(ctx, grad_out, _backward_op)


def _real(name: str, value, lo: float, lo_open: bool, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if not (v > lo if lo_open else v >= lo) or not v < hi or math.isnan(v):
        raise ValueError(f"{name}: expected a real number in {'(' if lo_open else '['}{lo}, {hi}), got {v}")
    return v


def dropout_add_layer_norm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor] = None, *, p: float = 0.0, seed: Optional[int] = None,
                           stream: int = 0, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm(dropout(input, p, seed, stream) + residual, [H], weight, bias, eps)`` fused: one pass forward,
    one backward, the dropout mask regenerated from the seed (nothing stored but the pre-norm sum, which the
    LayerNorm's backward needs anyway).

    Args:
        input: [..., H] floating tensor (fp32 / fp64 / fp16 / bf16), e.g. a dense layer's output.
        residual: the same shape, dtype and device as ``input``.
        weight: [H] LayerNorm weight, fp32 or ``input``'s dtype (fp32 parameters under autocast work as they are).
        bias: [H] LayerNorm bias of ``weight``'s dtype, or None.
        p: drop probability in [0, 1); 0 (e.g. in eval mode) fuses the add and the norm only.
        seed: int in [0, 2**64), required when ``p > 0``; stream: int in [0, 2**32). The mask is exactly that of
            ``electra_fast.dropout(input, p, seed, stream)`` (element i of ``input.contiguous()``).
        eps: the LayerNorm epsilon (> 0).

    Returns:
        A tensor shaped and typed like ``input``. The dropout product and the sum are rounded to the dtype as the
        unfused ops round them; mean, variance and the normalisation run in fp32 (fp64 for fp64), rescaled by a
        power of two where the sum of squares would overflow (finite rows of any magnitude normalise; a row
        holding inf / NaN gives NaN). Gradients flow to input, residual, weight and bias.
    """
    _validate.floating("input", input)
    _validate.floating("residual", residual)
    _validate.same_shape("residual", residual, "input", input)
    _validate.same_device("residual", residual, "input", input)
    if residual.dtype != input.dtype:
        raise ValueError(f"residual: expected dtype {input.dtype} (that of input), got {residual.dtype}")
    if input.dim() < 1 or input.shape[-1] == 0:
        raise ValueError(f"input: expected a tensor [..., H] with H >= 1, got shape {tuple(input.shape)}")
    H = input.shape[-1]
    _validate.floating("weight", weight)
    if weight.shape != (H,):
        raise ValueError(f"weight: expected shape ({H},) (the last dim of input), got {tuple(weight.shape)}")
    _validate.same_device("weight", weight, "input", input)
    if weight.dtype not in (torch.float32, input.dtype):
        raise ValueError(f"weight: expected dtype float32 or {input.dtype} (that of input), got {weight.dtype}")
    if bias is not None:
        _validate.floating("bias", bias)
        if bias.shape != (H,) or bias.dtype != weight.dtype:
            raise ValueError(f"bias: expected shape ({H},) and dtype {weight.dtype} (those of weight), "
                             f"got {tuple(bias.shape)} {bias.dtype}")
        _validate.same_device("bias", bias, "input", input)
    p = _real("p", p, 0.0, False, 1.0)
    eps = _real("eps", eps, 0.0, True, math.inf)
    stream = check_seed(stream, "stream", STREAM_LIMIT)
    if p > 0.0:
        if seed is None:
            raise ValueError("seed: required when p > 0 (an int in [0, 2**64), e.g. the step's seed)")
        seed = check_seed(seed, "seed", SEED_LIMIT)
    else:
        seed = 0 if seed is None else check_seed(seed, "seed", SEED_LIMIT)
    x2 = input.reshape(-1, H).contiguous()
    r2 = residual.reshape(-1, H).contiguous()
    op = _fwd if torch.compiler.is_compiling() else _Eager.apply
    out = op(x2, r2, weight.contiguous(), None if bias is None else bias.contiguous(), keep_threshold(p),
             keep_scale(p), _as_int64(seed), stream, eps)[0]
    return out.view(input.shape)
