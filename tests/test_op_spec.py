"""The op specs (``_backend.OpSpec``, one per public op, registered by ``electra_fast/ops/<op>.py``) and the autograd
builder (``ops/_autograd.AutogradOp``): every public op has a spec, every implementation a spec names resolves,
``info`` reports the backend a real call runs on (with every reason the kernels' limits give), and the two paths
the builder makes from one set of bodies (the custom op that opcheck checks and torch.compile traces, the eager
autograd.Function that eager training runs) give the same outputs and gradients."""
import importlib

import pytest
import torch

import electra_fast
from conftest import REQUIRE_EXT
from electra_fast import _backend, _extension, info, ops
from electra_fast.ops import _autograd
from electra_fast.reference import disentangled_attention as attention_ref
from electra_fast.reference import rtd_loss as rtd_ref
from electra_fast.reference.dropout import keep_scale, keep_threshold

CPU = torch.device("cpu")
SPECS = sorted(_backend.REGISTRY)


def _triton_importable() -> bool:
    return _backend.triton_import_error() is None


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _bf16_autocast(fn):
    # the linear ops serve CPU bf16 autocast (elsewhere they are F.linear, not routed)
    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()
    return call


# one small call of each public op (no gradient: the call routes through its spec's stages)
CALLS = {
    "linear": _bf16_autocast(lambda: electra_fast.linear(torch.randn(4, 8, generator=_gen()),
                                                         torch.randn(16, 8, generator=_gen(1)))),
    "gelu_mlp": _bf16_autocast(lambda: electra_fast.gelu_mlp(  # with a gradient to keep (else: two linears)
        torch.randn(4, 8, generator=_gen(), requires_grad=True), torch.randn(32, 8, generator=_gen(1)), None,
        torch.randn(16, 32, generator=_gen(2)), torch.randn(16, generator=_gen(3)))),
    "rtd_loss": lambda: electra_fast.rtd_loss(torch.randn(2, 5, generator=_gen()), torch.zeros(2, 5, dtype=torch.long),
                                              torch.ones(2, 5, dtype=torch.long)),
    "dropout": lambda: electra_fast.dropout(torch.randn(4, 8, generator=_gen()), 0.5, 1),
    "dropout_add_layer_norm": lambda: electra_fast.dropout_add_layer_norm(
        torch.randn(4, 8, generator=_gen()), torch.randn(4, 8, generator=_gen(1)), torch.ones(8), torch.zeros(8),
        p=0.1, seed=1),
    "mask_tokens": lambda: electra_fast.mask_tokens(torch.randint(5, 100, (2, 16), generator=_gen()),
                                                    mask_token_id=1, vocab_size=100, seed=3),
    "gumbel_sample": lambda: electra_fast.gumbel_sample(torch.randn(3, 10, generator=_gen()), seed=1),
    "mlm_loss_and_sample": lambda: electra_fast.mlm_loss_and_sample(
        torch.randn(3, 8, generator=_gen()), torch.randn(10, 8, generator=_gen(1)), torch.tensor([1, 4, -100]),
        seed=1),
    "disentangled_attention": lambda: electra_fast.disentangled_attention(
        *(torch.randn(1, 2, 6, 32, generator=_gen(i)) for i in range(3)),
        *(torch.randn(2, 8, 32, generator=_gen(3 + i)) for i in range(2)), position_buckets=4,
        max_relative_positions=8),
}


def test_every_public_op_has_one_spec():
    public = {name for name in ops.__all__ if not isinstance(getattr(ops, name), type)}
    assert set(_backend.REGISTRY) == public == set(CALLS)
    with pytest.raises(ValueError, match="registered twice"):
        _backend.register(_backend.REGISTRY["rtd_loss"])


@pytest.mark.parametrize("name", SPECS)
def test_spec_entries_resolve(name):
    """Every stage has a reference function, a C++ kernel in the built extension and a Triton launcher (with the
    kernels' compile specs); a C++-only stage has a C++ kernel."""
    spec = _backend.REGISTRY[name]
    assert spec.stages and set(spec.cpp_only) <= set(spec.cpp)
    for stage in spec.stages:
        assert callable(getattr(spec.reference, stage)), f"{name}: reference has no {stage}"
    if REQUIRE_EXT or _extension.extension_loaded():
        for stage, kernel in spec.cpp.items():
            assert _extension.cpp_op(kernel) is not None, f"{name}: the C++ extension has no {kernel}"
    if spec.triton is not None and _triton_importable():
        kernels = spec.kernels()
        assert callable(kernels.compile_specs)
        for stage in spec.stages:
            assert callable(getattr(kernels, stage)), f"{name}: kernels.{spec.triton} has no {stage}"


