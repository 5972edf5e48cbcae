"""Backend routing: forcing, fallback, errors, and a C++ extension that CI must have built."""
import logging
import os
import subprocess
import sys

import pytest
import torch

import electra_fast
from electra_fast import _backend, _extension


def _rtd(device="cpu"):
    x = torch.randn(2, 5, device=device)
    ids = torch.zeros(2, 5, dtype=torch.long, device=device)
    return electra_fast.rtd_loss(x, ids, ids)


def test_extension_built_when_required():
    """CI runs with ELECTRA_FAST_REQUIRE_EXT=1: it must exercise the C++ path, never silently fall back."""
    if os.environ.get("ELECTRA_FAST_REQUIRE_EXT") != "1":
        pytest.skip("ELECTRA_FAST_REQUIRE_EXT is not set (the README test command sets it)")
    assert _extension.extension_loaded(), _extension.EXTENSION_ERROR
    assert "cpp" in electra_fast.available_backends("cpu")
    assert _backend.resolve("rtd_loss", torch.device("cpu"), cpp="rtd_loss_fwd", triton="rtd_loss") == ("cpp", None)


def test_use_backend_nests_and_restores():
    assert _backend.forced_backend() is None
    with electra_fast.use_backend("reference"):
        assert _backend.forced_backend() == "reference"
        with electra_fast.use_backend(None):
            assert _backend.forced_backend() is None
        assert _backend.forced_backend() == "reference"
    assert _backend.forced_backend() is None


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend"):
        with electra_fast.use_backend("cuda"):
            pass


def test_env_forcing(monkeypatch):
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "reference")
    assert _backend.resolve("rtd_loss", torch.device("cpu"), cpp="rtd_loss_fwd")[0] == "reference"
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="ELECTRA_FAST_BACKEND"):
        _rtd()
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "auto")
    assert _backend.forced_backend() is None


def test_context_beats_env(monkeypatch):
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "triton")
    with electra_fast.use_backend("reference"):
        _rtd()  # would raise under the env's forced triton on CPU without the interpreter


def test_forced_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with electra_fast.use_backend("triton"), pytest.raises(RuntimeError, match="forced.*CUDA"):
        _rtd()
    with electra_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="cpp.*CPU tensors, got meta"):
        _backend.resolve("rtd_loss", torch.device("meta"), cpp="rtd_loss_fwd")


def test_meta_device_goes_to_reference_via_fake_kernel():
    # meta tensors take the registered fake kernel: shapes and dtypes without computing anything
    loss = _rtd("meta")
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32


def test_automatic_fallback_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(_extension, "EXTENSION_ERROR", "pretend it failed to load")
    _backend._logged.clear()
    with caplog.at_level(logging.WARNING, logger="electra_fast"):
        a = _rtd()
        b = _rtd()
    msgs = [r.getMessage() for r in caplog.records if "rtd_loss" in r.getMessage()]
    assert len(msgs) == 1 and "pretend it failed to load" in msgs[0] and "using the reference" in msgs[0]
    assert torch.isfinite(a) and torch.isfinite(b)


def test_supports_refusal_routes_to_reference():
    def refuse(backend):
        return "head dim 48 unsupported" if backend == "cpp" else None

    assert _backend.resolve("x", torch.device("cpu"), cpp="rtd_loss_fwd", supports=refuse) == (
        "reference", "cpp backend unavailable (head dim 48 unsupported)")
    with electra_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="head dim 48"):
        _backend.resolve("x", torch.device("cpu"), cpp="rtd_loss_fwd", supports=refuse)


def test_serving_names_the_backend_that_serves(monkeypatch):
    """OpSpec.serving pairs the callable with its backend's name (ops whose checks depend on the backend read it):
    the name follows forcing and fallback, and the callable is the one implementation() returns."""
    from electra_fast.ops.rtd_loss import SPEC
    from electra_fast.reference import rtd_loss as ref

    cpu = torch.device("cpu")
    with electra_fast.use_backend("reference"):
        assert SPEC.serving("forward", cpu) == ("reference", ref.forward)
    if _extension.extension_loaded():
        backend, fn = SPEC.serving("forward", cpu)
        assert backend == "cpp" and fn is SPEC.implementation("forward", cpu) and fn is not ref.forward
    monkeypatch.setattr(_extension, "EXTENSION_ERROR", "pretend it failed to load")
    assert SPEC.serving("forward", cpu) == ("reference", ref.forward)


@pytest.mark.skipif(not _extension.extension_loaded(), reason="needs a second CPU backend (the C++ extension)")
def test_the_backward_runs_on_the_backend_its_forward_was_forced_onto(monkeypatch):
    """backward() is usually called after the use_backend block (and on CUDA in autograd's own thread): it routed
    again there, so a forward forced onto the reference - the eager twin's too - had C++ gradients."""
    from electra_fast.models import ElectraConfig, ElectraPretrainingModel
    served = []
    serving = _backend.OpSpec.serving

    def recording(self, stage, device, **call):
        backend, fn = serving(self, stage, device, **call)
        served.append((self.name, stage, backend))
        return backend, fn
    monkeypatch.setattr(_backend.OpSpec, "serving", recording)
    q = torch.randn(1, 2, 6, 8, requires_grad=True)
    with electra_fast.use_backend("reference"):
        out = electra_fast.disentangled_attention(q, q, q)
    with electra_fast.use_backend("cpp"):  # where backward() is called does not matter
        out.sum().backward()
    assert {(op, stage, b) for op, stage, b in served if op == "disentangled_attention"} == {
        ("disentangled_attention", "forward", "reference"), ("disentangled_attention", "backward", "reference")}
    served.clear()
    cfg = ElectraConfig(vocab_size=64, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4,
                        embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, generator_hidden_size=16, generator_num_hidden_layers=1,
                        generator_num_attention_heads=1, generator_intermediate_size=32, max_position_embeddings=32,
                        attention="disentangled", position_buckets=4, max_relative_positions=8)
    twin = ElectraPretrainingModel(cfg, fused=False)
    twin(torch.randint(5, 64, (2, 12)), seed=1).loss.backward()
    assert served and {b for _, _, b in served} == {"reference"}, sorted(set(served))


def _python(code, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_broken_extension_never_breaks_import(tmp_path):
    """An _C that fails to load (here: raises on import, as one built against another torch does)."""
    code = (
        "import sys, types, importlib.abc, importlib.machinery\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'electra_fast._C':\n"
        "            raise ImportError('undefined symbol: _ZN3c10Fake')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import torch, electra_fast\n"
        "assert not electra_fast.extension_loaded()\n"
        "assert 'cpp' not in electra_fast.available_backends()\n"
        "x = torch.randn(2, 3); i = torch.zeros(2, 3, dtype=torch.long)\n"
        "print(float(electra_fast.rtd_loss(x, i, i)))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert "undefined symbol" in proc.stderr  # the one-time fallback warning names the reason
    float(proc.stdout.strip())


def test_info_reports_extension_and_backends():
    proc = _python("import electra_fast.info as i; i.main()")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "rtd_loss" in out and "triton" in out
    if _extension.extension_loaded():
        assert "extension    built" in out
        assert any(line.startswith("rtd_loss") and line.split()[1] == "cpp" for line in out.splitlines())


def test_cli_info_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "electra_fast", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "electra_fast" in proc.stdout
