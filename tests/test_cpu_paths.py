"""Portability: every instruction-set-specific path asks first (electra_fast._cpu), the checkout's kernels/ folder
never shadows the PyPI package ``kernels``, and a C++ build for another CPU is refused instead of crashing.

The forced-AVX2 lane (`make test-avx2`) runs this file, the model / linear / attention / sampling tests and the
training tests on an install built for x86-64-v3 with oneDNN and ATen capped at AVX2."""
import ast
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from electra_fast import _cpu, _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPPED = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
ELSEWHERE = tempfile.gettempdir()  # imports electra_fast as installed (the lane's install, not the checkout)


def _python(code: str, cwd: str = ELSEWHERE, extra_env=None, flags=()):
    """Run ``code`` in a fresh interpreter with ``cwd`` as the working directory (so on sys.path, as for a user's
    ``python -c``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH", *CAPPED)}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_transformers_imports_from_the_checkout_root():
    """transformers >= 5.25 imports the PyPI package ``kernels``; the checkout's kernels/ must not shadow it."""
    pytest.importorskip("transformers")
    proc = _python("""
        import transformers.models.deberta_v2.modeling_deberta_v2
        import transformers.models.electra.modeling_electra
        import kernels
        print(kernels.__file__)
    """, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not os.path.abspath(proc.stdout.split()[-1]).startswith(os.path.join(ROOT, "kernels"))


def test_kernels_folder_is_not_a_top_level_package():
    """Without the PyPI package (-S: no site-packages), ``import kernels`` from the root fails as a missing one."""
    proc = _python("import kernels", cwd=ROOT, flags=("-S",))
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in proc.stderr


def test_capped_isa_means_no_native_bf16_and_no_onednn_linear():
    proc = _python("""
        from electra_fast import _cpu
        print(_cpu.native_bf16()[0], _cpu.onednn_bf16_linear()[0], _cpu.default_precision("cpu")[0])
        print(_cpu.native_bf16()[1])
    """, extra_env=CAPPED)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == "False False fp32"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in proc.stdout


@pytest.mark.parametrize("env,capped,note", [
    ({"ATEN_CPU_CAPABILITY": "AVX2"}, False, "ATEN_CPU_CAPABILITY=AVX2 (ignored by torch"),  # torch's names: lower case
    ({"ONEDNN_MAX_CPU_ISA": "bogus"}, False, "ONEDNN_MAX_CPU_ISA=bogus (ignored: not a oneDNN ISA name)"),
    # oneDNN ignores a value with a stray space (its verbose log shows AVX-512 bf16 kernels): it caps nothing
    ({"ONEDNN_MAX_CPU_ISA": "AVX2 "}, False, "ONEDNN_MAX_CPU_ISA=AVX2  (ignored: not a oneDNN ISA name)"),
    ({"ONEDNN_MAX_CPU_ISA": "avx2"}, True, "ONEDNN_MAX_CPU_ISA=avx2"),  # its case is not
    ({"DNNL_MAX_CPU_ISA": "AVX2"}, True, "DNNL_MAX_CPU_ISA=AVX2"),  # oneDNN's older name, reported as itself
])
def test_caps_are_read_as_their_libraries_read_them(env, capped, note):
    """A cap the library ignores caps nothing (info said "NOT native" and the benchmarks dropped their bf16 rows);
    one it honours is named as set."""
    proc = _python("""
        from electra_fast import _cpu
        print(_cpu.native_bf16()[1])
        print(_cpu.report()[0])
    """, extra_env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    why, cpu_line = proc.stdout.splitlines()[-2:]
    assert note in cpu_line
    if capped:
        assert why.startswith(note.split(" ")[0]), why
    else:
        assert "caps" not in why, why


def test_switch_turns_the_onednn_path_off():
    proc = _python("from electra_fast import _cpu; print(_cpu.onednn_bf16_linear())",
                   extra_env={"ELECTRA_FAST_NO_ONEDNN": "1"})
    assert proc.returncode == 0 and "(False, 'disabled by ELECTRA_FAST_NO_ONEDNN')" in proc.stdout


def test_onednn_linear_answer_matches_a_direct_try():
    """Where the probe says yes the private op really serves bf16; where it says no, the op really fails or the
    CPU has no native bf16 (the probe must not turn off a working fast path for no reason)."""
    x, w, b = torch.randn(8, 64).bfloat16(), torch.randn(32, 64).bfloat16(), torch.randn(32).bfloat16()
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        works = torch.allclose(y.float(), torch.nn.functional.linear(x.float(), w.float(), b.float()),
                               rtol=2e-2, atol=0.5)
    except Exception:  # noqa: BLE001 - the failure this module exists to avoid
        works = False
    ok, why = _cpu.onednn_bf16_linear()
    if ok:
        assert works
    else:
        assert not works or not _cpu.native_bf16()[0] or "ELECTRA_FAST_NO_ONEDNN" in why


def test_bf16_autocast_linear_and_mlp_run_on_a_capped_cpu():
    """The crash seen on an AVX2-only EPYC: oneDNN's private linear op under bf16 autocast. Capped, the layers must
    take F.linear and give autocast's numbers."""
    proc = _python("""
        import torch, torch.nn.functional as F
        from electra_fast.nn import linear as lin
        x, w1, b1 = torch.randn(6, 32), torch.randn(64, 32) * 0.1, torch.randn(64)
        w2, b2 = torch.randn(32, 64) * 0.1, torch.randn(32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin.gelu_mlp(x, w1, b1, w2, b2)
            ref = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        assert torch.equal(y, ref), (y - ref).abs().max()
        print("ok")
    """, extra_env=CAPPED)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_extension_built_for_another_cpu_is_refused(tmp_path, monkeypatch):
    sidecar = tmp_path / "_C_isa.json"
    sidecar.write_text(json.dumps({"march": "sapphirerapids", "cpu_flags": ["avx2", "amx_tile"]}))
    monkeypatch.setattr(_cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    err = _extension.isa_error(str(sidecar))
    assert err is not None and "amx_tile" in err and "ELECTRA_FAST_CPU_ARCH" in err
    sidecar.write_text(json.dumps({"march": "x86-64-v3", "cpu_flags": ["avx2", "fma"]}))
    assert _extension.isa_error(str(sidecar)) is None
    assert _extension.isa_error(str(tmp_path / "absent.json")) is None  # older builds recorded nothing


def test_extension_built_against_another_torch_is_refused(tmp_path):
    """torch upgraded after electra_fast was built: _C is refused before it loads (a changed C++ ABI could fail
    anywhere), with the versions and the rebuild command; a patch release or another build of the same release
    (+cpu / +cu130) keeps it."""
    sidecar = tmp_path / "_C_isa.json"
    sidecar.write_text(json.dumps({"march": "native", "cpu_flags": [], "torch": "2.13.0+cpu"}))
    err = _extension.torch_error(str(sidecar), running="2.14.1+cu130")
    assert err is not None and "2.13.0+cpu" in err and "2.14.1+cu130" in err and "--no-build-isolation" in err
    assert _extension.torch_error(str(sidecar), running="3.13.0") is not None
    assert _extension.torch_error(str(sidecar), running="2.13.1+cu130") is None
    assert _extension.torch_error(str(sidecar), running="2.13.0") is None
    sidecar.write_text(json.dumps({"march": "native", "cpu_flags": []}))
    assert _extension.torch_error(str(sidecar), running="2.14.1") is None  # older builds recorded no torch
    assert _extension.torch_error(str(tmp_path / "absent.json"), running="2.14.1") is None


def test_a_missing_or_cut_short_extension_is_refused_before_loading(tmp_path, cpp_extension):
    """No _C (ELECTRA_FAST_SKIP_EXT, a failed optional compile) was reported as Python's "cannot import name '_C'
    from partially initialized module (most likely due to a circular import)"; a _C cut short by a full disk killed
    `import electra_fast` with SIGBUS. Both are refused before the import, in plain words; a stripped copy (what
    distribution packaging does) is whole and loads."""
    import shutil
    err = _extension.file_error(None)
    assert err.startswith("electra_fast._C is not built in this install") and "--no-build-isolation" in err
    built = _extension.built_file()
    assert _extension.file_error(built) is None and _extension.file_error("") is None  # "": a finder raised
    data = open(built, "rb").read()
    for keep in (100, 4096, 100_000, len(data) // 2, len(data) - 1):
        (tmp_path / "_C.so").write_bytes(data[:keep])
        err = _extension.file_error(str(tmp_path / "_C.so"))
        assert err is not None and ("a copy cut short?" in err or "shorter than its ELF header" in err), keep
    (tmp_path / "text.so").write_bytes(b"hello")  # not ELF: the import judges it (and fails cleanly)
    assert _extension.file_error(str(tmp_path / "text.so")) is None
    if shutil.which("strip"):
        shutil.copy(built, tmp_path / "stripped.so")
        subprocess.run(["strip", "--strip-unneeded", str(tmp_path / "stripped.so")], check=True)
        assert os.path.getsize(tmp_path / "stripped.so") < len(data)
        assert _extension.file_error(str(tmp_path / "stripped.so")) is None
        proc = _python(f"import torch; torch.ops.load_library({str(tmp_path / 'stripped.so')!r}); print('loaded')")
        assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]


def test_this_build_runs_here(cpp_extension):
    """The build CI made records the flags its -march needs, and this CPU has them all, and the torch it was
    compiled against, which is the one running."""
    assert _extension.BUILD_ISA.get("cpu_flags"), "setup.py recorded no instruction sets for _C"
    assert _cpu.missing_flags(_extension.BUILD_ISA["cpu_flags"]) == []
    assert _extension.BUILD_ISA.get("torch") == torch.__version__


def test_info_reports_the_paths():
    proc = _python("from electra_fast.info import report; print(report())", extra_env=CAPPED)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "cpu bf16     NOT native (ONEDNN_MAX_CPU_ISA=AVX2" in out and "--precision auto -> fp32" in out
    assert "Linear / MLP torch F.linear" in out


def _setup_py_switch():
    """setup.py's own switch reader (it runs before the package can be imported, so it cannot call _cpu.switch),
    taken out of the file without running setup()."""
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    func = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "_switch")
    scope = {"os": os}
    exec(compile(ast.Module(body=[func], type_ignores=[]), "setup.py", "exec"), scope)  # noqa: S102 - our file
    return scope["_switch"]


def test_switches_read_as_the_cpp_reads_them(monkeypatch):
    """Python and csrc/env_switch.h once disagreed on "0 " (info reported the AVX-512 path while the C++ ran the
    portable one); both read "false" / "no" / "off" as on, turning the path off (ELECTRA_FAST_NO_UNPAD=false ran
    padded batches, ~3x slower). setup.py read "true" as off (ELECTRA_FAST_SKIP_EXT=true compiled for 4 minutes)."""
    cpp = getattr(torch.ops.electra_fast_cpp, "env_switch", None) if _extension.EXTENSION_ERROR is None else None
    setup_switch = _setup_py_switch()
    for value, on in (("", False), ("0", False), (" 0 ", False), ("false", False), ("False", False), ("no", False),
                      ("OFF", False), ("1", True), ("yes", True), ("true", True), ("2", True), ("on", True),
                      ("\xa0", True), ("0\u3000", True), ("\t0\n", False)):  # C's blanks only
        monkeypatch.setenv("ELECTRA_FAST_NO_AVX512", value)
        assert _cpu.switch("ELECTRA_FAST_NO_AVX512") is on, value
        assert setup_switch("ELECTRA_FAST_NO_AVX512") is on, value
        if cpp is not None:
            assert cpp("ELECTRA_FAST_NO_AVX512") is on, value
    assert cpp is not None or not os.environ.get("ELECTRA_FAST_REQUIRE_EXT")


def test_odd_build_records_are_no_crash(tmp_path, monkeypatch):
    """A record that is JSON but no object broke `import electra_fast`; one whose cpu_flags is null (setup.py could
    not ask the compiler) broke `python -m electra_fast.info`."""
    from electra_fast import info
    for text in ("[]", "null", "3"):
        (tmp_path / "isa.json").write_text(text)
        assert _extension.read_build_isa(str(tmp_path / "isa.json")) == {}
    monkeypatch.setattr(_extension, "BUILD_ISA", {"cpu_flags": None})
    assert all(isinstance(line, str) for line in info._cpp_paths())


def test_disabling_the_extension_does_not_load_it():
    """ELECTRA_FAST_DISABLE_EXT was read after `from . import _C`: an extension that crashes while loading (a
    SIGILL, an ABI abort) took `import electra_fast` down with it, switch or not."""
    code = "import sys, electra_fast; from electra_fast import _extension; " \
           "print('electra_fast._C' in sys.modules, _extension.extension_loaded(), _extension.EXTENSION_ERROR)"
    env = {**os.environ, "ELECTRA_FAST_DISABLE_EXT": "yes"}
    env.pop("ELECTRA_FAST_REQUIRE_EXT", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ELSEWHERE,
                         timeout=120)
    assert out.stdout.split(None, 2) == ["False", "False", "disabled by ELECTRA_FAST_DISABLE_EXT\n"], out.stderr


@pytest.mark.skipif(not _extension.extension_loaded(), reason="info reports the C++ paths only with the extension")
def test_info_reports_dropout_from_the_cpu_and_gumbel_from_the_build(monkeypatch):
    """Dropout's 16-lane Philox asks the CPU at run time (csrc/keep_bytes.cpp); only the Gumbel noise needs an
    AVX-512 build. info judged both by the build (an x86-64-v3 build on an AVX-512 CPU was "portable")."""
    from electra_fast import info
    monkeypatch.delenv("ELECTRA_FAST_NO_AVX512", raising=False)
    monkeypatch.setattr(_cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw", "bmi2"}))
    monkeypatch.setattr(_extension, "BUILD_ISA", {"cpu_flags": ["avx2"]})
    assert info._cpp_paths()[1].endswith("dropout: 16-lane AVX-512; Gumbel noise: portable (build without AVX-512)")
    monkeypatch.setattr(_cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(_extension, "BUILD_ISA", {"cpu_flags": ["avx2", "avx512f"]})
    assert info._cpp_paths()[1].endswith("dropout: portable (no AVX-512 on this CPU); Gumbel noise: 16-lane AVX-512")