def _served_by(monkeypatch):
    """Records (op, backend) for each implementation a call gets from its spec."""
    seen = []
    original = _backend.OpSpec.serving  # implementation() goes through it too

    def spy(self, stage, device, **call):
        backend, fn = original(self, stage, device, **call)
        if fn is getattr(self.reference, stage):
            kind = "reference"
        elif isinstance(fn, torch._ops.OpOverloadPacket):
            kind = "cpp"
        else:
            kind = "triton"
        assert kind == backend, (self.name, stage, backend, fn)  # the name serving gives is the callable's
        seen.append((self.name, backend))
        return backend, fn

    monkeypatch.setattr(_backend.OpSpec, "serving", spy)
    return seen


@pytest.mark.parametrize("forced", [None, "reference", "cpp"])
@pytest.mark.parametrize("name", SPECS)
def test_info_reports_the_backend_a_call_runs_on(name, forced, monkeypatch):
    if forced == "cpp" and not _extension.extension_loaded():
        pytest.skip("C++ extension not built")
    seen = _served_by(monkeypatch)
    with electra_fast.use_backend(forced):
        CALLS[name]()
        reported = info.serving(name, CPU)
    backends = {backend for op, backend in seen if op == name}
    assert backends == {reported}, (name, forced, seen, reported)
    assert reported == (forced or ("cpp" if _extension.extension_loaded() else "reference"))


def test_info_and_routing_give_every_reason_of_the_kernels_limits(monkeypatch):
    """A call the Triton kernels cannot serve: forced triton raises naming every reason, automatic routing whose
    first choice is triton falls back to the reference with the same reasons, and info says the same."""
    if not _triton_importable():
        pytest.skip("triton is not importable")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = _backend.REGISTRY["disentangled_attention"]
    call = dict(head_dim=48, dtype=torch.float64, rel_slots=attention_ref.relative_slots(40, 16, 16, "cpu"))
    reasons = spec.unsupported("triton", **call)
    assert len(reasons) == 3 and "48" in reasons[0] and "float64" in reasons[1] and "monotone" in reasons[2]
    with electra_fast.use_backend("triton"):
        with pytest.raises(RuntimeError) as exc:
            spec.route(CPU, "forward", **call)
        assert all(r in str(exc.value) for r in reasons)
        assert info.serving("disentangled_attention", CPU, **call) == f"ERROR ({exc.value})"
    monkeypatch.setattr(_backend, "default_backend", lambda device: "triton")
    backend, reason = spec.route(CPU, "forward", **call)
    assert backend == "reference" and all(r in reason for r in reasons)
    assert info.serving("disentangled_attention", CPU, **call) == f"reference ({reason})"
    assert info.serving("disentangled_attention", CPU) == "triton"  # no call: no limit to break
    # a real call: the masking kernels hold a row of at most MAX_T tokens
    from electra_fast.kernels.masking import MAX_T

    seen = _served_by(monkeypatch)
    ids = torch.full((1, MAX_T + 1), 5)
    electra_fast.mask_tokens(ids, mask_token_id=1, vocab_size=10, seed=0)
    assert seen == [("mask_tokens", "reference")]
    assert f"T <= {MAX_T}" in info.serving("mask_tokens", CPU, T=MAX_T + 1)


# --------------------------------------------------------------------------- the builder's two paths
def _rtd_inputs():
    logits = torch.randn(3, 7, generator=_gen(), dtype=torch.float64)
    corrupted = torch.randint(0, 4, (3, 7), generator=_gen(1))
    mask = torch.ones(3, 7, dtype=torch.uint8)
    mask[1, 5:] = 0
    return [logits, corrupted, torch.randint(0, 4, (3, 7), generator=_gen(2)), mask, rtd_ref.REDUCTIONS["mean"], True]


def _daln_inputs():
    x, r = torch.randn(5, 16, generator=_gen(), dtype=torch.float64), torch.randn(5, 16, generator=_gen(1),
                                                                                  dtype=torch.float64)
    w, b = torch.randn(16, generator=_gen(2), dtype=torch.float64), torch.randn(16, generator=_gen(3),
                                                                                dtype=torch.float64)
    return [x, r, w, b, keep_threshold(0.3), keep_scale(0.3), 5, 1, 1e-5]


