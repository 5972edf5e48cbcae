"""tools/sweep.py: --merge counts every case once; a bad argument or an unreadable report is one line (exit 2), said
before anything runs."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import sweep  # noqa: E402


def _case(group, id_, cls="clear", category="cli"):
    return {"category": category, "group": group, "backend": "-", "id": id_, "expect": "error", "cls": cls,
            "detail": ""}


def _report(path, cases):
    path.write_text(json.dumps({"meta": {"commit": "x"}, "summary": {}, "cases": cases}))
    return str(path)


def test_merge_counts_each_case_once(tmp_path, capsys):
    cli = _report(tmp_path / "cli.json", [_case("cli", "a"), _case("cli", "b", "crash")])
    kill = _report(tmp_path / "kill.json", [_case("kill", "a", "ok", "kill")])
    out = tmp_path / "merged.json"
    # the same report twice, and a merged report next to one of its parts: their cases once
    assert sweep.main(["--merge", cli, kill, cli, "--out", str(out)]) == 0
    assert sweep.main(["--merge", str(out), kill, "--out", str(tmp_path / "again.json")]) == 0
    for merged in (out, tmp_path / "again.json"):
        summary = json.loads(merged.read_text())["summary"]
        assert summary["cli total"]["cases"] == 2 and summary["cli total"]["crash"] == 1, merged
        assert summary["kill total"]["cases"] == 1, merged


def test_merge_refuses_a_case_with_two_results_and_unreadable_reports(tmp_path, capsys):
    first = _report(tmp_path / "first.json", [_case("cli", "a")])
    rerun = _report(tmp_path / "rerun.json", [_case("cli", "a", "unclear")])  # the same part run again
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "list.json").write_text("[1, 2]")
    capsys.readouterr()
    for paths, why in (([first, rerun], "has other results"), ([str(tmp_path / "missing.json")], "cannot read"),
                       ([str(tmp_path / "empty.json")], "not a sweep report"),
                       ([str(tmp_path / "list.json")], "not a sweep report")):
        out = tmp_path / "out.json"
        assert sweep.main(["--merge", *paths, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1 and not out.exists(), err


def _no_run(monkeypatch, tmp_path):
    """The parts replaced by stubs that log their calls; scratch folders made in tmp_path/tmp."""
    import tempfile
    calls = []
    for part in ("ops", "model", "cli", "kill"):
        monkeypatch.setattr(sweep, f"sweep_{part}", lambda *a, part=part: calls.append((part, a)) or [_case(part, "a")])
    monkeypatch.setattr(sweep, "_meta", lambda args: {})  # no git, no torch import
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return calls


def test_bad_arguments_are_refused_before_the_run(tmp_path, monkeypatch, capsys):
    """Review finding: a missing --out folder lost the report after the whole run (traceback); --jobs 0 was a
    traceback, --backends bogus hundreds of "unclear" defects, --timeout 0 took every case for a hang, and a
    --cli-filter matching nothing exited 0 writing no report (an older one at --out looked current)."""
    calls = _no_run(monkeypatch, tmp_path)
    old = tmp_path / "old.json"
    old.write_text("OLD REPORT")
    report = _report(tmp_path / "r.json", [_case("cli", "a")])
    for argv, why in (
            (["--out", str(tmp_path / "missing" / "r.json")], f"--out: no such folder: {tmp_path / 'missing'}"),
            (["--merge", report, "--out", str(tmp_path / "missing" / "r.json")], "--out: no such folder"),
            (["--out", str(tmp_path)], "is a folder; expected a file path"),
            (["--jobs", "0"], "--jobs: expected an int >= 1, got 0"),
            (["--backends", "bogus"], "--backends: expected names among reference, cpp, got 'bogus'"),
            (["--backends", "reference,"], None), (["--backends", ","], "--backends: expected"),
            (["--timeout", "0"], "--timeout: expected a finite number of seconds > 0, got 0.0"),
            (["--timeout", "-1"], "--timeout: expected"),
            (["--timeout", "nan"], "--timeout: expected"), (["--timeout", "inf"], "--timeout: expected"),
            (["--only", "cli", "--cli-filter", "finetune --otu"], "--cli-filter: expected text in a CLI case's id, "
             "got 'finetune --otu', which matches none (the slow cases run with --full only)")):
        rc = sweep.main(["--only", "ops", "--out", str(old), *argv])
        err = capsys.readouterr().err.strip()
        if why is None:  # legal: a trailing comma
            assert rc == 0 and calls.pop()[0] == "ops", err
            old.write_text("OLD REPORT")
            continue
        assert rc == 2 and why in err and len(err.splitlines()) == 1, (argv, err)
        assert not calls and old.read_text() == "OLD REPORT" and not os.listdir(tmp_path / "tmp"), argv
    assert sweep.main(["--only", "cli", "--cli-filter", "finetune a plain TSV", "--out", str(old)]) == 0
    [(part, (_, _, cases))] = calls
    assert part == "cli" and cases and all("finetune a plain TSV" in c.id for c in cases)


def test_a_report_that_cannot_be_written_still_removes_the_scratch_folder(tmp_path, monkeypatch):
    """Review finding: the report's exception left the cleanup before the scratch folder /tmp/ef-sweep-* went."""
    _no_run(monkeypatch, tmp_path)

    def report(rows, meta, out):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sweep, "report", report)
    with pytest.raises(OSError):
        sweep.main(["--only", "ops", "--out", str(tmp_path / "r.json")])
    assert not os.listdir(tmp_path / "tmp")  # the ef-sweep-* scratch folder
