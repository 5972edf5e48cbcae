"""Benchmark reports: pytest-benchmark JSON -> bench/RESULTS.md, README.md's performance table, PNG plots, and the
regression gate.

Rows come from ``extra_info`` written by bench/conftest.py::run: op, impl ("fused" | "eager" |
"transformers" | peers), pass_, shape ("BxT" or "N=..."), dtype, tokens_per_s, peak_mem_bytes.
Ratios are computed only between rows of the same op / pass / shape / dtype from the same JSON file, i.e.
measured side by side in one run.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import re
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

from ._console import paths_printable, say
from ._files import write_atomic, write_text

Key = Tuple[str, str, str, str]  # op, pass, shape, dtype


def machine_name(device: "str | None" = None) -> str:
    """The GPU's name for a CUDA run (``device`` None: CUDA when visible), else the CPU model."""
    import platform

    import torch

    if (device is None or str(device).startswith("cuda")) and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(path: str, short: bool = True) -> Tuple[Optional[str], Optional[bool]]:
    """(the commit checked out where ``path`` lies, whether tracked files differ from it), each None where git cannot
    tell (no git, not a checkout). Untracked files do not count, as for gpu_lane's record."""
    import subprocess

    def git(*args) -> Optional[str]:
        try:
            proc = subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", *(["--short"] if short else []), "HEAD") or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return commit, None if status is None else bool(status)


def commit_label(path: str) -> Optional[str]:
    """The short commit at ``path``, "-dirty" appended when there are uncommitted changes: results measured on
    changed code must not read as the commit's own."""
    commit, dirty = git_state(path)
    return commit and commit + ("-dirty" if dirty else "")


def result_name(device: "str | None" = None) -> str:
    """``<machine>-<date>`` (machine: :func:`machine_name` of the run's device)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine_name(device)).strip("-").lower()
    return f"{slug}-{datetime.date.today().isoformat()}"


def _load(path: str) -> dict:
    """The JSON object at ``path``: ValueError unless it is an object with a list of benchmark objects and a
    ``machine_info`` object (what every reader here indexes)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not (isinstance(data, dict) and isinstance(data.get("benchmarks", []), list)
            and all(isinstance(bm, dict) for bm in data.get("benchmarks", []))
            and isinstance(data.get("machine_info") or {}, dict)):
        raise ValueError("not an object with a list of benchmark objects")
    data["machine_info"] = data.get("machine_info") or {}  # null: nothing known of the machine
    return data


def load_groups(path: str) -> Dict[Key, Dict[str, dict]]:
    """{(op, pass, shape, dtype): {impl: {"median": s, **extra_info}}} from one pytest-benchmark JSON; ValueError
    for one whose electra_fast rows lack what the reports read."""
    groups: Dict[Key, Dict[str, dict]] = {}
    for bm in _load(path).get("benchmarks", []):
        info = bm.get("extra_info") or {}
        if not isinstance(info, dict) or "op" not in info or bm.get("stats") is None:
            continue  # not an electra_fast row (another suite's, or one skipped before it ran)
        name = bm.get("name", "?")
        if not (isinstance(bm["stats"], dict) and "median" in bm["stats"]):
            raise ValueError(f"benchmark {name!r} has no stats.median")
        missing = [k for k in ("op", "pass_", "shape", "dtype", "impl") if not isinstance(info.get(k), str)]
        if missing:
            raise ValueError(f"benchmark {name!r}: extra_info lacks {', '.join(missing)}")
        for k in ("peak_mem_bytes", "tokens_per_s"):
            v = info.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf):
                raise ValueError(f"benchmark {name!r}: extra_info.{k} is {v!r}, not a non-negative number")
        key = (info["op"], info["pass_"], info["shape"], info["dtype"])
        groups.setdefault(key, {})[info["impl"]] = {"median": bm["stats"]["median"], **info}
    return groups


def run_problem(path: str) -> Optional[str]:
    """Why the JSON at ``path`` cannot be reported (unreadable, not pytest-benchmark's layout, a row without a
    positive finite median), or None."""
    try:
        return bad_median(load_groups(path))
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    except ValueError as e:  # JSONDecodeError too
        return f"not a pytest-benchmark JSON written by electra-fast bench ({e})"


