"""The run directory (``--out``): which folders a job may write into, and what a killed job left behind.

A folder is one of our runs when it holds the marker ``.electra-fast-run`` (written when a job claims the folder,
before anything else) or our ``run.json`` (runs from before the marker). A job writes only the names in ``OWNED``, so:

- a missing ``--out`` is created and claimed; an empty folder is claimed;
- a run of ours is continued with ``--resume`` and refused without it once it holds a run (run.json, metrics,
  checkpoints); a run that never got that far (a kill during tokenisation) is simply reused;
- any other non-empty folder is refused unless ``allow_nonempty`` (``--allow-nonempty-out``), and even then when it
  already holds one of the names in ``OWNED``: nothing the user made is ever overwritten;
- a file, or a folder the job cannot write to (``--out``, or its ``checkpoints/`` or ``cache/``), is refused, and so
  is a folder inside a run's checkpoint (:func:`.checkpoint.inside_checkpoint`).

Every refusal is a :class:`PretrainError` naming ``--out`` and raised before anything is written.

A kill -9 can leave temporaries (``NAME.tmp-PID``) in ``--out``, ``cache/`` and ``checkpoints/``; the next start
removes them as soon as it holds the run's lock, before anything can refuse (:func:`remove_stale_temporaries`:
whatever their PID, as a container's every start has the same one), and ``export`` does when no job holds the lock
(:func:`clean_if_idle`); only names matching their writer's pattern.

A job that fails before its first checkpoint takes back what it created (:func:`run_files` before, :func:`take_back`
after), so a rerun needs no ``--resume``; a resumed job drops the metrics logged after its checkpoint
(:func:`truncate_metrics`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

from .. import _files
from .._files import write_text
from . import checkpoint as ckpt
from .data import CACHE_TEMPORARY
from .errors import PretrainError
from .temporaries import remove_dead_temporaries

MARKER = ckpt.RUN_MARKER
OWNED = (MARKER, "run.json", "metrics.jsonl", "checkpoints", "cache", "tensorboard", "curves.png")
_HAS_RUN = ("run.json", "metrics.jsonl")
TEMPORARY = re.compile(r"^(?:run\.json|metrics\.jsonl|curves\.png)\.tmp-(\d+)$")  # the job's atomic rewrites in --out


def claim_lock(out: str) -> "int | None":
    """An exclusive lock on ``out``'s marker for this job (:func:`.._files.hold_lock`: the descriptor; closing it
    releases the lock), or None where the platform has no ``flock``. A second job on the same ``--out`` is refused:
    two writers would mix their records and checkpoints."""
    _write_marker(out)  # runs from before the marker get one
    try:
        return _files.hold_lock(os.path.join(out, MARKER))
    except _files.InUse:
        raise PretrainError(f"--out: {out} is in use by another electra-fast pretrain job; wait for it to end or "
                            "choose another --out") from None
    except OSError as e:
        raise PretrainError(f"--out: cannot open {os.path.join(out, MARKER)}: {e.strerror}") from None


def prepare(out: str, *, resume: bool, allow_nonempty: bool = False, claim: bool = True) -> None:
    """Check that ``out`` may hold this job's run (see the module docstring) and, with ``claim`` (the writing
    process), create it if missing and write the marker."""
    inside = ckpt.inside_checkpoint(out)
    if inside:
        raise PretrainError(f"--out: {inside}")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise PretrainError(f"--out: {out} exists and is not a directory")
    if not os.path.isdir(out):
        if claim:
            try:
                os.makedirs(out)
            except FileExistsError:  # another process created it meanwhile: check it like an existing one
                return prepare(out, resume=resume, allow_nonempty=allow_nonempty, claim=claim)
            except OSError as e:
                raise PretrainError(f"--out: cannot create {out}: {e.strerror}") from None
            _write_marker(out)
        return
    try:
        names = sorted(os.listdir(out))
    except OSError as e:
        raise PretrainError(f"--out: cannot read {out}: {e.strerror}") from None
    ours = MARKER in names or ("run.json" in names and _is_our_run_json(os.path.join(out, "run.json")))
    ckpts = os.path.join(out, "checkpoints")
    has_run = any(n in names for n in _HAS_RUN) or (os.path.isdir(ckpts) and bool(os.listdir(ckpts)))
    if ours and has_run and not resume:
        raise PretrainError(f"--out: {out} already holds a run (run.json / checkpoints / metrics.jsonl); pass "
                            "--resume to continue it or choose another --out")
    if not ours and names:
        if not allow_nonempty:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise PretrainError(f"--out: {out} is not empty ({shown}) and holds no electra-fast run; choose a new or "
                                "empty directory, or pass --allow-nonempty-out to put the run next to those files")
        # our names, and names our start-up cleaning would delete as a dead job's temporaries: never a user's file
        clash = [n for n in names if n in OWNED or TEMPORARY.match(n)]
        if clash:
            raise PretrainError(f"--out: {out} already has {', '.join(clash)}, not created by electra-fast; the run "
                                "would write there: choose another --out")
    if ours:
        _check_kinds(out, names)
    _check_writable(out)
    if claim and not ours:
        _write_marker(out)


_FILES, _DIRS = ("run.json", "metrics.jsonl", MARKER), ("checkpoints", "cache", "tensorboard")


def _check_kinds(out: str, names) -> None:
    """Each of our names in a run of ours is what the job writes there (a file or a folder): a user's folder
    called metrics.jsonl is refused here, not met later by an open() in the middle of the run."""
    for name in names:
        path = os.path.join(out, name)
        if name in _FILES and (os.path.isdir(path) or (os.path.lexists(path) and not os.path.isfile(path))):
            raise PretrainError(f"--out: {path} should be the run's {name} file but is not a regular file; move it "
                                "away or choose another --out")
        if name in _DIRS and not os.path.isdir(path):
            raise PretrainError(f"--out: {path} should be the run's {name}/ folder but is not a directory; move it "
                                "away or choose another --out")


def _check_writable(out: str) -> None:
    """``out`` and its folders the job writes into must be writable: found now, not when the first checkpoint fails
    after every step ran."""
    for path in (out, os.path.join(out, "checkpoints"), os.path.join(out, "cache")):
        if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            raise PretrainError(f"--out: {path} is not writable")


def _is_our_run_json(path: str) -> bool:
    """A ``run.json`` this job wrote (runs from before the marker): a JSON object with our run id and inputs."""
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and isinstance(run.get("run_id"), str) and "inputs" in run


def is_vacant(out) -> bool:
    """Whether ``out`` is missing or an empty directory (one that cannot be listed is not)."""
    return _files.vacant(out)


def is_claimed(out) -> bool:
    """Whether a job of ours claimed ``out`` (its marker is there)."""
    return os.path.isfile(os.path.join(os.fspath(out), MARKER))


def _write_marker(out: str) -> None:
    try:
        with open(os.path.join(out, MARKER), "x", encoding="utf-8") as f:  # "x": never over a file
            json.dump({"created_by": "electra-fast pretrain", "created": time.time()}, f)
    except FileExistsError:
        pass
    except OSError as e:
        raise PretrainError(f"--out: {out} is not writable ({e.strerror})") from None


def remove_stale_temporaries(out: str, locked: bool = False) -> None:
    """Remove what killed jobs left half-written in the run directory ``out``: with ``locked`` (this process holds
    the run's lock, :func:`claim_lock`, and has written nothing yet) every temporary there, else those whose process
    is gone."""
    remove_dead_temporaries(out, TEMPORARY, locked)
    remove_dead_temporaries(os.path.join(out, "cache"), CACHE_TEMPORARY, locked)
    remove_dead_temporaries(os.path.join(out, "checkpoints"), ckpt.TMP_DIR, locked)


def clean_if_idle(out: str) -> None:
    """:func:`remove_stale_temporaries` of the run ``out`` for a command that only reads it (``export``): under the
    run's lock, taken for the moment, when no job holds it (a run killed during its last retention left a whole
    checkpoint as ``.del-step-*``, which no ``--resume`` of the finished run would remove); by their PIDs where
    there is no lock to take (no marker: a run from before it; no ``flock``); not at all while a job runs."""
    try:
        import fcntl
        f = open(os.path.join(out, MARKER), "rb")
    except (ImportError, OSError):
        return remove_stale_temporaries(out)
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a job is running there: its temporaries are live
            return
        remove_stale_temporaries(out, locked=True)


RUN_FILES = ("run.json", "metrics.jsonl", "tensorboard", "checkpoints", "curves.png")
KEPT_UNLESS_EMPTY = ("cache", "")  # cache/ is content-keyed (a retry reuses it); "": --out itself


def run_files(out: str):
    """The run's names not yet in ``out``, and its checkpoints: what :func:`take_back` compares against."""
    return ([n for n in RUN_FILES + (MARKER,) + KEPT_UNLESS_EMPTY if not os.path.lexists(os.path.join(out, n))],
            ckpt.checkpoint_dirs(os.path.join(out, "checkpoints")))


