#!/usr/bin/env python
"""Bad-input sweep for electra_fast: ops x CPU backends, the pretraining model, the CLI, and kill -9 of training.

Usage (with the Python of the environment that has electra_fast installed, outside the checkout):

    cd /tmp && /path/to/.venv/bin/python /path/to/repo/tools/sweep.py --out report.json
    ... --only ops,model        # a subset: ops | model | cli | kill (comma-separated)
    ... --ops rtd_loss,dropout  # a subset of the ops; --backends reference,cpp; --jobs 2 (parallel workers)

Every case states its correct outcome in the tables below (``expect``):
  "error"   the input is invalid: a ValueError / TypeError naming the argument (CLI: exit 2, one stderr line)
  "legal"   a correct result is due (checked against the op's documented contract, an independent eager
            formula where one is cheap, and, for the C++ backend, the reference backend's result on the same call)
  "either"  a clear error or a correct result are both acceptable (undocumented edge, e.g. all-meta tensors)

Classes (one per case and backend, the most severe that applies):
  crash         the process died by a signal (each batch of cases runs in a child process; the sweep restarts
                after the crashing case)
  hang          no answer within the per-case timeout
  data_lost     a snapshot (paths, bytes) of the user's files in --out / input folders changed; kill -9: a
                complete checkpoint disappeared, or the resume / export of the run failed
  silent_wrong  a result where an error was due, or a result that breaks the contract: wrong shape / dtype, NaN
                or inf out of finite legal input, a disallowed or out-of-range sample id, a wrong value vs the
                formula, the C++ backend disagreeing with the reference; CLI: exit 0 where an error was due
  unclear       any other exception type, a message not naming the argument, an exception raised inside torch,
                an error on a legal input; CLI: a traceback, several stderr lines, or an exit status other than 2
  clear         the expected kind of error (ValueError / TypeError naming the argument; CLI: exit 2, one line)
  ok            a correct result for a legal (or "either") input

One documented exception: a backend forced with use_backend() that cannot serve a call raises RuntimeError
"... was forced but cannot serve this call: <why>" (README, Backends); that counts as a clear error.

The sweep writes nothing outside a scratch directory (removed at the end unless --keep-tmp) and --out.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

SELF = os.path.abspath(__file__)
SEVERITY = ("crash", "hang", "data_lost", "silent_wrong", "unclear", "clear", "ok")  # most severe first
CPU_BACKENDS = ("reference", "cpp")  # the op backends a CPU sweep compares
OPS = ("mask_tokens", "gumbel_sample", "mlm_loss_and_sample", "rtd_loss", "disentangled_attention", "dropout",
       "dropout_add_layer_norm")
PROTO = "@@SWEEP "  # prefix of the child -> parent protocol lines on stdout


# =============================================================================================== op cases
# Built lazily: the parent lists the cases (ids, expectations) without building a tensor; a child builds and runs
# them. Every case is deterministic (its tensors come from a generator seeded by its index).

@dataclasses.dataclass
class Case:
    id: str                       # "<arg>: <what>"
    expect: str                   # "error" | "legal" | "either"
    arg: Optional[str]            # the argument an error must name (None: any of ``names``)
    make: Callable = None         # (torch.Generator) -> kwargs of the call
    names: Tuple[str, ...] = ()   # further acceptable names in the message
    note: str = ""
    backward: bool = False        # also run loss.backward() and compare / check the gradients
    nonfinite_ok: bool = False    # the documented fp32 computation overflows: non-finite output tolerated

    def meta(self) -> dict:
        return {"id": self.id, "expect": self.expect, "arg": self.arg, "note": self.note}


def _lazy_torch():
    import torch
    return torch


class OpSpec:
    """The cases of one public op: generic mutations of each argument plus op-specific edges."""

    def __init__(self, name: str):
        self.name = name
        self.cases: List[Case] = []

    def add(self, label: str, expect: str, arg: Optional[str], make, **kw) -> None:
        self.cases.append(Case(label, expect, arg, make, **kw))

    def editor(self, base):
        """add(label, expect, arg, f, ...): a case whose kwargs are base's, edited in place by f(kw, g)."""
        return lambda label, expect, arg, f, **kw: self.add(label, expect, arg, _with(base, f), **kw)


def _with(base, f):
    """make(g): base kwargs, then f(kw, g) edits them in place."""
    def make(g):
        kw = base(g)
        f(kw, g)
        return kw
    return make


def _set(arg, value_fn):
    def f(kw, g):
        kw[arg] = value_fn(kw[arg], g) if callable(value_fn) else value_fn
    return f


def conv(x, dt):
    """x converted to dtype dt (ints: rounded and clamped to dt's range; float8: through fp32)."""
    torch = _lazy_torch()
    if dt == torch.bool:
        return x != 0
    if dt.is_complex or dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return x.to(dt)
    if dt.is_floating_point:  # float8
        return x.float().to(dt)
    info = torch.iinfo(dt)
    if x.is_floating_point():
        x = x.round()
    return x.to(torch.int64).clamp(int(info.min), int(info.max)).to(dt)


def all_dtypes():
    torch = _lazy_torch()
    out = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64]
    for name in ("float8_e4m3fn", "uint32"):
        if hasattr(torch, name):
            out.append(getattr(torch, name))
    return out


def _dname(dt) -> str:
    return str(dt).replace("torch.", "")


def noncontig_last(x):
    """Same values, last-dim stride 2 (a slice of a wider tensor)."""
    torch = _lazy_torch()
    return torch.stack([x, torch.zeros_like(x)], -1)[..., 0]


def transposed_storage(x):
    """Same values, last dim dense, the other strides permuted (non-contiguous for >= 2-d)."""
    if x.dim() < 2:
        return noncontig_last(x)
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def generic_tensor_cases(spec: OpSpec, base, arg: str, kind: str, *, required: bool, ok_dtypes,
                         any_rank: bool = False, size_free: bool = False, single: bool = False,
                         names: Tuple[str, ...] = (), allow_sparse_either: bool = False) -> None:
    """The mutations every tensor argument gets.

    kind: "float" | "int" | "mask"; ok_dtypes: the dtypes this argument may take with the others unchanged;
    any_rank: any number of dims is legal; size_free: any size is legal (the op's only shape-defining tensor);
    single: the op's only tensor argument (a meta tensor is then an "either": it can be served by a fake kernel)."""
    torch = _lazy_torch()
    add = lambda label, expect, f, **kw: spec.add(f"{arg}: {label}", expect, arg, _with(base, f),  # noqa: E731
                                                 names=names, **kw)
    add("None", "error" if required else "legal", _set(arg, None))
    add("python list", "error", _set(arg, lambda x, g: x.tolist()))
    add("numpy array", "error", _set(arg, lambda x, g: (x.float() if x.dtype == torch.bfloat16 else x).numpy()))
    add("python int", "error", _set(arg, 3))
    add("python float", "error", _set(arg, 0.5))
    add("string", "error", _set(arg, "abc"))
    add("dict", "error", _set(arg, {}))
    add("torch.Size", "error", _set(arg, lambda x, g: x.shape))
    for dt in all_dtypes():
        add(f"dtype {_dname(dt)}", "legal" if dt in ok_dtypes else "error", _set(arg, lambda x, g, dt=dt: conv(x, dt)))
    rank_expect = "legal" if any_rank else "error"
    add("0-d tensor", "legal" if any_rank else "error", _set(arg, lambda x, g: x.reshape(-1)[0].clone()))
    add("extra leading dim", rank_expect, _set(arg, lambda x, g: x[None]))
    add("extra trailing dim", rank_expect, _set(arg, lambda x, g: x[..., None]))
    add("one dim fewer", rank_expect, _set(arg, lambda x, g: x[0] if x.dim() else x))
    size_expect = "legal" if size_free else "error"
    add("last dim + 1", size_expect, _set(arg, lambda x, g: torch.cat([x, x[..., :1]], -1)))
    add("first dim + 1", size_expect, _set(arg, lambda x, g: torch.cat([x, x[:1]], 0)))
    add("last dim - 1", size_expect, _set(arg, lambda x, g: x[..., :-1]))
    add("non-contiguous (last-dim stride 2)", "legal", _set(arg, lambda x, g: noncontig_last(x)))
    add("non-contiguous (transposed storage)", "legal", _set(arg, lambda x, g: transposed_storage(x)))
    add("expanded (stride 0)", "legal", _set(arg, lambda x, g: x[:1].expand_as(x)))
    add("sparse COO", "either" if allow_sparse_either else "error", _set(arg, lambda x, g: x.to_sparse()))
    add("meta device", "either" if single else "error", _set(arg, lambda x, g: x.to("meta")))
    if kind == "float":
        add("requires_grad", "legal", _set(arg, lambda x, g: x.clone().requires_grad_(True)))
        add("nn.Parameter", "legal", _set(arg, lambda x, g: torch.nn.Parameter(x.clone())))
    add("inference-mode tensor", "legal", _set(arg, lambda x, g: _inference_clone(x)))


def _inference_clone(x):
    torch = _lazy_torch()
    with torch.inference_mode():
        return x.clone()


def seed_cases(spec: OpSpec, base, arg: str, *, limit: int, required: bool = True, extra_ok=()) -> None:
    """An integer key in [0, limit) (seed / stream)."""
    torch = _lazy_torch()
    import numpy as np
    add = lambda label, expect, value, **kw: spec.add(f"{arg}: {label}", expect, arg,  # noqa: E731
                                                     _with(base, _set(arg, value)), **kw)
    add("0", "legal", 0)
    add("limit - 1", "legal", limit - 1)
    add("limit", "error", limit)
    add("-1", "error", -1)
    add("2**200", "error", 2 ** 200)
    add("-2**70", "error", -2 ** 70)
    add("float 1.0", "error", 1.0)
    add("float 1.5", "error", 1.5)
    add("nan", "error", float("nan"))
    add("True", "error", True)
    add("string '7'", "error", "7")
    add("None", "error" if required else "legal", None)
    add("numpy int64", "either", lambda x, g: np.int64(7))
    add("int tensor (0-d)", "either", lambda x, g: torch.tensor(7))
    add("float tensor (0-d)", "error", lambda x, g: torch.tensor(7.0))
    add("int tensor [2]", "error", lambda x, g: torch.tensor([7, 8]))
    add("list [7]", "error", [7])


def prob_cases(spec: OpSpec, base, arg: str, *, one_ok: bool, zero_ok: bool = True) -> None:
    """A probability in [0, 1] (one_ok) or [0, 1)."""
    torch = _lazy_torch()
    import fractions

    import numpy as np
    add = lambda label, expect, value, **kw: spec.add(f"{arg}: {label}", expect, arg,  # noqa: E731
                                                     _with(base, _set(arg, value)), **kw)
    add("0.0", "legal" if zero_ok else "error", 0.0)
    add("int 0", "legal" if zero_ok else "error", 0)
    add("1e-30", "legal", 1e-30)
    add("0.999999", "legal", 0.999999)
    add("1.0", "legal" if one_ok else "error", 1.0)
    add("1.5", "error", 1.5)
    add("-0.1", "error", -0.1)
    add("-0.0", "legal" if zero_ok else "error", -0.0)
    add("nan", "error", float("nan"))
    add("inf", "error", float("inf"))
    add("-inf", "error", float("-inf"))
    add("string '0.1'", "error", "0.1")
    add("None", "error", None)
    add("True", "error", True)
    add("numpy float64 0.25", "legal", np.float64(0.25))
    add("numpy float32 0.25", "either", lambda x, g: np.float32(0.25))
    add("Fraction(1, 4)", "either", fractions.Fraction(1, 4))
    add("tensor 0.25 (0-d)", "either", lambda x, g: torch.tensor(0.25))
    add("complex 0.25+0j", "error", 0.25 + 0j)


def choice_cases(spec: OpSpec, base, arg: str, legal, bad=("MEAN", "", None, 0, 1, True, b"mean")) -> None:
    for v in legal:
        spec.add(f"{arg}: {v!r}", "legal", arg, _with(base, _set(arg, v)))
    for v in bad:
        spec.add(f"{arg}: {v!r}", "error", arg, _with(base, _set(arg, v)))
    spec.add(f"{arg}: list", "error", arg, _with(base, _set(arg, [legal[0]])))
    spec.add(f"{arg}: dict (unhashable)", "error", arg, _with(base, _set(arg, {})))


REDUCTIONS = ("mean", "sum", "none")


