"""The GPU lane's stress tests (DESIGN.md, test lane 4): every op on CUDA tensors in fp32 / fp16 / bf16 against the
reference, forward and every gradient, at the shapes the CPU lanes cannot afford (T 128 .. 4096, relative distances
far past the 512 position buckets, odd sizes, padding, dropout, c2p-only / p2c-only / no position terms), and the
random decisions (token masks, dropout masks, attention dropout, Gumbel samples) bit-identical to the CPU backends
for the same seed.

Criterion (DESIGN.md): ``max|y - y_exact| <= 2 * max|y_ref_lowp - y_exact| + floor * max|y_exact| + 1e-5`` per
tensor, where y_ref_lowp is the reference run in the tested dtype and y_exact the reference run on the same (rounded)
inputs upcast: fp32 for fp16 / bf16 (floor: half a bf16 ulp, conftest.assert_low_precision), fp64 for fp32 (floor:
8 fp32 ulps; 2^-17 for attention, whose fp32 kernels multiply in tf32x3, see TF32X3_FLOOR).

Run by ``python -m electra_fast.gpu_lane`` (``make gpu``); the heaviest cases are marked ``slow`` (left out by
``--quick``). Without a GPU the module is skipped, except in the lane's dry run (ELECTRA_FAST_GPU_LANE_DRY_RUN=1):
then the same tests run on CPU tensors in the Triton interpreter, with tiny shapes and without bf16 (the
interpreter's bf16 casts truncate), to exercise the plumbing in CI.
"""
import os

import pytest
import torch

import electra_fast
from conftest import HAS_CUDA, assert_low_precision

DRY_RUN = os.environ.get("ELECTRA_FAST_GPU_LANE_DRY_RUN", "0") == "1"
if not HAS_CUDA and not DRY_RUN:
    pytest.skip("GPU lane: no CUDA device is visible (run `make gpu` on a GPU machine; "
                "ELECTRA_FAST_GPU_LANE_DRY_RUN=1 runs these tests on CPU in the Triton interpreter)",
                allow_module_level=True)
if electra_fast._backend.triton_import_error() is not None:
    pytest.skip(f"GPU lane: triton is not importable ({electra_fast._backend.triton_import_error()})",
                allow_module_level=True)

# The CPU lanes' input builders and runners: the same data and calls, here at GPU sizes.
import test_dropout as dropout_tests  # noqa: E402
import test_dropout_add_layer_norm as dal_tests  # noqa: E402
import test_masking as masking_tests  # noqa: E402
import test_rtd_loss as rtd_tests  # noqa: E402
import test_sampling as sampling_tests  # noqa: E402
from electra_fast.reference import disentangled_attention as ref_attention  # noqa: E402
from electra_fast.reference import sampling as ref_sampling  # noqa: E402
from attention_inputs import _inputs, _pad  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
FLOOR = {torch.float32: 8 * torch.finfo(torch.float32).eps, torch.float16: 2e-3, torch.bfloat16: 2e-3}
# The fp32 attention kernels multiply in tf32x3 (kernels/disentangled_attention.py: three tf32 products, the lo x lo
# term dropped, the lo parts rounded to tf32): ~2^-21 relative per product against the fp32 reference's 2^-24, an
# error the 2x-reference term cannot absorb; summed over D <= 128 terms (a random walk, x sqrt(128) ~ 2^3.5): 2^-17.
TF32X3_FLOOR = 2.0 ** -17
CPU_BACKENDS = ["reference"] + (["cpp"] if electra_fast.extension_loaded() else [])
slow = pytest.mark.slow


def _gpu(cases, dry):
    """The GPU cases, or the dry run's tiny ones."""
    return cases if HAS_CUDA else dry


