"""``electra-fast bench``: run bench/ with pytest-benchmark, then write the JSON, bench/RESULTS.md and plots,
and optionally gate on a previous result. Runs from a source checkout (bench/ is not installed)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from . import bench_report
from ._console import say, show
from ._files import creatable_dir, write_text


def bench_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "bench")
    if not os.path.isfile(os.path.join(path, "conftest.py")):
        raise SystemExit("electra-fast bench: bench/ not found next to the package; run it from a source checkout "
                         "installed with `pip install -e .`")
    return path


def record_pretrain(out_dir: str, device: "str | None" = None) -> str:
    """Run the default pretraining job in a scratch directory and record its summary next to the results."""
    import json
    import tempfile

    import torch

    from .train import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        summary = pretrain(None, out=os.path.join(tmp, "run"), progress=False, device=device)
    keep = {k: summary[k] for k in ("steps", "tokens_seen", "wall_time_s", "tokens_per_s", "first_loss", "final",
                                    "precision")}
    keep.update(machine=bench_report.machine_name(device), threads=torch.get_num_threads())
    path = unused_name(out_dir, bench_report.result_name(device), "-pretrain-default.json")
    write_text(path, json.dumps(keep, indent=2))  # a run stopped meanwhile leaves no empty record behind
    return path


def check_args(args) -> "str | None":
    """What is wrong with the arguments (one line), checked before anything runs; None when nothing is."""
    if getattr(args, "pretrain", False):
        extra = [flag for flag, value in (("--quick", args.quick), ("-k", args.select), ("--compare", args.compare))
                 if value]
        if extra:
            return f"{', '.join(extra)}: not used by --pretrain (it runs the default pretrain job only)"
    if args.device is not None:
        from .train import PretrainError
        from .train.distributed import check_device
        try:
            check_device(args.device)
        except PretrainError as e:
            return str(e)
    if args.out is not None:
        if not args.out.strip():  # the results went to the checkout, RESULTS.md to the working directory
            return "--out: empty; name a directory for the results"
        problem = creatable_dir(args.out)  # found only after the benchmarks ran, their results were lost
        if problem:
            return f"--out: {problem}"
    results_md = _results_md(args)
    if os.path.exists(results_md) and not _ours(results_md):
        return f"--out: {results_md} exists and was not written by electra-fast bench (it would be replaced)"
    if args.select is not None:
        why = _bad_expression(args.select)
        if why:
            return f"-k: {args.select!r} is not a pytest -k expression ({why})"
    if args.compare is not None:
        problem = bench_report.run_problem(args.compare)  # what the report skips, the gate refuses
        if problem:
            return f"--compare: {args.compare}: {problem}"
        if not bench_report.speedups(bench_report.load_groups(args.compare)):
            return f"--compare: {args.compare} holds no fused-vs-baseline rows to compare against"
    return None


def _results_md(args) -> str:
    """Where RESULTS.md goes: bench/RESULTS.md for the checkout's results, else inside --out."""
    return os.path.join(os.path.abspath(args.out) if args.out is not None else bench_dir(), "RESULTS.md")


