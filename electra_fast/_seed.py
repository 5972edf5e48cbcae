"""Seeds: the one owner of their ranges, their check and how a seed is drawn when the caller gives none.

Every op's ``seed`` is an int in [0, SEED_LIMIT). Dropout's Philox key may use all 64 bits ([0, KEY_LIMIT)) and its
``stream`` (the counter's fourth word) is an int in [0, STREAM_LIMIT). The randomness contract: DESIGN.md and
electra_fast/reference/philox.py.
"""
from __future__ import annotations

import torch

SEED_LIMIT = 2 ** 63
KEY_LIMIT = 2 ** 64
STREAM_LIMIT = 2 ** 32


def check(seed, name: str = "seed", limit: int = SEED_LIMIT) -> int:
    """``seed`` as a Python int in [0, limit): an int or a one-element integer tensor; a bool, a float or
    anything else is a TypeError, an int out of range a ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        if isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.is_floating_point():
            seed = int(seed.item())
        else:
            raise TypeError(f"{name}: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < limit:
        raise ValueError(f"{name}: expected an int in [0, 2**{limit.bit_length() - 1}), got {seed}")
    return seed


def draw() -> int:
    """A seed in [0, SEED_LIMIT - 1) from torch's default generator: reproducible under ``torch.manual_seed``."""
    return int(torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64).item())


def as_int64(seed: int) -> int:
    """A 64-bit key as the int64 an op schema carries (two's complement; the kernels read the bits)."""
    return seed - KEY_LIMIT if seed >= 2 ** 63 else seed
