"""What this machine's CPU serves: the one owner of instruction-set decisions on the Python side.

Every instruction-set-specific path asks here first and otherwise takes the portable path (DESIGN.md, "every
instruction-set-specific path asks first"). Answers are ``(ok, reason)`` pairs so that ``info`` can say which
path is taken and why. What is read, once per process:

* the CPU's feature flags (``/proc/cpuinfo``; empty where that file does not exist, which counts as "unknown":
  only probes decide then);
* the caps a user or CI sets to make a machine look older - oneDNN's ``ONEDNN_MAX_CPU_ISA`` (``DNNL_MAX_CPU_ISA``),
  ATen's ``ATEN_CPU_CAPABILITY`` - and this project's switches ``ELECTRA_FAST_NO_ONEDNN``, ``ELECTRA_FAST_NO_AMX``,
  ``ELECTRA_FAST_NO_AVX512`` (the last two are read by the C++ kernels themselves; they are reported here).

The C++ extension makes its own runtime checks (``__builtin_cpu_supports``, a brgemm probe); ``_extension`` refuses
to load a build whose ``-march`` needs features this CPU lacks (see :func:`missing_flags`).
"""
from __future__ import annotations

import functools
import os
from typing import FrozenSet, Iterable, Optional, Tuple

import torch

from ._validate import reason

Answer = Tuple[bool, str]

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) under which oneDNN still runs bf16 matrix products natively.
_ONEDNN_BF16_ISAS = {
    "AVX2_VNNI_2", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT",
}
# Every name oneDNN takes there; it ignores any other value, so such a value caps nothing.
_ONEDNN_ISAS = _ONEDNN_BF16_ISAS | {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}
# CPU flags (Linux names) that give bf16 dot products in hardware: x86 AVX512-BF16 / AMX-BF16, Arm BF16.
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


# the values that leave a switch off, after stripping blanks and ignoring case ("false" turned the path off before)
SWITCH_OFF = ("", "0", "false", "no", "off")
_BLANKS = " \t\n\v\f\r"  # C's isspace: str.strip() would also take Unicode spaces, which the C++ keeps


def switch(name: str) -> bool:
    """An ``ELECTRA_FAST_NO_*``-style switch: on unless unset or one of :data:`SWITCH_OFF`, read exactly as
    csrc/env_switch.h and setup.py read it (info reports the path the C++ runs)."""
    return os.environ.get(name, "").strip(_BLANKS).lower() not in SWITCH_OFF


@functools.lru_cache(maxsize=None)
def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags as Linux names them (``avx2``, ``avx512f``, ``amx_bf16``...); empty if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, Arm
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def missing_flags(required: Iterable[str]) -> list:
    """Flags of ``required`` this CPU does not report ([] when the flags cannot be read: nothing to compare)."""
    flags = cpu_flags()
    return sorted(f for f in required if flags and f not in flags)


def onednn_isa_setting() -> Optional[Tuple[str, str]]:
    """(variable, value) of oneDNN's dispatch cap as set in the environment (``ONEDNN_MAX_CPU_ISA``, else the older
    ``DNNL_MAX_CPU_ISA``), or None."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if os.environ.get(name, "").strip():
            return name, os.environ[name]
    return None


def onednn_isa_cap() -> Optional[str]:
    """oneDNN's dispatch cap from the environment, upper case, or None (unset, or a name oneDNN does not know and
    ignores)."""
    setting = onednn_isa_setting()
    cap = setting[1].upper() if setting else None  # oneDNN ignores case, not spaces: "AVX2 " caps nothing
    return cap if cap in _ONEDNN_ISAS else None


_ATEN_NAMES = {"default", "avx2", "avx512", "zvector", "vsx", "sve256"}


def aten_cap() -> Optional[str]:
    """``ATEN_CPU_CAPABILITY`` when it holds ATen below AVX-512 ("default" or "avx2", spelt as torch compares them:
    it ignores a value it does not know, e.g. "AVX2"), else None. The variable, not torch's level: on a CPU without
    AVX-512 that level is low whatever the variable says."""
    value = os.environ.get("ATEN_CPU_CAPABILITY")
    return value if value in ("default", "avx2") else None


@functools.lru_cache(maxsize=None)
def native_bf16() -> Answer:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 / AMX / Arm BF16) *and* oneDNN and ATen
    may use it. Without it a bf16 matmul is emulated element by element: ~50x slower than fp32 here."""
    cap = onednn_isa_cap()
    if cap is not None and cap not in _ONEDNN_BF16_ISAS:
        return False, "{}={} caps oneDNN below its bf16 instructions".format(*onednn_isa_setting())
    aten = aten_cap()
    if aten is not None:
        return False, f"ATEN_CPU_CAPABILITY={aten} caps ATen below AVX-512"
    flags = cpu_flags()
    have = [f for f in _BF16_FLAGS if f in flags]
    if flags and not have:
        return False, "the CPU has no bf16 matrix instructions (no AVX512-BF16, AMX or Arm BF16)"
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        ok = bool(have)
    if not ok:
        return False, "oneDNN reports no bf16 support on this CPU"
    return True, f"bf16 matrix instructions: {', '.join(have) if have else 'reported by oneDNN'}"


