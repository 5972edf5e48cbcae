"""Linear and the GELU feed-forward block in eager PyTorch: the truth the C++ kernels (csrc/linear.cpp) match.

Stages (one dtype throughout, 2-d row-major inputs; the ops in electra_fast/ops/linear.py make them so):
  ``linear``        x [N, in], w [out, in], b [out] or None -> y [N, out] = x w^T + b
  ``mlp_forward``   x [N, in] -> (y [N, out2], a [N, hidden], s [N, hidden]): z = x w1^T + b1, a = gelu(z) (erf
                    form), s = gelu'(z), y = a w2^T + b2. ``s`` is kept instead of z so that the backward's
                    dz = (dY w2) * s is one product with an elementwise epilogue.
  ``mlp_backward``  (dY, x, w1, a, s, w2) -> (dx, dw1, db1, dw2, db2); an absent bias's gradient is an empty tensor.

``onednn`` (every stage) says whether the C++ kernels may use oneDNN's epilogue GEMMs; the reference computes the
same values without them (a oneDNN kernel may sum the products in another order: a few ulps of the output dtype).
s = gelu'(z) = cdf(z) + z pdf(z) is computed in fp32 (fp64 for fp64 input) and rounded once to z's dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], onednn: bool) -> torch.Tensor:
    return F.linear(x, w, b)


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """gelu'(z) = Phi(z) + z phi(z) (erf form), in z's dtype (computed in fp32, fp64 for fp64)."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    zf = z.to(acc)
    cdf = 0.5 * (1.0 + torch.erf(zf * math.sqrt(0.5)))
    return (cdf + zf * torch.exp(-0.5 * zf * zf) * _INV_SQRT_2PI).to(z.dtype)


def mlp_forward(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor], onednn: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = F.linear(x, w1, b1)
    a = F.gelu(z)
    return F.linear(a, w2, b2), a, gelu_grad(z)


def mlp_backward(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                 w2: torch.Tensor, has_b1: bool, has_b2: bool, onednn: bool):
    grad = grad.contiguous()
    dz = grad.mm(w2) * s
    empty = grad.new_empty(0)
    return (dz.mm(w1), dz.t().mm(x), dz.sum(0) if has_b1 else empty, grad.t().mm(a),
            grad.sum(0) if has_b2 else empty)
