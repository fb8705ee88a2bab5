"""The Triton backend as torch.library ops, se_kernels::triton_se_forward and
se_kernels::triton_se_backward, with se_forward/se_backward's signatures and contracts
(csrc/se.cpp; a test checks the schemas agree), the shared fake kernels, and autograd.

On a GPU they are `torch.library.triton_op`s whose launches go through `wrap_triton`, so
torch.compile traces into them: Inductor sees the Triton kernels themselves (it schedules them,
puts them in CUDA graphs, and AOTInductor packages them for a server without Python). Under
TRITON_INTERPRET=1 (CPU tensors, for tests) or a torch without triton_op they are plain
custom ops, opaque to the compiler: the interpreter's kernels cannot be traced.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..differentiable import se_backward_differentiable
from . import launch

TRACEABLE = hasattr(torch.library, "triton_op") and os.environ.get("TRITON_INTERPRET") != "1"
launch.WRAP_TRITON = TRACEABLE


def _define(name: str):
    if TRACEABLE:
        return torch.library.triton_op(name, mutates_args=())
    return torch.library.custom_op(name, mutates_args=())


@_define("se_kernels::triton_se_forward")
def triton_se_forward(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], residual: Optional[Tensor],
    activation: str, gate: str, out_activation: Optional[str],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch.forward(x, w1, b1, w2, b2, residual, activation, gate, out_activation)


@_define("se_kernels::triton_se_backward")
def triton_se_backward(
    grad_y: Tensor, x: Tensor, w1: Tensor, w2: Tensor, pooled: Tensor, hidden: Tensor, gate_logits: Tensor,
    relu_mask: Tensor, activation: str, gate: str, out_activation: Optional[str], need_grad_x: bool,
    need_grad_residual: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch.backward(grad_y, x, w1, w2, pooled, hidden, gate_logits, relu_mask, activation, gate,
                           out_activation, need_grad_x, need_grad_residual)


if not TRACEABLE:  # a triton_op's fake kernel is its own body run on fake tensors (which checks
    # and allocates through ops.forward_fake / ops.backward_fake)
    triton_se_forward.register_fake(ops.forward_fake)
    triton_se_backward.register_fake(ops.backward_fake)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, activation, gate, out_activation = inputs
    _, pooled, hidden, gate_logits, relu_mask = output
    ctx.mark_non_differentiable(pooled, hidden, gate_logits, relu_mask)
    ctx.save_for_backward(x, w1, w2, pooled, hidden, gate_logits, relu_mask, b1, b2)
    ctx.options = (activation, gate, out_activation)


def _backward(ctx, grad_y, *_unused_aux_grads):
    """The same formula as csrc/se_autograd.cpp: the fused backward kernels, or with
    create_graph=True (grad mode on) the differentiable formula (se_kernels/differentiable.py)."""
    x, w1, w2, pooled, hidden, gate_logits, relu_mask, b1, b2 = ctx.saved_tensors
    activation, gate, out_activation = ctx.options
    need = ctx.needs_input_grad
    grad_y = ops.like_layout(grad_y, x)
    if torch.is_grad_enabled():
        grads = se_backward_differentiable(grad_y, x, w1, b1, w2, b2, relu_mask, activation, gate, out_activation)
    else:
        grads = triton_se_backward(
            grad_y, x, w1, w2, pooled, hidden, gate_logits, relu_mask, activation, gate, out_activation,
            need[0], need[5],
        )
        if need[5] and out_activation is None:
            grads = grads[:5] + (grad_y,)  # y = x * g + residual
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None, None, None)


def _not_differentiable(ctx, *grads):
    raise RuntimeError(
        "se_kernels::triton_se_backward is not differentiable; second-order gradients go through "
        "se_kernels::se_backward_differentiable (a backward run with create_graph=True)"
    )


def _setup_nothing(ctx, inputs, output):
    pass


triton_se_forward.register_autograd(_backward, setup_context=_setup_context)
triton_se_backward.register_autograd(_not_differentiable, setup_context=_setup_nothing)


# Autocast, as csrc/se_autocast.cpp does for se_forward: the op computes in the autocast dtype
# (read at call time; torch.library.register_autocast takes one fixed dtype). CPU too, for the
# interpreter.
_autocast_lib = torch.library.Library("se_kernels", "FRAGMENT")


def _autocast_kernel(device_type: str):
    key = getattr(torch._C.DispatchKey, "Autocast" + device_type.upper())

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(a):
            eligible = (isinstance(a, Tensor) and a.device.type == device_type
                        and a.dtype in (torch.float32, torch.float16, torch.bfloat16))
            return a.to(dtype) if eligible else a

        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return torch.ops.se_kernels.triton_se_forward.default(*(cast(a) for a in args))

    return kernel


for _device_type in ("cpu", "cuda"):
    _autocast_lib.impl("triton_se_forward", _autocast_kernel(_device_type), "Autocast" + _device_type.upper(),
                       with_keyset=True)
