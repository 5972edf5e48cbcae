"""Tokenizers for pretraining: train a BERT-style WordPiece on the corpus, or load an existing one.

Everything goes through the ``tokenizers`` library (no transformers needed): ``tokenizer.json`` files,
transformers tokenizer directories (``tokenizer.json`` inside, or a BERT ``vocab.txt``).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterable, List, Union

from .errors import PretrainError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# token spellings per role, BERT / DeBERTa first, then RoBERTa / SentencePiece
_ROLES = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>"),
          "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>")}


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
    if not callable(documents):
        kept = documents if isinstance(documents, (list, tuple)) else list(documents)

        def documents():
            return kept

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


def load_tokenizer(path: str):
    """A ``tokenizer.json`` file, or a directory holding ``tokenizer.json`` or a WordPiece ``vocab.txt``."""
    from tokenizers import Tokenizer
    path = os.fspath(path)
    file = path
    if os.path.isdir(path):
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            vocab = os.path.join(path, "vocab.txt")
            if os.path.isfile(vocab):
                return _from_vocab_txt(vocab, path)
            raise PretrainError(f"--tokenizer: {path} holds neither tokenizer.json nor vocab.txt")
    if not os.path.isfile(file):
        raise PretrainError(f"--tokenizer: no such file or directory: {path}")
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:  # the Rust error is one line already
        raise PretrainError(f"--tokenizer: cannot read {file}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    special_ids(tok, where=file)  # fail now, not after tokenising the corpus
    return tok


def _from_vocab_txt(vocab: str, directory: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    lower = True
    cfg = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as f:
                lower = bool(json.load(f).get("do_lower_case", True))
        except (OSError, ValueError) as e:
            raise PretrainError(f"--tokenizer: cannot read {cfg}: {e}") from None
    try:
        tok = Tokenizer(models.WordPiece.from_file(vocab, unk_token="[UNK]"))
    except Exception as e:
        raise PretrainError(f"--tokenizer: cannot read {vocab}: {e}") from None
    tok.normalizer = normalizers.BertNormalizer(lowercase=lower, strip_accents=lower)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    special_ids(tok, where=vocab)
    _add_post_processor(tok)
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


def config_overrides(tok) -> Dict[str, int]:
    """ElectraConfig fields taken from the tokenizer: vocabulary size and special ids."""
    ids = special_ids(tok)
    return dict(vocab_size=int(tok.get_vocab_size(with_added_tokens=True)), pad_token_id=ids["pad"],
                unk_token_id=ids["unk"], cls_token_id=ids["cls"], sep_token_id=ids["sep"],
                mask_token_id=ids["mask"])


def fingerprint(tok) -> str:
    """sha256 of the tokenizer's canonical JSON: keys the token cache, checked on resume."""
    import hashlib
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def save_for_transformers(tok, directory: str, model_max_length: int = 512) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``: what
    ``transformers.AutoTokenizer.from_pretrained`` needs (as ``PreTrainedTokenizerFast``)."""
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    ids = special_ids(tok)
    names = {f"{role}_token": tok.id_to_token(i) for role, i in ids.items()}
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(names, f, indent=2)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                   **names}, f, indent=2)


def encode_documents(tok, docs: Iterable[str], batch: int = 1024):
    """Yield one id list per document (no special tokens), through the multi-threaded batch API."""
    buf = []
    for d in docs:
        buf.append(d)
        if len(buf) == batch:
            yield from (e.ids for e in tok.encode_batch(buf, add_special_tokens=False))
            buf = []
    if buf:
        yield from (e.ids for e in tok.encode_batch(buf, add_special_tokens=False))
