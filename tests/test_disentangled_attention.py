"""electra_fast.disentangled_attention: reference vs transformers, every backend vs the reference, gradients,
dropout, memory, compile, bad input (the transformers drop-in and patch: test_integrations_deberta_v2.py)."""
import importlib
import math

import pytest
import torch

import electra_fast
from conftest import all_backends, assert_low_precision, backend_dtypes, fast_backends
from electra_fast.integrations.transformers.deberta_v2 import FusedDisentangledSelfAttention
from electra_fast.ops.disentangled_attention import _OP
from electra_fast.profiling import peak_memory
from electra_fast.reference import disentangled_attention as ref

hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
from transformers import DebertaV2Config  # noqa: E402

# Small-span configs so that T > 2k is cheap to reach: (position_buckets, max_relative_positions) -> k
SMALL = (8, 32)  # k = 8, log buckets beyond |r| = 4


def _pad(kind: str, B: int, T: int) -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    if kind == "right":
        m[-1, max(1, T // 2):] = False
    elif kind == "left":
        m[0, : T // 3] = False
    elif kind == "holes":
        m[:, 1::3] = False
        m[:, 0] = True
    elif kind == "full_row":
        m[0] = False
    return m


def _inputs(B, H, T, D, span, dtype, pos=("c2p", "p2c"), seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3))
    pk = torch.randn(H, 2 * span, D, generator=g).to(dtype) if "c2p" in pos else None
    pq = torch.randn(H, 2 * span, D, generator=g).to(dtype) if "p2c" in pos else None
    return q, k, v, pk, pq


# ---------------------------------------------------------------------------------------------- slots
@pytest.mark.parametrize("buckets,max_rel", [(256, 512), (-1, 64), SMALL])
@pytest.mark.parametrize("T", [1, 7, 600])
def test_slots_match_transformers(buckets, max_rel, T):
    x = torch.zeros(1, T, 4)
    rel = hf.build_relative_position(x, x, bucket_size=buckets, max_position=max_rel)[0]
    span = ref.attention_span(buckets, max_rel)
    c2p = torch.clamp(rel + span, 0, 2 * span - 1)
    p2c = torch.clamp(-rel + span, 0, 2 * span - 1).T  # transformers gathers p2c at [j, i], then transposes
    table = ref._slot_table(ref.relative_slots(T, buckets, max_rel), T)
    assert torch.equal(table, c2p) and torch.equal(table, p2c)


def test_slot_511_lands_like_transformers():
    # |i - j| = 511 with 256 buckets / 512 positions: log(511/128)/log(511/128)*127 is an exact integer.
    rel = torch.tensor([[-511, -510, 510, 511]])
    want = torch.clamp(hf.make_log_bucket_position(rel, 256, 512).long() + 256, 0, 511)
    slots = ref.relative_slots(512, 256, 512)
    assert torch.equal(slots[rel[0] + 511].long(), want[0])


# ------------------------------------------------------------------------- reference vs transformers
def _hf_config(pos_att, share, buckets, max_rel, hidden=64, heads=2):
    return DebertaV2Config(hidden_size=hidden, num_attention_heads=heads, relative_attention=True,
                           pos_att_type=list(pos_att), share_att_key=share, position_buckets=buckets,
                           max_relative_positions=max_rel, max_position_embeddings=max_rel,
                           attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


def _hf_module(pos_att, share, buckets, max_rel, dtype):
    torch.manual_seed(1)
    return hf.DisentangledSelfAttention(_hf_config(pos_att, share, buckets, max_rel)).to(dtype).eval()


def _module_grads(mod, x, rel, mask, weight, valid, **kw):
    out = mod(x, mask, rel_embeddings=rel, **kw)[0]
    loss = (out * weight * valid[..., None]).sum()
    params = [p for p in mod.parameters()]
    grads = torch.autograd.grad(loss, [x, rel] + params, allow_unused=True)
    return out, grads


# fp64: both sides are exact to ~1e-15 relative. fp32: transformers multiplies fp32 [T, T] scores in a
# different order (and divides k by the scale first): a few ulps per score, amplified by sums over T.
REF_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("buckets,max_rel", [(256, 512), (-1, 64)], ids=["log256", "lin64"])
@pytest.mark.parametrize("share", [True, False], ids=["share", "own"])
@pytest.mark.parametrize("pos_att", [("c2p",), ("p2c",), ("c2p", "p2c")], ids=["c2p", "p2c", "both"])
def test_reference_matches_transformers(pos_att, share, buckets, max_rel, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    hf_mod = _hf_module(pos_att, share, buckets, max_rel, dtype)
    fused = FusedDisentangledSelfAttention.from_transformers(hf_mod)
    span = ref.attention_span(buckets, max_rel)
    B = 2
    cases = [(1, "none"), (7, "right"), (64, "left"), (129, "holes")]
    if dtype == torch.float64 and len(pos_att) == 2:  # long sequences (T > 2k, |i - j| >= 511) once per config
        cases += [(300, "full_row"), (600, "right")]
    if dtype == torch.float32:
        cases = cases[1:3]
    for T, pad in cases:
        g = torch.Generator().manual_seed(T)
        x = torch.randn(B, T, 64, generator=g).to(dtype).requires_grad_()
        rel = torch.randn(2 * span, 64, generator=g).to(dtype).requires_grad_()
        weight = torch.randn(B, T, 64, generator=g).to(dtype)
        m = _pad(pad, B, T)
        ext = m[:, None, None, :].long()
        mask4 = ext * ext.squeeze(-2).unsqueeze(-1)
        want, want_g = _module_grads(hf_mod, x, rel, mask4, weight, m)
        with electra_fast.use_backend("reference"):
            got, got_g = _module_grads(fused, x, rel, m.long(), weight, m)
        torch.testing.assert_close(got[m], want[m], **REF_TOL[dtype])
        assert (got[~m] == 0).all()  # padded query rows are 0 (transformers: mean of V)
        for a, b in zip(got_g, want_g):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, **REF_TOL[dtype])


# ----------------------------------------------------------------------------- backends vs reference
BACKEND_CASES = [  # (T, pos terms, padding, dropout)
    (1, ("c2p", "p2c"), "none", 0.0),
    (17, ("c2p", "p2c"), "right", 0.0),   # T > 2k = 16
    (40, ("c2p", "p2c"), "holes", 0.25),
    (23, ("c2p",), "left", 0.0),
    (23, ("p2c",), "full_row", 0.0),
    (9, (), "none", 0.0),
]


def _run(backend, device, args, grad_out, **kw):
    q, k, v, pk, pq = [None if a is None else a.detach().to(device).requires_grad_() for a in args]
    with electra_fast.use_backend(backend):
        out = electra_fast.disentangled_attention(q, k, v, pk, pq, **kw)
        grads = torch.autograd.grad(out, [a for a in (q, k, v, pk, pq) if a is not None], grad_out.to(device))
    return [out.detach().cpu()] + [g.cpu() for g in grads]


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
        out, lse = _OP.op(*args, 0.1, 0.0, 0, *SMALL)
    s = ref._scores(q, k, pk, pq, ref._slot_table(slots, T), 0.1)[..., :7]
    torch.testing.assert_close(lse.cpu()[..., :7], torch.logsumexp(s, -1)[..., :7], rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse.cpu()[..., 7:]).all() and (lse.cpu()[..., 7:] > 0).all()


# ------------------------------------------------------------------------------------ NaN in, NaN out
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


# ------------------------------------------------------------------------------- gradients, dropout
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("backend,device", [p for p in all_backends() if p.values[0] != "triton"])
def test_gradcheck_fp64(backend, device, dropout_p):
    B, H, T, D = 1, 2, 11, 4
    q, k, v, pk, pq = (a.requires_grad_() for a in _inputs(B, H, T, D, 4, torch.float64))
    # fast_mode: a random projection of the Jacobian per input (CI budget); the full check ran in development
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3] = False

    def f(q, k, v, pk, pq):  # span 4 with log buckets from |r| = 2: T > 2k and every slot kind
        return electra_fast.disentangled_attention(q, k, v, pk, pq, attention_mask=mask, position_buckets=4,
                                                   max_relative_positions=8, dropout_p=dropout_p, seed=5)
    with electra_fast.use_backend(backend):
        assert torch.autograd.gradcheck(f, (q, k, v, pk, pq), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend,device", all_backends())
def test_dropout_mask_is_shared_and_deterministic(backend, device):
    B, H, T, D = 1, 2, 24, 32
    q, k, v, pk, pq = _inputs(B, H, T, D, 8, torch.float32)
    v = torch.eye(T, D).expand(B, H, T, D).contiguous()  # out[.., i, j] = dropped probability (j < D)
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1], dropout_p=0.4)
    with electra_fast.use_backend(backend):
        a = electra_fast.disentangled_attention(q.to(device), k.to(device), v.to(device), pk.to(device),
                                                pq.to(device), seed=77, **kw).cpu()
        b = electra_fast.disentangled_attention(q.to(device), k.to(device), v.to(device), pk.to(device),
                                                pq.to(device), seed=77, **kw).cpu()
        c = electra_fast.disentangled_attention(q.to(device), k.to(device), v.to(device), pk.to(device),
                                                pq.to(device), seed=78, **kw).cpu()
    assert torch.equal(a, b) and not torch.equal(a, c)
    keep = ref.dropout_keep(77, (B, H, T, T), 0.4, "cpu")
    assert torch.equal(a[..., :T] != 0, keep)  # bit-identical Philox mask on every backend


def test_dropout_statistics():
    keep = ref.dropout_keep(3, (4, 4, 64, 64), 0.3, "cpu").float()
    assert abs(keep.mean().item() - 0.7) < 0.02  # 65536 draws: 4.4 sigma
    B, H, T, D = 1, 1, 16, 8
    q, k, v, pk, pq = _inputs(B, H, T, D, 8, torch.float64)
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1])
    plain = electra_fast.disentangled_attention(q, k, v, pk, pq, **kw)
    mean = sum(electra_fast.disentangled_attention(q, k, v, pk, pq, dropout_p=0.3, seed=s, **kw)
               for s in range(400)) / 400
    assert (mean - plain).abs().max() < 0.15 * v.abs().max()  # inverted dropout is unbiased


