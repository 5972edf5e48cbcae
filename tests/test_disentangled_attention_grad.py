"""electra_fast.disentangled_attention: gradients: gradcheck in fp64 and the Triton grouped backward vs the
reference."""
import math

import pytest
import torch

import electra_fast
from attention_inputs import SMALL, _inputs, _pad, _run
from conftest import all_backends, fast_backends


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


@pytest.mark.parametrize("backend,device", [p for p in all_backends() if p.values[0] != "triton"])
def test_training_after_an_inference_mode_call(backend, device):
    """The op caches its slot table per (T, buckets, device): a first call under torch.inference_mode() (an
    evaluation) cached an inference tensor, and every later training call at that length failed to save it for
    backward ("Inference tensors cannot be saved for backward"), in every model of the process."""
    import importlib
    importlib.import_module("electra_fast.ops.disentangled_attention")._slots.cache_clear()
    q, k, v, pk, pq = _inputs(1, 2, 9, 4, 4, torch.float32)
    kw = dict(position_buckets=4, max_relative_positions=8)
    with electra_fast.use_backend(backend):
        with torch.inference_mode():
            evaluated = electra_fast.disentangled_attention(q, k, v, pk, pq, **kw)
        args = [a.clone().requires_grad_() for a in (q, k, v, pk, pq)]
        out = electra_fast.disentangled_attention(*args, **kw)
        out.sum().backward()
    torch.testing.assert_close(out.detach(), evaluated, rtol=0, atol=0)
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("backend,device", all_backends())
def test_gradients_stay_finite_at_fp16s_largest_scores(backend, device, dtype):
    # |q| = |k| = 65504 (fp16's max) gives scores ~1e11: the softmax is one-hot, so dv is exactly the row's weight on
    # each key; the Triton backward's P overflowed to inf (lse's ln 2 round trip put it one ulp under the top score)
    g = torch.Generator().manual_seed(0)
    sign = [torch.randn(1, 1, 2, 32, generator=g).sign() for _ in range(3)]
    q, k = ((s * 65504.0).to(dtype).to(device).requires_grad_() for s in sign[:2])
    v = sign[2].to(dtype).to(device).requires_grad_()
    with electra_fast.use_backend(backend):
        out = electra_fast.disentangled_attention(q, k, v, position_buckets=0, max_relative_positions=1)
        out.backward(torch.ones_like(out))
    with electra_fast.use_backend("reference"):
        q2, k2, v2 = (a.detach().requires_grad_() for a in (q, k, v))
        want = electra_fast.disentangled_attention(q2, k2, v2, position_buckets=0, max_relative_positions=1)
        want.backward(torch.ones_like(want))
    for got, ref in ((out, want), (q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), ref.float())
