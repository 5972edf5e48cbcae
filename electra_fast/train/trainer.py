"""``pretrain``: the end-to-end ELECTRA / DeBERTa-v3 RTD pretraining job (what ``electra-fast pretrain`` runs).

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` packed sequences per rank; the global
batch is ``batch_size * grad_accum * world`` sequences, taken in order from the seeded data stream (rank r,
micro-batch m reads the slice ``pos + (m * world + r) * batch_size``). Each micro-batch's corruption seed is
``derive_seed(seed, step, rank, m)``; dropout draws from torch's generator, seeded per rank and saved in
checkpoints. Everything a step depends on is therefore in the checkpoint, and a resumed CPU run reproduces
the uninterrupted run's losses exactly.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
import uuid
from typing import Callable, Optional, Sequence

import torch

from .. import _cpu
from . import checkpoint as ckpt
from . import recipe as recipes
from . import rundir
from .data import PackedSequences, Sampler, build_token_cache, read_documents, resolve_inputs
from .distributed import Context, setup
from .errors import InterruptedAgain, PretrainError
from .init_from import init_source
from .tokenizer import (DEFAULT_VOCAB, config_overrides, fingerprint, load_tokenizer, min_vocab, special_ids,
                        train_tokenizer)

MASK64 = (1 << 64) - 1
# small enough that the README's default job (no --data, CPU) runs a few hundred steps in a couple of minutes
TINY = dict(embedding_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=512, generator_hidden_size=64, generator_num_hidden_layers=2,
            generator_num_attention_heads=1, generator_intermediate_size=256)
DEFAULT_STEPS, DEFAULT_EMBEDDED_STEPS = 10_000, 300
DEFAULT_EMBEDDED_VOCAB = 8192  # any family: the embedded corpus gives ~9-10k pieces at most
TOKENIZER_NAMES = {"wordpiece": "WordPiece", "bpe": "byte-level BPE", "unigram": "Unigram"}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """A seed in [0, 2**63) mixing ``seed`` with ``parts`` (step, rank, micro-batch) through SplitMix64."""
    x = _splitmix64(seed & MASK64)
    for p in parts:
        x = _splitmix64(x ^ (p & MASK64))
    return x >> 1


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


def _check_seq_len(seq_len: int, cfg) -> None:
    if seq_len > cfg.max_position_embeddings:
        raise PretrainError(f"--seq-len: {seq_len} exceeds the model's max_position_embeddings "
                            f"({cfg.max_position_embeddings})")


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on matrices and embeddings; none on LayerNorm parameters and biases (ELECTRA)."""
    no_decay = set()
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            no_decay.update(id(p) for p in m.parameters(recurse=False))
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if id(p) in no_decay or name.endswith("bias") or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _keep_freed_memory() -> bool:
    """CPU training: let glibc keep freed memory for reuse (True when applied).

    By default glibc serves large blocks with fresh mmaps and trims the heap top, so every step re-faults
    its activations (~50 k page faults, ~200 MB, per ELECTRA-small 32 x 128 step): ~5% of a CPU step
    (fused bf16 ~790 -> ~750 ms; transformers' step gains ~8%). Blocks up to 1 GiB then come from the heap,
    which is never trimmed below 2 GiB of free space - the footprint a training loop reuses every step.
    No-op off glibc. ``ELECTRA_FAST_KEEP_FREED_MEMORY=0`` turns it off.
    """
    if os.environ.get("ELECTRA_FAST_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) & bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def _schedule(warmup: int, steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))
    return factor


def _positive(name: str, value, minimum: int = 1, maximum: Optional[int] = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        expected = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
        raise PretrainError(f"--{name}: expected {expected}, got {value!r}")
    return value


def _real(name: str, value, minimum: float, inclusive: bool) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < minimum or (value == minimum and not inclusive)):
        raise PretrainError(f"--{name}: expected a finite number {'>=' if inclusive else '>'} {minimum:g}, "
                            f"got {value!r}")
    return value


# "an ELECTRA-small 32 x 128 step took 91 s in bf16 vs 4.5 s in fp32" (AVX2-only AMD EPYC, no native bf16)
EMULATED_BF16 = ("bf16 matrix products are emulated here, ~20x slower than fp32 (an ELECTRA-small 32x128 step: 91 s "
                 "vs 4.5 s on an AVX2-only AMD EPYC); --precision auto picks fp32 on this CPU")


def _resolve_precision(precision: str, device: torch.device, state: Optional[dict], say) -> str:
    """``auto``: the resumed run's own precision (``state``: its training state), else bf16 where ``device`` runs
    it natively, else fp32. Warns (one line) when bf16 is emulated on this CPU, or when a resumed run changes it."""
    recorded = state.get("precision") if state else None
    if precision == "auto":  # a checkpoint from before "precision" was recorded: fp16 left a scaler state, else fp32
        legacy = state and ("fp16" if state["scaler"] else "fp32")
        precision = recorded or legacy or _cpu.default_precision(device)[0]
    elif recorded and precision != recorded:
        say(f"warning: --precision {precision}: resuming a {recorded} run; its losses will differ from an "
            "uninterrupted run's")
    if precision == "bf16" and device.type == "cpu":
        native, why = _cpu.native_bf16()
        if not native:
            say(f"warning: --precision bf16: {why}: {EMULATED_BF16}")
    return precision


def _rng_state(ctx: Context) -> dict:
    state = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def _set_rng_state(state: dict, ctx: Context) -> None:
    torch.set_rng_state(state["torch"])
    if ctx.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], ctx.device)


