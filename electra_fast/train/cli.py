"""``electra-fast pretrain``, ``export`` and ``plot``: argument parsing and one-line errors.

Kept apart from the top-level ``electra_fast/cli.py``, which only registers these sub-commands.
"""
from __future__ import annotations

import argparse
import os
import re

from .._console import say, show
from .._validate import out_of_memory, reason
from . import recipe

COMMANDS = ("pretrain", "export", "plot")
# argparse's own pattern knows only "-1" and "-.5", so "--lr -1e-3" read as a missing value: every float
# spelling of a negative number (-inf included) is a value here, and the range checks then say what is wrong
_NEGATIVE_NUMBER = re.compile(r"^-((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``PROG: error: ...``, exit status 2, no usage block) that reads negative
    numbers in any float spelling as values. Sub-parsers are made of the same class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, but not an unset one ("(default: None)" / "(default: False)"): its help says what
    unset means (a preset's value, a resumed run's own, off)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_parsers(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain an ELECTRA / DeBERTa-v3 RTD model (default: a tiny model on an "
                                        "embedded corpus, a few minutes on CPU)",
                       formatter_class=Defaults)
    p.add_argument("--data", nargs="+", metavar="PATH", default=None,
                   help=".txt (documents separated by blank lines), .jsonl / .json ('text' field), directories of "
                        "those, or a datasets save_to_disk directory; default: the embedded corpus (Python's stdlib "
                        "docstrings)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or a transformers tokenizer directory")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="train a --tokenizer-type tokenizer of this size (default 30522 wordpiece, 50265 bpe, "
                        "128000 unigram, 8192 on the embedded corpus; a small corpus gives fewer)")
    p.add_argument("--model", default=None, help="electra-tiny | electra-small | electra-base | electra-large | "
                   "deberta-v3-xsmall | -small | -base | -large | CONFIG.json (default: electra-tiny on the embedded "
                   "corpus, else electra-small)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per process per micro-batch "
                   "(default 32; 16 on the embedded corpus)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 10000; 600 on the embedded corpus)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: electra-tiny 1e-3; electra-small, deberta-v3-xsmall / small "
                   "5e-4; other presets 2e-4; a CONFIG.json or --init-from model by its hidden size: <= 128 1e-3, "
                   "<= 256 5e-4, else 2e-4)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps / 10, at most 10000)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0.01)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 where the device multiplies it natively (GPUs, CPUs with AVX512-BF16 / AMX), "
                        "else fp32; a resumed run keeps its precision")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: not; a resumed run keeps the run's choice)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--out", default="runs/electra-fast", help="output directory (checkpoints, metrics, cache)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default 1000; always at "
                   "the end; a resumed run's own unless given)")
    p.add_argument("--keep", type=int, default=None, help="checkpoints kept (default 3; a resumed run's own)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--allow-nonempty-out", action="store_true", help="use an --out holding other files (never touched)")
    p.add_argument("--log-every", type=int, default=None, help="log every N steps (default 10; a resumed run's own)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N", help="every N steps, evaluate on a fixed "
                   "held-out slice of the corpus (never trained on): AUC, F1, generator vs unigram-baseline accuracy")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="also write TensorBoard event files to OUT/tensorboard (needs the tensorboard package; a "
                   "resumed run's own unless given)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip lines that are not UTF-8 / not valid JSONL")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's; 1 is "
                   "fastest for tiny models on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    recipe.add_arguments(p)
    e = sub.add_parser("export", help="write transformers-format generator/ and discriminator/ (with tokenizer)")
    e.add_argument("checkpoint", help="a checkpoint directory, or a run's --out (its newest complete checkpoint)")
    e.add_argument("out_dir")
    e.add_argument("--debug", action="store_true", help="show tracebacks")
    c = sub.add_parser("plot", help="overlay the training curves of runs (losses, AUC / F1, generator accuracy, "
                                    "tokens/s) in one picture")
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a pretraining run's --out (its metrics.jsonl)")
    c.add_argument("--out", default="curves.png", help="the picture to write (.png, .pdf or .svg)")
    c.add_argument("--force", action="store_true", help="replace --out when it already exists")
    c.add_argument("--debug", action="store_true", help="show tracebacks")


