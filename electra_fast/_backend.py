"""Backend selection: which implementation (triton | cpp | reference) serves a call.

Routing, per DESIGN.md:
  * forced (``ELECTRA_FAST_BACKEND`` or :func:`use_backend`): that backend or a clear RuntimeError;
  * automatic: CUDA -> triton, CPU -> cpp, anything else -> reference; a backend that cannot serve
    the call falls back to the reference and says why once per (op, reason) in the log.
Triton on CPU tensors is only allowed under ``TRITON_INTERPRET=1`` (the interpreter test lane).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from typing import Callable, Iterator, Optional

import torch

from . import _extension

BACKENDS = ("triton", "cpp", "reference")
log = logging.getLogger("electra_fast")

# op name -> (C++ kernel names, Triton kernel module): filled by each ops module at import; read by info.
DECLARED: dict = {}


def declare(op: str, *, cpp=(), triton: Optional[str] = None) -> None:
    """Record which kernels implement ``op`` (for ``python -m electra_fast.info``)."""
    DECLARED[op] = (tuple(cpp), triton)


_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("electra_fast_backend", default=None)
_twin: contextvars.ContextVar[bool] = contextvars.ContextVar("electra_fast_eager_twin", default=False)
_logged: set = set()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every electra_fast op inside the block onto one backend (None: automatic routing)."""
    token = _forced.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


@contextlib.contextmanager
def eager_twin_mode() -> Iterator[None]:
    """The eager twin: inside the block electra_fast's modules take torch's own eager paths (``F.dropout``, SDPA,
    ``F.linear``, ``F.layer_norm``) and the ops without a torch counterpart (masking, sampling, RTD loss,
    disentangled attention) run their reference kernels. It is what the fused model is tested and benchmarked
    against (``ElectraPretrainingModel(fused=False)``). Forcing the ``reference`` backend alone
    (:func:`use_backend`) keeps the modules on the ops and only swaps the ops' kernels."""
    twin, forced = _twin.set(True), _forced.set("reference")
    try:
        yield
    finally:
        _forced.reset(forced)
        _twin.reset(twin)


def eager_twin() -> bool:
    """True inside :func:`eager_twin_mode`."""
    return _twin.get()


def forced_backend() -> Optional[str]:
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("ELECTRA_FAST_BACKEND", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"ELECTRA_FAST_BACKEND: expected one of {BACKENDS} or 'auto', got {env!r}")
    return env


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def unavailable_reason(backend: str, device: torch.device, cpp_name: Optional[str] = None) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "reference":
        return None
    if backend == "triton":
        err = triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend serves CPU tensors, got {device.type}"
        if not _extension.extension_loaded():
            return f"the C++ extension electra_fast._C is not available ({_extension.EXTENSION_ERROR})"
        if cpp_name is not None and _extension.cpp_op(cpp_name) is None:
            return f"the C++ extension has no kernel {cpp_name!r} (rebuild the package)"
        return None
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def default_backend(device: torch.device) -> str:
    return {"cuda": "triton", "cpu": "cpp"}.get(device.type, "reference")


def resolve(op: str, device: torch.device, *, cpp: Optional[str] = None, triton: Optional[str] = None,
            supports: Optional[Callable[[str], Optional[str]]] = None):
    """``(backend, reason)``: the backend that serves ``op`` on ``device``, and why the preferred one
    was passed over (None when it was not). A forced backend that cannot serve raises RuntimeError.

    ``supports(backend)`` lets an op refuse a backend for this call (e.g. an unsupported head dim).
    """
    forced = forced_backend()
    candidate = forced or default_backend(device)
    reason = _static_reason(candidate, device.type, cpp, triton, triton_interpret(), _extension.EXTENSION_ERROR)
    if reason is None and supports is not None and candidate != "reference":
        reason = supports(candidate)
    if reason is None:
        return candidate, None
    if forced is not None:
        raise RuntimeError(f"electra_fast.{op}: backend {forced!r} was forced but cannot serve this call: {reason}")
    return "reference", f"{candidate} backend unavailable ({reason})"


@functools.lru_cache(maxsize=None)
def _static_reason(candidate: str, device_type: str, cpp: Optional[str], triton: Optional[str],
                   interpret: bool, extension_error: Optional[str]) -> Optional[str]:
    # Fixed for the process once TRITON_INTERPRET and the extension's state are part of the key; cached
    # because the small ops pay this on every call (about as much as the validation of their arguments).
    if candidate == "cpp" and cpp is None:
        return "no C++ kernel for this op"
    if candidate == "triton" and triton is None:
        return "no Triton kernel for this op"
    return unavailable_reason(candidate, torch.device(device_type), cpp)


def available_backends(device: "torch.device | str" = "cpu") -> list:
    """Backends that can serve CPU (or the given device's) tensors in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def implementation(op: str, device: torch.device, *, reference: Callable, cpp: Optional[str] = None,
                   triton: Optional[str] = None, supports: Optional[Callable[[str], Optional[str]]] = None) -> Callable:
    """The callable that serves ``op`` on ``device``.

    ``cpp`` names a kernel in ``torch.ops.electra_fast_cpp``; ``triton`` is ``"module.function"`` inside
    ``electra_fast.kernels``, imported only when chosen (importing electra_fast never imports triton).
    Automatic routing that falls back to the reference says why, once per (op, reason), in the log.
    """
    backend, reason = resolve(op, device, cpp=cpp, triton=triton, supports=supports)
    if reason is not None and (op, reason) not in _logged:
        _logged.add((op, reason))
        log.warning("electra_fast.%s: %s; using the reference", op, reason)
    if backend == "cpp":
        return _extension.cpp_op(cpp)
    if backend == "triton":
        import importlib

        module, fn = triton.rsplit(".", 1)
        return getattr(importlib.import_module(f"electra_fast.kernels.{module}"), fn)
    return reference
