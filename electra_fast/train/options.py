"""``pretrain``'s options: the presets behind ``--model``, the checks every numeric flag goes through (also used by
``finetune``), ``--precision auto``, and ``--tensorboard``'s dependency. Every refusal is a :class:`PretrainError`
whose message names the flag and what was expected.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from contextlib import contextmanager
from typing import Optional

import torch

from .. import _cpu
from .errors import PretrainError

# small enough that the README's default job (no --data, CPU) runs its 600 steps in a couple of minutes. Its
# generator samples at temperature 3 (ELECTRA's sampling temperature, 1.0 in the paper's million-step runs): at 1.0
# this generator learns the unigram distribution within ~50 steps, its samples become frequent tokens that only a
# trained language model can tell from the originals, and the discriminator sits at held-out AUC ~0.55 for
# thousands of steps; at 3 the samples stay diverse enough that it learns within the first 100 steps (held-out AUC
# ~0.87, F1 ~0.4 at step 600; README "What the run learned"). Still ELECTRA: a generator trained jointly by MLM,
# Gumbel samples, the RTD loss over all real tokens.
TINY = dict(embedding_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=512, generator_hidden_size=64, generator_num_hidden_layers=2,
            generator_num_attention_heads=1, generator_intermediate_size=256, temperature=3.0)
DEFAULT_STEPS, DEFAULT_EMBEDDED_STEPS = 10_000, 600
DEFAULT_SAVE_EVERY = 1000  # steps between checkpoints when --save-every is not given
DEFAULT_EMBEDDED_VOCAB = 8192  # any family: the embedded corpus gives ~9-10k pieces at most
TOKENIZER_NAMES = {"wordpiece": "WordPiece", "bpe": "byte-level BPE", "unigram": "Unigram"}
# --lr's default per preset (ELECTRA: small 5e-4, base / large 2e-4); a CONFIG.json or --init-from model gets the
# rate of the ELECTRA preset of its hidden size (tiny 128, small 256, larger 2e-4), never a guess from its path
PRESET_LR = {"electra_tiny": 1e-3, "electra_small": 5e-4, "deberta_v3_xsmall": 5e-4, "deberta_v3_small": 5e-4}


def model_config(model: str, tok_overrides: dict):
    """``--model``: a preset name (``electra-small``, ``deberta-v3-base``, ..., ``electra-tiny``) or a
    CONFIG.json; vocabulary and special ids come from the tokenizer."""
    from ..models import PRESETS, ElectraConfig
    try:
        if model.endswith(".json"):
            if not os.path.isfile(model):
                raise PretrainError(f"--model: no such file: {model}")
            try:
                cfg = ElectraConfig.from_json_file(model)
            except (OSError, json.JSONDecodeError) as e:
                raise PretrainError(f"--model: cannot read {model}: {e}") from None
            return cfg.replace(**tok_overrides)
        name = model.replace("-", "_")
        if name == "electra_tiny":
            return ElectraConfig(**{**TINY, **tok_overrides})
        if name not in PRESETS:
            names = ", ".join(["electra-tiny"] + [p.replace("_", "-") for p in PRESETS])
            raise PretrainError(f"--model: unknown preset {model!r} (expected one of {names}, or a CONFIG.json)")
        return getattr(ElectraConfig, name)(**tok_overrides)
    except (TypeError, ValueError) as e:
        if isinstance(e, PretrainError):
            raise
        raise PretrainError(f"--model: {e}") from None


def default_lr(model: str, cfg) -> float:
    """``--lr`` when not given: by preset name however spelt (``electra-tiny`` or ``electra_tiny``), else by
    ``cfg.hidden_size`` (``cfg``: the model's resolved :class:`~electra_fast.models.ElectraConfig`; None on a
    resume, whose optimizer and schedule come from the checkpoint, rate included)."""
    from ..models import PRESETS
    name = model.replace("-", "_")
    if name in PRESETS or name == "electra_tiny" or cfg is None:
        return PRESET_LR.get(name, 2e-4)
    return 1e-3 if cfg.hidden_size <= 128 else (5e-4 if cfg.hidden_size <= 256 else 2e-4)


def check_seq_len(seq_len: int, cfg) -> None:
    if seq_len > cfg.max_position_embeddings:
        raise PretrainError(f"--seq-len: {seq_len} exceeds the model's max_position_embeddings "
                            f"({cfg.max_position_embeddings})")


def positive(name: str, value, minimum: int = 1, maximum: Optional[int] = None) -> int:
    python_int(name, value)
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        expected = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
        raise PretrainError(f"--{name}: expected {expected}, got {value!r}")
    return value


def python_int(name: str, value) -> None:
    """A NumPy integer is refused by name: "expected an int, got np.int64(2)" read as a contradiction (the value goes
    on into run.json / summary.json, which JSON cannot write as it is)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, int):
        raise PretrainError(f"--{name}: expected a Python int, got {type(value).__name__} {value!r}; pass int(...)")


