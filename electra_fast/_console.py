"""The commands' output streams."""
from __future__ import annotations

import sys


def paths_printable() -> None:
    """A POSIX path may hold bytes that are not UTF-8 (a str holds them as surrogates): messages that name one show
    them escaped, as Python's stderr does by default, instead of ending in a UnicodeEncodeError (stdout is strict
    under a UTF-8 locale). Called by each command's entry point, not at import."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def help_text(doc) -> str:
    """The first paragraph of a module's docstring, for a command's ``--help``; empty under ``python -OO``, which
    strips docstrings (``__doc__`` is None)."""
    return (doc or "").split("\n\n")[0]


def say(message: str) -> None:
    """``message`` on stderr, where the commands' messages go; never raises. A stderr that is closed (None: started
    with ``2>&-``) or cannot be written (its reader gone: EPIPE; its descriptor closed: EBADF; a hung-up terminal:
    EIO) loses the message, never the work it is about: training that raised here lost everything since its last
    checkpoint."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(f"{message}\n")
        stream.flush()
    except (OSError, ValueError):  # ValueError: a closed file object
        pass


class _ProgressStream:
    """sys.stderr as it is at each write (a test's capture, a redirect made later), for progress bars: the first
    write that fails turns the bar's output off for good, where tqdm let every error but EIO through into the
    training loop. tqdm asks its stream for more (encoding, fileno for the terminal's width): sys.stderr's."""

    def __init__(self):
        self.failed = False

    def write(self, text: str) -> int:
        self._call("write", text)
        return len(text)

    def flush(self) -> None:
        self._call("flush")

    def _call(self, name: str, *args) -> None:
        if not self.failed and sys.stderr is not None:
            try:
                getattr(sys.stderr, name)(*args)
            except (OSError, ValueError):
                self.failed = True

    def __getattr__(self, name: str):
        return getattr(sys.stderr, name)


def progress_bar(tqdm, enabled: bool, **kwargs):
    """A ``tqdm`` (the class given) progress bar on stderr that never stops the work it shows: off when stderr is
    closed, silent from its first failed write. A notebook's widget bar (``tqdm.auto``) keeps sys.stderr itself as
    its stream: that is how tqdm knows it may draw the widget (which writes nothing to stderr)."""
    widget = getattr(sys.modules.get("tqdm.notebook"), "tqdm_notebook", None)
    stream = sys.stderr if widget is not None and issubclass(tqdm, widget) else _ProgressStream()
    return tqdm(file=stream, disable=not enabled or sys.stderr is None, **kwargs)


_failed_stdout: list = []  # [(the stdout, its first failed write's error)], read and cleared by settle_stdout


def show(text: str) -> None:
    """``text`` on stdout, flushed now: a command's result, printed once its work is done. A stdout that cannot take
    it (a full disk, ``| head`` gone, a hung-up terminal) raises nothing here, where the commands' error handling
    reported "No space left on device" as if the work had failed: :func:`settle_stdout` says what happened."""
    stream = sys.stdout
    if stream is None:  # closed (1>&-): print() drops the text silently, as here
        return
    try:
        stream.write(f"{text}\n")
        stream.flush()  # a failure now, not at the interpreter's flush at exit (status 120, "Exception ignored")
    except (OSError, ValueError) as e:
        if not _failed_stdout:
            _failed_stdout.append((stream, e))


def settle_stdout(prog: str, status: int, output_is_the_work: bool = False, error: "BaseException | None" = None,
                  exiting: bool = True) -> int:
    """The exit status of a command that ended with ``status``, once stdout is settled: what print() left in its
    buffer is flushed, and a stdout that failed (here, in :func:`show`, or ``error``) is pointed at os.devnull, as
    Python's documentation advises for SIGPIPE, so that the interpreter's own flush at exit cannot fail again (exit
    status 120). A stderr that failed is pointed there too. One line on stderr says so, unless the reader left on
    purpose (EPIPE: it read what it wanted). A command whose work is done keeps its status (its files are complete:
    a script must not redo or discard them); one whose output is its work (info, the demo) exits 1, as Python does
    on EPIPE. ``exiting=False`` (a command run from a Python caller, ``cli.main(argv)``): the descriptors stay as they
    are, the caller's to settle (its later output would have gone to os.devnull)."""
    stream, failed = _failed_stdout.pop() if _failed_stdout else (sys.stdout, None)
    error = error or (failed if stream is sys.stdout else None)  # one since replaced (a test's capture): not ours
    if error is None and sys.stdout is not None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError) as e:
            error = e
    if sys.stderr is not None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            if exiting:
                _to_devnull(sys.stderr)
    if error is None:
        return status
    if exiting:
        _to_devnull(sys.stdout)
    if not isinstance(error, BrokenPipeError):
        what = "error" if output_is_the_work else "note"
        done = "" if output_is_the_work or status else "; the work is complete, only what it printed is lost"
        say(f"{prog}: {what}: stdout could not be written ({getattr(error, 'strerror', None) or error}){done}")
    return (status or 1) if output_is_the_work else status


def _to_devnull(stream) -> None:
    """Point ``stream``'s file descriptor at os.devnull (one without a descriptor, a test's capture, stays)."""
    import os
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def hold_standard_descriptors() -> None:
    """A standard descriptor closed at the start (``2>&-``) is the number the next file opened gets: the signal
    handler's message, and C libraries writing to stderr, then went into that file (a run's lock file, its metrics).
    os.devnull holds each closed one instead (sys.stderr stays None: Python decided at start). Called by the
    command line's entry point, not at import."""
    import os
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # open() takes the lowest free number: fd itself, the ones below are open by now
            os.open(os.devnull, os.O_RDWR)