def _floats():
    torch = _lazy_torch()
    return (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _ints():
    torch = _lazy_torch()
    return (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def value_cases(spec: OpSpec, base, arg: str, float_args: Tuple[str, ...], *, huge_overflows=False,
                dtypes=None) -> None:
    """NaN / inf / huge / denormal / zero values in ``arg`` with every float argument in each float dtype.
    huge_overflows: the op's documented fp32 computation overflows for 1e30 inputs (non-finite output tolerated)."""
    torch = _lazy_torch()
    dtypes = dtypes or _floats()

    def setter(dt, fill):
        def f(kw, g):
            for a in float_args:
                if isinstance(kw.get(a), torch.Tensor):
                    kw[a] = kw[a].to(dt)
            x = kw[arg].clone()
            fill(x)
            kw[arg] = x
        return f

    def one(v):
        return lambda x: x.view(-1).__setitem__(0, v)

    for dt in dtypes:
        d = _dname(dt)
        big_finite = dt != torch.float16  # 1e30 rounds to inf in fp16
        spec.add(f"{arg}: one NaN ({d})", "either", arg, _with(base, setter(dt, one(float("nan")))), nonfinite_ok=True)
        spec.add(f"{arg}: one +inf ({d})", "either", arg, _with(base, setter(dt, one(float("inf")))), nonfinite_ok=True)
        spec.add(f"{arg}: one -inf ({d})", "either", arg, _with(base, setter(dt, one(float("-inf")))),
                 nonfinite_ok=True)
        spec.add(f"{arg}: all NaN ({d})", "either", arg, _with(base, setter(dt, lambda x: x.fill_(float("nan")))),
                 nonfinite_ok=True)
        spec.add(f"{arg}: one 1e30 ({d})", "legal" if big_finite else "either", arg,
                 _with(base, setter(dt, one(1e30))), nonfinite_ok=huge_overflows or not big_finite)
        spec.add(f"{arg}: one -1e30 ({d})", "legal" if big_finite else "either", arg,
                 _with(base, setter(dt, one(-1e30))), nonfinite_ok=huge_overflows or not big_finite)
        spec.add(f"{arg}: denormals ({d})", "legal", arg,
                 _with(base, setter(dt, lambda x, dt=dt: x.copy_(x.sign() * torch.finfo(dt).tiny / 4))))
        spec.add(f"{arg}: all zero ({d})", "legal", arg, _with(base, setter(dt, lambda x: x.zero_())))
        spec.add(f"{arg}: +-1e4 ({d})", "legal", arg, _with(base, setter(dt, lambda x: x.copy_(x.sign() * 1e4))))


def dtype_cases(spec: OpSpec, base, float_args: Tuple[str, ...], dtypes=None, backward=False) -> None:
    """The whole call in one float dtype (every float argument converted)."""
    torch = _lazy_torch()

    def setter(dt):
        def f(kw, g):
            for a in float_args:
                if isinstance(kw.get(a), torch.Tensor):
                    kw[a] = kw[a].to(dt)
        return f
    for dt in dtypes or _floats():
        spec.add(f"all floats {_dname(dt)}", "legal", None, _with(base, setter(dt)))
        if backward:
            def fb(kw, g, dt=dt):
                setter(dt)(kw, g)
                for a in float_args:
                    if isinstance(kw.get(a), torch.Tensor):
                        kw[a] = kw[a].detach().requires_grad_(True)
            spec.add(f"all floats {_dname(dt)}, backward", "legal", None, _with(base, fb), backward=True)


def backward_cases(add, float_args: Tuple[str, ...], variants) -> None:
    """Legal cases that also differentiate: each variant's edit, then every float argument requires grad."""
    for label, f in variants:
        def fb(kw, g, f=f):
            f(kw, g)
            for a in float_args:
                if kw.get(a) is not None:
                    kw[a] = kw[a].detach().requires_grad_(True)
        add(f"backward, {label}", "legal", None, fb, backward=True)


def all_meta_case(spec: OpSpec, base) -> None:
    torch = _lazy_torch()

    def f(kw, g):
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to("meta")
    spec.add("every tensor on meta", "either", None, _with(base, f))


# ----------------------------------------------------------------------------------------------- rtd_loss
def rtd_loss_spec() -> OpSpec:
    torch = _lazy_torch()
    s = OpSpec("rtd_loss")

    def base(g, B=3, T=7):
        orig = torch.randint(5, 50, (B, T), generator=g)
        repl = torch.rand(B, T, generator=g) < 0.3
        corr = torch.where(repl, torch.randint(5, 50, (B, T), generator=g), orig)
        mask = torch.ones(B, T, dtype=torch.int64)
        if B > 1 and T > 2:
            mask[1, -2:] = 0
        return dict(logits=torch.randn(B, T, generator=g) * 2, corrupted_ids=corr, original_ids=orig,
                    attention_mask=mask, reduction="mean", return_metrics=True)

    floats, ints = _floats(), _ints()
    generic_tensor_cases(s, base, "logits", "float", required=True, ok_dtypes=floats)
    generic_tensor_cases(s, base, "corrupted_ids", "int", required=True, ok_dtypes=ints)
    generic_tensor_cases(s, base, "original_ids", "int", required=True, ok_dtypes=ints)
    generic_tensor_cases(s, base, "attention_mask", "mask", required=False, ok_dtypes=ints + (torch.bool,))
    choice_cases(s, base, "reduction", ("mean", "sum", "none"))
    for v, e in ((True, "legal"), (False, "legal"), (None, "either"), ("yes", "either")):
        s.add(f"return_metrics: {v!r}", e, "return_metrics", _with(base, _set("return_metrics", v)))
    value_cases(s, base, "logits", ("logits",))
    dtype_cases(s, base, ("logits",), backward=True)
    backward_cases(s.editor(base), ("logits",),
                   [(f"reduction={red}", lambda kw, g, red=red: kw.update(reduction=red)) for red in REDUCTIONS])
    # shapes and masks
    for B, T in ((0, 7), (3, 0), (0, 0), (1, 1), (1, 4096), (64, 3), (7, 129)):
        s.add(f"shape [{B}, {T}]", "legal", None, lambda g, B=B, T=T: base(g, B, T))
    s.add("all padding (mask 0)", "legal", None, _with(base, lambda kw, g: kw["attention_mask"].zero_()))
    s.add("all padding, backward", "legal", None,
          _with(base, lambda kw, g: (kw["attention_mask"].zero_(), kw.update(logits=kw["logits"].requires_grad_()))),
          backward=True)
    s.add("mask values 2 / -1 (nonzero = real)", "legal", None,
          _with(base, lambda kw, g: kw.update(attention_mask=kw["attention_mask"] * 2 - (kw["attention_mask"] == 0).long())))
    s.add("mask uint8 255", "legal", None, _with(base, lambda kw, g: kw.update(attention_mask=(kw["attention_mask"] * 255).to(torch.uint8))))
    s.add("nothing replaced", "legal", None, _with(base, lambda kw, g: kw.update(corrupted_ids=kw["original_ids"].clone())))
    s.add("everything replaced", "legal", None, _with(base, lambda kw, g: kw.update(corrupted_ids=kw["original_ids"] + 1)))
    s.add("same tensor for both id args", "legal", None, _with(base, lambda kw, g: kw.update(corrupted_ids=kw["original_ids"])))
    s.add("ids int32 + int64 mixed", "legal", None, _with(base, lambda kw, g: kw.update(corrupted_ids=kw["corrupted_ids"].int())))
    s.add("negative ids", "legal", None, _with(base, lambda kw, g: kw.update(original_ids=-kw["original_ids"], corrupted_ids=-kw["corrupted_ids"])))
    s.add("ids near int64 max", "legal", None, _with(base, lambda kw, g: kw.update(original_ids=kw["original_ids"] + (2**63 - 100), corrupted_ids=kw["corrupted_ids"] + (2**63 - 100))))
    s.add("logits +-20 (saturated)", "legal", None, _with(base, lambda kw, g: kw.update(logits=kw["logits"].sign() * 20)))
    s.add("logits +-1e4 fp16 (documented range)", "legal", None, _with(base, lambda kw, g: kw.update(logits=(kw["logits"].sign() * 1e4).half())))
    s.add("logits requires_grad under no_grad", "legal", None, _with(base, lambda kw, g: kw.update(logits=kw["logits"].requires_grad_())))
    s.add("logits 2-d view of a 3-d tensor (stride)", "legal", None,
          _with(base, lambda kw, g: kw.update(logits=torch.randn(3, 7, 5, generator=g)[:, :, 2])))
    all_meta_case(s, base)
    return s


# -------------------------------------------------------------------------------------------- mask_tokens
MT_V, MT_SPECIALS, MT_MASK = 50, (0, 1, 2, 3), 3


def mask_tokens_spec() -> OpSpec:
    torch = _lazy_torch()
    import numpy as np
    s = OpSpec("mask_tokens")

    def base(g, B=4, T=32):
        ids = torch.randint(4, MT_V, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.bool)
        if T:
            ids[:, 0] = 1
            ids[:, -1] = 2
        if B > 2 and T > 6:
            mask[2, -5:] = False
            ids[2, -5:] = 0
        return dict(input_ids=ids, mask_token_id=MT_MASK, vocab_size=MT_V, seed=11, mask_prob=0.15,
                    mask_token_frac=0.85, random_token_frac=0.0, special_token_ids=MT_SPECIALS,
                    attention_mask=mask, word_starts=None, strategy="count", validate=True)

    def words(kw, g):  # word starts: every token whose random draw < 0.6, plus the first token
        ws = torch.rand(kw["input_ids"].shape, generator=g) < 0.6
        ws[:, 0] = True
        kw["word_starts"] = ws

    ints = (torch.int32, torch.int64)
    generic_tensor_cases(s, base, "input_ids", "int", required=True, ok_dtypes=ints)
    generic_tensor_cases(s, base, "attention_mask", "mask", required=False, ok_dtypes=_ints() + (torch.bool,))
    wbase = _with(base, words)
    generic_tensor_cases(s, wbase, "word_starts", "mask", required=False, ok_dtypes=_ints() + (torch.bool,))
    seed_cases(s, base, "seed", limit=2 ** 63)
    for a in ("mask_prob", "mask_token_frac"):
        prob_cases(s, base, a, one_ok=True)
    prob_cases(s, _with(base, lambda kw, g: kw.update(mask_token_frac=0.0)), "random_token_frac", one_ok=True)
    add = s.editor(base)
    add("random_token_frac: 0.1 with mask_token_frac 0.8 (BERT)", "legal", None,
        lambda kw, g: kw.update(mask_token_frac=0.8, random_token_frac=0.1))
    add("random_token_frac: 0.2 with mask_token_frac 0.85 (sum > 1)", "error", "random_token_frac",
        lambda kw, g: kw.update(random_token_frac=0.2), names=("mask_token_frac",))
    add("random_token_frac 1.0, mask_token_frac 0", "legal", None,
        lambda kw, g: kw.update(mask_token_frac=0.0, random_token_frac=1.0))
    for v, e in ((0, "legal"), (MT_V - 1, "legal"), (-1, "error"), (MT_V, "error"), (3.0, "error"), (True, "error"),
                 (None, "error"), ("3", "error"), (2 ** 70, "error")):
        add(f"mask_token_id: {v!r}", e, "mask_token_id", _set("mask_token_id", v))
    add("mask_token_id: numpy int64", "either", "mask_token_id", _set("mask_token_id", lambda x, g: np.int64(3)))
    for v, e in ((0, "error"), (-1, "error"), (2 ** 31, "error"), (2 ** 31 - 1, "legal"), (MT_V - 1, "error"),
                 (50.0, "error"), (True, "error"), (None, "error"), ("50", "error")):
        names = ("input_ids",) if v == MT_V - 1 else ()
        add(f"vocab_size: {v!r}", e, "vocab_size", _set("vocab_size", v), names=names)
    specials = [
        ("()", (), "legal"), ("list", list(MT_SPECIALS), "legal"), ("set", set(MT_SPECIALS), "legal"),
        ("duplicates", (0, 0, 1, 2, 3, 3), "legal"), ("tensor int64", None, "legal"),
        ("every id (no random draw needed)", tuple(range(MT_V)), "legal"),
        ("[-1]", (-1,), "error"), (f"[{MT_V}]", (MT_V,), "error"), ("[1.5]", (1.5,), "error"),
        ("['a']", ("a",), "error"), ("None", None, "error"), ("string '0123'", "0123", "error"),
        ("[True]", (True,), "error"), ("nested [[0, 1]]", ((0, 1),), "error"), ("tensor float", None, "error"),
        ("generator", None, "legal"), ("2**70", (2 ** 70,), "error"),
    ]
    for label, v, e in specials:
        if label == "tensor int64":
            f = _set("special_token_ids", lambda x, g: torch.tensor(MT_SPECIALS))
        elif label == "tensor float":
            f = _set("special_token_ids", lambda x, g: torch.tensor(MT_SPECIALS, dtype=torch.float32))
        elif label == "generator":
            f = _set("special_token_ids", lambda x, g: (i for i in MT_SPECIALS))
        else:
            f = _set("special_token_ids", v)
        add(f"special_token_ids: {label}", e, "special_token_ids", f)
    add("special_token_ids: every id with random_token_frac 0.1", "error", "special_token_ids",
        lambda kw, g: kw.update(special_token_ids=tuple(range(MT_V)), mask_token_frac=0.8, random_token_frac=0.1))
    choice_cases(s, base, "strategy", ("count", "bernoulli"), bad=("COUNT", "", None, 0, "random"))
    for v, e in ((False, "legal"), (0, "either"), ("no", "either")):
        add(f"validate: {v!r}", e, "validate", _set("validate", v))
    # out-of-range ids with and without validation
    for label, fill in (("-5", -5), (f"{MT_V}", MT_V), ("2**40", 2 ** 40), ("int64 min", -2 ** 63)):
        add(f"input_ids: contains {label}", "error", "input_ids",
            lambda kw, g, fill=fill: kw["input_ids"].view(-1).__setitem__(5, fill))
        add(f"input_ids: contains {label}, validate=False (unchecked by contract)", "either", "input_ids",
            lambda kw, g, fill=fill: (kw["input_ids"].view(-1).__setitem__(5, fill), kw.update(validate=False)))
    add("input_ids: int32 with id 2**31-1 > vocab", "error", "input_ids",
        lambda kw, g: kw.update(input_ids=kw["input_ids"].int().index_fill_(1, torch.tensor([3]), 2 ** 31 - 1)))
    # whole-word masking
    add("word_starts: first real token not a start", "error", "word_starts",
        lambda kw, g: (words(kw, g), kw["word_starts"][:, 0].fill_(False)))
    add("word_starts: first real token not a start, validate=False", "either", "word_starts",
        lambda kw, g: (words(kw, g), kw["word_starts"][:, 0].fill_(False), kw.update(validate=False)))
    add("word_starts: every token a start", "legal", None, lambda kw, g: kw.update(word_starts=torch.ones_like(kw["input_ids"], dtype=torch.bool)))
    add("word_starts: one word per row (only position 0)", "legal", None,
        lambda kw, g: kw.update(word_starts=torch.arange(kw["input_ids"].shape[1]).expand_as(kw["input_ids"]) == 0))
    add("word_starts: bernoulli strategy", "legal", None, lambda kw, g: (words(kw, g), kw.update(strategy="bernoulli")))
    add("word_starts: mask_prob 1.0", "legal", None, lambda kw, g: (words(kw, g), kw.update(mask_prob=1.0)))
    # shapes
    for B, T in ((0, 32), (4, 0), (0, 0), (1, 1), (1, 2), (2, 4096), (64, 8)):
        s.add(f"shape [{B}, {T}]", "legal", None, lambda g, B=B, T=T: base(g, B, T))
    add("attention_mask: all padding", "legal", None, lambda kw, g: kw["attention_mask"].zero_())
    add("attention_mask: one row all padding", "legal", None, lambda kw, g: kw["attention_mask"][1].zero_())
    add("attention_mask: int 2 / -1 (nonzero = real)", "legal", None,
        lambda kw, g: kw.update(attention_mask=kw["attention_mask"].long() * 2 - (~kw["attention_mask"]).long()))
    add("every token special", "legal", None, lambda kw, g: kw["input_ids"].fill_(1))
    add("mask_prob 1.0 count", "legal", None, lambda kw, g: kw.update(mask_prob=1.0))
    add("mask_prob 1.0 bernoulli", "legal", None, lambda kw, g: kw.update(mask_prob=1.0, strategy="bernoulli"))
    add("mask_prob 0.0 bernoulli", "legal", None, lambda kw, g: kw.update(mask_prob=0.0, strategy="bernoulli"))
    add("mask_token_frac 0 (keep originals)", "legal", None, lambda kw, g: kw.update(mask_token_frac=0.0))
    add("vocab_size = len(specials) + 1, random 0.1", "legal", None,
        lambda kw, g: kw.update(input_ids=kw["input_ids"].clamp(max=4), vocab_size=5, mask_token_frac=0.8,
                                random_token_frac=0.1))
    add("seed 2**63 - 1 (largest)", "legal", None, lambda kw, g: kw.update(seed=2 ** 63 - 1))
    all_meta_case(s, base)
    return s


# ------------------------------------------------------------------------------------------- gumbel_sample
def gumbel_spec() -> OpSpec:
    torch = _lazy_torch()
    import numpy as np
    s = OpSpec("gumbel_sample")

    def base(g, N=6, V=40):
        return dict(logits=torch.randn(N, V, generator=g) * 2, seed=5, temperature=1.0, disallowed_ids=(0, 1))

    generic_tensor_cases(s, base, "logits", "float", required=True, ok_dtypes=_floats(), size_free=True, single=True)
    seed_cases(s, base, "seed", limit=2 ** 63)
    add = s.editor(base)
    for v, e in ((1.0, "legal"), (2, "legal"), (0.5, "legal"), (1e-30, "legal"), (1e30, "legal"), (0.0, "error"),
                 (-1.0, "error"), (float("nan"), "error"), (float("inf"), "error"), (1e-39, "error"), ("1", "error"),
                 (None, "error"), (True, "error"), (-0.0, "error"), (5e-324, "error")):
        add(f"temperature: {v!r}", e, "temperature", _set("temperature", v))
    add("temperature: numpy float32", "either", "temperature", _set("temperature", lambda x, g: np.float32(0.5)))
    add("temperature: tensor 0.5", "either", "temperature", _set("temperature", lambda x, g: torch.tensor(0.5)))
    dis = [
        ("()", (), "legal"), ("list", [0, 1], "legal"), ("set", {0, 1}, "legal"), ("range", range(3), "legal"),
        ("duplicates", (1, 1, 1), "legal"), ("numpy array", None, "legal"), ("tensor int64", None, "legal"),
        ("tensor int32 2-d", None, "either"), ("all but one id", tuple(range(39)), "legal"),
        ("every id", tuple(range(40)), "error"), ("[-1]", (-1,), "error"), ("[40]", (40,), "error"),
        ("[1.5]", (1.5,), "error"), ("string '12'", "12", "error"), ("None", None, "error"),
        ("[True]", (True,), "either"), ("nested [[1, 2]]", ((1, 2),), "error"), ("tensor float", None, "error"),
        ("tensor bool", None, "error"), ("tensor on meta", None, "error"), ("tensor [-1]", None, "error"),
        ("[2**70]", (2 ** 70,), "error"), ("['a']", ("a",), "error"),
    ]
    for label, v, e in dis:
        value = {"numpy array": lambda x, g: np.array([0, 1]), "tensor int64": lambda x, g: torch.tensor([0, 1]),
                 "tensor int32 2-d": lambda x, g: torch.tensor([[0], [1]], dtype=torch.int32),
                 "tensor float": lambda x, g: torch.tensor([0.0, 1.0]),
                 "tensor bool": lambda x, g: torch.tensor([True, False]),
                 "tensor on meta": lambda x, g: torch.tensor([0, 1], device="meta"),
                 "tensor [-1]": lambda x, g: torch.tensor([-1])}.get(label, v)
        add(f"disallowed_ids: {label}", e, "disallowed_ids", _set("disallowed_ids", value))
    value_cases(s, base, "logits", ("logits",))
    dtype_cases(s, base, ("logits",))
    for N, V in ((0, 40), (6, 0), (0, 0), (1, 1), (3, 50000), (1000, 3)):
        expect = "error" if V == 0 else "legal"
        s.add(f"shape [{N}, {V}]", expect, "logits", lambda g, N=N, V=V: dict(base(g, N, V), disallowed_ids=()))
    add("V=1 with its only id disallowed", "error", "disallowed_ids",
        lambda kw, g: kw.update(logits=kw["logits"][:, :1].clone(), disallowed_ids=(0,)))
    add("+inf on a disallowed id", "legal", None, lambda kw, g: kw["logits"][:, 0].fill_(float("inf")), nonfinite_ok=True)
    add("+inf on two allowed ids (tie -> smallest id)", "legal", None,
        lambda kw, g: (kw["logits"][:, 7].fill_(float("inf")), kw["logits"][:, 3].fill_(float("inf"))), nonfinite_ok=True)
    add("a row of -inf except disallowed ids", "either", None,
        lambda kw, g: (kw["logits"][2, 2:].fill_(float("-inf"))), nonfinite_ok=True)
    add("a row entirely -inf", "either", None, lambda kw, g: kw["logits"][1].fill_(float("-inf")), nonfinite_ok=True)
    add("temperature 1e-30 (greedy)", "legal", None, lambda kw, g: kw.update(temperature=1e-30))
    add("logits huge 3e38 fp32", "legal", None, lambda kw, g: kw["logits"].view(-1).__setitem__(9, 3e38))
    add("logits all equal (ties everywhere)", "legal", None, lambda kw, g: kw["logits"].fill_(0.5))
    for dt in _floats():
        d = _dname(dt)
        conv_ = lambda kw, dt=dt: kw.update(logits=kw["logits"].to(dt))  # noqa: E731
        for temp in (1e-30, 0.5, 1e30):
            add(f"temperature {temp}, {d}", "legal", None, lambda kw, g, temp=temp, c=conv_: (c(kw), kw.update(temperature=temp)))
        for N, V in ((0, 40), (1, 1), (3, 50000), (1000, 3), (2, 4097)):
            s.add(f"shape [{N}, {V}], {d}", "legal", None,
                  lambda g, N=N, V=V, dt=dt: dict(base(g, N, V), logits=base(g, N, V)["logits"].to(dt), disallowed_ids=()))
        add(f"+inf on two allowed ids, {d}", "legal", None,
            lambda kw, g, c=conv_: (c(kw), kw["logits"][:, 7].fill_(float("inf")), kw["logits"][:, 3].fill_(float("inf"))),
            nonfinite_ok=True)
        add(f"+inf on a disallowed id, {d}", "legal", None,
            lambda kw, g, c=conv_: (c(kw), kw["logits"][:, 1].fill_(float("inf"))), nonfinite_ok=True)
        add(f"non-contiguous, {d}", "legal", None, lambda kw, g, c=conv_: (c(kw), kw.update(logits=transposed_storage(kw["logits"]))))
        add(f"seed 2**63 - 1, {d}", "legal", None, lambda kw, g, c=conv_: (c(kw), kw.update(seed=2 ** 63 - 1)))
        add(f"disallowed_ids tensor, {d}", "legal", None,
            lambda kw, g, c=conv_: (c(kw), kw.update(disallowed_ids=torch.tensor([5, 6, 7]))))
        add(f"shape [1, 2], {d}", "legal", None, lambda kw, g, c=conv_: (c(kw), kw.update(logits=kw["logits"][:1, :2].clone(), disallowed_ids=())))
        add(f"expanded (stride 0), {d}", "legal", None, lambda kw, g, c=conv_: (c(kw), kw.update(logits=kw["logits"][:1].expand(6, 40))))
        add(f"disallow all but the last id, {d}", "legal", None,
            lambda kw, g, c=conv_: (c(kw), kw.update(disallowed_ids=tuple(range(39)))))
    all_meta_case(s, base)
    return s


# ------------------------------------------------------------------------------------- mlm_loss_and_sample
def mlm_spec() -> OpSpec:
    torch = _lazy_torch()
    import numpy as np
    s = OpSpec("mlm_loss_and_sample")

    def base(g, N=6, E=8, V=40):
        t = torch.randint(2, V, (N,), generator=g) if V > 2 else torch.zeros(N, dtype=torch.int64)
        if N > 2:
            t[1] = -100
        return dict(hidden=torch.randn(N, E, generator=g), weight=torch.randn(V, E, generator=g) * 0.5, targets=t,
                    bias=torch.randn(V, generator=g) * 0.1, seed=9, temperature=1.0, disallowed_ids=(0,),
                    ignore_index=-100, reduction="mean", return_metrics=True)

    floats = _floats()
    f32 = (torch.float32,)
    generic_tensor_cases(s, base, "hidden", "float", required=True, ok_dtypes=f32, names=("weight",))
    generic_tensor_cases(s, base, "weight", "float", required=True, ok_dtypes=f32, names=("hidden",))
    generic_tensor_cases(s, base, "targets", "int", required=True, ok_dtypes=(torch.int32, torch.int64))
    generic_tensor_cases(s, base, "bias", "float", required=False, ok_dtypes=f32)
    seed_cases(s, base, "seed", limit=2 ** 63)
    choice_cases(s, base, "reduction", ("mean", "sum", "none"))
    add = s.editor(base)
    for v, e in ((-100, "legal"), (-1, "legal"), (5, "legal"), (1.0, "error"), (True, "error"), (None, "error"),
                 ("-100", "error")):
        def f(kw, g, v=v):  # the ignored row carries the new ignore_index
            kw["ignore_index"] = v
            if isinstance(v, int) and not isinstance(v, bool):
                kw["targets"][1] = v
        add(f"ignore_index: {v!r}", e, "ignore_index", f)
    for v, e in ((1.0, "legal"), (1e-30, "legal"), (0.0, "error"), (-1.0, "error"), (float("nan"), "error"),
                 (float("inf"), "error"), (None, "error"), (1e-39, "error")):
        add(f"temperature: {v!r}", e, "temperature", _set("temperature", v))
    for label, v, e in (("every id", tuple(range(40)), "error"), ("[-1]", (-1,), "error"), ("[40]", (40,), "error"),
                        ("[1.5]", (1.5,), "error"), ("string '12'", "12", "error"), ("None", None, "error"),
                        ("all but one", tuple(range(1, 40)), "legal")):
        add(f"disallowed_ids: {label}", e, "disallowed_ids", _set("disallowed_ids", v))
    add("disallowed_ids: numpy array", "legal", "disallowed_ids", _set("disallowed_ids", lambda x, g: np.array([0, 1])))
    for v, e in ((True, "legal"), (False, "legal")):
        add(f"return_metrics: {v!r}", e, "return_metrics", _set("return_metrics", v))
    for label, fill in (("-5", -5), ("40 (= V)", 40), ("2**40", 2 ** 40), ("-101", -101)):
        add(f"targets: contains {label}", "error", "targets", lambda kw, g, fill=fill: kw["targets"].__setitem__(0, fill))
    add("targets: all ignore_index", "legal", None, lambda kw, g: kw["targets"].fill_(-100))
    add("targets: every row the custom ignore_index -1", "legal", None,
        lambda kw, g: (kw["targets"].fill_(-1), kw.update(ignore_index=-1)))
    add("targets: -100 with ignore_index=-1 (not ignored, out of range)", "error", "targets",
        lambda kw, g: kw.update(ignore_index=-1))
    value_cases(s, base, "hidden", ("hidden", "weight", "bias"))
    value_cases(s, base, "weight", ("hidden", "weight", "bias"), dtypes=(torch.float32,))
    value_cases(s, base, "bias", ("hidden", "weight", "bias"), dtypes=(torch.float32,))
    dtype_cases(s, base, ("hidden", "weight", "bias"), backward=True)
    backward_cases(add, ("hidden", "weight", "bias"),
                   [(f"reduction={red}", lambda kw, g, red=red: kw.update(reduction=red)) for red in REDUCTIONS])
    add("bias dtype float64 with float32 hidden", "error", "bias", lambda kw, g: kw.update(bias=kw["bias"].double()))
    for N, E, V in ((0, 8, 40), (6, 0, 40), (6, 8, 0), (1, 1, 1), (2, 4, 20000), (300, 8, 3)):
        expect = "error" if V == 0 else ("either" if E == 0 else "legal")
        s.add(f"shapes N={N} E={E} V={V}", expect, "weight",
              lambda g, N=N, E=E, V=V: dict(base(g, N, E, V), disallowed_ids=()))
    add("hidden and weight the same tensor", "legal", None,
        lambda kw, g: kw.update(weight=kw["hidden"], targets=kw["targets"].clamp(max=5), bias=None))
    all_meta_case(s, base)
    return s


# ----------------------------------------------------------------------------------- disentangled_attention
DA_PB, DA_MR = 4, 8  # position_buckets, max_relative_positions: k = 4, pos tensors [H, 8, D]


def attention_spec() -> OpSpec:
    torch = _lazy_torch()
    s = OpSpec("disentangled_attention")

    def base(g, B=2, H=2, T=8, D=8):
        mask = torch.ones(B, T, dtype=torch.int64)
        if B > 1 and T > 3:
            mask[1, -3:] = 0
        return dict(query=torch.randn(B, H, T, D, generator=g), key=torch.randn(B, H, T, D, generator=g),
                    value=torch.randn(B, H, T, D, generator=g), pos_key=torch.randn(H, 2 * DA_PB, D, generator=g),
                    pos_query=torch.randn(H, 2 * DA_PB, D, generator=g), attention_mask=mask,
                    position_buckets=DA_PB, max_relative_positions=DA_MR, dropout_p=0.0, seed=None, scale=None)

    f32 = (torch.float32,)
    qkv = ("query", "key", "value")
    for a in qkv:
        generic_tensor_cases(s, base, a, "float", required=True, ok_dtypes=f32, names=qkv)
    for a in ("pos_key", "pos_query"):
        generic_tensor_cases(s, base, a, "float", required=False, ok_dtypes=f32, names=("query",))
    generic_tensor_cases(s, base, "attention_mask", "mask", required=False, ok_dtypes=_ints() + (torch.bool,))
    add = s.editor(base)
    floats = ("query", "key", "value", "pos_key", "pos_query")
    value_cases(s, base, "query", floats, huge_overflows=True)
    value_cases(s, base, "pos_key", floats, huge_overflows=True, dtypes=(torch.float32,))
    value_cases(s, base, "value", floats, dtypes=(torch.float32,))
    dtype_cases(s, base, floats, backward=True)
    for v, e, names in ((0, "error", ("pos_key",)), (-1, "error", ("pos_key",)), (1, "error", ()),
                        (4.0, "error", ()), (True, "error", ()), (None, "error", ()), (2 ** 40, "error", ("pos_key",))):
        add(f"position_buckets: {v!r}", e, "position_buckets", _set("position_buckets", v), names=names)
    for v, e in ((0, "error"), (-5, "error"), (3, "error"), (1.5, "error"), (None, "error"), (2 ** 62, "legal")):
        add(f"max_relative_positions: {v!r}", e, "max_relative_positions", _set("max_relative_positions", v))
    add("position_buckets 0 with pos tensors sized for max_relative_positions", "legal", None,
        lambda kw, g: kw.update(position_buckets=0, pos_key=torch.randn(2, 2 * DA_MR, 8, generator=g),
                                pos_query=torch.randn(2, 2 * DA_MR, 8, generator=g)))
    prob_cases(s, _with(base, lambda kw, g: kw.update(seed=3)), "dropout_p", one_ok=False)
    add("dropout_p 0.1 without seed", "error", "seed", lambda kw, g: kw.update(dropout_p=0.1), names=("dropout_p",))
    seed_cases(s, _with(base, lambda kw, g: kw.update(dropout_p=0.1)), "seed", limit=2 ** 63)
    add("seed -1 without dropout", "error", "seed", _set("seed", -1))
    add("seed 5 without dropout", "legal", None, _set("seed", 5))
    for v, e in ((1.0, "legal"), (2, "legal"), (1e-30, "legal"), (0.0, "error"), (-1.0, "error"),
                 (float("nan"), "error"), (float("inf"), "error"), ("1", "error"), (True, "error")):
        add(f"scale: {v!r}", e, "scale", _set("scale", v))
    add("scale: 1e30 (scores overflow fp32)", "either", "scale", _set("scale", 1e30), nonfinite_ok=True)
    for B, H, T, D in ((0, 2, 8, 8), (2, 0, 8, 8), (2, 2, 0, 8), (2, 2, 8, 0)):
        s.add(f"shape [{B}, {H}, {T}, {D}]", "either", "query",
              lambda g, B=B, H=H, T=T, D=D: dict(base(g, B, H, T, D), pos_key=None, pos_query=None,
                                                attention_mask=None))
    for B, H, T, D in ((1, 1, 1, 1), (1, 1, 1, 8), (1, 3, 65, 3), (1, 1, 600, 4), (3, 2, 17, 64)):
        def mk(g, B=B, H=H, T=T, D=D):
            kw = base(g, B, H, T, D)
            kw["pos_key"] = torch.randn(H, 2 * DA_PB, D, generator=g)
            kw["pos_query"] = torch.randn(H, 2 * DA_PB, D, generator=g)
            return kw
        s.add(f"shape [{B}, {H}, {T}, {D}]", "legal", None, mk)
    add("no position terms", "legal", None, lambda kw, g: kw.update(pos_key=None, pos_query=None))
    add("pos_key only", "legal", None, lambda kw, g: kw.update(pos_query=None))
    add("pos_query only", "legal", None, lambda kw, g: kw.update(pos_key=None))
    add("pos_key H mismatch", "error", "pos_key", lambda kw, g: kw.update(pos_key=kw["pos_key"][:1]))
    add("pos_key D mismatch", "error", "pos_key", lambda kw, g: kw.update(pos_key=kw["pos_key"][..., :4]))
    add("pos_key 2k mismatch", "error", "pos_key", lambda kw, g: kw.update(pos_key=kw["pos_key"][:, :6]),
        names=("position_buckets",))
    add("attention_mask: all padding", "legal", None, lambda kw, g: kw["attention_mask"].zero_())
    add("attention_mask: a row with one real token", "legal", None,
        lambda kw, g: (kw["attention_mask"][0].zero_(), kw["attention_mask"][0, 3].fill_(1)))
    add("attention_mask: float 0/1", "error", "attention_mask", lambda kw, g: kw.update(attention_mask=kw["attention_mask"].float()))
    add("token-major q/k/v views ([B, T, H, D] transposed)", "legal", None,
        lambda kw, g: kw.update(**{a: kw[a].transpose(1, 2).contiguous().transpose(1, 2) for a in qkv}))
    add("q/k/v slices of one fused [B, T, 3, H, D] projection", "legal", None,
        lambda kw, g: kw.update(**dict(zip(qkv, torch.randn(2, 8, 3, 2, 8, generator=g).permute(2, 0, 3, 1, 4).unbind(0)))))
    add("same tensor for q, k, v", "legal", None, lambda kw, g: kw.update(key=kw["query"], value=kw["query"]))
    backward_cases(add, floats, (("dropout 0.5", lambda kw, g: kw.update(dropout_p=0.5, seed=7)),
                                 ("padding + dropout", lambda kw, g: kw.update(dropout_p=0.2, seed=8)),
                                 ("no pos terms", lambda kw, g: kw.update(pos_key=None, pos_query=None)),
                                 ("all padding", lambda kw, g: kw["attention_mask"].zero_())))
    all_meta_case(s, base)
    return s


# ------------------------------------------------------------------------------------------------ dropout
def dropout_spec() -> OpSpec:
    torch = _lazy_torch()
    s = OpSpec("dropout")

    def base(g, shape=(5, 33)):
        return dict(input=torch.randn(*shape, generator=g), p=0.3, seed=123, stream=0)

    generic_tensor_cases(s, base, "input", "float", required=True, ok_dtypes=_floats(), any_rank=True,
                         size_free=True, single=True, allow_sparse_either=False)
    prob_cases(s, base, "p", one_ok=False)
    seed_cases(s, base, "seed", limit=2 ** 64)
    seed_cases(s, base, "stream", limit=2 ** 32, required=True)
    add = s.editor(base)
    value_cases(s, base, "input", ("input",))
    dtype_cases(s, base, ("input",), backward=True)
    for shape in ((0,), (0, 7), (1,), (3, 0, 2), (2, 3, 4, 5, 6), (1 << 20,), (7,), (4097,)):
        s.add(f"shape {list(shape)}", "legal", None, lambda g, shape=shape: base(g, shape))
    add("0-d input", "legal", None, lambda kw, g: kw.update(input=torch.tensor(1.5)))
    add("p = 0 returns the input", "legal", None, lambda kw, g: kw.update(p=0.0))
    add("p = 0.5, seed 2**64 - 1, stream 2**32 - 1", "legal", None,
        lambda kw, g: kw.update(p=0.5, seed=2 ** 64 - 1, stream=2 ** 32 - 1))
    add("all NaN, p = 0.5 (dropped values are exactly 0)", "legal", None,
        lambda kw, g: (kw["input"].fill_(float("nan")), kw.update(p=0.5)), nonfinite_ok=True)
    add("all +inf, p = 0.5 (dropped values are exactly 0)", "legal", None,
        lambda kw, g: (kw["input"].fill_(float("inf")), kw.update(p=0.5)), nonfinite_ok=True)
    add("fp32 max values, p = 0.5 (kept values overflow to inf)", "either", None,
        lambda kw, g: (kw["input"].fill_(3.4e38), kw.update(p=0.5)), nonfinite_ok=True)
    for dt in _floats():
        d = _dname(dt)
        for p in (0.1, 0.5, 0.9, 0.999):
            add(f"p {p}, {d}", "legal", None, lambda kw, g, p=p, dt=dt: kw.update(p=p, input=kw["input"].to(dt)))
        for shape in ((0, 3), (1,), (2, 3, 4, 5, 6), (100003,), (4097,)):
            s.add(f"shape {list(shape)}, {d}", "legal", None,
                  lambda g, shape=shape, dt=dt: dict(base(g, shape), input=base(g, shape)["input"].to(dt)))
        add(f"0-d input, {d}", "legal", None, lambda kw, g, dt=dt: kw.update(input=torch.tensor(1.5, dtype=dt)))
        add(f"non-contiguous, {d}", "legal", None,
            lambda kw, g, dt=dt: kw.update(input=transposed_storage(kw["input"].to(dt))))
        add(f"channels_last 4-d, {d}", "legal", None, lambda kw, g, dt=dt: kw.update(
            input=torch.randn(2, 3, 4, 5, generator=g).to(dt).to(memory_format=torch.channels_last)))
        add(f"expanded (stride 0), {d}", "legal", None,
            lambda kw, g, dt=dt: kw.update(input=kw["input"][:1].to(dt).expand(5, 33)))
        add(f"requires_grad under no_grad, {d}", "legal", None,
            lambda kw, g, dt=dt: kw.update(input=kw["input"].to(dt).requires_grad_(True)))
        add(f"stream 2**32 - 1, seed 2**63, {d}", "legal", None,
            lambda kw, g, dt=dt: kw.update(input=kw["input"].to(dt), stream=2 ** 32 - 1, seed=2 ** 63))
    backward_cases(add, ("input",), (("p 0.3", lambda kw, g: None), ("p 0.9", lambda kw, g: kw.update(p=0.9)),
                                     ("non-contiguous", lambda kw, g: kw.update(input=noncontig_last(kw["input"])))))
    return s


# --------------------------------------------------------------------------------- dropout_add_layer_norm
def daln_spec() -> OpSpec:
    torch = _lazy_torch()
    s = OpSpec("dropout_add_layer_norm")

    def base(g, shape=(3, 5, 16)):
        H = shape[-1]
        return dict(input=torch.randn(*shape, generator=g), residual=torch.randn(*shape, generator=g),
                    weight=1 + 0.1 * torch.randn(H, generator=g), bias=0.1 * torch.randn(H, generator=g),
                    p=0.1, seed=77, stream=2, eps=1e-5)

    f32 = (torch.float32,)
    generic_tensor_cases(s, base, "input", "float", required=True, ok_dtypes=f32, names=("residual", "weight"))
    generic_tensor_cases(s, base, "residual", "float", required=True, ok_dtypes=f32, names=("input",))
    generic_tensor_cases(s, base, "weight", "float", required=True, ok_dtypes=f32)
    generic_tensor_cases(s, base, "bias", "float", required=False, ok_dtypes=f32, names=("weight",))
    prob_cases(s, base, "p", one_ok=False)
    seed_cases(s, base, "seed", limit=2 ** 64)
    seed_cases(s, base, "stream", limit=2 ** 32)
    add = s.editor(base)
    add("seed None with p = 0.1", "error", "seed", lambda kw, g: kw.update(seed=None))
    add("seed None with p = 0", "legal", None, lambda kw, g: kw.update(seed=None, p=0.0))
    for v, e in ((1e-5, "legal"), (1e-30, "legal"), (1.0, "legal"), (1e30, "legal"), (0.0, "error"), (-1e-5, "error"),
                 (float("nan"), "error"), (float("inf"), "error"), ("1e-5", "error"), (True, "error"), (None, "error")):
        add(f"eps: {v!r}", e, "eps", _set("eps", v))
    floats = ("input", "residual", "weight", "bias")
    value_cases(s, base, "input", floats, huge_overflows=True)
    value_cases(s, base, "residual", floats, huge_overflows=True, dtypes=(torch.float32,))
    value_cases(s, base, "weight", floats, dtypes=(torch.float32,))
    dtype_cases(s, base, floats, backward=True)
    for dt in (torch.float16, torch.bfloat16):
        add(f"{_dname(dt)} input, fp32 weight and bias (autocast style)", "legal", None,
            lambda kw, g, dt=dt: kw.update(input=kw["input"].to(dt), residual=kw["residual"].to(dt)))
        add(f"{_dname(dt)} input, fp32 weight, {_dname(dt)} bias", "error", "bias",
            lambda kw, g, dt=dt: kw.update(input=kw["input"].to(dt), residual=kw["residual"].to(dt),
                                          bias=kw["bias"].to(dt)), names=("weight",))
    for shape in ((0, 16), (4, 0), (16,), (1, 1), (2, 4097), (3, 0, 16), (2, 2, 2, 2, 8)):
        expect = "error" if shape[-1] == 0 else "legal"
        s.add(f"shape {list(shape)}", expect, "input", lambda g, shape=shape: base(g, shape))
    add("0-d input", "error", "input", lambda kw, g: kw.update(input=torch.tensor(1.0), residual=torch.tensor(1.0)))
    add("constant rows (variance 0)", "legal", None,
        lambda kw, g: (kw["input"].fill_(2.0), kw["residual"].fill_(1.0), kw.update(p=0.0)))
    add("p 0, no bias", "legal", None, lambda kw, g: kw.update(p=0.0, bias=None))
    add("input and residual the same tensor", "legal", None, lambda kw, g: kw.update(residual=kw["input"]))
    backward_cases(add, floats, (("p 0.1", lambda kw, g: None), ("p 0", lambda kw, g: kw.update(p=0.0)),
                                 ("no bias", lambda kw, g: kw.update(bias=None))))
    all_meta_case(s, base)
    return s


def selftest_spec() -> OpSpec:
    """``--ops _selftest``: checks the sweep's own guard (ok, error, crash by SIGSEGV / abort, hang)."""
    s = OpSpec("_selftest")
    for mode, expect in (("ok", "legal"), ("error", "error"), ("segfault", "legal"), ("abort", "legal"),
                         ("hang", "legal"), ("ok", "legal")):
        s.add(f"mode: {mode}", expect, "mode", lambda g, mode=mode: {"mode": mode})
    return s


def _selftest_op(mode: str):
    if mode == "error":
        raise ValueError("mode: expected anything else")
    if mode == "segfault":
        import ctypes
        ctypes.string_at(0)
    if mode == "abort":
        os.abort()
    if mode == "hang":
        time.sleep(3600)
    return mode


SPECS = {"mask_tokens": mask_tokens_spec, "gumbel_sample": gumbel_spec, "mlm_loss_and_sample": mlm_spec,
         "rtd_loss": rtd_loss_spec, "disentangled_attention": attention_spec, "dropout": dropout_spec,
         "dropout_add_layer_norm": daln_spec, "_selftest": selftest_spec}


# ============================================================================================ op contracts
# check(result, kwargs, case) -> None, or what is wrong with a returned result. ``case.nonfinite_ok`` relaxes the
# finiteness rule; the independent formulas run only on finite inputs.

def _t(x):
    torch = _lazy_torch()
    return isinstance(x, torch.Tensor)


def _any_meta(kw) -> bool:
    torch = _lazy_torch()
    return any(isinstance(v, torch.Tensor) and v.is_meta for v in kw.values())


def _finite_inputs(kw, names=None) -> bool:
    torch = _lazy_torch()
    for k, v in kw.items():
        if names is not None and k not in names:
            continue
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.is_meta and v.numel():
            if not bool(torch.isfinite(v.detach().float()).all()):
                return False
    return True


def _shape_dtype(name, t, shape, dtype) -> Optional[str]:
    if not _t(t):
        return f"{name}: expected a tensor, got {type(t).__name__}"
    if tuple(t.shape) != tuple(shape):
        return f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}"
    if dtype is not None and t.dtype != dtype:
        return f"{name}: dtype {t.dtype}, expected {dtype}"
    return None


def _close(name, got, want, rtol, atol) -> Optional[str]:
    torch = _lazy_torch()
    got64, want64 = got.detach().double(), want.detach().double()
    if got64.shape != want64.shape:
        return f"{name}: shape {tuple(got64.shape)} vs formula {tuple(want64.shape)}"
    if got64.numel() == 0:
        return None
    if not torch.allclose(got64, want64, rtol=rtol, atol=atol, equal_nan=True):
        diff = (got64 - want64).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        i = int(diff.reshape(-1).argmax())
        return (f"{name}: differs from the formula (max |diff| {float(diff.reshape(-1)[i]):.3g} at flat index {i}: "
                f"got {float(got64.reshape(-1)[i]):.6g}, want {float(want64.reshape(-1)[i]):.6g})")
    return None


def _tol(dtype, scale=1.0):
    torch = _lazy_torch()
    if dtype == torch.float64:
        return 1e-7 * scale, 1e-9 * scale
    if dtype in (torch.float16, torch.bfloat16):
        return 3e-2 * scale, 3e-2 * scale
    return 1e-4 * scale, 1e-5 * scale


def _nonfinite(name, t) -> Optional[str]:
    torch = _lazy_torch()
    if _t(t) and t.is_floating_point() and not t.is_meta and t.numel() and not bool(torch.isfinite(t.float()).all()):
        return f"{name}: non-finite values from finite legal input"
    return None


def check_rtd(res, kw, case) -> Optional[str]:
    torch = _lazy_torch()
    logits = kw["logits"]
    loss, metrics = (res if kw.get("return_metrics") else (res, None))
    if kw.get("return_metrics") and not (isinstance(res, tuple) and len(res) == 2 and isinstance(metrics, dict)):
        return f"expected (loss, metrics), got {type(res).__name__}"
    want_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shape = tuple(logits.shape) if kw.get("reduction") == "none" else ()
    p = _shape_dtype("loss", loss, shape, want_dtype)
    if p:
        return p
    if metrics is not None:
        keys = {"accuracy", "precision", "recall", "replaced_fraction"}
        if set(metrics) != keys:
            return f"metrics: keys {sorted(metrics)}, expected {sorted(keys)}"
        for k, v in metrics.items():
            p = _shape_dtype(f"metrics[{k}]", v, (), torch.float32)
            if p:
                return p
    if _any_meta(kw):
        return None
    finite = _finite_inputs(kw)
    if finite:
        for k, v in [("loss", loss)] + list((metrics or {}).items()):
            p = _nonfinite(k, v)
            if p:
                return p
        if metrics is not None and any(not 0.0 <= float(v) <= 1.0 for v in metrics.values()):
            return f"metrics outside [0, 1]: { {k: float(v) for k, v in metrics.items()} }"
        x = logits.detach().double()
        y = (kw["corrupted_ids"].long() != kw["original_ids"].long()).double()
        m = torch.ones_like(x) if kw.get("attention_mask") is None else (kw["attention_mask"] != 0).double()
        per = x.clamp(min=0) - x * y + torch.log1p(torch.exp(-x.abs()))
        want = {"mean": (per * m).sum() / m.sum().clamp(min=1), "sum": (per * m).sum(), "none": per * m}[kw["reduction"]]
        p = _close("loss", loss, want, *_tol(want_dtype))
        if p:
            return p
        if metrics is not None and m.sum() > 0:
            acc = (((x > 0).double() == y).double() * m).sum() / m.sum()
            frac = (y * m).sum() / m.sum()
            for k, w in (("accuracy", acc), ("replaced_fraction", frac)):
                p = _close(f"metrics[{k}]", metrics[k], w, 1e-5, 1e-6)
                if p:
                    return p
        if case.backward and logits.grad is not None:
            n = m.sum().clamp(min=1) if kw["reduction"] == "mean" else 1.0
            gw = _grad_weights(loss)
            want_g = (torch.sigmoid(x) - y) * m / n * gw.double()
            return _close("logits.grad", logits.grad, want_g, *_tol(logits.dtype, 3))
    return None


def _specials_of(v):
    torch = _lazy_torch()
    if isinstance(v, torch.Tensor):
        return {int(i) for i in v.flatten().tolist()}
    return {int(i) for i in v}


def check_mask_tokens(res, kw, case) -> Optional[str]:
    torch = _lazy_torch()
    ids = kw["input_ids"]
    for name in ("input_ids", "labels", "masked"):
        if not hasattr(res, name):
            return f"result has no field {name!r} ({type(res).__name__})"
    for name, t, dt in (("input_ids", res.input_ids, ids.dtype), ("labels", res.labels, torch.int64),
                        ("masked", res.masked, torch.bool)):
        p = _shape_dtype(name, t, ids.shape, dt)
        if p:
            return p
    if _any_meta(kw) or ids.numel() == 0:
        return None
    B, T = ids.shape
    m, out, lab = res.masked, res.input_ids, res.labels
    ids64 = ids.long()
    if not torch.equal(lab, torch.where(m, ids64, torch.full_like(ids64, -100))):
        return "labels != where(masked, input_ids, -100)"
    if not torch.equal(out[~m], ids[~m]):
        return "an unmasked position changed its id"
    real = torch.ones_like(m) if kw.get("attention_mask") is None else (kw["attention_mask"] != 0)
    specials = _specials_of(kw["special_token_ids"])
    special = torch.zeros_like(m)
    for s_ in specials:
        special |= ids64 == s_
    cand = real & ~special
    if bool((m & ~cand).any()):
        return "a special or padding position was selected"
    V, mid = kw["vocab_size"], kw["mask_token_id"]
    rep, orig = out[m].long(), ids64[m]
    mtf, rtf = float(kw["mask_token_frac"]), float(kw["random_token_frac"])
    is_random = (rep != mid) & (rep != orig)
    if bool(is_random.any()):
        if rtf == 0:
            return "a selected position got an id that is neither [MASK] nor the original (random_token_frac = 0)"
        r = rep[is_random]
        if bool(((r < 0) | (r >= V)).any()) or any(int(i) in specials for i in r.tolist()):
            return "a random replacement is special or outside [0, vocab_size)"
    if mtf == 1.0 and bool((rep != mid).any()):
        return "mask_token_frac = 1 but a selected position is not [MASK]"
    if mtf == 0.0 and rtf == 0.0 and bool((rep != orig).any()):
        return "mask_token_frac = random_token_frac = 0 but a selected position changed"
    ws = kw.get("word_starts")
    pos = torch.arange(T).expand(B, T)
    if ws is not None:
        es = (ws != 0) | ~real
        es[:, 0] = True
        start = torch.where(es, pos, torch.zeros_like(pos)).cummax(1).values
        if not torch.equal(m, m.gather(1, start)):
            return "a word was split (its tokens not all selected or all unselected)"
    p = float(kw["mask_prob"])
    if ws is None and kw.get("strategy", "count") == "count":
        n_real, n_cand = real.sum(1), cand.sum(1)
        tbl = torch.round(n_real.float() * torch.tensor(p, dtype=torch.float32)).long().clamp(max=int((p + 0.005) * T))
        want = torch.minimum(n_cand, tbl.clamp(min=1))
        got = m.sum(1)
        if not torch.equal(got, want):
            return f"count strategy: selected {got.tolist()} per row, the documented formula gives {want.tolist()}"
    if kw.get("strategy") == "bernoulli" and p == 1.0 and ws is None and not torch.equal(m, cand):
        return "bernoulli with mask_prob 1: not every candidate selected"
    if kw.get("strategy") == "bernoulli" and p == 0.0 and bool(m.any()):
        return "bernoulli with mask_prob 0: a position was selected"
    return None


def _disallowed_set(v) -> set:
    torch = _lazy_torch()
    if isinstance(v, torch.Tensor):
        return {int(i) for i in v.flatten().tolist()}
    return {int(i) for i in v}


def _check_samples(name, sampled, N, V, disallowed) -> Optional[str]:
    torch = _lazy_torch()
    p = _shape_dtype(name, sampled, (N,), torch.int64)
    if p or sampled.is_meta or N == 0:
        return p
    if bool(((sampled < 0) | (sampled >= V)).any()):
        return f"{name}: id outside [0, {V}): {sampled.tolist()[:8]}"
    bad = [i for i in sampled.tolist() if i in disallowed]
    if bad:
        return f"{name}: disallowed id(s) drawn: {bad[:8]}"
    return None


def check_gumbel(res, kw, case) -> Optional[str]:
    torch = _lazy_torch()
    logits = kw["logits"]
    N, V = logits.shape
    dis = _disallowed_set(kw["disallowed_ids"])
    p = _check_samples("sampled", res, N, V, dis)
    if p or _any_meta(kw) or N == 0:
        return p
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[list(dis)] = False
    lg = logits.detach().float()
    for n in range(N):
        row = torch.where(allowed, lg[n], torch.full_like(lg[n], float("nan")))
        pinf = (row == float("inf")).nonzero().flatten()
        if pinf.numel():
            if int(res[n]) != int(pinf[0]):
                return f"row {n}: +inf logits at allowed ids {pinf.tolist()[:4]} (ties go to the smallest), drew {int(res[n])}"
    if float(kw["temperature"]) <= 1e-20 and _finite_inputs(kw):
        want = torch.where(allowed, lg, torch.full_like(lg, float("-inf"))).argmax(1)
        if not torch.equal(res, want):
            return f"temperature -> 0 must be greedy: drew {res.tolist()[:8]}, argmax {want.tolist()[:8]}"
    return None


def check_mlm(res, kw, case) -> Optional[str]:
    torch = _lazy_torch()
    import electra_fast
    h, w, b, t = kw["hidden"], kw["weight"], kw.get("bias"), kw["targets"]
    want_n = 3 if kw.get("return_metrics") else 2
    if not (isinstance(res, tuple) and len(res) == want_n):
        return f"expected a tuple of {want_n}, got {type(res).__name__}"
    loss, sampled = res[0], res[1]
    N, V = h.shape[0], w.shape[0]
    acc_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    p = _shape_dtype("loss", loss, (N,) if kw.get("reduction") == "none" else (), acc_dtype)
    if p:
        return p
    p = _check_samples("sampled", sampled, N, V, _disallowed_set(kw["disallowed_ids"]))
    if p:
        return p
    if want_n == 3:
        p = _shape_dtype("metrics[accuracy]", res[2].get("accuracy") if isinstance(res[2], dict) else None, (),
                         torch.float32)
        if p:
            return p
    if _any_meta(kw) or not _finite_inputs(kw):
        return None
    for name, v in (("loss", loss),) + ((("accuracy", res[2]["accuracy"]),) if want_n == 3 else ()):
        p = _nonfinite(name, v)
        if p:
            return p
    lg = h.detach().double() @ w.detach().double().T + (0 if b is None else b.detach().double())
    valid = t != kw.get("ignore_index", -100)
    rows = (torch.logsumexp(lg, 1) - lg.gather(1, t.long().clamp(0, max(V - 1, 0))[:, None])[:, 0]) * valid
    want = {"mean": rows.sum() / valid.sum().clamp(min=1), "sum": rows.sum(), "none": rows}[kw.get("reduction", "mean")]
    rtol, atol = _tol(h.dtype, 3)
    p = _close("loss", loss, want, rtol, atol * max(1.0, float(lg.abs().max()) if lg.numel() else 1.0))
    if p:
        return p
    if N and h.dtype in (torch.float32, torch.float64) and float(lg.abs().max()) < 1e6:
        with electra_fast.use_backend("reference"):
            direct = electra_fast.gumbel_sample(lg.to(h.dtype), seed=kw["seed"], temperature=kw["temperature"],
                                                disallowed_ids=kw["disallowed_ids"])
        if not torch.equal(direct, sampled):
            return (f"sampled {sampled.tolist()[:8]} != gumbel_sample(hidden @ weight.T + bias) "
                    f"{direct.tolist()[:8]} with the same seed (README: equal except at float near-ties)")
    return None


def check_attention(res, kw, case) -> Optional[str]:
    torch = _lazy_torch()
    q = kw["query"]
    p = _shape_dtype("output", res, q.shape, q.dtype)
    if p or _any_meta(kw):
        return p
    mask = kw.get("attention_mask")
    if mask is not None and res.numel():
        pad_q = (mask == 0)[:, None, :, None].expand_as(res)
        if bool((res.detach()[pad_q] != 0).any()):
            return "padded query rows are not 0"
    if not _finite_inputs(kw) or case.nonfinite_ok:
        return None
    p = _nonfinite("output", res)
    if p:
        return p
    if kw.get("pos_key") is None and kw.get("pos_query") is None and float(kw.get("dropout_p") or 0) == 0 and res.numel():
        qd, kd, vd = (kw[a].detach().double() for a in ("query", "key", "value"))
        scale = kw.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        s_ = qd @ kd.transpose(-1, -2) * float(scale)
        if mask is not None:
            keym = (mask != 0)[:, None, None, :]
            s_ = s_.masked_fill(~keym, float("-inf"))
        pr = torch.softmax(s_, -1).nan_to_num(0.0)
        want = pr @ vd
        if mask is not None:
            want = want * (mask != 0)[:, None, :, None]
        return _close("output", res, want, *_tol(q.dtype, 10))
    return None


def _reference_keep_mask(x, p, seed, stream):
    torch = _lazy_torch()
    import electra_fast
    with electra_fast.use_backend("reference"):
        return electra_fast.dropout(torch.ones(x.shape, dtype=torch.float32), p, seed, stream) != 0


def check_dropout(res, kw, case) -> Optional[str]:
    torch = _lazy_torch()
    x, p = kw["input"], float(kw["p"])
    if p == 0.0:
        if res is not x and not (_t(res) and (res.is_meta or torch.equal(res, x))):
            return "p = 0 must return the input"
        return None
    q = _shape_dtype("output", res, x.shape, x.dtype)
    if q or _any_meta(kw) or x.numel() == 0:
        return q
    keep = _reference_keep_mask(x, p, int(kw["seed"]), int(kw["stream"]))
    out = res.detach()
    if bool((out[~keep] != 0).any()) or bool(torch.isnan(out[~keep]).any()):
        return "dropped elements are not exactly 0 (README: dropped values are exactly 0)"
    scale32 = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    xd = x.detach()
    if x.dtype == torch.float64:
        want = xd * scale32.double()
        err = _close("kept values", out[keep], want[keep], 1e-12, 0)
        if err:
            return err
    else:
        want = (xd.float() * scale32).to(x.dtype)
        a, b_ = out[keep].float(), want[keep].float()
        same = (a == b_) | (torch.isnan(a) & torch.isnan(b_))
        if not bool(same.all()):
            i = int((~same).nonzero()[0])
            return f"kept value {float(a[i])} != x * fp32(1/(1-p)) = {float(b_[i])}"
    n = x.numel()
    if n >= 10000:
        frac = 1 - float(keep.float().mean())
        if abs(frac - p) > 6 * math.sqrt(p * (1 - p) / n):
            return f"drop fraction {frac:.4f} far from p = {p}"
    if not _finite_inputs(kw) or case.nonfinite_ok:
        return None
    return _nonfinite("output", res)


def check_daln(res, kw, case) -> Optional[str]:
    torch = _lazy_torch()
    import electra_fast
    x, r, w, b = kw["input"], kw["residual"], kw["weight"], kw.get("bias")
    q = _shape_dtype("output", res, x.shape, x.dtype)
    if q or _any_meta(kw) or x.numel() == 0:
        return q
    if not _finite_inputs(kw) or case.nonfinite_ok:
        return None
    q = _nonfinite("output", res)
    if q:
        return q
    p = float(kw["p"])
    xd = x.detach()
    if p > 0:
        with electra_fast.use_backend("reference"):
            xd = electra_fast.dropout(xd, p, int(kw["seed"]), int(kw.get("stream", 0)))
    h = (xd + r.detach()).double()
    H = x.shape[-1]
    want = torch.nn.functional.layer_norm(h, [H], w.detach().double(), None if b is None else b.detach().double(),
                                          float(kw["eps"]))
    return _close("output", res, want, *_tol(x.dtype, 3))


CHECKS = {"_selftest": lambda res, kw, case: None, "rtd_loss": check_rtd, "mask_tokens": check_mask_tokens, "gumbel_sample": check_gumbel,
          "mlm_loss_and_sample": check_mlm, "disentangled_attention": check_attention, "dropout": check_dropout,
          "dropout_add_layer_norm": check_daln}


def _grad_weights(t):
    """Fixed pseudo-random weights for the scalar a backward case differentiates (the same on every backend)."""
    torch = _lazy_torch()
    g = torch.Generator().manual_seed(4242)
    return torch.rand(t.shape, generator=g, dtype=torch.float32).to(t.dtype) + 0.5


def _float_outputs(res):
    torch = _lazy_torch()
    if isinstance(res, torch.Tensor):
        return [res] if res.is_floating_point() and res.requires_grad else []
    if isinstance(res, (tuple, list)):
        return [t for r in res for t in _float_outputs(r)]
    return []


def _run_backward(res, kw) -> Dict[str, object]:
    outs = _float_outputs(res)
    if not outs:
        raise AssertionError("backward case without a differentiable output")
    total = sum((o * _grad_weights(o)).sum() for o in outs)
    total.backward()
    torch = _lazy_torch()
    return {k: v.grad for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def _check_grads(grads, kw, case) -> Optional[str]:
    for k, g in grads.items():
        x = kw[k]
        if g is None:
            return f"{k}.grad is None"
        p = _shape_dtype(f"{k}.grad", g, x.shape, x.dtype)
        if p:
            return p
        if _finite_inputs(kw) and not case.nonfinite_ok:
            p = _nonfinite(f"{k}.grad", g)
            if p:
                return p
    return None


# ------------------------------------------------------------------------------------- result comparison
def agree(a, b, rtol_scale=1.0, path="result") -> Optional[str]:
    """None when two results (tensors, tuples, dicts, NamedTuples, scalars) agree, else where they differ."""
    torch = _lazy_torch()
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return f"{path}: {tuple(a.shape)} {a.dtype} {a.device} vs {tuple(b.shape)} {b.dtype} {b.device}"
        if a.is_meta or a.numel() == 0:
            return None
        if a.is_floating_point():
            rtol, atol = _tol(a.dtype, 10 * rtol_scale)
            a64, b64 = a.detach().double(), b.detach().double()
            if not torch.allclose(a64, b64, rtol=rtol, atol=atol * max(1.0, float(b64.abs().nan_to_num(0, 0, 0).max())),
                                  equal_nan=True):
                d = (a64 - b64).abs().nan_to_num(float("inf"))
                i = int(d.reshape(-1).argmax())
                return (f"{path}: reference {float(a64.reshape(-1)[i]):.6g} vs {float(b64.reshape(-1)[i]):.6g} "
                        f"at flat index {i}")
            return None
        if not torch.equal(a, b):
            i = int((a != b).reshape(-1).nonzero()[0])
            return f"{path}: reference {a.reshape(-1)[i].item()} vs {b.reshape(-1)[i].item()} at flat index {i}"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            p = agree(a[k], b[k], rtol_scale, f"{path}[{k!r}]")
            if p:
                return p
        return None
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        fields = getattr(a, "_fields", None)
        for i, (x, y) in enumerate(zip(a, b)):
            p = agree(x, y, rtol_scale, f"{path}.{fields[i]}" if fields else f"{path}[{i}]")
            if p:
                return p
        return None
    if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return f"{path}: {a!r} vs {b!r}"
    return None


# ================================================================================================= model
MODEL_BACKENDS = ("standard", "disentangled")
M_V, M_T = 64, 16  # tiny vocabulary; [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4; max_position_embeddings 32


def model_config(attention: str):
    from electra_fast.models import ElectraConfig
    extra = dict(attention="disentangled", position_buckets=8, max_relative_positions=16, generator_hidden_size=32,
                 generator_intermediate_size=64) if attention == "disentangled" else {}
    return ElectraConfig(**{**dict(vocab_size=M_V, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3,
                                   mask_token_id=4, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64, generator_hidden_size=16,
                                   generator_num_hidden_layers=1, generator_num_attention_heads=1,
                                   generator_intermediate_size=32, max_position_embeddings=32,
                                   disallowed_sample_ids=(0, 2, 3, 4)), **extra})


def model_cases() -> List[Case]:
    torch = _lazy_torch()
    import numpy as np
    C: List[Case] = []

    def base(g, B=3, T=M_T):
        ids = torch.randint(5, M_V, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.int64)
        if T:
            ids[:, 0], ids[:, -1] = 2, 3
        if B > 1 and T > 4:
            mask[1, -4:] = 0
            ids[1, -4:] = 0
        return dict(input_ids=ids, attention_mask=mask, seed=21, token_type_ids=None)

    def add(label, expect, arg, f, **kw):
        C.append(Case(label, expect, arg, _with(base, f), **kw))

    # input_ids
    for label, e, v in (("None", "error", None), ("python list", "error", lambda x, g: x.tolist()),
                        ("numpy array", "error", lambda x, g: x.numpy()), ("string", "error", "abc"),
                        ("float32", "error", lambda x, g: x.float()), ("bool", "error", lambda x, g: x != 0),
                        ("int16", "error", lambda x, g: x.short()), ("uint8", "error", lambda x, g: x.byte()),
                        ("int32", "legal", lambda x, g: x.int()), ("1-d", "error", lambda x, g: x[0]),
                        ("3-d", "error", lambda x, g: x[None]), ("0-d", "error", lambda x, g: x[0, 0]),
                        ("meta device", "error", lambda x, g: x.to("meta")),
                        ("non-contiguous", "legal", lambda x, g: transposed_storage(x)),
                        ("expanded (stride 0)", "legal", lambda x, g: x[:1].expand_as(x)),
                        ("contains -1", "error", lambda x, g: x.index_fill(1, torch.tensor([2]), -1)),
                        (f"contains {M_V} (= vocab_size)", "error", lambda x, g: x.index_fill(1, torch.tensor([2]), M_V)),
                        ("contains 2**40", "error", lambda x, g: x.index_fill(1, torch.tensor([2]), 2 ** 40)),
                        (f"contains {M_V - 1} (largest id)", "legal", lambda x, g: x.index_fill(1, torch.tensor([2]), M_V - 1)),
                        ("all [PAD]", "legal", lambda x, g: torch.zeros_like(x)),
                        ("all [MASK] (no candidates)", "legal", lambda x, g: torch.full_like(x, 4))):
        add(f"input_ids: {label}", e, "input_ids", _set("input_ids", v),
            names=("attention_mask",) if label == "meta device" else ())
    for B, T, e in ((0, M_T, "either"), (3, 0, "either"), (1, 1, "legal"), (2, 2, "legal"), (2, 32, "legal"),
                    (2, 33, "error")):
        C.append(Case(f"input_ids: shape [{B}, {T}]", e, "input_ids", lambda g, B=B, T=T: base(g, B, T)))
    # attention_mask
    for label, e, v in (("None", "legal", None), ("python list", "error", lambda x, g: x.tolist()),
                        ("bool", "legal", lambda x, g: x != 0), ("float 0/1", "either", lambda x, g: x.float()),
                        ("int 2 / -1 (nonzero = real)", "either", lambda x, g: x * 2 - (x == 0).long()),
                        ("float NaN", "either", lambda x, g: x.float().index_fill(1, torch.tensor([0]), float("nan"))),
                        ("wrong shape (T - 1)", "error", lambda x, g: x[:, :-1]),
                        ("wrong shape (B + 1)", "error", lambda x, g: torch.cat([x, x[:1]])),
                        ("1-d", "error", lambda x, g: x[0]), ("3-d [B, 1, T]", "error", lambda x, g: x[:, None]),
                        ("meta device", "error", lambda x, g: x.to("meta")),
                        ("all padding", "legal", lambda x, g: torch.zeros_like(x)),
                        ("one row all padding", "legal", lambda x, g: x.index_fill(0, torch.tensor([0]), 0)),
                        ("only [CLS] real", "legal", lambda x, g: (torch.arange(x.shape[1]) == 0).long().expand_as(x).clone()),
                        ("non-contiguous", "legal", lambda x, g: transposed_storage(x)),
                        ("string", "error", "abc")):
        add(f"attention_mask: {label}", e, "attention_mask", _set("attention_mask", v))
    # token_type_ids
    for label, e, v in (("zeros", "legal", lambda x, g: torch.zeros(3, M_T, dtype=torch.int64)),
                        ("ones (type_vocab_size 2)", "legal", lambda x, g: torch.ones(3, M_T, dtype=torch.int64)),
                        ("2 (= type_vocab_size)", "error", lambda x, g: torch.full((3, M_T), 2)),
                        ("-1", "error", lambda x, g: torch.full((3, M_T), -1)),
                        ("float", "error", lambda x, g: torch.zeros(3, M_T)),
                        ("wrong shape", "error", lambda x, g: torch.zeros(3, M_T - 1, dtype=torch.int64)),
                        ("python list", "error", lambda x, g: [[0] * M_T] * 3),
                        ("meta device", "error", lambda x, g: torch.zeros(3, M_T, dtype=torch.int64, device="meta"))):
        add(f"token_type_ids: {label}", e, "token_type_ids", _set("token_type_ids", v))
    # seed
    for label, e, v in (("None", "legal", None), ("0", "legal", 0), ("2**63 - 1", "legal", 2 ** 63 - 1),
                        ("2**63", "error", 2 ** 63), ("-1", "error", -1), ("1.5", "error", 1.5), ("True", "error", True),
                        ("string", "error", "7"), ("numpy int64", "either", lambda x, g: np.int64(7)),
                        ("int tensor", "either", lambda x, g: torch.tensor(7))):
        add(f"seed: {label}", e, "seed", _set("seed", v))
    add("train mode (dropout on)", "legal", None, lambda kw, g: kw.update(_train=True))
    add("train mode, backward", "legal", None, lambda kw, g: kw.update(_train=True, _backward=True))
    return C


def check_model(out, kw, cfg) -> Optional[str]:
    torch = _lazy_torch()
    ids = kw["input_ids"]
    B, T = ids.shape
    for name in ("loss", "mlm_loss", "rtd_loss"):
        t = getattr(out, name, None)
        p = _shape_dtype(name, t, (), torch.float32)
        if p:
            return p
        p = _nonfinite(name, t)
        if p:
            return p
    p = _shape_dtype("discriminator_logits", out.discriminator_logits, (B, T), None)
    if p:
        return p
    p = _nonfinite("discriminator_logits", out.discriminator_logits)
    if p:
        return p
    c, m = out.corrupted_ids, out.masked
    p = _shape_dtype("corrupted_ids", c, (B, T), ids.dtype) or _shape_dtype("masked", m, (B, T), torch.bool)
    if p:
        return p
    if c.numel():
        if not torch.equal(c[~m], ids[~m]):
            return "corrupted_ids differ from input_ids outside the masked positions"
        if bool(((c < 0) | (c >= cfg.vocab_size)).any()):
            return "corrupted_ids outside [0, vocab_size)"
        bad = [i for i in c[m].tolist() if i in set(cfg.disallowed_sample_ids)]
        if bad:
            return f"disallowed sample ids in corrupted_ids: {bad[:5]}"
    for k, v in out.metrics.items():
        p = _nonfinite(f"metrics[{k}]", v)
        if p:
            return p
    return None


# ============================================================================================ child side
def _emit(obj) -> None:
    sys.stdout.write(PROTO + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _exception_record(exc: BaseException) -> dict:
    torch = _lazy_torch()
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    where = f"{last.tb_frame.f_code.co_filename}:{last.tb_lineno}" if last else "?"
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    msg = str(exc)
    return {"type": type(exc).__name__, "msg": msg[:400], "where": where,
            "in_torch": bool(last) and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(torch_dir)}


def _names_arg(msg: str, names) -> bool:
    return any(re.search(r"(?<![A-Za-z0-9_])" + re.escape(n) + r"(?![A-Za-z0-9_])", msg) for n in names if n)


def classify_exception(case: Case, exc: dict) -> Tuple[str, str]:
    detail = f"{exc['type']}: {exc['msg']} [{exc['where']}]"
    if exc["type"] == "RuntimeError" and "was forced but cannot serve" in exc["msg"]:
        return "clear", "forced-backend refusal (documented): " + detail
    if case.expect == "legal":
        return "unclear", "raised on a legal input: " + detail
    names = ((case.arg,) if case.arg else ()) + tuple(case.names)
    if exc["type"] not in ("ValueError", "TypeError"):
        return "unclear", detail
    if exc["in_torch"]:
        return "unclear", "raised inside torch: " + detail
    if names and not _names_arg(exc["msg"], names):
        return "unclear", f"message does not name {names[0]!r}: " + detail
    return "clear", detail


def _summ(x) -> str:
    torch = _lazy_torch()
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}{' meta' if x.is_meta else ''}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_summ(v) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_summ(v)}" for k, v in x.items()) + "}"
    return repr(x)[:60]


