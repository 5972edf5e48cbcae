"""Shared benchmark plumbing: device choice, side-by-side runs, tokens/s and peak memory in extra_info.

Every benchmarked callable synchronises CUDA before returning; every side of a comparison runs with the
same shapes, dtype, thread count, warm-up and rounds; peak memory is measured the same way for every
side (electra_fast.profiling.peak_memory) in a separate call, never inside the timed rounds.
"""
import os

import pytest
import torch

from electra_fast import _cpu
from electra_fast._backend import forced_backend
from electra_fast.bench_report import commit_label, machine_name
from electra_fast.profiling import peak_memory

QUICK = os.environ.get("ELECTRA_FAST_BENCH_QUICK", "0") == "1"
_SKIPPED: list = []  # (test, reason) of the rows this run left out, recorded in the results' machine_info


def _is_bf16(value) -> bool:
    return value is torch.bfloat16 or (isinstance(value, str) and "bf16" in value)


@pytest.fixture(autouse=True)
def _native_bf16_only(request, device):
    """CPU bf16 rows run only where the CPU multiplies bf16 natively: elsewhere a bf16 matmul is emulated ~50x
    slower than fp32 (minutes per model step), which measures the emulation, not the code."""
    callspec = getattr(request.node, "callspec", None)
    bf16 = getattr(request.module, "CPU_BF16", False) or (  # a file whose rows all run under bf16 autocast
        callspec is not None and any(_is_bf16(v) for v in callspec.params.values()))
    if device.type != "cpu" or not bf16:
        return
    native, why = _cpu.native_bf16()
    if not native:
        pytest.skip(f"CPU bf16 row left out: {why}")


def pytest_runtest_logreport(report):
    if report.skipped and report.when == "setup" and isinstance(report.longrepr, tuple):
        _SKIPPED.append({"test": report.nodeid, "reason": report.longrepr[2].removeprefix("Skipped: ")})


def pytest_addoption(parser):
    parser.addoption("--device", default=None, choices=("cpu", "cuda"),
                     help="device to benchmark on (default: cuda when available, else cpu)")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda but no GPU is visible")
    return torch.device(name)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(benchmark, fn, *, device, op, impl, pass_, shape, dtype, tokens, rounds=None, warmup=None):
    """Time ``fn`` (median over rounds), then record tokens/s and peak memory.

    ``impl`` is "fused", "eager" or "transformers"; rows with the same op / pass / shape / dtype are
    compared side by side in bench/RESULTS.md.
    """
    def call():
        out = fn()
        _sync(device)
        return out

    rounds = rounds or (3 if QUICK else 10)
    warmup = warmup if warmup is not None else (1 if QUICK else 2)
    benchmark.group = f"{op} | {pass_} | {shape} | {dtype}"
    benchmark.extra_info.update(op=op, impl=impl, pass_=pass_, shape=shape, dtype=str(dtype).replace("torch.", ""),
                                tokens=tokens, device=device.type, threads=torch.get_num_threads())
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["tokens_per_s"] = tokens / stats.stats.median
    benchmark.extra_info["peak_mem_bytes"] = peak_memory(call, device)


def pytest_benchmark_update_machine_info(config, machine_info):
    import electra_fast

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    machine_info.update(
        electra_fast_machine=machine_name(config.getoption("--device")), cores=os.cpu_count(), torch=torch.__version__,
        triton=triton_version,
        torch_threads=torch.get_num_threads(), electra_fast=electra_fast.__version__,
        git_commit=commit_label(os.path.dirname(os.path.abspath(__file__))),
        cuda=torch.version.cuda, extension=electra_fast.extension_loaded(), cpu_bf16_native=_cpu.native_bf16()[0],
        cpu_bf16=_cpu.native_bf16()[1], skipped=list(_SKIPPED),
        forced_backend=forced_backend(), select=config.getoption("keyword") or None,
    )
