"""``Linear``: ``nn.Linear`` whose forward is :func:`electra_fast.linear` (the bias in the GEMM's epilogue under CPU
bf16 autocast; ``F.linear`` everywhere else). ``linear`` and ``gelu_mlp`` are the ops (electra_fast/ops/linear.py),
re-exported here for the layers that import them from ``nn``."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import gelu_mlp, linear

__all__ = ["Linear", "gelu_mlp", "linear"]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and ``isinstance``) with :func:`electra_fast.linear`'s fast path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
