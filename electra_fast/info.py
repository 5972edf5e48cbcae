"""``python -m electra_fast.info``: versions, extension and Triton status, and which backend serves
each op on each device in this process."""
from __future__ import annotations

import os
import platform
import sys

import torch

from . import _backend, _cpu, _extension, ops  # noqa: F401  (importing ops registers their specs)
from ._console import say, settle_stdout, show


def _triton_status() -> str:
    err = _backend.triton_import_error()
    if err:
        return f"not available ({err})"
    import triton

    mode = "interpreter (TRITON_INTERPRET=1)" if _backend.triton_interpret() else "compiled"
    return f"{triton.__version__}, {mode}"


def serving(op: str, device: torch.device, **call) -> str:
    """Which backend serves ``op`` on ``device``, by the op spec's own routing (every stage; ``call``: the
    arguments its kernels' limits read, as the op passes them), and why the preferred one was passed over."""
    spec = _backend.REGISTRY[op]
    try:
        backend, reason = spec.route(device, **call)
        if backend == "triton":
            spec.kernels()  # a kernel module that fails to import cannot serve
    except Exception as exc:  # noqa: BLE001 - a forced backend that cannot serve, a broken kernel module
        return f"ERROR ({exc})"
    return backend if reason is None else f"reference ({reason})"


def _cpp_paths() -> list:
    """The C++ kernels' own instruction-set choices (brgemm and dropout ask the CPU at run time, the Gumbel noise's
    path is fixed by the build; the switches turn them off)."""
    if not _extension.extension_loaded():
        return []
    probe = getattr(torch.ops.electra_fast_cpp, "bf16_brgemm_available", None)
    native = probe is not None and probe()
    off = _cpu.switch("ELECTRA_FAST_NO_AMX")
    brgemm = ("brgemm (AMX / AVX512-BF16)" if native and not off else
              f"fp32 products ({'ELECTRA_FAST_NO_AMX' if native else 'no native bf16 brgemm on this CPU'})")
    no_avx512 = _cpu.switch("ELECTRA_FAST_NO_AVX512")
    # dropout's keep bytes ask the CPU at run time (csrc/keep_bytes.cpp have_avx512); the Gumbel noise's 16-lane
    # path exists only in a build compiled for AVX-512 (csrc/sampling.cpp)
    cpu = _cpu.cpu_flags()
    cpu_avx512 = {"avx512f", "avx512bw", "bmi2"} <= cpu
    dropout = ("16-lane AVX-512" if cpu_avx512 and not no_avx512 else "portable (" + (
        "ELECTRA_FAST_NO_AVX512" if no_avx512 else "CPU flags unknown" if not cpu else "no AVX-512 on this CPU") + ")")
    built = "avx512f" in (_extension.BUILD_ISA.get("cpu_flags") or ())
    gumbel = ("16-lane AVX-512" if built and not no_avx512 else
              f"portable ({'ELECTRA_FAST_NO_AVX512' if no_avx512 else 'build without AVX-512'})")
    return [f"C++ bf16     attention and MLM products: {brgemm}",
            f"C++ Philox   dropout: {dropout}; Gumbel noise: {gumbel}"]


def report() -> str:
    import electra_fast

    lines = [
        f"electra_fast {electra_fast.__version__}  ({os.path.dirname(electra_fast.__file__)})",
        f"python       {platform.python_version()} on {platform.machine()}",
        f"torch        {torch.__version__} (cuda {torch.version.cuda}, {torch.get_num_threads()} threads, "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'})",
        f"triton       {_triton_status()}",
    ]
    if _extension.extension_loaded():
        built = getattr(sys.modules.get("electra_fast._C"), "TORCH_VERSION", "?")
        march = _extension.BUILD_ISA.get("march") or "compiler default"
        lines.append(f"extension    built: electra_fast._C ({_extension.EXTENSION_PATH}; compiled against torch {built}, "
                     f"-march={march})")
    else:
        lines.append(f"extension    NOT available: {_extension.EXTENSION_ERROR}")
    lines += _cpu.report()
    lines += _cpp_paths()
    forced = _backend.forced_backend()
    lines.append(f"backend      {'forced: ' + forced if forced else 'automatic (CUDA -> triton, CPU -> cpp, else reference)'}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    width = max(len(op) for op in _backend.REGISTRY)
    lines.append("")
    lines.append(f"{'op':<{width}}  " + "  ".join(f"{d.type}" for d in devices))
    for op in sorted(_backend.REGISTRY):
        lines.append(f"{op:<{width}}  " + "  ".join(serving(op, d) for d in devices))
    return "\n".join(lines)


def main(argv=()) -> int:
    if list(argv) in (["-h"], ["--help"]):
        show("usage: python -m electra_fast.info (or electra-fast info): what this install runs on, and why")
        return 0
    if argv:  # as `electra-fast info` does: it takes no arguments
        say(f"python -m electra_fast.info: error: unrecognized arguments: {' '.join(argv)} (it takes none)")
        return 2
    try:  # python -m electra_fast.info: a misspelt ELECTRA_FAST_BACKEND is one line, as under electra-fast info
        _backend.forced_backend()
    except ValueError as e:
        say(f"electra_fast.info: error: {e}")
        return 2
    show(report())  # a stdout that fails (| head) is the caller's to settle: settle_stdout
    return 0


if __name__ == "__main__":
    sys.exit(settle_stdout("python -m electra_fast.info", main(sys.argv[1:]), output_is_the_work=True))
