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


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="spies on the interpreter's launches")
def test_every_launch_pins_the_compile_options(monkeypatch):
    """Every kernel, launched by its op's forward and backward, gets spec.COMPILE_OPTIONS (FMA fusion on: Triton 3.10
    turns its default off), and the check compiles with the same options."""
    import importlib

    import torch
    from triton.runtime import interpreter

    import electra_fast
    from electra_fast.kernels import check
    from electra_fast.kernels.spec import COMPILE_OPTIONS

    assert COMPILE_OPTIONS == {"enable_fp_fusion": True}
    launched = {}
    run = interpreter.InterpretedFunction.run

    def spy(self, *args, **kwargs):
        launched.setdefault(self.fn.__name__, []).append({k: kwargs.get(k) for k in COMPILE_OPTIONS})
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", spy)
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    with electra_fast.use_backend("triton"):
        x = leaf(4, 8)
        electra_fast.dropout(x, 0.5, 1).sum().backward()
        x, r, w, b = leaf(4, 8), leaf(4, 8), leaf(8), leaf(8)
        electra_fast.dropout_add_layer_norm(x, r, w, b, p=0.1, seed=1).sum().backward()
        electra_fast.mask_tokens(torch.randint(5, 100, (2, 16), generator=g), mask_token_id=1, vocab_size=100, seed=3)
        logits = leaf(2, 5)
        electra_fast.rtd_loss(logits, torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)).backward()
        electra_fast.gumbel_sample(torch.randn(3, 10, generator=g), seed=1)
        h, w, b = leaf(3, 8), leaf(10, 8), leaf(10)
        electra_fast.mlm_loss_and_sample(h, w, torch.tensor([1, 4, -100]), bias=b, seed=1)[0].backward()
        q, k, v, pk, pq = leaf(1, 2, 6, 32), leaf(1, 2, 6, 32), leaf(1, 2, 6, 32), leaf(2, 8, 32), leaf(2, 8, 32)
        electra_fast.disentangled_attention(q, k, v, pk, pq, position_buckets=4,
                                            max_relative_positions=8).sum().backward()
    kernels = {n for m in check.kernel_modules() for n in vars(importlib.import_module(f"electra_fast.kernels.{m}"))
               if n.endswith("_kernel")}
    assert set(launched) == kernels
    assert all(o == COMPILE_OPTIONS for calls in launched.values() for o in calls), launched