def test_seed_bits_beyond_32_matter():
    q, k, v, pk, pq = _inputs(1, 1, 8, 8, 8, torch.float32)
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1], dropout_p=0.5)
    a = electra_fast.disentangled_attention(q, k, v, pk, pq, seed=1, **kw)
    b = electra_fast.disentangled_attention(q, k, v, pk, pq, seed=1 + 2 ** 32, **kw)
    assert not torch.equal(a, b)


# ------------------------------------------------------------------------------ memory, op, compile
def test_cpp_memory_is_not_quadratic(cpp_extension):
    B, H, T, D = 1, 2, 1024, 32
    args = [a.requires_grad_() for a in _inputs(B, H, T, D, 8, torch.float32)]
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1])

    def step():
        with electra_fast.use_backend("cpp"):
            out = electra_fast.disentangled_attention(*args, **kw)
            out.backward(torch.ones_like(out))
        for a in args:
            a.grad = None

    peak = peak_memory(step)
    one_tt = B * H * T * T * 4  # a single fp32 [B, H, T, T] tensor: what the reference materialises several of
    linear = 12 * B * H * T * D * 4 + 4 * 64 * T * 4 * 2  # q/k/v/out/grads + per-thread block scratch
    assert peak < min(one_tt, linear), (peak, one_tt, linear)