def bad_median(groups) -> Optional[str]:
    """Why a row's median is no time (NaN, infinite, zero, negative, not a number), or None: a ratio from such a
    median compares False with any limit, so a gate against it would pass every regression."""
    for key, impls in sorted(groups.items()):
        for impl, row in sorted(impls.items()):
            m = row["median"]
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
                return f"the {impl} median of {' '.join(key)} is {m!r}, not a positive number of seconds"
    return None


def speedups(groups) -> Dict[Tuple[Key, str], float]:
    """{(key, other impl): other median / fused median} for every group with a fused row."""
    out = {}
    for key, impls in groups.items():
        if "fused" not in impls:
            continue
        for impl, row in impls.items():
            if impl != "fused":
                out[(key, impl)] = row["median"] / impls["fused"]["median"]
    return out


def compare(current: str, previous: str, tolerance: float = 0.15) -> List[str]:
    """Regressions: fused speed-ups that fell by more than ``tolerance`` (relative) since ``previous``."""
    return compare_rows(current, previous, tolerance)[0]


def compare_rows(current: str, previous: str, tolerance: float = 0.15) -> Tuple[List[str], int]:
    """(:func:`compare`'s regressions, how many fused-vs-baseline rows the two runs have in common: what it judged)."""
    now, before = speedups(load_groups(current)), speedups(load_groups(previous))
    shared = sorted(set(now) & set(before))
    problems = []
    for k in shared:
        if now[k] < (1 - tolerance) * before[k]:
            (op, pass_, shape, dtype), impl = k
            fell = (1 - now[k] / before[k]) * 100
            problems.append(f"{op} {pass_} {shape} {dtype}: fused vs {impl} {before[k]:.2f}x -> {now[k]:.2f}x "
                            f"(-{math.ceil(fell * 10) / 10:g}%, limit {tolerance * 100:.0f}%)")  # never shown at it
    return problems, len(shared)


def mismatch(current: str, previous: str) -> List[str]:
    """Why the two runs' ratios may not be comparable: another machine, thread count or backend."""
    a, b = (_load(p)["machine_info"] for p in (current, previous))
    notes = []
    for key, what in (("electra_fast_machine", "machine"), ("torch_threads", "thread count"),
                      ("forced_backend", "forced backend")):
        if a.get(key) != b.get(key):
            notes.append(f"--compare: another {what} ({b.get(key)!r} there, {a.get(key)!r} here)")
    return notes


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_mem(b) -> str:
    return "-" if not b else f"{b / 2**20:.1f} MiB"


def _forced_note(m: dict) -> str:
    """What a run's fused rows did not run on: a forced backend (ELECTRA_FAST_BACKEND)."""
    return f" · **fused rows on the forced {m['forced_backend']!r} backend**" if m.get("forced_backend") else ""


