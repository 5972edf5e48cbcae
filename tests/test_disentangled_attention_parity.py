"""electra_fast.disentangled_attention: every backend vs the reference (outputs, gradients; fp32, fp16, the C++ bf16
paths), padding, the lse contract, NaN in / NaN out, strided and autocast inputs, thread-count independence."""
import pytest
import torch

import electra_fast
from attention_inputs import SMALL, _inputs, _pad, _run
from conftest import all_backends, assert_low_precision, backend_dtypes, fast_backends
from electra_fast.ops.disentangled_attention import _OP
from electra_fast.reference import disentangled_attention as ref


BACKEND_CASES = [  # (T, pos terms, padding, dropout)
    (1, ("c2p", "p2c"), "none", 0.0),
    (17, ("c2p", "p2c"), "right", 0.0),   # T > 2k = 16
    (40, ("c2p", "p2c"), "holes", 0.25),
    (23, ("c2p",), "left", 0.0),
    (23, ("p2c",), "full_row", 0.0),
    (9, (), "none", 0.0),
]


# fp16 on the cases with both terms and T > 2k only (the interpreter is slow; CI budget)
DTYPE_CASES = [(c, torch.float32) for c in BACKEND_CASES] + [(c, torch.float16) for c in BACKEND_CASES[1:3]]


DTYPE_IDS = [f"T{c[0]}-{'+'.join(c[1]) or 'c2c'}-{c[2]}-p{c[3]}-{str(d)[-7:]}" for c, d in DTYPE_CASES]


@pytest.mark.parametrize("case,dtype", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend,device", fast_backends())
def test_backend_matches_reference(backend, device, case, dtype):
    T, pos, pad, p = case
    B, H, D = 2, 2, 32
    args = _inputs(B, H, T, D, 8, dtype, pos, seed=T)
    mask = _pad(pad, B, T)
    kw = dict(attention_mask=mask.to(device), position_buckets=SMALL[0], max_relative_positions=SMALL[1],
              dropout_p=p, seed=1234 if p else None)
    grad_out = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = _run(backend, device, args, grad_out, **kw)
    up = [None if a is None else a.float() for a in args]
    exact = _run("reference", "cpu", up, grad_out.float(), **kw)  # fp32 truth on the same (rounded) inputs
    if dtype == torch.float32:
        # fp32 accumulation in another order (blocked / online softmax): a few ulps times sqrt(T)
        for a, b in zip(got, exact):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
        return
    assert_low_precision(got, _run("reference", "cpu", args, grad_out, **kw), exact)


AMX = electra_fast.extension_loaded() and torch.ops.electra_fast_cpp.bf16_brgemm_available()


CPP = [p for p in all_backends() if p.values[0] == "cpp"]


BF16_CASES = BACKEND_CASES + [(601, ("c2p", "p2c"), "holes", 0.1)]  # T > 512: 64-row blocks, odd last one


@pytest.mark.parametrize("case", BF16_CASES, ids=[f"T{c[0]}-{'+'.join(c[1]) or 'c2c'}-{c[2]}-p{c[3]}"
                                                  for c in BF16_CASES])
@pytest.mark.parametrize("amx", [True, False], ids=["brgemm", "fp32-products"])
@pytest.mark.parametrize("backend,device", CPP)
def test_cpp_bf16_matches_reference(backend, device, case, amx, monkeypatch):
    """bf16 on both C++ paths: bf16 x bf16 -> fp32 brgemm products (probabilities and d scores rounded to bf16
    as product operands) where the CPU runs them natively, and fp32 products of upcast blocks elsewhere."""
    if amx and not AMX:
        pytest.skip("this CPU has no native bf16 brgemm (AMX / AVX512-BF16): the fp32-products case covers it")
    monkeypatch.setenv("ELECTRA_FAST_NO_AMX", "0" if amx else "1")
    T, pos, pad, p = case
    B, H, D = 2, 2, 32 if T < 601 else 64
    args = _inputs(B, H, T, D, 8, torch.bfloat16, pos, seed=T)
    kw = dict(attention_mask=_pad(pad, B, T), position_buckets=SMALL[0], max_relative_positions=SMALL[1],
              dropout_p=p, seed=1234 if p else None)
    grad_out = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(7)).bfloat16()
    got = _run(backend, device, args, grad_out, **kw)
    exact = _run("reference", "cpu", [None if a is None else a.float() for a in args], grad_out.float(), **kw)
    assert_low_precision(got, _run("reference", "cpu", args, grad_out, **kw), exact)


