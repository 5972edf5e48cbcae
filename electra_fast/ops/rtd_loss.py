"""electra_fast.rtd_loss: the discriminator's per-token sigmoid replaced-token-detection loss.

Op: ``electra_fast::rtd_loss_fwd`` (a torch.library custom op with a fake kernel, so it traces under
torch.compile), routed to triton / cpp / reference. The forward also emits d loss_token / d logit
(sharing exp(-|x|) with the loss), so the registered backward is a single scale.

Eager training calls skip the custom-op layer, whose Python dispatch costs about as much as the C++ kernel
at 256 x 512 tokens: the C++ backend through its own C++ autograd function (``rtd_loss_train`` in
csrc/rtd_loss.cpp, the same formula), the others through ``_EagerRTDLoss``. torch.compile traces the op.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend, _validate
from ..reference import rtd_loss as ref

_SCALAR = torch.Size([])
_backend.declare("rtd_loss", cpp=("rtd_loss_fwd", "rtd_loss_train"), triton="rtd_loss")


def _forward_impl(logits, corrupted, original, mask, reduction, need_grad):
    impl = _backend.implementation("rtd_loss", logits.device, reference=ref.forward,
                                   cpp="rtd_loss_fwd", triton="rtd_loss.forward")
    return impl(logits, corrupted, original, mask, reduction, need_grad)


@torch.library.custom_op("electra_fast::rtd_loss_fwd", mutates_args=())
def _rtd_loss_fwd(logits: torch.Tensor, corrupted: torch.Tensor, original: torch.Tensor,
                  mask: Optional[torch.Tensor], reduction: int,
                  need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(logits, corrupted, original, mask, reduction, need_grad)


@_rtd_loss_fwd.register_fake
def _(logits, corrupted, original, mask, reduction, need_grad):
    shape = logits.shape if reduction == ref.NONE else _SCALAR
    acc = ref.acc_dtype(logits.dtype)
    return (logits.new_empty(shape, dtype=acc), logits.new_empty((5,), dtype=torch.int64),
            logits.new_empty(logits.shape if need_grad else (0,), dtype=acc))


def _grad_logits(dlogits, grad_loss, dtype):
    # dlogits already is d loss / d logit (1 / n folded in for "mean"): one scale by the incoming gradient.
    grad = dlogits * grad_loss
    return grad if grad.dtype == dtype else grad.to(dtype)


def _setup_context(ctx, inputs, output):
    logits, _, _, _, _, need_grad = inputs
    ctx.dtype, ctx.need_grad = logits.dtype, need_grad
    ctx.save_for_backward(output[2])


def _backward(ctx, grad_loss, _grad_counts, _grad_dlogits):
    if not ctx.need_grad:
        raise RuntimeError("electra_fast::rtd_loss_fwd was called with need_grad=False; cannot differentiate it")
    return _grad_logits(ctx.saved_tensors[0], grad_loss, ctx.dtype), None, None, None, None, None


torch.library.register_autograd("electra_fast::rtd_loss_fwd", _backward, setup_context=_setup_context)


class _EagerRTDLoss(torch.autograd.Function):
    """The same kernels and backward without the custom-op layer (eager training on Triton / reference)."""

    @staticmethod
    def forward(ctx, logits, corrupted, original, mask, reduction):
        loss, counts, dlogits = _forward_impl(logits, corrupted, original, mask, reduction, True)
        ctx.dtype = logits.dtype
        ctx.save_for_backward(dlogits)
        ctx.mark_non_differentiable(counts)
        return loss, counts

    @staticmethod
    def backward(ctx, grad_loss, _grad_counts):
        dlogits, = ctx.saved_tensors
        # A CPU 1.0 (the usual loss.backward()) is checked on the host (on CUDA that would sync): the saved
        # derivative is the gradient; autograd copies it where it must, it never writes into it.
        if (grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and dlogits.dtype == ctx.dtype
                and grad_loss.item() == 1.0):
            return dlogits, None, None, None, None
        return _grad_logits(dlogits, grad_loss, ctx.dtype), None, None, None, None


def _train_eager(logits, corrupted, original, mask, reduction, need_metrics):
    backend, _ = _backend.resolve("rtd_loss", logits.device, cpp="rtd_loss_train", triton="rtd_loss")
    if backend == "cpp":  # counts[1:] are only filled when need_metrics
        return torch.ops.electra_fast_cpp.rtd_loss_train.default(logits, corrupted, original, mask, reduction,
                                                                 need_metrics)
    return _EagerRTDLoss.apply(logits, corrupted, original, mask, reduction)


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
            mask = mask.view(torch.uint8)
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
    if need_grad and not torch.compiler.is_compiling():
        loss, counts = _train_eager(logits.contiguous(), corrupted, original, mask, ref.REDUCTIONS[reduction],
                                    return_metrics)
    else:
        loss, counts, _ = _rtd_loss_fwd(logits.contiguous(), corrupted, original, mask, ref.REDUCTIONS[reduction],
                                        need_grad)
    if return_metrics:
        return loss, ref.metrics_from_counts(counts)
    return loss