def _probe_onednn_linear() -> Optional[str]:
    """Run oneDNN's private linear ops once on tiny bf16 inputs; the error message if it cannot serve them."""
    x = torch.ones(2, 32, dtype=torch.bfloat16)
    w = torch.ones(16, 32, dtype=torch.bfloat16)
    b = torch.zeros(16, dtype=torch.bfloat16)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        z = torch.ops.mkldnn._linear_pointwise.binary(x[:, :16], torch.ones(2, 32, dtype=torch.bfloat16),
                                                      w.t().contiguous(), None, "mul")
    except Exception as exc:  # noqa: BLE001 - any failure of a private op means "do not use it"
        return f"{type(exc).__name__}: {reason(exc)}"
    if not (torch.equal(y, torch.full((2, 16), 32.0, dtype=torch.bfloat16))
            and torch.equal(z, torch.full((2, 32), 16.0, dtype=torch.bfloat16))):
        return "the probe's products came out wrong"
    return None


@functools.lru_cache(maxsize=None)
def onednn_bf16_linear() -> Answer:
    """Whether ``nn.linear``'s CPU bf16 fast path (oneDNN's private ``mkldnn._linear_pointwise`` with a bias and a
    binary-mul epilogue) may run here: native bf16, the op present, and a probe run that gives the right numbers."""
    if switch("ELECTRA_FAST_NO_ONEDNN"):
        return False, "disabled by ELECTRA_FAST_NO_ONEDNN"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False, "this torch build has no oneDNN linear ops"
    ok, why = native_bf16()
    if not ok:
        return False, why
    err = _probe_onednn_linear()
    if err is not None:
        return False, f"oneDNN cannot serve it here ({err})"
    return True, "oneDNN bf16 GEMM with the bias / GELU backward in its epilogue"


def default_precision(device: "torch.device | str") -> Answer:
    """``--precision auto``: ("bf16" or "fp32", why). bf16 where the device multiplies it natively, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU runs bf16 natively"
        return "fp32", "the GPU has no native bf16"
    if device.type == "cpu":
        ok, why = native_bf16()
        return ("bf16" if ok else "fp32"), why
    return "fp32", f"no bf16 policy for {device.type}"


def _isa_caps() -> list:
    """The oneDNN / ATen caps set in the environment, each marked where its library ignores the value."""
    caps = []
    setting = onednn_isa_setting()
    if setting:
        caps.append(f"{setting[0]}={setting[1]}" + ("" if onednn_isa_cap() else " (ignored: not a oneDNN ISA name)"))
    aten = os.environ.get("ATEN_CPU_CAPABILITY")
    if aten:  # torch compares the exact string
        caps.append(f"ATEN_CPU_CAPABILITY={aten}" + ("" if aten in _ATEN_NAMES else " (ignored by torch: its names "
                                                     f"are {', '.join(sorted(_ATEN_NAMES))})"))
    return caps


def report() -> list:
    """Lines for ``python -m electra_fast.info``."""
    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16", "sve") if f in flags]
    caps = _isa_caps()
    caps += [f"{k}={os.environ[k]}" for k in ("ELECTRA_FAST_NO_ONEDNN", "ELECTRA_FAST_NO_AMX", "ELECTRA_FAST_NO_AVX512")
             if switch(k)]  # "0" is off
    bf16, why = native_bf16()
    lin, lin_why = onednn_bf16_linear()
    return [
        f"cpu          {', '.join(isa) or 'flags unknown'}; ATen {torch.backends.cpu.get_cpu_capability()}"
        + (f"; caps: {' '.join(caps)}" if caps else ""),
        f"cpu bf16     {'native' if bf16 else 'NOT native'} ({why}); --precision auto -> "
        f"{default_precision('cpu')[0]}",
        f"Linear / MLP {'fused oneDNN epilogues' if lin else 'torch F.linear'} under CPU bf16 autocast ({lin_why})",
    ]