def child_ops(op: str, backends: List[str], start: int) -> None:
    torch = _lazy_torch()
    import warnings

    import electra_fast
    warnings.simplefilter("ignore")
    cases = SPECS[op]().cases
    fn, check = (_selftest_op if op == "_selftest" else getattr(electra_fast, op)), CHECKS[op]
    ref: Dict[int, tuple] = {}
    slots = [(ci, bi) for ci in range(len(cases)) for bi in range(len(backends))]
    for j in range(start, len(slots)):
        ci, bi = slots[j]
        case, backend = cases[ci], backends[bi]
        _emit({"ev": "start", "j": j})
        t0 = time.time()
        try:
            g = torch.Generator().manual_seed(1000 + ci)
            kw = case.make(g)
        except Exception as exc:  # the sweep's own bug: reported, never counted as the op's
            _emit({"ev": "done", "j": j, "cls": "sweep_error", "detail": "building the case failed: " +
                   "".join(traceback.format_exception_only(type(exc), exc)).strip()})
            continue
        result, exc_rec = None, None
        try:
            with electra_fast.use_backend(backend):
                result = fn(**kw)
                grads = _run_backward(result, kw) if case.backward else None
        except BaseException as exc:  # noqa: B902 - SystemExit / KeyboardInterrupt from an op are findings too
            exc_rec = _exception_record(exc)
        if exc_rec is not None:
            cls, detail = classify_exception(case, exc_rec)
            if bi > 0 and ref.get(ci, (None,))[0] == "result" and cls == "clear" and case.expect == "either":
                detail = "the reference returned a result here; " + detail
            ref_entry = ("error", exc_rec)
        elif case.expect == "error":
            cls, detail = "silent_wrong", f"returned {_summ(result)} where an error naming {case.arg!r} was due"
            ref_entry = ("result", result)
        else:
            try:
                problem = check(result, kw, case) or (_check_grads(grads, kw, case) if case.backward else None)
            except Exception as exc:
                problem = "the contract check failed on the result: " + "".join(
                    traceback.format_exception_only(type(exc), exc)).strip()
            cls, detail = ("silent_wrong", problem) if problem else ("ok", _summ(result))
            ref_entry = ("result", (result, grads))
        if bi == 0:
            ref[ci] = ref_entry
        elif cls in ("ok", "clear") and ci in ref:
            kind, other = ref.pop(ci)
            if kind == "result" and ref_entry[0] == "result" and not _any_meta(kw):
                d = agree(other, ref_entry[1], 10.0 if op == "disentangled_attention" else 1.0)
                if d:
                    cls, detail = "silent_wrong", "disagrees with the reference backend: " + d
            elif kind == "error" and ref_entry[0] == "result":
                cls, detail = "silent_wrong", (f"the reference raised {other['type']}: {other['msg'][:120]}, "
                                               f"{backend} returned {_summ(ref_entry[1][0])}")
        _emit({"ev": "done", "j": j, "cls": cls, "detail": detail[:600], "s": round(time.time() - t0, 3)})
    _emit({"ev": "end"})


