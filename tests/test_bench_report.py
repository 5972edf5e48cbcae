"""The benchmark report and the regression gate (synthetic pytest-benchmark JSON)."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from electra_fast import bench_report


def _bench(op, impl, median, shape="32x512", pass_="fwd+bwd", tokens=16384, mem=1000):
    return {"stats": {"median": median}, "extra_info": {
        "op": op, "impl": impl, "pass_": pass_, "shape": shape, "dtype": "float32", "tokens": tokens,
        "tokens_per_s": tokens / median, "peak_mem_bytes": mem}}


def _write(path, benchmarks):
    path.write_text(json.dumps({"machine_info": {"electra_fast_machine": "test cpu", "cores": 2},
                                "datetime": "2026-11-22T00:00:00", "benchmarks": benchmarks}))
    return str(path)


def test_speedups_pair_rows_of_the_same_group(tmp_path):
    p = _write(tmp_path / "a.json", [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 4.0),
                                     _bench("rtd", "eager", 9.0, shape="8x8"),  # no fused row: no ratio
                                     _bench("attn", "fused", 2.0), _bench("attn", "transformers", 3.0)])
    sp = bench_report.speedups(bench_report.load_groups(p))
    assert sp == {(("rtd", "fwd+bwd", "32x512", "float32"), "eager"): 4.0,
                  (("attn", "fwd+bwd", "32x512", "float32"), "transformers"): 1.5}


def test_gate_fails_on_a_synthetic_slowdown(tmp_path):
    prev = _write(tmp_path / "prev.json", [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 4.0)])
    same = _write(tmp_path / "same.json", [_bench("rtd", "fused", 1.1), _bench("rtd", "eager", 4.0)])  # -9%
    slow = _write(tmp_path / "slow.json", [_bench("rtd", "fused", 1.25), _bench("rtd", "eager", 4.0)])  # -20%
    assert bench_report.compare(same, prev) == []
    problems = bench_report.compare(slow, prev)
    assert len(problems) == 1 and "4.00x -> 3.20x" in problems[0]


def test_results_md_and_plots(tmp_path):
    rows = [_bench("attn", impl, m * t / 128, shape=f"2x{t}", mem=t * 10)
            for t in (128, 256, 512) for impl, m in (("fused", 1.0), ("transformers", 3.0))]
    p = _write(tmp_path / "cpu-2026-11-22.json", rows)
    images = bench_report.plots(p, str(tmp_path))
    assert any(i.endswith("-speedups.png") for i in images) and any("scaling" in i for i in images)
    md = tmp_path / "RESULTS.md"
    bench_report.write_results_md([p], str(md), {p: images})
    text = md.read_text()
    assert "| attn | fwd+bwd | 2x512 | float32 | transformers |" in text and "**3.00x**" in text
    assert "test cpu" in text and "scaling.png" in text


def test_results_md_is_utf8_whatever_the_locale(tmp_path):
    """Review finding: under LC_ALL=C (PYTHONUTF8=0) RESULTS.md was opened in the locale's ASCII, truncated, then the
    first "\u2014" raised UnicodeEncodeError: every benchmark ran, RESULTS.md was left empty, and every later bench
    refused the folder as not its own."""
    p = _write(tmp_path / "cpu-2026-11-22.json", [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 4.0)])
    md = tmp_path / "RESULTS.md"
    code = ("import sys; from electra_fast import bench_report; "
            "bench_report.write_results_md([sys.argv[1]], sys.argv[2], {})")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8", "PYTHONIOENCODING"))}
    proc = subprocess.run([sys.executable, "-c", code, p, str(md)], env=dict(env, LC_ALL="C", PYTHONUTF8="0"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = md.read_bytes().decode("utf-8")
    assert text.startswith(bench_report.RESULTS_TITLE) and "test cpu (2 cores) \u2014 `cpu-2026-11-22.json`" in text


def test_a_failed_results_md_write_keeps_the_old_one_and_an_emptied_one_is_replaced(tmp_path, monkeypatch):
    """RESULTS.md is written through a temporary renamed over it: a write that fails (a full disk) leaves the old
    one whole, where the file opened in place was already emptied. One an earlier version emptied is not refused."""
    import builtins
    import errno
    from electra_fast import bench
    p = _write(tmp_path / "cpu-2026-11-22.json", [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 4.0)])
    md = tmp_path / "RESULTS.md"
    md.write_text(bench_report.RESULTS_TITLE + "\nthe last run's\n", encoding="utf-8")
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Full(f) if "w" in mode and os.path.basename(str(file)).startswith("RESULTS.md") else f

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(OSError, match="No space left on device"):
        bench_report.write_results_md([p], str(md), {})
    monkeypatch.undo()
    assert md.read_text(encoding="utf-8") == bench_report.RESULTS_TITLE + "\nthe last run's\n"
    assert sorted(os.listdir(tmp_path)) == ["RESULTS.md", "cpu-2026-11-22.json"]
    md.write_bytes(b"")
    args = argparse.Namespace(pretrain=False, quick=True, select=None, compare=None, device=None, out=str(tmp_path))
    assert bench.check_args(args) is None


def test_cli_compare_exit_code(tmp_path, monkeypatch):
    """`electra-fast bench --compare` exits non-zero on a regression (pytest run stubbed out)."""
    from electra_fast import bench as bench_cli

    prev = _write(tmp_path / "prev.json", [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 4.0)])

    def fake_call(cmd, cwd, env):
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
        _write(__import__("pathlib").Path(out), [_bench("rtd", "fused", 2.0), _bench("rtd", "eager", 4.0)])
        return 0

    monkeypatch.setattr(bench_cli.subprocess, "call", fake_call)
    args = type("A", (), dict(quick=True, device="cpu", out=str(tmp_path / "out"), compare=prev, select=None))
    assert bench_cli.main(args) == 1
    args.compare = None
    assert bench_cli.main(args) == 0
    assert (tmp_path / "out" / "RESULTS.md").exists()


def test_pretrain_record_and_newest_selection(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    full = _write(results / "cpu-x-2026-11-20.json", [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 2.0)])
    _write(results / "cpu-x-2026-11-21-quick.json", [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 9.0)])
    (results / "cpu-x-2026-11-21-pretrain-default.json").write_text(json.dumps({
        "steps": 300, "tokens_seen": 614400, "wall_time_s": 150.0, "tokens_per_s": 4096.0, "first_loss": 43.6,
        "final": {"loss": 26.1, "mlm_loss": 5.7, "rtd_loss": 0.41, "discriminator_accuracy": 0.86},
        "machine": "test cpu", "threads": 2}))
    assert bench_report.newest_per_machine(str(results)) == [full]  # a full run beats a newer quick one
    # other records dated later (a demo's record, a model config) are not benchmark runs: they never stand in
    (results / "cpu-x-2026-11-22-finetune-demo.json").write_text(json.dumps({"results": []}))
    (results / "cpu-x-2026-11-23-model.json").write_text("{}")
    assert bench_report.newest_per_machine(str(results)) == [full]
    md = tmp_path / "RESULTS.md"
    bench_report.write_results_md([full], str(md), {})
    text = md.read_text()
    assert "The default pretraining job" in text and "43.600 -> 26.100" in text and "4,096" in text


def test_runs_never_overwrite_and_compare_needs_rows_in_common(tmp_path, monkeypatch, capsys):
    """Review findings: a second run of the day overwrote the first (its JSON, the --compare baseline: the run then
    compared itself with itself and passed); a -k run stood in for the machine's full run (README's table); a
    --compare with no row in common passed; the day's numbered runs order by number."""
    from electra_fast import bench as bench_cli

    speed = {"v": 2.0}

    def fake_call(cmd, cwd, env):
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
        _write(__import__("pathlib").Path(out), [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", speed["v"])])
        return 0

    monkeypatch.setattr(bench_cli.subprocess, "call", fake_call)
    monkeypatch.setattr(bench_cli, "bench_files", lambda bdir: ["test_bench_rtd_loss.py"])
    monkeypatch.setattr(bench_cli, "selected_files", lambda bdir, device, select, env: bench_cli.bench_files(bdir))
    monkeypatch.setattr(bench_report, "result_name", lambda device=None: "cpu-x-2026-12-06")
    out = tmp_path / "out"
    args = type("A", (), dict(quick=False, device="cpu", out=str(out), compare=None, select=None))
    assert bench_cli.main(args) == 0
    first = out / "cpu-x-2026-12-06.json"
    before = first.read_text()
    speed["v"] = 0.5  # a 4x slower fused path, compared with the day's first run
    args.compare = str(first)
    assert bench_cli.main(args) == 1 and "REGRESSION rtd" in capsys.readouterr().err
    assert first.read_text() == before and (out / "cpu-x-2026-12-06-2.json").exists()
    args.compare, args.select = None, "rtd"
    assert bench_cli.main(args) == 0 and (out / "cpu-x-2026-12-06-select.json").exists()
    assert bench_report.newest_per_machine(str(out)) == [str(out / "cpu-x-2026-12-06-2.json")]
    other = _write(tmp_path / "other.json", [_bench("attn", "fused", 1.0), _bench("attn", "eager", 2.0)])
    args.compare, args.select = other, None
    assert bench_cli.main(args) == 1 and "nothing was compared" in capsys.readouterr().err
    for n in range(3, 11):  # the day's 10th run is newer than its 2nd (by number, not by name)
        _write(out / f"cpu-x-2026-12-06-{n}.json", [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 2.0)])
    assert bench_report.newest_per_machine(str(out)) == [str(out / "cpu-x-2026-12-06-10.json")]
    quick = tmp_path / "quick"  # quick runs number the same way (the 2nd was -quick-2.json, which nothing read)
    args = type("A", (), dict(quick=True, device="cpu", out=str(quick), compare=None, select=None))
    assert bench_cli.main(args) == 0 and bench_cli.main(args) == 0
    assert bench_report.newest_per_machine(str(quick)) == [str(quick / "cpu-x-2026-12-06-2-quick.json")]
    assert bench_report.readme_results(str(quick)) == []  # quick runs are smoke tests
    # a bench file that fails: the finished files' rows stay, never under a full run's name
    monkeypatch.setattr(bench_cli, "bench_files", lambda bdir: ["test_bench_a.py", "test_bench_b.py"])
    real_call = fake_call
    monkeypatch.setattr(bench_cli.subprocess, "call",
                        lambda cmd, cwd, env: 1 if cmd[3] == "test_bench_b.py" else real_call(cmd, cwd, env))
    failed = tmp_path / "failed"
    args = type("A", (), dict(quick=False, device="cpu", out=str(failed), compare=None, select=None))
    assert bench_cli.main(args) == 1
    assert os.listdir(failed) == ["cpu-x-2026-12-06-partial.json"]
    assert bench_report.newest_per_machine(str(failed)) == []
    # a baseline whose machine_info is null is compared, not a crash after the run
    nulls = tmp_path / "null.json"
    nulls.write_text(json.dumps({"machine_info": None, "benchmarks": [_bench("rtd", "fused", 1.0),
                                                                      _bench("rtd", "eager", 2.0)]}))
    assert bench_report.mismatch(str(out / "cpu-x-2026-12-06-10.json"), str(nulls)) == [
        "--compare: another machine (None there, 'test cpu' here)"]


def test_a_cpu_run_is_named_after_the_cpu_and_plots_belong_to_their_json(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    assert bench_report.machine_name("cuda") == bench_report.machine_name() == "NVIDIA H200"
    assert bench_report.machine_name("cpu") != "NVIDIA H200"  # --device cpu on a GPU machine: the CPU's name
    rows = [_bench("attn", impl, m * t / 128, shape=f"2x{t}") for t in (128, 256, 512)
            for impl, m in (("fused", 1.0), ("transformers", 3.0))]
    p = _write(tmp_path / "cpu-2026-12-05.json", rows)
    images = bench_report.plots(p, str(tmp_path))
    (tmp_path / "cpu-2026-12-05-varlen-scaling.png").write_bytes(b"another file's plot")
    md = tmp_path / "RESULTS.md"
    bench_report.write_results_md([p], str(md), {})
    text = md.read_text()
    assert all(os.path.basename(i) in text for i in images) and "varlen-scaling" not in text


def test_a_selection_runs_only_the_files_it_picks():
    """`bench -k` collects once: a file without a picked row is not run (a no-match started every file, ~53 s)."""
    from electra_fast import bench as bench_cli
    bdir, env = bench_cli.bench_dir(), dict(os.environ, ELECTRA_FAST_BENCH_QUICK="1")
    assert bench_cli.selected_files(bdir, "cpu", "rtd_loss", env) == ["test_bench_rtd_loss.py"]
    assert bench_cli.selected_files(bdir, "cpu", "no_row_is_named_so", env) == []
    picked = bench_cli.selected_files(bdir, "cpu", "dropout", env)
    assert "test_bench_dropout.py" in picked and "test_bench_masking.py" not in picked


def test_bench_keeps_what_was_on_disk_and_refuses_bad_out_or_compare(tmp_path, monkeypatch, capsys):
    """Review findings: a second failed run replaced the first's -partial.json; --out's RESULTS.md (a user's own
    notes, or the first run's table) was overwritten with only the newest run; --out under a file and a --compare
    JSON whose fused median is 0 were tracebacks; a results JSON that is no run crashed the report after the
    benchmarks ran; a -k expression starting with "-" reached pytest as an option."""
    from electra_fast import bench as bench_cli

    calls = []

    def fake_call(cmd, cwd, env):
        calls.append(cmd)
        if cmd[3] == "test_bench_b.py":
            return 1
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
        _write(__import__("pathlib").Path(out), [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 2.0)])
        return 0

    monkeypatch.setattr(bench_cli.subprocess, "call", fake_call)
    monkeypatch.setattr(bench_cli, "bench_files", lambda bdir: ["test_bench_a.py", "test_bench_b.py"])
    monkeypatch.setattr(bench_report, "result_name", lambda device=None: "cpu-x-2026-12-06")
    failed = tmp_path / "failed"
    args = type("A", (), dict(quick=False, device="cpu", out=str(failed), compare=None, select=None))
    assert bench_cli.main(args) == 1 and bench_cli.main(args) == 1
    assert sorted(os.listdir(failed)) == ["cpu-x-2026-12-06-2-partial.json", "cpu-x-2026-12-06-partial.json"]

    monkeypatch.setattr(bench_cli, "bench_files", lambda bdir: ["test_bench_a.py"])
    out = tmp_path / "out"
    args = type("A", (), dict(quick=False, device="cpu", out=str(out), compare=None, select=None))
    assert bench_cli.main(args) == 0 and bench_cli.main(args) == 0
    text = (out / "RESULTS.md").read_text()
    assert "cpu-x-2026-12-06-2.json" in text  # the newest run of the machine; the file is the command's own
    (out / "cpu-x-2026-12-07.json").write_text("[1]")  # a run's name, not a run: passed over
    assert bench_report.newest_per_machine(str(out)) == [str(out / "cpu-x-2026-12-06-2.json")]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "RESULTS.md").write_text("my own notes\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    rows = [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 2.0)]
    rows[0]["stats"]["median"] = 0.0  # a hand-edited or broken baseline
    zero = _write(tmp_path / "zero.json", rows)
    capsys.readouterr()
    for bad, match in ((dict(out=str(notes)), "was not written by electra-fast bench"),
                       (dict(out=str(afile / "sub")), "is not a directory"),
                       (dict(out=str(out), compare=zero), "--compare:")):
        calls.clear()
        args = type("A", (), dict(dict(quick=False, device="cpu", out=None, compare=None, select=None), **bad))
        assert bench_cli.main(args) == 2 and not calls
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err
    assert (notes / "RESULTS.md").read_text() == "my own notes\n"
    assert bench_cli.pytest_command("test_bench_a.py", "cpu", "p.json", "-rtd")[-1] == "-k-rtd"


def test_bench_never_writes_over_user_plots_and_skips_runs_it_cannot_report(tmp_path, monkeypatch, capsys):
    """Review findings: a PNG left under this run's plot name (a run whose JSON was deleted, or the user's) was
    overwritten; --out "" split the results between the checkout and the working directory; a read-only --out
    failed after the benchmarks ran, their results lost; a run-named JSON with a median of 0, no stats.median or
    extra_info null was a traceback (ZeroDivisionError, KeyError, TypeError) after the benchmarks ran."""
    from electra_fast import bench as bench_cli

    calls = []

    def fake_call(cmd, cwd, env):
        calls.append(cmd)
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
        _write(__import__("pathlib").Path(out), [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 2.0)])
        return 0

    monkeypatch.setattr(bench_cli.subprocess, "call", fake_call)
    monkeypatch.setattr(bench_cli, "bench_files", lambda bdir: ["test_bench_a.py"])
    monkeypatch.setattr(bench_report, "result_name", lambda device=None: "cpu-x-2026-12-07")
    out = tmp_path / "out"
    out.mkdir()
    (out / "cpu-x-2026-12-07-speedups.png").write_text("the user's plot")
    broken = {"zero": 0.0, "no-median": None, "null-info": 1.0}
    for name, median in broken.items():
        rows = [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 2.0)]
        if name == "no-median":
            del rows[0]["stats"]["median"]
        elif name == "null-info":
            rows[1]["extra_info"]["peak_mem_bytes"] = "lots"
        else:
            rows[0]["stats"]["median"] = median
        _write(out / f"cpu-{name}-2026-12-01.json", rows)
    args = type("A", (), dict(quick=False, device="cpu", out=str(out), compare=None, select=None))
    capsys.readouterr()
    assert bench_cli.main(args) == 0
    err = capsys.readouterr().err
    for name in broken:
        assert f"warning: skipping {out / f'cpu-{name}-2026-12-01.json'}: " in err, err
    assert (out / "cpu-x-2026-12-07-speedups.png").read_text() == "the user's plot"
    assert (out / "cpu-x-2026-12-07-2.json").is_file() and (out / "cpu-x-2026-12-07-2-speedups.png").is_file()
    assert not (out / "cpu-x-2026-12-07.json").exists()
    assert "cpu-x-2026-12-07-2.json" in (out / "RESULTS.md").read_text()

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    monkeypatch.setattr(bench_cli.os, "access", lambda path, mode: os.path.abspath(path) != str(readonly))
    for bad, match in ((dict(out=""), "--out: empty; name a directory"),
                       (dict(out=str(readonly / "sub")), f"--out: {readonly} is not writable")):
        calls.clear()
        args = type("A", (), dict(dict(quick=False, device="cpu", out=None, compare=None, select=None), **bad))
        assert bench_cli.main(args) == 2 and not calls
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err


