"""The fine-tuning model: a pretrained discriminator's encoder (``models.modeling.Backbone``, on the fused ops) plus a
task head with transformers' layout, and where its weights come from / go to.

Heads (transformers' parameter names, so the export loads as ``ElectraFor*`` / ``DebertaV2For*``):

* sequence classification / regression: ELECTRA's head, first token -> dropout -> dense (H -> H) -> GELU ->
  dropout -> ``out_proj`` (H -> labels; 1 output for regression) == ``ElectraClassificationHead``, and for DeBERTa
  ``ContextPooler`` (``pooler.dense``) + ``classifier``;
* token classification: dropout -> ``classifier`` (H -> labels) per token == ``*ForTokenClassification``.

Sources (:func:`load_encoder`): an electra-fast checkpoint or run directory (its newest complete checkpoint), an
``electra-fast export`` / ``save_pretrained`` directory, or a local transformers ELECTRA / DeBERTa-v2/v3 / BERT /
RoBERTa directory (``ElectraForPreTraining``, ``ElectraModel``, ``DebertaV2Model``, ``BertModel``, or any
``*For...`` class of those families: only the encoder is taken; a BERT-family encoder runs as the ELECTRA encoder it
is, ``interop.electra_view``, and its export is an ``ElectraFor*`` model).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models import ElectraConfig, ElectraPretrainingModel
from ..models import interop
from ..models.modeling import Backbone, init_weights
from ..nn.dropout import Dropout
from ..nn.linear import Linear
from .._validate import reason
from .errors import FinetuneError


def _fp32_projection(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``proj(x)`` in the weights' dtype (fp32 unless the model was cast), not autocast's: bf16 logits hold 8 bits,
    so a regression output rounded to steps of 0.016 near 3 (the predictions, their scores and the epoch chosen
    then differed from the fp32 export's); the projection is H x labels, its cost nothing."""
    with torch.autocast(x.device.type, enabled=False):
        return proj(x.to(proj.weight.dtype))  # fp32 weights: fp32; a model cast to bf16 stays bf16


class ClassificationHead(nn.Module):
    """hidden [B, T, H] -> logits [B, num_labels] from the first token (ELECTRA's / DeBERTa's pooled head)."""

    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = Dropout(dropout)
        self.dense = Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.dense(self.dropout(hidden[:, 0])))
        return _fp32_projection(self.out_proj, self.dropout(x))


class TokenHead(nn.Module):
    """hidden [B, T, H] -> logits [B, T, num_labels]."""

    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _fp32_projection(self.classifier, self.dropout(hidden))


class FinetuneModel(nn.Module):
    """``backbone`` (the discriminator's encoder) + ``head``; ``forward(ids, mask, types)`` -> fp32-castable logits:
    [B, C] (classification), [B] (regression) or [B, T, C] (token classification)."""

    def __init__(self, config: ElectraConfig, task: str, num_labels: int):
        super().__init__()
        self.config, self.task, self.num_labels = config, task, num_labels
        self.backbone = Backbone(config, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                                 config.intermediate_size)
        outputs = 1 if task == "regression" else num_labels
        head = TokenHead if task == "token-classification" else ClassificationHead
        self.head = head(config.hidden_size, outputs, config.hidden_dropout_prob)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self.head(self.backbone(input_ids, attention_mask, token_type_ids))
        return logits.squeeze(-1) if self.task == "regression" else logits


# ---------------------------------------------------------------------------------------- loading
def _from_pretraining(model: ElectraPretrainingModel) -> Tuple[ElectraConfig, Dict[str, torch.Tensor]]:
    return model.config, interop.export_state(model, "discriminator")


def _transformers_dir(path: str) -> Tuple[ElectraConfig, Dict[str, torch.Tensor]]:
    hf, weights = interop.checkpoint_files(path, "--model")
    kind = hf.get("model_type")
    if kind not in ("electra", "deberta-v2") + interop.BERT_FAMILY:
        raise FinetuneError(f"--model: {path} holds a {kind!r} model; fine-tuning reads ELECTRA, DeBERTa-v2/v3 and "
                            f"BERT-family ({', '.join(('electra', 'deberta-v2') + interop.BERT_FAMILY)}) encoders")
    state = interop.load_weights(weights)
    ids = _special_ids(path)
    try:
        if kind in interop.BERT_FAMILY:  # the same encoder as ELECTRA's discriminator
            hf, state = interop.electra_view(hf, state)
        cfg = interop.config_from_transformers(hf, hf, **ids)  # the generator's sizes are unused
    except (ValueError, TypeError, KeyError) as e:
        raise FinetuneError(f"--model: {path}/config.json: {e}") from None
    return cfg, state


def _special_ids(path: str) -> Dict[str, int]:
    """The special-token ids of the tokenizer in a transformers directory (config.json holds only the pad id; BERT's
    defaults, e.g. unk 100, do not fit a small vocabulary)."""
    from ..train.errors import PretrainError
    from ..train.tokenizer import config_overrides, load_tokenizer

    try:
        ids = config_overrides(load_tokenizer(path))
    except PretrainError as e:  # fine-tuning needs it: said now, not as the config error its absence would cause
        raise tokenizer_error(e) from None
    ids.pop("vocab_size")  # the model's embedding matrix decides it
    return ids