class _Signals:
    """SIGINT / SIGTERM set a flag: the loop finishes its step, checkpoints and stops. A second SIGINT before that
    checkpoint raises InterruptedAgain (no checkpoint); while one is being written (``saving``) it is ignored."""

    def __init__(self, loud: bool = True):
        self.caught, self.saving, self.loud, self._old = None, False, loud, {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.caught is None:
            self.caught = signal.Signals(signum).name
            if self.loud:  # os.write: safe whatever the interrupted code was printing
                os.write(2, f"\n{self.caught}: finishing this step, then saving a checkpoint "
                            "(Ctrl-C again stops without one)\n".encode())
        elif signum == signal.SIGINT and not self.saving:
            raise InterruptedAgain("interrupted again: stopping without a checkpoint")

    def writing(self, save: Callable[[int], str], step: int) -> str:
        """``save(step)`` with a second Ctrl-C ignored until the checkpoint is complete."""
        self.saving = True
        try:
            return save(step)
        finally:
            self.saving = False

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _truncate_metrics(path: str, step: int) -> None:
    """Keep only the records up to ``step`` (a resumed run re-logs what came after its checkpoint)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def pretrain(data: Optional[Sequence[str]] = None, *, tokenizer: Optional[str] = None,
             vocab_size: Optional[int] = None, model: Optional[str] = None, seq_len: int = 128,
             batch_size: Optional[int] = None, grad_accum: int = 1, steps: Optional[int] = None, lr: Optional[float] = None,
             warmup: Optional[int] = None, weight_decay: float = 0.01, precision: str = "auto",
             compile: bool = False, seed: int = 0, out: str = "runs/electra-fast", save_every: Optional[int] = None,
             keep: int = 3, resume: bool = False, log_every: int = 10, skip_bad_lines: bool = False,
             device: Optional[str] = None, threads: Optional[int] = None, progress: bool = True,
             fused: bool = True, allow_nonempty_out: bool = False, recipe: Optional[dict] = None,
             override: bool = False, init_from: Optional[str] = None,
             _checkpoint_hook: Optional[Callable[[str], None]] = None) -> dict:
    """Pretrain an ELECTRA / DeBERTa-v3 RTD model; returns the closing summary (plus ``"model"``, the trained
    ElectraPretrainingModel). Bad input raises :class:`PretrainError` with a one-line message.

    ``data``: paths (.txt / .jsonl / directories / saved datasets); None trains on the embedded default corpus
    (Python's standard-library docstrings) with a tiny model, an 8192-token vocabulary, batch 16 and 300 steps
    unless ``model`` / ``vocab_size`` / ``batch_size`` / ``steps`` say otherwise.
    """
    embedded = data is None or (isinstance(data, (list, tuple)) and len(data) == 0)
    recipe = recipes.check(recipe, override, resume)  # the recipe flags given (README: Recipes)
    source, tokenizer = init_source(init_from, tokenizer, model, vocab_size, resume)
    if isinstance(data, (str, os.PathLike)):
        data = [os.fspath(data)]
    model = model or init_from or ("electra-tiny" if embedded else "electra-small")
    batch_size = (16 if embedded else 32) if batch_size is None else batch_size
    if steps is None:  # an explicit 0 is refused below, never read as "unset"
        steps = DEFAULT_EMBEDDED_STEPS if embedded else DEFAULT_STEPS
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    optional = (("save-every", save_every, 1, None), ("warmup", warmup, 0, None),
                ("vocab-size", vocab_size, min_vocab(recipe.get("tokenizer_type", "wordpiece")), None),
                ("threads", threads, 1, cpus))  # more threads than CPUs only slow down (100000 crashed OpenMP)
    for name, v, lo, hi in (("steps", steps, 0 if source else 1, None), ("seq-len", seq_len, 3, None),
                            ("batch-size", batch_size, 1, None), ("grad-accum", grad_accum, 1, None),
                            ("keep", keep, 1, None), ("log-every", log_every, 1, None), ("seed", seed, 0, 2**63 - 1),
                            *(o for o in optional if o[1] is not None)):
        _positive(name, v, lo, hi)
    del name, v, lo, hi, optional, cpus
    if threads is not None:  # CPU intra-op threads; 1 is fastest for tiny models on a busy machine
        torch.set_num_threads(threads)
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise PretrainError(f"--precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    if lr is None:
        lr = 1e-3 if model == "electra-tiny" else (5e-4 if "small" in model else 2e-4)
    _real("lr", lr, 0.0, inclusive=False)
    _real("weight-decay", weight_decay, 0.0, inclusive=True)
    warmup = min(10_000, steps // 10) if warmup is None else warmup
    if not resume:  # --model and --seq-len now, not after a tokenizer was trained (resume: the checkpoint's model)
        _check_seq_len(seq_len, recipes.apply(source.config if source else model_config(model, {}), recipe))

    out = os.fspath(out)
    ctx = setup(device)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if ctx.is_main else (lambda msg: None)
    kwargs = dict(locals())
    before = _run_files(out) if ctx.is_main else None
    try:
        return _run(**kwargs)
    except BaseException:
        if before is not None:
            _take_back(out, before)
        raise
    finally:
        ctx.close()


RUN_FILES = ("run.json", "metrics.jsonl", "tensorboard", "checkpoints")
KEPT_UNLESS_EMPTY = ("cache", "")  # cache/ is content-keyed (a retry reuses it); "": --out itself


def _run_files(out: str):
    """The run's names not yet in ``out``, and its checkpoints: what :func:`_take_back` compares against."""
    return ([n for n in RUN_FILES + KEPT_UNLESS_EMPTY if not os.path.lexists(os.path.join(out, n))],
            ckpt.checkpoint_dirs(os.path.join(out, "checkpoints")))


def _take_back(out: str, before) -> None:
    """A job that failed before writing a checkpoint leaves nothing a rerun would have to ``--resume``: it removes
    the run files it created (and the directories it created, if empty), never anything that was there before."""
    absent, checkpoints = before
    if ckpt.checkpoint_dirs(os.path.join(out, "checkpoints")) != checkpoints:
        return  # this job wrote a checkpoint: the run is resumable as it stands
    for name in absent:
        path = os.path.join(out, name)
        try:
            if name == "" and os.listdir(path) == [rundir.MARKER]:
                os.unlink(os.path.join(path, rundir.MARKER))  # this job made --out: its claim goes with it
            if name in KEPT_UNLESS_EMPTY:
                os.rmdir(path)  # only when empty
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        except OSError:  # not there, not empty: keep it, and never hide the failure being reported
            pass


def _run(*, data, tokenizer, vocab_size, model, seq_len, batch_size, grad_accum, steps, lr, warmup, weight_decay,
         precision, compile, seed, out, save_every, keep, resume, log_every, skip_bad_lines, device, threads,
         progress, fused, allow_nonempty_out, recipe, override, init_from, source, _checkpoint_hook, embedded,
         ctx: Context, say) -> dict:
    from ..models import ElectraConfig, ElectraPretrainingModel

    rundir.prepare(out, resume=resume, allow_nonempty=allow_nonempty_out, claim=ctx.is_main)
    ckpt_root, cache_dir = os.path.join(out, "checkpoints"), os.path.join(out, "cache")
    resume_from = ckpt.newest_complete(ckpt_root, say) if resume else None
    if resume and resume_from is None:
        say(f"--resume: no complete checkpoint in {out}; starting from scratch")
    st = ckpt.load_training_state(os.path.join(resume_from, "training_state.pt")) if resume_from else None
    precision = _resolve_precision(precision, ctx.device, st, say)
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
        rundir.remove_stale_temporaries(out)

    # ---------------------------------------------------------------- inputs and tokenizer
    if embedded:
        from .corpus import write_default_corpus
        corpus = os.path.join(cache_dir, f"default-corpus-py{sys.version_info[0]}.{sys.version_info[1]}.txt")
        if ctx.is_main:
            write_default_corpus(corpus)
        ctx.barrier()
        inputs = [corpus]
    else:
        inputs = resolve_inputs(data)

    if resume_from is not None:
        tok = load_tokenizer(os.path.join(resume_from, "tokenizer.json"))
        if tokenizer is not None:
            user = load_tokenizer(tokenizer)
            if fingerprint(user) != fingerprint(tok):
                raise PretrainError(f"--tokenizer: {tokenizer} does not match the vocabulary of the checkpoint "
                                    f"being resumed ({resume_from}); drop --tokenizer or start a new --out")
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        kind = recipe.get("tokenizer_type", "wordpiece")
        vocab = vocab_size or (DEFAULT_EMBEDDED_VOCAB if embedded else DEFAULT_VOCAB[kind])
        tok_path = os.path.join(cache_dir, "tokenizer.json")
        if ctx.is_main:
            os.makedirs(cache_dir, exist_ok=True)
            say(f"training a {TOKENIZER_NAMES[kind]} tokenizer (vocabulary {vocab}) on {len(inputs)} input(s)")
            tok = train_tokenizer(kind, lambda: (d for p in inputs for d in read_documents(p, skip_bad_lines)), vocab)
            if tok.get_vocab_size() <= 5:
                raise PretrainError("--data: no text found to train a tokenizer on")
            tok.save(tok_path)
        ctx.barrier()
        tok = load_tokenizer(tok_path)
    ids = special_ids(tok)

    # ---------------------------------------------------------------- model
    if resume_from is not None:
        cfg = ElectraConfig.from_json_file(os.path.join(resume_from, "config.json"))
        if cfg.vocab_size != tok.get_vocab_size(with_added_tokens=True):
            raise PretrainError(f"checkpoint {resume_from}: config vocab_size {cfg.vocab_size} does not match its "
                                f"tokenizer ({tok.get_vocab_size()})")
    else:
        cfg = source.config_for(tok, recipe) if source else model_config(model, config_overrides(tok))
    cfg, run_recipe = recipes.settle(cfg, recipe, tok, st and st.get("recipe", {}), override, say)
    _check_seq_len(seq_len, cfg)

    # ---------------------------------------------------------------- data
    if ctx.is_main:
        stream = build_token_cache(inputs, tok, cache_dir, skip_bad_lines, log=say)
    ctx.barrier()
    if not ctx.is_main:
        stream = build_token_cache(inputs, tok, cache_dir, skip_bad_lines, log=say)  # a cache hit by now
    packed = PackedSequences(stream, seq_len, ids["cls"], ids["sep"])
    sampler = Sampler(len(packed), seed)

    torch.manual_seed(seed)
    net = ElectraPretrainingModel(cfg, fused=fused)
    if source is not None:
        source.load_into(net)
    net = net.to(ctx.device)
    if ctx.device.type == "cpu":
        _keep_freed_memory()
    # fused AdamW: one kernel over all parameters (CPU and CUDA) instead of ~10 ops per parameter tensor
    optimizer = torch.optim.AdamW(_param_groups(net, weight_decay), lr=lr, **recipes.adam(run_recipe),
                                  fused=ctx.device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(warmup, steps))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision == "fp16")
    if st is not None and st["scaler"]:  # empty when the run was not fp16
        scaler.load_state_dict(st["scaler"])
    torch.manual_seed(derive_seed(seed, 0x44524F50, ctx.rank))  # per-rank dropout stream ("DROP")

    start_step, data_pos, tokens_seen, run_id, elapsed_before = 0, 0, 0, uuid.uuid4().hex, 0.0
    if resume_from is not None:
        ckpt.load_model_state(net, os.path.join(resume_from, "model.safetensors"))
        optimizer.load_state_dict(st["optimizer"])
        recipes.set_optimizer(optimizer, run_recipe)
        scheduler.load_state_dict(st["scheduler"])
        start_step, data_pos, tokens_seen = st["step"], st["data_position"], st["tokens_seen"]
        elapsed_before = st.get("elapsed_s", 0.0)
        run_id = ckpt.read_meta(resume_from)["run_id"]
        rng = st["rng"][ctx.rank] if ctx.rank < len(st["rng"]) else st["rng"][0]
        _set_rng_state(rng, ctx)
        if st.get("world", 1) != ctx.world:
            say(f"warning: resuming a {st.get('world', 1)}-process run on {ctx.world} processes: the data order "
                "continues but per-step results will differ from an uninterrupted run")
        say(f"resuming from {resume_from} (step {start_step})")
    if start_step >= max(steps, 1):  # --steps 0 (--init-from only): a checkpoint of the model as loaded
        raise PretrainError(f"--steps: the resumed run is already at step {start_step} >= --steps {steps}")

    ddp = net
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    step_fn = torch.compile(ddp) if compile else ddp

    metrics_path = os.path.join(out, "metrics.jsonl")
    if ctx.is_main:
        if resume_from is None:
            _write_json(os.path.join(out, "run.json"), {"run_id": run_id, "created": time.time(),
                                                        "model": model, "inputs": inputs,
                                                        "precision": precision, "recipe": run_recipe})
            if os.path.exists(metrics_path):  # only reachable with --resume and no checkpoint: our own file
                os.unlink(metrics_path)
        else:
            _truncate_metrics(metrics_path, start_step)
    tb = None
    if ctx.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(out, "tensorboard"))
        except Exception:  # tensorboard not installed
            tb = None

    def gather_rng():
        if not ctx.distributed:
            return [_rng_state(ctx)]
        import torch.distributed as dist
        states = [None] * ctx.world
        dist.all_gather_object(states, {k: v.cpu() for k, v in _rng_state(ctx).items()})
        return states

    def save(step):
        rngs = gather_rng()  # collective: every rank takes part
        path = None
        if ctx.is_main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rngs, "step": step, "data_position": data_pos,
                     "tokens_seen": tokens_seen, "elapsed_s": elapsed_before + time.perf_counter() - t0,
                     "world": ctx.world, "seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum,
                     "precision": precision, "recipe": run_recipe}
            writers = {"model.safetensors": lambda p: ckpt.save_model(net, p),
                       "training_state.pt": lambda p: ckpt.save_training_state(state, p),
                       "config.json": lambda p: cfg.to_json_file(p),
                       "tokenizer.json": lambda p: tok.save(p)}
            path = ckpt.save(ckpt_root, step, run_id, writers, keep=keep, hook=_checkpoint_hook, warn=say)
        ctx.barrier()
        return path

    # ---------------------------------------------------------------- loop
    from tqdm.auto import tqdm
    dev_type = ctx.device.type
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    per_step_tokens = batch_size * seq_len * grad_accum * ctx.world
    names = ("loss", "mlm_loss", "rtd_loss", "generator_accuracy", "discriminator_accuracy",
             "discriminator_precision", "discriminator_recall", "replaced_fraction")
    bar = tqdm(total=steps, initial=start_step, disable=not (progress and ctx.is_main), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    say(f"pretraining {model} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters, vocabulary "
        f"{cfg.vocab_size}) on {len(packed)} sequences of {seq_len} tokens, {per_step_tokens} tokens per step, "
        f"{steps} steps, {precision}, {ctx.world} process(es) on {ctx.device}")
    t0 = time.perf_counter()
    first_loss, last_record, interrupted, path = None, None, None, None
    net.train()
    with _Signals(loud=ctx.is_main) as signals, \
            open(os.devnull if not ctx.is_main else metrics_path, "a", encoding="utf-8") as mf:
        step = start_step
        while step < steps:
            ts = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            acc = torch.zeros(len(names), device=ctx.device)
            for m in range(grad_accum):
                idx = sampler.indices(data_pos + (m * ctx.world + ctx.rank) * batch_size, batch_size)
                batch = packed.batch(idx).to(ctx.device, non_blocking=True)
                starts = packed.word_starts(idx).to(ctx.device) if cfg.whole_word_masking else None
                sync = ctx.distributed and m < grad_accum - 1
                with (ddp.no_sync() if sync else _null()):
                    with torch.autocast(dev_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                        o = step_fn(batch, None, seed=derive_seed(seed, step, ctx.rank, m), word_starts=starts)
                    scaler.scale(o.loss / grad_accum).backward()
                acc += torch.stack([o.loss.detach(), o.mlm_loss.detach(), o.rtd_loss.detach()]
                                   + [o.metrics[k].detach().float() for k in names[3:]]) / grad_accum
            data_pos += batch_size * grad_accum * ctx.world
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            lr_now = scheduler.get_last_lr()[0]
            if scaler.get_scale() >= scale:  # fp16: a backed-off scale means the optimizer skipped (inf grads)
                scheduler.step()
            step += 1
            tokens_seen += per_step_tokens
            acc = ctx.all_mean(acc)
            dt = time.perf_counter() - ts
            bar.update(1)
            if step % log_every == 0 or step == steps or step == start_step + 1:
                vals = acc.tolist()
                if not all(math.isfinite(v) for v in vals[:3]):
                    say(f"warning: non-finite loss at step {step}")
                rec = {"step": step, **{k: v for k, v in zip(names, vals)}, "lr": lr_now,
                       "grad_norm": float(grad_norm), "tokens_per_s": per_step_tokens / dt,
                       "tokens_seen": tokens_seen}
                last_record = rec
                if first_loss is None:
                    first_loss = rec["loss"]
                if ctx.is_main:
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                    if tb is not None:
                        for k, v in rec.items():
                            if k != "step":
                                tb.add_scalar(k, v, step)
                    bar.set_postfix(loss=f"{vals[0]:.3f}", mlm=f"{vals[1]:.3f}", rtd=f"{vals[2]:.4f}",
                                    tok_s=f"{per_step_tokens / dt:,.0f}", refresh=False)
            if ctx.any(signals.caught is not None):
                interrupted = signals.caught or "signal"
                break
            if save_every and step % save_every == 0 and step < steps:
                path = signals.writing(save, step)
        bar.close()
        wall = time.perf_counter() - t0
        path = signals.writing(save, step)
    if tb is not None:
        tb.close()
    summary = {"steps": step, "tokens_seen": tokens_seen, "wall_time_s": wall,
               "tokens_per_s": (step - start_step) * per_step_tokens / max(wall, 1e-9),
               "first_loss": first_loss, "final": last_record, "checkpoint": path, "out": out,
               "interrupted": interrupted, "precision": precision}
    if ctx.is_main:
        f = last_record or {}
        lines = [f"{'interrupted by ' + interrupted + ', ' if interrupted else ''}trained to step {step}/{steps}: "
                 f"{tokens_seen:,} tokens seen, {wall:.1f} s, {summary['tokens_per_s']:,.0f} tokens/s",
                 f"loss {first_loss:.4f} -> {f.get('loss', float('nan')):.4f} (mlm {f.get('mlm_loss', 0):.4f}, "
                 f"rtd {f.get('rtd_loss', 0):.4f}, discriminator accuracy {f.get('discriminator_accuracy', 0):.3f})"
                 if first_loss is not None else "no step logged",
                 f"checkpoint: {path}", f"metrics: {metrics_path}",
                 f"export: electra-fast export {path} {os.path.join(out, 'export')}"]
        print("\n".join(lines), flush=True)
    summary["model"] = net
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