def child_model(attention: str, start: int) -> None:
    torch = _lazy_torch()
    import warnings

    from electra_fast.models import ElectraPretrainingModel
    warnings.simplefilter("ignore")
    cfg = model_config(attention)
    torch.manual_seed(0)
    fused = ElectraPretrainingModel(cfg).eval()
    eager = ElectraPretrainingModel(cfg, fused=False).eval()
    eager.load_state_dict(fused.state_dict())
    cases = model_cases()
    for j in range(start, len(cases)):
        case = cases[j]
        _emit({"ev": "start", "j": j})
        t0 = time.time()
        g = torch.Generator().manual_seed(2000 + j)
        kw = case.make(g)
        train, backward = kw.pop("_train", False), kw.pop("_backward", False)
        fused.train(train)
        grad_problem = None
        try:
            out = fused(**kw)
            if backward:
                out.loss.backward()
                bad = [n for n, p_ in fused.named_parameters()
                       if p_.grad is not None and not bool(torch.isfinite(p_.grad).all())]
                grad_problem = f"non-finite gradients: {bad[:3]}" if bad else None
            exc_rec = None
        except BaseException as exc:  # noqa: B902
            exc_rec = _exception_record(exc)
        finally:
            fused.zero_grad(set_to_none=True)
            fused.eval()
        if exc_rec is not None:
            cls, detail = classify_exception(case, exc_rec)
        elif case.expect == "error":
            cls, detail = "silent_wrong", f"returned a result where an error naming {case.arg!r} was due"
        else:
            try:
                problem = check_model(out, kw, cfg)
                if problem is None and not train and kw["input_ids"].numel():
                    twin = eager(**kw)
                    d = agree(out.loss, twin.loss, 10.0, "loss")
                    problem = None if d is None else "the eager twin (fused=False) disagrees: " + d
                problem = problem or grad_problem
            except Exception as exc:
                problem = "the contract check failed on the result: " + "".join(
                    traceback.format_exception_only(type(exc), exc)).strip()
            cls, detail = ("silent_wrong", problem) if problem else ("ok", f"loss {float(out.loss):.4f}")
        _emit({"ev": "done", "j": j, "cls": cls, "detail": detail[:600], "s": round(time.time() - t0, 3)})
    _emit({"ev": "end"})


