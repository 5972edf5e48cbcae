"""electra_fast.disentangled_attention: the relative-position slot table and the reference implementation vs
transformers' DisentangledSelfAttention (outputs and every gradient, fp64 and fp32)."""
import pytest
import torch

import electra_fast
from attention_inputs import SMALL, _hf_module, _pad
from conftest import all_backends
from electra_fast.integrations.transformers.deberta_v2 import FusedDisentangledSelfAttention
from electra_fast.reference import disentangled_attention as ref

hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")


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
        # the adapter fills padded query rows as transformers does (the mean of V; the op itself leaves them 0)
        torch.testing.assert_close(got[~m], want[~m], **REF_TOL[dtype])
        for a, b in zip(got_g, want_g):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, **REF_TOL[dtype])


@pytest.mark.parametrize("backend,device", all_backends())
def test_equal_keys_give_the_values_exactly_at_large_scores(backend, device):
    # every key and value alike: the output is V whatever the scores. The reference normalised by exp(-lse) with an
    # fp32 lse, |s| * 2^-24 off (0.7 % at |s| ~ 2e5); fp32's own rounding is ~1e-7
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(1, 1, 1, 32, generator=g) * 1000).expand(1, 1, 7, 32).contiguous().to(device)
               for _ in range(3))
    assert (q[0, 0, 0] @ k[0, 0, 0]).abs() / 32 ** 0.5 > 1e5
    with electra_fast.use_backend(backend):
        out = electra_fast.disentangled_attention(q, k, v, position_buckets=0, max_relative_positions=1)
    assert ((out - v).abs().max() / v.abs().max()).item() < 1e-6
