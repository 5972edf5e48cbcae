"""``pretrain``: the end-to-end ELECTRA / DeBERTa-v3 RTD pretraining job (what ``electra-fast pretrain`` runs).

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` packed sequences per rank; the global
batch is ``batch_size * grad_accum * world`` sequences, taken in order from the seeded data stream (rank r,
micro-batch m reads the slice ``pos + (m * world + r) * batch_size``). Each micro-batch's corruption seed is
``derive_seed(seed, step, rank, m)``; dropout draws from torch's generator, seeded per rank and saved in
checkpoints. Everything a step depends on is therefore in the checkpoint, and a resumed CPU run reproduces
the uninterrupted run's losses exactly.
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
import uuid
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch

from .._console import progress_bar, say as console_say, show
from .._files import unused, utf8_path, write_json, writing
from .._seed import derive_seed
from .._validate import path as path_arg, reason
from . import checkpoint as ckpt
from . import plot, rundir
from . import recipe as recipes
from .evaluation import HeldOut, SplitSampler, heldout_count, split
from .metrics import TokenScores, fmt, learned, rtd_metrics
from .data import (PackedSequences, Sampler, build_token_cache, cache_key, input_files, model_inputs,
                   read_documents, reads_hidden, remove_other_caches, resolve_inputs, stream_digest,
                   whole_word_shortfall)
from .doc_sentences import DocumentRows
from .distributed import Context, setup
from .errors import PretrainError
from .optim import linear_schedule, param_groups
from .init_from import init_source
from .options import (DEFAULT_EMBEDDED_STEPS, DEFAULT_EMBEDDED_VOCAB, DEFAULT_SAVE_EVERY, DEFAULT_STEPS,
                      TOKENIZER_NAMES, check_forced_backend, check_seq_len, default_lr, job_scope, model_config,
                      positive, real, resolve_precision, summary_writer)
from .signals import Signals, TermInterrupts, Uninterrupted
from .tokenizer import (DEFAULT_VOCAB, MAX_VOCAB, TextRules, config_overrides, embedding_rows, fingerprint,
                        load_tokenizer, min_vocab, special_ids, train_tokenizer, write_tokenizer)

def _keep_freed_memory() -> bool:
    """CPU training: let glibc keep freed memory for reuse (True when applied).

    By default glibc serves large blocks with fresh mmaps and trims the heap top, so every step re-faults
    its activations (~50 k page faults, ~200 MB, per ELECTRA-small 32 x 128 step): ~5% of a CPU step
    (fused bf16 ~790 -> ~750 ms; transformers' step gains ~8%). Blocks up to 1 GiB then come from the heap,
    which is never trimmed below 2 GiB of free space - the footprint a training loop reuses every step.
    No-op off glibc. ``ELECTRA_FAST_KEEP_FREED_MEMORY=0`` turns it off.
    """
    if os.environ.get("ELECTRA_FAST_KEEP_FREED_MEMORY", "1") == "0":
        return False
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) & bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def _give_back_freed_memory() -> None:
    """After the run: glibc's thresholds as near as glibc allows to the process's at its start, and the free heap
    returned to the system (a notebook that called ``pretrain()`` kept up to 2 GiB of freed memory for good).

    glibc's mmap threshold starts dynamic (128 KiB, raised to the size of each mmapped block freed, up to
    :data:`_DYNAMIC_MMAP_MAX`; trimming at twice it) unless the environment sets one of the thresholds, and a
    ``mallopt`` turns that off for good; there is no call to read it. So where the environment set none, both are
    set to where the dynamic rule settles once large blocks are freed; where it set any, to its values (glibc's
    128 KiB for the one it left). Restoring 128 KiB there instead (the first version) left every block over 128 KiB
    an mmap of its own, unmapped and re-faulted on each use: ``finetune()`` after ``pretrain()`` in one process (the
    fine-tuning demo, a notebook) took 164 s instead of 32 s per Rotten Tomatoes epoch on 2 AMD EPYC cores, its main
    thread 80 % in the kernel."""
    libc = _glibc()
    if libc is None:
        return
    tunables = dict(item.partition("=")[::2] for item in os.environ.get("GLIBC_TUNABLES", "").split(":"))

    def setting(name: str) -> str:  # GLIBC_TUNABLES's glibc.malloc.NAME, else its alias MALLOC_NAME_
        return tunables.get(f"glibc.malloc.{name}") or os.environ.get(f"MALLOC_{name.upper()}_", "")

    dynamic = not any(setting(name) for name in ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max"))
    for option, name, settled in ((_M_MMAP_THRESHOLD, "mmap_threshold", _DYNAMIC_MMAP_MAX),
                                  (_M_TRIM_THRESHOLD, "trim_threshold", 2 * _DYNAMIC_MMAP_MAX)):
        if not dynamic:
            value = _glibc_number(setting(name))
            settled = value if value is not None and value < 2 ** 31 else 128 * 1024  # mallopt takes an int
        libc.mallopt(option, settled)
    libc.malloc_trim(0)


def _glibc_number(text: str) -> Optional[int]:
    """A tunable's value as glibc reads it (strtoul, base 0: 1024, 0x400 and 02000 are one number), or None."""
    text = text.strip()
    octal = len(text) > 1 and text[0] == "0" and text[1] not in "xX"  # C's "02000"; Python's base 0 refuses it
    try:
        value = int(text, 8 if octal else 0)
    except ValueError:
        return None
    return value if value >= 0 else None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc's DEFAULT_MMAP_THRESHOLD_MAX: the highest its dynamic mmap threshold goes (32 MiB on 64-bit)
_DYNAMIC_MMAP_MAX = 4 * 1024 * 1024 * (8 if sys.maxsize > 2 ** 32 else 4)


