"""ElectraConfig: one dataclass describing a generator + discriminator pretraining pair.

``attention="standard"`` builds transformers' ELECTRA layout (``ElectraModel``: embeddings of size E with
their own LayerNorm, ``embeddings_project`` E -> H, BERT layers with SDPA attention).
``attention="disentangled"`` builds the DeBERTa-v2/v3 layout (``DebertaV2Model``: embeddings projected
by ``embed_proj`` (no bias) then LayerNorm over H, relative embeddings shared by all layers, the fused
disentangled attention op).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .. import _validate
from .._files import write_atomic
from ..nn.encoder import ACTIVATIONS, rel_embedding_norms

ATTENTIONS = ("standard", "disentangled")
SHARINGS = ("none", "tied", "gdes")
STRATEGIES = ("count", "bernoulli")
POS_ATT_TYPES = ("c2p", "p2c")
F32_MAX = 3.4028234663852886e38  # the training step's numbers are fp32
# what a masked position becomes: ELECTRA's pretrain_helpers.mask() puts [MASK] at 85% and keeps the original
# token at 15%; BERT's create_pretraining_data.py puts [MASK] at 80%, a random token at 10%, the original at 10%
MASKING_SCHEMES = {"electra": dict(mask_token_frac=0.85, random_token_frac=0.0),
                   "bert": dict(mask_token_frac=0.8, random_token_frac=0.1)}


@dataclass
class ElectraConfig:
    """The generator / discriminator pair's architecture and pretraining objective, one typed field each (defaults:
    ELECTRA-Small's discriminator with BERT uncased's special ids; presets: :meth:`electra_small`,
    :meth:`deberta_v3_small`, ...). Every field is checked where a config is made (ValueError / TypeError naming
    it); NumPy scalars are taken as Python numbers. JSON: :meth:`to_json_file` / :meth:`from_json_file`."""

    # vocabulary and special ids (BERT uncased WordPiece for ELECTRA)
    vocab_size: int = 30522
    pad_token_id: int = 0
    unk_token_id: int = 100
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    # discriminator
    embedding_size: int = 128
    hidden_size: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    # generator
    generator_hidden_size: int = 64
    generator_num_hidden_layers: int = 12
    generator_num_attention_heads: int = 1
    generator_intermediate_size: int = 256
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    # attention: "standard" (SDPA, key padding) or "disentangled" (DeBERTa's c2p / p2c, fused op)
    attention: str = "standard"
    position_buckets: int = 256
    max_relative_positions: int = -1          # < 1: max_position_embeddings (as transformers)
    pos_att_type: Tuple[str, ...] = ("p2c", "c2p")
    share_att_key: bool = True
    norm_rel_ebd: str = "layer_norm"
    position_biased_input: bool = True        # absolute position embeddings added to the input
    # DeBERTa's Enhanced Mask Decoder for the generator's MLM head (needs position_biased_input=False): see
    # ElectraGenerator.encode
    enhanced_mask_decoder: bool = False
    # generator / discriminator embedding sharing
    embedding_sharing: str = "tied"
    # masking (electra_fast.mask_tokens)
    mask_prob: float = 0.15
    mask_token_frac: float = MASKING_SCHEMES["electra"]["mask_token_frac"]
    random_token_frac: float = MASKING_SCHEMES["electra"]["random_token_frac"]
    masking_strategy: str = "count"
    whole_word_masking: bool = False          # the trainer passes the tokenizer's word starts to mask_tokens
    # sampling and loss
    temperature: float = 1.0
    disallowed_sample_ids: Tuple[int, ...] = ()   # never sampled, never a random replacement (masking_excluded_ids)
    disc_weight: float = 50.0
    # regularisation / init
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self):
        for f in dataclasses.fields(self):  # the JSON reader's types too: ElectraConfig(**json.load(...))
            value, kinds = getattr(self, f.name), _accepted(f.default)
            kind = _json_type(value)
            if kind not in kinds:
                raise TypeError(f"ElectraConfig.{f.name}: expected {' or '.join(map(_article, kinds))}, got "
                                f"{_clip(repr(value))}")
            if isinstance(value, (np.generic, numbers.Number)) and kind in _PYTHON:  # NumPy scalars: JSON-writable
                setattr(self, f.name, _PYTHON[kind](value))
        self.pos_att_type = tuple(self.pos_att_type)
        self.disallowed_sample_ids = tuple(_validate.int_ids("ElectraConfig.disallowed_sample_ids",
                                                             self.disallowed_sample_ids))
        self.validate()

    # ---------------------------------------------------------------- checks
    def validate(self, warn: bool = True) -> None:
        """ValueError / TypeError naming the first field out of range; ``warn``: also warn about legal but unusual
        settings (a generator larger than the discriminator)."""
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ElectraConfig.{name}: expected a positive int, got {v!r}")

        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "generator_hidden_size", "generator_num_hidden_layers",
                     "generator_num_attention_heads", "generator_intermediate_size", "max_position_embeddings"):
            positive(name)
        for h, n in (("hidden_size", "num_attention_heads"), ("generator_hidden_size", "generator_num_attention_heads")):
            if getattr(self, h) % getattr(self, n):
                raise ValueError(f"ElectraConfig.{h}: {getattr(self, h)} is not divisible by {n} = {getattr(self, n)}")
        for name in ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"ElectraConfig.{name}: expected an id in [0, vocab_size={self.vocab_size}), got {v}")
        for i in self.disallowed_sample_ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ElectraConfig.disallowed_sample_ids: id {i} outside [0, {self.vocab_size})")
        if len(set(self.disallowed_sample_ids)) >= self.vocab_size:
            raise ValueError(f"ElectraConfig.disallowed_sample_ids: disallows every one of the {self.vocab_size} "
                             "tokens, so the generator could sample nothing")
        if self.type_vocab_size < 0:
            raise ValueError(f"ElectraConfig.type_vocab_size: expected >= 0, got {self.type_vocab_size}")
        for name, options in (("attention", ATTENTIONS), ("embedding_sharing", SHARINGS),
                              ("masking_strategy", STRATEGIES)):
            if getattr(self, name) not in options:
                raise ValueError(f"ElectraConfig.{name}: expected one of {options}, got {getattr(self, name)!r}")
        bad = [p for p in self.pos_att_type if p not in POS_ATT_TYPES]
        if bad:
            raise ValueError(f"ElectraConfig.pos_att_type: expected a subset of {POS_ATT_TYPES}, got {self.pos_att_type}")
        for name in ("mask_prob", "mask_token_frac", "random_token_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ElectraConfig.{name}: expected a probability in [0, 1], got {getattr(self, name)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):  # 1.0 would drop everything
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ElectraConfig.{name}: expected a probability in [0, 1), got {getattr(self, name)}")
        rel_embedding_norms(self.norm_rel_ebd, "ElectraConfig.norm_rel_ebd")  # transformers' "layer_norm|..."
        if self.mask_token_frac + self.random_token_frac > 1.0 + 1e-9:
            raise ValueError("ElectraConfig.random_token_frac: mask_token_frac + random_token_frac must be <= 1, got "
                             f"{self.mask_token_frac} + {self.random_token_frac}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"ElectraConfig.hidden_act: expected one of {ACTIVATIONS}, got {self.hidden_act!r}")
        # the step holds these in fp32: 1 / temperature and disc_weight must stay finite there
        _validate.real("ElectraConfig.temperature", self.temperature, 1 / F32_MAX, math.inf, lo_open=True)
        _validate.real("ElectraConfig.disc_weight", self.disc_weight, 0.0, F32_MAX, lo_open=True, hi_open=False)
        _validate.layer_norm_eps("ElectraConfig.layer_norm_eps", self.layer_norm_eps)
        # a standard deviation of weights: far above 1 the first forward overflows fp32 (NaN losses)
        _validate.real("ElectraConfig.initializer_range", self.initializer_range, 0.0, 1.0, hi_open=False)
        if self.enhanced_mask_decoder and not (self.disentangled and not self.position_biased_input
                                               and self.embedding_size == self.generator_hidden_size):
            raise ValueError("ElectraConfig.enhanced_mask_decoder: needs attention='disentangled', "
                             "position_biased_input=False and embedding_size == generator_hidden_size (the absolute "
                             "positions are added to the generator's hidden states), got "
                             f"{self.attention!r}, {self.position_biased_input}, {self.embedding_size} vs "
                             f"{self.generator_hidden_size}")
        if not self.disentangled and not self.position_biased_input:
            raise ValueError("ElectraConfig.position_biased_input: False needs attention='disentangled' (relative "
                             "positions); the standard layout's only position signal is the absolute embeddings it "
                             "adds to the input")
        if self.disentangled:
            if self.relative_span < 1:
                raise ValueError("ElectraConfig.position_buckets: the relative span (position_buckets if > 0 else "
                                 "max_relative_positions) must be >= 1")
            if not _validate.log_buckets_fit(self.position_buckets, self.max_relative_distance):
                # the op refuses these too, but only at the first forward: say it where the config is made
                raise ValueError("ElectraConfig.position_buckets: log buckets need position_buckets >= 2 and "
                                 "max_relative_positions (< 1: max_position_embeddings) > position_buckets // 2 + 1, "
                                 f"got position_buckets={self.position_buckets}, max_relative_positions resolving "
                                 f"to {self.max_relative_distance}")
            if (self.embedding_sharing == "tied" and self.generator_hidden_size != self.hidden_size):
                raise ValueError("ElectraConfig.embedding_sharing: 'tied' with disentangled attention shares the "
                                 "embedding LayerNorm over the hidden size, so generator_hidden_size "
                                 f"({self.generator_hidden_size}) must equal hidden_size ({self.hidden_size})")
        if warn and (self.generator_hidden_size > self.hidden_size
                     or self.generator_num_hidden_layers > self.num_hidden_layers):
            warnings.warn("ElectraConfig: the generator is larger than the discriminator (ELECTRA works best with a "
                          "generator 1/4 to 1/2 the discriminator's size)", stacklevel=3)

    # ---------------------------------------------------------------- derived
    @property
    def disentangled(self) -> bool:
        return self.attention == "disentangled"

    @property
    def max_relative_distance(self) -> int:
        """max_relative_positions as transformers resolves it (< 1 -> max_position_embeddings)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def relative_span(self) -> int:
        """k: relative embeddings hold 2k rows (transformers' ``pos_ebd_size``)."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_distance

    @property
    def special_token_ids(self) -> Tuple[int, ...]:
        """Ids never selected for masking ([PAD], [CLS], [SEP], [MASK]; padding is also excluded by the mask)."""
        return tuple(sorted({self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id}))

    @property
    def masking_excluded_ids(self) -> Tuple[int, ...]:
        """Ids masking neither selects nor draws as a random replacement: :attr:`special_token_ids` and
        ``disallowed_sample_ids`` (--init-from's rows no token uses: random replacements drew them, though the
        generator never samples them)."""
        return tuple(sorted(set(self.special_token_ids) | set(self.disallowed_sample_ids)))

    def with_generator_size(self, fraction: float) -> "ElectraConfig":
        """The generator ``fraction`` of the discriminator's width, as ELECTRA's ``get_generator_config``
        (google-research/electra run_pretraining.py): hidden = round(hidden_size * fraction), FFN 4 x hidden,
        max(1, hidden // 64) heads; depth unchanged. DeBERTa-v3's tied LayerNorm needs the full width."""
        fraction = _validate.real("fraction", fraction, 0.0, math.inf, lo_open=True)
        hidden = int(round(self.hidden_size * fraction))
        return self.replace(generator_hidden_size=hidden, generator_intermediate_size=4 * hidden,
                            generator_num_attention_heads=max(1, hidden // 64))

    def replace(self, **changes) -> "ElectraConfig":
        """A copy with ``changes`` (field=value) applied and checked."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        """Every field as a JSON-ready value (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["pos_att_type"] = list(self.pos_att_type)
        d["disallowed_sample_ids"] = list(self.disallowed_sample_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ElectraConfig":
        """A config from a dict of fields (missing ones take their defaults; an unknown one is a ValueError)."""
        if not isinstance(d, dict):
            raise TypeError(f"ElectraConfig.from_dict: expected a dict of config fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names, key=str)
        if unknown:
            raise ValueError(f"ElectraConfig.from_dict: unknown fields {unknown}")
        return cls(**d)

    def to_json_string(self) -> str:
        """:meth:`to_dict` as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, s: str) -> "ElectraConfig":
        """A JSON object of config fields, each of its field's JSON type (a float field takes an int too)."""
        d = json.loads(s)
        if not isinstance(d, dict):
            raise TypeError(f"ElectraConfig: a config must be a JSON object of fields, got a JSON {_json_type(d)}: "
                            f"{_clip(s)}")
        return cls.from_dict(d)  # each field's type is checked where every config is made (__post_init__)

    def to_json_file(self, path: "str | os.PathLike") -> None:
        """Write the config as JSON, atomically: the text is made first, so a field that cannot be written leaves
        the file there was untouched. A symbolic link is written through (its target updated, the link kept), and an
        existing file keeps its permissions, as ``open(path, "w")`` would."""
        text = self.to_json_string()
        target = os.path.realpath(_validate.path("path", path))
        if os.path.isfile(target) and not os.access(target, os.W_OK):  # the rename would replace it all the same
            raise PermissionError(f"path: {target} is not writable")

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            if os.path.isfile(target):
                shutil.copymode(target, tmp)
        write_atomic(target, write)

    @classmethod
    def from_json_file(cls, path: "str | os.PathLike") -> "ElectraConfig":
        """A config from a UTF-8 JSON file written by :meth:`to_json_file` (see :meth:`from_json_string`)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_json_string(f.read())

    # ---------------------------------------------------------------- presets
    @classmethod
    def electra_small(cls, **kw) -> "ElectraConfig":
        """ELECTRA-Small: E 128, H 256, 12 x 4 heads, FFN 1024; generator 1/4 width (64, 1 head, FFN 256)."""
        return cls(**{**dict(embedding_size=128, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                             intermediate_size=1024, generator_hidden_size=64, generator_num_hidden_layers=12,
                             generator_num_attention_heads=1, generator_intermediate_size=256), **kw})

    @classmethod
    def electra_base(cls, **kw) -> "ElectraConfig":
        """ELECTRA-Base: E 768, H 768, 12 x 12 heads, FFN 3072; generator 1/3 width (256, 4 heads, FFN 1024)."""
        return cls(**{**dict(embedding_size=768, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, generator_hidden_size=256, generator_num_hidden_layers=12,
                             generator_num_attention_heads=4, generator_intermediate_size=1024), **kw})

    @classmethod
    def electra_large(cls, **kw) -> "ElectraConfig":
        """ELECTRA-Large: E 1024, H 1024, 24 x 16 heads, FFN 4096; generator 1/4 width; mask_prob 0.25."""
        return cls(**{**dict(embedding_size=1024, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, generator_hidden_size=256, generator_num_hidden_layers=24,
                             generator_num_attention_heads=4, generator_intermediate_size=1024, mask_prob=0.25), **kw})

    @classmethod
    def deberta_v3_layout(cls, hidden, layers, heads, **kw) -> "ElectraConfig":
        """DeBERTa-v3's layout at any size (the presets below are its published sizes); ``kw`` overrides fields."""
        # DeBERTa-v3: SentencePiece vocab 128100 ([PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 [MASK]=128000), relative
        # position buckets 256, c2p + p2c with shared keys, LayerNorm on the relative embeddings, no absolute
        # positions or token types (they enter only the generator's Enhanced Mask Decoder, as in Microsoft's RTD
        # code), generator of the same width and half the depth, GDES; BERT-style 80/10/10
        # masking as in DeBERTa's NGramMaskGenerator.
        base = dict(vocab_size=128100, pad_token_id=0, cls_token_id=1, sep_token_id=2, unk_token_id=3,
                    mask_token_id=128000, embedding_size=hidden, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=4 * hidden, generator_hidden_size=hidden,
                    generator_num_hidden_layers=max(1, layers // 2), generator_num_attention_heads=heads,
                    generator_intermediate_size=4 * hidden, type_vocab_size=0, attention="disentangled",
                    position_buckets=256, max_relative_positions=-1, pos_att_type=("p2c", "c2p"),
                    share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                    enhanced_mask_decoder=True, embedding_sharing="gdes", **MASKING_SCHEMES["bert"], layer_norm_eps=1e-7)
        return cls(**{**base, **kw})

    @classmethod
    def deberta_v3_xsmall(cls, **kw) -> "ElectraConfig":
        return cls.deberta_v3_layout(384, 12, 6, **kw)

    @classmethod
    def deberta_v3_small(cls, **kw) -> "ElectraConfig":
        return cls.deberta_v3_layout(768, 6, 12, **kw)

    @classmethod
    def deberta_v3_base(cls, **kw) -> "ElectraConfig":
        return cls.deberta_v3_layout(768, 12, 12, **kw)

    @classmethod
    def deberta_v3_large(cls, **kw) -> "ElectraConfig":
        return cls.deberta_v3_layout(1024, 24, 16, **kw)


def _json_type(value) -> str:
    """The JSON type a value reads as (NumPy's integers and floats as JSON's; a tuple, set, range or NumPy array
    as an array)."""
    for kind, types in (("boolean", (bool, np.bool_)), ("integer", (numbers.Integral,)), ("number", (numbers.Real,)),
                        ("string", (str,)), ("array", (list, tuple, range, set, frozenset, np.ndarray)),
                        ("object", (dict,))):
        if isinstance(value, types):
            return kind
    return "null"


def _accepted(default) -> tuple:
    kind = "array" if isinstance(default, tuple) else _json_type(default)
    return ("number", "integer") if kind == "number" else (kind,)


_PYTHON = {"boolean": bool, "integer": int, "number": float}


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


PRESETS = ("electra_small", "electra_base", "electra_large",
           "deberta_v3_xsmall", "deberta_v3_small", "deberta_v3_base", "deberta_v3_large")
