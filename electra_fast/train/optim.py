"""Optimiser recipe pieces shared by pretraining and fine-tuning: ELECTRA's weight-decay split, layer-wise
learning-rate decay, and the linear warm-up / linear decay schedule."""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional

import torch

_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def param_groups(model: torch.nn.Module, weight_decay: float,
                 lr_scale: Optional[Callable[[str], float]] = None) -> List[dict]:
    """AdamW groups: weight decay on matrices and embeddings, none on LayerNorm parameters and biases (ELECTRA's
    ``exclude_from_weight_decay``); with ``lr_scale(name)``, one group per (decay, scale) carrying ``lr_scale`` (the
    factor the schedule's learning rate is multiplied by: ``lr`` = base lr x scale)."""
    norms = set()
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            norms.update(id(p) for p in m.parameters(recurse=False))
    groups: Dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if id(p) in norms or name.endswith("bias") or p.dim() < 2 else weight_decay
        scale = 1.0 if lr_scale is None else lr_scale(name)
        g = groups.setdefault((decay, scale), {"params": [], "names": [], "weight_decay": decay, "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def layer_decay(num_layers: int, decay: float) -> Callable[[str], float]:
    """ELECTRA's layer-wise learning-rate decay (google-research/electra ``model/optimization.py``,
    ``_get_layer_lrs``): depth 0 for the embeddings (and their projection), ``i + 1`` for encoder layer ``i``,
    ``num_layers + 2`` for the task head; the rate is ``lr * decay ** (num_layers + 2 - depth)``. Encoder parameters
    outside the layers (DeBERTa's relative-position embeddings and their LayerNorm, used by every layer) take
    depth 1, the lowest layer's."""
    def scale(name: str) -> float:
        if name.startswith("head."):
            depth = num_layers + 2
        elif (m := _LAYER.search(name)) is not None:
            depth = int(m.group(1)) + 1
        elif ".encoder." in f".{name}":
            depth = 1
        else:
            depth = 0
        return decay ** (num_layers + 2 - depth)
    return scale


def linear_schedule(warmup: int, steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over ``warmup`` steps to 1, then linear decay to 0 at ``steps``."""
    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))
    return factor
