"""electra_fast.gumbel_sample / mlm_loss_and_sample: every backend vs the reference (loss, gradients,
samples), sample distributions (chi-square), cross-function agreement, peak memory, gradcheck, opcheck,
torch.compile and bad input."""
import pytest
import torch
import torch.nn.functional as F

import electra_fast
import electra_fast.ops.sampling as sampling_ops
from conftest import all_backends, assert_low_precision, backend_dtypes, fast_backends
from electra_fast.profiling import peak_memory
from electra_fast.reference import philox
from electra_fast.reference import sampling as ref

# Loss: the fused backends sum exp() in another order (and C++ uses its own ~2-ulp exp) than torch's
# logsumexp over fp32 logits from another matmul blocking: a few fp32 ulps of lse (|lse| ~ 10).
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
# Gradients: sums of N (or V) fp32 terms in a different order; low-precision outputs get one rounding
# of their dtype on top (fp16: 2^-11, bf16: 2^-8 relative).
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
            torch.float16: dict(rtol=2e-3, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4)}


def make(n=13, e=16, v=300, dtype=torch.float32, device="cpu", bias=True, ignore=2, scale=1.0, seed=0,
         id_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, e, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, e, generator=g) / e ** 0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g, dtype=id_dtype)
    targets[:min(ignore, n)] = -100
    return [x.to(device) if x is not None else None for x in (hidden, weight, b, targets)]


def run(backend, hidden, weight, bias, targets, reduction="mean", grad=True, **kw):
    leaves = [x.detach().clone().requires_grad_(grad) if x is not None else None for x in (hidden, weight, bias)]
    kw.setdefault("seed", 1234)
    with electra_fast.use_backend(backend):
        loss, sampled, metrics = electra_fast.mlm_loss_and_sample(
            leaves[0], leaves[1], targets, bias=leaves[2], reduction=reduction, return_metrics=True, **kw)
        if grad:
            (loss.sum() if reduction != "none" else (loss * torch.linspace(0.5, 2, loss.numel(),
                                                                             device=loss.device)).sum()).backward()
    grads = [x.grad if x is not None else None for x in leaves] if grad else None
    return loss.detach(), sampled, metrics, grads


def small_chunks(monkeypatch, cols=64):
    """Force several vocabulary chunks (the last one ragged) in the fused backends."""
    monkeypatch.setattr(sampling_ops, "vocab_chunk", lambda n, e, v: min(cols, v))


