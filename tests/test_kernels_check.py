"""AOT lane: every Triton kernel compiles for sm_80 and sm_90 (no GPU), and the check itself bites."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "electra_fast.kernels.check"], capture_output=True, text=True,
                          env=env, timeout=900)
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("AOT check", "FAIL"))]
    assert proc.returncode == 0, "\n".join(summary) + proc.stderr[-3000:]
    assert "0 failure(s)" in summary[-1]


def _load(tmp_path, source, name):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


KERNEL = textwrap.dedent("""
    import triton
    import triton.language as tl
    from electra_fast.kernels.spec import Spec

    @triton.jit
    def copy_kernel(x, y, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + o, tl.load(x + o, mask=o < n), mask=o < n)
""")


def test_kernel_without_spec_fails(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from electra_fast.kernels.check import check_module

    mod = _load(tmp_path, KERNEL + "\ndef compile_specs():\n    return []\n", "nospec_mod")
    compiled, failures = check_module(mod)
    assert compiled == 0 and any("copy_kernel: kernel without a compile spec" in f for f in failures)


def test_bad_specialisation_fails(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from electra_fast.kernels.check import check_module

    # BLOCK=1000 is not a power of two: the interpreter would accept it, the compiler must not.
    mod = _load(tmp_path, KERNEL + """
def compile_specs():
    return [Spec(copy_kernel, {"x": "*fp32", "y": "*fp32", "n": "i32"}, {"BLOCK": 1000})]
""", "badspec_mod")
    compiled, failures = check_module(mod, archs=(90,))
    assert compiled == 0 and len(failures) == 1 and "sm_90" in failures[0]