@pytest.mark.parametrize("backend,device", [p for p in all_backends() if p.values[0] != "triton"])
def test_opcheck(backend, device):
    q, k, v, pk, pq = (a.requires_grad_() for a in _inputs(1, 2, 9, 8, 8, torch.float32))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1, 0]], dtype=torch.uint8)
    slots = ref.relative_slots(9, *SMALL)
    with electra_fast.use_backend(backend):
        for pos in ((pk, pq), (pk, None), (None, None)):
            torch.library.opcheck(_OP.op, (q, k, v, *pos, mask, slots, 0.2, 0.1, 3, *SMALL))
        torch.library.opcheck(_OP.op, (q, k, v, pk, pq, None, slots, 0.2, 0.0, 0, *SMALL))


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


@pytest.mark.parametrize("backend,device", [p for p in all_backends() if p.values[0] != "triton"])
def test_opcheck_fused_projection_views(backend, device):
    """The fake kernels promise the real kernels' token-major layout for q / k / v sliced from one projection."""
    q, k, v = (a.transpose(1, 2) for a in torch.randn(1, 9, 3, 2, 8).requires_grad_().unbind(2))
    slots = ref.relative_slots(9, *SMALL)
    with electra_fast.use_backend(backend):
        torch.library.opcheck(_OP.op, (q, k, v, None, None, None, slots, 0.2, 0.1, 3, *SMALL))


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


