"""Unpadded encoder batches (electra_fast.nn.packing): a right-padded batch runs its layers on the real tokens only
(attention as packed sequences), and gives what the padded run gives at every real position, outputs and gradients;
padded positions come back as zeros. Other masks keep the padded path."""
import pytest
import torch

import electra_fast
from electra_fast.models import ElectraConfig
from electra_fast.models.modeling import Backbone, _key_mask
from electra_fast.nn.packing import packing


def _backbone(disentangled: bool, dtype=torch.float64):
    base = ElectraConfig.deberta_v3_xsmall() if disentangled else ElectraConfig.electra_small()
    cfg = ElectraConfig.from_dict({
        **base.to_dict(), "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
        "intermediate_size": 64, "embedding_size": 32, "vocab_size": 100, "generator_hidden_size": 32,
        "generator_num_attention_heads": 1, "generator_intermediate_size": 32, "generator_num_hidden_layers": 1,
        "pad_token_id": 0, "unk_token_id": 1, "cls_token_id": 2, "sep_token_id": 3, "mask_token_id": 4})
    torch.manual_seed(0)
    return Backbone(cfg, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                    cfg.intermediate_size).to(dtype)


def _batch(lengths, T):
    g = torch.Generator().manual_seed(len(lengths) * 100 + T)
    ids = torch.randint(5, 100, (len(lengths), T), generator=g)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("disentangled", [False, True], ids=["standard", "disentangled"])
def test_unpadded_equals_padded_at_real_positions(disentangled, backend):
    """fp64, eval: outputs and every gradient (input embeddings, parameters) of the unpadded run equal the padded
    run's within fp64 summation-order rounding; the loss reads real positions only, as every head does."""
    net = _backbone(disentangled).eval()
    ids, mask = _batch([11, 1, 17, 6], 17)
    key = _key_mask(mask)
    assert packing(key) is not None
    weight = torch.randn(4, 17, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    with electra_fast.use_backend(backend):
        for unpad in (True, False):
            net.zero_grad(set_to_none=True)
            x = net.embeddings(ids, None, mask).detach().requires_grad_()
            out = net.encoder(x, key, unpad=unpad)
            (out * weight * mask[..., None]).sum().backward()
            results.append((out.detach(), x.grad, {n: p.grad for n, p in net.named_parameters()}))
    (a, ga, pa), (b, gb, pb) = results
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=1e-10, atol=1e-10)
    assert (a[~real] == 0).all()
    torch.testing.assert_close(ga[real], gb[real], rtol=1e-10, atol=1e-10)
    assert pa.keys() == pb.keys() and all(pa[n] is not None for n in pa if n.startswith("encoder."))
    for n in pa:
        if pa[n] is not None or pb[n] is not None:
            torch.testing.assert_close(pa[n], pb[n], rtol=1e-9, atol=1e-10, msg=n)


def test_backbone_takes_the_unpadded_path_for_right_padding_only():
    key = _key_mask(_batch([3, 5], 5)[1])
    p = packing(key)
    assert p is not None and p.cu_seqlens.tolist() == [0, 3, 8] and p.max_seqlen == 5 and len(p.index) == 8
    x = torch.randn(2, 5, 4)
    assert torch.equal(p.pad(p.unpad(x))[key], x[key])
    assert packing(None) is None
    assert packing(torch.ones(2, 5, dtype=torch.bool)) is None                     # nothing padded
    assert packing(torch.tensor([[False, True, True], [True, True, True]])) is None  # left padding
    assert packing(torch.tensor([[True, False, True], [True, True, False]])) is None  # a hole
    assert packing(key.to("meta")) is None
    with electra_fast.eager_twin_mode():
        assert packing(key) is None


def test_switch_keeps_the_padded_path(monkeypatch):
    key = _key_mask(_batch([3, 5], 5)[1])
    monkeypatch.setenv("ELECTRA_FAST_NO_UNPAD", "1")
    assert packing(key) is None
    monkeypatch.setenv("ELECTRA_FAST_NO_UNPAD", "0")
    assert packing(key) is not None


