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
        (task / f"{split}.tsv").write_text("sentence\tlabel\na film\t1\nfilm a\t0\n")
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


def _stand_in_run(monkeypatch, texts):
    """_load_run replaced: a tokenizer of ``texts`` and a discriminator giving every token the logit 0."""
    import torch

    from electra_fast.train.tokenizer import train_tokenizer
    tok = train_tokenizer("wordpiece", texts * 10, 100)
    model = types.SimpleNamespace(discriminator=lambda ids: torch.zeros(ids.shape, dtype=torch.float))
    cfg = types.SimpleNamespace(max_position_embeddings=128)
    monkeypatch.setattr(finetune_probes, "_load_run", lambda run: ("src", cfg, model, tok))


def test_labels_other_than_the_demos_and_a_single_class_are_refused(tmp_path, monkeypatch, capsys):
    """Review finding: labels pos / neg all read as class 0, a trivially perfect linear probe (dev accuracy 1.000);
    swap on one class formatted the AUC None (TypeError traceback)."""
    _stand_in_run(monkeypatch, ["a good film", "a bad film"])
    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "dev"):
        (task / f"{split}.tsv").write_text("sentence\tlabel\na good film\tpos\na bad film\tneg\n")
    assert "line 2: label 'pos'; expected 0 / 1 or rotten / fresh" in _fail(monkeypatch, capsys, "linear", "run", task)
    assert "label 'pos'" in _fail(monkeypatch, capsys, "swap", "run", task / "dev.tsv")
    one = tmp_path / "one.tsv"
    one.write_text("sentence\tlabel\na good film\t1\na bad film\t1\n")
    assert "every row has label '1'; expected rows of both classes" in _fail(monkeypatch, capsys, "swap", "run", one)
    fresh = tmp_path / "fresh.tsv"
    fresh.write_text("sentence\tlabel\na good film\tfresh\na bad film\trotten\n")
    assert finetune_probes.read_tsv(str(fresh))[1].tolist() == [1, 0]


def test_text_that_is_not_utf8_is_named(tmp_path, monkeypatch, capsys):
    """Review finding: the one line said only "'utf-8' codec can't decode byte 0xe9 ...", neither file nor argument."""
    _stand_in_run(monkeypatch, ["café au lait"])
    for name, data in (("text.txt", b"caf\xe9 au lait\n"), ("dev.tsv", b"sentence\tlabel\ncaf\xe9\t1\n")):
        (tmp_path / name).write_bytes(data)
        err = _fail(monkeypatch, capsys, "mlm" if name == "text.txt" else "swap", "run", tmp_path / name)
        assert f"data: {tmp_path / name} is not UTF-8 text (byte 0xe9" in err, err


def test_linear_reads_an_export_folder(tmp_path, monkeypatch, capsys):
    """Review finding: the tokenizer of an `electra-fast export` or a fine-tuning run's export/ is a folder, which
    Tokenizer.from_file refused with a traceback ("Is a directory")."""
    from electra_fast.finetune import model as fmodel
    from electra_fast.models import ElectraConfig, ElectraPretrainingModel, interop
    from electra_fast.train.tokenizer import config_overrides, save_for_transformers, train_tokenizer

    texts = ["the cat sat on the mat", "the mat sat on the cat", "a dog ran", "ran a dog"]
    tok = train_tokenizer("wordpiece", texts * 10, 100)
    cfg = ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, generator_hidden_size=16, generator_num_hidden_layers=1,
                        generator_num_attention_heads=1, generator_intermediate_size=32, max_position_embeddings=64,
                        **config_overrides(tok))
    pretrained = tmp_path / "pretrained"  # electra-fast export's layout
    pretrained.mkdir()
    interop.write_pretrained(ElectraPretrainingModel(cfg), str(pretrained))
    for role in ("generator", "discriminator"):
        save_for_transformers(tok, str(pretrained / role), cfg.max_position_embeddings)
    finetuned = tmp_path / "finetuned"  # a fine-tuning run's export/
    fmodel.export(fmodel.build(cfg, None, "classification", 2), ["0", "1"], tok, str(finetuned))
    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "dev"):
        rows = "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts))
        (task / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    for export in (pretrained, finetuned):
        monkeypatch.setattr(sys, "argv", ["finetune_probes.py", "linear", str(export), str(task)])
        finetune_probes.main()
        out = capsys.readouterr().out.splitlines()
        assert [line.split(": ")[1] for line in out] == ["pretrained", "random init"], out
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (pretrained / "discriminator" / name).unlink()
    err = _fail(monkeypatch, capsys, "linear", pretrained, task)  # no --tokenizer here to name
    assert err.startswith(f"finetune_probes: error: run: {pretrained / 'discriminator'} holds neither"), err


def test_an_empty_sentence_or_logits_that_are_not_finite_are_one_line(tmp_path, monkeypatch, capsys):
    """Review findings: swap on a row with an empty sentence ended in "max(): Expected reduction dim" (no token
    between [CLS] and [SEP]); a discriminator giving NaN logits in roc_auc's ValueError, both tracebacks."""
    import torch
    _stand_in_run(monkeypatch, ["a good film", "a bad film"])
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\na good film\t1\n \t0\n")
    assert f"{dev}: line 3: the sentence is empty" in _fail(monkeypatch, capsys, "swap", "run", dev)
    dev.write_text("sentence\tlabel\na good film\t1\n\u200b\t0\n", encoding="utf-8")  # what the normaliser deletes
    assert f"{dev}: line 3: the sentence has no token the model reads" in _fail(monkeypatch, capsys, "swap", "run",
                                                                                dev)
    dev.write_text("sentence\tlabel\na good film\t1\na bad film\t0\n")
    assert finetune_probes.swap_probe("run", str(dev)) == 0.5  # every logit 0: a tie
    _, cfg, model, tok = finetune_probes._load_run("run")
    model.discriminator = lambda ids: torch.full(ids.shape, float("nan"))
    assert "logits that are not finite (NaN or inf)" in _fail(monkeypatch, capsys, "swap", "run", dev)
