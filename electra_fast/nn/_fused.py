"""The fused ops the model layer runs through, looked up at call time.

Every call goes to the public op (``electra_fast.mask_tokens``, ``mlm_loss_and_sample``, ``rtd_loss``,
``disentangled_attention``); the op's own dispatch picks triton / cpp / reference, so the model's
eager twin is simply ``electra_fast.use_backend("reference")``.

TEMPORARY: while an op has not landed yet, a minimal eager stand-in below serves it (same
signature, torch-generator randomness instead of Philox). Each stand-in is deleted as soon as its
op exists; none is used once all ops are present.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .. import ops as _ops


def _public(name):
    return getattr(_ops, name, None)


def mask_tokens(input_ids, **kw):
    op = _public("mask_tokens")
    if op is not None:
        return op(input_ids, **kw)
    return _stand_in_mask_tokens(input_ids, **kw)


def mlm_loss_and_sample(hidden, weight, targets, **kw):
    op = _public("mlm_loss_and_sample")
    if op is not None:
        return op(hidden, weight, targets, **kw)
    return _stand_in_mlm_loss_and_sample(hidden, weight, targets, **kw)


def rtd_loss(*args, **kw):
    return _ops.rtd_loss(*args, **kw)


def disentangled_attention(q, k, v, pos_key=None, pos_query=None, **kw):
    op = _public("disentangled_attention")
    if op is not None:
        return op(q, k, v, pos_key, pos_query, **kw)
    return _stand_in_disentangled_attention(q, k, v, pos_key, pos_query, **kw)


# ------------------------------------------------------------------ temporary stand-ins
def _stand_in_mask_tokens(input_ids, *, mask_token_id, vocab_size, seed, mask_prob=0.15, mask_token_frac=0.85,
                          random_token_frac=0.0, special_token_ids=(), attention_mask=None, word_starts=None,
                          strategy="count", validate=True):
    g = torch.Generator(device=input_ids.device).manual_seed(seed)
    cand = torch.ones_like(input_ids, dtype=torch.bool)
    for s in special_token_ids:
        cand &= input_ids != s
    n_real = input_ids.new_full((input_ids.shape[0],), input_ids.shape[1]) if attention_mask is None \
        else attention_mask.bool().sum(1)
    if attention_mask is not None:
        cand &= attention_mask.bool()
    keys = torch.rand(input_ids.shape, generator=g, device=input_ids.device).masked_fill(~cand, 2.0)
    n = torch.minimum(cand.sum(1), (mask_prob * n_real.double()).round().clamp(min=1).long())
    rank = keys.argsort(1).argsort(1)
    masked = (rank < n[:, None]) & cand
    u = torch.rand(input_ids.shape, generator=g, device=input_ids.device)
    out = torch.where(masked & (u < mask_token_frac), torch.full_like(input_ids, mask_token_id), input_ids)
    labels = torch.where(masked, input_ids.long(), torch.full_like(input_ids, -100, dtype=torch.long))
    return SimpleNamespace(input_ids=out, labels=labels, masked=masked)


def _stand_in_mlm_loss_and_sample(hidden, weight, targets, *, bias=None, seed, temperature=1.0, disallowed_ids=(),
                                  ignore_index=-100, reduction="mean", return_metrics=False):
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    loss = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction=reduction) \
        if targets.numel() else logits.sum() * 0
    g = torch.Generator(device=hidden.device).manual_seed(seed)
    u = torch.rand(logits.shape, generator=g, device=hidden.device).clamp(1e-12, 1 - 1e-7)
    sampled = (logits.detach() / temperature - torch.log(-torch.log(u))).argmax(1)
    if return_metrics:
        acc = (logits.argmax(1) == targets).float().mean() if targets.numel() else logits.new_zeros(())
        return loss, sampled, {"accuracy": acc.detach()}
    return loss, sampled


def _stand_in_disentangled_attention(q, k, v, pos_key=None, pos_query=None, *, attention_mask=None,
                                     position_buckets=256, max_relative_positions=512, dropout_p=0.0, seed=None,
                                     scale=None):
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position
    B, H, T, D = q.shape
    span = position_buckets if position_buckets > 0 else max_relative_positions
    rel = build_relative_position(q[0, 0], q[0, 0], bucket_size=position_buckets,
                                  max_position=max_relative_positions)[0]
    slots = torch.clamp(rel + span, 0, 2 * span - 1)
    n_terms = 1 + (pos_key is not None) + (pos_query is not None)
    scale = scale if scale is not None else 1.0 / (D * n_terms) ** 0.5
    s = q @ k.transpose(-1, -2)
    if pos_key is not None:
        s = s + torch.gather(q @ pos_key.transpose(-1, -2).unsqueeze(0), -1, slots.expand(B, H, T, T))
    if pos_query is not None:
        s = s + torch.gather(k @ pos_query.transpose(-1, -2).unsqueeze(0), -1,
                             slots.T.expand(B, H, T, T)).transpose(-1, -2)
    s = s.float() * scale
    if attention_mask is not None:
        s = s.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = (p.to(v.dtype) @ v)
    if attention_mask is not None:
        out = out * attention_mask.bool()[:, None, :, None]
    return out
