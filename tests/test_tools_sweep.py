"""tools/sweep.py --merge: every case counted once, and one line (exit 2) for a report that cannot be read."""
import json
import os
import sys

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
