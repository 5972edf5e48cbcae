"""Reduced parity (#19): electra_fast's fused ElectraPretrainingModel against ELECTRA written here from its definition
on transformers' ElectraForMaskedLM (generator) + ElectraForPreTraining (discriminator), from the same initial
weights, on the same padded batches, for a few dozen AdamW steps.

The random draws (which positions are selected, [MASK] or kept, the generator's samples) are the fused model's,
captured as it runs; the reference checks them against ELECTRA's definition (15% of the real tokens, never special
or padding; of those 85% [MASK], 15% kept; only selected positions replaced) and recomputes everything else itself:
the MLM cross-entropy at the selected positions, labels = corrupted != original, the RTD binary cross-entropy averaged
over the real tokens only, loss = MLM + 50 RTD, the gradients and the optimizer step. The test must be able to fail:
``test_parity_catches_*`` inject two plausible bugs into the fused model and require the comparison to reject them.
"""
import pytest
import torch
import torch.nn.functional as F

from electra_fast.models import ElectraConfig, ElectraPretrainingModel
from electra_fast.models import modeling
from electra_fast.models.interop import export_state, transformers_config
from test_train import _one_thread  # noqa: F401  (fixture: one torch thread; tiny shapes)

transformers = pytest.importorskip("transformers")

V, B, T, STEPS = 64, 4, 24, 30
MASK_PROB, MASK_TOKEN_FRAC, DISC_WEIGHT = 0.15, 0.85, 50.0  # ELECTRA's definition (not read from the model)


def _config():
    return ElectraConfig(vocab_size=V, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3,
                         mask_token_id=4, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, generator_hidden_size=16,
                         generator_num_hidden_layers=2, generator_num_attention_heads=1,
                         generator_intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)


def _reference(net):
    """transformers' generator and discriminator holding ``net``'s weights, embeddings shared as in ELECTRA."""
    parts = []
    for role, cls in (("generator", transformers.ElectraForMaskedLM),
                      ("discriminator", transformers.ElectraForPreTraining)):
        hf = dict(transformers_config(net.config, role))
        hf.pop("architectures", None)
        model = cls(transformers.ElectraConfig(**hf))
        missing, unexpected = model.load_state_dict(export_state(net, role), strict=False)
        assert not unexpected and all("lm_head.weight" in k or "position_ids" in k for k in missing), missing
        parts.append(model.train())
    gen, disc = parts
    disc.electra.embeddings = gen.electra.embeddings  # ELECTRA ties the whole embedding layer
    assert gen.generator_lm_head.weight is gen.electra.embeddings.word_embeddings.weight  # and the MLM output
    return gen, disc


def _batch(g):
    """Packed-then-padded rows: [CLS] w... [SEP] [PAD]..., lengths 8..T; attention_mask int [B, T]."""
    ids = torch.randint(5, V, (B, T), generator=g)
    lengths = torch.randint(8, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 2
    ids[torch.arange(B), lengths - 1] = 3
    return ids.masked_fill(mask == 0, 0), mask


def _params(*models):
    seen = {}
    for m in models:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _run_parity():
    """Train both for STEPS steps; AssertionError at the first departure from the reference."""
    torch.manual_seed(0)
    net = ElectraPretrainingModel(_config()).train()
    gen, disc = _reference(net)
    opt_kw = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, foreach=False)
    opt_net, opt_ref = torch.optim.AdamW(net.parameters(), **opt_kw), torch.optim.AdamW(_params(gen, disc), **opt_kw)
    captured = []
    net.generator.backbone.register_forward_hook(lambda mod, args, out: captured.append(args[0].clone()))
    g = torch.Generator().manual_seed(1)
    selected = real_candidates = masked_with_mask = 0
    for step in range(STEPS):
        ids, mask = _batch(g)
        out = net(ids, mask, seed=1000 + step)
        gen_input, sel = captured.pop(), out.masked
        # the draws, against ELECTRA's definition
        special = (ids <= 4) | (mask == 0)
        assert not (sel & special).any(), "a special or padding position was selected"
        assert torch.equal(gen_input[~sel], ids[~sel]), "an unselected position was changed"
        is_mask = gen_input[sel] == 4
        assert torch.equal(gen_input[sel][~is_mask], ids[sel][~is_mask]), "a selected position got a random token"
        assert torch.equal(out.corrupted_ids[~sel], ids[~sel]), "the discriminator saw a changed unselected position"
        selected, masked_with_mask = selected + int(sel.sum()), masked_with_mask + int(is_mask.sum())
        real_candidates += int((~special).sum())
        # the losses, recomputed
        mlm = F.cross_entropy(gen(input_ids=gen_input, attention_mask=mask).logits[sel], ids[sel])
        real = mask.bool()
        labels = (out.corrupted_ids != ids).float()
        d_logits = disc(input_ids=out.corrupted_ids, attention_mask=mask).logits
        rtd = F.binary_cross_entropy_with_logits(d_logits[real], labels[real])
        loss = mlm + DISC_WEIGHT * rtd
        for name, ours, ref in (("mlm", out.mlm_loss, mlm), ("rtd", out.rtd_loss, rtd), ("loss", out.loss, loss)):
            # fp32 throughout, sums in other orders: seen <= 4e-7 relative, 1e-5 leaves 25x room
            torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"step {step + 1} {name}: {m}")
        for opt, total in ((opt_net, out.loss), (opt_ref, loss)):
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
    # over ~290 selections 85% [MASK] has a standard deviation of ~2%: 6% is three of them
    assert abs(masked_with_mask / selected - MASK_TOKEN_FRAC) < 0.06, f"[MASK] share {masked_with_mask / selected:.3f}"
    assert abs(selected / real_candidates - MASK_PROB) < 0.03, f"selected share {selected / real_candidates:.3f}"
    ref = {**{f"generator.{k}": v for k, v in gen.state_dict().items()},
           **{f"discriminator.{k}": v for k, v in disc.state_dict().items()}}
    ours = {**{f"generator.{k}": v for k, v in export_state(net, "generator").items()},
            **{f"discriminator.{k}": v for k, v in export_state(net, "discriminator").items()}}
    for k, v in ours.items():
        # 30 Adam steps of fp32 rounding differences: seen <= 1.2e-7 absolute
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"after training, {k}: {m}")
    return selected


def test_fused_pretraining_matches_electra_written_on_transformers():
    assert _run_parity() > 250  # enough selections for the share checks to mean something


def test_parity_catches_masking_that_always_writes_mask(monkeypatch):
    real = modeling.mask_tokens
    monkeypatch.setattr(modeling, "mask_tokens", lambda *a, **kw: real(*a, **{**kw, "mask_token_frac": 1.0}))
    with pytest.raises(AssertionError, match=r"\[MASK\] share 1\.000"):
        _run_parity()


def test_parity_catches_an_rtd_loss_averaged_over_padding(monkeypatch):
    real = modeling.rtd_loss_op
    monkeypatch.setattr(modeling, "rtd_loss_op", lambda logits, c, o, mask, **kw: real(logits, c, o, None, **kw))
    with pytest.raises(AssertionError, match="step 1 rtd: "):
        _run_parity()
