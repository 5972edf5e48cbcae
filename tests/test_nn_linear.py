"""electra_fast.nn.Linear / linear: nn.Linear with the oneDNN bias-epilogue path under CPU bf16 autocast.

The fast path must compute exactly what autocast's F.linear computes (same bf16 casts, same products,
bias added by the GEMM instead of a pre-filled output) and the same gradients, and must not engage
anywhere else (fp32, the eager twin, torch.compile)."""
import pytest
import torch
import torch.nn.functional as F

import electra_fast
from conftest import assert_low_precision
from electra_fast import _cpu
from electra_fast.nn import linear as lin

# Where oneDNN has no native bf16 GEMM (an AVX2-only CPU, or the forced-AVX2 lane) the fast path must stay off and
# every test below must still hold with F.linear: the same assertions run on both kinds of CPU.
FAST = _cpu.onednn_bf16_linear()[0]


def _case(shape=(4, 33, 48), out=80, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = (torch.randn(out, shape[-1], generator=g) * 0.1).requires_grad_()
    b = torch.randn(out, generator=g).requires_grad_() if bias else None
    return x, w, b


def _uses_epilogue(grad_fn) -> bool:
    """The output is a view of the epilogue GEMM's result: its grad_fn or the one below it."""
    fns = [grad_fn] + [f for f, _ in grad_fn.next_functions if f is not None]
    return any(type(f).__name__ == "_EpilogueLinearBackward" for f in fns)


def _run(fn, x, w, b, dy):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, w, b)
    y.backward(dy)
    return y, [None if t is None else t.grad.clone() for t in (x, w, b)], y.grad_fn


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 33, 48), (130, 64), (2, 3, 5, 32)])
def test_matches_autocast_linear(shape, bias):
    x, w, b = _case(shape, bias=bias)
    dy = torch.randn(*shape[:-1], w.shape[0]).bfloat16()
    y, grads, fn = _run(lin.linear, x, w, b, dy)
    assert _uses_epilogue(fn) == FAST
    y_ref, grads_ref, _ = _run(F.linear, x, w, b, dy)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and y.shape == y_ref.shape
    # same bf16 operands and fp32 accumulation (bitwise equal on the AMX machine this was written on); another
    # oneDNN kernel may sum in another order: allow ~2 bf16 ulps
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2 ** -7, atol=1e-2)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is not None:
            assert g.dtype == g_ref.dtype == torch.float32  # parameters / fp32 inputs get fp32 grads
            torch.testing.assert_close(g, g_ref, rtol=2 ** -7, atol=1e-2)


def test_fp32_and_eager_twin_are_plain_linear():
    x, w, b = _case()
    y = lin.linear(x, w, b)
    assert not _uses_epilogue(y.grad_fn) and torch.equal(y, F.linear(x, w, b))
    with electra_fast.eager_twin_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin.linear(x, w, b)
    assert not _uses_epilogue(y.grad_fn)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a [N, 1] prediction layer keeps F.linear
        assert not _uses_epilogue(lin.linear(x, w[:1], b[:1]).grad_fn)
        assert _uses_epilogue(lin.linear(x, w, b).grad_fn) == FAST


def test_module_is_nn_linear():
    m = lin.Linear(16, 32)
    assert isinstance(m, torch.nn.Linear) and set(m.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(m(x).float(), F.linear(x, m.weight, m.bias).float(), rtol=2 ** -7, atol=1e-2)


def test_compiles_fullgraph():
    m = lin.Linear(16, 32)
    x = torch.randn(3, 16)
    fn = torch.compile(m, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fn(x).float(), F.linear(x, m.weight, m.bias).float(), rtol=2 ** -7, atol=1e-2)


# ------------------------------------------------------------------------------------------- gelu_mlp
def test_gelu_and_grad_kernel(cpp_extension):
    """The C++ GELU + derivative (erf by Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7) against torch's in fp64,
    over the whole range where either changes (fp32: within 1e-6 absolute, far below a bf16 ulp)."""
    op = lin._GELU_AND_GRAD
    z = torch.linspace(-14, 14, 200001, dtype=torch.float64)
    y, s = op(z.float())
    zr = z.clone().requires_grad_()
    yr = F.gelu(zr)
    yr.backward(torch.ones_like(yr))
    assert (y.double() - yr.detach()).abs().max() < 1e-6 and (s.double() - zr.grad).abs().max() < 1e-6
    yb, sb = op(z.bfloat16())  # bf16: the fp32 values rounded once
    zb = z.bfloat16().double()
    yrb = F.gelu(zb)
    torch.testing.assert_close(yb.double(), yrb, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_gelu_mlp_matches_unfused(bias, cpp_extension):
    """Under CPU bf16 autocast the fused feed-forward block (GELU's backward inside the second product's) is as
    close to the fp32 computation as the unfused autocast composition (DESIGN.md's low-precision criterion): the
    same bf16 products; the backward rounds gelu'(z) to bf16 where the unfused one rounds dY w2."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, 48, generator=g, requires_grad=True)
    w1 = (torch.randn(96, 48, generator=g) * 0.15).requires_grad_()
    w2 = (torch.randn(32, 96, generator=g) * 0.1).requires_grad_()
    b1 = torch.randn(96, generator=g).requires_grad_() if bias else None
    b2 = torch.randn(32, generator=g).requires_grad_() if bias else None
    dy = torch.randn(3, 40, 32, generator=g).bfloat16()
    leaves = [t for t in (x, w1, b1, w2, b2) if t is not None]

    def run(fn, autocast=True):
        for t in leaves:
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x, w1, b1, w2, b2)
        y.backward(dy.float() if not autocast else dy)
        return [y.detach().float()] + [t.grad.clone() for t in leaves], y.grad_fn

    def unfused(*a):
        return F.linear(F.gelu(F.linear(a[0], a[1], a[2])), a[3], a[4])

    got, fn = run(lin.gelu_mlp)
    fused = "_GeluMLP" in type(fn).__name__ or any("_GeluMLP" in type(f).__name__ for f, _ in fn.next_functions if f)
    assert fused == FAST
    low, _ = run(unfused)
    exact, _ = run(unfused, autocast=False)
    assert_low_precision(got, low, exact)
    # outside the fast path it is the plain composition
    with electra_fast.eager_twin_mode():
        y2 = lin.gelu_mlp(x, w1, b1, w2, b2)
    torch.testing.assert_close(y2, F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2))
