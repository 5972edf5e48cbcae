"""Fine-tuning: one sequence-classification train step and evaluation throughput, ELECTRA-small.

Lengths follow a GLUE-like distribution: log-normal with median 30 tokens (sigma 0.6), clipped to [4, 128],
seeded. Sides, same config / weights init / dtype / fused AdamW:
  fused         electra_fast.finetune's model (fused modules); evaluation sorts rows by length first, as
                ``finetune.trainer.predict`` does
  transformers  ElectraForSequenceClassification; evaluation in the given order
Every batch is padded to its own longest row on both sides (transformers' DataCollatorWithPadding). tokens/s
counts real (unpadded) tokens.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, run
from electra_fast.finetune.model import FinetuneModel
from electra_fast.models import ElectraConfig
from electra_fast.models.interop import transformers_config

transformers = pytest.importorskip("transformers")

TRAIN_BATCH = 8 if QUICK else 32
EVAL_ROWS, EVAL_BATCH = 512, 128
DTYPES = ["fp32"] if QUICK else ["fp32", "bf16-autocast"]  # --quick (CI): the plumbing, one pair of rows


def glue_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(np.exp(rng.normal(np.log(30), 0.6, n))), 4, 128).astype(np.int64)


def _padded(lengths, vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths.tolist()):
        ids[r, :n] = torch.randint(5, vocab, (n,), generator=g)
        ids[r, 0], ids[r, n - 1] = 2, 3
        mask[r, :n] = 1
    return ids, mask


def _models(cfg):
    ours = FinetuneModel(cfg, "classification", 2)
    hf_cfg = transformers.ElectraConfig(**{**transformers_config(cfg, "discriminator"), "num_labels": 2})
    theirs = transformers.ElectraForSequenceClassification(hf_cfg)
    return {"fused": (ours, lambda m, i, a: m(i, a)),
            "transformers": (theirs, lambda m, i, a: m(input_ids=i, attention_mask=a).logits)}


@pytest.mark.parametrize("impl", ["fused", "transformers"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_finetune_train_step(benchmark, device, dtype, impl):
    cfg = ElectraConfig.electra_small()
    torch.manual_seed(0)
    lengths = glue_like_lengths(TRAIN_BATCH)
    ids, mask = (t.to(device) for t in _padded(lengths, cfg.vocab_size))
    labels = torch.randint(0, 2, (TRAIN_BATCH,), device=device)
    model, forward = _models(cfg)[impl]
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != "fp32"):
            loss = F.cross_entropy(forward(model, ids, mask).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    run(benchmark, step, device=device, op="finetune_step[electra_small, glue-like]", impl=impl,
        pass_="fwd+bwd+adamw", shape=f"{TRAIN_BATCH}x<=128", dtype=dtype, tokens=int(lengths.sum()),
        rounds=2 if QUICK else 5, warmup=1)


@pytest.mark.skipif(QUICK, reason="evaluation throughput is not part of --quick")
@pytest.mark.parametrize("impl", ["fused", "transformers"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16-autocast"])
def test_finetune_eval(benchmark, device, dtype, impl):
    cfg = ElectraConfig.electra_small()
    torch.manual_seed(0)
    lengths = glue_like_lengths(EVAL_ROWS, seed=2)
    order = np.argsort(lengths, kind="stable") if impl == "fused" else np.arange(EVAL_ROWS)
    batches = [_padded(lengths[order[s:s + EVAL_BATCH]], cfg.vocab_size) for s in range(0, EVAL_ROWS, EVAL_BATCH)]
    batches = [(i.to(device), a.to(device)) for i, a in batches]
    model, forward = _models(cfg)[impl]
    model = model.to(device).eval()

    @torch.no_grad()
    def evaluate():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != "fp32"):
            return [forward(model, i, a).argmax(-1) for i, a in batches]

    run(benchmark, evaluate, device=device, op="finetune_eval[electra_small, glue-like]", impl=impl,
        pass_="forward (no_grad)", shape=f"{EVAL_ROWS} rows / batch {EVAL_BATCH}", dtype=dtype,
        tokens=int(lengths.sum()), rounds=5, warmup=1)
