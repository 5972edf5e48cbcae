"""Builds the optional C++ extension electra_fast._C from csrc/ against the installed torch.

Environment:
  ELECTRA_FAST_SKIP_EXT=1      install without compiling (CPU calls use the reference backend); any value but
                               "" and "0" is on, as for the runtime switches
  ELECTRA_FAST_EXT_OPTIONAL=1  a failed compile becomes a warning instead of an error
  ELECTRA_FAST_CPU_ARCH=...    -march for the C++ kernels (default "native": the extension is compiled on
                               the machine that runs it, as DeepSpeed's CPU ops are; set e.g. "x86-64-v3",
                               or "" for the compiler default, when building for other machines)
"""
import glob
import json
import os
import shlex
import subprocess
import sys

from setuptools import setup

def _switch(name):
    """On unless unset or "", "0", "false", "no", "off" (blanks stripped, any case), as electra_fast._cpu.switch
    reads the runtime switches ("true" was read as off here: a 4-minute compile started, or a failed one stayed
    fatal; "false" was read as on)."""
    return os.environ.get(name, "").strip(" \t\n\v\f\r").lower() not in ("", "0", "false", "no", "off")


SKIP = _switch("ELECTRA_FAST_SKIP_EXT")
OPTIONAL = _switch("ELECTRA_FAST_EXT_OPTIONAL")


# GCC's predefined instruction-set macros -> the flag Linux lists in /proc/cpuinfo for the same feature.
_ISA_MACROS = {
    "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2", "__SSE4A__": "sse4a", "__POPCNT__": "popcnt", "__AVX__": "avx",
    "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c", "__BMI__": "bmi1", "__BMI2__": "bmi2",
    "__LZCNT__": "abm", "__MOVBE__": "movbe", "__SHA__": "sha_ni", "__GFNI__": "gfni", "__VAES__": "vaes",
    "__VPCLMULQDQ__": "vpclmulqdq", "__AVXVNNI__": "avx_vnni", "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd",
    "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI__": "avx512vbmi", "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BITALG__": "avx512_bitalg", "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AMX_TILE__": "amx_tile", "__AMX_BF16__": "amx_bf16", "__AMX_INT8__": "amx_int8",
}


def _required_cpu_flags(cxx_flags):
    """The CPU flags code compiled with ``cxx_flags`` may execute (from the compiler's predefined macros), or None
    when the compiler cannot be asked. Recorded next to _C so that a build copied to an older CPU is refused at
    import (electra_fast/_extension.py) instead of dying of SIGILL."""
    compiler = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]  # "ccache g++", "g++ -pipe": a command line
    try:
        out = subprocess.run([*compiler, *[f for f in cxx_flags if f.startswith("-m")], "-dM", "-E", "-x", "c++",
                              os.devnull], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        print(f"electra_fast setup: warning: could not ask {' '.join(compiler)} for its CPU flags ({e}); the "
              "extension will not be checked against the CPU it is imported on", file=sys.stderr)
        return None
    macros = {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}
    return sorted(flag for macro, flag in _ISA_MACROS.items() if macro in macros)


def _extensions_and_cmdclass():
    if SKIP:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # Without torch there is nothing to compile against; the package still works (reference backend).
        if not OPTIONAL:
            raise RuntimeError("electra_fast: torch is not installed in the build environment, so _C cannot be "
                               "compiled and the build stops: install torch first and use `pip install "
                               "--no-build-isolation`, or set ELECTRA_FAST_SKIP_EXT=1 to install without _C")
        print("WARNING: electra_fast: torch is not installed in the build environment; building without _C "
              "(ELECTRA_FAST_EXT_OPTIONAL)", file=sys.stderr)
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
                return
            # the torch this build links against: _extension.py refuses _C under another torch release
            record = {"march": arch or None, "cpu_flags": _required_cpu_flags(cxx), "torch": torch.__version__}
            targets = [os.path.dirname(self.get_ext_fullpath(extension.name))]  # the wheel's copy
            if self.editable_mode:  # an editable install copies only the .so into the tree: the record goes too
                targets.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "electra_fast"))
            for folder in targets:
                with open(os.path.join(folder, "_C_isa.json"), "w") as fh:
                    json.dump(record, fh)

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
