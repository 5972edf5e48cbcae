"""Dropout + residual add + LayerNorm in eager PyTorch: the truth for electra_fast.dropout_add_layer_norm
(the post-LN transformer's ``LayerNorm(dropout(dense(x)) + residual)``, as transformers' *SelfOutput / *Output).

Forward, rows r of [N, H] (x and residual contiguous, one dtype; "acc" is fp64 for fp64 inputs, else fp32):
  d   = dtype(acc(x) * scale) where kept, 0 where dropped: exactly ``electra_fast.dropout(x, p, seed, stream)``
        (element e = r * H + c of x is kept iff ``(w >> 8) >= threshold``, w word e % 4 of Philox call e // 4,
        purpose DROPOUT, fourth counter word ``stream``; threshold / scale from reference.dropout)
  h   = dtype(acc(d) + acc(residual))                           the sum, rounded to the dtype as torch's add
  mean, rstd = acc mean of h's row, 1 / sqrt(biased variance + eps)
  out = dtype((acc(h) - mean) * rstd * acc(weight) + acc(bias))  (bias None: no term)
Returned: out [N, H], h [N, H] (the dtype; saved for the backward), mean and rstd (acc [N]).

Backward (grad_out [N, H] in the dtype), per row with xhat = (acc(h) - mean) * rstd and g = acc(grad_out) *
acc(weight):
  dh        = rstd * (g - mean(g) - xhat * mean(g * xhat))         (acc)
  dresidual = dtype(dh)
  dx        = dtype(acc(dresidual) * scale) where kept, 0 where dropped (the dropout op on dresidual)
  dweight   = sum over rows of acc(grad_out) * xhat; dbias = sum over rows of acc(grad_out)  (weight's dtype)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import dropout as ref_dropout


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            threshold: int, scale: float, seed: int, stream: int,
            eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [N, H] (one floating dtype), weight [H], bias [H] or None (fp32 or x's dtype); seed int64
    (the 64-bit key's bits) -> (out, h, mean, rstd), see the module docstring."""
    acc = acc_dtype(x.dtype)
    d = ref_dropout.apply(x, threshold, scale, seed, stream) if threshold > 0 else x
    h = (d.to(acc) + residual.to(acc)).to(x.dtype)
    hf = h.to(acc)
    mean = hf.mean(-1)
    rstd = torch.rsqrt((hf - mean[:, None]).pow(2).mean(-1) + eps)
    y = (hf - mean[:, None]) * rstd[:, None] * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), h, mean, rstd


def backward(grad_out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
             threshold: int, scale: float, seed: int, stream: int,
             has_bias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """-> (dx, dresidual [N, H] in h's dtype, dweight [H], dbias [H] or None (weight's dtype))."""
    acc = acc_dtype(h.dtype)
    xhat = (h.to(acc) - mean[:, None]) * rstd[:, None]
    go = grad_out.to(acc)
    g = go * weight.to(acc)
    dh = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dresidual = dh.to(h.dtype)
    dx = ref_dropout.apply(dresidual, threshold, scale, seed, stream) if threshold > 0 else dresidual.clone()
    dweight = (go * xhat).sum(0).to(weight.dtype)
    dbias = go.sum(0).to(weight.dtype) if has_bias else None
    return dx, dresidual, dweight, dbias