def test_readme_caption_names_a_forced_backend_and_a_missing_extension(tmp_path):
    """A run on ELECTRA_FAST_BACKEND=reference, or without the C++ extension, became README's table unlabelled."""
    path = tmp_path / "cpu-x-2026-12-06.json"
    path.write_text(json.dumps({"machine_info": {"electra_fast_machine": "test cpu", "extension": False,
                                                 "forced_backend": "reference"},
                                "datetime": "2026-12-06T00:00:00",
                                "benchmarks": [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 2.0)]}))
    caption = bench_report.readme_table([str(path)], str(tmp_path)).splitlines()[0]
    assert "**C++ extension NOT built**" in caption and "forced 'reference' backend" in caption
    data = json.loads(path.read_text())
    data["machine_info"].update(extension=True, forced_backend=None)
    path.write_text(json.dumps(data))
    caption = bench_report.readme_table([str(path)], str(tmp_path)).splitlines()[0]
    assert "NOT built" not in caption and "forced" not in caption


def test_compare_refuses_a_baseline_median_that_is_no_time(tmp_path, monkeypatch, capsys):
    """A --compare JSON whose fused median is NaN gave a NaN ratio, which compares False with the limit: the gate
    passed any regression. Such a median (NaN, inf, negative, null) is refused in one line before anything runs."""
    from electra_fast import bench as bench_cli

    calls = []
    monkeypatch.setattr(bench_cli.subprocess, "call", lambda cmd, cwd, env: calls.append(cmd) or 1)
    for impl, median in (("fused", float("nan")), ("fused", float("inf")), ("eager", -1.0), ("fused", None)):
        rows = [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 2.0)]
        rows[impl == "eager"]["stats"]["median"] = median
        prev = _write(tmp_path / "prev.json", rows)
        args = type("A", (), dict(quick=False, device="cpu", out=str(tmp_path / "out"), compare=prev, select=None))
        assert bench_cli.main(args) == 2 and not calls, median
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--compare:" in err and f"{impl} median of rtd" in err, err


