"""transformers checkpoint interop (no network, no transformers import needed).

Layout written by ``save_pretrained(path)``::

    path/electra_fast.json           ElectraConfig (all pretraining settings)
    path/generator/config.json       + model.safetensors: ElectraForMaskedLM     | DebertaV2ForMaskedLM
    path/discriminator/config.json   + model.safetensors: ElectraForPreTraining  | DebertaV2Model

Key mapping (ours -> transformers), one table serving export and import:

    generator.backbone.*        electra.* | deberta.*
    generator.head.{dense,LayerNorm}   generator_predictions.* | lm_predictions.lm_head.* (E == H)
                                       | cls.predictions.transform.* (legacy head, E != H)
    generator.head.bias         generator_lm_head.bias | lm_predictions.lm_head.bias | cls.predictions.bias
    discriminator.backbone.*    electra.* | (no prefix: DebertaV2Model)
    discriminator.head.*        discriminator_predictions.{dense,dense_prediction}.* -- for DeBERTa these
                                RTD-head keys sit next to the DebertaV2Model weights; transformers ignores
                                them (reports them as unexpected), electra_fast reads them back.

The generator's output projection is tied to its word embeddings (not stored). GDES is exported
materialised (discriminator word embeddings = E_G + E_delta) and imported as E_delta = E_D - E_G.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .. import _files, _validate
from .._files import load_safetensors
from .._validate import reason
from .config import ElectraConfig

CONFIG_NAME = "electra_fast.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold what was asked for (architecture, keys or shapes)."""


# ---------------------------------------------------------------------------------------- key tables
def _head_prefix(cfg: ElectraConfig, role: str, legacy: bool) -> Dict[str, str]:
    """Our head sub-keys -> transformers keys."""
    if role == "discriminator":
        return {"head.": "discriminator_predictions."}
    if not cfg.disentangled:
        return {"head.bias": "generator_lm_head.bias", "head.": "generator_predictions."}
    if legacy:
        return {"head.bias": "cls.predictions.bias", "head.": "cls.predictions.transform."}
    return {"head.": "lm_predictions.lm_head."}


def _backbone_prefix(cfg: ElectraConfig, role: str) -> str:
    if not cfg.disentangled:
        return "electra."
    return "deberta." if role == "generator" else ""


def _legacy(cfg: ElectraConfig) -> bool:
    # DeBERTa's non-legacy LM head multiplies an [.., H] state by the [V, E] embeddings: needs E == H
    return cfg.embedding_size != cfg.generator_hidden_size


def _to_hf_key(key: str, cfg: ElectraConfig, role: str, legacy: bool) -> str:
    if key.endswith("word_embeddings.delta") or key.endswith("position_embeddings.delta"):
        key = key[: -len("delta")] + "weight"
    if key.startswith("backbone."):
        return _backbone_prefix(cfg, role) + key[len("backbone."):]
    for ours, theirs in _head_prefix(cfg, role, legacy).items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise KeyError(key)


def _alternatives(hf_key: str, cfg: ElectraConfig, role: str) -> List[str]:
    """Spellings of a key in checkpoints transformers writes for related classes."""
    alts = [hf_key]
    for p in ("electra.", "deberta."):
        if hf_key.startswith(p):
            alts.append(hf_key[len(p):])             # a bare ElectraModel / DebertaV2Model
    if cfg.disentangled and role == "discriminator" and not hf_key.startswith("discriminator_predictions."):
        alts.append("deberta." + hf_key)             # a DebertaV2ForMaskedLM used as discriminator
    if hf_key == "cls.predictions.bias":
        alts.append("cls.predictions.decoder.bias")
    return alts


