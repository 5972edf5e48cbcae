"""electra_fast.gumbel_sample and electra_fast.mlm_loss_and_sample: Gumbel-max sampling of replacement
tokens, standalone or fused with the generator's vocabulary projection and MLM cross-entropy.

Ops (torch.library custom ops with fake kernels, each routed to triton / cpp / reference):
  ``electra_fast::gumbel_sample``          logits [N, V] -> int64 [N]
  ``electra_fast::mlm_loss_sample_fwd``    streams over the vocabulary in chunks: per-row loss, lse, sample, argmax
  ``electra_fast::mlm_loss_sample_bwd``    recomputes each logits chunk: dhidden, dweight, dbias
Semantics, noise layout and shapes: electra_fast/reference/sampling.py.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _backend, _seed, _validate
from ..reference import sampling as ref
from ._autograd import AutogradOp, no_autocast

GUMBEL_SPEC = _backend.register(_backend.OpSpec("gumbel_sample", reference=ref, cpp={"sample": "gumbel_sample"},
                                                triton="sampling"))
MLM_SPEC = _backend.register(_backend.OpSpec(
    "mlm_loss_and_sample", reference=ref, triton="sampling",
    cpp={"forward": "mlm_loss_sample_fwd", "backward": "mlm_loss_sample_bwd"}))

REDUCTIONS = ("none", "sum", "mean")
CHUNK_MIN, CHUNK_MAX = 2048, 8192
_FP32_MAX = 3.4028234663852886e38


def vocab_chunk(n_rows: int, embed: int, vocab: int) -> int:
    """Vocabulary columns per streamed chunk. Liger's fused-linear-cross-entropy rule (a logits chunk about
    the size of hidden, i.e. ~E columns) is scaled up to ~32 E columns, clamped to [CHUNK_MIN, CHUNK_MAX]:
    CPU BLAS ran [2458, 128] @ [128, 256] chunks 7x slower than one big matmul, 2048-4096 columns at full
    speed. Peak extra memory stays O(N x chunk + V x E) (N = 2458, E = 128: a 40 MB chunk vs 300 MB logits)."""
    embed, vocab = int(embed), int(vocab)  # sizes torch.jit.trace hands over as tensors
    return max(1, min(vocab, max(CHUNK_MIN, min(CHUNK_MAX, 1 << max(32 * embed - 1, 0).bit_length()))))


# --------------------------------------------------------------------------------------------- ops
def _sample(logits: torch.Tensor, disallowed: Optional[torch.Tensor], seed: int,
            inv_temperature: float) -> torch.Tensor:
    impl = GUMBEL_SPEC.implementation("sample", logits.device)
    return impl(logits, disallowed, seed, inv_temperature)


def _sample_fake(logits, disallowed, seed, inv_temperature):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


_GUMBEL_OP = AutogradOp("gumbel_sample", _sample, _sample_fake)


def _mlm_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                 disallowed: Optional[torch.Tensor], seed: int, inv_temperature: float, ignore_index: int,
                 chunk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = MLM_SPEC.implementation("forward", hidden.device)
    with no_autocast(hidden):  # fp32 accumulation on every backend (autocast made the reference's logits bf16)
        return impl(hidden, weight, bias, targets, disallowed, seed, inv_temperature, ignore_index, chunk)


def _mlm_forward_fake(hidden, weight, bias, targets, disallowed, seed, inv_temperature, ignore_index, chunk):
    n, acc = hidden.shape[0], ref.acc_dtype(hidden.dtype)
    return (hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc),
            hidden.new_empty((n,), dtype=torch.int64), hidden.new_empty((n,), dtype=torch.int64))


def _mlm_backward(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  targets: torch.Tensor, lse: torch.Tensor, ignore_index: int,
                  chunk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = MLM_SPEC.implementation("backward", hidden.device)
    with no_autocast(hidden):
        return impl(grad_rows, hidden, weight, bias, targets, lse, ignore_index, chunk)


def _mlm_backward_fake(grad_rows, hidden, weight, bias, targets, lse, ignore_index, chunk):
    return torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty((weight.shape[0],))


def _mlm_setup(ctx, inputs, output):
    hidden, weight, bias, targets, _disallowed, _seed, _inv_t, ignore_index, chunk = inputs
    ctx.ignore_index, ctx.chunk, ctx.has_bias = ignore_index, chunk, bias is not None
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])


def _mlm_grads(ctx, grad_outputs, backward):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    grad_rows = grad_outputs[0]
    if grad_rows is None:
        grad_rows = torch.zeros_like(lse)
    dh, dw, db = backward(grad_rows.to(lse.dtype).contiguous(), hidden, weight, bias, targets, lse,
                          ctx.ignore_index, ctx.chunk)
    return dh, dw, (db.to(bias.dtype) if ctx.has_bias else None), None, None, None, None, None, None


# eager=False: the custom ops on every call, as before the builder (this op has no eager twin yet)
_MLM_OP = AutogradOp("mlm_loss_sample_fwd", _mlm_forward, _mlm_forward_fake, setup=_mlm_setup, grads=_mlm_grads,
                     backward=_mlm_backward, backward_fake=_mlm_backward_fake, backward_name="mlm_loss_sample_bwd",
                     eager=False)


# ------------------------------------------------------------------------------------- validation
def _inv_temperature(temperature) -> float:
    inv = 1.0 / _validate.real("temperature", temperature, 0.0, math.inf, lo_open=True)
    if inv > _FP32_MAX:
        raise ValueError(f"temperature: {temperature} is too small (1 / temperature overflows fp32)")
    # a subnormal fp32 reciprocal is 0 where denormals are flushed (and 0 beyond 2^150 anywhere): -inf logits * 0
    # are NaN, which wins the argmax
    if inv < 2.0 ** -126:
        raise ValueError(f"temperature: {temperature} is too large (1 / temperature is below fp32's normal range)")
    return inv


def _disallowed_mask(disallowed_ids, vocab: int, device: torch.device) -> Optional[torch.Tensor]:
    """uint8 [V] on ``device`` (1 = never drawn) from a sequence / tensor of int ids, or None when there are none."""
    if isinstance(disallowed_ids, torch.Tensor):
        if disallowed_ids.dtype not in _validate.INT_DTYPES:
            raise TypeError(f"disallowed_ids: integer dtype required: expected int ids, got a {disallowed_ids.dtype} "
                            "tensor")
        if disallowed_ids.device.type == "meta" and device.type != "meta":
            raise ValueError(f"disallowed_ids: a meta tensor holds no ids; pass them as a list or a tensor on "
                             f"{device} (that of the logits)")
        ids = disallowed_ids.reshape(-1).to(device=device, dtype=torch.int64)  # a few ids: moved, not rejected
        check = _validate.inspectable(disallowed_ids, ids)
    else:
        ids_list = _validate.int_ids("disallowed_ids", disallowed_ids)
        bad = [i for i in ids_list if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"disallowed_ids: ids must lie in [0, {vocab}), got {bad[:5]}")
        if len(set(ids_list)) >= vocab:
            raise ValueError(f"disallowed_ids: disallows every one of the {vocab} tokens")
        ids = torch.tensor(ids_list, dtype=torch.int64, device=device)
        check = False  # checked above, without a device sync
    if ids.numel() == 0:
        return None
    if check and bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"disallowed_ids: ids must lie in [0, {vocab})")
    mask = torch.zeros(vocab, dtype=torch.uint8, device=device)
    mask[ids] = 1
    if check and bool(mask.all()):
        raise ValueError(f"disallowed_ids: disallows every one of the {vocab} tokens")
    return mask


# ----------------------------------------------------------------------------------- public API
def gumbel_sample(logits: torch.Tensor, *, seed: int, temperature: float = 1.0,
                  disallowed_ids: Union[Sequence[int], torch.Tensor] = ()) -> torch.Tensor:
    """One token per row by Gumbel-max: ``argmax_v(logits[n, v] / temperature + g[n, v])``.

    Args:
        logits: float [N, V] (fp32 / fp64 / fp16 / bf16). The scores are computed in fp32.
        seed: int in [0, 2**63); the noise of element (n, v) is Philox keyed by ``(seed, n * V + v)``
            (layout: electra_fast/reference/philox.py), identical on every backend and device.
        temperature: > 0; applied as ``logits * fp32(1 / temperature)``.
        disallowed_ids: int ids in [0, V) that are never drawn (not all of them): a sequence of ints or an
            integer tensor (on any device; it is moved to that of ``logits``).

    Returns:
        int64 [N] sampled ids (no gradient), never a disallowed one. Ties go to the smallest id. Non-finite
        logits (identical on every backend; electra_fast/reference/sampling.py): a NaN logit at an allowed id
        draws the smallest such id (the row is invalid), a row whose allowed logits are all -inf draws its
        smallest allowed id.
    """
    _validate.floating("logits", logits)
    _validate.rank("logits", logits, 2, "[N, V]")
    if logits.shape[1] == 0:
        raise ValueError("logits: expected V >= 1 columns, got shape " + str(tuple(logits.shape)))
    seed = _seed.check(seed)
    inv_t = _inv_temperature(temperature)
    mask = _disallowed_mask(disallowed_ids, logits.shape[1], logits.device)
    return _GUMBEL_OP(logits.contiguous(), mask, seed, inv_t)


def mlm_loss_and_sample(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        bias: Optional[torch.Tensor] = None, seed: int, temperature: float = 1.0,
                        disallowed_ids: Union[Sequence[int], torch.Tensor] = (), ignore_index: int = -100,
                        reduction: str = "mean", return_metrics: bool = False):
    """The generator's vocabulary projection, MLM cross-entropy and Gumbel sampling in one streamed pass.

    ``logits = hidden @ weight.T + bias`` (fp32 accumulation) is never materialised: the vocabulary is
    processed in chunks of :func:`vocab_chunk` columns, and backward recomputes each chunk.

    Args:
        hidden: float [N, E] generator hidden states at the masked positions.
        weight: [V, E] output embedding, same dtype and device as ``hidden``.
        targets: int [N] original ids in [0, V), or ``ignore_index`` (no loss; still sampled).
        bias: [V] or None.
        seed, temperature, disallowed_ids: as :func:`gumbel_sample`; for the same seed ``sampled``
            equals ``gumbel_sample(hidden @ weight.T + bias, ...)`` up to float rounding at near-ties.
        reduction: "mean" (over non-ignored rows; none -> 0), "sum" or "none" ([N], 0 at ignored rows).
        return_metrics: also return ``{"accuracy": fp32 fraction of non-ignored rows whose argmax is the
            target, "correct": bool [N], that per row (False at ignored rows)}``.

    Returns:
        ``(loss, sampled)`` or ``(loss, sampled, metrics)``; loss fp32 (fp64 for fp64 inputs), sampled
        int64 [N]. Gradients flow to hidden, weight and bias. A non-ignored row whose logits hold a NaN has a
        NaN loss (so the mean is NaN: the problem shows); its sample follows :func:`gumbel_sample`'s rules.
    """
    _validate.floating("hidden", hidden)
    _validate.floating("weight", weight)
    _validate.rank("hidden", hidden, 2, "[N, E]")
    _validate.rank("weight", weight, 2, "[V, E]")
    _validate.same_device("weight", weight, "hidden", hidden)
    _validate.same_dtype("weight", weight, "hidden", hidden)
    n, e = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != e:
        raise ValueError(f"weight: expected shape [V, {e}] (E from hidden {tuple(hidden.shape)}), "
                         f"got {tuple(weight.shape)}")
    if v == 0:
        raise ValueError("weight: expected V >= 1 rows, got shape " + str(tuple(weight.shape)))
    if bias is not None:
        _validate.floating("bias", bias)
        _validate.same_device("bias", bias, "hidden", hidden)
        if bias.shape != (v,):
            raise ValueError(f"bias: expected shape ({v},) (V from weight), got {tuple(bias.shape)}")
        _validate.same_dtype("bias", bias, "hidden", hidden)
    _validate.ids("targets", targets)
    if targets.shape != (n,):
        raise ValueError(f"targets: expected shape ({n},) (N from hidden), got {tuple(targets.shape)}")
    _validate.same_device("targets", targets, "hidden", hidden)
    _validate.integer_arg("ignore_index", ignore_index)
    if targets.dtype == torch.int32 and not -2 ** 31 <= ignore_index < 2 ** 31:
        # torch compares an int32 tensor with a wrapped scalar (2**32 + 3 would ignore target 3), the kernels don't
        raise ValueError(f"ignore_index: {ignore_index} is outside int32 targets' range [-2**31, 2**31)")
    _validate.choice("reduction", reduction, REDUCTIONS)
    if n > 0 and _validate.inspectable(targets):
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            raise ValueError(f"targets: expected ids in [0, {v}) or ignore_index={ignore_index}, "
                             f"got {targets[bad][:5].tolist()}")
    seed = _seed.check(seed)
    inv_t = _inv_temperature(temperature)
    mask = _disallowed_mask(disallowed_ids, v, hidden.device)
    loss_rows, _lse, sampled, argmax = _MLM_OP(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), targets.contiguous(),
        mask, seed, inv_t, ignore_index, vocab_chunk(n, e, v))
    valid = targets != ignore_index
    if reduction == "none":
        loss = loss_rows
    else:
        loss = loss_rows.sum()
        if reduction == "mean":
            loss = loss / valid.sum().clamp(min=1).to(loss.dtype)
    if not return_metrics:
        return loss, sampled
    correct = (argmax == targets) & valid
    return loss, sampled, {"accuracy": correct.sum().float() / valid.sum().clamp(min=1).float(), "correct": correct}
