"""The pretraining recipe: the settings the ELECTRA, BERT, RoBERTa and DeBERTa-v3 papers vary, as flags.

One owner per value: the masking / sampling / loss settings are ``ElectraConfig`` fields (their defaults are
the ``--model`` preset's), the optimizer's are :data:`OPTIMIZER` here, the tokenizer families are
``tokenizer.TOKENIZER_TYPES``. A flag left out keeps the owner's value; a flag given is validated up front
(:func:`check`), applied to the model config (:func:`apply`), recorded in ``run.json`` and in every checkpoint
(:func:`record`), and compared with the recorded recipe on ``--resume`` (:func:`settle`).

The command line's parser takes its flags from :func:`add_arguments`.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Dict, Optional, Tuple

from ..models.config import F32_MAX
from .errors import PretrainError

# AdamW as ELECTRA's optimization.py sets it (beta1 0.9, beta2 0.999, eps 1e-6); RoBERTa uses beta2 0.98
ADAM_BETA1 = 0.9
OPTIMIZER = {"adam_beta2": 0.999, "adam_eps": 1e-6}
# recipe keys that are ElectraConfig fields (generator_size sets the generator's width through
# ElectraConfig.with_generator_size)
CONFIG_FIELDS = ("mask_prob", "mask_token_frac", "random_token_frac", "temperature", "disc_weight",
                 "whole_word_masking")
# what a resumed run cannot change: the vocabulary and the generator's weights have that shape, and the data
# position counts rows of the packing
FIXED_ON_RESUME = ("tokenizer_type", "generator_size", "packing")
KEYS = CONFIG_FIELDS + ("generator_size", "tokenizer_type", "packing") + tuple(OPTIMIZER)
# (lower bound, lower bound allowed, upper bound, upper bound allowed) of each number. The training step holds them in
# fp32: adam_eps below its smallest normal number rounds towards 0 (then 0 / 0), a disc_weight above its largest is
# inf, and 1 / temperature must stay finite.
_F32_TINY = 1.1754943508222875e-38
RANGES = {"mask_prob": (0.0, False, 1.0, True), "mask_token_frac": (0.0, True, 1.0, True),
          "random_token_frac": (0.0, True, 1.0, True), "temperature": (1 / F32_MAX, False, math.inf, False),
          "disc_weight": (0.0, False, F32_MAX, True), "generator_size": (0.0, False, 1.0, True),
          "adam_beta2": (0.0, True, 1.0, False), "adam_eps": (_F32_TINY, True, math.inf, False)}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


class Given(dict):
    """A checked recipe; ``by_masking``: the --masking scheme given and the keys it set (named in messages)."""
    by_masking: Tuple[Optional[str], frozenset] = (None, frozenset())


def _named(key: str, recipe) -> str:
    """How the user gave ``key``: its own flag, or the --masking scheme that set it."""
    masking, keys = getattr(recipe, "by_masking", Given.by_masking)
    return f"--masking {masking}" if key in keys else flag(key)


def add_arguments(parser) -> None:
    """The recipe flags, as one argument group of ``pretrain``. A flag not given is absent from the parsed
    arguments (``argparse.SUPPRESS``): "the owner's value", which the help text names."""
    from ..models.config import MASKING_SCHEMES
    from .data import PACKINGS
    from .tokenizer import TOKENIZER_TYPES
    g = parser.add_argument_group("recipe", "what the papers vary (README: Recipes); a flag left out keeps the "
                                            "--model preset's value, and a resumed run its own")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=argparse.SUPPRESS,
                   help="tokenizer trained on --data: wordpiece (ELECTRA/BERT), bpe (RoBERTa byte-level), unigram "
                        "(DeBERTa-v3); default wordpiece, vocabulary 30522 / 50265 / 128000 unless --vocab-size")
    g.add_argument("--masking", choices=tuple(MASKING_SCHEMES), default=argparse.SUPPRESS,
                   help="what a masked position becomes: electra = 85%% [MASK], 15%% unchanged; bert = 80%% [MASK], "
                        "10%% random, 10%% unchanged (default: the preset's; DeBERTa-v3 presets use bert)")
    g.add_argument("--mask-prob", type=float, default=argparse.SUPPRESS, help="share of tokens masked, in (0, 1] "
                   "(ELECTRA 0.15, 0.25 for large)")
    g.add_argument("--mask-token-frac", type=float, default=argparse.SUPPRESS, help="share of masked positions set to [MASK]")
    g.add_argument("--random-token-frac", type=float, default=argparse.SUPPRESS,
                   help="share of masked positions set to a random token")
    g.add_argument("--whole-word-masking", action="store_const", const=True, default=argparse.SUPPRESS,
                   help="mask whole words (the tokenizer's word boundaries); the count stays in tokens")
    g.add_argument("--packing", choices=PACKINGS, default=argparse.SUPPRESS,
                   help="how documents fill the --seq-len rows: full-sentences (default; BERT / ELECTRA / RoBERTa's "
                        "FULL-SENTENCES: the token stream cut into rows across documents) or doc-sentences (whole "
                        "documents packed back to back, attention masked at each boundary, positions restarting: "
                        "RoBERTa's DOC-SENTENCES without padding)")
    g.add_argument("--temperature", type=float, default=argparse.SUPPRESS, help="generator sampling temperature (> 0)")
    g.add_argument("--disc-weight", type=float, default=argparse.SUPPRESS, help="weight of the discriminator's loss "
                   "(ELECTRA 50)")
    g.add_argument("--generator-size", type=float, default=argparse.SUPPRESS,
                   help="generator width as a fraction of the discriminator's, in (0, 1] (ELECTRA's "
                        "generator_hidden_size: small 0.25, base 1/3)")
    g.add_argument("--adam-beta2", type=float, default=argparse.SUPPRESS, help=f"AdamW beta2 in [0, 1) (default "
                   f"{OPTIMIZER['adam_beta2']}; RoBERTa 0.98)")
    g.add_argument("--adam-eps", type=float, default=argparse.SUPPRESS, help=f"AdamW epsilon (default {OPTIMIZER['adam_eps']})")
    g.add_argument("--override", action="store_true",
                   help="with --resume: allow recipe flags that differ from the run being resumed")
    g.add_argument("--init-from", metavar="PATH", default=None,
                   help="start from this model instead of a fresh one: an electra-fast run, checkpoint or export, a "
                        "folder with transformers generator/ + discriminator/ (ELECTRA or DeBERTa), or one "
                        "DeBERTa-v2/v3 checkpoint; its tokenizer unless --tokenizer; --steps 0 writes it as a "
                        "checkpoint")


def from_args(args: argparse.Namespace) -> dict:
    """The recipe flags the user gave (``masking`` included, still unexpanded)."""
    return {k: getattr(args, k) for k in KEYS + ("masking",) if getattr(args, k, None) is not None}


def check(recipe: Optional[dict], override: bool = False, resume: bool = False) -> dict:
    """Validated recipe (only the keys given; ``masking`` expanded into the two fractions it names unless
    they are given too). Bad values raise PretrainError naming the flag."""
    from .data import PACKINGS
    from .tokenizer import TOKENIZER_TYPES
    if override and not resume:
        raise PretrainError("--override: only means something with --resume (a new run takes any recipe)")
    if recipe is not None and not isinstance(recipe, Mapping):  # a dict, MappingProxyType, OmegaConf's DictConfig
        raise TypeError(f"recipe: expected a dict of recipe settings (some of {', '.join(KEYS)}, masking), got "
                        f"{type(recipe).__name__}")
    recipe = dict(recipe or {})
    unknown = sorted(set(recipe) - set(KEYS) - {"masking"})
    if unknown:
        raise PretrainError(f"recipe: unknown settings {unknown} (expected some of {', '.join(KEYS)})")
    given = set(recipe)
    masking = recipe.pop("masking", None)
    if masking is not None:
        from ..models.config import MASKING_SCHEMES
        if masking not in MASKING_SCHEMES:
            raise PretrainError(f"--masking: expected one of {', '.join(MASKING_SCHEMES)}, got {masking!r}")
        recipe = {**MASKING_SCHEMES[masking], **recipe}
    recipe = Given(recipe)
    if masking is not None:
        recipe.by_masking = (masking, frozenset(MASKING_SCHEMES[masking]) - given)
    for key, value in recipe.items():
        if key in RANGES:
            _number(key, value, *RANGES[key])
    if "tokenizer_type" in recipe and recipe["tokenizer_type"] not in TOKENIZER_TYPES:
        raise PretrainError(f"--tokenizer-type: expected one of {', '.join(TOKENIZER_TYPES)}, "
                            f"got {recipe['tokenizer_type']!r}")
    if "packing" in recipe and recipe["packing"] not in PACKINGS:
        raise PretrainError(f"--packing: expected one of {', '.join(PACKINGS)}, got {recipe['packing']!r}")
    if not isinstance(recipe.get("whole_word_masking", False), bool):
        raise PretrainError(f"--whole-word-masking: expected True or False, got {recipe['whole_word_masking']!r}")
    if recipe.get("mask_token_frac", 0.0) + recipe.get("random_token_frac", 0.0) > 1.0:
        key = "random_token_frac" if "random_token_frac" in given else "mask_token_frac"
        raise PretrainError(f"{flag(key)}: mask_token_frac {recipe['mask_token_frac']} + random_token_frac "
                            f"{recipe['random_token_frac']} exceeds 1" + (f" (--masking {masking})" if masking else ""))
    return recipe


def _number(key: str, value, lo: float, lo_ok: bool, hi: float, hi_ok: bool) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > lo or (lo_ok and value == lo)) and (value < hi or (hi_ok and value == hi)))
    if not ok:
        where = (f"a finite number {'>=' if lo_ok else '>'} {lo:g}" if hi == math.inf else
                 f"a number in {'[' if lo_ok else '('}{lo:g}, {hi:g}{']' if hi_ok else ')'}")
        raise PretrainError(f"{flag(key)}: expected {where}, got {value!r}")


def apply(cfg, recipe: dict):
    """``cfg`` (an ElectraConfig) with the recipe's config settings; a combination the model refuses (a
    fraction sum over 1 with the preset's other fraction, a generator width the preset cannot take) raises
    PretrainError naming the flag."""
    # a width the generator already has leaves it as it is (rebuilding would re-derive its heads and FFN, as
    # ELECTRA's get_generator_config does: --init-from's generator lost a head, or its weights no longer fitted)
    if "generator_size" in recipe and _differs("generator_size", None, recipe["generator_size"], cfg):
        try:
            cfg = cfg.with_generator_size(recipe["generator_size"])
        except ValueError as e:
            raise PretrainError(f"--generator-size: {recipe['generator_size']:g} of hidden size {cfg.hidden_size} "
                                f"cannot be built: {e}") from None
    changes = {k: recipe[k] for k in CONFIG_FIELDS if k in recipe}
    try:
        return cfg.replace(**changes)
    except ValueError as e:  # "ElectraConfig.<field>: ..."; name the flag given, the field if it is one
        field = str(e).split(":", 1)[0].rsplit(".", 1)[-1]
        raise PretrainError(f"{flag(field if field in changes else next(iter(changes)))}: {e}") from None


def record(cfg, recipe: dict, tokenizer_type: str) -> dict:
    """The full recipe a run uses (every key of :data:`KEYS`): what run.json and checkpoints hold."""
    from .data import PACKINGS
    out = {k: getattr(cfg, k) for k in CONFIG_FIELDS}
    out["generator_size"] = cfg.generator_hidden_size / cfg.hidden_size
    out["tokenizer_type"] = tokenizer_type
    out["packing"] = recipe.get("packing", PACKINGS[0])
    out.update({k: recipe.get(k, v) for k, v in OPTIMIZER.items()})
    return out


def _width(cfg, generator_size: float) -> int:
    """The generator width ``--generator-size`` (a fraction of the hidden size) gives."""
    return int(round(cfg.hidden_size * generator_size))


def _differs(key: str, old, new, cfg) -> bool:
    if key == "generator_size":  # a fraction: compare the width it gives
        return _width(cfg, new) != cfg.generator_hidden_size
    return old != new


def _accept(changes: dict, recorded: dict, override: bool, say, doing: str, given=None) -> None:
    """Flags that differ from the run being resumed: refused, or with ``override`` said on one line; ``given``:
    the recipe they came from (a --masking scheme is named as such)."""
    if not changes:
        return
    what = ", ".join(f"{flag(k)} {recorded[k]!r} -> {v!r}" for k, v in changes.items())
    if not override:
        raise PretrainError(f"{_named(next(iter(changes)), given)}: differs from the run being resumed ({what}); "
                            "pass --override to change it, or start a new --out")
    say(f"--override: {doing} with {what}")


def settle(cfg, recipe: dict, tok, recorded: Optional[dict], override: bool, say) -> Tuple[object, Dict]:
    """(config, full recipe) of the run about to start, with tokenizer ``tok``. A fresh run (``recorded``
    None) applies ``recipe``; a resumed run keeps ``recorded`` (``{}`` from a checkpoint written before recipes
    were recorded: its config, :data:`OPTIMIZER` and its tokenizer's type) and refuses a flag that differs
    unless ``override`` (then says on one line what changes); the tokenizer type and generator size never
    change on resume."""
    from .tokenizer import has_word_boundaries, tokenizer_type
    kind = tokenizer_type(tok)
    if recorded is None:
        if recipe.get("tokenizer_type", kind) != kind:
            raise PretrainError(f"--tokenizer-type: {recipe['tokenizer_type']}, but --tokenizer (or --init-from's "
                                f"own) is a {kind} tokenizer; drop one of them")
        cfg = apply(cfg, recipe)
        full = record(cfg, recipe, kind)
    else:
        recorded = {**record(cfg, {}, kind), **recorded}
        changes = {k: v for k, v in recipe.items() if _differs(k, recorded[k], v, cfg)}
        fixed = [k for k in changes if k in FIXED_ON_RESUME]
        if fixed:
            raise PretrainError(f"{flag(fixed[0])}: the run being resumed has {recorded[fixed[0]]!r}, which "
                                "a resumed run cannot change; start a new --out")
        _accept(changes, recorded, override, say, "resuming", recipe)
        cfg = apply(cfg, changes)
        full = {**recorded, **changes}
    if cfg.whole_word_masking and not has_word_boundaries(tok):
        raise PretrainError(f"--whole-word-masking: the {kind} tokenizer has no pre-tokenizer that splits words, so "
                            "it marks no word boundaries; use a tokenizer that splits words, or drop "
                            "--whole-word-masking")
    return cfg, full


def restart(recorded: dict, recipe: dict, override: bool, say) -> dict:
    """The recipe flags of a run started again from scratch on ``--resume`` (no complete checkpoint): the run's
    ``recorded`` recipe (run.json) with the flags given, which may differ only with ``override``, as on a resume.
    The generator's width waits for the model: :func:`restart_generator`."""
    recorded = {k: v for k, v in recorded.items() if k in KEYS and k != "generator_size"}
    _accept({k: v for k, v in recipe.items() if k in recorded and recorded[k] != v}, recorded, override, say,
            "starting again", recipe)
    return {**recorded, **recipe}


def restart_generator(cfg, recorded: dict, recipe: dict, override: bool, say) -> dict:
    """:func:`restart`'s recipe with the run's generator width for model ``cfg``: its recorded fraction only where
    it gives another width than the model's own (applying it would rebuild even an unchanged generator, as
    ELECTRA's get_generator_config does); a given one that differs needs ``override``."""
    width = recorded.get("generator_size")
    if width is None:
        return recipe
    if "generator_size" in recipe:
        if _width(cfg, recipe["generator_size"]) != _width(cfg, width):
            _accept({"generator_size": recipe["generator_size"]}, {"generator_size": width}, override, say,
                    "starting again")
        return recipe
    return {**recipe, "generator_size": width} if _width(cfg, width) != cfg.generator_hidden_size else recipe


def adam(recipe: dict) -> dict:
    """AdamW's ``betas`` and ``eps`` under ``recipe``."""
    return {"betas": (ADAM_BETA1, recipe["adam_beta2"]), "eps": recipe["adam_eps"]}


def set_optimizer(optimizer, recipe: dict) -> None:
    """AdamW's beta2 and eps from the recipe (after ``load_state_dict``, which restores the saved ones)."""
    for group in optimizer.param_groups:
        group.update(adam(recipe))
