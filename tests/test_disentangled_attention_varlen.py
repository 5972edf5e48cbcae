"""electra_fast.disentangled_attention on packed variable-length sequences ([N, H, D] + cu_seqlens): every sequence
equals its own unpadded run (outputs and all gradients), the C++ kernels equal the padded C++ call bit for bit, the
dropout element-index contract, opcheck / torch.compile, routing away from Triton, bad input."""
import pytest
import torch

import electra_fast
from attention_inputs import SMALL, _run
from conftest import assert_low_precision, fast_backends
from electra_fast import _backend
from electra_fast.ops.disentangled_attention import _OP
from electra_fast.reference import disentangled_attention as ref
from test_disentangled_attention_reference import REF_TOL

BACKENDS = ["reference", "cpp"]  # "cpp" needs _C: conftest's _need_backend skips, or fails under REQUIRE_EXT
DEBERTA = (256, 512)  # DeBERTa-v3's position_buckets, max_relative_positions: k = 256


def _packed(lengths, H, D, span, dtype, pos=("c2p", "p2c"), seed=0):
    """((q, k, v, pos_key, pos_query), grad_out, cu_seqlens) for sequences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v, grad_out = (torch.randn(n, H, D, generator=g).to(dtype) for _ in range(4))
    pk = torch.randn(H, 2 * span, D, generator=g).to(dtype) if "c2p" in pos else None
    pq = torch.randn(H, 2 * span, D, generator=g).to(dtype) if "p2c" in pos else None
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return (q, k, v, pk, pq), grad_out, cu


def _alone(backend, args, grad_out, cu, **kw):
    """[out, dq, dk, dv, dpos...] of every sequence run as an unpadded [1, H, L, D] call, packed back (position
    gradients summed over sequences)."""
    bounds = cu.tolist()
    runs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[s:e].transpose(0, 1).unsqueeze(0).contiguous() for x in args[:3])
        runs.append(_run(backend, "cpu", [q, k, v, *args[3:]], grad_out[s:e].transpose(0, 1).unsqueeze(0), **kw))
    n_tok = 4  # out, dq, dk, dv
    got = [torch.cat([r[i][0].transpose(0, 1) for r in runs]) for i in range(n_tok)]
    return got + [sum(r[i] for r in runs) for i in range(n_tok, len(runs[0]))]


def _assert_same(got, want, tol=None):
    for i, (a, b) in enumerate(zip(got, want)):
        if tol is None:
            assert torch.equal(a, b), f"tensor {i}: max difference {(a - b).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"tensor {i}: {m}")


LENGTHS = [1, 5, 17, 3, 30, 1]  # 17, 30 > 2k = 16: clamped slots inside a sequence


@pytest.mark.parametrize("pos", [("c2p", "p2c"), ("c2p",), ("p2c",), ()], ids=lambda p: "+".join(p) or "c2c")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sequence_equals_its_own_run(backend, dtype, pos):
    args, grad_out, cu = _packed(LENGTHS, 2, 16, 8, dtype, pos)
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1])
    got = _run(backend, "cpu", args, grad_out, cu_seqlens=cu, max_seqlen=40, **kw)
    alone = _alone(backend, args, grad_out, cu, **kw)
    # the same kernels on the same rows: identical, except the position gradients, summed over the sequences in
    # another order (the C++ backward sums per fixed partition of sequences; the reference in the accumulation dtype)
    _assert_same(got[:4], alone[:4], None if backend == "cpp" else REF_TOL[dtype])
    _assert_same(got[4:], alone[4:], REF_TOL[dtype])
    if backend == "cpp":  # and the C++ kernels agree with the truth on the packed call itself
        _assert_same(got, _run("reference", "cpu", args, grad_out, cu_seqlens=cu, max_seqlen=40, **kw),
                     REF_TOL[dtype])


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend, dropout_p):
    """Gradients of the packed path (q, k, v, both position tensors), with log buckets from |r| = 2 and a sequence
    longer than 2k = 8 (fast_mode: a random projection of the Jacobian per input, as the padded gradcheck)."""
    args, _, cu = _packed([3, 1, 11], 2, 4, 4, torch.float64)

    def f(*tensors):
        return electra_fast.disentangled_attention(*tensors, cu_seqlens=cu, max_seqlen=12, position_buckets=4,
                                                   max_relative_positions=8, dropout_p=dropout_p, seed=5)
    with electra_fast.use_backend(backend):
        assert torch.autograd.gradcheck(f, [a.requires_grad_() for a in args], eps=1e-6, atol=1e-6, rtol=1e-5,
                                        fast_mode=True)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("backend,device", [p for p in fast_backends()])
def test_packed_equals_the_padded_call_bitwise(backend, device, dropout_p):
    """Equal lengths L = max_seqlen: the packed call is the padded [n, H, L, D] call (same tasks / programs, slot
    tables and dropout elements), bit for bit, position gradients included."""
    n, H, L, D = 2, 1, 40, 32  # D = 32: every backend; L over a 32-row backward block
    args, grad_out, cu = _packed([L] * n, H, D, 8, torch.float32)
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1], dropout_p=dropout_p, seed=11)
    got = _run(backend, device, args, grad_out, cu_seqlens=cu.to(device), max_seqlen=L, **kw)

    def padded(x):  # the packed memory seen as [n, H, L, D] (the C++ kernels read it through its strides)
        return x.view(n, L, H, D).transpose(1, 2)

    want = _run(backend, device, [padded(x) for x in args[:3]] + list(args[3:]), padded(grad_out), **kw)
    _assert_same(got, [w.transpose(1, 2).reshape(n * L, H, D) for w in want[:4]] + want[4:])


def test_cpp_reads_fused_projection_views(cpp_extension):
    """q / k / v sliced from one packed [N, 3, H, D] projection are read through their strides (no copy): the same
    results as contiguous inputs; outputs and gradients come back contiguous [N, H, D]."""
    args, grad_out, cu = _packed(LENGTHS, 2, 16, 8, torch.float32)
    fused = torch.stack(args[:3], dim=1)  # [N, 3, H, D]
    kw = dict(cu_seqlens=cu, max_seqlen=30, position_buckets=SMALL[0], max_relative_positions=SMALL[1])
    got = _run("cpp", "cpu", list(fused.unbind(1)) + list(args[3:]), grad_out, **kw)
    _assert_same(got, _run("cpp", "cpu", args, grad_out, **kw))
    assert all(g.is_contiguous() for g in got[:4])


def test_one_long_and_many_short_beyond_512(cpp_extension):
    """max_seqlen > 512 with DeBERTa's log buckets (|i - j| = 511 rounds on an integer): a 600-token sequence
    (64-row blocks) next to short ones; C++ vs the reference and vs each sequence alone."""
    lengths = [2, 600, 1, 7, 3, 1, 12]
    args, grad_out, cu = _packed(lengths, 1, 8, DEBERTA[0], torch.float32, seed=3)
    kw = dict(position_buckets=DEBERTA[0], max_relative_positions=DEBERTA[1])
    got = _run("cpp", "cpu", args, grad_out, cu_seqlens=cu, max_seqlen=640, **kw)
    _assert_same(got, _run("reference", "cpu", args, grad_out, cu_seqlens=cu, max_seqlen=640, **kw),
                 REF_TOL[torch.float32])
    alone = _alone("cpp", args, grad_out, cu, **kw)
    _assert_same(got[:4], alone[:4])
    _assert_same(got[4:], alone[4:], REF_TOL[torch.float32])


def test_dropout_element_index_is_the_padded_row():
    """Sequence b's mask is row b of the padded [n, H, max_seqlen, max_seqlen] draws (reference/philox contract)."""
    n, H, T = 3, 2, 24
    padded = ref.dropout_keep(5, (n, H, T, T), 0.4, "cpu")
    for b, L in enumerate([24, 9, 1]):
        torch.testing.assert_close(ref.dropout_keep(5, (1, H, L, L), 0.4, "cpu", row=b, row_len=T)[0],
                                   padded[b, :, :L, :L], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_equals_the_padded_rows_call(backend):
    """With dropout, a packed call equals the padded call whose rows are the sequences (right-padded to max_seqlen,
    masked) at the real positions; a dropped-out mask elsewhere would move the outputs by O(1)."""
    lengths, T, H, D = [5, 12, 1, 9], 16, 2, 8
    args, grad_out, cu = _packed(lengths, H, D, 8, torch.float64)
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1], dropout_p=0.3, seed=21)
    got = _run(backend, "cpu", args, grad_out, cu_seqlens=cu, max_seqlen=T, **kw)
    again = _run(backend, "cpu", args, grad_out, cu_seqlens=cu, max_seqlen=T, **kw)
    _assert_same(got, again)  # reproducible
    other = _run(backend, "cpu", args, grad_out, cu_seqlens=cu, max_seqlen=T, **{**kw, "seed": 22})
    assert not torch.equal(got[0], other[0])

    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]

    def padded(x):  # [N, H, D] -> [n, H, T, D], zeros at padding
        out = x.new_zeros(len(lengths), T, H, D)
        out[mask] = x
        return out.transpose(1, 2)

    want = _run("reference", "cpu", [padded(x) for x in args[:3]] + list(args[3:]), padded(grad_out),
                attention_mask=mask, **kw)
    _assert_same(got, [w.transpose(1, 2)[mask] for w in want[:4]] + want[4:], REF_TOL[torch.float64])