def _glibc():
    """glibc through ctypes, or None (another C library, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


DROP_STREAM = 0x44524F50  # "DROP": derive_seed's purpose for a rank's dropout stream


def _rng_state(ctx: Context) -> dict:
    state = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def _set_rng_state(state: dict, ctx: Context) -> None:
    torch.set_rng_state(state["torch"])
    if ctx.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], ctx.device)


def pretrain(data: Optional[Sequence[str]] = None, *, tokenizer: Optional[str] = None,
             vocab_size: Optional[int] = None, model: Optional[str] = None, seq_len: Optional[int] = None,
             batch_size: Optional[int] = None, grad_accum: Optional[int] = None, steps: Optional[int] = None,
             lr: Optional[float] = None, warmup: Optional[int] = None, weight_decay: Optional[float] = None,
             precision: str = "auto", compile: Optional[bool] = None, seed: Optional[int] = None,
             out: str = "runs/electra-fast", save_every: Optional[int] = None,
             keep: Optional[int] = None, resume: bool = False, log_every: Optional[int] = None,
             skip_bad_lines: bool = False,
             device: Optional[str] = None, threads: Optional[int] = None, progress: bool = True,
             fused: bool = True, allow_nonempty_out: bool = False, eval_every: Optional[int] = None,
             tensorboard: Optional[bool] = None, recipe: Optional[dict] = None, override: bool = False,
             init_from: Optional[str] = None,
             _checkpoint_hook: Optional[Callable[[str], None]] = None) -> dict:
    """Pretrain an ELECTRA / DeBERTa-v3 RTD model; returns the closing summary (plus ``"model"``, the trained
    ElectraPretrainingModel). Bad input raises :class:`PretrainError` with a one-line message.

    ``data``: paths (.txt / .jsonl / directories / saved datasets); None trains on the embedded default corpus
    (Python's standard-library docstrings) with a tiny model, an 8192-token vocabulary, batch 16 and 600 steps
    unless ``model`` / ``vocab_size`` / ``batch_size`` / ``steps`` say otherwise.

    ``eval_every``: every N steps (and at the last), evaluate on a fixed held-out slice of the corpus that training
    never reads (see :mod:`.evaluation`); the records' ``eval_*`` fields. ``tensorboard``: also write every
    record to TensorBoard event files in ``out``/tensorboard (needs the ``tensorboard`` package).

    Every run writes ``out``/curves.png (:mod:`.plot`) from its metrics.jsonl when it ends (a warning, no picture,
    without matplotlib).

    ``recipe``: the recipe flags given (:mod:`.recipe`; README "Recipes"), checked against a resumed run's unless
    ``override``. ``resume``: the options of :data:`RUN_OPTIONS` and ``steps`` not given (None) are the run's
    (run.json); one of :data:`RUN_OPTIONS` given that differs from the run's is refused (it would change or be
    ignored by the continued run); a given ``steps`` may differ (train longer), as may the bookkeeping of
    :data:`RUN_SETTINGS` (checkpoints kept and their period, logging, evaluation, CPU threads). ``init_from``:
    continue pretraining from a run / export / transformers directory (:mod:`.init_from`); ``steps=0`` then writes
    the loaded model as checkpoint step-0. ``threads``: torch's CPU thread count for this call (the caller's is back
    when it returns).

    The other options are the command line's (``electra-fast pretrain --help``; README "Pretraining"), None taking
    the default or, on ``resume``, the run's: ``tokenizer`` (a tokenizer.json or transformers folder; None trains one
    of ``vocab_size`` on the data), ``model`` (a preset name or a config JSON), ``seq_len``, ``batch_size`` (per
    process), ``grad_accum``, ``steps``, ``lr``, ``warmup`` (steps), ``weight_decay``, ``precision`` (auto / fp32 /
    bf16 / fp16), ``compile``, ``seed``, ``out`` (the run directory), ``save_every`` / ``keep`` (checkpoints),
    ``log_every``, ``skip_bad_lines``, ``device``, ``progress`` (a progress bar), ``fused`` (False: the eager twin),
    ``allow_nonempty_out``. ``_checkpoint_hook`` is for the tests (called at each checkpoint stage).

    Reproducible one call at a time per process: dropout seeds come from torch's process-wide generator, which two
    calls in threads of one process would share.
    """
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    if data is not None:
        if not isinstance(data, (list, tuple)):
            raise TypeError(f"data: expected a path or a list of paths, got {type(data).__name__}")
        data = [path_arg("data", d) for d in data]
    # a pathlib.Path reached string methods (model.endswith), a number os.path.abspath: errors naming neither
    out = path_arg("out", out)
    tokenizer, model, init_from = (None if v is None else path_arg(n, v) for n, v in
                                   (("tokenizer", tokenizer), ("model", model), ("init_from", init_from)))
    if tokenizer is not None and vocab_size is not None:  # as the command line's mutually exclusive pair
        raise PretrainError(f"--vocab-size: not with --tokenizer (its vocabulary, {tokenizer}'s, is the model's; "
                            "--vocab-size sizes a tokenizer trained on the data)")
    if compile is not None and not isinstance(compile, bool):  # compile="no" compiled
        raise TypeError(f"compile: expected a bool, got {type(compile).__name__}")
    # a resumed run's own, for a restart when it has no complete checkpoint
    run_tokenizer = run_init_from = recorded_recipe = recorded_inputs = run_precision = None
    notes: list = []  # warnings said once the process knows whether it is the main one
    if resume:
        claimed = rundir.is_claimed(out)
        vacant = rundir.is_vacant(out)
        if not os.path.isfile(os.path.join(os.fspath(out), "run.json")) and (data is None or not (claimed or vacant)):
            # without --data it would have started the built-in default job (a mistyped --out, a run taken back);
            # with it, a folder a first start claimed, or never reached (killed before it did: missing or empty),
            # starts with the options given (a scheduler's requeue passes --resume every time); another's is refused
            raise PretrainError(f"--resume: {out} holds no run to continue (no run.json"
                                f"{'' if claimed else ', no electra-fast marker'}); check --out, or start the run "
                                "without --resume")
        run_json = _run_record(out)
        recorded_recipe, recorded_inputs = run_json.get("recipe"), run_json.get("inputs")
        given_threads, given_compile = threads, compile
        (data, seq_len, batch_size, grad_accum, lr, warmup, weight_decay, seed, model, steps, save_every, keep,
         log_every, eval_every, tensorboard, threads, compile, vocab_size, run_tokenizer, run_init_from) = _run_options(
            run_json, out, data=data, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
            warmup=warmup, weight_decay=weight_decay, seed=seed, model=model, steps=steps, save_every=save_every,
            keep=keep, log_every=log_every, eval_every=eval_every, tensorboard=tensorboard, threads=threads,
            compile=compile, vocab_size=vocab_size, tokenizer=None, init_from=None).values()
        run_options = run_json.get("options")
        run_compiled = run_options.get("compile") if isinstance(run_options, dict) else None
        if given_compile is not None and run_compiled is not None and bool(given_compile) != run_compiled:
            notes.append(f"warning: --{'' if given_compile else 'no-'}compile: resuming a run that was "
                         f"{'' if run_compiled else 'not '}compiled; its losses will differ from an uninterrupted "
                         "run's in the last digits")
        if given_threads is None and isinstance(threads, int) and threads > _cpus():
            threads = None  # the run's count, on a machine with fewer CPUs: torch's default, as for a run without
        if tokenizer is not None and isinstance(run_json.get("options"), dict) and (
                run_tokenizer is None or not _same("tokenizer", tokenizer, run_tokenizer, out, None)):
            raise PretrainError(f"--resume: --tokenizer {tokenizer} (the run's: "
                                f"{run_tokenizer or 'one trained on its data'}): a resumed run keeps its tokenizer "
                                "(omit it, or start a new --out)")
        run_precision = run_json.get("precision")
    keep = 3 if keep is None else keep
    compile = False if compile is None else compile
    # a kill -9 or an out-of-memory kill late in a long run lost all of it when only the end was saved
    save_every = DEFAULT_SAVE_EVERY if save_every is None else save_every
    log_every = 10 if log_every is None else log_every
    tensorboard = bool(tensorboard)
    seq_len = 128 if seq_len is None else seq_len
    grad_accum = 1 if grad_accum is None else grad_accum
    weight_decay = 0.01 if weight_decay is None else weight_decay
    seed = 0 if seed is None else seed
    embedded = data is None or (isinstance(data, (list, tuple)) and len(data) == 0)
    recipe = recipes.check(recipe, override, resume)
    # a resumed run's vocabulary was made by its own tokenizer type (a changed --tokenizer-type is refused by name
    # later, not as "--vocab-size: expected ..." here)
    tokenizer_type = ((recorded_recipe or {}).get("tokenizer_type") if resume else None) or recipe.get(
        "tokenizer_type", "wordpiece")
    with torch.random.fork_rng(devices=[]):  # the caller's generator untouched; a fresh part of the source (a DeBERTa
        if type(seed) is int and 0 <= seed < 2 ** 64:  # release's generator) starts from --seed (checked below)
            torch.manual_seed(seed)
        source, tokenizer = init_source(init_from, tokenizer, model, vocab_size, resume)
    model = model or init_from or ("electra-tiny" if embedded else "electra-small")
    batch_size = (16 if embedded else 32) if batch_size is None else batch_size
    if steps is None:  # an explicit 0 is refused below, never read as "unset"
        steps = DEFAULT_EMBEDDED_STEPS if embedded else DEFAULT_STEPS
    cpus = _cpus()
    optional = (("save-every", save_every, 1, None), ("warmup", warmup, 0, None), ("eval-every", eval_every, 1, None),
                ("vocab-size", vocab_size, min_vocab(tokenizer_type), MAX_VOCAB),
                ("threads", threads, 1, cpus))  # more threads than CPUs only slow down (100000 crashed OpenMP)
    for name, v, lo, hi in (("steps", steps, 0 if source else 1, None), ("seq-len", seq_len, 3, None),
                            ("batch-size", batch_size, 1, None), ("grad-accum", grad_accum, 1, None),
                            ("keep", keep, 1, None), ("log-every", log_every, 1, None), ("seed", seed, 0, 2**63 - 1),
                            *(o for o in optional if o[1] is not None)):
        positive(name, v, lo, hi)
    del name, v, lo, hi, optional, cpus, tokenizer_type
    if precision not in ("auto",) + PRECISIONS:
        raise PretrainError(f"--precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    # --model now, not after a tokenizer was trained (resume: the checkpoint's model, optimizer and schedule)
    cfg = None if resume else recipes.apply(source.config if source else model_config(model, {}), recipe)
    if lr is None:
        lr = default_lr(model, cfg)
    real("lr", lr, 0.0, inclusive=False)
    real("weight-decay", weight_decay, 0.0, inclusive=True)
    # a 0-step run (--init-from's step-0 checkpoint) fixes no schedule: it records no default warm-up, so a resume
    # takes the default of the --steps it gives (0 was inherited, and a given --warmup refused)
    recorded_warmup = warmup = min(10_000, steps // 10) if warmup is None else warmup
    if steps == 0 and warmup == 0:
        recorded_warmup = None
    if tensorboard:
        summary_writer()  # missing package: refused before anything is written
        if not utf8_path(os.path.abspath(os.fspath(out))):  # its event writer raised UnicodeEncodeError at the start
            raise PretrainError(f"--tensorboard: tensorboard writes under UTF-8 paths only, and --out "
                                f"{os.fspath(out)!r} is not one; choose another --out, or run without --tensorboard")
    if cfg is not None:
        check_seq_len(seq_len, cfg)

    out = os.fspath(out)
    options = dict(data=None if embedded else [os.path.abspath(d) for d in data], seq_len=seq_len,
                   batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=recorded_warmup,
                   weight_decay=weight_decay, seed=seed, model=model, steps=steps, save_every=save_every, keep=keep,
                   log_every=log_every, eval_every=eval_every, tensorboard=tensorboard, threads=threads,
                   compile=compile, vocab_size=vocab_size,
                   tokenizer=run_tokenizer if tokenizer is None else os.path.abspath(tokenizer),
                   init_from=run_init_from if init_from is None else os.path.abspath(init_from),
                   )  # run.json's record: what a --resume inherits
    del recorded_warmup
    ctx = setup(device)
    say = console_say if ctx.is_main else (lambda msg: None)
    for note in notes:
        say(note)
    kwargs = dict(locals())
    before = rundir.run_files(out) if ctx.is_main else None
    job = None
    try:
        check_forced_backend(ctx.device)
        job = _Job(**kwargs)
        with job_scope(threads, ctx.device):  # CPU intra-op threads: 1 is fastest for tiny models on a busy machine
            return job.run()
    except BaseException:
        if before is not None and job is not None and job.owns_out:  # never another job's files (no lock: no take)
            with Uninterrupted():
                rundir.take_back(out, before)
        raise
    finally:
        if job is not None and job.lock is not None:
            os.close(job.lock)
        if job is not None and getattr(job, "tb", None) is not None:  # a run that raised: its writer's thread
            job.tb.close()
        if job is not None:
            # DDP's reducer holds the process group: dropped (and any cycle through the job collected) before the
            # group is destroyed, so gloo's threads end here and not at interpreter exit, where a rank aborted now and
            # then ("terminate called without an active exception") after a finished run. Without DDP the cycles
            # matter too: matplotlib's mathtext (curves.png's log-scale ticks) keeps exceptions whose tracebacks hold
            # this call's frames, so the job (model, optimizer state) outlived the call until the caller's next full
            # collection (5 finished runs held, +1 GB RSS)
            kept_freed_memory = getattr(job, "kept_freed_memory", False)
            job.ddp = job.step_fn = None
            job = None
            gc.collect()
            if kept_freed_memory:  # after the job's memory was freed
                _give_back_freed_memory()
        ctx.close()


# What a resumed run keeps (run.json "options"): the data, the step's shape, the optimizer and the seed...
PRECISIONS = ("fp32", "bf16", "fp16")
RUN_OPTIONS = ("data", "seq_len", "batch_size", "grad_accum", "lr", "warmup", "weight_decay", "seed", "model",
               "vocab_size")
# ...and its bookkeeping, inherited where not given but free to change: a bare --resume of a --keep 10 run pruned
# to the default 3 checkpoints (deleting the user's), and dropped its --save-every / --eval-every periods; and
# --threads (CPU reductions such as LayerNorm's parameter gradients sum in another order with another count: a bare
# resume of a --threads 1 run drifted from the uninterrupted run by 1e-5 in 8 steps)
RUN_SETTINGS = ("steps", "save_every", "keep", "log_every", "eval_every", "tensorboard", "threads", "compile")


def _compile_fails(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot run here (a missing C++ compiler, say), or None: asked before any work."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(2, device=device))
    except Exception as e:  # noqa: BLE001 - Inductor's errors have no common base; one line, whatever it was
        return f"{type(e).__name__}: {reason(e)}"
    return None


def _stat(path: str) -> tuple:
    """(name, size, mtime in ns) of each file an input reads: what each rank reads of it."""
    return tuple((os.path.relpath(f, path), st.st_size, st.st_mtime_ns)
                 for f, st in ((f, os.stat(f)) for f in input_files(path)))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# A resumed run's vocabulary is its checkpoint's; one without a complete checkpoint starts again from the run's
# record: its --vocab-size, --tokenizer and --init-from (a new tokenizer trained instead was another model)


def _run_record(out) -> dict:
    """The run.json of the run in ``out``; {} when there is none. One that is there but unreadable, not JSON, or
    holds a field of the wrong type is refused in one line: read as "no record", the resume went on with the
    default options (another batch size) and removed the run's own token cache."""
    path = os.path.join(os.fspath(out), "run.json")
    if not os.path.lexists(path):
        return {}
    restore = "it records the run's options: restore it, or start a new --out"
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except OSError as e:
        raise PretrainError(f"--resume: cannot read {path} ({e.strerror or reason(e)}); {restore}") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise PretrainError(f"--resume: {path} is damaged, not JSON ({reason(e)}); {restore}") from None
    if not isinstance(record, dict):
        raise PretrainError(f"--resume: {path} is damaged, a JSON {type(record).__name__} and not an object; "
                            f"{restore}")
    _check_record(record, path)
    return record


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_KINDS = {"an int": _is_int,
          "a number": lambda v: _is_int(v) or isinstance(v, float),
          "true or false": lambda v: isinstance(v, bool),
          "a path": lambda v: isinstance(v, str),
          "a list of paths": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
          "an object": lambda v: isinstance(v, dict)}
