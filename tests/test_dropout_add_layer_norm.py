"""electra_fast.dropout_add_layer_norm: every backend vs the reference (outputs, the pre-norm sum, the mask and
all gradients), the reference vs the unfused composition (electra_fast.dropout + add + F.layer_norm), gradcheck,
opcheck, torch.compile, thread-count independence, bad input."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import electra_fast
from conftest import all_backends, backend_dtypes, fast_backends
from electra_fast.ops.dropout_add_layer_norm import _OP
from electra_fast.reference.dropout import keep_scale, keep_threshold

SEED, STREAM = 0x1234_5678_9ABC, 3
SHAPES = [(1, 5), (37, 64), (70, 100)]  # a ragged last 32-row block; H not a multiple of 4 (rows start mid-call)
# fp32 / fp64: mean, variance and the column sums of dweight / dbias in another order. Low precision: both round
# the same fp32 values to the dtype; a last-bit fp32 difference may move one rounding (1 ulp, the default rtol).
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def make(n, h, dtype, wdtype=None, bias=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    r = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(h, generator=g)).to(device=device, dtype=wdtype or dtype)
    b = (0.1 * torch.randn(h, generator=g)).to(device=device, dtype=wdtype or dtype) if bias else None
    gout = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    return x, r, w, b, gout


def run(backend, x, r, w, b, gout, p, eps=1e-12):
    """(out, h, dx, dresidual, dweight, dbias) through the public op (h from the custom op)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    with electra_fast.use_backend(backend):
        out = electra_fast.dropout_add_layer_norm(*leaves, p=p, seed=SEED, stream=STREAM, eps=eps)
        out.backward(gout)
        h = _OP.op(x, r, w, b, keep_threshold(p), keep_scale(p), SEED, STREAM, eps)[1]
    return [out.detach(), h] + [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend,device,dtype", backend_dtypes(
    [torch.float32, torch.float16, torch.bfloat16, torch.float64]))  # the reference: see the unfused composition
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_backend_matches_reference(backend, device, dtype, shape, p):
    for wdtype, bias in ((None, True), (torch.float32, False)):
        args = make(*shape, dtype, wdtype, bias, device, seed=shape[0])
        got = run(backend, *args, p)
        want = run("reference", *[t.cpu() if t is not None else None for t in args], p)
        out, h, dx, dres, dw, db = got
        assert out.dtype == h.dtype == dx.dtype == dres.dtype == dtype and dw.dtype == (wdtype or dtype)
        # the dropout product and the sum are elementwise and rounded once each on every backend: bitwise
        assert torch.equal(h.cpu(), want[1])
        if p:
            assert torch.equal(dx.cpu() == 0, want[2] == 0)  # the same mask
        for name, a, b in zip(("out", "dx", "dresidual", "dweight", "dbias"), [out, dx, dres, dw, db],
                              [want[0]] + want[2:]):
            if b is None:
                assert a is None
                continue
            torch.testing.assert_close(a.cpu(), b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", all_backends())
def test_reference_is_the_unfused_composition(backend, device):
    """fp64: the fused op equals electra_fast.dropout (same seed / stream: the same mask) + add + F.layer_norm,
    forward and every gradient."""
    x, r, w, b, gout = make(33, 48, torch.float64, device=device)
    got = run(backend, x, r, w, b, gout, 0.25, eps=1e-5)
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    with electra_fast.use_backend(backend):
        want = F.layer_norm(electra_fast.dropout(leaves[0], 0.25, SEED, STREAM) + leaves[1], (48,), leaves[2],
                            leaves[3], 1e-5)
    want.backward(gout)
    for a, b_ in zip([got[0]] + got[2:], [want.detach()] + [t.grad for t in leaves]):
        torch.testing.assert_close(a, b_, **TOL[torch.float64])


@pytest.mark.parametrize("backend,device", [p for p in all_backends() if p.values[0] != "triton"])
def test_gradcheck_fp64(backend, device):
    x, r, w, b, _ = make(5, 7, torch.float64, device=device)
    args = [t.requires_grad_() for t in (x, r, w, b)]
    with electra_fast.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: electra_fast.dropout_add_layer_norm(*a, p=0.3, seed=SEED, stream=1, eps=1e-5), args)


