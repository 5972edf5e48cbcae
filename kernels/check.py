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


def run(archs=(80, 90), only=None, verbose=False) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    failures, total = [], 0
    t0 = time.time()
    for mod_name in kernel_modules():
        if only and mod_name not in only:
            continue
        mod = importlib.import_module(f"electra_fast.kernels.{mod_name}")
        kernels = {n: v for n, v in vars(mod).items()
                   if isinstance(v, triton.runtime.JITFunction) and n.endswith("_kernel")}
        if not hasattr(mod, "compile_specs"):
            failures.append(f"{mod_name}: no compile_specs()")
            continue
        specs = mod.compile_specs()
        covered = {s.kernel.__name__ for s in specs}
        for name in sorted(set(kernels) - covered):
            failures.append(f"{mod_name}.{name}: kernel without a compile spec")
        for spec in specs:
            for arch in archs:
                total += 1
                try:
                    k = _compile(spec, arch)
                    if verbose:
                        print(f"ok   sm_{arch} {mod_name}.{spec.name} shared={k.metadata.shared}B")
                except Exception as exc:  # noqa: BLE001 - report every failing specialisation
                    msg = str(exc).strip().splitlines()
                    failures.append(f"sm_{arch} {mod_name}.{spec.name}: {type(exc).__name__}: "
                                    f"{msg[-1] if msg else ''}")
    for f in failures:
        print("FAIL " + f)
    print(f"AOT check: {total - len([f for f in failures if f.startswith('sm_')])}/{total} specialisations compiled "
          f"for sm_{'/sm_'.join(map(str, archs))} in {time.time() - t0:.1f}s; {len(failures)} failure(s) "
          f"(triton {triton.__version__})")
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--only", nargs="+", help="kernel modules to check (default: all)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    return run(tuple(a.arch), a.only, a.verbose)


if __name__ == "__main__":
    sys.exit(main())
