"""fused_channel_attention: squeeze -> any excitation -> scale, with the squeeze and the scale fused.

Every channel-attention block (SE, ESE, ECA, SE with a norm layer or another activation, the
average + max squeeze) moves the same bytes: one pass over x to pool, one to scale (backward: one
pass for the per-channel sums of dy * x, one to write dx). Only the excitation, a small function
of the pooled (N, C) vector, differs. Here the passes over x run as stage kernels (`ca_pool`,
`ca_scale`, `ca_gate_grad`, `ca_input_grad`: C++ on the CPU, CUDA C++ or Triton on GPUs, the
latter in se_kernels/triton/stages.py) and the excitation runs as ordinary PyTorch ops,
differentiated by autograd; elsewhere (backend="torch", torch.compile, export) the unfused
composition runs, exactly what the replaced modules compute. x's gradient through the pool is
folded into the pass that writes dx:

    forward   p = squeeze(x); g = excite(p); y = out_act(x * g + residual)
    backward  dg = sum_hw dy' * x            (pass 1: dy and x)
              dp, dtheta = autograd of excite, given dg (on (N, C) vectors)
              dx = dy' * g + d(squeeze)/dx . dp   (pass 2: dy, and x only for the max squeeze)

squeeze "avg" is the mean over H*W; "avg_max" is timm's `0.5 * mean + 0.5 * amax` (its
add_maxpool), whose max gradient is shared equally among tied maxima as torch.amax's is.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import ops, reference
from .functional import FLOAT_DTYPES

SQUEEZES = ("avg", "avg_max")
CA_BACKENDS = ops.BACKENDS  # every backend has the generic path's stage kernels


# ---- the stage kernels (csrc/se.cpp's ca_* ops; se_kernels/triton/stages.py) ----------------------
# g, dmean, dmax and ties are (N, C) tensors in the accumulation type (float32 for
# float32/float16/bfloat16 x, float64 for float64); relu_mask is se_forward's bit rows, empty
# without the relu.


def _acc(x: torch.Tensor) -> torch.dtype:
    return ops.accumulation_dtype(x.dtype)


def _register_fakes() -> None:
    """Output metadata of the stage ops (torch.library.opcheck, meta tensors)."""
    if ops.extension_error() is not None:
        return

    def vector(x, dtype=None):
        return x.new_empty((x.shape[0], x.shape[1]), dtype=dtype or _acc(x))

    def mask(x, out_relu):
        return x.new_empty(ops.relu_mask_shape(x) if out_relu else (0,), dtype=torch.uint8)

    @torch.library.register_fake("se_kernels::ca_pool")
    def _(x, with_max):
        empty = (0, 0)
        return (vector(x, x.dtype), vector(x, x.dtype) if with_max else x.new_empty(empty),
                vector(x) if with_max else x.new_empty(empty, dtype=_acc(x)))

    @torch.library.register_fake("se_kernels::ca_scale")
    def _(x, g, residual, out_relu):
        return torch.empty_like(x), mask(x, out_relu)

    @torch.library.register_fake("se_kernels::ca_eca_forward")
    def _(x, weight, bias, padding, gate, residual, out_relu):
        return torch.empty_like(x), mask(x, out_relu)

    @torch.library.register_fake("se_kernels::ca_gate_grad")
    def _(dy, x, relu_mask, out_relu):
        return vector(x)

    @torch.library.register_fake("se_kernels::ca_input_grad")
    def _(dy, relu_mask, g, dmean, x, mx, dmax, ties, out_relu, need_grad_x, need_grad_residual):
        dx = torch.empty_like(dy) if need_grad_x else dy.new_empty((0,))
        return dx, torch.empty_like(dy) if need_grad_residual and out_relu else dy.new_empty((0,))


_register_fakes()


class _Stages:
    """One backend's stage kernels: ca_pool, ca_scale, ca_gate_grad and ca_input_grad's contracts
    (the ops of csrc/se.cpp, on the CPU csrc/cpu/channel_attention.cpp and on CUDA
    csrc/cuda/se_cuda.cu; for Triton se_kernels/triton/stages.py)."""

    def __init__(self, pool, scale, gate_grad, input_grad):
        self.pool, self.scale, self.gate_grad, self.input_grad = pool, scale, gate_grad, input_grad


_STAGES: dict = {}


def _stages(backend: str) -> _Stages:
    if backend not in _STAGES:
        if backend == "triton":
            from .triton import stages

            _STAGES[backend] = _Stages(stages.pool, stages.scale, stages.gate_grad, stages.input_grad)
        else:
            native = torch.ops.se_kernels
            _STAGES[backend] = _Stages(native.ca_pool, native.ca_scale, native.ca_gate_grad, native.ca_input_grad)
    return _STAGES[backend]


def _pool(stages, x, with_max):
    mean, mx, ties = stages.pool(x, with_max)
    return mean, (mx if with_max else None), (ties if with_max else None)


def _scale(stages, x, g, residual, out_relu):
    return stages.scale(x, g.to(_acc(x)).contiguous(), residual, out_relu)


def _input_grad(stages, dy, mask, g, dmean, x, mx, dmax, ties, out_relu, need_x, need_res):
    """(dx or None, dres or None); without the relu dres is dy itself (no copy)."""
    acc = _acc(dy)
    cast = lambda t: t.to(acc).contiguous() if t is not None else None  # noqa: E731
    dx, dres = stages.input_grad(dy, mask, cast(g), cast(dmean), x, mx, cast(dmax), cast(ties), out_relu, need_x,
                                 need_res)
    return (dx if need_x else None), ((dres if out_relu else dy) if need_res else None)


# ---- autograd --------------------------------------------------------------------------------


def _squeezed(mean, mx):
    """The pooled vector excite sees, computed as timm computes it (in x's dtype)."""
    return mean if mx is None else 0.5 * mean + 0.5 * mx


def _foreign_leaves(g: torch.Tensor, allowed: Sequence[torch.Tensor]) -> List[str]:
    """Tensors requiring grad that g depends on besides the pooled vector and the excitation's
    parameters: their gradients would be lost, so the call is refused."""
    allowed_ids = {id(t) for t in allowed}
    seen, stack, foreign = set(), [g.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) not in allowed_ids:
            foreign.append(f"{type(variable).__name__} of shape {tuple(variable.shape)}")
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return foreign


def _foreign_message(foreign: List[str]) -> str:
    return ("fused_channel_attention: excite depends on tensors that require grad other than the pooled input and "
            f"its own parameters ({', '.join(foreign) or 'unknown'}); pass an nn.Module holding them, or use "
            "backend='torch'")


class _ChannelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, excite, stages, with_max, out_relu, *params):
        mean, mx, ties = _pool(stages, x, with_max)
        with torch.enable_grad():
            mean_leaf = mean.detach().requires_grad_(x.requires_grad)
            mx_leaf = mx.detach().requires_grad_(x.requires_grad) if with_max else None
            # a copy for "avg": excite may work in place on its input, which a leaf refuses
            g = excite(_squeezed(mean_leaf, mx_leaf) if with_max else mean_leaf.clone())
        _check_gate(g, x)
        leaves = [t for t in (mean_leaf, mx_leaf) if t is not None and t.requires_grad]
        if g.requires_grad:
            foreign = _foreign_leaves(g, leaves + [p for p in params if p.requires_grad])
            if foreign:
                raise ValueError(_foreign_message(foreign))
        y, mask = _scale(stages, x, g.detach(), residual, out_relu)
        ctx.save_for_backward(x, mask, mx, ties)
        ctx.graph = (g, leaves)
        ctx.stages = stages
        ctx.params = params
        ctx.options = (with_max, out_relu)
        ctx.mark_non_differentiable(mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_channel_attention: second-order gradients (create_graph=True) are not supported by the "
                "fused path; use backend='torch'"
            )
        x, mask, mx, ties = ctx.saved_tensors
        g, leaves = ctx.graph
        with_max, out_relu = ctx.options
        need_x, need_res = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy = ops.like_layout(dy, x)
        wanted = [p for p in ctx.params if p.requires_grad]
        zeros = torch.zeros(x.shape[:2], dtype=_acc(x), device=x.device)
        dmean, dmax, grads = zeros, (zeros if with_max else None), {}
        if g.requires_grad and (leaves or wanted):
            dg = ctx.stages.gate_grad(dy, x, mask, out_relu)
            # retain_graph: the outer backward may be run again (retain_graph=True there, gradcheck);
            # the excitation's graph is small, on (N, C) vectors, and goes with this node
            got = torch.autograd.grad(g, leaves + wanted, dg.to(g.dtype), allow_unused=True, retain_graph=True)
            if leaves:
                dmean = got[0] if got[0] is not None else zeros
                if with_max:
                    dmax = got[1] if got[1] is not None else zeros
            grads = {id(p): d for p, d in zip(wanted, got[len(leaves):])}
        dx, dres = None, None
        if need_x or need_res:
            dx, dres = _input_grad(ctx.stages, dy, mask, g.detach(), dmean, x if with_max else None, mx, dmax, ties,
                                   out_relu, need_x, need_res)
        param_grads = tuple(grads.get(id(p)) for p in ctx.params)
        return (dx, dres, None, None, None, None) + param_grads


