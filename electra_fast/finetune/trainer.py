"""``electra-fast finetune``: fine-tune a pretrained discriminator on a downstream task and evaluate it.

The recipe is ELECTRA's (google-research/electra ``configure_finetuning.py``): AdamW (weight decay 0.01, none on
biases and LayerNorm), linear warm-up over the first 10 % of the steps then linear decay to 0, layer-wise
learning-rate decay (0.8 for small / base models, 0.9 for large), gradients clipped to norm 1.0. Batches are
length-bucketed (no compute spent on more padding than the longest row of a batch needs), the model runs on
electra_fast's fused modules, under bf16 autocast where the CPU multiplies bf16 natively (``--precision auto``);
evaluation runs in large no_grad batches after every epoch.

Outputs in ``out`` (which must be new or empty: nothing there is ever overwritten; one job at a time holds the
folder's lock)::

    seed-N/metrics.jsonl        one line per epoch: train loss, validation metrics
    seed-N/best.safetensors     the weights of the epoch with the best validation score
    seed-N/predictions-test.tsv the test set's predictions by that model (with --test)
    summary.json                per seed best scores, their median and spread (with a labelled --test file, the
                                same for each seed's best model on it: test_median / test_spread); which seed
                                was exported
    curves.png                  validation score and train loss per epoch, every seed
    export/                     the best seed's model as a transformers *ForSequenceClassification /
                                *ForTokenClassification directory with its tokenizer and label names
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import _cpu
from .._console import progress_bar, say as console_say
from .._files import (InUse, hold_lock, load_safetensors, remove_entry, temporary, unused, write_as, write_atomic,
                      write_json, write_text, writing)
from .._validate import path as path_arg
from ..train import plot
from ..train.checkpoint import inside_checkpoint
from ..train.errors import PretrainError
from ..train.distributed import check_device
from ..train.optim import layer_decay, linear_schedule, param_groups
from ..train.temporaries import pid_alive, remove_dead_temporaries
from ..train.tokenizer import embedding_rows, load_tokenizer, special_ids, with_special_tokens
from ..train.options import check_forced_backend, emulated_bf16_warning, job_scope, positive, python_int, real
from . import data as fdata
from . import metrics as fmetrics
from . import model as fmodel
from .errors import FinetuneError
from .sift import SiFT


@dataclass
class Batch:
    ids: torch.Tensor       # int64 [B, T]
    mask: torch.Tensor      # int64 [B, T], 1 = real token
    types: torch.Tensor     # int64 [B, T]
    labels: torch.Tensor    # int64 [B] | fp32 [B] | int64 [B, T] (IGNORE on padding / non-first sub-tokens)
    rows: List[int]         # example indices


def _collate(feats: fdata.Features, rows: Sequence[int], pad: int, task: str) -> Batch:
    width = max(len(feats.ids[i]) for i in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    types = torch.zeros((len(rows), width), dtype=torch.int64)
    if task == "token-classification":
        labels = torch.full((len(rows), width), fdata.IGNORE, dtype=torch.int64)
    for r, i in enumerate(rows):
        n = len(feats.ids[i])
        ids[r, :n] = torch.tensor(feats.ids[i])
        types[r, :n] = torch.tensor(feats.types[i])
        mask[r, :n] = 1
        if task == "token-classification" and feats.labels[i] is not None:
            labels[r, :n] = torch.tensor(feats.labels[i])
    if task != "token-classification":
        known = [feats.labels[i] if feats.labels[i] is not None else 0 for i in rows]
        labels = torch.tensor(known, dtype=torch.float32 if task == "regression" else torch.int64)
    return Batch(ids, mask, types, labels, list(rows))


def train_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> List[np.ndarray]:
    """Length-bucketed batches: shuffle, sort within pools of 50 batches by length, cut, shuffle the batches
    (each batch then pads only to its own longest row, and the order stays random)."""
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    out = []
    for s in range(0, len(order), pool):
        chunk = order[s:s + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [out[i] for i in rng.permutation(len(out))]


def _loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    logits = logits.float()
    if task == "regression":
        return F.mse_loss(logits, labels)
    if task == "token-classification":  # the mean over labelled words; 0 for a batch without one (not 0 / 0)
        flat = labels.reshape(-1)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=fdata.IGNORE,
                                reduction="sum")
        return total / (flat != fdata.IGNORE).sum().clamp(min=1)
    return F.cross_entropy(logits, labels)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def predict(model: fmodel.FinetuneModel, feats: fdata.Features, pad: int, batch_size: int, device: torch.device,
            precision: str) -> List[Any]:
    """One prediction per example: a class index, a float, or one tag index per word, at the word's place (words
    cut off by the maximum length, and words with no token such as a zero-width space, get class 0, "O" for BIO
    tag sets)."""
    model.eval()
    order = np.argsort(feats.lengths(), kind="stable")  # similar lengths together: little padding
    out: List[Any] = [None] * len(feats)
    for s in range(0, len(order), batch_size):
        b = _collate(feats, order[s:s + batch_size].tolist(), pad, model.task)
        with _autocast(device, precision):
            logits = model(b.ids.to(device), b.mask.to(device), b.types.to(device)).float().cpu()
        if not bool(torch.isfinite(logits).all()):  # argmax reads NaN as the largest; a rank as any number
            raise FinetuneError("the model's outputs are not finite (NaN or inf) on some examples: its weights "
                                "overflowed (lower --lr) or --model holds non-finite weights")
        for r, i in enumerate(b.rows):
            if model.task == "regression":
                out[i] = float(logits[r])
            elif model.task == "classification":
                out[i] = int(logits[r].argmax())
            else:
                tags, seen = [0] * feats.n_words[i], set()
                for t, w in enumerate(feats.word_ids[i]):
                    if w is not None and w not in seen:  # a word's first token speaks for it
                        seen.add(w)
                        tags[w] = int(logits[r, t].argmax())
                out[i] = tags
    return out


def score(task: str, pred: List[Any], examples: List[fdata.Example], names: List[str]) -> Dict[str, float]:
    if task == "regression":
        return fmetrics.regression_scores(pred, [e.label for e in examples])
    if task == "classification":
        index = {n: i for i, n in enumerate(names)}
        return fmetrics.classification_scores(pred, [index[e.label] for e in examples], len(names))
    tags = [[names[t] for t in p] for p in pred]
    return fmetrics.token_scores(tags, [e.label for e in examples])


def _replace_dir(path: str, write: Callable[[str], None], say: Callable[[str], None]) -> None:
    """Write a directory beside ``path``, then swap it in (a resumed run replaces its own earlier export). What
    the earlier directory holds that the new one does not write (a model card the user put there) moves into
    the new one; should that fail, the earlier directory stays on disk beside it, named in the error. A
    symbolic link there is replaced, its target left as it is (nothing is moved out of a folder it points to)."""
    _recover_dead_olds(path)
    tmp, old = temporary(path), unused(f"{path}.old-{os.getpid()}")  # an earlier job's with this PID: not ours
    link = os.readlink(path) if os.path.islink(path) else None
    if os.path.lexists(tmp):  # a dead job's that had this PID (ours is the only live one)
        shutil.rmtree(tmp)
    try:
        write_as(path, tmp, write)  # a full disk names export/FILE, not the temporary
        if os.path.isdir(path) or link is not None:
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(old) and not os.path.lexists(path):
            os.replace(old, path)  # the earlier export back where it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if link is not None:
        os.unlink(old)
        say(f"note: {path} was a symbolic link to {link}; the export is written in its place, the link's target is "
            "left as it is")
    elif os.path.isdir(old):
        _move_missing(old, path)
        shutil.rmtree(old)  # what is left there, this job's export wrote again


def _move_missing(old: str, path: str) -> None:
    """Move what the earlier export ``old`` holds and ``path`` does not (a user's model card) into ``path``; on
    failure ``old`` stays, named in the error."""
    name = ""
    try:
        for name in os.listdir(old):
            if not os.path.lexists(os.path.join(path, name)):
                os.replace(os.path.join(old, name), os.path.join(path, name))
    except OSError as e:
        raise FinetuneError(f"--out: could not move {name!r} from the earlier export {old} into {path} ({e}); "
                            f"{old} is left as it is") from None


def _recover_dead_olds(path: str) -> None:
    """A job killed while swapping its export in left the earlier one as ``path.old-PID``, with the files a user
    added (a model card), which the next swap lost track of: it goes back in place, or its extra files into
    ``path``."""
    folder, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.old-(\d+)(?:-\d+)?")
    for name in sorted(os.listdir(folder or ".")):
        m = pattern.fullmatch(name)
        dead = os.path.join(folder, name)
        # this process's own PID too: one job per --out, and in a container every start has the same PID
        pid = int(m.group(1)) if m else 0
        if m is None or (pid != os.getpid() and pid_alive(pid)) or os.path.islink(dead) or not os.path.isdir(dead):
            continue
        if not os.path.lexists(path):
            os.replace(dead, path)  # killed between the two renames: the earlier export, back where it was
        elif os.path.isdir(path) and not os.path.islink(path):
            _move_missing(dead, path)  # what stays there (names the export holds too) is left, never deleted
            if not os.listdir(dead):
                os.rmdir(dead)


RUN_FILE = "finetune.json"  # the options of the run in --out: what --resume must match
# what a killed job leaves: its atomic writes' temporaries in --out and seed-N/ (an export's earlier copy, .old-PID,
# may hold a user's files: never removed)
TEMPORARY = re.compile(r"^(?:finetune\.json|summary\.json|curves\.png|export|metrics\.jsonl|last-epoch\.pt|"
                       r"best\.safetensors|predictions-test\.tsv)\.tmp-(\d+)$")


def _check_tables(tok, cfg, model: str, pairs: bool) -> None:
    """The tokenizer's ids must index the model's tables (an IndexError at the first step, after --out was
    written, otherwise): its vocabulary, and with ``pairs`` the token type of a pair's second sentence (1 for
    BERT-style tokenizers; DeBERTa without token types ignores them)."""
    if embedding_rows(tok) > cfg.vocab_size:
        raise FinetuneError(f"--model: {model}'s tokenizer gives ids up to {embedding_rows(tok) - 1}, more than its "
                            f"embeddings hold ({cfg.vocab_size} rows)")
    if not pairs or (cfg.disentangled and cfg.type_vocab_size == 0):
        return
    types = max(tok.encode("a", "b").type_ids, default=0)
    rows = max(cfg.type_vocab_size, 1)  # ELECTRA's embeddings keep one row at 0
    if types >= rows:
        raise FinetuneError(f"--model: {model} has {rows} token type(s), but its tokenizer gives a pair's second "
                            f"sentence type {types}; fine-tune single sentences, or a model with token types")


def _contents(ds: fdata.Dataset) -> str:
    """A fingerprint of the examples read (texts, pairs, labels, in order)."""
    rows = [[e.text, e.pair, e.label] for e in ds.examples]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def _token_ids(feats: Dict[str, fdata.Features]) -> str:
    """A fingerprint of the token ids and types each split was read into."""
    h = hashlib.sha256()
    for name in sorted(feats):
        h.update(json.dumps([name, feats[name].ids, feats[name].types]).encode())
    return h.hexdigest()[:16]


def _weights(state: Dict[str, torch.Tensor]) -> str:
    """A fingerprint of the encoder's weights (names, dtypes, shapes, bytes): a run directory's newest checkpoint
    changes while its pretraining goes on, and a resume must not fine-tune the later seeds from other weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()[:16]