# =========================================================================================== parent side
def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("ELECTRA_FAST_BACKEND", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_guarded(kind: str, target: str, n_slots: int, scratch: str, timeout: float, extra=()) -> Dict[int, dict]:
    """Run slots 0..n_slots-1 of ``kind``/``target`` in child processes: a child that dies (signal) or stops
    answering (timeout) marks its current slot crash / hang and a new child continues after it."""
    results: Dict[int, dict] = {}
    j = 0
    while j < n_slots:
        err_path = os.path.join(scratch, f"stderr-{kind}-{target}-{j}.txt")
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, SELF, "--_child", kind, target, "--_start", str(j), *extra],
                                    stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=scratch,
                                    env=_child_env(), start_new_session=True)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf, current, ended = b"", None, False
        deadline = time.time() + max(180.0, timeout)  # the first answer waits for imports
        while True:
            left = deadline - time.time()
            ready = sel.select(timeout=max(0.0, left)) if left > 0 else []
            if not ready:
                _kill_group(proc)
                if current is None:
                    for k in range(j, n_slots):
                        results[k] = {"cls": "sweep_error", "detail": "the child process did not start in time"}
                    j = n_slots
                else:
                    results[current] = {"cls": "hang", "detail": f"no answer within {timeout:.0f} s"}
                    j = current + 1
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                rc = proc.wait()
                tail = _tail(err_path)
                if current is not None:
                    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc} mid-case"
                    results[current] = {"cls": "crash", "detail": f"{how}; stderr: {tail}"}
                    j = current + 1
                elif ended:
                    j = n_slots
                else:
                    for k in range(j, n_slots):
                        results.setdefault(k, {"cls": "sweep_error", "detail": f"child exited ({rc}): {tail}"})
                    j = n_slots
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace")
                if not text.startswith(PROTO):
                    continue
                ev = json.loads(text[len(PROTO):])
                if ev["ev"] == "start":
                    current = ev["j"]
                    deadline = time.time() + timeout
                elif ev["ev"] == "done":
                    results[ev["j"]] = {k: ev[k] for k in ("cls", "detail", "s") if k in ev}
                    current = None
                    deadline = time.time() + timeout
                elif ev["ev"] == "end":
                    ended = True
        sel.close()
        proc.stdout.close()
    return results


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace").strip().replace("\n", " | ")


def sweep_ops(ops, backends, scratch, timeout, jobs) -> List[dict]:
    work = [(op, SPECS[op]().cases) for op in ops]

    def one(item):
        op, cases = item
        t0 = time.time()
        res = run_guarded("ops", op, len(cases) * len(backends), scratch, timeout, ["--backends", ",".join(backends)])
        rows = []
        for ci, case in enumerate(cases):
            for bi, b in enumerate(backends):
                r = res.get(ci * len(backends) + bi, {"cls": "sweep_error", "detail": "no result"})
                rows.append({"category": "ops", "group": f"{op}/{b}", "op": op, "backend": b, **case.meta(), **r})
        print(f"  ops {op}: {len(cases)} cases x {len(backends)} backends in {time.time() - t0:.0f} s", flush=True)
        return rows

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        return [r for rows in ex.map(one, work) for r in rows]


