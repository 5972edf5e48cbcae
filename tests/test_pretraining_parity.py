"""Reduced parity (#19): electra_fast's fused ElectraPretrainingModel against ELECTRA written from its definition on
transformers (tools/parity_report.py's ``TransformersPair``, which imports nothing from electra_fast but the weight
export), from the same initial weights, on the same padded batches, for a few dozen AdamW steps, for both layouts:
ELECTRA (ElectraForMaskedLM + ElectraForPreTraining, embedding layer shared) and DeBERTa-v3 (DebertaV2ForMaskedLM +
DebertaV2Model + RTD head, GDES: the discriminator reads stop_grad(E_G) + E_delta).

The random draws (which positions are selected, [MASK] / random / kept, the generator's samples) are the fused
model's, captured as it runs; the reference checks them against the definition (15% of the real tokens, never
special or padding; ELECTRA 85% [MASK] / 15% kept, DeBERTa 80% [MASK] / 10% random / 10% kept; only selected
positions replaced) and recomputes everything else itself: the MLM cross-entropy at the selected positions, labels
= corrupted != original, the RTD binary cross-entropy averaged over the real tokens only, loss = MLM + 50 RTD, the
gradients and the optimizer step. The test must be able to fail: ``test_parity_catches_*`` inject plausible bugs into
the fused model and require the comparison to reject them.
"""
import dataclasses
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from electra_fast.models import ElectraConfig, ElectraPretrainingModel
from electra_fast.models import modeling
from electra_fast.models.interop import export_state
from electra_fast.nn import embeddings as ef_embeddings
from test_train import _one_thread  # noqa: F401  (fixture: one torch thread; tiny shapes)

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import parity_report  # noqa: E402  (the independent side: tools/parity_report.py)