def table(path: str) -> str:
    data = _load(path)
    m = data.get("machine_info", {})
    groups = load_groups(path)
    lines = [
        f"### {m.get('electra_fast_machine', 'unknown machine')} ({m.get('cores', '?')} cores) — "
        f"`{os.path.basename(path)}`",
        "",
        f"{str(data.get('datetime') or '')[:19]} · torch {m.get('torch')} · triton {m.get('triton')} · "
        f"electra_fast {m.get('electra_fast')} (commit {m.get('git_commit')}) · {m.get('torch_threads')} threads · "
        f"C++ extension {'built' if m.get('extension') else 'NOT built'}" + _forced_note(m)
        + (f" · a selection (`-k {m['select']}`)" if m.get("select") else ""),
        "",
        "| op | pass | shape | dtype | impl | median | tokens/s | peak mem | fused speed-up | fused / other peak mem |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, impls in sorted(groups.items()):
        fused = impls.get("fused")
        for impl in sorted(impls, key=lambda i: (i != "fused", i)):
            row = impls[impl]
            sp = mem = ""
            if impl != "fused" and fused is not None:
                sp = f"**{row['median'] / fused['median']:.2f}x**"
                if row.get("peak_mem_bytes") and fused.get("peak_mem_bytes"):
                    mem = f"{fused['peak_mem_bytes'] / row['peak_mem_bytes']:.2f}"
            tps = row.get("tokens_per_s")
            lines.append(f"| {' | '.join(key)} | {impl} | {_fmt_time(row['median'])} | "
                         f"{'-' if tps is None else f'{tps:,.0f}'} | {_fmt_mem(row.get('peak_mem_bytes'))} | {sp} | {mem} |")
    return "\n".join(lines)


def plots(path: str, out_dir: str) -> List[str]:
    """PNG plots next to the JSON: speed-up bars per op, and tokens/s + peak memory vs sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = load_groups(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    written = []
    sp = speedups(groups)
    if sp:
        labels = [f"{k[0]} {k[1]}\n{k[2]} {k[3]} vs {impl}" for (k, impl) in sorted(sp)]
        fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(sp)), 4.5))
        ax.bar(range(len(sp)), [sp[k] for k in sorted(sp)], color="tab:blue")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(sp)), labels, rotation=75, ha="right", fontsize=7)
        ax.set_ylabel("speed-up of fused (other / fused median)")
        ax.set_yscale("log")
        ax.set_title(f"electra_fast speed-ups — {stem}")
        fig.tight_layout()
        written.append(os.path.join(out_dir, f"{stem}-speedups.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    # scaling: rows whose shape is BxT, grouped by (op, pass, dtype), one line per impl
    curves: Dict[Tuple[str, str, str], Dict[str, List[Tuple[int, float, float]]]] = {}
    for (op, pass_, shape, dtype), impls in groups.items():
        mt = re.fullmatch(r"(\d+)x(\d+)", shape)
        if not mt:
            continue
        for impl, row in impls.items():
            if row.get("tokens_per_s"):
                curves.setdefault((op, pass_, dtype), {}).setdefault(impl, []).append(
                    (int(mt.group(2)), row["tokens_per_s"], row.get("peak_mem_bytes") or 0))
    for (op, pass_, dtype), lines in sorted(curves.items()):
        if max(len(v) for v in lines.values()) < 3:
            continue  # not a sweep
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for impl, pts in sorted(lines.items()):
            pts.sort()
            a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            a2.plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], marker="o", label=impl)
        for a, ylabel in ((a1, "tokens / s"), (a2, "peak memory (MiB)")):
            a.set_xscale("log", base=2)
            a.set_xlabel("sequence length T")
            a.set_ylabel(ylabel)
            a.grid(alpha=0.3)
            a.legend()
        fig.suptitle(f"{op} {pass_} {dtype} — {stem}")
        fig.tight_layout()
        written.append(os.path.join(out_dir, _scaling_name(stem, op, pass_, dtype)))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _scaling_name(stem: str, op: str, pass_: str, dtype: str) -> str:
    return f"{stem}-{re.sub(r'[^A-Za-z0-9]+', '-', f'{op}-{pass_}-{dtype}').strip('-')}-scaling.png"


def plot_names(path: str) -> set:
    """The file names :func:`plots` may give the plots of the JSON at ``path``."""
    stem = os.path.splitext(os.path.basename(path))[0]
    groups = load_groups(path)
    return {f"{stem}-speedups.png"} | {_scaling_name(stem, op, pass_, dtype) for op, pass_, _, dtype in groups}


# <machine>-<date>[-N][-quick].json: a run of the whole suite (-N: the day's N-th); a -k selection is -select
RUN_NAME = re.compile(r"^(.+)-(\d{4}-\d{2}-\d{2})(?:-(\d+))?(-quick)?\.json$")


def _is_run(path: str) -> bool:
    """Whether ``path`` can be reported (:func:`run_problem`); a file that only has a run's name (hand-made,
    truncated, a median of 0) is passed over with a warning, not a traceback after the benchmarks ran."""
    problem = run_problem(path)
    if problem is not None:
        say(f"electra-fast bench: warning: skipping {path}: {problem}")
    return problem is None


def newest_per_machine(results_dir: str) -> List[str]:
    """The newest full benchmark JSON of each machine (quick runs only where a machine has nothing else)."""
    latest: Dict[str, str] = {}
    # only <machine>-<YYYY-MM-DD>[-quick].json: other JSON beside them (a demo's record, a model config, the default
    # job's -pretrain-default.json) is not a benchmark run and, dated later, must not stand in for one
    runs = [(f, m.groups()) for f in glob.glob(os.path.join(results_dir, "*.json"))
            for m in [RUN_NAME.match(os.path.basename(f))] if m and _is_run(f)]
    # full runs after quick ones, newer dates after older, a day's later runs after its first
    for f, (machine, _, _, _) in sorted(runs, key=lambda r: (r[1][3] is None, r[1][1], int(r[1][2] or 1))):
        latest[machine] = f
    return sorted(latest.values())


def pretrain_section(results_dir: str) -> List[str]:
    """Rows for the recorded runs of the default pretraining job (``electra-fast bench --pretrain``)."""
    files = sorted(glob.glob(os.path.join(results_dir, "*-pretrain-default.json")))
    if not files:
        return []
    lines = ["## The default pretraining job (`electra-fast pretrain`, embedded corpus)", "",
             "| file | machine | steps | tokens | wall time | tokens/s | loss first -> last | mlm | rtd | "
             "disc. accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        # a record cut short, emptied or hand-edited is passed over (as _is_run does), not a traceback after the
        # benchmarks ran, in every later run reading the folder
        try:
            with open(f, encoding="utf-8") as fh:
                r = json.load(fh)
            fin = r.get("final") or {}
            lines.append(f"| `{os.path.basename(f)}` | {r.get('machine')} ({r.get('threads')} threads) | "
                         f"{r['steps']} | {r['tokens_seen']:,} | {r['wall_time_s']:.1f} s | {r['tokens_per_s']:,.0f} | "
                         f"{r['first_loss']:.3f} -> {fin.get('loss', float('nan')):.3f} | "
                         f"{fin.get('mlm_loss', 0):.3f} | {fin.get('rtd_loss', 0):.4f} | "
                         f"{fin.get('discriminator_accuracy', 0):.3f} |")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            print(f"electra-fast bench: warning: skipping {f}: not a pretrain record ({type(e).__name__}: {e})",
                  file=sys.stderr)
    return lines + [""] if len(lines) > 4 else []


RESULTS_TITLE = "# Benchmark results"  # RESULTS.md's first line: how electra-fast bench knows the file is its own


def write_results_md(paths: List[str], out_path: str, images: Dict[str, List[str]],
                     results_dir: Optional[str] = None) -> None:
    """RESULTS.md at ``out_path``: a table (and plots) per JSON in ``paths``, then the default pretraining job's
    records found in ``results_dir`` (default: where ``paths`` are, else ``<out_path's dir>/results``)."""
    text = [RESULTS_TITLE, "",
            "Medians over several rounds; every side of a comparison ran in the same process with the same shapes, "
            "dtype, thread count, warm-up and rounds. *fused speed-up* = other median / fused median (> 1: fused is "
            "faster). *fused / other peak mem* < 1: fused uses less. Peak memory: CUDA `max_memory_allocated`; CPU: "
            "torch CPU-allocator events replayed from the profiler (electra_fast/profiling.py), measured in a separate "
            "call. Reproduce with `electra-fast bench` (or `make bench`).", ""]
    base = os.path.dirname(out_path)
    for p in paths:
        text += [table(p), ""]
        # plots an earlier run wrote for this file (not another file's of the same machine and day)
        own = plot_names(p)
        found = sorted(f for f in glob.glob(os.path.splitext(p)[0] + "-*.png") if os.path.basename(f) in own)
        for img in images.get(p) or found:
            text.append(f"![{os.path.basename(img)}]({os.path.relpath(img, base)})")
        text.append("")
    text += pretrain_section(results_dir or (os.path.dirname(paths[0]) if paths else os.path.join(base, "results")))
    write_text(out_path, "\n".join(text))  # UTF-8 whatever the locale, and whole: never an emptied RESULTS.md


# ------------------------------------------------------------------------------ README performance table
README_START = "<!-- perf-table:start -->"
README_END = "<!-- perf-table:end -->"


class Headline(NamedTuple):
    """One row of README.md's table: a fused-vs-baseline group of the JSON, and how to name it."""
    op: str
    pass_: str
    shape: str
    dtype: str
    baseline: str          # the impl compared with "fused"
    label: str             # what the row measures
    baseline_label: str    # what the baseline is
    shape_label: str = ""  # default: the JSON's shape, "256x512" -> "256 x 512"


# Which comparisons the README shows, in order. Only names live here: every number comes from the JSON.
HEADLINES = (
    Headline("mask_tokens[count]", "fwd", "256x512", "int64", "eager", "`mask_tokens` count", "eager rand + argsort"),
    Headline("mask_tokens[bernoulli]", "fwd", "256x512", "int64", "eager", "`mask_tokens` bernoulli",
             "transformers-collator ops"),
    *(Headline("mlm_loss_and_sample", "fwd+bwd", f"2458x128x{v}", "float32", "eager", "`mlm_loss_and_sample` fwd+bwd",
               "F.linear + CE + Gumbel", f"N 2458, E 128, V {v}") for v in (30522, 128100)),
    *(Headline("disentangled_attention", "fwd+bwd", shape, dtype, "transformers",
               "`disentangled_attention` module fwd+bwd", "transformers", label)
      for shape, label in (("8x512", "8 x 512, H 12, D 64"), ("2x2048", "")) for dtype in ("float32", "bfloat16")),
    Headline("rtd_loss", "fwd+bwd", "256x512", "float32", "eager", "`rtd_loss` fwd+bwd", "eager BCE"),
    Headline("dropout", "fwd+bwd", "4096x256", "float32", "eager", "`dropout` fwd+bwd", "`F.dropout`"),
    Headline("dropout_add_layer_norm", "fwd+bwd", "4096x256", "bfloat16", "eager", "`dropout_add_layer_norm` fwd+bwd",
             "`F.dropout` + add + `F.layer_norm`"),
    *(Headline(f"pretrain_step[{model}]", "fwd+bwd+adamw", shape, dtype, "transformers", f"{name} pretraining step",
               "transformers")
      for model, name, shape in (("electra_small", "ELECTRA-small", "32x128"),
                                 ("deberta_v3_xsmall", "DeBERTa-v3-xsmall", "8x128"))
      for dtype in ("fp32", "bf16-autocast")),
    *(Headline(f"patch_train_step[{model}]", "fwd+bwd+adamw", "32x128", dtype, "transformers",
               f"`electra_fast.patch` {name} train step", "transformers")
      for model, name in (("bert_mlm", "BertForMaskedLM"), ("roberta_mlm", "RobertaForMaskedLM"),
                          ("electra_small_rtd", "ElectraForPreTraining"),
                          ("deberta_v3_xsmall_mlm", "DebertaV2ForMaskedLM"))
      for dtype in ("fp32", "bf16-autocast")),
)
_DTYPE_NOTES = {"bfloat16": ", bf16", "bf16-autocast": ", bf16 autocast", "float16": ", fp16"}  # fp32: unnoted


def _sig3(x: float) -> str:
    """x > 0 to three significant digits, trailing zeros kept: 0.770, 5.00, 25.2, 394."""
    x = float(f"{x:.3g}")
    return f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}"


