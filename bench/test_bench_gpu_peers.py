"""GPU rows against other libraries, side by side in this one process (bf16, fwd and fwd+bwd):

* ``disentangled_attention (modules)``: the fused drop-in module vs transformers' eager DeBERTa-v2 attention vs
  disentangled-flash's ``TritonTrainingDisentangledSelfAttention`` vs flashdeberta's
  ``FlashDisentangledSelfAttention``, all loaded with the same weights, deberta-v3-base geometry (hidden 768,
  12 heads, k = 256, c2p + p2c, shared keys), right padding on 10 % of the tokens. Each row records
  ``max_abs_diff_vs_transformers`` over the real tokens of one forward, so a fast wrong peer shows.
* ``attention (no position terms)``: the fused op without position terms vs ``F.scaled_dot_product_attention``
  with the same key-padding mask, [B, 12, T, 64].
* ``mlm loss (peers)``: ``mlm_loss_and_sample`` (loss, gradients and one Gumbel sample per row) vs the eager head
  (full logits, cross-entropy, Gumbel-max) vs Liger-Kernel's fused linear cross-entropy and Apple's Cut
  Cross-Entropy, which compute the loss only (no sampling: they do less work). No bias (Cut Cross-Entropy has
  none), N = 2458 masked rows (15 % of 32 x 512).

GPU only: on CPU every row is skipped, except in the GPU lane's dry run (ELECTRA_FAST_GPU_LANE_DRY_RUN=1), which
runs the plumbing on CPU with tiny shapes in fp32 and one round. A peer that is not installed (carry its wheel:
``make gpu-wheels``) or fails its first call is skipped at setup, its reason recorded in the results'
``machine_info.skipped``.
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import electra_fast
from conftest import QUICK, run

DRY_RUN = os.environ.get("ELECTRA_FAST_GPU_LANE_DRY_RUN", "0") == "1"
if not DRY_RUN and not torch.cuda.is_available():  # before the transformers imports: CPU benches stay cheap
    pytest.skip("GPU rows: no CUDA device is visible", allow_module_level=True)

from test_bench_disentangled_attention import base_config, inputs, module_step, modules  # noqa: E402
from test_bench_sampling import eager_mlm_loss_and_sample  # noqa: E402

PEERS = {"disentangled-flash": "disentangled_flash", "flashdeberta": "flashdeberta",
         "liger-kernel (loss only)": "liger_kernel.transformers.functional",
         "cut-cross-entropy (loss only)": "cut_cross_entropy"}

if DRY_RUN:
    MODULE_SHAPES, SDPA_SHAPES, MLM_SHAPES = [(1, 16)], [(1, 2, 16, 32)], [(64, 32, 1000)]
else:
    MODULE_SHAPES = [(8, 512)] if QUICK else [(8, 512), (2, 2048), (32, 128)]
    SDPA_SHAPES = [(8, 12, 512, 64)] if QUICK else [(8, 12, 512, 64), (2, 12, 2048, 64)]
    MLM_SHAPES = [(2458, 768, 30522)] if QUICK else [(2458, 768, 30522), (2458, 768, 128100)]
ROUNDS = dict(rounds=1, warmup=0) if DRY_RUN else (dict(rounds=3, warmup=1) if QUICK else dict(rounds=10, warmup=2))


@pytest.fixture(autouse=True)
def _gpu_rows(device):
    if device.type != "cuda" and not DRY_RUN:
        pytest.skip("GPU rows (comparisons with other GPU libraries): run with --device cuda")


@pytest.fixture
def dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # the dry run: CPU, fp32


def peer(impl: str, device):
    """The peer's module, or a skip at setup with the reason (recorded in the results)."""
    if device.type != "cuda":
        pytest.skip(f"{impl}: runs on CUDA only (dry run)")
    try:
        return importlib.import_module(PEERS[impl])
    except Exception as exc:  # noqa: BLE001 - ImportError, or a peer that breaks on this torch / triton
        pytest.skip(f"{impl}: not importable ({type(exc).__name__}: {exc}); carry its wheel in .whl/ "
                    "(make gpu-wheels)")


def probed(impl: str, step):
    """``step`` after one call; a peer whose first call raises is skipped (at setup) with the error."""
    try:
        step()
    except Exception as exc:  # noqa: BLE001
        if impl not in PEERS:
            raise
        pytest.skip(f"{impl}: its first call raised {type(exc).__name__}: {str(exc)[:300]}")
    return step


