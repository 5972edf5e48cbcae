"""Fine-tuning inputs: CSV / TSV (GLUE's files as distributed) / JSONL files and ``datasets.save_to_disk`` folders,
read into :class:`Example` rows, labelled from the training file and tokenised into :class:`Features`.

Columns (names, or 0-based indices for a file without a header row, e.g. GLUE's CoLA: ``--text-column 3
--label-column 1``):

* classification / regression: ``text_column`` (default ``sentence``, else ``text``, else ``sentence1``), and for
  sentence pairs ``pair_column`` (default ``sentence2`` when the file has it);
* token classification: ``tokens_column`` / ``tags_column`` (defaults ``tokens`` / ``tags``): JSON lists in JSONL,
  space-separated words and tags in CSV / TSV.

A bad row is a :class:`FinetuneError` naming the file and line, or is skipped and counted with ``skip_bad_lines``.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._validate import reason
from .errors import FinetuneError

TASKS = ("classification", "regression", "token-classification")
IGNORE = -100  # label of sub-tokens after a word's first and of special tokens (torch's cross_entropy default)


@dataclass
class Columns:
    text: Optional[str] = None
    pair: Optional[str] = None
    label: str = "label"
    tokens: Optional[str] = None  # None: tokens, else words
    tags: Optional[str] = None    # None: tags, else ner_tags, else labels


@dataclass
class Example:
    text: Union[str, List[str]]           # a sentence, or the words of a token-classification row
    pair: Optional[str] = None
    label: Any = None                     # str | int | float, a list of tags, or None (an unlabelled test row)
    where: str = ""                       # "FILE line N" for error messages
    row: int = 0                          # 0-based place among the file's data rows (skipped rows counted)


@dataclass
class Dataset:
    examples: List[Example]
    skipped: int = 0
    path: str = ""
    names: Dict[str, Any] = field(default_factory=dict)  # the columns read: {"text", "pair", "label"} or
    #                                                       {"tokens", "tags"}, names or 0-based indices
    blank: int = 0  # blank lines between a CSV / TSV file's rows: no row (as pandas reads them), said aloud


# ---------------------------------------------------------------------------------------- reading
def _rows(path: str, flag: str) -> Tuple[List[Tuple[int, Any]], bool, int]:
    """(line number, row) pairs, whether rows are dicts (header / JSON objects) or lists (no header), and how many
    blank lines of a CSV / TSV file sat between rows."""
    if os.path.isdir(path):
        return _saved_dataset(path, flag), True, 0
    if not os.path.isfile(path):
        raise FinetuneError(f"{flag}: no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{flag}: {path} is not UTF-8 (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise FinetuneError(f"{flag}: cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise FinetuneError(f"{flag}: {path} is empty")
    if ext in (".jsonl", ".json"):
        rows = []
        # "\n" only: str.splitlines() also breaks at U+2028, U+0085, form feeds..., which JSON strings may hold raw
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except ValueError:
                rows.append((n, None))  # reported by the caller as a bad row (or skipped)
        return rows, True, 0
    if ext not in (".csv", ".tsv", ".txt"):
        raise FinetuneError(f"{flag}: {path}: expected a .csv, .tsv, .jsonl file or a datasets save_to_disk folder")
    delimiter = "," if ext == ".csv" else "\t"
    quoting = csv.QUOTE_MINIMAL if ext == ".csv" else _tsv_quoting(text, f"{flag}: {path}")
    # newline="": rows end at \n, \r\n or \r only (a review may hold U+2028 or a form feed), a quoted CSV field may
    # span lines, and line_num counts the file's lines
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # the default 128 KiB per field would refuse a long document
    try:
        rows, start, blank, inner = [], 1, 0, 0
        for row in reader:
            if row:
                rows.append((start, row))
                inner = blank  # blank lines after the last row are the file's end, not a row each
            else:
                blank += 1
            start = reader.line_num + 1
    except csv.Error as e:
        raise FinetuneError(f"{flag}: {path} line {reader.line_num}: {e}") from None
    finally:
        csv.field_size_limit(limit)
    return rows, False, inner


# a TSV field that starts with a quote, and one wholly quoted the csv module's way (inner quotes doubled; tabs or
# line breaks may be inside, not both: a bare quote closed on a later row would span a field and a row end)
_QUOTE_STARTS = re.compile(r'(?:^|\t)"', re.M)
_CSV_QUOTED = re.compile(r'(?:^|\t)(?:"(?:[^"\t]|"")*"|"(?:[^"\r\n]|"")*")(?=\t|\r|\n|$)', re.M)
_CSV_QUOTED_ANY = re.compile(r'(?:^|\t)"(?:[^"]|"")*"(?=\t|\r|\n|$)', re.M)  # tabs and line breaks inside


def _tsv_quoting(text: str, where: str) -> int:
    """GLUE's TSVs hold bare quote characters (read as text: QUOTE_NONE); Python's csv module and pandas' to_csv
    quote a field holding a tab, a line break or a quote (its quotes doubled), which QUOTE_NONE read as text with
    its quotes, and split at its line break (every later prediction a row off). A file whose every field that
    starts with a quote is quoted that way is read as csv quoting. A quoted field holding both a tab and a line
    break could be either (csv's, or a bare quote closed on a later row): refused, never guessed."""
    starts = len(_QUOTE_STARTS.findall(text))
    fields = _CSV_QUOTED.findall(text)
    quoted = len(fields)
    if starts and quoted == starts:
        if "\t" not in text and any("\n" in f or "\r" in f for f in fields):  # one column: no tab tells them apart
            raise FinetuneError(f"{where}: a quoted field spans lines in a file of one column: csv quoting or bare "
                                "quotes (as in GLUE's files) cannot be told apart; save the file as .csv or without "
                                "such quotes")
        return csv.QUOTE_MINIMAL
    if len(_CSV_QUOTED_ANY.findall(text)) > quoted:
        raise FinetuneError(f"{where}: a quoted field holds both a tab and a line break: csv quoting or bare quotes "
                            "(as in GLUE's files) cannot be told apart; save the file as .csv or without such quotes")
    return csv.QUOTE_NONE


def _saved_dataset(path: str, flag: str) -> List[Tuple[int, dict]]:
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json",
                                                               "dataset_dict.json")):
        raise FinetuneError(f"{flag}: {path} is a directory but not a datasets save_to_disk folder")
    try:
        import datasets  # optional: only this input format needs it
    except ImportError:
        raise FinetuneError(f"{flag}: {path} is a datasets save_to_disk folder; install the 'datasets' package to "
                            "read it") from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - the library's own one-line reason
        raise FinetuneError(f"{flag}: cannot read {path}: {reason(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise FinetuneError(f"{flag}: {path} is a DatasetDict (splits: {', '.join(ds)}); pass one split's folder, "
                            f"e.g. {os.path.join(path, next(iter(ds)))}")
    # a ClassLabel's -1 is datasets' "no label" (GLUE's test splits): an unlabelled row, not a class named "-1"
    unlabelled = {name for name, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    return [(i + 1, {k: None if k in unlabelled and v == -1 else v for k, v in row.items()})
            for i, row in enumerate(ds)]


def _pick(header: Sequence[str], wanted: Optional[str], fallbacks: Sequence[str], what: str, where: str) -> str:
    if wanted is not None:
        if wanted not in header:
            raise FinetuneError(f"{where}: no column {wanted!r} for the {what} (columns: {', '.join(header)})")
        return wanted
    for name in fallbacks:
        if name in header:
            return name
    raise FinetuneError(f"{where}: no {what} column (looked for {', '.join(fallbacks)}; columns: "
                        f"{', '.join(header)}); name it with --{what.replace(' ', '-')}-column")


def read(path: str, task: str, columns: Columns, flag: str, labelled: bool = True,
         skip_bad_lines: bool = False, names: Optional[Dict[str, Any]] = None) -> Dataset:
    """Rows of ``path`` as Examples; ``labelled=False`` (a test file) accepts rows without a label. ``names``: the
    training file's columns (its ``Dataset.names``), which a validation / test file must have too (a pair column
    cannot go missing from one file and turn its rows into single sentences)."""
    path = os.fspath(path)
    rows, keyed, blank = _rows(path, flag)
    used = (columns.tokens, columns.tags) if task == "token-classification" else (columns.text, columns.pair,
                                                                                  columns.label)
    indexed = all(c is None or str(c).isdigit() for c in used) and used[0] is not None and not keyed
    if not keyed and not indexed:  # a header row names the columns
        header_line, header = rows[0]
        rows = [(n, dict(zip(header, r + [None] * (len(header) - len(r))))) if len(r) <= len(header) else (n, None)
                for n, r in rows[1:]]
    else:
        header = None
    where = f"{flag}: {path}"
    if names is None:
        names = _column_names(rows, header, keyed or not indexed, task, columns, labelled, where)
    elif header is not None:  # a header row: the training file's columns must all be there
        needed = [v for k, v in names.items() if v is not None and (labelled or k not in ("label", "tags"))]
        missing = [str(v) for v in needed if v not in header]
        if missing:
            raise FinetuneError(f"{where}: no column {', '.join(map(repr, missing))}, which the training file "
                                f"uses (columns: {', '.join(header)})")
    out, skipped = [], 0
    if indexed and rows and _header_like(rows, names):
        n, first = rows[0]
        if not skip_bad_lines:
            raise FinetuneError(f"{path} line {n} looks like a header row ({', '.join(map(repr, first))}): with "
                                "0-based column indices every line is a row; name the columns instead (e.g. "
                                "--text-column sentence --label-column label), remove that line, or pass "
                                "--skip-bad-lines")
        rows, skipped = rows[1:], 1
    for i, (n, row) in enumerate(rows):
        where = f"{path} line {n}"
        try:
            out.append(_example(row, names, task, labelled, where, indexed))
            out[-1].row = i
        except FinetuneError:
            if not skip_bad_lines:
                raise
            skipped += 1
    if not out:
        raise FinetuneError(f"{flag}: {path} has no usable rows" + (f" ({skipped} skipped)" if skipped else ""))
    return Dataset(out, skipped, path, names, blank=blank)


# What a header names its columns (GLUE's, datasets', CoNLL's): a first row holding one of these in a label / tags
# column, or as a one-word text, is a header when the columns are given by index
COLUMN_NAMES = frozenset({"sentence", "sentence1", "sentence2", "text", "question", "question1", "question2", "label",
                          "labels", "tokens", "words", "tags", "ner_tags", "score", "class", "category", "target"})


def _header_like(rows, names: Dict[str, Any]) -> bool:
    """Whether the first of ``rows`` (lists of cells; ``names``: the used columns' indices) is a header: its label
    (or tags) cell occurs in no later row and is a column name, or is the only non-number among numeric labels; or
    a one-word text cell is a column name (and the label cell, if any, occurs in no later row)."""
    first = rows[0][1]

    def cell(row, key):
        return row[key].strip() if key is not None and key < len(row) else None

    def number(v):
        return v is not None and re.fullmatch(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", v) is not None

    label_key = names.get("label", names.get("tags"))
    label = cell(first, label_key)
    later = [cell(r, label_key) for _, r in rows[1:101]]
    if label and label in later:  # a real class / tag sequence: data
        return False
    if label and (label.lower() in COLUMN_NAMES or (not number(label) and any(later)
                                                     and all(number(v) for v in later if v))):
        return True
    return any(t is not None and t.lower() in COLUMN_NAMES for t in (cell(first, names.get(k))
                                                                     for k in ("text", "pair", "tokens")))


# GLUE's sentence-pair columns (MNLI / RTE / ..., QNLI, QQP), tried in this order when no text column is named
PAIRS = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"))


def _column_names(rows, header, keyed: bool, task: str, columns: Columns, labelled: bool,
                  where: str) -> Dict[str, Any]:
    if not keyed:  # numeric indices, no header
        if task == "token-classification":
            return {"tokens": int(columns.tokens), "tags": None if columns.tags is None else int(columns.tags)}
        return {"text": int(columns.text), "pair": None if columns.pair is None else int(columns.pair),
                "label": int(columns.label)}
    if header is None:
        first = next((r for _, r in rows if isinstance(r, dict)), None)
        if first is None:
            raise FinetuneError(f"{where}: no row is a JSON object")
        header = list(first)
    if task == "token-classification":
        tokens = _pick(header, columns.tokens, ["tokens", "words"], "tokens", where)
        try:
            tags = _pick(header, columns.tags, ["tags", "ner_tags", "labels"], "tags", where)
        except FinetuneError:
            if labelled:
                raise
            tags = None  # an unlabelled test file: words only
        return {"tokens": tokens, "tags": tags}
    label = _label_column(header, columns.label, labelled, where)
    if columns.text is None and columns.pair is None:
        for text, pair in PAIRS:
            if text in header and pair in header:
                return {"text": text, "pair": pair, "label": label}
    text = _pick(header, columns.text, ["sentence", "text", "sentence1", "question"], "text", where)
    if columns.pair is not None:
        pair = _pick(header, columns.pair, [], "pair", where)
    else:  # a text column named alone still takes its GLUE partner (sentence1 -> sentence2, ...)
        pair = dict(PAIRS).get(text)
        pair = pair if pair in header else None
    return {"text": text, "pair": pair, "label": label}


def _label_column(header: Sequence[str], wanted: str, labelled: bool, where: str) -> str:
    """The label's column: ``wanted``, or for the default name GLUE QQP's ``is_duplicate``. A labelled file
    without it is refused here (each row was reported as having no label); a test file may have none."""
    if wanted not in header and wanted == "label" and "is_duplicate" in header:
        return "is_duplicate"
    if wanted not in header and labelled:
        raise FinetuneError(f"{where}: no column {wanted!r} for the label (columns: {', '.join(map(str, header))}); "
                            "name it with --label-column")
    return wanted


def _field(row, key, where: str, what: str):
    try:
        value = row[key]
    except (KeyError, IndexError, TypeError):
        raise FinetuneError(f"{where}: no {what} (column {key!r})") from None
    return value


def _words(cell, kinds):
    """A token-classification cell as a list: a list as it is; a string that is a non-empty list literal of
    ``kinds`` (words: str; tags: str or int) as that list (pandas' to_csv of a list column writes "['EU',
    'rejects']", JSON '["EU", "rejects"]'); else split at white space ("[ 1 ]" is three words)."""
    if not isinstance(cell, str):
        return cell
    text = cell.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
        if isinstance(value, list) and value and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value):
            return value
    return cell.split()


def _example(row, names: dict, task: str, labelled: bool, where: str, indexed: bool) -> Example:
    if row is None or not isinstance(row, (dict, list)):
        raise FinetuneError(f"{where}: not a row of the expected columns (malformed JSON or too many fields)")
    if task == "token-classification":
        tokens, key = _field(row, names["tokens"], where, "tokens"), names["tags"]
        tags = None if key is None else row.get(key) if isinstance(row, dict) else (
            row[key] if key < len(row) else None)
        tokens = _words(tokens, str)
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise FinetuneError(f"{where}: tokens must be a non-empty list of words")
        if tags is None and not labelled:
            return Example(tokens, None, None, where)
        tags = _words(tags, (str, int))
        if not isinstance(tags, list) or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tags):
            raise FinetuneError(f"{where}: tags must be a list of labels")
        if len(tags) != len(tokens):
            raise FinetuneError(f"{where}: {len(tags)} tags for {len(tokens)} tokens")
        tags = [str(t).strip() for t in tags]  # as class labels are: "B-PER " is B-PER, not another entity type
        if not all(tags):
            raise FinetuneError(f"{where}: a tag is empty")
        spaced = next((t for t in tags if re.search(r"\s", t)), None)  # also a line break or a tab
        if spaced is not None:  # a word's predicted tags are written space-separated: one such tag reads as two
            raise FinetuneError(f"{where}: tag {spaced!r} holds white space; tags must be single words")
        return Example(tokens, None, tags, where)
    text = _field(row, names["text"], where, "text")
    if not isinstance(text, str) or not text.strip():
        raise FinetuneError(f"{where}: the text is empty or not a string")
    pair = None
    if names["pair"] is not None:
        pair = _field(row, names["pair"], where, "second sentence")
        if not isinstance(pair, str) or not pair.strip():
            raise FinetuneError(f"{where}: the second sentence is empty or not a string")
    label = row.get(names["label"]) if isinstance(row, dict) else (
        row[names["label"]] if names["label"] < len(row) else None)
    if label is None or (isinstance(label, str) and not label.strip()):
        if labelled:
            raise FinetuneError(f"{where}: no label (column {names['label']!r})")
        return Example(text, pair, None, where)
    if task == "regression":
        try:
            value = float(label)
        except (TypeError, ValueError):
            raise FinetuneError(f"{where}: regression label {label!r} is not a number") from None
        if not math.isfinite(value) or isinstance(label, bool):
            raise FinetuneError(f"{where}: regression label {label!r} is not a finite number")
        if abs(value) > _FP32_MAX:  # infinite in the model's float32 targets
            raise FinetuneError(f"{where}: regression label {label!r} is outside float32's range (|x| <= 3.4e38)")
        return Example(text, pair, value, where)
    if isinstance(label, (float, bool)) or not isinstance(label, (str, int)):
        raise FinetuneError(f"{where}: class label {label!r} must be a string or an integer")
    label = str(label).strip()
    if not label.isprintable():  # a line break or tab split predictions-test.tsv's rows (a lone CR too, for csv)
        raise FinetuneError(f"{where}: class label {label!r} holds a line break, tab or other control character")
    return Example(text, pair, label, where)


