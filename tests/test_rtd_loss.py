"""electra_fast.rtd_loss: every backend vs the reference, gradients, metrics, compile, bad input."""
import pytest
import torch
import torch.nn.functional as F

import electra_fast
from conftest import all_backends, backend_dtypes
from electra_fast.ops.rtd_loss import _OP

# fp32 kernels use their own exp/log (~2 ulp) and sum in another order than torch: a few fp32 ulps of
# the per-token loss, and sqrt(n) ulps on sums. Half inputs are upcast exactly, so the same bound holds.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=2e-5, atol=2e-6),
       torch.float16: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-5, atol=2e-6)}
# Gradients are returned in the logits' dtype: one rounding of that dtype.
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.float64: dict(rtol=1e-5, atol=1e-7),
            torch.float16: dict(rtol=1e-3, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-5)}
SHAPES = [(1, 1), (1, 7), (3, 37), (4, 128), (2, 1000)]


def make(b, t, dtype=torch.float32, device="cpu", scale=4.0, id_dtype=torch.int64, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, generator=g) * scale).to(dtype)
    original = torch.randint(0, 1000, (b, t), generator=g, dtype=id_dtype)
    corrupted = torch.where(torch.rand(b, t, generator=g) < 0.3, torch.randint(0, 1000, (b, t), generator=g,
                                                                                 dtype=id_dtype), original)
    mask = torch.rand(b, t, generator=g) > 0.25 if pad else None
    if pad and b > 1:
        mask[0] = False  # an all-padding row
    return [x.to(device) if x is not None else None for x in (logits, corrupted, original, mask)]


def formula(logits, corrupted, original, mask, reduction):
    """Independent eager formula (not the reference module) for the loss."""
    y = (corrupted != original).double()
    per = F.binary_cross_entropy_with_logits(logits.double(), y, reduction="none")
    m = torch.ones_like(y) if mask is None else mask.double()
    per = per * m
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / m.sum().clamp(min=1)


