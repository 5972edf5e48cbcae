"""Linear / GELU MLP: the oneDNN-epilogue ops vs autocast's F.linear / F.gelu composition, CPU bf16 autocast.

Shapes: ELECTRA-small's feed-forward block on [B * T, H] = [4096, 256] tokens, intermediate 1024 (the MLP row), and
its first product alone (the linear row). On CUDA and in fp32 the ops are F.linear itself (there is nothing to
compare), so the rows are CPU bf16 only, and run where the CPU multiplies bf16 natively (conftest).
"""
import pytest
import torch
import torch.nn.functional as F

import electra_fast
from conftest import QUICK, run

TOKENS, H, INTER = 32 * 128, 256, 1024
CPU_BF16 = True  # every row runs under bf16 autocast: conftest leaves them out where the CPU has no native bf16


def _mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("block", ["linear", "gelu_mlp"])
def test_linear(benchmark, device, impl, pass_, block):
    if device.type != "cpu":
        pytest.skip("the linear ops differ from F.linear only under CPU bf16 autocast")
    g = torch.Generator().manual_seed(0)
    grad_on = pass_ == "fwd+bwd"
    x = torch.randn(TOKENS, H, generator=g).requires_grad_(grad_on)
    w1 = (torch.randn(INTER, H, generator=g) * 0.05).requires_grad_(grad_on)
    b1 = torch.zeros(INTER).requires_grad_(grad_on)
    w2 = (torch.randn(H, INTER, generator=g) * 0.05).requires_grad_(grad_on)
    b2 = torch.zeros(H).requires_grad_(grad_on)
    if block == "linear":
        fn, args, out = (electra_fast.linear if impl == "fused" else F.linear), (x, w1, b1), INTER
    else:
        fn, args, out = (electra_fast.gelu_mlp if impl == "fused" else _mlp), (x, w1, b1, w2, b2), H
    dy = torch.randn(TOKENS, out, generator=g).bfloat16()
    leaves = [t for t in args if t.requires_grad]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(*args)
        if grad_on:
            y.backward(dy)
            for t in leaves:
                t.grad = None
        return y

    run(benchmark, step, device=device, op=block, impl=impl, pass_=pass_, shape=f"{TOKENS}x{H}x{INTER}",
        dtype="bf16-autocast", tokens=TOKENS, rounds=5 if QUICK else 30, warmup=2 if QUICK else 5)
