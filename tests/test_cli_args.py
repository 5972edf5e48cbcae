"""The command line's contract for bad input: every documented flag of ``pretrain`` / ``export`` / ``bench`` with an
invalid value, and every pathology of a ``--data`` input, ends in exit status 2 with exactly one line on stderr (no
traceback), and leaves the user's files as they were. Everything runs in-process (argument errors take
milliseconds); the signal and CPU-cap cases that need a fresh process live in test_train.py."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from electra_fast import bench
from electra_fast.cli import main as cli_main
from electra_fast.models import ElectraConfig
from electra_fast.train import PretrainError, pretrain
import test_train
from test_train import _kw

env = test_train.env  # the module-scoped fixture: corpus, tokenizer and tiny model of test_train.py


def _cli(argv, capsys):
    """(exit status, stderr lines, stdout) of one in-process ``electra-fast`` call."""
    try:
        code = cli_main(argv)
    except SystemExit as e:  # argparse's own exits
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


def _assert_refused(code, err, command, message):
    assert code == 2, (code, err)
    assert len(err) == 1, err  # one line: no usage block, no traceback, no progress chatter
    assert err[0].startswith(f"electra-fast {command}: error: ") and message in err[0], err[0]


def _snapshot(root):
    """{relative path: sha256 | 'dir' | 'link -> target'} of everything under ``root``."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "link -> " + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def user(env, tmp_path):
    """The user's directory: the corpus, tokenizer and model of ``env`` plus files the cases point at."""
    d = tmp_path / "user"
    d.mkdir()
    for name in ("corpus.txt", "tokenizer.json", "tiny.json"):
        (d / name).write_bytes((env["root"] / name).read_bytes())
    (d / "array.json").write_text("[1, 2, 3]\n")
    (d / "broken.json").write_text('{"hidden_size": 32,')
    (d / "typed.json").write_text('{"hidden_size": "32"}\n')
    (d / "notes.txt").write_text("the user's own notes\n")
    return d


