"""A 10-second tour of the RTD-loss op on this machine: ``python -m electra_fast.demo``."""
from __future__ import annotations

import time

import torch

import electra_fast
from ._console import settle_stdout, show


def main() -> int:
    torch.manual_seed(0)
    b, t = 64, 512
    logits = torch.randn(b, t, requires_grad=True)
    original = torch.randint(1000, 30522, (b, t))
    corrupted = torch.where(torch.rand(b, t) < 0.15, torch.randint(1000, 30522, (b, t)), original)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[:, 480:] = 0
    show(f"rtd_loss on {b} x {t} CPU tokens; backends here: {electra_fast.available_backends()}")
    for backend in electra_fast.available_backends():
        with electra_fast.use_backend(backend):
            loss, metrics = electra_fast.rtd_loss(logits, corrupted, original, mask, return_metrics=True)
            loss.backward()
            start = time.perf_counter()
            for _ in range(20):
                logits.grad = None
                electra_fast.rtd_loss(logits, corrupted, original, mask).backward()
            ms = (time.perf_counter() - start) / 20 * 1e3
        shown = ", ".join(f"{k} {v.item():.3f}" for k, v in metrics.items())
        show(f"  {backend:<9} loss {loss.item():.6f}  {shown}  fwd+bwd {ms:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(settle_stdout("python -m electra_fast.demo", main(), output_is_the_work=True))
