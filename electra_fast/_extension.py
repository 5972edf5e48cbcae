"""Loads the compiled C++ extension ``electra_fast._C`` without ever breaking ``import electra_fast``.

The extension registers its kernels as ops in the ``electra_fast_cpp`` torch.library namespace
(``torch.ops.electra_fast_cpp.<name>``). A missing build, or one compiled against another torch
(undefined symbols), leaves ``EXTENSION_ERROR`` set and CPU calls fall back to the reference.
"""
from __future__ import annotations

import json
import os

import torch

from . import _cpu

EXTENSION_ERROR: str | None = None
EXTENSION_PATH: str | None = None
SIDECAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_isa.json")


def read_build_isa(sidecar: str) -> dict:
    """What setup.py recorded about a build: {"march": "native" | "x86-64-v3" | None, "cpu_flags": [...]}."""
    try:
        with open(sidecar) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def isa_error(sidecar: str) -> str | None:
    """Why the _C described by ``sidecar`` cannot run on this CPU; None when it can, or when nothing was recorded.
    The default build is -march=native for the machine that compiled it: a venv or wheel moved to an older CPU
    would die of SIGILL on the first vector instruction it lacks."""
    build = read_build_isa(sidecar)
    missing = _cpu.missing_flags(build.get("cpu_flags") or ())
    if not missing:
        return None
    return (f"electra_fast._C was compiled with -march={build.get('march')} for a CPU with "
            f"{', '.join(missing)}, which this CPU lacks; rebuild here (pip install --no-build-isolation -e .) or "
            "build a portable one with ELECTRA_FAST_CPU_ARCH=x86-64-v2")


BUILD_ISA = read_build_isa(SIDECAR)
EXTENSION_ERROR = isa_error(SIDECAR)
if EXTENSION_ERROR is None:
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
