"""README.md's performance table: generated from the benchmark JSON by bench_report, never typed by hand."""
import json
import os

import pytest

from electra_fast import bench_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "bench", "results")


def test_readme_table_is_what_the_committed_json_says():
    text, regenerated = bench_report.readme_with_table(README, RESULTS)
    assert text == regenerated, ("README.md's performance table differs from the benchmark JSON: run "
                                 "`python -m electra_fast.bench_report --readme`")
    # and independently of the generator: each headline row's speed-up, from the raw JSON of each machine
    _, block, _ = bench_report._split_readme(text, README)
    shown = 0
    for path in bench_report.readme_results(RESULTS):
        medians = {}
        for bm in json.load(open(path))["benchmarks"]:
            i = bm.get("extra_info", {})
            if "op" in i and bm.get("stats"):
                medians[(i["op"], i["pass_"], i["shape"], i["dtype"], i["impl"])] = bm["stats"]["median"]
        assert f"]({os.path.relpath(path, ROOT)})" in block
        for h in bench_report.HEADLINES:
            fused, base = (medians.get((h.op, h.pass_, h.shape, h.dtype, impl)) for impl in ("fused", h.baseline))
            if fused and base:
                assert f" | {base / fused:.2f}x | " in block, h
                shown += 1
    assert shown >= 10  # the committed CPU run holds every headline comparison but a few


def _bench(op, impl, median, shape="256x512", dtype="float32", pass_="fwd+bwd", mem=1000):
    return {"stats": {"median": median}, "extra_info": {
        "op": op, "impl": impl, "pass_": pass_, "shape": shape, "dtype": dtype, "tokens_per_s": 1.0,
        "peak_mem_bytes": mem}}


def _write(path, benchmarks, machine="test cpu", commit="abc1234"):
    path.write_text(json.dumps({"machine_info": {"electra_fast_machine": machine, "cores": 2, "torch_threads": 2,
                                                 "torch": "2.13.0+cpu", "git_commit": commit},
                                "datetime": "2026-11-22T10:00:00", "benchmarks": benchmarks}))
    return str(path)


def _checkout(tmp_path, readme_text="# x\n\n## Performance\n\nintro\n\n<!-- perf-table:start -->\nold\n"
                                    "<!-- perf-table:end -->\n\nafter\n"):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    readme = tmp_path / "README.md"
    readme.write_text(readme_text)
    return readme, results


def test_generator_rows_machines_and_quick_runs(tmp_path):
    readme, results = _checkout(tmp_path)
    _write(results / "cpu-a-2026-11-20.json", [_bench("rtd_loss", "fused", 0.5, mem=250),
                                               _bench("rtd_loss", "eager", 2.0, mem=1000)], commit="old0000")
    _write(results / "cpu-a-2026-11-22.json", [
        _bench("rtd_loss", "fused", 0.000131, mem=250), _bench("rtd_loss", "eager", 0.000459, mem=1000),
        _bench("disentangled_attention", "fused", 0.165, shape="8x512", dtype="bfloat16"),
        _bench("disentangled_attention", "transformers", 0.833, shape="8x512", dtype="bfloat16"),
        _bench("dropout", "fused", 0.00134, shape="4096x256"),  # no baseline row: left out
        _bench("not_a_headline", "fused", 1.0), _bench("not_a_headline", "eager", 9.0)])
    _write(results / "cpu-a-2026-11-23-quick.json", [_bench("rtd_loss", "fused", 1.0),
                                                     _bench("rtd_loss", "eager", 1.0)])  # newer, but a smoke test
    _write(results / "gpu-b-2026-11-21.json", [_bench("mask_tokens[count]", "fused", 0.0005, dtype="int64",
                                                      pass_="fwd"),
                                               _bench("mask_tokens[count]", "eager", 0.005, dtype="int64",
                                                      pass_="fwd")], machine="test gpu")
    _write(results / "gpu-c-2026-11-21-quick.json", [_bench("rtd_loss", "fused", 1.0)])  # only quick: not shown
    assert bench_report.update_readme(str(readme), str(results)) is True
    text = readme.read_text()
    _, block, _ = bench_report._split_readme(text, "README.md")
    assert "| `rtd_loss` fwd+bwd | 256 x 512 | 0.131 ms | eager BCE 0.459 ms | 3.50x | 0.25 |" in block
    assert ("| `disentangled_attention` module fwd+bwd, bf16 | 8 x 512, H 12, D 64 | 165 ms | transformers 833 ms | "
            "5.05x | 1.00 |") in block
    assert "| `mask_tokens` count | 256 x 512 | 0.500 ms | eager rand + argsort 5.00 ms | 10.00x | 1.00 |" in block
    assert "dropout" not in block and "not_a_headline" not in block and "old" not in block
    assert "**test cpu**" in block and "**test gpu**" in block and "commit abc1234" in block
    assert "](bench/results/cpu-a-2026-11-22.json)" in block and "quick" not in block
    assert text.startswith("# x\n\n## Performance\n\nintro\n\n<!-- perf-table:start -->\n")
    assert text.endswith("<!-- perf-table:end -->\n\nafter\n")


