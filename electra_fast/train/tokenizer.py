"""Tokenizers for pretraining: train one of three families on the corpus, or load an existing one.

  wordpiece  ELECTRA / BERT: lower-cased WordPiece (``##`` continuations), ``[CLS] x [SEP]``
  bpe        RoBERTa: byte-level BPE (``Ġ`` marks a preceding space), ``<s> x </s>``
  unigram    DeBERTa-v3: SentencePiece-style Unigram (``▁`` Metaspace pieces, cased), ``[CLS] x [SEP]``

Everything goes through the ``tokenizers`` library (no transformers needed): ``tokenizer.json`` files,
transformers tokenizer directories (``tokenizer.json`` inside, or a BERT ``vocab.txt``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Union

from .._files import utf8_path
from .._validate import reason
from .errors import PretrainError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_TYPES = ("wordpiece", "bpe", "unigram")
# the papers' vocabularies: BERT / ELECTRA uncased WordPiece, RoBERTa's GPT-2 BPE, DeBERTa-v3's SentencePiece
DEFAULT_VOCAB = {"wordpiece": 30522, "bpe": 50265, "unigram": 128000}
# the largest --vocab-size: the trainers allocate per entry up front (5e9 aborted in Rust asking for 283 GB), and
# 2**24 is 64x the largest vocabularies in use (Gemma's 256 k)
MAX_VOCAB = 2 ** 24
# RoBERTa's and DeBERTa-v3's special tokens and ids ([MASK] is DeBERTa-v3's last id, added after training)
_BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_UNIGRAM_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
_BYTES = 256  # byte-level BPE keeps the whole byte alphabet
# tokenizers' trainers take time quadratic in a run of characters without whitespace (WordPiece 2 s at 100 k, no end
# in 300 s at 1 M) and the Unigram trainer segfaults on one of ~150 k: the trainers see such runs cut into pieces of
# this many characters (text without spaces, as Chinese, keeps its statistics; encoding reads the text as it is).
# A run ends only at what every kind's normaliser and pre-tokeniser splits on (ASCII space, tab, line breaks and the
# Unicode spaces NFKC makes a space: no-break, en / em / thin..., ideographic): Python's \s also counts \v,
# \x1c-\x1f and \x85, which the Unigram normaliser deletes or keeps inside a word (300 k CJK characters joined by
# \v: segfault)
TRAIN_RUN = 1000
_LONG_RUN = re.compile(r"[^ \t\n\r\xa0\u2000-\u200a\u202f\u205f\u3000]{%d,}" % (TRAIN_RUN + 1))
# token spellings per role, BERT / DeBERTa first, then RoBERTa / SentencePiece
_ROLES = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>"),
          "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>")}


def min_vocab(kind: str) -> int:
    """The smallest vocabulary a ``kind`` tokenizer can have: its special tokens (+ the byte alphabet) + 1."""
    return len(SPECIAL_TOKENS) + 1 + (_BYTES if kind == "bpe" else 0)


def train_tokenizer(kind: str, documents, vocab_size: int):
    """Train a ``kind`` (one of TOKENIZER_TYPES) tokenizer of ``vocab_size`` entries: fewer when the corpus has
    fewer pieces to give, more (WordPiece) or an error (Unigram) when its characters alone need more.
    Deterministic: the same documents give a byte-identical tokenizer."""
    if kind not in TOKENIZER_TYPES:
        raise PretrainError(f"--tokenizer-type: expected one of {', '.join(TOKENIZER_TYPES)}, got {kind!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < min_vocab(kind):
        extra = f" ({len(SPECIAL_TOKENS)} special tokens + the 256 bytes + 1)" if kind == "bpe" else ""
        raise PretrainError(f"--vocab-size: a {kind} tokenizer needs an int >= {min_vocab(kind)}{extra}, "
                            f"got {vocab_size!r}")
    train = {"wordpiece": train_wordpiece, "bpe": _train_bpe, "unigram": _train_unigram}[kind]
    return train(_bounded_runs(documents), vocab_size)


def _bounded_runs(documents) -> Callable[[], Iterable[str]]:
    """``documents`` (replayable) with every run of more than TRAIN_RUN characters between spaces (see _LONG_RUN)
    cut into pieces."""
    docs = _replayable(documents)

    def cut(m) -> str:
        run = m.group()
        return " ".join(run[i:i + TRAIN_RUN] for i in range(0, len(run), TRAIN_RUN))

    return lambda: (_LONG_RUN.sub(cut, d) if len(d) > TRAIN_RUN else d for d in docs())


def tokenizer_type(tok) -> str:
    """The family of a loaded tokenizer (from its model): wordpiece, bpe or unigram (else the model's name)."""
    name = type(tok.model).__name__.lower()
    return {"wordpiece": "wordpiece", "bpe": "bpe", "unigram": "unigram"}.get(name, name)


def _replayable(documents):
    """A function returning a fresh iterable of ``documents`` (a list, or already such a function)."""
    if callable(documents):
        return documents
    kept = documents if isinstance(documents, (list, tuple)) else list(documents)
    return lambda: kept


def _train_bpe(documents, vocab_size: int):
    """RoBERTa's byte-level BPE (GPT-2 pre-tokenisation, no prefix space, no lower-casing), specials
    <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4. Deterministic as trained: the initial alphabet is sorted and merge
    ties are broken by the pair's ids, which follow it (there is no continuation prefix to number)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(_BPE_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_replayable(documents)(), trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=False)
    return tok


def _train_unigram(documents, vocab_size: int):
    """DeBERTa-v3's SentencePiece Unigram: NFKC, runs of spaces collapsed, Metaspace ``▁`` word pieces, cased;
    [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, the pieces, then [MASK] as the last id.

    The Rust trainer sums its EM statistics in hash-map order (scores differ by ~1e-11 between runs) and gives
    the required characters it had to add scores ``min + k * 1e-4`` in hash-set order, so its output varies
    from run to run. :func:`_canonical_unigram` removes both."""
    from tokenizers import Tokenizer, Regex, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - 1, special_tokens=list(_UNIGRAM_SPECIALS),
                                      unk_token="[UNK]", show_progress=False)
    try:
        tok.train_from_iterator(_replayable(documents)(), trainer)
    except PretrainError:  # a bad input line, raised by the document reader through the Rust trainer
        raise
    except Exception as e:  # the Rust trainer's refusal ("... not large enough to contain all chars"): one line
        raise PretrainError(f"--vocab-size: {vocab_size} is too small for a unigram vocabulary of this corpus "
                            f"(it holds every character): {str(e).splitlines()[0]}") from None
    if tok.get_vocab_size() <= len(_UNIGRAM_SPECIALS):  # nothing but the special tokens: no text was read
        raise PretrainError("--data: no text found to train a tokenizer on")
    tok = _canonical_unigram(tok)
    tok.add_special_tokens(["[MASK]"])
    _add_post_processor(tok)
    return tok


def _canonical_unigram(tok, grid: float = 1e-4):
    """The trained Unigram with run-independent scores and ids: the characters on the trainer's
    ``min + k * 1e-4`` ladder all get the minimum score; every score is rounded to ``grid`` (far above the
    EM's ~1e-11 summation noise; pieces closer than that in log-probability were tied for practical
    purposes); pieces follow the special tokens by descending score, ties by piece."""
    from tokenizers import Tokenizer
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    n_special = len(_UNIGRAM_SPECIALS)
    pieces = vocab[n_special:]
    low = min(score for _, score in pieces)
    step = 1e-4  # the trainer's min_score_penalty_delta

    def on_ladder(piece, score):
        k = (score - low) / step
        return len(piece) == 1 and abs(k - round(k)) < 1e-6 and round(k) < len(pieces)

    pieces = [(p, low if on_ladder(p, s) else s) for p, s in pieces]
    pieces = sorted(((p, round(round(s / grid) * grid, 6)) for p, s in pieces), key=lambda ps: (-ps[1], ps[0]))
    state["model"]["vocab"] = vocab[:n_special] + [[p, s] for p, s in pieces]
    state["model"]["unk_id"] = _UNIGRAM_SPECIALS.index("[UNK]")
    return Tokenizer.from_str(json.dumps(state))


def train_wordpiece(documents: Union[Iterable[str], Callable[[], Iterable[str]]], vocab_size: int = 30522,
                    min_frequency: int = 2):
    """WordPiece with BERT's normaliser (lower-casing, accents stripped) and pre-tokeniser, special tokens
    [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, trained on ``documents`` (strings) with the Rust trainer.

    Deterministic: the same documents give a byte-identical tokenizer. The Rust trainer numbers the ``##x``
    continuation pieces in the order it walks a hash map of words (a new random order per map, whatever the
    thread count), and ties between equally frequent merges are broken by those numbers, so its vocabulary
    varies from run to run. A first pass (``vocab_size=1``: no merges) collects the continuation pieces, which
    the real pass then receives, sorted, as fixed entries right after the special tokens. ``documents`` is read
    twice: pass a function returning a fresh iterable to stream a large corpus (an iterator is kept in memory).
    """
    from tokenizers import Tokenizer, models, trainers
    if not isinstance(vocab_size, int) or vocab_size < len(SPECIAL_TOKENS) + 1:
        raise PretrainError(f"--vocab-size: expected an int > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    documents = _replayable(documents)

    def train(size: int, fixed: List[str]):
        tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100)))
        trainer = trainers.WordPieceTrainer(vocab_size=size, min_frequency=min_frequency,
                                            special_tokens=SPECIAL_TOKENS + fixed, show_progress=False,
                                            continuing_subword_prefix="##")
        tok.train_from_iterator(documents(), trainer)
        return tok.get_vocab(with_added_tokens=False)

    pieces = sorted(t for t in train(1, []) if t.startswith("##") and t not in SPECIAL_TOKENS)
    vocab = train(vocab_size, pieces)
    # rebuilt from the vocabulary: the fixed pieces are ordinary entries, not added (special) tokens
    tok = _bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    _add_post_processor(tok)
    return tok


def _bert_pipeline(tok):
    from tokenizers import decoders, normalizers, pre_tokenizers
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _add_post_processor(tok) -> None:
    """[CLS] A [SEP] (and [CLS] A [SEP] B [SEP]) so the exported tokenizer encodes like BERT's."""
    from tokenizers import processors
    ids = special_ids(tok)
    cls, sep = tok.id_to_token(ids["cls"]), tok.id_to_token(ids["sep"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, ids["cls"]), (sep, ids["sep"])])


def load_tokenizer(path: str, configured: bool = True):
    """A ``tokenizer.json`` file, or a directory holding ``tokenizer.json``, a WordPiece ``vocab.txt`` or RoBERTa's
    ``vocab.json`` + ``merges.txt``. ``configured``: a folder's tokenizer.json read as transformers reads it
    (:func:`_as_configured`); False: as the file says (how runs before 2026-12-06 read it, for their resume check)."""
    from tokenizers import Tokenizer
    path = os.fspath(path)
    file = path
    if os.path.basename(path) == "vocab.txt" and os.path.isfile(path):  # the file, not its folder: read alike
        return _from_vocab_txt(path, os.path.dirname(path) or ".")
    if os.path.isdir(path):
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            vocab = os.path.join(path, "vocab.txt")
            if os.path.isfile(vocab):
                return _from_vocab_txt(vocab, path)
            if all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
                return _from_bpe_files(path)
            raise PretrainError(f"--tokenizer: {path} holds neither tokenizer.json, vocab.txt nor vocab.json + "
                                "merges.txt")
    if not os.path.isfile(file):
        raise PretrainError(f"--tokenizer: no such file or directory: {path}")
    try:
        with open(file, encoding="utf-8") as f:  # not from_file: the Rust side takes UTF-8 paths only
            tok = Tokenizer.from_str(f.read())
    except Exception as e:  # the Rust error is one line already
        raise PretrainError(f"--tokenizer: cannot read {file}: {reason(e)} (expected a tokenizer.json, a WordPiece "
                            "vocab.txt, or a folder holding one or RoBERTa's vocab.json + merges.txt)") from None
    special_ids(tok, where=file)  # fail now, not after tokenising the corpus
    if os.path.isdir(path) and configured:
        _as_configured(tok, path)
    # a saved truncation would cut every document, a saved padding fill the token stream with [PAD] (hub files often
    # carry them); callers that want either set it themselves (fine-tuning does)
    tok.no_truncation()
    tok.no_padding()
    return tok


def _tokenizer_config(directory: str) -> dict:
    """A tokenizer folder's ``tokenizer_config.json`` ({} without one)."""
    cfg = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return {}
    try:
        with open(cfg, encoding="utf-8") as f:
            settings = json.load(f)
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise PretrainError(f"--tokenizer: cannot read {cfg}: {e}") from None
    return settings


def _bert_normalizer(settings: dict):
    """The BertNormalizer transformers' BERT-family tokenizers build from their config (its defaults when a key is
    absent; strip_accents None: as lowercase)."""
    from tokenizers import normalizers
    strip = settings.get("strip_accents")
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=bool(settings.get("tokenize_chinese_chars",
                                                                                             True)),
                                      strip_accents=None if strip is None else bool(strip),
                                      lowercase=bool(settings.get("do_lower_case", True)))


# transformers' tokenizer classes (without "Fast") that build their pipeline from tokenizer_config.json around the
# vocabulary tokenizer.json holds, and the class AutoTokenizer takes from config.json's model_type without one
_BERT_CLASSES = {"BertTokenizer", "ElectraTokenizer", "DistilBertTokenizer", "MobileBertTokenizer",
                 "SqueezeBertTokenizer", "LayoutLMTokenizer", "FunnelTokenizer", "LxmertTokenizer", "ConvBertTokenizer",
                 "RetriBertTokenizer", "DPRQuestionEncoderTokenizer", "DPRContextEncoderTokenizer", "DPRReaderTokenizer"}
# (Blenderbot is not one: it defaults to add_prefix_space=True and keeps the file's post-processor)
_ROBERTA_CLASSES = {"RobertaTokenizer", "LongformerTokenizer", "BartTokenizer", "LEDTokenizer"}
_MODEL_TYPES = {"bert": "BertTokenizer", "electra": "ElectraTokenizer", "distilbert": "DistilBertTokenizer",
                "mobilebert": "MobileBertTokenizer", "squeezebert": "SqueezeBertTokenizer", "layoutlm": "LayoutLMTokenizer",
                "funnel": "FunnelTokenizer", "lxmert": "LxmertTokenizer", "convbert": "ConvBertTokenizer",
                "dpr": "DPRQuestionEncoderTokenizer", "roberta": "RobertaTokenizer", "longformer": "LongformerTokenizer",
                "bart": "BartTokenizer", "led": "LEDTokenizer"}


def _tokenizer_class(directory: str, settings: dict) -> str:
    """The transformers class AutoTokenizer builds for ``directory``: tokenizer_config.json's ``tokenizer_class``,
    else the one of config.json's ``model_type`` ("" when neither names one)."""
    kind = settings.get("tokenizer_class")
    if not kind:
        try:
            with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
                kind = _MODEL_TYPES.get(json.load(f).get("model_type"), "")
        except (OSError, ValueError, AttributeError):
            kind = ""
    return str(kind).removesuffix("Fast")


def _as_configured(tok, directory: str) -> None:
    """``tok`` (a folder's tokenizer.json) with the pipeline transformers' class builds around its vocabulary from
    the folder's config (in place): a BERT-family class's normalizer (lower-casing, accents, Chinese characters, the
    class defaults for absent keys), BERT pre-tokenizer and [CLS] / [SEP] template; a RoBERTa-family class's
    byte-level ``add_prefix_space`` and ``<s> A </s></s> B </s>`` (``trim_offsets``). AutoTokenizer follows these, so
    reading tokenizer.json alone gave other ids ("The Quick" cased against an uncased config). Nothing changes for
    other classes (``PreTrainedTokenizerFast``: this project's exports) or a vocabulary of another kind."""
    settings = _tokenizer_config(directory)
    kind, model = _tokenizer_class(directory, settings), type(tok.model).__name__
    if kind in _BERT_CLASSES and model == "WordPiece":
        _bert_class_pipeline(tok, settings)
    elif kind in _ROBERTA_CLASSES and model == "BPE":
        _roberta_class_pipeline(tok, settings)


def _bert_class_pipeline(tok, settings: dict) -> None:
    """transformers' BertTokenizer around ``tok``'s WordPiece vocabulary: normalizer from ``settings``, BERT
    pre-tokenizer, ``[CLS] A [SEP] B [SEP]``."""
    from tokenizers import decoders, pre_tokenizers
    tok.normalizer = _bert_normalizer(settings)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    _add_post_processor(tok)


def _roberta_class_pipeline(tok, settings: dict) -> None:
    """transformers' RobertaTokenizer around ``tok``'s byte-level BPE: ``add_prefix_space`` / ``trim_offsets`` from
    ``settings``, ``<s> A </s></s> B </s>``."""
    from tokenizers import decoders, pre_tokenizers, processors
    prefix = bool(settings.get("add_prefix_space", False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    tok.decoder = decoders.ByteLevel()
    ids = special_ids(tok)
    tok.post_processor = processors.RobertaProcessing(
        (tok.id_to_token(ids["sep"]), ids["sep"]), (tok.id_to_token(ids["cls"]), ids["cls"]),
        trim_offsets=bool(settings.get("trim_offsets", True)), add_prefix_space=prefix)


def _wordpiece_vocab(vocab: str):
    if utf8_path(vocab):  # else read by Python: tokenizers' Rust side takes UTF-8 paths only
        return vocab
    with open(vocab, encoding="utf-8") as f:  # as WordPiece.read_file reads it: a line's id is its number
        return {line.rstrip(): i for i, line in enumerate(f)}


def _bpe_model(vocab: str, merges: str):
    from tokenizers import models
    if utf8_path(vocab) and utf8_path(merges):
        return models.BPE.from_file(vocab, merges)
    with open(vocab, encoding="utf-8") as f:  # as BPE.read_file reads them
        table = json.load(f)
    with open(merges, encoding="utf-8") as f:
        pairs = [line.rstrip("\r\n").split(" ") for line in f if not line.startswith("#version")]
    bad = next((i for i, p in enumerate(pairs, 1) if len(p) != 2), None)
    if bad is not None:
        raise ValueError(f"merges.txt: line {bad} is not two tokens")
    return models.BPE(table, [tuple(p) for p in pairs])


def _from_vocab_txt(vocab: str, directory: str):
    from tokenizers import Tokenizer, models
    try:
        source = _wordpiece_vocab(vocab)
        tok = Tokenizer(models.WordPiece.from_file(source, unk_token="[UNK]") if isinstance(source, str)
                        else models.WordPiece(source, unk_token="[UNK]"))
        with open(vocab, encoding="utf-8") as f:
            first: Dict[str, int] = {}
            for line, token in enumerate(f, 1):
                token = token.rstrip()  # as WordPiece.read_file keys it ("the " is "the")
                if first.setdefault(token, line) != line:  # an id is a line number: a repeat leaves a hole
                    raise PretrainError(f"--tokenizer: {vocab} line {line} repeats line {first[token]} ({token!r}); "
                                        "each token once (its line number is its id)")
    except PretrainError:
        raise
    except Exception as e:
        raise PretrainError(f"--tokenizer: cannot read {vocab}: {e}") from None
    special_ids(tok, where=vocab)
    _bert_class_pipeline(tok, _tokenizer_config(directory))  # as transformers' BertTokenizer reads the folder
    return tok


def _from_bpe_files(directory: str):
    """A RoBERTa-style folder (``vocab.json`` + ``merges.txt``, what ``save_model`` of a byte-level BPE writes): the
    pipeline transformers' RobertaTokenizer builds (byte-level, ``add_prefix_space`` / ``trim_offsets`` from the
    config, ``<s> A </s></s> B </s>``)."""
    from tokenizers import Tokenizer
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    settings = _tokenizer_config(directory)
    kind = _tokenizer_class(directory, settings)
    if kind and kind not in _ROBERTA_CLASSES:  # another class builds another pipeline (GPT-2: no <s> ... </s>)
        raise PretrainError(f"--tokenizer: {directory} is a {kind} folder; vocab.json + merges.txt are read for "
                            "RoBERTa-family classes only (save it as tokenizer.json to use it)")
    try:
        tok = Tokenizer(_bpe_model(vocab, merges))
    except Exception as e:
        raise PretrainError(f"--tokenizer: cannot read {vocab} + {merges}: {reason(e)}") from None
    special_ids(tok, where=vocab)
    _roberta_class_pipeline(tok, settings)
    return tok


def special_ids(tok, where: str = "tokenizer") -> Dict[str, int]:
    """{"pad", "unk", "cls", "sep", "mask"} -> id; every role must exist in the vocabulary."""
    out = {}
    for role, spellings in _ROLES.items():
        for s in spellings:
            i = tok.token_to_id(s)
            if i is not None:
                out[role] = int(i)
                break
        else:
            raise PretrainError(f"--tokenizer: {where} has no {role} token (looked for {' / '.join(spellings)})")
    return out


def with_special_tokens(tok):
    """``tok`` with its five special tokens registered as special added tokens (in place; ids unchanged): text that
    spells one then encodes to its id, as transformers' tokenizers and the exports read it. A ``vocab.txt``
    WordPiece registers none, so fine-tuning split "[SEP]" in a review into "[", "sep", "]" where the export gave
    the [SEP] id. (Pretraining text reads such spellings as text: :func:`encode_documents`.)"""
    ids = special_ids(tok)
    tok.add_special_tokens([tok.id_to_token(i) for i in ids.values()])
    return tok


def embedding_rows(tok) -> int:
    """The rows a model's embeddings need for every id ``tok`` gives: its largest id + 1. That is its vocabulary
    size unless its ids have holes (a tokenizer.json's table may skip ids), where sizing by the token count
    failed at the first batch holding a high id, perhaps hours into a run."""
    return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def config_overrides(tok) -> dict:
    """ElectraConfig fields taken from the tokenizer: vocabulary size (:func:`embedding_rows`), special ids, and
    the ids in its holes as ``disallowed_sample_ids`` (rows no text yields: neither masking's random replacements
    nor the generator draw them)."""
    ids = special_ids(tok)
    rows, used = embedding_rows(tok), set(tok.get_vocab(with_added_tokens=True).values())
    if rows > MAX_VOCAB:  # one stray id of 10**9 sized a billion-row table
        raise PretrainError(f"--tokenizer: its ids run to {rows - 1}; a model here has at most {MAX_VOCAB} embedding "
                            "rows")
    out = dict(vocab_size=rows, pad_token_id=ids["pad"], unk_token_id=ids["unk"], cls_token_id=ids["cls"],
               sep_token_id=ids["sep"], mask_token_id=ids["mask"])
    if len(used) < rows:
        out["disallowed_sample_ids"] = tuple(i for i in range(rows) if i not in used)
    return out


def fingerprint(tok) -> str:
    """sha256 of the tokenizer's canonical JSON: keys the token cache, checked on resume."""
    import hashlib
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def write_tokenizer(tok, path: str) -> None:
    """``tok.save(path)``'s file (pretty JSON), written by Python: tokenizers' own save takes UTF-8 paths only, and a
    POSIX file name may hold any bytes (Python's str holds them as surrogates)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(tok.to_str(pretty=True))


def save_for_transformers(tok, directory: str, model_max_length: int = 512) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``: what
    ``transformers.AutoTokenizer.from_pretrained`` needs (as ``PreTrainedTokenizerFast``)."""
    os.makedirs(directory, exist_ok=True)
    write_tokenizer(tok, os.path.join(directory, "tokenizer.json"))
    ids = special_ids(tok)
    names = {f"{role}_token": tok.id_to_token(i) for role, i in ids.items()}
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(names, f, indent=2)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        # model_input_names: PreTrainedTokenizerFast returns no token_type_ids by default, so a sentence pair's
        # second sentence would run as type 0 in the exported model (BERT-family and DeBERTa read the types)
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                   "model_input_names": ["input_ids", "token_type_ids", "attention_mask"], **names}, f, indent=2)


def has_word_boundaries(tok) -> bool:
    """Whether ``tok`` marks words: its pre-tokeniser splits the text into words (BERT's punctuation and space
    split, byte-level BPE's GPT-2 split, Metaspace's ``▁`` split), which ``Encoding.word_ids`` then reports.
    Without one the whole document is one "word"; so with one that never splits (``Metaspace(split=False)``, as
    transformers' Llama-style converters write, or ``ByteLevel(use_regex=False)``): asked of the text itself."""
    if tok.pre_tokenizer is None:
        return False
    words = tok.pre_tokenizer.pre_tokenize_str("two words")
    return len(words) >= 2


def word_starts(word_ids) -> List[int]:
    """1 where a token starts a word (its word id differs from the previous token's), else 0: a WordPiece
    ``##`` piece, or a Unigram piece without the ``▁`` marker, continues the word before it."""
    return [1 if i == 0 or w is None or w != word_ids[i - 1] else 0 for i, w in enumerate(word_ids)]


# byte-level BPE's spellings of the ASCII whitespace bytes \t \n \v \f \r and space (byte b -> chr(256 + b))
_BYTE_LEVEL_SPACE = frozenset(chr(256 + b) for b in (9, 10, 11, 12, 13, 32))
_BYTE_LEVEL_BREAK = _BYTE_LEVEL_SPACE - {chr(256 + 32)}  # the same but the space: line breaks and tabs


def byte_level(tok) -> bool:
    """Whether ``tok`` is byte-level (GPT-2 / RoBERTa BPE): its pre-tokeniser spells a space as ``Ġ``."""
    return tok.pre_tokenizer is not None and any(
        w.startswith("\u0120") for w, _ in tok.pre_tokenizer.pre_tokenize_str("a b"))


def space_word_starts(tokens, after_space: bool = False) -> List[int]:
    """Word starts of byte-level BPE pieces: a word is a run of text after ASCII whitespace, as fairseq's RoBERTa
    whole-word masking reads it (a piece starting with ``Ġ`` starts one: a lone ``Ġ`` before ``ð Ł ĺ Ģ``, an emoji
    the vocabulary has no merge with the space for, is that word's first piece); a piece after a line break or tab
    starts one as well. The GPT-2 pre-tokens (``word_ids``) split more finely: at an apostrophe (didn / 't), between
    letters and digits (item / 42) and at combining marks, so a word would have been masked in part.
    ``after_space``: the 2026-12-06 reading, which also started a word after a piece ending in a space (the lone
    ``Ġ`` then was a word of its own, masked apart from the rest)."""
    after = _BYTE_LEVEL_SPACE if after_space else _BYTE_LEVEL_BREAK
    return [1 if i == 0 or t[:1] in _BYTE_LEVEL_SPACE or tokens[i - 1][-1:] in after else 0
            for i, t in enumerate(tokens)]


# How pretraining text becomes ids and word starts. A rule that changed keeps its old reading for the runs tokenised
# under it: per rule, its readings (the current one first, the one runs checkpointed before the rule was recorded used
# last) and which tokenizers it concerns.
#   bpe_words: a byte-level BPE's word starts, "leading-space" (space_word_starts), "whitespace" (space_word_starts
#     with after_space; 2026-12-06 to 2026-12-07) or "pre-tokens" (the GPT-2 pre-tokens' word_ids; before 2026-12-06);
#   unigram_specials: a Unigram model holding special tokens as pieces ([PAD] [CLS] [SEP] [UNK], as DeBERTa-v3's and
#     the run's own Unigram do) reads their spellings in the text as "text", or segments them into the special ids,
#     "pieces" (before 2026-12-06).
TEXT_RULES = {"bpe_words": ("leading-space", "whitespace", "pre-tokens"), "unigram_specials": ("text", "pieces")}


@dataclass(frozen=True)
class TextRules:
    """The readings of :data:`TEXT_RULES` a run tokenises with: a new run the current ones, a resumed run its
    checkpoint's (its data digest covers the ids and start bits they give)."""
    bpe_words: str = TEXT_RULES["bpe_words"][0]
    unigram_specials: str = TEXT_RULES["unigram_specials"][0]

    def __post_init__(self):
        for name, readings in TEXT_RULES.items():
            if getattr(self, name) not in readings:
                raise ValueError(f"{name}: expected one of {readings}, got {getattr(self, name)!r}")

    @classmethod
    def of_checkpoint(cls, state: Union[dict, None]) -> "TextRules":
        """A checkpoint's rules (``None``: a new run); a rule it does not record predates the recording."""
        if state is None:
            return cls()
        return cls(**{name: state.get(name, readings[-1]) for name, readings in TEXT_RULES.items()})

    def recorded(self, tok) -> Dict[str, str]:
        """What a checkpoint records: the rules that concern ``tok``."""
        concerns = {"bpe_words": byte_level(tok), "unigram_specials": bool(special_pieces(tok))}
        return {name: getattr(self, name) for name in TEXT_RULES if concerns[name]}

    def cache_suffix(self, tok) -> str:
        """The cache key's part: the rules that concern ``tok`` and changed (a cache of the old readings keeps the
        key it was written under)."""
        return "".join(f";{name.replace('_', '-')}={value}" for name, value in self.recorded(tok).items()
                       if value != TEXT_RULES[name][-1])


def special_pieces(tok) -> set:
    """The special tokens' spellings that ``tok``'s Unigram model also holds as pieces (empty for other models)."""
    if type(tok.model).__name__ != "Unigram":
        return set()
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    return {s for s in specials if tok.model.token_to_id(s) is not None}


def _text_only(tok):
    """``tok``, or a copy whose Unigram model does not segment text into its special pieces: they are renamed to
    spellings ordinary text never holds (U+FFFF, a Unicode noncharacter, around them: text that spells those exact
    characters would still reach them); ids, scores and every other piece are unchanged."""
    pieces = special_pieces(tok)
    if not pieces:
        return tok
    from tokenizers import Tokenizer
    data = json.loads(tok.to_str())
    for entry in data["model"]["vocab"]:
        if entry[0] in pieces:
            entry[0] = f"\uffff{entry[0]}\uffff"
    return Tokenizer.from_str(json.dumps(data))


def encode_documents(tok, docs: Iterable[str], batch: int = 1024, rules: TextRules = TextRules()):
    """Yield ``(ids, word_starts)`` per document (no special tokens), through the multi-threaded batch API, read
    with ``rules``.

    A special token's spelling in the text ("<s>struck</s>" in HTML, a literal "[MASK]" or "[SEP]") is text:
    tokenizers would otherwise give it the special id (a [SEP] that splits the document, a [PAD] attended mid-row,
    an unlabelled [MASK])."""
    if not isinstance(rules, TextRules):
        raise TypeError(f"rules: expected a TextRules, got {type(rules).__name__}")
    if rules.unigram_specials == "text":
        tok = _text_only(tok)
    by_space = rules.bpe_words != "pre-tokens" and byte_level(tok)
    after_space = rules.bpe_words == "whitespace"
    starts = (lambda e: space_word_starts(e.tokens, after_space)) if by_space else (lambda e: word_starts(e.word_ids))
    was = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        buf = []
        for d in docs:
            buf.append(d)
            if len(buf) == batch:
                yield from ((e.ids, starts(e)) for e in tok.encode_batch(buf, add_special_tokens=False))
                buf = []
        if buf:
            yield from ((e.ids, starts(e)) for e in tok.encode_batch(buf, add_special_tokens=False))
    finally:
        tok.encode_special_tokens = was