def sweep_model(backends, scratch, timeout, jobs) -> List[dict]:
    cases = model_cases()

    def one(att):
        t0 = time.time()
        res = run_guarded("model", att, len(cases), scratch, timeout)
        print(f"  model {att}: {len(cases)} cases in {time.time() - t0:.0f} s", flush=True)
        return [{"category": "model", "group": f"model/{att}", "backend": att, **c.meta(),
                 **res.get(j, {"cls": "sweep_error", "detail": "no result"})} for j, c in enumerate(cases)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        return [r for rows in ex.map(one, backends) for r in rows]


# =================================================================================================== CLI
WORDS = ("the cat dog bird sat ran flew on under over a mat tree roof quickly slowly red blue green big small "
         "house river stone light dark morning evening sings eats sleeps watches").split()
DEAD_PID = 4194303  # above the usual pid_max: no process has it


def corpus_docs(n_docs=120, seed=0) -> List[str]:
    r = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = [" ".join(r.choice(WORDS[i:i + 6]) for i in range(0, 30, 6)) + "." for _ in range(r.randint(2, 5))]
        docs.append(" ".join(sents).capitalize())
    return docs


def tiny_cfg(**kw):
    from electra_fast.models import ElectraConfig
    return ElectraConfig(**{**dict(embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, generator_hidden_size=16, generator_num_hidden_layers=1,
                                   generator_num_attention_heads=1, generator_intermediate_size=32,
                                   max_position_embeddings=64, hidden_dropout_prob=0.1,
                                   attention_probs_dropout_prob=0.0), **kw})


def make_fixture(fx: str) -> None:
    """corpus.txt, tokenizer.json (WordPiece, 120 ids), tiny.json and medium.json (slower checkpoints) in fx."""
    from electra_fast.train.tokenizer import train_wordpiece
    os.makedirs(fx, exist_ok=True)
    docs = corpus_docs()
    with open(os.path.join(fx, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")
    train_wordpiece(docs, vocab_size=120).save(os.path.join(fx, "tokenizer.json"))
    tiny_cfg().to_json_file(os.path.join(fx, "tiny.json"))
    tiny_cfg(embedding_size=128, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
             generator_hidden_size=64, generator_intermediate_size=256).to_json_file(os.path.join(fx, "medium.json"))


def cli_command() -> List[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "electra-fast")
    return [exe] if os.path.isfile(exe) else [sys.executable, "-m", "electra_fast"]


def snapshot(root: str) -> Dict[str, str]:
    """relative path -> 'dir' | 'link:<target>' | sha256 of the bytes, for everything under root (root itself too)."""
    out: Dict[str, str] = {}
    if not os.path.lexists(root):
        return out

    def one(path, rel):
        if os.path.islink(path):
            out[rel] = "link:" + os.readlink(path)
        elif os.path.isdir(path):
            out[rel] = "dir"
        else:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                h.update(f.read())
            out[rel] = h.hexdigest()
    one(root, ".")
    if os.path.isdir(root) and not os.path.islink(root):
        for r, ds, fs in os.walk(root):
            for n in ds + fs:
                p = os.path.join(r, n)
                one(p, os.path.relpath(p, root))
    return out


def snapshot_diff(before: Dict[str, str], after: Dict[str, str]) -> Tuple[List[str], List[str]]:
    """(lost or changed paths, new paths)."""
    lost = [p for p, v in before.items() if after.get(p) != v and not (v == "dir" and after.get(p) == "dir")]
    return sorted(lost), sorted(p for p in after if p not in before)


@dataclasses.dataclass
class CliCase:
    id: str
    expect: str                                   # error | legal | either
    argv: Callable[[str], List[str]]              # case dir -> arguments after `electra-fast`
    setup: Optional[Callable[[str], None]] = None
    protect: Tuple[str, ...] = ()                 # user paths (relative to the case dir) that must not change
    env: Optional[dict] = None
    unprivileged: bool = False                    # drop root's permission overrides (read-only cases)
    post: Optional[Callable[[str], Optional[str]]] = None  # on exit 0: what is wrong, or None
    timeout: float = 75.0
    note: str = ""
    slow: bool = False                            # only with --full (a duplicate mechanism, or minutes long)


def _w(path: str, data, mode="w") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(data)


def _has_checkpoint(step: int, out="out"):
    def post(d):
        from electra_fast.train import checkpoint as ckpt
        p = os.path.join(d, out, "checkpoints", f"step-{step:08d}")
        if not os.path.isdir(p):
            return f"no checkpoint {os.path.relpath(p, d)} after exit 0"
        why = ckpt.verify(p)
        return f"{os.path.relpath(p, d)} does not verify: {why}" if why else None
    return post


def _has_export(out="exp"):
    def post(d):
        for role in ("generator", "discriminator"):
            if not os.path.isfile(os.path.join(d, out, role, "config.json")):
                return f"{out}/{role}/config.json missing after exit 0"
        return None
    return post


def cli_cases(fx: str) -> List[CliCase]:
    C: List[CliCase] = []
    IN = "in"

    def P(d, extra=(), **over):
        """pretrain arguments: the tiny defaults, overridden (value None drops a flag)."""
        opts = {"--data": [os.path.join(d, IN, "corpus.txt")], "--tokenizer": [os.path.join(d, IN, "tokenizer.json")],
                "--model": [os.path.join(d, IN, "tiny.json")], "--seq-len": ["32"], "--batch-size": ["4"],
                "--steps": ["2"], "--threads": ["1"], "--out": [os.path.join(d, "out")]}
        for k, v in over.items():
            flag = "--" + k.replace("_", "-")
            opts[flag] = None if v is None else (v if isinstance(v, list) else [str(v)])
        argv = ["pretrain", "--no-progress"]
        for k, v in opts.items():
            if v is not None:
                argv += [k, *v]
        return argv + list(extra)

    def add(id_, expect, argv, **kw):
        C.append(CliCase(id_, expect, argv, **kw))

    # ------------------------------------------------------------------ pretrain: flag values
    S = True  # slow: run with --full only
    for flag, vals in (("steps", [("0", "error"), ("-1", "error"), ("abc", "error"), ("1.5", "error", S), ("", "error", S)]),
                       ("seq_len", [("2", "error"), ("0", "error", S), ("-5", "error", S), ("100", "error"), ("3", "legal")]),
                       ("batch_size", [("0", "error"), ("-4", "error", S), ("1e9", "error", S)]),
                       ("grad_accum", [("0", "error"), ("-1", "error", S)]),
                       ("lr", [("0", "error"), ("-1", "error", S), ("nan", "error"), ("inf", "error", S), ("abc", "error")]),
                       ("warmup", [("-1", "error"), ("1000000", "legal", S)]),
                       ("weight_decay", [("-1", "error"), ("nan", "error"), ("inf", "error", S)]),
                       ("precision", [("fp8", "error"), ("auto", "legal")]),
                       ("seed", [("-1", "error"), (str(2 ** 70), "either"), ("x", "error", S)]),
                       ("save_every", [("0", "error"), ("-2", "error", S)]),
                       ("keep", [("0", "error"), ("-1", "error", S)]),
                       ("log_every", [("0", "error")]),
                       ("threads", [("0", "error"), ("-1", "error", S)]),
                       ("device", [("tpu", "error"), ("cuda", "error"), ("cuda:7", "error", S), ("meta", "error"),
                                   ("", "either", S), ("cpu:3", "either", S)])):
        for v, e, *slow in vals:
            note = "README: --precision auto is the default" if (flag, v) == ("precision", "auto") else ""
            add(f"pretrain --{flag.replace('_', '-')} {v!r}", e, lambda d, flag=flag, v=v: P(d, **{flag: v}),
                protect=(IN,), post=_has_checkpoint(2) if e == "legal" else None, note=note, slow=bool(slow))
    # ------------------------------------------------------------------ pretrain: --model
    models = [
        ("unknown preset", "electra-huge", None, "error"),
        ("missing .json", "missing.json", None, "error"),
        ("invalid JSON", "bad.json", "{not json", "error"),
        ("JSON list", "list.json", "[]", "error"),
        ("wrong field type", "types.json", json.dumps({"hidden_size": "abc"}), "error"),
        ("unknown field", "unknown.json", json.dumps({"hidden_sizes": 32}), "error"),
        ("heads do not divide hidden", "heads.json", None, "error"),
        ("max_position_embeddings < --seq-len", "short.json", None, "error"),
        ("binary bytes", "binary.json", b"\x00\xff\xfe\x80" * 64, "error"),
        ("dropout probability 2", "drop.json", None, "error", S),
        ("a directory named x.json", "dir.json", "DIR", "error", S),
        ("empty file", "empty.json", "", "error", S),
    ]

    def model_setup(name, content):
        def setup(d):
            p = os.path.join(d, IN, name)
            if content == "DIR":
                os.makedirs(p)
            elif name == "heads.json":
                tiny_cfg().replace().to_json_file(p)
                cfg = json.load(open(p))
                cfg["num_attention_heads"] = 3
                _w(p, json.dumps(cfg))
            elif name == "short.json":
                tiny_cfg(max_position_embeddings=16).to_json_file(p)
            elif name == "drop.json":
                cfg = json.load(open(os.path.join(d, IN, "tiny.json")))
                cfg["hidden_dropout_prob"] = 2
                _w(p, json.dumps(cfg))
            elif content is not None:
                _w(p, content, "wb" if isinstance(content, bytes) else "w")
        return setup
    for label, name, content, e, *slow in models:
        add(f"pretrain --model: {label}", e,
            lambda d, name=name: P(d, model=name if name == "electra-huge" else os.path.join(d, IN, name)),
            setup=model_setup(name, content), protect=(IN,), slow=bool(slow))
    add("pretrain --model '' (empty string)", "either", lambda d: P(d, model=""), protect=(IN,), slow=True)
    # ------------------------------------------------------------------ pretrain: --tokenizer / --vocab-size
    toks = [("missing", "nope.json", None), ("invalid JSON", "bad_tok.json", "{not json"),
            ("binary", "bin_tok.json", b"\x89PNG\x00\xff" * 50),
            ("JSON but not a tokenizer", "obj_tok.json", json.dumps({"a": 1})),
            ("directory without tokenizer files", "tokdir", "DIR")]
    for label, name, content in toks:
        def setup(d, name=name, content=content):
            p = os.path.join(d, IN, name)
            if content == "DIR":
                os.makedirs(p)
                _w(os.path.join(p, "readme.txt"), "nothing here")
            elif content is not None:
                _w(p, content, "wb" if isinstance(content, bytes) else "w")
        add(f"pretrain --tokenizer: {label}", "error", lambda d, name=name: P(d, tokenizer=os.path.join(d, IN, name)),
            setup=setup, protect=(IN,))
    add("pretrain --tokenizer and --vocab-size together", "error", lambda d: P(d, vocab_size="100"), protect=(IN,))
    for v, e, slow in (("0", "error", False), ("-1", "error", True), ("5", "error", False), ("abc", "error", True),
                       ("60", "legal", False)):
        add(f"pretrain --vocab-size {v}", e, lambda d, v=v: P(d, tokenizer=None, vocab_size=v), protect=(IN,),
            post=_has_checkpoint(2) if e == "legal" else None, slow=slow)
    # ------------------------------------------------------------------ pretrain: --data pathologies
    text = open(os.path.join(fx, "corpus.txt"), encoding="utf-8").read()
    datas = [
        ("missing file", "missing.txt", None, "error"),
        ("empty file", "empty.txt", "", "error"),
        ("whitespace only", "ws.txt", "\n\n   \n\t\n", "error"),
        ("binary (random bytes)", "binary.txt", random.Random(1).randbytes(4096), "error"),
        ("NUL bytes only", "nul.txt", b"\x00" * 4096, "error"),
        ("invalid UTF-8 (latin-1)", "latin1.txt", ("caf\xe9 au lait\n" + text).encode("latin-1", "replace"), "error"),
        ("UTF-16 with BOM", "utf16.txt", text.encode("utf-16"), "error"),
        ("UTF-8 with BOM", "bom.txt", b"\xef\xbb\xbf" + text.encode(), "legal"),
        ("CRLF line ends", "crlf.txt", text.replace("\n", "\r\n").encode(), "legal", S),
        ("malformed JSONL", "bad.jsonl", '{"text": "a b c"}\n{"text": \n', "error"),
        ("JSONL without a text field", "notext.jsonl", "\n".join(json.dumps({"body": d}) for d in text.split("\n\n")), "error"),
        ("JSONL text is a number", "num.jsonl", "\n".join(json.dumps({"text": 5}) for _ in range(20)), "error"),
        ("JSONL of empty texts", "emptytext.jsonl", "\n".join(json.dumps({"text": ""}) for _ in range(20)), "error", S),
        ("JSONL of JSON arrays", "arrays.jsonl", "\n".join(json.dumps([d]) for d in text.split("\n\n")), "error", S),
        ("valid JSONL", "good.jsonl", "\n".join(json.dumps({"text": d}) for d in text.split("\n\n")), "legal"),
        ("too little text for one sequence", "short.txt", "hello world.", "error"),
        ("text with a .csv extension", "data.csv", text, "either"),
    ]
    for label, name, content, e, *slow in datas:
        def setup(d, name=name, content=content):
            if content is not None:
                _w(os.path.join(d, IN, name), content, "wb" if isinstance(content, bytes) else "w")
        add(f"pretrain --data: {label}", e, lambda d, name=name: P(d, data=[os.path.join(d, IN, name)]),
            setup=setup, protect=(IN,), post=_has_checkpoint(2) if e == "legal" else None, slow=bool(slow))

    def dir_setup(kind):
        def setup(d):
            p = os.path.join(d, IN, "folder")
            os.makedirs(p)
            if kind == "unusable":
                _w(os.path.join(p, "table.csv"), "a,b\n1,2\n")
                _w(os.path.join(p, "notes.md"), "# notes\n")
            elif kind == "nested":
                _w(os.path.join(p, "a", "b", "part.txt"), text)
            elif kind == "saved dataset":
                _w(os.path.join(p, "dataset_info.json"), "{broken")
        return setup
    for kind, e in (("empty", "error"), ("unusable", "error"), ("nested", "legal"), ("saved dataset", "error")):
        add(f"pretrain --data: directory ({kind})", e, lambda d: P(d, data=[os.path.join(d, IN, "folder")]),
            setup=dir_setup(kind), protect=(IN,), post=_has_checkpoint(2) if e == "legal" else None)
    add("pretrain --data: /dev/null", "error", lambda d: P(d, data=["/dev/null"]), protect=(IN,))
    add("pretrain --data: the same file twice", "legal",
        lambda d: P(d, data=[os.path.join(d, IN, "corpus.txt")] * 2), protect=(IN,), post=_has_checkpoint(2), slow=True)
    add("pretrain --data: all lines bad with --skip-bad-lines", "error",
        lambda d: P(d, data=[os.path.join(d, IN, "bad.txt")], extra=["--skip-bad-lines"]),
        setup=lambda d: _w(os.path.join(d, IN, "bad.txt"), b"\xff\xfe\n\xc3\x28\n" * 20, "wb"), protect=(IN,))
    add("pretrain --data: mixed bad lines with --skip-bad-lines", "legal",
        lambda d: P(d, data=[os.path.join(d, IN, "mixed.txt")], extra=["--skip-bad-lines"]),
        setup=lambda d: _w(os.path.join(d, IN, "mixed.txt"), b"\xff\xfe\n" + text.encode(), "wb"), protect=(IN,),
        post=_has_checkpoint(2))
    # ------------------------------------------------------------------ pretrain: --out situations
    user_files = {"notes.txt": "my notes\n", "data/results.csv": "a,b\n1,2\n"}

    def put_user(sub):
        def setup(d):
            for rel, content in user_files.items():
                _w(os.path.join(d, sub, rel), content)
        return setup

    def seq(*fs):
        def setup(d):
            for f in fs:
                f(d)
        return setup
    add("--out is a file", "error", lambda d: P(d, out=os.path.join(d, "outfile")),
        setup=lambda d: _w(os.path.join(d, "outfile"), "user data\n"), protect=(IN, "outfile"))
    add("--out under a file (file/sub)", "error", lambda d: P(d, out=os.path.join(d, "outfile", "sub")),
        setup=lambda d: _w(os.path.join(d, "outfile"), "user data\n"), protect=(IN, "outfile"))
    add("--out holds user files", "error", lambda d: P(d), setup=put_user("out"), protect=(IN, "out"))
    add("--out holds user files, --allow-nonempty-out", "legal", lambda d: P(d, extra=["--allow-nonempty-out"]),
        setup=put_user("out"), protect=(IN, "out/notes.txt", "out/data"), post=_has_checkpoint(2))
    add("--out holds the user's own run.json, --allow-nonempty-out", "error",
        lambda d: P(d, extra=["--allow-nonempty-out"]),
        setup=seq(put_user("out"), lambda d: _w(os.path.join(d, "out", "run.json"), '{"mine": true}')),
        protect=(IN, "out"))
    add("--out holds the user's cache/ folder, --allow-nonempty-out", "error",
        lambda d: P(d, extra=["--allow-nonempty-out"]),
        setup=seq(put_user("out"), lambda d: _w(os.path.join(d, "out", "cache", "keep.bin"), "x")),
        protect=(IN, "out"))
    # a user's file named like a dead job's temporary would be cleaned away at start-up: refused (rundir.prepare)
    add(f"--out holds a user file named run.json.tmp-{DEAD_PID}, --allow-nonempty-out", "error",
        lambda d: P(d, extra=["--allow-nonempty-out"]),
        setup=seq(put_user("out"), lambda d: _w(os.path.join(d, "out", f"run.json.tmp-{DEAD_PID}"), "user bytes")),
        protect=(IN, "out"))
    add(f"--out holds a user file named metrics.jsonl.tmp-{DEAD_PID}, --allow-nonempty-out", "error",
        lambda d: P(d, extra=["--allow-nonempty-out"]),
        setup=seq(put_user("out"), lambda d: _w(os.path.join(d, "out", f"metrics.jsonl.tmp-{DEAD_PID}"), "x")),
        protect=(IN, "out"), slow=True)

    def copy_run(sub="run"):
        return lambda d: shutil.copytree(os.path.join(fx, "run_done"), os.path.join(d, sub), symlinks=True)
    add("--out is another finished run, no --resume", "error", lambda d: P(d, out=os.path.join(d, "run")),
        setup=copy_run(), protect=(IN, "run"))
    add("--out is a finished run, --resume --steps 4", "legal",
        lambda d: P(d, out=os.path.join(d, "run"), steps=4, extra=["--resume"]),
        setup=seq(copy_run(), lambda d: _w(os.path.join(d, "run", "notes.txt"), "mine")),
        protect=(IN, "run/notes.txt", "run/checkpoints/step-00000002"), post=_has_checkpoint(4, "run"))
    add("--out is a finished run, --resume --steps 1 (already past it)", "error",
        lambda d: P(d, out=os.path.join(d, "run"), steps=1, extra=["--resume"]), setup=copy_run(),
        protect=(IN, "run"))
    add("--out is a finished run, --resume with another tokenizer", "error",
        lambda d: P(d, out=os.path.join(d, "run"), steps=4, tokenizer=os.path.join(d, IN, "other.json"),
                    extra=["--resume"]),
        setup=seq(copy_run(), lambda d: _other_tokenizer(os.path.join(d, IN, "other.json"))), protect=(IN, "run"))

    def corrupt_run(d):
        copy_run()(d)
        p = os.path.join(d, "run", "checkpoints", "step-00000002", "model.safetensors")
        with open(p, "r+b") as f:
            f.truncate(100)
    add("--out run whose only checkpoint is corrupt, --resume --steps 3", "legal",
        lambda d: P(d, out=os.path.join(d, "run"), steps=3, extra=["--resume"]), setup=corrupt_run,
        protect=(IN,), post=_has_checkpoint(3, "run"),
        note="the corrupt checkpoint must be set aside (renamed step-N.corrupt), never deleted")
    add("--out run, --resume, metrics.jsonl replaced by a user's directory", "either",
        lambda d: P(d, out=os.path.join(d, "run"), steps=4, extra=["--resume"]),
        setup=seq(copy_run(), lambda d: os.unlink(os.path.join(d, "run", "metrics.jsonl")),
                  lambda d: _w(os.path.join(d, "run", "metrics.jsonl", "mine.txt"), "user")),
        protect=(IN, "run/metrics.jsonl/mine.txt"))
    if _unprivileged_prefix() is not None:
        add("--out is a read-only empty folder", "error", lambda d: P(d), unprivileged=True,
            setup=lambda d: (os.makedirs(os.path.join(d, "out")), os.chmod(os.path.join(d, "out"), 0o555)),
            protect=(IN, "out"))
        add("--out is a read-only finished run, --resume", "error",
            lambda d: P(d, out=os.path.join(d, "run"), steps=4, extra=["--resume"]), unprivileged=True,
            setup=lambda d: (copy_run()(d), _chmod_tree(os.path.join(d, "run"), 0o555, 0o444)), protect=(IN, "run"))
        add("--data is unreadable", "error", lambda d: P(d), unprivileged=True,
            setup=lambda d: os.chmod(os.path.join(d, IN, "corpus.txt"), 0o000), protect=(IN,))
    add("--out is '' (empty string)", "either", lambda d: P(d, out=""), protect=(IN,))
    add("--out is a dangling symlink", "error", lambda d: P(d),
        setup=lambda d: os.symlink(os.path.join(d, "nowhere"), os.path.join(d, "out")), protect=(IN, "out"))
    add("--out is a symlink to an empty folder", "legal", lambda d: P(d),
        setup=lambda d: (os.makedirs(os.path.join(d, "real")), os.symlink(os.path.join(d, "real"), os.path.join(d, "out"))),
        protect=(IN,), post=_has_checkpoint(2))
    add("--out inside the --data folder, then --resume", "legal",
        lambda d: P(d, data=[os.path.join(d, IN)], out=os.path.join(d, IN, "run"), steps=3, extra=["--resume"]),
        setup=lambda d: shutil.copytree(os.path.join(fx, "run_done"), os.path.join(d, IN, "run")),
        protect=("in/corpus.txt",), post=_has_checkpoint(3, "in/run"),
        note="the run's own metrics.jsonl lies inside --data: it must not be read as training data")
    # ------------------------------------------------------------------ export
    add("export: missing checkpoint path", "error", lambda d: ["export", os.path.join(d, "nope"), os.path.join(d, "exp")])
    add("export: folder without checkpoints", "error", lambda d: ["export", os.path.join(d, "empty"), os.path.join(d, "exp")],
        setup=put_user("empty"), protect=("empty",))
    add("export: a file as the checkpoint", "error", lambda d: ["export", os.path.join(d, "f.txt"), os.path.join(d, "exp")],
        setup=lambda d: _w(os.path.join(d, "f.txt"), "x"), protect=("f.txt",))
    add("export: a finished run", "legal", lambda d: ["export", os.path.join(d, "run"), os.path.join(d, "exp")],
        setup=copy_run(), protect=("run",), post=_has_export())
    add("export: a checkpoint folder", "legal",
        lambda d: ["export", os.path.join(d, "run", "checkpoints", "step-00000002"), os.path.join(d, "exp")],
        setup=copy_run(), protect=("run",), post=_has_export())
    add("export: into an existing empty folder", "legal", lambda d: ["export", os.path.join(d, "run"), os.path.join(d, "exp")],
        setup=lambda d: (copy_run()(d), os.makedirs(os.path.join(d, "exp"))), protect=("run",), post=_has_export())
    add("export: into a folder holding user files", "error",
        lambda d: ["export", os.path.join(d, "run"), os.path.join(d, "exp")],
        setup=seq(copy_run(), put_user("exp")), protect=("run", "exp"))
    add("export: onto an existing file", "error", lambda d: ["export", os.path.join(d, "run"), os.path.join(d, "exp")],
        setup=lambda d: (copy_run()(d), _w(os.path.join(d, "exp"), "user file")), protect=("run", "exp"))
    add("export: under a file (file/sub)", "error",
        lambda d: ["export", os.path.join(d, "run"), os.path.join(d, "f.txt", "sub")],
        setup=lambda d: (copy_run()(d), _w(os.path.join(d, "f.txt"), "user file")), protect=("run", "f.txt"))
    add("export: into the run folder itself", "error", lambda d: ["export", os.path.join(d, "run"), os.path.join(d, "run")],
        setup=copy_run(), protect=("run",))
    add("export: a corrupt checkpoint folder", "error",
        lambda d: ["export", os.path.join(d, "run", "checkpoints", "step-00000002"), os.path.join(d, "exp")],
        setup=corrupt_run)
    add("export: a run whose only checkpoint is corrupt", "error",
        lambda d: ["export", os.path.join(d, "run"), os.path.join(d, "exp")], setup=corrupt_run)
    add("export: a checkpoint with a garbage config.json (checksums updated)", "error",
        lambda d: ["export", os.path.join(d, "run"), os.path.join(d, "exp")], setup=lambda d: _tamper_config(d, copy_run()))
    add("export: missing OUT_DIR argument", "error", lambda d: ["export", os.path.join(d, "run")], setup=copy_run())
    add("export: --bogus flag", "error", lambda d: ["export", "--bogus", os.path.join(d, "run"), os.path.join(d, "exp")],
        setup=copy_run(), slow=True)
    # ------------------------------------------------------------------ info / bench / top level
    add("info", "legal", lambda d: ["info"])
    add("info --bogus", "error", lambda d: ["info", "--bogus"])
    add("info extra-argument", "error", lambda d: ["info", "extra"])
    add("info with ELECTRA_FAST_BACKEND=bogus", "either", lambda d: ["info"], env={"ELECTRA_FAST_BACKEND": "bogus"})
    add("pretrain with ELECTRA_FAST_BACKEND=bogus", "error", lambda d: P(d), env={"ELECTRA_FAST_BACKEND": "bogus"},
        protect=(IN,))
    add("pretrain with ELECTRA_FAST_BACKEND=triton (no GPU, no interpreter)", "either", lambda d: P(d),
        env={"ELECTRA_FAST_BACKEND": "triton"}, protect=(IN,))
    add("no sub-command", "error", lambda d: [])
    add("unknown sub-command", "error", lambda d: ["train"])
    add("--help", "legal", lambda d: ["--help"])
    add("bench --device tpu", "error", lambda d: ["bench", "--device", "tpu"])
    add("bench --out onto a file", "error", lambda d: ["bench", "--out", os.path.join(d, "f.txt"), "-k", "zzz_none"],
        setup=lambda d: _w(os.path.join(d, "f.txt"), "user file"), protect=("f.txt",))
    add("bench --compare a missing file", "error",
        lambda d: ["bench", "--out", os.path.join(d, "res"), "--compare", os.path.join(d, "missing.json"), "-k", "zzz_none"],
        timeout=300, note="should be refused before any benchmark runs", slow=True)
    # ------------------------------------------------------------------ pretrain --init-from
    def hf_dir(config, weights=b""):
        """a transformers-style folder: config.json, the fixture's tokenizer and a model.safetensors of these bytes
        (b"": truncated)."""
        def setup(d):
            _w(os.path.join(d, "hf", "config.json"), config)
            shutil.copy(os.path.join(d, IN, "tokenizer.json"), os.path.join(d, "hf", "tokenizer.json"))
            _w(os.path.join(d, "hf", "model.safetensors"), weights, "wb")
        return setup
    deberta = json.dumps({"model_type": "deberta-v2", "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 120,
                          "relative_attention": True, "position_buckets": 16, "pos_att_type": ["p2c", "c2p"],
                          "position_biased_input": False, "max_position_embeddings": 64})
    for label, setup, target in (
            ("missing path", None, "nowhere"), ("a file", None, os.path.join(IN, "corpus.txt")),
            ("an empty folder", lambda d: os.makedirs(os.path.join(d, "empty")), "empty"),
            ("a run whose only checkpoint is corrupt", corrupt_run, "run"),
            ("a DeBERTa folder with a truncated model.safetensors", hf_dir(deberta), "hf"),
            ("a DeBERTa folder with a garbage config.json", hf_dir("{garbage"), "hf")):
        add(f"pretrain --init-from: {label}", "error",
            lambda d, t=target: P(d, init_from=os.path.join(d, t), model=None, tokenizer=None),
            setup=setup, protect=(IN, "run", "hf"))
    _finetune_cases(add, copy_run, put_user, seq, corrupt_run)
    for c in C:  # the same mechanism as a default case, or an expensive one: with --full only
        if c.id in SLOW_CLI:
            c.slow = True
    return C



def _ft_rows(n: int = 16, seed: int = 5) -> List[Tuple[str, str]]:
    """(sentence, label) rows of the corpus' words; 'pos' when the sentence holds 'cat'."""
    r = random.Random(seed)
    rows = [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 8))) for _ in range(n)]
    return [(t, "pos" if "cat" in t.split() else "neg") for t in rows[:-2]] + [("a cat sat", "pos"), ("a dog", "neg")]