@pytest.mark.parametrize("amx", [True, False], ids=["brgemm", "fp32-products"])
def test_cpp_bf16(cpp_extension, amx, monkeypatch):
    """bf16 on both C++ paths within DESIGN.md's low-precision criterion, and each sequence as its own C++ run."""
    if amx and not torch.ops.electra_fast_cpp.bf16_brgemm_available():
        pytest.skip("this CPU has no native bf16 brgemm (AMX / AVX512-BF16): the fp32-products case covers it")
    monkeypatch.setenv("ELECTRA_FAST_NO_AMX", "0" if amx else "1")
    args, grad_out, cu = _packed([3, 40, 1, 17], 2, 32, 8, torch.bfloat16, seed=5)
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1], dropout_p=0.1, seed=4)
    packed = dict(cu_seqlens=cu, max_seqlen=48)
    got = _run("cpp", "cpu", args, grad_out, **packed, **kw)
    up = [None if a is None else a.float() for a in args]
    exact = _run("reference", "cpu", up, grad_out.float(), **packed, **kw)
    assert_low_precision(got, _run("reference", "cpu", args, grad_out, **packed, **kw), exact)


def test_opcheck(cpp_extension):
    args, _, cu = _packed([3, 1, 6], 2, 8, 8, torch.float32)
    q, k, v, pk, pq = (a.requires_grad_() for a in args)
    slots = ref.relative_slots(8, *SMALL)
    for backend in ("reference", "cpp"):
        with electra_fast.use_backend(backend):
            torch.library.opcheck(_OP.op, (q, k, v, pk, pq, None, slots, 0.2, 0.1, 3, *SMALL, cu))
            torch.library.opcheck(_OP.op, (q, k, v, None, None, None, slots, 0.2, 0.0, 0, *SMALL, cu))


def test_torch_compile_fullgraph():
    args, _, cu = _packed([4, 9, 1], 2, 16, 8, torch.float32)
    args = [a.requires_grad_() for a in args]

    def f(q, k, v, pk, pq):
        out = electra_fast.disentangled_attention(q, k, v, pk, pq, cu_seqlens=cu, max_seqlen=9, position_buckets=8,
                                                  max_relative_positions=32, dropout_p=0.1, seed=9)
        return (out * out).sum()

    want = torch.autograd.grad(f(*args), args)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


TRITON = [p for p in fast_backends() if p.values[0] == "triton"]


@pytest.mark.parametrize("pos", [("c2p", "p2c"), ()], ids=lambda p: "+".join(p) or "c2c")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_matches_reference(backend, device, dtype, pos):
    """Packed calls on the Triton kernels (interpreted without a GPU): a sequence of length 1, sequences over two
    64-row forward / 32-row backward blocks and ending mid-block, programs past a sequence's end, dropout. fp32 within
    the parity file's bound for blocked fp32 accumulation, fp16 within DESIGN.md's low-precision criterion."""
    args, grad_out, cu = _packed([1, 70, 5, 33], 1, 32, 8, dtype, pos, seed=2)
    kw = dict(max_seqlen=80, position_buckets=SMALL[0], max_relative_positions=SMALL[1], dropout_p=0.2, seed=3)
    got = _run(backend, device, args, grad_out, cu_seqlens=cu.to(device), **kw)
    up = [None if a is None else a.float() for a in args]
    exact = _run("reference", "cpu", up, grad_out.float(), cu_seqlens=cu, **kw)
    if dtype == torch.float32:
        _assert_same(got, exact, dict(rtol=1e-4, atol=2e-5))
    else:
        assert_low_precision(got, _run("reference", "cpu", args, grad_out, cu_seqlens=cu, **kw), exact)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_spreads_heads_past_the_grid_axis_limit(backend, device, packed, monkeypatch):
    """CUDA caps grid axes y and z at 65535 blocks, which B * H passes (5462 packed sequences at H = 12): the (b, h)
    index spans y and z. With the cap lowered to 2, B * H = 5 needs a 2 x 3 spread with one spare program, and
    every output and gradient still matches the reference (the interpreter itself has no cap)."""
    from electra_fast.kernels import disentangled_attention as kernels
    monkeypatch.setattr(kernels, "GRID_YZ", 2)
    grids = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    for name in ("da_fwd_kernel", "da_bwd_dkdv_kernel", "da_bwd_dq_kernel"):
        monkeypatch.setattr(kernels, name, Recorded(getattr(kernels, name)))
    kw = dict(position_buckets=SMALL[0], max_relative_positions=SMALL[1], dropout_p=0.2, seed=3)
    args, grad_out, cu = _packed([3, 9, 1, 6, 4], 1, 32, 8, torch.float32, seed=4)
    if packed:
        kw.update(cu_seqlens=cu, max_seqlen=9)
    else:
        args = [x.view(5, 1, 6, 32) if x.shape[0] == 30 else x for x in _packed([6] * 5, 1, 32, 8, torch.float32)[0]]
        grad_out = torch.randn(5, 1, 6, 32, generator=torch.Generator().manual_seed(5))
    got = _run(backend, device, args, grad_out, **{k: v.to(device) if torch.is_tensor(v) else v
                                                   for k, v in kw.items()})
    _assert_same(got, _run("reference", "cpu", args, grad_out, **kw), dict(rtol=1e-4, atol=2e-5))
    assert len(grids) == 3 and all(g[1:] == (2, 3) for g in grids), grids


