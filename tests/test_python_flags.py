"""Under ``python -OO`` (docstrings stripped, asserts gone): every entry point's ``--help`` still works (three split
``__doc__`` for their description and died on None), and the embedded corpus, read from the standard library's
docstrings, is refused in one line instead of silently shrinking to a seventh of its text."""
import os
import subprocess
import sys
import tempfile

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
MODULES = ["electra_fast", "electra_fast.finetune.demo", "electra_fast.gpu_lane", "electra_fast.bench_report",
           "electra_fast.info", "electra_fast.demo", "electra_fast.kernels.check"]
SCRIPTS = ["finetune_probes.py", "parity_report.py", "patch_step_timing.py", "sweep.py"]

# one interpreter for all of them (each import of torch costs seconds): runpy, as `python -m` / `python FILE` run them
PROBE = """
import contextlib, io, json, runpy, sys
codes = {}
for kind, name in json.loads(sys.argv[1]):
    sys.argv = [name, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            (runpy.run_module if kind == "m" else runpy.run_path)(name, run_name="__main__")
        codes[name] = 0
    except SystemExit as e:
        codes[name] = e.code
    except BaseException as e:
        codes[name] = repr(e)
print(json.dumps(codes))
"""


def _run(args, **kw):
    # outside the checkout: its kernels/ must not shadow anything (the installed package is what runs)
    return subprocess.run([sys.executable, "-OO", *args], capture_output=True, text=True, timeout=600,
                          cwd=tempfile.gettempdir(), **kw)


def test_every_entry_points_help_under_OO():
    import json
    names = [["m", m] for m in MODULES] + [["p", os.path.join(TOOLS, s)] for s in SCRIPTS]
    proc = _run(["-c", PROBE, json.dumps(names)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == {n: 0 for _, n in names}, codes


def test_the_embedded_corpus_is_refused_under_OO(tmp_path):
    out = tmp_path / "run"
    proc = _run(["-m", "electra_fast", "pretrain", "--steps", "1", "--no-progress", "--out", str(out)])
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert "python -OO" in err[0] and "--data" in err[0], err
