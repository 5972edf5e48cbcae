"""electra_fast.patch: what it cannot serve runs transformers' code for that call (same answer as unpatched), or raises
a ValueError naming it under strict=True; bad arguments; the top-level names; the class-level form."""
import pytest
import torch

import electra_fast
from electra_fast.integrations.transformers import layers
from test_patch_parity import V, batch, build

transformers = pytest.importorskip("transformers")


def _loss(model, inputs, labels):
    return model(**inputs, labels=labels).loss


def test_output_attentions_falls_back_or_raises_under_strict():
    for family, cls_name in (("bert", "BertForMaskedLM"), ("deberta_v2", "DebertaV2ForMaskedLM")):
        model = build(family, cls_name, attn_implementation="eager")
        inputs, labels = batch()
        want = model(**inputs, output_attentions=True)
        electra_fast.patch(model)
        got = model(**inputs, output_attentions=True)
        assert len(got.attentions) == 2 and torch.equal(got.attentions[0], want.attentions[0])  # same embeddings
        torch.testing.assert_close(got.attentions[1], want.attentions[1], rtol=0, atol=1e-6)  # after fused add-norms
        electra_fast.unpatch(model)
        electra_fast.patch(model, strict=True)
        model(**inputs, labels=labels)  # a servable call
        with pytest.raises(ValueError, match="output_attentions"):
            model(**inputs, output_attentions=True)