def _ours(path: str) -> bool:
    """Whether ``path`` is a RESULTS.md this command wrote, or an empty one (an earlier version emptied its own when
    the locale could not encode it; nothing there to lose), so it may be rewritten."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        return first == "" or first.rstrip("\n") == bench_report.RESULTS_TITLE
    except OSError:
        return False


def main(args) -> int:
    problem = check_args(args)
    if problem:
        say(f"electra-fast bench: error: {problem}")
        return 2
    bdir = bench_dir()
    if getattr(args, "pretrain", False):
        out_dir = os.path.abspath(args.out or os.path.join(bdir, "results"))
        os.makedirs(out_dir, exist_ok=True)
        show(f"recorded {record_pretrain(out_dir, args.device)}")
        paths = bench_report.newest_per_machine(out_dir)
        bench_report.write_results_md(paths, _results_md(args), {}, results_dir=out_dir)
        return 0
    device = args.device or ("cuda" if _cuda() else "cpu")
    out_dir = os.path.abspath(args.out or os.path.join(bdir, "results"))
    os.makedirs(out_dir, exist_ok=True)
    # an earlier run of the day stays (<machine>-<date>-2...); a -k run is a selection, never the machine's full run
    # (README's table follows those): its own name
    json_path = unused_name(out_dir, bench_report.result_name(device),
                            ("-quick" if args.quick else "") + ("-select" if args.select else "") + ".json",
                            plots=True)
    env = dict(os.environ, ELECTRA_FAST_BENCH_QUICK="1" if args.quick else "0")
    from ._backend import forced_backend
    forced = forced_backend()  # checked by the CLI; None for auto
    if forced:
        say(f"electra-fast bench: warning: ELECTRA_FAST_BACKEND={forced}: the fused rows run on that backend "
            "(recorded in the results)")
    rc = _run_files(bdir, device, args.select, json_path, env)
    if rc != 0:
        if rc != 5:  # 5: nothing selected, said by _run_files
            say(f"electra-fast bench: pytest failed (exit {rc})")
        return rc
    images = bench_report.plots(json_path, out_dir)
    results_md = _results_md(args)
    paths = bench_report.newest_per_machine(out_dir)  # with --out too: each machine's newest run there, not only this
    if json_path not in paths:
        paths.append(json_path)
    bench_report.write_results_md(paths, results_md, {json_path: images})
    show(f"wrote {json_path}, {results_md} and {len(images)} plot(s)")
    if args.out is None:  # the checkout's results: README.md's performance table follows them
        show(bench_report.sync_readme(os.path.dirname(bdir)))
    if args.compare:
        problems, shared = bench_report.compare_rows(json_path, args.compare)
        for note in bench_report.mismatch(json_path, args.compare):
            say(f"electra-fast bench: warning: {note}")
        if not shared:  # a gate that compared nothing would pass anything
            say(f"electra-fast bench: error: --compare: no fused-vs-baseline row of this run is in {args.compare}; "
                "nothing was compared")
            return 1
        for p in problems:
            say("REGRESSION " + p)
        if problems:
            return 1
        show(f"no fused speed-up fell by more than 15% since {args.compare} ({shared} row(s) compared)")
    return 0


def unused_name(directory: str, base: str, suffix: str, plots: bool = False) -> str:
    """``directory/<base><suffix>``, or ``<base>-2<suffix>``, ``-3``... while that name is taken: no run overwrites
    another (the number right after the date, where bench_report.RUN_NAME reads it). ``plots``: taken too while a
    ``<stem>-*.png`` is there (the plots of a run whose JSON was deleted, or the user's: bench_report.plots names
    its PNGs after the JSON)."""
    def taken(path: str) -> bool:
        stem = os.path.splitext(path)[0]
        return os.path.lexists(path) or (plots and bool(glob.glob(glob.escape(stem) + "-*.png")))

    path, n = os.path.join(directory, base + suffix), 1
    while taken(path):
        n += 1
        path = os.path.join(directory, f"{base}-{n}{suffix}")
    return path


def bench_files(bdir: str) -> list:
    """The benchmark files, each run in its own process (see :func:`_run_files`)."""
    return sorted(f for f in os.listdir(bdir) if f.startswith("test_bench_") and f.endswith(".py"))


def pytest_command(name: str, device: str, part: str, select=None) -> list:
    """The pytest-benchmark command line for one bench file, its JSON written to ``part``."""
    cmd = [sys.executable, "-m", "pytest", name, "-q", "-p", "no:cacheprovider", "--benchmark-enable",
           f"--device={device}", f"--benchmark-json={part}", "--benchmark-columns=median,iqr,rounds",
           "-o", "addopts=", "-W", "ignore:Not saving anything"]  # a file -k deselected entirely
    return cmd + ([f"-k{select}"] if select else [])  # one argument: an expression may start with "-"


class MergedResults:
    """Several bench files' pytest-benchmark JSON merged into one (the first file's machine_info, every row)."""

    def __init__(self):
        self.data = None
        self._skipped: list = []

    def skip(self, test: str, reason: str) -> None:
        """Record a row or file left out (in machine_info.skipped, with the rows' own skips)."""
        self._skipped.append({"test": test, "reason": reason})
        if self.data is not None:
            self.data["machine_info"].setdefault("skipped", []).extend(self._skipped)
            self._skipped = []

    def add(self, name: str, part: str) -> None:
        # pytest-benchmark writes no JSON when nothing was timed: every row of the file skipped on this device
        # (the CPU-only pretraining step on CUDA, the GPU rows on CPU). Recorded, not an error.
        if not os.path.exists(part):
            self.skip(name, "every row of this file was skipped on this device")
        else:
            with open(part, encoding="utf-8") as fh:
                data = json.load(fh)
            if self.data is None:
                self.data = data
            else:
                self.data["benchmarks"].extend(data["benchmarks"])
                self.data["machine_info"].setdefault("skipped", []).extend(data["machine_info"].get("skipped", []))
            self.data["machine_info"].setdefault("skipped", [])[:0] = self._skipped  # those noted before any data
            self._skipped = []

    def write(self, path: str) -> None:
        write_text(path, json.dumps(self.data, indent=2))


def _run_files(bdir: str, device: str, select, json_path: str, env) -> int:
    """pytest-benchmark on each bench/test_bench_*.py in its own process, results merged into json_path.

    One process per file: the multi-GB model steps of one file leave allocator and thread-pool state behind
    that slowed the sub-millisecond op benchmarks of a later file by 10-25% when they shared a process.
    """
    import tempfile

    merged = MergedResults()
    with tempfile.TemporaryDirectory() as tmp:
        for name in bench_files(bdir) if select is None else selected_files(bdir, device, select, env):
            part = os.path.join(tmp, name + ".json")
            rc = subprocess.call(pytest_command(name, device, part, select), cwd=bdir, env=env)
            if rc == 5:  # -k selected nothing in this file, or a GPU-only file skipped itself on a CPU machine
                continue
            if rc != 0:
                if merged.data is not None:  # the files that finished keep their rows, never as a full run
                    partial = unused_name(os.path.dirname(json_path),
                                          os.path.splitext(os.path.basename(json_path))[0], "-partial.json")
                    merged.write(partial)
                    say(f"electra-fast bench: {name} failed; the rows of the files before it are in {partial}")
                return rc
            merged.add(name, part)
    if merged.data is None:
        say("electra-fast bench: no benchmark was selected")
        return 5
    merged.write(json_path)
    return 0


def selected_files(bdir: str, device: str, select: str, env) -> list:
    """The bench files holding a row that ``-k select`` picks, from one collection of them all (a run per file
    started a process per file only to select nothing); every file if the collection fails (each run says why)."""
    files = bench_files(bdir)
    cmd = [sys.executable, "-m", "pytest", *files, "--collect-only", "-q", "-p", "no:cacheprovider", f"--device={device}",
           "-o", "addopts=", f"-k{select}"]
    proc = subprocess.run(cmd, cwd=bdir, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 5):
        return files
    picked = {os.path.basename(line.split("::", 1)[0]) for line in proc.stdout.splitlines() if "::" in line}
    return [f for f in files if f in picked]


def _bad_expression(select: str) -> "str | None":
    """Why pytest would refuse ``-k select`` (checked once here, not by every per-file run), or None."""
    if not select.strip():
        return "empty"
    try:
        from _pytest.mark import expression  # pytest's own parser: private, so only its parse errors count
    except ImportError:
        return None
    errors = tuple(e for e in (getattr(expression, "ParseError", None), SyntaxError) if e is not None)
    try:
        expression.Expression.compile(select)
    except errors as e:
        return getattr(e, "msg", None) or getattr(e, "message", None) or str(e) or type(e).__name__
    return None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
