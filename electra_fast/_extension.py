"""Loads the compiled C++ extension ``electra_fast._C`` without ever breaking ``import electra_fast``.

The extension registers its kernels as ops in the ``electra_fast_cpp`` torch.library namespace
(``torch.ops.electra_fast_cpp.<name>``). A missing build, one compiled for instruction sets this CPU lacks, or one
compiled against another torch release leaves ``EXTENSION_ERROR`` set (saying how to rebuild) and CPU calls fall
back to the reference. The last two are refused before ``_C`` is loaded, from what setup.py recorded next to it,
and so is a file cut short (its ELF headers describe bytes it lacks): loading them could die of SIGILL, of a C++
ABI that changed between torch releases, or of SIGBUS.
"""
from __future__ import annotations

import importlib.util
import json
import os

import torch

from . import _cpu

EXTENSION_ERROR: str | None = None
EXTENSION_PATH: str | None = None
SIDECAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_isa.json")


# How to rebuild _C against the torch and CPU at hand (a wheel's copy is replaced only by a build from source).
REBUILD = ("rebuild it here: pip install --no-build-isolation -e . in a checkout, or pip install --no-build-isolation "
           "--no-deps --force-reinstall --no-binary electra_fast electra_fast")


def read_build_isa(sidecar: str) -> dict:
    """What setup.py recorded about a build: {"march": "native" | "x86-64-v3" | None, "cpu_flags": [...],
    "torch": "2.13.0+cpu"} (older builds recorded fewer keys, or nothing)."""
    try:
        with open(sidecar) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def isa_error(sidecar: str) -> str | None:
    """Why the _C described by ``sidecar`` cannot run on this CPU; None when it can, or when nothing was recorded.
    The default build is -march=native for the machine that compiled it: a venv or wheel moved to an older CPU
    would die of SIGILL on the first vector instruction it lacks."""
    build = read_build_isa(sidecar)
    missing = _cpu.missing_flags(build.get("cpu_flags") or ())
    if not missing:
        return None
    return (f"electra_fast._C was compiled with -march={build.get('march')} for a CPU with "
            f"{', '.join(missing)}, which this CPU lacks; {REBUILD}; or build a portable one with "
            "ELECTRA_FAST_CPU_ARCH=x86-64-v2")


def _release(version: str) -> tuple:
    """"2.13.1+cpu" -> (2, 13): torch keeps its C++ ABI within a minor release, not across them."""
    parts = version.split("+")[0].split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts[:2])


def torch_error(sidecar: str, running: str | None = None) -> str | None:
    """Why the _C described by ``sidecar`` cannot load into the running torch (``running``, default
    ``torch.__version__``): it was compiled against another minor release (e.g. torch was upgraded after
    electra_fast was built). None when the releases match, or when the build recorded no torch version."""
    built = read_build_isa(sidecar).get("torch")
    running = running or torch.__version__
    if not built or _release(built) == _release(running):
        return None
    return (f"electra_fast._C was compiled against torch {built}, but torch {running} is running (a C++ extension "
            f"loads only into the torch release it was built with); {REBUILD}")


def built_file() -> str | None:
    """The path of the ``_C`` shared library this package would load, None when there is none, or "" when that
    cannot be told (a finder raised: the import itself then says why)."""
    try:
        spec = importlib.util.find_spec(f"{__package__}._C")
    except Exception:  # noqa: BLE001 - whatever a finder raises is the import's to report
        return ""
    return None if spec is None else (spec.origin or "")


def file_error(path: str | None) -> str | None:
    """Why the ``_C`` at ``path`` cannot be loaded as a file: there is none (an install with ELECTRA_FAST_SKIP_EXT
    or an optional compile that failed: the import said "circular import"), or it is cut short (a full disk, an
    interrupted copy: loading it killed the process with SIGBUS). None when it may be loaded ("": unknown)."""
    if path is None:
        return (f"electra_fast._C is not built in this install (installed with ELECTRA_FAST_SKIP_EXT=1, without "
                f"torch, or an optional compile failed); {REBUILD}")
    problem = elf_short(path) if path else None
    return None if problem is None else (f"electra_fast._C ({path}) {problem}, and loading it could crash the "
                                         f"process; {REBUILD}")


def elf_short(path: str) -> str | None:
    """Why the 64-bit ELF file at ``path`` is incomplete (its headers describe bytes past its end), or None: whole,
    or not a 64-bit ELF file (the import itself judges those). Stripping or patching a library after its build
    (distribution packaging) keeps its headers true, so it passes."""
    import struct
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(64)
            if head[:4] != b"\x7fELF" or len(head) < 5 or head[4] != 2:
                return None
            if len(head) < 64:
                return f"is {size} bytes, shorter than its ELF header"
            order = "<" if head[5] == 1 else ">"
            phoff, shoff = struct.unpack_from(order + "QQ", head, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", head, 0x36)
            ends = [phoff + phentsize * phnum, shoff + shentsize * shnum if shoff else 0]
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if len(table) == phentsize * phnum and phentsize >= 0x28:
        ends += [sum(struct.unpack_from(order + "Q", table, i * phentsize + at)[0] for at in (0x08, 0x20))
                 for i in range(phnum)]  # each segment's p_offset + p_filesz
    if max(ends) > size:
        return f"is {size} bytes, but its ELF headers describe {max(ends)} (a copy cut short?)"
    return None


BUILD_ISA = read_build_isa(SIDECAR)
# checked before the import: the switch is the way out when loading _C itself crashes (a SIGILL, an ABI abort)
EXTENSION_ERROR = ("disabled by ELECTRA_FAST_DISABLE_EXT" if _cpu.switch("ELECTRA_FAST_DISABLE_EXT")
                   else file_error(built_file()) or isa_error(SIDECAR) or torch_error(SIDECAR))
if EXTENSION_ERROR is None:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.electra_fast_cpp.*)

        EXTENSION_PATH = getattr(_C, "__file__", None)
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError (bad symbols), anything
        EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
        if "undefined symbol" in str(exc):  # a build that recorded no torch version, made for another torch
            EXTENSION_ERROR += f" (compiled against another torch release? {REBUILD})"


def extension_loaded() -> bool:
    """Whether the C++ extension (``electra_fast._C``) loaded: the CPU ops then run its kernels, else the reference
    (``electra_fast.info`` says why it did not load)."""
    return EXTENSION_ERROR is None


def cpp_op(name: str):
    """The C++ kernel ``torch.ops.electra_fast_cpp.<name>``, or None when it is not built."""
    if EXTENSION_ERROR is not None:
        return None
    try:
        return getattr(torch.ops.electra_fast_cpp, name)
    except (AttributeError, RuntimeError):
        return None
