"""Downstream metrics, as GLUE and CoNLL report them (plain Python / NumPy: no scipy or sklearn needed).

Every function takes 1-D sequences of predictions and gold values of one length and returns a float in the
metric's own range; a metric that is undefined for the input (a constant prediction for a correlation) is 0.0,
as GLUE's scorers report it, never NaN.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np


def _pair(pred: Sequence, gold: Sequence) -> Tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred), np.asarray(gold)
    if p.shape != g.shape or p.ndim != 1:
        raise ValueError(f"metrics: expected two 1-D sequences of one length, got shapes {p.shape} and {g.shape}")
    return p, g


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    p, g = _pair(pred, gold)
    return float((p == g).mean()) if len(g) else 0.0


def f1(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class (GLUE's MRPC / QQP)."""
    p, g = _pair(pred, gold)
    tp = int(((p == positive) & (g == positive)).sum())
    fp, fn = int(((p == positive) & (g != positive)).sum()), int(((p != positive) & (g == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 over the classes present in ``gold`` or ``pred``."""
    p, g = _pair(pred, gold)
    classes = sorted(set(p.tolist()) | set(g.tolist()))
    return float(np.mean([f1(p, g, c) for c in classes])) if classes else 0.0


def matthews(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004), = the binary MCC for two classes (CoLA)."""
    p, g = _pair(pred, gold)
    classes = sorted(set(p.tolist()) | set(g.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    c = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for a, b in zip(g.tolist(), p.tolist()):
        c[index[a], index[b]] += 1
    t, s, n = c.sum(1), c.sum(0), c.sum()
    num = np.trace(c) * n - (s * t).sum()
    den = np.sqrt((n * n - (s * s).sum()) * (n * n - (t * t).sum()))
    return float(num / den) if den > 0 else 0.0


def pearson(pred: Sequence[float], gold: Sequence[float]) -> float:
    p, g = _pair(pred, gold)
    if len(p) == 0 or p.min() == p.max() or g.min() == g.max():  # undefined: 0.0, not the mean's rounding error
        return 0.0
    p, g = p.astype(np.float64) - p.mean(), g.astype(np.float64) - g.mean()
    den = np.sqrt((p * p).sum() * (g * g).sum())
    return float((p * g).sum() / den) if den > 0 else 0.0


def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (what Spearman's rho is defined on)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    p, g = _pair(pred, gold)
    return pearson(ranks(p), ranks(g))


def entity_spans(tags: Sequence[str]) -> set:
    """(type, start, end) of each entity in a BIO / IOB2 tag sequence (conlleval's rules: an I- after O or after
    another type starts an entity)."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, name = tag.partition("-") if tag != "O" else ("O", "", None)
        begins = prefix == "B" or (prefix == "I" and kind != name)
        if start is not None and (prefix == "O" or begins):
            spans.add((kind, start, i))
            start, kind = None, None
        if begins:
            start, kind = i, name
    return spans


def entity_f1(pred: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> float:
    """Micro F1 over exact entity spans (the CoNLL-2003 score), for lists of tag sequences."""
    if len(pred) != len(gold):
        raise ValueError(f"metrics: {len(pred)} predicted sequences for {len(gold)} gold ones")
    tp = fp = fn = 0
    for p, g in zip(pred, gold):
        ps, gs = entity_spans(p), entity_spans(g)
        tp, fp, fn = tp + len(ps & gs), fp + len(ps - gs), fn + len(gs - ps)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# task kind -> (metric names in report order, the one that picks the best checkpoint)
TASK_METRICS: Dict[str, Tuple[List[str], str]] = {
    "classification": (["accuracy", "f1", "matthews"], "accuracy"),
    "regression": (["pearson", "spearman"], "pearson"),
    "token-classification": (["entity_f1", "accuracy"], "entity_f1"),
}


def is_bio(tags: Sequence[str]) -> bool:
    """Whether a tag set is BIO (``O``, ``B-X``, ``I-X``): only then do entity spans, and entity F1, mean anything."""
    return all(t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2) for t in tags)


def selection_metric(task: str, labels: Sequence[str]) -> str:
    """The validation metric that picks the best epoch: the task's (``TASK_METRICS``), but token accuracy for a tag
    set that is not BIO (integer ``ner_tags``, POS tags: entity F1 would be 0 at every epoch)."""
    if task == "token-classification" and not is_bio(labels):
        return "accuracy"
    return TASK_METRICS[task][1]


def classification_scores(pred: Sequence[int], gold: Sequence[int], num_labels: int) -> Dict[str, float]:
    """accuracy, F1 (of class 1 for two classes, macro otherwise) and Matthews correlation."""
    return {"accuracy": accuracy(pred, gold),
            "f1": f1(pred, gold) if num_labels == 2 else macro_f1(pred, gold),
            "matthews": matthews(pred, gold)}


def regression_scores(pred: Sequence[float], gold: Sequence[float]) -> Dict[str, float]:
    p, g = _pair(pred, gold)
    if not (np.isfinite(p.astype(np.float64)).all() and np.isfinite(g.astype(np.float64)).all()):
        # NaNs would be ranked in input order: Spearman 1.0 for a diverged model
        raise ValueError("metrics: regression scores need finite predictions and labels")
    return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold)}


def token_scores(pred: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> Dict[str, float]:
    flat_p = [t for s in pred for t in s]
    flat_g = [t for s in gold for t in s]
    return {"entity_f1": entity_f1(pred, gold), "accuracy": accuracy(flat_p, flat_g) if flat_g else 0.0}