def take_back(out: str, before) -> None:
    """A job that failed before writing a checkpoint leaves nothing a rerun would have to ``--resume``: it removes
    the run files it created (and the directories it created, if empty), never anything that was there before.
    Its marker in a folder it did not make goes too, with the cache it made there: the marker would make the
    user's folder count as a run's (later jobs would skip ``--allow-nonempty-out`` and its check of our names)."""
    absent, checkpoints = before
    if ckpt.checkpoint_dirs(os.path.join(out, "checkpoints")) != checkpoints:
        return  # this job wrote a checkpoint: the run is resumable as it stands
    claimed_theirs = MARKER in absent and "" not in absent
    for name in absent:
        path = os.path.join(out, name)
        try:
            if name == "" and os.listdir(path) == [MARKER]:
                os.unlink(os.path.join(path, MARKER))  # this job made --out: its claim goes with it
            if name == MARKER:
                if claimed_theirs:
                    os.unlink(path)
            elif name in KEPT_UNLESS_EMPTY and not (name == "cache" and claimed_theirs):
                os.rmdir(path)  # only when empty: the content-keyed cache/ stays for a retry in a folder of ours
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        except OSError:  # not there, not empty: keep it, and never hide the failure being reported
            pass


def truncate_metrics(path: str, step: int) -> None:
    """Keep only the records up to ``step`` (a resumed run re-logs what came after its checkpoint)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, "rb") as f:  # decoded line by line: a line a kill cut mid-character is dropped like any torn one
        for raw in f:
            try:
                line = raw.decode("utf-8")
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    write_text(path, "".join(keep))
