"""Dropout + residual add + LayerNorm in eager PyTorch: the truth for electra_fast.dropout_add_layer_norm
(the post-LN transformer's ``LayerNorm(dropout(dense(x)) + residual)``, as transformers' *SelfOutput / *Output).

Forward, rows r of [N, H] (x and residual contiguous, one dtype; "acc" is fp64 for fp64 inputs, else fp32):
  d   = dtype(acc(x) * scale) where kept, 0 where dropped: exactly ``electra_fast.dropout(x, p, seed, stream)``
        (element e = r * H + c of x is kept iff ``(w >> 8) >= threshold``, w word e % 4 of Philox call e // 4,
        purpose DROPOUT, fourth counter word ``stream``; threshold / scale from reference.dropout)
  h   = dtype(acc(d) + acc(residual))                           the sum, rounded to the dtype as torch's add
  mean, rstd = acc mean of h's row, 1 / sqrt(biased variance + eps): mean = sum(h) / H, var = sum((h - mean)^2) / H.
        When var is not finite although every h of the row is (the squares overflow acc: |h| beyond ~1e19 in
        fp32), they come from the row scaled by an exact power of two s, max |s h| in [2^20, 2^21):
          mean = mean(s h) / s,  rstd = min(s / sqrt(var(s h) + eps s^2), 1 / sqrt(eps))
        (the bound stands in for eps s^2 where that underflows), so rows of any finite magnitude normalise
        (up to |h| < acc max / 2, where h - mean itself would overflow). NaN / inf in a row: NaN out.
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


SCALED_EXP = 20  # a row rescaled for its moments has max |s h| in [2^20, 2^21): no overflow, no underflow


def moments(hf: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) [N] of the rows of hf [N, H] (acc dtype), by the module docstring's rule."""
    mean = hf.mean(-1)
    var = (hf - mean[:, None]).pow(2).mean(-1)
    rstd = torch.rsqrt(var + eps)
    # Every row's scaled moments (no data-dependent branch), kept where the plain variance overflowed.
    redo = ~torch.isfinite(var) & torch.isfinite(hf).all(-1)
    exponent = torch.frexp(hf.abs().amax(-1)).exponent - 1  # max |h| in [2^e, 2^(e + 1))
    s = torch.ldexp(torch.ones_like(mean), (SCALED_EXP - exponent).clamp(-1000, 1000))
    hs = hf * s[:, None]
    mean_s = hs.mean(-1)
    rstd_s = torch.minimum(s * torch.rsqrt((hs - mean_s[:, None]).pow(2).mean(-1) + eps * s * s),
                           torch.rsqrt(torch.tensor(eps, dtype=hf.dtype)))
    return torch.where(redo, mean_s / s, mean), torch.where(redo, rstd_s, rstd)


def forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            threshold: int, scale: float, seed: int, stream: int,
            eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [N, H] (one floating dtype), weight [H], bias [H] or None (fp32 or x's dtype); seed int64
    (the 64-bit key's bits) -> (out, h, mean, rstd), see the module docstring."""
    acc = acc_dtype(x.dtype)
    d = ref_dropout.apply(x, threshold, scale, seed, stream) if threshold > 0 else x
    h = (d.to(acc) + residual.to(acc)).to(x.dtype)
    hf = h.to(acc)
    mean, rstd = moments(hf, eps)
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
