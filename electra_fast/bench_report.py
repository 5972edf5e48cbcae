"""Benchmark reports: pytest-benchmark JSON -> bench/RESULTS.md, PNG plots, and the regression gate.

Rows come from ``extra_info`` written by bench/conftest.py::run: op, impl ("fused" | "eager" |
"transformers" | peers), pass_, shape ("BxT" or "N=..."), dtype, tokens_per_s, peak_mem_bytes.
Ratios are computed only between rows of the same op / pass / shape / dtype from the same JSON file, i.e.
measured side by side in one run.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import re
from typing import Dict, List, Tuple

Key = Tuple[str, str, str, str]  # op, pass, shape, dtype


def machine_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def result_name() -> str:
    """``<machine>-<date>`` (machine: the GPU name when CUDA is visible, else the CPU model)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine_name()).strip("-").lower()
    return f"{slug}-{datetime.date.today().isoformat()}"


def load_groups(path: str) -> Dict[Key, Dict[str, dict]]:
    """{(op, pass, shape, dtype): {impl: {"median": s, **extra_info}}} from one pytest-benchmark JSON."""
    data = json.load(open(path))
    groups: Dict[Key, Dict[str, dict]] = {}
    for bm in data.get("benchmarks", []):
        info = bm.get("extra_info", {})
        if "op" not in info or bm.get("stats") is None:
            continue
        key = (info["op"], info["pass_"], info["shape"], info["dtype"])
        groups.setdefault(key, {})[info["impl"]] = {"median": bm["stats"]["median"], **info}
    return groups


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
    now, before = speedups(load_groups(current)), speedups(load_groups(previous))
    problems = []
    for k in sorted(set(now) & set(before)):
        if now[k] < (1 - tolerance) * before[k]:
            (op, pass_, shape, dtype), impl = k
            problems.append(f"{op} {pass_} {shape} {dtype}: fused vs {impl} {before[k]:.2f}x -> {now[k]:.2f}x "
                            f"(-{(1 - now[k] / before[k]) * 100:.0f}%, limit {tolerance * 100:.0f}%)")
    return problems


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_mem(b) -> str:
    return "-" if not b else f"{b / 2**20:.1f} MiB"


def table(path: str) -> str:
    data = json.load(open(path))
    m = data.get("machine_info", {})
    groups = load_groups(path)
    lines = [
        f"### {m.get('electra_fast_machine', 'unknown machine')} ({m.get('cores', '?')} cores) — "
        f"`{os.path.basename(path)}`",
        "",
        f"{data.get('datetime', '')[:19]} · torch {m.get('torch')} · triton {m.get('triton')} · "
        f"electra_fast {m.get('electra_fast')} (commit {m.get('git_commit')}) · {m.get('torch_threads')} threads · "
        f"C++ extension {'built' if m.get('extension') else 'NOT built'}",
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
        safe = re.sub(r"[^A-Za-z0-9]+", "-", f"{op}-{pass_}-{dtype}").strip("-")
        written.append(os.path.join(out_dir, f"{stem}-{safe}-scaling.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def newest_per_machine(results_dir: str) -> List[str]:
    """The newest full benchmark JSON of each machine (quick runs only where a machine has nothing else)."""
    latest: Dict[str, str] = {}
    files = [f for f in glob.glob(os.path.join(results_dir, "*.json")) if not f.endswith("-pretrain-default.json")]
    # names are <machine>-<YYYY-MM-DD>[-quick].json: full runs sort after quick ones, newer dates after older
    for f in sorted(files, key=lambda f: (not f.endswith("-quick.json"), f)):
        machine = re.sub(r"-\d{4}-\d{2}-\d{2}.*$", "", os.path.basename(f))
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
        r = json.load(open(f))
        fin = r.get("final") or {}
        lines.append(f"| `{os.path.basename(f)}` | {r.get('machine')} ({r.get('threads')} threads) | {r['steps']} | "
                     f"{r['tokens_seen']:,} | {r['wall_time_s']:.1f} s | {r['tokens_per_s']:,.0f} | "
                     f"{r['first_loss']:.3f} -> {fin.get('loss', float('nan')):.3f} | {fin.get('mlm_loss', 0):.3f} | "
                     f"{fin.get('rtd_loss', 0):.4f} | {fin.get('discriminator_accuracy', 0):.3f} |")
    return lines + [""]


def write_results_md(paths: List[str], out_path: str, images: Dict[str, List[str]]) -> None:
    text = ["# Benchmark results", "",
            "Medians over several rounds; every side of a comparison ran in the same process with the same shapes, "
            "dtype, thread count, warm-up and rounds. *fused speed-up* = other median / fused median (> 1: fused is "
            "faster). *fused / other peak mem* < 1: fused uses less. Peak memory: CUDA `max_memory_allocated`; CPU: "
            "torch CPU-allocator events replayed from the profiler (electra_fast/profiling.py), measured in a separate "
            "call. Reproduce with `electra-fast bench` (or `make bench`).", ""]
    base = os.path.dirname(out_path)
    for p in paths:
        text += [table(p), ""]
        found = sorted(glob.glob(os.path.splitext(p)[0] + "-*.png"))  # plots written by an earlier run
        for img in images.get(p) or found:
            text.append(f"![{os.path.basename(img)}]({os.path.relpath(img, base)})")
        text.append("")
    text += pretrain_section(os.path.dirname(paths[0]) if paths else os.path.join(base, "results"))
    with open(out_path, "w") as fh:
        fh.write("\n".join(text))
