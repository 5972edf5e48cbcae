"""electra_fast.patch on transformers' BERT / RoBERTa / ELECTRA / DeBERTa-v2 classes: outputs and gradients equal the
unpatched model's (fp32 within 1e-5 of the output scale; bf16 autocast within DESIGN.md's low-precision criterion)
on padded batches with token types; the same Parameters and state_dict; unpatch gives back bit-identical results."""
import pytest
import torch

import electra_fast
from conftest import assert_low_precision

transformers = pytest.importorskip("transformers")

V, B, T = 101, 3, 12
FAMILIES = {  # family -> (config class, [model classes])
    "bert": ("BertConfig", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification",
                            "BertForTokenClassification", "BertForQuestionAnswering"]),
    "roberta": ("RobertaConfig", ["RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
                                  "RobertaForTokenClassification", "RobertaForQuestionAnswering"]),
    "electra": ("ElectraConfig", ["ElectraModel", "ElectraForMaskedLM", "ElectraForPreTraining",
                                  "ElectraForSequenceClassification", "ElectraForTokenClassification",
                                  "ElectraForQuestionAnswering"]),
    "deberta_v2": ("DebertaV2Config", ["DebertaV2Model", "DebertaV2ForMaskedLM", "DebertaV2ForSequenceClassification",
                                       "DebertaV2ForTokenClassification", "DebertaV2ForQuestionAnswering"]),
}
CASES = [pytest.param(f, c, id=c) for f, (_, classes) in FAMILIES.items() for c in classes]