def _id(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _exact_dtype(dtype):
    return torch.float64 if dtype == torch.float32 else torch.float32


def _cast(tensors, dtype):
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def check_against_reference(run, inputs, dtype, fp32_floor=FLOOR[torch.float32]):
    """``run(backend, inputs) -> [tensors]`` through Triton on the lane's device vs the reference (DESIGN.md's
    criterion, see the module docstring). ``inputs`` are fp32 tensors on the device (None allowed)."""
    lowp = _cast(inputs, dtype)
    got = run("triton", lowp)
    low = run("reference", lowp)
    exact = run("reference", _cast(lowp, _exact_dtype(dtype)))
    for a, lo in zip(got, low):
        assert (a is None) == (lo is None) and (a is None or (a.dtype == lo.dtype and a.shape == lo.shape))
        assert a is None or torch.isfinite(a).all()
    real = [i for i, a in enumerate(got) if a is None or a.is_floating_point()]  # int outputs: the caller's checks
    floor = fp32_floor if dtype == torch.float32 else FLOOR[dtype]
    assert_low_precision(*([t[i] for i in real] for t in (got, low, exact)), floor=floor)
    return got, low, exact


def _randn(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


# ---------------------------------------------------------------------------------- disentangled attention
DEBERTA = (256, 512)   # DeBERTa-v3: position_buckets, max_relative_positions (k = 256)
SMALL = (8, 32)        # k = 8: log buckets from |r| = 4
BOTH, C2P, P2C, NONE = ("c2p", "p2c"), ("c2p",), ("p2c",), ()
# (B, H, T, D, position terms, padding, dropout, (position_buckets, max_relative_positions))
ATTENTION = _gpu([
    pytest.param((4, 4, 128, 64, BOTH, "right", 0.0, DEBERTA), id="T128-d64-both-right"),
    pytest.param((2, 4, 512, 64, BOTH, "holes", 0.1, DEBERTA), id="T512-d64-both-holes-p0.1"),
    pytest.param((2, 4, 512, 64, C2P, "left", 0.0, DEBERTA), id="T512-c2p-only-left"),
    pytest.param((2, 4, 512, 64, P2C, "full_row", 0.0, DEBERTA), id="T512-p2c-only-full_row"),
    pytest.param((2, 4, 512, 64, NONE, "right", 0.1, DEBERTA), id="T512-no-position-terms-p0.1"),
    pytest.param((1, 4, 2048, 64, BOTH, "right", 0.1, DEBERTA), id="T2048-beyond-512-buckets-p0.1", marks=slow),
    pytest.param((1, 2, 4096, 64, BOTH, "none", 0.0, DEBERTA), id="T4096-beyond-512-buckets", marks=slow),
    pytest.param((3, 3, 333, 32, BOTH, "holes", 0.0, DEBERTA), id="T333-d32-odd"),
    pytest.param((2, 2, 1000, 128, BOTH, "right", 0.1, SMALL), id="T1000-d128-small-span-p0.1"),
    pytest.param((2, 2, 1, 64, BOTH, "none", 0.0, DEBERTA), id="T1"),
], [
    pytest.param((2, 1, 19, 32, BOTH, "right", 0.25, SMALL), id="T19-both-right-p0.25"),
])


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", ATTENTION)
def test_disentangled_attention(case, dtype):
    B, H, T, D, pos, pad, p, (buckets, max_rel) = case
    span = ref_attention.attention_span(buckets, max_rel)
    q, k, v, pk, pq = [None if x is None else x.to(DEVICE) for x in _inputs(B, H, T, D, span, torch.float32, pos,
                                                                              seed=T)]
    grad_out = _randn(B, H, T, D, seed=7)
    mask = _pad(pad, B, T).to(DEVICE)

    def run(backend, xs):
        leaves = [None if x is None else x.detach().requires_grad_() for x in xs[:5]]
        with electra_fast.use_backend(backend):
            out = electra_fast.disentangled_attention(*leaves, attention_mask=mask, position_buckets=buckets,
                                                      max_relative_positions=max_rel, dropout_p=p,
                                                      seed=1234 if p else None)
            grads = torch.autograd.grad(out, [x for x in leaves if x is not None], xs[5])
        return [out.detach(), *grads]

    got, _, _ = check_against_reference(run, [q, k, v, pk, pq, grad_out], dtype, fp32_floor=TF32X3_FLOOR)
    assert (got[0][~mask.bool()[:, None, :, None].expand_as(got[0])] == 0).all()  # padded query rows are 0


@pytest.mark.parametrize("T,D", _gpu([(128, 128), (64, 64)], [(24, 32)]))
def test_attention_dropout_mask_is_the_cpu_backends(T, D):
    """With V = I, out[b, h, i, j] is the (scaled) kept probability of key j: zero exactly where the Philox mask
    of the CPU backends drops it, for every (b, h, i, j) with j < D (T <= D: all keys)."""
    B, H, p, seed = 2, 3, 0.3, 2 ** 40 + 77
    q, k, _, pk, pq = _inputs(B, H, T, D, 8, torch.float32, BOTH, seed=1)
    v = torch.eye(T, D).expand(B, H, T, D).contiguous()
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1], dropout_p=p, seed=seed)
    with electra_fast.use_backend("triton"):
        got = electra_fast.disentangled_attention(*[x.to(DEVICE) for x in (q, k, v, pk, pq)], **kw).cpu()
    keep = ref_attention.dropout_keep(seed, (B, H, T, T), p, "cpu")[..., :D]
    assert torch.equal(got[..., :T] != 0, keep[..., :T])
    for backend in CPU_BACKENDS:
        with electra_fast.use_backend(backend):
            want = electra_fast.disentangled_attention(q, k, v, pk, pq, **kw)
        assert torch.equal(got != 0, want != 0), backend