def _labels_before_2026_12_07(names: List[str]) -> List[str]:
    """fdata.label_names' class order before "+1" read as an integer (strings sort "+1" before "-1")."""
    if all(re.fullmatch(r"-?[0-9]+", v) for v in names):
        return sorted(names, key=lambda v: (int(v), v))
    return sorted(names)


def _claim_out(out: str, record: dict, resume: bool) -> "int | None":
    """Check that ``out`` may take this run (new or empty; with ``resume``, the same run's) and hold its lock (the
    descriptor, None without flock: the caller closes it when the job ends)."""
    inside = inside_checkpoint(out)
    if inside:  # its retention would keep that checkpoint whole, for good, for this run's files
        raise FinetuneError(f"--out: {inside}")
    if not resume:
        lock = _prepare_out(out)
    else:  # a folder that is none: its finetune.json cannot be read, said below
        lock = _lock_out(out) if os.path.isdir(out) else None
    try:
        if resume:
            _check_resume(out, record, locked=lock is not None)
        else:
            write_json(os.path.join(out, RUN_FILE), record)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    return lock


def _lock_out(out: str) -> "int | None":
    """This job's lock on the folder ``out`` (two jobs there would overwrite each other's epochs and exports)."""
    try:
        return hold_lock(out)
    except InUse:
        raise FinetuneError(f"--out: {out} is in use by another electra-fast finetune job; wait for it to end or "
                            "choose another --out") from None
    except OSError as e:
        raise FinetuneError(f"--out: cannot open {out}: {e.strerror}") from None