def test_triton_refuses_unsupported_slot_tables(monkeypatch):
    """The Triton backward needs slot steps of 0 or 1 in i - j (position_buckets <= max_relative_positions / 2);
    other tables (here position_buckets == max_relative_positions: steps of 2) are refused: forced triton
    raises naming the reason, automatic routing falls back to the reference."""
    from electra_fast import _backend
    from electra_fast.kernels import disentangled_attention as kernels
    op = importlib.import_module("electra_fast.ops.disentangled_attention")  # the module, not the function
    bad, good, T = (16, 16), SMALL, 40
    assert kernels.slots_supported(ref.relative_slots(T, *bad)) is not None
    assert kernels.slots_supported(ref.relative_slots(T, *good)) is None
    def reasons(backend, slots, head_dim=32, dtype=torch.float32):
        return op.SPEC.unsupported(backend, head_dim=head_dim, dtype=dtype, rel_slots=ref.relative_slots(T, *slots))

    assert ["monotone" in r for r in reasons("triton", bad)] == [True]
    assert reasons("triton", good) == []
    assert reasons("cpp", bad) == []  # only the Triton backend is refused
    # every reason, not only the first
    assert len(reasons("triton", bad, head_dim=48, dtype=torch.float64)) == 3
    q, k, v, pk, pq = _inputs(1, 2, T, 32, 16, torch.float32)
    kw = dict(position_buckets=bad[0], max_relative_positions=bad[1])
    with electra_fast.use_backend("triton"), pytest.raises(RuntimeError, match="triton.*monotone"):
        electra_fast.disentangled_attention(q, k, v, pk, pq, **kw)
    # automatic routing whose first choice is triton (as on CUDA; here the interpreter on CPU tensors)
    monkeypatch.setattr(_backend, "default_backend", lambda device: "triton")
    backend, reason = op.SPEC.route(q.device, "forward", head_dim=32, dtype=torch.float32,
                                    rel_slots=ref.relative_slots(T, *bad))
    assert backend == "reference" and "monotone" in reason
    x = [a.requires_grad_() for a in (q, k, v, pk, pq)]
    out = electra_fast.disentangled_attention(*x, **kw)
    out.sum().backward()
    want = ref.forward(q.detach(), k.detach(), v.detach(), pk.detach(), pq.detach(), None,
                       ref.relative_slots(T, *bad), 1 / (32 * 3) ** 0.5, 0.0, 0)[0]
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # served by the reference itself
    assert all(torch.isfinite(a.grad).all() for a in x)


GROUP_CASES = [  # (T, GROUP_SLOTS_PER_BLOCK, padding, dropout): with span 8 (16 slots) and 32-row blocks
    (100, 0.2, "holes", 0.25),  # G = 3 blocks per program, 4 blocks: the second program skips 2 of its 3
    (40, 0.1, "left", 0.25),    # G = 5 >= 2 blocks: one program per (b, h) walks them all
    (7, 4, "right", 0.0),       # 2T - 1 < 2k: workspace rows for slots 2 .. 14 only (W0 = 2, NW = 13)
]


