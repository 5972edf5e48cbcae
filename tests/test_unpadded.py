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
