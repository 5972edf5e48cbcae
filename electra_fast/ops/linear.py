"""electra_fast.linear and electra_fast.gelu_mlp: linear layers whose CPU bf16 products carry their epilogues.

Under CPU bf16 autocast, ``F.linear`` with a bias runs ``addmm``, which first copies the broadcast bias into the
output and then accumulates the product onto it: one extra write + read of the [N, out] result (for
ELECTRA-small's FFN, [4096, 1024] per layer: ~25% of the GEMM's time on a Xeon). oneDNN's matmul adds the bias in
its epilogue instead (``mkldnn::_linear_pointwise``, the kernel inductor emits for CPU linears). The feed-forward
block also keeps gelu'(z) from one fused pass, so its backward's dz = (dY w2) * gelu'(z) is the epilogue of the
dY w2 product (oneDNN's binary-mul post-op): no separate gelu_backward pass over [N, hidden].

Ops (torch.library custom ops with fake kernels, routed to cpp / reference; semantics:
electra_fast/reference/linear.py):
  ``electra_fast::linear``        x [N, in], w [out, in], b [out] or None -> [N, out]
  ``electra_fast::gelu_mlp_fwd``  -> (y, gelu(z), gelu'(z));  ``electra_fast::gelu_mlp_bwd``: the five gradients

The ops serve CPU bf16 autocast, the one place their kernels differ from torch's. Everywhere else - fp32 or no
autocast, the eager twin, torch.compile tracing (inductor fuses these itself), a [N, < 16] prediction layer -
the functions are ``F.linear`` / ``F.gelu`` compositions, and there is no Triton backend: on CUDA, cuBLASLt already
puts the bias (and GELU) in its epilogues. On a CPU whose oneDNN has no native bf16 GEMM (asked once per process
by ``_cpu.onednn_bf16_linear``, which probes the ops) the C++ kernels compute the reference's values with ATen.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _backend, _cpu, _validate
from ..reference import linear as ref
from ._autograd import AutogradOp

LINEAR_SPEC = _backend.register(_backend.OpSpec("linear", reference=ref, cpp={"linear": "linear_epilogue"}))
MLP_SPEC = _backend.register(_backend.OpSpec(
    "gelu_mlp", reference=ref, cpp={"mlp_forward": "gelu_mlp_fwd", "mlp_backward": "gelu_mlp_bwd"}))

MIN_OUT = 16  # a [N, 1] prediction layer gains nothing from the epilogue


# --------------------------------------------------------------------------------------------- ops
def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], onednn: bool) -> torch.Tensor:
    return LINEAR_SPEC.implementation("linear", x.device)(x, w, b, onednn)


def _linear_fake(x, w, b, onednn):
    return x.new_empty((x.shape[0], w.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, w, b, _ = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = b is not None


def _linear_grads(ctx, grad_outputs, backward):
    # addmm's backward: the products need no epilogue
    x, w = ctx.saved_tensors
    grad, need = grad_outputs[0], ctx.needs_input_grad
    return (grad.mm(w) if need[0] else None, grad.t().mm(x) if need[1] else None,
            grad.sum(0) if ctx.has_bias and need[2] else None, None)


_LINEAR_OP = AutogradOp("linear", _linear, _linear_fake, setup=_linear_setup, grads=_linear_grads, twice=True)


def _mlp_forward(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                 b2: Optional[torch.Tensor], onednn: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return MLP_SPEC.implementation("mlp_forward", x.device)(x, w1, b1, w2, b2, onednn)


def _mlp_forward_fake(x, w1, b1, w2, b2, onednn):
    hidden = x.new_empty((x.shape[0], w1.shape[0]))
    return x.new_empty((x.shape[0], w2.shape[0])), hidden, torch.empty_like(hidden)


def _mlp_backward(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                  w2: torch.Tensor, has_b1: bool, has_b2: bool, onednn: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return MLP_SPEC.implementation("mlp_backward", grad.device)(grad, x, w1, a, s, w2, has_b1, has_b2, onednn)


def _mlp_backward_fake(grad, x, w1, a, s, w2, has_b1, has_b2, onednn):
    return (torch.empty_like(x), torch.empty_like(w1), x.new_empty((w1.shape[0],) if has_b1 else (0,)),
            torch.empty_like(w2), x.new_empty((w2.shape[0],) if has_b2 else (0,)))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, ctx.onednn = inputs
    ctx.save_for_backward(x, w1, output[1], output[2], w2)
    ctx.has_bias = (b1 is not None, b2 is not None)


def _mlp_grads(ctx, grad_outputs, backward):
    x, w1, a, s, w2 = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = backward(grad_outputs[0], x, w1, a, s, w2, *ctx.has_bias, ctx.onednn)
    return (dx, dw1, db1 if ctx.has_bias[0] else None, dw2, db2 if ctx.has_bias[1] else None, None)


_MLP_OP = AutogradOp("gelu_mlp_fwd", _mlp_forward, _mlp_forward_fake, setup=_mlp_setup, grads=_mlp_grads,
                     backward=_mlp_backward, backward_fake=_mlp_backward_fake, backward_name="gelu_mlp_bwd",
                     non_differentiable=(1, 2))


# ------------------------------------------------------------------------------------------ public
def _check_weight(w_name: str, w, b_name: str, b, in_features: int, in_what: str, x: torch.Tensor) -> None:
    _validate.floating(w_name, w)
    _validate.rank(w_name, w, 2, "[out_features, in_features]")
    if w.shape[1] != in_features:
        raise ValueError(f"{w_name}: expected in_features {in_features} ({in_what}), got shape {tuple(w.shape)}")
    _validate.same_device(w_name, w, "x", x)
    if not _autocast_pairs(x, w):
        _validate.same_dtype(w_name, w, "x", x)
    if b is not None:
        _validate.floating(b_name, b)
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{b_name}: expected shape ({w.shape[0]},) (out_features of {w_name}), got "
                             f"{tuple(b.shape)}")
        _validate.same_device(b_name, b, "x", x)
        if not _autocast_pairs(x, b):
            _validate.same_dtype(b_name, b, "x", x)


def _autocast_pairs(x: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether autocast makes ``t``'s dtype match ``x``'s itself: it casts each operand but fp64, which stays fp64
    (ATen then refused the pair naming neither); without autocast ATen would refuse any mismatch so."""
    return _autocast(x) and (x.dtype == torch.float64) == (t.dtype == torch.float64)


