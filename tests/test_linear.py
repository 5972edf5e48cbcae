"""electra_fast.linear / gelu_mlp (and nn.Linear): linear layers whose CPU bf16-autocast products carry the bias and
the GELU backward in oneDNN's epilogues.

The op path must compute what autocast's F.linear / F.gelu composition computes (same bf16 casts, same products)
and the same gradients, must not engage anywhere else (fp32, the eager twin, torch.compile), and its C++ kernels
must match the reference's (electra_fast/reference/linear.py): exactly where oneDNN does not serve, within the
reordering of a bf16 GEMM's sums where it does."""
import pytest
import torch
import torch.nn.functional as F

import electra_fast
from conftest import assert_low_precision
from electra_fast import _cpu, _extension
from electra_fast.nn import linear as lin
from electra_fast.reference import linear as ref

# Where oneDNN has no native bf16 GEMM (an AVX2-only CPU, or the forced-AVX2 lane) the C++ kernels compute the
# reference's values with ATen: the same assertions hold on both kinds of CPU.
FAST = _cpu.onednn_bf16_linear()[0]
BF16_ULP = 2 ** -7  # relative spacing of bf16 (8 significant bits): one rounding of a sum may move it this much


def _case(shape=(4, 33, 48), out=80, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = (torch.randn(out, shape[-1], generator=g) * 0.1).requires_grad_()
    b = torch.randn(out, generator=g).requires_grad_() if bias else None
    return x, w, b


def _took_op(grad_fn, name: str) -> bool:
    """The output is (a view of) the op's result: its grad_fn or the one below it is the op's eager Function."""
    fns = [grad_fn] + [f for f, _ in grad_fn.next_functions if f is not None]
    return any(type(f).__name__ == f"Eager_{name}Backward" for f in fns)


def _run(fn, x, w, b, dy):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, w, b)
    y.backward(dy)
    return y, [None if t is None else t.grad.clone() for t in (x, w, b)], y.grad_fn


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 33, 48), (130, 64), (2, 3, 5, 32)])
def test_matches_autocast_linear(shape, bias, backend):
    x, w, b = _case(shape, bias=bias)
    dy = torch.randn(*shape[:-1], w.shape[0]).bfloat16()
    with electra_fast.use_backend(backend):
        y, grads, fn = _run(electra_fast.linear, x, w, b, dy)
    assert _took_op(fn, "linear")
    y_ref, grads_ref, _ = _run(F.linear, x, w, b, dy)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and y.shape == y_ref.shape
    if backend == "reference" or not FAST:  # the same ATen products: exact
        assert torch.equal(y, y_ref)
    # same bf16 operands and fp32 accumulation (bitwise equal on the AMX machine this was written on); another
    # oneDNN kernel may sum in another order: allow ~2 bf16 ulps
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2 * BF16_ULP, atol=1e-2)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is not None:
            assert g.dtype == g_ref.dtype == torch.float32  # parameters / fp32 inputs get fp32 grads
            torch.testing.assert_close(g, g_ref, rtol=2 * BF16_ULP, atol=1e-2)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_empty_in_features_under_autocast(backend):
    """in_features 0: F.linear's bias-only answer; the ops crashed in a reshape (-1 over 0 elements) and oneDNN."""
    x, w1, b1, w2 = torch.randn(3, 0), torch.randn(16, 0), torch.randn(16), torch.randn(16, 16)
    with electra_fast.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(electra_fast.linear(x, w1, b1), F.linear(x, w1, b1), rtol=0, atol=0)
        got = electra_fast.gelu_mlp(x.requires_grad_(), w1, b1, w2, None)
        want = F.linear(F.gelu(F.linear(x, w1, b1)), w2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fp32_and_eager_twin_are_plain_linear():
    x, w, b = _case()
    y = lin.linear(x, w, b)
    assert not _took_op(y.grad_fn, "linear") and torch.equal(y, F.linear(x, w, b))
    with electra_fast.eager_twin_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin.linear(x, w, b)
    assert not _took_op(y.grad_fn, "linear")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp64 is not autocast's: F.linear in fp64
        x64, w64, b64 = (t.double() for t in (x, w, b))
        y = lin.linear(x64, w64, b64)
        assert y.dtype == torch.float64 and torch.equal(y, F.linear(x64, w64, b64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a [N, 1] prediction layer keeps F.linear
        assert not _took_op(lin.linear(x, w[:1], b[:1]).grad_fn, "linear")
        assert _took_op(lin.linear(x, w, b).grad_fn, "linear")


@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_fp64_beside_another_dtype_under_autocast_is_named(which):
    """Autocast casts every operand but fp64: an fp64 x beside an fp32 weight reached ATen ("expected m1 and m2 to
    have the same dtype", naming neither), and an fp64 weight beside an fp32 x ran silently in bf16."""
    x, w, b = _case()
    w2 = torch.randn(48, 80) * 0.1
    if which == "x":
        x = x.double()
    elif which == "weight":
        w = w.double()
    else:
        b = b.double()
    name = "bias" if which == "bias" else "weight"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=f"^{name}: expected dtype"):
            lin.linear(x, w, b)
        with pytest.raises(ValueError, match=f"^{name.replace('weight', 'w1').replace('bias', 'b1')}: expected dtype"):
            lin.gelu_mlp(x, w, b, w2.to(w.dtype), None)


def test_module_is_nn_linear():
    m = lin.Linear(16, 32)
    assert isinstance(m, torch.nn.Linear) and set(m.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(m(x).float(), F.linear(x, m.weight, m.bias).float(), rtol=2 * BF16_ULP, atol=1e-2)


def test_compiles_fullgraph():
    m = lin.Linear(16, 32)
    x = torch.randn(3, 16)
    fn = torch.compile(m, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fn(x).float(), F.linear(x, m.weight, m.bias).float(), rtol=2 * BF16_ULP,
                                   atol=1e-2)


@pytest.mark.parametrize("call", [
    lambda x, w, b: electra_fast.linear(x.long(), w, b),                     # TypeError: integer input
    lambda x, w, b: electra_fast.linear(x, w[:, :5], b),                     # in_features mismatch
    lambda x, w, b: electra_fast.linear(x, w[0], b),                         # 1-d weight
    lambda x, w, b: electra_fast.linear(x, w, b[:3]),                        # bias shape
    lambda x, w, b: electra_fast.linear(x.sum(), w, b),                      # 0-d input
    lambda x, w, b: electra_fast.gelu_mlp(x, w, b, w, b),                    # w2's in_features != w1's out
    lambda x, w, b: electra_fast.gelu_mlp(x, w, b, w.t(), b),                # b2 shape
    lambda x, w, b: electra_fast.linear(x, [[1.0]], b),                      # TypeError: not a tensor
], ids=["int-x", "in-features", "weight-rank", "bias-shape", "scalar-x", "w2-in", "b2-shape", "list-weight"])
def test_bad_inputs_name_the_argument(call):
    x, w, b = (t.detach() for t in _case((3, 48), out=40))
    with pytest.raises((ValueError, TypeError)) as exc:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            call(x, w, b)
    assert any(name in str(exc.value) for name in ("x:", "weight:", "bias:", "w2:", "b2:")), str(exc.value)


@pytest.mark.parametrize("call,name", [
    (lambda x, w, b: electra_fast.linear(x, w.double(), b), "weight"),
    (lambda x, w, b: electra_fast.linear(x, w, b.half()), "bias"),
    (lambda x, w, b: electra_fast.gelu_mlp(x, w, b, w.t().double(), None), "w2"),
], ids=["weight-fp64", "bias-fp16", "w2-fp64"])
def test_mixed_dtypes_without_autocast_name_the_argument(call, name):
    """Outside autocast, operands of another dtype than x are refused by name (ATen's error named none); under
    autocast they are legal (it casts them) and give autocast's answer."""
    x, w, b = (t.detach() for t in _case((3, 48), out=40))
    with pytest.raises(ValueError, match=f"^{name}: expected dtype torch.float32 \\(that of x\\)"):
        call(x, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = electra_fast.linear(x, w.bfloat16(), b.half())
        want = F.linear(x, w.bfloat16(), b.half())
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * BF16_ULP, atol=1e-2)


# ------------------------------------------------------------------------------- the C++ kernels vs the reference
def _stage_inputs(dtype, bias=True, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 48, generator=g).to(dtype)
    w1, w2 = (torch.randn(96, 48, generator=g) * 0.15).to(dtype), (torch.randn(32, 96, generator=g) * 0.1).to(dtype)
    b1, b2 = (torch.randn(96, generator=g).to(dtype), torch.randn(32, generator=g).to(dtype)) if bias else (None, None)
    return x, w1, b1, w2, b2, torch.randn(37, 32, generator=g).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("onednn", [False, True])
def test_cpp_stages_match_the_reference(dtype, bias, onednn, cpp_extension):
    """Without oneDNN the C++ stages are the reference's computation (exact); with it (bf16 only, on a CPU that has
    it) the products may sum in another order and gelu(z) is A&S 7.1.26's erf: a few bf16 ulps."""
    if onednn and not FAST:
        pytest.skip("this CPU's oneDNN has no native bf16 GEMM (the onednn=False case covers it)")
    x, w1, b1, w2, b2, dy = _stage_inputs(dtype, bias)
    ops = torch.ops.electra_fast_cpp
    got = [ops.linear_epilogue(x, w1, b1, onednn)] + list(ops.gelu_mlp_fwd(x, w1, b1, w2, b2, onednn))
    want = [ref.linear(x, w1, b1, onednn)] + list(ref.mlp_forward(x, w1, b1, w2, b2, onednn))
    a, s = want[2], want[3]
    got += list(ops.gelu_mlp_bwd(dy, x, w1, a, s, w2, bias, bias, onednn))
    want += list(ref.mlp_backward(dy, x, w1, a, s, w2, bias, bias, onednn))
    assert len(got) == len(want) == 9
    for i, (g, r) in enumerate(zip(got, want)):
        assert g.dtype == r.dtype and g.shape == r.shape, i
        if onednn and dtype == torch.bfloat16 and r.numel():
            torch.testing.assert_close(g.float(), r.float(), rtol=4 * BF16_ULP, atol=4 * BF16_ULP * r.abs().max(),
                                       msg=f"output {i}")
        else:
            assert torch.equal(g, r), f"output {i}: max diff {(g.double() - r.double()).abs().max()}"


def test_reference_gelu_grad_is_the_derivative():
    """The reference's s = gelu'(z) against autograd through F.gelu in fp64 (the same function: rounding only)."""
    z = torch.linspace(-12, 12, 20001, dtype=torch.float64, requires_grad=True)
    F.gelu(z).sum().backward()
    torch.testing.assert_close(ref.gelu_grad(z.detach()), z.grad, rtol=1e-12, atol=1e-15)


def test_gelu_and_grad_kernel(cpp_extension):
    """The C++ GELU + derivative (erf by Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7) against torch's in fp64,
    over the whole range where either changes (fp32: within 1e-6 absolute, far below a bf16 ulp)."""
    op = _extension.cpp_op("gelu_and_grad")
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


# ------------------------------------------------------------------------------------------- gelu_mlp
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_mlp_matches_unfused(bias, backend):
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

    with electra_fast.use_backend(backend):
        got, fn = run(electra_fast.gelu_mlp)
    assert _took_op(fn, "gelu_mlp_fwd")
    low, _ = run(unfused)
    exact, _ = run(unfused, autocast=False)
    assert_low_precision(got, low, exact)
    if backend == "reference" or not FAST:  # the forward is the composition's, exactly
        assert torch.equal(got[0], low[0])
    # outside the fast path it is the plain composition
    with electra_fast.eager_twin_mode():
        y2 = lin.gelu_mlp(x, w1, b1, w2, b2)
    torch.testing.assert_close(y2, F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2))


def test_gelu_mlp_without_a_gradient_keeps_only_the_linear_epilogues():
    """Inference writes no gelu'(z): the block is two linear ops around F.gelu, exactly."""
    x, w1, b1 = (t.detach() for t in _case((5, 48), out=96))
    w2, b2 = (t.detach() for t in _case((5, 96), out=40, seed=1)[1:])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = electra_fast.gelu_mlp(x, w1, b1, w2, b2)
        want = electra_fast.linear(F.gelu(electra_fast.linear(x, w1, b1)), w2, b2)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck_fp64(backend):
    """The ops' gradients (the eager Function's bodies, with the undefined-gradient check) against finite
    differences in fp64, on each backend; the same for the custom ops' registered autograd."""
    import importlib

    ops_linear = importlib.import_module("electra_fast.ops.linear")  # the attribute `linear` is the function

    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    with electra_fast.use_backend(backend):
        for lin_op, mlp_op in ((ops_linear._LINEAR_OP, ops_linear._MLP_OP),
                               (ops_linear._LINEAR_OP.op, ops_linear._MLP_OP.op)):
            assert torch.autograd.gradcheck(lambda *a: lin_op(*a, False), (x, w1, b1))
            assert torch.autograd.gradcheck(lambda *a: mlp_op(*a, False)[0], (x, w1, b1, w2, b2))
