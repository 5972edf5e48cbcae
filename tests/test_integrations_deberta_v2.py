"""electra_fast.integrations.transformers.deberta_v2: the transformers DeBERTa-v2 adapter (patch / unpatch, the
drop-in module), the native module it is built on, the layering between them and the deprecated old names."""
import ast
import os
import subprocess
import sys
import warnings

import pytest
import torch

import electra_fast
from electra_fast.integrations import _swap
from electra_fast.integrations.transformers import deberta_v2
from electra_fast.integrations.transformers.deberta_v2 import FusedDisentangledSelfAttention
from electra_fast.nn import DisentangledSelfAttention
from attention_inputs import SMALL, _hf_config, _hf_module, _pad

hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
from transformers import DebertaV2Config  # noqa: E402

PACKAGE = os.path.dirname(electra_fast.__file__)


# ------------------------------------------------------------------------------------------- layering
def _imported_modules(path):
    """Every module name an import statement in the file names (top-level or inside functions)."""
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_nn_imports_neither_transformers_nor_integrations():
    nn_dir = os.path.join(PACKAGE, "nn")
    files = sorted(f for f in os.listdir(nn_dir) if f.endswith(".py"))
    assert "disentangled_attention.py" in files and "encoder.py" in files
    for name in files:
        imports = _imported_modules(os.path.join(nn_dir, name))
        assert not any(m.split(".")[0] == "transformers" for m in imports), name
        # _moved.py: the deprecated names, the one deferred way from nn/ into the adapter
        if name != "_moved.py":
            assert not any("integrations" in m for m in imports), name


