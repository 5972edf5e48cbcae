"""Ctrl-C / SIGTERM / SIGHUP during pretraining: finish the step, write a checkpoint, stop (see :class:`Signals`)."""
from __future__ import annotations

import os
import signal
from typing import Callable

from .errors import InterruptedAgain


def stop_signals() -> list:
    """The signals that ask a job to stop cleanly besides Ctrl-C: SIGTERM (a scheduler, kill) and SIGHUP (its
    terminal closed, whose default action killed the job with nothing saved), SIGHUP unless the process ignores it
    (nohup: a closed terminal must not stop the job). SIGQUIT keeps its default, a core dump: Ctrl-\\
    asks for one, to see where the process was."""
    hup = getattr(signal, "SIGHUP", None)  # not on Windows
    return [signal.SIGTERM] + ([hup] if hup is not None and signal.getsignal(hup) != signal.SIG_IGN else [])


class Signals:
    """SIGINT and the :func:`stop_signals` set a flag: the loop finishes its step, checkpoints and stops. A second
    SIGINT before that checkpoint raises InterruptedAgain (no checkpoint); while one is being written (``saving``) it
    is ignored."""

    def __init__(self, loud: bool = True):
        self.caught, self.saving, self.loud, self._old = None, False, loud, {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, *stop_signals()):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.caught is None:
            self.caught = signal.Signals(signum).name
            if self.loud:  # os.write: safe whatever the interrupted code was printing
                try:  # a closed or hung-up stderr must not cancel the checkpoint this promises
                    os.write(2, f"\n{self.caught}: finishing this step, then saving a checkpoint "
                                "(Ctrl-C again stops without one)\n".encode())
                except OSError:
                    pass
        elif signum == signal.SIGINT and not self.saving:
            raise InterruptedAgain("interrupted again: stopping without a checkpoint")

    def writing(self, save: Callable[[int], str], step: int) -> str:
        """``save(step)`` with a second Ctrl-C ignored until the checkpoint is complete."""
        self.saving = True
        try:
            return save(step)
        finally:
            self.saving = False

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class TermInterrupts:
    """The :func:`stop_signals` raise KeyboardInterrupt inside (main thread only), as Ctrl-C does: a job stopped
    while it prepares (training a tokenizer, tokenising) takes back what it wrote, where the default action killed
    it with its marker left in the user's folder, which later jobs then took for a run's."""

    def __enter__(self):
        import threading
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in stop_signals()}
        return self

    @staticmethod
    def _handle(signum, frame):
        raise KeyboardInterrupt(f"interrupted by {signal.Signals(signum).name} before training started")

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Uninterrupted:
    """Ctrl-C ignored inside (main thread only): a clean-up that stops half-way leaves a state no command expects
    (a run record without the files beside it)."""

    def __enter__(self):
        import threading
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
