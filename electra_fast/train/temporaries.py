"""Temporaries: a file or folder a process writes under a name carrying its PID, then renames into place.

A kill -9 leaves such a name behind; a later start removes it once its writer is provably gone. Each owner
(``checkpoint``, ``data``, ``rundir``) passes the exact pattern of the names it creates, so nothing else is touched.
"""
from __future__ import annotations

import os
import shutil
from typing import Pattern


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


def remove_dead_temporaries(directory: str, pattern: Pattern[str]) -> None:
    """Delete the entries of ``directory`` matching ``pattern`` whose writer (the PID in the pattern's last group)
    is no longer running."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        m = pattern.match(name)
        if m is None or pid_alive(int(m.groups()[-1])):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
