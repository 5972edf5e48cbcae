"""Atomic file writes, for every command that rewrites a file in a user's run folder: a reader, or the next start
after a kill, sees the old file or the new one, never half of one. And names for files set aside (:func:`unused`).

The temporary is ``PATH.tmp-PID`` beside ``PATH`` (the rename stays on one filesystem, and the next start can tell
a dead process's leftovers by that pattern: :mod:`electra_fast.train.rundir`, :mod:`electra_fast.train.temporaries`).
"""
from __future__ import annotations

import json
import os
from typing import Callable


def temporary(path: str) -> str:
    """This process's temporary name for ``path``."""
    return f"{path}.tmp-{os.getpid()}"


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)``, flush ``tmp`` to disk, then rename it over ``path``; the temporary is gone afterwards whatever
    ``write`` raised. The fsync comes before the rename so a power cut cannot leave ``path`` empty."""
    tmp = temporary(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def utf8_path(path: str) -> bool:
    """Whether ``path`` is UTF-8, as the Rust readers (tokenizers, safetensors) require; a POSIX name may hold any
    bytes, which a str holds as surrogates, and Python's own open takes them."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_safetensors(path: str) -> dict:
    """``safetensors.torch.load_file(path)`` (memory-mapped); a path that is not UTF-8 (safetensors' Rust side
    refuses it: "is not valid UTF-8") is read through Python instead."""
    from safetensors.torch import load, load_file
    if utf8_path(path):
        return load_file(path)
    with open(path, "rb") as f:
        return load(f.read())


def write_text(path: str, text: str) -> None:
    """``text`` (UTF-8) as the whole of ``path``, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON (one trailing newline) as the whole of ``path``, atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def unused(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``... while that name is taken: a file set aside never replaces another."""
    name, n = path, 1
    while os.path.lexists(name):
        n += 1
        name = f"{path}-{n}"
    return name
