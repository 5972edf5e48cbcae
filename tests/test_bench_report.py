"""The benchmark report and the regression gate (synthetic pytest-benchmark JSON)."""
import json

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