def test_update_rewrites_in_place_only_when_stale(tmp_path):
    readme, results = _checkout(tmp_path)
    _write(results / "cpu-2026-11-22.json", [_bench("rtd_loss", "fused", 1.0), _bench("rtd_loss", "eager", 3.0)])
    assert bench_report.update_readme(str(readme), str(results)) is True
    before = os.stat(readme)
    assert bench_report.update_readme(str(readme), str(results)) is False  # current: not rewritten
    after = os.stat(readme)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".README")] == []  # no temporary left behind


@pytest.mark.parametrize("text", [
    "no markers\n",
    "<!-- perf-table:start -->\n<!-- perf-table:start -->\n<!-- perf-table:end -->\n",
    "<!-- perf-table:end -->\nx\n<!-- perf-table:start -->\n",
])
def test_bad_markers_change_nothing(tmp_path, text, capsys):
    readme, results = _checkout(tmp_path, text)
    with pytest.raises(ValueError, match="perf-table:start"):
        bench_report.update_readme(str(readme), str(results))
    assert bench_report.main(["--readme", str(readme), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "perf-table" in err
    assert readme.read_text() == text


def test_command_line(tmp_path, capsys):
    readme, results = _checkout(tmp_path)
    _write(results / "cpu-2026-11-22.json", [_bench("rtd_loss", "fused", 1.0), _bench("rtd_loss", "eager", 3.0)])
    argv = ["--readme", str(readme), "--results", str(results)]
    assert bench_report.main(argv + ["--check"]) == 1  # stale: the check changes nothing
    assert "old" in readme.read_text()
    assert bench_report.main(argv) == 0 and "| 3.00x |" in readme.read_text()
    assert bench_report.main(argv + ["--check"]) == 0
    assert bench_report.main(["--readme", str(tmp_path / "nope.md"), "--results", str(results)]) == 2
    assert bench_report.main(["--readme", str(readme), "--results", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    # paths that exist but are the wrong kind were "not found"
    assert bench_report.main(["--readme", str(results), "--results", str(results)]) == 2
    assert capsys.readouterr().err == f"bench_report: --readme: {results} is not a file\n"
    assert bench_report.main(["--readme", str(readme), "--results", str(readme)]) == 2
    assert capsys.readouterr().err == f"bench_report: --results: {readme} is not a directory\n"
    with pytest.raises(SystemExit) as e:
        bench_report.main([])  # --readme is the action: nothing to do without it
    assert e.value.code == 2


def test_electra_fast_bench_rewrites_the_readme(tmp_path, monkeypatch):
    """`electra-fast bench` (results into the checkout's bench/results) regenerates the table (pytest stubbed)."""
    from electra_fast import bench as bench_cli

    readme, results = _checkout(tmp_path)
    for name in ("conftest.py", "test_bench_rtd_loss.py"):  # what bench_dir() and the file loop look for
        (tmp_path / "bench" / name).write_text("")

    def fake_call(cmd, cwd, env):
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
        _write(__import__("pathlib").Path(out), [_bench("rtd_loss", "fused", 1.0), _bench("rtd_loss", "eager", 4.0)])
        return 0

    monkeypatch.setattr(bench_cli.subprocess, "call", fake_call)
    monkeypatch.setattr(bench_cli, "bench_dir", lambda: str(tmp_path / "bench"))
    args = type("A", (), dict(quick=False, device="cpu", out=None, compare=None, select=None))
    assert bench_cli.main(args) == 0
    assert "| `rtd_loss` fwd+bwd | 256 x 512 | 1.00 s | eager BCE 4.00 s | 4.00x |" in readme.read_text()
    readme.write_text("markers removed\n")  # reported, not fatal: the results are already written
    assert bench_cli.main(args) == 0 and readme.read_text() == "markers removed\n"