def _attention_inputs():
    q, k, v = (torch.randn(1, 2, 6, 32, generator=_gen(i), dtype=torch.float64) for i in range(3))
    pk, pq = (torch.randn(2, 8, 32, generator=_gen(3 + i), dtype=torch.float64) for i in range(2))
    mask = torch.ones(1, 6, dtype=torch.uint8)
    mask[0, 4:] = 0
    return [q, k, v, pk, pq, mask, attention_ref.relative_slots(6, 4, 8, "cpu"), 0.1, 0.2, 7, 4, 8, None]


def _linear_inputs():
    x, w = torch.randn(5, 16, generator=_gen(), dtype=torch.float64), torch.randn(24, 16, generator=_gen(1),
                                                                                 dtype=torch.float64)
    return [x, w, torch.randn(24, generator=_gen(2), dtype=torch.float64), False]


def _mlp_inputs():
    x, w1, b1 = _linear_inputs()[:3]
    return [x, w1, b1, torch.randn(8, 24, generator=_gen(3), dtype=torch.float64), None, False]


EAGER_INPUTS = {"linear": _linear_inputs, "gelu_mlp_fwd": _mlp_inputs, "rtd_loss_fwd": _rtd_inputs,
                "dropout_add_layer_norm_fwd": _daln_inputs, "disentangled_attention_fwd": _attention_inputs}


def test_every_eager_path_is_covered():
    assert {name for name, op in _autograd.BUILT.items() if op.eager is not None} == set(EAGER_INPUTS)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("name", sorted(EAGER_INPUTS))
def test_eager_path_is_the_custom_op(name, backend):
    """Outputs and gradients of the eager autograd.Function equal those of the custom op (same bodies, same
    kernels: bit for bit), and opcheck passes on the custom op."""
    if backend == "cpp" and not _extension.extension_loaded():
        pytest.skip("C++ extension not built")
    op = _autograd.BUILT[name]
    results = []
    with electra_fast.use_backend(backend):
        for path in (op.eager.apply, op.op):
            inputs = [x.clone().requires_grad_() if isinstance(x, torch.Tensor) and x.dtype == torch.float64 else x
                      for x in EAGER_INPUTS[name]()]
            out = path(*inputs)
            weight = torch.linspace(-1, 1, out[0].numel(), dtype=out[0].dtype).view(out[0].shape)
            (out[0] * weight).sum().backward()
            grads = [x.grad for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
            results.append(([o.detach() for o in out], grads))
        (eager_out, eager_grads), (op_out, op_grads) = results
        assert all(torch.equal(a, b) for a, b in zip(eager_out, op_out))
        assert len(eager_grads) == len(op_grads) > 0
        assert all(torch.equal(a, b) for a, b in zip(eager_grads, op_grads))
        torch.library.opcheck(op.op, EAGER_INPUTS[name]())


def test_ops_modules_route_through_their_spec():
    """The dispatch path of a call is the op's own spec: each ops module holds the spec registered under its name."""
    for name, spec in _backend.REGISTRY.items():
        module = importlib.import_module(spec.reference.__name__.replace(".reference.", ".ops."))
        assert spec in [v for v in vars(module).values() if isinstance(v, _backend.OpSpec)], name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_rtd_loss_cpp_training_path_is_the_custom_op(reduction, cpp_extension):
    """rtd_loss's eager training on the C++ backend runs the spec's C++-only ``train`` stage (a C++ autograd
    function, outside opcheck's reach): its loss, metrics and gradient equal the checked custom op's, bit for bit."""
    from electra_fast.ops.rtd_loss import _OP

    logits, corrupted, original, mask, _, _ = _rtd_inputs()
    assert _backend.REGISTRY["rtd_loss"].route(CPU, "train") == ("cpp", None)
    weight = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view(logits.shape)
    a = logits.clone().requires_grad_()
    loss, metrics = electra_fast.rtd_loss(a, corrupted, original, mask.bool(), reduction=reduction,
                                          return_metrics=True)
    (loss * (weight if reduction == "none" else 1.0)).sum().backward()
    b = logits.clone().requires_grad_()
    want, counts, _ = _OP.op(b, corrupted, original, mask, rtd_ref.REDUCTIONS[reduction], True)
    (want * (weight if reduction == "none" else 1.0)).sum().backward()
    assert torch.equal(loss, want) and torch.equal(a.grad, b.grad)
    want_metrics = rtd_ref.metrics_from_counts(counts)
    assert all(torch.equal(metrics[k], want_metrics[k]) for k in want_metrics)