def test_unreadable_pretrain_records_are_skipped_and_records_are_written_whole(tmp_path, monkeypatch, capsys):
    """An empty *-pretrain-default.json (a record_pretrain cut short) or one with tokens_per_s null was a traceback
    in every later bench, after the benchmarks ran; record_pretrain wrote in place, so a stopped run left one."""
    from electra_fast import bench as bench_cli
    from electra_fast import train

    results = tmp_path / "results"
    results.mkdir()
    good = {"steps": 300, "tokens_seen": 614400, "wall_time_s": 150.0, "tokens_per_s": 4096.0, "first_loss": 43.6,
            "final": {"loss": 26.1}, "machine": "test cpu", "threads": 2}
    (results / "a-pretrain-default.json").write_text("")
    (results / "b-pretrain-default.json").write_text(json.dumps(dict(good, tokens_per_s=None)))
    (results / "c-pretrain-default.json").write_text(json.dumps(good))
    full = _write(results / "cpu-x-2026-11-20.json", [_bench("rtd", "fused", 1.0), _bench("rtd", "eager", 2.0)])
    bench_report.write_results_md([full], str(tmp_path / "RESULTS.md"), {})
    text = (tmp_path / "RESULTS.md").read_text()
    assert "`c-pretrain-default.json`" in text and "a-pretrain" not in text and "b-pretrain" not in text
    err = capsys.readouterr().err
    assert "a-pretrain-default.json" in err and "b-pretrain-default.json" in err

    # a summary json cannot write (a run stopped while writing, in effect): no record at all, not an empty one
    summary = dict(good, precision="fp32", final={"loss": object()})
    monkeypatch.setattr(train, "pretrain", lambda *a, **k: summary)
    monkeypatch.setattr(bench_report, "result_name", lambda device=None: "cpu-y-2026-12-06")
    out = tmp_path / "rec"
    out.mkdir()
    with pytest.raises(TypeError):
        bench_cli.record_pretrain(str(out), "cpu")
    assert os.listdir(out) == []
    summary["final"] = {"loss": 26.1}
    path = bench_cli.record_pretrain(str(out), "cpu")
    assert os.listdir(out) == [os.path.basename(path)] and json.loads(open(path).read())["tokens_per_s"] == 4096.0


def test_results_of_a_changed_checkout_are_labelled_dirty(tmp_path):
    """bench/conftest.py recorded the clean commit for results measured with uncommitted changes."""
    import importlib.util
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "conftest.py"),
                repo / "conftest.py")

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", "conftest.py")
    git("commit", "-q", "-m", "x")
    spec = importlib.util.spec_from_file_location("bench_conftest_copy", repo / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    config = type("C", (), {"getoption": staticmethod(lambda name: None)})

    def commit():
        info = {}
        conftest.pytest_benchmark_update_machine_info(config, info)
        return info["git_commit"]

    head = git("rev-parse", "--short", "HEAD")
    (repo / "untracked.txt").write_text("not part of the code")
    assert commit() == head
    with open(repo / "conftest.py", "a") as fh:
        fh.write("# changed\n")
    assert commit() == head + "-dirty"
