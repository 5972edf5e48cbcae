"""Ahead-of-time compile check: every Triton kernel, with every specialisation it is launched with,
compiles for sm_80 and sm_90 - no GPU needed.

    python -m electra_fast.kernels.check [--arch 80 90] [--only rtd_loss] [-v]

Each kernel module (``electra_fast.kernels.<op>``) declares ``compile_specs()``; a ``*_kernel``
function without a spec fails the check. Works with the ``ASTSource(fn, signature, constexprs)``
API of Triton 3.3+ (3.6 on the GPU machines, 3.9 here).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time


def kernel_modules():
    import electra_fast.kernels as pkg

    skip = {"check", "spec", "philox"}
    return [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in skip and not m.name.startswith("_")]


def _compile(spec, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


_MODULES: dict = {}  # filled before the pool forks, so workers find modules that are not importable by name


def _compile_task(task):
    """Worker: compile spec ``index`` of module ``mod_name`` for ``arch``; returns (label, shared bytes, error)."""
    mod_name, index, arch = task
    spec = _MODULES[mod_name].compile_specs()[index]
    label = f"sm_{arch} {mod_name.rsplit('.', 1)[-1]}.{spec.name}"
    try:
        return label, _compile(spec, arch).metadata.shared, None
    except Exception as exc:  # noqa: BLE001 - report every failing specialisation
        msg = str(exc).strip().splitlines()
        return label, None, f"{type(exc).__name__}: {msg[-1] if msg else ''}"


def check_modules(mods, archs=(80, 90), verbose=False, jobs=1):
    """(number of specialisations compiled, failure messages) for kernel modules, ``jobs`` processes at once."""
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
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_task, tasks, chunksize=1)
    else:
        results = [_compile_task(t) for t in tasks]
    compiled = 0
    for label, shared, error in results:
        if error is None:
            compiled += 1
            if verbose:
                print(f"ok   {label} shared={shared}B", flush=True)
        else:
            failures.append(f"{label}: {error}")
    return compiled, failures


def check_module(mod, archs=(80, 90), verbose=False):
    return check_modules([mod], archs, verbose)


def run(archs=(80, 90), only=None, verbose=False, jobs=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    t0 = time.time()
    mods = [importlib.import_module(f"electra_fast.kernels.{m}") for m in kernel_modules() if not only or m in only]
    total, failures = check_modules(mods, archs, verbose, jobs or os.cpu_count() or 1)
    for f in failures:
        print("FAIL " + f)
    print(f"AOT check: {total} specialisations compiled for sm_{'/sm_'.join(map(str, archs))} in "
          f"{time.time() - t0:.1f}s; {len(failures)} failure(s) (triton {triton.__version__})")
    return 1 if failures or total == 0 else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--only", nargs="+", help="kernel modules to check (default: all)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-j", "--jobs", type=int, default=None, help="compile processes (default: all cores)")
    a = p.parse_args(argv)
    return run(tuple(a.arch), a.only, a.verbose, a.jobs)


if __name__ == "__main__":
    sys.exit(main())