# what each field of run.json holds ("?": or null); a field left out is a record from an earlier version
_RECORD_KINDS = {"recipe": "an object?", "inputs": "a list of paths", "options": "an object"}
_OPTION_KINDS = {"data": "a list of paths?", "seq_len": "an int", "batch_size": "an int", "grad_accum": "an int",
                 "lr": "a number", "warmup": "an int?", "weight_decay": "a number", "seed": "an int", "model": "a path",
                 "steps": "an int", "save_every": "an int?", "keep": "an int", "log_every": "an int",
                 "eval_every": "an int?", "tensorboard": "true or false", "threads": "an int?",
                 "compile": "true or false", "vocab_size": "an int?", "tokenizer": "a path?", "init_from": "a path?"}


def _check_record(record: dict, path: str) -> None:
    """Each known field of a run.json holds what the run wrote there: a hand edit ("recipe": [1], "data": 5 or a
    string, read one character at a time) is refused in one line, not met later as a traceback or a wrong run."""
    options = record.get("options")
    for holder, kinds, prefix in ((record, _RECORD_KINDS, ""),
                                  (options if isinstance(options, dict) else {}, _OPTION_KINDS, "options.")):
        for key, kind in kinds.items():
            nullable, kind = kind.endswith("?"), kind.rstrip("?")
            if key not in holder or (nullable and holder[key] is None) or _KINDS[kind](holder[key]):
                continue
            raise PretrainError(f"--resume: {path} records {prefix}{key} {holder[key]!r}; expected {kind}"
                                f"{' or null' if nullable else ''}")