# every option that names a file or folder, of every command (pretrain, export, plot, finetune, bench)
PATH_OPTIONS = ("data", "tokenizer", "model", "init_from", "out", "checkpoint", "out_dir", "run_dirs", "train",
                "validation", "test", "compare")


def expand_user(args) -> None:
    """A leading ``~`` in every path option of ``args`` is the home folder, as a shell would have made it: a quoted
    one (a launcher's argument list, a YAML config) became a folder named "~" in the working directory, and the
    printed hints then pointed at the home folder. transformers' TrainingArguments expands its paths so too."""
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])


def run(args) -> int:
    """Run a parsed ``pretrain`` / ``export`` / ``plot`` command; bad input -> one line on stderr, exit status 2."""
    return guard(args, lambda: _run(args))


def _run(args) -> int:
    if args.command == "export":
        from .export import export
        path = export(args.checkpoint, args.out_dir, warn=say)
        show(f"exported {args.checkpoint} -> {path}/generator, {path}/discriminator")
        return 0
    if args.command == "plot":
        from .plot import plot_runs
        show(f"wrote {plot_runs(args.run_dirs, args.out, force=args.force)}")
        return 0
    from .trainer import pretrain
    summary = pretrain(args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size, model=args.model,
                       seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       steps=args.steps, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                       precision=args.precision, compile=args.compile, seed=args.seed, out=args.out,
                       save_every=args.save_every, keep=args.keep, resume=args.resume,
                       log_every=args.log_every, skip_bad_lines=args.skip_bad_lines, device=args.device,
                       threads=args.threads, eval_every=args.eval_every, tensorboard=args.tensorboard,
                       allow_nonempty_out=args.allow_nonempty_out,
                       recipe=recipe.from_args(args), override=args.override, init_from=args.init_from,
                       progress=not args.no_progress)
    return 130 if summary.get("interrupted") else 0


OOM_ADVICE = {"pretrain": "lower --batch-size or --seq-len (--grad-accum keeps the batch), or use a smaller --model",
              "finetune": "lower --batch-size / --eval-batch-size or --max-len"}


def guard(args, command) -> int:
    """Run ``command()`` (a parsed sub-command); bad input -> one line on stderr, exit status 2; Ctrl-C -> 130.

    Under torchrun every process runs the command: another rank than 0 names itself, and says in one line what
    stopped it (a rank left at a collective when rank 0 stopped on bad input got the peer's closed connection, as
    a traceback; --debug shows it)."""
    from .distributed import torchrun_ranks
    from .errors import PretrainError
    try:
        rank = torchrun_ranks()[0]
    except PretrainError:  # said by the command itself, as rank 0 would
        rank = 0
    who = "" if rank == 0 else f"rank {rank}: "
    try:
        return command()
    except KeyboardInterrupt as exc:  # Ctrl-C outside the training loop, or a second one inside it
        if args.debug:
            raise
        say(f"electra-fast {args.command}: {who}{str(exc) or 'interrupted'}")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, (PretrainError, OSError)):
            say(f"electra-fast {args.command}: {who}error: {exc}")
            return 2
        if out_of_memory(exc):  # sizes the machine cannot hold: the user's to lower, not a bug's traceback
            lower = OOM_ADVICE.get(args.command, "use smaller inputs")
            say(f"electra-fast {args.command}: {who}error: out of memory ({reason(exc)}): {lower}")
            return 2
        if rank == 0:
            raise
        say(f"electra-fast {args.command}: {who}stopped by {type(exc).__name__}: {reason(exc)} (rank 0's message "
            "says why)")
        return 1