# ---------------------------------------------------------------------------------- attention modules
def _peer_module(impl, eager, device):
    lib = peer(impl, device)
    cls = lib.TritonTrainingDisentangledSelfAttention if impl == "disentangled-flash" else \
        lib.FlashDisentangledSelfAttention
    module = cls(base_config())
    module.load_state_dict(eager.state_dict())
    return module.to(device=device, dtype=next(eager.parameters()).dtype).train()


@pytest.fixture
def attention_step(device, dtype, impl, pass_, b, t):
    sides = modules(dtype, device)  # transformers' module and the fused one with its weights
    module = sides[impl] if impl in sides else _peer_module(impl, sides["transformers"], device)
    x, rel, mask2, mask4 = inputs(b, t, dtype, device)
    mask = mask4 if impl == "transformers" else mask2  # the peers take [B, T] like ours
    step = probed(impl, module_step(module, x, rel, mask, pass_))
    with torch.no_grad():
        real = mask2.bool()
        want = sides["transformers"](x, mask4, rel_embeddings=rel)[0][real].float()
        diff = (module(x, mask, rel_embeddings=rel)[0][real].float() - want).abs().max().item()
    return step, diff


@pytest.mark.parametrize("impl", ["fused", "transformers", "disentangled-flash", "flashdeberta"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("b,t", MODULE_SHAPES)
def test_attention_modules(benchmark, device, dtype, attention_step, impl, pass_, b, t):
    step, diff = attention_step
    benchmark.extra_info["max_abs_diff_vs_transformers"] = diff
    run(benchmark, step, device=device, op="disentangled_attention (modules)", impl=impl, pass_=pass_,
        shape=f"{b}x{t}", dtype=dtype, tokens=b * t, **ROUNDS)


# ------------------------------------------------------------------------ attention without position terms
@pytest.mark.parametrize("impl", ["fused", "sdpa"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SDPA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_vs_sdpa(benchmark, device, dtype, impl, pass_, shape):
    B, H, T, D = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    keys = torch.ones(B, T, dtype=torch.bool, device=device)
    keys[:, int(T * 0.9):] = False

    def attend():
        if impl == "fused":
            return electra_fast.disentangled_attention(q, k, v, attention_mask=keys, scale=D ** -0.5)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])

    def step():
        out = attend()
        if pass_ == "fwd+bwd":
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None
        return out

    run(benchmark, step, device=device, op="attention (no position terms)", impl=impl, pass_=pass_,
        shape=f"{B}x{T}", dtype=dtype, tokens=B * T, **ROUNDS)


# --------------------------------------------------------------------------------------------- MLM loss
@pytest.fixture
def mlm_step(device, dtype, impl, n, e, v):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, e, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, e, generator=g) * 0.02).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    seed = [0]
    if impl == "liger-kernel (loss only)":
        lib = peer(impl, device)

        def loss_fn():
            return lib.liger_fused_linear_cross_entropy(hidden, weight, targets)
    elif impl == "cut-cross-entropy (loss only)":
        lib = peer(impl, device)

        def loss_fn():
            return lib.linear_cross_entropy(hidden, weight, targets)
    elif impl == "fused":
        def loss_fn():
            seed[0] += 1
            return electra_fast.mlm_loss_and_sample(hidden, weight, targets, seed=seed[0])[0]
    else:
        def loss_fn():
            return eager_mlm_loss_and_sample(hidden, weight, None, targets)[0]

    def step():
        loss = loss_fn()
        loss.backward()
        hidden.grad = weight.grad = None
        return loss

    return probed(impl, step)


@pytest.mark.parametrize("impl", ["fused", "eager", "liger-kernel (loss only)", "cut-cross-entropy (loss only)"])
@pytest.mark.parametrize("n,e,v", MLM_SHAPES)
def test_mlm_loss_peers(benchmark, device, dtype, mlm_step, impl, n, e, v):
    run(benchmark, mlm_step, device=device, op="mlm loss (peers)", impl=impl, pass_="fwd+bwd", shape=f"{n}x{e}x{v}",
        dtype=dtype, tokens=n, **ROUNDS)