def run(backend, logits, corrupted, original, mask, reduction="mean", grad=True):
    x = logits.detach().clone().requires_grad_(grad)
    with electra_fast.use_backend(backend):
        loss, metrics = electra_fast.rtd_loss(x, corrupted, original, mask, reduction=reduction, return_metrics=True)
        if grad:
            loss.sum().backward()
    return loss.detach(), metrics, (x.grad if grad else None)


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("b,t", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_formula_fp32(backend, device, b, t, reduction):
    args = make(b, t, device=device)
    loss, _, grad = run(backend, *args, reduction=reduction)
    assert loss.dtype == torch.float32
    want = formula(*[a.cpu() if a is not None else None for a in args], reduction)
    torch.testing.assert_close(loss.cpu().double(), want, **TOL[torch.float32])
    x = args[0].cpu().double().requires_grad_()
    formula(x, *[a.cpu() if a is not None else None for a in args[1:]], reduction).sum().backward()
    torch.testing.assert_close(grad.cpu().double(), x.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend,device,dtype",
                         backend_dtypes([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backend_matches_reference(backend, device, dtype, id_dtype, reduction):
    args = make(3, 77, dtype=dtype, id_dtype=id_dtype, device=device)
    want_loss, want_m, want_grad = run("reference", *[a.cpu() if a is not None else None for a in args],
                                       reduction=reduction)
    loss, metrics, grad = run(backend, *args, reduction=reduction)
    torch.testing.assert_close(loss.cpu(), want_loss, **TOL[dtype])
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.cpu(), want_grad, **GRAD_TOL[dtype])
    for k in want_m:
        assert metrics[k].dtype == torch.float32
        torch.testing.assert_close(metrics[k].cpu(), want_m[k], rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", all_backends())
def test_metrics_exact(backend, device):
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]], device=device)
    original = torch.tensor([[1, 2, 3, 4, 5, 6]], device=device)
    corrupted = torch.tensor([[9, 2, 3, 9, 5, 9]], device=device)  # replaced at 0, 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], device=device)      # 5 real tokens
    # predictions (logit > 0): replaced at 0, 2, 4 -> tp = 1 (pos 0), pred = 3, replaced = 2 (pos 0, 3)
    _, m, _ = run(backend, logits, corrupted, original, mask, grad=False)
    assert m["accuracy"].item() == pytest.approx(2 / 5)  # correct at 0 and 1
    assert m["precision"].item() == pytest.approx(1 / 3)
    assert m["recall"].item() == pytest.approx(1 / 2)
    assert m["replaced_fraction"].item() == pytest.approx(2 / 5)


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits_stable(backend, device, dtype):
    logits = torch.tensor([[1e4, -1e4, 3e2, -3e2, 0.0, 20.0, -20.0, 60000.0]], dtype=dtype, device=device)
    original = torch.zeros(1, 8, dtype=torch.long, device=device)
    corrupted = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0]], device=device)
    for reduction in ("none", "mean"):
        loss, _, grad = run(backend, logits, corrupted, original, None, reduction=reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want = formula(logits.cpu(), corrupted.cpu(), original.cpu(), None, "none")
    loss, _, _ = run(backend, logits, corrupted, original, None, reduction="none")
    torch.testing.assert_close(loss.cpu().double(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend,device,dtype", backend_dtypes([torch.float32, torch.bfloat16], all_backends()))
def test_non_finite_logits_follow_the_contract(backend, device, dtype):
    """Infinite logits give the limits (once: the reference NaN via inf * 0 where C++ gave inf), a NaN logit of a
    real token NaN, a padded token 0 whatever its logit (once NaN on the reference and C++, 0 on Triton)."""
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[-inf, inf, -inf, inf, nan, nan, 1.0, inf]], dtype=dtype, device=device)
    corrupted = torch.tensor([[1, 0, 0, 1, 1, 0, 0, 1]], device=device)  # label: replaced where 1
    original = torch.zeros_like(corrupted)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool, device=device)
    loss, metrics, grad = run(backend, logits, corrupted, original, mask, reduction="none")
    # the limit 0 within 2e-38: C++'s vectorised exp(x) is exp(-87) ~ 1.6e-38 for x below -87
    torch.testing.assert_close(loss[0, :4].cpu(), torch.tensor([inf, inf, 0.0, 0.0]), rtol=0, atol=2e-38)
    assert loss[0, 4].isnan() and (loss[0, 5:] == 0).all()
    torch.testing.assert_close(grad[0, :4].cpu().float(), torch.tensor([-1.0, 1.0, 0.0, 0.0]), rtol=0, atol=2e-38)
    assert grad[0, 4].isnan() and (grad[0, 5:] == 0).all()
    assert metrics["accuracy"].item() == pytest.approx(2 / 5)  # tokens 2 and 3; a NaN logit predicts "real"
    mean, _, _ = run(backend, logits[:, [0, 2, 5]], corrupted[:, [0, 2, 5]], original[:, [0, 2, 5]],
                     mask[:, [0, 2, 5]])
    assert mean.item() == inf


@pytest.mark.parametrize("backend,device", all_backends())
def test_all_padding_is_zero_not_nan(backend, device):
    logits, corrupted, original, _ = make(2, 5, device=device)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    loss, metrics, grad = run(backend, logits, corrupted, original, mask)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(v.item() == 0.0 for v in metrics.values())


@pytest.mark.parametrize("backend,device", [p for p in all_backends() if p.values[0] != "triton"])
def test_gradcheck_fp64(backend, device):
    logits, corrupted, original, mask = make(3, 11, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        with electra_fast.use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda x: electra_fast.rtd_loss(x, corrupted, original, mask, reduction=reduction),
                (logits.clone().requires_grad_(),))


def test_mask_dtypes_agree():
    logits, corrupted, original, mask = make(3, 20)
    want = electra_fast.rtd_loss(logits, corrupted, original, mask)
    # int32 / int64 masks are read directly by their own (differently vectorised) C++ instantiation: equal up
    # to fp32 rounding of the sum; the metric counts are exact.
    for m in (mask.long(), mask.int(), mask.to(torch.uint8), mask.float().long() * 7):
        got, metrics = electra_fast.rtd_loss(logits, corrupted, original, m, return_metrics=True)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert all(torch.equal(metrics[k], v) for k, v in
                   electra_fast.rtd_loss(logits, corrupted, original, mask, return_metrics=True)[1].items())
    # The maskless path is a separate (differently vectorised) kernel: equal up to fp32 summation order.
    torch.testing.assert_close(electra_fast.rtd_loss(logits, corrupted, original, None),
                               electra_fast.rtd_loss(logits, corrupted, original, torch.ones_like(mask)),
                               rtol=1e-6, atol=0)