# ---------------------------------------------------------------------------------------- transformers configs
def transformers_config(cfg: ElectraConfig, role: str) -> dict:
    gen = role == "generator"
    hidden = cfg.generator_hidden_size if gen else cfg.hidden_size
    d = dict(vocab_size=cfg.vocab_size, embedding_size=cfg.embedding_size, hidden_size=hidden,
             num_hidden_layers=cfg.generator_num_hidden_layers if gen else cfg.num_hidden_layers,
             num_attention_heads=cfg.generator_num_attention_heads if gen else cfg.num_attention_heads,
             intermediate_size=cfg.generator_intermediate_size if gen else cfg.intermediate_size,
             hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
             attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
             max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
             initializer_range=cfg.initializer_range, layer_norm_eps=cfg.layer_norm_eps,
             pad_token_id=cfg.pad_token_id, tie_word_embeddings=True)
    if not cfg.disentangled:  # ELECTRA's embeddings keep one token-type row at type_vocab_size 0 (ElectraEmbeddings)
        d.update(model_type="electra", architectures=["ElectraForMaskedLM" if gen else "ElectraForPreTraining"],
                 type_vocab_size=max(cfg.type_vocab_size, 1))
    else:
        d.update(model_type="deberta-v2", architectures=["DebertaV2ForMaskedLM" if gen else "DebertaV2Model"],
                 relative_attention=True, position_buckets=cfg.position_buckets,
                 max_relative_positions=cfg.max_relative_positions, pos_att_type=list(cfg.pos_att_type),
                 share_att_key=cfg.share_att_key, norm_rel_ebd=cfg.norm_rel_ebd,
                 position_biased_input=cfg.position_biased_input, legacy=_legacy(cfg),
                 bos_token_id=cfg.cls_token_id, eos_token_id=cfg.sep_token_id)
        if gen and cfg.enhanced_mask_decoder:
            # transformers has no Enhanced Mask Decoder: DebertaV2ForMaskedLM loads this generator (ignoring its
            # deberta.embeddings.position_embeddings) and reads the last layer's output instead, so its MLM logits
            # differ from electra_fast's; the flag lets electra_fast read the generator back with its EMD
            d["electra_fast_enhanced_mask_decoder"] = True
    return d


def _sizes(hf: dict, prefix: str) -> dict:
    return {f"{prefix}hidden_size": hf["hidden_size"], f"{prefix}num_hidden_layers": hf["num_hidden_layers"],
            f"{prefix}num_attention_heads": hf["num_attention_heads"],
            f"{prefix}intermediate_size": hf["intermediate_size"]}


def config_from_transformers(gen: dict, disc: dict, **overrides) -> ElectraConfig:
    """ElectraConfig from the two config.json dicts (electra or deberta-v2)."""
    kinds = {gen.get("model_type"), disc.get("model_type")}
    if len(kinds) != 1 or not kinds <= {"electra", "deberta-v2"}:
        raise CheckpointError(f"expected two 'electra' or two 'deberta-v2' checkpoints, got model types "
                              f"generator={gen.get('model_type')!r}, discriminator={disc.get('model_type')!r}")
    kind = kinds.pop()
    for name, hf in (("discriminator", disc), ("generator", gen)):  # a lone discriminator: named as such
        lacking = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool)]
        if lacking:
            raise CheckpointError(f"{name}: config.json has no integer {', '.join(lacking)}")
        if hf.get("is_decoder"):  # transformers masks such a model causally; these encoders attend both ways
            raise CheckpointError(f"{name}: config.json has is_decoder=true (a causal decoder, e.g. "
                                  "BertLMHeadModel); electra_fast's encoders attend in both directions")
    for key, default in _shared_settings(kind).items():  # one field of ElectraConfig serves both
        a, b = _setting(gen, key, default), _setting(disc, key, default)
        if (set(a) != set(b)) if key == "pos_att_type" else a != b:  # transformers tests membership only
            raise CheckpointError(f"the generator's config.json has {key}={a!r}, the discriminator's {b!r}: "
                                  "electra_fast's pair shares that setting")
    e_gen = gen.get("embedding_size") or gen["hidden_size"]
    e_disc = disc.get("embedding_size") or disc["hidden_size"]
    if e_gen != e_disc or gen["vocab_size"] != disc["vocab_size"]:
        raise CheckpointError(f"generator and discriminator disagree on embedding_size ({e_gen} vs {e_disc}) or "
                              f"vocab_size ({gen['vocab_size']} vs {disc['vocab_size']})")
    common = dict(vocab_size=disc["vocab_size"], embedding_size=e_disc, hidden_act=disc.get("hidden_act", "gelu"),
                  max_position_embeddings=disc.get("max_position_embeddings", 512),
                  type_vocab_size=disc.get("type_vocab_size", 2 if kind == "electra" else 0),
                  layer_norm_eps=disc.get("layer_norm_eps", 1e-12 if kind == "electra" else 1e-7),
                  hidden_dropout_prob=disc.get("hidden_dropout_prob", 0.1),
                  attention_probs_dropout_prob=disc.get("attention_probs_dropout_prob", 0.1),
                  initializer_range=disc.get("initializer_range", 0.02), pad_token_id=disc.get("pad_token_id") or 0,
                  **_sizes(disc, ""), **_sizes(gen, "generator_"))
    if kind == "electra":
        for name, hf in (("discriminator", disc), ("generator", gen)):  # a lone discriminator: named as such
            if (hf.get("position_embedding_type") or "absolute") != "absolute":
                raise CheckpointError(f"{name}: position_embedding_type {hf['position_embedding_type']!r} is not "
                                      "supported (electra_fast's ELECTRA layout has absolute position embeddings)")
        base = dict(attention="standard", embedding_sharing="tied")
    else:
        for name, hf in (("discriminator", disc), ("generator", gen)):  # a lone discriminator: named as such
            if not hf.get("relative_attention", False):
                raise CheckpointError(f"{name}: DeBERTa checkpoints without relative_attention are not supported")
            if hf.get("conv_kernel_size", 0) > 0 or "attention_head_size" in hf:
                raise CheckpointError(f"{name}: DeBERTa-v2 conv layers / custom attention_head_size are not supported")
        pat = _setting(disc, "pos_att_type", None)
        base = ElectraConfig.deberta_v3_xsmall().to_dict()
        base.update(position_buckets=disc.get("position_buckets", -1),
                    max_relative_positions=disc.get("max_relative_positions", -1), pos_att_type=pat,
                    share_att_key=disc.get("share_att_key", False), norm_rel_ebd=disc.get("norm_rel_ebd", "none"),
                    position_biased_input=disc.get("position_biased_input", True),
                    enhanced_mask_decoder=bool(gen.get("electra_fast_enhanced_mask_decoder", False)))
    base.update(common)
    base.update(overrides)
    for key in ("cls_token_id", "sep_token_id", "mask_token_id", "unk_token_id"):
        if key not in overrides and not 0 <= base.get(key, 0) < base["vocab_size"]:
            raise CheckpointError(f"{key}: the layout's default {base[key]} is outside this model's vocabulary "
                                  f"({base['vocab_size']} tokens), and transformers' config records no such id: pass "
                                  f"the tokenizer's ids ({key}=..., and the other special ids)")
    return ElectraConfig.from_dict(base)


