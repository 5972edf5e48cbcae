"""``--out``: what may be used as a run directory, and what a killed run leaves there.

Every situation goes through the CLI and checks the exit status, a single stderr line, and that the user's files
(paths, bytes, mtimes) are exactly as they were."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from electra_fast.cli import main as cli_main
from electra_fast.train import checkpoint as ckpt
from electra_fast.train import pretrain
from electra_fast.train.data import CACHE_TEMPORARY
from electra_fast.train.rundir import MARKER
from electra_fast.train.temporaries import remove_dead_temporaries
from test_train import _kw, _one_thread, env  # noqa: F401  (fixtures: one torch thread; tiny tokenizer, model, corpus)


def snapshot(root) -> dict:
    """relative path -> (kind, bytes or None, mtime_ns) for every file and folder under ``root``."""
    root = str(root)
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if os.path.isdir(path):
                out[rel] = ("dir", None, st.st_mtime_ns)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read(), st.st_mtime_ns)
    return out


def _user_files(tree: dict, under: str) -> dict:
    return {k: v for k, v in tree.items() if k == under or k.startswith(under + os.sep)}


def _pretrain_cli(env, out, capsys, *extra, steps=2):
    code = cli_main(["pretrain", "--no-progress", "--data", env["data"], "--tokenizer", env["tokenizer"], "--model",
                     env["model"], "--seq-len", "32", "--batch-size", "4", "--steps", str(steps), "--log-every", "1",
                     "--out", str(out), *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def _refused(code, err, *words):
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("electra-fast pretrain: error: --out:"), err
    assert all(w in err[0] for w in words), err


def _make_user_folder(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")


def test_out_missing_is_created_empty_dir_is_used(env, tmp_path, capsys):
    (tmp_path / "neighbour.txt").write_text("keep me")
    before = snapshot(tmp_path)
    out = tmp_path / "a" / "b"
    code, err = _pretrain_cli(env, out, capsys)
    assert code == 0, err
    assert ckpt.newest_complete(str(out / "checkpoints")) is not None and (out / MARKER).is_file()
    after = snapshot(tmp_path)
    assert after["neighbour.txt"] == before["neighbour.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _pretrain_cli(env, empty, capsys)[0] == 0 and (empty / "run.json").is_file()


def test_out_is_a_file(env, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    before = snapshot(tmp_path)
    _refused(*_pretrain_cli(env, tmp_path / "out", capsys), "is not a directory")
    assert snapshot(tmp_path) == before


def test_out_unwritable(env, tmp_path, capsys):
    # a missing --out whose parent cannot hold it (procfs refuses new entries, even to root)
    _refused(*_pretrain_cli(env, "/proc/electra-fast-test/out", capsys), "cannot create")
    ro = tmp_path / "ro"
    ro.mkdir()
    before = snapshot(tmp_path)
    os.chmod(ro, 0o555)
    immutable = False
    try:
        if os.access(ro, os.W_OK):  # root ignores modes: make the folder immutable instead
            immutable = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("running as root on a filesystem without chattr +i: no read-only folder to test")
        _refused(*_pretrain_cli(env, ro, capsys), "not writable")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        os.chmod(ro, 0o755)
    assert snapshot(tmp_path) == before



@pytest.mark.parametrize("folder", ["checkpoints", "cache"])
def test_checkpoints_or_cache_not_writable_is_refused_up_front(env, tmp_path, capsys, monkeypatch, folder):
    """Review finding: with checkpoints/ not writable every step ran, then the checkpoint failed with advice to free
    some space. Said now, before anything is written (os.access is asked: root's chmod bites nothing)."""
    out = tmp_path / "run"
    assert _pretrain_cli(env, out, capsys)[0] == 0
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: os.path.basename(p) != folder and access(p, mode, **k))
    before = snapshot(tmp_path)
    _refused(*_pretrain_cli(env, out, capsys, "--resume", steps=4), f"{out / folder} is not writable")
    assert snapshot(tmp_path) == before


