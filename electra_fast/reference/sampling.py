"""Eager PyTorch Gumbel sampling and fused MLM loss + sampling: the semantic truth for
electra_fast.gumbel_sample and electra_fast.mlm_loss_and_sample. It materialises the full [N, V]
logits; the C++ and Triton backends stream over the vocabulary instead.

Noise (every backend): for row n of a [N, V] problem, column v,
  e = n * V + v                                             (the Philox element)
  u = uniform_open(word e % 4 of philox(seed, e // 4, GUMBEL))  (fp32, in (0, 1); see philox.py)
  g = -log(-log(u))                                         (fp32)
  score = fp32(logits[n, v]) * inv_temperature + g           (inv_temperature = fp32(1 / temperature);
                                                              one product, one sum, both rounded to fp32)
  sample = argmax of score over the allowed v, in torch.argmax's order: NaN above every number, ties to the
           smallest id. Every backend follows it exactly, including at non-finite logits:
             - a row never draws a disallowed id;
             - a NaN score at an allowed id (a NaN logit there) draws the smallest such id: the row is invalid,
               and its MLM loss is NaN as well (below), so the problem is visible rather than papered over;
             - a row whose allowed scores are all -inf (e.g. -inf logits) draws its smallest allowed id;
             - +inf scores tie with each other (the smallest such id).

Shapes and dtypes (every backend takes the same, already validated and contiguous):
  logits      float [N, V]; hidden float [N, E]; weight [V, E] (same dtype); bias [V] (same dtype) or None
  targets     int [N] (int32 / int64): in [0, V) or ignore_index
  disallowed  uint8 [V] (1 = never drawn) or None
  chunk       vocabulary columns per streamed chunk (ignored here: the reference is unchunked)
Accumulation dtype ("acc"): fp64 for fp64 inputs, else fp32.

forward -> (loss_rows acc [N] (lse - target logit, 0 at ignored rows), lse acc [N],
            sampled int64 [N], argmax int64 [N] (of the plain logits, for the accuracy metric))
  lse is torch.logsumexp's over all V columns (disallowed ids included: they only never get drawn): NaN when
  the row has a NaN logit, +inf when it has a +inf one (and no NaN), -inf when every logit is -inf. So a
  non-ignored row with a NaN logit has a NaN loss. argmax is torch.argmax's (the first NaN, else the first
  maximum; a row of -inf gives 0).
backward(grad_rows fp32/acc [N]) -> (dhidden [N, E] hidden dtype, dweight [V, E] weight dtype,
                                     dbias [V] weight dtype)
"""
from __future__ import annotations

import torch

from . import philox


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gumbel_noise(seed: int, rows: int, vocab: int, device) -> torch.Tensor:
    """fp32 [rows, vocab] Gumbel(0, 1) noise of rows 0..rows-1 of a vocab-wide problem."""
    index = (torch.arange(rows, device=device, dtype=torch.int64)[:, None] * vocab
             + torch.arange(vocab, device=device, dtype=torch.int64)[None, :])
    u = philox.uniform_open(philox.element_words(seed, index, philox.GUMBEL))
    return -torch.log(-torch.log(u))


def sample(logits: torch.Tensor, disallowed, seed: int, inv_temperature: float) -> torch.Tensor:
    """int64 [N]: Gumbel-max draw per row of float [N, V] logits (see the module docstring)."""
    n, v = logits.shape
    inv_t = torch.tensor(inv_temperature, dtype=torch.float32, device=logits.device)
    scores = logits.float() * inv_t + gumbel_noise(seed, n, v, logits.device)
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if disallowed is None:
        return scores.argmax(1)  # torch.argmax: the first NaN, else the first maximum (ties -> smallest id)
    allowed = (disallowed == 0).nonzero()[:, 0]  # increasing ids
    return allowed[scores.index_select(1, allowed).argmax(1)]


def logits_of(hidden, weight, bias):
    acc = acc_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).T
    return logits if bias is None else logits + bias.to(acc)


def _valid_targets(targets, ignore_index: int):
    valid = targets != ignore_index
    return valid, torch.where(valid, targets, 0).to(torch.int64)


def forward(hidden, weight, bias, targets, disallowed, seed: int, inv_temperature: float, ignore_index: int,
            chunk: int):
    logits = logits_of(hidden, weight, bias)
    valid, tgt = _valid_targets(targets, ignore_index)
    lse = torch.logsumexp(logits, 1)
    target_logit = logits.gather(1, tgt[:, None])[:, 0]
    loss_rows = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
    argmax = logits.argmax(1) if logits.shape[0] else torch.empty(0, dtype=torch.int64, device=logits.device)
    return loss_rows, lse, sample(logits, disallowed, seed, inv_temperature), argmax


def backward(grad_rows, hidden, weight, bias, targets, lse, ignore_index: int, chunk: int):
    logits = logits_of(hidden, weight, bias)
    acc = logits.dtype
    valid, tgt = _valid_targets(targets, ignore_index)
    dlogits = torch.exp(logits - lse.to(acc)[:, None])
    dlogits.scatter_add_(1, tgt[:, None], -torch.ones_like(dlogits[:, :1]))
    # an ignored row contributes exactly 0, even at a NaN / inf logit (0 * NaN would be NaN)
    dlogits = torch.where(valid[:, None], dlogits * grad_rows.to(acc)[:, None], 0.0)
    dhidden = dlogits @ weight.to(acc)
    dweight = dlogits.T @ hidden.to(acc)
    dbias = dlogits.sum(0)
    return dhidden.to(hidden.dtype), dweight.to(weight.dtype), dbias.to(weight.dtype)