def tiny_config(family: str, **kw):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=0, num_labels=3)
    if family == "electra":
        base.update(embedding_size=24)
    if family == "deberta_v2":
        base.update(relative_attention=True, position_buckets=8, max_relative_positions=64,
                    pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", position_biased_input=False)
    base.update(kw)
    return getattr(transformers, FAMILIES[family][0])(**base)


def build(family: str, cls_name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    if cls_name.endswith("QuestionAnswering"):
        kw.setdefault("num_labels", 2)  # start and end logits
    return getattr(transformers, cls_name)(tiny_config(family, **kw)).eval()


def batch(seed: int = 0):
    """Right-padded ids [B, T] (RoBERTa's position ids start after its pad id 0... any id > 0 is a token), mask,
    token types, MLM labels (-100 at padding and unmasked positions)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids = torch.randint(1, V, (B, T), generator=g) * mask
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 2:] = 1
    labels = torch.where((torch.rand(B, T, generator=g) < 0.4) & mask.bool(), ids, -100)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types * mask), labels


def _outputs(model, cls_name: str, inputs: dict, labels) -> list:
    """The tensors to compare, each restricted to real (non-padded) positions, and a scalar loss to differentiate."""
    real = inputs["attention_mask"].bool()
    if cls_name.endswith("ForMaskedLM"):
        return [model(**inputs, labels=labels).loss]
    if cls_name.endswith("ForTokenClassification"):
        out = model(**inputs, labels=torch.where(real, labels.clamp(min=0) % 3, -100))
        return [out.loss, out.logits[real]]
    if cls_name.endswith("ForSequenceClassification"):
        out = model(**inputs, labels=torch.tensor([0, 2, 1]))
        return [out.loss, out.logits]
    if cls_name.endswith("ForQuestionAnswering"):
        out = model(**inputs, start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([4, 5, 4]))
        return [out.loss, out.start_logits[real], out.end_logits[real]]
    if cls_name == "ElectraForPreTraining":
        out = model(**inputs, labels=(labels >= 0).long())
        return [out.loss, out.logits[real]]
    hidden = model(**inputs).last_hidden_state[real]
    w = torch.linspace(-1, 1, hidden.numel()).view_as(hidden)
    return [(hidden * w).sum(), hidden]


def _run(model, cls_name, inputs, labels):
    params = [p for p in model.parameters() if p.requires_grad]
    outs = _outputs(model, cls_name, inputs, labels)
    grads = torch.autograd.grad(outs[0], params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return [o.detach() for o in outs], grads


def _close(got, want, rel=1e-5):
    for a, b in zip(got, want):
        scale = b.abs().max().clamp(min=1e-30)
        assert (a - b).abs().max() <= rel * scale + 1e-7, f"max error {(a - b).abs().max():.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("family,cls_name", CASES)
def test_patched_matches_unpatched_fp32_and_unpatch_is_exact(family, cls_name):
    model = build(family, cls_name)
    inputs, labels = batch()
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {name: (type(vars(m)), sorted(vars(m))) for name, m in model.named_modules()}
    want_out, want_grads = _run(model, cls_name, inputs, labels)

    assert electra_fast.patch(model) is model and electra_fast.is_patched(model)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    patched_state = model.state_dict()
    assert list(patched_state) == list(state) and all(torch.equal(patched_state[k], v) for k, v in state.items())
    got_out, got_grads = _run(model, cls_name, inputs, labels)
    _close(got_out, want_out)
    _close(got_grads, want_grads)

    assert electra_fast.unpatch(model) is model and not electra_fast.is_patched(model)
    # every module as it was: its attributes, and a plain __dict__ (the patch's, which hides overrides from a strict
    # export, stayed after unpatch)
    assert {name: (type(vars(m)), sorted(vars(m))) for name, m in model.named_modules()} == attributes
    back_out, back_grads = _run(model, cls_name, inputs, labels)
    assert all(torch.equal(a, b) for a, b in zip(back_out, want_out))
    assert all(torch.equal(a, b) for a, b in zip(back_grads, want_grads))


@pytest.mark.parametrize("family,cls_name", [pytest.param(f, c[1], id=c[1]) for f, (_, c) in FAMILIES.items()])
def test_patched_bf16_autocast_meets_the_low_precision_criterion(family, cls_name):
    model = build(family, cls_name)
    inputs, labels = batch()
    exact = _run(model, cls_name, inputs, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _run(model, cls_name, inputs, labels)
        electra_fast.patch(model)
        got = _run(model, cls_name, inputs, labels)
    for g, lo, ex in zip(got, low, exact):
        assert_low_precision(g, lo, ex)


def test_mlm_head_option_keeps_full_logits():
    model = build("bert", "BertForMaskedLM")
    inputs, labels = batch()
    want = model(**inputs, labels=labels)
    electra_fast.patch(model, mlm_head=False)
    got = model(**inputs, labels=labels)
    real = inputs["attention_mask"].bool()
    assert got.logits.shape == (B, T, V)
    _close([got.loss, got.logits[real]], [want.loss, want.logits[real]])
    electra_fast.unpatch(model)
    electra_fast.patch(model)
    loss_only = model(**inputs, labels=labels)
    assert loss_only.logits is None  # [B, T, V] never built
    _close([loss_only.loss], [want.loss])
    as_tuple = model(**inputs, labels=labels, return_dict=False)
    _close([as_tuple[0]], [want.loss])
    no_labels = model(**inputs)  # no labels: transformers' head, full logits
    _close([no_labels.logits[real]], [want.logits[real]])
    # Review finding: patching again with mlm_head=False (the README's advice for a model from_pretrained patched)
    # left the installed head in place: logits None, without a word. That call's options now hold.
    electra_fast.patch(model, mlm_head=False)
    again = model(**inputs, labels=labels)
    assert again.logits.shape == (B, T, V) and electra_fast.is_patched(model)  # the other parts stay patched
    _close([again.loss, again.logits[real]], [want.loss, want.logits[real]])
    electra_fast.patch(model, attention=False, layer_norm=False, mlp=False, mlm_head=False)
    assert not electra_fast.is_patched(model)
    assert torch.equal(model(**inputs, labels=labels).logits, want.logits)  # transformers' computation, exactly


@pytest.mark.parametrize("family,cls_name", [("bert", "BertForMaskedLM"), ("deberta_v2", "DebertaV2ForMaskedLM")])
def test_mlm_labels_of_another_shape_are_named(family, cls_name):
    """Labels [B, T - 1]: transformers says the batch sizes differ; the patched loss-only head indexed the hidden
    states with them and raised torch's IndexError on a mask shape."""
    model = build(family, cls_name)
    inputs, labels = batch()
    labels = labels[:, 1:].contiguous()
    with pytest.raises(ValueError):
        model(**inputs, labels=labels)
    electra_fast.patch(model)
    with pytest.raises(ValueError, match=rf"^labels: expected one per token of input_ids \({B}, {T}\), got shape "
                                         rf"\({B}, {T - 1}\)$"):
        model(**inputs, labels=labels)


def test_optimizer_built_before_patching_trains_the_patched_model():
    inputs, labels = batch()
    losses = []
    for patched in (False, True):
        model = build("bert", "BertForMaskedLM").train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if patched:
            electra_fast.patch(model)
        for _ in range(3):
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(model(**inputs, labels=labels).loss.detach())
    _close([losses[1]], [losses[0]], rel=1e-4)  # three AdamW steps amplify fp32 rounding a little


def test_save_pretrained_is_identical(tmp_path):
    from safetensors.torch import load_file

    model = build("deberta_v2", "DebertaV2ForMaskedLM")
    model.save_pretrained(tmp_path / "plain")
    electra_fast.patch(model)
    model.save_pretrained(tmp_path / "patched")
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "patched" / "model.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "plain" / "config.json").read_text() == (tmp_path / "patched" / "config.json").read_text()
    reloaded = electra_fast.from_pretrained(transformers.AutoModelForMaskedLM, tmp_path / "patched")
    assert type(reloaded) is type(model) and electra_fast.is_patched(reloaded)
    inputs, labels = batch()
    _close([reloaded.eval()(**inputs, labels=labels).loss], [model(**inputs, labels=labels).loss])


def test_training_with_dropout_and_gradient_checkpointing():
    """Dropout on: the fused ops draw their masks from torch's generator, so a seeded step is reproducible, and
    gradient checkpointing (which replays the forward under the saved RNG state) gives the same gradients."""
    inputs, labels = batch()
    grads = []
    for checkpointing in (False, True):
        model = build("bert", "BertForMaskedLM", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
        electra_fast.patch(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0])