@pytest.mark.parametrize("disentangled", [False, True], ids=["standard", "disentangled"])
def test_training_with_dropout_is_reproducible(disentangled):
    net = _backbone(disentangled, torch.float32).train()
    ids, mask = _batch([9, 4, 12], 12)

    def run():
        torch.manual_seed(5)
        out = net(ids, mask)
        out.sum().backward()
        return out.detach()

    a, b = run(), run()
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert (a[~mask.bool()] == 0).all()


def _encoders():
    from electra_fast.nn.encoder import DisentangledEncoder, Encoder
    torch.manual_seed(0)
    return [Encoder(1, 16, 2, 32, "gelu", 1e-7, 0.0, 0.0).eval(),
            DisentangledEncoder(1, 16, 2, 32, "gelu", 1e-7, 0.0, 0.0, ("c2p", "p2c"), True, 4, 8, 4, "layer_norm").eval()]


@pytest.mark.parametrize("unpad", [True, False])
def test_encoder_inputs_behave_the_same_on_either_path(unpad):
    """A float 0/1 key mask was an additive bias on SDPA's path (padding attended, 0.11 off) and a mask on the
    unpadded one; an int mask was SDPA's raw RuntimeError; document_ids of another shape merged the batch's rows."""
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    for enc in _encoders():
        want = enc(x, mask, unpad=unpad)
        for m in (mask.long(), mask.to(torch.uint8)):
            torch.testing.assert_close(enc(x, m, unpad=unpad), want, rtol=0, atol=0)
        with pytest.raises(TypeError,
                           match=r"^key_mask: expected a bool or integer tensor \(\[B, T\]\), got torch.float32"):
            enc(x, mask.float(), unpad=unpad)
        for bad in (torch.zeros(1, 12, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)):
            with pytest.raises(ValueError, match=r"^document_ids: expected shape \(2, 6\)"):
                enc(x, None, unpad=unpad, document_ids=bad)
        with pytest.raises(TypeError, match="^document_ids: expected a bool or integer tensor"):
            enc(x, None, unpad=unpad, document_ids=torch.zeros(2, 6))
        with pytest.raises(ValueError, match=r"^hidden_states: expected a non-empty float tensor \[B, T, hidden\]"):
            enc(x[:0], None, unpad=unpad)  # a reshape / max() RuntimeError, or 'query: ...' in training


def test_models_check_document_ids_against_input_ids():
    from electra_fast.models import ElectraPretrainingModel
    cfg = ElectraConfig.deberta_v3_xsmall(vocab_size=64, mask_token_id=63, embedding_size=16, hidden_size=16,
                                          num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                          generator_hidden_size=16, generator_num_hidden_layers=1,
                                          generator_num_attention_heads=2, generator_intermediate_size=32,
                                          position_buckets=4, max_position_embeddings=16)
    disc = ElectraPretrainingModel(cfg).discriminator.eval()
    ids = torch.randint(5, 60, (2, 6))
    with pytest.raises(ValueError, match=r"^document_ids: expected shape \(2, 6\) \(that of input_ids\)"):
        disc(ids, document_ids=torch.zeros(1, 12, dtype=torch.long))


def test_reference_backend_checks_packed_offsets_itself():
    """Under torch.compile the op's checks cannot read values: the reference backend returned a short output for
    cu_seqlens [0, 3, 9] over 10 tokens (the C++ kernel refuses it)."""
    from electra_fast.reference import disentangled_attention as ref
    q = torch.randn(10, 2, 8)
    slots = torch.arange(13, dtype=torch.int32)  # max_seqlen 7
    for cu in ([0, 3, 9], [1, 3, 10], [0, 5, 3], [0, 9, 10]):
        with pytest.raises(ValueError, match=r"^cu_seqlens: expected offsets rising from 0 to N=10"):
            ref.forward(q, q, q, None, None, None, slots, 1.0, 0.0, 0, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_encoder_constructor_arguments_are_checked():
    from electra_fast.nn.encoder import Encoder
    for kw, error, match in ((dict(hidden_size=10, num_heads=3), ValueError, "hidden_size: 10 is not divisible"),
                             (dict(num_heads=0), ValueError, "num_heads: expected an int >= 1"),
                             (dict(attention_dropout=1.5), ValueError, "attention_dropout: expected a real number")):
        args = {**dict(num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32, act="gelu", eps=1e-7,
                       dropout=0.0, attention_dropout=0.0), **kw}
        with pytest.raises(error, match=f"^{match}"):
            Encoder(**args)
