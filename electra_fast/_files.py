"""Atomic file writes, for every command that rewrites a file in a user's run folder: a reader, or the next start
after a kill, sees the old file or the new one, never half of one. And names for files set aside (:func:`unused`).

The temporary is ``PATH.tmp-PID`` beside ``PATH`` (the rename stays on one filesystem, and the next start can tell
a dead process's leftovers by that pattern: :mod:`electra_fast.train.rundir`, :mod:`electra_fast.train.temporaries`).

A write that fails (a full disk, a read-only folder) raises :class:`WriteError`, one line naming the file, whatever
the writer (Python's open, torch.save, safetensors) said it with: every command shows it the same way.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # no flock (Windows): a dead writer is told by its PID
    fcntl = None


def temporary(path: str) -> str:
    """This process's temporary name for ``path``."""
    return f"{path}.tmp-{os.getpid()}"


class WriteError(OSError):
    """A file could not be written: ``writing PATH failed (CAUSE; N MiB free there)``, ``(not writable: CAUSE)``, or
    ``(CAUSE)`` where the room is beside the point (an I/O error). An OSError (with the cause's errno), so the
    commands' ``except OSError`` says it in one line."""

    def __init__(self, path: str, detail: str, code: "int | None" = None):
        super().__init__(f"writing {path} failed ({detail})")
        self.filename, self.detail, self.errno = path, detail, code

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # across processes (a pool's worker): OSError's own would call __init__(message)
        return WriteError, (self.filename, self.detail, self.errno)

    def renamed(self, old: str, new: str) -> "WriteError":
        """The same error naming ``new`` for the temporary ``old`` it was written under (the name the user gave)."""
        if self.filename == old or self.filename.startswith(old + os.sep):
            return WriteError(new + self.filename[len(old):], self.detail, self.errno)
        return self


# torch says a full disk as "basic_ios::clear: iostream error" / "unexpected pos N vs M" (inline_container.cc) /
# "PytorchStreamWriter failed writing file"; safetensors as "I/O error: ... (os error 28)". Other RuntimeErrors
# are bugs, not the disk's: they stay tracebacks
_IO_TEXT = re.compile(r"iostream error|inline_container|unexpected pos|PytorchStreamWriter|file write failed|"
                      r"I/O error|IoError|\(os error \d+\)|strerror|No space left|Disk quota", re.IGNORECASE)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
# the same errors as safetensors (Rust: "(os error 13)") and torch ("strerror: Permission denied") say them
_DENIED_TEXT = re.compile(r"os error (?:1|13|30)\)|Permission denied|Read-only file system|Operation not permitted")


def write_failure(e: BaseException) -> bool:
    """Whether ``e`` is a writer's report of a failed write (OSError, or torch's / safetensors' words for one), not
    an out-of-memory error (the commands' own advice) or a bug."""
    if isinstance(e, OSError):
        return True
    from safetensors import SafetensorError
    if not isinstance(e, (RuntimeError, SafetensorError)):
        return False
    from ._validate import out_of_memory
    return not out_of_memory(e) and bool(_IO_TEXT.search(str(e)) or _DENIED_TEXT.search(str(e)))


def not_writable(e: BaseException) -> bool:
    """Whether a failed write was refused by permissions or a read-only filesystem (not a full disk)."""
    return (isinstance(e, OSError) and e.errno in _DENIED) or bool(_DENIED_TEXT.search(str(e)))