# packed variable-length calls (cu_seqlens): (lengths, H, D, (position_buckets, max_relative_positions), dropout)
PACKED = _gpu([
    pytest.param(([600, 1, 37, 128, 3, 64, 512], 4, 64, DEBERTA, 0.1), id="600+short-d64-beyond-512-p0.1"),
    pytest.param(([1, 2, 333, 1000], 2, 128, SMALL, 0.0), id="d128-small-span"),
    pytest.param(([17] * 24, 3, 32, DEBERTA, 0.1), id="24x17-d32-p0.1"),
], [
    pytest.param(([1, 19, 5], 1, 32, SMALL, 0.25), id="1+19+5-p0.25"),
])


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", PACKED)
def test_disentangled_attention_packed(case, dtype):
    """Packed sequences ([N, H, D] + cu_seqlens) through the Triton kernels vs the reference's per-sequence loop:
    outputs and all gradients (the CPU lanes check the reference against separate per-sequence runs)."""
    lengths, H, D, (buckets, max_rel), p = case
    span = ref_attention.attention_span(buckets, max_rel)
    n = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q, k, v, grad_out = (_randn(n, H, D, seed=i) for i in range(4))
    pk, pq = (_randn(H, 2 * span, D, seed=4 + i) for i in range(2))

    def run(backend, xs):
        leaves = [x.detach().requires_grad_() for x in xs[:5]]
        with electra_fast.use_backend(backend):
            out = electra_fast.disentangled_attention(*leaves, cu_seqlens=cu, max_seqlen=max(lengths),
                                                      position_buckets=buckets, max_relative_positions=max_rel,
                                                      dropout_p=p, seed=1234 if p else None)
            grads = torch.autograd.grad(out, leaves, xs[5])
        return [out.detach(), *grads]

    check_against_reference(run, [q, k, v, pk, pq, grad_out], dtype, fp32_floor=TF32X3_FLOOR)


