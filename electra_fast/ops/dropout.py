"""electra_fast.dropout: counter-based (Philox) dropout that regenerates its mask in the backward.

Op: ``electra_fast::dropout`` (a torch.library custom op with a fake kernel, so it traces under
torch.compile), routed to triton / cpp / reference. Forward and backward are one kernel, ``x * keep * scale``:
the mask is a pure function of ``(seed, stream, element index)``, so nothing is saved for the backward and
the op is its own derivative (its backward is the op applied to the incoming gradient).
"""
from __future__ import annotations

import numbers

import torch

from .. import _backend, _validate
from ..reference import dropout as ref
from ..reference.philox import check_seed

_backend.declare("dropout", cpp=("dropout_apply",), triton="dropout")
SEED_LIMIT = 2 ** 64
STREAM_LIMIT = 2 ** 32


def _as_int64(seed: int) -> int:
    """The 64-bit key as the int64 the op schema carries (two's complement; kernels read the bits)."""
    return seed - SEED_LIMIT if seed >= 2 ** 63 else seed


@torch.library.custom_op("electra_fast::dropout", mutates_args=())
def _dropout(x: torch.Tensor, p: float, seed: int, stream: int) -> torch.Tensor:
    impl = _backend.implementation("dropout", x.device, reference=ref.apply, cpp="dropout_apply",
                                   triton="dropout.apply")
    return impl(x.contiguous(), ref.keep_threshold(p), ref.keep_scale(p), seed, stream)


@_dropout.register_fake
def _(x, p, seed, stream):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, ctx.p, ctx.seed, ctx.stream = inputs  # no tensors: the backward regenerates the mask


def _backward(ctx, grad):
    return _dropout(grad, ctx.p, ctx.seed, ctx.stream), None, None, None


torch.library.register_autograd("electra_fast::dropout", _backward, setup_context=_setup_context)


def dropout(input: torch.Tensor, p: float, seed: int, stream: int = 0) -> torch.Tensor:
    """Dropout whose mask is Philox keyed by ``(seed, stream, element index)``: reproducible from the seed on
    every backend, and nothing is stored for the backward (it regenerates the mask).

    Args:
        input: floating tensor (fp32 / fp64 / fp16 / bf16) of any shape, on any device. Element ``i`` is the
            i-th element of ``input.contiguous()`` (row-major order).
        p: drop probability, a real number in [0, 1). ``p == 0`` returns ``input`` itself.
        seed: int in [0, 2**64), e.g. the training step's seed.
        stream: int in [0, 2**32): one per dropout site of a step (layer / position), so sites draw
            independent masks from one seed.

    Returns:
        A contiguous tensor shaped and typed like ``input``: ``input * fp32(1 / (1 - p))`` (computed in fp32,
        fp64 for fp64 input) where kept, exactly 0 where dropped. Element i is kept iff
        ``uniform(w) >= p`` with ``w`` word ``i % 4`` of Philox4x32-10(key = seed, counter =
        (i // 4, DROPOUT = 4, stream)) (electra_fast/reference/philox.py). The gradient flows to ``input``:
        the same mask and scale applied to the incoming gradient.
    """
    _validate.floating("input", input)
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p: expected a real number in [0, 1), got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:  # also rejects NaN
        raise ValueError(f"p: expected a real number in [0, 1), got {p}")
    seed = check_seed(seed, "seed", SEED_LIMIT)
    stream = check_seed(stream, "stream", STREAM_LIMIT)  # the same rule: an int in [0, limit)
    if p == 0.0:
        return input
    return _dropout(input, p, _as_int64(seed), stream)
