"""SiFT, DeBERTa's scale-invariant fine-tuning (He et al., "DeBERTa", ICLR 2021, section 3.5; the reference is
microsoft/DeBERTa ``DeBERTa/sift/sift.py``): virtual adversarial training whose perturbation is applied to the
*normalised* word embeddings, so its size means the same for every model scale.

Per training batch, on top of the task loss:

1. the summed embeddings ``x`` entering the embedding LayerNorm are replaced by ``n = LN0(x)`` (a LayerNorm without
   affine parameters, eps 1e-7: zero mean, unit variance per token; in the clean pass too, as in the reference,
   where it is all but the identity under the model's own LayerNorm);
2. ``delta0`` ~ N(0, ``init``^2) clipped to +-2 ``init`` (fp32, shape of ``n``); the model runs on ``n + delta0``
   (``n`` detached) and the divergence from the clean logits (detached) is differentiated with respect to
   ``delta0`` only: ``g``;
3. one ascent step, normalised per token by the largest entry of ``g``:
   ``delta1 = delta0 + step * g / (1e-6 + max|g|)`` (so ``max |delta1 - delta0| = step`` per token, in ``g``'s
   direction);
4. the adversarial loss is the divergence between the model on ``n + delta1`` and the clean logits (gradients to the
   parameters through both), averaged over rows: symmetric KL for classes, squared error for regression.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F


def symmetric_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row: CE(p_target, q) + CE(q, p_target) with the probabilities detached (the reference's form)."""
    q, p = F.log_softmax(logits.float(), -1), F.log_softmax(target.float(), -1)
    return (p.exp().detach() * -q).sum(-1) + (q.exp().detach() * -p).sum(-1)


def divergence(logits: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    if task == "regression":
        return (logits.float() - target.float()) ** 2
    return symmetric_kl(logits, target)


class SiFT:
    """Hooks ``model.backbone.embeddings.LayerNorm``; :meth:`loss` runs steps 2-4 for one batch."""

    def __init__(self, model: torch.nn.Module, step: float = 1e-4, init: float = 1e-2):
        self.step, self.init = float(step), float(init)
        self.normed: Optional[torch.Tensor] = None
        self.delta: Optional[torch.Tensor] = None
        self.last: Tuple[torch.Tensor, ...] = ()  # (delta0, g, delta1) of the latest call, for inspection
        norm = model.backbone.embeddings.LayerNorm
        self._handle = norm.register_forward_pre_hook(self._hook)

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, module, inputs):
        if not module.training:  # evaluation: the model as exported (no extra normalisation)
            return None
        x = inputs[0]
        if self.delta is None:  # a clean pass: remember n for the perturbed passes of this batch
            self.normed = F.layer_norm(x.float(), x.shape[-1:], eps=1e-7).to(x.dtype)
            return (self.normed,)
        return ((self.normed.detach().float() + self.delta).to(x.dtype),)

    def loss(self, clean: torch.Tensor, logits_fn: Callable[[], torch.Tensor], task: str,
             rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``clean``: the batch's logits from the clean pass just run; ``logits_fn()`` reruns the model on the same
        batch; ``rows``: bool mask of the logit rows that count (token classification: real tokens)."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        n = self.normed
        delta0 = torch.randn(n.shape, dtype=torch.float32, device=n.device) * self.init
        delta0 = delta0.clamp(-2 * self.init, 2 * self.init).requires_grad_()
        try:
            self.delta = delta0
            first = divergence(pick(logits_fn()), pick(clean).detach(), task).sum()
            (g,) = torch.autograd.grad(first, delta0)
            if not bool(torch.isfinite(g).all()):  # the reference skips the step on a non-finite gradient
                delta1 = delta0.detach()
            else:
                delta1 = delta0.detach() + self.step * g / (1e-6 + g.abs().amax(-1, keepdim=True))
            self.delta = delta1
            self.last = (delta0.detach(), g, delta1)
            final = divergence(pick(logits_fn()), pick(clean), task)
            return final.sum() / max(final.numel(), 1)  # no counted row (no labelled word): 0, not 0 / 0
        finally:
            self.delta = None
