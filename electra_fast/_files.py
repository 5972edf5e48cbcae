"""Atomic file writes, for every command that rewrites a file in a user's run folder: a reader, or the next start
after a kill, sees the old file or the new one, never half of one. And names for files set aside (:func:`unused`).

The temporary is ``PATH.tmp-PID`` beside ``PATH`` (the rename stays on one filesystem, and the next start can tell
a dead process's leftovers by that pattern: :mod:`electra_fast.train.rundir`, :mod:`electra_fast.train.temporaries`).
"""
from __future__ import annotations

import json
import os
import shutil
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


def vacant(path: str) -> bool:
    """Whether ``path`` is missing or an empty directory (one that cannot be listed is not)."""
    try:
        return not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path))
    except OSError:
        return False


def creatable_dir(path: str) -> "str | None":
    """Why the directory ``path`` (existing or not) cannot be written into, or None: its nearest existing ancestor
    (itself, if it exists) must be a directory this process may write into. Checked before long work, not found
    after it."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} exists and is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def write_directory(path: str, write: Callable[[str], None], inner: str = ".tmp") -> None:
    """``write(tmp)`` fills a new temporary directory, which then becomes ``path``: a failure part way (a full disk,
    an exception) leaves nothing at ``path``. ``path`` must be missing or an empty directory (:func:`vacant`; callers
    say so in their own terms first), so nothing there is ever replaced. A new ``path`` is the sibling
    ``.NAME.tmp-PID`` renamed (the same file system). An empty ``path`` stays (it may be a link, a mount point, the
    working directory): the temporary is ``path/INNER-PID`` and its entries move up, one rename each."""
    if not path.strip():
        raise ValueError("write_directory: empty path")
    path = os.path.normpath(path)  # "a/", "a/.": basename "" or "." would name the temporary
    if not vacant(path):
        raise FileExistsError(f"{path} is not a new or empty directory")
    empty = os.path.isdir(path)
    tmp = (os.path.join(path, f"{inner}-{os.getpid()}") if empty
           else os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}"))
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    os.mkdir(tmp)  # outside the try: a name already taken (another writer's temporary) is never removed here
    try:
        write(tmp)
        if empty:
            for name in os.listdir(tmp):
                # another writer may have filled path meanwhile: refuse rather than replace its files
                if os.path.lexists(os.path.join(path, name)):
                    raise FileExistsError(f"{path} gained {name} while it was being written; nothing replaced")
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
            os.rmdir(tmp)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


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
