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
