"""Builds the optional C++ extension electra_fast._C from csrc/ against the installed torch.

Environment:
  ELECTRA_FAST_SKIP_EXT=1      install without compiling (CPU calls use the reference backend)
  ELECTRA_FAST_EXT_OPTIONAL=1  a failed compile becomes a warning instead of an error
  ELECTRA_FAST_CPU_ARCH=...    -march for the C++ kernels (default "native": the extension is compiled on
                               the machine that runs it, as DeepSpeed's CPU ops are; set e.g. "x86-64-v3",
                               or "" for the compiler default, when building for other machines)
"""
import glob
import os
import sys

from setuptools import setup

SKIP = os.environ.get("ELECTRA_FAST_SKIP_EXT", "0") == "1"
OPTIONAL = os.environ.get("ELECTRA_FAST_EXT_OPTIONAL", "0") == "1"


def _extensions_and_cmdclass():
    if SKIP:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # Without torch there is nothing to compile against; the package still works (reference backend).
        msg = "electra_fast: torch is not installed in the build environment; building without _C " \
              "(install torch first and use `pip install --no-build-isolation`)"
        if not OPTIONAL:
            raise RuntimeError(msg)
        print("WARNING: " + msg, file=sys.stderr)
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp"))
    # -fno-trapping-math lets GCC if-convert the branch-free math in csrc/vec_math.h into SIMD selects.
    # Never -ffast-math: vec_math.h relies on IEEE rounding.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    arch = os.environ.get("ELECTRA_FAST_CPU_ARCH", "native").strip()
    if arch:
        cxx.append(f"-march={arch}")
    ext_cls = cpp_extension.CppExtension
    kwargs = {}
    # Decide on CUDA sources from the torch build itself: torch.cuda.is_available() is False on a
    # GPU-less build machine even for a CUDA torch, and CUDA_HOME is None for a CPU torch.
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if torch.version.cuda and cuda_sources and cpp_extension.CUDA_HOME:
        # With no visible GPU, an unset arch list makes torch's build crash: default to sm_80/sm_90.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext_cls = cpp_extension.CUDAExtension
        sources += cuda_sources
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3"]}
    else:
        kwargs["extra_compile_args"] = cxx
    ext = ext_cls(
        name="electra_fast._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=["-fopenmp"],
        optional=OPTIONAL,
        **kwargs,
    )

    class BuildExt(cpp_extension.BuildExtension):
        # torch's ninja build raises RuntimeError on failure, which Extension(optional=True) does not
        # catch: catch it here so ELECTRA_FAST_EXT_OPTIONAL really makes the extension optional.
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if not OPTIONAL:
                    raise
                print(f"WARNING: electra_fast._C failed to build ({exc}); CPU ops will use the "
                      "reference backend", file=sys.stderr)

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
