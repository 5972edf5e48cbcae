"""The embedded default corpus: English text gathered at run time from the docstrings of Python's own
standard library (already installed on every machine that runs this package), so the repository ships no
third-party text and the job needs no network. Deterministic for one Python version, whatever else the process has
imported: a fixed module list, sorted member names, only members the standard library itself defines, one document
per docstring paragraph group.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from typing import Iterator, List

from .errors import PretrainError

# modules without import-time side effects and with long English docstrings
MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "email.message", "enum", "filecmp", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "logging.handlers", "mailbox", "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os",
    "pathlib", "pickle", "pickletools", "pdb", "platform", "poplib", "pprint", "queue", "random", "re",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zoneinfo",
)


def _standard(module_name) -> bool:
    """Whether a member defined in ``module_name`` is the standard library's own (None: a C-level method)."""
    return module_name is None or module_name.split(".")[0] in sys.stdlib_module_names


def _docstrings(module) -> Iterator[str]:
    doc = inspect.getdoc(module)
    if doc:
        yield doc
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exports: documented where they are defined
        doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isroutine(obj)) else None
        if doc:
            yield doc
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if meth.startswith("_"):
                    continue
                routine = getattr(obj, meth, None)
                if not _standard(getattr(routine, "__module__", None)):
                    continue  # set on a standard class by a library imported earlier (transformers: Logger methods)
                d = inspect.getdoc(routine) if inspect.isroutine(routine) else None
                if d and d != doc:
                    yield d


def documents() -> List[str]:
    """The corpus as a list of documents (one per docstring, blank lines inside collapsed)."""
    if sys.flags.optimize >= 2:  # the pure-Python modules' docstrings are gone: a seventh of the text, silently
        raise PretrainError("the embedded corpus is read from the standard library's docstrings, which python -OO "
                            "(PYTHONOPTIMIZE=2) strips: run without -OO (pretrain can also read your own text: "
                            "--data)")
    docs, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # a stripped-down Python (no sqlite3, ...): use what is there
                continue
            for doc in _docstrings(module):
                text = " ".join(p.strip() for p in doc.split("\n") if p.strip())
                if len(text) >= 40 and text not in seen:
                    seen.add(text)
                    docs.append(text)
    return docs


def write_default_corpus(path: "str | os.PathLike") -> str:
    """Write the corpus as a .txt (documents separated by blank lines) atomically; returns the path."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n\n".join(documents()) + "\n")
    os.replace(tmp, path)
    return path