def real(name: str, value, minimum: float, inclusive: bool) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):  # np.float32: not JSON-writable
        raise PretrainError(f"--{name}: expected a Python float, got {type(value).__name__} {value!r}; pass "
                            "float(...)")
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < minimum or (value == minimum and not inclusive)):
        raise PretrainError(f"--{name}: expected a finite number {'>=' if inclusive else '>'} {minimum:g}, "
                            f"got {value!r}")
    return value


@contextmanager
def torch_threads(threads: Optional[int]):
    """torch's CPU thread count ``threads`` (None: left as it is) inside the block, and the caller's again after it,
    whatever it raised: ``pretrain(threads=1)`` / ``finetune(threads=1)`` (or a resumed run's own count) changed the
    calling process's setting for good, even when they refused their arguments. Entered after every check."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextmanager
def job_scope(threads: Optional[int], device: torch.device):
    """What a ``pretrain()`` / ``finetune()`` call does to torch's process-wide state stays inside the block, whatever
    it raised: the CPU thread count (:func:`torch_threads`); the global generators, which the job seeds (after
    either call the caller's ``torch.rand`` drew one fixed stream, whatever it had seeded); and grad mode (called
    under the caller's ``no_grad`` / ``inference_mode`` the first backward raised). Entered after every check."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch_threads(threads), torch.random.fork_rng(devices=cuda), torch.inference_mode(False), \
            torch.enable_grad():
        yield


# "an ELECTRA-small 32 x 128 step took 91 s in bf16 vs 4.5 s in fp32" (AVX2-only AMD EPYC, no native bf16)
EMULATED_BF16 = ("bf16 matrix products are emulated here, ~20x slower than fp32 (an ELECTRA-small 32x128 step: 91 s "
                 "vs 4.5 s on an AVX2-only AMD EPYC)")


def resolve_precision(precision: str, device: torch.device, state: Optional[dict], say) -> str:
    """``auto``: the resumed run's own precision (``state``: its training state, or a restart's {"precision": the
    run.json's}), else bf16 where ``device`` runs
    it natively, else fp32. Warns (one line) when bf16 is emulated on this CPU, or when a resumed run changes it."""
    recorded = state.get("precision") if state else None
    inherited = precision == "auto" and state is not None
    if precision == "auto":  # a checkpoint from before "precision" was recorded: fp16 left a scaler state, else fp32
        legacy = state and ("fp16" if state.get("scaler") else "fp32")
        precision = recorded or legacy or _cpu.default_precision(device)[0]
    elif recorded and precision != recorded:
        say(f"warning: --precision {precision}: resuming a {recorded} run; its losses will differ from an "
            "uninterrupted run's")
    if precision == "bf16" and device.type == "cpu":
        native, why = _cpu.native_bf16()
        if not native and inherited:  # auto kept the run's bf16: say how to leave it
            say(f"warning: resuming a bf16 run: {why}: {EMULATED_BF16}; --precision fp32 resumes it in fp32 (its "
                "losses then differ from an uninterrupted run's)")
        elif not native:
            say(emulated_bf16_warning(why))
    return precision


def check_forced_backend(device: torch.device, precision: Optional[str] = None, error=PretrainError) -> None:
    """``ELECTRA_FAST_BACKEND`` must name a backend that can run the job on ``device`` (pretrain's and finetune's
    check): said before the work, in one line, not by the first op of the first step as a traceback. ``precision``
    (the resolved one, once known): CPU bf16 autocast runs the linear layers through ops of their own
    (:mod:`electra_fast.ops.linear`), which the Triton backend does not implement. ``error``: the command's error
    class (finetune's FinetuneError)."""
    from .. import _backend
    try:
        forced = _backend.forced_backend()
    except ValueError as e:
        raise error(str(e)) from None
    if not forced:
        return
    reason = _backend.unavailable_reason(forced, device)
    if reason:
        raise error(f"ELECTRA_FAST_BACKEND={forced}: {reason}; unset it or choose another --device")
    if precision == "bf16" and device.type == "cpu":
        from ..ops.linear import LINEAR_SPEC, MLP_SPEC
        for spec in (LINEAR_SPEC, MLP_SPEC):
            try:
                spec.route(device)
            except RuntimeError as e:  # a forced backend that cannot serve
                why = str(e).partition("cannot serve this call: ")[2] or str(e)
                raise error(f"ELECTRA_FAST_BACKEND={forced}: bf16 on a CPU runs the linear layers through "
                            f"electra_fast.{spec.name}, which the {forced} backend cannot serve ({why}); "
                            "unset it, or pass --precision fp32") from None


def emulated_bf16_warning(why: str) -> str:
    """The warning for an explicit --precision bf16 on a CPU that emulates it (``why``: what the CPU lacks)."""
    return f"warning: --precision bf16: {why}: {EMULATED_BF16}; --precision auto picks fp32 on this CPU"


def summary_writer():
    """torch's TensorBoard ``SummaryWriter`` class; PretrainError naming --tensorboard when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PretrainError("--tensorboard: the tensorboard package is not installed (pip install tensorboard, or "
                            "pip install 'electra_fast[tensorboard]')") from None
    return SummaryWriter