def _shared_settings(kind: str) -> dict:
    """The transformers config fields (-> their defaults there) that one ElectraConfig field holds for both models."""
    common = {"hidden_act": "gelu", "max_position_embeddings": 512, "pad_token_id": 0,
              "type_vocab_size": 2 if kind == "electra" else 0,
              "layer_norm_eps": 1e-12 if kind == "electra" else 1e-7}
    if kind == "deberta-v2":
        common.update(position_buckets=-1, max_relative_positions=-1, pos_att_type=None, share_att_key=False,
                      norm_rel_ebd="none", position_biased_input=True)
    return common


def _setting(hf: dict, key: str, default):
    value = hf.get(key, default)
    if key == "pad_token_id":
        return value or 0
    if key == "pos_att_type":  # a list, or transformers' "p2c|c2p" spelling
        value = value or []
        parts = value.lower().split("|") if isinstance(value, str) else value
        return tuple(p.strip() if isinstance(p, str) else p for p in parts if not isinstance(p, str) or p.strip())
    return value


BERT_FAMILY = ("bert", "roberta")


def electra_view(hf: dict, state: Dict[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """A BERT / RoBERTa encoder as the ELECTRA discriminator that computes the same hidden states: ``(config.json
    dict, transformers-named weights)`` -> the same for ``model_type="electra"``.

    ELECTRA's encoder is BERT's (embedding_size == hidden_size: no projection; the same parameter names below the
    model prefix). RoBERTa numbers positions from ``pad_token_id + 1`` (a right-padded row's real tokens take
    positions pad + 1, pad + 2, ...), so its position table is sliced to start there. The pooler and task heads are
    dropped (fine-tuning adds its own head). Raises CheckpointError for any other model type.
    """
    kind = hf.get("model_type")
    if kind not in BERT_FAMILY:
        raise CheckpointError(f"expected a BERT-family model ({', '.join(BERT_FAMILY)}), got model_type {kind!r}")
    out = {}
    for key, value in state.items():
        bare = key[len(kind) + 1:] if key.startswith(kind + ".") else key
        if bare.startswith(("embeddings.", "encoder.")):
            out["electra." + bare] = value
    cfg = dict(hf, model_type="electra", embedding_size=hf["hidden_size"])
    if kind == "roberta":
        first = int(hf.get("pad_token_id", 1)) + 1
        name = "electra.embeddings.position_embeddings.weight"
        if name in out:
            out[name] = out[name][first:]
        cfg["max_position_embeddings"] = int(hf.get("max_position_embeddings", 514)) - first
    return cfg, out


# ---------------------------------------------------------------------------------------- files
def _read_json(path: str) -> dict:
    """A JSON object from ``path``, or a CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not JSON ({reason(e)})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a JSON {type(d).__name__}")
    return d


def checkpoint_files(directory: str, what: str) -> Tuple[dict, str]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{what}: checkpoint directory {directory!r} does not exist")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{what}: {directory!r} has no config.json (expected a directory written by "
                                f"transformers' save_pretrained)")
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return _read_json(cfg_path), os.path.join(directory, name)
    raise FileNotFoundError(f"{what}: {directory!r} holds none of {WEIGHT_FILES}")


def load_weights(path: str, what: str = "weights file") -> Dict[str, torch.Tensor]:
    """A safetensors / torch file's contents (``what`` names it in the CheckpointError of unreadable bytes)."""
    if path.endswith(".index.json"):
        shards = _read_json(path).get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
            raise CheckpointError(f"{path}: no 'weight_map' of tensor names to shard files")
        shards = sorted(set(shards.values()))
        lost = [name for name in shards if not os.path.isfile(os.path.join(os.path.dirname(path), name))]
        if lost:
            raise CheckpointError(f"{path} names shard file(s) that are not there: {', '.join(lost[:3])}")
        out: Dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_weights(os.path.join(os.path.dirname(path), shard)))
        return out
    from safetensors import SafetensorError
    with open(path, "rb") as f:
        if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
            raise CheckpointError(f"{path} is a Git LFS pointer, not the weights: fetch them (git lfs pull) first")
    try:
        if path.endswith(".safetensors"):
            state = load_safetensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text advises weights_only=False: running a file's code, not a fix
        raise CheckpointError(f"{path} is not a readable {what} (UnpicklingError: damaged, or a pickle of "
                              "objects that torch.load(weights_only=True) does not load)") from None
    except (SafetensorError, EOFError, RuntimeError, KeyError, ValueError) as e:
        # truncated or foreign bytes (torch.load's legacy reader raises KeyError on a wrong magic number)
        raise CheckpointError(f"{path} is not a readable {what} ({type(e).__name__}: {reason(e)})") from None
    if what == "weights file" and not (isinstance(state, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise CheckpointError(f"{path} is not a readable {what} (expected a dict of named tensors, got a "
                              f"{type(state).__name__})")
    return _modern_names(state) if what == "weights file" else state


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _modern_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The original BERT releases (bert-base-uncased...) name LayerNorm parameters ``gamma`` / ``beta``; transformers
    reads them as ``weight`` / ``bias`` (its "legacy" renaming), and so does this."""
    renamed = {}
    for key, value in state.items():
        new = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        renamed[new if new not in state else key] = value
    return renamed


def to_be_loaded(cls, cfg: ElectraConfig, **kwargs):
    """``cls(cfg, **kwargs)`` for weights loaded next: its random initialisation, overwritten at once, draws nothing
    from the caller's generator (a loader that reseeded nothing still moved the caller's torch.rand stream)."""
    with torch.random.fork_rng(devices=[]):
        return cls(cfg, **kwargs)


def save_weights(state: Dict[str, torch.Tensor], directory: str) -> None:
    """``directory``/model.safetensors; a failed write (a full disk) is a :class:`electra_fast._files.WriteError`
    naming it, not safetensors' bare "I/O error"."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = os.path.join(directory, "model.safetensors")
    with _files.writing(path):
        save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------- export
def export_state(model, role: str) -> Dict[str, torch.Tensor]:
    """transformers-named tensors of ``model.generator`` / ``model.discriminator`` (GDES materialised)."""
    cfg = model.config
    part = getattr(model, role)
    legacy = _legacy(cfg)
    modules = dict(part.named_modules())
    out = {}
    for key, value in part.state_dict().items():
        if key.endswith(".delta"):  # GDES: E_G + E_delta
            value = modules[key[: -len(".delta")]].weight
        out[_to_hf_key(key, cfg, role, legacy)] = value
    return out


def save_pretrained(model, path) -> None:
    """``model`` into ``path``, a new or empty directory (ValueError otherwise: nothing there is replaced), written
    whole or not at all (:func:`electra_fast._files.write_directory`; a full disk: its WriteError, an OSError)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_pretrained: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not path.strip():
        raise ValueError("save_pretrained: path is empty; name a new or empty directory")
    _files.remove_dead_writes(path)  # a killed save_pretrained's: a retry finds the folder as it was
    if not _files.vacant(path):
        what = "already exists and is not empty" if os.path.isdir(path) else "exists and is not a directory"
        raise ValueError(f"save_pretrained: path {path!r} {what}; name a new or empty directory (nothing was "
                         "written)")
    _files.write_directory(path, lambda tmp: write_pretrained(model, tmp))


def write_pretrained(model, path: str) -> None:
    """The files of :func:`save_pretrained` into the existing directory ``path``."""
    for role in ("generator", "discriminator"):
        d = os.path.join(path, role)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w", encoding="utf-8") as f:
            json.dump(transformers_config(model.config, role), f, indent=2, sort_keys=True)
        save_weights(export_state(model, role), d)
    model.config.to_json_file(os.path.join(path, CONFIG_NAME))


# ---------------------------------------------------------------------------------------- import
def _check_architecture(hf: dict, role: str, state: Dict[str, torch.Tensor], directory: str) -> None:
    archs = hf.get("architectures") or []
    gen_like = [a for a in archs if a.endswith("ForMaskedLM")]
    if role == "generator" and archs and not gen_like:
        raise CheckpointError(f"generator: {directory!r} holds {archs}, not a masked-LM generator "
                              f"(ElectraForMaskedLM / DebertaV2ForMaskedLM)")
    if role == "generator" and not any(k.startswith(("generator_predictions.", "lm_predictions.", "cls.predictions."))
                                       for k in state):
        raise CheckpointError(f"generator: {directory!r} has no masked-LM head weights")
    if role == "discriminator" and any(a.startswith("Electra") and a != "ElectraForPreTraining"
                                       and a != "ElectraModel" for a in archs):
        raise CheckpointError(f"discriminator: {directory!r} holds {archs}, not ElectraForPreTraining")


def load_part(model, role: str, state: Dict[str, torch.Tensor], directory: str = "") -> None:
    """Copy transformers-named ``state`` into ``model.<role>`` (shapes checked, every backbone key required)."""
    cfg = model.config
    part = getattr(model, role)
    has_legacy = any(k.startswith("cls.predictions.") for k in state)
    modules = dict(part.named_modules())
    used, missing_head = set(), []
    with torch.no_grad():
        for key, param in part.state_dict(keep_vars=True).items():
            hf_key = _to_hf_key(key, cfg, role, has_legacy)
            src = next((a for a in _alternatives(hf_key, cfg, role) if a in state), None)
            if src is None:
                if key.startswith("head."):
                    missing_head.append(hf_key)
                    continue
                raise CheckpointError(f"{role}: {directory!r} lacks {hf_key!r} (is it another architecture or size?)")
            value = state[src]
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{role}: {src!r} has shape {tuple(value.shape)} in {directory!r}, the model "
                                      f"expects {tuple(param.shape)}")
            if key.endswith(".delta"):  # GDES: E_delta = E_D - E_G
                value = value.to(param.dtype) - modules[key[: -len(".delta")]].base.weight
            param.copy_(value)
            used.add(src)
    _check_unused(state, used, role, directory)
    if missing_head:
        warnings.warn(f"{role}: {directory!r} has no {missing_head}; that head keeps its fresh initialisation",
                      stacklevel=3)


# tensors transformers itself skips on load: buffers older releases saved, DeBERTa's absolute positions when the model
# has none and its RTD head (DebertaV2's _keys_to_ignore_on_load_unexpected)
_SKIPPED = re.compile(r"(?:^|\.)(?:position_ids|token_type_ids)$|(?:^|\.)position_embeddings\.weight$"
                      r"|^mask_predictions\.")
# output projections transformers ties to the word embeddings (and electra_fast always does)
_DECODERS = {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight",
             "cls.predictions.decoder.weight": "deberta.embeddings.word_embeddings.weight"}


def _check_unused(state: Dict[str, torch.Tensor], used: set, role: str, directory: str) -> None:
    """Refuse what loading would drop silently: encoder weights with no place in the model (a config.json with
    fewer layers than the weights, another architecture) and a generator projection not tied to its embeddings."""
    for decoder, embeddings in _DECODERS.items():
        if (role == "generator" and decoder in state and embeddings in state
                and not torch.equal(state[decoder], state[embeddings])):
            raise CheckpointError(f"generator: {directory!r} holds an output projection {decoder!r} that differs "
                                  "from its word embeddings (saved with tie_word_embeddings=False?); electra_fast's "
                                  "generator ties them, so its logits would not be the checkpoint's")
    def encoder_key(k: str) -> bool:  # under the model prefix, or a bare ElectraModel / DebertaV2Model key
        bare = k.split(".", 1)[1] if k.startswith(("electra.", "deberta.")) else k
        return bare.startswith(("embeddings.", "encoder."))

    stray = sorted(k for k in state if k not in used and not _SKIPPED.search(k) and encoder_key(k))
    if stray:
        raise CheckpointError(f"{role}: {directory!r} holds {len(stray)} encoder weight(s) the model has no place "
                              f"for ({', '.join(map(repr, stray[:3]))}{', ...' if len(stray) > 3 else ''}): more "
                              "layers or another architecture than its config.json says?")


def from_transformers(cls, generator_path, discriminator_path, *, embedding_sharing: Optional[str] = None,
                      fused: bool = True, **overrides):
    gen_dir, disc_dir = os.fspath(generator_path), os.fspath(discriminator_path)
    gen_hf, gen_file = checkpoint_files(gen_dir, "generator_path")
    disc_hf, disc_file = checkpoint_files(disc_dir, "discriminator_path")
    if embedding_sharing is not None:
        overrides["embedding_sharing"] = embedding_sharing
    cfg = config_from_transformers(gen_hf, disc_hf, **overrides)
    gen_state, disc_state = load_weights(gen_file), load_weights(disc_file)
    _check_architecture(gen_hf, "generator", gen_state, gen_dir)
    _check_architecture(disc_hf, "discriminator", disc_state, disc_dir)
    model = to_be_loaded(cls, cfg, fused=fused)
    _load_both(model, gen_state, disc_state, gen_dir, disc_dir)
    return model


def _load_both(model, gen_state, disc_state, gen_dir, disc_dir) -> None:
    load_part(model, "generator", gen_state, gen_dir)
    if model.config.embedding_sharing == "tied":
        before = {k: v.clone() for k, v in model.generator.backbone.embeddings.state_dict().items()}
    load_part(model, "discriminator", disc_state, disc_dir)  # tied: the discriminator's embeddings win
    if model.config.embedding_sharing == "tied":
        after = model.generator.backbone.embeddings.state_dict()
        if any(not torch.equal(before[k], after[k]) for k in before):
            warnings.warn("embedding_sharing='tied': the generator and discriminator checkpoints hold different "
                          "embeddings; the shared embeddings take the discriminator's (the Python API's "
                          "ElectraPretrainingModel.from_transformers(..., embedding_sharing='none') keeps both)",
                          stacklevel=3)


def from_pretrained(cls, path, fused: bool = True):
    path = _validate.path("path", path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"path: {path!r} has no {CONFIG_NAME} (written by ElectraPretrainingModel."
                                f"save_pretrained); use from_transformers for plain transformers checkpoints")
    try:
        cfg = ElectraConfig.from_json_file(cfg_path)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not JSON ({e})") from None
    except (TypeError, ValueError) as e:  # an unknown or ill-typed field: the message named no file
        raise CheckpointError(f"{cfg_path}: {e}") from None
    model = to_be_loaded(cls, cfg, fused=fused)
    states = []
    for role in ("generator", "discriminator"):
        hf, f = checkpoint_files(os.path.join(path, role), role)
        states.append(load_weights(f))
    _load_both(model, states[0], states[1], os.path.join(path, "generator"), os.path.join(path, "discriminator"))
    return model
