"""electra_fast.rtd_loss: the discriminator's per-token sigmoid replaced-token-detection loss.

Ops: ``electra_fast::rtd_loss_fwd`` and ``electra_fast::rtd_loss_bwd`` (torch.library custom ops
with fake kernels, so they trace under torch.compile), each routed to triton / cpp / reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend, _validate
from ..reference import rtd_loss as ref

_SCALAR = torch.Size([])


@torch.library.custom_op("electra_fast::rtd_loss_fwd", mutates_args=())
def _rtd_loss_fwd(logits: torch.Tensor, corrupted: torch.Tensor, original: torch.Tensor,
                  mask: Optional[torch.Tensor], reduction: int) -> Tuple[torch.Tensor, torch.Tensor]:
    impl = _backend.implementation("rtd_loss", logits.device, reference=ref.forward,
                                   cpp="rtd_loss_fwd", triton="rtd_loss.forward")
    return impl(logits, corrupted, original, mask, reduction)


@_rtd_loss_fwd.register_fake
def _(logits, corrupted, original, mask, reduction):
    shape = logits.shape if reduction == ref.NONE else _SCALAR
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty((5,), dtype=torch.int64)


@torch.library.custom_op("electra_fast::rtd_loss_bwd", mutates_args=())
def _rtd_loss_bwd(grad_scale: torch.Tensor, logits: torch.Tensor, corrupted: torch.Tensor,
                  original: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    impl = _backend.implementation("rtd_loss", logits.device, reference=ref.backward,
                                   cpp="rtd_loss_bwd", triton="rtd_loss.backward")
    return impl(grad_scale, logits, corrupted, original, mask)


@_rtd_loss_bwd.register_fake
def _(grad_scale, logits, corrupted, original, mask):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, corrupted, original, mask, reduction = inputs
    ctx.reduction = reduction
    ctx.save_for_backward(logits, corrupted, original, mask, output[1])


def _backward(ctx, grad_loss, _grad_counts):
    logits, corrupted, original, mask, counts = ctx.saved_tensors
    grad_scale = grad_loss.float()
    if ctx.reduction == ref.MEAN:
        grad_scale = grad_scale / counts[0].clamp(min=1).float()
    grad_scale = grad_scale.reshape(-1) if ctx.reduction != ref.NONE else grad_scale.contiguous()
    return _rtd_loss_bwd(grad_scale, logits, corrupted, original, mask), None, None, None, None


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
        fp32 loss (and the metrics dict). The gradient flows to ``logits`` only, in its dtype.
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
    loss, counts = _rtd_loss_fwd(logits.contiguous(), corrupted, original, mask, ref.REDUCTIONS[reduction])
    if return_metrics:
        return loss, ref.metrics_from_counts(counts)
    return loss