def test_out_inside_a_checkpoint_is_refused(env, tmp_path, capsys):
    """Review finding (data loss): `pretrain --init-from RUN/checkpoints/step-N --out RUN/checkpoints/step-N/cont`
    put a run where the first run's --keep deleted it; refused as export's OUT_DIR is (one shared check)."""
    out = tmp_path / "run"
    assert _pretrain_cli(env, out, capsys)[0] == 0
    step = out / "checkpoints" / "step-00000002"
    before = snapshot(tmp_path)
    for inside in (step / "cont", step / "a" / "b", step):
        _refused(*_pretrain_cli(env, inside, capsys), f"{inside} is inside checkpoint {step}, which holds only the "
                 "run's own files (its --keep deletes old ones); choose a directory outside checkpoints/")
    assert snapshot(tmp_path) == before
    code, err = _pretrain_cli(env, tmp_path / "checkpoints" / "step-00000001-copy", capsys)  # a name alike: no
    assert code == 0, err
    plain = tmp_path / "experiments" / "checkpoints" / "step-00000001"  # so named, but no run's checkpoint
    plain.mkdir(parents=True)
    code, err = _pretrain_cli(env, plain / "cont", capsys)
    assert code == 0, err
    future = out / "checkpoints" / "step-00000099"  # a step the run has yet to write is its checkpoint all the same
    _refused(*_pretrain_cli(env, future / "cont", capsys), f"{future / 'cont'} is inside checkpoint {future}")