def free_space(path: str) -> str:
    """``N MiB`` free on the file system of ``path`` (or of its nearest existing folder)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f} MiB"
    except OSError:
        return "unknown space"


def write_error(path: str, e: BaseException) -> WriteError:
    """``e`` (a :func:`write_failure`) raised while writing ``path``, as a :class:`WriteError`."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError) and isinstance(e.filename, str) and e.filename.startswith(path + os.sep):
        path = e.filename  # the file inside the directory being written
    cause = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip() or type(e).__name__)
    cause = cause.splitlines()[0]
    code = e.errno if isinstance(e, OSError) else None
    if not_writable(e):
        detail = f"not writable: {cause}"
    elif code in (None, errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # the room left, where it may be the cause
        detail = f"{cause}; {free_space(path)} free there"
    else:  # another failure (an I/O error, a folder gone): the room says nothing about it
        detail = cause
    return WriteError(path, detail, code)


@contextlib.contextmanager
def writing(path: str, inside: "str | None" = None) -> Iterator[None]:
    """A failed write in the block (:func:`write_failure`) -> :class:`WriteError` naming ``path``. With ``inside``
    (the folder being written), an OSError naming a file elsewhere (a read of the user's input) stays as it was."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        if not write_failure(e) or (inside is not None and _elsewhere(e, inside)):
            raise
        raise write_error(path, e) from e


def _elsewhere(e: BaseException, folder: str) -> bool:
    name = getattr(e, "filename", None)
    return isinstance(name, str) and not os.path.abspath(name).startswith(os.path.abspath(folder) + os.sep)


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)``, flush ``tmp`` to disk, then rename it over ``path``; the temporary is gone afterwards whatever
    ``write`` raised. The fsync comes before the rename so a power cut cannot leave ``path`` empty. A failed write
    is a :class:`WriteError` naming ``path``."""
    tmp = temporary(path)
    try:
        with writing(path):
            write_as(path, tmp, write)
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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (True when unsure: only provably dead writers are cleaned)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


MOVING = ".electra-fast-moving"  # in a temporary whose entries move up one by one: their names, for the next writer
# in each directory temporary from its first instant: a folder without it (a user's, however named) is never touched
OURS = ".electra-fast-temporary"


@contextlib.contextmanager
def _temporary_dir(tmp: str) -> Iterator[None]:
    """Create ``tmp`` (a name already taken is another writer's: FileExistsError, and it is never removed here), mark
    it as ours and hold an exclusive ``flock`` on it while writing (:func:`_dead_write`), and remove it afterwards,
    whatever happened."""
    os.mkdir(tmp)
    fd = None
    try:
        if fcntl is not None:
            fd = os.open(tmp, os.O_RDONLY)
            _lock(fd, blocking=True)
        open(os.path.join(tmp, OURS), "w").close()
        yield
    finally:
        try:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)  # the lock goes with it


class InUse(Exception):
    """Another open file holds the lock :func:`hold_lock` asked for."""


