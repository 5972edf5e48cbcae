"""electra_fast.disentangled_attention: attention dropout: the Philox mask shared by every backend, its statistics,
the seed's high bits."""
import pytest
import torch

import electra_fast
from attention_inputs import SMALL, _inputs
from conftest import all_backends
from electra_fast.reference import disentangled_attention as ref


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