def _check_gate(g, x, fused: bool = True) -> None:
    """g must be (N, C) (or (N, C, 1, 1)) floating-point gates; for the fused scale, ones it can
    apply in x's dtype."""
    n, c = x.shape[:2]
    if not isinstance(g, torch.Tensor) or g.shape not in ((n, c), (n, c, 1, 1)):
        shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"excite must map the pooled (N, C) = ({n}, {c}) tensor to gates of shape ({n}, {c}); "
                         f"got {shape}")
    if not g.is_floating_point():
        raise TypeError(f"excite must return floating-point gates; got {g.dtype}")
    if fused and torch.promote_types(x.dtype, g.dtype) != x.dtype:
        raise TypeError(f"excite returned {g.dtype} gates for a {x.dtype} x: x * g would be {g.dtype}, and the "
                        f"fused path writes x's dtype; return {x.dtype} gates, or use backend='torch'")


# ---- the entry point -------------------------------------------------------------------------


def _reference(x, excite, with_max, residual, out_relu):
    """The unfused composition, exactly what the modules it replaces compute."""
    mean = x.mean((2, 3))
    g = excite(_squeezed(mean, x.amax((2, 3)) if with_max else None))
    _check_gate(g, x, fused=False)
    y = x * g.reshape(g.shape[0], g.shape[1], 1, 1)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if out_relu else y


