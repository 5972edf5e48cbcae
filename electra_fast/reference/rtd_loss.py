"""Eager PyTorch RTD loss: the semantic truth for electra_fast.rtd_loss.

Shapes and dtypes (every backend takes the same, already validated and contiguous):
  logits     float [B, T] (fp32 / fp64 / fp16 / bf16): one discriminator logit per token
  corrupted  int [B, T] (int32 or int64, same dtype as original): the discriminator's input
  original   int [B, T]: the uncorrupted ids; label = corrupted != original ("replaced")
  mask       uint8 / int32 / int64 [B, T] (nonzero = real token) or None
  reduction  0 = none, 1 = sum, 2 = mean (token mean over real tokens; 0 tokens -> 0)
  need_grad  also return d loss_token / d logit

forward -> (loss fp32 (fp64 for fp64 logits): [B, T] with 0 at padding for "none", else [];
            counts int64 [5]: n_valid, n_replaced, n_pred_replaced, n_true_pos, n_correct;
            dlogits [B, T] (dtype of loss) = d loss / d logit = (sigmoid(x) - label) * real, divided by the
            number of real tokens for "mean"; an empty tensor when not need_grad)

Per real token, with label y: loss = softplus(y ? -x : x) = max(y ? -x : x, 0) + log1p(exp(-|x|)) (binary
cross-entropy with logits), d loss / d x = sigmoid(x) - y; padded tokens contribute exactly 0 to both, whatever
their logit. An infinite logit gives the limits (loss 0 or +inf, derivative 0 or +-1), a NaN logit of a real token
NaN; predicted "replaced" means x > 0 (NaN: not).

The per-token derivative is produced by the forward pass (it shares exp(-|x|) with the loss), so
the backward is one scale by the incoming gradient (/ token count for "mean") - no recomputation.
"""
from __future__ import annotations

import torch

NONE, SUM, MEAN = 0, 1, 2
REDUCTIONS = {"none": NONE, "sum": SUM, "mean": MEAN}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute / output dtype: fp32, or fp64 for fp64 logits (so fp64 gradcheck is meaningful)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(logits, corrupted, original, mask, reduction: int, need_grad: bool):
    x = logits.to(acc_dtype(logits.dtype))
    y = corrupted != original
    valid = torch.ones_like(y) if mask is None else mask.bool()
    zero = x.new_zeros(())
    per_token = torch.where(valid, torch.where(y, -x, x).clamp(min=0) + torch.log1p(torch.exp(-x.abs())), zero)
    dlogits = torch.where(valid, torch.sigmoid(x) - y.to(x.dtype), zero) if need_grad else x.new_empty(0)
    pred = x > 0
    counts = torch.stack([
        valid.sum(), (valid & y).sum(), (valid & pred).sum(), (valid & y & pred).sum(), (valid & (y == pred)).sum(),
    ]).to(torch.int64)
    if reduction == NONE:
        return per_token, counts, dlogits
    total = per_token.sum()
    if reduction == SUM:
        return total, counts, dlogits
    n = counts[0].clamp(min=1).to(total.dtype)
    return total / n, counts, dlogits / n if need_grad else dlogits


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