@pytest.mark.parametrize("backend,device", all_backends())
def test_constant_rows_and_empty_input(backend, device):
    """Zero variance (a constant row: the output is the bias, no NaN) and N = 0."""
    x = torch.zeros(4, 16, device=device)
    r = torch.full((4, 16), 3.0, device=device)
    w, b = torch.ones(16, device=device), torch.arange(16.0, device=device)
    with electra_fast.use_backend(backend):
        y = electra_fast.dropout_add_layer_norm(x, r, w, b, p=0.5, seed=1)
        assert torch.equal(y.cpu(), b.cpu().expand(4, 16))
        e = electra_fast.dropout_add_layer_norm(x[:0], r[:0], w, b, p=0.5, seed=1)
        assert e.shape == (0, 16)


# Per dtype, row magnitudes from ordinary to far beyond where the sum of squares overflows the accumulation dtype
# (fp32: |h| > ~1.8e19; fp64: > ~1.3e154), interleaved so one 32-row block / Triton program mixes both kinds.
HUGE = {torch.float32: (1.0, 1e30, 3e19, 1e37), torch.bfloat16: (1.0, 1e30, 3e19, 1e37),
        torch.float64: (1.0, 1e200, 1e160, 1e300)}


@pytest.mark.parametrize("backend,device,dtype", backend_dtypes(list(HUGE), all_backends()))
def test_huge_rows_normalise(backend, device, dtype):
    """Rows of any finite magnitude are normalised, gradients included (once the fp32 variance of 1e30 rows
    overflowed and every backend returned exactly the bias); a row holding inf gives NaN, never a finite wrong
    value. Oracle: LayerNorm in fp64 of each row scaled by an exact power of two s (LN_eps(h) = LN_{eps s^2}(s h))."""
    n, H, eps = 40, 48, 1e-5
    x, _, w, b, gout = make(n, H, torch.float64, seed=5)
    x = (x * torch.tensor(HUGE[dtype], dtype=torch.float64).repeat(n // 4)[:, None]).to(dtype)
    x[-1, 3] = float("inf")
    args = [t.to(device=device, dtype=dtype) for t in (x, torch.zeros_like(x), w, b, gout)]
    out, h, _dx, dres, _dw, _db = [t.cpu() for t in run(backend, *args, 0.0, eps=eps)]
    h, out, dres, gout = h[:-1].double(), out.double(), dres[:-1].double(), gout[:-1].double()
    s = torch.ldexp(torch.ones(n - 1, 1, dtype=torch.float64), -torch.frexp(h.abs().amax(-1, keepdim=True)).exponent)
    hs = (h * s).requires_grad_()
    xc = hs - hs.mean(-1, keepdim=True)
    want = xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps * s * s) * w.double() + b.double()
    want.backward(gout)
    tol = TOL[dtype]
    torch.testing.assert_close(out[:-1], want.detach(), **tol)
    assert out[-1].isnan().all()
    torch.testing.assert_close(dres / s, hs.grad, **tol)  # d/dh = s * d/d(s h)


def test_leading_dims_and_no_dropout_without_seed():
    x, r, w, b, _ = make(6, 8, torch.float32)
    y = electra_fast.dropout_add_layer_norm(x.view(2, 3, 8), r.view(2, 3, 8), w, b)  # p = 0: no seed needed
    torch.testing.assert_close(y, F.layer_norm(x + r, (8,), w, b).view(2, 3, 8), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_is_thread_count_independent(dtype, cpp_extension):
    args = make(300, 96, dtype, torch.float32)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            results.append(run("cpp", *args, 0.1))
        finally:
            torch.set_num_threads(2)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        x, r, w, b, _ = make(5, 12, dtype)
        args = [t.requires_grad_() for t in (x, r, w, b)]
        torch.library.opcheck(_OP.op, (*args, keep_threshold(0.3), keep_scale(0.3), SEED, STREAM, 1e-5))
        torch.library.opcheck(_OP.op, (*args[:3], None, 0, 1.0, -5, 0, 1e-12))


def test_torch_compile_fullgraph():
    x, r, w, b, _ = make(8, 32, torch.float32)

    def f(x, r, w, b):
        return electra_fast.dropout_add_layer_norm(x * 2, r, w, b, p=0.1, seed=SEED).tanh().sum()

    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    loss.backward()
    eager = [t.clone().requires_grad_() for t in (x, r, w, b)]
    want = f(*eager)
    want.backward()
    assert torch.equal(loss, want) and all(torch.equal(a.grad, e.grad) for a, e in zip(leaves, eager))


def _kw(**over):
    x, r, w, b, _ = make(4, 8, torch.float32)
    kw = dict(input=x, residual=r, weight=w, bias=b, p=0.1, seed=0)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,exc,match", [
    (dict(input=[[1.0]]), TypeError, "input"),
    (dict(input=torch.zeros(4, 8, dtype=torch.long)), TypeError, "input"),
    (dict(residual=torch.zeros(4, 7)), ValueError, "residual"),
    (dict(residual=torch.zeros(4, 8, dtype=torch.float64)), ValueError, "residual"),
    (dict(input=torch.zeros(4, 0), residual=torch.zeros(4, 0)), ValueError, "input"),
    (dict(weight=torch.ones(7)), ValueError, "weight"),
    (dict(weight=torch.ones(8, dtype=torch.float64)), ValueError, "weight"),
    (dict(bias=torch.zeros(7)), ValueError, "bias"),
    (dict(bias=torch.zeros(8, dtype=torch.float64)), ValueError, "bias"),
    (dict(p=1.0 + 1e-9), ValueError, "p"),
    (dict(p=-0.1), ValueError, "p"),
    (dict(p=float("nan")), ValueError, "p"),
    (dict(p="0.1"), TypeError, "p"),
    (dict(seed=None), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(stream=2 ** 32), ValueError, "stream"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=1e-46), ValueError, "^eps: 1e-46 rounds to 0 in fp32"),  # legal-looking, and a constant row gave NaN
    (dict(eps=float("inf")), ValueError, "eps"),
])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        electra_fast.dropout_add_layer_norm(**_kw(**over))