def test_triton_limits_do_not_refuse_packed_calls():
    pytest.importorskip("triton")
    spec = _backend.REGISTRY["disentangled_attention"]
    call = dict(head_dim=32, dtype=torch.float32, rel_slots=ref.relative_slots(16, *SMALL))
    assert spec.unsupported("triton", **call, varlen=True) == spec.unsupported("triton", **call) == []


def _bad(**change):
    args, _, cu = _packed([3, 5], 2, 8, 8, torch.float32)
    call = dict(zip(("query", "key", "value", "pos_key", "pos_query"), args))
    call.update(cu_seqlens=cu, max_seqlen=5, position_buckets=SMALL[0], max_relative_positions=SMALL[1])
    call.update(change)
    return call


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


BAD = [  # (change, exception, message)
    (dict(cu_seqlens=_i32(0, 5, 3, 8)), ValueError, "cu_seqlens: .*increasing.*length -2"),
    (dict(cu_seqlens=_i32(0, 3, 3, 8)), ValueError, "cu_seqlens: .*length 0"),
    (dict(cu_seqlens=_i32(0, 3, 8).long()), TypeError, "cu_seqlens: expected an int32"),
    (dict(cu_seqlens=_i32(0, 3, 8).float()), TypeError, "cu_seqlens: expected an int32"),
    (dict(cu_seqlens=_i32(1, 3, 8)), ValueError, r"cu_seqlens: expected cu_seqlens\[0\] == 0"),
    (dict(cu_seqlens=_i32(0, 3, 7)), ValueError, "cu_seqlens: .*last offset.*8"),
    (dict(cu_seqlens=_i32(0, 3, 9)), ValueError, "cu_seqlens: .*last offset.*8"),
    (dict(cu_seqlens=_i32(8)), ValueError, r"cu_seqlens: expected a 1-d tensor \[n_seqs \+ 1\]"),
    (dict(cu_seqlens=_i32(0, 3, 8).view(1, 3)), ValueError, "cu_seqlens: expected a 1-d"),
    (dict(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32, device="meta")), ValueError, "cu_seqlens: .*device"),
    (dict(max_seqlen=4), ValueError, "max_seqlen: expected >= every sequence length, got 4 < 5"),
    (dict(max_seqlen=5.0), TypeError, "max_seqlen: expected an int"),
    # its slot table was allocated first: "[enforce fail at alloc_cpu.cpp] ... 17592186044408 bytes"
    (dict(max_seqlen=2 ** 40), ValueError, r"max_seqlen: expected a length int32 offsets can hold \(< 2\*\*31\)"),
    (dict(max_seqlen=None), TypeError, "max_seqlen: expected an int"),
    (dict(attention_mask=torch.ones(1, 8, dtype=torch.bool)), ValueError, "attention_mask: expected None"),
    (dict(query=torch.randn(1, 8, 2, 8)), ValueError, r"query: expected a 3-d tensor \[N, H, D\]"),
    (dict(cu_seqlens=None, query=torch.randn(1, 2, 8, 8), key=torch.randn(1, 2, 8, 8), value=torch.randn(1, 2, 8, 8)),
     ValueError, "max_seqlen: only with cu_seqlens"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[m.split(":")[0] + str(i) for i, (_, _, m) in enumerate(BAD)])
