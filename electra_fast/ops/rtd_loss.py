"""electra_fast.rtd_loss: the discriminator's per-token sigmoid replaced-token-detection loss.

Op: ``electra_fast::rtd_loss_fwd`` (a torch.library custom op with a fake kernel, so it traces under
torch.compile), routed to triton / cpp / reference. The forward also emits d loss_token / d logit
(sharing exp(-|x|) with the loss), so the registered backward is a single scale.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend, _validate
from ..reference import rtd_loss as ref

_SCALAR = torch.Size([])
_backend.declare("rtd_loss", cpp=("rtd_loss_fwd",), triton="rtd_loss")


@torch.library.custom_op("electra_fast::rtd_loss_fwd", mutates_args=())
def _rtd_loss_fwd(logits: torch.Tensor, corrupted: torch.Tensor, original: torch.Tensor,
                  mask: Optional[torch.Tensor], reduction: int,
                  need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _backend.implementation("rtd_loss", logits.device, reference=ref.forward,
                                   cpp="rtd_loss_fwd", triton="rtd_loss.forward")
    return impl(logits, corrupted, original, mask, reduction, need_grad)


@_rtd_loss_fwd.register_fake
def _(logits, corrupted, original, mask, reduction, need_grad):
    shape = logits.shape if reduction == ref.NONE else _SCALAR
    acc = ref.acc_dtype(logits.dtype)
    return (logits.new_empty(shape, dtype=acc), logits.new_empty((5,), dtype=torch.int64),
            logits.new_empty(logits.shape if need_grad else (0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    logits, _, _, _, reduction, need_grad = inputs
    ctx.reduction, ctx.dtype, ctx.need_grad = reduction, logits.dtype, need_grad
    ctx.save_for_backward(output[2], output[1])


def _backward(ctx, grad_loss, _grad_counts, _grad_dlogits):
    dlogits, counts = ctx.saved_tensors
    if not ctx.need_grad:
        raise RuntimeError("electra_fast::rtd_loss_fwd was called with need_grad=False; cannot differentiate it")
    scale = grad_loss.to(dlogits.dtype)
    if ctx.reduction == ref.MEAN:
        scale = scale / counts[0].clamp(min=1).to(dlogits.dtype)
    return (dlogits * scale).to(ctx.dtype), None, None, None, None, None


torch.library.register_autograd("electra_fast::rtd_loss_fwd", _backward, setup_context=_setup_context)


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
        to ``logits`` only, in its dtype.
    """
    _validate.floating("logits", logits)
    _validate.rank("logits", logits, 2, "[B, T]")
    _validate.integer("corrupted_ids", corrupted_ids)
    _validate.integer("original_ids", original_ids)
    for name, ids in (("corrupted_ids", corrupted_ids), ("original_ids", original_ids)):
        _validate.same_shape(name, ids, "logits", logits)
        _validate.same_device(name, ids, "logits", logits)
    _validate.choice("reduction", reduction, tuple(ref.REDUCTIONS))
    mask = _validate.mask_as_uint8("attention_mask", attention_mask, "logits", logits)
    corrupted, original = _validate.common_ids(("corrupted_ids", corrupted_ids), ("original_ids", original_ids))
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    loss, counts, _ = _rtd_loss_fwd(logits.contiguous(), corrupted, original, mask, ref.REDUCTIONS[reduction],
                                    need_grad)
    if return_metrics:
        return loss, ref.metrics_from_counts(counts)
    return loss
