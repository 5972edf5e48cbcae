"""DOC-SENTENCES packing (#17): rows of whole documents with attention masked at their boundaries.

Model layer: a row of several documents (``document_ids``) gives, at every document's tokens, exactly what each
document gives run alone (outputs and gradients, fp64; standard and disentangled attention, DeBERTa's enhanced mask
decoder, trailing padding, every CPU backend). Data layer: the rows hold every document token once, in stream order,
each segment ``[CLS] piece [SEP]``, no padding but 1-2 end slots. The job: ``--packing doc-sentences`` trains,
evaluates and resumes bit-identically; a resumed run cannot change the packing (test_recipes.py)."""
import numpy as np
import pytest
import torch

import electra_fast
from electra_fast.models import ElectraConfig, ElectraPretrainingModel
from electra_fast.models import modeling
from electra_fast.models.modeling import ElectraGenerator
from electra_fast.nn import packing
from electra_fast.nn.packing import document_positions, documents
from electra_fast.train import pretrain
from electra_fast.train.data import WORD_START
from electra_fast.train.doc_sentences import DocumentRows, document_bodies, layout
from test_train import _kw, _losses, env  # noqa: F401 (fixture)
from test_unpadded import _backbone

CLS, SEP, PAD = 2, 3, 0


def _row(lengths, pad=0, seed=0):
    """One row of documents of ``lengths`` (+ ``pad`` padded slots): ids, document_ids, attention mask, the docs."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(5, 100, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs + [torch.zeros(pad, dtype=torch.long)])[None]
    dids = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)] + [torch.full((pad,), len(lengths) - 1)])
    mask = (torch.arange(ids.shape[1]) < sum(lengths)).long()[None]
    return ids, dids[None].to(torch.int32), mask, docs


def test_document_positions_and_layout():
    dids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5], [1, 2, 1, 1, 7, 7]])
    assert document_positions(dids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 0, 1]]
    p = documents(dids)  # runs of equal ids, row by row: [3, 2, 1], [6], [1, 1, 2, 2]
    assert p.cu_seqlens.tolist() == [0, 3, 5, 6, 12, 13, 14, 16, 18] and p.max_seqlen == 6 and p.dense
    key = torch.ones(3, 6, dtype=torch.bool)
    key[0, 5:] = key[2, 3:] = False
    p = documents(dids, key)
    assert p.cu_seqlens.tolist() == [0, 3, 5, 11, 12, 13, 14] and p.index.numel() == 14 and not p.dense
    left = key.flip(1)
    with pytest.raises(ValueError, match="attention_mask: with document_ids, the real tokens must come first"):
        documents(dids, left)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("disentangled", [False, True], ids=["standard", "disentangled"])
@pytest.mark.parametrize("pad", [0, 2], ids=["full-row", "end-padding"])
def test_row_of_documents_equals_each_document_alone(disentangled, backend, pad):
    """fp64: outputs at every document's tokens and every gradient equal the sum over the documents run alone
    within fp64 summation-order rounding. A model attending across a boundary, or not restarting positions, moves
    the outputs by O(1e-2)."""
    net = _backbone(disentangled).eval()
    ids, dids, mask, docs = _row([7, 1, 12, 4], pad=pad)
    weight = torch.randn(ids.shape[1], 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with electra_fast.use_backend(backend):
        net.zero_grad(set_to_none=True)
        out = net(ids, mask if pad else None, None, dids)[0]
        n = sum(map(len, docs))
        (out[:n] * weight[:n]).sum().backward()
        packed_grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
        net.zero_grad(set_to_none=True)
        alone, start = [], 0
        for d in docs:
            o = net(d[None])[0]
            (o * weight[start:start + len(d)]).sum().backward()
            alone.append(o.detach())
            start += len(d)
    torch.testing.assert_close(out[:n].detach(), torch.cat(alone), rtol=1e-10, atol=1e-10)
    if pad:
        assert (out[n:] == 0).all()
    grads = {k: p.grad for k, p in net.named_parameters() if p.grad is not None}
    assert grads.keys() == packed_grads.keys() and len(grads) > 10
    for k in grads:
        torch.testing.assert_close(packed_grads[k], grads[k], rtol=1e-9, atol=1e-10, msg=k)


def test_enhanced_mask_decoder_rows_of_documents():
    """DeBERTa-v3's generator (EMD: absolute positions enter before the last layer) restarts them per document."""
    base = ElectraConfig.deberta_v3_xsmall()
    cfg = ElectraConfig.from_dict({
        **base.to_dict(), "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
        "intermediate_size": 64, "embedding_size": 32, "vocab_size": 100, "generator_hidden_size": 32,
        "generator_num_attention_heads": 2, "generator_intermediate_size": 32, "generator_num_hidden_layers": 2,
        "pad_token_id": 0, "unk_token_id": 1, "cls_token_id": 2, "sep_token_id": 3, "mask_token_id": 4})
    assert cfg.enhanced_mask_decoder
    torch.manual_seed(0)
    gen = ElectraGenerator(cfg).double().eval()
    ids, dids, mask, docs = _row([9, 3, 6], pad=1, seed=2)
    out = gen.encode(ids, mask, None, dids)[0]
    alone = torch.cat([gen.encode(d[None])[0] for d in docs])
    torch.testing.assert_close(out[:18], alone, rtol=1e-10, atol=1e-10)
    # without document_ids the same row is one sequence: the documents see each other
    assert (gen.encode(ids, mask)[0, :18] - alone).abs().max() > 1e-3