# ----------------------------------------------------------------------------------------------- RTD loss
RTD = _gpu([pytest.param((32, 512, 4.0), id="32x512"), pytest.param((256, 512, 4.0), id="256x512"),
            pytest.param((7, 4097, 30.0), id="7x4097-large-logits")],
           [pytest.param((3, 77, 4.0), id="3x77")])


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", RTD)
def test_rtd_loss(case, dtype):
    b, t, scale = case
    logits, corrupted, original, mask = rtd_tests.make(b, t, torch.float32, DEVICE, scale=scale, seed=t)

    def run(backend, xs):
        loss, metrics, grad = rtd_tests.run(backend, xs[0], corrupted, original, mask)
        return [loss, grad] + [metrics[k] for k in sorted(metrics)]

    got, low, _ = check_against_reference(run, [logits], dtype)
    for a, b_ in zip(got[2:], low[2:]):  # metrics count the same signs of the same rounded logits: exact
        assert torch.equal(a, b_)


# ----------------------------------------------------------------------------- MLM loss and Gumbel sampling
MLM = _gpu([pytest.param((2458, 128, 30522), id="2458x128x30522"),
            pytest.param((2458, 768, 30522), id="2458x768x30522", marks=slow),
            pytest.param((1000, 256, 128100), id="1000x256x128100-deberta-vocab", marks=slow),
            pytest.param((37, 64, 30001), id="37x64x30001-odd")],
           [pytest.param((13, 16, 300), id="13x16x300")])
SAMPLE_GAP = 1e-3  # see test_mlm_loss_and_sample


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", MLM)
def test_mlm_loss_and_sample(case, dtype):
    """Loss and the gradients of hidden, weight and bias by the criterion; samples equal to the reference's
    except on rows whose two best exact scores are within SAMPLE_GAP: both backends form the logits from the
    same rounded inputs with fp32 accumulation (a difference of a few hundred fp32 ulps at |logit| ~ 10, far
    below 1e-3), and the Gumbel uniforms are bit-identical."""
    n, e, v = case
    hidden, weight, bias, targets = sampling_tests.make(n, e, v, torch.float32, DEVICE, seed=n)
    kw = dict(seed=2 ** 33 + 5, temperature=0.7, disallowed_ids=[0, 3])

    def run(backend, xs):
        loss, sampled, metrics, grads = sampling_tests.run(backend, xs[0], xs[1], xs[2], targets, **kw)
        return [loss, *grads, sampled]

    got, low, _ = check_against_reference(run, [hidden, weight, bias], dtype)
    scores = ref_sampling.logits_of(*[x.to(dtype).double() for x in (hidden, weight, bias)])  # exact logits
    scores = scores / kw["temperature"] + ref_sampling.gumbel_noise(kw["seed"], n, v, DEVICE).double()
    scores[:, kw["disallowed_ids"]] = float("-inf")
    top2 = scores.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > SAMPLE_GAP
    assert torch.equal(got[-1][clear], low[-1][clear])
    assert clear.float().mean() > 0.9  # the check is not vacuous


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n,v", _gpu([(2458, 30522), (3, 128100)], [(64, 333)]))
def test_gumbel_sample_is_the_cpu_backends(n, v, dtype):
    """Same logits, same seed: the same samples as every CPU backend (the uniforms are bit-identical), except on
    rows whose two best scores are within 4 fp32 ulps (a 1-ulp difference of log() may swap them)."""
    logits = _randn(n, v, seed=3, scale=2.0).to(dtype)
    kw = dict(seed=2 ** 62 + 12345, temperature=0.3, disallowed_ids=[3, 4, 100])
    with electra_fast.use_backend("triton"):
        got = electra_fast.gumbel_sample(logits, **kw).cpu()
    scores = logits.float().cpu() * torch.tensor(1 / 0.3, dtype=torch.float32)
    scores = scores + ref_sampling.gumbel_noise(kw["seed"], n, v, "cpu")
    scores[:, kw["disallowed_ids"]] = float("-inf")
    top2 = scores.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * torch.finfo(torch.float32).eps * top2[:, 0].abs()
    for backend in CPU_BACKENDS:
        with electra_fast.use_backend(backend):
            want = electra_fast.gumbel_sample(logits.cpu(), **kw)
        assert torch.equal(got[clear], want[clear]), backend
    assert clear.float().mean() > 0.9  # the check is not vacuous


