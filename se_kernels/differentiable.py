"""Second-order gradients: the SE backward as differentiable torch ops.

The fused backward kernels (cpu, cuda, triton) compute first-order gradients only. When a
backward runs with create_graph=True (gradient penalties, Hessian-vector products, MAML),
the autograd functions of those backends call se_kernels::se_backward_differentiable
instead: the same gradients written with ordinary differentiable ops, so autograd can
differentiate them once more. Registered as a CompositeImplicitAutograd op so that the C++
autograd kernel (csrc/se_autograd.cpp) reaches it through the dispatcher.

Given dy (the gradient of y), with p = mean_hw x, u1 = p w1^T + b1, h = act(u1),
u2 = h w2^T + b2, g = gate(u2):

    dy'  = dy * [y > 0]                   (relu epilogue; the mask is piecewise constant)
    dz2  = gate'(u2) * sum_hw dy' x       (N, C)
    dz1  = act'(u1) * (dz2 w2)            (N, S)
    dx   = dy' g + (dz1 w1) / (H W)       dresidual = dy'
    dw1  = dz1^T p,  db1 = sum_n dz1,  dw2 = dz2^T h,  db2 = sum_n dz2

computed in the accumulation dtype (float32 for float16/bfloat16) like the kernels.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .reference import ACTIVATION_GRADS, ACTIVATIONS, GATE_GRADS, GATES, check_options

SCHEMA = (
    "se_backward_differentiable(Tensor grad_y, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
    "Tensor relu_mask, str activation, str gate, str? out_activation) -> Tensor[]"
)


def unpack_relu_mask(relu_mask: Tensor, x: Tensor) -> Tensor:
    """The boolean (N, C, H, W) mask [y > 0] from the forward's bit-packed relu_mask: bit i of a
    row at byte i // 8, bit i % 8; rows of H*W pixels per channel, or of C channels per pixel
    when x is read as channels_last rows (csrc/se.cpp)."""
    from .ops import uses_pixel_rows  # ops imports this module

    n, c, h, w = x.shape
    pixel_rows = uses_pixel_rows(x)
    rows, row_len = (h * w, c) if pixel_rows else (c, h * w)
    shifts = torch.arange(8, device=relu_mask.device, dtype=torch.uint8)
    bits = (relu_mask.unsqueeze(-1) >> shifts) & 1  # (N, rows, row_bytes, 8)
    bits = bits.reshape(n, rows, -1)[:, :, :row_len].bool()
    if pixel_rows:
        bits = bits.transpose(1, 2)
    return bits.reshape(n, c, h, w)


def se_backward_differentiable(
    grad_y: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
    relu_mask: Tensor, activation: str, gate: str, out_activation: Optional[str],
) -> List[Tensor]:
    """[grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_residual] for se_forward's inputs, as
    differentiable functions of grad_y, x, w1, b1, w2, b2 (see the module docstring)."""
    check_options(activation, gate, out_activation)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, c, h, w = x.shape
    s = w1.shape[0]
    dy = grad_y
    if out_activation == "relu":
        dy = dy * unpack_relu_mask(relu_mask, x).to(dy.dtype)
    xa, dya = x.to(acc), dy.to(acc)
    w1a, w2a = w1.reshape(s, c).to(acc), w2.reshape(c, s).to(acc)
    p = xa.mean((2, 3))
    u1 = p @ w1a.t()
    if b1 is not None:
        u1 = u1 + b1.to(acc)
    hidden = ACTIVATIONS[activation](u1)
    u2 = hidden @ w2a.t()
    if b2 is not None:
        u2 = u2 + b2.to(acc)
    g = GATES[gate](u2)
    dz2 = GATE_GRADS[gate]((dya * xa).sum((2, 3)), u2, g)
    dz1 = ACTIVATION_GRADS[activation](dz2 @ w2a, u1)
    grad_x = dya * g[:, :, None, None] + ((dz1 @ w1a) / (h * w))[:, :, None, None]
    return [
        grad_x.to(x.dtype),
        (dz1.t() @ p).to(w1.dtype).reshape(w1.shape),
        dz1.sum(0).to(w1.dtype),
        (dz2.t() @ hidden).to(w2.dtype).reshape(w2.shape),
        dz2.sum(0).to(w2.dtype),
        dy,
    ]


_lib = torch.library.Library("se_kernels", "FRAGMENT")
_lib.define(SCHEMA)
_lib.impl("se_backward_differentiable", se_backward_differentiable, "CompositeImplicitAutograd")