# ------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_eager_formula(backend, device, reduction, monkeypatch):
    """Every backend (the reference included) against F.linear + F.cross_entropy in fp64."""
    small_chunks(monkeypatch)
    args = make(device=device)
    loss, _, metrics, grads = run(backend, *args, reduction=reduction)
    h, w, b, t = [x.detach().cpu().double().requires_grad_() if x.is_floating_point() else x.cpu()
                  for x in args]
    logits = F.linear(h, w, b)
    want = F.cross_entropy(logits, t, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(loss.cpu().double(), want, **LOSS_TOL)
    (want.sum() if reduction != "none" else (want * torch.linspace(0.5, 2, want.numel()).double()).sum()).backward()
    for got, x in zip(grads, (h, w, b)):
        torch.testing.assert_close(got.cpu().double(), x.grad, **GRAD_TOL[torch.float32])
    valid = t != -100
    acc = ((logits.argmax(1) == t) & valid).sum() / valid.sum()
    assert metrics["accuracy"].item() == pytest.approx(acc.item())


@pytest.mark.parametrize("backend,device,dtype",
                         backend_dtypes([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_backend_matches_reference(backend, device, dtype, bias, id_dtype, monkeypatch):
    small_chunks(monkeypatch)
    args = make(dtype=dtype, device=device, bias=bias, id_dtype=id_dtype)
    want = run("reference", *[a.cpu() if a is not None else None for a in args], temperature=0.7,
               disallowed_ids=[0, 5, 299])
    got = run(backend, *args, temperature=0.7, disallowed_ids=[0, 5, 299])
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got[0].cpu(), want[0], **LOSS_TOL)
    # The logits come from the same (upcast) inputs: samples agree except at float near-ties.
    assert (got[1].cpu() == want[1]).float().mean() >= 0.999
    assert got[2]["accuracy"].item() == want[2]["accuracy"].item()
    for g, w in zip(got[3], want[3]):
        if w is None:
            assert g is None
            continue
        assert g.dtype == dtype
        torch.testing.assert_close(g.cpu(), w, **GRAD_TOL[dtype])


BRGEMM = electra_fast.extension_loaded() and torch.ops.electra_fast_cpp.bf16_brgemm_available()


@pytest.mark.parametrize("shape", [(37, 16, 333), (64, 24, 130), (1, 2, 7)], ids=["odd-n-odd-v", "even", "tiny"])
@pytest.mark.parametrize("amx", [True, False], ids=["brgemm", "fp32-products"])
@pytest.mark.parametrize("backend,device", [p for p in fast_backends() if p.id == "cpp-cpu"])
def test_cpp_bf16_paths_match_reference(backend, device, shape, amx, monkeypatch):
    """bf16 on both C++ paths: bf16 x bf16 -> fp32 brgemm (dlogits rounded to bf16 as the operand of the two
    backward products) where the CPU runs it natively, fp32 products of upcast chunks elsewhere. Odd row counts
    (a ragged last row block, a zero K-padding row), an odd vocabulary (a ragged odd last chunk) and ignored rows."""
    if amx and not BRGEMM:
        pytest.skip("this CPU has no native bf16 brgemm (AMX / AVX512-BF16): the fp32-products case covers it")
    monkeypatch.setenv("ELECTRA_FAST_NO_AMX", "0" if amx else "1")
    small_chunks(monkeypatch)
    n, e, v = shape
    for bias in (True, False):
        args = make(n=n, e=e, v=v, dtype=torch.bfloat16, bias=bias, ignore=3, seed=n)
        kw = dict(temperature=0.7, disallowed_ids=[0, v - 1])
        want = run("reference", *args, **kw)
        exact = run("reference", *[a.float() if a is not None and a.is_floating_point() else a for a in args], **kw)
        got = run(backend, *args, **kw)
        torch.testing.assert_close(got[0], want[0], **LOSS_TOL)  # forward products are exact in fp32 on both
        assert (got[1] == want[1]).float().mean() >= 0.97  # at most one near-tie in 37 rows
        assert all(g is None or g.dtype == torch.bfloat16 for g in got[3])
        assert_low_precision(got[3], want[3], exact[3])


@pytest.mark.skipif(not BRGEMM, reason="this CPU has no native bf16 brgemm (AMX / AVX512-BF16)")
def test_cpp_bf16_takes_the_brgemm_path_thread_independent(monkeypatch):
    """bf16 takes the brgemm path where it exists (its rounding of dlogits changes the gradients' last bits) and
    ELECTRA_FAST_NO_AMX=1 turns it off; the brgemm path's results do not depend on the thread count."""
    small_chunks(monkeypatch, cols=128)
    args = make(n=70, e=32, v=1000, dtype=torch.bfloat16)
    results = {}
    for off, threads in (("0", 2), ("0", 1), ("1", 2)):
        monkeypatch.setenv("ELECTRA_FAST_NO_AMX", off)
        torch.set_num_threads(threads)
        try:
            results[off, threads] = run("cpp", *args)
        finally:
            torch.set_num_threads(2)
    one, two, fp32 = results["0", 1], results["0", 2], results["1", 2]
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert all(torch.equal(a, b) for a, b in zip(one[3], two[3]))
    assert any(not torch.equal(a, b) for a, b in zip(two[3], fp32[3]))


@pytest.mark.parametrize("backend,device", fast_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_gumbel_sample_matches_reference(backend, device, dtype):
    """The uniforms are bit-identical; C++ / Triton logs differ from torch's by ~1 ulp, which moves a sample only
    when the top two scores are within ~1e-6: never on this seed (deterministic)."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 333, generator=g) * 2).to(dtype)
    for kw in (dict(seed=0), dict(seed=2 ** 62 + 12345, temperature=0.3, disallowed_ids=[3, 4, 100])):
        with electra_fast.use_backend("reference"):
            want = electra_fast.gumbel_sample(logits, **kw)
        with electra_fast.use_backend(backend):
            got = electra_fast.gumbel_sample(logits.to(device), **kw)
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)


def test_noise_layout_documented():
    """g[n, v] = -log(-log(uniform_open(x))), x = word e % 4 of philox(seed, e // 4, GUMBEL), e = n * V + v:
    checked element by element (V = 7: rows start mid-call)."""
    seed, v = 99, 7
    noise = ref.gumbel_noise(seed, 3, v, "cpu")
    for n, c in ((0, 0), (1, 3), (2, 6), (1, 0), (2, 2)):
        e = n * v + c
        x = philox.philox(seed, torch.tensor([e // 4]), philox.GUMBEL)[e % 4]
        u = ((x >> 9).double() + 0.5) * 2 ** -23
        assert noise[n, c].item() == pytest.approx((-torch.log(-torch.log(u))).item(), rel=1e-6)


@pytest.mark.parametrize("backend,device", all_backends())
def test_cross_function_agreement(backend, device):
    """mlm_loss_and_sample draws from the same noise as gumbel_sample(hidden @ W.T + b)."""
    slow = backend == "reference" or (backend == "triton" and device == "cpu")  # see distribution_cases
    n, v = (48, 200) if slow else (2000, 500)
    hidden, weight, bias, targets = make(n=n, e=32, v=v, device=device)
    with electra_fast.use_backend(backend):
        _, fused = electra_fast.mlm_loss_and_sample(hidden, weight, targets, bias=bias, seed=7, temperature=1.5,
                                                    disallowed_ids=[1])
        plain = electra_fast.gumbel_sample(hidden @ weight.T + bias, seed=7, temperature=1.5, disallowed_ids=[1])
    assert (fused == plain).float().mean().item() >= 0.999


# ----------------------------------------------------------------------------------- distribution
def chi_square_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test; categories expected < 5 times are pooled."""
    counts = torch.bincount(samples.cpu(), minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = counts.numel() - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def distribution_cases():
    """(backend, device, k, draws): >= 200k draws wherever that is cheap (C++, Triton on a GPU). The reference
    ([N, V] int64 Philox in eager torch, ~10 us per element on these machines) and the interpreter (numpy, one
    program at a time) draw 4000 8-way samples (>= 5 expected per pooled category, so the chi-square
    approximation holds, and a wrong distribution still fails: e.g. sampling softmax(logits) at T = 0.5 or 2
    gives p < 1e-30 at this size); their 1000-way
    distributions follow from their samples being checked identical to C++ (test_gumbel_sample_matches_reference,
    test_backend_matches_reference)."""
    cases = []
    for p in all_backends():
        backend, device = p.values
        slow = backend == "reference" or (backend == "triton" and device == "cpu")
        for k in (8, 1000):
            if slow and k == 1000:
                continue
            cases.append(pytest.param(backend, device, k, 4_000 if slow else 200_000, id=f"{p.id}-{k}way",
                                      marks=p.marks))
    return cases


@pytest.mark.parametrize("backend,device,k,draws", distribution_cases())
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distribution_matches_softmax(backend, device, k, draws, temperature):
    logits = torch.randn(k, generator=torch.Generator().manual_seed(k)) * 2
    probs = torch.softmax(logits.double() / temperature, 0)
    with electra_fast.use_backend(backend):
        s1 = electra_fast.gumbel_sample(logits.to(device).expand(draws, k), seed=11, temperature=temperature)
        # the fused op: E = 1, hidden = 1, weight = logits -> exactly the same logits in every row
        ones = torch.ones(draws, 1, device=device)
        _, s2 = electra_fast.mlm_loss_and_sample(ones, logits.to(device)[:, None], torch.zeros(draws, dtype=torch.long,
                                                 device=device), seed=12, temperature=temperature)
    assert chi_square_p(s1, probs) > 1e-4
    assert chi_square_p(s2, probs) > 1e-4


@pytest.mark.parametrize("backend,device", all_backends())
def test_autocast_does_not_recast_the_vocabulary_product(backend, device):
    """The op accumulates in fp32 on every backend: under CPU / CUDA bf16 autocast the reference (also the eager
    twin's generator) computed its logits in bf16, 0.1 off in the loss where the kernels were 4e-6 off."""
    hidden, weight, bias, targets = make(n=64, e=32, v=3000, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, _, _, grads = run(backend, hidden, weight, bias, targets, reduction="none")
    want, _, _, want_grads = run(backend, hidden.double(), weight.double(), bias.double(), targets, reduction="none")
    torch.testing.assert_close(loss.double(), want, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(grads[0].double(), want_grads[0], **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend,device", all_backends())
def test_disallowed_never_drawn_and_low_temperature_is_argmax(backend, device):
    n, v = 256, 40
    logits = torch.randn(n, v, generator=torch.Generator().manual_seed(3))
    logits[:, [2, 17]] += 30.0  # the two most likely tokens, by far
    with electra_fast.use_backend(backend):
        s = electra_fast.gumbel_sample(logits.to(device), seed=5, disallowed_ids=torch.tensor([2, 17]))
        assert not torch.isin(s.cpu(), torch.tensor([2, 17])).any()
        cold = electra_fast.gumbel_sample(logits.to(device), seed=5, temperature=1e-5)
        _, cold_fused = electra_fast.mlm_loss_and_sample(
            logits.to(device), torch.eye(v, device=device), torch.zeros(n, dtype=torch.long, device=device), seed=5,
            temperature=1e-5)
    # the noise spans < 19.5 (u in [2^-24, 1 - 2^-24]); at T = 1e-5 a top-two gap > 2e-4 cannot be overturned
    top2 = logits.topk(2, 1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 2e-4
    want = logits.argmax(1)
    assert torch.equal(cold.cpu(), want) and torch.equal(cold_fused.cpu(), want)


@pytest.mark.parametrize("backend,device", all_backends())
def test_hottest_temperature_never_draws_a_minus_inf_logit(backend, device):
    # fp32(1 / T) is 0 from T = 2^150 (and subnormal, so 0 under flush-to-zero, from 2^126): -inf * 0 would be NaN,
    # which won the argmax, so every row drew a token whose logit is -inf. Refused; the hottest legal one is uniform
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    logits[:, :3] = float("-inf")
    with electra_fast.use_backend(backend):
        s = electra_fast.gumbel_sample(logits.to(device), seed=1, temperature=2.0 ** 125)
        for hot in (2.0 ** 127, 2.0 ** 150):
            with pytest.raises(ValueError, match="temperature: .* too large"):
                electra_fast.gumbel_sample(logits.to(device), seed=1, temperature=hot)
    assert (s.cpu() >= 3).all() and len(s.unique()) > 3


# ------------------------------------------------------------------------- memory / stability
def test_peak_memory_is_chunked(monkeypatch):
    """fwd + bwd extra memory stays O(N x chunk + V x E); the reference ([N, V] logits) must fail the bound."""
    n, e, v, chunk = 256, 16, 8000, 128
    small_chunks(monkeypatch, chunk)
    hidden, weight, bias, targets = make(n=n, e=e, v=v, ignore=0)
    hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()

    def step(backend):
        def fn():
            with electra_fast.use_backend(backend):
                loss, s = electra_fast.mlm_loss_and_sample(hidden, weight, targets, bias=bias, seed=0)
                loss.backward()
            hidden.grad = weight.grad = bias.grad = None
            return s
        return fn

    f32 = 4
    # gradients of the inputs (V x E + V + N x E) are outputs of any implementation; on top: a few
    # [N, chunk] fp32 buffers, a [chunk, E] weight chunk and O(N) per-row state.
    bound = f32 * (v * e + v + n * e) + f32 * (4 * n * chunk + 4 * chunk * e + 64 * n) + (1 << 16)
    materialised = f32 * n * v
    assert bound < materialised / 4
    assert peak_memory(step("reference")) > bound  # the test can fail: a materialising implementation does
    if electra_fast.extension_loaded():
        assert peak_memory(step("cpp")) <= bound


@pytest.mark.parametrize("backend,device", all_backends())
def test_large_logits_are_stable(backend, device):
    """|logits| up to ~1e4: fp32 online log-sum-exp, no overflow, no NaN."""
    hidden, weight, bias, targets = make(n=9, e=16, v=100, device=device, ignore=1)
    hidden = hidden * 2000.0
    loss, sampled, _, grads = run(backend, hidden, weight, bias, targets, reduction="none")
    assert (hidden @ weight.T).abs().max() > 5e3
    want = F.cross_entropy(F.linear(hidden.cpu().double(), weight.cpu().double(), bias.cpu().double()),
                           targets.cpu(), reduction="none")
    torch.testing.assert_close(loss.cpu().double(), want, rtol=1e-4, atol=5e-2)  # fp32 logits ~1e4: ulp ~1e-3
    assert all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------- non-finite logits (the contract)
NAN, INF = float("nan"), float("inf")
DISALLOWED = [0, 1, 2, 3]


def non_finite_logits(v=300):
    """[8, v] logits with one non-finite pattern per row, and the id the reference's rule draws (None: an
    ordinary draw, only compared with the reference). Disallowed: DISALLOWED."""
    logits = torch.randn(8, v, generator=torch.Generator().manual_seed(4))
    want = [None] * 8
    logits[0], want[0] = NAN, 4                  # all NaN: the smallest allowed id (they tie as NaN)
    logits[1], want[1] = -INF, 4                 # all -inf: the smallest allowed id
    logits[2, 7], want[2] = NAN, 7               # one NaN at an allowed id: that id
    logits[3, [39, 261]], want[3] = INF, 39      # +inf ties: the smallest
    logits[4, [1, 2]] = NAN                      # NaN only at disallowed ids: an ordinary draw
    logits[5, [250, 9]], want[5] = NAN, 9        # the smallest NaN id, wherever the tiles / splits fall
    logits[6], want[6] = -INF, 4                 # the only finite logit is disallowed
    logits[6, 0] = 5.0
    logits[7, v - 1], want[7] = NAN, v - 1       # in the last, ragged chunk
    return logits, want


@pytest.mark.parametrize("backend,device", all_backends())
def test_non_finite_logits_follow_the_contract(backend, device):
    """Once all-NaN and all--inf rows drew the disallowed id 0, and C++ and the reference disagreed on NaN rows
    (0 vs 2; a NaN at column 7: 7 vs 39). Now every backend draws what the reference's rule says, bit for bit,
    and never a disallowed id."""
    logits, want = non_finite_logits()
    with electra_fast.use_backend(backend):
        got = electra_fast.gumbel_sample(logits.to(device), seed=11, disallowed_ids=DISALLOWED).cpu()
        # every id disallowed but one whose logit is -inf: that one (once: 0 on every row, no error)
        lone = torch.randn(3, 10)
        lone[:, 5] = -INF
        only = electra_fast.gumbel_sample(lone.to(device), seed=0, disallowed_ids=[i for i in range(10) if i != 5])
    with electra_fast.use_backend("reference"):
        assert torch.equal(got, electra_fast.gumbel_sample(logits, seed=11, disallowed_ids=DISALLOWED))
    assert [got[r].item() for r, w in enumerate(want) if w is not None] == [w for w in want if w is not None]
    assert not torch.isin(got, torch.tensor(DISALLOWED)).any()
    assert only.tolist() == [5, 5, 5]


@pytest.mark.parametrize("backend,device,dtype", backend_dtypes([torch.float32, torch.bfloat16], all_backends()))
def test_non_finite_mlm_rows(backend, device, dtype, monkeypatch):
    """The fused op on NaN / infinite logits, over several vocabulary chunks: samples by gumbel_sample's rule, the
    loss of a non-ignored row with a NaN logit is NaN (the problem shows), lse and argmax as torch's; every
    backend equal to the reference (bf16 on the C++ lane: the brgemm path where the CPU has it)."""
    small_chunks(monkeypatch)
    hidden, weight, bias, targets = make(n=6, e=16, v=300, ignore=1, dtype=dtype)
    targets[1:] = torch.tensor([50, 60, 70, 80, 90])
    cases = {"nan-row": ([2], None, None), "nan-column": (None, 7, None), "all--inf": (None, None, -INF),
             "+inf": (None, None, "inf-cols")}
    for name, (nan_rows, nan_col, bias_fill) in cases.items():
        h, w, b = hidden.clone(), weight.clone(), bias.clone()
        if nan_rows:
            h[nan_rows] = NAN
        if nan_col is not None:
            w[nan_col] = NAN
        if bias_fill == "inf-cols":
            b[[39, 261]] = INF
        elif bias_fill is not None:
            b[:] = bias_fill
        results = []
        for bk, dev in ((backend, device), ("reference", "cpu")):
            loss, sampled, metrics, _ = run(bk, h.to(dev), w.to(dev), b.to(dev), targets.to(dev), reduction="none",
                                            grad=False, disallowed_ids=DISALLOWED)
            results.append((loss.cpu(), sampled.cpu(), metrics["accuracy"].cpu()))
        (loss, sampled, acc), (want_loss, want_sampled, want_acc) = results
        torch.testing.assert_close(loss, want_loss, equal_nan=True, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(sampled, want_sampled), name
        assert torch.equal(acc, want_acc), name
        assert not torch.isin(sampled, torch.tensor(DISALLOWED)).any(), name
        assert loss[0] == 0  # ignored row
        if name == "nan-row":
            assert sampled[2] == 4 and loss[2].isnan() and not loss[3:].isnan().any()
        elif name == "nan-column":
            assert (sampled == 7).all() and loss[1:].isnan().all()
        elif name == "all--inf":
            assert (sampled == 4).all() and loss[1:].isnan().all()
        else:
            assert (sampled == 39).all() and (loss[1:] == INF).all()


@pytest.mark.parametrize("backend,device", all_backends())
def test_non_finite_logits_gradients(backend, device, monkeypatch):
    """Gradients at NaN / inf logits, over several vocabulary chunks: an ignored row adds exactly 0 (it adds no
    loss; the reference and C++ gave 0 * NaN = NaN for it, poisoning dhidden's other rows and dweight); a valid
    row with a NaN logit gives NaN gradients on every backend (Triton's tl.minimum dropped the NaN: finite)."""
    small_chunks(monkeypatch)
    hidden, weight, bias, targets = make(n=6, e=16, v=300, ignore=3, device=device)
    b = bias.clone()
    b[[39, 261]] = INF  # every row's lse is inf: inf - inf = NaN in every row's softmax
    _, _, _, (dh, dw, db) = run(backend, hidden, weight, b, targets, reduction="sum")
    assert (dh[:3] == 0).all() and dh[3:].isnan().all()  # rows 0-2 ignored
    b = bias.clone()
    b[7] = NAN
    targets[3:] = -100
    targets[:3] = torch.tensor([50, 60, 70])
    h = hidden.clone()
    h[3:] = INF  # ignored rows with infinite hidden states: +-inf logits, NaN softmax
    _, _, _, (dh, dw, db) = run(backend, h, weight, b, targets, reduction="sum")
    assert dh[:3].isnan().all() and (dh[3:] == 0).all()
    assert db.isnan().all() and dw.isnan().all()  # every column sums the valid rows' NaN
    hidden, weight, bias, targets = make(n=6, e=16, v=300, ignore=6, device=device)
    b = bias.clone()
    b[[39, 261]] = INF
    _, _, _, grads = run(backend, hidden, weight, b, targets, reduction="sum")
    assert all((g == 0).all() for g in grads)  # all ignored: loss 0, every gradient 0


def test_disallowed_ids_devices_and_meta():
    """Ids on another device are moved (a few ids); a meta tensor of ids holds none (clear error instead of torch's
    meta-tensor message); meta inputs run through the fake kernels."""
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="disallowed_ids: a meta tensor"):
        electra_fast.gumbel_sample(logits, seed=0, disallowed_ids=torch.tensor([1], device="meta"))
    out = electra_fast.gumbel_sample(logits.to("meta"), seed=0, disallowed_ids=torch.tensor([1]))
    assert out.device.type == "meta" and out.shape == (3,) and out.dtype == torch.int64
    hidden, weight, _, targets = make(n=4, e=8, v=30)
    loss, sampled = electra_fast.mlm_loss_and_sample(hidden.to("meta"), weight.to("meta"), targets.to("meta"), seed=0,
                                                     disallowed_ids=torch.tensor([1]))
    assert loss.device.type == sampled.device.type == "meta" and sampled.shape == (4,)


@pytest.mark.parametrize("backend,device", all_backends())
def test_empty_and_all_ignored(backend, device):
    hidden, weight, bias, targets = make(n=0, device=device)
    loss, sampled, metrics, grads = run(backend, hidden, weight, bias, targets)
    assert loss.item() == 0.0 and sampled.shape == (0,) and metrics["accuracy"].item() == 0.0
    assert grads[0].shape == (0, 16) and torch.equal(grads[1], torch.zeros_like(grads[1]))
    hidden, weight, bias, targets = make(n=5, ignore=5, device=device)
    loss, sampled, metrics, grads = run(backend, hidden, weight, bias, targets)
    assert loss.item() == 0.0 and sampled.shape == (5,) and ((sampled >= 0) & (sampled < 300)).all()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    with electra_fast.use_backend(backend):
        assert electra_fast.gumbel_sample(torch.zeros(0, 7, device=device), seed=0).shape == (0,)


# ------------------------------------------------------------------------------ autograd / torch
@pytest.mark.parametrize("backend,device", [p for p in all_backends() if p.values[0] != "triton"])
def test_gradcheck_fp64(backend, device, monkeypatch):
    small_chunks(monkeypatch, 4)
    hidden, weight, bias, targets = make(n=4, e=3, v=11, dtype=torch.float64, ignore=1)
    for reduction in ("mean", "none"):
        with electra_fast.use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda h, w, b: electra_fast.mlm_loss_and_sample(h, w, targets, bias=b, seed=0,
                                                                 reduction=reduction)[0],
                (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()))


def test_opcheck():
    hidden, weight, bias, targets = make(n=6, e=8, v=40)
    mask = torch.zeros(40, dtype=torch.uint8)
    mask[3] = 1
    for b in (bias, None):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        bb = b.clone().requires_grad_() if b is not None else None
        torch.library.opcheck(sampling_ops._MLM_OP.op, (h, w, bb, targets, mask, 3, 0.5, -100, 16))
    lse = torch.logsumexp(hidden @ weight.T + bias, 1)
    torch.library.opcheck(sampling_ops._MLM_OP.backward_op, (torch.rand(6), hidden, weight, bias, targets, lse, -100, 16))
    torch.library.opcheck(sampling_ops._GUMBEL_OP.op, (hidden @ weight.T, mask, 3, 1.0))


def test_torch_compile_fullgraph():
    hidden, weight, bias, targets = make(n=10, e=8, v=50)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(h, w, b):
        loss, sampled, metrics = electra_fast.mlm_loss_and_sample(h, w, targets, bias=b, seed=4, temperature=0.9,
                                                                  return_metrics=True)
        return loss * 2, sampled, metrics["accuracy"], electra_fast.gumbel_sample(h @ w.T, seed=4)

    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss, sampled, acc, plain = step(*leaves)
    loss.backward()
    eager = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    want, want_s, want_m = electra_fast.mlm_loss_and_sample(eager[0], eager[1], targets, bias=eager[2], seed=4,
                                                            temperature=0.9, return_metrics=True)
    (want * 2).backward()
    torch.testing.assert_close(loss, want * 2)
    assert torch.equal(sampled, want_s) and acc.item() == want_m["accuracy"].item()
    assert torch.equal(plain, electra_fast.gumbel_sample(hidden @ weight.T, seed=4))
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


def test_deterministic_and_thread_independent():
    args = make(n=64, e=32, v=3000)
    torch.set_num_threads(1)
    try:
        one = run("cpp" if electra_fast.extension_loaded() else "reference", *args)
    finally:
        torch.set_num_threads(2)
    two = run("cpp" if electra_fast.extension_loaded() else "reference", *args)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    for a, b in zip(one[3], two[3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # BLAS may block differently per thread count


# ------------------------------------------------------------------------------------- bad input
def _mlm_kwargs(**over):
    hidden, weight, bias, targets = make(n=4, e=8, v=30)
    kw = dict(hidden=hidden, weight=weight, targets=targets, bias=bias, seed=0)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,exc,match", [
    (dict(hidden=torch.zeros(4, 7)), ValueError, "weight"),
    (dict(hidden=torch.zeros(4, 8, dtype=torch.long)), TypeError, "hidden"),
    (dict(weight=torch.zeros(30, 8, dtype=torch.long)), TypeError, "weight"),
    (dict(hidden=torch.zeros(4, 8, dtype=torch.float64)), ValueError, "weight"),
    (dict(hidden=torch.zeros(8)), ValueError, "hidden"),
    (dict(hidden=[[0.0]]), TypeError, "hidden"),
    (dict(bias=torch.zeros(29)), ValueError, "bias"),
    (dict(bias=torch.zeros(30, dtype=torch.float64)), ValueError, "bias"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.zeros(4)), TypeError, "targets"),
    (dict(targets=torch.tensor([0, 1, 30, 2])), ValueError, "targets"),
    (dict(targets=torch.tensor([0, 1, -1, 2])), ValueError, "targets"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=1e-45), ValueError, "temperature"),
    (dict(temperature=2.0 ** 127), ValueError, "temperature: .* too large"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(disallowed_ids=[30]), ValueError, "disallowed_ids"),
    (dict(disallowed_ids=[-1]), ValueError, "disallowed_ids"),
    (dict(disallowed_ids=torch.tensor([31])), ValueError, "disallowed_ids"),
    (dict(disallowed_ids=list(range(30))), ValueError, "disallowed_ids"),
    (dict(disallowed_ids=[1.7]), TypeError, "disallowed_ids: integer dtype required"),
    (dict(disallowed_ids=[True]), TypeError, "disallowed_ids: integer dtype required"),
    (dict(disallowed_ids="ab"), TypeError, "disallowed_ids: integer dtype required"),
    (dict(disallowed_ids=3), TypeError, "disallowed_ids"),
    (dict(reduction="avg"), ValueError, "reduction"),
    # torch wraps the scalar for an int32 comparison (target 3 was ignored by the reference, not by the kernel)
    (dict(targets=torch.tensor([3, 1, 2, 0], dtype=torch.int32), ignore_index=2 ** 32 + 3), ValueError,
     "ignore_index: 4294967299 is outside int32"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
])
def test_bad_input_mlm(over, exc, match):
    kw = _mlm_kwargs(**over)
    with pytest.raises(exc, match=match):
        electra_fast.mlm_loss_and_sample(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(logits=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "logits"),
    (dict(logits=torch.zeros(12)), ValueError, "logits"),
    (dict(logits=torch.zeros(3, 0)), ValueError, "logits"),
    (dict(temperature=0), ValueError, "temperature"),
    (dict(disallowed_ids=[0, 1, 2, 3]), ValueError, "disallowed_ids"),
    (dict(disallowed_ids=[4]), ValueError, "disallowed_ids"),
    (dict(disallowed_ids=[1.7]), TypeError, "disallowed_ids: integer dtype required"),
    (dict(disallowed_ids=torch.tensor([0.5])), TypeError, "disallowed_ids: integer dtype required"),
    (dict(seed=2 ** 63), ValueError, "seed"),
])
def test_bad_input_gumbel(kw, exc, match):
    kw = {"logits": torch.zeros(3, 4), "seed": 0, **kw}
    with pytest.raises(exc, match=match):
        electra_fast.gumbel_sample(kw.pop("logits"), **kw)


def test_forced_backend_unavailable_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with electra_fast.use_backend("triton"), pytest.raises(RuntimeError, match="triton.*CUDA"):
        electra_fast.gumbel_sample(torch.zeros(2, 3), seed=0)


@pytest.mark.parametrize("backend,device", [p for p in fast_backends() if p.id == "cpp-cpu"])
def test_portable_cpu_path_matches(backend, device):
    """The C++ Gumbel noise without the AVX-512 Philox (other CPUs / builds; ELECTRA_FAST_NO_AVX512=1) gives the
    same samples and fused results bit for bit: run it in a fresh process and compare with this one's."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch, electra_fast\n"
            "g = torch.Generator().manual_seed(3)\n"
            "logits = torch.randn(37, 1000, generator=g) * 3\n"
            "h, w = torch.randn(37, 16, generator=g), torch.randn(1000, 16, generator=g)\n"
            "t = torch.randint(0, 1000, (37,), generator=g)\n"
            "out = []\n"
            "with electra_fast.use_backend('cpp'):\n"
            "    for dt in (torch.float32, torch.bfloat16, torch.float64):\n"
            "        out.append(electra_fast.gumbel_sample(logits.to(dt), seed=2 ** 62 + 99, temperature=0.7,\n"
            "                                              disallowed_ids=[1, 999]))\n"
            "    for seed in (5, 2 ** 32 - 1000):\n"
            "        loss, sampled = electra_fast.mlm_loss_and_sample(h, w, t, seed=seed, reduction='none')\n"
            "        out += [loss, sampled]\n"
            "torch.save(out, sys.argv[1])\n")
    paths = []
    for i, extra in enumerate(({}, {"ELECTRA_FAST_NO_AVX512": "1"})):
        paths.append(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ef_sampling_{os.getpid()}_{i}.pt"))
        env = {k: v for k, v in os.environ.items() if k != "ELECTRA_FAST_NO_AVX512"}
        out = subprocess.run([sys.executable, "-c", code, paths[-1]], env=dict(env, **extra), capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
    fast, portable = (torch.load(p) for p in paths)
    for p in paths:
        os.remove(p)
    assert len(fast) == len(portable) == 7
    assert all(torch.equal(a, b) for a, b in zip(fast, portable))


@pytest.mark.parametrize("backend,device", all_backends())
def test_empty_hidden_still_gives_the_bias_gradient(backend, device):
    # E = 0: the logits are the bias alone; the Triton backward launched no weight-gradient program (an empty grid)
    # and returned its uninitialised dbias buffer
    bias = torch.randn(5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    targets = torch.tensor([-100, 1, 4])
    want = torch.autograd.grad(F.cross_entropy(bias.expand(3, 5), targets, reduction="sum"), bias)[0]
    b = bias.detach().to(device).requires_grad_()
    with electra_fast.use_backend(backend):
        loss, _ = electra_fast.mlm_loss_and_sample(torch.zeros(3, 0, device=device), torch.zeros(5, 0, device=device),
                                                   targets.to(device), bias=b, seed=7, reduction="sum")
        loss.backward()
    torch.testing.assert_close(b.grad.cpu(), want)