# ------------------------------------------------------------------------------------------------ masking
MASKING = _gpu([pytest.param((256, 512, "count", False), id="256x512-count"),
                pytest.param((256, 512, "bernoulli", False), id="256x512-bernoulli-bert"),
                pytest.param((64, 2048, "count", True), id="64x2048-count-whole-word"),
                pytest.param((4, 8192, "bernoulli", True), id="4x8192-bernoulli-whole-word")],
               [pytest.param((4, 37, "count", True), id="4x37-count-whole-word")])


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=_id)
@pytest.mark.parametrize("case", MASKING)
def test_mask_tokens_is_the_cpu_backends(case, id_dtype):
    b, t, strategy, words = case
    ids, mask, starts = masking_tests.make(b, t, seed=t, words=words, id_dtype=id_dtype, vocab=30522)
    kw = dict(vocab_size=30522, seed=2 ** 50 + t, strategy=strategy, attention_mask=mask, word_starts=starts,
              **(masking_tests.BERT if strategy == "bernoulli" else {}))
    got = masking_tests.run("triton", ids.to(DEVICE),
                           **{k: x.to(DEVICE) if torch.is_tensor(x) else x for k, x in kw.items()})
    for backend in CPU_BACKENDS:
        want = masking_tests.run(backend, ids, **kw)
        for name, a, w in zip(got._fields, got, want):
            assert torch.equal(a.cpu(), w), f"{name} differs from the {backend} backend"
    assert got.masked.any()


# ------------------------------------------------------------------------------------------------ dropout
DROPOUT_SHAPES = _gpu([(4096, 768), (32, 4, 128, 128), (4097, 33)], [(7, 33)])


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=str)
def test_dropout_is_the_cpu_backends(shape, dtype):
    """Output and gradient bit for bit: the same mask, the product rounded once in the same precision."""
    x = _randn(*shape, seed=1).to(dtype).requires_grad_()
    grad = _randn(*shape, seed=2).to(dtype)
    y = dropout_tests.run("triton", x, 0.1)
    (gx,) = torch.autograd.grad(y, x, grad)
    for backend in CPU_BACKENDS:
        xc = x.detach().cpu().requires_grad_()
        yc = dropout_tests.run(backend, xc, 0.1)
        (gc,) = torch.autograd.grad(yc, xc, grad.cpu())
        assert torch.equal(y.detach().cpu(), yc) and torch.equal(gx.cpu(), gc), backend


# -------------------------------------------------------------------------------- dropout + add + LayerNorm
DAL = _gpu([pytest.param((4096, 768, 0.1), id="4096x768-p0.1"), pytest.param((4097, 1536, 0.1), id="4097x1536"),
            pytest.param((333, 100, 0.0), id="333x100-p0"), pytest.param((8192, 2048, 0.1), id="8192x2048",
                                                                         marks=slow)],
           [pytest.param((37, 64, 0.1), id="37x64-p0.1")])


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", DAL)
def test_dropout_add_layer_norm(case, dtype):
    """out, the pre-norm sum and the gradients of input, residual, weight and bias by the criterion; the dropout
    mask (the zeros of d input) that of the reference."""
    n, h, p = case
    x, r, w, b, gout = dal_tests.make(n, h, torch.float32, device=DEVICE, seed=n)

    def run(backend, xs):
        return dal_tests.run(backend, *xs[:4], xs[4], p)

    got, low, _ = check_against_reference(run, [x, r, w, b, gout], dtype)
    if p:
        assert torch.equal(got[2] == 0, low[2] == 0)
