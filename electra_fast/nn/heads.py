"""Pretraining heads with transformers' parameter names.

``GeneratorHead``     dense (H -> E) -> act -> LayerNorm(E), then the tied output projection + ``bias`` [V]
                      through ``electra_fast.mlm_loss_and_sample`` at the masked rows only (never [N, V]).
                      == ElectraGeneratorPredictions + generator_lm_head.bias, or DeBERTa's
                      ``lm_predictions.lm_head`` (dense, LayerNorm, bias).
``DiscriminatorHead`` dense (H -> H) -> act -> dense_prediction (H -> 1) == ElectraDiscriminatorPredictions.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _validate
from .encoder import activation
from .linear import Linear


class GeneratorHead(nn.Module):
    """The generator's MLM head (transformers' ElectraGeneratorPredictions + the lm head's bias): hidden [..., H]
    -> dense -> ``act`` -> LayerNorm(``eps``) -> [..., E], projected on the tied word table [V, E] plus ``bias`` [V].
    Training projects only the masked rows, inside ``electra_fast.mlm_loss_and_sample``."""

    def __init__(self, hidden_size: int, embedding_size: int, vocab_size: int, act: str, eps: float):
        super().__init__()
        _validate.layer_norm_eps("eps", eps)
        self.dense = Linear(hidden_size, embedding_size)
        self.act = activation(act)
        self.LayerNorm = nn.LayerNorm(embedding_size, eps=eps)
        self.bias = nn.Parameter(torch.zeros(_validate.integer_arg("vocab_size", vocab_size, 1)))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., E]: the input of the vocabulary projection."""
        return self.LayerNorm(self.act(self.dense(hidden)))

    def logits(self, hidden: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        """hidden [..., H], word_weight [V, E] (the tied table) -> full [..., V] logits in hidden's dtype (for
        inspection and interop; training never builds them)."""
        return F.linear(self.transform(hidden), word_weight, self.bias)

    forward = logits


class DiscriminatorHead(nn.Module):
    """The discriminator's replaced-token head (transformers' ElectraDiscriminatorPredictions): hidden [..., H] ->
    dense (H -> H) -> ``act`` -> dense_prediction (H -> 1) -> one logit per token."""

    def __init__(self, hidden_size: int, act: str):
        super().__init__()
        self.dense = Linear(_validate.integer_arg("hidden_size", hidden_size, 1), hidden_size)
        self.act = activation(act)
        self.dense_prediction = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> fp logits [B, T] (> 0 predicts "replaced")."""
        return self.dense_prediction(self.act(self.dense(hidden))).squeeze(-1)
