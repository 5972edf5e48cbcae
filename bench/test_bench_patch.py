"""A training step of transformers models, patched by ``electra_fast.patch`` vs as transformers builds them.

Sides, same model (same seed, same weights), batch, dropout (the configs' 0.1) and optimizer (fused AdamW):
  fused         ``electra_fast.patch(model)``: fused attention / add-norm / GELU MLP; MaskedLM loss-only head
  transformers  the unpatched model (sdpa attention, full [B, T, V] logits + cross-entropy)
Models: BertForMaskedLM (H 512, 4 layers, V 30522), RobertaForMaskedLM (same, V 50265), ElectraForPreTraining
(ELECTRA-small discriminator), DebertaV2ForMaskedLM (DeBERTa-v3-xsmall, V 128100). Batches are packed (no padding),
15 % of the positions labelled (MLM) / replaced-token labels on every token (ELECTRA). fp32 and CPU bf16 autocast.

The issue's shape is B 32 x T 128 (``ELECTRA_FAST_BENCH_PATCH_BATCH`` sets B; slow on 2 cores: B 8 fits). The quick
bench (CI) runs one small BERT row only.
"""
import os

import pytest
import torch

from conftest import QUICK, run

transformers = pytest.importorskip("transformers")
import electra_fast  # noqa: E402

BATCH = int(os.environ.get("ELECTRA_FAST_BENCH_PATCH_BATCH", "32"))
T = 128
MODELS = {  # name -> (model class, config class, config)
    "bert_mlm": ("BertForMaskedLM", "BertConfig", dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                                       intermediate_size=2048, vocab_size=30522)),
    "roberta_mlm": ("RobertaForMaskedLM", "RobertaConfig",
                    dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048,
                         vocab_size=50265, max_position_embeddings=514, pad_token_id=1)),
    "electra_small_rtd": ("ElectraForPreTraining", "ElectraConfig",
                          dict(embedding_size=128, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                               intermediate_size=1024, vocab_size=30522)),
    "deberta_v3_xsmall_mlm": ("DebertaV2ForMaskedLM", "DebertaV2Config",
                              dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                   intermediate_size=1536, vocab_size=128100, relative_attention=True,
                                   position_buckets=256, max_relative_positions=-1, max_position_embeddings=512,
                                   pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
                                   position_biased_input=False, type_vocab_size=0)),
}
if QUICK:  # a smoke test of the plumbing, never the full sizes
    MODELS = {"bert_mlm": ("BertForMaskedLM", "BertConfig",
                           dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                                vocab_size=30522))}
    BATCH = 4


def _inputs(name: str, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (BATCH, T), generator=g)
    mask = torch.ones(BATCH, T, dtype=torch.long)
    if name.endswith("_rtd"):
        labels = (torch.rand(BATCH, T, generator=g) < 0.15).long()
    else:
        labels = torch.where(torch.rand(BATCH, T, generator=g) < 0.15, ids, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _step_fn(name: str, impl: str, dtype: str):
    cls_name, config_name, config = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(transformers, config_name)(**config)).train()
    if impl == "fused":
        electra_fast.patch(model)
    inputs = _inputs(name, config["vocab_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the same optimizer on both sides

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "fp32"):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@pytest.mark.parametrize("impl", ["fused", "transformers"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", list(MODELS))
def test_patch_train_step(benchmark, device, name, dtype, impl):
    if device.type != "cpu":
        pytest.skip("this benchmark runs the CPU step")
    run(benchmark, _step_fn(name, impl, dtype), device=device, op=f"patch_train_step[{name}]", impl=impl,
        pass_="fwd+bwd+adamw", shape=f"{BATCH}x{T}", dtype=dtype, tokens=BATCH * T, rounds=2, warmup=1)