def _ft_tsv(rows, header=("sentence", "label"), end="\n", sep="\t", bom=False) -> str:
    body = end.join(sep.join(r) for r in [header] + list(rows)) + end
    return ("\ufeff" if bom else "") + body


def _ft_has_summary(out="ft", test=False):
    def post(d):
        p = os.path.join(d, out, "summary.json")
        if not os.path.isfile(p):
            return f"{out}/summary.json missing after exit 0"
        if test and not os.path.isfile(os.path.join(d, out, "seed-1", "predictions-test.tsv")):
            return f"{out}/seed-1/predictions-test.tsv missing after exit 0 with --test"
        return None
    return post


def _finetune_cases(add, copy_run, put_user, seq, corrupt_run) -> None:
    """electra-fast finetune: bad and odd input files, --out situations, --model paths, option values."""
    def F(d, extra=(), **over):
        """finetune arguments: the fixture run, in/train.tsv, in/dev.tsv, one short epoch (value None drops a flag)."""
        opts = {"--model": [os.path.join(d, "run")], "--train": [os.path.join(d, "in", "train.tsv")],
                "--validation": [os.path.join(d, "in", "dev.tsv")], "--epochs": ["1"], "--batch-size": ["4"],
                "--threads": ["1"], "--out": [os.path.join(d, "ft")]}
        for k, v in over.items():
            opts["--" + k.replace("_", "-")] = None if v is None else (v if isinstance(v, list) else [str(v)])
        return ["finetune", "--no-progress"] + [x for k, v in opts.items() if v is not None for x in (k, *v)] + \
            list(extra)

    def files(train=None, dev=None, **more):
        """the run, a good train.tsv / dev.tsv pair, and any file given (str -> text, bytes -> bytes, 'DIR')."""
        def setup(d):
            copy_run()(d)
            named = {"train.tsv": _ft_tsv(_ft_rows(16, 5)), "dev.tsv": _ft_tsv(_ft_rows(8, 6)), **more}
            if train is not None:
                named["train.tsv"] = train
            if dev is not None:
                named["dev.tsv"] = dev
            for name, content in named.items():
                p = os.path.join(d, "in", name)
                if content == "DIR":
                    os.makedirs(p)
                else:
                    _w(p, content, "wb" if isinstance(content, bytes) else "w")
        return setup

    def case(id_, expect, argv, setup=None, **kw):
        kw.setdefault("protect", ("in", "run"))
        if expect == "legal":
            kw.setdefault("post", _ft_has_summary())
        add("finetune " + id_, expect, argv, setup=setup or files(), timeout=kw.pop("timeout", 120), **kw)

    J = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    good = _ft_rows(16, 5)
    # ---- legal files the readers must keep whole
    case("a plain TSV", "legal", F)
    case("CRLF line ends and a UTF-8 BOM", "legal", F, files(train=_ft_tsv(good, end="\r\n", bom=True)))
    case("text holding U+2028, NEL and a form feed", "legal", F,
         files(train=_ft_tsv([(t.replace(" ", c, 1), lab) for (t, lab), c in zip(good, "\u2028\x85\x0c" * 8)])),
         note="str.splitlines() breaks a row at these; csv and JSONL rows end at \\n / \\r only")
    case("a 300 k-character review", "legal", F, files(train=_ft_tsv(good + [("cat " * 75000, "pos")])),
         note="over the csv module's default 128 KiB field limit; truncated to --max-len like any row")
    case("CSV with a quoted field spanning two lines", "legal",
         lambda d: F(d, train=os.path.join(d, "in", "train.csv")),
         files(**{"train.csv": "sentence,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in good[:-1])
                  + f'"{good[-1][0]},\nsecond line",{good[-1][1]}\n'}))
    case("JSONL with a raw U+2028 inside a string", "legal",
         lambda d: F(d, train=os.path.join(d, "in", "train.jsonl")),
         files(**{"train.jsonl": J({"sentence": t + "\u2028end", "label": lab} for t, lab in good)}))
    case("--validation is the training file", "legal", lambda d: F(d, validation=os.path.join(d, "in", "train.tsv")))
    case("--test without labels", "legal", lambda d: F(d, test=os.path.join(d, "in", "test.tsv")),
         files(**{"test.tsv": _ft_tsv([(t,) for t, _ in good[:5]], header=("sentence",))}),
         post=_ft_has_summary(test=True))
    case("integer labels -1 / 1", "legal", F,
         files(train=_ft_tsv([(t, "1" if lab == "pos" else "-1") for t, lab in good]),
               dev=_ft_tsv([(t, "1" if lab == "pos" else "-1") for t, lab in _ft_rows(8, 6)])))
    # ---- bad files
    for label, content in (("NUL and invalid UTF-8 bytes", b"\x00\xff\xfe\x80" * 64),
                           ("UTF-16 with BOM", _ft_tsv(good).encode("utf-16")),
                           ("empty", ""), ("header only", "sentence\tlabel\n"), ("a directory", "DIR"),
                           ("a row with too many fields", _ft_tsv(good) + "a cat\tpos\textra\n"),
                           ("an empty text field", _ft_tsv(good) + "\tpos\n"),
                           ("no label column", _ft_tsv(good, header=("sentence", "score"))),
                           ("a single label", _ft_tsv([(t, "pos") for t, _ in good]))):
        case(f"--train: {label}", "error", F, files(train=content))
    case("--train: /dev/null", "error", lambda d: F(d, train="/dev/null"))
    case("--train: missing file", "error", lambda d: F(d, train=os.path.join(d, "in", "missing.tsv")))
    case("--train: a .parquet file", "error", lambda d: F(d, train=os.path.join(d, "in", "t.parquet")),
         files(**{"t.parquet": b"PAR1\x00\x00PAR1"}))
    case("--train: a symlink loop", "error", F,
         seq(files(), lambda d: (os.unlink(os.path.join(d, "in", "train.tsv")),
                                 os.symlink("train.tsv", os.path.join(d, "in", "train.tsv")))))
    case("--validation: a label training never saw", "error", F, files(dev=_ft_tsv(good) + "a dog\tmaybe\n"))
    case("--test: a label training never saw", "error", lambda d: F(d, test=os.path.join(d, "in", "test.tsv")),
         files(**{"test.tsv": _ft_tsv(good[:3] + [("a dog", "maybe")])}))
    for label, rows in (("a row that is a list", [["a cat", "pos"]]), ("label null", [{"sentence": "a", "label": None}]),
                        ("label 1.5", [{"sentence": "a", "label": 1.5}]), ("label true", [{"sentence": "a", "label": True}]),
                        ("text a number", [{"sentence": 7, "label": "pos"}])):
        case(f"--train JSONL: {label}", "error", lambda d: F(d, train=os.path.join(d, "in", "train.jsonl")),
             files(**{"train.jsonl": J([{"sentence": t, "label": lab} for t, lab in good] + rows)}))
    for label, value in (("nan", "nan"), ("inf", "inf"), ("a word", "high")):
        rows = [{"sentence": t, "label": i / 4} for i, (t, _) in enumerate(good)]
        case(f"--task regression: label {label}", "error",
             lambda d: F(d, task="regression", train=os.path.join(d, "in", "r.jsonl"),
                         validation=os.path.join(d, "in", "r.jsonl")),
             files(**{"r.jsonl": J(rows + [{"sentence": "a cat", "label": value}])}))
    ner = [{"tokens": t.split(), "tags": ["B-ANI" if w == "cat" else "O" for w in t.split()]} for t, _ in good]
    for label, row in (("more tags than tokens", {"tokens": ["a", "cat"], "tags": ["O", "B-ANI", "O"]}),
                       ("no tokens", {"tokens": [], "tags": []}), ("tags not a list", {"tokens": ["a"], "tags": 3})):
        case(f"--task token-classification: {label}", "error",
             lambda d: F(d, task="token-classification", train=os.path.join(d, "in", "n.jsonl"),
                         validation=os.path.join(d, "in", "n.jsonl")),
             files(**{"n.jsonl": J(ner + [row])}))
    case("--skip-bad-lines: every row bad", "error", lambda d: F(d, extra=["--skip-bad-lines"]),
         files(train="sentence\tlabel\n\tpos\n\tneg\n"))
    case("--skip-bad-lines: two bad rows", "legal", lambda d: F(d, extra=["--skip-bad-lines"]),
         files(train=_ft_tsv(good) + "\tpos\na\tb\tc\n"))
    # ---- --out
    case("--out is a file", "error", lambda d: F(d, out=os.path.join(d, "outfile")),
         seq(files(), lambda d: _w(os.path.join(d, "outfile"), "user data\n")), protect=("in", "run", "outfile"))
    case("--out under a file", "error", lambda d: F(d, out=os.path.join(d, "outfile", "sub")),
         seq(files(), lambda d: _w(os.path.join(d, "outfile"), "user data\n")), protect=("in", "run", "outfile"))
    case("--out holds user files", "error", F, seq(files(), put_user("ft")), protect=("in", "run", "ft"))
    case("--out is the --model run", "error", lambda d: F(d, out=os.path.join(d, "run")))
    case("--out holds user files, --resume", "error", lambda d: F(d, extra=["--resume"]),
         seq(files(), put_user("ft")), protect=("in", "run", "ft"))
    # ---- --model
    case("--model: missing", "error", lambda d: F(d, model=os.path.join(d, "nowhere")))
    case("--model: a file", "error", lambda d: F(d, model=os.path.join(d, "in", "train.tsv")))
    case("--model: an empty folder", "error", lambda d: F(d, model=os.path.join(d, "empty")),
         seq(files(), lambda d: os.makedirs(os.path.join(d, "empty"))))
    case("--model: a run whose only checkpoint is corrupt", "error", F, seq(files(), lambda d: shutil.rmtree(
        os.path.join(d, "run")), corrupt_run))
    for label, config, weights in (("a garbage config.json", "{garbage", b"x"),
                                   ("another model type", json.dumps({"model_type": "gpt2"}), b"x"),
                                   ("a truncated model.safetensors", json.dumps({"model_type": "electra"}), b""),
                                   ("a pytorch_model.bin of other bytes", json.dumps({"model_type": "electra"}),
                                    None)):
        def hf(d, config=config, weights=weights):
            _w(os.path.join(d, "hf", "config.json"), config)
            name = "model.safetensors" if weights is not None else "pytorch_model.bin"
            _w(os.path.join(d, "hf", name), weights if weights is not None else b"not a pickle" * 8, "wb")
        case(f"--model: a transformers folder with {label}", "error", lambda d: F(d, model=os.path.join(d, "hf")),
             seq(files(), hf), protect=("in", "run", "hf"))
    # ---- option values
    for flag, v in (("epochs", "0"), ("batch-size", "0"), ("eval-batch-size", "-1"), ("max-len", "2"),
                    ("max-len", "100000"), ("lr", "nan"), ("lr", "0"), ("weight-decay", "inf"),
                    ("layer-decay", "0"), ("warmup", "1"), ("sift", "nan"), ("seeds", "-1"), ("threads", "0"),
                    ("precision", "fp16"), ("device", "cuda:9"), ("task", "ranking"),
                    ("text-column", "body"), ("pair-column", "sentence2")):
        case(f"--{flag} {v!r}", "error", lambda d, flag=flag, v=v: F(d, **{flag.replace("-", "_"): v}))

SLOW_CLI = {
    "pretrain --seq-len '3'", "pretrain --log-every '0'", "pretrain --model: JSON list",
    "pretrain --model: unknown field", "pretrain --tokenizer: binary", "pretrain --data: whitespace only",
    "pretrain --data: NUL bytes only", "pretrain --data: UTF-16 with BOM", "pretrain --data: JSONL text is a number",
    "pretrain --data: valid JSONL", "pretrain --data: text with a .csv extension", "pretrain --data: directory (empty)",
    "pretrain --data: mixed bad lines with --skip-bad-lines", "--out under a file (file/sub)",
    "--out holds the user's cache/ folder, --allow-nonempty-out", "--out is a symlink to an empty folder",
    "export: a file as the checkpoint", "export: a checkpoint folder", "export: into an existing empty folder",
    "export: under a file (file/sub)", "info extra-argument", "unknown sub-command", "--help",
    "pretrain --steps '-1'", "pretrain --grad-accum '0'", "pretrain --save-every '0'", "pretrain --keep '0'",
    "pretrain --model: binary bytes", "pretrain --data: invalid UTF-8 (latin-1)", "pretrain --lr 'nan'",
    "pretrain --seed '-1'", "pretrain --threads '0'", "pretrain --model: heads do not divide hidden",
    "pretrain --tokenizer: invalid JSON", "pretrain --data: empty file", "export: missing checkpoint path",
    "pretrain --device 'meta'",
}


def _other_tokenizer(path: str) -> None:
    from electra_fast.train.tokenizer import train_wordpiece
    train_wordpiece(["zebra quokka platypus"] * 20 + corpus_docs(20, seed=3), vocab_size=90).save(path)


def _tamper_config(d: str, copy) -> None:
    copy(d)
    ck = os.path.join(d, "run", "checkpoints", "step-00000002")
    _w(os.path.join(ck, "config.json"), "{garbage")
    meta = json.load(open(os.path.join(ck, "meta.json")))
    meta["sha256"]["config.json"] = hashlib.sha256(b"{garbage").hexdigest()
    _w(os.path.join(ck, "meta.json"), json.dumps(meta))


def _chmod_tree(root: str, dmode: int, fmode: int) -> None:
    for r, ds, fs in os.walk(root, topdown=False):
        for f in fs:
            os.chmod(os.path.join(r, f), fmode)
        os.chmod(r, dmode)


def _unprivileged_prefix() -> Optional[List[str]]:
    """As root, file permissions do not bind; setpriv drops the capabilities that override them (root then obeys
    the owner bits like any user). None where that is impossible (the cases are then skipped)."""
    if os.geteuid() != 0:
        return []
    exe = shutil.which("setpriv")
    if exe is None:
        return None
    return [exe, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def run_cli_case(case: CliCase, d: str, fx: str) -> dict:
    os.makedirs(os.path.join(d, "in"))
    for n in ("corpus.txt", "tokenizer.json", "tiny.json"):
        shutil.copy(os.path.join(fx, n), os.path.join(d, "in", n))
    if case.setup:
        case.setup(d)
    before = {p: snapshot(os.path.join(d, p)) for p in case.protect}
    env = _child_env()
    env.update(case.env or {})
    argv = case.argv(d)
    prefix = _unprivileged_prefix() if case.unprivileged else []
    t0 = time.time()
    try:
        proc = subprocess.run(prefix + cli_command() + argv, capture_output=True, cwd=d, env=env,
                              timeout=case.timeout, stdin=subprocess.DEVNULL, start_new_session=True)
        rc, out, err = proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, (e.stdout or b"").decode("utf-8", "replace"), (e.stderr or b"").decode("utf-8", "replace")
    secs = round(time.time() - t0, 1)
    lost = []
    for p, snap in before.items():
        l_, _new = snapshot_diff(snap, snapshot(os.path.join(d, p)))
        lost += [os.path.normpath(os.path.join(p, x)) for x in l_]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    tb = "Traceback (most recent call last)" in err
    last = lines[-1][:300] if lines else ""
    detail = f"exit {rc}, {len(lines)} stderr line(s){' with a traceback' if tb else ''}: {last}"
    if rc is None:
        cls = "hang"
        detail = f"no exit within {case.timeout:.0f} s; last stderr: {last}"
    elif rc < 0:
        cls = "crash"
        detail = f"killed by {signal.Signals(-rc).name}; stderr: {last}"
    elif lost:
        cls = "data_lost"
        detail = f"user files changed or removed: {lost[:6]}; " + detail
    else:
        one_line = rc == 2 and len(lines) == 1 and not tb
        if rc == 0:
            problem = case.post(d) if case.post else None
            if case.expect == "error":
                cls, detail = "silent_wrong", "exit 0 where an error was due; stdout: " + (out.strip().splitlines() or [""])[-1][:200]
            elif problem:
                cls, detail = "silent_wrong", problem
            else:
                cls = "ok"
        elif case.expect == "legal":
            cls, detail = "unclear", "error on a legal input: " + detail
        else:
            cls = "clear" if one_line else "unclear"
            if not one_line and rc == 2 and not tb and len(lines) > 1 and "error:" in last:
                kind = "argparse usage" if any(ln.startswith("usage:") for ln in lines) else "progress / warning"
                detail = f"one error line after {len(lines) - 1} {kind} line(s): " + detail
    return {"category": "cli", "group": "cli", "backend": "-", "id": case.id, "expect": case.expect, "arg": None,
            "note": case.note, "cls": cls, "detail": detail[:700], "s": secs,
            "argv": " ".join(a.replace(d, "$CASE") for a in argv)}


def cli_selection(fx: str, only_ids=None, full: bool = False) -> List[CliCase]:
    """The CLI cases to run (those whose id contains one of ``only_ids``); makes the fixture files they read."""
    make_fixture(fx)
    cases = [c for c in cli_cases(fx) if full or not c.slow]
    return [c for c in cases if any(s in c.id for s in only_ids)] if only_ids else cases


def sweep_cli(scratch: str, jobs: int, cases: List[CliCase]) -> List[dict]:
    """``cases``: :func:`cli_selection` of ``scratch``/cli-fixture."""
    fx = os.path.join(scratch, "cli-fixture")
    r = subprocess.run(cli_command() + ["pretrain", "--no-progress", "--data", os.path.join(fx, "corpus.txt"),
                                        "--tokenizer", os.path.join(fx, "tokenizer.json"), "--model",
                                        os.path.join(fx, "tiny.json"), "--seq-len", "32", "--batch-size", "4",
                                        "--steps", "2", "--threads", "1", "--out", os.path.join(fx, "run_done")],
                       capture_output=True, cwd=fx, env=_child_env(), timeout=300)
    if r.returncode != 0:
        raise SystemExit("sweep: the fixture run failed:\n" + r.stderr.decode()[-2000:])

    def one(item):
        i, case = item
        try:
            return run_cli_case(case, os.path.join(scratch, f"cli-{i:03d}"), fx)
        except Exception as exc:  # the sweep's own failure: reported, not counted against the CLI
            return {"category": "cli", "group": "cli", "backend": "-", "id": case.id, "expect": case.expect,
                    "arg": None, "note": case.note, "cls": "sweep_error", "detail": traceback.format_exc()[-500:]}

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        rows = list(ex.map(one, enumerate(cases)))
    print(f"  cli: {len(cases)} cases in {time.time() - t0:.0f} s", flush=True)
    return rows


# ================================================================================================ kill -9
@dataclasses.dataclass
class KillCase:
    id: str
    trigger: Callable[[dict], bool]   # state -> True when the process is to be killed (polled every few ms)
    over: dict                         # pretrain flags for the killed run
    data: str = "corpus.txt"
    pre: Optional[str] = None          # first train to 2 complete checkpoints and kill, then kill the resume when:
    #                                    "ckpt" it writes a new checkpoint, "log" it logs a step past the checkpoint
    export_kill: bool = False          # kill an `electra-fast export` instead of the training


def _ckpt_names(out: str) -> List[str]:
    root = os.path.join(out, "checkpoints")
    try:
        return sorted(os.listdir(root))
    except OSError:
        return []


def _complete(out: str) -> Dict[int, str]:
    """step -> sha256 of meta.json, for every step-* checkpoint that verifies."""
    from electra_fast.train import checkpoint as ckpt
    found = {}
    for step, path in ckpt.checkpoint_dirs(os.path.join(out, "checkpoints")):
        try:
            if ckpt.verify(path) is None:
                with open(os.path.join(path, "meta.json"), "rb") as f:
                    found[step] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            continue
    return found


def _inflight(out: str) -> List[str]:
    names = []
    for sub in ("", "cache", "checkpoints"):
        try:
            ls = os.listdir(os.path.join(out, sub))
        except OSError:
            continue
        for n in ls:
            if ".tmp-" in n or n.startswith((".tmp-", ".del-")):
                p = os.path.join(out, sub, n)
                inner = sorted(os.listdir(p)) if os.path.isdir(p) else []
                names.append(os.path.join(sub, n) + (f" {inner}" if inner else ""))
    return names


def kill_cases() -> List[KillCase]:
    def has_tmp(part=None, need_complete=0):
        def t(st):
            if len(st["complete"]) < need_complete:
                return False
            root = os.path.join(st["out"], "checkpoints")
            for n in _ckpt_names(st["out"]):
                if n.startswith(".tmp-step-") and (part is None or os.path.exists(os.path.join(root, n, part))):
                    return True
            return False
        return t

    def lines(n):
        def t(st):
            try:
                with open(os.path.join(st["out"], "metrics.jsonl")) as f:
                    return sum(1 for _ in f) >= n
            except OSError:
                return False
        return t

    def cache_tmp(st):
        try:
            return any(".tmp-" in n for n in os.listdir(os.path.join(st["out"], "cache")))
        except OSError:
            return False

    long = dict(steps=100000)
    return [
        KillCase("during startup (0.3 s after exec)", lambda st: st["t"] > 0.3, dict(long, save_every=5)),
        KillCase("just after --out is claimed (marker written)",
                 lambda st: os.path.exists(os.path.join(st["out"], ".electra-fast-run")), dict(long, save_every=5)),
        KillCase("during tokenisation (cache temporary present)", cache_tmp, dict(long, save_every=5), data="big.txt"),
        KillCase("during training, before any checkpoint", lines(3), dict(long, save_every=100000)),
        KillCase("inside the first checkpoint write (.tmp-step appears)", has_tmp(), dict(long, save_every=3)),
        KillCase("inside a checkpoint write, meta.json written (before the rename)", has_tmp("meta.json", 1),
                 dict(long, save_every=1)),
        KillCase("during retention (.del-step present, --keep 1)",
                 lambda st: any(n.startswith(".del-step-") for n in _ckpt_names(st["out"])),
                 dict(long, save_every=1, keep=1)),
        KillCase("during the end-of-run save", has_tmp(), dict(steps=8, save_every=100000)),
        KillCase("inside a checkpoint write of a resumed run", has_tmp(), dict(long, save_every=2), pre="ckpt"),
        KillCase("a resumed run, right after it re-logs its first step (metrics.jsonl rewritten)", has_tmp(),
                 dict(long, save_every=2), pre="log"),
        KillCase("during export (temporary export folder present)", lambda st: False, dict(steps=3), export_kill=True),
    ]


def _logged_steps(out: str) -> List[int]:
    steps = []
    try:
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):
                    steps.append(-1)
    except OSError:
        pass
    return sorted(steps)