def _small_config(**kw) -> ElectraConfig:
    return ElectraConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, generator_hidden_size=16, generator_num_hidden_layers=1,
                         generator_num_attention_heads=1, generator_intermediate_size=32, max_position_embeddings=64,
                         pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4, **kw)


def test_pretraining_step_takes_document_ids():
    net = ElectraPretrainingModel(_small_config())
    ids, dids, mask, _ = _row([20, 11, 30], pad=2)
    out = net(ids, mask, seed=5, document_ids=dids)
    assert torch.isfinite(out.loss) and not out.masked[0, -2:].any()
    with pytest.raises(TypeError, match="document_ids: expected an int32 / int64 tensor"):
        net(ids, mask, seed=5, document_ids=dids.float())
    with pytest.raises(ValueError, match="document_ids"):
        net(ids, mask, seed=5, document_ids=dids[:, :-1])
    with pytest.raises(ValueError, match="attention_mask: with document_ids, the real tokens must come first"):
        net(ids, mask.flip(1), seed=5, document_ids=dids)


@pytest.mark.parametrize("disentangled", [False, True])
def test_pretraining_step_lays_documents_out_once(monkeypatch, disentangled):
    """The generator and the discriminator read one layout per step (its host syncs once), and the discriminator's
    logits are what it gives laying the documents out itself."""
    kw = (dict(attention="disentangled", position_biased_input=False, enhanced_mask_decoder=True,
               embedding_sharing="gdes", position_buckets=16) if disentangled else {})
    net = ElectraPretrainingModel(_small_config(**kw)).eval()  # no dropout: the two runs must agree exactly
    ids, dids, mask, _ = _row([20, 11, 30], pad=2)
    real, calls = packing.documents, []
    monkeypatch.setattr(packing, "documents", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = net(ids, mask, seed=5, document_ids=dids)
    assert len(calls) == 1
    monkeypatch.undo()
    with torch.no_grad():
        alone = net.discriminator(out.corrupted_ids, mask, None, dids)
    torch.testing.assert_close(out.discriminator_logits, alone, rtol=0, atol=0)
    # a batch without documents pays nothing for it: one key mask per model (each a host sync), none for a layout
    real_key, keys = modeling._key_mask, []
    monkeypatch.setattr(modeling, "_key_mask", lambda m: keys.append(1) or real_key(m))
    net(ids, mask, seed=5)
    assert len(keys) == 2


# ------------------------------------------------------------------------------------------ data
def _stream(tmp_path, lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(5, 100, n) for n in lengths]
    starts = [rng.random(n) < 0.6 for n in lengths]
    words = np.concatenate([np.append(d, SEP) for d in docs]).astype("<u4")
    bits = np.concatenate([np.append(s, True) for s in starts])
    path = tmp_path / "tokens.bin"
    (words | np.where(bits, WORD_START, np.uint32(0)).astype("<u4")).tofile(path)
    return str(path), docs, starts


@pytest.mark.parametrize("seq_len", [3, 4, 16, 37])
def test_rows_hold_every_document_token_once_in_order(tmp_path, seq_len):
    lengths = [1, 5, 40, 2, 17, 3, 3, 60, 1, 9, 14]
    path, docs, starts = _stream(tmp_path, lengths)
    rows = DocumentRows(path, seq_len, CLS, SEP, PAD)
    idx = list(range(len(rows)))
    ids, ws, lay = rows.batch(idx).numpy(), rows.word_starts(idx).numpy(), rows.layout(idx)
    dids = lay["document_ids"]
    mask = lay.get("attention_mask", torch.ones(ids.shape, dtype=torch.long)).numpy().astype(bool)
    assert (mask.sum(1) >= seq_len - 2).all() and (ids[~mask] == PAD).all()
    pieces, piece_starts = [], []
    for r in range(len(rows)):
        bounds = torch.nonzero(torch.diff(dids[r][mask[r]].long()), as_tuple=True)[0].tolist()
        for a, b in zip([0] + [x + 1 for x in bounds], [x + 1 for x in bounds] + [int(mask[r].sum())]):
            seg = ids[r, a:b]
            assert seg[0] == CLS and seg[-1] == SEP and b - a >= 3 and ws[r, a] and ws[r, b - 1]
            pieces.append(seg[1:-1])
            piece_starts.append(ws[r, a + 1:b - 1])
        assert (document_positions(dids[r:r + 1])[0][mask[r]].numpy()
                == np.concatenate([np.arange(n) for n in np.diff([0] + [x + 1 for x in bounds]
                                                                 + [int(mask[r].sum())])])).all()
    flat, want = np.concatenate(pieces), np.concatenate(docs)
    assert len(flat) <= len(want) and (flat == want[:len(flat)]).all()  # in order, none twice
    assert len(want) - len(flat) < seq_len  # only the last, partial row is left out
    assert (np.concatenate(piece_starts) == np.concatenate(starts)[:len(flat)]).all()


def test_layout_edges():
    starts, lengths = document_bodies(np.array([7, 3, 3, 8, 9, 3], dtype="<u4") | WORD_START, 3)
    assert starts.tolist() == [0, 3] and lengths.tolist() == [1, 2]  # the empty document between two [SEP]s dropped
    # a 10-token document in rows of 8: [CLS] 6 [SEP] | [CLS] 4 [SEP] + 2 padding slots (too few for a segment); the
    # 1-token document then opens row 2, which is not complete
    n, (row, off, start, length) = layout(np.array([0, 11]), np.array([10, 1]), 8)
    assert n == 2 and row.tolist() == [0, 1] and off.tolist() == [0, 0] and start.tolist() == [0, 6]
    assert length.tolist() == [6, 4]
    n, (row, off, start, length) = layout(np.array([0, 4]), np.array([3, 1]), 8)  # two documents fill one row
    assert n == 1 and row.tolist() == [0, 0] and off.tolist() == [0, 5] and length.tolist() == [3, 1]
    assert layout(np.array([0]), np.array([3]), 8)[0] == 0  # 3 slots left: room for a segment, not complete
    assert layout(np.array([0]), np.array([5]), 8)[0] == 1  # 1 slot left: complete (with one padding slot)


def test_pretrain_doc_sentences_trains_evaluates_and_resumes_exactly(env, tmp_path):  # noqa: F811
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    kw = dict(steps=6, save_every=3, keep=5, eval_every=3, recipe={"packing": "doc-sentences"})
    s = pretrain(env["data"], **_kw(env, straight, **kw))
    assert s["eval"]["eval_discriminator_auc"] > 0
    import shutil
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    pretrain(env["data"], **_kw(env, resumed, resume=True, **kw))
    a, b = _losses(straight), _losses(resumed)
    assert [a[i] for i in range(1, 7)] == [b[i] for i in range(1, 7)]
    # the packing matters: full-sentences rows of the same corpus give other losses
    pretrain(env["data"], **_kw(env, tmp_path / "full", steps=2))
    assert _losses(tmp_path / "full")[1] != a[1]
