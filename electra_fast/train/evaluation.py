"""``--eval-every``: a fixed held-out slice of the corpus, never trained on, and the model's numbers on it.

The slice is ``heldout_count(n)`` packed sequences drawn by a fixed seed (``HELDOUT_SEED``, not ``--seed``), and its
corruption uses fixed seeds too, so held-out numbers compare across steps and across runs on the same corpus and
``--seq-len``. Training then reads only the other sequences (:class:`SplitSampler`). Evaluation runs the unwrapped
model in eval mode (no dropout) under ``no_grad`` inside ``torch.random.fork_rng``: it changes no state a training
step depends on, so exact resume holds with it on.

Besides the discriminator's metrics (:mod:`.metrics`) it reports the generator's MLM accuracy (argmax at the
masked positions) next to the unigram baseline: always guessing the training sequences' most frequent
non-special token; and both again at the ``[MASK]`` positions alone (``*_mask_accuracy``). The first counts the
selected positions left unmasked (ELECTRA's masking keeps 15 % of them), where the answer is in the input and only
the generator can copy it, so a generator that ignores its context still beats the unigram there; at ``[MASK]`` it
cannot (README, "The default job").
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from .data import Sampler, model_inputs
from .metrics import TokenScores, rtd_metrics

HELDOUT_SEED = 0x48454C44  # "HELD"
HELDOUT_MAX = 128          # sequences: enough for stable AUC / accuracy, cheap next to a training step
# Held-out rows per evaluation batch, whatever --batch-size or the process count: each batch's corruption draw is keyed
# by its index, so with batches of --batch-size rows two runs differing only in it drew differently (AUC 0.536 / 0.523
# / 0.495 at 4 / 8 / 16 on one model): numbers that did not compare. No gradients are kept, so 16 rows fit where a
# training step of fewer did.
EVAL_ROWS = 16
UNIGRAM_MAX_TOKENS = 1 << 24  # training tokens counted for the unigram baseline (a bounded read on huge corpora)


def heldout_count(n: int) -> int:
    """Held-out sequences of an ``n``-sequence corpus: a tenth, at most ``HELDOUT_MAX``, at least 1 (0 when n < 2)."""
    return 0 if n < 2 else max(1, min(HELDOUT_MAX, n // 10))


def split(n: int, count: int):
    """(held-out ids int64 [count], sorted; training ids int64 [n - count], sorted): a fixed-seed draw."""
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    perm = torch.randperm(n, generator=g).numpy()
    return np.sort(perm[:count]), np.sort(perm[count:])


class SplitSampler:
    """:class:`~.data.Sampler`'s seeded endless order over the training ids only (the held-out ones never come)."""

    def __init__(self, train_ids: np.ndarray, seed: int):
        self.train_ids = train_ids
        self._inner = Sampler(len(train_ids), seed)

    def indices(self, pos: int, count: int) -> List[int]:
        return [int(self.train_ids[i]) for i in self._inner.indices(pos, count)]


def unigram_counts(packed, train_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: token counts over the training sequences' bodies (the first ``UNIGRAM_MAX_TOKENS``)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    ids = train_ids[:max(1, UNIGRAM_MAX_TOKENS // packed.body)]
    for start in range(0, len(ids), 4096):
        rows = packed.batch(ids[start:start + 4096])[:, 1:-1]  # [CLS] / [SEP] are never masked
        counts += np.bincount(rows.numpy().ravel(), minlength=vocab_size)[:vocab_size]
    return counts


class HeldOut:
    """The held-out batches (int64 [<= EVAL_ROWS, T] each, built once) and their evaluation."""

    def __init__(self, packed, heldout_ids: np.ndarray, train_ids: np.ndarray, seed_of,
                 special_ids: Sequence[int], vocab_size: int, whole_words: bool = False):
        """``seed_of(i)``: the corruption seed of held-out batch ``i`` (fixed: the numbers must compare);
        ``whole_words``: masked as the training steps are (whole-word masking)."""
        self.ids = heldout_ids
        chunks = [heldout_ids[i:i + EVAL_ROWS] for i in range(0, len(heldout_ids), EVAL_ROWS)]
        self.batches = [model_inputs(packed, c, whole_words) for c in chunks]  # ids, layout (doc-sentences, words)
        self.seeds = [seed_of(i) for i in range(len(self.batches))]
        counts = unigram_counts(packed, train_ids, vocab_size)
        counts[[i for i in special_ids if 0 <= i < vocab_size]] = -1
        self.unigram_token = int(np.argmax(counts))

    @torch.no_grad()
    def evaluate(self, net, device: torch.device, autocast: dict) -> Dict[str, float]:
        """``eval_*`` metrics of ``net`` (an ElectraPretrainingModel) on the held-out slice; ``autocast``: the
        kwargs of the training step's ``torch.autocast``. Leaves ``net`` in the mode it found it in."""
        was_training = net.training
        scores = TokenScores()
        masked = gen_correct = unigram_correct = 0
        at_mask = gen_mask_correct = unigram_mask_correct = 0
        mlm_sum = rtd_sum = 0.0
        tokens = 0
        devices = [device] if device.type == "cuda" else []
        try:
            net.eval()
            with torch.random.fork_rng(devices=devices), torch.autocast(device.type, **autocast):
                for (batch, layout), seed in zip(self.batches, self.seeds):
                    ids = batch.to(device)
                    layout = {k: v.to(device) for k, v in layout.items()}
                    mask = layout.pop("attention_mask", None)
                    out = net(ids, mask, seed=seed, **layout)
                    n_masked = int(out.masked.sum())
                    masked += n_masked
                    gen_correct += int(out.generator_correct.sum())
                    originals = ids[out.masked]
                    unigram_correct += int((originals == self.unigram_token).sum())
                    shown = out.generator_input_ids[out.masked] == net.config.mask_token_id
                    at_mask += int(shown.sum())
                    gen_mask_correct += int((out.generator_correct & shown).sum())
                    unigram_mask_correct += int(((originals == self.unigram_token) & shown).sum())
                    mlm_sum += float(out.mlm_loss) * n_masked
                    real = ids.numel() if mask is None else int(mask.sum())
                    rtd_sum += float(out.rtd_loss) * real
                    tokens += real
                    scores.add(out.discriminator_logits, out.corrupted_ids, ids, mask)
        finally:
            net.train(was_training)
        rec = {f"eval_{k}": v for k, v in rtd_metrics(*scores.tensors()).items()}
        # a ratio over no positions is undefined (null, as an AUC of one class), not 0: --mask-token-frac 0 leaves
        # no [MASK] position, and the "[MASK] alone" accuracies read 0.000
        ratio = lambda part, whole: part / whole if whole else None  # noqa: E731
        rec.update(eval_mlm_loss=ratio(mlm_sum, masked), eval_rtd_loss=ratio(rtd_sum, tokens),
                   eval_generator_accuracy=ratio(gen_correct, masked),
                   eval_unigram_accuracy=ratio(unigram_correct, masked),
                   eval_generator_mask_accuracy=ratio(gen_mask_correct, at_mask),
                   eval_unigram_mask_accuracy=ratio(unigram_mask_correct, at_mask))
        return rec

