"""Backend selection: which implementation (triton | cpp | reference) serves a call.

Routing, per DESIGN.md:
  * forced (``ELECTRA_FAST_BACKEND`` or :func:`use_backend`): that backend or a clear RuntimeError;
  * automatic: CUDA -> triton, CPU -> cpp, anything else -> reference; a backend that cannot serve
    the call falls back to the reference and says why once per (op, reason) in the log.
Triton on CPU tensors is only allowed under ``TRITON_INTERPRET=1`` (the interpreter test lane).

What each op has: its :class:`OpSpec` (registered by ``electra_fast/ops/<op>.py``, read by routing, ``info`` and the
tests; see docs/architecture.md).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import logging
import os
import warnings
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from . import _extension

BACKENDS = ("triton", "cpp", "reference")
log = logging.getLogger("electra_fast")

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


def forced_in_context() -> Optional[str]:
    """The backend :func:`use_backend` / :func:`eager_twin_mode` force here (not the environment's), or None."""
    return _forced.get()


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
            supports: Optional[Callable[[str], "Optional[str] | List[str]"]] = None):
    """``(backend, reason)``: the backend that serves ``op`` on ``device``, and why the preferred one
    was passed over (None when it was not). A forced backend that cannot serve raises RuntimeError.

    ``supports(backend)`` lets an op refuse a backend for this call (e.g. an unsupported head dim): a reason, a list
    of every reason (joined with "; "), or None / an empty list when it serves.
    """
    forced = forced_backend()
    candidate = forced or default_backend(device)
    interpret = candidate == "triton" and triton_interpret()  # reading the environment costs ~1.5 us a call
    reason = _static_reason(candidate, device.type, cpp, triton, interpret, _extension.EXTENSION_ERROR)
    if reason is None and supports is not None and candidate != "reference":
        reason = supports(candidate)
        if isinstance(reason, (list, tuple)):
            reason = "; ".join(reason) or None
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


def _device_arg(device) -> torch.device:
    """A torch.device, or a str torch reads as one; anything else a TypeError, an unknown name a ValueError."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device: expected a torch.device or a str such as 'cpu' or 'cuda', got "
                        f"{type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: expected a device such as 'cpu' or 'cuda:0', got {device!r}") from None


def available_backends(device: "torch.device | str" = "cpu") -> list:
    """Backends that can serve CPU (or the given device's) tensors in this process: names from ``BACKENDS``."""
    device = _device_arg(device)
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


# ------------------------------------------------------------------------------------------- op specs
REGISTRY: Dict[str, "OpSpec"] = {}


@dataclasses.dataclass(frozen=True, eq=False)
class OpSpec:
    """Everything routing, ``info`` and the tests know about one op's implementations.

    An op runs in stages (``"forward"``, ``"backward"``, ...); a stage's three implementations are found by name:
      reference  the module of eager kernels (electra_fast/reference/<op>.py): stage ``s`` is ``reference.s``;
      cpp        stage -> kernel in ``torch.ops.electra_fast_cpp`` (csrc/<op>.cpp);
      cpp_only   the stages only C++ implements (rtd_loss's ``train``: a C++ autograd function), asked with
                 :meth:`route` only;
      triton     the kernel module ``electra_fast.kernels.<triton>`` (kernels/<op>.py), imported on first use
                 (importing electra_fast never imports triton): stage ``s`` is its function ``s``.
    The kernels own their limits: a kernel module's ``unsupported(**call) -> list[str]`` gives every reason its
    kernels cannot serve a call (all of them, not only the first), and the op passes ``call`` when it routes.
    """
    name: str
    reference: ModuleType
    cpp: Mapping[str, str]
    triton: Optional[str] = None
    cpp_only: Tuple[str, ...] = ()

    @property
    def stages(self) -> Tuple[str, ...]:
        """The stages every backend implements."""
        return tuple(s for s in self.cpp if s not in self.cpp_only)

    def kernels(self) -> ModuleType:
        """The Triton kernel module (imports triton)."""
        return importlib.import_module(f"electra_fast.kernels.{self.triton}")

    def unsupported(self, backend: str, **call) -> List[str]:
        """Every reason ``backend`` cannot serve a call described by ``call`` (empty: it can)."""
        if backend != "triton" or not call:
            return []
        limits = getattr(self.kernels(), "unsupported", None)
        return [] if limits is None else list(_cached_limits(limits, tuple(sorted(call.items()))))

    def route(self, device: torch.device, stage: Optional[str] = None, **call) -> Tuple[str, Optional[str]]:
        """``(backend, reason)`` for ``stage`` (None: every stage, as ``info`` asks) on ``device``; see
        :func:`resolve`."""
        supports = (lambda backend: self.unsupported(backend, **call)) if call and self.triton else None
        if stage is not None:  # every call of an op: one stage
            return resolve(self.name, device, cpp=self.cpp.get(stage), triton=self.triton, supports=supports)
        backend, reason = "reference", None
        for name in tuple(self.cpp) or (None,):
            backend, reason = resolve(self.name, device, cpp=self.cpp.get(name), triton=self.triton,
                                      supports=supports)
            if reason is not None:
                break
        return backend, reason

    def moved_to_kernels(self, module: str, **moved: str) -> Callable[[str], object]:
        """A module ``__getattr__`` for limits that moved from ``module`` to the Triton kernels (old name = new name
        in ``electra_fast.kernels.<triton>``): the kernels' value, with a DeprecationWarning."""
        def __getattr__(name: str):
            if name not in moved:
                raise AttributeError(f"module {module!r} has no attribute {name!r}")
            warnings.warn(f"{module}.{name} moved to electra_fast.kernels.{self.triton}.{moved[name]} (the kernels "
                          "own their limits)", DeprecationWarning, stacklevel=2)
            return getattr(self.kernels(), moved[name])
        return __getattr__

    def implementation(self, stage: str, device: torch.device, **call) -> Callable:
        """The callable that serves ``stage`` on ``device`` (see :meth:`serving`)."""
        return self.serving(stage, device, **call)[1]

    def serving(self, stage: str, device: torch.device, **call) -> Tuple[str, Callable]:
        """``(backend, callable)`` that serves ``stage`` on ``device``, for ops whose checks depend on which backend
        runs. Automatic routing that falls back to the reference says why, once per (op, reason), in the log."""
        backend, reason = self.route(device, stage, **call)
        if reason is not None and (self.name, reason) not in _logged:
            _logged.add((self.name, reason))
            log.warning("electra_fast.%s: %s; using the reference", self.name, reason)
        if backend == "cpp":
            return backend, _extension.cpp_op(self.cpp[stage])
        if backend == "triton":
            return backend, getattr(self.kernels(), stage)
        return backend, getattr(self.reference, stage)


@functools.lru_cache(maxsize=1024)
def _cached_limits(limits: Callable, call: tuple) -> Tuple[str, ...]:
    # Asked on every call the Triton backend would serve: the answer depends on the call's shape-level arguments
    # only, so it is computed once per configuration (a tensor argument is keyed by identity: the ops pass cached
    # tables).
    return tuple(limits(**dict(call)))


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to :data:`REGISTRY` (each ops module registers its ops at import)."""
    if spec.name in REGISTRY:
        raise ValueError(f"op spec {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec
