"""Seeds: the one owner of their ranges, their check, how a seed is drawn when the caller gives none, and how a
training job derives one per step, rank and micro-batch (:func:`derive_seed`).

Every op's ``seed`` is an int in [0, SEED_LIMIT). Dropout's Philox key may use all 64 bits ([0, KEY_LIMIT)) and its
``stream`` (the counter's fourth word) is an int in [0, STREAM_LIMIT). The randomness contract: DESIGN.md and
electra_fast/reference/philox.py.
"""
from __future__ import annotations

import numbers
import sys

import torch

SEED_LIMIT = 2 ** 63
KEY_LIMIT = 2 ** 64
STREAM_LIMIT = 2 ** 32
MASK64 = KEY_LIMIT - 1


def check(seed, name: str = "seed", limit: int = SEED_LIMIT) -> int:
    """``seed`` as a Python int in [0, limit): an int, a NumPy integer or a one-element integer tensor; a bool, a
    float or anything else is a TypeError, an int out of range a ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        if isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.is_floating_point() \
                and seed.dtype != torch.bool:
            seed = int(seed.item())
        else:
            raise TypeError(f"{name}: expected an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < limit:
        raise ValueError(f"{name}: expected an int in [0, 2**{limit.bit_length() - 1}), got {seed}")
    return seed


def not_drawable() -> "str | None":
    """Why :func:`draw` cannot give a seed per call here (None: it can): under torch.jit.trace the seed would be a
    constant of the trace, one dropout or masking pattern for every later call; under torch.export its value is read
    on the host, which export cannot trace."""
    if torch.jit.is_tracing():
        return ("torch.jit.trace: a random seed drawn here would be frozen into the trace (the same dropout or masking "
                "pattern on every call); pass seed= where the call takes one, trace dropout layers in eval mode, or "
                "use torch.compile")
    if torch.compiler.is_exporting():
        return ("torch.export: a random seed cannot be drawn in an exported graph (its value is read on the host); "
                "export this module in eval mode, or use torch.compile")
    return None


def drawable() -> bool:
    """Whether :func:`draw` gives a seed per call here (:func:`not_drawable`). Where it does not, the callers with a
    torch op for the same randomness (torch's dropout, SDPA's) use it; it draws anew at each call of the graph."""
    return not_drawable() is None


def draw() -> int:
    """A seed in [0, SEED_LIMIT - 1) from torch's default generator: reproducible under ``torch.manual_seed``,
    compiled or not (a graph break under ``torch.compile``). A RuntimeError saying :func:`not_drawable`'s reason,
    raised here, outside the disabled draw, where a strict torch.export traces it (dynamo's "Skip calling
    torch.compiler.disable()'d function" said nothing of why)."""
    why = not_drawable()
    if why is not None:
        raise RuntimeError(why)
    if torch.compiler.is_compiling() or "torch._dynamo" in sys.modules:  # a compiled caller is possible
        from ._seed_outside_graphs import drawn_outside_graphs
        return drawn_outside_graphs()
    return drawn_here()


def drawn_here() -> int:
    return int(torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64).item())


def as_int64(seed: int) -> int:
    """A 64-bit key as the int64 an op schema carries (two's complement; the kernels read the bits)."""
    return seed - KEY_LIMIT if seed >= 2 ** 63 else seed


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """A seed in [0, 2**63) mixing ``seed`` with ``parts`` (step, rank, micro-batch) through SplitMix64."""
    x = _splitmix64(seed & MASK64)
    for p in parts:
        x = _splitmix64(x ^ (p & MASK64))
    return x >> 1
