"""Dropout as a module on the fused Philox op (``electra_fast.dropout``): a drop-in for ``nn.Dropout``.

Each training call draws the op's seed from torch's default generator, so a run is reproducible under
``torch.manual_seed`` (and the mask costs no bernoulli_ pass and no saved tensor: the backward regenerates
it). In the eager twin (``electra_fast.eager_twin_mode()``, ``ElectraPretrainingModel(fused=False)``) the
module is torch's own dropout, the eager formulation the fused one is benchmarked against (the
reference op would run Philox in Python).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend, _seed, _validate
from ..ops.dropout import dropout

draw_seed = _seed.draw  # moved to electra_fast/_seed.py; this name stays for callers

eager_twin = _backend.eager_twin  # modules take torch's eager paths inside electra_fast.eager_twin_mode()


class Dropout(nn.Dropout):
    """x (any shape, float) -> same shape and dtype; identity in eval mode or with p == 0.

    A subclass of ``nn.Dropout`` (same arguments, ``isinstance`` and repr), so code that finds dropout modules by
    type (to change ``p``, or to switch them off) finds these too."""

    inplace = False  # what a Dropout pickled before this was an nn.Dropout lacks

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__(_validate.probability("p", p, one=True), inplace)  # p == 1: zeros, as nn.Dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # a trace would freeze the drawn seed into the graph (one mask for every call) and export cannot draw it:
        # torch's dropout there, which the graph records as drawing anew (checked first: dynamo cannot read the
        # eager twin's ContextVar, which failed a strict export)
        torch_dropout = not _seed.drawable() or eager_twin()
        y = F.dropout(x, self.p, training=True) if torch_dropout else dropout(x, self.p, _seed.draw())
        return x.copy_(y) if self.inplace else y
