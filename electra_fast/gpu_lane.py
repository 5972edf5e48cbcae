"""``python -m electra_fast.gpu_lane`` (``make gpu``): the GPU lane in one command, for a GPU machine lent for a few
minutes, with its own python3 / torch / Triton and no network.

Stages, in order; each writes its files into the output directory when it finishes, so a run cut off by a timeout
keeps what finished (the lane also stops itself inside ``--budget``, cutting the stage that runs over):

  install    ``pip install --no-build-isolation --no-deps -e .`` (the C++ extension built; if that fails, again with
             ELECTRA_FAST_SKIP_EXT=1; ``--quick`` skips the build), then the peers' wheels carried in .whl/
             (``make gpu-wheels``) with ``pip install --no-index --no-deps --target`` into a scratch folder
  env        ``python -m electra_fast.info``, the GPU, its clocks (``nvidia-smi -q -d CLOCK``), versions
  suite      the existing suite's CUDA cases: ``pytest tests -k triton-cuda``                  -> junit-suite.xml
  gpu-tests  tests/gpu/: stress shapes, fp32 / fp16 / bf16 against the reference with the low-precision criterion, every
             gradient, random decisions bit-identical to the CPU backends                       -> junit-gpu.xml
  bench      bench/test_bench_*.py on ``--device cuda``, one process per file, merged as each file ends -> bench.json

and after every stage: lane.json (environment, plan, stages), SUMMARY.md (the tables), lane.log (all output).
Six files: the device tool returns at most eight from ``$OUT``.

``--dry-run`` runs the same plumbing on CPU (CUDA hidden, Triton interpreter, tiny shapes, one round, a subset of the
suite, only the GPU bench files, peers skipped with a reason, nothing installed) and writes the same files.
Exit status: 0 when every stage passed, 1 when a test failed or a stage failed or ran out of time, 2 for bad usage.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

from . import bench, bench_report
from ._console import help_text, paths_printable, say
from ._files import creatable_dir, write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY_RUN_ENV = "ELECTRA_FAST_GPU_LANE_DRY_RUN"
FILES = {"log": "lane.log", "lane": "lane.json", "summary": "SUMMARY.md", "suite": "junit-suite.xml",
         "gpu-tests": "junit-gpu.xml", "bench": "bench.json"}
WHEELS = ".whl"
INSTALL = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
# test_philox's stream check picks CUDA by itself (no backend parameter); everything else carries "triton-cuda"
SUITE_GPU = (["tests", "--ignore=tests/gpu"], "triton-cuda or test_triton_stream_matches_reference")
SUITE_DRY = (["tests/test_rtd_loss.py"], "triton-interp and test_backend_matches_reference")
CPU_ONLY_BENCH = {"test_bench_pretrain_step.py": "the CPU step (test_bench_gpu_pretrain_step.py is the GPU's)"}
QUICK_LEFT_OUT = {name: "--quick: a cheap op's benchmark (its GPU tests ran; the full lane times it)"
                  for name in ("test_bench_dropout.py", "test_bench_masking.py", "test_bench_rtd_loss.py")}
STAGES = ("install", "env", "suite", "gpu-tests", "bench")
# Seconds on one H200 with 16 cores, per stage: (estimate, cap, reserve). The estimates come from the shapes, rounds,
# process count and expected Triton / C++ compile times, not from a run (no GPU run has happened yet; README, "GPU
# lane"). A stage may run until its cap, but never into the reserves of the stages after it, so a slow stage leaves
# the later ones their minimum and the lane ends inside --budget.
TIMES = {
    "quick": {"install": (15, 90, 0), "env": (10, 40, 10), "suite": (55, 120, 40), "gpu-tests": (45, 100, 40),
              "bench": (110, 600, 70)},
    "full": {"install": (60, 200, 0), "env": (10, 40, 10), "suite": (60, 150, 50), "gpu-tests": (110, 200, 80),
             "bench": (210, 600, 150)},
    "dry-run": {"install": (1, 30, 0), "env": (5, 40, 10), "suite": (10, 60, 20), "gpu-tests": (20, 90, 30),
                "bench": (35, 240, 60)},
}
BUDGET = {"quick": 240, "full": 480, "dry-run": 300}


def mode_of(args) -> str:
    return "dry-run" if args.dry_run else ("quick" if args.quick else "full")


def min_budget(mode: str) -> int:
    """The smallest --budget that runs every stage: what the stages after the install keep back, and the install's
    own estimate (at least 10 s: a stage starts only with 5 s left, and the lane's start takes some)."""
    times = TIMES[mode]
    return sum(times[s][2] for s in STAGES if s != "install") + max(times["install"][0], 10)


BENCH_FILE_CAP_S = 180  # one bench file that hangs must not take the others' time


class UsageError(Exception):
    """Bad arguments: one line on stderr, exit status 2."""


# ------------------------------------------------------------------------------------------------ helpers
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def _output(cmd: List[str], timeout: float = 30, env: Optional[dict] = None, cwd: str = ROOT):
    """(exit status, stdout + stderr) of a short command; exit status None when it could not run."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{shlex.join(cmd)}: {exc}"
    return done.returncode, (done.stdout + done.stderr).strip()


def _capture(cmd: List[str], timeout: float = 30) -> Optional[str]:
    """Output of a short command, or None when it is missing or fails."""
    rc, text = _output(cmd, timeout)
    return text if rc == 0 else None


def gpu_name(dry_run: bool) -> str:
    if dry_run:
        return "dry-run"
    name = _capture(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return name.splitlines()[0].strip() if name else "unknown-gpu"


def resolve_out(out: Optional[str], device: str) -> str:
    """The output directory: ``out`` if it is new or empty (nothing is ever overwritten), else by default
    bench/results/gpu-<device>-<date>/ with -2, -3, ... appended while that name is taken."""
    if out is not None:
        out = os.path.abspath(out)
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            what = "is a file" if not os.path.isdir(out) else f"holds {len(os.listdir(out))} entries"
            raise UsageError(f"--out {out}: expected a new or empty directory, but it {what} (nothing is overwritten)")
        problem = creatable_dir(out)  # under a file, or read-only: a traceback when the lane opened its log
        if problem:
            raise UsageError(f"--out {out}: {problem}")
        return out
    base = os.path.join(ROOT, "bench", "results", f"gpu-{_slug(device)}-{datetime.date.today().isoformat()}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def duplicate_wheels(names: List[str]) -> Dict[str, List[str]]:
    """{project: [wheel, ...]} for projects with more than one wheel (pip refuses to install two versions)."""
    seen: Dict[str, List[str]] = {}
    for name in names:
        seen.setdefault(name.split("-", 1)[0].lower().replace("_", "-"), []).append(name)
    return {k: sorted(v) for k, v in seen.items() if len(v) > 1}


def bench_plan(names: List[str], mode: str):
    """(the bench files ``mode`` runs, in order; [(file, why it is left out)])."""
    files, left_out = [], []
    for name in names:
        if mode == "dry-run":
            why = None if name.startswith("test_bench_gpu_") else "dry run: the GPU rows' files only"
        else:
            why = CPU_ONLY_BENCH.get(name) or (QUICK_LEFT_OUT.get(name) if mode == "quick" else None)
        (left_out.append((name, why)) if why else files.append(name))
    return files, left_out


def junit_counts(path: str) -> dict:
    """{"passed", "failed", "errors", "skipped", "failures": [(test, first line of the message)]} of a JUnit XML
    file, or {"unreadable": why} (a run killed before pytest wrote it)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            child = case.find("failure") if "failure" in kinds else case.find("error")
            message = (child.get("message") or child.text or "").strip().splitlines()
            counts["failures"].append((test, message[0][:200] if message else ""))
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def _kill(proc: subprocess.Popen) -> None:
    """End the child we started and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------------------------------- the lane
class Lane:
    def __init__(self, args, out: str, device: str):
        self.args, self.out, self.device = args, out, device
        self.mode = mode_of(args)
        self.times = TIMES[self.mode]
        self.abort: Optional[str] = None  # why the remaining stages cannot run
        self.scratch: List[str] = []  # folders this lane made outside the output directory, removed at the end
        self.start = time.monotonic()
        self.deadline = self.start + (args.budget or BUDGET[self.mode])
        os.makedirs(out, exist_ok=True)
        self.log = open(self.path("log"), "a", buffering=1)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.dry_run:  # the same on any machine: CPU tensors, the Triton interpreter for the Triton backend
            self.env.update({DRY_RUN_ENV: "1", "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
        commit, dirty = bench_report.git_state(ROOT)  # the same reading as the benchmarks' commit label
        self.record = {
            "mode": self.mode, "argv": sys.argv[1:], "device": device, "out": out,
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "budget_s": args.budget or
            BUDGET[self.mode], "estimate_s": sum(t[0] for t in self.times.values()),
            "commit": commit, "dirty": dirty,
            "env": {}, "install": {}, "stages": [],
        }

    def path(self, key: str) -> str:
        return os.path.join(self.out, FILES[key])

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")

    # ---------------------------------------------------------------------------------------- running commands
    def run(self, cmd: List[str], timeout: float, cwd: str = ROOT, env: Optional[dict] = None):
        """Run ``cmd`` with its output streamed to the log and stdout; (exit status, timed out)."""
        self.say(f"$ {shlex.join(cmd)}   (cwd {os.path.relpath(cwd, ROOT)}, limit {timeout:.0f} s)")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                self.log.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc, timed_out = proc.wait(timeout=max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc, timed_out = proc.returncode, True
            self.say(f"!! stopped after {timeout:.0f} s (the stage's share of --budget)")
        reader.join(timeout=10)
        return rc, timed_out

    def limit(self, stage: str) -> float:
        """Seconds this stage may take: its cap, within the budget less what the later stages keep back."""
        later = STAGES[STAGES.index(stage) + 1:]
        left = self.deadline - time.monotonic() - sum(self.times[s][2] for s in later if s in self.times)
        return min(self.times[stage][1], left)

    # ------------------------------------------------------------------------------------------------ stages
    def stage(self, name: str, fn) -> None:
        entry = {"name": name, "status": "running", "seconds": 0.0, "detail": ""}
        self.record["stages"].append(entry)
        t0 = time.monotonic()
        self.say(f"\n===== {name} =====")
        blocked = self.abort if name != "env" else None  # the versions and the GPU still say why an install failed
        if blocked or self.limit(name) < 5:
            entry.update(status="skipped", detail=blocked or "no time left in --budget")
        else:
            try:
                status, detail = fn()
                entry.update(status=status, detail=detail)
            except Exception as exc:  # noqa: BLE001 - a broken stage is reported; the next one still runs
                self.log.write(traceback.format_exc())
                entry.update(status="error", detail=f"{type(exc).__name__}: {exc}")
        entry["seconds"] = round(time.monotonic() - t0, 1)
        self.say(f"----- {name}: {entry['status']} in {entry['seconds']} s: {entry['detail']}")
        self.flush()

    def install(self):
        info = self.record["install"]
        wheels = sorted(f for f in os.listdir(os.path.join(ROOT, WHEELS)) if f.endswith(".whl")) \
            if os.path.isdir(os.path.join(ROOT, WHEELS)) else []
        info["wheels"] = wheels
        ext = self.args.ext if self.args.ext != "auto" else ("skip" if self.args.quick else "build")
        if self.args.dry_run:
            info.update(package="not installed (dry run: the checkout's own environment)",
                        would_run=f"{'ELECTRA_FAST_SKIP_EXT=1 ' if ext == 'skip' else ''}{shlex.join(INSTALL)}",
                        peers=f"not installed (dry run; {len(wheels)} wheel(s) in {WHEELS}/)")
            return "ok", f"dry run: would run `{info['would_run']}`; peers: {len(wheels)} wheel(s) found"
        words = self.installed_package()
        status, installed = "ok", self.installed_here(words, ext)
        if self.args.no_install and not installed:
            info["package"] = f"installed at {os.path.dirname(words[0])} (--no-install)" if words else \
                "not installed (--no-install)"
            if not words:  # the kernels/ room only exists as electra_fast.kernels once installed
                status, self.abort = "failed", "electra_fast is not installed (--no-install; see the install stage)"
        elif installed:
            info["package"] = installed
        else:
            env = dict(self.env, MAX_JOBS=str(os.cpu_count() or 4))
            rc = 1
            if ext == "build":
                rc, timed_out = self.run(INSTALL, self.limit("install"), env=env)
                info["package"] = "editable, C++ extension built" if rc == 0 else \
                    f"C++ extension build failed (exit {rc}{', timed out' if timed_out else ''}, see lane.log)"
            if rc != 0:
                rc, _ = self.run(INSTALL, self.limit("install"), env=dict(env, ELECTRA_FAST_SKIP_EXT="1"))
                skipped = "--quick / --ext skip" if ext == "skip" else "its build failed"
                info["package"] = (f"editable, ELECTRA_FAST_SKIP_EXT=1 ({skipped}): CPU ops on the reference"
                                   if rc == 0 else f"pip install failed (exit {rc}, see lane.log)")
                if rc != 0:  # the checkout's sources do not run uninstalled: kernels/ is electra_fast.kernels
                    status, self.abort = "failed", "the install failed (see the install stage)"
        info["peers"] = self.install_peers(wheels)
        return status, f"package: {info['package']}; peers: {info['peers']}"

    def installed_package(self) -> List[str]:
        """[package file, extension loaded] of the electra_fast this environment imports outside the checkout, or
        [] when it has none."""
        code = "import electra_fast as e, electra_fast.kernels; print(e.__file__, e.extension_loaded())"
        with tempfile.TemporaryDirectory() as tmp:  # not the checkout: its own directory would import from source
            rc, text = _output([sys.executable, "-c", code], 120, self.env, cwd=tmp)
        words = text.split() if rc == 0 else []
        return words[-2:] if len(words) >= 2 else []

    @staticmethod
    def installed_here(words: List[str], ext: str) -> Optional[str]:
        """A note when ``words`` (:meth:`installed_package`) are this checkout's install (editable) with what
        ``ext`` asks for, else None."""
        if not words or not words[0].startswith(os.path.join(ROOT, "electra_fast")):
            return None
        if ext == "build" and words[-1] != "True":
            return None
        return f"already installed from this checkout (C++ extension {'built' if words[-1] == 'True' else 'not built'})"

    def install_peers(self, wheels: List[str]) -> str:
        if not wheels:
            return f"none carried ({WHEELS}/ is empty or missing: `make gpu-wheels` before the run)"
        twice = duplicate_wheels(wheels)
        if twice:
            return f"not installed: two versions of {', '.join(f'{k} ({v})' for k, v in twice.items())} in {WHEELS}/"
        target = tempfile.mkdtemp(prefix="electra_fast-gpu-peers-")
        self.scratch.append(target)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", target] + [os.path.join(WHEELS, w) for w in wheels]
        rc, _ = self.run(cmd, min(60, self.limit("install")))
        if rc != 0:
            return f"pip install of {len(wheels)} wheel(s) failed (exit {rc}, see lane.log)"
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (target, self.env.get("PYTHONPATH")) if p)
        return f"{len(wheels)} wheel(s) installed into {target} (first on PYTHONPATH)"

    def environment(self):
        env = self.record["env"]
        rc, out = _output([sys.executable, "-c", "from electra_fast.gpu_lane import probe; probe()"], 120, self.env)
        line = next((x for x in out.splitlines() if x.startswith("ELECTRA_FAST_ENV ")), None)
        env.update(json.loads(line.split(" ", 1)[1]) if line else {"probe": "failed (see lane.log)"})
        info = "\n".join(x for x in out.splitlines() if x != line)
        env["info"] = info if rc == 0 else f"the environment probe failed (exit {rc}):\n{info}"
        self.say(f"versions: {json.dumps({k: v for k, v in env.items() if k != 'info'})}\n{env['info']}")
        env["nvidia_smi"] = _capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                      "clocks.max.sm,clocks.mem,clocks.max.mem,power.limit", "--format=csv"]) \
            or "nvidia-smi: not available"
        env["clocks"] = _capture(["nvidia-smi", "-q", "-d", "CLOCK"]) or "nvidia-smi -q -d CLOCK: not available"
        self.say(env["nvidia_smi"] + "\n" + env["clocks"])
        what = env.get("gpu") or ("no GPU (dry run)" if self.args.dry_run else "NO GPU VISIBLE")
        status = "ok" if rc == 0 and (self.args.dry_run or env.get("cuda_available")) else "failed"
        if not self.args.dry_run and not env.get("cuda_available"):
            self.abort = "torch sees no CUDA device (see the env stage)"
        return status, f"{what}; torch {env.get('torch')} (cuda {env.get('cuda')}), triton {env.get('triton')}, " \
                       f"transformers {env.get('transformers')}"

    def pytest_stage(self, key: str, paths: List[str], select: Optional[str], extra: List[str]):
        junit = self.path(key)
        # -v on a GPU: each test's result lands in lane.log as it finishes, so a run cut off still says what passed.
        # --continue-on-collection-errors: a test module that cannot import on the GPU image's versions fails alone.
        cmd = [sys.executable, "-m", "pytest", *paths, "-p", "no:cacheprovider", "-q" if self.args.dry_run else "-v",
               "-rfE", "--durations=10", f"--junitxml={junit}", "-o", "junit_family=xunit1",
               "--continue-on-collection-errors"] + (["-k", select] if select else []) + extra
        workers = self.args.workers if self.args.workers is not None else (0 if self.args.dry_run else 8)
        if workers and importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(workers)]  # parallel Triton compiles; a crashed worker fails its test, not the run
        if importlib.util.find_spec("pytest_timeout") is not None and not self.args.dry_run:
            cmd += ["--timeout=300", f"--timeout-method={'thread' if workers else 'signal'}"]
        rc, timed_out = self.run(cmd, self.limit(key))
        counts = junit_counts(junit)
        if "unreadable" in counts:
            return ("timeout" if timed_out else "failed"), f"exit {rc}, no JUnit report ({counts['unreadable']}); " \
                                                           "the tests that ran are in lane.log"
        self.record.setdefault("tests", {})[key] = counts
        text = f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, " \
               f"{counts['skipped']} skipped ({FILES[key]})"
        if rc == 5:
            text += ": no test was selected"
        ok = rc == 0 and not counts["failed"] and not counts["errors"]
        return ("ok" if ok else "failed"), text

    def suite(self):
        paths, select = SUITE_DRY if self.args.dry_run else SUITE_GPU
        return self.pytest_stage("suite", paths, select, [])

    def gpu_tests(self):
        return self.pytest_stage("gpu-tests", ["tests/gpu"], None, ["-m", "not slow"] if self.args.quick else [])

    def bench_stage(self):
        bdir = bench.bench_dir()
        files, left_out = bench_plan(bench.bench_files(bdir), self.mode)
        env = dict(self.env, ELECTRA_FAST_BENCH_QUICK="1" if self.args.quick or self.args.dry_run else "0")
        merged, failed, stopped = bench.MergedResults(), [], None
        for name, why in left_out:
            merged.skip(name, why)
        with tempfile.TemporaryDirectory() as tmp:
            for name in files:
                limit = min(self.limit("bench"), BENCH_FILE_CAP_S)
                if limit < 10:
                    stopped = name
                    break
                part = os.path.join(tmp, name + ".json")
                cmd = bench.pytest_command(name, "cpu" if self.args.dry_run else "cuda", part) + ["-rs"]
                rc, timed_out = self.run(cmd, limit, cwd=bdir, env=env)
                if rc not in (0, 5):
                    failed.append(f"{name} (exit {rc}{', timed out' if timed_out else ''})")
                if rc in (0, 5) or os.path.exists(part):  # no JSON after 0 / 5: every row skipped on this device
                    merged.add(name, part)
                else:  # cut off or crashed before pytest-benchmark wrote anything: not a skip
                    merged.skip(name, f"no rows: the file {'timed out' if timed_out else f'failed (exit {rc})'} "
                                "before writing them (see lane.log)")
                if merged.data is not None:
                    merged.data["machine_info"]["gpu_lane"] = {"mode": self.mode, "env": self.record["env"]}
                    merged.write(self.path("bench"))
                self.record["bench"] = {"files": files, "rows": len((merged.data or {}).get("benchmarks", [])),
                                        "failed": failed}
                self.flush()
                if timed_out:
                    stopped = name
                    break
        rows = len((merged.data or {}).get("benchmarks", []))
        detail = f"{rows} rows from {len(files)} files ({FILES['bench']})"
        if failed:
            detail += f"; failed: {', '.join(failed)}"
        if stopped:
            detail += f"; out of time at {stopped}"
        return ("ok" if not failed and not stopped and rows else "failed"), detail

    # ------------------------------------------------------------------------------------------------ reports
    def flush(self) -> None:
        self.record["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_text(self.path("lane"), json.dumps(self.record, indent=2, default=str))
        write_text(self.path("summary"), summary(self.record, self.out))

    def main(self) -> int:
        self.say(f"GPU lane ({self.mode}) on {self.device} -> {self.out}; budget {self.record['budget_s']} s, "
                 f"estimate {self.record['estimate_s']} s")
        self.flush()
        for name, fn in (("install", self.install), ("env", self.environment), ("suite", self.suite),
                         ("gpu-tests", self.gpu_tests), ("bench", self.bench_stage)):
            self.stage(name, fn)
        for folder in self.scratch:
            shutil.rmtree(folder, ignore_errors=True)
        self.record["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.flush()
        bad = [s["name"] for s in self.record["stages"] if s["status"] != "ok"]
        self.say("\n" + "\n".join(f"{s['name']:<10} {s['status']:<8} {s['seconds']:>6} s  {s['detail']}"
                                    for s in self.record["stages"]))
        self.say(f"GPU lane done in {self.record['elapsed_s']} s: "
                 f"{'every stage passed' if not bad else 'not ok: ' + ', '.join(bad)}; files in {self.out}")
        self.log.close()
        return 1 if bad else 0


PACKAGES = ("triton", "transformers", "numpy", "pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout",
            "disentangled-flash", "flashdeberta", "liger-kernel", "cut-cross-entropy")


def probe() -> None:
    """Run in a child (the env stage): one JSON line of versions and the GPU, then ``electra_fast.info``'s report."""
    import importlib.metadata
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
    for name in PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    print("ELECTRA_FAST_ENV " + json.dumps(env), flush=True)
    from .info import report

    print(report())


def summary(record: dict, out: str) -> str:
    """SUMMARY.md: the run, the stages, the failures, the benchmark table and the rows left out."""
    env = record.get("env", {})
    lines = [f"# GPU lane: {record['device']}, {record['started'][:10]} ({record['mode']})", ""]
    if record["mode"] == "dry-run":
        lines += ["Dry run: CPU tensors, the Triton interpreter, tiny shapes, one round without warm-up. It checks the "
                  "lane's plumbing; its timings say nothing about speed.", ""]
    lines += [
        f"commit {record.get('commit')}{' (uncommitted changes)' if record.get('dirty') else ''} · "
        f"python {env.get('python')} · torch {env.get('torch')} (cuda {env.get('cuda')}) · triton "
        f"{env.get('triton')} · transformers {env.get('transformers')} · {record.get('elapsed_s')} s of a "
        f"{record['budget_s']} s budget (estimate {record['estimate_s']} s)", "",
        f"install: {record.get('install', {}).get('package', '-')}; peers: "
        f"{record.get('install', {}).get('peers', '-')}", "",
        "| stage | status | seconds | result |", "|---|---|---|---|"]
    for s in record["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['detail']} |")
    failures = [f for counts in record.get("tests", {}).values() for f in counts.get("failures", [])]
    if failures:
        lines += ["", f"## Failed tests ({len(failures)})", ""]
        lines += [f"- `{test}`: {msg}" for test, msg in failures[:60]]
    bench_json = os.path.join(out, FILES["bench"])
    if os.path.exists(bench_json):
        data = json.load(open(bench_json))
        lines += ["", "## Benchmarks", "", bench_report.table(bench_json)]
        skipped = data.get("machine_info", {}).get("skipped", [])
        if skipped:
            lines += ["", f"### Rows and files left out ({len(skipped)})", ""]
            lines += [f"- `{s['test']}`: {s['reason']}" for s in skipped]
    if env.get("nvidia_smi"):
        lines += ["", "## GPU", "", "```", env["nvidia_smi"], "```", "", "```", env.get("clocks", ""), "```"]
    if env.get("info"):
        lines += ["", "## python -m electra_fast.info", "", "```", env["info"], "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m electra_fast.gpu_lane", description=help_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 4 minutes: no C++ build, no slow GPU tests, "
                        "the benchmarks' quick shapes")
    parser.add_argument("--dry-run", action="store_true", help="the whole plumbing on CPU (Triton interpreter, tiny "
                        "shapes, one round, peers skipped, nothing installed)")
    parser.add_argument("--out", default=None, help="output directory, new or empty (default: "
                        "bench/results/gpu-<device>-<date>/)")
    parser.add_argument("--budget", type=int, default=None, help="seconds for the whole lane (default: 240 quick, "
                        "480 full, 300 dry run); stages that run over are stopped")
    parser.add_argument("--ext", choices=("auto", "build", "skip"), default="auto", help="the C++ extension: build "
                        "it (default of the full lane), or skip it (default of --quick)")
    parser.add_argument("--no-install", action="store_true", help="use the environment as it is (package installed)")
    parser.add_argument("--workers", type=int, default=None, help="pytest-xdist workers for the test stages "
                        "(default 8 on a GPU when pytest-xdist is installed, 0 in the dry run)")
    args = parser.parse_args(argv)
    if args.quick and args.dry_run:
        raise UsageError("--quick and --dry-run: pick one (the dry run is already the smallest)")
    mode = mode_of(args)
    if args.budget is not None and args.budget < min_budget(mode):
        raise UsageError(f"--budget: expected at least {min_budget(mode)} seconds for the {mode} lane (what the later "
                         f"stages keep back, and the install's own time), got {args.budget}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers: expected 0 or more, got {args.workers}")
    return args


def _gpu_visible() -> bool:
    try:
        import torch
    except ImportError:  # the env stage says what is missing
        return True
    return torch.cuda.is_available()


def main(argv=None) -> int:
    paths_printable()
    try:
        args = parse_args(argv)
        device = gpu_name(args.dry_run)
        if device == "unknown-gpu" and not _gpu_visible():  # before a results folder is made in the checkout
            raise UsageError("no GPU is visible (neither nvidia-smi nor torch finds one); --dry-run runs the lane's "
                             "plumbing on CPU")
        out = resolve_out(args.out, device)
    except UsageError as exc:
        say(f"python -m electra_fast.gpu_lane: {exc}")
        return 2
    return Lane(args, out, device).main()


if __name__ == "__main__":
    sys.exit(main())
