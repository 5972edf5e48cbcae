"""One full pretraining step on the GPU (forward + backward + fused AdamW, bf16 autocast) of ELECTRA-small,
ELECTRA-base and DeBERTa-v3-small: the fused model vs the same model on its eager references vs transformers'
models as HF-based ELECTRA trainers use them (the sides and the step are test_bench_pretrain_step.py's, on CUDA
tensors). tokens/s and peak memory per side.

GPU only: on CPU every row is skipped (test_bench_pretrain_step.py is the CPU step), except in the GPU lane's dry
run (ELECTRA_FAST_GPU_LANE_DRY_RUN=1), which runs one-layer versions on CPU in fp32 for one round.
"""
import os

import pytest
import torch

from conftest import QUICK, run
from electra_fast.models import ElectraConfig

DRY_RUN = os.environ.get("ELECTRA_FAST_GPU_LANE_DRY_RUN", "0") == "1"
if not DRY_RUN and not torch.cuda.is_available():  # before the transformers imports: CPU benches stay cheap
    pytest.skip("GPU rows: no CUDA device is visible", allow_module_level=True)

from test_bench_pretrain_step import _batch, _step_fn  # noqa: E402

TINY = dict(hidden_size=64, embedding_size=64, generator_hidden_size=64, num_attention_heads=2,
            generator_num_attention_heads=2, intermediate_size=128, generator_intermediate_size=128,
            num_hidden_layers=1, generator_num_hidden_layers=1)

# preset -> (batch, sequence length)
if DRY_RUN:
    CASES = {"deberta_v3_small": (2, 32)}
elif QUICK:
    CASES = {"electra_small": (128, 128), "deberta_v3_small": (16, 512)}
else:
    CASES = {"electra_small": (128, 128), "electra_base": (32, 512), "deberta_v3_small": (32, 512)}


def config(preset: str) -> ElectraConfig:
    cfg = getattr(ElectraConfig, preset)()
    if DRY_RUN:  # one layer, hidden 64, a 1000-token vocabulary
        cfg = cfg.replace(**TINY, vocab_size=1000, mask_token_id=999 if cfg.disentangled else cfg.mask_token_id)
    return cfg


@pytest.mark.parametrize("impl", ["fused", "eager", "transformers"])
@pytest.mark.parametrize("preset", list(CASES))
def test_gpu_pretrain_step(benchmark, device, preset, impl):
    if device.type != "cuda" and not DRY_RUN:
        pytest.skip("GPU rows: the CPU step is test_bench_pretrain_step.py")
    b, t = CASES[preset]
    cfg = config(preset)
    dtype = "bf16-autocast" if device.type == "cuda" else "fp32"
    torch.manual_seed(0)
    ids, mask = (x.to(device) for x in _batch(cfg, b, t))
    rounds = dict(rounds=1, warmup=0) if DRY_RUN else (dict(rounds=2, warmup=1) if QUICK else dict(rounds=5, warmup=2))
    run(benchmark, _step_fn(cfg, impl, ids, mask, dtype), device=device, op=f"pretrain_step[{preset}]", impl=impl,
        pass_="fwd+bwd+adamw", shape=f"{b}x{t}", dtype=dtype, tokens=b * t, **rounds)