def _check_arguments(x, excite, squeeze, residual, out_activation, backend) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if not callable(excite):
        raise TypeError(f"excite must be callable (an nn.Module or a function of the pooled tensor); "
                        f"got {type(excite).__name__}")
    if squeeze not in SQUEEZES:
        raise ValueError(f"squeeze must be one of {SQUEEZES}; got {squeeze!r}")
    reference.check_option("out_activation", out_activation)
    if backend != "auto" and backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + ops.BACKENDS}; got {backend!r}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64; got x.dtype = {x.dtype}")
    if x.dim() != 4 or x.shape[1] < 1 or x.shape[2] * x.shape[3] < 1:
        raise ValueError(f"x must be (N, C, H, W) with C >= 1 and H*W >= 1; got x.shape = {tuple(x.shape)}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None; got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(f"residual must have x's dtype and device ({x.dtype}, {x.device}); "
                            f"got {residual.dtype} on {residual.device}")


def _resolve(backend: str, device_type: str) -> str:
    if torch.compiler.is_compiling():
        return "torch"  # the standard ops: Inductor and export take them as they are
    # every backend has the stage kernels: the SE op's choice (SE_KERNELS_BACKEND included;
    # "torch" inside torch.onnx.export)
    return ops.resolve_backend(backend, device_type)


def fused_channel_attention(
    x: torch.Tensor,
    excite: Callable[[torch.Tensor], torch.Tensor],
    *,
    squeeze: str = "avg",
    residual: Optional[torch.Tensor] = None,
    out_activation: Optional[str] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Channel attention with any excitation: out_activation(x * excite(squeeze(x)) + residual).

    Args:
        x: (N, C, H, W), float32/float16/bfloat16/float64, any strides.
        excite: maps the pooled (N, C) tensor (in x's dtype) to gates (N, C) (or (N, C, 1, 1)). An
            nn.Module's parameters get their gradients; a plain function may use no other tensor
            that requires grad (refused with a ValueError, rather than losing its gradient).
        squeeze: "avg" (mean over H*W) or "avg_max" (0.5 * mean + 0.5 * max, timm's add_maxpool).
        residual: None or a tensor like x, added before out_activation.
        out_activation: None | "relu".
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch", as fused_se's ("auto": the first
            of available_backends for x's device).
    Returns:
        (N, C, H, W) in x's dtype. Gates of a wider dtype than x's (x * g would promote) are
        refused with a TypeError on the fused path; backend="torch" promotes, as x * g does.
    """
    _check_arguments(x, excite, squeeze, residual, out_activation, backend)
    with_max, out_relu = squeeze == "avg_max", out_activation == "relu"
    chosen = _resolve(backend, x.device.type)
    if chosen == "torch":
        return _reference(x, excite, with_max, residual, out_relu)
    x_k = ops.as_kernel_layout(x)
    residual_k = ops.like_layout(residual, x_k) if residual is not None else None
    params: Tuple[torch.Tensor, ...] = ()
    if torch.is_grad_enabled() and isinstance(excite, nn.Module):  # not walked where nothing is recorded
        params = tuple(excite.parameters())
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (residual is not None and residual.requires_grad) or any(p.requires_grad for p in params)
    )
    stages = _stages(chosen)
    if not needs_grad:  # nothing to record: the stage ops need no no_grad() around them
        mean, mx, _ = _pool(stages, x_k, with_max)
        g = excite(_squeezed(mean, mx))  # in the caller's grad mode: a closure's tensors may require grad
        _check_gate(g, x)
        if g.requires_grad:
            raise ValueError(_foreign_message(_foreign_leaves(g, [])))
        return _scale(stages, x_k, g.reshape(g.shape[0], g.shape[1]), residual_k, out_relu)[0]
    return _ChannelAttention.apply(x_k, residual_k, _FlatGate(excite), stages, with_max, out_relu, *params)


class _FlatGate:
    """excite with its gates as (N, C) in the caller's dtype."""

    def __init__(self, excite):
        self.excite = excite

    def __call__(self, pooled):
        g = self.excite(pooled)
        if isinstance(g, torch.Tensor) and g.dim() == 4 and g.shape[2:] == (1, 1):
            return g.reshape(g.shape[0], g.shape[1])
        return g  # _check_gate names a wrong shape
