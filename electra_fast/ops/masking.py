"""electra_fast.mask_tokens: fused MLM / ELECTRA token masking (selection + replacement + labels).

Op: ``electra_fast::mask_tokens`` (torch.library custom op with a fake kernel, so it traces under
torch.compile; no gradient), routed to triton / cpp / reference. Semantics, the random stream and
every rounding rule: electra_fast/reference/masking.py. Outputs are bit-identical across backends.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _backend, _seed, _validate
from ..reference import masking as ref
from ._autograd import AutogradOp
from ._cached import constant_tensors

STRATEGIES = ("count", "bernoulli")
SPEC = _backend.register(_backend.OpSpec("mask_tokens", reference=ref, cpp={"forward": "mask_tokens"},
                                         triton="masking"))


class MaskedTokens(NamedTuple):
    """:func:`mask_tokens`' result: ``input_ids`` [B, T] in the input's dtype (the generator's input: [MASK], a
    random or the kept token at selected positions), ``labels`` int64 [B, T] (the original id where selected,
    -100 elsewhere), ``masked`` bool [B, T] (the selected positions)."""

    input_ids: torch.Tensor  # [B, T], dtype of the input: the generator's input
    labels: torch.Tensor     # int64 [B, T]: original id where masked, -100 elsewhere
    masked: torch.Tensor     # bool [B, T]: the selected positions


@constant_tensors
def _count_table(mask_prob: float, T: int, device: torch.device) -> torch.Tensor:
    return ref.count_table(mask_prob, T).to(device)


@constant_tensors
def _specials(specials: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(specials, dtype=torch.int64).to(device)


def _check_first_starts(starts: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """ValueError unless each row's first real token starts a word (starts, mask: uint8 [B, T]; mask may be None):
    a row whose first word has no start would never be masked, nor would an inverted (continuation) flag tensor."""
    real = mask.bool() if mask is not None else torch.ones_like(starts, dtype=torch.bool)
    first = real.to(torch.uint8).argmax(1, keepdim=True)  # first real token (0 for an all-padding row)
    bad_rows = (real.any(1) & ~starts.bool().gather(1, first).squeeze(1)).nonzero().flatten()
    if bad_rows.numel():
        raise ValueError(f"word_starts: the first real token of each row must start a word; rows "
                         f"{bad_rows[:8].tolist()} do not")


def check_word_starts(word_starts: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None) -> None:
    """:func:`mask_tokens`' checks of ``word_starts`` (bool / int [B, T], input_ids' shape and device), for a caller
    that runs it with ``validate=False`` after checking the ids itself."""
    mask = _validate.mask_as_uint8("attention_mask", attention_mask, "input_ids", input_ids)
    starts = _validate.mask_as_uint8("word_starts", word_starts, "input_ids", input_ids, what="True = a word starts")
    if _validate.inspectable(input_ids, mask, starts):
        _check_first_starts(starts, mask)


def _forward(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], word_starts: Optional[torch.Tensor],
                 specials: List[int], seed: int, mask_token_id: int, n_random: int, mask_prob: float,
                 sel_thr: int, mask_thr: int, rand_thr: int, count: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = input_ids.shape[1]
    if input_ids.numel() == 0:
        return (input_ids.clone(), torch.full_like(input_ids, ref.IGNORE_INDEX, dtype=torch.int64),
                torch.zeros_like(input_ids, dtype=torch.bool))
    dev = input_ids.device
    impl = SPEC.implementation("forward", dev, T=T)
    table = _count_table(mask_prob, T, dev) if count else _count_table(0.0, 0, dev)
    return impl(input_ids, attention_mask, word_starts, _specials(tuple(specials), dev), table, seed, mask_token_id,
                n_random, sel_thr, mask_thr, rand_thr, count)


def _fake(input_ids, attention_mask, word_starts, specials, seed, mask_token_id, n_random, mask_prob, sel_thr, mask_thr,
      rand_thr, count):
    return (torch.empty_like(input_ids), torch.empty_like(input_ids, dtype=torch.int64),
            torch.empty_like(input_ids, dtype=torch.bool))


_OP = AutogradOp("mask_tokens", _forward, _fake)  # no gradient: the custom op on every call


def mask_tokens(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int, seed: int,
                mask_prob: float = 0.15, mask_token_frac: float = 0.85, random_token_frac: float = 0.0,
                special_token_ids: Sequence[int] = (), attention_mask: Optional[torch.Tensor] = None,
                word_starts: Optional[torch.Tensor] = None, strategy: str = "count",
                validate: bool = True) -> MaskedTokens:
    """Choose positions to corrupt and build the generator's input and MLM labels in one pass.

    Args:
        input_ids: int32 / int64 [B, T] token ids in [0, vocab_size).
        mask_token_id: the [MASK] id, in [0, vocab_size).
        vocab_size: ids are in [0, vocab_size); random replacements are drawn from there.
        seed: int in [0, 2**63); the same seed gives the same result on every backend and device.
        mask_prob: share of real tokens to select ("count") or per-unit probability ("bernoulli").
        mask_token_frac: of the selected positions, the share replaced by ``mask_token_id``.
        random_token_frac: of the selected positions, the share replaced by a random non-special token.
            The rest keeps the original id. ELECTRA: (0.85, 0.0) (the default); BERT: (0.8, 0.1).
        special_token_ids: ids never selected and never drawn as random tokens ([CLS], [SEP], [PAD], ...).
        attention_mask: bool / int [B, T], 0 = padding (never selected), or None.
        word_starts: bool / int [B, T], True where a word begins (whole-word masking), or None.
            The first real token of each row must be a start.
        strategy: "count" (exactly ``min(n_candidates, max(1, min(N, round(mask_prob * n_real))))`` tokens per
            row, without replacement: ELECTRA's count, round half to even, N = ``int((mask_prob + 0.005) * T)``) or "bernoulli" (each candidate unit independently with ``mask_prob``).
        validate: check the data-dependent conditions (id range, word starts); each check synchronises
            a GPU, so a training loop with trusted data may turn it off.

    Returns:
        MaskedTokens(input_ids [B, T] dtype of input, labels int64 [B, T] (-100 = not selected), masked bool [B, T]).
    """
    _validate.ids("input_ids", input_ids)
    _validate.rank("input_ids", input_ids, 2, "[B, T]")
    vocab_size = _validate.integer_arg("vocab_size", vocab_size)
    if not 1 <= vocab_size < 2 ** 31:
        raise ValueError(f"vocab_size: expected an int in [1, 2**31), got {vocab_size}")
    mask_token_id = _validate.integer_arg("mask_token_id", mask_token_id)
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id: expected an id in [0, vocab_size={vocab_size}), got {mask_token_id}")
    seed = _seed.check(seed)
    mask_prob = _validate.probability("mask_prob", mask_prob, one=True)
    mask_token_frac = _validate.probability("mask_token_frac", mask_token_frac, one=True)
    random_token_frac = _validate.probability("random_token_frac", random_token_frac, one=True)
    if mask_token_frac + random_token_frac > 1.0 + 1e-12:
        raise ValueError(f"random_token_frac: mask_token_frac + random_token_frac must be <= 1, got "
                         f"{mask_token_frac} + {random_token_frac}")
    if isinstance(special_token_ids, torch.Tensor):
        special_token_ids = special_token_ids.flatten().tolist()
    specials = sorted(set(_validate.int_ids("special_token_ids", special_token_ids)))  # NumPy ints too, as elsewhere
    bad = [s for s in specials if not 0 <= s < vocab_size]
    if bad:
        raise ValueError(f"special_token_ids: expected ids in [0, vocab_size={vocab_size}), got {bad}")
    n_random = vocab_size - len(specials)
    if random_token_frac > 0 and n_random == 0:
        raise ValueError("special_token_ids: cover the whole vocabulary, so no random token can be drawn "
                         "(random_token_frac > 0)")
    _validate.choice("strategy", strategy, STRATEGIES)
    mask = _validate.mask_as_uint8("attention_mask", attention_mask, "input_ids", input_ids)
    starts = _validate.mask_as_uint8("word_starts", word_starts, "input_ids", input_ids, what="True = a word starts")
    ids = input_ids.contiguous()
    if validate and ids.numel() and _validate.inspectable(ids, mask, starts):
        lo, hi = torch.aminmax(ids)
        if lo.item() < 0 or hi.item() >= vocab_size:
            raise ValueError(f"input_ids: expected ids in [0, vocab_size={vocab_size}), got values in "
                             f"[{lo.item()}, {hi.item()}]")
        if starts is not None:
            _check_first_starts(starts, mask)
    thr = ref.prob_threshold
    out = _OP(ids, mask, starts, specials, seed, mask_token_id, n_random, mask_prob, thr(mask_prob),
                       thr(mask_token_frac), thr(mask_token_frac + random_token_frac), strategy == "count")
    return MaskedTokens(*out)
