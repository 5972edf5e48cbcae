"""Temporaries: a file or folder a process writes under a name carrying its PID, then renames into place.

A kill -9 leaves such a name behind; a later start removes it once its writer is provably gone: its process has
ended, or the caller holds the folder's lock (a pretraining run's ``flock``), so no writer of those names is left
whatever its PID (in a container every start has the same PID: a dead job's PID is often the new job's own). Each
owner (``checkpoint``, ``data``, ``rundir``) passes the exact pattern of the names it creates, so nothing else is
touched.
"""
from __future__ import annotations

import os
from typing import Pattern

from .._files import pid_alive, remove_entry

__all__ = ["pid_alive", "remove_dead_temporaries"]


def remove_dead_temporaries(directory: str, pattern: Pattern[str], locked: bool = False) -> None:
    """Delete the entries of ``directory`` matching ``pattern`` whose writer (the PID in the pattern's last group)
    is no longer running; with ``locked`` (the caller holds the lock every writer there takes, and has written
    nothing yet), all of them."""
    try:
        names = os.listdir(directory) if os.path.isdir(directory) else []
    except OSError:  # not ours to read: nothing there is touched
        return
    for name in names:
        m = pattern.match(name)
        if m is None or (not locked and pid_alive(int(m.groups()[-1]))):
            continue
        remove_entry(os.path.join(directory, name))  # one not ours to remove (a run read by export) stays
