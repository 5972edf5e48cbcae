"""Dropout + residual add + LayerNorm: the fused op vs torch's three ops (F.dropout, add, F.layer_norm), fwd and
fwd+bwd, on the post-LN transformer's sublayer output.

Shapes: ELECTRA-small [B * T, H] = [4096, 256] and base [4096, 768]; p = 0.1 as in pretraining; fp32 LayerNorm
parameters (bf16 rows: the dtypes under CPU bf16 autocast). tokens = B * T = 4096.
"""
import pytest
import torch
import torch.nn.functional as F

import electra_fast
from conftest import QUICK, run

P, EPS = 0.1, 1e-12
TOKENS = 32 * 128
SHAPES = [(4096, 256)] if QUICK else [(4096, 256), (4096, 768)]
DTYPES = [torch.float32] if QUICK else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dropout_add_layer_norm(benchmark, device, impl, pass_, dtype, shape):
    g = torch.Generator().manual_seed(0)
    grad_on = pass_ == "fwd+bwd"
    x, r, gout = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    x.requires_grad_(grad_on)
    r.requires_grad_(grad_on)
    w = torch.ones(shape[-1], device=device, requires_grad=grad_on)
    b = torch.zeros(shape[-1], device=device, requires_grad=grad_on)
    if impl == "fused":
        def fn():
            return electra_fast.dropout_add_layer_norm(x, r, w, b, p=P, seed=1234, eps=EPS)
    else:
        def fn():
            return F.layer_norm(F.dropout(x, P, training=True) + r, (shape[-1],), w, b, EPS)

    def step():
        y = fn()
        if grad_on:
            y.backward(gout)
            for t in (x, r, w, b):
                t.grad = None
        return y

    run(benchmark, step, device=device, op="dropout_add_layer_norm", impl=impl, pass_=pass_,
        shape="x".join(map(str, shape)), dtype=dtype, tokens=TOKENS, rounds=5 if QUICK else 50,
        warmup=2 if QUICK else 5)