def test_noncontiguous_inputs():
    logits, corrupted, original, mask = make(6, 40)
    sl = (slice(None, None, 2), slice(None, None, 3))
    got = electra_fast.rtd_loss(logits[sl], corrupted[sl], original[sl], mask[sl], reduction="none")
    want = electra_fast.rtd_loss(logits[sl].contiguous(), corrupted[sl].contiguous(), original[sl].contiguous(),
                                 mask[sl].contiguous(), reduction="none")
    assert torch.equal(got, want)


def test_deterministic_and_thread_independent():
    args = make(64, 1024, pad=True)
    torch.set_num_threads(1)
    try:
        one, _, g1 = run("cpp" if electra_fast.extension_loaded() else "reference", *args)
    finally:
        torch.set_num_threads(2)
    two, _, g2 = run("cpp" if electra_fast.extension_loaded() else "reference", *args)
    assert torch.equal(one, two) and torch.equal(g1, g2)


def test_opcheck():
    logits, corrupted, original, mask = make(3, 17)
    for need_grad, reduction in ((True, 2), (False, 0), (True, 0)):
        x = logits.clone().requires_grad_(need_grad)
        torch.library.opcheck(_OP.op, (x, corrupted, original, mask.view(torch.uint8), reduction, need_grad))


def test_torch_compile_fullgraph():
    logits, corrupted, original, mask = make(4, 33)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        loss, metrics = electra_fast.rtd_loss(x, corrupted, original, mask, return_metrics=True)
        return loss * 2, metrics["accuracy"]

    x = logits.clone().requires_grad_()
    loss, acc = step(x)
    loss.backward()
    y = logits.clone().requires_grad_()
    want, wm = electra_fast.rtd_loss(y, corrupted, original, mask, return_metrics=True)
    (want * 2).backward()
    torch.testing.assert_close(loss, want * 2)
    torch.testing.assert_close(x.grad, y.grad)
    assert acc.item() == wm["accuracy"].item()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_autograd(reduction):
    """torch's compiled autograd traces the C++ training path's backward: it refused the whole backward with an
    internal assert ("ctx_.non_differentiable_.empty()") while the forward marked its integer counts
    non-differentiable, which integer outputs are anyway."""
    logits, corrupted, original, mask = make(3, 21)
    weight = torch.rand(3, 21)

    def total(x):
        loss = electra_fast.rtd_loss(x, corrupted, original, mask, reduction=reduction)
        return loss if reduction == "mean" else (loss * weight).sum()

    @torch.compile(backend="aot_eager")
    def backward(loss):
        loss.backward()

    x = logits.clone().requires_grad_()
    with torch._dynamo.config.patch(compiled_autograd=True):
        backward(total(x))
    y = logits.clone().requires_grad_()
    total(y).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


def test_forced_backend_unavailable_raises(monkeypatch):
    logits, corrupted, original, mask = make(2, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with electra_fast.use_backend("triton"), pytest.raises(RuntimeError, match="triton.*CUDA"):
        electra_fast.rtd_loss(logits, corrupted, original, mask)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(logits=torch.zeros(2, 3, dtype=torch.long)), TypeError, "logits"),
    (dict(logits=torch.zeros(6)), ValueError, "logits"),
    (dict(logits=[[0.0]]), TypeError, "logits"),
    (dict(corrupted_ids=torch.zeros(2, 3)), TypeError, "corrupted_ids"),
    (dict(original_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "original_ids"),
    (dict(corrupted_ids=torch.zeros(3, 2, dtype=torch.long)), ValueError, "corrupted_ids"),
    (dict(attention_mask=torch.ones(2, 4)), TypeError, "attention_mask"),
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError, "attention_mask"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(reduction=["mean"]), ValueError, "reduction"),
    (dict(corrupted_ids=[[0, 0, 0], [0, 0, 0]]), TypeError, "corrupted_ids"),
    (dict(attention_mask=[[1, 1, 1], [1, 1, 1]]), TypeError, "attention_mask"),
    (dict(attention_mask=torch.ones(2, 3)), TypeError, "attention_mask"),
    (dict(original_ids=torch.zeros(2, 3, dtype=torch.long, device="meta")), ValueError, "original_ids"),
])
def test_bad_input(bad, exc, match):
    args = dict(logits=torch.zeros(2, 3), corrupted_ids=torch.zeros(2, 3, dtype=torch.long),
                original_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=None, reduction="mean")
    args.update(bad)
    with pytest.raises(exc, match=match):
        electra_fast.rtd_loss(**args)


