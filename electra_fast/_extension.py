"""Loads the compiled C++ extension ``electra_fast._C`` without ever breaking ``import electra_fast``.

The extension registers its kernels as ops in the ``electra_fast_cpp`` torch.library namespace
(``torch.ops.electra_fast_cpp.<name>``). A missing build, or one compiled against another torch
(undefined symbols), leaves ``EXTENSION_ERROR`` set and CPU calls fall back to the reference.
"""
from __future__ import annotations

import os

import torch

EXTENSION_ERROR: str | None = None
EXTENSION_PATH: str | None = None

try:
    from . import _C  # noqa: F401  (registers torch.ops.electra_fast_cpp.*)

    EXTENSION_PATH = getattr(_C, "__file__", None)
except Exception as exc:  # noqa: BLE001 - ImportError, OSError (bad symbols), anything
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

if EXTENSION_ERROR is None and os.environ.get("ELECTRA_FAST_DISABLE_EXT", "0") == "1":
    EXTENSION_ERROR = "disabled by ELECTRA_FAST_DISABLE_EXT=1"


def extension_loaded() -> bool:
    return EXTENSION_ERROR is None


def cpp_op(name: str):
    """The C++ kernel ``torch.ops.electra_fast_cpp.<name>``, or None when it is not built."""
    if EXTENSION_ERROR is not None:
        return None
    try:
        return getattr(torch.ops.electra_fast_cpp, name)
    except (AttributeError, RuntimeError):
        return None
