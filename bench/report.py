"""Turn pytest-benchmark JSON into bench/RESULTS.md: per op / pass / shape / dtype, the median time,
tokens/s and peak memory of each side, and the eager/fused (and transformers/fused) speed-ups.

    python bench/report.py [results/X.json ...]     (default: the newest file per machine in results/)
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def result_name() -> str:
    """``<machine>-<date>``, the name of a new results file."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", _machine()).strip("-").lower()
    return f"{slug}-{datetime.date.today().isoformat()}"


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_mem(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def rows(data: dict) -> list:
    groups: dict = {}
    for bm in data["benchmarks"]:
        info = bm.get("extra_info", {})
        if "op" not in info:
            continue
        key = (info["op"], info["pass_"], info["shape"], info["dtype"])
        groups.setdefault(key, {})[info["impl"]] = (bm["stats"]["median"], info)
    out = []
    for (op, pass_, shape, dtype), impls in sorted(groups.items()):
        fused = impls.get("fused")
        for impl in sorted(impls, key=lambda i: (i != "fused", i)):
            median, info = impls[impl]
            speedup = "" if impl == "fused" or fused is None else f"{median / fused[0]:.2f}x"
            mem_ratio = ""
            if impl != "fused" and fused is not None and info.get("peak_mem_bytes") and fused[1].get("peak_mem_bytes"):
                mem_ratio = f"{fused[1]['peak_mem_bytes'] / info['peak_mem_bytes']:.2f}"
            tps = info.get("tokens_per_s")
            out.append(f"| {op} | {pass_} | {shape} | {dtype} | {impl} | {_fmt_time(median)} | "
                       f"{'-' if tps is None else f'{tps:,.0f}'} | {_fmt_mem(info.get('peak_mem_bytes'))} | "
                       f"{speedup} | {mem_ratio} |")
    return out


def section(path: str) -> str:
    data = json.load(open(path))
    m = data.get("machine_info", {})
    title = m.get("electra_fast_machine") or m.get("cpu", {}).get("brand_raw", "unknown machine")
    head = [
        f"## {title} ({m.get('cores', '?')} cores) — `{os.path.relpath(path, HERE)}`",
        "",
        f"{data.get('datetime', '')[:19]} · torch {m.get('torch')} · triton {m.get('triton')} · "
        f"electra_fast {m.get('electra_fast')} (commit {m.get('git_commit')}) · {m.get('torch_threads')} threads · "
        f"C++ extension {'built' if m.get('extension') else 'NOT built'}",
        "",
        "| op | pass | shape | dtype | impl | median | tokens/s | peak mem | fused speed-up | fused/other mem |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows(data))


def newest_per_machine() -> list:
    files = sorted(glob.glob(os.path.join(HERE, "results", "*.json")))
    latest: dict = {}
    for f in files:  # names are <machine>-<YYYY-MM-DD>[suffix].json: sorted order puts the newest last
        machine = re.sub(r"-\d{4}-\d{2}-\d{2}.*$", "", os.path.basename(f))
        latest[machine] = f
    return sorted(latest.values())


def main(argv=None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or newest_per_machine()
    if not paths:
        print("no results in bench/results/: run `make bench` first", file=sys.stderr)
        return 1
    text = ["# Benchmark results", "",
            "Medians over several rounds, every side measured in the same run with the same shapes, dtype, thread "
            "count and warm-up. *fused speed-up* = other median / fused median (> 1: fused is faster); "
            "*fused/other mem* = fused peak / other peak (< 1: fused uses less). Peak memory: CUDA "
            "`max_memory_allocated`; CPU: torch allocator events from the profiler (see electra_fast/profiling.py). "
            "Reproduce with `make bench`.", ""]
    text += [section(p) + "\n" for p in paths]
    with open(os.path.join(HERE, "RESULTS.md"), "w") as fh:
        fh.write("\n".join(text))
    print(f"wrote bench/RESULTS.md from {', '.join(os.path.basename(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