def tokenizer_error(e: Exception) -> FinetuneError:
    """A model directory's own tokenizer failed to load: the ``--model``'s fault (finetune has no --tokenizer)."""
    return FinetuneError(f"--model: {str(e).removeprefix('--tokenizer: ')}")


def load_encoder(path: str) -> Tuple[ElectraConfig, Dict[str, torch.Tensor], str]:
    """(config, transformers-named discriminator weights, tokenizer path) of a model directory (module docstring)."""
    from ..train import checkpoint as ckpt

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FinetuneError(f"--model: no such directory: {path}")
    if not os.path.isdir(path):
        raise FinetuneError(f"--model: {path} is a file; expected a checkpoint, run, export or transformers directory")
    if os.path.isfile(os.path.join(path, interop.CONFIG_NAME)):  # electra-fast export / save_pretrained
        try:
            model = ElectraPretrainingModel.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise FinetuneError(f"--model: cannot read {path}: {e}") from None
        tok = os.path.join(path, "discriminator")
        return (*_from_pretraining(model), tok)
    if os.path.isfile(os.path.join(path, "meta.json")) or os.path.isdir(os.path.join(path, "checkpoints")):
        src = ckpt.resolve(path, warn=lambda m: None)
        model = interop.to_be_loaded(ElectraPretrainingModel, ckpt.load_config(src))
        ckpt.load_model_state(model, os.path.join(src, "model.safetensors"))
        return (*_from_pretraining(model), os.path.join(src, "tokenizer.json"))
    if os.path.isfile(os.path.join(path, "config.json")):
        try:
            return (*_transformers_dir(path), path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # CheckpointError, JSON, safetensors errors
            if isinstance(e, FinetuneError):
                raise
            raise FinetuneError(f"--model: cannot read {path}: {reason(e)}") from None
    raise FinetuneError(f"--model: {path} is not an electra-fast checkpoint, run or export, nor a transformers model "
                        "directory (no meta.json, checkpoints/, electra_fast.json or config.json)")


def build(cfg: ElectraConfig, state: Optional[Dict[str, torch.Tensor]], task: str, num_labels: int,
          source: str = "") -> FinetuneModel:
    """A FinetuneModel whose encoder holds ``state`` (None: random initialisation, the baseline) and a fresh head."""
    cfg = dataclasses.replace(cfg, embedding_sharing="none")  # only the discriminator exists here
    model = FinetuneModel(cfg, task, num_labels)
    if state is not None:
        holder = nn.Module()
        holder.backbone = model.backbone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the RTD head is not part of this model
            try:
                interop.load_part(SimpleNamespace(config=cfg, discriminator=holder), "discriminator", state, source)
            except interop.CheckpointError as e:
                raise FinetuneError(f"--model: {e}") from None
    return model


# ---------------------------------------------------------------------------------------- export
def _architecture(cfg: ElectraConfig, task: str) -> Tuple[str, str, Dict[str, str]]:
    """(transformers class, encoder prefix, our head keys -> theirs)."""
    family = "DebertaV2" if cfg.disentangled else "Electra"
    prefix = "deberta." if cfg.disentangled else "electra."
    if task == "token-classification":
        return f"{family}ForTokenClassification", prefix, {"head.classifier.": "classifier."}
    if cfg.disentangled:
        return f"{family}ForSequenceClassification", prefix, {"head.dense.": "pooler.dense.",
                                                              "head.out_proj.": "classifier."}
    return f"{family}ForSequenceClassification", prefix, {"head.dense.": "classifier.dense.",
                                                          "head.out_proj.": "classifier.out_proj."}


def transformers_state(model: FinetuneModel) -> Dict[str, torch.Tensor]:
    _, prefix, head = _architecture(model.config, model.task)
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            out[prefix + key[len("backbone."):]] = value
        else:
            ours = next(k for k in head if key.startswith(k))
            out[head[ours] + key[len(ours):]] = value
    return out


def transformers_config(model: FinetuneModel, labels: List[str]) -> dict:
    cfg, task = model.config, model.task
    arch, _, _ = _architecture(cfg, task)
    d = interop.transformers_config(cfg, "discriminator")
    d["architectures"] = [arch]
    if task == "regression":
        d.update(num_labels=1, problem_type="regression")
    else:
        d.update(id2label={str(i): n for i, n in enumerate(labels)}, label2id={n: i for i, n in enumerate(labels)})
        if task == "classification":
            d["problem_type"] = "single_label_classification"
    if cfg.disentangled:
        d.update(pooler_hidden_size=cfg.hidden_size, pooler_dropout=cfg.hidden_dropout_prob,
                 pooler_hidden_act="gelu")
    return d


def export(model: FinetuneModel, labels: List[str], tok, out_dir: str) -> None:
    """``out_dir``/config.json + model.safetensors + tokenizer files, loadable by transformers' Auto classes."""
    from ..train.tokenizer import save_for_transformers

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(transformers_config(model, labels), f, indent=2, sort_keys=True)
    interop.save_weights(transformers_state(model), out_dir)
    save_for_transformers(tok, out_dir, model.config.max_position_embeddings)
