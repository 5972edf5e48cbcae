"""electra_fast.nn.Linear / linear: nn.Linear with the oneDNN bias-epilogue path under CPU bf16 autocast.

The fast path must compute exactly what autocast's F.linear computes (same bf16 casts, same products,
bias added by the GEMM instead of a pre-filled output) and the same gradients, and must not engage
anywhere else (fp32, the eager twin, torch.compile)."""
import pytest
import torch
import torch.nn.functional as F

import electra_fast
from electra_fast.nn import linear as lin

pytestmark = pytest.mark.skipif(not lin._ONEDNN, reason="torch built without oneDNN: Linear is nn.Linear")


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
    assert _uses_epilogue(fn)
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
    with electra_fast.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin.linear(x, w, b)
    assert not _uses_epilogue(y.grad_fn)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a [N, 1] prediction layer keeps F.linear
        assert not _uses_epilogue(lin.linear(x, w[:1], b[:1]).grad_fn)
        assert _uses_epilogue(lin.linear(x, w, b).grad_fn)


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
