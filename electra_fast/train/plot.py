"""Training curves: a run's ``curves.png`` and ``electra-fast plot RUN_DIR [RUN_DIR ...]`` (runs overlaid).

Four panels against the optimizer step, read from each run's ``metrics.jsonl``: the losses (with the RTD prior,
the loss of knowing only the replaced fraction), the discriminator's AUC and F1, the generator's MLM accuracy
(held out, with the unigram baseline, when the run had ``--eval-every``) and tokens/s. Solid lines are training
steps, dashed ones held-out numbers, dotted ones references (prior, baseline); markers tell a panel's metrics
apart, colours the runs. Drawn with matplotlib's Agg canvas
(no display, no global backend switch) and written atomically (a temporary renamed over the name).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

from .._files import write_atomic
from .errors import PretrainError

# (title, [(record key, legend label, line style)])
PANELS = (
    ("losses", [("mlm_loss", "MLM", "-"), ("rtd_loss", "RTD", "-"), ("prior_rtd_loss", "RTD prior", ":"),
                ("eval_mlm_loss", "MLM held out", "--"), ("eval_rtd_loss", "RTD held out", "--")]),
    ("discriminator AUC / F1", [("discriminator_auc", "AUC", "-"), ("discriminator_f1", "F1", "-"),
                                ("eval_discriminator_auc", "AUC held out", "--"),
                                ("eval_discriminator_f1", "F1 held out", "--")]),
    ("generator accuracy", [("generator_accuracy", "MLM accuracy", "-"),
                            ("eval_generator_accuracy", "held out", "--"),
                            ("eval_unigram_accuracy", "unigram baseline", ":"),
                            ("eval_generator_mask_accuracy", "held out, [MASK] only", "-."),
                            ("eval_unigram_mask_accuracy", "unigram, [MASK] only", ":")]),
    ("tokens/s", [("tokens_per_s", "tokens/s", "-")]),
)
IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
MARKERS = "os^vD"  # the metrics of a panel (colours are the runs)


def read_metrics(run_dir: str) -> List[dict]:
    """The records of ``run_dir``/metrics.jsonl; PretrainError naming the run for a missing directory or file,
    or a line that is not a JSON object with an integer ``step``."""
    if not os.path.isdir(run_dir):
        raise PretrainError(f"RUN_DIR {run_dir}: no such directory")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PretrainError(f"RUN_DIR {run_dir}: no metrics.jsonl (not a pretraining run, or no step logged yet)")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    torn = len(lines) > 1 and lines[-1].strip() != ""  # no newline after it: a write cut off by a kill or a full disk
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or isinstance(rec.get("step"), bool) or not isinstance(rec["step"], int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            if torn and n == len(lines):  # as a resume does (rundir.truncate_metrics): the torn record is dropped
                continue
            raise PretrainError(f"{path} line {n}: not a JSON object with an integer 'step'") from None
        records.append(rec)
    if not records:
        raise PretrainError(f"{path}: no records")
    return records


def run_label(path: str) -> str:
    """``path`` as a legend shows it: a name that is not UTF-8 (a str holds its bytes as surrogates, which matplotlib
    cannot draw: a TypeError after every run was read) with those bytes escaped, as the commands' messages show it."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _series(records: Sequence[dict], key: str):
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
           and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def figure(runs: Dict[str, Sequence[dict]]):
    """A matplotlib Figure of ``PANELS`` (one axes each, titled by the panel), every run in its own colour;
    ``runs``: label -> records. ImportError when matplotlib is missing."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, lines) in zip(axes, PANELS):
        for colour, (label, records) in zip(colours, runs.items()):
            for marker, (key, name, style) in zip(MARKERS, lines):
                x, y = _series(records, key)
                if x:
                    ax.plot(x, y, style, color=colour, marker=marker, markersize=3,
                            label=name if len(runs) == 1 else f"{label}: {name}")
        if title == "losses" and all(y > 0 for line in ax.lines for y in line.get_ydata()) and ax.lines:
            ax.set_yscale("log")  # the MLM loss (~ln V at the start) and the RTD loss (< 0.7) on one axis
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    return fig


def save(fig, path: str) -> None:
    """Write ``fig`` to ``path`` through a temporary in the same folder (a reader never sees half an image)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    ext = os.path.splitext(path)[1]
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=ext[1:] or "png", dpi=100))


def write_run_curves(run_dir: str, warn) -> str:
    """``run_dir``/curves.png from its metrics.jsonl; without matplotlib (or on a write error) a one-line
    ``warn`` and no picture, never a failure: the run itself is done. Returns the path, or "" when not written."""
    path = os.path.join(run_dir, "curves.png")
    try:
        fig = figure({run_label(os.path.basename(os.path.normpath(run_dir))): read_metrics(run_dir)})
        save(fig, path)
    except ImportError:
        warn("warning: curves.png not written: matplotlib is not installed (pip install matplotlib)")
        return ""
    except (OSError, PretrainError) as e:
        warn(f"warning: curves.png not written: {e}")
        return ""
    return path


def plot_runs(run_dirs: Sequence[str], out: str, force: bool = False) -> str:
    """``electra-fast plot``: the runs overlaid in ``out`` (.png / .pdf / .svg), never over an existing file
    unless ``force``. PretrainError (one line) for any bad argument, before anything is written."""
    if not out.lower().endswith(IMAGE_SUFFIXES):
        raise PretrainError(f"--out: expected a file name ending in {', '.join(IMAGE_SUFFIXES)}, got {out!r}")
    if os.path.isdir(out):
        raise PretrainError(f"--out: {out} is a directory")
    if os.path.lexists(out) and not force:
        raise PretrainError(f"--out: {out} already exists; choose another --out or pass --force to replace it")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise PretrainError(f"--out: no such directory: {folder}")
    if len({os.path.realpath(d) for d in run_dirs}) < len(run_dirs):
        raise PretrainError("RUN_DIR: the same run is named twice")
    labels = [run_label(os.path.basename(os.path.normpath(d))) for d in run_dirs]
    runs = {(label if labels.count(label) == 1 else run_label(d)): read_metrics(d)
            for label, d in zip(labels, run_dirs)}
    try:
        fig = figure(runs)
    except ImportError:
        raise PretrainError("matplotlib is not installed (pip install matplotlib)") from None
    save(fig, out)
    return out
