"""electra_fast.disentangled_attention: memory (no [T, T] tensor), the Triton kernels' limits and workspace, bad
input."""
import importlib
import math

import pytest
import torch

import electra_fast
from attention_inputs import SMALL, _inputs
from electra_fast.profiling import peak_memory
from electra_fast.reference import disentangled_attention as ref


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
    ("dropout_p", lambda a: a.update(dropout_p=1.5, seed=1), ValueError),
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


def test_dropout_p_one_drops_every_weight_as_torch_does():
    # torch's attention with dropout_p=1 gives zeros and zero gradients; the op refused it
    args = _good()
    args = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}
    out = electra_fast.disentangled_attention(**{**args, "dropout_p": 1.0, "seed": 3})
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    grads = [args[k].grad for k in ("query", "key", "value")]
    assert all(g is not None and torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_head_dim_limit_is_the_kernels():
    """The kernels own their limits: routing refuses a head dim outside kernels.HEAD_DIMS with the kernels' reason;
    the op module's old name still answers, with a DeprecationWarning."""
    pytest.importorskip("triton")
    from electra_fast.kernels import disentangled_attention as kernels
    op = importlib.import_module("electra_fast.ops.disentangled_attention")
    slots = ref.relative_slots(8, *SMALL)
    assert op.SPEC.unsupported("triton", head_dim=kernels.HEAD_DIMS[0], dtype=torch.float32, rel_slots=slots) == []
    reasons = op.SPEC.unsupported("triton", head_dim=kernels.HEAD_DIMS[0] + 1, dtype=torch.float32, rel_slots=slots)
    assert len(reasons) == 1 and "head dims" in reasons[0]
    with pytest.warns(DeprecationWarning, match="kernels.disentangled_attention.HEAD_DIMS"):
        assert op.TRITON_HEAD_DIMS == kernels.HEAD_DIMS