def _ranges(xs: List[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def _logged_past(out: str, step: int) -> bool:
    try:
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            return any(json.loads(line).get("step", 0) > step for line in f if line.strip())
    except (OSError, ValueError):
        return False


def _pretrain_argv(fx: str, out: str, data: str, **over) -> List[str]:
    opts = {"data": os.path.join(fx, data), "tokenizer": os.path.join(fx, "tokenizer.json"),
            "model": os.path.join(fx, "medium.json"), "seq_len": 32, "batch_size": 4, "threads": 1, "out": out,
            "log_every": 1}
    opts.update(over)
    argv = ["pretrain", "--no-progress"]
    for k, v in opts.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return argv


def _kill_when(argv: List[str], out: str, trigger, cwd: str, deadline_s: float = 240.0,
               watch_export: Optional[str] = None) -> dict:
    """Start ``electra-fast argv``; when trigger(state) holds, SIGSTOP it, record the complete checkpoints, SIGKILL.
    Tracks every checkpoint ever seen complete."""
    proc = subprocess.Popen(cli_command() + argv, cwd=cwd, env=_child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    t0, ever, seen = time.time(), {}, set()
    st = {"out": out, "complete": ever, "t": 0.0}
    fired = False
    while proc.poll() is None and time.time() - t0 < deadline_s:
        st["t"] = time.time() - t0
        names = set(n for n in _ckpt_names(out) if n.startswith("step-"))
        if names - seen:
            seen |= names
            for s_, h in _complete(out).items():
                ever.setdefault(s_, h)
        if watch_export is not None:
            parent = os.path.dirname(watch_export)
            fire = any(n.startswith(f".{os.path.basename(watch_export)}.tmp-") for n in os.listdir(parent))
        else:
            fire = trigger(st)
        if fire:
            fired = True
            break
        time.sleep(0.003)
    info = {"fired": fired, "t": round(time.time() - t0, 2), "rc": proc.poll()}
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.05)
        info["complete_at_kill"] = _complete(out)
        info["inflight"] = _inflight(out) if watch_export is None else sorted(
            n for n in os.listdir(os.path.dirname(watch_export)) if ".tmp-" in n)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        info["complete_at_kill"] = _complete(out)
        info["inflight"] = []
    info["stderr"] = proc.stderr.read().decode("utf-8", "replace")[-400:]
    proc.stderr.close()
    for s_, h in info["complete_at_kill"].items():
        ever.setdefault(s_, h)
    info["ever"] = ever
    info["pid"] = proc.pid
    return info


def _run_cli(argv, cwd, timeout=240.0) -> Tuple[Optional[int], str]:
    try:
        p = subprocess.run(cli_command() + argv, cwd=cwd, env=_child_env(), capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, start_new_session=True)
        return p.returncode, p.stderr.decode("utf-8", "replace") + p.stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        return None, "timeout"


def run_kill_case(case: KillCase, d: str, fx: str) -> dict:
    os.makedirs(d)
    out = os.path.join(d, "run")
    keep = int(case.over.get("keep", 3))
    row = {"category": "kill", "group": "kill", "backend": "-", "id": case.id, "expect": "legal", "arg": None,
           "note": ""}
    t0 = time.time()

    def finish(cls, detail, **extra):
        row.update(cls=cls, detail=detail[:900], s=round(time.time() - t0, 1), **extra)
        return row

    if case.export_kill:
        rc, log = _run_cli(_pretrain_argv(fx, out, case.data, **case.over), d)
        if rc != 0:
            return finish("sweep_error", f"the run to export failed ({rc}): {log[-300:]}")
        before = _complete(out)
        exp = os.path.join(d, "exp")
        info = _kill_when(["export", out, exp], out, None, d, watch_export=exp)
        if not info["fired"]:
            return finish("sweep_error", f"export finished before the kill (rc {info['rc']})")
        lost = [s_ for s_, h in before.items() if _complete(out).get(s_) != h]
        half = os.path.isdir(exp) and bool(os.listdir(exp))
        rc, log = _run_cli(["export", out, exp], d)
        leftovers = sorted(n for n in os.listdir(d) if ".tmp-" in n)
        extra = {"inflight": info["inflight"], "leftovers_after_retry": leftovers}
        if lost:
            return finish("data_lost", f"checkpoints changed by the killed export: {lost}", **extra)
        if rc is None:
            return finish("hang", "the export after the kill did not finish", **extra)
        if rc < 0:
            return finish("crash", f"the export after the kill died ({rc})", **extra)
        if rc != 0 or _has_export("exp")(d):
            return finish("data_lost", f"export after the kill failed (exit {rc}{', a half-written export was left' if half else ''}): "
                          f"{log.strip().splitlines()[-1:] if log.strip() else ''}", **extra)
        note = f"; left behind: {leftovers}" if leftovers else ""
        return finish("ok", f"killed at {info['t']} s in {info['inflight']}; export retry ok{note}", **extra)

    if case.pre:
        info0 = _kill_when(_pretrain_argv(fx, out, case.data, **case.over), out, lambda st: len(st["complete"]) >= 2, d)
        if not info0["fired"]:
            return finish("sweep_error", f"the first run ended before 2 checkpoints (rc {info0['rc']}): {info0['stderr']}")
        argv = _pretrain_argv(fx, out, case.data, **case.over) + ["--resume"]
        pre_ever = info0["ever"]
        base = max(info0["complete_at_kill"] or {0: 0})
        if case.pre == "ckpt":
            trigger = lambda st: any(  # noqa: E731
                n.startswith(".tmp-step-") and int(n[10:18]) > base for n in _ckpt_names(out))
        else:
            trigger = lambda st: _logged_past(out, base)  # noqa: E731
    else:
        argv, pre_ever, trigger = _pretrain_argv(fx, out, case.data, **case.over), {}, case.trigger
    info = _kill_when(argv, out, trigger, d)
    ever = {**pre_ever, **info["ever"]}
    at_kill = info["complete_at_kill"]
    extra = {"killed_at_s": info["t"], "inflight": info["inflight"], "complete_at_kill": sorted(at_kill)}
    if not info["fired"]:
        return finish("sweep_error", f"the trigger never fired (exit {info['rc']}): {info['stderr'][-300:]}", **extra)
    # a checkpoint seen complete may only be gone if `keep` newer complete ones remain
    lost = [s_ for s_, h in ever.items() if at_kill.get(s_) != h and sum(1 for k in at_kill if k > s_) < keep]
    if lost:
        return finish("data_lost", f"complete checkpoint(s) {lost} gone or changed after the kill", **extra)
    newest = max(at_kill) if at_kill else None
    target = (newest or 0) + 2
    rc, log = _run_cli(_pretrain_argv(fx, out, case.data, **dict(case.over, steps=target)) + ["--resume"], d)
    if rc is None:
        return finish("hang", "the resume did not finish", **extra)
    if rc < 0:
        return finish("crash", f"the resume died by {signal.Signals(-rc).name}", **extra)
    if rc != 0:
        return finish("data_lost", f"the resume failed (exit {rc}): {log.strip().splitlines()[-1:]}", **extra)
    m = re.search(r"resuming from .*?\(step (\d+)\)", log)
    resumed = int(m.group(1)) if m else None
    if resumed != newest:
        return finish("data_lost", f"resumed from step {resumed}, the newest complete checkpoint was {newest}", **extra)
    after = _complete(out)
    if target not in after:
        return finish("data_lost", f"no complete checkpoint of step {target} after the resume: {sorted(after)}", **extra)
    steps = _logged_steps(out)
    if steps != list(range(1, target + 1)):
        return finish("data_lost", f"metrics.jsonl after the resume logs steps {_ranges(steps)}, expected 1-{target} "
                      "once each (--log-every 1)", **extra)
    left = [n for n in _inflight(out) if str(info["pid"]) in n]
    rc, log = _run_cli(["export", out, os.path.join(d, "exp")], d)
    if rc != 0 or _has_export("exp")(d):
        return finish("data_lost", f"export after the resume failed (exit {rc}): {log.strip().splitlines()[-1:]}", **extra)
    note = f"; temporaries of the killed process left: {left}" if left else ""
    return finish("ok", f"killed at {info['t']} s with {sorted(at_kill)} complete, in flight {info['inflight']}; "
                  f"resumed from {newest}, trained to {target}, exported{note}", **extra)


def sweep_kill(scratch: str, jobs: int) -> List[dict]:
    fx = os.path.join(scratch, "kill-fixture")
    make_fixture(fx)
    big = "\n\n".join(corpus_docs(20000, seed=5)) + "\n"
    with open(os.path.join(fx, "big.txt"), "w", encoding="utf-8") as f:
        f.write(big)
    cases = kill_cases()

    def one(item):
        i, case = item
        return run_kill_case(case, os.path.join(scratch, f"kill-{i:02d}"), fx)

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        rows = list(ex.map(one, enumerate(cases)))
    print(f"  kill: {len(cases)} cases in {time.time() - t0:.0f} s", flush=True)
    return rows


# ================================================================================================ report
def _table(rows: List[dict]) -> Tuple[List[str], Dict[str, Dict[str, int]]]:
    cols = ("cases", "clear", "unclear", "crash", "hang", "silent_wrong", "data_lost", "ok", "sweep_error")
    groups: Dict[str, Dict[str, int]] = {}
    rank: Dict[str, tuple] = {}
    cats = ("ops", "model", "cli", "kill")
    for r in rows:
        total = f"{r['category']} total" + (f" ({r['backend']})" if r["category"] == "ops" else "")
        for key, is_total in ((r["group"], False), (total, True)):
            if key not in groups:
                groups[key] = {c: 0 for c in cols}
                rank[key] = (cats.index(r["category"]), is_total, key)
            groups[key]["cases"] += 1
            groups[key][r["cls"]] = groups[key].get(r["cls"], 0) + 1
    order = sorted(groups, key=rank.get)
    w = max(len(k) for k in order) + 2
    lines = [f"{'':<{w}}" + "".join(f"{c:>13}" for c in cols)]
    for k in order:
        lines.append(f"{k:<{w}}" + "".join(f"{groups[k][c]:>13}" for c in cols))
    return lines, groups


def report(rows: List[dict], meta: dict, out: str) -> None:
    lines, groups = _table(rows)
    print()
    print("\n".join(lines))
    bad = [r for r in rows if r["cls"] not in ("clear", "ok")]
    forced = [r for r in rows if r["cls"] == "clear" and "forced-backend refusal" in r.get("detail", "")]
    print(f"\n{len(bad)} case(s) neither a clear error nor ok:")
    for r in sorted(bad, key=lambda r: (SEVERITY.index(r["cls"]) if r["cls"] in SEVERITY else -1, r["group"], r["id"])):
        print(f"  [{r['cls']}] {r['group']} | {r['id']} (expect {r['expect']}): {r['detail']}")
    if forced:
        print(f"\n{len(forced)} documented forced-backend refusal(s) counted as clear errors:")
        for r in forced:
            print(f"  {r['group']} | {r['id']}: {r['detail'][:200]}")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "summary": groups, "cases": rows}, f, indent=1, default=str)
    print(f"\nwrote {out}")


def merge_reports(paths: List[str]) -> Tuple[List[dict], List[dict], List[str]]:
    """(cases, metas, paths read) of several reports, each case once: a report given twice (or a merged report with
    one of its parts) would count its cases twice. The same case with another result in two reports (a part run
    twice) is refused, as is a file that is no report: ValueError, one line."""
    rows: List[dict] = []
    metas: List[dict] = []
    read: List[str] = []
    where: Dict[tuple, Tuple[str, dict]] = {}  # (group, id) -> (first report holding it, its row)
    for path in dict.fromkeys(os.path.realpath(p) for p in paths):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        except ValueError as e:
            raise ValueError(f"{path} is not a sweep report (not JSON: {e})") from None
        cases = data.get("cases") if isinstance(data, dict) else None
        if not isinstance(cases, list) or not all(isinstance(r, dict) and "group" in r and "id" in r for r in cases):
            raise ValueError(f"{path} is not a sweep report (no list of cases with a group and an id)")
        for r in cases:
            key = (r["group"], r["id"])
            first = where.setdefault(key, (path, r))
            if first[0] != path:  # a case of one report may repeat within it; across reports it is a repeat
                if first[1] != r:
                    raise ValueError(f"case {key[0]} | {key[1]} has other results in {first[0]} and {path}: merge "
                                     "reports of separate --only runs")
                continue
            rows.append(r)
        metas.append(data.get("meta"))
        read.append(path)
    return rows, metas, read


def _meta(args) -> dict:
    import electra_fast
    import torch
    from electra_fast.bench_report import git_state
    commit, dirty = git_state(os.path.dirname(os.path.dirname(os.path.abspath(electra_fast.__file__))), short=False)
    return {"electra_fast": electra_fast.__file__, "commit": commit, "dirty": dirty, "torch": torch.__version__,
            "extension_loaded": electra_fast.extension_loaded(), "python": sys.version.split()[0],
            "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="sweep-report.json", help="the JSON report")
    ap.add_argument("--only", default="ops,model,cli,kill", help="comma-separated parts: ops, model, cli, kill")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (ops part)")
    ap.add_argument("--backends", default="reference,cpp", help="CPU op backends; the first is the truth compared to")
    ap.add_argument("--cli-filter", default=None, help="only CLI cases whose id contains one of these (comma-separated)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per op / model case before it counts as a hang")
    ap.add_argument("--jobs", type=int, default=2, help="parallel workers")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the scratch directory")
    ap.add_argument("--full", action="store_true", help="also the slow CLI cases (bench --compare: minutes)")
    ap.add_argument("--list", action="store_true", help="list the cases and their expected outcomes, run nothing")
    ap.add_argument("--merge", nargs="+", metavar="REPORT.json",
                    help="run nothing: combine reports of separate --only runs into --out and print the tables")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_start", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    if args._child:
        import faulthandler
        faulthandler.enable()  # a crash leaves its Python stack on stderr, which the parent quotes
        kind, target = args._child
        if kind == "ops":
            child_ops(target, args.backends.split(","), args._start)
        else:
            child_model(target, args._start)
        return 0
    # the report's folder before the run: a missing one lost the report of a 12-minute sweep at its end
    why = (f"--out: {out} is a folder; expected a file path" if os.path.isdir(out) else
           f"--out: no such folder: {os.path.dirname(out)}" if not os.path.isdir(os.path.dirname(out)) else None)
    if why and not args.list:
        print(f"sweep: {why}", file=sys.stderr)
        return 2
    if args.merge:
        try:
            rows, metas, paths = merge_reports(args.merge)
        except ValueError as e:
            print(f"sweep: --merge: {e}", file=sys.stderr)
            return 2
        report(rows, {"merged": paths, "parts": metas}, out)
        return 0
    try:
        import electra_fast  # noqa: F401
    except ImportError as e:
        print(f"sweep: run this with the Python of an environment where electra_fast is installed ({e})", file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [p for p in parts if p not in ("ops", "model", "cli", "kill")] + [o for o in ops if o not in SPECS]
    checks = ((unknown, f"unknown part / op: {unknown}"),
              (not backends or any(b not in CPU_BACKENDS for b in backends),
               f"--backends: expected names among {', '.join(CPU_BACKENDS)}, got {args.backends!r}"),
              (args.jobs < 1, f"--jobs: expected an int >= 1, got {args.jobs}"),
              (not 0 < args.timeout < math.inf,
               f"--timeout: expected a finite number of seconds > 0, got {args.timeout}"))
    why = next((msg for bad, msg in checks if bad), None)
    if why:
        print(f"sweep: {why}", file=sys.stderr)
        return 2
    if args.list:
        for op in ops:
            for c in SPECS[op]().cases:
                print(f"ops {op} | {c.id} | expect {c.expect}")
        for c in model_cases():
            print(f"model | {c.id} | expect {c.expect}")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below (scratch, partial report)
    scratch = tempfile.mkdtemp(prefix="ef-sweep-")
    filters = [f for f in args.cli_filter.split(",") if f] if args.cli_filter else None
    meta = _meta(args)
    rows: List[dict] = []
    t0 = time.time()
    try:
        if "cli" in parts:  # a filter matching nothing is a typo: said now, not after the other parts
            cli = cli_selection(os.path.join(scratch, "cli-fixture"), filters, args.full)
            if not cli:
                print(f"sweep: --cli-filter: expected text in a CLI case's id, got {args.cli_filter!r}, which matches "
                      f"none{'' if args.full else ' (the slow cases run with --full only)'}", file=sys.stderr)
                return 2
        if "ops" in parts:
            print(f"ops: {len(ops)} op(s) x {backends}", flush=True)
            rows += sweep_ops(ops, backends, scratch, args.timeout, args.jobs)
        if "model" in parts:
            print("model: ElectraPretrainingModel, standard and disentangled attention", flush=True)
            rows += sweep_model(MODEL_BACKENDS, scratch, args.timeout, args.jobs)
        if "cli" in parts:
            print("cli: electra-fast pretrain / export / bench / info", flush=True)
            rows += sweep_cli(scratch, args.jobs, cli)
        if "kill" in parts:
            print("kill: kill -9 of tiny pretraining runs, then resume and export", flush=True)
            rows += sweep_kill(scratch, args.jobs)
    finally:
        meta["wall_s"] = round(time.time() - t0, 1)
        try:
            if rows:
                report(rows, meta, out)
        finally:  # a report that cannot be written still removes the scratch folder
            if args.keep_tmp:
                print(f"scratch kept: {scratch}")
            else:
                _rmtree(scratch)
    return 0


def _rmtree(path: str) -> None:
    for r, ds, fs in os.walk(path):  # read-only folders of the read-only cases
        for n in ds:
            try:
                os.chmod(os.path.join(r, n), 0o755)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
