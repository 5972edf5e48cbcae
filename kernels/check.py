"""Ahead-of-time compile check: every Triton kernel, with every specialisation it is launched with,
compiles for sm_80 and sm_90 and fits the architecture's shared memory - no GPU needed.

    python -m electra_fast.kernels.check [--arch 80 90] [--only rtd_loss] [-j 2] [-v]

Each kernel module (``electra_fast.kernels.<op>``) declares ``compile_specs()``; a ``*_kernel``
function without a spec fails the check. Works with the ``ASTSource(fn, signature, constexprs)``
API of Triton 3.3+ (checked with 3.6, the GPU machines' release, and 3.9).

Triton caches compiled kernels (``TRITON_CACHE_DIR``, default ``~/.triton/cache``): a second run on the
same sources takes seconds; a cold run compiles every specialisation (minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import pkgutil
import sys
import time
import traceback
from contextlib import nullcontext

# Largest shared memory one block can use (cudaDevAttrMaxSharedMemoryPerBlockOptin, CUDA programming guide):
# Triton compares a kernel's metadata.shared with it only when loading onto a device, so the check does it here.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def kernel_modules():
    import electra_fast.kernels as pkg

    skip = {"check", "spec", "philox"}
    return [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in skip and not m.name.startswith("_")]


def _compile(spec, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .spec import COMPILE_OPTIONS

    signature = dict(spec.signature)
    for name in spec.constexprs:
        signature[name] = "constexpr"
    # Order the signature as the kernel's parameters (older releases index constexprs by position).
    order = spec.kernel.arg_names
    missing = [a for a in order if a not in signature]
    if missing:
        raise ValueError(f"spec for {spec.kernel.__name__} lacks arguments {missing}")
    signature = {a: signature[a] for a in order}
    src = ASTSource(fn=spec.kernel, signature=signature, constexprs=dict(spec.constexprs))
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **COMPILE_OPTIONS}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _describe(exc: BaseException) -> str:
    """One line: for a Triton CompilationError the innermost jit source line at fault and the root cause (its
    own text is a source excerpt ending in a caret line), else the exception's last line."""
    from triton.compiler.errors import CompilationError

    where, err = None, exc
    while isinstance(err, CompilationError):
        if getattr(err.node, "lineno", None) and err.src:
            where = f"`{err.src.splitlines()[err.node.lineno - 1].strip()}`"
        if err.error_message or err.__cause__ is None:
            break
        err = err.__cause__
    if isinstance(err, CompilationError):
        text = (err.error_message or "").strip() or type(err).__name__
    else:
        lines = str(err).strip().splitlines()
        frames = traceback.extract_tb(err.__traceback__)
        # a bare `assert` in Triton says nothing: show the asserting line instead
        detail = lines[-1] if lines else (f"`{frames[-1].line}` ({os.path.basename(frames[-1].filename)}:"
                                          f"{frames[-1].lineno})" if frames else "")
        text = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
    return f"{type(exc).__name__} at {where}: {text}" if where else text


_MODULES: dict = {}  # filled before the pool forks, so workers find modules that are not importable by name


def _compile_task(task):
    """Worker: compile spec ``index`` of module ``mod_name`` for ``arch``.

    Returns (label, shared bytes or None, error or None, (pid, start, end) of the work)."""
    mod_name, index, arch = task
    start = time.time()
    spec = _MODULES[mod_name].compile_specs()[index]
    label = f"sm_{arch} {mod_name.rsplit('.', 1)[-1]}.{spec.name}"
    shared, error = None, None
    try:
        shared = _compile(spec, arch).metadata.shared
    except Exception as exc:  # noqa: BLE001 - report every failing specialisation
        error = _describe(exc)
    if shared is not None and shared > SHARED_MEMORY_LIMIT.get(arch, shared):
        error = f"needs {shared} bytes of shared memory, sm_{arch} has {SHARED_MEMORY_LIMIT[arch]}"
    return label, shared, error, (os.getpid(), start, time.time())


