"""transformers checkpoint interop: from_transformers / save_pretrained / from_pretrained, both directions,
against randomly initialised transformers models (fp32, atol 1e-5 on valid positions)."""
import json
import logging
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from electra_fast.models import ElectraConfig, ElectraPretrainingModel  # noqa: E402
from electra_fast.models.interop import CheckpointError  # noqa: E402

V = 120
IDS = dict(cls_token_id=1, sep_token_id=2, mask_token_id=3, unk_token_id=4)
ATOL = 1e-5  # fp32 end to end; GDES import (E_D - E_G) + E_G adds ~1 ulp to the embeddings


@pytest.fixture(autouse=True, scope="module")
def _quiet_and_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)
    torch.set_num_threads(n)


def _electra_pair(seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, embedding_size=16, max_position_embeddings=64, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
    g = transformers.ElectraForMaskedLM(transformers.ElectraConfig(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, **kw)).eval()
    d = transformers.ElectraForPreTraining(transformers.ElectraConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **kw)).eval()
    return g, d


def _deberta_pair(seed=0, legacy=False, share_att_key=True, pos_att_type=("p2c", "c2p")):
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              relative_attention=True, position_buckets=8, max_relative_positions=64, pos_att_type=list(pos_att_type),
              share_att_key=share_att_key, norm_rel_ebd="layer_norm", position_biased_input=False,
              type_vocab_size=0, layer_norm_eps=1e-7, legacy=legacy, hidden_act="gelu")
    g = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **kw)).eval()
    d = transformers.DebertaV2Model(transformers.DebertaV2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **kw)).eval()
    return g, d


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, V, (3, 19), generator=g)
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, 11:] = 0
    return ids, mask


def _save(tmp_path, g, d, **kw):
    g.save_pretrained(tmp_path / "gen", **kw)
    d.save_pretrained(tmp_path / "disc", **kw)
    return tmp_path / "gen", tmp_path / "disc"


def _close_valid(a, b, mask):
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=ATOL)