def test_importing_electra_fast_loads_no_adapter_and_no_transformers():
    code = """
import sys, torch
import electra_fast.nn
assert 'electra_fast.integrations' not in sys.modules, 'nn imported the adapter'
from electra_fast.nn import DisentangledSelfAttention
m = DisentangledSelfAttention(16, 2, position_buckets=4, max_relative_positions=16)
m(torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool), rel_embeddings=torch.randn(8, 16))
cfg = electra_fast.ElectraConfig.deberta_v3_xsmall(vocab_size=200, mask_token_id=100, num_hidden_layers=1,
                                                   generator_num_hidden_layers=1)
model = electra_fast.ElectraPretrainingModel(cfg)
ids = torch.randint(5, 200, (2, 16))
model(ids, attention_mask=torch.ones_like(ids))
assert 'electra_fast.integrations' not in sys.modules, 'the native modules imported the adapter'
patch = electra_fast.patch_deberta_v2  # the top-level re-export loads the adapter, not transformers
assert 'electra_fast.integrations.transformers.deberta_v2' in sys.modules
bad = sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.'))
assert not bad, bad
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__),
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_top_level_names_are_the_adapters():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the top-level names are not deprecated
        assert electra_fast.patch_deberta_v2 is deberta_v2.patch_deberta_v2
        assert electra_fast.unpatch_deberta_v2 is deberta_v2.unpatch_deberta_v2
        from electra_fast import patch_deberta_v2  # noqa: F401
    assert {"patch_deberta_v2", "unpatch_deberta_v2"} <= set(electra_fast.__all__)


def test_deprecated_nn_names_warn_and_still_work():
    import electra_fast.nn as enn

    for name in ("patch_deberta_v2", "unpatch_deberta_v2"):
        with pytest.warns(DeprecationWarning, match=f"integrations.transformers.deberta_v2.{name}"):
            assert getattr(enn, name) is getattr(deberta_v2, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        enn.no_such_name
    config = _hf_config(("c2p", "p2c"), False, *SMALL)
    with pytest.warns(DeprecationWarning, match="FusedDisentangledSelfAttention"):
        old = DisentangledSelfAttention(config)  # the old constructor: the transformers drop-in
    assert type(old) is FusedDisentangledSelfAttention
    hf_mod = _hf_module(("c2p", "p2c"), False, *SMALL, torch.float32)
    with pytest.warns(DeprecationWarning, match="FusedDisentangledSelfAttention.from_transformers"):
        fused = DisentangledSelfAttention.from_transformers(hf_mod)
    assert type(fused) is FusedDisentangledSelfAttention and fused.query_proj is hf_mod.query_proj


# ------------------------------------------------------------------------- native module vs config-built
NATIVE_CASES = [  # (pos_att_type, share_att_key, position_buckets, max_relative_positions)
    (("c2p", "p2c"), True, 8, 32),
    (("c2p", "p2c"), False, 8, 32),
    (("p2c",), False, -1, 12),
    (("c2p",), True, 8, 32),
]


@pytest.mark.parametrize("pos_att,share,buckets,max_rel", NATIVE_CASES)
def test_native_module_equals_the_config_built_one(pos_att, share, buckets, max_rel):
    config = DebertaV2Config(hidden_size=64, num_attention_heads=2, relative_attention=True, pos_att_type=list(pos_att),
                             share_att_key=share, position_buckets=buckets, max_relative_positions=max_rel,
                             attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    modules = []
    for build in (lambda: DisentangledSelfAttention(64, 2, position_buckets=buckets, max_relative_positions=max_rel,
                                                    pos_att_type=pos_att, share_att_key=share),
                  lambda: FusedDisentangledSelfAttention(config), lambda: hf.DisentangledSelfAttention(config)):
        torch.manual_seed(7)
        modules.append(build().eval())
    native, fused, theirs = modules
    # same parameter names, in the same order, with the same initial values (created in transformers' order)
    named = [list(m.named_parameters()) for m in modules]
    assert [n for n, _ in named[0]] == [n for n, _ in named[1]] == [n for n, _ in named[2]]
    for (_, a), (_, b), (_, c) in zip(*named):
        assert torch.equal(a, b) and torch.equal(a, c)
    theirs.load_state_dict(native.state_dict(), strict=True)  # checkpoints map one to one
    for name in ("num_attention_heads", "attention_head_size", "all_head_size", "share_att_key", "pos_att_type",
                 "relative_attention", "position_buckets", "max_relative_positions", "pos_ebd_size"):
        assert getattr(native, name) == getattr(fused, name) == getattr(theirs, name), name

    span = max(buckets, 0) or max_rel
    B, T = 2, 2 * span + 3  # beyond the span: clamped slots
    g = torch.Generator().manual_seed(0)
    x, rel = torch.randn(B, T, 64, generator=g), torch.randn(2 * span, 64, generator=g)
    m = _pad("right", B, T)
    got = native(x, m, rel_embeddings=rel)
    assert got.shape == (B, T, 64)
    out, probs = fused(x, m.long(), rel_embeddings=rel)
    assert probs is None
    assert torch.equal(got[m], out[m])  # the same computation at real queries
    ext = m[:, None, None, :].long()
    want = theirs(x, ext * ext.squeeze(-2).unsqueeze(-1), rel_embeddings=rel)[0]
    torch.testing.assert_close(got[m], want[m], rtol=2e-4, atol=2e-5)  # fp32, as REF_TOL in test_disentangled_attention
    assert (got[~m] == 0).all()  # the native module: padded queries hold 0
    torch.testing.assert_close(out[~m], want[~m], rtol=2e-4, atol=2e-5)  # the adapter: transformers' mean of V


def test_native_module_rejects_bad_arguments():
    good = dict(hidden_size=32, num_heads=2, position_buckets=4, max_relative_positions=16)
    for edit, exc, name in [
        (dict(hidden_size=32.0), TypeError, "hidden_size"),
        (dict(num_heads=0), ValueError, "num_heads"),
        (dict(hidden_size=33), ValueError, "hidden_size"),
        (dict(head_size=0), ValueError, "head_size"),
        (dict(pos_att_type=("c2p", "c2c")), ValueError, "pos_att_type"),
        (dict(position_buckets=4.0), TypeError, "position_buckets"),
        (dict(max_relative_positions=0), ValueError, "max_relative_positions"),
        (dict(attention_dropout=1.5), ValueError, "attention_dropout"),
        (dict(pos_dropout=-0.1), ValueError, "pos_dropout"),
        (dict(attention_dropout="0.1"), TypeError, "attention_dropout"),
    ]:
        with pytest.raises(exc, match=name):
            DisentangledSelfAttention(**{**good, **edit})
    # head_size given: hidden_size need not divide (transformers' attention_head_size)
    assert DisentangledSelfAttention(**{**good, "hidden_size": 33, "head_size": 8}).all_head_size == 16
    assert DisentangledSelfAttention(**good, pos_att_type="P2C|c2p").pos_att_type == ["p2c", "c2p"]
    mod = DisentangledSelfAttention(**good)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="rel_embeddings"):
        mod(x, None)
    with pytest.raises(ValueError, match="rel_embeddings"):
        mod(x, None, rel_embeddings=torch.randn(7, 32))  # 2k = 8 rows needed
    with pytest.raises(ValueError, match="query_states"):
        mod(x, None, rel_embeddings=torch.randn(8, 32), query_states=x[:, :4])
    with pytest.raises(TypeError, match="attention_mask"):
        mod(x, torch.ones(2, 5), rel_embeddings=torch.randn(8, 32))  # a float mask is the adapter's business
    with pytest.raises(ValueError, match=r"^hidden_states: expected \[B, T, hidden\]"):  # was: query: ... 4-d
        mod(x[0], None, rel_embeddings=torch.randn(8, 32))
    with pytest.raises(ValueError, match="^hidden_states: expected at least one token"):  # was: cannot reshape
        mod(x[:, :0], None, rel_embeddings=torch.randn(8, 32))
    for buckets, max_rel in ((1, 16), (256, 128), (8, 5)):  # log buckets the op would refuse at every forward
        with pytest.raises(ValueError, match="position_buckets"):
            DisentangledSelfAttention(**{**good, "position_buckets": buckets, "max_relative_positions": max_rel})
    assert DisentangledSelfAttention(**{**good, "position_buckets": 1, "pos_att_type": ()}).pos_att_type == []


# --------------------------------------------------------------------------------------- the adapter
def test_from_transformers_shares_projections_only():
    hf_mod = _hf_module(("c2p", "p2c"), False, *SMALL, torch.float32).train()
    fused = FusedDisentangledSelfAttention.from_transformers(hf_mod)
    assert fused.training
    assert [id(p) for p in fused.parameters()] == [id(p) for p in hf_mod.parameters()]
    assert all(p.device.type == "cpu" for p in fused.parameters())  # no meta placeholder left
    with pytest.raises(TypeError, match="module"):
        FusedDisentangledSelfAttention.from_transformers(torch.nn.Linear(2, 2))
    hf_mod.extra = torch.nn.Linear(2, 2)  # a layout this adapter does not know
    with pytest.raises(ValueError, match="module"):
        FusedDisentangledSelfAttention.from_transformers(hf_mod)


def test_swap_helpers_restore_what_they_replaced():
    parent = torch.nn.Sequential(torch.nn.Linear(2, 2))
    original, replacement = parent[0], torch.nn.Linear(2, 2)
    _swap.swap_submodule(parent, "0", replacement)
    assert parent[0] is replacement and len(list(parent.parameters())) == 2  # the original is not registered
    parent.eval()
    _swap.restore_submodule(parent, "0")
    assert parent[0] is original and not original.training
    with pytest.raises(ValueError, match="not installed"):
        _swap.restore_submodule(parent, "0")
    _swap.override_methods(parent, forward=lambda self, x: x + 1)
    assert _swap.overrides(parent, "forward") and torch.equal(parent(torch.zeros(2)), torch.ones(2))
    _swap.restore_methods(parent, "forward")
    assert not _swap.overrides(parent, "forward") and parent(torch.zeros(1, 2)).shape == (1, 2)


# ---------------------------------------------------------------------------------- patched models
def _tiny_config(**kw):
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                max_position_embeddings=64, relative_attention=True, position_buckets=8,
                max_relative_positions=64, pos_att_type=["p2c", "c2p"], share_att_key=True,
                norm_rel_ebd="layer_norm", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                position_biased_input=False, pad_token_id=0, type_vocab_size=0)
    base.update(kw)
    return DebertaV2Config(**base)


def _batch(T=40, B=3):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 25:] = 0
    mask[2, :3] = 0
    return ids * mask, mask


@pytest.mark.parametrize("share", [True, False])
def test_patched_model_matches_transformers(share):
    from transformers import DebertaV2ForMaskedLM

    torch.manual_seed(0)
    model = DebertaV2ForMaskedLM(_tiny_config(share_att_key=share)).eval()
    ids, mask = _batch()
    valid = mask.bool()
    labels = torch.where(valid, ids, -100)
    params = list(model.parameters())
    keys = list(model.state_dict())
    opt = torch.optim.SGD(params, lr=0.1)
    want = model(input_ids=ids, attention_mask=mask, labels=labels)
    want_grads = torch.autograd.grad(want.loss, params, allow_unused=True)

    calls = []
    build = hf.build_relative_position
    try:
        hf.build_relative_position = lambda *a, **k: calls.append(1) or build(*a, **k)
        assert deberta_v2.patch_deberta_v2(model) is model
        layers = model.deberta.encoder.layer
        assert all(type(layer.attention.self) is FusedDisentangledSelfAttention for layer in layers)
        assert [id(p) for p in model.parameters()] == [id(p) for p in params]  # same Parameter objects
        assert list(model.state_dict()) == keys
        assert deberta_v2.patch(model) == len(layers) + 1  # patching again changes nothing
        assert all(type(layer.attention.self) is FusedDisentangledSelfAttention for layer in layers)
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert calls == []  # no [T, T] relative-position table
    finally:
        hf.build_relative_position = build
    torch.testing.assert_close(got.logits[valid], want.logits[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    got.loss.backward()
    for p, g in zip(params, want_grads):
        if g is None:
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)
    opt.step()  # the optimizer built before patching updates the patched model
    after = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert after < got.loss

    assert deberta_v2.unpatch(model) == len(model.deberta.encoder.layer) + 1
    assert all(type(layer.attention.self) is hf.DisentangledSelfAttention for layer in model.deberta.encoder.layer)
    assert "get_rel_pos" not in vars(model.deberta.encoder)
    unpatched = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(unpatched, after, rtol=1e-5, atol=1e-6)
    assert electra_fast.unpatch_deberta_v2(model) is model and deberta_v2.unpatch(model) == 0


def test_patch_sequence_classification_and_output_attentions():
    from transformers import DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(_tiny_config(num_labels=3)).eval()
    ids, mask = _batch()
    want = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    electra_fast.patch_deberta_v2(model)
    got = model(input_ids=ids, attention_mask=mask)
    # the pooler reads token 0, which is padding in sequence 2 (left padded): compare the others
    torch.testing.assert_close(got.logits[:2], want.logits[:2], rtol=1e-4, atol=1e-5)
    fallback = model(input_ids=ids, attention_mask=mask, output_attentions=True)  # transformers' computation
    torch.testing.assert_close(fallback.attentions[0], want.attentions[0])


def test_hooks_and_wrappers_survive_patch_and_unpatch():
    """Review findings: a forward hook on a layer's attention.self was dropped by patch (strict too), one
    registered on the fused module while patched was lost by unpatch, a wrapper put on a projection while patched
    (PEFT's LoRA) was thrown away by unpatch (with its trained parameters), and a value_proj hook saw a second
    [B, 1, H] call on padded batches (the mean row of keyless queries)."""
    from transformers import DebertaV2Model

    class Wrapped(torch.nn.Module):  # a LoRA-like wrapper: the base layer plus a trainable delta
        def __init__(self, base):
            super().__init__()
            self.base, self.delta = base, torch.nn.Parameter(torch.full((base.out_features,), 0.1))

        def forward(self, x):
            return self.base(x) + self.delta

    torch.manual_seed(0)
    model = DebertaV2Model(_tiny_config()).eval()
    ids, mask = _batch()
    halve = lambda module, args, out: (out[0] * 0.5,) + tuple(out[1:])
    attn0 = model.encoder.layer[0].attention
    attn0.self.register_forward_hook(halve)
    seen = []
    attn0.self.value_proj.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    want = model(ids, attention_mask=mask).last_hidden_state
    assert seen == [(3, 40, 64)]
    electra_fast.patch(model, strict=True)
    assert type(attn0.self) is FusedDisentangledSelfAttention
    got = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)  # the hook ran
    assert seen == [(3, 40, 64)] * 2  # one call, as transformers'
    handle = attn0.self.register_forward_hook(lambda m, a, out: seen.append("patched"))
    attn0.self.value_proj = Wrapped(attn0.self.value_proj)
    electra_fast.unpatch(model)
    assert type(attn0.self) is hf.DisentangledSelfAttention and type(attn0.self.value_proj) is Wrapped
    assert any(n.endswith("value_proj.delta") for n, _ in model.named_parameters())
    seen.clear()
    model(ids, attention_mask=mask)
    assert seen == [(3, 40, 64), "patched"]  # both hooks came back with the original
    handle.remove()
    seen.clear()
    model(ids, attention_mask=mask)
    assert seen == [(3, 40, 64)]


def test_one_mask_for_the_batch_is_fused():
    """A [1, T, T] (or [1, 1, T, T]) padding mask broadcast over the batch: transformers accepts it; the patched
    encoder raised 'shape [3, 6, 6] is invalid for input of size 36'."""
    from transformers import DebertaV2Model

    torch.manual_seed(0)
    model = DebertaV2Model(_tiny_config()).eval()
    h = torch.randn(3, 6, 64)
    keys = torch.ones(6, dtype=torch.long)
    keys[4:] = 0
    for mask in (keys[None, :, None] * keys[None, None, :], keys[None, None, :, None] * keys[None, None, None, :]):
        want = model.encoder(h, mask).last_hidden_state
        electra_fast.patch(model, strict=True)  # strict: served by the fused op, no fallback
        got = model.encoder(h, mask).last_hidden_state
        electra_fast.unpatch(model)
        torch.testing.assert_close(got[:, :4], want[:, :4], rtol=1e-4, atol=1e-5)


def test_patch_rejects_what_is_not_a_deberta_v2_model():
    with pytest.raises(ValueError, match="model"):
        electra_fast.patch_deberta_v2(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        electra_fast.patch_deberta_v2("deberta")
    assert deberta_v2.patch(torch.nn.Linear(2, 2)) == 0  # the model-agnostic form: not this family


def test_module_query_states_and_4d_mask():
    hf_mod = _hf_module(("c2p", "p2c"), False, *SMALL, torch.float32)
    fused = FusedDisentangledSelfAttention.from_transformers(hf_mod)
    B, T = 2, 20
    g = torch.Generator().manual_seed(0)
    x, qs = torch.randn(B, T, 64, generator=g), torch.randn(B, T, 64, generator=g)
    rel = torch.randn(16, 64, generator=g)
    m = _pad("right", B, T)
    ext = m[:, None, None, :].long()
    mask4 = ext * ext.squeeze(-2).unsqueeze(-1)
    relpos = hf.build_relative_position(x, x, bucket_size=SMALL[0], max_position=SMALL[1])
    want = hf_mod(x, mask4, query_states=qs, relative_pos=relpos, rel_embeddings=rel)[0]
    got = fused(x, mask4, query_states=qs, relative_pos=relpos, rel_embeddings=rel)[0]
    torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=1e-5)
    fresh = FusedDisentangledSelfAttention(_hf_config(("c2p", "p2c"), False, *SMALL))
    assert sorted(n for n, _ in fresh.named_parameters()) == sorted(n for n, _ in hf_mod.named_parameters())


def test_module_rejects_bad_config():
    with pytest.raises(ValueError, match="hidden_size"):
        FusedDisentangledSelfAttention(_tiny_config(hidden_size=63, num_attention_heads=2))


def test_hooks_and_modules_on_the_attention_dropouts_are_kept():
    """Review finding: patch put fresh nn.Dropouts in the fused module, so a hook on attention.self.dropout /
    pos_dropout (or a module of the user's there) was dropped silently (max |diff| 2.6), strict too, and unpatch
    copied the fresh ones over the originals: the user's module was lost for good."""
    from transformers import DebertaV2Model

    class Ablate(torch.nn.Module):
        def forward(self, x):
            return x * 0.0

    torch.manual_seed(0)
    model = DebertaV2Model(_tiny_config()).eval()
    ids, mask = _batch()
    layer0, layer1 = (layer.attention.self for layer in model.encoder.layer)
    fired = []
    layer0.dropout.register_forward_hook(lambda m, a, out: (fired.append("dropout"), out * 0.5)[1])
    dropout0 = layer0.dropout
    layer1.pos_dropout = Ablate()
    ablate = layer1.pos_dropout
    want = model(ids, attention_mask=mask).last_hidden_state
    assert fired == ["dropout"]
    with pytest.raises(ValueError, match="dropout has hooks"):
        electra_fast.patch(model, strict=True)
    electra_fast.patch(model)
    fired.clear()
    got = model(ids, attention_mask=mask).last_hidden_state
    assert fired == ["dropout"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    patched1 = model.encoder.layer[1].attention.self
    assert type(patched1) is FusedDisentangledSelfAttention and patched1.pos_dropout is ablate
    # a hook put on the fused module's dropout after patching: its call falls back to transformers' computation
    handle = patched1.dropout.register_forward_hook(lambda m, a, out: fired.append("late"))
    fired.clear()
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, want, rtol=1e-4, atol=1e-5)
    assert fired == ["dropout", "late"]
    handle.remove()
    electra_fast.unpatch(model)
    restored0, restored1 = (layer.attention.self for layer in model.encoder.layer)
    assert restored0.dropout is dropout0 and restored1.pos_dropout is ablate
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, want, rtol=0, atol=0)


def test_padded_query_rows_get_transformers_dropout_when_training():
    """Review finding: in training, padded query rows got the mean of V with no attention dropout, where
    transformers drops each head's uniform weights: the right mean but no spread, so a loss that reads padded
    positions (question answering's) differed in distribution (4.34 vs 3.91 over 300 seeds). Each padded row is
    dropout(1/T) @ V: its mean over draws is the mean of V and its variance sum_j V_j^2 p / ((1 - p) T^2)."""
    p = 0.5
    config = _tiny_config(attention_probs_dropout_prob=p, hidden_size=8, num_attention_heads=2)
    torch.manual_seed(0)
    module = FusedDisentangledSelfAttention(config).train()
    B, T, N = 2, 6, 2000
    keys = torch.ones(B, T, dtype=torch.bool)
    keys[0, 4:] = False  # right padding
    keys[1, :1] = False  # left padding
    x = torch.randn(B, T, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        draws = torch.stack([module._keyless_rows(x, p) for _ in range(N)])  # [N, B, T, 8]
        v = module.value_proj(x)  # [B, T, 8]
    rows = draws[:, ~keys]  # [N, padded rows, 8]
    want_mean = v.mean(dim=1, keepdim=True).expand(B, T, 8)[~keys]
    want_var = (v ** 2).sum(dim=1, keepdim=True).expand(B, T, 8)[~keys] * p / ((1 - p) * T * T)
    se = (want_var / N).sqrt()
    assert ((rows.mean(0) - want_mean).abs() < 5 * se).all()
    torch.testing.assert_close(rows.var(0), want_var, rtol=0.15, atol=0)  # N = 2000: the estimate's sd ~3 %
    # rows and heads draw independently: two padded rows of one sequence are uncorrelated
    a, b = rows[:, 0] - rows[:, 0].mean(0), rows[:, 1] - rows[:, 1].mean(0)
    corr = (a * b).mean(0) / (a.std(0) * b.std(0))
    assert (corr.abs() < 0.1).all()
    # the forward puts them there (real rows keep the fused op's context), and gradients reach value_proj
    rel = torch.randn(2 * module.pos_ebd_size, 8)
    module.zero_grad()
    out, _ = module(x, keys.long(), rel_embeddings=rel)
    out[~keys].sum().backward()
    assert module.value_proj.weight.grad is not None and module.value_proj.weight.grad.abs().sum() > 0
    module.eval()
    out_eval, _ = module(x, keys.long(), rel_embeddings=rel)
    torch.testing.assert_close(out_eval[~keys], want_mean, rtol=1e-5, atol=1e-6)


def test_padded_rows_store_no_attention_weights_for_the_backward():
    """Review finding: the padded rows' dropout drew a [B, H, P, T] mask and kept it for the backward (94 % of the
    [B, H, T, T] weights the fused attention exists not to store). They now come from the fused op (Philox
    dropout regenerated in the backward): nothing saved is [T, T]-sized."""
    config = _tiny_config(attention_probs_dropout_prob=0.5, hidden_size=8, num_attention_heads=2)
    module = FusedDisentangledSelfAttention(config).train()
    B, T = 2, 64
    keys = torch.zeros(B, T, dtype=torch.long)
    keys[:, :5] = 1
    x = torch.randn(B, T, 8, requires_grad=True)
    rel = torch.randn(2 * module.pos_ebd_size, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out, _ = module(x, keys, rel_embeddings=rel)
    assert max(saved) < B * 2 * T * T / 4
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _train_mode_model(**kw):
    from transformers import DebertaV2Model
    torch.manual_seed(0)
    return DebertaV2Model(_tiny_config(attention_probs_dropout_prob=0.5, **kw)).train()


@pytest.mark.parametrize("how", ["eval", "identity", "p=1 after patching", "p=1 before patching"])
def test_the_users_choice_for_an_attention_dropout_holds(how):
    """Review findings on the shared dropouts: patch() called train() on them, switching a dropout the user had
    put in eval mode back on (padded rows 2.88 off); an nn.Identity put there to remove it crashed (no .p); p set
    to 1 after patching raised from the op. Each now gives what transformers gives."""
    model = _train_mode_model()
    ids, mask = _batch()
    attn = [layer.attention.self for layer in model.encoder.layer]
    for a in attn:
        if how == "eval":
            a.dropout.eval()
        elif how == "identity":
            a.dropout = torch.nn.Identity()
        elif how == "p=1 before patching":  # legal in transformers: patching raised from the module's constructor
            a.dropout.p = 1.0
    if how == "p=1 after patching":
        electra_fast.patch(model)
        for layer in model.encoder.layer:
            layer.attention.self.dropout.p = 1.0
        got = model(ids, attention_mask=mask).last_hidden_state
        electra_fast.unpatch(model)
        want = model(ids, attention_mask=mask).last_hidden_state
    elif how == "p=1 before patching":  # the fused op takes p = 1 (every weight dropped: zeros, as torch's)
        want = model(ids, attention_mask=mask).last_hidden_state
        electra_fast.patch(model, strict=True)
        assert all(type(layer.attention.self) is FusedDisentangledSelfAttention for layer in model.encoder.layer)
        got = model(ids, attention_mask=mask).last_hidden_state
        electra_fast.unpatch(model)
    else:
        want = model(ids, attention_mask=mask).last_hidden_state
        electra_fast.patch(model, strict=True)
        assert all(type(layer.attention.self) is FusedDisentangledSelfAttention for layer in model.encoder.layer)
        got = model(ids, attention_mask=mask).last_hidden_state
        electra_fast.unpatch(model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if how == "eval":
        assert all(not a.dropout.training and a.training for a in attn)  # as the user left them, after unpatch too


def test_native_module_applies_its_dropouts_own_mode_and_refuses_another_module():
    module = DisentangledSelfAttention(8, 2, position_buckets=4, max_relative_positions=8,
                                       attention_dropout=0.5).train()
    x, rel = torch.randn(2, 5, 8), torch.randn(2 * module.pos_ebd_size, 8)
    module.dropout.eval()  # switched off by the user: the op applies none
    torch.testing.assert_close(module(x, rel_embeddings=rel), module.eval()(x, rel_embeddings=rel))
    module.train().dropout = torch.nn.AlphaDropout(0.5)
    with pytest.raises(TypeError, match="^dropout: expected an nn.Dropout or nn.Identity .*got AlphaDropout$"):
        module(x, rel_embeddings=rel)


def test_the_drop_in_built_from_a_config_serves_relative_attention_without_position_terms(monkeypatch):
    """Its relative embeddings' dropout is the library's own Dropout (the compile fix): the check for modules the
    fused code would skip took it for a user's module, and every call fell back (strict=True raised)."""
    from electra_fast.integrations.transformers import patching
    reasons = []
    fallback = patching.fallback
    monkeypatch.setattr(patching, "fallback", lambda module, reason: (reasons.append(reason), fallback(module, reason)))
    for terms in ([], ["p2c", "c2p"]):
        cfg = DebertaV2Config(hidden_size=32, num_attention_heads=2, relative_attention=True, position_buckets=4,
                              max_relative_positions=8, pos_att_type=terms)
        module = FusedDisentangledSelfAttention(cfg).train()
        module(torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.long), rel_embeddings=torch.randn(8, 32))
    assert reasons == []
