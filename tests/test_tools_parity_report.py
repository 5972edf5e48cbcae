"""tools/parity_report.py's verdict and bookkeeping on fabricated curves (no training: the trainers are stubbed)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import parity_report  # noqa: E402

STEPS = range(100, 700, 100)


def curve(value, special=None):
    """Every metric ``value`` at every step; ``special``: {(step, metric): value} overriding single points."""
    special = special or {}
    return [{"step": t, "loss": 1.0, **{k: special.get((t, k), value) for k in parity_report.METRICS}}
            for t in STEPS]


def test_a_side_with_one_run_gets_no_verdict():
    """One run spans a band of width 0 and chance_outside(1) = 1: every count passed, so AUC 0.95 vs 0.50 "agreed"."""
    far = {"fused_fp32": {"0": curve(0.95)}, "independent": {"0": curve(0.50)}}
    _, points = parity_report.judge(far, warm=60)
    pt = points["fused_fp32 vs independent"]
    assert pt["agree"] is None and "independent has 1 run" in pt["no_verdict"]
    far["fused_fp32"] = {str(s): curve(0.95 + 0.01 * s) for s in range(3)}  # three against one: still no band
    _, points = parity_report.judge(far, warm=60)
    assert points["fused_fp32 vs independent"]["agree"] is None


def test_the_reverse_direction_is_judged_with_its_own_band_size():
    """3 fused runs in a tight band, 2 independent runs straddling it: forward every fused point sits inside the wide
    independent band; reverse, 12 of the 36 independent points leave the fused band. With its own band (3 runs, p =
    0.13) the reverse allows 8 of 36; judged with the forward's band (2 runs, p = 0.33, 54 points) it allowed 24."""
    v = 0.5
    wide = list(zip(STEPS, parity_report.METRICS * 2))  # one metric at each of the 6 steps
    runs = {"fused_fp32": {str(s): curve(v + 0.001 * s) for s in range(3)},
            "independent": {"0": curve(v + 0.001, dict.fromkeys(wide, v - 0.05)),
                            "1": curve(v + 0.002, dict.fromkeys(wide, v + 0.05))}}
    _, points = parity_report.judge(runs, warm=60)
    pt = points["fused_fp32 vs independent"]
    assert pt["agree"] is False
    assert (pt["outside"], pt["checked"]) == (0, 54) and pt["allowed"] == 24
    rev = pt["reverse"]
    assert (rev["outside"], rev["checked"], rev["allowed"]) == (12, 36, 8)
    assert rev["chance_outside_per_point"] == round(parity_report.chance_outside(3), 4)


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """main() with the trainers returning fixed curves (and recording their calls), no plot, a given machine."""
    calls = []

    def fused(out, seed, *a):
        calls.append(("fused", out))
        return curve(0.5 + 0.001 * seed)

    def independent(out, seed, *a):
        calls.append(("independent", out))
        return curve(0.5 + 0.001 * seed)

    monkeypatch.setattr(parity_report, "train_fused", fused)
    monkeypatch.setattr(parity_report, "train_independent", independent)
    monkeypatch.setattr(parity_report, "plot", lambda result, path: None)
    machine = {"cpu": "machine A", "torch": "2.0", "threads": 2}
    monkeypatch.setattr(parity_report, "this_machine", lambda: dict(machine), raising=False)

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["parity_report.py", "--out", str(tmp_path / "out"), *argv])
        parity_report.main()

    return run, calls, machine, tmp_path / "out"


def test_a_misspelt_side_is_refused_before_anything_runs(stubbed, capsys):
    run, calls, _, out = stubbed
    with pytest.raises(SystemExit) as e:
        run("--seeds", "0,1", "--sides", "fused_fp32,independant")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--sides" in err and "'independant'" in err
    assert not calls and not out.exists()
    # a folder a misspelt side was saved into (by an earlier version): one line, not a KeyError in plot()
    out.mkdir()
    (out / "parity.json").write_text(json.dumps({"runs": {"fused_fp32": {"0": curve(0.5)},
                                                          "independant": {"0": curve(0.5)}}}))
    with pytest.raises(SystemExit) as e:
        run("--seeds", "0,1", "--sides", "fused_fp32")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "'independant'" in err and not calls


def test_a_rerun_on_another_machine_keeps_each_runs_machine(stubbed, capsys):
    """A rerun into the folder overwrote cpu / torch / threads with the new machine's, beside the old runs' timings."""
    run, calls, machine, out = stubbed
    run("--seeds", "0,1", "--sides", "fused_fp32")
    first = json.loads((out / "parity.json").read_text())
    assert first["cpu"] == "machine A" and first["machines"]["fused_fp32-1"]["cpu"] == "machine A"
    machine.update(cpu="machine B", threads=56)
    run("--seeds", "0,1,2", "--sides", "fused_fp32")
    data = json.loads((out / "parity.json").read_text())
    assert data["machines"]["fused_fp32-0"] == {"cpu": "machine A", "torch": "2.0", "threads": 2}
    assert data["machines"]["fused_fp32-2"] == {"cpu": "machine B", "torch": "2.0", "threads": 56}
    assert "cpu" not in data and "threads" not in data  # no one machine for all the runs
    assert data["seconds"].keys() == data["machines"].keys()
    # a report written before per-run records: its top level was every earlier run's machine
    del data["machines"]
    data.update(cpu="machine A", torch="2.0", threads=2)
    (out / "parity.json").write_text(json.dumps(data))
    run("--seeds", "3", "--sides", "fused_fp32")
    data = json.loads((out / "parity.json").read_text())
    assert data["machines"]["fused_fp32-2"]["cpu"] == "machine A" and data["machines"]["fused_fp32-3"]["cpu"] == \
        "machine B"


def test_the_summary_says_when_there_is_no_verdict(stubbed, capsys):
    run, calls, _, out = stubbed
    run("--seeds", "0", "--sides", "independent,fused_fp32")
    assert [c[0] for c in calls] == ["fused", "independent"]  # independent trains from fused_fp32's run
    assert "fused_fp32 vs independent: no verdict:" in capsys.readouterr().out