V, B, T, STEPS = 64, 4, 24, 30
MASK_PROB, DISC_WEIGHT = 0.15, 50.0  # ELECTRA's definition (not read from the model)
# [MASK] / random shares of the selected positions, by definition (not read from the model)
SHARES = {"electra": (0.85, 0.0), "deberta": (0.8, 0.1)}
IDS = dict(vocab_size=V, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4,
           max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _config(layout):
    if layout == "electra":
        return ElectraConfig(**IDS, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, generator_hidden_size=16, generator_num_hidden_layers=2,
                             generator_num_attention_heads=1, generator_intermediate_size=32)
    # the DeBERTa-v3 preset's layout, small; transformers has no Enhanced Mask Decoder
    return ElectraConfig.deberta_v3_layout(32, 2, 2, **IDS, generator_num_hidden_layers=1,
                                           enhanced_mask_decoder=False, position_buckets=8)


def _batch(g):
    """Packed-then-padded rows: [CLS] w... [SEP] [PAD]..., lengths 8..T; attention_mask int [B, T]."""
    ids = torch.randint(5, V, (B, T), generator=g)
    lengths = torch.randint(8, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 2
    ids[torch.arange(B), lengths - 1] = 3
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("layout", ("electra", "deberta"))
def test_the_report_masks_as_the_definition_says(layout):
    """tools/parity_report.py's own masking (its long runs draw their own): n = min(N, round(0.15 T)) per packed
    row, never [CLS] / [SEP] / [MASK] (the first report made them candidates), the layout's [MASK] / random shares."""
    cfg = _config(layout)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (400, T), generator=g)
    ids[:, 0], ids[:, -1], ids[:, T // 2] = 2, 3, 3  # [CLS] ... [SEP] (a document boundary) ... [SEP]
    out, sel = parity_report._mask(ids, parity_report.not_candidates(cfg), 4, *SHARES[layout], V, g)
    assert not (sel & (ids <= 4)).any(), "a special token was selected"
    assert (sel.sum(1) == min(int((MASK_PROB + 0.005) * T), round(T * MASK_PROB))).all()  # ELECTRA caps at N
    assert torch.equal(out[~sel], ids[~sel])
    n = int(sel.sum())
    is_mask = out[sel] == 4
    is_random = ~is_mask & (out[sel] != ids[sel])
    assert not (is_random & (out[sel] <= 4) & (out[sel] != 1)).any(), "a special random token"
    for count, p in ((int(is_mask.sum()), SHARES[layout][0]), (int(is_random.sum()), SHARES[layout][1])):
        assert abs(count / n - p) <= 3 * (p * (1 - p) / n) ** 0.5 + 1 / 60 * SHARES[layout][1]  # random == original


def _run_parity(layout="electra"):
    """Train both for STEPS steps; AssertionError at the first departure from the reference."""
    torch.manual_seed(0)
    net = ElectraPretrainingModel(_config(layout)).train()
    ref = parity_report.TransformersPair(net)
    assert ref.layout == layout
    opt_kw = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, foreach=False)
    opt_net, opt_ref = torch.optim.AdamW(net.parameters(), **opt_kw), torch.optim.AdamW(ref.parameters(), **opt_kw)
    captured = []
    net.generator.backbone.register_forward_hook(lambda mod, args, out: captured.append(args[0].clone()))
    g = torch.Generator().manual_seed(1)
    selected = real_candidates = masked_with_mask = masked_with_random = 0
    for step in range(STEPS):
        ids, mask = _batch(g)
        out = net(ids, mask, seed=1000 + step)
        gen_input, sel = captured.pop(), out.masked
        # the draws, against the definition
        special = (ids <= 4) | (mask == 0)
        assert not (sel & special).any(), "a special or padding position was selected"
        assert torch.equal(gen_input[~sel], ids[~sel]), "an unselected position was changed"
        is_mask = gen_input[sel] == 4
        is_random = ~is_mask & (gen_input[sel] != ids[sel])
        assert not (is_random & (gen_input[sel] <= 4) & (gen_input[sel] != 1)).any(), "a special random token"
        assert torch.equal(out.corrupted_ids[~sel], ids[~sel]), "the discriminator saw a changed unselected position"
        selected, masked_with_mask = selected + int(sel.sum()), masked_with_mask + int(is_mask.sum())
        masked_with_random += int(is_random.sum())
        real_candidates += int((~special).sum())
        # the losses, recomputed
        mlm = F.cross_entropy(ref.generate(gen_input, mask)[sel], ids[sel])
        real = mask.bool()
        labels = (out.corrupted_ids != ids).float()
        d_logits = ref.discriminate(out.corrupted_ids, mask)
        rtd = F.binary_cross_entropy_with_logits(d_logits[real], labels[real])
        loss = mlm + DISC_WEIGHT * rtd
        for name, ours, theirs in (("mlm", out.mlm_loss, mlm), ("rtd", out.rtd_loss, rtd), ("loss", out.loss, loss)):
            # fp32 throughout, sums in other orders: seen <= 4e-7 relative, 1e-5 leaves 25x room
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"step {step + 1} {name}: {m}")
        for opt, total in ((opt_net, out.loss), (opt_ref, loss)):
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
    # a share p of n selections has a standard deviation sqrt(p (1 - p) / n) (~290 selections: 2.1% at 0.85, 2.3% at
    # 0.8, 1.8% at 0.1); the bound is three of them (and 0 where the definition says 0: ELECTRA draws no random token)
    for what, count, p in (("[MASK]", masked_with_mask, SHARES[layout][0]), ("random", masked_with_random,
                                                                           SHARES[layout][1])):
        assert abs(count / selected - p) <= 3 * (p * (1 - p) / selected) ** 0.5, f"{what} share {count / selected:.3f}"
    assert abs(selected / real_candidates - MASK_PROB) < 0.03, f"selected share {selected / real_candidates:.3f}"
    theirs = ref.export()
    ours = {**{f"generator.{k}": v for k, v in export_state(net, "generator").items()},
            **{f"discriminator.{k}": v for k, v in export_state(net, "discriminator").items()}}
    for k, v in ours.items():
        # 30 Adam steps of fp32 rounding differences: seen <= 1.2e-7 absolute
        torch.testing.assert_close(v, theirs[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"after training, {k}: {m}")
    return selected


LAYOUTS = ("electra", "deberta")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_pretraining_matches_the_definition_on_transformers(layout):
    assert _run_parity(layout) > 250  # enough selections for the share checks to mean something


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_catches_masking_that_always_writes_mask(monkeypatch, layout):
    real = modeling.mask_tokens
    monkeypatch.setattr(modeling, "mask_tokens", lambda *a, **kw: real(*a, **{**kw, "mask_token_frac": 1.0,
                                                                            "random_token_frac": 0.0}))
    with pytest.raises(AssertionError, match=r"\[MASK\] share 1\.000"):
        _run_parity(layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_catches_an_rtd_loss_averaged_over_padding(monkeypatch, layout):
    real = modeling.rtd_loss_op
    monkeypatch.setattr(modeling, "rtd_loss_op", lambda logits, c, o, mask, **kw: real(logits, c, o, None, **kw))
    with pytest.raises(AssertionError, match="step 1 rtd: "):
        _run_parity(layout)


def test_parity_catches_gdes_that_lets_the_rtd_loss_reach_the_generator(monkeypatch):
    """GDES without the stop-gradient (the discriminator's loss trains E_G): step 1 agrees, the generator's next MLM
    loss does not."""
    monkeypatch.setattr(ef_embeddings.GDESEmbedding, "forward", lambda self, ids: (
        F.embedding(ids, self._base.weight, self.padding_idx) + F.embedding(ids, self.delta, self.padding_idx)))
    with pytest.raises(AssertionError, match="step 2 "):
        _run_parity("deberta")


@pytest.mark.parametrize("layout", ("electra", "deberta"))
def test_report_evaluates_fused_checkpoints_with_its_own_code(layout, tmp_path):
    """The report's fused curve: a checkpoint at every evaluation step, each evaluated by the independent side's
    held-out code (``eval_*``, one draw for both sides) next to the job's own numbers (``own_eval_*``); the
    transformers pair it evaluates holds that checkpoint's weights, not the initial ones."""
    from electra_fast.train import checkpoint as ckpt
    data = tmp_path / "corpus.txt"
    words = "the cat sat on a mat while dogs ran far away from big red houses".split()
    g = torch.Generator().manual_seed(0)
    data.write_text("\n\n".join(" ".join(words[int(i)] for i in torch.randint(len(words), (200,), generator=g))
                                for _ in range(60)) + "\n")
    model = tmp_path / "model.json"
    # the report's sequence length (128: the independent side packs the run's token cache at the job's default)
    dataclasses.replace(_config(layout), hidden_dropout_prob=0.1, max_position_embeddings=128).to_json_file(str(model))
    job = dict(data=[str(data)], model=str(model), vocab_size=V, batch_size=B, lr=3e-3, warmup=1)
    out = str(tmp_path / "run")
    curve = parity_report.train_fused(out, 0, 4, 2, "fp32", job, B)
    assert [r["step"] for r in curve] == [2, 4]
    for r in curve:
        for k in parity_report.METRICS:
            assert 0.0 <= r[k] <= 1.0 and 0.0 <= r["own_" + k] <= 1.0
    last = os.path.join(out, "checkpoints", "step-00000004")
    fused = ElectraPretrainingModel(ckpt.load_config(last))
    ckpt.load_model_state(fused, os.path.join(last, "model.safetensors"))
    fused.eval()
    ids = torch.randint(5, fused.config.vocab_size, (2, 128), generator=g)
    held = parity_report.Independent(out, 0, weights=last)
    init = parity_report.Independent(out, 0)
    for m in (held, init):
        m.pair.train(False)
    with torch.no_grad():
        want = fused.discriminator(ids)
        torch.testing.assert_close(held.pair.discriminate(ids), want, rtol=1e-4, atol=1e-5)  # fp32 reassociation
        assert not torch.allclose(init.pair.discriminate(ids), want, rtol=1e-4, atol=1e-5)


def test_report_verdict_tells_noise_from_a_shift():
    """judge(): runs of one distribution agree (misses within what a 3-seed band lets identical implementations
    have); the same runs shifted by a few run-to-run standard deviations differ."""
    g = torch.Generator().manual_seed(0)
    steps = list(range(100, 1300, 100))

    def runs(shift=0.0):
        return {str(s): [{"step": t, **{k: 0.5 + 0.01 * float(torch.randn((), generator=g)) + shift
                                          for k in parity_report.METRICS}} for t in steps] for s in range(3)}
    assert 0.12 < parity_report.chance_outside(3, draws=200_000) < 0.145  # normal noise, band of 3, widened
    independent = runs()
    _, same = parity_report.judge({"independent": independent, "fused_fp32": runs()}, warm=0)
    _, shifted = parity_report.judge({"independent": independent, "fused_fp32": runs(0.05)}, warm=0)
    assert same["fused_fp32 vs independent"]["agree"]
    assert not shifted["fused_fp32 vs independent"]["agree"]
    assert shifted["fused_fp32 vs independent"]["above"] == shifted["fused_fp32 vs independent"]["outside"]
    assert parity_report.allowed_outside(54, 0.133) == 11  # Binomial(54, 0.133): P(<= 11) >= 0.95 > P(<= 10)
