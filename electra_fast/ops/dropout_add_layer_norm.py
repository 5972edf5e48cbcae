"""electra_fast.dropout_add_layer_norm: ``LayerNorm(dropout(input) + residual)`` in one pass forward and one
backward (the post-LN transformer's *SelfOutput / *Output after its dense layer).

Ops (torch.library custom ops with fake kernels, routed to triton / cpp / reference):
  ``electra_fast::dropout_add_layer_norm_fwd``  (out, h, mean, rstd): h = the pre-norm sum, saved for the backward
  ``electra_fast::dropout_add_layer_norm_bwd``  (dinput, dresidual, dweight, dbias)
The dropout mask is the one ``electra_fast.dropout(input, p, seed, stream)`` draws (regenerated in the backward,
nothing stored). Semantics: electra_fast/reference/dropout_add_layer_norm.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend, _seed, _validate
from ..reference import dropout_add_layer_norm as ref
from ..reference.dropout import keep_scale, keep_threshold
from ._autograd import AutogradOp

SPEC = _backend.register(_backend.OpSpec(
    "dropout_add_layer_norm", reference=ref, triton="dropout_add_layer_norm",
    cpp={"forward": "dropout_add_layer_norm_fwd", "backward": "dropout_add_layer_norm_bwd"}))


__getattr__ = SPEC.moved_to_kernels(__name__, TRITON_MAX_H="MAX_H")  # deprecated names


def _forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             threshold: int, scale: float, seed: int, stream: int,
             eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, h, mean, rstd): h = the pre-norm sum, saved for the backward."""
    impl = SPEC.implementation("forward", x.device, hidden=x.shape[-1])
    return tuple(impl(x, residual, weight, bias, threshold, scale, seed, stream, eps))


def _fake(x, residual, weight, bias, threshold, scale, seed, stream, eps):
    acc = ref.acc_dtype(x.dtype)
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty((x.shape[0],), dtype=acc),
            x.new_empty((x.shape[0],), dtype=acc))


def _backward(grad_out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
              threshold: int, scale: float, seed: int, stream: int,
              has_bias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dinput, dresidual, dweight, dbias); dbias is empty without a bias (custom ops return no None)."""
    impl = SPEC.implementation("backward", h.device, hidden=h.shape[-1])
    dx, dres, dw, db = impl(grad_out, h, weight, mean, rstd, threshold, scale, seed, stream, has_bias)
    return dx, dres, dw, (db if db is not None else weight.new_empty(0))


def _backward_fake(grad_out, h, weight, mean, rstd, threshold, scale, seed, stream, has_bias):
    return (torch.empty_like(h), torch.empty_like(h), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if has_bias else 0))


def _setup(ctx, inputs, output):
    _x, _res, weight, bias, ctx.threshold, ctx.scale, ctx.seed, ctx.stream, _eps = inputs
    ctx.has_bias = bias is not None
    _out, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)


def _grads(ctx, grad_outputs, backward):
    h, weight, mean, rstd = ctx.saved_tensors
    dx, dres, dw, db = backward(grad_outputs[0].contiguous(), h, weight, mean, rstd, ctx.threshold, ctx.scale,
                                ctx.seed, ctx.stream, ctx.has_bias)
    return dx, dres, dw, (db if ctx.has_bias else None), None, None, None, None, None


# the encoder calls this op twice per layer: eager calls skip the custom-op dispatch (~0.1 ms per fwd + bwd)
_OP = AutogradOp("dropout_add_layer_norm_fwd", _forward, _fake, setup=_setup, grads=_grads, backward=_backward,
                 backward_fake=_backward_fake, backward_name="dropout_add_layer_norm_bwd",
                 non_differentiable=(1, 2, 3))


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
        p: drop probability in [0, 1]; 0 (e.g. in eval mode) fuses the add and the norm only; 1 drops all of
            ``input`` (``input * 0``, as torch's dropout), leaving the norm of ``residual``.
        seed: int in [0, 2**64), required when ``p > 0``; stream: int in [0, 2**32). The mask is exactly that of
            ``electra_fast.dropout(input, p, seed, stream)`` (element i of ``input.contiguous()``).
        eps: the LayerNorm epsilon (> 0).

    Returns:
        A tensor shaped and typed like ``input``. The dropout product and the sum are rounded to the dtype as the
        unfused ops round them; mean, variance and the normalisation run in fp32 (fp64 for fp64), rescaled by a
        power of two where the sum of squares would overflow (finite rows normalise up to |h| < half the
        accumulator's max, ~1.7e38 in fp32, where h - mean itself overflows; a row holding inf / NaN gives NaN).
        Gradients flow to input, residual, weight and bias.
    """
    _validate.floating("input", input)
    _validate.floating("residual", residual)
    _validate.same_shape("residual", residual, "input", input)
    _validate.same_device("residual", residual, "input", input)
    _validate.same_dtype("residual", residual, "input", input)
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
    p = _validate.probability("p", p, one=True)
    eps = _validate.layer_norm_eps("eps", eps)
    stream = _seed.check(stream, "stream", _seed.STREAM_LIMIT)
    if p > 0.0 and seed is None:
        raise ValueError("seed: required when p > 0 (an int in [0, 2**64), e.g. the step's seed)")
    seed = 0 if seed is None else _seed.check(seed, "seed", _seed.KEY_LIMIT)
    if p == 1.0:  # every element dropped: torch's answer (the kept scale 1 / (1 - p) is infinite)
        input, p = input * 0, 0.0
    x2 = input.reshape(-1, H).contiguous()
    r2 = residual.reshape(-1, H).contiguous()
    out = _OP(x2, r2, weight.contiguous(), None if bias is None else bias.contiguous(), keep_threshold(p),
             keep_scale(p), _seed.as_int64(seed), stream, eps)[0]
    return out.view(input.shape)
