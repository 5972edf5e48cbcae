"""electra_fast.rtd_loss: the discriminator's per-token sigmoid replaced-token-detection loss.

Op: ``electra_fast::rtd_loss_fwd`` (a torch.library custom op with a fake kernel, so it traces under
torch.compile), routed to triton / cpp / reference. The forward also emits d loss_token / d logit
(sharing exp(-|x|) with the loss), so the registered backward is a single scale.

Eager training calls skip the custom-op layer, whose Python dispatch costs about as much as the C++ kernel
at 256 x 512 tokens: the C++ backend through its own C++ autograd function (``rtd_loss_train`` in
csrc/rtd_loss.cpp, the same formula, the op spec's ``train`` stage), the others through the eager twin of the
custom op that ``AutogradOp`` builds from the same bodies. torch.compile traces the op.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend, _validate
from ..reference import rtd_loss as ref
from ._autograd import AutogradOp

_SCALAR = torch.Size([])
SPEC = _backend.register(_backend.OpSpec("rtd_loss", reference=ref, triton="rtd_loss",
                                         cpp={"forward": "rtd_loss_fwd", "train": "rtd_loss_train"},
                                         cpp_only=("train",)))


def _forward(logits: torch.Tensor, corrupted: torch.Tensor, original: torch.Tensor, mask: Optional[torch.Tensor],
             reduction: int, need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, counts int64 [5], dlogits: d loss / d logit, empty unless need_grad)."""
    impl = SPEC.implementation("forward", logits.device)
    return impl(logits, corrupted, original, mask, reduction, need_grad)


def _fake(logits, corrupted, original, mask, reduction, need_grad):
    shape = logits.shape if reduction == ref.NONE else _SCALAR
    acc = ref.acc_dtype(logits.dtype)
    return (logits.new_empty(shape, dtype=acc), logits.new_empty((5,), dtype=torch.int64),
            logits.new_empty(logits.shape if need_grad else (0,), dtype=acc))


def _setup(ctx, inputs, output):
    logits, _, _, _, _, need_grad = inputs
    ctx.dtype, ctx.need_grad = logits.dtype, need_grad
    ctx.save_for_backward(output[2])


def _grads(ctx, grad_outputs, _backward):
    if not ctx.need_grad:
        raise RuntimeError("electra_fast::rtd_loss_fwd was called with need_grad=False; cannot differentiate it")
    # dlogits already is d loss / d logit (1 / n folded in for "mean"): one scale by the incoming gradient.
    grad = ctx.saved_tensors[0] * grad_outputs[0]
    return (grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype)), None, None, None, None, None


_OP = AutogradOp("rtd_loss_fwd", _forward, _fake, setup=_setup, grads=_grads, non_differentiable=(1, 2))


_IDS = (torch.int64, torch.int32)
_MASKS = (torch.int64, torch.int32, torch.uint8, torch.bool)


def _usual_call(logits, corrupted, original, mask, reduction) -> bool:
    """True when every check of rtd_loss passes and nothing needs converting: contiguous ids of one kernel dtype
    and a contiguous bool / integer mask, all shaped and placed like the [B, T] floating logits. One expression
    instead of a dozen validator calls (the per-call cost matters at this op's size); anything else takes the
    validators, which explain what is wrong."""
    try:
        shape, device = logits.shape, logits.device
        return (logits.layout == torch.strided and logits.dtype in _validate.FLOAT_DTYPES and len(shape) == 2
                and reduction in ref.REDUCTIONS
                and corrupted.dtype in _IDS and original.dtype == corrupted.dtype
                and corrupted.shape == shape and original.shape == shape
                and corrupted.device == device and original.device == device
                and corrupted.is_contiguous() and original.is_contiguous()
                and (mask is None or (mask.dtype in _MASKS and mask.shape == shape and mask.device == device
                                      and mask.is_contiguous())))
    except (AttributeError, TypeError, RuntimeError):  # not a tensor, a sparse one...: the validators name it
        return False


def rtd_loss(logits: torch.Tensor, corrupted_ids: torch.Tensor, original_ids: torch.Tensor,
             attention_mask: Optional[torch.Tensor] = None, *, reduction: str = "mean",
             return_metrics: bool = False):
    """Binary cross-entropy of the discriminator's logits against "was this token replaced?".

    Args:
        logits: float [B, T] (fp32 / fp64 / fp16 / bf16), one logit per token (> 0 predicts "replaced").
        corrupted_ids: int [B, T], the discriminator's input.
        original_ids: int [B, T]; label = ``corrupted_ids != original_ids`` (a sampled token equal to
            the original is "real", as in ELECTRA).
        attention_mask: bool / int [B, T], 1 = real token, or None (all real).
        reduction: "mean" (over real tokens of the whole batch; 0 tokens -> 0), "sum" or "none"
            ([B, T], 0 at padding).
        return_metrics: also return a dict of fp32 scalars computed in the same pass: accuracy,
            precision, recall (of the "replaced" class) and replaced_fraction.

    Returns:
        The loss in fp32 (fp64 for fp64 logits), and the metrics dict when asked. The gradient flows
        to ``logits`` only, in its dtype. Infinite logits give the limits (token loss 0 or +inf), a NaN logit of
        a real token NaN, a padded token 0 whatever its logit, on every backend.
    """
    if _usual_call(logits, corrupted_ids, original_ids, attention_mask, reduction):
        corrupted, original = corrupted_ids, original_ids
        mask = attention_mask
        if mask is not None and mask.dtype == torch.bool:
            mask = _validate.bool_as_uint8(mask)
    else:
        _validate.floating("logits", logits)
        _validate.rank("logits", logits, 2, "[B, T]")
        _validate.integer("corrupted_ids", corrupted_ids)
        _validate.integer("original_ids", original_ids)
        for name, ids in (("corrupted_ids", corrupted_ids), ("original_ids", original_ids)):
            _validate.same_shape(name, ids, "logits", logits)
            _validate.same_device(name, ids, "logits", logits)
        _validate.choice("reduction", reduction, tuple(ref.REDUCTIONS))
        mask = _validate.mask_as_uint8("attention_mask", attention_mask, "logits", logits, keep_int=True)
        corrupted, original = _validate.common_ids(("corrupted_ids", corrupted_ids), ("original_ids", original_ids))
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    if need_grad and not torch.compiler.is_compiling() and SPEC.route(logits.device, "train")[0] == "cpp":
        # counts[1:] are only filled when return_metrics
        loss, counts = torch.ops.electra_fast_cpp.rtd_loss_train.default(
            logits.contiguous(), corrupted, original, mask, ref.REDUCTIONS[reduction], return_metrics)
    else:
        loss, counts, _ = _OP(logits.contiguous(), corrupted, original, mask, ref.REDUCTIONS[reduction], need_grad)
    if return_metrics:
        return loss, ref.metrics_from_counts(counts)
    return loss
