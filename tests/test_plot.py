"""Pictures of a run: curves.png (its panels; a warning, not a failure, without matplotlib), --tensorboard event
files read back by TensorBoard's own reader (resume included), and ``electra-fast plot``'s overlay and errors."""
import json
import os
import shutil
import sys

import pytest

from electra_fast.cli import main as cli_main
from electra_fast.train import PretrainError, pretrain
from electra_fast.train import plot
from test_train import _kw, _one_thread, env  # noqa: F401  (fixtures: one torch thread; tiny tokenizer, model, corpus)

TITLES = ["losses", "discriminator AUC / F1", "generator accuracy", "tokens/s"]


@pytest.fixture(scope="module")
def run(env, tmp_path_factory):
    """A 4-step run with held-out evaluation: every panel has training and held-out lines."""
    out = tmp_path_factory.mktemp("plot") / "run"
    pretrain(env["data"], **_kw(env, out, steps=4, eval_every=2))
    return out


def _labels(ax):
    return [line.get_label() for line in ax.lines]


def test_each_run_writes_curves_png_with_the_four_panels(run):
    pytest.importorskip("matplotlib")
    png = run / "curves.png"
    with open(png, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (1200, 800)  # 12 x 8 in
    assert not [n for n in os.listdir(run) if ".tmp-" in n]
    fig = plot.figure({"run": plot.read_metrics(str(run))})
    assert [ax.get_title() for ax in fig.axes] == TITLES
    losses, disc, gen, speed = fig.axes
    assert _labels(losses) == ["MLM", "RTD", "RTD prior", "MLM held out", "RTD held out"]
    assert losses.get_yscale() == "log"
    assert _labels(disc) == ["AUC", "F1", "AUC held out", "F1 held out"]
    assert _labels(gen) == ["MLM accuracy", "held out", "unigram baseline", "held out, [MASK] only",
                            "unigram, [MASK] only"]
    assert _labels(speed) == ["tokens/s"]
    records = plot.read_metrics(str(run))
    auc = disc.lines[0]
    assert list(auc.get_xdata()) == [r["step"] for r in records]
    assert list(auc.get_ydata()) == [r["discriminator_auc"] for r in records]
    assert list(disc.lines[2].get_xdata()) == [2, 4]  # held out: the evaluated steps only


def test_without_matplotlib_a_run_warns_in_one_line_and_succeeds(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # "import matplotlib.figure" raises ImportError
    s = pretrain(env["data"], **_kw(env, tmp_path / "run", steps=2))
    assert s["steps"] == 2 and s["curves"] == "" and not (tmp_path / "run" / "curves.png").exists()
    err = [line for line in capsys.readouterr().err.splitlines() if "curves.png" in line]
    assert err == ["warning: curves.png not written: matplotlib is not installed (pip install matplotlib)"]


def _scalars(out, tag):
    # skipped only where the tensorboard package is absent (it is in the test extra and pinned for CI)
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: its event files cannot be read")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_event_files_are_read_back_and_resume_does_not_duplicate(env, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: --tensorboard cannot run")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(env["data"], **_kw(env, straight, steps=6, save_every=3, eval_every=3, tensorboard=True))
    records = plot.read_metrics(str(straight))
    for tag in ("loss", "discriminator_auc", "prior_rtd_loss", "eval_discriminator_f1"):
        got = _scalars(straight, tag)
        want = [(r["step"], r[tag]) for r in records if tag in r]
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 2
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as fp32
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    pretrain(env["data"], **_kw(env, resumed, steps=6, save_every=3, eval_every=3, tensorboard=True, resume=True))
    assert _scalars(resumed, "loss") == _scalars(straight, "loss")  # steps 4-6 re-logged once, not twice
    assert not (tmp_path / "plain").exists()
    pretrain(env["data"], **_kw(env, tmp_path / "plain", steps=1))
    assert not (tmp_path / "plain" / "tensorboard").exists()  # only with --tensorboard


def test_tensorboard_missing_is_one_clear_error_before_anything_is_written(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    with pytest.raises(PretrainError, match=r"^--tensorboard: the tensorboard package is not installed"):
        pretrain(env["data"], **_kw(env, out, tensorboard=True))
    assert not out.exists()
    assert cli_main(["pretrain", "--tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tensorboard" in err and not out.exists()


def test_plot_overlays_runs_and_never_replaces_a_file_without_force(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    other = tmp_path / "other"
    shutil.copytree(run, other)
    out = tmp_path / "both.png"
    assert cli_main(["plot", str(run), str(other), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in capsys.readouterr().out
    fig = plot.figure({"run": plot.read_metrics(str(run)), "other": plot.read_metrics(str(other))})
    assert [ax.get_title() for ax in fig.axes] == TITLES
    assert {line.get_color() for line in fig.axes[3].lines} == {"C0", "C1"}
    assert _labels(fig.axes[3]) == ["run: tokens/s", "other: tokens/s"]
    before = out.read_bytes()
    out.write_bytes(b"mine")
    assert cli_main(["plot", str(run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert cli_main(["plot", str(run), "--out", str(out), "--force"]) == 0
    assert out.read_bytes()[:8] == before[:8] and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_plot_shows_a_run_folder_name_that_is_not_utf8_escaped(run, tmp_path, capsys, monkeypatch):
    """Review finding: a run folder named in Latin-1 (run_\\xe9) reached matplotlib as a str holding a surrogate:
    "TypeError ... 'run_\\udce9: MLM'" traceback after every run was read. The legend shows its byte escaped."""
    pytest.importorskip("matplotlib")
    latin1 = tmp_path / os.fsdecode(b"run_\xe9")
    shutil.copytree(run, latin1)
    drawn, real = [], plot.save

    def save(fig, path):
        drawn.append(fig)
        real(fig, path)

    monkeypatch.setattr(plot, "save", save)
    out = tmp_path / "both.png"
    assert cli_main(["plot", str(latin1), str(run), "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _labels(drawn[0].axes[3]) == ["run_\\xe9: tokens/s", "run: tokens/s"]


def test_plot_errors_are_one_line_naming_what_is_wrong(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n{not json\n")
    no_step = tmp_path / "no_step"
    no_step.mkdir()
    (no_step / "metrics.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    out = str(tmp_path / "x.png")
    cases = [([str(tmp_path / "missing")], out, "missing: no such directory"),
             ([str(empty)], out, "empty: no metrics.jsonl"),
             ([str(bad)], out, "metrics.jsonl line 2: not a JSON object with an integer 'step'"),
             ([str(no_step)], out, "metrics.jsonl line 1: not a JSON object"),
             ([str(run), str(run)], out, "RUN_DIR: the same run is named twice"),
             ([str(run)], str(tmp_path / "x.txt"), "--out: expected a file name ending in .png"),
             ([str(run)], str(tmp_path / "nowhere" / "x.png"), "--out: no such directory"),
             ([str(run)], str(tmp_path), "--out: expected a file name ending in")]
    for dirs, target, message in cases:
        assert cli_main(["plot", *dirs, "--out", target]) == 2, message
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("electra-fast plot: error: ") and message in err, err
    assert not os.path.exists(out)
    with pytest.raises(SystemExit) as e:  # no RUN_DIR: argparse's one line
        cli_main(["plot", "--out", out])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "RUN_DIR" in err


def test_a_torn_last_record_is_dropped_as_a_resume_drops_it(tmp_path):
    """A run killed mid-write (or on a full disk) leaves half a line at the end: plot refused the whole run; a
    complete bad line still is an error (test above)."""
    from electra_fast.train.plot import read_metrics
    torn = tmp_path / "torn"
    torn.mkdir()
    rows = [json.dumps({"step": s, "loss": 2.0 / s}) for s in (1, 2)]
    (torn / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(str(torn))] == [1, 2]
