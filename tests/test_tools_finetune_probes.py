"""tools/finetune_probes.py on bad input: one line on stderr and exit 2, never a traceback (no model is trained)."""
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import finetune_probes  # noqa: E402


def _fail(monkeypatch, capsys, *argv) -> str:
    monkeypatch.setattr(sys, "argv", ["finetune_probes.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        finetune_probes.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("finetune_probes: error:"), err
    return err


def test_a_missing_file_or_a_folder_that_is_no_run_is_one_line(tmp_path, monkeypatch, capsys):
    text = tmp_path / "text.txt"
    text.write_text("a few words of held-out text\n")
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert "no complete checkpoint" in _fail(monkeypatch, capsys, "mlm", not_a_run, text)
    assert "no such file" in _fail(monkeypatch, capsys, "linear", not_a_run, tmp_path)  # no train.tsv there
    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "dev"):
        (task / f"{split}.tsv").write_text("sentence\tlabel\na film\t1\n")
    assert "not an electra-fast checkpoint" in _fail(monkeypatch, capsys, "linear", not_a_run, task)
    assert "no such file" in _fail(monkeypatch, capsys, "swap", not_a_run, tmp_path / "missing.tsv")


def test_a_seq_len_the_model_or_the_text_cannot_fill_is_one_line(tmp_path, monkeypatch, capsys):
    """--seq-len 2 was a ZeroDivisionError, --seq-len 1000 a ValueError traceback."""
    text = tmp_path / "text.txt"
    text.write_text("a few words of held-out text\n")
    loaded = []  # the model's limits come from its config: a stand-in run whose rows hold at most 128 positions
    cfg = types.SimpleNamespace(max_position_embeddings=128, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    from electra_fast.train.tokenizer import train_tokenizer
    tok = train_tokenizer("wordpiece", ["a few words of held-out text"] * 10, 100)
    monkeypatch.setattr(finetune_probes, "_load_run", lambda run: loaded.append(run) or ("src", cfg, None, tok))
    assert "--seq-len: expected an int >= 3" in _fail(monkeypatch, capsys, "mlm", "run", text, "--seq-len", 2)
    assert not loaded  # refused before the checkpoint is read
    assert "exceeds the model's max_position_embeddings" in _fail(monkeypatch, capsys, "mlm", "run", text,
                                                                 "--seq-len", 1000)
    assert "tokens of text" in _fail(monkeypatch, capsys, "mlm", "run", text, "--seq-len", 100)
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\na sentence without its label\n")
    assert "line 2 is not sentence<TAB>label" in _fail(monkeypatch, capsys, "swap", "run", bad)