def test_out_holding_another_run(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain_cli(env, out, capsys)[0] == 0
    before = snapshot(tmp_path)
    _refused(*_pretrain_cli(env, out, capsys), "already holds a run", "--resume")
    _refused(*_pretrain_cli(env, out, capsys, "--allow-nonempty-out"), "already holds a run")
    assert snapshot(tmp_path) == before


def test_out_holding_user_files_is_refused(env, tmp_path, capsys):
    out = tmp_path / "mine"
    _make_user_folder(out)
    (out / "run.json").write_text('{"experiment": "mine"}')  # a run.json that is not ours does not make it a run
    before = snapshot(tmp_path)
    _refused(*_pretrain_cli(env, out, capsys), "not empty", "--allow-nonempty-out")
    _refused(*_pretrain_cli(env, out, capsys, "--resume"), "not empty")  # --resume does not make it ours
    assert snapshot(tmp_path) == before


def test_out_holding_a_name_the_job_writes_is_refused_even_when_allowed(env, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "tokenizer.json").write_text('{"mine": true}')  # the job's tokenizer would land here
    before = snapshot(tmp_path)
    _refused(*_pretrain_cli(env, out, capsys), "not empty")
    _refused(*_pretrain_cli(env, out, capsys, "--allow-nonempty-out"), "cache", "not created by electra-fast")
    assert snapshot(tmp_path) == before


def test_allow_nonempty_out_adds_the_run_next_to_user_files(env, tmp_path, capsys):
    out = tmp_path / "mine"
    _make_user_folder(out)
    before = snapshot(out)
    code, err = _pretrain_cli(env, out, capsys, "--allow-nonempty-out")
    assert code == 0, err
    after = snapshot(out)
    for name in ("notes.txt", "sub"):
        assert _user_files(after, name) == _user_files(before, name)
    assert ckpt.newest_complete(str(out / "checkpoints")) is not None
    # now it is ours: a resume needs no flag, and the user's files still stay as they are
    code, err = _pretrain_cli(env, out, capsys, "--resume", steps=3)
    assert code == 0, err
    after = snapshot(out)
    for name in ("notes.txt", "sub"):
        assert _user_files(after, name) == _user_files(before, name)


def test_out_holding_a_run_with_corrupt_checkpoints(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain_cli(env, out, capsys, "--save-every", "1", "--keep", "5", steps=4)[0] == 0
    newest = out / "checkpoints" / "step-00000004"
    with open(newest / "training_state.pt", "r+b") as f:
        f.truncate(64)
    before, corrupt = snapshot(tmp_path), snapshot(newest)
    _refused(*_pretrain_cli(env, out, capsys, steps=6), "already holds a run")
    assert snapshot(tmp_path) == before
    code, err = _pretrain_cli(env, out, capsys, "--resume", "--keep", "1", "--save-every", "1", steps=6)
    assert code == 0, err
    assert [s for s, _ in ckpt.checkpoint_dirs(out / "checkpoints")] == [6]
    assert snapshot(out / "checkpoints" / "step-00000004.corrupt") == corrupt  # set aside as it was, not deleted


def test_resume_of_a_run_already_past_steps_is_one_line(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain_cli(env, out, capsys, steps=2)[0] == 0
    before = snapshot(tmp_path)
    code, err = _pretrain_cli(env, out, capsys, "--resume", steps=1)
    assert code == 2 and err == ["electra-fast pretrain: error: --steps: the resumed run is already at step 2 >= "
                                 "--steps 1"], err  # was after "resuming from ..." and other progress lines
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name, make", [("metrics.jsonl", "dir"), ("checkpoints", "file")])
def test_resume_with_a_run_file_of_the_wrong_kind_is_refused_up_front(env, tmp_path, capsys, name, make):
    out = tmp_path / "run"
    assert _pretrain_cli(env, out, capsys, steps=2)[0] == 0
    path = out / name
    if make == "dir":  # the user's folder where the run keeps its metrics
        path.unlink()
        path.mkdir()
        (path / "mine.txt").write_text("user data\n")
    else:
        path.rename(tmp_path / "moved-checkpoints")
        path.write_text("user data\n")
    before = snapshot(tmp_path)
    _refused(*_pretrain_cli(env, out, capsys, "--resume", steps=4), str(path), "move it away")
    assert snapshot(tmp_path) == before  # was "[Errno 21] Is a directory" after three progress lines



def test_a_metrics_line_that_is_not_utf8_is_dropped_on_resume(env, tmp_path, capsys):
    """Review finding: metrics.jsonl whose last line held bytes that are not UTF-8 (a kill mid-write, a disk error)
    stopped --resume with a UnicodeDecodeError traceback: the file was decoded outside the per-line check."""
    out = tmp_path / "run"
    assert _pretrain_cli(env, out, capsys)[0] == 0
    logged = (out / "metrics.jsonl").read_bytes()
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "x": "\xe9\xff')
    code, err = _pretrain_cli(env, out, capsys, "--resume", steps=3)
    assert code == 0, err
    lines = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert b"".join(lines[:2]) == logged and [json.loads(x)["step"] for x in lines] == [1, 2, 3]

def test_out_inside_the_data_folder_is_never_read_as_data(env, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.txt").write_bytes(open(env["data"], "rb").read())
    out = data / "run"
    argv = ["pretrain", "--no-progress", "--data", str(data), "--tokenizer", env["tokenizer"], "--model",
            env["model"], "--seq-len", "32", "--batch-size", "4", "--log-every", "1", "--out", str(out)]
    assert cli_main(argv + ["--steps", "2"]) == 0
    first = json.loads((out / "run.json").read_text())["inputs"]
    code = cli_main(argv + ["--steps", "3", "--resume"])  # metrics.jsonl now lies inside --data
    assert code == 0, capsys.readouterr().err
    assert first == [str(data / "corpus.txt")]
    assert (out / "checkpoints" / "step-00000003").is_dir()


# ------------------------------------------------------------------------------------------ stale temporaries
KILL_DURING_TOKENISATION = textwrap.dedent("""
    import json, os, signal, sys
    from electra_fast.train import data, pretrain
    real = data.encode_documents
    def encode_then_die(tok, docs, batch=1024, **kw):
        for n, ids in enumerate(real(tok, docs, batch=8, **kw)):
            if n == 20:
                os.kill(os.getpid(), signal.SIGKILL)  # a kill -9 in the middle of writing the token cache
            yield ids
    data.encode_documents = encode_then_die
    pretrain(**json.loads(sys.argv[1]))
""")


def test_kill_during_tokenisation_leaves_no_temporary_behind(env, tmp_path):
    out = tmp_path / "run"
    kw = dict(data=[env["data"]], **_kw(env, out, steps=2))
    child = subprocess.Popen([sys.executable, "-c", KILL_DURING_TOKENISATION, json.dumps(kw)],
                             stderr=subprocess.PIPE, text=True)
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err
    cache = out / "cache"
    left = [n for n in os.listdir(cache) if ".tmp-" in n]
    assert len(left) == 1 and left[0].startswith("tokens-") and left[0].endswith(f".bin.tmp-{child.pid}"), left
    mine = cache / "tokens-mine.bin.tmp-1"  # not our pattern (no 24-hex key): never touched
    mine.write_text("user data")
    s = pretrain(env["data"], **_kw(env, out, steps=2))  # the next start, same command
    assert s["steps"] == 2
    assert sorted(n for n in os.listdir(cache) if ".tmp-" in n) == ["tokens-mine.bin.tmp-1"]
    assert mine.read_text() == "user data"


def test_only_temporaries_of_dead_processes_are_removed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    try:
        names = {f"x.tmp-{sleeper.pid}": True, f"x.tmp-{finished.pid}": False, f"x.tmp-{os.getpid()}": True,
                 "y.tmp-1x": True}
        for n in names:
            (tmp_path / n).write_text("")
        (tmp_path / f"d.tmp-{finished.pid}").mkdir()
        (tmp_path / f"d.tmp-{finished.pid}" / "f").write_text("")
        remove_dead_temporaries(str(tmp_path), re.compile(r"^[xd]\.tmp-(\d+)$"))
        assert sorted(os.listdir(tmp_path)) == sorted(n for n, alive in names.items() if alive)
    finally:
        sleeper.kill()
        sleeper.wait()
    key = "0123456789abcdef01234567"  # the cache's writers' names, and near misses that are not theirs
    for name, ours in ((f"tokens-{key}.bin.tmp-12", True), (f"tokens-{key}.bin.json.tmp-12", True),
                       ("default-corpus-py3.11.txt.tmp-12", True), ("tokens-mine.bin.tmp-12", False),
                       (f"tokens-{key}.bin", False), (f"tokens-{key}.bin.tmp-12.bak", False)):
        assert bool(CACHE_TEMPORARY.match(name)) == ours, name


def test_user_file_named_like_a_temporary_is_never_deleted(env, tmp_path, capsys):
    """--allow-nonempty-out next to a user's file matching the job's temporary pattern with a dead PID: refused and
    untouched (the start-up cleaning would otherwise delete it as a killed job's leftover)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "run.json.tmp-999999999").write_text("user data")
    before = snapshot(tmp_path)
    _refused(*_pretrain_cli(env, out, capsys, "--allow-nonempty-out"), "run.json.tmp-999999999")
    assert snapshot(tmp_path) == before


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    """Every rewrite in a run folder (run.json, metrics, curves, finetune.json, summary) goes through write_atomic:
    a writer that fails halfway leaves the old bytes and no temporary; one that succeeds replaces them whole."""
    from electra_fast._files import temporary, write_atomic, write_json
    path = tmp_path / "run.json"
    path.write_text('{"mine": 1}\n')

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write('{"half')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(str(path), half_then_fail)
    assert path.read_text() == '{"mine": 1}\n' and os.listdir(tmp_path) == ["run.json"]
    write_json(str(path), {"new": [1, 2]})
    assert json.loads(path.read_text()) == {"new": [1, 2]} and os.listdir(tmp_path) == ["run.json"]
    assert re.fullmatch(r".*run\.json\.tmp-\d+", temporary(str(path)))  # the pattern rundir cleans after a kill