@pytest.mark.skipif(not AMX, reason="this CPU has no native bf16 brgemm (AMX / AVX512-BF16)")
def test_cpp_bf16_takes_the_brgemm_path(monkeypatch):
    """Where the brgemm path is available, bf16 inputs take it (its rounding of P / dS differs from the fp32
    path's) and ELECTRA_FAST_NO_AMX=1 turns it off."""
    args = [a.requires_grad_() for a in _inputs(1, 2, 33, 32, 8, torch.bfloat16)]
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1])
    results = []
    for off in ("0", "1"):
        monkeypatch.setenv("ELECTRA_FAST_NO_AMX", off)
        with electra_fast.use_backend("cpp"):
            out = electra_fast.disentangled_attention(*args, **kw)
            results.append([out, *torch.autograd.grad(out, args, torch.ones_like(out))])
    assert any(not torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend,device", all_backends())
def test_fully_padded_batch_is_zero_without_nan(backend, device):
    B, H, T, D = 2, 2, 12, 32
    args = _inputs(B, H, T, D, 8, torch.float32)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, :5] = True
    got = _run(backend, device, args, torch.ones(B, H, T, D), attention_mask=mask.to(device),
               position_buckets=SMALL[0], max_relative_positions=SMALL[1])
    assert all(torch.isfinite(g).all() for g in got)
    assert (got[0][0] == 0).all() and (got[1][0] == 0).all()  # out and dq of the padded sequence
    assert (got[2][0] == 0).all() and (got[3][0] == 0).all()  # its keys and values get nothing


@pytest.mark.parametrize("backend,device", all_backends())
def test_lse_contract(backend, device):
    B, H, T, D = 1, 2, 10, 32
    q, k, v, pk, pq = _inputs(B, H, T, D, 8, torch.float32)
    mask = torch.ones(B, T, dtype=torch.uint8)
    mask[0, 7:] = 0
    slots = ref.relative_slots(T, *SMALL)
    args = [a.to(device) for a in (q, k, v, pk, pq, mask, slots)]
    with electra_fast.use_backend(backend):
        out, lse = _OP.op(*args, 0.1, 0.0, 0, *SMALL, None)
    s = ref._scores(q, k, pk, pq, ref._slot_table(slots, T), 0.1)[..., :7]
    torch.testing.assert_close(lse.cpu()[..., :7], torch.logsumexp(s, -1)[..., :7], rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse.cpu()[..., 7:]).all() and (lse.cpu()[..., 7:] > 0).all()


NAN_CASES = ("q-row", "k-key", "pos-slot", "overflow", "padded-q", "padded-v")


def _nan_inputs(case, dtype):
    """B = 2 (batch 1 padded from token 15), H = 2, T = 20, both position terms, one bad value per case."""
    q, k, v, pk, pq = _inputs(2, 2, 20, 32, 8, torch.float32, seed=3)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False
    nan = float("nan")
    if case == "q-row":
        q[0, 1, 3] = nan          # once: C++ returned zeros for this row, the reference NaN
    elif case == "k-key":
        k[1, 0, 4] = nan          # a valid key: every live row of (1, 0) sees it
    elif case == "pos-slot":
        pk[1, 5] = nan            # one relative slot: the rows whose keys fall in it
    elif case == "overflow":
        q[0, 0, 6] = 3e38         # finite inputs whose scores overflow (to +inf or NaN in any summation order)
        k[0, 0] = k[0, 0].abs() + 0.5
    elif case == "padded-q":
        q[1, 0, 17] = nan         # a padded query: its row stays 0
    else:
        v[1, 1, 16] = nan         # a padded key's value: its zero weight times NaN in P @ V (every backend)
    return [t.to(dtype) for t in (q, k, v, pk, pq)], mask


