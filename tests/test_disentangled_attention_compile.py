"""electra_fast.disentangled_attention: the custom ops under torch.library.opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch

import electra_fast
from attention_inputs import SMALL, _inputs, _pad
from conftest import all_backends
from electra_fast.ops.disentangled_attention import _OP
from electra_fast.reference import disentangled_attention as ref


@pytest.mark.parametrize("backend,device", [p for p in all_backends() if p.values[0] != "triton"])
def test_opcheck(backend, device):
    q, k, v, pk, pq = (a.requires_grad_() for a in _inputs(1, 2, 9, 8, 8, torch.float32))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1, 0]], dtype=torch.uint8)
    slots = ref.relative_slots(9, *SMALL)
    with electra_fast.use_backend(backend):
        for pos in ((pk, pq), (pk, None), (None, None)):
            torch.library.opcheck(_OP.op, (q, k, v, *pos, mask, slots, 0.2, 0.1, 3, *SMALL, None))
        torch.library.opcheck(_OP.op, (q, k, v, pk, pq, None, slots, 0.2, 0.0, 0, *SMALL, None))


@pytest.mark.parametrize("backend,device", [p for p in all_backends() if p.values[0] != "triton"])
def test_opcheck_fused_projection_views(backend, device):
    """The fake kernels promise the real kernels' token-major layout for q / k / v sliced from one projection."""
    q, k, v = (a.transpose(1, 2) for a in torch.randn(1, 9, 3, 2, 8).requires_grad_().unbind(2))
    slots = ref.relative_slots(9, *SMALL)
    with electra_fast.use_backend(backend):
        torch.library.opcheck(_OP.op, (q, k, v, None, None, None, slots, 0.2, 0.1, 3, *SMALL, None))


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
