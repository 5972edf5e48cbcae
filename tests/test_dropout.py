"""electra_fast.dropout: counter-based dropout (Philox keyed by seed, stream, element index)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import electra_fast
from conftest import all_backends, backend_dtypes, fast_backends
from electra_fast.ops.dropout import _OP
from electra_fast.reference import dropout as ref
from electra_fast.reference import philox

SEED, STREAM = 0x1234_5678_9ABC, 5
SIZES = [(1,), (3,), (4,), (5,), (4097,), (7, 33), (2, 3, 5, 7)]


def run(backend, x, p, seed=SEED, stream=STREAM):
    with electra_fast.use_backend(backend):
        return electra_fast.dropout(x, p, seed, stream)


def expected(x, p, seed=SEED, stream=STREAM):
    """Independent of the kernels' integer threshold: the literal uniform(w) >= p mask, product in fp32/fp64."""
    keep = ref.keep_mask(x.numel(), seed, stream, p).view(x.shape)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).to(acc)
    return torch.where(keep, x.to(acc) * scale, torch.zeros((), dtype=acc)).to(x.dtype), keep


def test_reference_matches_definition():
    # Element i keeps iff uniform(word i % 4 of Philox(seed, (i // 4, DROPOUT, stream))) >= p, one element at a time.
    x = torch.randn(4097, dtype=torch.float64)
    y = ref.apply(x, ref.keep_threshold(0.3), ref.keep_scale(0.3), SEED, STREAM)
    for i in (0, 1, 2, 3, 4, 7, 2049, 4096):
        w = philox.philox(SEED, torch.tensor([i // 4]), philox.DROPOUT, STREAM)[i % 4]
        kept = philox.uniform(w).item() >= 0.3
        assert (y[i] != 0).item() == kept
        if kept:
            assert y[i].item() == x[i].item() * float(torch.tensor(1 / 0.7, dtype=torch.float32))


@pytest.mark.parametrize("p", [0.1, 0.5, 1 - 2 ** -24, 2 ** -24, 0.3])
def test_threshold_is_exact_comparison(p):
    # The integer threshold the kernels compare equals uniform(w) >= p for every p (including p on the 2**-24 grid).
    w = torch.arange(0, 2 ** 32, 2 ** 8 - 1, dtype=torch.int64)[:200000]
    w = torch.cat([w, torch.tensor([math.floor(p * 2 ** 24) << 8, math.ceil(p * 2 ** 24) << 8], dtype=torch.int64)])
    assert torch.equal((w >> 8) >= ref.keep_threshold(p), philox.uniform(w).double() >= p)


@pytest.mark.parametrize("backend,device,dtype", backend_dtypes(
    [torch.float32, torch.float16, torch.bfloat16, torch.float64], all_backends()))
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_matches_definition_bitwise(backend, device, dtype, shape):
    # One fp32 (fp64) product and one rounding to the dtype on every backend: bit-identical, no tolerance.
    x = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    got = run(backend, x, 0.3)
    want, keep = expected(x.cpu(), 0.3)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got.cpu() != 0, keep & (x.cpu() != 0))


@pytest.mark.parametrize("backend,device", all_backends())
def test_noncontiguous_and_large_seed(backend, device):
    x = torch.randn(33, 20, device=device)
    for seed in (0, 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1):
        got = run(backend, x.t(), 0.25, seed=seed, stream=2 ** 32 - 1)
        want, _ = expected(x.t().contiguous().cpu(), 0.25, seed=seed, stream=2 ** 32 - 1)
        assert torch.equal(got.cpu(), want)
        assert got.is_contiguous()


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_fraction(backend, device, p):
    n = 1 << 18
    y = run(backend, torch.ones(n, device=device), p)
    kept = (y != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma
    assert torch.all((y == 0) | (y == ref.keep_scale(p)))
    # Each of the four words of a Philox call is used (no lane biased or repeated).
    lanes = (y != 0).view(-1, 4).double().mean(0)
    assert torch.all((lanes - (1 - p)).abs() < 5 * math.sqrt(p * (1 - p) / (n // 4)))


@pytest.mark.parametrize("backend,device", all_backends())
def test_seeds_and_streams(backend, device):
    x = torch.ones(4096, device=device)
    base = run(backend, x, 0.5)
    assert torch.equal(base, run(backend, x, 0.5))
    for other in (run(backend, x, 0.5, seed=SEED + 1), run(backend, x, 0.5, stream=STREAM + 1),
                  run(backend, x, 0.5, seed=SEED + (1 << 32)), run(backend, x, 0.5, stream=0)):
        agree = (other != 0) == (base != 0)
        assert 0.4 < agree.double().mean().item() < 0.6  # independent masks agree about half the time


@pytest.mark.parametrize("backend,device,dtype", backend_dtypes([torch.float32, torch.float16], all_backends()))
def test_backward_is_same_mask_times_scale(backend, device, dtype):
    x = torch.randn(5, 67, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 67, device=device, dtype=dtype) * 1e3
    with electra_fast.use_backend(backend):
        y = electra_fast.dropout(x, 0.4, SEED, STREAM)
        y.backward(g)
    want, keep = expected(g.cpu(), 0.4)
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad.cpu(), want)
    assert torch.all(x.grad.cpu()[~keep] == 0)
    assert torch.equal((y.detach().cpu() != 0) | (x.detach().cpu() == 0), keep | (x.detach().cpu() == 0))


@pytest.mark.parametrize("backend,device", all_backends())
def test_gradcheck_fp64(backend, device):
    x = torch.randn(3, 11, dtype=torch.float64, device=device, requires_grad=True)
    with electra_fast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: electra_fast.dropout(t, 0.35, SEED, STREAM), (x,))
        assert torch.autograd.gradgradcheck(lambda t: electra_fast.dropout(t, 0.35, SEED, STREAM), (x,))


@pytest.mark.parametrize("backend,device", all_backends())
def test_dropped_is_exactly_zero_for_any_value(backend, device):
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.5] * 64, device=device)
    y = run(backend, x, 0.5)
    _, keep = expected(x.cpu(), 0.5)
    assert torch.all(y.cpu()[~keep] == 0)  # a select, not a multiply by 0: no NaN from inf / nan
    torch.testing.assert_close(y.cpu()[keep], x.cpu()[keep] * 2.0, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend,device", all_backends())
def test_empty_and_tiny_p(backend, device):
    assert run(backend, torch.empty(0, 3, device=device), 0.5).shape == (0, 3)
    x = torch.randn(100, device=device)
    assert torch.equal(run(backend, x, 1e-12), x)  # threshold 1, scale fp32(1 / (1 - 1e-12)) == 1


def test_p_zero_is_identity():
    x = torch.randn(4, 5, requires_grad=True)
    assert electra_fast.dropout(x, 0.0, SEED) is x
    assert electra_fast.dropout(x, 0, SEED, 3) is x


def test_p_one_drops_everything_as_torch_does():
    """Review finding: nn.Dropout(1.0) (and p set to 1 later) returns zeros; electra_fast's drop-in refused it."""
    x = torch.tensor([[float("inf"), 1.0, -2.5], [float("nan"), 0.0, 3.0]], requires_grad=True)
    want = torch.nn.functional.dropout(x, 1.0)
    for y in (electra_fast.dropout(x, 1.0, SEED), electra_fast.nn.Dropout(1.0).train()(x)):
        torch.testing.assert_close(y, want, equal_nan=True)
        (g,) = torch.autograd.grad(y.nan_to_num().sum(), x)
        assert torch.equal(g, torch.zeros_like(x))
    module = electra_fast.nn.Dropout(0.5).train()
    module.p = 1.0
    assert torch.equal(module(x[1:, 1:]), torch.zeros(1, 2))


def test_forward_mode_ad_is_refused_not_a_silent_zero_tangent():
    """The custom ops (dropout's and the MLM loss's every call) have no forward-mode rule, and torch dropped the
    tangent: jvp through dropout gave 0 and the MLM loss's directional derivative 0.0 (cross-entropy's: 0.124)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jacfwd, jvp
    x = torch.randn(4, 6, dtype=torch.float64)
    drop = lambda z: electra_fast.dropout(z, 0.5, seed=7)
    for transform in (lambda: jvp(drop, (x,), (torch.ones_like(x),)), lambda: jacfwd(drop)(x),
                      lambda: jvp(electra_fast.nn.Dropout(0.5).train(), (x,), (torch.ones_like(x),))):
        with pytest.raises(NotImplementedError, match="forward-mode AD .* is not supported"):
            transform()
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="electra_fast::dropout: forward-mode AD"):
        drop(fwAD.make_dual(x, torch.ones_like(x)))
    h, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    t = torch.randint(0, 11, (6,))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        jvp(lambda z: electra_fast.mlm_loss_and_sample(z, w, t, seed=1)[0], (h,), (torch.randn_like(h),))
    # reverse mode is unchanged
    xg = x.clone().requires_grad_()
    drop(xg).sum().backward()
    torch.testing.assert_close(xg.grad, drop(torch.ones_like(x)))


@pytest.mark.parametrize("backend,device", [p for p in fast_backends() if p.id == "cpp-cpu"])
def test_thread_count_independent(backend, device):
    x = torch.randn(3 * 16384 + 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run(backend, x, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, run(backend, x, 0.2))
    assert torch.equal(one, expected(x, 0.2)[0])


@pytest.mark.parametrize("backend,device", [p for p in fast_backends() if p.id == "cpp-cpu"])
def test_portable_cpu_path_matches(backend, device):
    # The C++ kernel's non-AVX-512 path (taken on other CPUs) gives the same bits: run it in a fresh process.
    code = ("import torch, electra_fast; from electra_fast.reference import dropout as ref\n"
            "x = torch.randn(3 * 16384 + 4097, dtype=torch.float64)\n"
            "for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):\n"
            "    xd = x.to(dt)\n"
            "    with electra_fast.use_backend('cpp'):\n"
            f"        got = electra_fast.dropout(xd, 0.3, {SEED}, {STREAM})\n"
            f"    want = ref.apply(xd, ref.keep_threshold(0.3), ref.keep_scale(0.3), {SEED}, {STREAM})\n"
            "    assert torch.equal(got, want), dt\n"
            "print('ok')\n")
    env = dict(os.environ, ELECTRA_FAST_NO_AVX512="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 17, dtype=dtype, requires_grad=True)
        torch.library.opcheck(_OP.op, (x, 0.3, SEED, STREAM))
        torch.library.opcheck(_OP.op, (x.detach(), 0.3, -5, 2 ** 32 - 1))
        torch.library.opcheck(_OP.op, (x.detach().t(), 0.5, SEED, 0))  # non-contiguous: made contiguous


def test_torch_compile_fullgraph():
    x0 = torch.randn(8, 33)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        h = electra_fast.dropout(x * 2, 0.1, SEED, stream=1)
        return electra_fast.dropout(h.tanh(), 0.2, SEED, stream=2).sum()

    x = x0.clone().requires_grad_()
    loss = step(x)
    loss.backward()
    y = x0.clone().requires_grad_()
    want = electra_fast.dropout(electra_fast.dropout(y * 2, 0.1, SEED, 1).tanh(), 0.2, SEED, 2).sum()
    want.backward()
    assert torch.equal(loss, want) and torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(input=[1.0]), TypeError, "input"),
    (dict(input=torch.ones(3, dtype=torch.long)), TypeError, "input"),
    (dict(input=torch.ones(3, dtype=torch.bool)), TypeError, "input"),
    (dict(p=1.0 + 1e-9), ValueError, "p"),
    (dict(p=-0.1), ValueError, "p"),
    (dict(p=float("nan")), ValueError, "p"),
    (dict(p="0.1"), TypeError, "p"),
    (dict(p=True), TypeError, "p"),
    (dict(p=torch.tensor(0.1)), TypeError, "p"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2 ** 64), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(seed=None), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(stream=-1), ValueError, "stream"),
    (dict(stream=2 ** 32), ValueError, "stream"),
    (dict(stream=0.5), TypeError, "stream"),
])
def test_bad_input(bad, exc, match):
    args = dict(input=torch.ones(3), p=0.1, seed=1, stream=0)
    args.update(bad)
    with pytest.raises(exc, match=f"^{match}:"):
        electra_fast.dropout(**args)


def test_keep_scale_is_the_fp32_rounding_and_traces_without_a_break():
    """keep_scale was float(torch.tensor(...)): an .item(), two graph breaks per fused layer under torch.compile
    (a patched BERT's compiled graphs doubled). The pure-Python rounding must equal fp32's conversion exactly."""
    import random
    rng = random.Random(0)
    ps = [0.0, 0.1, 0.2, 0.5, 1 / 3, 0.9, 1e-8, 1 - 2 ** -52, 2 ** -25, 1 - 2 ** -24]
    ps += [rng.random() for _ in range(20000)]
    for p in ps:
        assert ref.keep_scale(p) == float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)), p
    from torch._dynamo.utils import counters

    def scaled(t):
        return t * ref.keep_scale(0.1)
    torch._dynamo.reset()
    counters.clear()
    x = torch.ones(3)
    assert torch.equal(torch.compile(scaled, backend="eager")(x), x * float(torch.tensor(1 / 0.9,
                                                                                          dtype=torch.float32)))
    assert not counters["graph_break"]  # fullgraph=True would not tell: it compiled the .item() version too
