"""``pretrain --init-from PATH``: start a new run from an existing model instead of a fresh initialisation.

PATH may be
  * an electra-fast run (its newest complete checkpoint) or checkpoint directory,
  * an ``electra-fast export`` / ``save_pretrained`` directory (``electra_fast.json`` + generator/ + discriminator/),
  * a transformers generator + discriminator pair: a directory with ``generator/`` and ``discriminator/``
    (ELECTRA: ElectraForMaskedLM + ElectraForPreTraining; or two DeBERTa-v2/v3 checkpoints),
  * one DeBERTa-v2/v3 checkpoint directory (``model_type`` deberta-v2): the discriminator; the generator, which
    such releases do not ship, starts fresh at DeBERTa-v3's shape (the same width, half the depth).
The tokenizer is PATH's (its tokenizer.json or vocab.txt, in PATH or its discriminator/ / generator/) unless
``--tokenizer`` is given; its vocabulary must be the model's size (PATH's own may be smaller: DeBERTa-v3's releases
hold 128100 rows for 128001 tokens; the generator never samples the unused ids), and its special ids become the
model's.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

from . import checkpoint as ckpt
from .._console import say
from .._validate import reason
from .errors import PretrainError


@dataclass
class Source:
    path: str
    kind: str              # "checkpoint", "export", "pair" or "deberta"
    model: object          # ElectraPretrainingModel holding the weights, on the CPU
    tokenizer: Optional[str]  # where PATH's tokenizer is, or None
    own_tokenizer: bool = True  # PATH's own, not --tokenizer

    @property
    def config(self):
        return self.model.config

    def config_for(self, tok, recipe: dict):
        """The run's config: PATH's, with the tokenizer's special ids and the recipe's settings (which may not
        change the generator's shape)."""
        from .recipe import _differs, apply
        from .tokenizer import config_overrides
        ids = config_overrides(tok)
        rows = self.config.vocab_size
        # fewer tokens than rows: only PATH's own tokenizer (its ids are the rows'), not another one given
        if ids["vocab_size"] > rows or (ids["vocab_size"] < rows and not self.own_tokenizer):
            whose = f"--init-from: {self.path}'s own tokenizer" if self.own_tokenizer else "--tokenizer"
            raise PretrainError(f"{whose}: a vocabulary of {ids['vocab_size']} does not fit --init-from "
                                f"{self.path} (its embeddings hold {rows} tokens)")
        if ids["vocab_size"] < rows:  # DeBERTa-v3's release: 128100 rows, 128001 tokens; the rest no text yields
            unused = set(range(ids["vocab_size"], rows))
            ids = {**ids, "vocab_size": rows,
                   "disallowed_sample_ids": tuple(sorted(set(self.config.disallowed_sample_ids) | unused
                                                         | set(ids.get("disallowed_sample_ids", ()))))}
        if "generator_size" in recipe and _differs("generator_size", None, recipe["generator_size"], self.config):
            raise PretrainError(f"--generator-size: --init-from {self.path} has a generator "
                                f"{self.config.generator_hidden_size} wide, which its weights fix; drop "
                                "--generator-size")
        return apply(self.config.replace(**ids), recipe)

    def load_into(self, net) -> None:
        """Copy the weights into ``net`` (built from :meth:`config_for`: same shapes)."""
        net.load_state_dict(self.model.state_dict(), strict=True)


def init_source(init_from: Optional[str], tokenizer: Optional[str], model, vocab_size, resume: bool):
    """(the loaded source or None, the tokenizer to use: --tokenizer, else the source's)."""
    if init_from is None:
        return None, tokenizer
    for name, given in (("--resume", resume), ("--model", model is not None), ("--vocab-size", vocab_size is not None)):
        if given:
            raise PretrainError(f"--init-from: not with {name} (the model and its vocabulary are --init-from's)")
    source = resolve(init_from, tokenizer, warn=say)
    if source.tokenizer is None:
        raise PretrainError(f"--init-from: {init_from} holds no tokenizer.json or vocab.txt; pass --tokenizer")
    return source, source.tokenizer


def _tokenizer_in(*dirs: str) -> Optional[str]:
    for d in dirs:
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.isfile(os.path.join(d, name)):
                return d
    return None


def _hf_config(directory: str) -> Optional[dict]:
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def resolve(path: str, tokenizer: Optional[str], warn) -> Source:
    """Load PATH (see the module docstring) with ``tokenizer`` (None: PATH's); anything else is one
    PretrainError naming --init-from."""
    from ..models import ElectraConfig, ElectraPretrainingModel
    from ..models import interop
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise PretrainError(f"--init-from: {path} is not a directory (expected an electra-fast run, checkpoint or "
                            "export, or a transformers ELECTRA / DeBERTa checkpoint directory)")
    gen, disc = os.path.join(path, "generator"), os.path.join(path, "discriminator")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if os.path.isfile(os.path.join(path, "meta.json")) or os.path.isdir(os.path.join(path, "checkpoints")):
                found = ckpt.resolve(path, warn)
                model = ElectraPretrainingModel(ElectraConfig.from_json_file(os.path.join(found, "config.json")))
                ckpt.load_model_state(model, os.path.join(found, "model.safetensors"))
                source = Source(found, "checkpoint", model, tokenizer or _tokenizer_in(found))
            elif os.path.isfile(os.path.join(path, interop.CONFIG_NAME)):
                source = Source(path, "export", ElectraPretrainingModel.from_pretrained(path),
                                tokenizer or _tokenizer_in(disc, gen, path))
            elif os.path.isdir(gen) and os.path.isdir(disc):  # transformers configs carry no [CLS] / [MASK] ids
                tok = tokenizer or _tokenizer_in(disc, gen, path)
                source = Source(path, "pair", ElectraPretrainingModel.from_transformers(gen, disc, **_ids(tok, path)),
                                tok)
            elif (_hf_config(path) or {}).get("model_type") == "deberta-v2":
                tok = tokenizer or _tokenizer_in(path)
                source = Source(path, "deberta", _deberta_discriminator(path, _ids(tok, path)), tok)
                warn(f"--init-from: {path} holds a discriminator only; the generator starts fresh "
                     f"({source.config.generator_num_hidden_layers} layers of {source.config.generator_hidden_size})")
            else:
                raise PretrainError(f"--init-from: {path} is none of: an electra-fast run / checkpoint / export, a "
                                    "folder with generator/ and discriminator/, a DeBERTa-v2/v3 checkpoint")
    except PretrainError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # the interop's CheckpointError is a ValueError
        raise PretrainError(f"--init-from: cannot load {path}: {reason(e)}") from None
    source.own_tokenizer = tokenizer is None
    for w in caught:  # e.g. a head missing from the checkpoint: one line each, not a Python warning block
        warn(f"--init-from: {w.message}")
    return source


def _ids(tokenizer: Optional[str], path: str) -> dict:
    """The special ids of ``tokenizer`` (a path), for configs built from transformers' (which lack them)."""
    from .tokenizer import config_overrides, load_tokenizer
    if tokenizer is None:
        raise PretrainError(f"--init-from: {path} holds no tokenizer.json or vocab.txt; pass --tokenizer")
    ids = config_overrides(load_tokenizer(tokenizer))
    del ids["vocab_size"]  # the checkpoint's; Source.config_for checks that the tokenizer's matches
    return ids


def _deberta_discriminator(path: str, ids: dict):
    """A DebertaV2 checkpoint as the discriminator of a DeBERTa-v3-shaped pair (generator fresh). GDES: the
    generator's embeddings start as the checkpoint's, so E_delta = 0 and the discriminator's E_G + E_delta is
    the checkpoint's embedding exactly (a fresh E_G would leave E_G + (E_D - E_G), off by rounding)."""
    import torch
    from ..models import ElectraPretrainingModel
    from ..models import interop
    hf, weights = interop.checkpoint_files(path, "--init-from")
    half = dict(hf, num_hidden_layers=max(1, hf["num_hidden_layers"] // 2))
    cfg = interop.config_from_transformers(half, hf, embedding_sharing="gdes", **ids)
    state = interop.load_weights(weights)
    plain = ElectraPretrainingModel(cfg.replace(embedding_sharing="none"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said once, by the load below
        interop.load_part(plain, "discriminator", state, path)
    model = ElectraPretrainingModel(cfg)
    gen, disc = model.generator.backbone.embeddings, plain.discriminator.backbone.embeddings
    with torch.no_grad():
        for name in ("word_embeddings", "position_embeddings"):
            if getattr(gen, name, None) is not None:
                getattr(gen, name).weight.copy_(getattr(disc, name).weight)
    interop.load_part(model, "discriminator", state, path)
    return model
