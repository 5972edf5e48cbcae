"""TokenMasker: the masking configuration as an nn.Module, with dynamic masking (a fresh seed per call)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .. import _seed, _validate
from ..ops.masking import STRATEGIES, MaskedTokens, mask_tokens


class TokenMasker(nn.Module):
    """Holds the arguments of :func:`electra_fast.mask_tokens`; ``forward`` masks a batch.

    Each call without ``seed=`` draws a fresh seed from torch's default CPU generator, so masking is
    dynamic (a new mask every step) and reproducible under ``torch.manual_seed``. Presets:
    ``TokenMasker.electra(...)`` (85 % [MASK] / 15 % kept) and ``TokenMasker.bert(...)`` (80 / 10 random / 10).
    """

    def __init__(self, *, mask_token_id: int, vocab_size: int, mask_prob: float = 0.15,
                 mask_token_frac: float = 0.85, random_token_frac: float = 0.0,
                 special_token_ids: Sequence[int] = (), strategy: str = "count", validate: bool = True):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        self.mask_token_id = _validate.integer_arg("mask_token_id", mask_token_id)  # True is no id
        self.vocab_size = vocab_size
        self.mask_prob = mask_prob
        self.mask_token_frac = mask_token_frac
        self.random_token_frac = random_token_frac
        # int() would read 101.7 as 101 and True as 1: the ids are checked before they are kept
        self.special_token_ids = tuple(_validate.int_ids("special_token_ids", special_token_ids))
        self.strategy = strategy
        self.validate = validate
        # Check the configuration now (a 1x1 batch of the mask token) rather than at the first step.
        mask_tokens(torch.full((1, 1), mask_token_id), seed=0, **self._kwargs())

    @classmethod
    def electra(cls, **kwargs) -> "TokenMasker":
        """ELECTRA's corruption: of the selected tokens 85 % become [MASK], 15 % stay; ``kwargs``: the constructor's
        (``mask_token_id`` and ``vocab_size`` required), which override the preset."""
        return cls(**{"mask_token_frac": 0.85, "random_token_frac": 0.0, **kwargs})

    @classmethod
    def bert(cls, **kwargs) -> "TokenMasker":
        """BERT's corruption: 80 % [MASK], 10 % a random token, 10 % kept; ``kwargs`` as :meth:`electra`."""
        return cls(**{"mask_token_frac": 0.8, "random_token_frac": 0.1, **kwargs})

    def _kwargs(self) -> dict:
        return dict(mask_token_id=self.mask_token_id, vocab_size=self.vocab_size, mask_prob=self.mask_prob,
                    mask_token_frac=self.mask_token_frac, random_token_frac=self.random_token_frac,
                    special_token_ids=self.special_token_ids, strategy=self.strategy, validate=self.validate)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                word_starts: Optional[torch.Tensor] = None, *, seed: Optional[int] = None) -> MaskedTokens:
        """input_ids int32 / int64 [B, T]; attention_mask and word_starts bool / int [B, T] or None; ``seed`` an int
        in [0, 2**63) or None (drawn from torch's generator). Returns :class:`~electra_fast.MaskedTokens` (see
        :func:`electra_fast.mask_tokens`)."""
        return mask_tokens(input_ids, seed=_seed.draw() if seed is None else seed, attention_mask=attention_mask,
                           word_starts=word_starts, **self._kwargs())

    def extra_repr(self) -> str:
        return (f"mask_token_id={self.mask_token_id}, vocab_size={self.vocab_size}, mask_prob={self.mask_prob}, "
                f"mask_token_frac={self.mask_token_frac}, random_token_frac={self.random_token_frac}, "
                f"special_token_ids={self.special_token_ids}, strategy={self.strategy!r}")