def _busy(spans, wall: float) -> str:
    """How much of the pool's wall time its workers spent compiling (idle workers waste the cores)."""
    workers = len({pid for pid, _, _ in spans})
    busy = sum(end - start for _, start, end in spans)
    return f"{workers} process(es) busy {100 * busy / max(wall * workers, 1e-9):.0f} %"


def _report(result, verbose: bool):
    label, shared, error, (_, start, end) = result
    if verbose and error is None:
        print(f"ok   {label} shared={shared}B {end - start:.1f}s", flush=True)


def check_modules(mods, archs=(80, 90), verbose=False, jobs=1, stats=None):
    """(number of specialisations compiled, failure messages) for kernel modules, ``jobs`` processes at once.
    ``stats``: a dict that receives "busy" (how fully the workers were used)."""
    import triton

    failures, tasks = [], []
    for mod in mods:
        name = mod.__name__.rsplit(".", 1)[-1]
        kernels = {n for n, v in vars(mod).items()
                   if isinstance(v, triton.runtime.JITFunction) and n.endswith("_kernel")}
        if not hasattr(mod, "compile_specs"):
            failures.append(f"{name}: no compile_specs()")
            continue
        specs = mod.compile_specs()
        _MODULES[mod.__name__] = mod
        failures += [f"{name}.{k}: kernel without a compile spec"
                     for k in sorted(kernels - {s.kernel.__name__ for s in specs})]
        tasks += [(mod.__name__, i, arch) for i in range(len(specs)) for arch in archs]
    t0 = time.time()
    parallel = jobs > 1 and len(tasks) > 1
    results = []
    with multiprocessing.get_context("fork").Pool(min(jobs, len(tasks))) if parallel else nullcontext() as pool:
        # imap, not map: results (and -v lines) arrive while the pool works; chunksize 1 keeps every worker busy
        for result in pool.imap(_compile_task, tasks, chunksize=1) if parallel else map(_compile_task, tasks):
            results.append(result)
            _report(result, verbose)
    if stats is not None and results:
        stats["busy"] = _busy([r[3] for r in results], time.time() - t0)
    compiled = sum(error is None for _, _, error, _ in results)
    failures += [f"{label}: {error}" for label, _, error, _ in results if error is not None]
    return compiled, failures


def check_module(mod, archs=(80, 90), verbose=False):
    return check_modules([mod], archs, verbose)


def default_jobs() -> int:
    """The CPUs this process may run on (a container's cpuset can be smaller than os.cpu_count())."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(archs=(80, 90), only=None, verbose=False, jobs=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    t0 = time.time()
    mods = [importlib.import_module(f"electra_fast.kernels.{m}") for m in kernel_modules() if not only or m in only]
    stats = {}
    total, failures = check_modules(mods, archs, verbose, jobs or default_jobs(), stats)
    for f in failures:
        print("FAIL " + f)
    busy = f", {stats['busy']}" if "busy" in stats else ""
    print(f"AOT check: {total} specialisations compiled for sm_{'/sm_'.join(map(str, archs))} in "
          f"{time.time() - t0:.1f}s{busy}; {len(failures)} failure(s) (triton {triton.__version__})")
    return 1 if failures or total == 0 else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m electra_fast.kernels.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_MEMORY_LIMIT),
                   metavar="SM", help=f"CUDA architectures, of {sorted(SHARED_MEMORY_LIMIT)} (default: 80 90)")
    p.add_argument("--only", nargs="+", choices=kernel_modules(), metavar="MODULE",
                   help=f"kernel modules to check, of {kernel_modules()} (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per compiled specialisation")
    p.add_argument("-j", "--jobs", type=int, default=None, help="compile processes (default: the usable cores)")
    a = p.parse_args(argv)
    if a.jobs is not None and a.jobs < 1:
        p.error(f"argument -j/--jobs: expected a positive number of processes, got {a.jobs}")
    return run(tuple(a.arch), a.only, a.verbose, a.jobs)


if __name__ == "__main__":
    sys.exit(main())