@pytest.mark.parametrize("case", NAN_CASES)
@pytest.mark.parametrize("backend,device,dtype", backend_dtypes([torch.float32, torch.bfloat16], fast_backends()))
def test_nan_in_is_nan_out(backend, device, dtype, case, monkeypatch):
    """The reference's NaN contract on every backend: the same NaN rows in the output and the same NaN pattern in
    dq, dk, dv as the reference (fp32 truth on the same inputs), the finite values close; padded query rows 0.
    bf16 on C++ runs both the brgemm path (where the CPU has it) and the fp32-products path."""
    args, mask = _nan_inputs(case, dtype)
    kw = dict(attention_mask=mask, position_buckets=SMALL[0], max_relative_positions=SMALL[1])
    grad_out = torch.randn(2, 2, 20, 32, generator=torch.Generator().manual_seed(7)).to(dtype)
    want = _run("reference", "cpu", [a.float() for a in args], grad_out.float(), **kw)
    paths = ("0", "1") if backend == "cpp" and dtype == torch.bfloat16 and AMX else (None,)
    for no_amx in paths:
        if no_amx is not None:
            monkeypatch.setenv("ELECTRA_FAST_NO_AMX", no_amx)
        got = _run(backend, device, args, grad_out, **{**kw, "attention_mask": mask.to(device)})
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert torch.equal(a.isnan(), b.isnan()), name
            tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
            torch.testing.assert_close(a.float().nan_to_num(), b.nan_to_num(), **tol, msg=name)
    out = want[0]
    assert (out[1, :, 15:] == 0).all()  # padded queries
    if case == "q-row":
        assert out[0, 1, 3].isnan().all() and out[0, 1].isnan().sum() == 32 and not out[1].isnan().any()
    elif case in ("k-key", "padded-v"):
        h = 0 if case == "k-key" else 1
        assert out[1, h, :15].isnan().all() and not out[0].isnan().any() and not out[1, 1 - h].isnan().any()
    elif case == "overflow":
        assert out[0, 0, 6].isnan().all() and out.isnan().sum() == 32
    elif case == "pos-slot":
        assert out[:, 1].isnan().any() and not out[:, 0].isnan().any()
    else:
        assert not out.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend,device", [p for p in all_backends() if p.values[0] != "triton"])
def test_bf16_autocast_region(backend, device, dtype):
    """Regression: under CPU bf16 autocast the C++ kernels' internal at::mm calls were recast to bf16
    ("expected scalar type Float but found BFloat16"). The op keeps its own precision policy: inside an
    autocast region it gives exactly what it gives outside."""
    B, H, T, D = 2, 2, 10, 16
    mask = _pad("right", B, T)
    args = [a.to(dtype).requires_grad_() for a in _inputs(B, H, T, D, 8, torch.float32)]

    def run():
        out = electra_fast.disentangled_attention(*args, attention_mask=mask, position_buckets=SMALL[0],
                                                  max_relative_positions=SMALL[1], dropout_p=0.2, seed=7)
        grads = torch.autograd.grad(out, args, torch.ones_like(out))
        return [out, *grads]

    with electra_fast.use_backend(backend):
        plain = run()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = run()
    for a, b in zip(plain, mixed):
        assert a.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("backend,device", all_backends())
