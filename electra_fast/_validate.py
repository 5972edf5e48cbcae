"""Argument checks shared by the public ops (every message names the argument and what was expected), and
:func:`reason`, the one-line text of a caught exception that a command reports."""
from __future__ import annotations

import math
import numbers
import os
import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:  # sparse / nested tensors: every kernel reads dense memory
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}")
    return x


def floating(name: str, x, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    tensor(name, x)
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected a floating tensor ({', '.join(str(d) for d in dtypes)}), got {x.dtype}")
    return x


def integer(name: str, x) -> torch.Tensor:
    tensor(name, x)
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor (int32 / int64), got {x.dtype}")
    return x


def same_dtype(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    if x.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {x.dtype}")
    return x


def ids(name: str, x) -> torch.Tensor:
    """An int32 / int64 id tensor (the dtypes the kernels index with)."""
    tensor(name, x)
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an int32 / int64 tensor, got {x.dtype}")
    return x


# ------------------------------------------------------------------------------------------- scalars
# The same mistake raises the same exception in every op: a value of the wrong type is a TypeError, a value of
# the right type outside its range a ValueError.
def integer_arg(name: str, value, minimum: Optional[int] = None) -> int:
    """A Python int (not a bool; a NumPy integer becomes one, as ids and probabilities do) that fits int64 (what the
    kernels take: a larger one ended in "OverflowError: int too big to convert"), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    if not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(f"{name}: expected an int64, got {value}")
    return value


def seq_len_fits(length: int, max_position_embeddings: int) -> None:
    if length > max_position_embeddings:
        raise ValueError(f"input_ids: sequence length {length} exceeds max_position_embeddings "
                         f"= {max_position_embeddings}")


def log_buckets_fit(position_buckets: int, max_relative_positions: int) -> bool:
    """Whether DeBERTa's log position buckets can be built: off (``position_buckets`` <= 0), or at least 2 buckets
    whose linear half (``position_buckets // 2 + 1``) stays below ``max_relative_positions``."""
    return position_buckets <= 0 or (position_buckets >= 2 and max_relative_positions > position_buckets // 2 + 1)


def log_buckets(position_buckets: int, max_relative_positions: int) -> None:
    """Raise a ValueError naming ``position_buckets`` unless :func:`log_buckets_fit`."""
    if not log_buckets_fit(position_buckets, max_relative_positions):
        raise ValueError(f"position_buckets: expected >= 2 and max_relative_positions > position_buckets // 2 + 1 "
                         f"(log buckets), got position_buckets={position_buckets}, "
                         f"max_relative_positions={max_relative_positions}")


def real(name: str, value, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
         hi_open: bool = True) -> float:
    """A real number (int, float, NumPy scalar; not a bool) in the interval from ``lo`` to ``hi`` (NaN never is)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    above = v > lo if lo_open else v >= lo
    below = v < hi if hi_open else v <= hi
    if not (above and below):  # also rejects NaN
        raise ValueError(f"{name}: expected a real number in {'(' if lo_open else '['}{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got {v}")
    return v


def layer_norm_eps(name: str, value) -> float:
    """A LayerNorm epsilon: a real number > 0 that stays > 0 in fp32, where the kernels add it (one that rounds to 0
    gave a constant row NaN); NaN or a negative one made every output NaN."""
    eps = real(name, value, 0.0, math.inf, lo_open=True)
    if eps <= 2.0 ** -150:
        raise ValueError(f"{name}: {eps} rounds to 0 in fp32, where it is added; expected > 2**-150 = 7.0e-46 "
                         "(1e-12 is usual)")
    return eps


def probability(name: str, value, *, one: bool = False) -> float:
    """A probability in [0, 1) (a drop probability), or in [0, 1] with ``one``."""
    return real(name, value, 0.0, 1.0, hi_open=not one)


def capturing() -> bool:
    """Whether a graph is being recorded (torch.compile / torch.export, or torch.jit.trace): a decision read from
    the data here (no padding in this batch, a cached table) would be frozen into the graph for every later input."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def inspectable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether data-dependent checks may read these tensors' values: not while a graph is captured, and not for
    meta / fake tensors (shapes without data, which the ops' fake kernels serve)."""
    if capturing():
        return False
    for t in tensors:
        if t is None:
            continue
        if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
            # a plain tensor (is_fake costs ~2.5 us, paid on every eager call of the ops): fake only as a
            # functionalization wrapper, which is never inspected
            if t.is_meta or torch._is_functional_tensor(t):
                return False
        elif t.device.type == "meta" or is_fake(t):
            return False
    return True


def int_ids(name: str, values) -> List[int]:
    """A sequence of integer ids (Python / NumPy ints) as a list; a bool, float or string element is a TypeError
    (``[1.7]`` is never read as 1)."""
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of int ids, got {type(values).__name__}") from None
    out = []
    for v in items:
        try:
            if isinstance(v, bool):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{name}: integer dtype required: expected int ids, got {v!r} "
                            f"({type(v).__name__})") from None
    return out


def rank(name: str, x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if x.dim() != n:
        raise ValueError(f"{name}: expected a {n}-d tensor {what}, got shape {tuple(x.shape)}")
    return x


def same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(x.shape)}")
    return x


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {x.device}")
    return x


def choice(name: str, value, options: Sequence) -> None:
    if value not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")


def mask_dtype(name: str, mask, what: str = "1 = real token") -> torch.Tensor:
    """A bool or integer mask tensor (nonzero = ``what``). A float one is refused, not read as 0 / 1: it may be an
    additive bias (transformers' 0 / -10000 mask reads inverted as nonzero = real)."""
    tensor(name, mask)
    if mask.dtype != torch.bool and mask.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: expected a bool or integer tensor ({what}), got {mask.dtype}")
    return mask


def mask_as_uint8(name: str, mask: Optional[torch.Tensor], ref_name: str, ref: torch.Tensor,
                  keep_int: bool = False, what: str = "1 = real token") -> Optional[torch.Tensor]:
    """A [B, T] bool / integer mask (nonzero = ``what``, by default a real token) as a contiguous uint8 tensor (a
    free view for bool and uint8 masks, one comparison pass otherwise). ``keep_int``: int32 / int64 masks are
    passed through as they are, for kernels that read them directly."""
    if mask is None:
        return None
    mask_dtype(name, mask, what)
    same_shape(name, mask, ref_name, ref)
    same_device(name, mask, ref_name, ref)
    if mask.dtype == torch.bool:
        return bool_as_uint8(mask)
    if mask.dtype == torch.uint8 or (keep_int and mask.dtype in (torch.int32, torch.int64)):
        return mask.contiguous()
    return bool_as_uint8(mask != 0)  # the comparison keeps a transposed mask's strides: made contiguous there


def bool_as_uint8(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as contiguous uint8: a free reinterpretation (a copy under torch.jit.trace, which cannot record
    a dtype view: an internal assert in torch)."""
    return mask.to(torch.uint8).contiguous() if torch.jit.is_tracing() else mask.contiguous().view(torch.uint8)


def cu_seqlens(name: str, cu: torch.Tensor, total: int, ref_name: str, ref: torch.Tensor, max_name: str,
               max_seqlen) -> Tuple[torch.Tensor, int]:
    """flash-attention's packed-sequence offsets: ``cu`` int32 [n + 1] on ref's device with
    0 = cu[0] < cu[1] < ... < cu[n] = total (every length >= 1), and ``max_seqlen`` an int >= every length.
    Returns (cu contiguous, max_seqlen). The values are checked only where they can be read (not while compiling;
    one host sync for a CUDA tensor)."""
    tensor(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected an int32 tensor (flash-attention's convention), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name}: expected a 1-d tensor [n_seqs + 1] with n_seqs >= 1, got shape {tuple(cu.shape)}")
    same_device(name, cu, ref_name, ref)
    max_seqlen = integer_arg(max_name, max_seqlen, 1)
    if max_seqlen >= 2 ** 31:  # its slot table was allocated first: an allocator error naming nothing
        raise ValueError(f"{max_name}: expected a length int32 offsets can hold (< 2**31), got {max_seqlen}")
    if inspectable(cu):
        bounds = cu.tolist()
        if bounds[0] != 0:
            raise ValueError(f"{name}: expected {name}[0] == 0, got {bounds[0]}")
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        short = next((i for i, n in enumerate(lengths) if n < 1), None)
        if short is not None:
            raise ValueError(f"{name}: expected strictly increasing offsets (every sequence length >= 1), got length "
                             f"{lengths[short]} for sequence {short} ({name}[{short}:{short + 2}] = "
                             f"{bounds[short:short + 2]})")
        if bounds[-1] != total:
            raise ValueError(f"{name}: expected the last offset to be the number of tokens {total} (rows of "
                             f"{ref_name}), got {bounds[-1]}")
        if max(lengths) > max_seqlen:
            raise ValueError(f"{max_name}: expected >= every sequence length, got {max_seqlen} < {max(lengths)} "
                             f"(the longest sequence in {name})")
    return cu.contiguous(), max_seqlen


def common_ids(*named) -> list:
    """Integer id tensors converted to one dtype the kernels take (int32 if all are int32, else int64)."""
    dtype = torch.int32 if all(x.dtype == torch.int32 for _, x in named) else torch.int64
    # Untouched tensors are returned as they are: each no-op .to() is a dispatcher round trip, which shows
    # at the per-call scale of the small ops.
    return [x if x.dtype == dtype and x.is_contiguous() else x.to(dtype).contiguous() for _, x in named]


def path(name: str, value) -> str:
    """A filesystem path given as a str or an os.PathLike (pathlib.Path), as a str."""
    p = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(p, str):  # bytes paths too: every message and record holds text
        raise TypeError(f"{name}: expected a path (str or os.PathLike), got {type(value).__name__}")
    return p


def out_of_memory(exc: BaseException) -> bool:
    """torch's allocation failures: MemoryError, CUDA's OutOfMemoryError, the CPU allocator's RuntimeError
    ("DefaultCPUAllocator: can't allocate memory" / "not enough memory")."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc)
                                           or "DefaultCPUAllocator: not enough memory" in str(exc)))


def reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message (the type's name when it has none), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
