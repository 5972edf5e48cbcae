"""Crash-safe checkpoints: ``<out>/checkpoints/step-XXXXXXXX/``.

A checkpoint is written into ``.tmp-step-XXXXXXXX-<pid>/`` (every file fsynced), closed by ``meta.json``
(step, run id, sha256 of every file), then renamed into place and the parent directory fsynced. A kill at
any instant therefore leaves either no new directory or a complete one, and the previous checkpoints
untouched. Loading verifies the checksums and skips (with a warning) anything corrupt or partial.

Retention (``keep``): after each save, the ``keep`` newest checkpoints that verify are kept, and always the one just
written; older complete ones are deleted (renamed to ``.del-step-...-<pid>`` first, so a kill mid-delete leaves no
half-deleted ``step-*``). Corrupt or partial ones are never counted and never deleted: they are renamed to
``step-XXXXXXXX.corrupt`` (``.corrupt-2``, ...), which resume and export ignore, and left for the user to inspect.
Retention therefore never removes the last complete checkpoint. Only a checkpoint's own files are ever deleted: one
that holds anything else (a fine-tuning run saved inside it) is kept whole, with a warning.

Files: ``model.safetensors`` (ElectraPretrainingModel state dict, tied tensors saved once per name),
``training_state.pt`` (optimizer, scheduler, scaler, RNG states, step, data position), ``config.json``
(ElectraConfig), ``tokenizer.json``, ``meta.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .._files import free_space, not_writable, unused, write_failure
from .._validate import reason
from .errors import PretrainError
from .temporaries import remove_dead_temporaries

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_DIR = re.compile(r"^\.(?:tmp|del)-step-\d{8}-(\d+)$")  # being written / being deleted by that PID
FILES = ("model.safetensors", "training_state.pt", "config.json", "tokenizer.json")
OWN = FILES + ("meta.json",)  # every name a checkpoint directory holds: what retention may delete
RUN_MARKER = ".electra-fast-run"  # in a run folder, claimed by a job (electra_fast/train/rundir.py)
RUN_FILES = (RUN_MARKER, "run.json")  # what makes a folder a run's: its marker, or its record


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems refuse directory fsync; the rename is still atomic
        pass


def checkpoint_dirs(root: str) -> List[Tuple[int, str]]:
    """(step, path) of every ``step-*`` directory under ``root``, newest first (unverified)."""
    if not os.path.isdir(root):
        return []
    out = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := STEP_DIR.match(n))]
    return sorted(out, reverse=True)


def save(root: str, step: int, run_id: str, writers: Dict[str, Callable[[str], None]],
         keep: Optional[int] = None, hook: Optional[Callable[[str], None]] = None, warn=print) -> str:
    """Write one checkpoint, then apply retention (``keep``, see the module docstring). ``writers`` maps each name
    in FILES to a function writing that file at the given path. ``hook(stage)`` (tests) is called between stages.
    Returns the checkpoint's path."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    why = verify(final) if os.path.isdir(final) else None
    if os.path.isdir(final) and why is None:
        return final  # this step is already saved (e.g. the end-of-run save right after a periodic one)
    tmp = os.path.join(root, f".tmp-step-{step:08d}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    name = os.path.basename(tmp)  # what was being written, for the message
    try:
        os.makedirs(tmp)
        sums = {}
        for name in FILES:
            path = os.path.join(tmp, name)
            writers[name](path)
            _fsync_file(path)
            sums[name] = _sha256(path)
            if hook:
                hook(name)
        name = "meta.json"
        meta = {"format": 1, "step": step, "run_id": run_id, "sha256": sums}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if hook:
            hook("meta")
    except Exception as e:  # a full disk: torch says "iostream error", safetensors "os error 28"
        shutil.rmtree(tmp, ignore_errors=True)
        if not write_failure(e):  # out of memory (the command's own advice), or a bug: as it is
            raise
        denied = not_writable(e)
        fix = "make it writable" if denied else "free some space"
        then = (f"the earlier checkpoints are kept: {fix}, then --resume" if checkpoint_dirs(root)
                else f"no checkpoint was written yet: {fix}, then run the command again")
        cause = f"not writable: {reason(e)}" if denied else f"{reason(e)}; {free_space(root)} free there"
        raise PretrainError(f"checkpoint step-{step:08d}: writing {name} in {root} failed ({cause}); {then}") from e
    if os.path.isdir(final):  # a corrupt directory of the same step: move it aside, never lose it silently
        _set_aside(final, why, warn)
    os.replace(tmp, final)
    _fsync_dir(root)
    _VERIFIED[final] = _file_stats(final)  # its checksums were just taken from these very files
    if hook:
        hook("renamed")
    if keep is not None and keep > 0:
        prune(root, keep, protect=final, hook=hook, warn=warn)
    return final


def prune(root: str, keep: int, protect: Optional[str] = None, hook: Optional[Callable[[str], None]] = None,
          warn=print) -> None:
    """Keep the ``keep`` newest complete checkpoints and ``protect``; delete older complete ones; set corrupt or
    partial ones aside. ``hook("prune ...")`` (tests) is called after each action."""
    complete = 0
    for _, path in checkpoint_dirs(root):
        why = verify(path)
        if why is not None:
            if path != protect:
                _set_aside(path, why, warn)
                if hook:
                    hook(f"prune set-aside {path}")
            continue
        complete += 1
        if complete <= keep or path == protect:
            continue
        others = _others(path)
        if others:
            _keep_whole(path, others, warn)
            continue
        doomed = os.path.join(root, f".del-{os.path.basename(path)}-{os.getpid()}")
        os.replace(path, doomed)  # atomic: from here on no step-* name refers to a half-deleted checkpoint
        _VERIFIED.pop(path, None)  # a long-lived process saving every step kept one entry per checkpoint ever written
        _fsync_dir(root)
        if hook:
            hook(f"prune renamed {path}")
        _delete_own(doomed, path)
        if hook:
            hook(f"prune deleted {path}")


def _others(path: str) -> List[str]:
    """The entries of checkpoint ``path`` that are not its own files (a user's run saved inside it), sorted; a
    checkpoint that is a symbolic link is kept whole (deleting its files would empty the folder it points to)."""
    if os.path.islink(path):
        return [f"(a symbolic link to {os.path.realpath(path)})"]
    try:
        return sorted(n for n in os.listdir(path) if n not in OWN or not os.path.isfile(os.path.join(path, n)))
    except OSError as e:  # cannot tell what it holds: nothing there is deleted
        return [f"(unlistable: {e.strerror})"]


_KEPT_WHOLE: set = set()  # checkpoints retention kept for a user's entries: warned once per process, not per save


def _keep_whole(path: str, others: List[str], warn) -> None:
    if path in _KEPT_WHOLE:
        return
    _KEPT_WHOLE.add(path)
    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    warn(f"warning: --keep: kept checkpoint {path}, older than the ones --keep keeps: it also holds {shown}, not "
         "written by the run (retention deletes only a checkpoint's own files); move those out, then delete it")


def _delete_own(doomed: str, path: str) -> None:
    """Delete the renamed checkpoint ``doomed``: its own files, then the folder only if that left it empty (an entry
    added since it was checked goes back, unharmed, as the partial checkpoint ``path``, set aside by the next
    retention)."""
    for name in OWN:
        try:
            os.unlink(os.path.join(doomed, name))
        except OSError:  # as the delete it replaces: a file that will not go is left, the run goes on
            pass
    try:
        os.rmdir(doomed)
    except OSError:
        os.replace(doomed, unused(path))


def _set_aside(path: str, why: str, warn) -> None:
    """Rename a corrupt or partial checkpoint to ``<path>.corrupt[-N]``: out of resume's and retention's way, kept."""
    aside = unused(path + ".corrupt")
    os.replace(path, aside)
    _VERIFIED.pop(path, None)
    _fsync_dir(os.path.dirname(path))
    warn(f"warning: checkpoint {path} is corrupt or partial ({why}): moved to {aside} (not counted against "
         "--keep, never deleted; remove it yourself when done with it)")


# path -> its files' (inode, size, mtime) when it last verified: retention checks every checkpoint at each save,
# and re-hashing gigabytes of unchanged files each time would cost more than the save
_VERIFIED: Dict[str, tuple] = {}


def _file_stats(path: str) -> Optional[tuple]:
    try:
        return tuple((n, st.st_ino, st.st_size, st.st_mtime_ns)
                     for n in FILES + ("meta.json",) for st in (os.stat(os.path.join(path, n)),))
    except OSError:
        return None


def verify(path: str) -> Optional[str]:
    """None when ``path`` is a complete, uncorrupted checkpoint, else the reason it is not."""
    stats = _file_stats(path)
    if stats is not None and _VERIFIED.get(path) == stats:
        return None
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        sums = meta["sha256"]
        if not isinstance(sums, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return "meta.json missing or unreadable"
    for name in FILES:
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"{name} missing"
        if _sha256(p) != sums.get(name):
            return f"{name} does not match its checksum"
    if stats is not None:
        _VERIFIED[path] = stats
    return None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
        return json.load(f)


def newest_complete(root: str, warn=print) -> Optional[str]:
    """The newest checkpoint under ``root`` that verifies; corrupt ones are skipped with a warning."""
    for _, path in checkpoint_dirs(root):
        why = verify(path)
        if why is None:
            return path
        warn(f"warning: skipping corrupt or partial checkpoint {path}: {why}")
    return None


def remove_stale_temporaries(root: str) -> None:
    """Delete the ``.tmp-step-*`` / ``.del-step-*`` directories of killed runs (only names this module creates,
    only those whose process is gone)."""
    remove_dead_temporaries(root, TMP_DIR)


def _checkpoint_above(path: str) -> Optional[str]:
    """The checkpoint directory (``checkpoints/step-N``) that ``path`` is in (or is), else None."""
    path = os.path.realpath(path)
    while True:
        up = os.path.dirname(path)
        if STEP_DIR.fullmatch(os.path.basename(path)) and os.path.basename(up) == "checkpoints":
            return path
        if up == path:
            return None
        path = up


def inside_checkpoint(out: str) -> Optional[str]:
    """Why a command may not write its output directory ``out`` (every command's --out / OUT_DIR checks it): it is
    inside a run's checkpoint, a folder of the run's own files that its --keep deletes (or, holding anything else,
    must keep for good). None when it is not."""
    inside = _checkpoint_above(out)
    run = None if inside is None else os.path.dirname(os.path.dirname(inside))
    # a run's checkpoint, written or to come (its run folder's marker / run.json), not a folder merely so named
    if inside is None or not (any(os.path.exists(os.path.join(inside, n)) for n in OWN)
                              or any(os.path.exists(os.path.join(run, n)) for n in RUN_FILES)):
        return None
    return (f"{out} is inside checkpoint {inside}, which holds only the run's own files (its --keep deletes old "
            "ones); choose a directory outside checkpoints/")


def resolve(path: str, warn=print) -> str:
    """A checkpoint directory, or a run's output directory (-> its newest complete checkpoint)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "meta.json")):
        why = verify(path)
        if why:
            raise PretrainError(f"checkpoint {path} is corrupt or partial: {why}")
        return path
    skipped: list = []  # said only next to a checkpoint that is used; with none, the error names them itself
    for root in (os.path.join(path, "checkpoints"), path):
        found = newest_complete(root, skipped.append)
        if found:
            for line in skipped:
                warn(line)
            return found
    why = "; ".join(s.replace("warning: skipping ", "") for s in skipped)
    raise PretrainError(f"no complete checkpoint found in {path}" + (f" (skipped {why})" if why else ""))


def load_config(path: str):
    """The ``config.json`` of checkpoint ``path`` as an ElectraConfig; unreadable or invalid -> PretrainError."""
    from ..models import ElectraConfig
    file = os.path.join(path, "config.json")
    try:
        return ElectraConfig.from_json_file(file)
    except (OSError, ValueError, TypeError) as e:  # a checksum-consistent but hand-edited or foreign file
        raise PretrainError(f"checkpoint {path}: config.json is not a valid ElectraConfig: "
                            f"{reason(e)}") from None


# ---------------------------------------------------------------------------------------- state I/O
def save_model(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import save_file
    # clone: tied parameters share storage, which safetensors refuses; loading re-ties them by name
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}, path,
              metadata={"format": "pt"})


def load_model_state(model: torch.nn.Module, path: str) -> None:
    """Load ``model.safetensors`` into ``model``; bytes that are no safetensors file (its checksum can match: a
    foreign file with its meta.json rewritten), or weights that do not fit its config -> PretrainError."""
    state = _read(path)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:  # wrong shapes / names
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        first = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        first = first if len(first) <= 200 else first[:197] + "..."
        raise PretrainError(f"checkpoint {os.path.dirname(path)}: model.safetensors does not fit config.json "
                            f"({first})") from None


def save_training_state(state: dict, path: str) -> None:
    torch.save(state, path)


# what resuming reads from training_state.pt
STATE_KEYS = ("step", "data_position", "tokens_seen", "optimizer", "scheduler", "scaler", "rng")


def load_training_state(path: str) -> dict:
    state = _read(path)
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing or not all(isinstance(state[k], int) and state[k] >= 0 for k in STATE_KEYS[:3]):
        raise PretrainError(f"checkpoint {os.path.dirname(path)}: training_state.pt is not an electra-fast training "
                            f"state ({'no ' + ', '.join(missing) if missing else 'a step / position not a count'})")
    return state


def _read(path: str):
    from ..models.interop import CheckpointError, load_weights
    try:
        return load_weights(path, "checkpoint file")
    except (CheckpointError, OSError) as e:
        raise PretrainError(f"checkpoint {os.path.dirname(path)}: {reason(e)}") from None