@pytest.mark.parametrize("T,per_block,pad,p", GROUP_CASES, ids=[f"T{c[0]}-g{c[1]}" for c in GROUP_CASES])
@pytest.mark.parametrize("backend,device", [p for p in fast_backends() if p.values[0] == "triton"])
def test_triton_grouped_backward_matches_reference(backend, device, monkeypatch, T, per_block, pad, p):
    """Backward programs that reduce several blocks into one workspace (G > 1, accumulate across blocks, blocks
    past T skipped) and workspaces restricted to the reachable slots: gradients still equal the reference, and
    backward() allocates exactly workspace_shapes()."""
    from electra_fast.kernels import disentangled_attention as kernels
    monkeypatch.setattr(kernels, "GROUP_SLOTS_PER_BLOCK", per_block)
    B, H, D = 2, 2, 32
    layouts = [kernels.workspace_layout(T, D, 16, pas, torch.float32) for pas in ("dq", "dkdv")]
    if per_block < 1:  # forced grouping
        assert all(g > 1 and programs * g >= math.ceil(T / 32) for g, programs, _, _ in layouts)
    else:
        assert all(lay[2:] == (2, 13) for lay in layouts)
    args = _inputs(B, H, T, D, 8, torch.float32, seed=T)
    kw = dict(attention_mask=_pad(pad, B, T).to(device), position_buckets=SMALL[0],
              max_relative_positions=SMALL[1], dropout_p=p, seed=99 if p else None)
    grad_out = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(3))
    zeros, seen = torch.zeros, []

    def spy(*shape, **kwargs):
        t = zeros(*shape, **kwargs)
        if t.dim() == 5 and t.dtype == torch.float32:
            seen.append(tuple(t.shape))
        return t
    monkeypatch.setattr(torch, "zeros", spy)
    got = _run(backend, device, args, grad_out, **kw)
    monkeypatch.setattr(torch, "zeros", zeros)
    want = kernels.workspace_shapes(B, H, T, D, 16, True, True, torch.float32)
    assert sorted(seen) == sorted(want.values())
    exact = _run("reference", "cpu", args, grad_out, **kw)
    for a, b in zip(got, exact):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_triton_workspace_is_linear_in_T():
    """The issue's memory rule: the Triton backward's extra memory is O(B * H * T * D + H * k * D). Its only
    T-and-k-dependent buffers are the position-gradient workspaces; workspace_layout() proves
    programs * NW <= 4T + 4 * BLOCK + NW per pass with NW <= min(2k, 2T - 1), i.e. both passes
    <= 4 * B * H * D * (12T + 256) bytes."""
    from electra_fast.kernels import disentangled_attention as kernels
    B, H, D, span2 = 8, 12, 64, 512
    sizes = {}
    for T in (128, 512, 2048, 8192):
        for dtype in (torch.bfloat16, torch.float32):
            sizes[T] = got = kernels.workspace_bytes(B, H, T, D, span2, True, True, dtype)
            assert got <= 4 * B * H * D * (2 * (4 * T + 4 * 32 + min(span2, 2 * T - 1)))
            assert got <= 4 * B * H * D * (12 * T + 256)
            assert got <= 8 * 4 * B * H * T * D  # what these shapes reach (GROUP_SLOTS_PER_BLOCK = 4)
    assert sizes[8192] / sizes[2048] <= 4.1 and sizes[2048] / sizes[512] <= 4.1
    # k does not matter: a 16x wider span costs nothing at T = 2048 (the old layout grew as T * k)
    assert kernels.workspace_bytes(B, H, 2048, D, 16 * span2, True, True) <= sizes[2048] * 1.01
    # the per-pass bound over many (T, k), and the reachable-slot range
    for T in range(1, 3000, 37):
        for span2 in (2, 16, 128, 512, 1024, 8192):
            for pas in ("dq", "dkdv"):
                g, programs, w0, nw = kernels.workspace_layout(T, D, span2, pas, torch.bfloat16)
                if T < 600:
                    slots = ref.relative_slots(T, -1, span2 // 2, "cpu")
                    assert (w0, w0 + nw - 1) == (int(slots.min()), int(slots.max()))
                assert nw <= min(span2, 2 * T - 1) and programs * g >= math.ceil(T / 32) > (programs - 1) * g
                assert programs * nw <= 4 * T + 4 * 32 + nw


def test_torch_compile_fullgraph():
    q, k, v, pk, pq = (a.requires_grad_() for a in _inputs(2, 2, 12, 32, 8, torch.float32))
    mask = _pad("right", 2, 12)

    def f(q, k, v, pk, pq):
        out = electra_fast.disentangled_attention(q, k, v, pk, pq, attention_mask=mask, position_buckets=8,
                                                  max_relative_positions=32, dropout_p=0.1, seed=9)
        return (out * out).sum()

    want = torch.autograd.grad(f(q, k, v, pk, pq), (q, k, v, pk, pq))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, pk, pq), (q, k, v, pk, pq))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------- bad input
