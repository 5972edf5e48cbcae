"""Unpadded encoder batches (#17): an ELECTRA-small discriminator train step on GLUE-like padded batches.

Lengths: log-normal with median 30 tokens (sigma 0.6), clipped to [4, 128], 32 sequences, seeded; every batch is
padded to 128 (a fixed-length collator). Sides, same config / initial weights / fused AdamW, loss = BCE of the
per-token logits at the real tokens:
  fused          electra_fast's discriminator: the encoder runs the real tokens only (electra_fast.nn.packing)
  fused-padded   the same model with ELECTRA_FAST_NO_UNPAD=1 (every layer on the padded [32, 128] batch)
  transformers   ElectraForPreTraining on the padded batch
tokens/s counts real tokens.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, run
from test_bench_finetune import glue_like_lengths  # the same length distribution as the fine-tuning rows
from electra_fast.models import ElectraConfig
from electra_fast.models.interop import transformers_config
from electra_fast.models.modeling import ElectraDiscriminator

transformers = pytest.importorskip("transformers")

BATCH, T = (8, 128) if QUICK else (32, 128)


@pytest.mark.parametrize("impl", ["fused", "fused-padded", "transformers"])
@pytest.mark.parametrize("dtype", ["fp32"] if QUICK else ["fp32", "bf16-autocast"])
def test_unpadded_discriminator_step(benchmark, device, monkeypatch, dtype, impl):
    if device.type != "cpu":
        pytest.skip("the unpadded path is CPU-only for now (the packed Triton kernels have not run on a GPU)")
    if impl == "fused-padded":
        monkeypatch.setenv("ELECTRA_FAST_NO_UNPAD", "1")
    cfg = ElectraConfig.electra_small()
    lengths = glue_like_lengths(BATCH)
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(T) < torch.from_numpy(lengths)[:, None]).long()
    ids = torch.randint(5, cfg.vocab_size, (BATCH, T), generator=g) * mask
    labels = (torch.rand(BATCH, T, generator=g) < 0.15).float()
    torch.manual_seed(0)
    if impl == "transformers":
        hf_config = transformers.ElectraConfig(**transformers_config(cfg, "discriminator"))
        model = transformers.ElectraForPreTraining(hf_config)

        def logits():
            return model(input_ids=ids, attention_mask=mask).logits
    else:
        model = ElectraDiscriminator(cfg)

        def logits():
            return model(ids, mask)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    real = mask.bool()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "fp32"):
            out = logits()
        loss = F.binary_cross_entropy_with_logits(out.float()[real], labels[real])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    run(benchmark, step, device=device, op="discriminator_step[electra_small, glue-like padded to 128]", impl=impl,
        pass_="fwd+bwd+adamw", shape=f"{BATCH}x{T}", dtype=dtype, tokens=int(lengths.sum()),
        rounds=2 if QUICK else 5, warmup=1)