def _disc_out(d, ids, mask):
    out = d(ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _ours_disc(model, ids, mask):
    if model.config.disentangled:
        return model.discriminator.backbone(ids, mask)
    return model.discriminator(ids, mask)


@pytest.mark.parametrize("sharing", ["tied", "none"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_electra_from_transformers(tmp_path, sharing, safe):
    g, d = _electra_pair()
    if sharing == "tied":  # real ELECTRA checkpoints carry the same (shared) embeddings in both
        d.electra.embeddings.load_state_dict(g.electra.embeddings.state_dict())
    gp, dp = _save(tmp_path, g, d, safe_serialization=safe)
    model = ElectraPretrainingModel.from_transformers(gp, dp, embedding_sharing=sharing, **IDS).eval()
    assert model.config.embedding_sharing == sharing and model.config.generator_hidden_size == 24
    ids, mask = _inputs()
    with torch.no_grad():
        # generator logits at the masked positions (the only ones a step projects) and everywhere valid
        out = model(ids, mask, seed=0)
        hf_logits = g(ids, attention_mask=mask).logits
        ours = model.generator.logits(ids, mask)
        _close_valid(ours, hf_logits, mask)
        masked_in = model.generator.logits(out.corrupted_ids.masked_fill(out.masked, 3), mask)
        hf_masked = g(out.corrupted_ids.masked_fill(out.masked, 3), attention_mask=mask).logits
        torch.testing.assert_close(masked_in[out.masked], hf_masked[out.masked], rtol=0, atol=ATOL)
        _close_valid(_ours_disc(model, ids, mask), _disc_out(d, ids, mask), mask)


def test_electra_tied_with_different_embeddings_warns(tmp_path):
    g, d = _electra_pair()
    gp, dp = _save(tmp_path, g, d)
    with pytest.warns(UserWarning, match="different"):
        model = ElectraPretrainingModel.from_transformers(gp, dp, **IDS)
    torch.testing.assert_close(model.generator.word_embeddings.weight, d.electra.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("share_att_key, pos_att_type", [(True, ("p2c", "c2p")), (False, ("c2p",)),
                                                         (False, ("p2c", "c2p"))])
def test_deberta_from_transformers(tmp_path, legacy, share_att_key, pos_att_type):
    g, d = _deberta_pair(legacy=legacy, share_att_key=share_att_key, pos_att_type=pos_att_type)
    gp, dp = _save(tmp_path, g, d)
    with pytest.warns(UserWarning, match="fresh initialisation"):  # DebertaV2Model holds no RTD head
        model = ElectraPretrainingModel.from_transformers(gp, dp, vocab_size=V, mask_token_id=100).eval()
    assert model.config.embedding_sharing == "gdes" and model.config.attention == "disentangled"
    ids, mask = _inputs()
    with torch.no_grad():
        _close_valid(model.generator.logits(ids, mask), g(ids, attention_mask=mask).logits, mask)
        _close_valid(model.discriminator.backbone(ids, mask), d(ids, attention_mask=mask).last_hidden_state, mask)
        assert torch.isfinite(model(ids, mask, seed=0).loss)


def test_deberta_default_special_ids_outside_the_vocabulary_are_one_line(tmp_path):
    """DeBERTa-v3's [MASK] id 128000 over a smaller vocabulary: the message named only the id's range, not that the
    default came from the layout and the tokenizer's ids are to be passed."""
    from electra_fast.models.interop import CheckpointError
    gp, dp = _save(tmp_path, *_deberta_pair())
    with pytest.raises(CheckpointError, match=r"^mask_token_id: the layout's default 128000 is outside this model's "
                                              r"vocabulary \(\d+ tokens\).*pass the tokenizer's ids"):
        ElectraPretrainingModel.from_transformers(gp, dp)


@pytest.mark.parametrize("kind", ["electra", "electra-no-token-types", "deberta"])
def test_save_pretrained_loads_in_transformers(tmp_path, kind):
    if kind.startswith("electra"):  # type_vocab_size 0: our embeddings keep one row, so the export says 1
        cfg = ElectraConfig(vocab_size=V, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, generator_hidden_size=16,
                            generator_num_hidden_layers=2, generator_num_attention_heads=2,
                            generator_intermediate_size=32, max_position_embeddings=64,
                            type_vocab_size=0 if kind == "electra-no-token-types" else 2, **IDS)
    else:
        cfg = ElectraConfig.deberta_v3_xsmall(vocab_size=V, mask_token_id=100, hidden_size=32, embedding_size=32,
                                              generator_hidden_size=32, num_attention_heads=4,
                                              generator_num_attention_heads=2, intermediate_size=64,
                                              generator_intermediate_size=64, num_hidden_layers=2,
                                              generator_num_hidden_layers=1, position_buckets=8,
                                              max_position_embeddings=64,
                                              enhanced_mask_decoder=False)  # transformers has no EMD
    torch.manual_seed(0)
    model = ElectraPretrainingModel(cfg).eval()
    with torch.no_grad():  # break the zero-init symmetry so the export has something to get wrong
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["discriminator", "electra_fast.json", "generator"]
    ids, mask = _inputs()
    if kind.startswith("electra"):
        g = transformers.ElectraForMaskedLM.from_pretrained(tmp_path / "ckpt" / "generator").eval()
        d = transformers.ElectraForPreTraining.from_pretrained(tmp_path / "ckpt" / "discriminator").eval()
    else:
        g = transformers.DebertaV2ForMaskedLM.from_pretrained(tmp_path / "ckpt" / "generator").eval()
        d = transformers.DebertaV2Model.from_pretrained(tmp_path / "ckpt" / "discriminator").eval()
        # GDES is exported materialised: E_D = E_G + E_delta
        emb = model.discriminator.backbone.embeddings.word_embeddings
        torch.testing.assert_close(d.embeddings.word_embeddings.weight, emb.weight.detach(), rtol=0, atol=0)
    with torch.no_grad():
        _close_valid(g(ids, attention_mask=mask).logits, model.generator.logits(ids, mask), mask)
        _close_valid(_disc_out(d, ids, mask), _ours_disc(model, ids, mask), mask)
    # and back: from_pretrained restores every parameter and the full config
    back = ElectraPretrainingModel.from_pretrained(tmp_path / "ckpt").eval()
    assert back.config == cfg
    for (n, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask, seed=1).loss, model(ids, mask, seed=1).loss, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ bad checkpoints
def test_missing_directory_and_files(tmp_path):
    g, d = _electra_pair()
    gp, dp = _save(tmp_path, g, d)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ElectraPretrainingModel.from_transformers(tmp_path / "nope", dp, **IDS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ElectraPretrainingModel.from_transformers(gp, tmp_path / "empty", **IDS)
    os.remove(dp / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ElectraPretrainingModel.from_transformers(gp, dp, **IDS)
    with pytest.raises(FileNotFoundError, match="electra_fast.json"):
        ElectraPretrainingModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("name, data", [("model.safetensors", b""), ("model.safetensors", b"\x10" + b"\x00" * 7 + b"{"),
                                        ("pytorch_model.bin", b"not a pickle" * 8), ("pytorch_model.bin", b"PK\x03\x04")])
def test_unreadable_weights_are_a_checkpoint_error(tmp_path, name, data):
    """A truncated or foreign weights file is a CheckpointError (a ValueError) naming it: every command that reads
    transformers folders (--init-from, finetune --model) turns that into one line; safetensors' own error and
    torch.load's KeyError / UnpicklingError escaped them as tracebacks (found by tools/sweep.py)."""
    g, d = _electra_pair()
    gp, dp = _save(tmp_path, g, d)
    os.remove(dp / "model.safetensors")
    (dp / name).write_bytes(data)
    with pytest.raises(CheckpointError, match=f"{name} is not a readable weights file") as e:
        ElectraPretrainingModel.from_transformers(gp, dp, **IDS)
    assert "weights_only" not in str(e.value).replace("weights_only=True", "")  # torch's advice runs the file's code


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_git_lfs_pointers_are_named(tmp_path, name):
    """A clone made without `git lfs pull` holds 130-byte pointer files: a .bin one was refused with torch's
    advice to load it with weights_only=False."""
    g, d = _electra_pair()
    gp, dp = _save(tmp_path, g, d)
    os.remove(dp / "model.safetensors")
    (dp / name).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 9\n")
    with pytest.raises(CheckpointError, match=f"{name} is a Git LFS pointer, not the weights: fetch them"):
        ElectraPretrainingModel.from_transformers(gp, dp, **IDS)


@pytest.mark.parametrize("role", ["generator", "discriminator"])
def test_causal_decoders_are_refused(tmp_path, role):
    """is_decoder=True: transformers masks attention causally, electra_fast's encoders do not (0.09 off)."""
    g, d = _electra_pair()
    (g if role == "generator" else d).config.is_decoder = True
    gp, dp = _save(tmp_path, g, d)
    with pytest.raises(CheckpointError, match=f"^{role}: config.json has is_decoder=true"):
        ElectraPretrainingModel.from_transformers(gp, dp, **IDS)


def test_wrong_architecture(tmp_path):
    g, d = _electra_pair()
    gp, dp = _save(tmp_path, g, d)
    with pytest.raises(CheckpointError, match="generator"):  # discriminator passed as the generator
        ElectraPretrainingModel.from_transformers(dp, dp, **IDS)
    dg, dd = _deberta_pair()
    dg.save_pretrained(tmp_path / "dgen")
    with pytest.raises(CheckpointError, match="model types"):
        ElectraPretrainingModel.from_transformers(tmp_path / "dgen", dp, **IDS)


def test_shape_mismatch(tmp_path):
    g, d = _electra_pair()
    model = ElectraPretrainingModel(ElectraConfig(vocab_size=V, embedding_size=16, hidden_size=32,
                                                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                                  generator_hidden_size=16, generator_num_hidden_layers=2,
                                                  generator_num_attention_heads=2, generator_intermediate_size=32,
                                                  max_position_embeddings=64, **IDS))
    model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "electra_fast.json").read_text())
    cfg["intermediate_size"] = 72  # the weights on disk are 64 wide
    (tmp_path / "ckpt" / "electra_fast.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape \(64, 32\).*expects \(72, 32\)"):
        ElectraPretrainingModel.from_pretrained(tmp_path / "ckpt")


def test_missing_key(tmp_path):
    from safetensors.torch import load_file, save_file
    g, d = _electra_pair()
    gp, dp = _save(tmp_path, g, d)
    state = load_file(dp / "model.safetensors")
    del state["electra.encoder.layer.1.output.dense.weight"]
    save_file(state, dp / "model.safetensors")
    with pytest.raises(CheckpointError, match="layer.1.output.dense.weight"):
        ElectraPretrainingModel.from_transformers(gp, dp, embedding_sharing="none", **IDS)



def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_weights_the_model_would_drop_are_refused(tmp_path):
    """Loading dropped, without a word, encoder weights with no place in the model (a config.json with fewer layers
    than its weights; a relative-position table) and an untied generator projection: logits off by ~1."""
    from safetensors.torch import load_file, save_file
    g, d = _electra_pair()
    gp, dp = _save(tmp_path, g, d)
    ElectraPretrainingModel.from_transformers(gp, dp, **IDS)  # as saved: loads
    _edit_config(dp, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"discriminator: .* holds 16 encoder weight\(s\) the model has no "
                                              r"place for \('electra\.encoder\.layer\.1\."):
        ElectraPretrainingModel.from_transformers(gp, dp, **IDS)
    _edit_config(dp, num_hidden_layers=2)
    state = load_file(dp / "model.safetensors")
    save_file({**state, "electra.encoder.layer.0.attention.self.distance_embedding.weight": torch.zeros(127, 8)},
              dp / "model.safetensors")
    with pytest.raises(CheckpointError, match="distance_embedding"):
        ElectraPretrainingModel.from_transformers(gp, dp, **IDS)
    save_file(state, dp / "model.safetensors")
    torch.manual_seed(1)
    untied = transformers.ElectraForMaskedLM(transformers.ElectraConfig(**{**g.config.to_dict(),
                                                                           "tie_word_embeddings": False}))
    untied.save_pretrained(tmp_path / "untied")
    with pytest.raises(CheckpointError, match="'generator_lm_head.weight' that differs from its word embeddings"):
        ElectraPretrainingModel.from_transformers(tmp_path / "untied", dp, **IDS)


@pytest.mark.parametrize("kind, field, value", [("electra", "layer_norm_eps", 1e-2), ("electra", "hidden_act", "relu"),
                                                ("deberta", "max_relative_positions", 16),
                                                ("deberta", "pos_att_type", ["c2p"])])
def test_generator_settings_the_pair_shares_must_agree(tmp_path, kind, field, value):
    """One ElectraConfig field holds these for both models: the generator's own value was ignored (its logits off
    by up to 0.29), and the export then wrote the discriminator's into the generator's config.json."""
    g, d = _electra_pair() if kind == "electra" else _deberta_pair()
    gp, dp = _save(tmp_path, g, d)
    _edit_config(gp, **{field: value})
    with pytest.raises(CheckpointError, match=f"the generator's config.json has {field}=.*, the discriminator's"):
        ElectraPretrainingModel.from_transformers(gp, dp, **IDS)
    if kind == "deberta":  # the same relative-attention kinds in another order or spelling: the same setting
        _edit_config(gp, max_relative_positions=json.loads((dp / "config.json").read_text())["max_relative_positions"],
                     pos_att_type="c2p|p2c")
        ElectraPretrainingModel.from_transformers(gp, dp, **IDS)


@pytest.mark.parametrize("damage, expected", [
    (lambda dp: (dp / "config.json").write_text("{nope"), r"config\.json is not JSON"),
    (lambda dp: (dp / "config.json").write_text("[1]"), r"config\.json: expected a JSON object, got a JSON list"),
    (lambda dp: _edit_config(dp, hidden_size="32"), "discriminator: config.json has no integer hidden_size"),
    (lambda dp: _edit_config(dp, position_embedding_type="relative_key"),
     "position_embedding_type 'relative_key' is not supported"),
    (lambda dp: (os.remove(dp / "model.safetensors"), torch.save([torch.zeros(1)], dp / "pytorch_model.bin")),
     r"pytorch_model\.bin is not a readable weights file \(expected a dict of named tensors, got a list\)"),
    (lambda dp: (os.remove(dp / "model.safetensors"), (dp / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))), "names shard file.* not there"),
])
def test_unreadable_transformers_folders_are_a_checkpoint_error(tmp_path, damage, expected):
    """KeyError / JSONDecodeError / AttributeError tracebacks before, naming no file."""
    g, d = _electra_pair()
    gp, dp = _save(tmp_path, g, d)
    damage(dp)
    with pytest.raises(CheckpointError, match=expected):
        ElectraPretrainingModel.from_transformers(gp, dp, **IDS)


def test_from_pretrained_with_a_broken_config_is_a_checkpoint_error(tmp_path):
    g, d = _electra_pair()
    ElectraPretrainingModel.from_transformers(*_save(tmp_path, g, d), **IDS).save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "electra_fast.json").read_text())
    (tmp_path / "ours" / "electra_fast.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"electra_fast\.json is not JSON"):
        ElectraPretrainingModel.from_pretrained(tmp_path / "ours")
    # an unknown or ill-typed field named no file
    for change, match in (({"hiden_size": 3}, "unknown fields"), ({"hidden_size": "32"}, "hidden_size")):
        (tmp_path / "ours" / "electra_fast.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=rf"^.*ours/electra_fast\.json: .*{match}"):
            ElectraPretrainingModel.from_pretrained(tmp_path / "ours")

def test_no_network(tmp_path, monkeypatch):
    """Interop reads local files only: a hub-style name is a missing directory, not a download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError):
        ElectraPretrainingModel.from_transformers("google/electra-small-generator",
                                                  "google/electra-small-discriminator")
    logging.getLogger("electra_fast").debug("ok")


# ------------------------------------------------------------------------------------------ Enhanced Mask Decoder
def _emd_model(layers=2):
    cfg = ElectraConfig.deberta_v3_xsmall(vocab_size=V, mask_token_id=100, hidden_size=32, embedding_size=32,
                                          generator_hidden_size=32, num_attention_heads=4,
                                          generator_num_attention_heads=2, intermediate_size=64,
                                          generator_intermediate_size=64, num_hidden_layers=2,
                                          generator_num_hidden_layers=layers, position_buckets=8,
                                          max_position_embeddings=64)
    assert cfg.enhanced_mask_decoder  # the deberta-v3 presets' default, as in Microsoft's RTD code
    torch.manual_seed(0)
    model = ElectraPretrainingModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("layers", [1, 2])
def test_enhanced_mask_decoder_matches_microsofts_algorithm(tmp_path, layers):
    """The generator's MLM logits equal Microsoft's EnhancedMaskDecoder computed here from transformers' own
    DeBERTa layers (which take query_states): h = the last layer's input, q = h + absolute positions, q = last
    layer(h, query_states=q) twice, then the LM head on q. Without EMD (transformers' DebertaV2ForMaskedLM) the
    logits differ: transformers cannot represent it, which the export says in its config."""
    model = _emd_model(layers)
    model.save_pretrained(tmp_path / "ckpt")
    gcfg = json.load(open(tmp_path / "ckpt" / "generator" / "config.json"))
    assert gcfg["electra_fast_enhanced_mask_decoder"] is True
    g = transformers.DebertaV2ForMaskedLM.from_pretrained(tmp_path / "ckpt" / "generator").eval()
    ids, mask = _inputs()
    with torch.no_grad():
        ours = model.generator.logits(ids, mask)
        enc = g.deberta.encoder
        states = g.deberta(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        h = states[-2]  # the input of the last layer (the embeddings' output when there is one layer)
        z = model.generator.backbone.embeddings.position_embeddings.weight[: ids.shape[1]]
        att = enc.get_attention_mask(mask)
        rel = enc.get_rel_embedding()
        q = h + z
        for _ in range(2):
            rel_pos = enc.get_rel_pos(h, q)
            q = enc.layer[-1](h, att, query_states=q, relative_pos=rel_pos, rel_embeddings=rel)[0]
        reference = g.lm_predictions.lm_head(q, g.deberta.embeddings.word_embeddings) \
            if hasattr(g, "lm_predictions") else g.cls(q)
        _close_valid(ours, reference, mask)
        plain = g(ids, attention_mask=mask).logits
        assert (ours - plain)[mask.bool()].abs().max() > 1e-3  # transformers alone does not compute EMD
    back = ElectraPretrainingModel.from_pretrained(tmp_path / "ckpt").eval()
    assert back.config.enhanced_mask_decoder
    with torch.no_grad():
        torch.testing.assert_close(back.generator.logits(ids, mask), ours, rtol=0, atol=0)
        assert torch.isfinite(back(ids, mask, seed=0).loss)


def test_enhanced_mask_decoder_needs_unbiased_positions():
    with pytest.raises(ValueError, match="enhanced_mask_decoder: needs"):
        ElectraConfig(enhanced_mask_decoder=True)  # standard attention
    with pytest.raises(ValueError, match="enhanced_mask_decoder: needs"):
        ElectraConfig.deberta_v3_xsmall(position_biased_input=True)


def _tiny_model(seed):
    torch.manual_seed(seed)
    return ElectraPretrainingModel(ElectraConfig(
        vocab_size=V, embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, generator_hidden_size=16, generator_num_hidden_layers=1,
        generator_num_attention_heads=2, generator_intermediate_size=32, max_position_embeddings=32, **IDS))


def test_save_pretrained_never_replaces_or_half_writes(tmp_path, monkeypatch):
    """save_pretrained wrote over an existing export in place, generator first: a full disk on the second weights
    file left B's generator beside A's discriminator and config, which from_pretrained loaded without a word. Now
    a non-empty target is refused (nothing touched) and a failed save leaves no directory behind."""
    from electra_fast.models import interop
    a, b = _tiny_model(0), _tiny_model(1)
    a.save_pretrained(tmp_path / "ckpt")
    before = {p: (tmp_path / "ckpt" / p).read_bytes() for p in ("generator/model.safetensors",
                                                                 "discriminator/model.safetensors",
                                                                 "electra_fast.json")}
    with pytest.raises(ValueError, match=r"^save_pretrained: path .*ckpt' already exists and is not empty"):
        b.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match=r"exists and is not a directory"):
        b.save_pretrained(tmp_path / "file")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        b.save_pretrained(3)
    assert {p: (tmp_path / "ckpt" / p).read_bytes() for p in before} == before
    assert (tmp_path / "file").read_text() == "mine"

    real, calls = interop.save_weights, []

    def full_disk(state, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(state, directory)

    monkeypatch.setattr(interop, "save_weights", full_disk)
    for target in (tmp_path / "new", tmp_path / "empty"):
        calls.clear()
        if target.name == "empty":
            target.mkdir()
        with pytest.raises(OSError, match="No space left"):
            b.save_pretrained(target)
        assert not target.exists() or os.listdir(target) == []  # nothing half-written, the empty folder kept
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "empty", "file"]  # no temporaries left either
    monkeypatch.setattr(interop, "save_weights", real)
    b.save_pretrained(tmp_path / "empty")  # an empty directory is filled (it may be a mount point)
    back = ElectraPretrainingModel.from_pretrained(tmp_path / "empty")
    for (name, p), q in zip(b.state_dict().items(), back.state_dict().values()):
        assert torch.equal(p, q), name


def test_save_pretrained_paths_and_a_second_writer(tmp_path, monkeypatch):
    """save_pretrained("") wrote the model beside the working directory's parent, then failed with a raw
    FileNotFoundError; "new/." likewise. A second writer filling an empty target meanwhile had its file replaced;
    a temporary name already taken (another writer's) was removed."""
    from electra_fast import _files
    from electra_fast.models import interop
    model = _tiny_model(0)
    with pytest.raises(ValueError, match="^save_pretrained: path is empty"):
        model.save_pretrained("")
    model.save_pretrained(str(tmp_path / "new") + "/.")
    assert sorted(os.listdir(tmp_path)) == ["new"]
    (tmp_path / "shared").mkdir()
    real = interop.write_pretrained

    def racing(m, path):
        real(m, path)
        (tmp_path / "shared" / "electra_fast.json").write_text("the other writer's")

    monkeypatch.setattr(interop, "write_pretrained", racing)
    with pytest.raises(FileExistsError, match="gained"):
        model.save_pretrained(tmp_path / "shared")
    assert (tmp_path / "shared" / "electra_fast.json").read_text() == "the other writer's"
    monkeypatch.undo()
    # another writer's temporary (a thread of this process: the same PID) is never removed; a name with this PID
    # that no thread is writing is a dead namesake's (a container's every start has the same PID): see
    # test_save_pretrained_killed_part_way_is_whole_or_nothing
    import threading
    taken, started, release = tmp_path / f".fresh.tmp-{os.getpid()}", threading.Event(), threading.Event()

    def slow(tmp):
        with open(os.path.join(tmp, "theirs"), "w") as f:
            f.write("x")
        started.set()
        release.wait(60)

    writer = threading.Thread(target=_files.write_directory, args=(str(tmp_path / "fresh"), slow))
    writer.start()
    try:
        assert started.wait(60)
        with pytest.raises(FileExistsError):
            _files.write_directory(str(tmp_path / "fresh"), lambda tmp: None)
        assert (taken / "theirs").read_text() == "x" and not (tmp_path / "fresh").exists()
    finally:
        release.set()
        writer.join()
    assert (tmp_path / "fresh" / "theirs").read_text() == "x"


# ------------------------------------------------------------------------------------------ crashes, full disks
SAVED = ["discriminator", "electra_fast.json", "generator"]


@pytest.mark.parametrize("kind", ["empty folder", "link to an empty folder"])
def test_save_pretrained_killed_part_way_is_whole_or_nothing(tmp_path, monkeypatch, kind):
    """Review finding: save_pretrained into an existing empty folder moved its entries up from DIR/.tmp-PID one
    rename at a time: a kill between them left part of the model and the retry said "already exists and is not
    empty". The folder stays (it may be a link, a mount point, a working directory), so a kill may still leave part
    of the model there, but never electra_fast.json without the rest (from_pretrained never loads a part), and the
    retry takes the part back and writes the model whole."""
    from test_cli_args import Killed, kill_at_replace  # a kill -9 simulated in-process
    model, killed = _tiny_model(0), []
    for n in range(1, 8):
        out, seen = tmp_path / f"out{n}", tmp_path / f"out{n}"
        if kind == "empty folder":
            out.mkdir()
        else:
            seen = tmp_path / f"target{n}"
            seen.mkdir()
            out.symlink_to(seen)
        state = kill_at_replace(monkeypatch, n)
        try:
            model.save_pretrained(out)
        except Killed:
            pass
        monkeypatch.undo()
        left = sorted(os.listdir(seen))
        assert "electra_fast.json" not in left or left == SAVED, (n, left)  # the loader's file comes last
        if left == SAVED:
            ElectraPretrainingModel.from_pretrained(out)
            continue
        assert state["dead"]
        killed.append(n)
        with pytest.raises((FileNotFoundError, ValueError)):  # a part is never loaded as the model
            ElectraPretrainingModel.from_pretrained(out)
        model.save_pretrained(out)  # the retry clears what the dead writer left
        assert sorted(os.listdir(seen)) == SAVED
        assert not [x for x in os.listdir(tmp_path) if ".tmp-" in x], os.listdir(tmp_path)
        ElectraPretrainingModel.from_pretrained(out)
    assert killed and not state["dead"]  # the last n was past every rename: each instant was tried


def test_a_refused_save_touches_no_folder_of_the_users_however_named(tmp_path):
    """Review finding (this session's diff): the leftover cleaning ran before the "not empty" refusal and took any
    folder named like a temporary with a PID no process had: a user's my-project/.tmp-4000000/ and
    .my-project.tmp-4000001/ were deleted, and the message said "nothing was written". Only a folder marked as ours
    is ever cleaned."""
    model = _tiny_model(0)
    target = tmp_path / "my-project"
    (target / ".tmp-4000000").mkdir(parents=True)
    (target / ".tmp-4000000" / "notes.txt").write_text("mine")
    (target / "README.md").write_text("mine")
    (tmp_path / ".my-project.tmp-4000001").mkdir()
    (tmp_path / ".my-project.tmp-4000001" / "data.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        model.save_pretrained(target)
    assert (target / ".tmp-4000000" / "notes.txt").read_text() == "mine"
    assert (tmp_path / ".my-project.tmp-4000001" / "data.txt").read_text() == "mine"


def test_a_live_writers_temporary_is_never_taken_whatever_its_pid(tmp_path):
    """Review finding (this session's diff): two containers' writers, both PID 1, saving to one path: the second took
    the first's live temporary for a dead namesake's and removed it; the first then finished into the second's
    folder (one model's generator beside another's discriminator). A writer holds a lock on its temporary: only an
    unlocked one (its writer gone, in any PID namespace) is removed."""
    import fcntl
    from electra_fast import _files
    target = tmp_path / "model"
    live = tmp_path / f".model.tmp-{os.getpid()}"  # another process's, with our PID
    live.mkdir()
    (live / _files.OURS).write_text("")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _files.remove_dead_writes(str(target))
        assert live.is_dir()
        with pytest.raises(FileExistsError):  # its name is taken: refused, never shared
            _tiny_model(0).save_pretrained(target)
        assert live.is_dir() and not target.exists()
    finally:
        os.close(fd)  # the writer is gone
    _tiny_model(0).save_pretrained(target)
    assert not live.exists() and sorted(os.listdir(target)) == SAVED


def test_write_error_survives_a_process_pool():
    """Review finding (this session's diff): WriteError could not be unpickled, so a full disk in a pool's worker
    broke the pool (ProcessPoolExecutor) or hung it (multiprocessing.Pool)."""
    import errno
    import pickle
    from electra_fast import _files
    e = _files.write_error("out/model.safetensors", OSError(errno.ENOSPC, "No space left on device"))
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is _files.WriteError and str(again) == str(e) and again.errno == errno.ENOSPC


def test_write_directory_keeps_the_folder_it_cannot_replace_and_its_mode(tmp_path):
    """An existing empty folder stays what it was, its mode and inode too (a shell working there is not left in a
    deleted folder): the entries move up into it."""
    from electra_fast import _files
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o750)
    _files.write_directory(str(d), lambda tmp: open(os.path.join(tmp, "f"), "w").close())
    assert os.listdir(d) == ["f"] and (os.stat(d).st_mode & 0o7777) == 0o750
    here = tmp_path / "here"
    here.mkdir()
    inode = os.stat(here).st_ino
    cwd = os.getcwd()
    os.chdir(here)
    try:
        _files.write_directory(str(here), lambda tmp: open(os.path.join(tmp, "f"), "w").close())
    finally:
        os.chdir(cwd)
    assert os.listdir(here) == ["f"] and os.stat(here).st_ino == inode


def test_a_full_disk_is_one_write_error_naming_the_file(tmp_path, monkeypatch):
    """Review finding: a full disk reached the commands as torch's RuntimeError ("unexpected pos"), safetensors'
    SafetensorError ("os error 28") or a bare "[Errno 28]", each a traceback or a line naming no file. Each writer's
    words for it are now one OSError, WriteError, naming the file and the room left there (or "not writable"); an
    out-of-memory error and other RuntimeErrors stay what they are."""
    import errno
    import safetensors.torch
    from safetensors import SafetensorError
    from electra_fast import _files
    from electra_fast.models import interop
    target = str(tmp_path / "f.pt")
    failures = [(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2424640 vs 2424528"),
                 r"\(\[enforce fail at inline_container.cc:672\] . unexpected pos 2424640 vs 2424528; \d+ MiB free "
                 r"there\)"),
                (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                 r"\(Error while serializing: I/O error: No space left on device \(os error 28\); \d+ MiB free "
                 r"there\)"),
                (OSError(errno.ENOSPC, "No space left on device"), r"\(No space left on device; \d+ MiB free there\)"),
                (PermissionError(errno.EACCES, "Permission denied", target + ".tmp-1"),
                 r"\(not writable: Permission denied\)")]
    for error, detail in failures:
        def write(tmp):
            raise error
        with pytest.raises(_files.WriteError) as caught:
            _files.write_atomic(target, write)
        assert isinstance(caught.value, OSError) and "\n" not in str(caught.value)
        assert re.fullmatch(rf"writing {re.escape(target)} failed {detail}", str(caught.value)), str(caught.value)
        assert os.listdir(tmp_path) == []
    for error in (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
                  RuntimeError("a bug, not the disk")):
        def write(tmp):
            raise error
        with pytest.raises(RuntimeError) as caught:
            _files.write_atomic(target, write)
        assert caught.value is error
    # model.safetensors through save_weights, and save_pretrained (the file inside is named, not the temporary)
    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(_files.WriteError, match=re.escape(f"writing {tmp_path / 'd'}{os.sep}model.safetensors "
                                                          "failed (Error while serializing")):
        interop.save_weights({"w": torch.zeros(2)}, str(tmp_path / "d"))
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        named = os.path.join(out, "generator", "model.safetensors")
        with pytest.raises(_files.WriteError, match=re.escape(f"writing {named} failed (Error while serializing")):
            _tiny_model(0).save_pretrained(out)
    assert sorted(os.listdir(tmp_path)) == ["empty"] and os.listdir(tmp_path / "empty") == []
