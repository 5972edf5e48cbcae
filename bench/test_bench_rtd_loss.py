"""RTD loss: fused (the backend serving the device) vs the eager PyTorch formulation, fwd and fwd+bwd."""
import pytest
import torch
import torch.nn.functional as F

import electra_fast
from conftest import QUICK, run

SHAPES = [(32, 512)] if QUICK else [(32, 512), (256, 512)]


def eager_rtd_loss(logits, corrupted, original, mask):
    labels = (corrupted != original).float()
    per_token = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    m = mask.float()
    return (per_token * m).sum() / m.sum().clamp(min=1)


def inputs(b, t, dtype, device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, t, generator=g).to(device=device, dtype=dtype).requires_grad_()
    original = torch.randint(0, 30522, (b, t), generator=g).to(device)
    corrupted = torch.where(torch.rand(b, t, generator=g).to(device) < 0.15, 7, original)
    mask = torch.ones(b, t, dtype=torch.long, device=device)
    mask[:, int(t * 0.9):] = 0  # some padding, as in real batches
    return logits, corrupted, original, mask


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("b,t", SHAPES)
def test_rtd_loss(benchmark, device, impl, pass_, b, t):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    logits, corrupted, original, mask = inputs(b, t, dtype, device)
    loss_fn = electra_fast.rtd_loss if impl == "fused" else eager_rtd_loss

    def step():
        loss = loss_fn(logits, corrupted, original, mask)
        if pass_ == "fwd+bwd":
            loss.backward()
            logits.grad = None
        return loss

    run(benchmark, step, device=device, op="rtd_loss", impl=impl, pass_=pass_, shape=f"{b}x{t}", dtype=dtype,
        tokens=b * t, rounds=5 if QUICK else 200, warmup=2 if QUICK else 20)
