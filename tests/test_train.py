"""The pretraining job: tokenizer, data cache and packing, training, exact resume, crash-safe checkpoints,
two-process DDP, export to transformers, and every bad-input case (one-line errors, non-zero exit)."""
import gc
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
import torch

from electra_fast.cli import main as cli_main
from electra_fast.models import ElectraConfig
from electra_fast.train import PretrainError, derive_seed, pretrain
from electra_fast.train import checkpoint as ckpt
from electra_fast.train.data import PackedSequences, Sampler, build_token_cache, read_documents
from electra_fast.train.tokenizer import load_tokenizer, special_ids, train_wordpiece

WORDS = ("the cat dog bird sat ran flew on under over a mat tree roof quickly slowly red blue green big small "
         "house river stone light dark morning evening sings eats sleeps watches").split()


def _corpus(n_docs=120, seed=0):
    """Synthetic documents with learnable structure (article noun verb preposition article noun)."""
    r = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(r.randint(2, 5)):
            sents.append(" ".join(r.choice(WORDS[i:i + 6]) for i in range(0, 30, 6)) + ".")
        docs.append(" ".join(sents).capitalize())
    return docs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add barrier waits on a busy CI machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = root / "corpus.txt"
    data.write_text("\n\n".join(_corpus()) + "\n", encoding="utf-8")
    tok = train_wordpiece(_corpus(), vocab_size=120)
    tok.save(str(root / "tokenizer.json"))
    cfg = ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, generator_hidden_size=16, generator_num_hidden_layers=1,
                        generator_num_attention_heads=1, generator_intermediate_size=32, max_position_embeddings=64,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    cfg.to_json_file(str(root / "tiny.json"))
    return {"root": root, "data": str(data), "tokenizer": str(root / "tokenizer.json"), "model": str(root / "tiny.json")}


def _kw(env, out, **kw):
    base = dict(tokenizer=env["tokenizer"], model=env["model"], seq_len=32, batch_size=4, steps=8, lr=3e-3,
                warmup=2, out=str(out), log_every=1, progress=False)
    base.update(kw)
    return base


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


# ------------------------------------------------------------------------------------------ tokenizer / data
def test_tokenizer_train_save_load(env, tmp_path):
    tok = load_tokenizer(env["tokenizer"])
    ids = special_ids(tok)
    assert ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    enc = tok.encode("The cat sat on the mat.")
    assert enc.ids[0] == ids["cls"] and enc.ids[-1] == ids["sep"] and ids["unk"] not in enc.ids
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(env["tokenizer"], d / "tokenizer.json")
    assert load_tokenizer(str(d)).get_vocab() == tok.get_vocab()
    v = tmp_path / "bert"  # a BERT vocab.txt directory
    v.mkdir()
    (v / "vocab.txt").write_text("\n".join(sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n")
    assert load_tokenizer(str(v)).encode("the cat").ids == tok.encode("the cat").ids


@pytest.mark.parametrize("settings", [dict(do_lower_case=True, strip_accents=False),
                                      dict(do_lower_case=True), dict(do_lower_case=False, strip_accents=True),
                                      dict(do_lower_case=False), dict(tokenize_chinese_chars=False)])
def test_vocab_txt_folder_tokenizes_as_transformers(tmp_path, settings):
    """A vocab.txt folder's tokenizer_config.json: strip_accents and tokenize_chinese_chars were ignored (accents
    stripped whenever lower-cased: other ids than the model's own tokenizer gave)."""
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "café", "cafe", "naïve", "naive", "şeker", "seker", ".",
             "Café", "Şeker", "中", "文", "中文", "##文"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "BertTokenizer"}))
    text = "Café naïve Şeker. 中文"
    want = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))(text)["input_ids"]
    assert load_tokenizer(str(tmp_path)).encode(text).ids == want
    # the vocab.txt file itself reads as its folder (it was parsed as a tokenizer.json: "invalid type: sequence")
    assert load_tokenizer(str(tmp_path / "vocab.txt")).encode(text).ids == want


@pytest.mark.parametrize("named_by", ["tokenizer_class", "model_type"])
@pytest.mark.parametrize("kind, settings, text", [
    ("bert", dict(do_lower_case=True), "Café NAÏVE Şeker"), ("bert", {}, "Café NAÏVE Şeker"),
    ("bert", dict(do_lower_case=False, strip_accents=True), "Café NAÏVE"), ("bert", dict(do_lower_case=False), "Café"),
    ("roberta", dict(add_prefix_space=True), "hello world"), ("roberta", dict(add_prefix_space=False), "hello")])