# ------------------------------------------------------------------------------------------ pretrain: up front
NOT_CUDA = [] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: ")]
PRETRAIN_UPFRONT = [
    (["--steps", "0"], "--steps: expected an int >= 1, got 0"),  # 0 was read as "unset": 10,000 steps
    (["--steps", "-5"], "--steps: expected an int >= 1, got -5"),
    (["--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),
    (["--steps"], "argument --steps: expected one argument"),
    (["--batch-size", "0"], "--batch-size: expected an int >= 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum: expected an int >= 1, got 0"),
    (["--seq-len", "2"], "--seq-len: expected an int >= 3, got 2"),
    (["--seq-len", "65"], "--seq-len: 65 exceeds the model's max_position_embeddings (64)"),
    (["--lr", "-1e-3"], "--lr: expected a finite number > 0, got -0.001"),  # was: "expected one argument" + usage
    (["--lr=-1e-3"], "--lr: expected a finite number > 0, got -0.001"),
    (["--lr", "-2E+1"], "--lr: expected a finite number > 0, got -20.0"),
    (["--lr", "-.5"], "--lr: expected a finite number > 0, got -0.5"),
    (["--lr", "0"], "--lr: expected a finite number > 0, got 0.0"),
    (["--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr: expected a finite number > 0, got inf"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--warmup", "-1"], "--warmup: expected an int >= 0, got -1"),
    (["--weight-decay", "-0.01"], "--weight-decay: expected a finite number >= 0, got -0.01"),  # trained before
    (["--weight-decay", "nan"], "--weight-decay: expected a finite number >= 0, got nan"),
    (["--keep", "0"], "--keep: expected an int >= 1, got 0"),
    (["--save-every", "0"], "--save-every: expected an int >= 1, got 0"),
    (["--log-every", "0"], "--log-every: expected an int >= 1, got 0"),
    (["--seed", "-1"], "--seed: expected an int in [0, 9223372036854775807], got -1"),
    (["--seed", str(2 ** 64)], f"--seed: expected an int in [0, 9223372036854775807], got {2 ** 64}"),
    (["--vocab-size", "0"], "--vocab-size: expected an int in [6, 16777216], got 0"),  # 0 was read as "unset": 30522
    # a Rust abort asking for 283 GB (rc 134), an OverflowError traceback
    (["--vocab-size", "5000000000"], "--vocab-size: expected an int in [6, 16777216], got 5000000000"),
    (["--vocab-size", "99999999999999999999999"], "--vocab-size: expected an int in [6, 16777216]"),
    (["--threads", "0"], "--threads: expected an int in [1, "),
    (["--threads", "100000"], "--threads: expected an int in [1, "),  # set as is, it crashed OpenMP
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),  # was a traceback
    (["--device", "cuda:x"], "--device: expected cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    *NOT_CUDA,
    (["--model", "electra-huge"], "--model: unknown preset 'electra-huge'"),
    (["--model", "{user}/missing.json"], "--model: no such file"),
    (["--model", "{user}/array.json"], "a config must be a JSON object of fields, got a JSON array: [1, 2, 3]"),
    (["--model", "{user}/broken.json"], "--model: cannot read"),
    (["--model", "{user}/typed.json"], "ElectraConfig.hidden_size: expected an integer, got '32'"),
    (["--tokenizer", "{user}/tokenizer.json", "--vocab-size", "100"], "not allowed with argument"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
]


@pytest.mark.parametrize("extra, message", PRETRAIN_UPFRONT, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_pretrain_flag_refused_before_anything_is_written(user, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    before = _snapshot(user)
    argv = ["pretrain", "--no-progress", "--data", str(user / "corpus.txt"), "--model", str(user / "tiny.json"),
            "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--out", str(out)]
    code, err, _ = _cli(argv + [a.format(user=user) for a in extra], capsys)
    _assert_refused(code, err, "pretrain", message)
    assert not out.exists()  # refused before --out was created
    assert _snapshot(user) == before


def test_api_distinguishes_zero_from_unset(env, tmp_path):
    for kw, message in ((dict(steps=0), "--steps: expected an int >= 1, got 0"),
                        (dict(vocab_size=0, tokenizer=None), "--vocab-size: expected an int in [6, 16777216], got 0"),
                        (dict(warmup=-1), "--warmup"), (dict(precision="fp64"), "--precision: expected auto")):
        with pytest.raises(PretrainError, match=message.replace("[", r"\[")):
            pretrain(env["data"], **_kw(env, tmp_path / "out", **kw))
        assert not (tmp_path / "out").exists()


def test_config_json_must_be_an_object():
    with pytest.raises(TypeError, match=r"must be a JSON object of fields, got a JSON array: \[1, 2, 3\]"):
        ElectraConfig.from_json_string("[1, 2, 3]")
    with pytest.raises(TypeError, match="ElectraConfig.share_att_key: expected a boolean, got 1"):
        ElectraConfig.from_json_string('{"share_att_key": 1}')
    assert ElectraConfig.from_json_string('{"mask_prob": 0}').mask_prob == 0  # an int where a float goes is fine
    with pytest.raises(TypeError, match="expected a dict of config fields, got list"):
        ElectraConfig.from_dict([1, 2, 3])


# ------------------------------------------------------------------------------------------ pretrain: inputs
def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def _pathologies(d):
    """(--data path, message) for each way an input can be unusable."""
    return [
        (_write(d / "empty.txt", b""), "no text found"),
        (_write(d / "blank.txt", "\n\n   \n\t\n"), "no text found"),
        (_write(d / "binary.bin", bytes(range(256)) * 8), "binary.bin is not UTF-8 (invalid byte at offset 128)"),
        (_write(d / "nul.txt", b"\x00\x01\x02" * 300), "no text found"),  # valid UTF-8, control characters only
        (_write(d / "latin1.txt", "caf\xe9 au lait\n".encode("latin-1")), "latin1.txt is not UTF-8 (invalid byte at "
                                                                          "offset 3)"),
        (_write(d / "badutf8.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n'), "badutf8.jsonl is not UTF-8"),
        (_write(d / "malformed.jsonl", '{"text": "first"}\n{"text": "second"\n'),
         "malformed.jsonl line 2 is not a JSON object with a string 'text' field"),
        (_write(d / "notext.jsonl", '{"body": "no text field"}\n'), "notext.jsonl line 1 is not a JSON object"),
        (_write(d / "number.jsonl", '{"text": 5}\n'), "number.jsonl line 1 is not a JSON object"),
        (_write(d / "array.jsonl", '["text", "a list"]\n'), "array.jsonl line 1 is not a JSON object"),
        (_write(d / "empty_texts.jsonl", '{"text": ""}\n{"text": "  "}\n'), "no text found"),
        (_write(d / "unusable" / "notes.csv", "a,b\n1,2\n").parent, "holds no .txt or .jsonl files"),
        (_write(d / "empty_dir" / ".keep", b"").parent, "holds no .txt or .jsonl files"),
        (_write(d / "dir_of_empty" / "a.txt", b"").parent, "no text found"),
        (d / "missing.txt", "no such file or directory"),
    ]


def test_every_data_pathology_is_one_line_and_touches_nothing(user, tmp_path, capsys):
    cases = _pathologies(user / "data")
    link_dir = user / "data" / "broken_link"
    link_dir.mkdir()
    os.symlink(str(user / "data" / "nowhere.txt"), str(link_dir / "x.txt"))
    cases.append((link_dir, "--data: cannot read"))
    dataset = _write(user / "data" / "saved" / "dataset_info.json", "{}").parent  # a datasets save_to_disk layout
    cases.append((dataset, "--data: "))
    before = _snapshot(user)
    for i, (path, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, err, _ = _cli(["pretrain", "--no-progress", "--data", str(path), "--tokenizer",
                             str(user / "tokenizer.json"), "--model", str(user / "tiny.json"), "--seq-len", "32",
                             "--steps", "1", "--out", str(out)], capsys)
        _assert_refused(code, err, "pretrain", message)
        assert err[0].startswith("electra-fast pretrain: error: --data: "), err
        assert not (out / "run.json").exists()  # a rerun with good data is not refused
    assert _snapshot(user) == before


def test_data_pathology_while_training_a_tokenizer(user, tmp_path, capsys):
    """Without --tokenizer the data is first read by the tokenizer trainer (Rust): the error still surfaces as
    the last line, after the one progress line, with no traceback."""
    bad = _write(user / "bad.jsonl", '{"text": "fine"}\n{"txt": "typo"}\n')
    before = _snapshot(user)
    code, err, _ = _cli(["pretrain", "--no-progress", "--data", str(bad), "--model", str(user / "tiny.json"),
                         "--seq-len", "32", "--steps", "1", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 2 and err[0].startswith("training a WordPiece tokenizer"), err
    assert err[1] == ("electra-fast pretrain: error: --data: " + str(bad) + " line 2 is not a JSON object with a "
                      "string 'text' field; fix it or pass --skip-bad-lines")
    assert _snapshot(user) == before and not (tmp_path / "out").exists()  # nothing left behind to refuse a rerun


def test_pretrain_output_and_tokenizer_errors(user, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory\n")
    _write(user / "garbage-tokenizer.json", "{not json")
    cases = [(["--out", str(tmp_path / "a-file")], "--out: ", "exists and is not a directory"),
             (["--tokenizer", str(user / "nope.json")], "--tokenizer: no such file or directory", ""),
             (["--tokenizer", str(user / "garbage-tokenizer.json")], "--tokenizer: cannot read", "")]
    before, file_before = _snapshot(user), (tmp_path / "a-file").read_text()
    for i, (extra, message, tail) in enumerate(cases):
        argv = ["pretrain", "--no-progress", "--data", str(user / "corpus.txt"), "--tokenizer",
                str(user / "tokenizer.json"), "--model", str(user / "tiny.json"), "--seq-len", "32", "--steps", "1",
                "--out", str(tmp_path / f"out{i}")]
        code, err, _ = _cli(argv + extra, capsys)
        _assert_refused(code, err, "pretrain", message)
        assert err[0].endswith(tail)
    assert _snapshot(user) == before and (tmp_path / "a-file").read_text() == file_before


def test_ctrl_c_outside_the_training_loop_is_one_line(user, tmp_path, capsys, monkeypatch):
    from electra_fast.train import trainer

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_token_cache", interrupted)
    code, err, _ = _cli(["pretrain", "--no-progress", "--data", str(user / "corpus.txt"), "--tokenizer",
                         str(user / "tokenizer.json"), "--model", str(user / "tiny.json"), "--seq-len", "32",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 130 and err == ["electra-fast pretrain: interrupted"]



def test_ctrl_c_in_a_command_without_its_own_handling_is_one_line(capsys, monkeypatch):
    """Review finding: Ctrl-C while the command's modules load (or in one such as bench, info, demo) printed a
    30-line KeyboardInterrupt traceback; the command now exits 130 with one line (--debug: the traceback)."""
    from electra_fast import info

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "main", interrupted)
    try:
        code, err, _ = _cli(["info"], capsys)
    except KeyboardInterrupt:  # not as pytest's own Ctrl-C, which would end the session
        pytest.fail("Ctrl-C left the command as a KeyboardInterrupt traceback")
    assert code == 130 and err == ["electra-fast: interrupted"]
    from electra_fast.train import cli as train_cli
    monkeypatch.setattr(train_cli, "_run", lambda args: interrupted())
    with pytest.raises(KeyboardInterrupt):
        cli_main(["pretrain", "--debug"])

# ------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def finished_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    pretrain(env["data"], **_kw(env, out, steps=1))
    return out


def test_export_bad_arguments(finished_run, tmp_path, capsys):
    import shutil
    (tmp_path / "a-file").write_text("mine\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine\n")
    (tmp_path / "no-checkpoints").mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(finished_run / "checkpoints" / "step-00000001", corrupt)
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.truncate(100)
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "e1")], "no complete checkpoint found in"),
        ([str(tmp_path / "no-checkpoints"), str(tmp_path / "e2")], "no complete checkpoint found in"),
        ([str(corrupt), str(tmp_path / "e3")], "is corrupt or partial: model.safetensors does not match"),
        ([str(finished_run), str(tmp_path / "a-file")], f"export: {tmp_path / 'a-file'} is a file; choose a new"),
        # with a trailing slash the check missed the file: the whole export was built, then '[Errno 20]' on a temporary
        ([str(finished_run), str(tmp_path / "a-file") + os.sep], f"export: {tmp_path / 'a-file'} is a file; choose"),
        ([str(finished_run), str(tmp_path / "full")], "already exists and is not empty"),
        ([str(finished_run), str(tmp_path / "a-file" / "sub")], f"{tmp_path / 'a-file'} exists and is not a directory"),
        ([str(finished_run)], "the following arguments are required: out_dir"),
        # an empty OUT_DIR was written beside the working directory, then failed at the rename ([Errno 2])
        ([str(finished_run), ""], "export: OUT_DIR is empty; name a new or empty directory"),
        ([str(finished_run), str(tmp_path / "e4"), "--bogus"], "unrecognized arguments: --bogus"),
        # retention deleted a checkpoint with everything in it: an export there was lost at the next --resume
        ([str(finished_run), str(finished_run / "checkpoints" / "step-00000001" / "hf")],
         f"is inside checkpoint {finished_run / 'checkpoints' / 'step-00000001'}, which holds only the run's own "
         "files (its --keep deletes old ones); choose a directory outside checkpoints/"),
    ]
    before, run_before = _snapshot(tmp_path), _snapshot(finished_run)
    for extra, message in cases:
        code, err, _ = _cli(["export", *extra], capsys)
        _assert_refused(code, err, "export", message)
    assert _snapshot(tmp_path) == before and _snapshot(finished_run) == run_before


def test_export_into_an_empty_directory_that_is_a_link_or_the_working_directory(finished_run, tmp_path, capsys,
                                                                              monkeypatch):
    """An empty OUT_DIR given as a symbolic link, or as '.', ended in '[Errno 20] Not a directory' / '[Errno 22]
    Invalid argument' after the export was written and thrown away; both now receive it (the link stays a link)."""
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out in (str(tmp_path / "link"), "."):
        code, err, _ = _cli(["export", str(finished_run), out], capsys)
        assert code == 0, err
    assert (tmp_path / "link").is_symlink()
    for d in (tmp_path / "target", tmp_path / "here"):
        assert sorted(os.listdir(d)) == ["discriminator", "electra_fast.json", "generator"]
    # an export killed there left its temporary inside (written there: a mount point's parent is another file
    # system): the next export removes it instead of calling the directory "not empty"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / f".export.tmp-{dead.pid}").mkdir()
    (tmp_path / "again" / f".export.tmp-{dead.pid}" / ".electra-fast-temporary").write_text("")  # marked as ours
    code, err, _ = _cli(["export", str(finished_run), str(tmp_path / "again")], capsys)
    assert code == 0 and sorted(os.listdir(tmp_path / "again")) == ["discriminator", "electra_fast.json", "generator"]



@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "80000000000 bytes. Error code 12 (Cannot allocate memory)"),
                                   # the allocator's other wording (review finding: a traceback, not this line)
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not "
                                                "enough memory: you tried to allocate 80000000000 bytes."),
                                   MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")])
def test_out_of_memory_is_one_line_naming_what_to_lower(error, capsys):
    """--batch-size 200000 ended in an allocator traceback."""
    import argparse
    from electra_fast.train.cli import guard

    def command():
        raise error

    for command_name, advice in (("pretrain", "lower --batch-size or --seq-len (--grad-accum keeps the batch), or "
                                              "use a smaller --model"),
                                 ("finetune", "lower --batch-size / --eval-batch-size or --max-len")):
        assert guard(argparse.Namespace(command=command_name, debug=False), command) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"electra-fast {command_name}: error: out of memory (") and \
            err[0].endswith(advice)

def test_guard_under_torchrun_names_the_rank_and_keeps_to_one_line(monkeypatch, capsys):
    """Under torchrun, a rank left at a collective when rank 0 stopped on bad input printed a gloo traceback
    ('Connection closed by peer'): another rank than 0 now says in one line what stopped it; rank 0 still shows a
    bug's traceback."""
    import argparse
    from electra_fast.train.cli import guard
    from electra_fast.train.errors import PretrainError

    args = argparse.Namespace(command="pretrain", debug=False)

    def peer_gone():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer\nmore")

    def bad_input():
        raise PretrainError("--data: bad.txt is not UTF-8")

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert guard(args, peer_gone) == 1
    assert capsys.readouterr().err.splitlines() == [
        "electra-fast pretrain: rank 1: stopped by RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed "
        "by peer (rank 0's message says why)"]
    assert guard(args, bad_input) == 2
    assert capsys.readouterr().err == "electra-fast pretrain: rank 1: error: --data: bad.txt is not UTF-8\n"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="Connection closed"):
        guard(args, peer_gone)
    # outside torchrun a RANK left in the shell means nothing: a bug keeps its traceback, a bad RANK is no error
    for rank, world in (("1", "1"), ("abc", "2")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(RuntimeError, match="Connection closed"):
            guard(args, peer_gone)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("RANK", "1")
    assert guard(args, bad_input) == 2
    assert capsys.readouterr().err == "electra-fast pretrain: error: --data: bad.txt is not UTF-8\n"


def _rewrite_checksummed(ckpt_dir, name, data):
    """Replace one file of a checkpoint and update meta.json to match: contents that pass the checksums but are
    not what the job wrote (a hand edit, a foreign file)."""
    (ckpt_dir / name).write_bytes(data)
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    meta["sha256"][name] = hashlib.sha256(data).hexdigest()
    (ckpt_dir / "meta.json").write_text(json.dumps(meta))


def test_export_unusable_checkpoint_contents(finished_run, tmp_path, capsys):
    import shutil
    runs = {}
    for name in ("only-corrupt", "garbage-config", "wrong-shape"):
        shutil.copytree(finished_run, tmp_path / name)
        runs[name] = tmp_path / name / "checkpoints" / "step-00000001"
    with open(runs["only-corrupt"] / "model.safetensors", "r+b") as f:
        f.truncate(100)
    _rewrite_checksummed(runs["garbage-config"], "config.json", b"{not json")
    cfg = json.loads((runs["wrong-shape"] / "config.json").read_text())
    _rewrite_checksummed(runs["wrong-shape"], "config.json", json.dumps({**cfg, "hidden_size": 64}).encode())
    cases = [  # each was a warning line then the error, or a 29-line JSONDecodeError / RuntimeError traceback
        ("only-corrupt", "no complete checkpoint found in", "(skipped corrupt or partial checkpoint"),
        ("garbage-config", "config.json is not a valid ElectraConfig: Expecting property name", ""),
        ("wrong-shape", "model.safetensors does not fit config.json (size mismatch for ", ""),
    ]
    before = _snapshot(tmp_path)
    for name, message, detail in cases:
        code, err, _ = _cli(["export", str(tmp_path / name), str(tmp_path / f"{name}-export")], capsys)
        _assert_refused(code, err, "export", message)
        assert detail in err[0], err
    assert _snapshot(tmp_path) == before


def test_checksummed_but_unreadable_checkpoint_files_are_one_line(finished_run, env, tmp_path, capsys):
    """Files whose meta.json checksums match (rewritten with them) but which hold foreign bytes: export, --resume and
    --init-from ended in a ~30-line SafetensorError / UnpicklingError traceback, a state without its step in
    KeyError: 'step', a meta.json whose sha256 is no object in AttributeError."""
    import shutil
    runs = {}
    for name in ("garbage-model", "garbage-state", "no-step", "sha256-null"):
        shutil.copytree(finished_run, tmp_path / name)
        runs[name] = tmp_path / name / "checkpoints" / "step-00000001"
    _rewrite_checksummed(runs["garbage-model"], "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    _rewrite_checksummed(runs["garbage-state"], "training_state.pt", b"not a pickle at all")
    buf = io.BytesIO()
    torch.save({"optimizer": {}}, buf)
    _rewrite_checksummed(runs["no-step"], "training_state.pt", buf.getvalue())
    meta = json.loads((runs["sha256-null"] / "meta.json").read_text())
    (runs["sha256-null"] / "meta.json").write_text(json.dumps({**meta, "sha256": None}))
    before = _snapshot(tmp_path)
    base = ["--no-progress", "--data", env["data"], "--steps", "2"]
    cases = [
        (["export", str(tmp_path / "garbage-model"), str(tmp_path / "x1")], "export",
         "model.safetensors is not a readable checkpoint file (SafetensorError"),
        (["pretrain", "--out", str(tmp_path / "garbage-model"), "--resume", *base], "pretrain",
         "model.safetensors is not a readable checkpoint file (SafetensorError"),
        (["pretrain", "--out", str(tmp_path / "x2"), "--init-from", str(tmp_path / "garbage-model"), *base],
         "pretrain", "model.safetensors is not a readable checkpoint file (SafetensorError"),
        (["pretrain", "--out", str(tmp_path / "garbage-state"), "--resume", *base], "pretrain",
         "training_state.pt is not a readable checkpoint file (UnpicklingError"),
        (["pretrain", "--out", str(tmp_path / "no-step"), "--resume", *base], "pretrain",
         "training_state.pt is not an electra-fast training state (no step, data_position, tokens_seen, scheduler"),
        (["export", str(tmp_path / "sha256-null"), str(tmp_path / "x3")], "export",
         "meta.json missing or unreadable"),
    ]
    for argv, command, message in cases:
        code, err, _ = _cli(argv, capsys)
        _assert_refused(code, err, command, message)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["info", "pretrain"])
def test_misspelt_backend_variable_is_one_line(user, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "bogus")
    argv = [command] if command == "info" else [
        "pretrain", "--no-progress", "--data", str(user / "corpus.txt"), "--tokenizer", str(user / "tokenizer.json"),
        "--model", str(user / "tiny.json"), "--seq-len", "32", "--steps", "1", "--out", str(tmp_path / "out")]
    code, err, _ = _cli(argv, capsys)
    assert code == 2 and err == ["electra-fast: error: ELECTRA_FAST_BACKEND: expected one of ('triton', 'cpp', "
                                 "'reference') or 'auto', got 'bogus'"], err
    assert not (tmp_path / "out").exists()
    if command == "info":  # python -m electra_fast.info too (it was a traceback)
        from electra_fast import info
        assert info.main() == 2
        assert capsys.readouterr().err.startswith("electra_fast.info: error: ELECTRA_FAST_BACKEND: expected one")
        assert info.main(["--bogus"]) == 2  # it takes no arguments (they were ignored)
        assert capsys.readouterr().err.strip().endswith("unrecognized arguments: --bogus (it takes none)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the triton backend can serve a CUDA device")
def test_forced_backend_that_cannot_serve_the_device_is_one_line(user, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, err, _ = _cli(["pretrain", "--no-progress", "--data", str(user / "corpus.txt"), "--tokenizer",
                         str(user / "tokenizer.json"), "--model", str(user / "tiny.json"), "--seq-len", "32",
                         "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "out")], capsys)
    _assert_refused(code, err, "pretrain", "ELECTRA_FAST_BACKEND=triton: ")  # was a 69-line traceback from step 1
    assert "unset it or choose another --device" in err[0]
    assert not (tmp_path / "out").exists()


def _finetune_argv(run, tmp_path, *extra):
    tsv = _tsv(tmp_path / "train.tsv")
    return ["finetune", "--no-progress", "--model", str(run), "--train", tsv, "--validation", tsv, "--epochs", "1",
            "--batch-size", "8", "--out", str(tmp_path / "ft"), *extra]


def _triton_importable():
    from electra_fast import _backend
    return _backend.triton_import_error() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the triton backend can serve a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_a_forced_backend_that_cannot_serve_is_one_line_in_finetune_as_in_pretrain(finished_run, tmp_path, capsys,
                                                                                   monkeypatch, backend):
    """Review finding: ELECTRA_FAST_BACKEND=triton on a CPU (or cpp without the extension) was pretrain's one line
    but finetune's RuntimeError traceback from its first dropout: one check now serves both."""
    from electra_fast import _extension
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if backend == "cpp":  # as ELECTRA_FAST_DISABLE_EXT=1 leaves it, in a process that loaded it
        monkeypatch.setattr(_extension, "extension_loaded", lambda: False)
        monkeypatch.setattr(_extension, "EXTENSION_ERROR", "disabled by ELECTRA_FAST_DISABLE_EXT")
    code, err, _ = _cli(_finetune_argv(finished_run, tmp_path, "--device", "cpu"), capsys)
    _assert_refused(code, err, "finetune", f"ELECTRA_FAST_BACKEND={backend}: ")
    assert err[0].endswith("; unset it or choose another --device")
    assert not (tmp_path / "ft").exists()


@pytest.mark.skipif(not _triton_importable(), reason="needs triton (its CPU interpreter)")
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_forced_backend_the_bf16_linear_layers_cannot_use_is_one_line(user, finished_run, tmp_path, capsys,
                                                                        monkeypatch, command):
    """Review finding: ELECTRA_FAST_BACKEND=triton TRITON_INTERPRET=1 passed the check, then CPU bf16 autocast (what
    --precision auto picks on a CPU with AVX512-BF16) reached electra_fast.linear, which has no Triton kernel: a
    traceback from the first step."""
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    argv = (_finetune_argv(finished_run, tmp_path, "--precision", "bf16") if command == "finetune" else
            ["pretrain", "--no-progress", "--data", str(user / "corpus.txt"), "--tokenizer",
             str(user / "tokenizer.json"), "--model", str(user / "tiny.json"), "--seq-len", "32", "--steps", "1",
             "--precision", "bf16", "--device", "cpu", "--out", str(tmp_path / "ft")])
    code, err, _ = _cli(argv, capsys)
    assert code == 2 and err[-1] == (
        f"electra-fast {command}: error: ELECTRA_FAST_BACKEND=triton: bf16 on a CPU runs the linear layers through "
        "electra_fast.linear, which the triton backend cannot serve (no Triton kernel for this op); unset it, or "
        "pass --precision fp32"), err
    assert not [line for line in err if "Traceback" in line] and not (tmp_path / "ft").exists()
    if command == "finetune":  # the Python API raises its own error class, as its docstring says
        from electra_fast.finetune import FinetuneError, finetune
        tsv = _tsv(tmp_path / "train.tsv")
        with pytest.raises(FinetuneError, match="ELECTRA_FAST_BACKEND=triton: bf16 on a CPU"):
            finetune(str(finished_run), tsv, tsv, out=str(tmp_path / "ft"), epochs=1, precision="bf16",
                     progress=False)
        assert not (tmp_path / "ft").exists()


def test_a_python_callers_stdout_descriptor_is_left_as_it_was(finished_run, tmp_path, monkeypatch):
    """Review finding: settling a stdout that failed points its descriptor at os.devnull, right for the process's
    own command line (the interpreter's flush at exit would fail again) but not for a Python program calling
    cli.main(argv): everything it printed afterwards was discarded."""
    from electra_fast import _console
    full = open("/dev/full", "w")
    try:
        monkeypatch.setattr(sys, "stdout", full)
        monkeypatch.setattr(_console, "_failed_stdout", [])
        code = cli_main(["export", str(finished_run), str(tmp_path / "x")])
        assert code == 0 and os.readlink(f"/proc/self/fd/{full.fileno()}") == "/dev/full"
        assert sorted(os.listdir(tmp_path / "x")) == EXPORTED
    finally:
        try:  # the caller's to settle: its buffer cannot be written; close() closes the descriptor all the same
            full.close()
        except OSError:
            pass


def test_a_partial_torchrun_environment_is_one_line(user, tmp_path, capsys, monkeypatch):
    """Review finding: WORLD_SIZE=2 RANK=0 without MASTER_ADDR (a launcher's environment half set) ended in a
    14-frame traceback from init_process_group, where WORLD_SIZE=2 alone was one line."""
    import torch.distributed as dist
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    code, err, _ = _cli(["pretrain", "--no-progress", "--data", str(user / "corpus.txt"), "--tokenizer",
                         str(user / "tokenizer.json"), "--model", str(user / "tiny.json"), "--seq-len", "32",
                         "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "out")], capsys)
    _assert_refused(code, err, "pretrain", "torchrun's environment (WORLD_SIZE=2, RANK=0): the process group did not "
                    "start (")
    assert "MASTER_ADDR" in err[0] and err[0].endswith("or unset WORLD_SIZE to run one process")
    assert not dist.is_initialized() and not (tmp_path / "out").exists()


def test_a_leading_tilde_in_every_path_option_is_the_home_folder(user, tmp_path, capsys, monkeypatch):
    """Review finding: --out '~/run' (quoted: a launcher's argument list, a YAML config) made a folder named "~" in
    the working directory, and the printed export hint pointed at the home folder. Every path option of every
    command expands a leading ~ (transformers' TrainingArguments does so too)."""
    from electra_fast.finetune import cli as finetune_cli
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    shutil.copytree(user, home)
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    code, err, out = _cli(["pretrain", "--no-progress", "--data", "~/corpus.txt", "--tokenizer", "~/tokenizer.json",
                           "--model", "~/tiny.json", "--seq-len", "32", "--batch-size", "4", "--steps", "1",
                           "--out", "~/run"], capsys)
    assert code == 0, err
    assert (home / "run" / "run.json").is_file() and os.listdir(cwd) == []
    assert f"export: electra-fast export {home / 'run' / 'checkpoints' / 'step-00000001'} " in out
    for argv in (["export", "~/run", "~/exported"], ["plot", "~/run", "--out", "~/curves.png"]):
        code, err, _ = _cli(argv, capsys)
        assert code == 0, err
    assert (home / "exported" / "generator").is_dir() and (home / "curves.png").is_file() and os.listdir(cwd) == []
    seen = {}
    monkeypatch.setattr(finetune_cli, "run", lambda args: seen.setdefault("finetune", vars(args)) and 0)
    monkeypatch.setattr(bench, "main", lambda args: seen.setdefault("bench", vars(args)) and 0)
    _cli(["finetune", "--model", "~/m", "--train", "~/t.tsv", "--validation", "~/v.tsv", "--test", "~/x.tsv",
          "--out", "~/ft"], capsys)
    _cli(["bench", "--out", "~/b", "--compare", "~/prev.json"], capsys)
    assert {k: seen["finetune"][k] for k in ("model", "train", "validation", "test", "out")} == {
        "model": f"{home}/m", "train": f"{home}/t.tsv", "validation": f"{home}/v.tsv", "test": f"{home}/x.tsv",
        "out": f"{home}/ft"}
    assert (seen["bench"]["out"], seen["bench"]["compare"]) == (f"{home}/b", f"{home}/prev.json")


def test_a_standard_descriptor_closed_at_the_start_is_never_a_files(tmp_path, capsys):
    """Review finding: started with 2>&-, fd 2 was the number the next file opened got (the run's lock file, say):
    the SIGTERM handler's message, and C libraries' stderr, would go into it. The command line holds os.devnull
    there."""
    saved = os.dup(2)
    os.close(2)
    try:
        code = cli_main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
        with open(tmp_path / "a-file", "w") as f:
            number = f.fileno()
        held = number != 2 and os.path.samestat(os.fstat(2), os.stat(os.devnull))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert code == 2 and number != 2 and held


class _Unwritable:
    """A stdout that takes nothing: every write and flush raises ``error`` (a full disk, a reader gone)."""

    def __init__(self, error):
        self.error = error

    def write(self, text=""):
        raise self.error

    flush = write


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), BrokenPipeError(32, "Broken pipe")],
                         ids=["full", "pipe"])
def test_a_stdout_that_fails_after_the_work_is_done_is_not_the_works_failure(finished_run, user, tmp_path, capsys,
                                                                             monkeypatch, error):
    """Review finding: `electra-fast export RUN X >/dev/full` said "error: [Errno 28] No space left on device", exit
    2, of a complete export (pretrain, finetune and plot alike). The work's status stands; one note says what was
    lost, none for a reader that left (`| head`); info and the demo, whose output is their work, exit 1."""
    full = not isinstance(error, BrokenPipeError)
    note = ("note: stdout could not be written (No space left on device); the work is complete, only what it "
            "printed is lost")
    pretrain_argv = ["pretrain", "--no-progress", "--data", str(user / "corpus.txt"), "--tokenizer",
                     str(user / "tokenizer.json"), "--model", str(user / "tiny.json"), "--seq-len", "32",
                     "--batch-size", "4", "--steps", "1", "--out", str(tmp_path / "run")]
    for argv in (["export", str(finished_run), str(tmp_path / "exported")], pretrain_argv):
        monkeypatch.setattr(sys, "stdout", _Unwritable(error))
        code, err, _ = _cli(argv, capsys)
        said = [line for line in err if "could not be written" in line]  # after pretrain's own messages
        assert code == 0 and said == ([f"electra-fast {argv[0]}: {note}"] if full else []), err
    assert sorted(os.listdir(tmp_path / "exported")) == EXPORTED
    assert ckpt_steps(tmp_path / "run") == [1]
    monkeypatch.setattr(sys, "stdout", _Unwritable(error))
    code, err, _ = _cli(["info"], capsys)
    assert code == 1 and err == (["electra-fast info: error: stdout could not be written (No space left on device)"]
                                 if full else []), err


def ckpt_steps(run):
    from electra_fast.train import checkpoint
    return [step for step, _ in checkpoint.checkpoint_dirs(run / "checkpoints")]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_real_stdout_that_fails_leaves_no_exit_status_120_and_no_traceback(finished_run, tmp_path):
    """The interpreter's own flush at exit, of what print() left buffered, failed again: "Exception ignored ...
    BrokenPipeError", exit status 120 (info into a pipe its reader closed; export to /dev/full). Settled as Python's
    documentation advises for SIGPIPE: stdout goes to os.devnull."""
    command = [sys.executable, "-m", "electra_fast"]
    reader, writer = os.pipe()
    os.close(reader)  # `| head` gone before the first line
    try:
        info = subprocess.run(command + ["info"], stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)
        demo = subprocess.run([sys.executable, "-m", "electra_fast.demo"], stdout=writer, stderr=subprocess.PIPE,
                              text=True, timeout=300)  # run as a module, not through the command line
    finally:
        os.close(writer)
    assert (info.returncode, info.stderr) == (1, "")
    assert (demo.returncode, demo.stderr) == (1, "")
    with open("/dev/full", "w") as full:
        export = subprocess.run(command + ["export", str(finished_run), str(tmp_path / "x")], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    assert export.returncode == 0 and export.stderr.splitlines() == [
        "electra-fast export: note: stdout could not be written (No space left on device); the work is complete, "
        "only what it printed is lost"], export.stderr
    assert sorted(os.listdir(tmp_path / "x")) == EXPORTED


def test_corpus_shorter_than_one_sequence_is_one_line(user, tmp_path, capsys):
    short = _write(user / "short.txt", "a few words\n")
    code, err, _ = _cli(["pretrain", "--no-progress", "--data", str(short), "--tokenizer", str(user / "tokenizer.json"),
                         "--model", str(user / "tiny.json"), "--seq-len", "32", "--steps", "1",
                         "--out", str(tmp_path / "out")], capsys)
    _assert_refused(code, err, "pretrain", "fewer than one sequence of --seq-len 32")  # was after a progress line


# ------------------------------------------------------------------------------------------ bench
@pytest.fixture
def no_bench_runs(monkeypatch):
    """Any benchmark or report the bench command would start fails the test: arguments are checked first."""
    def ran(*a, **k):
        raise AssertionError("electra-fast bench ran something despite a bad argument")

    for name in ("_run_files", "record_pretrain"):
        monkeypatch.setattr(bench, name, ran)
    for name in ("plots", "write_results_md", "compare"):
        monkeypatch.setattr(bench.bench_report, name, ran)


def _bench_json(path, benchmarks):
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benchmarks}))
    return str(path)


def test_bench_bad_arguments_checked_before_running(tmp_path, capsys, no_bench_runs):
    (tmp_path / "a-file").write_text("mine\n")
    (tmp_path / "not.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    no_rows = _bench_json(tmp_path / "no-rows.json", [{"stats": {"median": 1.0}, "extra_info": {
        "op": "rtd", "impl": "eager", "pass_": "fwd", "shape": "2x8", "dtype": "float32"}}])
    cases = [
        (["--compare", str(tmp_path / "missing.json")], "missing.json: cannot read it"),  # ran all, then a traceback
        (["--compare", str(tmp_path / "not.json")], "not.json: not a pytest-benchmark JSON written by electra-fast"),
        (["--compare", str(tmp_path / "list.json")], "list.json: not a pytest-benchmark JSON written by electra-fast "
                                                     "bench (not an object with a list of benchmark objects)"),
        (["--compare", no_rows], "holds no fused-vs-baseline rows to compare against"),
        (["--compare", str(tmp_path)], ": cannot read it"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        *([(["--device", "cuda"], "--device cuda: ")] if not torch.cuda.is_available() else []),
        (["--out", str(tmp_path / "a-file")], "exists and is not a directory"),
        (["-k", "("], "-k: '(' is not a pytest -k expression"),
        (["-k", " "], "-k: ' ' is not a pytest -k expression (empty)"),
        (["--pretrain", "--compare", no_rows], "--compare: not used by --pretrain"),
        (["--pretrain", "-k", "rtd", "--quick"], "--quick, -k: not used by --pretrain"),
        (["--quick=yes"], "argument --quick: ignored explicit argument 'yes'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ]
    before = _snapshot(tmp_path)
    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(bench.__file__))), "bench", "results")
    results_before = sorted(os.listdir(results))
    for extra, message in cases:
        code, err, _ = _cli(["bench", *extra], capsys)
        _assert_refused(code, err, "bench", message)
    assert _snapshot(tmp_path) == before and sorted(os.listdir(results)) == results_before


def test_default_lr_by_preset_whatever_its_spelling_and_by_size_not_path(env, tmp_path):
    """--lr's default: electra_tiny and electra-tiny are one preset (the rule compared the dashed spelling only and
    gave electra_tiny 2e-4), and a CONFIG.json's default follows its hidden size, not "small" in its path."""
    from electra_fast.train.options import default_lr
    assert default_lr("electra_tiny", None) == default_lr("electra-tiny", None) == 1e-3
    assert default_lr("electra_small", None) == default_lr("electra-small", None) == 5e-4
    assert default_lr("deberta-v3-base", None) == default_lr("deberta_v3_base", None) == 2e-4
    small_dir = tmp_path / "small-models"
    small_dir.mkdir()
    for hidden, lr in ((32, 1e-3), (768, 2e-4)):
        cfg = ElectraConfig.from_json_file(env["model"]).replace(hidden_size=hidden, intermediate_size=2 * hidden)
        cfg.to_json_file(str(small_dir / f"h{hidden}.json"))
        pretrain(env["data"], **_kw(env, tmp_path / f"run{hidden}", model=str(small_dir / f"h{hidden}.json"),
                                    lr=None, steps=1, warmup=0))
        with open(tmp_path / f"run{hidden}" / "run.json", encoding="utf-8") as f:
            assert json.load(f)["options"]["lr"] == lr


# ------------------------------------------------------------------------------------------ crashes, full disks
class Killed(BaseException):
    """A kill -9, simulated in-process: raised at the N-th os.replace and by every file-system change after it
    (a dead process cleans nothing up)."""


def kill_at_replace(monkeypatch, n):
    """From the ``n``-th os.replace on, this process is "dead" (:class:`Killed`); returns its state."""
    import shutil
    state = {"calls": 0, "dead": False}
    real = {"replace": os.replace, "unlink": os.unlink, "rmdir": os.rmdir, "rmtree": shutil.rmtree}

    def replace(a, b):
        state["calls"] += 1
        state["dead"] = state["dead"] or state["calls"] == n
        if state["dead"]:
            raise Killed
        return real["replace"](a, b)

    def dying(name):
        def call(*a, **k):
            if state["dead"]:
                raise Killed
            return real[name](*a, **k)
        return call

    monkeypatch.setattr(os, "replace", replace)
    for name in ("unlink", "rmdir"):
        monkeypatch.setattr(os, name, dying(name))
    monkeypatch.setattr(shutil, "rmtree", dying("rmtree"))
    return state


EXPORTED = ["discriminator", "electra_fast.json", "generator"]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _run_copy(finished_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    return run


def test_full_disk_in_export_is_one_line_and_leaves_nothing(finished_run, tmp_path, capsys, monkeypatch):
    """Review finding: export on a full disk ended in safetensors' SafetensorError traceback ("os error 28")."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        code, err, _ = _cli(["export", str(finished_run), str(out)], capsys)
        _assert_refused(code, err, "export", f"writing {out / 'generator' / 'model.safetensors'} failed (Error while "
                        "serializing: I/O error: No space left on device (os error 28); ")
        assert err[0].endswith(" MiB free there)"), err
    assert sorted(os.listdir(tmp_path)) == ["empty"] and os.listdir(tmp_path / "empty") == []


def _tsv(path, n=16):
    rows = [("the cat sat on the mat", "yes"), ("a dog ran under the tree", "no")] * (n // 2)
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{lab}\n" for s, lab in rows))
    return str(path)


def test_full_disk_in_finetune_is_one_line(finished_run, tmp_path, capsys, monkeypatch):
    """Review finding: finetune on a full disk ended in torch.save's traceback ("[enforce fail at
    inline_container.cc:672] . unexpected pos") while writing last-epoch.pt."""
    real = torch.save

    def full(obj, f, *a, **k):
        if "last-epoch.pt" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2424640 vs 2424528")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    tsv, out = _tsv(tmp_path / "train.tsv"), tmp_path / "ft"
    code, err, _ = _cli(["finetune", "--no-progress", "--model", str(finished_run), "--train", tsv, "--validation",
                         tsv, "--epochs", "1", "--batch-size", "8", "--seeds", "1", "--out", str(out)], capsys)
    assert code == 2 and not [line for line in err if "Traceback" in line], err
    assert err[-1].startswith(f"electra-fast finetune: error: writing {out / 'seed-1' / 'last-epoch.pt'} failed "
                              "([enforce fail at inline_container.cc:672] . unexpected pos 2424640 vs 2424528; ")
    assert err[-1].endswith(" MiB free there)"), err


def test_full_disk_in_the_demo_is_one_line(finished_run, tmp_path, capsys, monkeypatch):
    """Review finding: the finetune demo caught only FinetuneError / PretrainError: a full disk while it wrote its
    task splits was an OSError traceback."""
    import builtins
    import errno
    from electra_fast.finetune import demo
    real = builtins.open

    def full(file, mode="r", *a, **k):
        if "train.tsv" in str(file) and any(c in mode for c in "wax+"):
            raise OSError(errno.ENOSPC, "No space left on device", file)
        return real(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full)
    out = tmp_path / "demo"
    code = demo.main(["--out", str(out), "--model", str(finished_run), "--tasks", "acceptability", "--seeds", "1",
                      "--epochs", "1"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1, err
    split = out / "data" / "acceptability" / "train.tsv"
    assert err[0].startswith(f"electra_fast.finetune.demo: error: writing {split} failed (No space left on device; ")
    assert err[0].endswith(" MiB free there)"), err


def test_full_disk_while_tokenising_names_the_cache_file(user, tmp_path, capsys, monkeypatch):
    """Review finding: a full disk while the token cache was written said only "error: [Errno 28] No space left on
    device": no file, no room."""
    import errno
    import re
    from electra_fast.train import data
    real = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def full(file, mode="r", *a, **k):
        f = real(file, mode, *a, **k)
        return Full(f) if ".bin.tmp-" in str(file) else f

    monkeypatch.setattr(data, "open", full, raising=False)
    out = tmp_path / "out"
    code, err, _ = _cli(["pretrain", "--no-progress", "--data", str(user / "corpus.txt"), "--tokenizer",
                         str(user / "tokenizer.json"), "--model", str(user / "tiny.json"), "--seq-len", "32",
                         "--steps", "1", "--out", str(out)], capsys)
    assert code == 2 and not [line for line in err if "Traceback" in line], err
    assert re.fullmatch(rf"electra-fast pretrain: error: writing {re.escape(str(out / 'cache'))}/tokens-[0-9a-f]{{24}}"
                        r"\.bin failed \(No space left on device; \d+ MiB free there\)", err[-1]), err


def test_export_killed_part_way_into_an_empty_directory_is_whole_or_nothing(finished_run, tmp_path, capsys,
                                                                           monkeypatch):
    """Review finding: export into an existing empty OUT_DIR moved its entries up one rename at a time: a kill
    between them left part of the model there, and the retry said "already exists and is not empty". A kill still
    may leave a part (the folder stays), never electra_fast.json without the rest; the retry takes it back."""
    killed = []
    for n in range(1, 9):
        out = tmp_path / f"out{n}"
        out.mkdir()
        state = kill_at_replace(monkeypatch, n)
        try:
            cli_main(["export", str(finished_run), str(out)])
        except Killed:
            killed.append(n)
        monkeypatch.undo()
        capsys.readouterr()
        left = sorted(os.listdir(out))
        assert "electra_fast.json" not in left or left == EXPORTED, (n, left)  # the loader's file comes last
        if left == EXPORTED:
            continue
        code, err, _ = _cli(["export", str(finished_run), str(out)], capsys)
        assert code == 0 and sorted(os.listdir(out)) == EXPORTED, err
        assert not [x for x in os.listdir(tmp_path) if ".tmp-" in x], os.listdir(tmp_path)
    assert killed and not state["dead"]  # the last n was past every rename: each instant was tried


def test_export_removes_a_killed_exports_temporary_beside_a_new_out_dir(finished_run, tmp_path, capsys,
                                                                        monkeypatch):
    """Review finding: export into a new OUT_DIR, killed part way, left .NAME.tmp-PID (a partial model) in OUT_DIR's
    parent, which no later export removed; with this process's PID (a container's every start has the same one)
    the retry even failed ("File exists")."""
    kill_at_replace(monkeypatch, 1)
    with pytest.raises(Killed):
        cli_main(["export", str(finished_run), str(tmp_path / "new")])
    monkeypatch.undo()
    capsys.readouterr()
    assert os.listdir(tmp_path) == [f".new.tmp-{os.getpid()}"]  # what the kill left
    from electra_fast import _files
    dead = tmp_path / f".new.tmp-{_dead_pid()}"  # another killed export's (marked as ours, its lock gone with it)
    (dead / "generator").mkdir(parents=True)
    (dead / _files.OURS).write_text("")
    (tmp_path / ".new.tmp-mine").write_text("the user's, not our pattern\n")
    code, err, _ = _cli(["export", str(finished_run), str(tmp_path / "new")], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == [".new.tmp-mine", "new"] and sorted(os.listdir(tmp_path / "new")) == EXPORTED


def test_a_finished_runs_resume_and_export_remove_a_killed_retentions_checkpoint(finished_run, tmp_path, capsys):
    """Review finding: a finished run killed during its last retention kept .del-step-N-PID (a whole checkpoint):
    --resume refused ("already at step") before its cleaning ran, and export cleaned nothing."""
    run = _run_copy(finished_run, tmp_path)
    doomed = run / "checkpoints" / f".del-step-00000000-{_dead_pid()}"
    for command, argv in (("pretrain", ["pretrain", "--no-progress", "--resume", "--out", str(run)]),
                          ("export", ["export", str(run), str(tmp_path / "hf")])):
        doomed.mkdir()
        (doomed / "model.safetensors").write_bytes(b"\0" * 4096)
        code, err, _ = _cli(argv, capsys)
        if command == "pretrain":
            _assert_refused(code, err, "pretrain", "--steps: the resumed run is already at step 1 >= --steps 1")
        else:
            assert code == 0, err
        assert not doomed.exists(), command


def test_a_resumed_run_removes_its_folders_temporaries_whatever_their_pid(finished_run, tmp_path, capsys):
    """Review finding: in a container every start has the same PID, and a temporary carrying the job's own PID
    counted as alive: never removed. The job holds the run's lock (flock) before it cleans, so every temporary of
    ours there is a dead job's, whatever its PID (ours, or one now another live process's); a user's file that
    merely looks like one stays."""
    run = _run_copy(finished_run, tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        ours = [run / "checkpoints" / f".tmp-step-00000009-{os.getpid()}",
                run / "checkpoints" / f".del-step-00000000-{sleeper.pid}", run / f"run.json.tmp-{os.getpid()}",
                run / "cache" / f"tokens-{'0' * 24}.bin.tmp-{sleeper.pid}"]
        theirs = [run / f"notes.tmp-{os.getpid()}", run / "cache" / f"mine.bin.tmp-{os.getpid()}"]
        for path in ours[:2]:
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"\0" * 4096)
        for path in ours[2:] + theirs:
            path.write_text("x")
        code, err, _ = _cli(["pretrain", "--no-progress", "--resume", "--steps", "2", "--out", str(run)], capsys)
        assert code == 0, err
        assert [p for p in ours if os.path.lexists(p)] == [] and all(p.exists() for p in theirs)
    finally:
        sleeper.kill()
        sleeper.wait()