_FP32_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------- labels
def label_names(train: Dataset, task: str) -> List[str]:
    """The classes, from the training file: numeric order when every label is an integer, else sorted strings."""
    if task == "regression":
        return []
    values = {t for e in train.examples for t in (e.label if task == "token-classification" else [e.label])}
    if task == "token-classification" and "O" in values:
        return ["O"] + sorted(values - {"O"})
    if all(re.fullmatch(r"[-+]?[0-9]+", v) for v in values):  # ASCII digits only: int() refuses "①"
        return sorted(values, key=lambda v: (int(v), v))  # "1" and "01" tie on int: a fixed order all the same
    return sorted(values)


def check_labels(ds: Dataset, names: List[str], task: str, flag: str) -> None:
    known = set(names)
    for e in ds.examples:
        if e.label is None or task == "regression":
            continue
        for t in (e.label if task == "token-classification" else [e.label]):
            if t not in known:
                raise FinetuneError(f"{flag}: {e.where}: label {t!r} is not one of the training file's labels "
                                    f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")


# ---------------------------------------------------------------------------------------- features
@dataclass
class Features:
    """Token ids per example (int lists, [CLS] ... [SEP] included), token types, and labels: a class index, a float,
    or per token a tag index with IGNORE on special tokens and non-first sub-tokens (``word_ids`` maps tokens to
    words, for turning predictions back into one tag per word)."""
    ids: List[List[int]]
    types: List[List[int]]
    labels: List[Any]
    word_ids: List[List[Optional[int]]] = field(default_factory=list)
    n_words: List[int] = field(default_factory=list)  # words per example (token classification)
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def featurize(ds: Dataset, tok, task: str, names: List[str], max_len: int) -> Features:
    """Tokenise ``ds`` with the model's tokenizer (``tokenizers.Tokenizer`` with [CLS] x [SEP] / pair templates)."""
    index = {n: i for i, n in enumerate(names)}
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    out = Features([], [], [])
    if task == "token-classification":
        encs = tok.encode_batch([e.text for e in ds.examples], is_pretokenized=True)
    else:
        batch = [(e.text, e.pair) if e.pair is not None else e.text for e in ds.examples]
        encs = tok.encode_batch(batch)
    for e, enc in zip(ds.examples, encs):
        out.ids.append(list(enc.ids))
        out.types.append(list(enc.type_ids))
        if task == "token-classification":
            words = list(enc.word_ids)
            out.word_ids.append(words)
            out.n_words.append(len(e.text))
            if len(enc.overflowing) > 0:  # not "a word has no token": a zero-width word has none, uncut
                out.truncated += 1
            seen, labels = set(), []
            for w in words:
                if w is None or w in seen or e.label is None:
                    labels.append(IGNORE)
                else:
                    seen.add(w)
                    labels.append(index[e.label[w]])
            out.labels.append(labels)
        else:
            if len(enc.overflowing) > 0:
                out.truncated += 1
            out.labels.append(None if e.label is None else (e.label if task == "regression" else index[e.label]))
    tok.no_truncation()
    return out