def _check_resume(out: str, record: dict, locked: bool) -> None:
    try:
        with open(os.path.join(out, RUN_FILE), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise FinetuneError(f"--resume: {out} holds no fine-tuning run ({RUN_FILE} missing or unreadable)") from None
    # a key the saved record lacks came with a later version: nothing to compare it with, but the class order (a
    # class's id), which the version before the record ordered otherwise for "+1" / "-1"
    if "labels" not in saved and record["task"] == "classification" and _labels_before_2026_12_07(
            record["labels"]) != record["labels"]:
        raise FinetuneError(f"--resume: the run in {out} was started by an electra_fast that numbered its classes "
                            f"{_labels_before_2026_12_07(record['labels'])}, not {record['labels']}; choose a new "
                            "--out")
    changed = [f"--{k[:-len(' contents')]}: its examples differ (the file, or how electra_fast reads it)"
               if k.endswith(" contents")
               else "--model: its weights differ (a newer checkpoint of the run?)" if k == "model weights"
               else "--model: its tokenizer reads the examples into other token ids (its tokenizer file, or "
                    "electra_fast's reading of it, changed)" if k == "token ids"
               else f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in record.items() if k in saved and saved[k] != v]
    if changed:
        raise FinetuneError(f"--resume: the run in {out} was started with other options ({'; '.join(changed)}); "
                            "resume with the same ones or choose a new --out")
    if not os.access(out, os.W_OK | os.X_OK):
        raise FinetuneError(f"--out: {out} is not writable")
    # holding the folder's lock, and having written nothing yet, every temporary there is a dead job's whatever its
    # PID (in a container every start has the same one); without a lock (no flock there), only a dead PID's
    for d in [out] + [os.path.join(out, n) for n in os.listdir(out) if re.fullmatch(r"seed-\d+", n)]:
        remove_dead_temporaries(d, TEMPORARY, locked)  # a full model and optimizer each, kept for good otherwise


def _prepare_out(out: str) -> "int | None":
    """``out`` created if missing, locked (:func:`_lock_out`), and checked empty; the lock's descriptor."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FinetuneError(f"--out: {out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise FinetuneError(f"--out: cannot create {out}: {e.strerror}") from None
    lock = _lock_out(out)  # before the emptiness check: a job starting beside this one sees it in use
    try:
        # a job killed writing its first file left only its temporary: neither a run to resume nor "not empty"
        remove_dead_temporaries(out, TEMPORARY, locked=lock is not None)
        if os.listdir(out):
            raise FinetuneError(f"--out: {out} is not empty; choose a new or empty directory (nothing there is "
                                "overwritten)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise FinetuneError(f"--out: {out} is not writable")
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    return lock


def _check_options(o: dict) -> None:
    """FinetuneError naming the first bad option (the shared checks of train.options raise their base class, which
    ``except FinetuneError`` would not catch)."""
    try:
        _check_option_values(o)
    except FinetuneError:
        raise
    except PretrainError as e:
        raise FinetuneError(str(e)) from None


def _check_option_values(o: dict) -> None:
    for name in ("epochs", "batch_size", "eval_batch_size", "max_len"):
        if o[name] is not None or name != "max_len":
            positive(name.replace("_", "-"), o[name], 3 if name == "max_len" else 1)
    real("lr", o["lr"], 0.0, inclusive=False)
    real("weight-decay", o["weight_decay"], 0.0, inclusive=True)
    real("layer-decay", o["layer_decay"], 0.0, inclusive=False)
    if o["layer_decay"] > 1:
        raise FinetuneError(f"--layer-decay: expected a number in (0, 1], got {o['layer_decay']!r}")
    real("warmup", o["warmup"], 0.0, inclusive=True)
    real("sift", o["sift"], 0.0, inclusive=True)
    if o["warmup"] >= 1:
        raise FinetuneError(f"--warmup: expected the warm-up fraction of the steps in [0, 1), got {o['warmup']!r}")
    if o["task"] not in fdata.TASKS:
        raise FinetuneError(f"--task: expected one of {', '.join(fdata.TASKS)}, got {o['task']!r}")
    if o["precision"] not in ("auto", "fp32", "bf16"):
        raise FinetuneError(f"--precision: expected auto, fp32 or bf16, got {o['precision']!r}")
    if o["threads"] is not None:
        positive("threads", o["threads"], 1)
    seeds = o["seeds"]
    for s in seeds:
        python_int("seeds", s)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 63 for s in seeds):
        raise FinetuneError(f"--seeds: expected one or more ints in [0, 2**63), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise FinetuneError(f"--seeds: each seed once, got {seeds!r}")


def finetune(model: str, train: str, validation: str, *, out: str, test: Optional[str] = None,
             task: str = "classification", text_column: Optional[str] = None, pair_column: Optional[str] = None,
             label_column: str = "label", tokens_column: Optional[str] = None, tags_column: Optional[str] = None,
             max_len: Optional[int] = None, epochs: int = 3, batch_size: int = 32, eval_batch_size: int = 128,
             lr: float = 1e-4, layer_decay: float = 0.8, warmup: float = 0.1, weight_decay: float = 0.01,
             seeds: Sequence[int] = (1,), sift: float = 0.0, precision: str = "auto", device: Optional[str] = None,
             threads: Optional[int] = None, skip_bad_lines: bool = False, from_scratch: bool = False,
             resume: bool = False, progress: bool = True, say: Callable[[str], None] = console_say) -> dict:
    """Fine-tune ``model`` (a checkpoint / run / export / transformers directory) on ``train``, pick each seed's
    best epoch on ``validation``, predict ``test``; returns the summary (also written to ``out/summary.json``).
    ``from_scratch``: the same architecture and tokenizer, randomly initialised (the no-pretraining baseline).
    ``sift``: weight of DeBERTa's SiFT adversarial loss (:mod:`.sift`; 0 = off).
    ``resume``: continue the run in ``out`` (same options) from each seed's last evaluated epoch; the result equals
    an uninterrupted run's. Bad input raises :class:`FinetuneError` with a one-line message before anything is
    written.

    The other options are the command line's (``electra-fast finetune --help``; README "Fine-tuning"): ``test``
    (labels optional: predictions, and scores when every row has one), ``task`` (classification, regression,
    token-classification), the column names (``text_column``, ``pair_column``, ``label_column``, ``tokens_column``,
    ``tags_column``: names or 0-based indices; None takes GLUE's defaults), ``max_len`` (tokens per example,
    default min(128, the model's positions)), ``epochs``, ``batch_size``, ``eval_batch_size``, ``lr``,
    ``layer_decay``, ``warmup`` (a fraction of the steps), ``weight_decay``, ``seeds`` (each a full run; the summary
    holds their median and range), ``precision`` (auto / fp32 / bf16), ``device``, ``threads`` (torch's count for
    this call only), ``skip_bad_lines``, ``progress`` (a progress bar), ``say`` (where messages go)."""
    model, train, validation, out = (path_arg(n, v) for n, v in (("model", model), ("train", train),
                                                                  ("validation", validation), ("out", out)))
    test = None if test is None else path_arg("test", test)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise FinetuneError(f"--seeds: expected a sequence of ints, got {type(seeds).__name__}")
    seeds = list(seeds)
    _check_options(dict(locals()))
    dev = check_device(device) if device is not None else torch.device("cpu")
    cfg, state, tok_path = fmodel.load_encoder(model)
    try:
        tok = with_special_tokens(load_tokenizer(tok_path))
    except PretrainError as e:
        raise fmodel.tokenizer_error(e) from None
    pad = special_ids(tok)["pad"]
    max_len = min(128, cfg.max_position_embeddings) if max_len is None else max_len
    if max_len > cfg.max_position_embeddings:
        raise FinetuneError(f"--max-len: {max_len} exceeds the model's max_position_embeddings "
                            f"({cfg.max_position_embeddings})")
    columns = fdata.Columns(text_column, pair_column, label_column, tokens_column, tags_column)
    tr = fdata.read(train, task, columns, "--train", skip_bad_lines=skip_bad_lines)
    pairs = any(e.pair is not None for e in tr.examples)
    _check_tables(tok, cfg, model, pairs=pairs)
    specials = tok.post_processor.num_special_tokens_to_add(pairs) if tok.post_processor is not None else 0
    if max_len <= specials:  # the tokenizer then leaves rows uncut, longer than the model's positions
        raise FinetuneError(f"--max-len: {max_len} leaves no room for text: the model's tokenizer adds {specials} "
                            f"special tokens to {'a sentence pair' if pairs else 'a sentence'}; expected >= "
                            f"{specials + 1}")
    va = fdata.read(validation, task, columns, "--validation", skip_bad_lines=skip_bad_lines, names=tr.names)
    te = fdata.read(test, task, columns, "--test", labelled=False, skip_bad_lines=skip_bad_lines,
                    names=tr.names) if test else None
    names = fdata.label_names(tr, task)
    if task != "regression" and len(names) < 2:
        raise FinetuneError(f"--train: {tr.path} has a single label ({names[0]!r}); a classifier needs two or more")
    fdata.check_labels(va, names, task, "--validation")
    if te is not None:
        fdata.check_labels(te, names, task, "--test")
    if precision == "auto":
        precision = _cpu.default_precision(dev)[0]
    elif precision == "bf16" and dev.type == "cpu":
        native, why = _cpu.native_bf16()
        if not native:  # as pretrain says it
            say(emulated_bf16_warning(why))
    check_forced_backend(dev, precision, FinetuneError)  # pretrain's check: one line, not a traceback
    with torch.random.fork_rng(devices=[]):  # the weights fit the architecture: checked before --out is written
        fmodel.build(cfg, None if from_scratch else state, task, len(names), model)
    feats = {k: fdata.featurize(d, tok, task, names, max_len) for k, d in (("train", tr), ("validation", va),
                                                                           ("test", te)) if d is not None}
    record = {"model": os.path.abspath(model), "model weights": _weights(state), "train": os.path.abspath(train),
              "validation": os.path.abspath(validation), "test": test and os.path.abspath(test), "task": task,
              "columns": vars(columns), "max_len": max_len, "epochs": epochs, "batch_size": batch_size,
              "eval_batch_size": eval_batch_size, "lr": lr, "layer_decay": layer_decay, "warmup": warmup,
              "weight_decay": weight_decay, "sift": sift, "seeds": seeds, "precision": precision,
              "from_scratch": from_scratch, "skip_bad_lines": skip_bad_lines,
              # what the files held: a resume over an edited file went on with another schedule and data
              **{f"{k} contents": _contents(d) for k, d in (("train", tr), ("validation", va), ("test", te))
                 if d is not None},
              # what the model reads of them: its tokenizer file, or electra_fast's reading of it, may change
              "token ids": _token_ids(feats), "labels": names}
    made = not os.path.lexists(out)
    lock = _claim_out(out, record, resume)  # every check above ran before anything is written
    try:
        for k, d in (("train", tr), ("validation", va), ("test", te)):
            if d is not None and d.skipped:
                say(f"warning: --{k}: skipped {d.skipped} bad line(s) (--skip-bad-lines)")
            if d is not None and d.blank:  # in a one-column file a blank line may have been meant as an empty text
                say(f"note: --{k}: {d.blank} blank line(s) between rows read as no row (as pandas reads them; "
                    "predictions' index counts the rows without them)")
            if d is not None and feats[k].truncated:
                say(f"note: --{k}: {feats[k].truncated} example(s) cut to --max-len {max_len}")
        metric = fmetrics.selection_metric(task, names)
        say(f"fine-tuning {'a randomly initialised copy of ' if from_scratch else ''}{model} for {task} "
            f"({len(names) or 'real-valued'} labels) on {len(tr.examples)} examples, {epochs} epoch(s), batch "
            f"{batch_size}, lr {lr:g} (layer decay {layer_decay:g}), {precision}, seeds {seeds}; best epoch by "
            f"validation {metric}")

        runs, interrupted = [], False
        hp = dict(epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size, lr=lr,
                  layer_decay=layer_decay, warmup=warmup, weight_decay=weight_decay, sift=sift)
        with job_scope(threads, dev):
            for seed in seeds:
                try:
                    runs.append(_one_seed(seed, cfg, None if from_scratch else state, task, names, feats, va, te, pad,
                                          hp, dev, precision, os.path.join(out, f"seed-{seed}"), metric, progress,
                                          say, model))
                    interrupted = runs[-1]["interrupted"]
                except KeyboardInterrupt:
                    interrupted = True
                if interrupted:
                    say(f"interrupted during seed {seed}: keeping the epochs evaluated so far; no further seed runs")
                    break
            return _finish(out, runs, seeds, task, names, metric, cfg, tok, interrupted, say)
    except BaseException:
        if not resume:
            _take_back(out, seeds, made)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _take_back(out: str, seeds: Sequence[int], made: bool) -> None:
    """A new run that failed before evaluating any epoch leaves nothing a rerun in the same --out would trip on
    (finetune.json and empty seed folders made it "not empty", and --resume kept the options that failed)."""
    folders = [os.path.join(out, f"seed-{s}") for s in seeds]
    if any(os.path.lexists(os.path.join(f, "metrics.jsonl")) for f in folders):
        return  # epochs stand: --resume continues from them
    for path in folders + [os.path.join(out, RUN_FILE)]:
        remove_entry(path)
    if made:
        try:
            os.rmdir(out)
        except OSError:
            pass


def _one_seed(seed, cfg, state, task, names, feats, va, te, pad, hp, dev, precision, out, metric, progress, say,
              source) -> dict:
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)  # --resume: the seed's directory may hold its last finished epoch
    torch.manual_seed(seed)
    net = fmodel.build(cfg, state, task, len(names), source).to(dev)
    groups = param_groups(net, hp["weight_decay"], layer_decay(cfg.num_hidden_layers, hp["layer_decay"]))
    for g in groups:
        g["lr"] = hp["lr"] * g["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=hp["lr"], betas=(0.9, 0.999), eps=1e-6,
                                  fused=dev.type in ("cpu", "cuda"))
    rng = np.random.default_rng(seed)
    lengths = feats["train"].lengths()
    per_epoch = math.ceil(len(lengths) / hp["batch_size"])
    total = per_epoch * hp["epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(int(hp["warmup"] * total), total))
    adversary = SiFT(net) if hp["sift"] > 0 else None
    best, best_epoch, history, interrupted = -math.inf, 0, [], False
    best_state = None  # (score, epoch, weights) of the best epoch so far, once its weights are on disk
    resumed = _load_epoch_state(out, net, optimizer, scheduler, rng)
    if resumed is not None:
        best, best_epoch, history = resumed
        if best_epoch > 0:
            best_state = (best, best_epoch, _load_best(out, net, best_epoch, len(history)))
        say(f"seed {seed}: resuming after epoch {len(history)}")
    bar = progress_bar(tqdm, progress, total=total, initial=len(history) * per_epoch, unit="step", desc=f"seed {seed}")
    start = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    try:
        for epoch in range(len(history) + 1, hp["epochs"] + 1):
            net.train()
            losses = []
            for rows in train_batches(lengths, hp["batch_size"], rng):
                b = _collate(feats["train"], rows.tolist(), pad, task)
                ids, mask, types, labels = b.ids.to(dev), b.mask.to(dev), b.types.to(dev), b.labels.to(dev)
                with _autocast(dev, precision):
                    logits = net(ids, mask, types)
                    loss = _loss(logits, labels, task)
                    if adversary is not None:
                        counted = labels != fdata.IGNORE if task == "token-classification" else None
                        loss = loss + hp["sift"] * adversary.loss(logits, lambda: net(ids, mask, types), task, counted)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                if not bool(torch.isfinite(loss.detach() + norm)):  # before the step: the saved epochs stay whole
                    raise FinetuneError(
                        f"seed {seed} epoch {epoch}: the training loss or its gradient is not finite "
                        f"({float(loss.detach()):g}); "
                        + (f"the epochs evaluated before stand in {out}; " if history else "") + "lower --lr"
                        + (" or scale the regression labels" if task == "regression" else ""))
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            pred = predict(net, feats["validation"], pad, hp["eval_batch_size"], dev, precision)
            scores = score(task, pred, va.examples, names)
            row = {"seed": seed, "epoch": epoch, "step": epoch * per_epoch, "train_loss": float(np.mean(losses)),
                   "validation": scores, "elapsed_s": round(time.perf_counter() - start, 3)}
            history.append(row)
            with writing(os.path.join(out, "metrics.jsonl")), \
                    open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            shown = "  ".join(f"{k} {v:.4f}" for k, v in scores.items())
            say(f"seed {seed} epoch {epoch}: train loss {row['train_loss']:.4f}  validation {shown}")
            improved = scores[metric] > best
            if improved:
                best, best_epoch = scores[metric], epoch
            # the state first: it names the best epoch and, when that is this one, holds its weights, which mend a
            # best.safetensors a kill left behind (written first, a kill before the state paired the old state's
            # score and epoch with this epoch's weights: summary, predictions and export disagreed)
            _save_epoch_state(out, net, optimizer, scheduler, rng, best, best_epoch, history)
            if improved:
                weights = _cpu_weights(net)
                _write_best(out, weights, epoch)
                # one assignment after the write: a Ctrl-C during the write kept the new score with the old
                # file (the summary reported epoch N, the predictions and export came from N - 1)
                best_state = (best, epoch, weights)
    except KeyboardInterrupt:  # Ctrl-C: the epochs evaluated so far stand; the caller runs no further seed
        interrupted = True
    finally:
        bar.close()
    if best_state is None:
        raise KeyboardInterrupt  # interrupted before the first evaluation: nothing of this seed to keep
    _, best_epoch, weights = best_state
    net.load_state_dict(weights)
    result = {"seed": seed, "best_epoch": best_epoch, "validation": history[best_epoch - 1]["validation"],
              "history": history, "dir": out, "interrupted": interrupted}
    if te is not None:
        pred = predict(net, feats["test"], pad, hp["eval_batch_size"], dev, precision)
        path = os.path.join(out, "predictions-test.tsv")

        def write(p):
            with open(p, "w", encoding="utf-8", newline="") as f:
                # csv's quoting: a label holding a tab, a line break or a quote stays one field of one row
                out = csv.writer(f, delimiter="\t", lineterminator="\n")
                out.writerow(["index", "prediction"])
                for e, y in zip(te.examples, pred):  # index: the row's place among the file's data rows
                    out.writerow([e.row, f"{y:.6g}" if task == "regression" else names[y] if task == "classification"
                                  else " ".join(names[t] for t in y)])
        write_atomic(path, write)
        result["predictions"] = path
        if all(e.label is not None for e in te.examples):  # a labelled test file is scored too; it chooses nothing
            result["test"] = score(task, pred, te.examples, names)
    result["model"] = net
    return result


EPOCH_STATE = "last-epoch.pt"  # what --resume continues from: written after each evaluated epoch


def _save_epoch_state(out, net, optimizer, scheduler, rng, best, best_epoch, history) -> None:
    dev = next(net.parameters()).device
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "batch_order": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "best": best,
             "best_epoch": best_epoch, "history": history,
             # SiFT draws its noise on the model's device: a GPU's generator is part of the run too
             "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
    write_atomic(os.path.join(out, EPOCH_STATE), lambda p: torch.save(state, p))


def _load_epoch_state(out, net, optimizer, scheduler, rng):
    """(best, best_epoch, history) of the last finished epoch in ``out`` (restoring the model, optimizer, schedule
    and both random streams, so the continued run equals an uninterrupted one), or None for a fresh seed."""
    path = os.path.join(out, EPOCH_STATE)
    metrics = os.path.join(out, "metrics.jsonl")  # a kill after a line, before the state: drop the extra lines
    if not os.path.isfile(path):
        if os.path.isfile(metrics):  # killed before the first epoch's state: that seed starts again
            write_text(metrics, "")
        return None
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        rng.bit_generator.state = st["batch_order"]
        torch.set_rng_state(st["torch_rng"])
        history, best, best_epoch = st["history"], st["best"], st["best_epoch"]
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise _unreadable(path, e) from None
    dev = next(net.parameters()).device
    if st.get("cuda_rng") is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(st["cuda_rng"], dev)
    # the log is the state's history, line for line: written again from it, a damaged file (bytes that are not
    # UTF-8, lines of an epoch killed before its state) is mended rather than read
    write_text(metrics, "".join(json.dumps(row) + "\n" for row in history))
    return best, best_epoch, history


BEST = "best.safetensors"


def _cpu_weights(net) -> Dict[str, torch.Tensor]:
    """A copy of ``net``'s weights on the CPU, apart from the training that goes on."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}


def _write_best(out: str, weights: Dict[str, torch.Tensor], epoch: int) -> None:
    from safetensors.torch import save_file
    write_atomic(os.path.join(out, BEST), lambda p: save_file(weights, p, metadata={"format": "pt",
                                                                                    "epoch": str(epoch)}))


def _load_best(out: str, net, best_epoch: int, last_epoch: int) -> dict:
    """The best epoch's weights (``best.safetensors``), which must be ``net``'s and epoch ``best_epoch``'s: a file
    emptied or replaced -> one line naming it (only the run wrote them: nothing else can rebuild them). A file left
    behind by a kill between the epoch's state and its best weights is mended from that state (``net`` holds the
    last finished epoch ``last_epoch``, which is then the best one)."""
    from safetensors import safe_open

    path = os.path.join(out, BEST)
    try:
        weights = load_safetensors(path)
        if set(weights) != set(net.state_dict()):
            raise ValueError("other weights than the model's")
        with safe_open(path, "pt") as f:  # runs before 2026-12-07 recorded no epoch: their file is trusted
            held = (f.metadata() or {}).get("epoch", str(best_epoch))
    except Exception as e:  # noqa: BLE001 - safetensors' own errors, an OSError, a foreign file
        raise _unreadable(path, e) from None
    if held == str(best_epoch):
        return weights
    if best_epoch != last_epoch:
        raise FinetuneError(f"--resume: {path} holds epoch {held}'s weights, but the seed's state names epoch "
                            f"{best_epoch} as its best; remove that seed's directory to start it again")
    weights = _cpu_weights(net)
    _write_best(out, weights, best_epoch)
    return weights


def _unreadable(path: str, e: BaseException) -> FinetuneError:
    return FinetuneError(f"--resume: {path} cannot be read ({type(e).__name__}); remove that seed's directory to "
                         "start it again")


def _finish(out, runs, seeds, task, names, metric, cfg, tok, interrupted, say) -> dict:
    summary: Dict[str, Any] = {"task": task, "labels": names, "metric": metric, "interrupted": interrupted,
                               "seeds": [{k: v for k, v in r.items() if k not in ("history", "model")}
                                         for r in runs]}
    if runs:
        keys = list(runs[0]["validation"])
        summary["median"], summary["spread"] = _median_spread(runs, "validation")
        if all("test" in r for r in runs):
            summary["test_median"], summary["test_spread"] = _median_spread(runs, "test")
        best = max(runs, key=lambda r: r["validation"][metric])
        _replace_dir(os.path.join(out, "export"), lambda d: fmodel.export(best["model"], names, tok, d), say)
        summary["exported"] = {"seed": best["seed"], "dir": os.path.join(out, "export")}
        _plot(os.path.join(out, "curves.png"), runs, metric, say)
        say(_table(runs, keys, summary))
    write_json(os.path.join(out, "summary.json"), summary)
    summary["models"] = [r["model"] for r in runs]
    return summary


def _median_spread(runs, part: str):
    """({metric: median over seeds}, {metric: [min, max]}) of each run's ``part`` scores ("validation" / "test")."""
    keys = list(runs[0][part])
    return ({k: statistics.median(r[part][k] for r in runs) for k in keys},
            {k: [min(r[part][k] for r in runs), max(r[part][k] for r in runs)] for k in keys})


def _table(runs, keys, summary) -> str:
    head = f"{'seed':>6} {'epoch':>5} " + " ".join(f"{k:>10}" for k in keys)
    rows = [f"{r['seed']:>6} {r['best_epoch']:>5} " + " ".join(f"{r['validation'][k]:>10.4f}" for k in keys)
            for r in runs]
    med = f"{'median':>6} {'':>5} " + " ".join(f"{summary['median'][k]:>10.4f}" for k in keys)
    spread = f"{'range':>6} {'':>5} " + " ".join(f"{summary['spread'][k][1] - summary['spread'][k][0]:>10.4f}"
                                                  for k in keys)
    lines = [head, *rows, med, spread] if len(runs) > 1 else [head, *rows]
    if "test_median" in summary:  # each seed's best-on-validation model on the labelled --test file
        lines.append(f"{'test':>6} {'':>5} " + " ".join(f"{summary['test_median'][k]:>10.4f}" for k in keys))
    return "\n".join(lines)


def _plot(path: str, runs, metric: str, say) -> None:
    try:  # a bare Figure, as pretrain's curves: pyplot would switch the caller's backend (a notebook's inline one)
        from matplotlib.figure import Figure
    except ImportError:
        say("note: matplotlib is not installed: no curves.png")
        return
    fig = Figure(figsize=(10, 4), layout="tight")
    a, b = fig.subplots(1, 2)
    for r in runs:
        epochs = [h["epoch"] for h in r["history"]]
        a.plot(epochs, [h["validation"][metric] for h in r["history"]], marker="o", label=f"seed {r['seed']}")
        b.plot(epochs, [h["train_loss"] for h in r["history"]], marker="o", label=f"seed {r['seed']}")
    a.set_title(f"validation {metric}")
    b.set_title("train loss")
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.legend()
    plot.save(fig, path)
