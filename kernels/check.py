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


def check_module(mod, archs=(80, 90), verbose=False):
    """(number of specialisations compiled, failure messages) for one kernel module."""
    import triton

    name = mod.__name__.rsplit(".", 1)[-1]
    kernels = {n for n, v in vars(mod).items() if isinstance(v, triton.runtime.JITFunction) and n.endswith("_kernel")}
    if not hasattr(mod, "compile_specs"):
        return 0, [f"{name}: no compile_specs()"]
    specs = mod.compile_specs()
    failures = [f"{name}.{k}: kernel without a compile spec" for k in sorted(kernels - {s.kernel.__name__ for s in specs})]
    compiled = 0
    for spec in specs:
        for arch in archs:
            try:
                k = _compile(spec, arch)
                compiled += 1
                if verbose:
                    print(f"ok   sm_{arch} {name}.{spec.name} shared={k.metadata.shared}B", flush=True)
            except Exception as exc:  # noqa: BLE001 - report every failing specialisation
                msg = str(exc).strip().splitlines()
                failures.append(f"sm_{arch} {name}.{spec.name}: {type(exc).__name__}: {msg[-1] if msg else ''}")
    return compiled, failures


def run(archs=(80, 90), only=None, verbose=False) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    failures, total = [], 0
    t0 = time.time()
    for mod_name in kernel_modules():
        if only and mod_name not in only:
            continue
        compiled, fails = check_module(importlib.import_module(f"electra_fast.kernels.{mod_name}"), archs, verbose)
        total += compiled
        failures += fails
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
    a = p.parse_args(argv)
    return run(tuple(a.arch), a.only, a.verbose)


if __name__ == "__main__":
    sys.exit(main())