def _good():
    q, k, v, pk, pq = _inputs(2, 2, 6, 8, 8, torch.float32)
    return dict(query=q, key=k, value=v, pos_key=pk, pos_query=pq, attention_mask=torch.ones(2, 6, dtype=torch.bool),
                position_buckets=8, max_relative_positions=32)


BAD = [
    ("query", lambda a: a.update(query=a["query"][0]), ValueError),
    ("query", lambda a: a.update(query=[1.0]), TypeError),
    ("query", lambda a: a.update(query=a["query"].long()), TypeError),
    ("key", lambda a: a.update(key=a["key"][:, :, :5]), ValueError),
    ("key", lambda a: a.update(key=a["key"].to("meta")), ValueError),
    ("value", lambda a: a.update(value=a["value"].double()), ValueError),
    ("pos_key", lambda a: a.update(pos_key=a["pos_key"][:, :10]), ValueError),  # wrong span
    ("pos_key", lambda a: a.update(pos_key=a["pos_key"][:1]), ValueError),      # wrong head count
    ("pos_query", lambda a: a.update(pos_query=a["pos_query"][..., :4]), ValueError),
    ("pos_query", lambda a: a.update(pos_query=a["pos_query"].half()), ValueError),
    ("pos_query", lambda a: a.update(pos_query=a["pos_query"][0]), ValueError),
    ("pos_key", lambda a: a.update(position_buckets=16), ValueError),           # buckets vs pos tensors
    ("position_buckets", lambda a: a.update(position_buckets=1), ValueError),
    ("position_buckets", lambda a: a.update(max_relative_positions=5), ValueError),
    ("max_relative_positions", lambda a: a.update(position_buckets=-1, max_relative_positions=0), ValueError),
    ("position_buckets", lambda a: a.update(position_buckets=8.0), TypeError),
    ("attention_mask", lambda a: a.update(attention_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError),
    ("attention_mask", lambda a: a.update(attention_mask=torch.ones(2, 6)), TypeError),
    ("dropout_p", lambda a: a.update(dropout_p=1.0, seed=1), ValueError),
    ("dropout_p", lambda a: a.update(dropout_p=-0.1, seed=1), ValueError),
    ("seed", lambda a: a.update(dropout_p=0.1), ValueError),
    ("seed", lambda a: a.update(dropout_p=0.1, seed=-1), ValueError),
    ("scale", lambda a: a.update(scale=0.0), ValueError),
    ("scale", lambda a: a.update(scale=math.nan), ValueError),
]


@pytest.mark.parametrize("name,edit,exc", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(name, edit, exc):
    args = _good()
    edit(args)
    with pytest.raises(exc, match=name):
        electra_fast.disentangled_attention(**args)



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