@pytest.mark.parametrize("backend,device", all_backends())
def test_backward_twice_accumulates_without_aliasing(backend, device):
    """The backward may hand autograd the saved derivative itself: accumulating twice must still double it."""
    logits, corrupted, original, mask = make(3, 29, device=device)
    x = logits.clone().requires_grad_()
    with electra_fast.use_backend(backend):
        loss = electra_fast.rtd_loss(x, corrupted, original, mask)
        loss.backward(retain_graph=True)
        once = x.grad.clone()
        loss.backward(retain_graph=True)
        torch.testing.assert_close(x.grad, 2 * once, rtol=0, atol=0)
        (loss * 3).backward()
        torch.testing.assert_close(x.grad, 5 * once, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", all_backends())
def test_a_kept_graph_keeps_its_buffer_to_itself(backend, device):
    """Logits a view of a leaf, the graph kept: the C++ backward handed its saved derivative over as the first
    gradient, AccumulateGrad kept it as the leaf's .grad, and later backwards (and zero_grad(set_to_none=False))
    wrote into what the graph saved: 4x the gradient after three backwards, then 0 after zero_() and one more."""
    logits, corrupted, original, mask = make(2, 50, device=device)
    p = logits.detach().flatten().clone().requires_grad_()
    with electra_fast.use_backend(backend):
        loss = electra_fast.rtd_loss(p.view(2, 50), corrupted, original, mask)
        loss.backward(retain_graph=True)
        once = p.grad.clone()
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        torch.testing.assert_close(p.grad, 3 * once, rtol=1e-6, atol=0)
        p.grad.zero_()
        loss.backward()
        torch.testing.assert_close(p.grad, once, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_training_without_metrics_is_identical(backend, device, reduction):
    """Training calls without return_metrics skip the metric counters in the C++ loop: same loss, same gradient."""
    args = make(5, 300, device=device)
    want_loss, _, want_grad = run(backend, *args, reduction=reduction)
    x = args[0].detach().clone().requires_grad_()
    with electra_fast.use_backend(backend):
        loss = electra_fast.rtd_loss(x, *args[1:], reduction=reduction)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, want_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", all_backends())
def test_second_backward_without_retain_graph_raises(backend, device):
    logits, corrupted, original, mask = make(2, 9, device=device)
    x = logits.clone().requires_grad_()
    with electra_fast.use_backend(backend):
        loss = electra_fast.rtd_loss(x, corrupted, original, mask)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


@pytest.mark.parametrize("backend,device", all_backends())
def test_gradients_of_separate_calls_do_not_alias(backend, device):
    """The backward hands autograd the forward's derivative buffer: every call must own a fresh one."""
    a, b = make(3, 40, device=device, seed=1), make(3, 40, device=device, seed=2)
    xa, xb = a[0].clone().requires_grad_(), b[0].clone().requires_grad_()
    with electra_fast.use_backend(backend):
        electra_fast.rtd_loss(xa, *a[1:]).backward()
        kept = xa.grad.clone()
        electra_fast.rtd_loss(xb, *b[1:]).backward()
        electra_fast.rtd_loss(xa, *a[1:]).backward()  # accumulates into xa.grad
    assert xa.grad.data_ptr() != xb.grad.data_ptr()
    torch.testing.assert_close(xa.grad, 2 * kept, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", all_backends())
def test_calls_needing_conversion_match_the_usual_call(backend, device):
    """Mixed id dtypes, int16 ids, int8 / int64 masks and strided ids take the validators' converting path (the
    usual call skips it): same loss and gradient (up to fp32 summation order: an int64 mask or int32 ids run their
    own, differently vectorised, C++ instantiation)."""
    logits, corrupted, original, mask = make(4, 50, device=device)
    want_loss, _, want_grad = run(backend, logits, corrupted, original, mask)
    for c, o, m in ((corrupted.int(), original, mask), (corrupted.to(torch.int16), original.to(torch.int16), mask),
                    (corrupted, original, mask.to(torch.int8)),
                    (corrupted.t().contiguous().t(), original, mask.long())):
        loss, _, grad = run(backend, logits, c, o, m)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)  # per-token: no summation