def test_bad_input(change, exc, match):
    with pytest.raises(exc, match=match):
        electra_fast.disentangled_attention(**_bad(**change))


def test_cpp_is_thread_count_independent(cpp_extension):
    """Packed calls keep the padded kernels' determinism: outputs and every gradient bitwise the same on 1 and 3
    threads (9 sequences > the 8 fixed position-gradient partitions, one over two query blocks, dropout)."""
    args, grad_out, cu = _packed([70, 1, 9, 33, 2, 600, 5, 17, 3], 2, 16, 8, torch.float32, seed=8)
    kw = dict(cu_seqlens=cu, max_seqlen=600, position_buckets=SMALL[0], max_relative_positions=SMALL[1],
              dropout_p=0.1, seed=1)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(_run("cpp", "cpu", args, grad_out, **kw))
    finally:
        torch.set_num_threads(threads)
    _assert_same(*results)


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference"), *fast_backends()])
@pytest.mark.parametrize("bounds", [(0, 3, 7), (0, 1, 8), (0, 6, 3, 8)], ids=["short", "too-long", "falling"])
def test_compiled_calls_check_the_offsets_in_every_backend(backend, device, bounds):
    """Under torch.compile the op's checks cannot read cu_seqlens: the Triton kernels then returned uninitialised
    memory for rows no sequence covers (+-1e32), and the C++ kernel raised a RuntimeError in its own terms (T,
    rel_slots). Every backend refuses them, in the op's terms (the Triton check is an asynchronous device assert:
    at once on CPU tensors, at a later CUDA call on a GPU)."""
    q = torch.randn(8, 1, 32, device=device)  # a head dim the Triton kernels take
    f = torch.compile(lambda q, cu: electra_fast.disentangled_attention(q, q, q, cu_seqlens=cu, max_seqlen=6),
                      fullgraph=True, backend="eager", dynamic=False)
    exc = RuntimeError if backend == "triton" else ValueError  # torch._assert_async raises RuntimeError
    with _backend.use_backend(backend), pytest.raises(exc, match=r"cu_seqlens: expected offsets rising from 0 to "
                                                                 r"N=8 \(rows of query\) in steps of 1 .. max_seqlen=6"):
        f(q, torch.tensor(bounds, dtype=torch.int32, device=device))


def test_bucket_settings_without_position_tensors_are_not_read():
    """position_buckets=1 with no position tensors ended in ZeroDivisionError (the slot table was built with log
    buckets anyway): the settings index tables the call does not have."""
    args, _, cu = _packed([3, 5], 2, 8, 8, torch.float32, pos=())
    q, k, v = args[:3]
    want = electra_fast.disentangled_attention(q, k, v, cu_seqlens=cu, max_seqlen=5)
    for buckets, max_rel in ((1, 512), (256, -1), (3, 2)):
        got = electra_fast.disentangled_attention(q, k, v, cu_seqlens=cu, max_seqlen=5, position_buckets=buckets,
                                                  max_relative_positions=max_rel)
        assert torch.equal(got, want)
        padded = electra_fast.disentangled_attention(*(x[None].transpose(1, 2)[:, :, :3] for x in (q, k, v)),
                                                     position_buckets=buckets, max_relative_positions=max_rel)
        assert torch.isfinite(padded).all()
