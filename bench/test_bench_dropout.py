"""Dropout: fused counter-based dropout (mask regenerated in the backward) vs torch's dropout, fwd and fwd+bwd.

Shapes: ELECTRA-small hidden states [B * T, H] = [4096, 256] and attention probabilities [B, heads, T, T] =
[32, 4, 128, 128]; p = 0.1 as in pretraining. tokens = B * T = 4096 for both.
"""
import pytest
import torch
import torch.nn.functional as F

import electra_fast
from conftest import QUICK, run

P = 0.1
TOKENS = 32 * 128
SHAPES = [(4096, 256)] if QUICK else [(4096, 256), (32, 4, 128, 128)]
DTYPES = [torch.float32] if QUICK else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dropout(benchmark, device, impl, pass_, dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_(pass_ == "fwd+bwd")
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if impl == "fused":
        def fn(t):
            return electra_fast.dropout(t, P, seed=1234, stream=7)
    else:
        def fn(t):
            return F.dropout(t, P, training=True)

    def step():
        y = fn(x)
        if pass_ == "fwd+bwd":
            y.backward(grad)
            x.grad = None
        return y

    run(benchmark, step, device=device, op="dropout", impl=impl, pass_=pass_, shape="x".join(map(str, shape)),
        dtype=dtype, tokens=TOKENS, rounds=5 if QUICK else 50, warmup=2 if QUICK else 5)