def _run_options(record: dict, out, **given) -> dict:
    """``given`` (RUN_OPTIONS, None: not given) with the values of the run in ``out`` (its run.json ``record``)
    where not given; a given value that differs from the run's is refused, all of them in one line. Runs without
    the record: ``given`` as is."""
    run = record.get("options")
    if not isinstance(run, dict):
        return given
    if given["data"] is not None:
        given["data"] = [os.path.abspath(d) for d in given["data"]] or None  # [] is the embedded corpus, as None
    differ = []
    for name in given:
        if name not in run:
            continue
        if given[name] is None:
            given[name] = run[name]
        elif name == "warmup" and run[name] is None:
            continue  # a 0-step run's: any warm-up (:func:`pretrain`)
        elif name in RUN_OPTIONS and not _same(name, given[name], run[name], out, record.get("inputs")):
            flag = "--" + name.replace("_", "-")
            differ.append(f"{flag} {_shown(name, given[name])} (the run's: {_shown(name, run[name])})")
    if differ:
        raise PretrainError(f"--resume: {'; '.join(differ)}: a resumed run keeps its options (omit them, or start a "
                            "new --out)")
    return given


def _same(name: str, given, run, out, run_inputs) -> bool:
    """Whether a given option is the run's. Paths compare by file names: ``model``'s and ``tokenizer``'s, and the
    files ``data`` resolves to against the run's (run.json "inputs"), so a run and its corpus moved or copied
    elsewhere, or a folder given for the file it holds, resume (the token cache is rebuilt for new paths); another
    file is refused (one named twice is read once)."""
    names = lambda v: [os.path.basename(os.path.normpath(p)) for p in (v if isinstance(v, list) else [v])]
    if name == "data" and given is not None and run is not None and isinstance(run_inputs, list):
        read = resolve_inputs(given, exclude=out, owned=rundir.OWNED, hidden=reads_hidden(given, run_inputs))
        return names(read) == names(run_inputs)
    if name in ("model", "tokenizer") and given is not None and run is not None:
        return names(given) == names(run)
    return given == run


def _shown(name: str, value) -> str:
    if value is None:
        return "the embedded corpus" if name == "data" else "the default"
    return " ".join(value) if isinstance(value, list) else str(value)


