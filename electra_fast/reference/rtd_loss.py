"""Eager PyTorch RTD loss: the semantic truth for electra_fast.rtd_loss.

Shapes and dtypes (every backend takes the same, already validated and contiguous):
  logits     float [B, T] (fp32 / fp64 / fp16 / bf16): one discriminator logit per token
  corrupted  int [B, T] (int32 or int64, same dtype as original): the discriminator's input
  original   int [B, T]: the uncorrupted ids; label = corrupted != original ("replaced")
  mask       uint8 [B, T] (1 = real token) or None
  reduction  0 = none, 1 = sum, 2 = mean (token mean over real tokens; 0 tokens -> 0)

forward -> (loss fp32: [B, T] with 0 at padding for "none", else [];
            counts int64 [5]: n_valid, n_replaced, n_pred_replaced, n_true_pos, n_correct)
backward(grad_scale fp32 [] or [B, T]) -> grad wrt logits, dtype of logits; zero at padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NONE, SUM, MEAN = 0, 1, 2
REDUCTIONS = {"none": NONE, "sum": SUM, "mean": MEAN}


def forward(logits, corrupted, original, mask, reduction: int):
    x = logits.float()
    y = corrupted != original
    valid = torch.ones_like(y) if mask is None else mask.bool()
    per_token = F.binary_cross_entropy_with_logits(x, y.float(), reduction="none") * valid
    pred = x > 0
    counts = torch.stack([
        valid.sum(), (valid & y).sum(), (valid & pred).sum(), (valid & y & pred).sum(), (valid & (y == pred)).sum(),
    ]).to(torch.int64)
    if reduction == NONE:
        return per_token, counts
    total = per_token.sum()
    if reduction == SUM:
        return total, counts
    return total / counts[0].clamp(min=1).to(total.dtype), counts


def backward(grad_scale, logits, corrupted, original, mask):
    x = logits.float()
    y = (corrupted != original).float()
    grad = (torch.sigmoid(x) - y) * grad_scale
    if mask is not None:
        grad = grad * mask.bool()
    return grad.to(logits.dtype)


def metrics_from_counts(counts: torch.Tensor) -> dict:
    """fp32 scalar metrics of the "replaced" class from the forward's counts (0 when undefined)."""
    c = counts.to(torch.float64)
    n_valid, n_rep, n_pred, tp, ok = c.unbind()

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp(min=1), torch.zeros_like(a)).float()

    return {
        "accuracy": ratio(ok, n_valid),
        "precision": ratio(tp, n_pred),
        "recall": ratio(tp, n_rep),
        "replaced_fraction": ratio(n_rep, n_valid),
    }
