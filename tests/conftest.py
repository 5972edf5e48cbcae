"""Test lanes (DESIGN.md): CPU (reference / C++), interpreter (Triton on CPU tensors under
TRITON_INTERPRET=1) and, when a GPU is visible, Triton on CUDA tensors. One pytest run covers them:
without a GPU this file turns the interpreter on before any kernel module is imported.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import electra_fast  # noqa: E402  (after TRITON_INTERPRET is decided)
from electra_fast import _backend, _extension  # noqa: E402

REQUIRE_EXT = os.environ.get("ELECTRA_FAST_REQUIRE_EXT", "0") == "1"


def _triton_ok() -> bool:
    return _backend.triton_import_error() is None


def fast_backends():
    """(backend, device) pairs checked against the reference: C++ on CPU, Triton on CUDA or interpreted."""
    pairs = [pytest.param("cpp", "cpu", id="cpp-cpu")]
    if _triton_ok():
        if HAS_CUDA:
            pairs.append(pytest.param("triton", "cuda", id="triton-cuda"))
        else:
            pairs.append(pytest.param("triton", "cpu", id="triton-interp", marks=pytest.mark.interpreter))
    return pairs


def backend_dtypes(dtypes, backends=None):
    """``(backend, device, dtype)`` params for every pair in ``backends`` (default: the fast ones) and dtype,
    leaving out what a lane cannot run rather than skipping it: bf16 in the Triton interpreter (its bf16 casts
    truncate and its bf16 tl.dot is wrong with Triton 3.9); those run on the GPU lane."""
    out = []
    for p in backends if backends is not None else fast_backends():
        backend, device = p.values
        for dtype in dtypes:
            if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
                continue
            out.append(pytest.param(backend, device, dtype, marks=p.marks, id=f"{p.id}-{str(dtype)[6:]}"))
    return out


def all_backends():
    return [pytest.param("reference", "cpu", id="reference-cpu")] + fast_backends()


def assert_low_precision(got, low, exact, floor=2e-3, atol=1e-5):
    """DESIGN.md's low-precision criterion, per tensor: ``got`` is within twice the error of the reference run
    in the low-precision dtype (``low``) from the fp32 reference on the same inputs (``exact``), plus ``floor``
    times the largest value (default: half a bf16 ulp of it) and ``atol``. The GPU lane applies it to fp32 too,
    with an fp64 ``exact`` and a floor of a few fp32 ulps."""
    for i, (a, lo, b) in enumerate(zip(got, low, exact)):
        if b is None:
            assert a is None and lo is None
            continue
        b = b.to(torch.float64 if b.dtype == torch.float64 else torch.float32)
        bound = 2 * (lo.to(b.dtype) - b).abs().max() + floor * b.abs().max() + atol
        err = (a.to(b.dtype) - b).abs().max()
        assert err <= bound, f"tensor {i}: max error {err.item():.3g} > bound {bound.item():.3g}"


def _require_extension() -> None:
    """Skip (or, under ELECTRA_FAST_REQUIRE_EXT=1, fail) the calling test when _C is missing."""
    if not _extension.extension_loaded():
        msg = f"C++ extension not built: {_extension.EXTENSION_ERROR}"
        if REQUIRE_EXT:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def cpp_extension():
    """For tests that call C++ kernels directly (no ``backend`` parameter): the same rule as cpp-parametrised ones."""
    _require_extension()


@pytest.fixture(autouse=True)
def _need_backend(request):
    """cpp-parametrised tests need _C (see :func:`_require_extension`)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cpp":
        _require_extension()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
