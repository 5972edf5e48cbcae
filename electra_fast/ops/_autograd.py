"""One way to build an op's autograd: the torch.library custom op(s) and the eager autograd.Function, both from one
set of bodies (forward, fake, setup, gradients, and an optional backward op).

Why two paths: torch.compile traces the custom ops (their fake kernels describe the outputs to the graph) and
``torch.library.opcheck`` checks them, but their Python dispatch costs about 0.1 ms per forward + backward, as much
as a small op's kernel. Eager calls take the autograd.Function instead, which runs the *same* bodies: what opcheck
checks is what eager training runs, minus the dispatch.

Bodies (``name`` is the op's schema name in namespace ``electra_fast``):
  forward(*inputs)                        annotated like a custom op (the schema is read from the annotations)
  fake(*inputs)                           the forward's outputs, shapes and dtypes only
  setup(ctx, inputs, output)              saves what the gradients need (ctx.save_for_backward, attributes)
  grads(ctx, grad_outputs, backward)      a tuple with one gradient (or None) per input; ``backward`` is the
                                          backward op on the custom-op path and its body on the eager path
  backward(*saved), backward_fake(...)    the backward op's body and fake kernel, when the gradient has its own
                                          kernel (registered as ``backward_name``)
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .. import _backend, _validate

BUILT: Dict[str, "AutogradOp"] = {}  # schema name of the forward op -> its AutogradOp (read by the tests)


class AutogradOp:
    """A callable op: the eager autograd.Function for real tensors outside graph capture, else the custom op.

    ``non_differentiable``: indices of forward outputs that never carry a gradient (statistics, counts).
    ``eager=False``: every call takes the custom op (ops without a gradient, or whose backward is the op itself,
    whose double backward the custom op keeps). ``twice``: the gradients (``grads`` on the saved inputs) are
    themselves differentiable torch ops; otherwise a backward that builds a graph (``create_graph=True``) is an
    error: the kernels' gradients are constants to autograd, and second derivatives through them came out silently
    wrong (torch's once_differentiable does not help: ``autograd.grad(..., x)`` never runs its error node).
    """

    def __init__(self, name: str, forward: Callable, fake: Callable, *, setup: Optional[Callable] = None,
                 grads: Optional[Callable] = None, backward: Optional[Callable] = None,
                 backward_fake: Optional[Callable] = None, backward_name: Optional[str] = None,
                 non_differentiable: Sequence[int] = (), eager: bool = True, twice: bool = False):
        if name in BUILT:
            raise ValueError(f"electra_fast::{name} is built twice")
        BUILT[name] = self
        self.forward, self.backward = forward, backward
        self.op = torch.library.custom_op(f"electra_fast::{name}", forward, mutates_args=())
        self.op.register_fake(fake)
        self.backward_op = None
        if backward is not None:
            self.backward_op = torch.library.custom_op(f"electra_fast::{backward_name}", backward, mutates_args=())
            self.backward_op.register_fake(backward_fake)
        self.eager, self.name, self.differentiable = None, name, grads is not None
        if grads is None:
            return
        # the backward callable of each path: the backward op / body, else the forward op / body (an op that is
        # its own derivative, e.g. dropout)
        op_backward = self.backward_op or self.op
        body_backward = backward or forward
        setup, grads = _same_backend(setup, grads)

        def custom_op_backward(ctx, *grad_outputs):
            if len(grad_outputs) == 1 and isinstance(grad_outputs[0], (list, tuple)):  # a List[Tensor] output
                grad_outputs = tuple(grad_outputs[0])
            return grads(ctx, grad_outputs, op_backward)

        if backward is not None and not twice:  # a backward op has no autograd of its own: refuse at the first pass
            custom_op_backward = _first_order_only(name, custom_op_backward)
        torch.library.register_autograd(f"electra_fast::{name}", custom_op_backward, setup_context=setup)
        if eager:
            self.eager = _eager_function(name, forward, setup, grads, body_backward, tuple(non_differentiable),
                                         twice)

    def __call__(self, *inputs):
        # graph capture, meta and fake tensors: the custom op, whose fake kernel describes the outputs
        if self.eager is not None and _validate.inspectable(inputs[0]):
            return self.eager.apply(*inputs)  # an autograd.Function: forward-mode AD raises there by itself
        if self.differentiable and not torch.compiler.is_compiling():  # graphs carry no dual tensors
            _no_tangents(self.name, inputs)
        return self.op(*inputs)


def _same_backend(setup: Callable, grads: Callable) -> Tuple[Callable, Callable]:
    """``setup`` and ``grads`` whose backward runs on the backend the forward was forced onto: the backward's own
    routing read ``use_backend`` / the eager twin where ``backward()`` was called (usually outside the block; on
    CUDA in autograd's own thread, which never sees the caller's context), so a forward forced onto the reference
    had its gradient computed by the C++ or Triton kernels."""
    def setup_recording(ctx, inputs, output):
        ctx.forced_backend = _backend.forced_in_context()
        setup(ctx, inputs, output)

    def grads_on_forward_backend(ctx, grad_outputs, backward):
        with _backend.use_backend(ctx.forced_backend):
            return grads(ctx, grad_outputs, backward)
    return setup_recording, grads_on_forward_backend


def _no_tangents(name: str, inputs) -> None:
    """A custom op has no forward-mode rule, and torch then drops the tangent without a word (jvp gave 0 through
    dropout): refuse forward-mode AD (forward_ad dual tensors, torch.func.jvp / jacfwd) as autograd.Function does."""
    for x in inputs:
        if isinstance(x, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(x).tangent is not None:
            raise NotImplementedError(f"electra_fast::{name}: forward-mode AD (torch.func.jvp / jacfwd, "
                                      "torch.autograd.forward_ad) is not supported; use reverse mode "
                                      "(loss.backward() or torch.autograd.grad)")


def _eager_function(name: str, forward: Callable, setup: Callable, grads: Callable, backward: Callable,
                    non_differentiable: tuple, twice: bool) -> type:
    def fwd(ctx, *inputs):
        ctx.n_inputs = len(inputs)
        output = forward(*inputs)
        setup(ctx, inputs, output)
        if non_differentiable:
            ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
            # their gradients stay None instead of zero tensors the size of each (gelu_mlp's two [N, hidden]
            # outputs cost a memset of 16 MB per ELECTRA-small layer); every grads body reads output 0's only
            ctx.set_materialize_grads(False)
        return tuple(output) if isinstance(output, list) else output

    def bwd(ctx, *grad_outputs):
        if all(g is None for g in grad_outputs):  # not materialised (above) and none reached out: no gradients
            return (None,) * ctx.n_inputs
        return grads(ctx, grad_outputs, backward)

    if not twice:
        bwd = _first_order_only(name, bwd)
    return type(f"Eager_{name}", (torch.autograd.Function,), {"forward": staticmethod(fwd),
                                                              "backward": staticmethod(bwd)})


def no_autocast(t: torch.Tensor):
    """A region where an enclosing autocast does not recast the matmuls of an op's body: every backend has its own
    precision policy (fp32 accumulation; the C++ kernels exclude autocast themselves)."""
    return torch.autocast(t.device.type, enabled=False)


def _first_order_only(name: str, bwd: Callable) -> Callable:
    @functools.wraps(bwd)
    def first_order(ctx, *grad_outputs):
        if torch.is_grad_enabled():  # the engine runs a backward in grad mode only for create_graph=True
            raise RuntimeError(f"electra_fast::{name}: backward with create_graph=True is not supported: its "
                               "gradient is not differentiable, so a second derivative would be wrong; use torch's "
                               "own operations where higher-order derivatives are needed")
        return bwd(ctx, *grad_outputs)
    return first_order
