"""Compile specs: each kernel module lists every specialisation its launchers use, so the
ahead-of-time check (``python -m electra_fast.kernels.check``) can compile them all without a GPU.

A kernel module exposes ``compile_specs() -> list[Spec]``; every ``@triton.jit`` function whose name
ends in ``_kernel`` is a launched kernel and must appear in at least one spec.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import torch

# Triton signature strings of the torch dtypes the launchers pass.
TRITON_TYPE = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1", torch.int8: "i8",
    torch.int16: "i16",
}

# Options every launch and the AOT check pass to Triton's compiler. FMA fusion is pinned on: the kernels' numerics and
# the GPU lane's tolerances were measured with it (Triton <= 3.9's default), and Triton 3.10 turns the default off
# (3.9 warns when TRITON_DEFAULT_FP_FUSION is unset). TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off.
COMPILE_OPTIONS: Dict[str, Any] = {"enable_fp_fusion": True}


def ptr(dtype: torch.dtype) -> str:
    return "*" + TRITON_TYPE[dtype]


@dataclasses.dataclass
class Spec:
    kernel: Any                      # the triton.JITFunction
    signature: Dict[str, str]        # every non-constexpr argument -> "*fp32", "i32", "i64", ...
    constexprs: Dict[str, Any]       # every constexpr argument -> its value
    num_warps: int = 4
    num_stages: int = 3

    @property
    def name(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        ptrs = ",".join(v for v in self.signature.values() if v.startswith("*"))
        return f"{self.kernel.__name__}[{ptrs}][{consts}]"
