"""Token masking: fused (the backend serving the device) vs the eager formulation of the same strategy.

bernoulli: the ops of transformers' DataCollatorForLanguageModeling.torch_mask_tokens (BERT 80/10/10);
count: ELECTRA-style exact per-row counts with torch.rand + argsort (85 % [MASK] / 15 % kept).
Both sides build the generator input, the labels and the mask from the same ids / attention mask.
"""
import pytest
import torch

import electra_fast
from conftest import QUICK, run

SHAPES = [(256, 512)] if QUICK else [(256, 512), (64, 2048)]
VOCAB, PAD, CLS, SEP, MASK = 30522, 0, 101, 102, 103
SPECIALS = (PAD, CLS, SEP, MASK)
PRESET = {"bernoulli": dict(mask_token_frac=0.8, random_token_frac=0.1),   # BERT
          "count": dict(mask_token_frac=0.85, random_token_frac=0.0)}      # ELECTRA


def inputs(b, t, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, VOCAB, (b, t), generator=g)
    lengths = torch.randint(int(t * 0.8), t + 1, (b,), generator=g)  # some padding, as in real batches
    mask = torch.arange(t)[None, :] < lengths[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids = torch.where(mask, ids, PAD)
    return ids.to(device), mask.to(device)


def eager_bernoulli(ids, mask, specials, mask_prob=0.15):
    """transformers' DataCollatorForLanguageModeling.torch_mask_tokens, with a tensor special-token test."""
    inputs, labels = ids.clone(), ids.clone()
    probability_matrix = torch.full(labels.shape, mask_prob, device=ids.device)
    special_tokens_mask = torch.isin(labels, specials) | ~mask
    probability_matrix.masked_fill_(special_tokens_mask, value=0.0)
    masked_indices = torch.bernoulli(probability_matrix).bool()
    labels[~masked_indices] = -100
    indices_replaced = torch.bernoulli(torch.full(labels.shape, 0.8, device=ids.device)).bool() & masked_indices
    inputs[indices_replaced] = MASK
    indices_random = (torch.bernoulli(torch.full(labels.shape, 0.5, device=ids.device)).bool() & masked_indices
                      & ~indices_replaced)
    random_words = torch.randint(VOCAB, labels.shape, dtype=torch.long, device=ids.device)
    inputs[indices_random] = random_words[indices_random]
    return inputs, labels, masked_indices


def eager_count(ids, mask, specials, mask_prob=0.15):
    """Exactly round(mask_prob * n_real) candidates per row: rand + argsort ranks, then 85 % [MASK]."""
    cand = mask & ~torch.isin(ids, specials)
    n = torch.minimum(cand.sum(1), (mask.sum(1) * mask_prob).round().long().clamp(min=1))
    keys = torch.rand(ids.shape, device=ids.device).masked_fill_(~cand, 2.0)
    ranks = keys.argsort(1).argsort(1)
    masked = ranks < n[:, None]
    labels = torch.where(masked, ids, -100)
    replace = masked & (torch.rand(ids.shape, device=ids.device) < 0.85)
    return torch.where(replace, MASK, ids), labels, masked


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("strategy", ["count", "bernoulli"])
@pytest.mark.parametrize("b,t", SHAPES)
def test_mask_tokens(benchmark, device, impl, strategy, b, t):
    ids, mask = inputs(b, t, device)
    specials = torch.tensor(SPECIALS, device=device)
    eager = eager_count if strategy == "count" else eager_bernoulli
    seeds = iter(range(10 ** 9))

    def step():
        if impl == "eager":
            return eager(ids, mask, specials)
        return electra_fast.mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, seed=next(seeds),
                                        special_token_ids=SPECIALS, attention_mask=mask, strategy=strategy,
                                        **PRESET[strategy])

    run(benchmark, step, device=device, op=f"mask_tokens[{strategy}]", impl=impl, pass_="fwd", shape=f"{b}x{t}",
        dtype=ids.dtype, tokens=b * t, rounds=5 if QUICK else 30)
