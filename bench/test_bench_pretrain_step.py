"""One full pretraining step (forward + backward + AdamW) of ELECTRA-small and DeBERTa-v3-xsmall.

Sides, same sizes / batch / optimizer (fused AdamW) / dropout:
  fused         ElectraPretrainingModel (fused ops, the backend serving the device)
  eager         the same model with fused=False (every op on its eager reference)
  transformers  ElectraForMaskedLM + ElectraForPreTraining (DebertaV2ForMaskedLM + DebertaV2Model with an
                ELECTRA-style RTD head) used as HF-based ELECTRA trainers use them: eager masking, full
                [B, T, V] generator logits, cross-entropy and Gumbel sampling at the masked rows, shared
                embeddings, loss = MLM + 50 x RTD.
fp32 and CPU bf16 autocast (bf16 autocast on CUDA).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import QUICK, run
from electra_fast.models import ElectraConfig, ElectraPretrainingModel
from electra_fast.models.interop import transformers_config

transformers = pytest.importorskip("transformers")

CASES = {"electra_small": (32, 128), "deberta_v3_xsmall": (8, 128)}
if QUICK:  # a smoke test of the plumbing: a quarter of the batch (CI time on any 2-core machine)
    CASES = {"electra_small": (8, 128)}


def _hf_models(cfg: ElectraConfig):
    g_cfg, d_cfg = transformers_config(cfg, "generator"), transformers_config(cfg, "discriminator")
    if cfg.disentangled:
        gen = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**g_cfg))
        disc = transformers.DebertaV2Model(transformers.DebertaV2Config(**d_cfg))
        # GDES-less sharing, as HF trainers do it: one word embedding module
        disc.embeddings.word_embeddings = gen.deberta.embeddings.word_embeddings
        head = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, 1))
    else:
        gen = transformers.ElectraForMaskedLM(transformers.ElectraConfig(**g_cfg))
        disc = transformers.ElectraForPreTraining(transformers.ElectraConfig(**d_cfg))
        disc.electra.embeddings = gen.electra.embeddings
        head = None
    return gen, disc, head


def _hf_step_fn(cfg, gen, disc, head, ids, mask):
    special = torch.tensor(cfg.special_token_ids, device=ids.device)

    def step():
        # eager "count" masking: rand + topk per row (the formulation the fused op replaces)
        cand = mask.bool() & ~torch.isin(ids, special)
        n = (cfg.mask_prob * mask.sum(1)).round().clamp(min=1).long()
        keys = torch.rand(ids.shape, device=ids.device).masked_fill(~cand, 2.0)
        rank = keys.argsort(1).argsort(1)
        masked = (rank < n[:, None]) & cand
        replace = masked & (torch.rand(ids.shape, device=ids.device) < cfg.mask_token_frac)
        gen_in = torch.where(replace, cfg.mask_token_id, ids)
        logits = gen(gen_in, attention_mask=mask).logits                  # [B, T, V]
        mlm_logits = logits[masked].float()
        mlm_loss = F.cross_entropy(mlm_logits, ids[masked])
        u = torch.rand_like(mlm_logits).clamp_(1e-9, 1.0)
        sampled = (mlm_logits.detach() / cfg.temperature - torch.log(-torch.log(u))).argmax(-1)
        corrupted = ids.masked_scatter(masked, sampled)
        if head is None:
            d_logits = disc(corrupted, attention_mask=mask).logits
        else:
            d_logits = head(disc(corrupted, attention_mask=mask).last_hidden_state).squeeze(-1)
        labels = (corrupted != ids).float()
        valid = mask.bool()
        rtd = F.binary_cross_entropy_with_logits(d_logits[valid].float(), labels[valid])
        return mlm_loss + cfg.disc_weight * rtd

    return step


def _batch(cfg, b, t):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(cfg.vocab_size, 30000), (b, t), generator=g)  # ordinary tokens (DeBERTa: < [MASK])
    ids[:, 0], ids[:, -1] = cfg.cls_token_id, cfg.sep_token_id
    mask = torch.ones(b, t, dtype=torch.long)
    mask[: b // 4, int(t * 0.8):] = 0  # a quarter of the rows padded, as in packed-with-remainder batches
    ids[mask == 0] = cfg.pad_token_id
    return ids, mask


def _step_fn(cfg, impl, ids, mask, dtype):
    """One optimizer step of ``impl`` ("fused" | "eager" | "transformers") on a fixed batch."""
    if impl == "transformers":
        gen, disc, head = _hf_models(cfg)
        modules = [m.to(ids.device) for m in [gen, disc] + ([head] if head is not None else [])]
        params = list({id(p): p for m in modules for p in m.parameters()}.values())
        for m in modules:
            m.train()
        forward = _hf_step_fn(cfg, gen, disc, head, ids, mask)
    else:
        model = ElectraPretrainingModel(cfg, fused=impl == "fused").to(ids.device).train()
        params = list(model.parameters())

        def forward():
            return model(ids, mask).loss
    # fused AdamW (one kernel over all parameters) on every side: what the library's trainer uses, and the
    # optimizer anyone would pick for a CPU step (the default per-parameter loop cost ~47 ms of a ~900 ms
    # ELECTRA-small bf16 step); the sides differ in the model, not in the optimizer
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=dtype != "fp32"):
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@pytest.mark.parametrize("impl", ["fused", "eager", "transformers"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("preset", list(CASES))
def test_pretrain_step(benchmark, device, preset, dtype, impl):
    if device.type != "cpu":
        pytest.skip("this benchmark runs the CPU step; the GPU step is benchmarked by the trainer")
    b, t = CASES[preset]
    cfg = getattr(ElectraConfig, preset)()
    torch.manual_seed(0)
    ids, mask = _batch(cfg, b, t)
    run(benchmark, _step_fn(cfg, impl, ids, mask, dtype), device=device, op=f"pretrain_step[{preset}]", impl=impl,
        pass_="fwd+bwd+adamw", shape=f"{b}x{t}", dtype=dtype, tokens=b * t, rounds=2 if QUICK else 5, warmup=1)


SCALING_TOKENS = 4096  # B x T held constant, so tokens/s compares sequence lengths at equal work per step


@pytest.mark.skipif(QUICK, reason="the sequence-length sweep is not part of --quick")
@pytest.mark.parametrize("impl", ["fused", "eager", "transformers"])
@pytest.mark.parametrize("t", [128, 256, 512, 1024, 2048])
def test_pretrain_step_scaling(benchmark, device, t, impl):
    """ELECTRA-small step vs sequence length (128 .. 2048, positions extended to 2048), fp32."""
    if device.type != "cpu":
        pytest.skip("this benchmark runs the CPU step")
    cfg = ElectraConfig.electra_small(max_position_embeddings=2048)
    torch.manual_seed(0)
    ids, mask = _batch(cfg, SCALING_TOKENS // t, t)
    run(benchmark, _step_fn(cfg, impl, ids, mask, "fp32"), device=device, op="pretrain_step[electra_small]",
        impl=impl, pass_="fwd+bwd+adamw (sweep)", shape=f"{SCALING_TOKENS // t}x{t}", dtype="fp32",
        tokens=SCALING_TOKENS, rounds=2, warmup=1)