def _autocast(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def _check_x(x) -> torch.Tensor:
    _validate.floating("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected a tensor [..., in_features], got a 0-d tensor")
    return x


def _epilogue_path(x: torch.Tensor, out_features: int) -> bool:
    """Whether a call takes the ops (CPU bf16 autocast, eager, an output worth an epilogue)."""
    # autocast casts fp32 / fp16 / bf16 operands to bf16 and leaves fp64 alone: fp64 calls stay F.linear's
    # in_features 0: F.linear's zeros (oneDNN has no inner product over an empty dimension)
    return (x.device.type == "cpu" and x.dim() >= 2 and out_features >= MIN_OUT and x.dtype != torch.float64
            and x.shape[-1] > 0
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.compiler.is_compiling() and not _backend.eager_twin())


def _bf16(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # the casts autocast would make, done once here (differentiable: fp32 parameters get fp32 gradients)
    return None if t is None else t.to(torch.bfloat16)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return _bf16(x).reshape(-1, x.shape[-1]).contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose CPU bf16-autocast product adds the bias in the GEMM's epilogue.

    Args:
        x: floating tensor [..., in_features].
        weight: floating tensor [out_features, in_features], on x's device.
        bias: floating tensor [out_features] or None.

    Returns:
        [..., out_features]: what ``F.linear`` returns, in the dtype it returns (bf16 under CPU bf16 autocast: the
        same bf16 casts and products, fp32 accumulation; the gradients are addmm's).
    """
    _check_weight("weight", weight, "bias", bias, _check_x(x).shape[-1], "the last dimension of x", x)
    if not _epilogue_path(x, weight.shape[0]):
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        out = _LINEAR_OP(_rows(x), _bf16(weight), _bf16(bias), _cpu.onednn_bf16_linear()[0])
    return out.view(*x.shape[:-1], weight.shape[0])


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
             b2: Optional[torch.Tensor]) -> torch.Tensor:
    """A transformer's feed-forward block, ``linear(F.gelu(linear(x, w1, b1)), w2, b2)`` (erf GELU).

    Args:
        x: floating tensor [..., in_features].
        w1: [hidden, in_features]; b1: [hidden] or None; w2: [out_features, hidden]; b2: [out_features] or None.

    Returns:
        [..., out_features] in the dtype the composition returns. Under CPU bf16 autocast the backward rounds gelu'(z)
        to bf16 where the composition rounds dY w2 (one bf16 rounding either way).
    """
    _check_weight("w1", w1, "b1", b1, _check_x(x).shape[-1], "the last dimension of x", x)
    _check_weight("w2", w2, "b2", b2, w1.shape[0], "out_features of w1", x)
    params = [t for t in (x, w1, b1, w2, b2) if t is not None]
    training = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    # without a backward, gelu'(z) would be written for nothing: the two products alone keep their epilogues
    if not (training and _epilogue_path(x, w1.shape[0]) and w2.shape[0] >= MIN_OUT):
        return linear(F.gelu(linear(x, w1, b1)), w2, b2)
    with torch.autocast("cpu", enabled=False):
        out = _MLP_OP(_rows(x), _bf16(w1), _bf16(b1), _bf16(w2), _bf16(b2), _cpu.onednn_bf16_linear()[0])[0]
    return out.view(*x.shape[:-1], w2.shape[0])
