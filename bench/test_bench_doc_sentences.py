"""DOC-SENTENCES vs FULL-SENTENCES packing (#17): one ELECTRA-small pretraining step per --seq-len.

Documents: token lengths log-normal with median 200 (sigma 1.0), clipped to [8, 4096], seeded; random ordinary ids.
They are written as a token cache stream and read back by the pretraining job's own classes, so the rows are exactly
what ``electra-fast pretrain --packing ...`` trains on:
  full-sentences  (impl "full-sentences")  electra_fast.train.data.PackedSequences: the stream cut into rows across
                  documents, one [CLS] ... [SEP] per row, ordinary attention over the whole row
  doc-sentences   (impl "fused")           electra_fast.train.doc_sentences.DocumentRows: whole documents back to
                  back, each segment [CLS] ... [SEP], ``document_ids``: attention inside each document, positions
                  restarting (the packed varlen path)
Same model and initial weights, fused AdamW, B x T = 4096 token slots per step, the first rows of each layout.
tokens/s counts real tokens (doc-sentences rows may end in 1-2 padding slots); the bar is doc-sentences at most
10 % slower per token, i.e. its tokens/s >= 0.9 x full-sentences'.
"""
import numpy as np
import pytest
import torch

from conftest import QUICK, run
from electra_fast.models import ElectraConfig, ElectraPretrainingModel
from electra_fast.train.data import PackedSequences, WORD_START
from electra_fast.train.doc_sentences import DocumentRows

TOKENS = 4096
CFG = ElectraConfig.electra_small()
CLS, SEP, PAD = CFG.cls_token_id, CFG.sep_token_id, CFG.pad_token_id


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(np.exp(rng.normal(np.log(200), 1.0, 400))), 8, 4096).astype(np.int64)
    docs = [np.append(rng.integers(CFG.mask_token_id + 1, CFG.vocab_size, n), SEP) for n in lengths]
    path = tmp_path_factory.mktemp("doc_sentences") / "tokens.bin"
    (np.concatenate(docs).astype("<u4") | WORD_START).tofile(path)
    return str(path)


@pytest.mark.parametrize("impl", ["full-sentences", "fused"])
@pytest.mark.parametrize("dtype", ["fp32"] if QUICK else ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("t", [128] if QUICK else [128, 512])
def test_doc_sentences_step(benchmark, device, stream, t, dtype, impl):
    if device.type != "cpu":
        pytest.skip("document-masked rows run the packed Triton kernels, which have not run on a GPU yet")
    rows = (DocumentRows(stream, t, CLS, SEP, PAD) if impl == "fused" else PackedSequences(stream, t, CLS, SEP))
    b = TOKENS // t
    idx = list(range(b))
    ids, layout = rows.batch(idx).to(device), {k: v.to(device) for k, v in rows.layout(idx).items()}
    mask = layout.pop("attention_mask", None)
    real = ids.numel() if mask is None else int(mask.sum())
    torch.manual_seed(0)
    model = ElectraPretrainingModel(CFG).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != "fp32"):
            loss = model(ids, mask, seed=0, **layout).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    run(benchmark, step, device=device, op="pretrain_step[electra_small, documents median 200]",
        impl=impl, pass_="fwd+bwd+adamw", shape=f"{b}x{t}", dtype=dtype, tokens=real, rounds=2 if QUICK else 8,
        warmup=1 if QUICK else 2)  # the first two steps allocate (a third of a step more)