class _Job:
    """One pretraining run on this process: :meth:`run` is the loop, each of its steps a method below.

    ``o``: the validated options of :func:`pretrain`. The order of everything that draws from torch's generator
    (model init, then the per-rank dropout seed) is part of exact resume: keep it when changing :meth:`_prepare`.
    """

    def __init__(self, ctx: Context, say, **options):
        self.ctx, self.say = ctx, say
        self.o = SimpleNamespace(**options)
        self.first_loss = self.last_record = self.last_eval = self.checkpoint = self.interrupted = None
        self.first_nonfinite = None  # device scalar: the first step whose loss was not finite (-1: none yet)
        self.lock = None  # rundir.claim_lock's descriptor: released by pretrain() when the job ends
        self.owns_out = False

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict:
        o, ctx = self.o, self.ctx
        with TermInterrupts():
            self._prepare()
            from tqdm.auto import tqdm
            self.bar = progress_bar(tqdm, o.progress and ctx.is_main, total=o.steps, initial=self.start_step,
                                    unit="step", dynamic_ncols=True)
            self._announce()
        self.t0 = time.perf_counter()
        self.net.train()
        with Signals(loud=ctx.is_main) as signals, \
                open(self.metrics_path if ctx.is_main else os.devnull, "a", encoding="utf-8") as self.mf:
            if o.steps == 0 and o.eval_every:  # --init-from's 0-step run: the loaded model's held-out baseline
                self._write_record({"step": 0, **self._evaluate()})
            while self.step < o.steps:
                values, scores, grad_norm, lr_now, dt = self._train_step()
                if scores is not None:
                    self._log_step(values, self._step_rtd_metrics(scores), grad_norm, lr_now, dt)
                if ctx.any(signals.caught is not None):
                    self.interrupted = signals.caught or "signal"
                    break
                self._maybe_checkpoint(signals)
            self.bar.close()
            self.wall = time.perf_counter() - self.t0
            self.checkpoint = signals.writing(self._save, self.step)
        return self._finish()

    # ---------------------------------------------------------------- set-up
    def _prepare(self) -> None:
        o, ctx = self.o, self.ctx
        # said now, not at the first step after hours of tokenising; every rank asks, and all stop together
        compile_fails = _compile_fails(ctx.device) if o.compile else None
        # ranks given other options (a node's own --data or --lr) trained one model on mixed data or settings and
        # recorded rank 0's only; other --out folders (no shared filesystem) failed later, naming --tokenizer
        same = "every torchrun process needs the same options, and --out on one shared filesystem"
        ctx.same_on_every_rank({f"--{k.replace('_', '-')}": v for k, v in {
            **o.options, "out": os.path.abspath(o.out), "precision": o.precision, "recipe": o.recipe,
            "override": o.override, "resume": o.resume, "allow_nonempty_out": o.allow_nonempty_out,
            "skip_bad_lines": o.skip_bad_lines, "compile": o.compile, "fused": o.fused,
            "compile failure": compile_fails}.items()}, same)
        if compile_fails is not None:
            raise PretrainError(f"--compile: torch.compile does not work here ({compile_fails}); run without "
                                "--compile")
        rundir.prepare(o.out, resume=o.resume, allow_nonempty=o.allow_nonempty_out, claim=ctx.is_main)
        self.lock = rundir.claim_lock(o.out) if ctx.is_main else None
        if ctx.is_main:  # before anything may refuse: a finished run's --resume stopped before its cleaning
            rundir.remove_stale_temporaries(o.out, locked=self.lock is not None)
        self.owns_out = ctx.is_main  # from here on, the files this job creates in --out are its own
        self.ckpt_root, self.cache_dir = os.path.join(o.out, "checkpoints"), os.path.join(o.out, "cache")
        self.resume_from = ckpt.newest_complete(self.ckpt_root, self.say) if o.resume else None
        if o.resume and self.resume_from is None:
            if o.run_init_from is not None:  # its model came from there, and only a checkpoint holds it now
                raise PretrainError(f"--resume: no complete checkpoint in {o.out} to continue, and this run started "
                                    f"from --init-from {o.run_init_from}: start it again with that --init-from in "
                                    "a new --out")
            if isinstance(o.recorded_recipe, dict):  # the run's recipe, as a resumed run keeps its checkpoint's
                o.recipe = recipes.restart(o.recorded_recipe, o.recipe, o.override, self.say)
            self.say(f"--resume: no complete checkpoint in {o.out}; starting from scratch with the run's options "
                     "(where it recorded them) and those given")
        self.state = (ckpt.load_training_state(os.path.join(self.resume_from, "training_state.pt"))
                      if self.resume_from else None)
        # before anything is said or written; --steps 0 (--init-from only): a checkpoint of the model as loaded
        if self.state is not None and self.state["step"] >= max(o.steps, 1):
            raise PretrainError(f"--steps: the resumed run is already at step {self.state['step']} >= --steps "
                                f"{o.steps}")
        # a restart (no checkpoint) keeps the run's precision as a resume does
        recorded = self.state or ({"precision": o.run_precision} if o.run_precision in PRECISIONS else None)
        self.precision = resolve_precision(o.precision, ctx.device, recorded, self.say)
        check_forced_backend(ctx.device, self.precision)  # auto's bf16 on a CPU: ops of its own
        if ctx.is_main:
            os.makedirs(o.out, exist_ok=True)
        ctx.barrier()  # rank 0 has claimed --out: every rank must see it there
        ctx.same_on_every_rank({"--out": "the run folder rank 0 prepared" if rundir.is_claimed(o.out)
                                else "no run folder prepared by rank 0"}, same)
        self.inputs = self._inputs()
        ctx.same_on_every_rank({"--data": [(p, *_stat(p)) for p in self.inputs]}, same)
        self.tok = self._tokenizer()
        self.cfg = self._config()
        self._data()
        self._model_and_optimizer()
        self._restore()
        self._open_logs()

    def _inputs(self):
        o, ctx = self.o, self.ctx
        if not o.embedded:
            return resolve_inputs(o.data, exclude=o.out, owned=rundir.OWNED,  # the run's own files are never data
                                  hidden=reads_hidden(o.data, o.recorded_inputs))  # read as the run read its folders
        from .corpus import write_default_corpus
        corpus = os.path.join(self.cache_dir, f"default-corpus-py{sys.version_info[0]}.{sys.version_info[1]}.txt")
        if ctx.is_main:
            with writing(corpus):
                write_default_corpus(corpus)
        ctx.barrier()
        return [corpus]

    def _tokenizer(self):
        o, ctx, inputs = self.o, self.ctx, self.inputs
        if self.resume_from is not None:
            tok = load_tokenizer(os.path.join(self.resume_from, "tokenizer.json"))
            # a run started before folders were read as transformers reads them had the file's own reading
            if o.tokenizer is not None and fingerprint(tok) not in {
                    fingerprint(load_tokenizer(o.tokenizer, configured=c)) for c in (True, False)}:
                raise PretrainError(f"--tokenizer: {o.tokenizer} does not match the vocabulary of the checkpoint "
                                    f"being resumed ({self.resume_from}); drop --tokenizer or start a new --out")
            return tok
        if o.tokenizer is not None:
            return load_tokenizer(o.tokenizer)
        if o.run_tokenizer is not None:  # a restarted run's own --tokenizer, not a new one trained on the data
            if not os.path.exists(o.run_tokenizer):
                raise PretrainError(f"--resume: the run's tokenizer {o.run_tokenizer} is gone and no checkpoint "
                                    "holds a copy; pass --tokenizer")
            return load_tokenizer(o.run_tokenizer)
        kind = o.recipe.get("tokenizer_type", "wordpiece")
        vocab = o.vocab_size or (DEFAULT_EMBEDDED_VOCAB if o.embedded else DEFAULT_VOCAB[kind])
        tok_path = os.path.join(self.cache_dir, "tokenizer.json")
        if ctx.is_main:
            os.makedirs(self.cache_dir, exist_ok=True)
            self.say(f"training a {TOKENIZER_NAMES[kind]} tokenizer (vocabulary {vocab}) on {len(inputs)} input(s)")
            tok = train_tokenizer(kind, lambda: (d for p in inputs for d in read_documents(p, o.skip_bad_lines)),
                                  vocab)
            if tok.get_vocab_size() <= 5:
                raise PretrainError("--data: no text found to train a tokenizer on")
            with writing(tok_path):
                write_tokenizer(tok, tok_path)
        ctx.barrier()
        return load_tokenizer(tok_path)

    def _config(self):
        if self.resume_from is not None:
            cfg = ckpt.load_config(self.resume_from)
            # more rows than ids: an --init-from source's unused rows (DeBERTa-v3's release: 128100 rows, 128001
            # tokens), which its config never lets masking or the generator draw; fewer would index past the table
            ids = embedding_rows(self.tok)
            if cfg.vocab_size < ids or not set(range(ids, cfg.vocab_size)) <= set(cfg.disallowed_sample_ids):
                raise PretrainError(f"checkpoint {self.resume_from}: config vocab_size {cfg.vocab_size} does not "
                                    f"match its tokenizer ({ids} ids)")
        else:
            o = self.o
            cfg = o.source.config_for(self.tok, o.recipe) if o.source else model_config(o.model,
                                                                                     config_overrides(self.tok))
            if o.resume and isinstance(o.recorded_recipe, dict):  # a restart: the run's generator, as it was
                o.recipe = recipes.restart_generator(cfg, o.recorded_recipe, o.recipe, o.override, self.say)
        cfg, self.run_recipe = recipes.settle(cfg, self.o.recipe, self.tok, self.state and self.state.get("recipe", {}),
                                              self.o.override, self.say)
        check_seq_len(self.o.seq_len, cfg)
        return cfg

    def _data(self) -> None:
        o, ctx = self.o, self.ctx
        said: list = []  # the cache's report waits until the corpus is known to fill a sequence: no line before an error
        self.text_rules = TextRules.of_checkpoint(self.state)  # a run resumes reading its text as it was tokenised
        cache = dict(log=said.append, rules=self.text_rules)
        if ctx.is_main:
            stream = self._token_cache(cache)
            stale = [p for p in remove_other_caches(stream) if p.endswith(".bin")]
            if stale:  # before the other ranks read theirs: a cache hit by now
                said.append(f"removed {len(stale)} stale token cache(s) of an earlier corpus or tokenizer: "
                            f"{', '.join(os.path.basename(p) for p in stale)}")
        ctx.barrier()
        if not ctx.is_main:  # a cache hit by now
            stream = self._token_cache(cache)
        ids = special_ids(self.tok)
        self.data_digest = stream_digest(stream)
        ctx.same_on_every_rank({"--data": f"tokens sha256 {self.data_digest}"}, "every torchrun process needs the "
                               "same corpus (its token cache differs from rank 0's)")
        self.packed = (DocumentRows(stream, o.seq_len, ids["cls"], ids["sep"], ids["pad"])
                       if self.run_recipe["packing"] == "doc-sentences"
                       else PackedSequences(stream, o.seq_len, ids["cls"], ids["sep"]))
        for line in said:
            self.say(line)
        # said once, at a run's start (a resume reads the same rows with the same recipe)
        new_run = self.state is None
        shortfall = whole_word_shortfall(self.packed, self.cfg) if self.cfg.whole_word_masking and new_run else None
        if shortfall:
            self.say(f"warning: {shortfall}")
        self._split(ids)

    def _token_cache(self, cache: dict) -> str:
        """:func:`build_token_cache`; a full disk is said naming the cache file and the room left (its writer's bare
        "[Errno 28] No space left on device" named neither)."""
        o = self.o
        key = cache_key(self.inputs, self.tok, o.skip_bad_lines, cache["rules"])
        with writing(os.path.join(self.cache_dir, f"tokens-{key}.bin"), inside=self.cache_dir):
            return build_token_cache(self.inputs, self.tok, self.cache_dir, o.skip_bad_lines, **cache)

    def _split(self, special: dict) -> None:
        """The training order, and the held-out slice it leaves out: a new run holds one out with --eval-every;
        a resumed run keeps its checkpoint's split (the data order depends on it)."""
        o, n = self.o, len(self.packed)
        state = self.state if self.state is not None else {}  # older checkpoints record neither
        was, digest = state.get("sequences", n), state.get("data_sha256", self.data_digest)
        if was != n or digest != self.data_digest:
            now = (f"now packs into {n} sequences of --seq-len {o.seq_len}, the checkpoint's into {was}" if was != n
                   else "tokens differ from the checkpoint's (the same number of sequences, other text)")
            raise PretrainError(f"--resume: the data {now}: it changed since (the data order and the held-out slice "
                                "depend on it); resume on the run's text, or start a new --out")
        self.heldout_sequences = (self.state.get("heldout_sequences", 0) if self.state is not None
                                  else heldout_count(n) if o.eval_every else 0)
        self.heldout = None
        if o.eval_every and not self.heldout_sequences:
            why = ("the run being resumed was started without --eval-every, so every sequence may have been "
                   "trained on; start a new --out to evaluate" if self.state is not None
                   else f"the corpus has {n} sequence(s) of --seq-len {o.seq_len}; a held-out slice needs >= 2")
            raise PretrainError(f"--eval-every: {why}")
        if not self.heldout_sequences:
            self.sampler = Sampler(n, o.seed)
            return
        heldout_ids, train_ids = split(n, self.heldout_sequences)
        self.sampler = SplitSampler(train_ids, o.seed)
        if o.eval_every and self.ctx.is_main:  # rank 0 evaluates; the others go on to the next step's collective
            self.heldout = HeldOut(self.packed, heldout_ids, train_ids,
                                   lambda i: derive_seed(0x4556414C, i),  # "EVAL": the same for every run
                                   tuple(special.values()), self.cfg.vocab_size, self.cfg.whole_word_masking)

    def _model_and_optimizer(self) -> None:
        from ..models import ElectraPretrainingModel
        o, ctx = self.o, self.ctx
        torch.manual_seed(o.seed)
        self.net = ElectraPretrainingModel(self.cfg, fused=o.fused)
        if o.source is not None:
            o.source.load_into(self.net)
        self.net = self.net.to(ctx.device)
        if ctx.device.type == "cpu":
            self.kept_freed_memory = _keep_freed_memory()
        # fused AdamW: one kernel over all parameters (CPU and CUDA) instead of ~10 ops per parameter tensor
        self.optimizer = torch.optim.AdamW(param_groups(self.net, o.weight_decay), lr=o.lr,
                                           **recipes.adam(self.run_recipe), fused=ctx.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(o.warmup, o.steps))
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.precision == "fp16")
        if self.state is not None and self.state["scaler"]:  # empty when the run was not fp16
            self.scaler.load_state_dict(self.state["scaler"])
        torch.manual_seed(derive_seed(o.seed, DROP_STREAM, ctx.rank))  # per-rank dropout stream
        self.ddp = self.net
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(self.net,
                                               device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.step_fn = torch.compile(self.ddp) if o.compile else self.ddp

    def _restore(self) -> None:
        """The checkpoint's weights, optimizer, schedule, data position and generator state (``--resume``)."""
        o, ctx, st = self.o, self.ctx, self.state
        self.start_step, self.data_pos, self.tokens_seen = 0, 0, 0
        self.run_id, self.elapsed_before = uuid.uuid4().hex, 0.0
        if self.resume_from is not None:
            ckpt.load_model_state(self.net, os.path.join(self.resume_from, "model.safetensors"))
            self.optimizer.load_state_dict(st["optimizer"])
            recipes.set_optimizer(self.optimizer, self.run_recipe)
            self.scheduler.load_state_dict(st["scheduler"])
            # the saved optimizer holds the run's last rate under its own --steps (0 where it ended): a run resumed
            # to train longer took that first step at rate 0, changing nothing; this run's schedule sets it
            for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                           self.scheduler.lr_lambdas):
                group["lr"] = base * factor(self.scheduler.last_epoch)
            self.start_step, self.data_pos, self.tokens_seen = st["step"], st["data_position"], st["tokens_seen"]
            self.elapsed_before = st.get("elapsed_s", 0.0)
            self.run_id = ckpt.read_meta(self.resume_from)["run_id"]
            if ctx.rank < len(st["rng"]):
                _set_rng_state(st["rng"][ctx.rank], ctx)
            else:  # a rank the run did not have: its own dropout stream (rank 0's would repeat it on every rank)
                torch.manual_seed(derive_seed(o.seed, DROP_STREAM, ctx.rank, self.start_step))
            if st.get("world", 1) != ctx.world:  # --batch-size is per process: the step's batch changes with it
                per_step = o.batch_size * o.grad_accum
                self.say(f"warning: resuming a {st.get('world', 1)}-process run on {ctx.world} processes: a step now "
                         f"takes {per_step * ctx.world} sequences, the run's took {per_step * st.get('world', 1)} "
                         f"(--batch-size {o.batch_size} per process x --grad-accum {o.grad_accum} x processes); the "
                         "data order and learning-rate schedule continue, but the results differ from an "
                         "uninterrupted run's")
            self.say(f"resuming from {self.resume_from} (step {self.start_step})")
        self.step = self.start_step  # < o.steps: checked in _prepare, before anything was said

    def _open_logs(self) -> None:
        """run.json (a new run), metrics.jsonl (cut back to the checkpoint on resume), the TensorBoard writer."""
        o = self.o
        self.metrics_path = os.path.join(o.out, "metrics.jsonl")
        self.tb = None
        if not self.ctx.is_main:
            return
        if self.resume_from is None:
            write_json(os.path.join(o.out, "run.json"), {"run_id": self.run_id, "created": time.time(),
                                                          "model": o.model, "inputs": self.inputs,
                                                          "precision": self.precision, "recipe": self.run_recipe,
                                                          "options": o.options})
            if os.path.exists(self.metrics_path):  # --resume without a usable checkpoint: the history is kept aside
                kept = unused(self.metrics_path + ".before-restart")
                os.replace(self.metrics_path, kept)
                self.say(f"--resume: the run's earlier metrics are kept in {kept}")
        else:  # what a later --resume inherits: this one's settings (--keep, --steps...) and recipe
            record = _run_record(o.out)
            if isinstance(record.get("options"), dict):  # a run.json from before the record: its options unknown
                write_json(os.path.join(o.out, "run.json"), {**record, "recipe": self.run_recipe,
                                                              "options": o.options, "inputs": self.inputs,
                                                              "precision": self.precision})
            rundir.truncate_metrics(self.metrics_path, self.start_step)
        if o.tensorboard:  # a resumed run drops the events logged after its checkpoint (they are re-logged)
            self.tb = summary_writer()(os.path.join(o.out, "tensorboard"),
                                        purge_step=self.start_step + 1 if self.resume_from else None)

    def _announce(self) -> None:
        o = self.o
        params = sum(p.numel() for p in self.net.parameters()) / 1e6
        self.say(f"pretraining {o.model} ({params:.1f} M parameters, vocabulary {self.cfg.vocab_size}) on "
                 f"{len(self.packed)} sequences of {o.seq_len} tokens, {self._tokens_per_step()} tokens per step, "
                 f"{o.steps} steps, {self.precision}, {self.ctx.world} process(es) on {self.ctx.device}")

    # ---------------------------------------------------------------- one step
    def _tokens_per_step(self) -> int:
        o = self.o
        return o.batch_size * o.seq_len * o.grad_accum * self.ctx.world

    def _train_step(self):
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's metric values (mean over
        micro-batches and ranks, order ``STEP_METRICS``), the gradient norm, the learning rate used and the time."""
        o, ctx = self.o, self.ctx
        logged = self._is_log_step(self.step + 1)
        # a logged step's time is its tokens/s: on a GPU, the work queued before it and its own must be finished at
        # either end (only logged steps wait: the others stay asynchronous)
        _finish_queued(ctx.device, logged)
        ts = time.perf_counter()
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.optimizer.zero_grad(set_to_none=True)
        acc = torch.zeros(len(STEP_METRICS), device=ctx.device)
        scores = TokenScores() if logged else None
        for m in range(o.grad_accum):
            idx = self.sampler.indices(self.data_pos + (m * ctx.world + ctx.rank) * o.batch_size, o.batch_size)
            batch, layout = model_inputs(self.packed, idx, self.cfg.whole_word_masking)
            batch = batch.to(ctx.device, non_blocking=True)
            layout = {k: v.to(ctx.device) for k, v in layout.items()}  # doc-sentences rows, word starts
            mask = layout.pop("attention_mask", None)
            sync = ctx.distributed and m < o.grad_accum - 1
            with (self.ddp.no_sync() if sync else _null()):
                with torch.autocast(ctx.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                    out = self.step_fn(batch, mask, seed=derive_seed(o.seed, self.step, ctx.rank, m), **layout)
                self.scaler.scale(out.loss / o.grad_accum).backward()
            acc += torch.stack([out.loss.detach(), out.mlm_loss.detach(), out.rtd_loss.detach()]
                               + [out.metrics[k].detach().float() for k in STEP_METRICS[3:]]) / o.grad_accum
            if scores is not None:  # a logging step: the logits and labels in hand, nothing recomputed
                scores.add(out.discriminator_logits, out.corrupted_ids, batch, mask)
        self.data_pos += o.batch_size * o.grad_accum * ctx.world
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr_now = self.optimizer.param_groups[0]["lr"]  # the rate this step took
        if self.scaler.get_scale() >= scale:  # fp16: a backed-off scale means the optimizer skipped (inf grads)
            self.scheduler.step()
        self.step += 1
        self.tokens_seen += self._tokens_per_step()
        acc = ctx.all_mean(acc)
        # noted on the device (no sync per step), read before a checkpoint is written: a diverged run saved NaN
        # weights between log steps and --keep then deleted its good checkpoints
        if self.precision != "fp16":  # fp16: the grad scaler skips overflowing steps and the run recovers
            if self.first_nonfinite is None:
                self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=ctx.device)
            bad = ~torch.isfinite(acc[:3]).all() & (self.first_nonfinite < 0)
            self.first_nonfinite = torch.where(bad, self.step, self.first_nonfinite)
        _finish_queued(ctx.device, logged)
        dt = time.perf_counter() - ts
        self.bar.update(1)
        return acc, scores, grad_norm, lr_now, dt

    def _is_log_step(self, step: int) -> bool:
        o = self.o
        return (step % o.log_every == 0 or step == o.steps or step == self.start_step + 1
                or self._is_eval_step(step))

    def _is_eval_step(self, step: int) -> bool:
        return bool(self.o.eval_every) and (step % self.o.eval_every == 0 or step == self.o.steps)

    def _step_rtd_metrics(self, scores: TokenScores) -> dict:
        """The discriminator's metrics over every real token of the step (all micro-batches, all ranks)."""
        logits, labels = scores.tensors()
        logits, labels = self.ctx.all_cat(logits), self.ctx.all_cat(labels.to(torch.uint8))
        return rtd_metrics(logits, labels.bool())

    def _evaluate(self) -> dict:
        """The held-out record of this step (rank 0; {} elsewhere); the first one also prints the baseline."""
        if self.heldout is None:
            return {}
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        rec = self.heldout.evaluate(self.net, self.ctx.device, dict(dtype=amp or torch.bfloat16,
                                                                    enabled=amp is not None))
        if self.last_eval is None:
            token = self.tok.id_to_token(self.heldout.unigram_token)
            self.say(f"held-out slice: {len(self.heldout.ids)} sequences never trained on; unigram baseline "
                     f"(always {token!r}) MLM accuracy {fmt(rec['eval_unigram_accuracy'])}, generator "
                     f"{fmt(rec['eval_generator_accuracy'])} at step {self.step}")
        self.last_eval = rec
        return rec

    def _write_record(self, rec: dict) -> None:
        """One line of metrics.jsonl (rank 0). JSON has no Infinity / NaN (an fp16 step the grad scaler skipped has
        an infinite grad norm): null, as an undefined AUC."""
        if self.ctx.is_main:
            self.mf.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                      for k, v in rec.items()}, allow_nan=False) + "\n")
            self.mf.flush()

    def _log_step(self, values, rtd: dict, grad_norm, lr_now, dt) -> None:
        """One metrics.jsonl record (and TensorBoard scalars, and the progress bar's numbers); ``rtd``: the
        step's exact discriminator metrics, which replace the micro-batch means of the same names."""
        vals = values.tolist()
        if not all(math.isfinite(v) for v in vals[:3]):
            if self.precision != "fp16":  # fp16: the grad scaler skips overflowing steps and the run recovers
                raise PretrainError(f"the loss became non-finite at step {self.step}: the run diverged (lower --lr, "
                                    "or check --adam-eps / --disc-weight); the checkpoints written so far are kept")
            self.say(f"warning: non-finite loss at step {self.step}")
        tok_s = self._tokens_per_step() / dt
        rec = {"step": self.step, **dict(zip(STEP_METRICS, vals)), **rtd, "lr": lr_now,
               "grad_norm": float(grad_norm), "tokens_per_s": tok_s, "tokens_seen": self.tokens_seen}
        if self._is_eval_step(self.step):
            rec.update(self._evaluate())
        self.last_record = rec
        if self.first_loss is None:
            self.first_loss = rec["loss"]
        if not self.ctx.is_main:
            return
        self._write_record(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, self.step)
        self.bar.set_postfix(loss=f"{vals[0]:.3f}", mlm=f"{vals[1]:.3f}", rtd=f"{vals[2]:.4f}",
                             prior=f"{rtd['prior_rtd_loss']:.4f}", auc=fmt(rtd["discriminator_auc"]),
                             f1=f"{rtd['discriminator_f1']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)

    def _maybe_checkpoint(self, signals: Signals) -> None:
        every = self.o.save_every
        if every and self.step % every == 0 and self.step < self.o.steps:
            self.checkpoint = signals.writing(self._save, self.step)

    def _gather_rng(self):
        ctx = self.ctx
        if not ctx.distributed:
            return [_rng_state(ctx)]
        import torch.distributed as dist
        states = [None] * ctx.world
        dist.all_gather_object(states, {k: v.cpu() for k, v in _rng_state(ctx).items()})
        return states

    def _check_finite(self, step: int) -> None:
        """Refuse to checkpoint a diverged run: a non-finite loss since the start (not tracked under fp16) or
        non-finite weights. Every rank holds the same values: all raise together."""
        first = -1 if self.first_nonfinite is None else int(self.first_nonfinite)
        weights = all(bool(torch.isfinite(p).all()) for p in self.net.parameters())
        if first >= 0 or not weights:
            when = f"the loss became non-finite at step {first}" if first >= 0 else \
                f"the weights became non-finite by step {step}"
            raise PretrainError(f"{when}: the run diverged (lower --lr, or check --adam-eps / --disc-weight); no "
                                f"checkpoint is written for step {step}, the checkpoints written so far are kept")

    def _save(self, step: int):
        """A checkpoint at ``step`` (collective: every rank takes part; rank 0 writes); its path on rank 0."""
        self._check_finite(step)
        o, ctx = self.o, self.ctx
        rngs = self._gather_rng()
        path = None
        if ctx.is_main:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rngs, "step": step, "data_position": self.data_pos,
                     "tokens_seen": self.tokens_seen,
                     "elapsed_s": self.elapsed_before + time.perf_counter() - self.t0,
                     "world": ctx.world, "seq_len": o.seq_len, "batch_size": o.batch_size,
                     "grad_accum": o.grad_accum, "precision": self.precision, "recipe": self.run_recipe,
                     "heldout_sequences": self.heldout_sequences, "sequences": len(self.packed),
                     "data_sha256": self.data_digest}
            state.update(self.text_rules.recorded(self.tok))
            writers = {"model.safetensors": lambda p: ckpt.save_model(self.net, p),
                       "training_state.pt": lambda p: ckpt.save_training_state(state, p),
                       "config.json": lambda p: self.cfg.to_json_file(p),
                       "tokenizer.json": lambda p: write_tokenizer(self.tok, p)}
            path = ckpt.save(self.ckpt_root, step, self.run_id, writers, keep=o.keep, hook=o._checkpoint_hook,
                             warn=self.say)
        ctx.barrier()
        return path

    # ---------------------------------------------------------------- the end
    def _finish(self) -> dict:
        """Close the logs, print the closing summary (rank 0) and return it."""
        o, step = self.o, self.step
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        curves = plot.write_run_curves(o.out, self.say) if self.ctx.is_main and self.last_record else ""
        summary = {"steps": step, "tokens_seen": self.tokens_seen, "wall_time_s": self.wall,
                   "tokens_per_s": (step - self.start_step) * self._tokens_per_step() / max(self.wall, 1e-9),
                   "first_loss": self.first_loss, "final": self.last_record, "checkpoint": self.checkpoint,
                   "out": o.out, "interrupted": self.interrupted, "precision": self.precision,
                   "eval": self.last_eval, "curves": curves}
        if self.ctx.is_main:
            show("\n".join(self._summary_lines(summary)))
        summary["model"] = self.net
        return summary

    def _summary_lines(self, summary: dict):
        f, path, first = self.last_record or {}, self.checkpoint, self.first_loss
        stopped = f"interrupted by {self.interrupted}, " if self.interrupted else ""
        return [f"{stopped}trained to step {self.step}/{self.o.steps}: {self.tokens_seen:,} tokens seen, "
                f"{self.wall:.1f} s, {summary['tokens_per_s']:,.0f} tokens/s",
                f"loss {first:.4f} -> {f.get('loss', float('nan')):.4f} (mlm {f.get('mlm_loss', 0):.4f}, "
                f"rtd {f.get('rtd_loss', 0):.4f}, discriminator accuracy {f.get('discriminator_accuracy', 0):.3f})"
                if first is not None else "no step logged",
                *learned(f, self.last_eval), f"checkpoint: {path}",
                f"metrics: {self.metrics_path}" + (f", curves: {summary['curves']}" if summary["curves"] else ""),
                f"export: electra-fast export {path} {os.path.join(self.o.out, 'export')}"]


STEP_METRICS = ("loss", "mlm_loss", "rtd_loss", "generator_accuracy", "discriminator_accuracy",
                "discriminator_precision", "discriminator_recall", "replaced_fraction")


def _finish_queued(device: torch.device, wanted: bool) -> None:
    """Wait for the work queued on a CUDA ``device`` when ``wanted`` (CPU work is done when its call returns)."""
    if wanted and device.type == "cuda":
        torch.cuda.synchronize(device)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
