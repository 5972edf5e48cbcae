"""electra_fast.dropout: counter-based (Philox) dropout that regenerates its mask in the backward.

Op: ``electra_fast::dropout`` (a torch.library custom op with a fake kernel, so it traces under
torch.compile), routed to triton / cpp / reference. Forward and backward are one kernel, ``x * keep * scale``:
the mask is a pure function of ``(seed, stream, element index)``, so nothing is saved for the backward and
the op is its own derivative (its backward is the op applied to the incoming gradient).
"""
from __future__ import annotations

import torch

from .. import _backend, _seed, _validate
from ..reference import dropout as ref
from ._autograd import AutogradOp

SPEC = _backend.register(_backend.OpSpec("dropout", reference=ref, cpp={"apply": "dropout_apply"}, triton="dropout"))
SEED_LIMIT = _seed.KEY_LIMIT  # moved to electra_fast/_seed.py; these names stay for callers
STREAM_LIMIT = _seed.STREAM_LIMIT


def _apply(x: torch.Tensor, p: float, seed: int, stream: int) -> torch.Tensor:
    impl = SPEC.implementation("apply", x.device)
    return impl(x.contiguous(), ref.keep_threshold(p), ref.keep_scale(p), seed, stream)


def _fake(x, p, seed, stream):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    _, ctx.p, ctx.seed, ctx.stream = inputs  # no tensors: the backward regenerates the mask


def _grads(ctx, grad_outputs, op):
    return op(grad_outputs[0], ctx.p, ctx.seed, ctx.stream), None, None, None


# eager=False: the backward is the op itself, so the custom op also has a double backward
_OP = AutogradOp("dropout", _apply, _fake, setup=_setup, grads=_grads, eager=False)


def dropout(input: torch.Tensor, p: float, seed: int, stream: int = 0) -> torch.Tensor:
    """Dropout whose mask is Philox keyed by ``(seed, stream, element index)``: reproducible from the seed on
    every backend, and nothing is stored for the backward (it regenerates the mask).

    Args:
        input: floating tensor (fp32 / fp64 / fp16 / bf16) of any shape, on any device. Element ``i`` is the
            i-th element of ``input.contiguous()`` (row-major order).
        p: drop probability, a real number in [0, 1]. ``p == 0`` returns ``input`` itself, ``p == 1``
            ``input * 0`` (as ``torch.nn.functional.dropout``: zeros, NaN where ``input`` is not finite).
        seed: int in [0, 2**64), e.g. the training step's seed.
        stream: int in [0, 2**32): one per dropout site of a step (layer / position), so sites draw
            independent masks from one seed.

    Returns:
        A tensor shaped and typed like ``input`` (contiguous for 0 < p < 1; ``input`` itself for p = 0):
        ``input * fp32(1 / (1 - p))`` (computed in fp32, fp64 for fp64 input) where kept, exactly 0 where dropped.
        Element i is kept iff
        ``uniform(w) >= p`` with ``w`` word ``i % 4`` of Philox4x32-10(key = seed, counter =
        (i // 4, DROPOUT = 4, stream)) (electra_fast/reference/philox.py). The gradient flows to ``input``:
        the same mask and scale applied to the incoming gradient.
    """
    _validate.floating("input", input)
    p = _validate.probability("p", p, one=True)
    seed = _seed.check(seed, "seed", _seed.KEY_LIMIT)
    stream = _seed.check(stream, "stream", _seed.STREAM_LIMIT)  # the same rule: an int in [0, limit)
    if p == 0.0:
        return input
    if p == 1.0:  # every element dropped: torch's answer (the kept scale 1 / (1 - p) is infinite)
        return input * 0
    return _OP(input, p, _seed.as_int64(seed), stream)