def hold_lock(path: str) -> "int | None":
    """An exclusive lock on the file or folder ``path`` (``flock``: it ends with the returned descriptor, and with
    its process, in any PID namespace), or None where the platform or the file system has no flock. Raises
    :class:`InUse` while another process holds it, OSError when ``path`` cannot be opened. One job per run folder:
    two writers would mix their records and overwrite each other's files."""
    if fcntl is None:
        return None
    fd = None
    if not os.path.isdir(path):  # NFS emulates flock with a write lock, which a read-only descriptor cannot take
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY) if fd is None else fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise InUse(path) from None
        return None  # a file system without locks (NFS without lockd: ENOLCK) runs the job as a platform without flock
    try:  # still the entry ``path`` names: another job may have removed it (a failed start) and made it again
        held, named = os.fstat(fd), os.stat(path)
        same = (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    except OSError:
        same = False
    if not same:
        os.close(fd)
        raise InUse(path)
    return fd


def _lock(fd: int, blocking: bool) -> bool:
    """An exclusive flock on ``fd`` (True), or False when another open file holds one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def _dead_write(tmp: str, pid: int) -> bool:
    """Whether ``tmp`` is a directory temporary of ours whose writer is gone: it holds :data:`OURS`, and its lock can
    be taken (a writer's lock ends with its process, in any PID namespace: in a container every start has the same
    PID, and a PID says nothing there); without flock, by the PID."""
    if os.path.islink(tmp) or not os.path.isfile(os.path.join(tmp, OURS)):
        return False
    if fcntl is None:
        return not pid_alive(pid)
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _lock(fd, blocking=False)
    finally:
        os.close(fd)


def _sibling(path: str) -> str:
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}.tmp-{os.getpid()}")


def remove_entry(path: str) -> None:
    """Remove the file, link or folder ``path`` (a link itself, never its target); one that will not go (gone
    already, not ours to remove) stays, silently: callers clean up after a failure they are reporting."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)  # as much as will go
        return
    try:
        os.unlink(path)
    except OSError:  # gone already, or it will not go: the write after it says what is in the way
        pass


def remove_dead_writes(path: str, inner: str = ".tmp") -> None:
    """Take back what a killed :func:`write_directory` (``path``, ``inner``) left: its sibling temporary beside a new
    ``path``; inside an empty one, its temporary and the entries it had already moved up from there (the names it
    listed before moving; an entry it never moved is not touched). Only a dead writer's names are touched."""
    path = os.path.normpath(path)
    parent, base = os.path.split(os.path.abspath(path))
    for pattern, folder in ((re.compile(re.escape(f".{base}.tmp-") + r"(\d+)$"), parent),
                            (re.compile(re.escape(f"{inner}-") + r"(\d+)$"), path)):
        try:
            names = os.listdir(folder) if os.path.isdir(folder) else []
        except OSError:
            continue
        for name in names:
            m = pattern.match(name)
            tmp = os.path.join(folder, name)
            if m and os.path.isdir(tmp) and _dead_write(tmp, int(m.group(1))):
                if folder == path:
                    _take_back_moved(path, tmp)
                remove_entry(tmp)


def _take_back_moved(path: str, tmp: str) -> None:
    """Remove the entries a killed writer had moved from ``tmp`` up into ``path`` (those its list names that ``tmp``
    no longer holds), unless it had moved them all: that write was whole, and stays."""
    try:
        with open(os.path.join(tmp, MOVING), encoding="utf-8") as f:
            listed = [n for n in json.load(f) if isinstance(n, str) and n and os.sep not in n and n not in ".."]
    except (OSError, ValueError, TypeError):
        return  # it had not begun moving: nothing of it is in path
    if all(not os.path.lexists(os.path.join(tmp, n)) for n in listed):
        return
    for name in listed:
        if not os.path.lexists(os.path.join(tmp, name)):
            remove_entry(os.path.join(path, name))


def write_directory(path: str, write: Callable[[str], None], inner: str = ".tmp") -> None:
    """``write(tmp)`` fills a new temporary directory, which then becomes ``path``: a failure part way (a full disk,
    an exception) leaves nothing at ``path``. ``path`` must be missing or an empty directory (:func:`vacant`; callers
    say so in their own terms first), so nothing there is ever replaced. A new ``path`` is the sibling
    ``.NAME.tmp-PID`` renamed (the same file system). An empty ``path`` stays (it may be a link, a mount point, the
    working directory, a folder with its own owner or ACL): the temporary is ``path/INNER-PID`` and its entries move
    up, one rename each, folders first (a loader's config file last); only a kill can leave part of them there, and
    the next call takes that back (:func:`remove_dead_writes`, as it removes a killed writer's temporary). A failed
    write is a :class:`WriteError` naming ``path``."""
    if not path.strip():
        raise ValueError("write_directory: empty path")
    path = os.path.normpath(path)  # "a/", "a/.": basename "" or "." would name the temporary
    remove_dead_writes(path, inner)
    if not vacant(path):
        raise FileExistsError(f"{path} is not a new or empty directory")
    if os.path.isdir(path):
        return _write_inside(path, write, inner)
    tmp = _sibling(path)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    with _temporary_dir(tmp):
        write_as(path, tmp, write)
        os.unlink(os.path.join(tmp, OURS))  # the folder it becomes holds only what write() wrote
        try:
            os.replace(tmp, path)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another writer made path meanwhile: never replaced
                raise FileExistsError(f"{path} was made while it was being written; nothing replaced") from None
            raise write_error(path, e) from e


def write_as(path: str, tmp: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` for the temporary ``tmp`` of ``path``: a failed write is the :class:`WriteError` of ``path``
    (or of the file inside it), the name the caller gave, not the temporary's."""
    try:
        with writing(tmp):
            write(tmp)
    except WriteError as e:
        raise e.renamed(tmp, path) from e.__cause__


def _write_inside(path: str, write: Callable[[str], None], inner: str) -> None:
    """:func:`write_directory` into the empty folder ``path`` that stays: written in ``path/INNER-PID``, whose
    entries then move up, after the list of them (:data:`MOVING`) that lets the next call take back a killed move."""
    tmp = os.path.join(path, f"{inner}-{os.getpid()}")
    with _temporary_dir(tmp):
        write_as(path, tmp, write)
        names = sorted((n for n in os.listdir(tmp) if n not in (MOVING, OURS)),
                       key=lambda n: (not os.path.isdir(os.path.join(tmp, n)), n))  # a loader's config file last
        write_text(os.path.join(tmp, MOVING), json.dumps(names))  # what a kill below leaves moved is known
        moved = []
        try:
            for name in names:
                # another writer may have filled path meanwhile: refuse rather than replace its files
                if os.path.lexists(os.path.join(path, name)):
                    raise FileExistsError(f"{path} gained {name} while it was being written; nothing replaced")
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
                moved.append(name)
        except BaseException:
            for name in moved:  # whole or nothing: what moved up goes too
                remove_entry(os.path.join(path, name))
            raise


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