def test_p_one_drops_all_of_input_as_torch_does():
    # legal in torch (transformers models with dropout 1.0 train); the op refused it, so patched models raised
    kw = _kw(p=1.0)
    x = kw["input"].clone().requires_grad_()
    r = kw["residual"].clone().requires_grad_()
    out = electra_fast.dropout_add_layer_norm(**{**kw, "input": x, "residual": r})
    want = torch.nn.functional.layer_norm(r.detach(), (r.shape[-1],), kw["weight"], kw["bias"], 1e-5)  # the default
    torch.testing.assert_close(out, want)
    out.square().sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and r.grad.abs().sum() > 0


def test_triton_row_limit_is_the_kernels():
    """Routing reads the row limit from the kernels (kernels own their limits): a row one wider than MAX_H is
    refused by the Triton backend with the kernels' reason, one at MAX_H is served; the old name still answers."""
    pytest.importorskip("triton")
    from electra_fast.kernels import dropout_add_layer_norm as kernels
    op = importlib.import_module("electra_fast.ops.dropout_add_layer_norm")  # the module, not the function

    assert op.SPEC.unsupported("triton", hidden=kernels.MAX_H) == []
    assert "H = " in op.SPEC.unsupported("triton", hidden=kernels.MAX_H + 1)[0]
    assert op.SPEC.unsupported("cpp", hidden=kernels.MAX_H + 1) == []
    with pytest.warns(DeprecationWarning, match="kernels.dropout_add_layer_norm.MAX_H"):
        assert op.TRITON_MAX_H == kernels.MAX_H  # the old name still answers


@pytest.mark.parametrize("backend,device", fast_backends())
def test_forced_backend_serves_the_call(backend, device):
    """A forced fast backend runs its own kernels (no silent fallback) for a 3-d bf16 / fp16 input."""
    dtype = torch.float16 if device == "cpu" and backend == "triton" else torch.bfloat16
    x, r, w, b, _ = make(6, 40, dtype, torch.float32, device=device)
    with electra_fast.use_backend(backend):
        y = electra_fast.dropout_add_layer_norm(x.view(2, 3, 40), r.view(2, 3, 40), w, b, p=0.2, seed=9)
    assert y.shape == (2, 3, 40) and y.dtype == dtype and torch.isfinite(y).all()
