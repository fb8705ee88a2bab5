"""Launch plans for the Triton kernels: which plan (fused, split or streamed), tile sizes, grids.

The inputs come in the kernel layout (se_kernels.ops.as_kernel_layout / like_layout): x,
residual and grad_y NCHW- or channels_last-contiguous with equal strides.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import ops
from . import kernels
from .kernels import ACTIVATION_CODES, GATE_CODES  # the ACT and GATE constexprs of the kernels

# Largest (C, H*W) slice (padded to powers of two) one program holds in registers: the fused
# plans read x (forward) or dy and x (backward) once. Larger slices take the split plan.
# 16384 forward spilled on sm_80 and sm_90 (255 registers, 88-168 B of spill stores at 256 x 64,
# 8 warps; benchmarks/triton_aot.py).
FUSED_FORWARD_ELEMENTS = 8192
FUSED_BACKWARD_ELEMENTS = 8192
TILE_ELEMENTS = 4096  # tile of the split plan's elementwise and reduction kernels
MLP_TILE_ELEMENTS = 8192  # [BLOCK_S, BLOCK_C] weight tiles of the fused plans' per-sample MLP
MLP_BLOCK_N = 8  # samples per program of the split plans' MLP GEMMs (each weight read N / 8 times)
MLP_PRODUCT_ELEMENTS = 4096  # [BLOCK_N, BLOCK_x, chunk] products of those GEMMs
# per step of those GEMMs: chunks of the inner dimension (kernels.py: 1, 2 or 4) and elements of the
# pixel-split partials ([BLOCK_N, splits, chunks]) one load takes. The split kernels keep one chunk a
# step (4 spilled 16 B in float32 se_hidden_kernel, sm_90); the streamed kernels take 4 (forward) / 2
# (backward) chunks and 4096 / 2048 partials' elements (4 chunks and 8192 spilled 4-44 B in 15
# variants, sm_80; 4 chunks and 2048 in the backward, 4-12 B in 3)
MLP_UNROLL, MLP_SPLIT_ELEMENTS = 1, 1024
STREAM_MLP_UNROLL, STREAM_SPLIT_ELEMENTS = (4, 2), (4096, 2048)
WGRAD_CHUNK = 32  # samples one weight-gradient program sums in series (more: chunks, added after)
# samples a step of se_weight_grads_kernel (float32 accumulators: FMA tl.dots over the step's samples,
# whose blocks are then at least 16 long; float64: 4 samples' loads together, then added in order).
# float32 blocks of 64 x 32 (C x S), as the outer products': 204-253 registers (8 warps/SM, one
# program, as before). Smaller blocks do not pay: 32 x 16 took 128-170 (still one program per SM on
# sm_80 and on some sm_90 variants) for 4x the programs; held to 128 registers (maxnreg), 64 x 32
# spilled 388-552 B, 32 x 32 8-28 B and 32 x 16 8 B
WGRAD_STEP, WGRAD_STEP_F64 = 16, 4
SUM_BLOCK = 1024  # elements per program of se_sum_chunks_kernel
STREAM_MIN_LAG, STREAM_MAX_GROUP = 3, 8  # csrc/cuda/se_stream.h kMinLag, kMaxGroup
STREAM_BUDGET_ENV = "SE_KERNELS_STREAM_BUDGET"  # bytes of L2 the streamed plans count on (0: never stream)
STREAM_PROGRAMS_PER_SM = 1  # persistent programs of the streamed plan per multiprocessor
# bytes one tile of the streamed plan loads (x; backward dy and x): a program (16 warps, one per
# SM) has one tile's loads in flight, and the HBM latency needs about 26 KiB per SM
# (benchmarks/gpu_model.py). Where rows allow no 8-byte accesses (Plan._stream), at most
# STREAM_TILE_ELEMENTS (forward) or TILE_ELEMENTS (backward) elements.
STREAM_TILE_BYTES = 32768
STREAM_TILE_ELEMENTS = 8192
# flat tiles (Plan._stream: NCHW rows of at most STREAM_FLAT_MAX_L pixels with no 8-byte accesses):
# STREAM_FLAT_ELEMENTS of x (backward: of dy and of x), padding included; twice that for 2-byte
# types in the forward without the relu mask (32 KiB of x, as float32's). 16-byte accesses, one
# address a vector: the element-by-element tiles took half as many elements. Larger ones spilled
# (sm_90): 256 x 64 in the backward (bfloat16, 124 B) and in the forward with the mask (float32
# 132 B, bfloat16 64 B). The gathers stage a tile in shared memory: at most 32 KiB (float32
# 8192 elements; bfloat16 16384, gathered as bfloat16)
STREAM_FLAT_ELEMENTS = 8192
STREAM_FLAT_MAX_L = 128


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


class Geometry:
    """Sizes, strides and block shapes of one call."""

    def __init__(self, x: torch.Tensor, squeeze: int, out_relu: bool):
        n, c, h, w = x.shape
        self.N, self.C, self.S, self.L = n, c, squeeze, h * w
        self.pixel_rows = ops.uses_pixel_rows(x)
        # (N, C, L) element strides from the layout rule, never from x.stride(): PyTorch calls a
        # tensor contiguous (or channels_last) whatever the strides of its size-1 dimensions are,
        # e.g. a (N, L, C) sequence viewed as (N, C, L, 1) has any stride(3). The memory is dense
        # in the canonical order all the same, and so is every tensor allocated like x.
        self.strides = (self.C * self.L, 1, self.C) if self.pixel_rows else (self.C * self.L, self.L, 1)
        row_len = self.C if self.pixel_rows else self.L
        self.row_bytes = (row_len + 7) // 8
        self.out_relu = out_relu
        self.acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        # the mask packs 8 bits along the row axis: that axis' block is at least 8
        self.min_c = 8 if (out_relu and self.pixel_rows) else 1
        self.min_l = 8 if (out_relu and not self.pixel_rows) else 1
        self.block_c_all = max(_pow2(self.C), self.min_c)
        self.block_l_all = max(_pow2(self.L), self.min_l)
        self.block_s = max(1, min(_pow2(self.S), MLP_TILE_ELEMENTS // self.block_c_all))
        # offsets within one sample need int64 (the kernels' WIDE flag)
        self.wide = self.C * self.L >= 2**31

    def fused(self, limit: int) -> bool:
        return self.block_c_all * self.block_l_all <= limit

    def tile(self, elements: int = TILE_ELEMENTS):
        """(BLOCK_C, BLOCK_L) of the split plan (the streamed plan: `elements`): the contiguous
        axis innermost and long."""
        if self.pixel_rows:
            block_c = max(min(_pow2(self.C), 128), self.min_c)
            block_l = max(elements // block_c, self.min_l)
        else:
            block_l = max(min(_pow2(self.L), 128), self.min_l)
            block_c = max(elements // block_l, self.min_c)
        return min(block_c, max(_pow2(self.C), self.min_c)), min(block_l, max(_pow2(self.L), self.min_l))

    def splits(self, block_c: int, block_l: int, sm_count: int):
        """How many programs share each (sample, channel block)'s pixels, and the pixels each
        takes (a multiple of block_l): enough programs to fill the GPU (4 per SM; sm_count 0:
        no split, the interpreter)."""
        l_blocks = triton.cdiv(self.L, block_l)
        target = 4 * sm_count
        programs = self.N * triton.cdiv(self.C, block_c)
        splits = max(1, min(l_blocks, triton.cdiv(target, max(programs, 1))))
        per_split = triton.cdiv(l_blocks, splits) * block_l
        return triton.cdiv(self.L, per_split), per_split


def stream_schedule(n: int, kept: int, budget: int, pool_per_sample: int, first: int, second: int,
                    apply_per_sample: int, per_apply_item: int = 1, per_pool_item: int = 1) -> Optional[dict]:
    """The streamed plans' schedule (csrc/cuda/se_stream.h make_schedule, which
    tests/test_cuda_stream.py compiles for the host and compares with this): groups of `group`
    samples, each stage's items per group, the rounds' lags; None where the plan does not apply
    (fewer than two groups, or fewer than STREAM_MIN_LAG + 1 samples' kept bytes fit the budget).
    kept: the bytes per sample kept in L2 from the first read to the re-read; apply_per_sample:
    element-wise tiles per sample, per_apply_item of them an item; pool_per_sample: channel-sum
    units per sample, per_pool_item of them an item (CUDA flat tiles: 8 warps' tiles)."""
    if n < 2 or kept <= 0:
        return None
    fit = budget // kept
    if fit < STREAM_MIN_LAG + 1:
        return None
    group = min(STREAM_MAX_GROUP, max(1, fit // (2 * STREAM_MIN_LAG + 2)))
    groups = triton.cdiv(n, group)
    if groups < 2:
        return None
    lag = min(fit // group - 1, groups)
    lag1 = max(1, lag // 3)
    per = [triton.cdiv(group * pool_per_sample, per_pool_item), first, second,
           triton.cdiv(group * apply_per_sample, per_apply_item)]
    return dict(group=group, groups=groups, per=per, lag=[0, lag1, max(lag1, 2 * lag // 3), lag],
                items=(groups + lag) * sum(per))


def stream_budget(device: torch.device) -> int:
    """The L2 bytes the streamed plan counts on: SE_KERNELS_STREAM_BUDGET if set (0: never
    stream; the interpreter streams only then), else half the GPU's L2 (what both L2 partitions
    touch may be held twice)."""
    env = os.environ.get(STREAM_BUDGET_ENV)
    if env is not None:
        if not env.isdigit():
            raise ValueError(f"se_kernels: {STREAM_BUDGET_ENV} must be a byte count >= 0; got {env!r}")
        return int(env)
    if device.type != "cuda" or not torch.cuda.is_available():  # fake CUDA tensors without a GPU: no L2 to size
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _L2_BUDGET:
        _L2_BUDGET[index] = torch.cuda.get_device_properties(index).L2_cache_size // 2
    return _L2_BUDGET[index]


_L2_BUDGET: dict = {}


# CUDA grids: x up to 2^31 - 1 programs, y and z up to 65535. Every grid here is 1-D, its size
# a product of the problem's sizes, so only x grows with N, C, S or H*W.
GRID_X_MAX = 2**31 - 1


def _least_padded(g: Geometry, elements: int, block_c: int, block_l: int):
    """The (BLOCK_C, BLOCK_L) of at most `elements` elements, the row axis at least 128 long,
    whose tiles pad one sample least (a tile holds only as many loads as it has valid elements:
    C = 96 in 64-channel blocks is 75% valid, in 32-channel blocks 100%); ties: the larger
    tile, then the given one."""
    row_len, other_len = (g.C, g.L) if g.pixel_rows else (g.L, g.C)
    row_min, other_min = (g.min_c, g.min_l) if g.pixel_rows else (g.min_l, g.min_c)
    given = (block_c, block_l) if g.pixel_rows else (block_l, block_c)

    def score(shape):
        r, o = shape
        padded = triton.cdiv(row_len, r) * r * triton.cdiv(other_len, o) * o
        return (row_len * other_len / padded, r * o, shape == given)
    shapes = [given]
    r = 128
    while r <= max(_pow2(row_len), row_min):
        o = min(max(elements // r, other_min), max(_pow2(other_len), other_min))
        if r * o <= elements:
            shapes.append((r, o))
        r *= 2
    best = max(shapes, key=score)
    return (best[0], best[1]) if g.pixel_rows else (best[1], best[0])


class Plan:
    """The launch plan of one call: fused or split, the split plan's tile and pixel splits, and
    every kernel's grid (name -> 1-D grid). Shapes only: it runs on meta tensors too, which is
    how tests/test_triton.py checks the grid limits for sizes no test could allocate."""

    def __init__(self, g: Geometry, backward: bool, sm_count: int, budget: int = 0, elem: int = 4,
                 tensors: int = 0):
        self.fused = g.fused(FUSED_BACKWARD_ELEMENTS if backward else FUSED_FORWARD_ELEMENTS)
        self.block_c, self.block_l = g.tile()
        self.splits, self.per_split = g.splits(self.block_c, self.block_l, sm_count)
        c_blocks = triton.cdiv(g.C, self.block_c)
        # the split plan's MLP: two GEMMs over blocks of MLP_BLOCK_N samples, one program per
        # (sample block, S block) then per (sample block, C block); [BLOCK_N, x, y] products of
        # MLP_PRODUCT_ELEMENTS reduced along the inner dimension
        self.mlp_block_n = min(_pow2(g.N), MLP_BLOCK_N)
        # at least 8 hidden units a block (S = 4 padded): [8, 4, 64] products spilled 4-8 B at 40
        # registers (sm_80 with 4 warps, sm_90 with 8)
        self.mlp_block_s = min(max(_pow2(g.S), 8), 16)
        self.mlp_chunk_c = max(1, min(_pow2(g.C), MLP_PRODUCT_ELEMENTS // (self.mlp_block_n * self.mlp_block_s)))
        self.mlp_block_c = min(_pow2(g.C), 32)
        self.mlp_chunk_s = max(1, min(_pow2(g.S), MLP_PRODUCT_ELEMENTS // (self.mlp_block_n * self.mlp_block_c)))
        # per step, MLP_UNROLL chunks (fewer where the inner dimension is shorter), each operand's in
        # one load; the pixel splits' partial sums SPLIT_BLOCK at a time (kernels.py _hidden_body)
        self.mlp_unroll_c, self.mlp_unroll_s = self._unrolls(g, MLP_UNROLL)
        self.mlp_split_block = self._split_block(self.splits, self.mlp_unroll_c, MLP_SPLIT_ELEMENTS)
        # warps of the two GEMMs: 8 for full 4096-element products, 4 for smaller ones (small C or
        # N); either way at most 16 product elements a thread
        self.mlp_warps = tuple(_warps(self.mlp_block_n * a * b) for a, b in
                               ((self.mlp_block_s, self.mlp_chunk_c), (self.mlp_block_c, self.mlp_chunk_s)))
        # float32: tl.dot's operands are at least 16 x 16; float64: the outer products' blocks (S 64
        # with 4 samples a step: 255 registers, spilled 12 B, sm_80)
        f64 = g.acc == tl.float64
        self.wgrad_step = WGRAD_STEP_F64 if f64 else WGRAD_STEP
        least = 1 if f64 else 16
        self.wgrad_block_c = max(min(_pow2(g.C), 64), least)
        self.wgrad_block_s = max(min(_pow2(g.S), 32), least)
        # the weight gradients sum the batch in chunks, one set of programs per chunk (more programs
        # in flight, fewer samples in series each): of at least WGRAD_CHUNK samples, and no more
        # chunks than give each multiprocessor one program (every further chunk's partials are
        # written and added again: at 256 x 2048 x 7 x 7, 8 chunks moved 34 MB of partials through
        # L2, about half of the kernel's traffic in benchmarks/gpu_model.py). sm_count 0 (the
        # interpreter): chunks of WGRAD_CHUNK
        self.wgrad_chunks = triton.cdiv(g.N, WGRAD_CHUNK)
        if sm_count:
            tiles = triton.cdiv(g.C, self.wgrad_block_c) * triton.cdiv(g.S, self.wgrad_block_s)
            self.wgrad_chunks = max(1, min(self.wgrad_chunks, triton.cdiv(sm_count, tiles)))
        self.wgrad_per_chunk = triton.cdiv(g.N, self.wgrad_chunks) if g.N else 1
        # the streamed plan (budget > 0; elem: bytes per element; tensors: the x-sized tensors the op
        # reads and writes): where the split plan's re-read would miss L2
        self.stream = None if self.fused else self._stream(g, backward, budget, elem, tensors)
        if self.fused:
            self.grids = {("se_backward_fused_kernel" if backward else "se_forward_fused_kernel"): (g.N,)}
        elif self.stream is not None:
            name = "se_streamed_backward_kernel" if backward else "se_streamed_forward_kernel"
            self.grids = {name: (min(self.stream["items"], STREAM_PROGRAMS_PER_SM * max(sm_count, 1)),)}
        else:
            self.grids = {
                "channel_sums_kernel": (g.N * c_blocks * self.splits,),
                **self._mlp_grids(g, backward),
                ("se_grad_input_kernel" if backward else "se_scale_kernel"):
                    (g.N * c_blocks * triton.cdiv(g.L, self.block_l),),
            }
        if backward:
            self.grids["se_weight_grads_kernel"] = (
                triton.cdiv(g.C, self.wgrad_block_c) * triton.cdiv(g.S, self.wgrad_block_s) * self.wgrad_chunks,)
            if self.wgrad_chunks > 1 and self.stream is None:  # streamed: the last program of a tile adds them
                self.grids["se_sum_chunks_kernel"] = (triton.cdiv(2 * g.S * g.C + g.S + g.C, SUM_BLOCK),)
        for name, grid in self.grids.items():
            if grid[0] > GRID_X_MAX:
                raise ValueError(f"se_kernels: {name} would need {grid[0]} programs, over CUDA's grid limit")

    def _unrolls(self, g: Geometry, most: int) -> Tuple[int, int]:
        """Chunks a step of the GEMMs over C and over S: `most`, fewer where C or S is shorter."""
        return (min(most, _pow2(triton.cdiv(g.C, self.mlp_chunk_c))),
                min(most, _pow2(triton.cdiv(g.S, self.mlp_chunk_s))))

    def _split_block(self, splits: int, unroll_c: int, elements: int) -> int:
        """Pixel splits of the partial sums per load in the first GEMM (a power of two)."""
        return max(1, min(_pow2(splits), elements // (self.mlp_block_n * unroll_c * self.mlp_chunk_c)))

    def _stream(self, g: Geometry, backward: bool, budget: int, elem: int, tensors: int) -> Optional[dict]:
        """The streamed schedule, or None: each channel-sum and element-wise item one tile, the
        MLP items the split plan's programs over the group's samples (at most mlp_block_n). Kept in
        L2 per sample: x (dy) and the mask; touched by the split plan: every tensor and the mask."""
        mask = (g.L if g.pixel_rows else g.C) * g.row_bytes if g.out_relu else 0  # one sample's
        x = g.C * g.L * elem
        if budget <= 0 or g.N * (tensors * x + mask) <= budget:
            return None
        elements = STREAM_TILE_BYTES // ((2 if backward else 1) * elem)
        row = g.C if g.pixel_rows else g.L
        # rows of no multiple of 16 elements: Triton cannot prove their alignment itself (its
        # divisibility hint is 16); the kernels are told the power of two that divides the row
        # length (ALIGN; see _tile_offsets_at). Where the flat tiles below do not apply, accesses
        # under 8 bytes (element by element, an address each) take the smaller tile: the full one
        # spilled there (7x7, sm_90, 20-100 B); with 8-byte accesses (bfloat16 14x14) it does not
        align = 16 if row % 16 == 0 else row & -row
        self.stream_align = align if 1 < align < 16 else 0  # 0: no hint (16: Triton's own)
        # short NCHW rows of no 8-byte accesses (7x7): flat tiles (kernels.py _flat_tile) of whole
        # rows, where C is a multiple of 16 bytes' elements (each tile's run starts on 16 bytes)
        vec = 16 // elem
        self.stream_flat = (0, 0, 0, 0, 1)
        if align * elem < 8 and not g.pixel_rows and g.L <= STREAM_FLAT_MAX_L and g.C % vec == 0 and not g.wide:
            # a vector of block_c * block_l elements, holding as many whole rows as fit (a multiple
            # of vec, at most C)
            block_l = max(_pow2(g.L), g.min_l)
            flat = STREAM_FLAT_ELEMENTS * (2 if elem == 2 and not backward else 1)
            # with the relu mask, the doubled vector's scale goes in two halves of whole 16-byte
            # vectors (kernels.py _flat_scale_body): its rows a multiple of 2 * vec, else no doubling
            parts = 2 if flat > STREAM_FLAT_ELEMENTS and g.out_relu else 1
            if parts == 2 and min(flat // g.L // (2 * vec) * (2 * vec), g.C) % (2 * vec):
                flat, parts = STREAM_FLAT_ELEMENTS, 1
            block_c = min(flat // block_l, max(_pow2(g.C), g.min_c))
            rows = min(block_c * block_l // g.L // (parts * vec) * (parts * vec), g.C)
            self.stream_flat = (g.L, vec, rows, _pow2(rows), parts)
        else:
            if align * elem < 8:
                elements = min(elements, TILE_ELEMENTS if backward else STREAM_TILE_ELEMENTS)
            block_c, block_l = g.tile(elements)
            if (block_c if g.pixel_rows else block_l) < 128:  # short rows: a 128 x 64 float32 tile spilled (sm_90)
                block_c, block_l = g.tile(min(elements, TILE_ELEMENTS))
            else:  # long rows: the tile of `elements` (or fewer) that pads the sample least
                block_c, block_l = _least_padded(g, elements, block_c, block_l)
        self.stream_block_c, self.stream_block_l = block_c, block_l
        self.stream_unroll_c, self.stream_unroll_s = self._unrolls(g, STREAM_MLP_UNROLL[backward])
        self.stream_split_block = self._split_block(triton.cdiv(g.L, block_l), self.stream_unroll_c,
                                                    STREAM_SPLIT_ELEMENTS[backward])
        rows = self.stream_flat[2] or self.stream_block_c  # channels of a tile
        tiles = triton.cdiv(g.C, rows) * triton.cdiv(g.L, self.stream_block_l)
        sched = stream_schedule(g.N, x + mask, budget, tiles, triton.cdiv(g.S, self.mlp_block_s),
                                triton.cdiv(g.C, self.mlp_block_c), tiles)
        if sched is None or sched["group"] > self.mlp_block_n:
            return None
        # the kernels number items, tiles and channel-sum programs in int32
        if max(sched["items"], g.N * tiles, 3 * sched["groups"] + 1) >= 2**31:
            return None
        return sched

    def _mlp_grids(self, g: Geometry, backward: bool) -> dict:
        """The split plan's MLP: two GEMMs over sample blocks, one program per (sample block, S
        block), then per (sample block, C block)."""
        n_blocks = triton.cdiv(g.N, self.mlp_block_n)
        first, second = ("se_dz1_kernel", "se_dp_kernel") if backward else ("se_hidden_kernel", "se_logits_kernel")
        return {first: (n_blocks * triton.cdiv(g.S, self.mlp_block_s),),
                second: (n_blocks * triton.cdiv(g.C, self.mlp_block_c),)}


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (cached: the query costs microseconds a call); 0
    for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _warps(elements: int) -> int:
    """8 warps from 4096-element tiles on: 4 warps (32 elements a thread) spilled in the scale
    kernel with the residual + relu epilogue in channels_last (sm_90, 72 registers, 8 B stack)."""
    return 8 if elements >= 4096 else 4


def _sums_warps(dot: bool) -> int:
    """Warps of channel_sums_kernel on the split plan's 4096-element tiles: every variant at most
    128 registers (16 resident warps/SM or more) and no spills, on sm_80 and sm_90
    (benchmarks/results/triton_resources.md). The dot sums (backward: dy' * x) take 8 warps, 16
    elements a thread: with 4 warps, x, dy, the unpacked relu-mask bits and the [BLOCK_C, BLOCK_L]
    accumulator took up to 217 registers (8 resident warps/SM); with 8, at most 126. The plain
    sums (forward) keep 4 warps, at most 128 registers: with 8 warps (or 4 on a 2048-element
    tile) the float32 NCHW ones spill 4 B at 48 registers on sm_90."""
    return 8 if dot else 4


def _channel_sums(g: Geometry, plan: Plan, x, dy, mask_arg, dot: bool, dtype: torch.dtype):
    """The split plans' first pass: partial (N, splits, C) pixel sums of x (dot: of dy' * x,
    dy' = dy masked by the relu mask)."""
    partial = torch.empty((g.N, plan.splits, g.C), device=x.device, dtype=dtype)
    _k(kernels.channel_sums_kernel)[plan.grids["channel_sums_kernel"]](
        x, dy, mask_arg, partial, g.C, g.L, *g.strides, g.row_bytes, plan.per_split, plan.splits,
        DOT=dot, OUT_RELU=dot and g.out_relu, PIXEL_ROWS=g.pixel_rows, ACC=g.acc, BLOCK_C=plan.block_c,
        BLOCK_L=plan.block_l, WIDE=g.wide, num_warps=_sums_warps(dot),
    )
    return partial


# The streamed kernels: one program of 16 warps per SM (at most 128 registers a thread). With 8
# warps a program, ptxas gave some variants 80 or 128 registers and spilled (sm_80, sm_90); with
# 8 warps and maxnreg=128 more of them spilled.
STREAM_WARPS = 16
STREAM_MAX_REGISTERS = 128  # all a 512-thread program can have; ptxas chose 64 and spilled (sm_80) without it


# (device, stream) -> the int64 counters of the streamed launches there, zero between launches
_COUNTERS: dict = {}


def _stream_counters(x: torch.Tensor, n: int) -> torch.Tensor:
    """n int64 counters, zero, for a streamed launch on x's device and its current stream. Each
    launch leaves its counters zero again (kernels.py _stream_finish; the weight gradients' last
    program of each tile), so one buffer per (device, stream) serves every launch there, in stream
    order, without a fill kernel before each; a larger launch replaces it (the old one is freed in
    stream order). A fresh torch.zeros where the buffer cannot be kept: traced calls (torch.compile,
    torch.export: fake or functional tensors) and CUDA graph capture (the fill is then part of the
    graph)."""
    traced = type(x) is not torch.Tensor or torch.compiler.is_compiling()
    if traced or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(n, device=x.device, dtype=torch.int64)
    key = (x.device, torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < n:
        buffer = _COUNTERS[key] = torch.zeros(max(n, 1024), device=x.device, dtype=torch.int64)
    return buffer


def _stream_buffers(g: Geometry, plan: Plan, x: torch.Tensor, acc_dtype: torch.dtype, wgrad: bool = False):
    """(pixel splits, the (N, splits, C) partial sums, the counters) of a streamed launch: one split
    per pixel block of the tile; 3 counters per group, the claim counter, the exit counter, then
    (wgrad, several weight-gradient chunks) one per weight-gradient (C block, S block)."""
    splits = triton.cdiv(g.L, plan.stream_block_l)
    partial = torch.empty((g.N, splits, g.C), device=x.device, dtype=acc_dtype)
    tiles = plan.grids["se_weight_grads_kernel"][0] // plan.wgrad_chunks if wgrad and plan.wgrad_chunks > 1 else 0
    return splits, partial, _stream_counters(x, 3 * plan.stream["groups"] + 2 + tiles)


def _stream_args(st: dict) -> tuple:
    """GROUP, GROUPS, P0..P3, LAG1..LAG3 of the streamed kernels."""
    return (st["group"], st["groups"], *st["per"], *st["lag"][1:])


def _stream_blocks(g: Geometry, plan: Plan) -> dict:
    """The streamed kernels' tile constexprs: their own tile (STREAM_TILE_BYTES), the split plan's
    MLP blocks."""
    return dict(BLOCK_C=plan.stream_block_c, BLOCK_L=plan.stream_block_l, WIDE=g.wide, ALIGN=plan.stream_align,
                FLAT_L=plan.stream_flat[0], FLAT_VEC=plan.stream_flat[1], FLAT_ROWS=plan.stream_flat[2],
                FLAT_BLOCK_R=plan.stream_flat[3],
                MLP_BLOCK_N=plan.mlp_block_n,
                MLP_BLOCK_S=plan.mlp_block_s, MLP_CHUNK_C=plan.mlp_chunk_c, MLP_BLOCK_C=plan.mlp_block_c,
                MLP_CHUNK_S=plan.mlp_chunk_s, MLP_UNROLL_C=plan.stream_unroll_c, MLP_UNROLL_S=plan.stream_unroll_s,
                MLP_SPLIT_BLOCK=plan.stream_split_block)


# Set by se_kernels/triton/op.py: launch through torch.library.wrap_triton (the ops are
# triton_ops, traced by torch.compile) or call the kernels directly (custom ops, interpreter).
WRAP_TRITON = False


def _k(kernel):
    return torch.library.wrap_triton(kernel) if WRAP_TRITON else kernel


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device and its current stream: make x's current
    (only where there is another device to be on; tracing on fake CUDA tensors needs no GPU)."""
    if x.is_cuda and torch.cuda.device_count() > 1:
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def forward(x, w1, b1, w2, b2, residual, activation: str, gate: str, out_activation: Optional[str]):
    """(y, pooled, hidden, gate_logits, relu_mask): se_kernels::se_forward's contract."""
    out_relu = out_activation == "relu"
    y, pooled, hidden, logits, mask = ops.forward_fake(x, w1, b1, w2, b2, residual, activation, gate,
                                                       out_activation)
    g = Geometry(x, w1.shape[0], out_relu)
    if g.N == 0:
        return y, pooled, hidden, logits, mask
    plan = Plan(g, backward=False, sm_count=sm_count(x.device), budget=stream_budget(x.device),
                elem=x.element_size(), tensors=2 + (residual is not None))
    w1, w2 = w1.contiguous(), w2.contiguous()
    flags = dict(
        HAS_RES=residual is not None, OUT_RELU=out_relu, PIXEL_ROWS=g.pixel_rows, ACC=g.acc,
    )
    mlp = dict(ACT=ACTIVATION_CODES[activation], GATE=GATE_CODES[gate], HAS_B1=b1 is not None,
               HAS_B2=b2 is not None)
    res = residual if residual is not None else x
    mask_arg = mask if out_relu else y
    b1_arg = b1 if b1 is not None else w1
    b2_arg = b2 if b2 is not None else w2
    with _on_device(x):
        if plan.fused:
            _k(kernels.se_forward_fused_kernel)[plan.grids["se_forward_fused_kernel"]](
                x, res, y, mask_arg, w1, b1_arg, w2, b2_arg, pooled, hidden, logits,
                g.C, g.S, g.L, *g.strides, g.row_bytes,
                **mlp, **flags, BLOCK_C=g.block_c_all, BLOCK_L=g.block_l_all, BLOCK_S=g.block_s,
                num_warps=_warps(g.block_c_all * g.block_l_all),
            )
            return y, pooled, hidden, logits, mask
        if plan.stream is not None:
            splits, partial, counters = _stream_buffers(g, plan, x, pooled.dtype)
            _k(kernels.se_streamed_forward_kernel)[plan.grids["se_streamed_forward_kernel"]](
                x, res, y, mask_arg, w1, b1_arg, w2, b2_arg, partial, pooled, hidden, logits,
                torch.empty_like(pooled), counters, g.N, g.C, g.S, g.L, *g.strides, g.row_bytes, splits,
                *_stream_args(plan.stream), **mlp, **flags, **_stream_blocks(g, plan),
                FLAT_PARTS=plan.stream_flat[4], num_warps=STREAM_WARPS,
                maxnreg=STREAM_MAX_REGISTERS,
            )
            return y, pooled, hidden, logits, mask
        partial = _channel_sums(g, plan, x, x, mask_arg, dot=False, dtype=pooled.dtype)
        gates = torch.empty_like(pooled)
        _k(kernels.se_hidden_kernel)[plan.grids["se_hidden_kernel"]](
            partial, w1, b1_arg, pooled, hidden, g.N, g.C, g.S, g.L, plan.splits,
            HAS_B1=b1 is not None, ACC=g.acc, BLOCK_N=plan.mlp_block_n, BLOCK_S=plan.mlp_block_s,
            BLOCK_C=plan.mlp_chunk_c, UNROLL=plan.mlp_unroll_c, SPLIT_BLOCK=plan.mlp_split_block,
            num_warps=plan.mlp_warps[0],
        )
        _k(kernels.se_logits_kernel)[plan.grids["se_logits_kernel"]](
            hidden, w2, b2_arg, logits, gates, g.N, g.C, g.S,
            ACT=ACTIVATION_CODES[activation], GATE=GATE_CODES[gate], HAS_B2=b2 is not None, ACC=g.acc,
            BLOCK_N=plan.mlp_block_n, BLOCK_C=plan.mlp_block_c, BLOCK_S=plan.mlp_chunk_s, UNROLL=plan.mlp_unroll_s,
            num_warps=plan.mlp_warps[1],
        )
        _k(kernels.se_scale_kernel)[plan.grids["se_scale_kernel"]](
            x, res, y, mask_arg, gates, g.C, g.L, *g.strides, g.row_bytes,
            **flags, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, WIDE=g.wide,
            num_warps=_warps(plan.block_c * plan.block_l),
        )
    return y, pooled, hidden, logits, mask


def backward(grad_y, x, w1, w2, pooled, hidden, gate_logits, relu_mask, activation: str, gate: str,
             out_activation: Optional[str], need_grad_x: bool, need_grad_residual: bool):
    """(grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_residual): se_backward's contract."""
    out_relu = out_activation == "relu"
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_residual = ops.backward_fake(
        grad_y, x, w1, w2, pooled, hidden, gate_logits, relu_mask, activation, gate, out_activation,
        need_grad_x, need_grad_residual,
    )
    g = Geometry(x, w1.shape[0], out_relu)
    if g.N == 0:
        for t in (grad_w1, grad_b1, grad_w2, grad_b2):
            t.zero_()
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_residual
    need_dres = need_grad_residual and out_relu
    # the streamed plan only where an element-wise pass runs (dx or d_residual wanted)
    plan = Plan(g, backward=True, sm_count=sm_count(x.device),
                budget=stream_budget(x.device) if need_grad_x or need_dres else 0,
                elem=x.element_size(), tensors=2 + need_grad_x + need_dres)
    w1, w2 = w1.contiguous(), w2.contiguous()
    dz1 = torch.empty_like(hidden)
    dz2 = torch.empty_like(pooled)
    mask_arg = relu_mask if out_relu else grad_y
    dx_arg = grad_x if need_grad_x else grad_y
    dres_arg = grad_residual if need_dres else grad_y
    act = ACTIVATION_CODES[activation]
    with _on_device(x):
        if plan.fused:
            _k(kernels.se_backward_fused_kernel)[plan.grids["se_backward_fused_kernel"]](
                grad_y, x, mask_arg, dx_arg, dres_arg, w1, w2, hidden, gate_logits, dz1, dz2,
                g.C, g.S, g.L, *g.strides, g.row_bytes,
                ACT=act, GATE=GATE_CODES[gate], OUT_RELU=out_relu, NEED_DX=need_grad_x, NEED_DRES=need_dres,
                PIXEL_ROWS=g.pixel_rows, ACC=g.acc, BLOCK_C=g.block_c_all, BLOCK_L=g.block_l_all,
                BLOCK_S=g.block_s, num_warps=_warps(2 * g.block_c_all * g.block_l_all),
            )
        elif plan.stream is not None:
            splits, partial, counters = _stream_buffers(g, plan, x, pooled.dtype, wgrad=True)
            _k(kernels.se_streamed_backward_kernel)[plan.grids["se_streamed_backward_kernel"]](
                grad_y, x, mask_arg, dx_arg, dres_arg, w1, w2, hidden, gate_logits, partial, dz1, dz2,
                torch.empty_like(pooled), torch.empty_like(pooled), counters, g.N, g.C, g.S, g.L, *g.strides,
                g.row_bytes, splits, *_stream_args(plan.stream),
                ACT=act, GATE=GATE_CODES[gate], OUT_RELU=out_relu, NEED_DX=need_grad_x, NEED_DRES=need_dres,
                PIXEL_ROWS=g.pixel_rows, ACC=g.acc, **_stream_blocks(g, plan), num_warps=STREAM_WARPS,
                maxnreg=STREAM_MAX_REGISTERS,
            )
        else:
            partial = _channel_sums(g, plan, x, grad_y, mask_arg, dot=True, dtype=pooled.dtype)
            gates = torch.empty_like(pooled)
            dp = torch.empty_like(pooled)
            _k(kernels.se_dz1_kernel)[plan.grids["se_dz1_kernel"]](
                partial, w2, hidden, gate_logits, dz1, dz2, gates, g.N, g.C, g.S, plan.splits,
                ACT=act, GATE=GATE_CODES[gate], ACC=g.acc, BLOCK_N=plan.mlp_block_n, BLOCK_S=plan.mlp_block_s,
                BLOCK_C=plan.mlp_chunk_c, UNROLL=plan.mlp_unroll_c, SPLIT_BLOCK=plan.mlp_split_block,
                num_warps=plan.mlp_warps[0],
            )
            _k(kernels.se_dp_kernel)[plan.grids["se_dp_kernel"]](
                dz1, w1, dp, g.N, g.C, g.S, g.L,
                ACC=g.acc, BLOCK_N=plan.mlp_block_n, BLOCK_C=plan.mlp_block_c, BLOCK_S=plan.mlp_chunk_s,
                UNROLL=plan.mlp_unroll_s, num_warps=plan.mlp_warps[1],
            )
            if need_grad_x or need_dres:
                _k(kernels.se_grad_input_kernel)[plan.grids["se_grad_input_kernel"]](
                    grad_y, mask_arg, dx_arg, dres_arg, gates, dp, g.C, g.L, *g.strides, g.row_bytes,
                    OUT_RELU=out_relu, NEED_DX=need_grad_x, NEED_DRES=need_dres, PIXEL_ROWS=g.pixel_rows,
                    ACC=g.acc, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, WIDE=g.wide,
                    num_warps=_warps(plan.block_c * plan.block_l),
                )
        grads = (grad_w1, grad_b1, grad_w2, grad_b2)
        total = 2 * g.S * g.C + g.S + g.C
        if plan.wgrad_chunks == 1:
            outs, stride, offsets = grads, 0, (0, 0, 0)
        else:  # ACC partials, one row per chunk: [dW1 | db1 | dW2 | db2]
            wpartial = torch.empty((plan.wgrad_chunks, total), device=x.device, dtype=pooled.dtype)
            sc = g.S * g.C
            outs, stride, offsets = (wpartial,) * 4, total, (sc, sc + g.S, 2 * sc + g.S)
        # several chunks in the streamed plan: the last program of each tile adds them (its counters
        # follow the streamed kernel's); in the split plan se_sum_chunks_kernel does
        sum_here = plan.wgrad_chunks > 1 and plan.stream is not None
        done = counters if sum_here else dz1
        _k(kernels.se_weight_grads_kernel)[plan.grids["se_weight_grads_kernel"]](
            dz1, dz2, hidden, pooled, *outs, *grads, done, g.N, g.C, g.S, plan.wgrad_per_chunk, stride, *offsets,
            3 * plan.stream["groups"] + 2 if sum_here else 0,
            ACT=act, ACC=g.acc, BLOCK_C=plan.wgrad_block_c, BLOCK_S=plan.wgrad_block_s, SUM_HERE=sum_here,
            STEP=plan.wgrad_step, num_warps=8,
        )
        if plan.wgrad_chunks > 1 and not sum_here:
            _k(kernels.se_sum_chunks_kernel)[plan.grids["se_sum_chunks_kernel"]](
                wpartial, *grads, g.C, g.S, plan.wgrad_chunks, BLOCK=SUM_BLOCK, num_warps=4,
            )
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_residual