def _fmt_short(s: float) -> str:
    """A median in seconds to three significant digits: 0.770 ms, 394 ms, 1.46 s."""
    ms = float(f"{s * 1e3:.3g}")
    return f"{_sig3(ms)} ms" if ms < 1000 else f"{_sig3(s)} s"


def _caption(path: str, base_dir: str) -> str:
    data = _load(path)
    m = data.get("machine_info", {})
    cuda = f", CUDA {m['cuda']}" if m.get("cuda") else ""
    rel = os.path.relpath(path, base_dir).replace(os.sep, "/")
    return (f"**{m.get('electra_fast_machine', 'unknown machine')}**, {m.get('cores', '?')} cores, "
            f"{m.get('torch_threads', '?')} threads, torch {m.get('torch')}{cuda}"
            + ("" if m.get("extension", True) else " · **C++ extension NOT built**") + _forced_note(m) + " · "
            f"[`{os.path.basename(path)}`]({rel}) ({str(data.get('datetime') or '')[:10]}, "
            f"commit {m.get('git_commit')})")


def readme_table(paths: List[str], base_dir: str) -> str:
    """README.md's performance table(s): for each JSON (one per machine), the :data:`HEADLINES` rows it holds.
    ``base_dir``: the README's folder (links to the JSON are relative to it)."""
    if not paths:
        return "No benchmark results recorded yet: run `electra-fast bench`."
    blocks = []
    for path in paths:
        groups = load_groups(path)
        lines = [_caption(path, base_dir), "",
                 "| op / step (fp32 unless noted) | shape | fused | baseline | speed-up | "
                 "peak memory fused / baseline |", "|---|---|---|---|---|---|"]
        for h in HEADLINES:
            impls = groups.get((h.op, h.pass_, h.shape, h.dtype), {})
            fused, base = impls.get("fused"), impls.get(h.baseline)
            if fused is None or base is None:
                continue  # not measured in this run (another device, -k, an older bench)
            mem = "-"
            if fused.get("peak_mem_bytes") and base.get("peak_mem_bytes"):
                mem = f"{fused['peak_mem_bytes'] / base['peak_mem_bytes']:.2f}"
            shape = h.shape_label or h.shape.replace("x", " x ")
            lines.append(f"| {h.label}{_DTYPE_NOTES.get(h.dtype, '')} | {shape} | {_fmt_short(fused['median'])} | "
                         f"{h.baseline_label} {_fmt_short(base['median'])} | {base['median'] / fused['median']:.2f}x | "
                         f"{mem} |")
        if len(lines) == 4:
            lines[2:] = ["(none of the headline comparisons is in this run)"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def readme_results(results_dir: str) -> List[str]:
    """The JSON the README shows: the newest full run of each machine (quick runs are smoke tests)."""
    return [p for p in newest_per_machine(results_dir) if RUN_NAME.match(os.path.basename(p)).group(4) is None]


def _split_readme(text: str, readme: str) -> Tuple[str, str, str]:
    """(before and including the start marker, the block, the end marker and after)."""
    starts, ends = text.count(README_START), text.count(README_END)
    if starts != 1 or ends != 1 or text.index(README_START) > text.index(README_END):
        raise ValueError(f"{readme}: expected one {README_START} line followed by one {README_END} line, "
                         f"found {starts} start and {ends} end marker(s)")
    head, rest = text.split(README_START)
    block, tail = rest.split(README_END)
    return head + README_START, block, README_END + tail


def readme_with_table(readme: str, results_dir: str) -> Tuple[str, str]:
    """(current text, text with the table regenerated from ``results_dir``) of the README at ``readme``."""
    with open(readme, encoding="utf-8") as fh:
        text = fh.read()
    head, _, tail = _split_readme(text, readme)
    table_text = readme_table(readme_results(results_dir), os.path.dirname(os.path.abspath(readme)))
    note = "<!-- generated from the JSON by `python -m electra_fast.bench_report --readme`: edits here are lost -->"
    return text, f"{head}\n{note}\n{table_text}\n{tail}"


def update_readme(readme: str, results_dir: str) -> bool:
    """Rewrite the table between the README's markers in place (nothing else changes); False if it was current."""
    text, new = readme_with_table(readme, results_dir)
    if new == text:
        return False
    mode = os.stat(readme).st_mode & 0o7777

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(new)
        os.chmod(tmp, mode)

    write_atomic(readme, write)  # all or nothing: a crash never leaves a half-written README
    return True


def sync_readme(root: str) -> str:
    """After ``electra-fast bench`` wrote into ``<root>/bench/results``: the README's table follows. One line
    saying what happened (a README without the markers is reported, not an error: the results are written)."""
    readme = os.path.join(root, "README.md")
    try:
        changed = update_readme(readme, os.path.join(root, "bench", "results"))
    except (OSError, ValueError) as e:
        return f"README.md performance table not updated: {e}"
    return f"{'updated' if changed else 'unchanged'}: the performance table of {readme}"


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m electra_fast.bench_report --readme [--check]``: README.md's table from the committed JSON."""
    paths_printable()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(prog="python -m electra_fast.bench_report", description=main.__doc__)
    parser.add_argument("--readme", nargs="?", const=os.path.join(root, "README.md"), metavar="README.md",
                        required=True, help="rewrite the table between the perf-table markers (default: the "
                                            "checkout's README.md)")
    parser.add_argument("--results", default=os.path.join(root, "bench", "results"), metavar="DIR",
                        help="benchmark JSON folder (default: the checkout's bench/results)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the table is stale")
    args = parser.parse_args(argv)
    for what, path, test, kind in (("--readme", args.readme, os.path.isfile, "a file"),
                                   ("--results", args.results, os.path.isdir, "a directory")):
        if not test(path):
            why = f"is not {kind}" if os.path.exists(path) else "not found"
            say(f"bench_report: {what}: {path} {why}")
            return 2
    try:
        if args.check:
            text, new = readme_with_table(args.readme, args.results)
            if new != text:
                say(f"bench_report: the performance table of {args.readme} is stale: run "
                    f"`python -m electra_fast.bench_report --readme`")
                return 1
            print(f"the performance table of {args.readme} matches {args.results}")
            return 0
        changed = update_readme(args.readme, args.results)
    except ValueError as e:
        say(f"bench_report: --readme: {e}")
        return 2
    print(f"{'updated' if changed else 'unchanged'}: the performance table of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
