"""The generic channel-attention path's stage kernels on Triton (se_kernels/attention.py), with
the contracts of the CPU stage ops (csrc/cpu/channel_attention.cpp):

    pool(x, with_max)            -> mean (N, C) in x's dtype; max (N, C) in x's dtype and ties
                                    (N, C, accumulation type) with the max squeeze, else empty
    scale(x, g, residual, relu)  -> y = relu?(x * g + residual), relu_mask (se_forward's format)
    gate_grad(dy, x, mask, relu) -> dg = sum_hw dy' * x, (N, C) accumulation type
    input_grad(dy, mask, g, dmean, x, max, dmax, ties, relu, need_x, need_res)
                                 -> dx = dy' * g + dmean / HW + [x == max] * dmax / ties, dres = dy'

The passes are the SE op's split-plan kernels (channel_sums_kernel, se_scale_kernel,
se_grad_input_kernel) with the same tiles and pixel splits (launch.Plan), plus the max squeeze's
channel_max_kernel and ca_grad_input_max_kernel. Plain launches, not torch.library ops: the
generic path runs them inside its autograd.Function, and torch.compile and export take the
unfused composition instead.
"""

from __future__ import annotations

import torch
import triton

from .. import ops
from . import kernels, launch


class _Launch:
    """Geometry, tiles and grids of one call: the split plan's, whatever the size."""

    def __init__(self, x: torch.Tensor, out_relu: bool):
        self.g = launch.Geometry(x, 1, out_relu)
        self.plan = launch.Plan(self.g, backward=False, sm_count=launch.sm_count(x.device))
        c_blocks = triton.cdiv(self.g.C, self.plan.block_c)
        self.sums_grid = (self.g.N * c_blocks * self.plan.splits,)
        self.tiles_grid = (self.g.N * c_blocks * triton.cdiv(self.g.L, self.plan.block_l),)
        self.max_grid = (self.g.N * c_blocks,)
        for grid in (self.sums_grid, self.tiles_grid):
            if grid[0] > launch.GRID_X_MAX:
                raise ValueError(f"se_kernels: {grid[0]} programs would exceed CUDA's grid limit")
        self.tile_warps = launch._warps(self.plan.block_c * self.plan.block_l)

    def flags(self):
        g, plan = self.g, self.plan
        return dict(PIXEL_ROWS=g.pixel_rows, ACC=g.acc, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, WIDE=g.wide)


def _sums(run: _Launch, x, dy, mask_arg, dot: bool) -> torch.Tensor:
    """(N, C) pixel sums of x (dot: of dy' * x): the splits' partials added in order."""
    g, plan = run.g, run.plan
    partial = torch.empty((g.N, plan.splits, g.C), device=x.device, dtype=ops.accumulation_dtype(x.dtype))
    kernels.channel_sums_kernel[run.sums_grid](
        x, dy, mask_arg, partial, g.C, g.L, *g.strides, g.row_bytes, plan.per_split, plan.splits,
        DOT=dot, OUT_RELU=dot and g.out_relu, **run.flags(), num_warps=launch._sums_warps(dot),
    )
    return partial.sum(1) if plan.splits > 1 else partial[:, 0]


def pool(x, with_max: bool):
    n, c = x.shape[:2]
    vectors = (n, c) if with_max else (0, 0)
    mx, ties = x.new_empty(vectors), x.new_empty(vectors, dtype=ops.accumulation_dtype(x.dtype))
    if n == 0:
        return x.new_empty((0, c)), mx, ties
    run = _Launch(x, out_relu=False)
    with launch._on_device(x):
        mean = (_sums(run, x, x, x, dot=False) / run.g.L).to(x.dtype)
        if not with_max:
            return mean, mx, ties
        kernels.channel_max_kernel[run.max_grid](
            x, mx, ties, run.g.C, run.g.L, *run.g.strides, ACC=run.g.acc, BLOCK_C=run.plan.block_c,
            BLOCK_L=run.plan.block_l, WIDE=run.g.wide, num_warps=run.tile_warps,
        )
    return mean, mx, ties


def scale(x, gates, residual, out_relu: bool):
    y = torch.empty_like(x)
    run = _Launch(x, out_relu)
    mask = torch.empty(ops.relu_mask_shape(x) if out_relu else (0,), device=x.device, dtype=torch.uint8)
    if run.g.N == 0:
        return y, mask
    with launch._on_device(x):
        kernels.se_scale_kernel[run.tiles_grid](
            x, residual if residual is not None else x, y, mask if out_relu else y, gates,
            run.g.C, run.g.L, *run.g.strides, run.g.row_bytes,
            HAS_RES=residual is not None, OUT_RELU=out_relu, **run.flags(), num_warps=run.tile_warps,
        )
    return y, mask


def gate_grad(dy, x, mask, out_relu: bool):
    run = _Launch(x, out_relu)
    if run.g.N == 0:
        return x.new_empty(x.shape[:2], dtype=ops.accumulation_dtype(x.dtype))
    with launch._on_device(x):
        return _sums(run, x, dy, mask if out_relu else dy, dot=True)


def input_grad(dy, mask, gates, dmean, x, mx, dmax, ties, out_relu: bool, need_x: bool, need_res: bool):
    """(dx, dres) as ca_input_grad: empty where not asked for (dres: also without the relu)."""
    run = _Launch(dy, out_relu)
    need_dres = need_res and out_relu
    dx = torch.empty_like(dy) if need_x else dy.new_empty((0,))
    dres = torch.empty_like(dy) if need_dres else dy.new_empty((0,))
    if run.g.N == 0 or not (need_x or need_dres):
        return dx, dres
    dp = dmean / run.g.L
    common = (run.g.C, run.g.L, *run.g.strides, run.g.row_bytes)
    flags = dict(OUT_RELU=out_relu, NEED_DX=need_x, NEED_DRES=need_dres, **run.flags(), num_warps=run.tile_warps)
    mask_arg = mask if out_relu else dy
    dx_arg = dx if need_x else dy
    dres_arg = dres if need_dres else dy
    with launch._on_device(dy):
        if mx is None:
            kernels.se_grad_input_kernel[run.tiles_grid](dy, mask_arg, dx_arg, dres_arg, gates, dp, *common, **flags)
        else:
            dm = torch.where(ties > 0, dmax / ties, torch.zeros_like(dmax))
            kernels.ca_grad_input_max_kernel[run.tiles_grid](dy, mask_arg, dx_arg, dres_arg, gates, dp, x, mx, dm,
                                                             *common, **flags)
    return dx, dres
