"""AOT lane: every Triton kernel compiles for sm_80 and sm_90 (no GPU), and the check itself bites."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# The pytest process imported Triton under TRITON_INTERPRET=1 (conftest.py): its standard-library functions are
# interpreter objects there, and compiling for a GPU in that process fails on them (Triton 3.9), whatever the kernel.
# So every compile runs in a fresh process without the interpreter, as `python -m electra_fast.kernels.check` does.
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
ENV.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def test_every_kernel_compiles_for_sm80_and_sm90():
    # timeout: a hang guard only (cold, 368 compiles took 8-17 minutes on a busy 2-core machine)
    proc = subprocess.run([sys.executable, "-m", "electra_fast.kernels.check"], capture_output=True, text=True,
                          env=ENV, timeout=1800)
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("AOT check", "FAIL"))]
    assert proc.returncode == 0, "\n".join(summary) + proc.stderr[-3000:]
    assert "0 failure(s)" in summary[-1]


RUNNER = """
import importlib.util, json, sys
from electra_fast.kernels.check import check_module
spec = importlib.util.spec_from_file_location(sys.argv[1], sys.argv[2])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(json.dumps(check_module(mod, tuple(int(a) for a in sys.argv[3:]))))
"""


def _check(tmp_path, source, name, archs=(80, 90)):
    """check_module on a kernel module written from ``source``, in a fresh process: (compiled, failures)."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    proc = subprocess.run([sys.executable, "-c", RUNNER, name, str(path), *map(str, archs)], capture_output=True,
                          text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled, failures = json.loads(proc.stdout.splitlines()[-1])
    return compiled, failures


KERNEL = textwrap.dedent("""
    import triton
    import triton.language as tl
    from electra_fast.kernels.spec import Spec

    @triton.jit
    def copy_kernel(x, y, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + o, tl.load(x + o, mask=o < n), mask=o < n)
""")


def test_good_specialisation_compiles(tmp_path):
    # the control for the failing cases below: the same kernel with a legal spec passes on both archs
    compiled, failures = _check(tmp_path, KERNEL + """
def compile_specs():
    return [Spec(copy_kernel, {"x": "*fp32", "y": "*fp32", "n": "i32"}, {"BLOCK": 1024})]
""", "goodspec_mod")
    assert (compiled, failures) == (2, [])


def test_kernel_without_spec_fails(tmp_path):
    compiled, failures = _check(tmp_path, KERNEL + "\ndef compile_specs():\n    return []\n", "nospec_mod")
    assert compiled == 0 and any("copy_kernel: kernel without a compile spec" in f for f in failures)


def test_bad_specialisation_fails(tmp_path):
    # BLOCK=1000 is not a power of two: the interpreter would accept it, the compiler must not.
    compiled, failures = _check(tmp_path, KERNEL + """
def compile_specs():
    return [Spec(copy_kernel, {"x": "*fp32", "y": "*fp32", "n": "i32"}, {"BLOCK": 1000})]
""", "badspec_mod", archs=(90,))
    assert compiled == 0 and len(failures) == 1 and "sm_90" in failures[0]
    # the failure names the offending source line and the reason, not a caret line
    assert "tl.arange(0, BLOCK)" in failures[0] and "power of 2" in failures[0]


def test_shared_memory_beyond_the_arch_limit_fails(tmp_path):
    from electra_fast.kernels.check import SHARED_MEMORY_LIMIT

    # fp16 operands [32, 1024] and [1024, 64] staged in shared memory: 192 KiB, over sm_80's 163 KiB, under
    # sm_90's 227 KiB. Triton compiles it for both; only loading it onto an A100 would fail.
    compiled, failures = _check(tmp_path, textwrap.dedent("""
        import triton
        import triton.language as tl
        from electra_fast.kernels.spec import Spec

        @triton.jit
        def dot_kernel(x, y, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
            m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
            a = tl.load(x + m[:, None] * K + k[None, :])
            b = tl.load(x + k[:, None] * N + n[None, :])
            tl.store(y + m[:, None] * N + n[None, :], tl.dot(a, b))

        def compile_specs():
            return [Spec(dot_kernel, {"x": "*fp16", "y": "*fp32"}, {"M": 32, "K": 1024, "N": 64})]
    """), "bigshared_mod")
    assert compiled == 1 and len(failures) == 1, failures
    assert failures[0].startswith("sm_80 ") and f"sm_80 has {SHARED_MEMORY_LIMIT[80]}" in failures[0]


@pytest.mark.parametrize("argv, expected", [(["--only", "nope"], "--only: invalid choice: 'nope'"),
                                            (["--arch", "75"], "--arch: invalid choice: 75"),
                                            (["-j", "0"], "expected a positive number of processes, got 0")])
def test_cli_rejects_bad_arguments(argv, expected, capsys):
    from electra_fast.kernels.check import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and expected in capsys.readouterr().err