def test_unsupported_attention_implementation_falls_back():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def custom(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("electra_fast_test_custom", custom)
    model = build("bert", "BertForSequenceClassification", attn_implementation="electra_fast_test_custom")
    inputs, _ = batch()
    want = model(**inputs).logits
    attention = model.bert.encoder.layer[0].attention.self
    with pytest.raises(ValueError, match="electra_fast_test_custom"):
        electra_fast.patch(model, strict=True)
    assert not electra_fast.is_patched(model)  # strict refuses before changing anything
    electra_fast.patch(model)  # the attention stays transformers' (the rest is patched)
    assert "forward" not in vars(attention) and electra_fast.is_patched(model)
    calls.clear()
    torch.testing.assert_close(model(**inputs).logits, want, rtol=0, atol=1e-5)
    assert len(calls) == 2  # transformers' attention, in both layers
    electra_fast.unpatch(model)
    model.config._attn_implementation = "sdpa"
    electra_fast.patch(model)
    assert "forward" in vars(attention)
    model.config._attn_implementation = "electra_fast_test_custom"  # changed after patching: checked per call
    calls.clear()
    torch.testing.assert_close(model(**inputs).logits, want, rtol=0, atol=1e-5)
    assert len(calls) == 2
    electra_fast.unpatch(model)
    assert torch.equal(model(**inputs).logits, want)


def test_unsupported_configurations_are_left_to_transformers_or_named_under_strict():
    inputs, labels = batch()
    relu = build("bert", "BertForMaskedLM", hidden_act="relu")
    want = _loss(relu, inputs, labels)
    with pytest.raises(ValueError, match="mlp: the feed-forward activation ReLU"):
        electra_fast.patch(relu, strict=True)
    electra_fast.patch(relu)  # attention, add-norm and head patched; the ReLU MLP stays transformers'
    assert "feed_forward_chunk" not in vars(relu.bert.encoder.layer[0])
    assert "forward" in vars(relu.bert.encoder.layer[0].output)
    torch.testing.assert_close(_loss(relu, inputs, labels), want, rtol=1e-5, atol=0)

    decoder = build("bert", "BertLMHeadModel", is_decoder=True)
    ids = inputs["input_ids"]
    want = decoder(input_ids=ids).logits
    with pytest.raises(ValueError, match="decoder"):
        electra_fast.patch(decoder, strict=True)
    electra_fast.patch(decoder)
    assert "forward" not in vars(decoder.bert.encoder.layer[0].attention.self)
    torch.testing.assert_close(decoder(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_masks_that_are_not_padding_masks_are_not_served():
    B, T = 2, 4
    keys = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    ok, km = layers.padding_key_mask(keys[:, None, None, :].expand(B, 1, T, T), B, T)
    assert ok and torch.equal(km, keys)
    additive = torch.zeros(B, 1, T, T).masked_fill(~keys[:, None, None, :], torch.finfo(torch.float32).min)
    ok, km = layers.padding_key_mask(additive, B, T)
    assert ok and torch.equal(km, keys)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    assert layers.padding_key_mask(causal, B, T) == (False, None)
    assert layers.padding_key_mask(additive + 0.5, B, T) == (False, None)  # a bias, not a mask
    assert layers.padding_key_mask(keys.long()[:, None, None, :], B, T) == (False, None)
    assert layers.padding_key_mask(None, B, T) == (True, None)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="model"):
        electra_fast.patch("bert")
    with pytest.raises(ValueError, match="model: expected a transformers BERT"):
        electra_fast.patch(torch.nn.Linear(2, 2))
    model = build("bert", "BertModel")
    with pytest.raises(TypeError, match="mlp"):
        electra_fast.patch(model, mlp=1)
    with pytest.raises(TypeError, match="strict"):
        electra_fast.patch(model, strict="yes")
    assert not electra_fast.is_patched(model)
    with pytest.raises(TypeError, match="model_class"):
        electra_fast.from_pretrained("bert-base-uncased")
    with pytest.raises(TypeError, match="layer_norm"):
        electra_fast.apply_to_transformers(layer_norm=None)


def test_options_select_what_is_replaced_and_patching_again_adds_the_rest():
    model = build("roberta", "RobertaForMaskedLM")
    electra_fast.patch(model, attention=False, layer_norm=False, mlp=False, mlm_head=True)
    layer = model.roberta.encoder.layer[0]
    assert not any("forward" in vars(m) for m in (layer.attention.self, layer.attention.output, layer.output))
    assert "forward" in vars(model)
    head_forward = vars(model)["forward"]
    electra_fast.patch(model)  # again: installs what is missing, nothing twice
    assert vars(model)["forward"] is head_forward
    assert all("forward" in vars(m) for m in (layer.attention.self, layer.attention.output, layer.output))
    assert "feed_forward_chunk" in vars(layer)
    electra_fast.unpatch(model)
    electra_fast.unpatch(model)  # unpatching an unpatched model changes nothing
    assert not electra_fast.is_patched(model) and not any("_electra_fast_strict" in vars(m) for m in model.modules())


def test_apply_to_transformers_patches_models_built_later():
    from transformers import BertForMaskedLM

    inputs, labels = batch()
    plain = build("bert", "BertForMaskedLM")
    want = _loss(plain, inputs, labels)
    electra_fast.apply_to_transformers()
    try:
        built = build("bert", "BertForMaskedLM")
        assert electra_fast.is_patched(built) and "forward" in vars(built)
        torch.testing.assert_close(_loss(built, inputs, labels), want, rtol=1e-5, atol=0)
        electra_fast.apply_to_transformers(mlm_head=False)  # again: the new options replace the old
        assert "forward" not in vars(build("bert", "BertForMaskedLM"))
    finally:
        electra_fast.remove_from_transformers()
    assert "post_init" not in vars(transformers.models.bert.modeling_bert.BertPreTrainedModel)
    assert not electra_fast.is_patched(BertForMaskedLM(plain.config))


def test_apply_to_transformers_under_from_pretrained(tmp_path):
    """Models loaded by from_pretrained are patched at construction (meta / empty weights), then loaded: the
    patched modules read the loaded Parameters."""
    plain = build("deberta_v2", "DebertaV2ForMaskedLM")
    plain.save_pretrained(tmp_path)
    inputs, labels = batch()
    want = _loss(plain, inputs, labels)
    electra_fast.apply_to_transformers()
    try:
        loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    finally:
        electra_fast.remove_from_transformers()
    assert electra_fast.is_patched(loaded) and "forward" in vars(loaded)
    torch.testing.assert_close(_loss(loaded, inputs, labels), want, rtol=1e-5, atol=0)
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_top_level_names_load_lazily():
    from electra_fast.integrations.transformers import patching

    for name in ("patch", "unpatch", "is_patched", "from_pretrained", "apply_to_transformers",
                 "remove_from_transformers"):
        assert getattr(electra_fast, name) is getattr(patching, name) and name in electra_fast.__all__
    assert V == 101  # the shared tiny vocabulary of test_patch_parity
