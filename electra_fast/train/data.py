"""Text -> token stream cache -> packed [CLS] ... [SEP] sequences (RoBERTa's FULL-SENTENCES; DOC-SENTENCES rows
are :mod:`.doc_sentences`).

Inputs: ``.txt`` (documents separated by blank lines), ``.jsonl`` (a ``text`` field per line), directories of
those (recursively, sorted), and a ``datasets`` ``save_to_disk`` directory (when ``datasets`` is installed).

The corpus is tokenised once into ``<cache>/tokens-<key>.bin``: a flat little-endian uint32 stream, one
word per token: the id in bits 0-30, bit 31 set where the token starts a word (the tokenizer's word ids, for
whole-word masking), documents separated by [SEP]; keyed by a hash of the input files (path, size, mtime), the
tokenizer, the reader options and the format version (an older cache is rebuilt, never misread). It is read
back with ``numpy.memmap``, so a corpus larger than RAM works and a second run starts at once. Sequence ``i``
is ``[CLS] + stream[i*(T-2) : (i+1)*(T-2)] + [SEP]`` (ids; the word starts alongside); the last partial chunk
is dropped. Order: a seeded permutation per epoch, a pure function of (seed, epoch), so the data position
is just the number of sequences consumed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from .errors import PretrainError
from .tokenizer import TextRules, encode_documents, fingerprint, special_ids

TEXT_SUFFIXES = (".txt", ".jsonl")  # what a --data folder contributes (any case: .TXT too)
JSONL_SUFFIXES = (".jsonl", ".json")  # a file named so is JSON Lines (datasets' to_json writes .json)
CACHE_FORMAT = 2  # 1: int32 ids; 2: uint32 ids with the word-start bit
WORD_START = np.uint32(1 << 31)
ID_BITS = np.uint32((1 << 31) - 1)
# what the cache folder's writers (this module, corpus.write_default_corpus) name a file until it is complete
_CACHE_NAME = r"tokens-[0-9a-f]{24}\.bin(?:\.json)?"  # a token cache and its record
CACHE_TEMPORARY = re.compile(rf"^(?:{_CACHE_NAME}|default-corpus-py\d+\.\d+\.txt)\.tmp-(\d+)$")


# ---------------------------------------------------------------------------------------- reading
def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset_info.json"))
                                    or os.path.isfile(os.path.join(path, "dataset_dict.json")))


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "__"))


def reads_hidden(paths: Sequence[str], recorded: Optional[Sequence[str]]) -> bool:
    """Whether a run's ``recorded`` inputs (run.json "inputs") hold a file that a ``--data`` folder of ``paths`` has
    below a hidden name and that no file argument names: a run started before folders skipped them, which resumes
    reading them as it did."""
    if not isinstance(recorded, list):
        return False
    named = {os.path.realpath(p) for p in paths if not os.path.isdir(p)}
    folders = [os.path.realpath(p) for p in paths if os.path.isdir(p)]
    for f in recorded:
        if not isinstance(f, str) or os.path.realpath(f) in named:
            continue
        for d in folders:
            if any(_is_hidden(part) for part in _below(f, d)):
                return True
    return False


def _below(recorded: str, folder: str) -> List[str]:
    """The path components of a recorded input below ``folder`` (a real path); [] when it is not below it. A
    relative record is the original working directory's: matched after the folder's name when it is not found
    from here (a run resumes from any directory)."""
    if os.path.isabs(recorded) or os.path.exists(recorded):
        rel = os.path.relpath(os.path.realpath(recorded), folder)
        return [] if rel.startswith(os.pardir) else rel.split(os.sep)
    parts = os.path.normpath(recorded).split(os.sep)
    name = os.path.basename(folder)
    return parts[len(parts) - parts[::-1].index(name):] if name in parts else []


def resolve_inputs(paths: Sequence[str], exclude: Optional[str] = None, owned: Sequence[str] = (),
                   hidden: bool = False) -> List[str]:
    """Files (and saved datasets) named by ``paths``, directories expanded; errors for missing / empty.
    ``hidden``: read a folder's names that start with "." or "__" too (runs recorded before they were skipped).

    ``exclude``: a directory whose files are never inputs, even inside a ``--data`` folder (the run's own ``--out``:
    its metrics.jsonl and cache would otherwise be read back as training text on ``--resume``); when a ``--data``
    folder is ``exclude`` itself, only the ``owned`` names in it are left out (the run's files next to the text)."""
    skip = os.path.realpath(exclude) if exclude else None
    if not paths:
        raise PretrainError("--data: no input given")
    out = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.exists(p):
            raise PretrainError(f"--data: no such file or directory: {p}")
        if _is_saved_dataset(p):
            out.append(p)
        elif os.path.isdir(p):
            found, seen, passed = [], {os.path.realpath(p)}, 0
            skipped = (lambda name: False) if hidden else _is_hidden
            for r, dirs, fs in os.walk(p, followlinks=True):  # a linked sub-folder is the user's text too
                # As datasets reads a folder: hidden and "__" names are tools' copies (.ipynb_checkpoints/,
                # .git/, __pycache__/), not the user's corpus; read, they would put its text in twice.
                passed += sum(map(skipped, fs + dirs))
                fs = [f for f in fs if not skipped(f)]
                real = {d: os.path.realpath(os.path.join(r, d)) for d in dirs if not skipped(d)}
                dirs[:] = [d for d in real if real[d] != skip and real[d] not in seen]  # no link cycle, no twice
                seen.update(real[d] for d in dirs)
                if os.path.realpath(r) == skip:  # --data is --out itself: the run's own files are not text
                    dirs[:], fs = [d for d in dirs if d not in owned], [f for f in fs if f not in owned]
                found.extend(os.path.join(r, f) for f in fs if f.lower().endswith(TEXT_SUFFIXES))
            found.sort()
            if not found:
                also = (f" outside the {passed} hidden name(s) it skips (starting with '.' or '__': name such files "
                        "as --data files)") if passed else ""
                raise PretrainError(f"--data: directory {p} holds no .txt or .jsonl files{also}")
            out.extend(found)
        else:
            out.append(p)
    firsts: dict = {}  # one file named twice (a folder and a file in it) would put its text in twice
    for p in out:
        firsts.setdefault(os.path.realpath(p), p)
    out = list(firsts.values())
    for p in out:  # a broken link in a folder, a pipe, a device: refused here, not by a later os.stat / read
        if not (_is_saved_dataset(p) or os.path.isfile(p)):
            why = "a broken symbolic link" if os.path.islink(p) and not os.path.exists(p) else "not a regular file"
            raise PretrainError(f"--data: cannot read {p}: {why}")
    return out


_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def _decode(path: str, data: bytes, skip_bad_lines: bool, stats: dict) -> str:
    bom = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark is not text (nor JSON)
    skipped, data = (len(bom), data[len(bom):]) if data.startswith(bom) else (0, data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if not skip_bad_lines:
            raise PretrainError(f"--data: {path} is not UTF-8 (invalid byte at offset {e.start + skipped}); fix the "
                                "file or pass --skip-bad-lines") from None
    lines = []
    for line in re.split(b"\r\n|\r|\n", data):  # an old-Mac (bare CR) file's lines too, not one bad "line"
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            stats["skipped_lines"] = stats.get("skipped_lines", 0) + 1
    return "\n".join(lines)


def read_documents(path: str, skip_bad_lines: bool = False, stats: Optional[dict] = None) -> Iterator[str]:
    """Documents of one input, in file order."""
    stats = {} if stats is None else stats
    if _is_saved_dataset(path):
        try:
            import datasets
        except ImportError:
            raise PretrainError(f"--data: {path} is a saved dataset; install `datasets` to read it") from None
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:  # another split (a test set) is no default to train on
                raise PretrainError(f"--data: dataset {path} has splits {sorted(ds)} and no 'train'; pass the folder "
                                    f"of the split to read ({os.path.join(path, sorted(ds)[0])})")
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        if "text" not in ds.column_names:
            raise PretrainError(f"--data: dataset {path} has no 'text' column (columns: {ds.column_names})")
        for n, row in enumerate(ds):
            doc = row["text"]
            if doc is not None and not isinstance(doc, str):
                if skip_bad_lines:
                    stats["skipped_lines"] = stats.get("skipped_lines", 0) + 1
                    continue
                raise PretrainError(f"--data: dataset {path} row {n}: 'text' is {type(doc).__name__}, not a string; "
                                    "fix it or pass --skip-bad-lines")
            if doc and doc.strip():
                yield doc
        return
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PretrainError(f"--data: cannot read {path}: {e.strerror}") from None
    text = _decode(path, data, skip_bad_lines, stats)
    if path.lower().endswith(JSONL_SUFFIXES):
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
                if not isinstance(doc, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                if skip_bad_lines:
                    stats["skipped_lines"] = stats.get("skipped_lines", 0) + 1
                    continue
                raise PretrainError(f"--data: {path} line {n} is not a JSON object with a string 'text' field; "
                                    "fix it or pass --skip-bad-lines") from None
            if doc.strip():
                yield doc
    else:
        # a blank line ends a document, also one holding spaces / tabs, and in CRLF or old-Mac (bare CR) files
        for doc in _BLANK_LINE.split(text.replace("\r\n", "\n").replace("\r", "\n")):
            if doc.strip():
                yield doc.strip()


# ---------------------------------------------------------------------------------------- cache
def input_files(path: str) -> List[str]:
    """The files an input reads: itself, or a datasets save_to_disk folder's (a shard rewritten in place leaves the
    folder's own stat as is)."""
    if not os.path.isdir(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)


def cache_key(inputs: Sequence[str], tok, skip_bad_lines: bool, rules: TextRules = TextRules()) -> str:
    h = hashlib.sha256()
    for p in inputs:
        for f in input_files(p):
            st = os.stat(f)
            # the path's bytes: a POSIX name may hold any (a str holds them as surrogates, which .encode() refuses).
            # Size and mtime can survive an edit (touch -r, cp -p, rsync -t of a same-size variant): the inode and
            # ctime, which no user sets, key it too
            h.update(os.fsencode(os.path.abspath(f)) + f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0"
                                                       f"{st.st_ctime_ns}\0".encode())
    h.update(fingerprint(tok).encode())
    h.update(f"skip={skip_bad_lines};format={CACHE_FORMAT};special-spellings=text".encode())
    h.update(rules.cache_suffix(tok).encode())
    return h.hexdigest()[:24]


def build_token_cache(inputs: Sequence[str], tok, cache_dir: str, skip_bad_lines: bool = False,
                      log=print, rules: TextRules = TextRules()) -> str:
    """Tokenise ``inputs`` into the cache unless already there, read with ``rules``; returns the ``.bin`` path."""
    os.makedirs(cache_dir, exist_ok=True)
    key = cache_key(inputs, tok, skip_bad_lines, rules)
    path = os.path.join(cache_dir, f"tokens-{key}.bin")
    damage = _cache_damage(path)
    if damage is None:
        return path
    if damage:  # derived data: rebuilt, never trusted (read as it was, it blamed the user's corpus, or raised)
        log(f"note: token cache {path} {damage}: tokenising the corpus again")
    sep = special_ids(tok)["sep"]
    stats, n_docs, n_tokens, digest = {}, 0, 0, hashlib.sha256()
    tmp, meta_tmp = f"{path}.tmp-{os.getpid()}", f"{path}.json.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            # one pass over every file's documents: the tokenizer is prepared once (a Unigram's text-only copy)
            docs = (d for p in inputs for d in read_documents(p, skip_bad_lines, stats))
            for ids, starts in encode_documents(tok, docs, rules=rules):
                if not ids:
                    continue
                arr = np.asarray(ids + [sep], dtype="<u4") | (np.asarray(starts + [1], dtype="<u4") << 31)
                f.write(arr.tobytes())
                digest.update(arr.tobytes())
                n_docs += 1
                n_tokens += arr.size
            f.flush()
            os.fsync(f.fileno())
        if n_tokens == 0:
            raise PretrainError(f"--data: no text found in {', '.join(inputs)}")
        if stats.get("skipped_lines"):
            log(f"warning: skipped {stats['skipped_lines']} bad line(s) (--skip-bad-lines)")
        meta = {"documents": n_docs, "tokens": n_tokens, "inputs": list(inputs), "dtype": "<u4",
                "format": CACHE_FORMAT, "word_start_bit": 31, "sha256": digest.hexdigest()}
        with open(meta_tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, path)
        os.replace(meta_tmp, path + ".json")  # written last: its presence marks a complete cache
    except BaseException:  # bad input, Ctrl-C: leave no temporary behind (a kill -9: the next start removes it)
        for t in (tmp, meta_tmp):
            if os.path.exists(t):
                os.unlink(t)
        raise
    log(f"tokenised {n_docs} documents into {n_tokens} tokens -> {path}")
    return path


CACHE_FILE = re.compile(rf"^{_CACHE_NAME}$")


def remove_other_caches(keep: str) -> List[str]:
    """Remove the complete token caches beside ``keep`` (a run's cache/ folder) and return their paths: a corpus
    edited, touched or moved leaves its old cache under a key nothing computes again (the key holds the files'
    ctime), a full copy of the corpus's tokens each time."""
    folder, removed = os.path.dirname(keep), []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if CACHE_FILE.match(name) and path not in (keep, keep + ".json") and os.path.isfile(path):
            os.unlink(path)
            removed.append(path)
    return removed


def stream_digest(path: str) -> str:
    """SHA-256 of a token cache's stream (what a resumed run checks its data against): from the cache's metadata,
    or, for a cache written before it was recorded there, read from the stream."""
    try:
        with open(path + ".json", encoding="utf-8") as f:
            recorded = json.load(f).get("sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str):
        return recorded
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_damage(path: str) -> "str | None":
    """None when the cache ``path`` is complete and of this format; else "" (none there: an older format, or not
    complete), or what is wrong with it: its stream's size disagrees with its record (truncated, emptied)."""
    try:
        with open(path + ".json", encoding="utf-8") as f:
            record = json.load(f)
        size = os.path.getsize(path) if os.path.isfile(path) else None
    except (OSError, ValueError):
        return ""
    if size is None or not isinstance(record, dict) or record.get("format", 1) != CACHE_FORMAT:
        return ""
    tokens = record.get("tokens")
    if not isinstance(tokens, int) or size != 4 * tokens:
        return f"holds {size} bytes, not the {tokens!r} tokens x 4 bytes its record says"
    return None


# ---------------------------------------------------------------------------------------- packing
# how documents become rows: "full-sentences" (PackedSequences: the stream cut every T-2 tokens, across documents)
# or "doc-sentences" (.doc_sentences.DocumentRows: whole documents, attention masked at their boundaries)
PACKINGS = ("full-sentences", "doc-sentences")


def token_stream(path: str) -> np.ndarray:
    """A token cache's stream, memory-mapped; a file that holds no whole stream (emptied, torn mid-token) is refused
    naming it (numpy said "cannot mmap an empty file"). :func:`build_token_cache` rebuilds such a cache first."""
    size = os.path.getsize(path)
    if size == 0 or size % 4:
        raise PretrainError(f"token cache {path} is damaged ({size} bytes, not a whole number of 4-byte tokens); "
                            "delete it: the next run tokenises the corpus again")
    return np.memmap(path, dtype="<u4", mode="r")


class PackedSequences:
    """Fixed-length [CLS] chunk [SEP] sequences over a memory-mapped token stream (ids and word starts)."""

    def __init__(self, stream_path: str, seq_len: int, cls_id: int, sep_id: int):
        if seq_len < 3:
            raise PretrainError(f"--seq-len: expected >= 3, got {seq_len}")
        self.tokens = token_stream(stream_path)
        self.seq_len, self.cls_id, self.sep_id = seq_len, cls_id, sep_id
        self.body = seq_len - 2
        self.n = len(self.tokens) // self.body
        if self.n == 0:
            raise PretrainError(f"--data: the corpus has {len(self.tokens)} tokens, fewer than one sequence of "
                                f"--seq-len {seq_len}")

    def __len__(self) -> int:
        return self.n

    def _rows(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([self.tokens[i * self.body:(i + 1) * self.body] for i in indices]) if len(indices) else \
            np.empty((0, self.body), dtype=np.uint32)

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """input ids, int64 [len(indices), seq_len]."""
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        out[:, 0], out[:, -1] = self.cls_id, self.sep_id
        out[:, 1:-1] = self._rows(indices) & ID_BITS
        return torch.from_numpy(out)

    def word_starts(self, indices: Sequence[int]) -> torch.Tensor:
        """bool [len(indices), seq_len]: True where a word starts ([CLS] and [SEP] each start one). A word cut
        by the start of a chunk continues [CLS]'s unit there, so its tail is never masked on its own."""
        out = np.ones((len(indices), self.seq_len), dtype=bool)
        out[:, 1:-1] = (self._rows(indices) & WORD_START) != 0
        return torch.from_numpy(out)

    def layout(self, indices: Sequence[int]) -> dict:
        """The model's keyword arguments for these rows beyond the ids: none (one sequence per row, no padding)."""
        return {}


def model_inputs(packed, indices: Sequence[int], whole_words: bool):
    """(input ids int64 [len(indices), T], the model's other keyword arguments: the rows' layout and, with
    ``whole_words``, their word starts) of ``packed`` rows (PackedSequences or DocumentRows): what a training step
    and the held-out evaluation both feed the model."""
    layout = packed.layout(indices)
    if whole_words:
        layout["word_starts"] = packed.word_starts(indices)
    return packed.batch(indices), layout


def whole_word_shortfall(packed, cfg, rows: int = 256) -> Optional[str]:
    """What to tell the user when whole-word masking selects far fewer tokens than ``cfg.mask_prob`` asks (under
    half, measured on up to ``rows`` rows with the run's masking): a word longer than a row's count is never
    masked, and to a Unigram or byte-level BPE tokenizer a text without spaces (Chinese, Japanese, Thai) is one
    word per sentence. None when the share is near the asked one."""
    from ..ops import mask_tokens
    n = min(len(packed), rows)
    if n == 0:
        return None
    ids, layout = model_inputs(packed, range(n), True)
    real = layout.get("attention_mask", torch.ones_like(ids)).bool()
    m = mask_tokens(ids, mask_token_id=cfg.mask_token_id, vocab_size=cfg.vocab_size, seed=0,
                    mask_prob=cfg.mask_prob, special_token_ids=cfg.special_token_ids, attention_mask=real,
                    word_starts=layout["word_starts"], strategy=cfg.masking_strategy)
    share = float(m.masked.sum()) / max(int(real.sum()), 1)
    if share >= cfg.mask_prob / 2:
        return None
    return (f"--whole-word-masking: the run's masking selects {share:.1%} of the tokens, not the {cfg.mask_prob:.0%} "
            "--mask-prob asks: most words are longer than a row's count and are never masked (text without "
            "spaces, as Chinese, is one word per sentence to a Unigram or BPE tokenizer; WordPiece splits CJK "
            "characters apart); use --tokenizer-type wordpiece, a longer --seq-len, or no --whole-word-masking")


class Sampler:
    """Global sequence order: epoch ``e`` is ``randperm(n)`` under seed ``seed * 1_000_003 + e``.
    ``indices(pos, count)`` returns sequences ``pos .. pos+count-1`` of that endless stream."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
            self._perm, self._epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        return self._perm

    def indices(self, pos: int, count: int) -> List[int]:
        out = []
        for g in range(pos, pos + count):
            out.append(int(self._permutation(g // self.n)[g % self.n]))
        return out
