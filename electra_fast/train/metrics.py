"""How well the discriminator separates replaced from original tokens: exact ROC AUC, precision / recall / F1 of
the "replaced" class, and the "prior" reference a model must beat.

Everything here works on what a training step already has (the discriminator's logits and the labels
``corrupted != original``), so the trainer computes it on logging steps only, with no extra forward.

The prior: a model that knows only the fraction ``r`` of replaced tokens predicts P(replaced) = r everywhere. Its
loss is the binary entropy H(r) (nats, the best any constant prediction achieves) and, predicting the majority class
for every token ("original" unless r > 0.5), its accuracy is max(r, 1 - r). A discriminator that learned nothing sits
at the prior; the margin below it (loss) or above it (accuracy) is what was learned. AUC 0.5 is chance whatever ``r``
is.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

RTD_METRICS = ("discriminator_auc", "discriminator_accuracy", "discriminator_precision", "discriminator_recall",
               "discriminator_f1", "replaced_fraction", "prior_rtd_loss", "prior_accuracy")


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
    """Exact area under the ROC curve: P(score of a positive > score of a negative), ties counting one half.

    scores: float [N] (any floating dtype, any device); labels: bool [N] (True = positive). Computed from the
    Mann-Whitney U statistic with average ranks for tied scores (fp64 ranks: exact for N < 2**26).
    Returns None when either class is absent (the AUC is undefined); NaN scores are refused with a ValueError.
    """
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ValueError(f"roc_auc: expected scores and labels of one shape [N], got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    s, y = scores.detach().double(), labels.bool()
    if torch.isnan(s).any():
        raise ValueError("roc_auc: scores hold NaN")
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = torch.argsort(s)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()                   # 1-based rank of each tie group's last member
    average = ends - (counts.double() - 1) / 2         # the group's average rank
    rank_sum = average[inverse][y[order]].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def prior(replaced_fraction: float) -> Dict[str, float]:
    """The constant predictor P(replaced) = r: loss H(r) in nats (0 when r is 0 or 1), accuracy max(r, 1 - r) (it
    says the majority class everywhere: "original" unless more than half the tokens were replaced)."""
    r = replaced_fraction
    loss = 0.0 if r <= 0 or r >= 1 else -(r * math.log(r) + (1 - r) * math.log(1 - r))
    return {"prior_rtd_loss": loss, "prior_accuracy": max(r, 1.0 - r)}


def rtd_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, Optional[float]]:
    """``RTD_METRICS`` over the real tokens given: logits float [N] (> 0 predicts "replaced"), labels bool [N].

    Precision / recall / F1 are those of the "replaced" class, 0 when undefined (as the op's metrics);
    ``discriminator_auc`` is None when the tokens hold only one class, or when a logit is NaN.
    """
    y = labels.bool()
    pred = logits > 0
    n = y.numel()
    tp, n_pred, n_pos = int((pred & y).sum()), int(pred.sum()), int(y.sum())
    correct = n - int((pred != y).sum())
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_pos if n_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    r = n_pos / n if n else 0.0
    auc = None if bool(torch.isnan(logits).any()) else roc_auc(logits, y)  # a diverged step: no ranking to score
    return {"discriminator_auc": auc, "discriminator_accuracy": correct / n if n else 0.0,
            "discriminator_precision": precision, "discriminator_recall": recall, "discriminator_f1": f1,
            "replaced_fraction": r, **prior(r)}


def fmt(value, spec: str = ".3f") -> str:
    """``value`` formatted, or "-" for an undefined metric (None)."""
    return "-" if value is None else format(value, spec)


def learned(rec: dict, held: Optional[dict]):
    """The closing summary's lines on what the discriminator (and, held out, the generator) learned, against chance
    and the prior: ``rec`` a logged step's record ({}: none logged), ``held`` the last held-out record or None."""
    lines = []
    if rec:
        lines.append(f"discriminator AUC {fmt(rec.get('discriminator_auc'), '.2f')} (chance 0.50), F1 "
                     f"{rec['discriminator_f1']:.2f}, rtd loss {rec['rtd_loss']:.4f} (prior "
                     f"{rec['prior_rtd_loss']:.4f}), accuracy {rec['discriminator_accuracy']:.3f} (prior "
                     f"{rec['prior_accuracy']:.3f}) on the last logged step")
    if held:
        lines.append(f"held out: discriminator AUC {fmt(held['eval_discriminator_auc'], '.2f')} (chance 0.50), "
                     f"F1 {held['eval_discriminator_f1']:.2f}; generator MLM accuracy "
                     f"{fmt(held['eval_generator_accuracy'])} (unigram baseline {fmt(held['eval_unigram_accuracy'])}), "
                     f"at [MASK] alone {fmt(held['eval_generator_mask_accuracy'])} (unigram "
                     f"{fmt(held['eval_unigram_mask_accuracy'])})")
    return lines


class TokenScores:
    """The discriminator's logits and labels of one step's real tokens, collected micro-batch by micro-batch."""

    def __init__(self):
        self.logits, self.labels = [], []

    def add(self, logits: torch.Tensor, corrupted: torch.Tensor, original: torch.Tensor,
            attention_mask: Optional[torch.Tensor] = None) -> None:
        """logits float [B, T]; corrupted / original int [B, T]; attention_mask [B, T] (1 = real) or None."""
        x, y = logits.detach().float(), corrupted != original
        if attention_mask is not None:
            real = attention_mask.bool()
            x, y = x[real], y[real]
        self.logits.append(x.reshape(-1))
        self.labels.append(y.reshape(-1))

    def tensors(self):
        """(logits fp32 [N], labels bool [N]) of every token added."""
        return torch.cat(self.logits), torch.cat(self.labels)