def test_strided_inputs_match_contiguous(backend, device):
    """q / k / v as [B, T, H, D] memory viewed as [B, H, T, D] (the DeBERTa module's heads), or sliced from one
    fused [B, T, 3, H, D] projection (the standard-attention module's): the C++ kernels read them through
    strides, no copies, and give the same output and gradients, bit for bit, as contiguous inputs. Outputs and
    gradients of token-major inputs are token-major on every backend (the layout the fake kernels promise),
    so the transpose back to tokens is free and the fused projection's gradient is one stack."""
    B, H, T, D = 2, 3, 13, 32
    mask = _pad("holes", B, T).to(device)
    kw = dict(attention_mask=mask, position_buckets=SMALL[0], max_relative_positions=SMALL[1], dropout_p=0.2,
              seed=3)
    token_major = (T * H * D, D, H * D, 1)
    # bf16 on C++ (the brgemm path where available); the interpreter's bf16 is not meaningful
    for dtype in [torch.float32] + ([torch.bfloat16] if backend == "cpp" else []):
        base = _inputs(B, H, T, D, 8, dtype)
        results = []
        for layout in ("contiguous", "heads", "fused"):
            if layout == "fused":
                packed = torch.stack([x.to(device).transpose(1, 2) for x in base[:3]], dim=2).requires_grad_()
                qkv = [t.transpose(1, 2) for t in packed.unbind(2)]
                leaves = [packed, base[3].to(device).requires_grad_(), base[4].to(device).requires_grad_()]
            else:
                qkv = [x.to(device).transpose(1, 2).contiguous().transpose(1, 2) if layout == "heads"
                       else x.to(device).clone() for x in base[:3]]
                leaves = [t.requires_grad_() for t in (*qkv, base[3].to(device), base[4].to(device))]
            with electra_fast.use_backend(backend):
                out = electra_fast.disentangled_attention(*qkv, *leaves[-2:], **kw)
                grads = torch.autograd.grad(out.transpose(1, 2).sum(-1).pow(2).sum(), leaves)  # strided upstream
            assert out.stride() == (token_major if layout != "contiguous" else (H * T * D, T * D, D, 1))
            if layout == "fused":
                assert grads[0].is_contiguous()
                grads = [g.transpose(1, 2) for g in grads[0].unbind(2)] + list(grads[1:])
            results.append([out.detach(), *grads])
        for other in results[1:]:
            for a, b in zip(results[0], other):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend,device", CPP)
def test_cpp_is_thread_count_independent(backend, device, dtype):
    """Outputs and every gradient (position-gradient partitions included) are bitwise the same on 1 and 3
    threads: fixed task partitions and a fixed-order reduction (bf16: the brgemm path where available)."""
    B, H, T, D = 9, 2, 70, 32  # B > the 8 position-gradient partitions, T over two query blocks
    mask = _pad("left", B, T)
    base = _inputs(B, H, T, D, 8, dtype)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            x = [t.clone().requires_grad_() for t in base]
            with electra_fast.use_backend(backend):
                out = electra_fast.disentangled_attention(*x, attention_mask=mask, position_buckets=SMALL[0],
                                                          max_relative_positions=SMALL[1], dropout_p=0.1, seed=1)
                out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype))
            results.append([out.detach(), *(t.grad for t in x)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", all_backends())
def test_non_contiguous_integer_mask_is_legal(backend, device):
    """A transposed int64 [B, T] mask (non-contiguous) is a legal padding mask on every backend (found by the sweep:
    the C++ path refused it)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 32, generator=g).to(device) for _ in range(3))  # D = 32: every backend
    m = torch.ones(8, 2, dtype=torch.int64)
    m[6:, 1] = 0
    m = m.t().to(device)
    assert not m.is_contiguous()
    with electra_fast.use_backend(backend):
        got = electra_fast.disentangled_attention(q, k, v, attention_mask=m)
        want = electra_fast.disentangled_attention(q, k, v, attention_mask=m.contiguous())
    assert torch.equal(got, want)