def test_tokenizer_json_folder_follows_its_tokenizer_config_as_transformers(tmp_path, kind, settings, text, named_by):
    """A tokenizer.json folder of a BERT / RoBERTa class (named by tokenizer_config.json, or by config.json's
    model_type as on the hub's ELECTRA folders): transformers builds the class's pipeline around the vocabulary
    (normalizer with the config's lower-casing, accents and Chinese characters, the class defaults for absent keys;
    the byte-level prefix space; the template), whatever tokenizer.json says; we read tokenizer.json alone."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    if kind == "bert":
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "café", "cafe", "Café", "naïve", "naive", "NAÏVE",
                 "şeker", "seker", "Şeker"]
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)  # cased in the file
        tok.pre_tokenizer = pre_tokenizers.Whitespace()  # not BERT's: the class builds its own
        cls = "BertTokenizer"  # and no template: the class adds [CLS] ... [SEP]
    else:
        vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "h", "e", "l", "o", "w", "r",
                                              "d", "\u0120", "\u0120h", "\u0120w", "he", "hel", "hell", "hello"])}
        merges = [("\u0120", "h"), ("\u0120", "w"), ("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o")]
        tok = Tokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.post_processor = processors.ByteLevel()  # no <s> ... </s>: the class adds them
        cls = "RobertaTokenizer"
    tok.save(str(tmp_path / "tokenizer.json"))
    if named_by == "tokenizer_class":
        settings = {"tokenizer_class": cls, **settings}
    else:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": kind}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    want = transformers.AutoTokenizer.from_pretrained(str(tmp_path))(text)["input_ids"]
    assert load_tokenizer(str(tmp_path)).encode(text).ids == want


def test_vocab_json_and_merges_folder_reads_as_transformers(tmp_path):
    """A RoBERTa-style folder (vocab.json + merges.txt, what a byte-level BPE's save_model writes) was refused
    ("holds neither tokenizer.json nor vocab.txt") though the README promises transformers tokenizer folders."""
    transformers = pytest.importorskip("transformers")
    from electra_fast.train.tokenizer import train_tokenizer
    trained = train_tokenizer("bpe", _corpus()[:200], 300)
    trained.model.save(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer"}))
    theirs, ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(str(tmp_path))
    for args in (("the cat sat on the mat.",), (" two  spaces", "and a pair")):
        assert ours.encode(*args).ids == theirs(*args)["input_ids"]
    assert special_ids(ours) == {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": special_ids(trained)["mask"]}


def test_a_run_started_on_a_folder_read_without_its_config_resumes_with_it(env, tmp_path, monkeypatch):
    """A tokenizer folder is now read as transformers reads it (its tokenizer_config.json over tokenizer.json); a
    run started before with `--tokenizer DIR` whose config disagrees with the file was refused on `--resume
    --tokenizer DIR` ("does not match the vocabulary of the checkpoint"): the vocabulary is the same."""
    from electra_fast.train import tokenizer as tok_mod
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(env["tokenizer"], folder / "tokenizer.json")  # an uncased WordPiece; the config says cased
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": False}))
    assert load_tokenizer(str(folder)).encode("The Cat").ids != load_tokenizer(env["tokenizer"]).encode("The Cat").ids
    with monkeypatch.context() as m:  # the code before: the file's own reading
        m.setattr(tok_mod, "_as_configured", lambda tok, directory: None)
        pretrain(env["data"], **_kw(env, tmp_path / "run", steps=2, save_every=2, tokenizer=str(folder)))
    assert pretrain(env["data"], **_kw(env, tmp_path / "run", steps=4, resume=True, tokenizer=str(folder)))["steps"] == 4
    tok_mod.train_tokenizer("wordpiece", _corpus()[:100], 150).save(str(tmp_path / "other.json"))
    with pytest.raises(PretrainError, match="a resumed run keeps its tokenizer"):  # another one still is refused
        pretrain(env["data"], **_kw(env, tmp_path / "run", steps=6, resume=True, tokenizer=str(tmp_path / "other.json")))


def test_a_vocab_and_merges_folder_of_another_class_is_refused(tmp_path):
    """A vocab.json + merges.txt folder is read with RoBERTa's pipeline; one of another class (GPT-2: no
    <s> ... </s>) is refused rather than read with RoBERTa's template."""
    from electra_fast.train.tokenizer import train_tokenizer
    trained = train_tokenizer("bpe", _corpus()[:200], 300)
    (tmp_path / "gpt2").mkdir()
    trained.model.save(str(tmp_path / "gpt2"))
    (tmp_path / "gpt2" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    with pytest.raises(PretrainError, match="is a GPT2Tokenizer folder; vocab.json \\+ merges.txt are read for"):
        load_tokenizer(str(tmp_path / "gpt2"))


def test_a_vocab_txt_with_a_repeated_line_is_refused(tmp_path):
    """An id is a line number: a repeated token left the vocabulary one short of its largest id (a traceback at the
    first step, "ids must lie in [0, vocab_size=304)", after tokenising the corpus)."""
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\ncat\nthe\n", encoding="utf-8")
    with pytest.raises(PretrainError, match=r"vocab.txt line 8 repeats line 6 \('the'\); each token once"):
        load_tokenizer(str(tmp_path))
    # tokenizers keys a line without its trailing spaces: "the " repeats "the" (it was missed)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe \ncat\nthe\n", encoding="utf-8")
    with pytest.raises(PretrainError, match=r"vocab.txt line 8 repeats line 6 \('the'\); each token once"):
        load_tokenizer(str(tmp_path))


def test_a_tokenizer_with_holes_in_its_ids_sizes_the_model_by_its_largest_id(env, tmp_path):
    """A tokenizer.json whose table skips ids (13 tokens, one at id 500) sized the model by its token count: the
    first batch holding the high id ended the run with a traceback ("ids must lie in [0, vocab_size=13)"), perhaps
    hours in. The model's tables now cover every id the tokenizer gives."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from electra_fast.train.tokenizer import config_overrides, embedding_rows
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on",
                                         "a", "mat", ".", "dog"])}
    vocab["dog"] = 500
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert embedding_rows(load_tokenizer(str(tmp_path / "tokenizer.json"))) == 501
    overrides = config_overrides(load_tokenizer(str(tmp_path / "tokenizer.json")))
    # the rows in the hole are ids no text yields: neither random replacements nor the generator draw them
    assert overrides["vocab_size"] == 501 and overrides["disallowed_sample_ids"] == tuple(range(12, 500))
    vocab["dog"] = 2 ** 30  # one stray id sized a billion-row table
    Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")).save(str(tmp_path / "huge.json"))
    with pytest.raises(PretrainError, match=r"^--tokenizer: its ids run to 1073741824; a model here has at most"):
        config_overrides(load_tokenizer(str(tmp_path / "huge.json")))
    (tmp_path / "c.txt").write_text("\n\n".join(["the dog sat on a mat . the cat sat on the dog ."] * 40) + "\n")
    run = _kw(env, tmp_path / "run", steps=2, tokenizer=str(tmp_path / "tokenizer.json"))
    assert pretrain(str(tmp_path / "c.txt"), **run)["steps"] == 2


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram", "unigram-brought"])
def test_special_token_spellings_in_the_text_are_text(tmp_path, kind):
    """'<s>struck</s>' in HTML became [CLS] / [SEP] ids (splitting the document under doc-sentences packing), a
    literal [PAD] a padding id attended mid-row, [MASK] an unlabelled mask token. A Unigram model holds [PAD] [CLS]
    [SEP] [UNK] as pieces (the run's own, and DeBERTa-v3's SentencePiece conversion): its segmenter read their
    spellings as those pieces (40 [CLS] ids in 40 documents that mention it)."""
    from electra_fast.train.tokenizer import train_tokenizer
    text = "an <s>old</s> page with [PAD] [MASK] [CLS] [SEP] <pad> <mask> </s> <unk> [UNK] in its text"
    (tmp_path / "c.txt").write_text("\n\n".join([text] * 20) + "\n", encoding="utf-8")
    tok = train_tokenizer(kind.split("-")[0], [text] * 20, 300)
    if kind == "unigram-brought":  # a tokenizer.json the user brings: loaded as a file, not the trained object
        tok.save(str(tmp_path / "tokenizer.json"))
        tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    path = build_token_cache([str(tmp_path / "c.txt")], tok, str(tmp_path / "cache"))
    stream = np.fromfile(path, dtype="<u4") & 0x7FFFFFFF
    ids = special_ids(tok)
    assert not np.isin(stream, [ids[r] for r in ("pad", "cls", "mask", "unk")]).any(), kind
    assert (stream == ids["sep"]).sum() == 20  # one per document: the packing's own
    spelt = tok.id_to_token(ids["mask"])
    assert tok.encode(f"a {spelt} b").ids.count(ids["mask"]) == 1  # the tokenizer itself still reads them
    if kind.startswith("unigram"):  # the pieces are still the special tokens' (export, fine-tuning, decode)
        assert tok.model.token_to_id("[CLS]") == ids["cls"] and tok.id_to_token(ids["sep"]) == "[SEP]"


def test_data_cache_packing_and_order(env, tmp_path):
    tok = load_tokenizer(env["tokenizer"])
    logs = []
    path = build_token_cache([env["data"]], tok, str(tmp_path), log=logs.append)
    assert len(logs) == 1 and "tokenised" in logs[0]
    again = build_token_cache([env["data"]], tok, str(tmp_path), log=logs.append)
    assert again == path and len(logs) == 1  # second run: no re-tokenisation
    stream = np.fromfile(path, dtype="<u4") & 0x7FFFFFFF  # format 2: bit 31 marks word starts
    docs = list(read_documents(env["data"]))
    ids = special_ids(tok)
    assert int((stream == ids["sep"]).sum()) == len(docs)  # one [SEP] per document
    packed = PackedSequences(path, 32, ids["cls"], ids["sep"])
    assert len(packed) == len(stream) // 30
    b = packed.batch([0, 3])
    assert b.shape == (2, 32) and (b[:, 0] == ids["cls"]).all() and (b[:, -1] == ids["sep"]).all()
    assert b[1, 1:-1].tolist() == stream[90:120].tolist()
    s = Sampler(len(packed), seed=5)
    first = s.indices(0, len(packed))
    assert sorted(first) == list(range(len(packed)))  # each epoch a permutation
    assert Sampler(len(packed), seed=5).indices(3, 7) == first[3:10]  # a pure function of the position
    assert s.indices(len(packed), 5) != first[:5]  # a new order next epoch



@pytest.mark.parametrize("size", [0, 1001, 400])
def test_a_token_cache_whose_size_disagrees_with_its_record_is_rebuilt(env, tmp_path, size):
    """Review finding: a cache .bin emptied or truncated (its .json intact) was trusted: "cannot mmap an empty file",
    "not a multiple of the data-type size", or a resume blaming the user's corpus ("the data now packs into ...").
    The cache is derived data: it is tokenised again, with a note."""
    tok = load_tokenizer(env["tokenizer"])
    path = build_token_cache([env["data"]], tok, str(tmp_path), log=lambda m: None)
    whole = open(path, "rb").read()
    os.truncate(path, size)
    logs = []
    assert build_token_cache([env["data"]], tok, str(tmp_path), log=logs.append) == path
    assert logs[0] == (f"note: token cache {path} holds {size} bytes, not the {len(whole) // 4} tokens x 4 bytes its "
                       "record says: tokenising the corpus again") and "tokenised" in logs[1]
    assert open(path, "rb").read() == whole
    os.truncate(path, size)  # read without the cache's check: one line naming the file, not numpy's traceback
    if size % 4 or not size:
        with pytest.raises(PretrainError, match=f"^token cache {re.escape(path)} is damaged \\({size} bytes, "):
            PackedSequences(path, 32, 2, 3)

def test_jsonl_directory_and_skip_bad_lines(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second doc"}\n', encoding="utf-8")
    (d / "sub" / "b.txt").write_bytes(b"good line\n\xff\xfe bad line\nmore good\n\nnext doc\n")
    from electra_fast.train.data import resolve_inputs
    files = resolve_inputs([str(d)])
    assert [os.path.basename(f) for f in files] == ["a.jsonl", "b.txt"]
    assert list(read_documents(files[0])) == ["first doc", "second doc"]
    with pytest.raises(PretrainError, match=r"b\.txt is not UTF-8 \(invalid byte at offset 10\)"):
        list(read_documents(files[1]))
    stats = {}
    assert list(read_documents(files[1], skip_bad_lines=True, stats=stats)) == ["good line\nmore good", "next doc"]
    assert stats["skipped_lines"] == 1


def test_folder_skips_hidden_and_dunder_names(tmp_path):
    # Jupyter's checkpoint copies (and .git/, __pycache__/) sit next to a corpus; read, their text went in twice.
    from electra_fast.train.data import resolve_inputs
    d = tmp_path / "corpus"
    for rel in ("a.txt", ".ipynb_checkpoints/a-checkpoint.txt", ".notes.txt", "__pycache__/x.txt", "sub/b.jsonl",
                "sub/.c.txt"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("some text\n", encoding="utf-8")
    assert [os.path.relpath(f, d) for f in resolve_inputs([str(d)])] == ["a.txt", os.path.join("sub", "b.jsonl")]
    assert resolve_inputs([str(d / ".notes.txt")]) == [str(d / ".notes.txt")]  # named as a file, it is read
    only = tmp_path / "only"
    only.mkdir()
    (only / ".x.txt").write_text("text\n", encoding="utf-8")
    (only / ".ipynb_checkpoints").mkdir()
    with pytest.raises(PretrainError, match=r"holds no \.txt or \.jsonl files outside the 2 hidden name\(s\) it "):
        resolve_inputs([str(only)])  # a hidden folder counts too
    assert [os.path.basename(f) for f in resolve_inputs([str(only)], hidden=True)] == [".x.txt"]


def test_a_run_that_read_hidden_files_resumes_reading_them(env, tmp_path, monkeypatch):
    """A run started before folders skipped hidden names resumed with fewer files: "the data now packs into 58
    sequences ..., the checkpoint's into 117: it changed since", its token cache already removed."""
    from electra_fast.train import data as data_module
    corpus = tmp_path / "corpus"
    (corpus / ".ipynb_checkpoints").mkdir(parents=True)
    text = open(env["data"], encoding="utf-8").read()
    (corpus / "a.txt").write_text(text, encoding="utf-8")
    (corpus / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(data_module, "_is_hidden", lambda name: False)  # the earlier reading
        pretrain([str(corpus)], **_kw(env, out, steps=2, save_every=2))
    record = json.load(open(out / "run.json"))
    assert any(".ipynb_checkpoints" in p for p in record["inputs"])
    pretrain(**_kw(env, out, steps=3, resume=True, tokenizer=None, model=None))
    pretrain([str(corpus)], **_kw(env, out, steps=4, resume=True, tokenizer=None, model=None))
    assert max(_losses(out)) == 4


def test_derive_seed():
    seeds = {derive_seed(0, s, r, m) for s in range(50) for r in range(2) for m in range(2)}
    assert len(seeds) == 200 and all(0 <= x < 2 ** 63 for x in seeds)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 3, 2)


# ------------------------------------------------------------------------------------------ end to end
def test_end_to_end_loss_falls_checkpoints_export(env, tmp_path, capsys):
    out = tmp_path / "run"
    s = pretrain(env["data"], **_kw(env, out, steps=40, batch_size=8, lr=5e-3, warmup=4, save_every=10, keep=2,
                                    log_every=1))
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 41))
    first, last = np.mean([losses[i] for i in range(1, 6)]), np.mean([losses[i] for i in range(36, 41)])
    assert last < 0.8 * first, (first, last)
    rec = json.loads(open(out / "metrics.jsonl").readline())
    for k in ("step", "loss", "mlm_loss", "rtd_loss", "generator_accuracy", "discriminator_accuracy",
              "discriminator_precision", "discriminator_recall", "replaced_fraction", "lr", "grad_norm",
              "tokens_per_s"):
        assert k in rec and np.isfinite(rec[k])
    assert [os.path.basename(p) for _, p in ckpt.checkpoint_dirs(out / "checkpoints")] == ["step-00000040",
                                                                                            "step-00000030"]
    assert s["checkpoint"].endswith("step-00000040") and s["tokens_seen"] == 40 * 8 * 32
    summary = capsys.readouterr().out
    assert "tokens/s" in summary and "loss" in summary

    # export -> transformers loads both parts and the tokenizer, and runs them
    transformers = pytest.importorskip("transformers")
    exp = tmp_path / "export"
    assert cli_main(["export", str(out), str(exp)]) == 0
    tk = transformers.AutoTokenizer.from_pretrained(str(exp / "discriminator"))
    batch = tk(["the cat sat on the mat."], return_tensors="pt")
    disc = transformers.AutoModelForPreTraining.from_pretrained(str(exp / "discriminator")).eval()
    gen = transformers.AutoModelForMaskedLM.from_pretrained(str(exp / "generator")).eval()
    with torch.no_grad():
        d_logits, g_logits = disc(**batch).logits, gen(**batch).logits
    assert d_logits.shape == batch["input_ids"].shape and torch.isfinite(d_logits).all()
    assert g_logits.shape == (*batch["input_ids"].shape, tk.vocab_size) and torch.isfinite(g_logits).all()
    # the exported discriminator computes what the trained model computes
    net = s["model"].eval()
    with torch.no_grad():
        ours = net.discriminator(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, d_logits, rtol=1e-4, atol=1e-4)
    # never over existing files
    assert cli_main(["export", str(out), str(exp)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_paths_that_are_not_utf8_are_read_and_written(env, tmp_path, capsys):
    """A POSIX file name may hold any bytes but / and NUL (Python's str holds the others as surrogates): --data,
    --out, a trained tokenizer and export ended in a UnicodeEncodeError traceback (the cache key's .encode(),
    tokenizers' save and from_file, which take UTF-8 paths only)."""
    odd = lambda name: tmp_path / os.fsdecode(name.encode() + b"\xff")
    data, out, exp = odd("corpus"), odd("run"), odd("export")
    shutil.copy(env["data"], data)
    argv = ["pretrain", "--data", str(data), "--out", str(out), "--model", env["model"], "--seq-len", "32",
            "--batch-size", "4", "--vocab-size", "120", "--log-every", "1", "--no-progress"]
    assert cli_main(argv + ["--steps", "2"]) == 0
    assert cli_main(["export", str(out), str(exp)]) == 0
    from electra_fast.train.tokenizer import load_tokenizer
    assert load_tokenizer(str(exp / "discriminator")).get_vocab_size() == 120
    assert cli_main(argv + ["--steps", "3", "--resume"]) == 0
    assert sorted(_losses(out)) == [1, 2, 3]
    assert "run\\udcff/" in capsys.readouterr().err  # named, escaped (a strict stream raised)


def test_tokenizer_folders_and_tensorboard_under_paths_that_are_not_utf8(env, tmp_path, capsys, monkeypatch):
    """vocab.txt and vocab.json + merges.txt folders were read by tokenizers' Rust readers, which refuse such
    paths ("cannot read ...: 'utf-8' codec can't encode"); tensorboard's event writer raised UnicodeEncodeError
    after --out was claimed: refused first, in one line."""
    from electra_fast.train import trainer as trainer_mod
    from electra_fast.train.tokenizer import load_tokenizer, train_tokenizer
    docs = lambda: read_documents(env["data"])
    for kind, files in (("wordpiece", ("vocab.txt",)), ("bpe", ("vocab.json", "merges.txt"))):
        plain, odd = tmp_path / kind, tmp_path / os.fsdecode(kind.encode() + b"\xff")
        plain.mkdir()
        train_tokenizer(kind, docs, 300).model.save(str(plain))
        shutil.copytree(plain, odd)
        assert sorted(os.listdir(odd)) == sorted(files)
        assert load_tokenizer(str(odd)).get_vocab() == load_tokenizer(str(plain)).get_vocab()
    monkeypatch.setattr(trainer_mod, "summary_writer", lambda: None)  # the optional package need not be installed
    out = tmp_path / os.fsdecode(b"tb\xff")
    argv = ["pretrain", "--data", env["data"], "--out", str(out), "--model", env["model"], "--tokenizer",
            env["tokenizer"], "--steps", "1", "--tensorboard", "--no-progress"]
    assert cli_main(argv) == 2
    assert "--tensorboard: tensorboard writes under UTF-8 paths only" in capsys.readouterr().err
    assert not out.exists()


def test_resume_reproduces_uninterrupted_run(env, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(env["data"], **_kw(env, straight, steps=8, save_every=4, keep=5, grad_accum=2))
    # a run "killed" after its step-4 checkpoint: the same directory without anything later
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    pretrain(env["data"], **_kw(env, resumed, steps=8, save_every=4, keep=5, grad_accum=2, resume=True))
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == list(range(1, 9))
    assert [a[i] for i in range(1, 9)] == [b[i] for i in range(1, 9)]  # bit-identical on CPU


def test_a_run_resumed_to_train_longer_takes_its_new_schedule_from_the_first_step(env, tmp_path):
    """The saved optimizer held the run's last rate under its old --steps, 0 at its end: the first step of a run
    resumed with more --steps trained at rate 0 (its weights unchanged), then the schedule jumped. Now that step
    takes the new schedule's rate, and the records carry the rate each step took."""
    from electra_fast.train.optim import linear_schedule
    out = tmp_path / "run"
    pretrain(env["data"], **_kw(env, out, steps=8, warmup=2))
    s = pretrain(env["data"], **_kw(env, out, steps=12, resume=True))
    with open(out / "metrics.jsonl") as f:
        lr = {r["step"]: r["lr"] for r in map(json.loads, f)}
    factor = linear_schedule(2, 12)
    assert [lr[i] for i in range(9, 13)] == [pytest.approx(3e-3 * factor(i - 1), rel=1e-12) for i in range(9, 13)]
    assert lr[9] > 0 and s["steps"] == 12
    assert [lr[i] for i in range(1, 9)] == [pytest.approx(3e-3 * linear_schedule(2, 8)(i - 1), rel=1e-12)
                                            for i in range(1, 9)]


def test_resume_keeps_the_runs_options(env, tmp_path):
    """Options not given to --resume are the run's (README's `pretrain --out DIR --resume` continued on the embedded
    corpus at its defaults); a given one that differs is refused before anything is written."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(env["data"], **_kw(env, straight, steps=8, save_every=4, keep=5, seed=3))
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    for changed in (dict(seq_len=16), dict(seed=4), dict(lr=1e-3), dict(batch_size=2, grad_accum=2)):
        before = sorted(p.name for p in resumed.rglob("*"))
        with pytest.raises(PretrainError, match="--resume: .*" + "--" + next(iter(changed)).replace("_", "-")):
            pretrain(env["data"], **_kw(env, resumed, **{"steps": 8, "resume": True, "seed": 3, **changed}))
        assert sorted(p.name for p in resumed.rglob("*")) == before
    other = tmp_path / "other.txt"
    shutil.copy(env["data"], other)
    with pytest.raises(PretrainError, match=r"--resume: --data .*corpus.txt .*other.txt \(the run.s: "):
        pretrain([env["data"], str(other)], **_kw(env, resumed, steps=8, resume=True, seed=3))
    # the run and its corpus moved elsewhere, the corpus given as its folder: the same files by name, so it resumes
    moved, folder = tmp_path / "moved", tmp_path / "elsewhere"
    shutil.copytree(resumed, moved)
    folder.mkdir()
    shutil.copy(env["data"], folder / os.path.basename(env["data"]))
    pretrain(str(folder), **_kw(env, moved, steps=8, resume=True))
    assert [_losses(straight)[i] for i in range(1, 9)] == [_losses(moved)[i] for i in range(1, 9)]
    # nothing but --out and --resume (and what no run records): the same continuation as the uninterrupted run
    pretrain(None, out=str(resumed), resume=True, tokenizer=env["tokenizer"], log_every=1, progress=False,
             save_every=4, keep=5)  # --steps too: the run's 8
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == list(range(1, 9)) and [a[i] for i in range(1, 9)] == [b[i] for i in range(1, 9)]


def test_resume_keeps_the_runs_bookkeeping_unless_changed(env, tmp_path):
    """A bare --resume of a --keep 10 --save-every 1 run pruned it to the default 3 checkpoints (deleting the user's)
    and saved only at its end; it now takes the run's --keep / --save-every / --log-every, which it may change."""
    run = tmp_path / "run"
    pretrain(env["data"], **_kw(env, run, steps=4, save_every=1, keep=10, log_every=2))
    ckpts = lambda: sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts() == [f"step-{i:08d}" for i in range(1, 5)]
    bare = dict(tokenizer=env["tokenizer"], out=str(run), resume=True, progress=False)
    pretrain(None, steps=6, **bare)
    assert ckpts() == [f"step-{i:08d}" for i in range(1, 7)]
    assert sorted(_losses(run)) == [1, 2, 4, 5, 6]  # every 2nd step, the first after a resume and the last
    pretrain(None, steps=7, keep=2, **bare)
    assert ckpts() == ["step-00000006", "step-00000007"]
    # the next --resume inherits the last one's settings (run.json was written by the first run only: --keep 10)
    pretrain(None, steps=9, **bare)
    assert ckpts() == ["step-00000008", "step-00000009"]
    with pytest.raises(PretrainError, match=r"^--steps: the resumed run is already at step 9 >= --steps 9$"):
        pretrain(None, **bare)


def test_resume_keeps_the_runs_thread_count(env, tmp_path):
    """--threads was not recorded: a bare --resume of a --threads 1 run ran with torch's default count, whose
    reductions (LayerNorm's parameter gradients) sum in another order, and drifted from the uninterrupted run with
    no word. It is inherited now; a count above this machine's CPUs is not (torch's default, as without one)."""
    run = tmp_path / "run"
    pretrain(env["data"], **_kw(env, run, steps=2, save_every=1, threads=1))
    bare = dict(tokenizer=env["tokenizer"], out=str(run), resume=True, progress=False)
    before, counts = torch.get_num_threads(), []
    hook = lambda stage: counts.append(torch.get_num_threads())  # noqa: E731 - the count the run trains with
    try:
        torch.set_num_threads(2)
        pretrain(None, steps=3, _checkpoint_hook=hook, **bare)
        assert set(counts) == {1} and torch.get_num_threads() == 2  # the caller's count is back afterwards
        record = json.loads((run / "run.json").read_text())
        assert record["options"]["threads"] == 1
        record["options"]["threads"] = 100_000  # a run made on a larger machine
        (run / "run.json").write_text(json.dumps(record))
        counts.clear()
        pretrain(None, steps=4, _checkpoint_hook=hook, **bare)  # not "--threads: expected an int <= 2"
        assert set(counts) == {2}
    finally:
        torch.set_num_threads(before)


def test_the_thread_count_is_the_callers_again_after_every_call(env, tmp_path, monkeypatch):
    """Review finding: pretrain(threads=1) set torch's count for the rest of the calling process, even when it then
    refused its arguments. The count is set after every argument check, and the caller's is back when the call
    returns or raises."""
    from electra_fast.train import trainer
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(PretrainError, match="^--precision"):
            pretrain(env["data"], **_kw(env, tmp_path / "refused", threads=1, precision="bogus"))
        assert torch.get_num_threads() == 2 and not (tmp_path / "refused").exists()
        counts = []
        s = pretrain(env["data"], **_kw(env, tmp_path / "run", steps=1, threads=1),
                     _checkpoint_hook=lambda stage: counts.append(torch.get_num_threads()))
        assert s["steps"] == 1 and set(counts) == {1} and torch.get_num_threads() == 2

        def failing_step(self):
            raise RuntimeError("a step that fails")
        monkeypatch.setattr(trainer._Job, "_train_step", failing_step)
        with pytest.raises(RuntimeError, match="a step that fails"):
            pretrain(env["data"], **_kw(env, tmp_path / "failed", threads=1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_callers_generator_and_grad_mode_are_untouched(env, tmp_path):
    """Review findings: pretrain() reseeded torch's global generator and left it so (the caller's torch.rand after
    the call drew one fixed stream whatever it had seeded); under the caller's no_grad / inference_mode its first
    backward raised, leaving the run's files behind."""
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    s = pretrain(env["data"], **_kw(env, tmp_path / "run", steps=2))
    assert s["steps"] == 2 and torch.equal(torch.get_rng_state(), state)
    s = pretrain(env["data"], **_kw(env, tmp_path / "continued", steps=1, init_from=str(tmp_path / "run"),
                                    tokenizer=None, model=None))
    assert s["steps"] == 1 and torch.equal(torch.get_rng_state(), state)  # its source's loading drew nothing
    for i, mode in enumerate((torch.no_grad, torch.inference_mode)):
        with mode():
            s = pretrain(env["data"], **_kw(env, tmp_path / f"under-{i}", steps=2))
            assert s["steps"] == 2 and not torch.is_grad_enabled()
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_a_finished_run_is_freed_and_forgotten(env, tmp_path):
    """Review findings: a finished run stayed in memory after pretrain() returned (matplotlib's mathtext keeps
    exceptions whose tracebacks hold the call's frames: 5 runs held, +1 GB), until the caller's next full
    collection; and the checkpoint verification cache kept an entry for every checkpoint ever written."""
    from electra_fast.models import ElectraPretrainingModel

    def alive():
        return sum(isinstance(o, ElectraPretrainingModel) for o in gc.get_objects())

    gc.collect()
    before = alive()
    gc.disable()  # only the call's own collection may free it
    try:
        pretrain(env["data"], **_kw(env, tmp_path / "run", steps=4, save_every=1, keep=1))
        assert alive() == before
    finally:
        gc.enable()
    gone = [p for p in ckpt._VERIFIED if str(tmp_path) in p and not os.path.isdir(p)]
    assert not gone and len([p for p in ckpt._VERIFIED if str(tmp_path) in p]) == 1


def test_a_failed_run_closes_its_tensorboard_writer(env, tmp_path, monkeypatch):
    """Review finding: a pretrain(tensorboard=True) that raised left its SummaryWriter's thread running (one more
    per failed call in a sweep)."""
    import threading
    pytest.importorskip("tensorboard")
    from electra_fast.train import trainer

    def failing_step(self):
        raise RuntimeError("a step that fails")
    monkeypatch.setattr(trainer._Job, "_train_step", failing_step)
    before = threading.active_count()
    for i in range(2):
        with pytest.raises(RuntimeError, match="a step that fails"):
            pretrain(env["data"], **_kw(env, tmp_path / f"failed-{i}", tensorboard=True))
    assert threading.active_count() == before


def test_resume_refuses_another_vocabulary_and_a_restart_keeps_the_precision(env, tmp_path):
    """--resume --vocab-size 300 / --tokenizer OTHER ran on silently with the run's vocabulary (or, on a restart,
    trained another one); a restart of an fp32 run went on in bf16 (the CPU's default)."""
    run = tmp_path / "run"
    pretrain(env["data"], **_kw(env, run, steps=2, tokenizer=None, vocab_size=150, precision="fp32"))
    other = tmp_path / "other.json"
    shutil.copy(env["tokenizer"], other)
    for given, message in ((dict(vocab_size=300), r"--vocab-size 300 \(the run's: 150\)"),
                           (dict(tokenizer=str(other)), r"--tokenizer .*other\.json \(the run's: one trained on its "
                                                        r"data\): a resumed run keeps its tokenizer")):
        for restart in (False, True):
            if restart:
                shutil.rmtree(run / "checkpoints" / "step-00000002", ignore_errors=True)
            with pytest.raises(PretrainError, match=f"^--resume: {message}"):
                pretrain(None, out=str(run), resume=True, steps=3, progress=False, **given)
    s = pretrain(None, out=str(run), resume=True, steps=2, progress=False)  # a restart
    assert json.loads((run / "run.json").read_text())["precision"] == "fp32"
    assert ckpt.load_training_state(os.path.join(s["checkpoint"], "training_state.pt"))["precision"] == "fp32"
    # the run's vocabulary of 150 is below BPE's minimum: said as "--vocab-size: expected an int >= 262" before
    with pytest.raises(PretrainError, match="^--tokenizer-type: the run being resumed has 'wordpiece'"):
        pretrain(None, out=str(run), resume=True, steps=3, progress=False, recipe=dict(tokenizer_type="bpe"))




def _edit_record(run, change):
    record = json.loads((run / "run.json").read_text())
    change(record)
    (run / "run.json").write_text(json.dumps(record))


@pytest.mark.parametrize("damage, message", [
    (b"{", r"is damaged, not JSON \(Expecting property name enclosed in double quotes: line 1 column 2 \(char 1\)\); "
           r"it records the run's options: restore it, or start a new --out"),
    (b"\xff\xfe{}", r"is damaged, not JSON \('utf-8' codec can't decode byte 0xff"),
    (b"[]", r"is damaged, a JSON list and not an object; it records the run's options"),
    ("unreadable", r"^--resume: cannot read .*run\.json \(Permission denied\); it records the run's options"),
    (lambda r: r.__setitem__("recipe", [1]), r"records recipe \[1\]; expected an object or null$"),
    (lambda r: r.__setitem__("options", "x"), r"records options 'x'; expected an object$"),
    (lambda r: r["options"].__setitem__("data", 5), r"records options\.data 5; expected a list of paths or null$"),
    (lambda r: r["options"].__setitem__("data", "corpus.txt"), r"records options\.data 'corpus\.txt'; expected a list"),
    (lambda r: r["options"].__setitem__("batch_size", "4"), r"records options\.batch_size '4'; expected an int$"),
    (lambda r: r["options"].__setitem__("save_every", "10"), r"records options\.save_every '10'; expected an int or "
                                                              r"null$"),
])
def test_a_damaged_run_json_stops_the_resume_in_one_line(env, tmp_path, monkeypatch, damage, message):
    """Review finding: a run.json that is there but damaged (not JSON, not an object) or unreadable was read as "no
    record": the resume fell back to the defaults (another batch size, silently), and could delete the run's own
    token cache. A field of the wrong type ended in a traceback ("recipe": [1], "data": 5) or, for a string, read
    it one character at a time ("--data: no such file or directory: w"). Now one line naming the file; nothing
    in the run changes."""
    from electra_fast.train import trainer
    from test_run_dir import snapshot
    run = tmp_path / "run"
    pretrain(env["data"], **_kw(env, run, steps=2, batch_size=2))
    if damage == "unreadable":  # root reads a chmod 000 file: the run's own open is refused instead
        def refused(path, *a, **k):
            if os.path.basename(path) == "run.json":
                raise PermissionError(13, "Permission denied", path)
            return open(path, *a, **k)
        monkeypatch.setattr(trainer, "open", refused, raising=False)
    elif callable(damage):
        _edit_record(run, damage)
    else:
        (run / "run.json").write_bytes(damage)
    before = snapshot(tmp_path)
    for given in (dict(), dict(data=env["data"], seq_len=32)):
        with pytest.raises(PretrainError, match=f"^--resume: .*{re.escape(str(run / 'run.json'))}.*{message}"
                           if not message.startswith("^") else message):
            pretrain(given.pop("data", None), out=str(run), resume=True, steps=4, progress=False, **given)
        assert snapshot(tmp_path) == before

def test_a_run_json_whose_save_every_is_null_resumes(env, tmp_path):
    # the versions of 2026-12-06 recorded options.save_every null when --save-every was not given
    run = tmp_path / "run"
    pretrain(env["data"], **_kw(env, run, steps=2, save_every=2))
    _edit_record(run, lambda r: r["options"].__setitem__("save_every", None))
    assert pretrain(out=str(run), resume=True, steps=3, progress=False)["steps"] == 3


def test_a_run_json_from_before_the_options_record_resumes_with_its_tokenizer(env, tmp_path):
    """A resume rewrote such a run.json with options it invented from its own omitted flags (tokenizer None): the
    next --resume --tokenizer T (the run's own) was refused as 'the run's: one trained on its data'."""
    run = tmp_path / "run"
    pretrain(env["data"], **_kw(env, run, steps=2))
    record = json.loads((run / "run.json").read_text())
    del record["options"]
    (run / "run.json").write_text(json.dumps(record))
    pretrain(env["data"], **_kw(env, run, steps=3, resume=True, tokenizer=None))  # the checkpoint's tokenizer
    assert pretrain(env["data"], **_kw(env, run, steps=4, resume=True))["steps"] == 4  # --tokenizer: the run's
    assert "options" not in json.loads((run / "run.json").read_text())

def test_resume_without_a_complete_checkpoint_restarts_as_the_run_was_made(env, tmp_path, capsys):
    """The run's only checkpoint gone: --resume started again with a new tokenizer trained on the data (another
    vocabulary, another model); it now takes the run's --tokenizer / --vocab-size, and refuses in one line for an
    --init-from run (only a checkpoint held its model)."""
    from electra_fast.train.tokenizer import fingerprint, load_tokenizer, tokenizer_type
    run = tmp_path / "run"
    pretrain(env["data"], **_kw(env, run, steps=2))
    shutil.rmtree(run / "checkpoints" / "step-00000002")
    for restart in (1, 2):  # the second restart too: the first rewrote run.json, and lost the tokenizer there
        history = (run / "metrics.jsonl").read_text()
        s = pretrain(None, out=str(run), resume=True, progress=False)
        assert "starting from scratch with the run's options (where it recorded them)" in capsys.readouterr().err
        # the run's history is kept aside, never deleted (a restart of a long run lost its curves)
        kept = run / ("metrics.jsonl.before-restart" + ("" if restart == 1 else "-2"))
        assert kept.read_text() == history
        got = load_tokenizer(os.path.join(s["checkpoint"], "tokenizer.json"))
        assert fingerprint(got) == fingerprint(load_tokenizer(env["tokenizer"])), restart
        if restart == 1:
            shutil.rmtree(run / "checkpoints" / "step-00000002")
    # the run's recipe too: its tokenizer family and packing (a WordPiece tokenizer and full sentences before)
    bpe = tmp_path / "bpe"
    pretrain(env["data"], **_kw(env, bpe, steps=2, tokenizer=None, vocab_size=300,
                                recipe=dict(tokenizer_type="bpe", packing="doc-sentences")))
    shutil.rmtree(bpe / "checkpoints" / "step-00000002")
    for given, flag in ((dict(tokenizer_type="wordpiece"), "--tokenizer-type"), (dict(generator_size=0.25),
                                                                                  "--generator-size")):
        with pytest.raises(PretrainError, match=f"^{flag}: differs from the run being resumed"):
            pretrain(None, out=str(bpe), resume=True, progress=False, recipe=given)
    s = pretrain(None, out=str(bpe), resume=True, progress=False)
    recipe = json.loads((bpe / "run.json").read_text())["recipe"]
    assert (recipe["tokenizer_type"], recipe["packing"]) == ("bpe", "doc-sentences")
    assert tokenizer_type(load_tokenizer(os.path.join(s["checkpoint"], "tokenizer.json"))) == "bpe"
    follow = tmp_path / "follow"
    pretrain(env["data"], **_kw(env, follow, steps=1, model=None, tokenizer=None, init_from=str(run)))
    shutil.rmtree(follow / "checkpoints" / "step-00000001")
    with pytest.raises(PretrainError, match=r"^--resume: no complete checkpoint .* --init-from .*run: start it again"):
        pretrain(None, out=str(follow), resume=True, progress=False)


def test_a_long_run_without_spaces_trains_every_tokenizer_kind():
    """tokenizers' Unigram trainer segfaulted on two documents, one a 200 k-character run without whitespace (and
    every trainer takes time quadratic in such runs): the trainers now see it cut into TRAIN_RUN pieces. So does
    300 k characters of Chinese with its lines joined by vertical tabs (or NEL): Python's \\s split there, the Unigram
    normaliser deletes them, and the trainer segfaulted on the whole run. In a child process, so a crash fails this
    test instead of ending the session."""
    code = textwrap.dedent("""
        import random
        from electra_fast.train.tokenizer import TRAIN_RUN, _bounded_runs, train_tokenizer
        random.seed(0)
        run = "".join(random.choice("abcdefghij") for _ in range(200_000))
        lines = ["".join(chr(random.randint(0x4E00, 0x4EFF)) for _ in range(50)) for _ in range(6000)]
        docs = [run, "some ordinary words here and there", "\\v".join(lines), "\\x85".join(lines[:3000])]
        cut = list(_bounded_runs(docs)())
        assert cut[1] == docs[1] and cut[0].replace(" ", "") == run
        assert max(map(len, cut[0].split())) == TRAIN_RUN
        assert train_tokenizer("unigram", docs[2:3], 400).get_vocab_size() == 400  # 256 characters
        for kind in ("unigram", "wordpiece", "bpe"):
            tok = train_tokenizer(kind, docs[:2], 300)
            assert tok.get_vocab_size() > 100
            for doc in cut[2:]:  # what the trainer sees: no word longer than a piece (+ a "\u2581" / "Ġ" marker)
                words = tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(doc) if tok.normalizer else doc)
                assert max(len(w) for w, _ in words) <= TRAIN_RUN + 1, (kind, max(len(w) for w, _ in words))
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def test_the_training_cut_ends_runs_at_every_space_the_tokenizers_split_on():
    """Text whose words are separated by a no-break, an ideographic or another Unicode space (every tokenizer kind
    splits there) is no long run: the trainers see it as written, as before the cut moved off Python's \\s."""
    from electra_fast.train.tokenizer import _bounded_runs
    for space in ("\xa0", "\u3000", "\u2009", "\u202f"):
        doc = space.join("abcdefghij" * 5 for _ in range(100))
        assert list(_bounded_runs([doc])()) == [doc], hex(ord(space))
    vt = "\v".join("abcdefghij" * 5 for _ in range(100))  # a character the Unigram normaliser deletes: cut
    assert list(_bounded_runs([vt])())[0].count(" ") == 5


def test_resume_on_a_changed_corpus_is_refused(env, tmp_path):
    """Text appended to the run's --data: the resume went on silently over another number of sequences, with a new
    held-out slice that held sequences already trained on."""
    data = tmp_path / "corpus.txt"
    shutil.copy(env["data"], data)
    run = tmp_path / "run"
    pretrain(str(data), **_kw(env, run, steps=2, eval_every=2))
    with open(data, "a", encoding="utf-8") as f:
        f.write("\n\n" + open(env["data"], encoding="utf-8").read())
    before = sorted(p.name for p in run.rglob("*") if "cache" not in p.parts)
    with pytest.raises(PretrainError, match=r"^--resume: the data now packs into \d+ sequences of --seq-len 32, the "
                                            r"checkpoint's into \d+: it changed since"):
        pretrain(str(data), **_kw(env, run, steps=4, resume=True, eval_every=2))
    assert sorted(p.name for p in run.rglob("*") if "cache" not in p.parts) == before



def test_resume_on_other_text_of_the_same_size_is_refused(env, tmp_path):
    """The corpus's documents reordered: as many sequences as before, so only the tokens' digest tells (the
    resume went on silently, its held-out slice now text it had trained on)."""
    data = tmp_path / "corpus.txt"
    docs = open(env["data"], encoding="utf-8").read().split("\n\n")
    data.write_text("\n\n".join(docs), encoding="utf-8")
    run = tmp_path / "run"
    pretrain(str(data), **_kw(env, run, steps=2, eval_every=2))
    data.write_text("\n\n".join(docs[::-1]), encoding="utf-8")
    before = sorted(p.name for p in run.rglob("*") if "cache" not in p.parts)
    with pytest.raises(PretrainError, match=r"^--resume: the data tokens differ from the checkpoint's \(the same "
                                            r"number of sequences, other text\): it changed since"):
        pretrain(str(data), **_kw(env, run, steps=4, resume=True, eval_every=2))
    assert sorted(p.name for p in run.rglob("*") if "cache" not in p.parts) == before
    data.write_text("\n\n".join(docs), encoding="utf-8")  # the run's text again: it resumes
    assert pretrain(str(data), **_kw(env, run, steps=4, resume=True, eval_every=2))["steps"] == 4


def test_stream_digest_of_a_cache_without_one_recorded(env, tmp_path):
    """Caches written before the digest was recorded are read, not rebuilt: their digest is the stream's."""
    from electra_fast.train.data import stream_digest
    path = build_token_cache([env["data"]], load_tokenizer(env["tokenizer"]), str(tmp_path))
    meta = json.load(open(path + ".json"))
    assert meta["sha256"] == stream_digest(path) == hashlib.sha256(open(path, "rb").read()).hexdigest()
    del meta["sha256"]
    json.dump(meta, open(path + ".json", "w"))
    assert stream_digest(path) == hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_a_diverged_run_writes_no_checkpoint_and_keeps_the_good_ones(env, tmp_path):
    """With saves between log steps, a diverging run checkpointed NaN weights, and --keep 1 then deleted the last
    finite checkpoint (a --resume went on from the NaN one)."""
    from safetensors.torch import load_file
    run = tmp_path / "run"
    with pytest.raises(PretrainError, match=r"^the (loss|weights) became non-finite .*: the run diverged .*no "
                                            r"checkpoint is written for step \d+, the checkpoints written so far are "
                                            r"kept"):
        pretrain(env["data"], **_kw(env, run, steps=6, lr=1e30, warmup=0, log_every=100, save_every=1, keep=1))
    kept = sorted((run / "checkpoints").glob("step-*"))
    assert [p.name for p in kept] == ["step-00000001"]
    weights = load_file(kept[0] / "model.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())

def test_documents_split_on_any_blank_line_and_a_bom_is_not_text(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"\xef\xbb\xbfone\nstill one\n \t\ntwo\r\rthree\r\n\r\nfour\n")
    assert list(read_documents(str(txt))) == ["one\nstill one", "two", "three", "four"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert list(read_documents(str(jsonl))) == ["first", "second"]


def test_inputs_by_any_name_once_each_through_linked_folders(tmp_path):
    """Review findings: a JSON Lines file named train.json (datasets' to_json) or TRAIN.JSONL was read as one text
    document; a linked sub-folder of a --data folder was skipped; a file named twice (a folder and a file in it)
    was read twice (held-out text then trained on); --skip-bad-lines dropped a whole bare-CR file."""
    from electra_fast.train.data import resolve_inputs
    lines = b'{"text": "first"}\n{"text": "second"}\n'
    for name in ("train.json", "TRAIN.JSONL"):
        (tmp_path / name).write_bytes(lines)
        assert list(read_documents(str(tmp_path / name))) == ["first", "second"], name
    top, shard = tmp_path / "top", tmp_path / "shard"
    top.mkdir()
    shard.mkdir()
    (top / "a.txt").write_text("a\n")
    (top / "B.TXT").write_text("b\n")
    (shard / "c.txt").write_text("c\n")
    (top / "more").symlink_to(shard)
    (shard / "loop").symlink_to(top)  # a link cycle: walked once
    got = resolve_inputs([str(top), str(top / "a.txt")])
    assert [os.path.relpath(p, top) for p in got] == ["B.TXT", "a.txt", os.path.join("more", "c.txt")]
    old_mac = tmp_path / "mac.txt"
    old_mac.write_bytes(b"one\rstill one\r\rtwo \xff bad\r\rthree\r")
    stats = {}
    assert list(read_documents(str(old_mac), skip_bad_lines=True, stats=stats)) == ["one\nstill one", "three"]
    assert stats["skipped_lines"] == 1


def test_a_loaded_tokenizer_neither_truncates_nor_pads(env, tmp_path):
    from tokenizers import Tokenizer
    from electra_fast.train.tokenizer import load_tokenizer

    tok = Tokenizer.from_file(env["tokenizer"])
    tok.enable_truncation(4)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=64)
    tok.save(str(tmp_path / "t.json"))
    text = " ".join(_corpus()[:3])
    assert load_tokenizer(str(tmp_path / "t.json")).encode(text).ids == Tokenizer.from_file(env["tokenizer"]).encode(
        text).ids


def test_diverging_runs_and_unrepresentable_recipes_stop_in_one_line(env, tmp_path):
    for recipe, match in ((dict(temperature=1e-45), "--temperature"), (dict(adam_eps=1e-46), "--adam-eps"),
                          (dict(disc_weight=1e39), "--disc-weight")):
        with pytest.raises(PretrainError, match=match):
            pretrain(env["data"], **_kw(env, tmp_path / "r", recipe=recipe))
        assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    with pytest.raises(PretrainError, match="the loss became non-finite at step"):
        pretrain(env["data"], **_kw(env, tmp_path / "nan", lr=1e30, precision="fp32", steps=20))


def test_resume_of_a_folder_without_a_run_is_refused(env, tmp_path):
    """A mistyped --out, or a run a failed start took back: --resume started the built-in default job there (exit
    0, its run.json then the run's record). With --data, a missing or empty --out starts the run: a first start
    killed before it claimed the folder, requeued with --resume (the bad-input sweep's kill 0.3 s after exec was
    refused); a folder holding other files is still refused."""
    with pytest.raises(PretrainError, match=r"^--resume: .*typo holds no run to continue "
                                            r"\(no run.json, no electra-fast marker\)"):
        pretrain(None, out=str(tmp_path / "typo"), resume=True, progress=False)
    assert not (tmp_path / "typo").exists()
    assert pretrain(env["data"], **_kw(env, tmp_path / "requeued", steps=2, resume=True))["steps"] == 2
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(PretrainError, match="theirs holds no run to continue"):
        pretrain(env["data"], **_kw(env, tmp_path / "theirs", steps=2, resume=True))
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainError, match="holds no run to continue"):
        pretrain(None, out=str(tmp_path / "empty"), resume=True, progress=False)
    assert list((tmp_path / "empty").iterdir()) == []
    # a folder a first start claimed and was killed in (before run.json): a requeued --resume with the run's options
    # starts it; without them (the built-in default job) it is refused
    (tmp_path / "empty" / ".electra-fast-run").write_text("")
    with pytest.raises(PretrainError, match="holds no run to continue"):
        pretrain(None, out=str(tmp_path / "empty"), resume=True, progress=False)
    assert pretrain(env["data"], **_kw(env, tmp_path / "empty", steps=2, resume=True))["steps"] == 2


def test_a_corpus_without_text_is_one_line_for_every_tokenizer(tmp_path):
    """The Unigram trainer's empty vocabulary was a traceback (min() of nothing); WordPiece / BPE said it."""
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n\n")
    for kind in ("unigram", "wordpiece", "bpe"):
        with pytest.raises(PretrainError, match="^--data: no text found"):
            pretrain(str(blank), out=str(tmp_path / kind), steps=1, progress=False, vocab_size=300,
                     recipe=dict(tokenizer_type=kind), model="electra-tiny")


def test_a_folder_inputs_cache_key_follows_its_files(tmp_path):
    """A datasets save_to_disk folder whose shard was rewritten in place kept its cache key (the folder's own
    stat): a resume read the stale tokens."""
    from electra_fast.train.data import cache_key
    from electra_fast.train.tokenizer import train_tokenizer
    tok = train_tokenizer("wordpiece", ["a b c d e"] * 5, 40)
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "data-00000-of-00001.arrow").write_bytes(b"one")
    before = cache_key([str(folder)], tok, False)
    os.utime(folder / "data-00000-of-00001.arrow", ns=(1, 1))
    stat = os.stat(folder)
    (folder / "data-00000-of-00001.arrow").write_bytes(b"two")
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the folder itself looks untouched
    assert cache_key([str(folder)], tok, False) != before


def test_cache_key_follows_an_edit_that_keeps_size_and_mtime(tmp_path):
    """An edit of the same size with the old mtime put back (touch -r, cp -p, rsync -t) kept the cache key: the
    run, and a --resume, trained on the stale tokens without a word."""
    from electra_fast.train.data import cache_key
    from electra_fast.train.tokenizer import train_tokenizer
    tok = train_tokenizer("wordpiece", ["a b c d e"] * 5, 40)
    f = tmp_path / "c.txt"
    f.write_text("the quick brown fox\n")
    os.utime(f, ns=(1, 1))
    before = cache_key([str(f)], tok, False)
    assert cache_key([str(f)], tok, False) == before  # unchanged: the same key (the cache is reused)
    time.sleep(0.05)  # past the kernel's coarse ctime tick (a jiffy, up to 10 ms)
    f.write_text("the QUACK brown fox\n")
    os.utime(f, ns=(1, 1))
    assert os.stat(f).st_size == len("the quick brown fox\n") and os.stat(f).st_mtime_ns == 1
    assert cache_key([str(f)], tok, False) != before


def test_an_edited_corpus_leaves_one_token_cache(env, tmp_path, capsys):
    """Every edit or touch of the corpus tokenised it again under a new key and kept the old cache, a full copy of
    the corpus's tokens each time, that no later key could name. The run's cache folder keeps the one in use."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(open(env["data"]).read())
    out = tmp_path / "run"
    pretrain(str(corpus), **_kw(env, out, steps=1))
    first = sorted(p.name for p in (out / "cache").glob("tokens-*"))
    time.sleep(0.05)  # past the kernel's coarse ctime tick
    corpus.write_text(open(env["data"]).read() + "\n\nOne more document at the end of it.\n")
    capsys.readouterr()
    with pytest.raises(PretrainError, match="--resume: the data now packs into"):  # changed: refused, as before
        pretrain(str(corpus), **_kw(env, out, steps=2, resume=True))
    assert "removed 1 stale token cache(s)" in capsys.readouterr().err
    second = sorted(p.name for p in (out / "cache").glob("tokens-*"))
    assert len(first) == len(second) == 2 and not set(first) & set(second)  # a .bin and its .json each time


def test_a_saved_dataset_with_bad_text_or_no_train_split(tmp_path, monkeypatch):
    """A datasets save_to_disk folder (the `datasets` package stands in here: it is no test dependency): a 'text'
    column of ints or lists ended in "AttributeError: 'int' object has no attribute 'strip'"; a DatasetDict without
    a 'train' split trained on its first split by name (a test set). Both are one line now; --skip-bad-lines skips
    such rows, as it does JSON Lines."""
    import types
    from electra_fast.train.data import read_documents

    class Dataset(list):
        column_names = ["text"]

    class DatasetDict(dict):
        pass

    saved = {}
    fake = types.SimpleNamespace(Dataset=Dataset, DatasetDict=DatasetDict, load_from_disk=lambda p: saved[p])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    for name, ds in (("ints", Dataset([{"text": "a good row"}, {"text": 7}, {"text": ["x"]}])),
                     ("splits", DatasetDict(test=Dataset([{"text": "held out"}]), validation=Dataset()))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dataset_info.json").write_text("{}")
        saved[str(tmp_path / name)] = ds
    ints, splits = str(tmp_path / "ints"), str(tmp_path / "splits")
    with pytest.raises(PretrainError, match=r"^--data: dataset .*ints row 1: 'text' is int, not a string; fix it "):
        list(read_documents(ints))
    stats = {}
    assert list(read_documents(ints, skip_bad_lines=True, stats=stats)) == ["a good row"]
    assert stats == {"skipped_lines": 2}
    with pytest.raises(PretrainError, match=r"has splits \['test', 'validation'\] and no 'train'; pass the folder"):
        list(read_documents(splits))
    saved[splits] = DatasetDict(test=Dataset([{"text": "the only split"}]))
    assert list(read_documents(splits)) == ["the only split"]


def test_data_folder_that_is_the_out_folder_resumes(env, tmp_path):
    d = tmp_path / "both"
    d.mkdir()
    shutil.copy(env["data"], d / "corpus.txt")
    pretrain(str(d), **_kw(env, d, steps=4, save_every=2, allow_nonempty_out=True))
    shutil.rmtree(d / "checkpoints" / "step-00000004")
    pretrain(str(d), **_kw(env, d, steps=4, resume=True))  # metrics.jsonl / cache are not read as text
    assert sorted(_losses(d)) == [1, 2, 3, 4]


def test_a_second_job_on_the_same_out_is_refused_and_takes_nothing(env, tmp_path):
    import fcntl

    out = tmp_path / "run"
    pretrain(env["data"], **_kw(env, out, steps=2, save_every=1))
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    with open(out / ".electra-fast-run", "rb") as held:  # another job holds the run
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = sorted(str(p) for p in out.rglob("*"))
        with pytest.raises(PretrainError, match="--out: .* is in use by another electra-fast pretrain job"):
            pretrain(env["data"], **_kw(env, out, steps=2, resume=True))
        assert sorted(str(p) for p in out.rglob("*")) == before
    pretrain(env["data"], **_kw(env, out, steps=2, resume=True))  # released: the run continues
    assert sorted(_losses(out)) == [1, 2]


def test_a_file_system_without_locks_runs_the_job(env, tmp_path, monkeypatch):
    """flock failing for another reason than a holder (NFS without lockd: ENOLCK) said "in use by another job" on
    every start: a run on such a folder could never start. It runs as on a platform without flock."""
    import errno
    import fcntl

    from electra_fast import _files

    real_flock = fcntl.flock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert _files.hold_lock(str(tmp_path)) is None
    pretrain(env["data"], **_kw(env, tmp_path / "run", steps=2))
    assert sorted(_losses(tmp_path / "run")) == [1, 2]

    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(_files.InUse):
        _files.hold_lock(str(tmp_path))

    # the folder removed and made again while this process locked it (another job's failed start, then a third
    # job's): the lock is on a folder no path names, so it is no lock
    folder = tmp_path / "again"
    folder.mkdir()

    def replaced(fd, op):
        folder.rmdir()
        folder.mkdir()

    monkeypatch.setattr(fcntl, "flock", replaced)
    with pytest.raises(_files.InUse):
        _files.hold_lock(str(folder))

    # NFS emulates flock with a write lock: a descriptor opened read-only gets EBADF (flock(2)). A run's marker file
    # is opened read-write, so pretrain's lock holds there (it was opened read-only, and said "in use" on NFS).
    monkeypatch.setattr(fcntl, "flock", _nfs_like_flock(real_flock))
    marker = tmp_path / "marker"
    marker.write_text("")
    fd = _files.hold_lock(str(marker))
    try:
        assert fd is not None
        with pytest.raises(_files.InUse):
            _files.hold_lock(str(marker))
    finally:
        os.close(fd)


def _nfs_like_flock(real):
    """``real`` (fcntl.flock) as an NFS client serves it: EBADF for an exclusive lock on a read-only descriptor."""
    import errno
    import fcntl

    def flock(fd, op):
        if op & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, op)

    return flock


# ------------------------------------------------------------------------------------------ crash safety
CHILD = textwrap.dedent("""
    import os, sys, torch
    from electra_fast.train import checkpoint as ckpt
    root = sys.argv[1]
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    step = max([s for s, _ in ckpt.checkpoint_dirs(root)], default=0)
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        state = {"step": step, "data_position": 0, "tokens_seen": 0, "optimizer": {}, "scheduler": {}, "scaler": {},
                 "rng": [], "blob": torch.full((20000,), float(step))}
        ckpt.save(root, step, "run", {
            "model.safetensors": lambda p: ckpt.save_model(model, p),
            "training_state.pt": lambda p: ckpt.save_training_state(state, p),
            "config.json": lambda p: open(p, "w").write("{}"),
            "tokenizer.json": lambda p: open(p, "w").write("{}")}, keep=2)
""")


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    root = str(tmp_path / "checkpoints")
    rng = random.Random(0)
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, root], stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not ckpt.checkpoint_dirs(root) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        newest = ckpt.newest_complete(root, warn=lambda m: None)
        assert newest is not None, f"trial {trial}: no loadable checkpoint"
        st = ckpt.load_training_state(os.path.join(newest, "training_state.pt"))
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
        ckpt.load_model_state(model, os.path.join(newest, "model.safetensors"))
        assert all((p == float(st["step"])).all() for p in model.parameters())
        assert ckpt.read_meta(newest)["step"] == st["step"]
    ckpt.remove_stale_temporaries(root)
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")]


@pytest.mark.parametrize("failure", ["os", "torch", "safetensors"])
def test_a_full_disk_while_a_checkpoint_is_written_is_one_line_and_keeps_the_earlier_ones(env, tmp_path, capsys,
                                                                                           failure):
    """Review finding: a full disk while writing a checkpoint ended in a traceback (torch: "basic_ios::clear:
    iostream error" / "unexpected pos", safetensors: "os error 28"). Now one line naming the checkpoint, the file
    and the free space; the partial directory goes, the earlier checkpoints stay, and --resume continues."""
    from safetensors import SafetensorError
    errors = {"os": OSError(28, "No space left on device"), "torch": RuntimeError("basic_ios::clear: iostream error"),
              "safetensors": SafetensorError("Error while serializing: IoError(Os { code: 28 })")}
    out = tmp_path / "run"

    def full(stage):
        if stage == "training_state.pt" and len(ckpt.checkpoint_dirs(out / "checkpoints")) == 1:
            raise errors[failure]

    with pytest.raises(PretrainError, match=r"^checkpoint step-00000004: writing training_state\.pt in .*checkpoints "
                                            r"failed \(.+; \d+ MiB free there\); the earlier checkpoints are kept: "
                                            r"free some space, then --resume$"):
        pretrain(env["data"], **_kw(env, out, steps=4, save_every=2), _checkpoint_hook=full)
    assert [s for s, _ in ckpt.checkpoint_dirs(out / "checkpoints")] == [2]
    assert ckpt.verify(str(out / "checkpoints" / "step-00000002")) is None
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp")]
    assert pretrain(env["data"], **_kw(env, out, steps=4, save_every=2, resume=True))["steps"] == 4
    # the first checkpoint: nothing to --resume (the run is taken back); out of memory: not the disk's fault
    first = tmp_path / "first"
    for error, raised in ((errors[failure], PretrainError), (RuntimeError("DefaultCPUAllocator: not enough "
                                                                          "memory: you tried to allocate 9"), None)):
        def fail(stage, error=error):
            if stage == "model.safetensors":
                raise error

        with pytest.raises(raised or type(error)) as e:
            pretrain(env["data"], **_kw(env, first, steps=2), _checkpoint_hook=fail)
        assert e.value is not error if raised else e.value is error
        if raised:
            assert str(e.value).endswith("no checkpoint was written yet: free some space, then run the command "
                                         "again")



@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(30, "Read-only file system"),
                                   "safetensors", RuntimeError("open file failed with strerror: Permission denied")])
def test_a_checkpoint_folder_the_run_may_not_write_is_said_not_writable(env, tmp_path, error):
    """Review finding: a checkpoints/ the run may not write (EACCES / EPERM / EROFS) was reported as a full disk
    ("free some space")."""
    from safetensors import SafetensorError
    if error == "safetensors":
        error = SafetensorError('Error while serializing: I/O error: Permission denied (os error 13) at path "x"')
    out = tmp_path / "run"

    def denied(stage):
        if stage == "model.safetensors" and ckpt.checkpoint_dirs(out / "checkpoints"):
            raise error

    with pytest.raises(PretrainError, match=r"^checkpoint step-00000002: writing model\.safetensors in "
                                            r".*checkpoints failed \(not writable: .+\); the earlier checkpoints "
                                            r"are kept: make it writable, then --resume$"):
        pretrain(env["data"], **_kw(env, out, steps=2, save_every=1), _checkpoint_hook=denied)

def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(env, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(env["data"], **_kw(env, out, steps=4, save_every=2))
    newest = out / "checkpoints" / "step-00000004"
    with open(newest / "model.safetensors", "r+b") as f:
        f.truncate(100)
    s = pretrain(env["data"], **_kw(env, out, steps=6, save_every=2, resume=True))
    err = capsys.readouterr().err
    assert "skipping corrupt or partial checkpoint" in err and "step 2" in err
    assert s["steps"] == 6 and sorted(_losses(out)) == list(range(1, 7))


def _corrupt(out, *steps):
    """Truncate the training state of these checkpoints (what a full disk or a bad copy leaves)."""
    for step in steps:
        with open(os.path.join(out, "checkpoints", f"step-{step:08d}", "training_state.pt"), "r+b") as f:
            f.truncate(64)


def _complete_steps(out):
    return [s for s, p in ckpt.checkpoint_dirs(os.path.join(out, "checkpoints")) if ckpt.verify(p) is None]


@pytest.mark.parametrize("keep, corrupt, steps, kept", [(1, (6, 8), 5, [5]), (3, (4, 6, 8), 3, [3, 2])])
def test_keep_counts_only_complete_checkpoints(env, tmp_path, capsys, keep, corrupt, steps, kept):
    """Corrupt checkpoints newer than the resumed one never count against --keep: the new checkpoint and the
    complete ones it leaves room for survive; the corrupt ones are set aside byte for byte."""
    out = str(tmp_path / "run")
    pretrain(env["data"], **_kw(env, out, steps=8, save_every=2, keep=10))
    _corrupt(out, *corrupt)
    with open(os.path.join(out, "checkpoints", "step-00000008", "training_state.pt"), "rb") as f:
        corrupt_bytes = f.read()
    capsys.readouterr()
    s = pretrain(env["data"], **_kw(env, out, steps=steps, save_every=1, keep=keep, resume=True))
    assert _complete_steps(out) == kept
    assert ckpt.verify(s["checkpoint"]) is None and ckpt.resolve(out) == s["checkpoint"]
    assert f"checkpoint: {s['checkpoint']}" in capsys.readouterr().out  # the final message names a kept one
    assert [s for s, _ in ckpt.checkpoint_dirs(os.path.join(out, "checkpoints"))] == kept  # nothing corrupt left
    with open(os.path.join(out, "checkpoints", "step-00000008.corrupt", "training_state.pt"), "rb") as f:
        assert f.read() == corrupt_bytes



def test_retention_deletes_only_a_checkpoints_own_files(env, tmp_path, capsys):
    """Review finding (data loss): --keep deleted an old checkpoint with everything in it, a fine-tuning run the user
    had saved inside it too. A checkpoint holding anything else is kept whole, said once; one whose folder gains
    an entry while it is deleted goes back, that entry unharmed, and is set aside as partial."""
    out = tmp_path / "run"
    mine = out / "checkpoints" / "step-00000001" / "sst"

    def user_run(stage):  # the user's fine-tuning run, saved into the first checkpoint once it is there
        if stage == "renamed" and mine.parent.is_dir() and not mine.exists():
            mine.mkdir()
            (mine / "summary.json").write_text("{}\n")

    pretrain(env["data"], **_kw(env, out, steps=4, save_every=1, keep=1), _checkpoint_hook=user_run)
    err = capsys.readouterr().err
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000001", "step-00000004"]
    assert (mine / "summary.json").read_text() == "{}\n" and ckpt.verify(str(mine.parent)) is None
    warned = [line for line in err.splitlines() if "kept checkpoint" in line]
    assert warned == [f"warning: --keep: kept checkpoint {mine.parent}, older than the ones --keep keeps: it also "
                      "holds sst, not written by the run (retention deletes only a checkpoint's own files); move "
                      "those out, then delete it"]  # once, not at each of the three saves after it

    def late_entry(stage):  # written into the checkpoint between the check and its delete
        if stage == f"prune renamed {out / 'checkpoints' / 'step-00000004'}":
            doomed = [n for n in os.listdir(out / "checkpoints") if n.startswith(".del-step-00000004")]
            (out / "checkpoints" / doomed[0] / "late.txt").write_text("mine\n")

    pretrain(env["data"], **_kw(env, out, steps=6, save_every=1, keep=1, resume=True), _checkpoint_hook=late_entry)
    assert (out / "checkpoints" / "step-00000004.corrupt" / "late.txt").read_text() == "mine\n"
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000001", "step-00000004.corrupt", "step-00000006"]

def test_retention_never_deletes_through_a_linked_checkpoint(env, tmp_path, capsys):
    """Review finding (data loss): a checkpoint that was a symbolic link to an archive had the archive's files
    deleted through the link (shutil.rmtree had refused links; the per-file delete followed them)."""
    out = tmp_path / "run"
    pretrain(env["data"], **_kw(env, out, steps=1, save_every=1))
    archive = tmp_path / "archive"
    os.replace(out / "checkpoints" / "step-00000001", archive)
    os.symlink(archive, out / "checkpoints" / "step-00000001")
    before = sorted(os.listdir(archive))
    pretrain(env["data"], **_kw(env, out, steps=3, save_every=1, keep=1, resume=True))
    assert sorted(os.listdir(archive)) == before and (out / "checkpoints" / "step-00000001").is_symlink()
    assert "it also holds (a symbolic link to" in capsys.readouterr().err


def test_resume_reads_a_hidden_file_named_on_its_own_and_old_relative_records(env, tmp_path, monkeypatch):
    """Review findings: a hidden file named as a --data file (as the message advises) made the resume read the
    folder's hidden names too, and an old run's relative records were resolved from the current directory."""
    from electra_fast.train.data import reads_hidden
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = open(env["data"], encoding="utf-8").read()
    for name in ("a.txt", ".extra.txt", ".other.txt"):
        (corpus / name).write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    pretrain([str(corpus), str(corpus / ".extra.txt")], **_kw(env, out, steps=2, save_every=2))
    pretrain(**_kw(env, out, steps=3, resume=True, tokenizer=None, model=None))
    assert max(_losses(out)) == 3
    monkeypatch.chdir(tmp_path / "run")  # elsewhere than where the run started
    assert reads_hidden([str(corpus)], ["corpus/.ipynb_checkpoints/a.txt", "corpus/a.txt"])
    assert not reads_hidden([str(corpus)], ["corpus/a.txt", "elsewhere/.x.txt"])


KILL_IN_PRUNE = textwrap.dedent("""
    import json, os, signal, sys
    from electra_fast.train import pretrain
    kw, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
    seen = []
    def hook(stage):
        if stage.startswith("prune"):
            seen.append(stage)
            if len(seen) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    pretrain(**kw, _checkpoint_hook=hook)
""")


@pytest.mark.parametrize("kill_at", [1, 3])
def test_sigkill_inside_pruning_leaves_a_resumable_run(env, tmp_path, capsys, kill_at):
    out = str(tmp_path / "run")
    pretrain(env["data"], **_kw(env, out, steps=8, save_every=2, keep=10))
    _corrupt(out, 6, 8)
    kw = dict(data=[env["data"]], **_kw(env, out, steps=5, save_every=1, keep=1, resume=True))
    child = subprocess.run([sys.executable, "-c", KILL_IN_PRUNE, json.dumps(kw), str(kill_at)],
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr  # killed inside pruning
    assert 5 in _complete_steps(out)
    capsys.readouterr()
    s = pretrain(env["data"], **_kw(env, out, steps=6, save_every=1, keep=1, resume=True))
    assert "step-00000005 (step 5)" in capsys.readouterr().err  # resumed from the checkpoint pruning protected
    assert s["steps"] == 6 and _complete_steps(out) == [6]
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".")]  # no leftovers


def test_tokenizer_training_is_deterministic(env, tmp_path):
    """Same documents -> byte-identical tokenizer.json (the Rust trainer's hash-map order must not leak)."""
    docs = _corpus()
    first = train_wordpiece(docs, vocab_size=120).to_str()
    assert all(train_wordpiece(iter(docs), vocab_size=120).to_str() == first for _ in range(3))
    assert train_wordpiece(lambda: iter(docs), vocab_size=120).to_str() == first  # a corpus streamed twice
    # the pinned continuation pieces are ordinary vocabulary entries, not added (special) tokens
    tok = load_tokenizer(env["tokenizer"])
    assert [t["content"] for t in json.loads(tok.to_str())["added_tokens"]] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                                "[MASK]"]
    assert tok.get_vocab_size() == 120 and "##s" in tok.get_vocab() and "##s" not in tok.encode("the ##s").tokens
    # two fresh runs with the same data and seed: the same tokenizer file, the same losses from step 1
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        pretrain(env["data"], **{**_kw(env, out, steps=2), "tokenizer": None, "vocab_size": 150})
    a, b = (open(out / "cache" / "tokenizer.json", "rb").read() for out in runs)
    assert a == b and _losses(runs[0]) == _losses(runs[1])


# ------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank, world, port, kw, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    s = pretrain(**kw)
    flat = torch.cat([p.detach().flatten() for p in s["model"].parameters()])
    torch.save(flat, os.path.join(result_dir, f"rank{rank}.pt"))
    # nothing left holding the destroyed process group (DDP's reducer), collected or not: such a group's threads
    # ended at interpreter exit, where a rank aborted now and then after a finished run
    from torch.nn.parallel import DistributedDataParallel
    assert not any(isinstance(o, DistributedDataParallel) for o in gc.get_objects()), rank


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _all_cat_worker(rank, world, port, result_dir):
    import torch.distributed as dist
    from electra_fast.train.distributed import Context
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        t = torch.arange(3 + 2 * rank, dtype=torch.float32)[:, None].repeat(1, 2) + 100 * rank
        torch.save(Context(rank=rank, world=world).all_cat(t), os.path.join(result_dir, f"cat{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_cat_takes_parts_of_different_lengths(tmp_path):
    """A step's real tokens differ between ranks under doc-sentences packing: all_cat assumed one shape, and gloo
    aborted the run at its first logged step ('Received data size doesn't match expected size')."""
    torch.multiprocessing.spawn(_all_cat_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    want = torch.cat([torch.arange(3.0)[:, None].repeat(1, 2), torch.arange(5.0)[:, None].repeat(1, 2) + 100])
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"cat{rank}.pt"), want)


def test_two_process_gloo(env, tmp_path):
    port = _free_port()
    out = tmp_path / "ddp"
    kw = dict(data=[env["data"]], **_kw(env, out, steps=3, batch_size=2))
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, kw, str(tmp_path)), nprocs=2, join=True)
    p0, p1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(p0, p1)  # DDP keeps the replicas identical
    assert sorted(_losses(out)) == [1, 2, 3]  # one writer: each step logged once
    assert [s for s, _ in ckpt.checkpoint_dirs(out / "checkpoints")] == [3]
    st = ckpt.load_training_state(str(out / "checkpoints" / "step-00000003" / "training_state.pt"))
    assert st["world"] == 2 and st["data_position"] == 3 * 2 * 2 and len(st["rng"]) == 2
    net = torch.load(tmp_path / "rank0.pt")
    assert not torch.equal(net, torch.zeros_like(net))


def _ddp_disagreement_worker(rank, world, cases, result_dir):
    from electra_fast.train import rundir as rundir_mod
    from electra_fast.train import trainer as trainer_mod
    torch.set_num_threads(1)
    # what rank 1 sees on a node of its own, at the same paths: no --out of rank 0's (no shared filesystem), a
    # corpus file of another size, other tokens
    node = {"unseen": (rundir_mod, "is_claimed", lambda out: False),
            "stat": (trainer_mod, "_stat", lambda path: ((".", 1, 1),)),
            "digest": (trainer_mod, "stream_digest", lambda stream: "0" * 64),
            "no compiler": (trainer_mod, "_compile_fails", lambda device: "InductorError: no C++ compiler")}
    for i, (port, kws, own) in enumerate(cases):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        module, name, value = node[own] if own and rank == 1 else (None, None, None)
        real = getattr(module, name) if module else None
        if module:
            setattr(module, name, value)
        try:
            pretrain(**kws[rank])
            said = "ran"
        except PretrainError as e:
            said = str(e)
        finally:
            if module:
                setattr(module, name, real)
        with open(os.path.join(result_dir, f"case{i}-rank{rank}.txt"), "w") as f:
            f.write(said)


def test_ranks_given_other_options_or_data_are_refused_on_every_rank(env, tmp_path):
    """Review finding: nothing compared the ranks' options. A node's own --data trained one model on two corpora
    and recorded rank 0's only; another --lr, --steps... silently too; another --out (no shared filesystem) failed
    on rank 1 naming --tokenizer, and rank 0 with a gloo traceback. Every rank now stops with the same line."""
    other = tmp_path / "other.txt"
    other.write_text(open(env["data"], encoding="utf-8").read().replace("the", "a"), encoding="utf-8")
    base = lambda out, **kw: dict(data=[env["data"]], **_kw(env, out, steps=2, batch_size=2, **kw))
    cases = [  # (port, each rank's options, what rank 1's node holds of its own)
        (_free_port(), [base(tmp_path / "a"), {**base(tmp_path / "a"), "data": [str(other)]}], None),
        (_free_port(), [base(tmp_path / "b"), base(tmp_path / "b", lr=1e-2)], None),
        (_free_port(), [base(tmp_path / "c"), base(tmp_path / "c-node1")], None),
        (_free_port(), [base(tmp_path / "d"), base(tmp_path / "d")], "unseen"),
        (_free_port(), [base(tmp_path / "e"), base(tmp_path / "e")], "stat"),
        (_free_port(), [base(tmp_path / "f"), base(tmp_path / "f")], "digest"),
        (_free_port(), [base(tmp_path / "g", compile=True), base(tmp_path / "g", compile=True)], "no compiler"),
    ]
    torch.multiprocessing.spawn(_ddp_disagreement_worker, args=(2, cases, str(tmp_path)), nprocs=2, join=True)
    said = [[(tmp_path / f"case{i}-rank{r}.txt").read_text() for r in (0, 1)] for i in range(len(cases))]
    same = "every torchrun process needs the same options, and --out on one shared filesystem"
    for (first, second), want, hint in zip(said, [
            r"^--data: rank 1 has '.*other\.txt' where rank 0 has '.*' \(item 1\): ",
            r"^--lr: rank 1 has 0\.01, rank 0 ",
            r"^--out: rank 1 has .*c-node1', rank 0 .*/c': ",
            r"^--out: rank 1 has 'no run folder prepared by rank 0', rank 0 'the run folder rank 0 prepared'",
            r"^--data: rank 1 has \('.*', \('\.', 1, 1\)\) where rank 0 has \('.*', \('\.', \d+, \d+\)\) \(item 1\)",
            r"^--data: rank 1 has 'tokens sha256 0{64}', rank 0 'tokens sha256 [0-9a-f]{64}': ",
            r"^--compile failure: rank 1 has 'InductorError: no C\+\+ compiler', rank 0 None: "],
            [same] * 5 + ["every torchrun process needs the same corpus (its token cache differs from rank 0's)",
                          same]):
        assert first == second and re.search(want, first) and first.endswith(hint), (first, second)
    assert not any((tmp_path / run).exists() for run in ("a", "b", "c", "c-node1", "g"))  # refused before writing
    for run in "def":  # rank 0's claim taken back; a folder it made keeps its content-keyed cache for a retry
        assert not (tmp_path / run).exists() or set(os.listdir(tmp_path / run)) <= {"cache", ".electra-fast-run"}


def test_a_disagreement_names_the_first_item_that_differs_in_one_short_line():
    """Review finding: one differing file of a 2,000-shard --data folder made a 192,110-character line."""
    from electra_fast.train.distributed import _difference
    main = [(f"shard-{i:05d}.arrow", 1000 + i, 7) for i in range(2000)]
    other = main[:1234] + [("shard-01234.arrow", 1, 7)] + main[1235:]
    assert _difference(other, main, 3) == ("rank 3 has ('shard-01234.arrow', 1, 7) where rank 0 has "
                                           "('shard-01234.arrow', 2234, 7) (item 1235)")
    assert _difference(main[:5], main, 1) == "rank 1 has 5 items, rank 0 2000"
    line = _difference("x" * 10_000, "y", 1)
    assert len(line) < 250 and line.startswith("rank 1 has 'xxx") and line.endswith("..., rank 0 'y'")


def test_a_run_resumed_on_more_processes_gives_each_rank_its_own_dropout_stream(env, tmp_path, capfd):
    """A one-process run resumed on two: every rank past the saved ones loaded rank 0's generator state, so all
    ranks drew the same dropout seeds at every step (and their checkpoints kept it so). The warning says the
    step's batch changed (it said only that results would differ)."""
    out = tmp_path / "run"
    pretrain(env["data"], **_kw(env, out, steps=2, save_every=1, keep=5))
    kw = dict(data=[env["data"]], **_kw(env, out, steps=3, save_every=1, keep=5, resume=True))
    capfd.readouterr()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), kw, str(tmp_path)), nprocs=2, join=True)
    batch = kw["batch_size"]
    assert (f"warning: resuming a 1-process run on 2 processes: a step now takes {2 * batch} sequences, the run's "
            f"took {batch} (--batch-size {batch} per process x --grad-accum 1 x processes)") in capfd.readouterr().err
    st = ckpt.load_training_state(str(out / "checkpoints" / "step-00000003" / "training_state.pt"))
    assert st["world"] == 2 and len(st["rng"]) == 2
    assert not torch.equal(st["rng"][0]["torch"], st["rng"][1]["torch"])


# ------------------------------------------------------------------------------------------ bad input
def _cli(args, capsys):
    code = cli_main(["pretrain", "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def test_the_api_takes_pathlib_paths_and_names_an_argument_of_another_type(env, tmp_path):
    """Review finding: data / out / tokenizer took a pathlib.Path, model and init_from did not
    ("'PosixPath' object has no attribute 'endswith'", "Path.replace() takes 2 positional arguments", the source
    model loaded first); a number for tokenizer, a list holding one for data, a str for recipe: errors naming none."""
    from pathlib import Path
    run = tmp_path / "run"
    pretrain([Path(env["data"])], **_kw(env, run, steps=1, model=Path(env["model"]), tokenizer=Path(env["tokenizer"])))
    follow = pretrain(Path(env["data"]), **_kw(env, tmp_path / "follow", steps=1, model=None, tokenizer=None,
                                               init_from=run))
    assert follow["steps"] == 1
    from types import MappingProxyType  # any Mapping is a recipe (review finding: only a dict was)
    assert pretrain(env["data"], **_kw(env, tmp_path / "proxy", steps=1, recipe=MappingProxyType(
        {"mask_prob": 0.2})))["steps"] == 1
    for kw, match in ((dict(tokenizer=123), r"^tokenizer: expected a path \(str or os\.PathLike\), got int$"),
                      (dict(model=3.5), r"^model: expected a path \(str or os\.PathLike\), got float$"),
                      (dict(init_from=b"run", model=None, tokenizer=None), r"^init_from: expected a path .*got bytes$"),
                      (dict(out=None), r"^out: expected a path .*got NoneType$"),
                      (dict(data=[env["data"], 5]), r"^data: expected a path .*got int$"),
                      (dict(data={"a": 1}), r"^data: expected a path or a list of paths, got dict$"),
                      (dict(recipe="bpe"), r"^recipe: expected a dict of recipe settings \(.*\), got str$")):
        args = {**_kw(env, tmp_path / "bad", steps=1), "data": [env["data"]], **kw}
        with pytest.raises(TypeError, match=match):
            pretrain(**args)
    assert not (tmp_path / "bad").exists()


def test_compile_is_checked_first_recorded_and_kept_on_resume(env, tmp_path, monkeypatch, capsys):
    """Review findings: without a working C++ compiler --compile failed with a 109-line traceback at the first
    step, after the tokenizer and the cache; run.json did not record it, so a bare --resume of a compiled run ran
    uncompiled without a word; compile="no" compiled. (torch.compile stood in for: what is under test is when and
    how the run calls it.)"""
    import torch._inductor.exc as inductor_exc
    compiled = []

    def broken(fn, **kw):
        raise inductor_exc.InductorError(RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), "")

    monkeypatch.setattr(torch, "compile", broken)
    code = cli_main(["pretrain", "--no-progress", "--data", env["data"], "--model", env["model"], "--seq-len", "32",
                     "--steps", "2", "--compile", "--out", str(tmp_path / "nocc")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("electra-fast pretrain: error: --compile: torch.compile does not work "
                                            "here (InductorError: ") and err[-1].endswith("; run without --compile")
    assert not any("tokeniz" in line for line in err)  # before the tokenizer was trained
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    run = tmp_path / "run"
    pretrain(env["data"], **_kw(env, run, steps=2, save_every=1, compile=True))
    assert json.load(open(run / "run.json"))["options"]["compile"] is True and len(compiled) == 2  # probe + step
    capsys.readouterr()
    pretrain(env["data"], **_kw(env, run, steps=3, resume=True))
    assert len(compiled) == 4 and "--compile" not in capsys.readouterr().err  # kept, without a word
    pretrain(env["data"], **_kw(env, run, steps=4, resume=True, compile=False))
    assert len(compiled) == 4
    assert ("warning: --no-compile: resuming a run that was compiled; its losses will differ from an uninterrupted "
            "run's in the last digits") in capsys.readouterr().err
    for out, resume in ((tmp_path / "bad", False), (run, True)):  # given on a resume: the argument, not run.json
        with pytest.raises(TypeError, match="^compile: expected a bool, got str$"):
            pretrain(env["data"], **_kw(env, out, steps=5, compile="no", resume=resume))
    record = json.load(open(run / "run.json"))
    record["options"]["compile"] = "yes"  # edited by hand
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(PretrainError, match=r"run\.json records options\.compile 'yes'; expected true or false$"):
        pretrain(env["data"], **_kw(env, run, steps=5, resume=True))


def test_the_api_refuses_vocab_size_with_a_tokenizer(env, tmp_path):
    """The command line makes --tokenizer and --vocab-size exclusive; the Python API ran, silently at the given
    tokenizer's 120 tokens for vocab_size=5000."""
    with pytest.raises(PretrainError, match=r"^--vocab-size: not with --tokenizer \(its vocabulary, "):
        pretrain(env["data"], **_kw(env, tmp_path / "run", vocab_size=5000))
    assert not (tmp_path / "run").exists()


def test_bad_input_one_line_errors(env, tmp_path, capsys):
    common = ["--tokenizer", env["tokenizer"], "--model", env["model"], "--seq-len", "32", "--steps", "2"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    bad_tok = tmp_path / "bad.json"
    bad_tok.write_text("{not json")
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "no such file or directory"),
        (["--data", str(empty)], "no text found"),
        (["--data", str(latin)], "latin1.txt is not UTF-8 (invalid byte at offset 3)"),
        (["--data", env["data"], "--tokenizer", str(bad_tok)], "cannot read"),
        (["--data", env["data"], "--tokenizer", str(tmp_path / "nope")], "no such file or directory"),
        (["--data", env["data"], "--seq-len", "100"], "exceeds the model's max_position_embeddings (64)"),
        (["--data", env["data"], "--model", "electra-huge"], "unknown preset"),
        (["--data", env["data"], "--batch-size", "0"], "--batch-size: expected an int >= 1"),
    ]
    for i, (extra, message) in enumerate(cases):
        code, line = _cli([*common, "--out", str(tmp_path / f"o{i}"), *extra], capsys)
        assert code == 2 and line.startswith("electra-fast pretrain: error:") and message in line, (extra, line)
    # an output directory holding the user's files (only with --allow-nonempty-out), then another run without
    # --resume; the user's files stay untouched (tests/test_run_dir.py covers every --out situation)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    code, line = _cli([*common, "--data", env["data"], "--out", str(run)], capsys)
    assert code == 2 and "is not empty" in line and "--allow-nonempty-out" in line
    assert _cli([*common, "--data", env["data"], "--out", str(run), "--allow-nonempty-out"], capsys)[0] == 0
    code, line = _cli([*common, "--data", env["data"], "--out", str(run)], capsys)
    assert code == 2 and "already holds a run" in line and "--resume" in line
    assert (run / "notes.txt").read_text() == "mine"
    # a tokenizer that does not match the checkpoint being resumed
    other = train_wordpiece(["zebra quokka platypus"] * 20 + _corpus(20, seed=3), vocab_size=90)
    other.save(str(tmp_path / "other.json"))
    code, line = _cli([*common, "--data", env["data"], "--out", str(run), "--steps", "3", "--resume",
                       "--tokenizer", str(tmp_path / "other.json")], capsys)
    assert code == 2 and "a resumed run keeps its tokenizer (omit it, or start a new --out)" in line
    # --skip-bad-lines continues past the bad line
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"\xff\xfe\n" + open(env["data"], "rb").read())
    assert _cli([*common, "--data", str(mixed), "--skip-bad-lines", "--out", str(tmp_path / "skip")], capsys)[0] == 0
    # --debug shows the traceback instead
    with pytest.raises(PretrainError):
        cli_main(["pretrain", "--debug", "--no-progress", *common, "--data", str(empty), "--out",
                  str(tmp_path / "dbg")])
    # export of a directory without checkpoints
    assert cli_main(["export", str(tmp_path / "o0"), str(tmp_path / "exp")]) == 2


# ------------------------------------------------------------------------------------------ precision / signals
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(env, tmp_path, precision):
    s = pretrain(env["data"], **_kw(env, tmp_path / precision, steps=3, precision=precision))
    assert all(np.isfinite(v) for v in _losses(tmp_path / precision).values())
    st = ckpt.load_training_state(os.path.join(s["checkpoint"], "training_state.pt"))
    assert st["scaler"] != {} if precision == "fp16" else True  # the gradient scaler's state is checkpointed


def test_sigterm_checkpoints_and_stops(env, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "electra_fast", "pretrain", "--no-progress", "--data", env["data"], "--tokenizer",
           env["tokenizer"], "--model", env["model"], "--seq-len", "32", "--batch-size", "4", "--steps", "100000",
           "--log-every", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and _losses(out)):  # wait for the first logged step
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted by SIGTERM" in stdout
    steps = ckpt.checkpoint_dirs(out / "checkpoints")
    assert len(steps) == 1 and ckpt.verify(steps[0][1]) is None and steps[0][0] == max(_losses(out))


SIGTERM_IN_SETUP = """
import os, signal, sys
from electra_fast.train import trainer
real = trainer._Job._tokenizer
def stopped(self):  # a scheduler's SIGTERM while the job trains its tokenizer
    os.kill(os.getpid(), signal.SIGTERM)
    return real(self)
trainer._Job._tokenizer = stopped
from electra_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_before_training_takes_back_the_runs_files(env, tmp_path):
    """Review finding: SIGTERM while the job prepared (training a tokenizer, tokenising) killed it with the default
    action, leaving its marker and cache/ in the user's --allow-nonempty-out folder, which later jobs took for a
    run's. It now stops as Ctrl-C does there: the folder is the user's again."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    cmd = [sys.executable, "-c", SIGTERM_IN_SETUP, "pretrain", "--no-progress", "--data", env["data"], "--model",
           env["model"], "--seq-len", "32", "--steps", "2", "--out", str(user), "--allow-nonempty-out"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("electra-fast pretrain: interrupted by SIGTERM before training "
                                                    "started")
    assert os.listdir(user) == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"


@pytest.fixture
def sighup_survivable():
    """SIGHUP's default action would end the test session if the code under test did not handle it: a handler of
    the test's own is there underneath (restored afterwards)."""
    old = signal.signal(signal.SIGHUP, lambda *a: None)
    yield
    signal.signal(signal.SIGHUP, old)


def test_sighup_before_training_takes_back_the_runs_files(env, tmp_path, capsys, monkeypatch, sighup_survivable):
    """Review finding: SIGHUP (the terminal closed) while the job trained its tokenizer killed it with the default
    action: its marker and cache/ stayed in the user's --allow-nonempty-out folder, and a later job without the flag
    wrote a run there. It now stops as SIGTERM does."""
    from electra_fast.train import trainer
    real = trainer._Job._tokenizer

    def hung_up(self):
        os.kill(os.getpid(), signal.SIGHUP)
        return real(self)

    monkeypatch.setattr(trainer._Job, "_tokenizer", hung_up)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    code = cli_main(["pretrain", "--no-progress", "--data", env["data"], "--model", env["model"], "--seq-len", "32",
                     "--steps", "2", "--out", str(user), "--allow-nonempty-out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[-1] == "electra-fast pretrain: interrupted by SIGHUP before training started", err
    assert os.listdir(user) == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"


def test_sighup_while_training_checkpoints_and_stops(env, tmp_path, monkeypatch, sighup_survivable):
    """Review finding: SIGHUP mid-training lost everything since the last checkpoint, where SIGTERM saves."""
    from electra_fast.train import trainer
    real = trainer._Job._maybe_checkpoint

    def hung_up(self, signals):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGHUP)
        return real(self, signals)

    monkeypatch.setattr(trainer._Job, "_maybe_checkpoint", hung_up)
    s = pretrain(env["data"], **_kw(env, tmp_path / "run", steps=50))
    assert s["interrupted"] == "SIGHUP" and s["steps"] == 4
    assert [step for step, _ in ckpt.checkpoint_dirs(tmp_path / "run" / "checkpoints")] == [4]


def test_sighup_stays_ignored_under_nohup(sighup_survivable):
    """nohup ignores SIGHUP so that a closed terminal does not stop the job: neither handler takes it over."""
    from electra_fast.train.signals import Signals, TermInterrupts, stop_signals
    assert signal.SIGHUP in stop_signals()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    assert stop_signals() == [signal.SIGTERM]
    with TermInterrupts(), Signals(loud=False):
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


class _BrokenPipe:
    """A stderr whose reader is gone (a dead tee, `2>&1 | head`): every write and flush raises EPIPE."""

    def write(self, text=""):
        raise BrokenPipeError(32, "Broken pipe")

    flush = write


@pytest.mark.parametrize("stderr", [None, _BrokenPipe()], ids=["closed", "reader-gone"])
def test_training_goes_on_when_stderr_cannot_be_written(env, tmp_path, monkeypatch, stderr):
    """Review finding: started with 2>&- (sys.stderr None) the job stopped before step 1 (tqdm(file=None)); with the
    stderr reader gone mid-run it stopped at the next progress-bar update, losing everything since its last
    checkpoint. The progress bar and the messages are lost, not the run."""
    monkeypatch.setattr(sys, "stderr", stderr)
    out = tmp_path / "run"
    code = cli_main(["pretrain", "--data", env["data"], "--tokenizer", env["tokenizer"], "--model", env["model"],
                     "--seq-len", "32", "--batch-size", "4", "--steps", "6", "--save-every", "3", "--out", str(out)])
    assert code == 0
    assert sorted(step for step, _ in ckpt.checkpoint_dirs(out / "checkpoints")) == [3, 6] and max(_losses(out)) == 6


def test_the_signal_handlers_message_to_a_closed_stderr_keeps_the_checkpoint():
    """Review finding: with fd 2 closed, SIGTERM's "finishing this step" os.write raised EBADF inside the handler:
    the job ended with "error: [Errno 9] Bad file descriptor" and no SIGTERM checkpoint."""
    from electra_fast.train.signals import Signals
    saved = os.dup(2)
    try:
        with Signals(loud=True) as signals:
            os.close(2)
            os.kill(os.getpid(), signal.SIGTERM)
            caught = signals.caught
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert caught == "SIGTERM"


def test_cpu_training_keeps_freed_memory(env, tmp_path, monkeypatch):
    """glibc's allocator is told to keep freed blocks (no per-step page faults); the opt-out is honoured.

    Asserts what the settings control - a large block comes from the heap, not a fresh mmap, and stays in the
    heap once freed - through glibc's own accounting (mallinfo2), not page-fault counts, which depend on the
    host (a kernel page-reclaim thread re-faulted a reused block on one machine)."""
    from electra_fast.train.trainer import _keep_freed_memory

    monkeypatch.setenv("ELECTRA_FAST_KEEP_FREED_MEMORY", "0")
    assert _keep_freed_memory() is False
    monkeypatch.delenv("ELECTRA_FAST_KEEP_FREED_MEMORY")
    import platform
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        return
    assert _keep_freed_memory() is True
    size = 64 << 20
    before = _mallinfo()
    a = torch.empty(size, dtype=torch.uint8).fill_(1)
    held = _mallinfo()
    # served from the heap, not by an mmap of its own (glibc's default for blocks over 32 MiB)
    assert held.hblkhd - before.hblkhd < size <= held.uordblks - before.uordblks
    del a
    # freed, and kept in the heap for the next step: a trim would hand nearly all of it back to the kernel (the
    # MiB of slack covers small blocks the interpreter and torch allocate or free meanwhile)
    assert _mallinfo().fordblks - held.fordblks >= size - (1 << 20)
    # Review finding: the settings outlived pretrain(), so the caller's process kept up to 2 GiB of freed memory
    # for good. On return a large block is an mmap of its own again (glibc's default), given back when freed.
    pretrain(env["data"], **_kw(env, tmp_path / "run", steps=1))
    before = _mallinfo()
    a = torch.empty(size, dtype=torch.uint8).fill_(1)
    assert _mallinfo().hblkhd - before.hblkhd >= size
    del a
    # Review finding: restoring glibc's 128 KiB there turned its dynamic threshold off for good, so every block over
    # 128 KiB stayed an mmap of its own, unmapped and re-faulted on each use (finetune() after pretrain() in one
    # process: 164 s instead of 32 s per epoch). test_malloc_thresholds_after_a_run checks what is restored.


@pytest.mark.parametrize("name,value,own_mmap", [(None, None, False),
                                                 ("MALLOC_MMAP_THRESHOLD_", "262144", True),
                                                 ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=262144", True),
                                                 # glibc reads 0x... too: 8 MiB serves the block from the heap;
                                                 # read as no number, 128 KiB would not
                                                 ("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.trim_threshold"
                                                                    "=0x1000000:glibc.malloc.mmap_threshold=0x800000",
                                                  False),
                                                 ("MALLOC_TOP_PAD_", "0", True)])
def test_malloc_thresholds_after_a_run(name, value, own_mmap):
    """After a CPU run (the thresholds raised, then given back): with nothing set in the environment, a 4 MiB block
    comes from the heap, as glibc's dynamic threshold serves it once large blocks have been freed; where the
    environment set a threshold (the dynamic one was off from the start) its values, and glibc's 128 KiB for those
    it left, hold again: the block is an mmap of its own. Run in a fresh process: in this one a free heap chunk left
    by earlier tests could serve the block whatever the thresholds."""
    import platform

    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        pytest.skip("glibc's allocator only")
    _mallinfo()  # skips here, not in the child, where glibc has no mallinfo2
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    if name is not None:
        env[name] = value
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import test_train as t; "
            "from electra_fast.train.trainer import _keep_freed_memory, _give_back_freed_memory; "
            "assert _keep_freed_memory(); _give_back_freed_memory(); print(t._is_own_mmap(4 << 20))")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(own_mmap)]


def _is_own_mmap(size: int) -> bool:
    """Whether glibc serves a block of ``size`` bytes by an mmap of its own."""
    before = _mallinfo()
    a = torch.empty(size, dtype=torch.uint8).fill_(1)
    grew = _mallinfo().hblkhd - before.hblkhd
    del a
    return grew >= size


def _mallinfo():
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def test_fp16_scheduler_steps_only_when_the_optimizer_did(env, tmp_path):
    """fp16: GradScaler skips the first steps (inf gradients at scale 65536); the warm-up must not advance then."""
    s = pretrain(env["data"], **_kw(env, tmp_path / "run", steps=8, warmup=4, precision="fp16"))
    st = ckpt.load_training_state(os.path.join(s["checkpoint"], "training_state.pt"))
    taken = {int(v["step"]) for v in st["optimizer"]["state"].values()}
    assert len(taken) == 1 and taken.pop() < 8  # the scaler did skip steps here (else this test proves nothing)
    assert st["scheduler"]["last_epoch"] == int(next(iter(st["optimizer"]["state"].values()))["step"])
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert lrs[0] == lrs[1] == pytest.approx(3e-3 / 4)  # step 1 skipped: step 2 is still the first warm-up step


def _fail_on_call(monkeypatch, n):
    """Make the model's n-th forward call raise (a step that fails: out of memory, a bad kernel...)."""
    from electra_fast.models import ElectraPretrainingModel
    forward, calls = ElectraPretrainingModel.forward, []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated failure")
        return forward(self, *a, **k)

    monkeypatch.setattr(ElectraPretrainingModel, "forward", failing)


def test_failed_first_step_leaves_nothing_that_refuses_a_rerun(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _fail_on_call(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated failure"):
        pretrain(env["data"], **_kw(env, out, steps=4, allow_nonempty_out=True))
    # run.json, metrics.jsonl, tensorboard/ taken back; so are the marker and the cache: the marker made the user's
    # folder count as a run's, so a later job skipped --allow-nonempty-out and wrote over a curves.png put there
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    monkeypatch.undo()
    (out / "curves.png").write_text("the user's plot")
    with pytest.raises(PretrainError, match="is not empty"):
        pretrain(env["data"], **_kw(env, out, steps=4))
    with pytest.raises(PretrainError, match="already has curves.png, not created by electra-fast"):
        pretrain(env["data"], **_kw(env, out, steps=4, allow_nonempty_out=True))
    assert (out / "curves.png").read_text() == "the user's plot"
    (out / "curves.png").unlink()
    assert pretrain(env["data"], **_kw(env, out, steps=4, allow_nonempty_out=True))["steps"] == 4  # no --resume


def test_failed_first_step_in_a_folder_of_its_own_keeps_the_cache(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fail_on_call(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated failure"):
        pretrain(env["data"], **_kw(env, out, steps=4))
    # the job made --out: it stays its own, with the content-keyed cache a retry reuses
    assert sorted(os.listdir(out)) == [".electra-fast-run", "cache"]
    monkeypatch.undo()
    assert pretrain(env["data"], **_kw(env, out, steps=4))["steps"] == 4


def test_failure_after_a_checkpoint_keeps_the_run(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fail_on_call(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated failure"):
        pretrain(env["data"], **_kw(env, out, steps=4, save_every=2))
    assert (out / "run.json").is_file() and sorted(_losses(out)) == [1, 2]
    assert [s for s, _ in ckpt.checkpoint_dirs(out / "checkpoints")] == [2]
    monkeypatch.undo()
    with pytest.raises(PretrainError, match="already holds a run"):
        pretrain(env["data"], **_kw(env, out, steps=4))
    assert pretrain(env["data"], **_kw(env, out, steps=4, resume=True))["steps"] == 4


def test_precision_auto_is_recorded_and_kept_on_resume(env, tmp_path, monkeypatch):
    from electra_fast import _cpu
    s = pretrain(env["data"], **_kw(env, tmp_path / "default", steps=1))
    assert s["precision"] == _cpu.default_precision(next(s["model"].parameters()).device)[0]
    monkeypatch.setattr(_cpu, "default_precision", lambda device: ("bf16", "a machine with native bf16"))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert pretrain(env["data"], **_kw(env, straight, steps=4, save_every=2, keep=5))["precision"] == "bf16"
    assert json.loads((straight / "run.json").read_text())["precision"] == "bf16"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    monkeypatch.setattr(_cpu, "default_precision", lambda device: ("fp32", "moved to a machine without it"))
    s = pretrain(env["data"], **_kw(env, resumed, steps=4, save_every=2, keep=5, resume=True))
    assert s["precision"] == "bf16"
    assert ckpt.load_training_state(os.path.join(s["checkpoint"], "training_state.pt"))["precision"] == "bf16"
    assert _losses(straight) == _losses(resumed)  # resumed in bf16, as the run was made: bit-identical


def test_resolve_precision_of_a_resumed_run(monkeypatch):
    from electra_fast import _cpu
    from electra_fast.train.options import resolve_precision
    monkeypatch.setattr(_cpu, "native_bf16", lambda: (True, "test"))  # no emulated-bf16 warning on any machine
    cpu, said = torch.device("cpu"), []
    assert resolve_precision("auto", cpu, {"scaler": {}, "precision": "bf16"}, said.append) == "bf16"
    assert resolve_precision("auto", cpu, {"scaler": {}}, said.append) == "fp32"  # older checkpoints: fp32 default
    assert resolve_precision("auto", cpu, {"scaler": {"scale": 2.0}}, said.append) == "fp16"  # ... or fp16
    assert said == []
    assert resolve_precision("fp32", cpu, {"scaler": {}, "precision": "bf16"}, said.append) == "fp32"  # explicit
    assert len(said) == 1 and "resuming a bf16 run" in said[0]
    # a bf16 run resumed on a CPU without native bf16: auto keeps bf16, and the warning says how to leave it (it
    # said "--precision auto picks fp32 on this CPU", which it had not)
    monkeypatch.setattr(_cpu, "native_bf16", lambda: (False, "ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN"))
    said.clear()
    assert resolve_precision("auto", cpu, {"scaler": {}, "precision": "bf16"}, said.append) == "bf16"
    assert len(said) == 1 and said[0].startswith("warning: resuming a bf16 run: ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN: "
                                                 "bf16 matrix products are emulated here") and said[0].endswith(
        "; --precision fp32 resumes it in fp32 (its losses then differ from an uninterrupted run's)")
    assert resolve_precision("bf16", cpu, None, said.append) == "bf16"
    assert said[-1].endswith("; --precision auto picks fp32 on this CPU")


BF16_CHILD = textwrap.dedent("""
    import json, os, sys
    from electra_fast import _cpu
    from electra_fast.cli import main
    print("native", _cpu.native_bf16()[0], file=sys.stderr, flush=True)
    common = sys.argv[1:]
    for precision in ("bf16", "auto"):
        out = os.path.join(os.environ["OUT"], precision)
        assert main(["pretrain", "--no-progress", "--precision", precision, "--out", out, *common]) == 0
        print("recorded", json.load(open(os.path.join(out, "run.json")))["precision"], file=sys.stderr, flush=True)
""")


def test_bf16_without_native_support_warns_once_and_auto_picks_fp32(env, tmp_path):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes a fresh process see a CPU without native bf16 (any x86 machine)."""
    common = ["--data", env["data"], "--tokenizer", env["tokenizer"], "--model", env["model"], "--seq-len", "32",
              "--batch-size", "2", "--steps", "1", "--threads", "1"]
    r = subprocess.run([sys.executable, "-c", BF16_CHILD, *common], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", OUT=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "native False" in lines and lines.count("recorded bf16") == 1 and lines.count("recorded fp32") == 1
    warnings_ = [line for line in lines if "warning" in line]
    assert len(warnings_) == 1, lines  # explicit bf16: one line, with the cost; auto: none
    assert warnings_[0].startswith("warning: --precision bf16: ONEDNN_MAX_CPU_ISA=AVX2") and "91 s" in warnings_[0]


SLOW_CHILD = textwrap.dedent("""
    import os, sys, time
    from electra_fast.models import ElectraPretrainingModel
    from electra_fast.train import checkpoint
    forward, save_model = ElectraPretrainingModel.forward, checkpoint.save_model

    def slow_forward(self, *a, **k):  # a long step: room for two Ctrl-C inside it
        time.sleep(float(os.environ["STEP_S"]))
        return forward(self, *a, **k)

    def slow_save(model, path):  # a long checkpoint write, announced by a marker file
        open(os.environ["SAVING"], "w").close()
        time.sleep(float(os.environ["SAVE_S"]))
        save_model(model, path)

    ElectraPretrainingModel.forward, checkpoint.save_model = slow_forward, slow_save
    from electra_fast.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _interrupt_twice(env, tmp_path, step_s, save_s, second_when):
    out, saving = tmp_path / "run", tmp_path / "saving"
    cmd = [sys.executable, "-c", SLOW_CHILD, "pretrain", "--no-progress", "--data", env["data"], "--tokenizer",
           env["tokenizer"], "--model", env["model"], "--seq-len", "32", "--batch-size", "2", "--steps", "1000",
           "--log-every", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, STEP_S=str(step_s), SAVE_S=str(save_s), SAVING=str(saving)))
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and _losses(out)):  # step 1 done: step 2 is sleeping now
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    first = time.time()
    while not second_when(saving, time.time() - first):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr, out


def test_second_ctrl_c_during_a_step_stops_without_a_checkpoint_or_traceback(env, tmp_path):
    code, stdout, stderr, out = _interrupt_twice(env, tmp_path, step_s=2.0, save_s=0.0,
                                                 second_when=lambda _, since_first: since_first > 0.3)
    assert code == 130 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == "electra-fast pretrain: interrupted again: stopping without a checkpoint"
    assert "SIGINT: finishing this step, then saving a checkpoint" in stderr
    assert not ckpt.checkpoint_dirs(out / "checkpoints") and not (out / "run.json").exists()  # a rerun may start


def test_second_ctrl_c_while_the_checkpoint_is_written_waits_for_it(env, tmp_path):
    code, stdout, stderr, out = _interrupt_twice(env, tmp_path, step_s=0.5, save_s=1.5,
                                                 second_when=lambda saving, _: saving.exists())
    assert code == 130 and "Traceback" not in stderr and "interrupted again" not in stderr, stderr
    assert "interrupted by SIGINT" in stdout
    steps = ckpt.checkpoint_dirs(out / "checkpoints")
    assert len(steps) == 1 and ckpt.verify(steps[0][1]) is None and steps[0][0] == max(_losses(out))


def test_default_corpus_ignores_what_other_libraries_add_to_the_standard_library(monkeypatch):
    """transformers sets documented methods on logging.Logger at import: the embedded corpus (and so every default
    run's tokens and results) must not depend on whether the process imported it first."""
    import logging
    from electra_fast.train.corpus import documents
    before = documents()

    def warning_once(self, *args):
        """This method is identical to logger.warning(), but will emit the warning with the same message only once."""
    warning_once.__module__ = "somelib.utils.logging"
    monkeypatch.setattr(logging.Logger, "warning_once", warning_once, raising=False)
    assert documents() == before
