"""Inputs shared by the disentangled-attention tests (test_disentangled_attention_*.py, the transformers adapter's
tests and the GPU lane): padding masks, q / k / v / position tensors, a forward + backward runner, transformers' module and config."""
import pytest
import torch

import electra_fast

hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
from transformers import DebertaV2Config  # noqa: E402


# Small-span configs so that T > 2k is cheap to reach: (position_buckets, max_relative_positions) -> k
SMALL = (8, 32)  # k = 8, log buckets beyond |r| = 4


def _pad(kind: str, B: int, T: int) -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    if kind == "right":
        m[-1, max(1, T // 2):] = False
    elif kind == "left":
        m[0, : T // 3] = False
    elif kind == "holes":
        m[:, 1::3] = False
        m[:, 0] = True
    elif kind == "full_row":
        m[0] = False
    return m


def _inputs(B, H, T, D, span, dtype, pos=("c2p", "p2c"), seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3))
    pk = torch.randn(H, 2 * span, D, generator=g).to(dtype) if "c2p" in pos else None
    pq = torch.randn(H, 2 * span, D, generator=g).to(dtype) if "p2c" in pos else None
    return q, k, v, pk, pq


def _hf_config(pos_att, share, buckets, max_rel, hidden=64, heads=2):
    return DebertaV2Config(hidden_size=hidden, num_attention_heads=heads, relative_attention=True,
                           pos_att_type=list(pos_att), share_att_key=share, position_buckets=buckets,
                           max_relative_positions=max_rel, max_position_embeddings=max_rel,
                           attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


def _hf_module(pos_att, share, buckets, max_rel, dtype):
    torch.manual_seed(1)
    return hf.DisentangledSelfAttention(_hf_config(pos_att, share, buckets, max_rel)).to(dtype).eval()


def _run(backend, device, args, grad_out, **kw):
    q, k, v, pk, pq = [None if a is None else a.detach().to(device).requires_grad_() for a in args]
    with electra_fast.use_backend(backend):
        out = electra_fast.disentangled_attention(q, k, v, pk, pq, **kw)
        grads = torch.autograd.grad(out, [a for a in (q, k, v, pk, pq) if a is not None], grad_out.to(device))
    return [out.detach().cpu()] + [g.cpu() for g in grads]
