"""Triton kernels of the fused SE op (forward and backward) and their building blocks.

x is read as (N, C, L = H*W) through strides (s_n, s_c, s_l), so NCHW (s_l = 1) and
channels_last (s_c = 1) run the same kernels; y, residual, grad_y, grad_x and grad_residual
have x's strides. The weights are contiguous: w1 (S, C), w2 (C, S). Float32 accumulation
(float64 for float64 inputs: the ACC constexpr).

Three plans (chosen in launch.py):
  * fused: one program per sample holds its whole (C, L) slice in registers: pool, MLP, scale
    (backward: gate gradient, MLP backward, grad_x) in one launch, x read once.
  * split: per-(sample, channel block, pixel split) partial sums, the MLP as two small GEMMs
    over blocks of samples (each weight read once per block; backward the same way), then a
    per-tile elementwise kernel; the reduction over pixels is spread over programs so a few
    large samples still fill the GPU.
  * streamed (batches whose split plan would re-read x from HBM): the split plan's stages per
    group of samples as the work items of one persistent kernel (se_streamed_*_kernel, at the
    end of this file), so that each group's x is re-read from L2.
The weight gradients are one more kernel that sums the batch in order, in chunks of samples whose
partials a last kernel adds in chunk order: deterministic, no atomics.

The relu epilogue's mask is one bit per element, bit i of a row at byte i // 8 (rows: the H*W
pixels of a channel for NCHW, the C channels of a pixel for channels_last; each row starts on a
byte): the same layout as the CPU kernels (csrc/se.cpp).
"""

import triton
import triton.language as tl

from ..reference import ACTIVATIONS, GATES

# ---- element-wise functions (NaN-propagating like PyTorch's) ------------------------------

# The ACT and GATE constexprs: an option's code is its index in se_kernels/reference.py's
# ACTIVATIONS / GATES (the order of csrc/se_options.h's Act and Gate, whose values the CUDA
# kernels take; tests/test_options.py checks that they agree). The functions below branch on the
# codes by name, and a code none of their branches takes fails at compile time (static_assert),
# so an option added to the reference without Triton code cannot run as another one.
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
GATE_CODES = {name: code for code, name in enumerate(GATES)}
RELU = tl.constexpr(ACTIVATION_CODES["relu"])
SILU = tl.constexpr(ACTIVATION_CODES["silu"])
GELU = tl.constexpr(ACTIVATION_CODES["gelu"])
HARDSWISH = tl.constexpr(ACTIVATION_CODES["hardswish"])
SIGMOID = tl.constexpr(GATE_CODES["sigmoid"])
HARDSIGMOID = tl.constexpr(GATE_CODES["hardsigmoid"])


@triton.jit
def _clamp(v, lo, hi):
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _activation(u, ACT: tl.constexpr):
    """act(u) for the activation with code ACT (ACTIVATION_CODES)."""
    if ACT == RELU:
        return tl.where(u < 0, 0.0, u)
    elif ACT == SILU:
        return u / (1.0 + tl.exp(-u))
    elif ACT == GELU:  # exact (erf) form
        return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    elif ACT == HARDSWISH:
        return u * _clamp(u + 3.0, 0.0, 6.0) / 6.0
    else:
        tl.static_assert(False, "se_kernels: ACT is no activation code (ACTIVATION_CODES)")


@triton.jit
def _activation_grad(u, ACT: tl.constexpr):
    """d act / du, as PyTorch's backward formulas (relu'(0) = 0, hardswish' = u/3 + 1/2 on [-3, 3])."""
    if ACT == RELU:
        return tl.where(u > 0, 1.0, 0.0)
    elif ACT == SILU:
        s = 1.0 / (1.0 + tl.exp(-u))
        return s * (1.0 + u * (1.0 - s))
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        return cdf + u * tl.exp(-0.5 * u * u) * 0.3989422804014327
    elif ACT == HARDSWISH:
        return tl.where(u <= -3.0, 0.0, tl.where(u < 3.0, u / 3.0 + 0.5, 1.0))
    else:
        tl.static_assert(False, "se_kernels: ACT is no activation code (ACTIVATION_CODES)")


@triton.jit
def _gate(u, GATE: tl.constexpr):
    """gate(u) for the gate with code GATE (GATE_CODES)."""
    if GATE == SIGMOID:
        return 1.0 / (1.0 + tl.exp(-u))
    elif GATE == HARDSIGMOID:
        return _clamp(u + 3.0, 0.0, 6.0) / 6.0
    else:
        tl.static_assert(False, "se_kernels: GATE is no gate code (GATE_CODES)")


@triton.jit
def _gate_grad(u, g, GATE: tl.constexpr):
    """d gate / du given g = gate(u) (hardsigmoid' = 1/6 on the open interval (-3, 3))."""
    if GATE == SIGMOID:
        return g * (1.0 - g)
    elif GATE == HARDSIGMOID:
        # divide in u's dtype: the literal 1.0 / 6.0 would be a float32 constant, 3e-8 off in float64
        return tl.where((u > -3.0) & (u < 3.0), 1.0, 0.0).to(u.dtype) / 6.0
    else:
        tl.static_assert(False, "se_kernels: GATE is no gate code (GATE_CODES)")


# ---- the relu mask -------------------------------------------------------------------------


@triton.jit
def _mask_offsets(n, c, l, C, L, row_bytes, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, PIXEL_ROWS: tl.constexpr):
    """Byte offsets of the tile's bits: [BLOCK_C, BLOCK_L // 8] (NCHW rows, bits along l) or
    [BLOCK_C // 8, BLOCK_L] (channels_last rows, bits along c). c and l start 8-aligned."""
    if PIXEL_ROWS:
        byte = tl.max(tl.reshape(c, (BLOCK_C // 8, 8)), axis=1) // 8
        return (n * L + l[None, :]) * row_bytes + byte[:, None]
    else:
        byte = tl.max(tl.reshape(l, (BLOCK_L // 8, 8)), axis=1) // 8
        return (n * C + c[:, None]) * row_bytes + byte[None, :]


@triton.jit
def _byte_valid(c, l, C, L, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, PIXEL_ROWS: tl.constexpr):
    """Which bytes of the tile exist (their row exists and they start inside it)."""
    if PIXEL_ROWS:
        first = tl.min(tl.reshape(c, (BLOCK_C // 8, 8)), axis=1)
        return (first[:, None] < C) & (l[None, :] < L)
    else:
        first = tl.min(tl.reshape(l, (BLOCK_L // 8, 8)), axis=1)
        return (c[:, None] < C) & (first[None, :] < L)


@triton.jit
def _store_mask(mask_ptr, positive, n, c, l, C, L, row_bytes,
                BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, PIXEL_ROWS: tl.constexpr):
    """Packs the [BLOCK_C, BLOCK_L] booleans `positive` into bits and stores them."""
    bits = positive.to(tl.int32)
    if PIXEL_ROWS:
        weights = (1 << tl.arange(0, 8))[None, :, None]
        packed = tl.sum(tl.reshape(bits, (BLOCK_C // 8, 8, BLOCK_L)) * weights, axis=1)
    else:
        weights = (1 << tl.arange(0, 8))[None, None, :]
        packed = tl.sum(tl.reshape(bits, (BLOCK_C, BLOCK_L // 8, 8)) * weights, axis=2)
    offsets = _mask_offsets(n, c, l, C, L, row_bytes, BLOCK_C, BLOCK_L, PIXEL_ROWS)
    valid = _byte_valid(c, l, C, L, BLOCK_C, BLOCK_L, PIXEL_ROWS)
    tl.store(mask_ptr + offsets, packed.to(tl.uint8), mask=valid)


@triton.jit
def _load_mask(mask_ptr, n, c, l, C, L, row_bytes,
               BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, PIXEL_ROWS: tl.constexpr):
    """The [BLOCK_C, BLOCK_L] booleans stored by _store_mask (False outside the tensor)."""
    offsets = _mask_offsets(n, c, l, C, L, row_bytes, BLOCK_C, BLOCK_L, PIXEL_ROWS)
    valid = _byte_valid(c, l, C, L, BLOCK_C, BLOCK_L, PIXEL_ROWS)
    packed = tl.load(mask_ptr + offsets, mask=valid, other=0).to(tl.int32)
    if PIXEL_ROWS:
        bits = (packed[:, None, :] >> tl.arange(0, 8)[None, :, None]) & 1
        return tl.reshape(bits, (BLOCK_C, BLOCK_L)) != 0
    else:
        bits = (packed[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        return tl.reshape(bits, (BLOCK_C, BLOCK_L)) != 0


# ---- the excitation MLP for one sample -----------------------------------------------------


@triton.jit
def _excite(p, n, c, c_ok, w1_ptr, b1_ptr, w2_ptr, hidden_ptr, C, S,
            ACT: tl.constexpr, HAS_B1: tl.constexpr, ACC: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """u2 = W2 act(W1 p + b1) (without b2) for one sample, p: [BLOCK_C] (all of C); stores
    hidden[n] = W1 p + b1. S goes in chunks of BLOCK_S: u1 of a chunk, then its share of u2."""
    u2 = tl.zeros([BLOCK_C], ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < S
        w1 = tl.load(w1_ptr + s[:, None] * C + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
        u1 = tl.sum(w1 * p[None, :], axis=1)
        if HAS_B1:
            u1 += tl.load(b1_ptr + s, mask=s_ok, other=0.0).to(ACC)
        tl.store(hidden_ptr + n * S + s, u1, mask=s_ok)
        z = tl.where(s_ok, _activation(u1, ACT), 0.0)
        w2 = tl.load(w2_ptr + c[:, None] * S + s[None, :], mask=c_ok[:, None] & s_ok[None, :], other=0.0).to(ACC)
        u2 += tl.sum(w2 * z[None, :], axis=1)
    return u2


@triton.jit
def _excite_backward(dz2, n, c, c_ok, w1_ptr, w2_ptr, hidden_ptr, dz1_ptr, C, S,
                     ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Given dz2 = dL/du2 ([BLOCK_C]): stores dz1[n] = (W2^T dz2) * act'(u1) and returns
    W1^T dz1 ([BLOCK_C], not yet divided by H*W)."""
    dp = tl.zeros([BLOCK_C], ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < S
        w2 = tl.load(w2_ptr + c[:, None] * S + s[None, :], mask=c_ok[:, None] & s_ok[None, :], other=0.0).to(ACC)
        u1 = tl.load(hidden_ptr + n * S + s, mask=s_ok, other=0.0)
        dz1 = tl.sum(w2 * dz2[:, None], axis=0) * _activation_grad(u1, ACT)
        dz1 = tl.where(s_ok, dz1, 0.0)
        tl.store(dz1_ptr + n * S + s, dz1, mask=s_ok)
        w1 = tl.load(w1_ptr + s[:, None] * C + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
        dp += tl.sum(w1 * dz1[:, None], axis=0)
    return dp


# ---- shared tile steps ---------------------------------------------------------------------


@triton.jit
def _reversed_tile(C, L, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr):
    """(n, channel indices, pixel indices) of this program in a 1-D grid over (N, C blocks,
    L blocks) tiles (pixel blocks fastest), last tile first. The grid is 1-D because only its x
    dimension may exceed 65535 programs (N up to 2^20, H*W up to 4096^2). The split plans read
    x (dy) twice: channel_sums_kernel walks it in grid order, then the scale (grad-input) pass
    walks it again. GPUs start programs roughly in grid order, so walking the second pass
    backwards first reads what the first pass read last, the part most likely still in L2.
    Only the order changes: every program still writes its own tile, and the results are the
    same bits. WIDE (C * L >= 2^31): channel and pixel indices in int64, so that offsets
    within one sample do not overflow."""
    return _tile_at(tl.num_programs(0) - 1 - tl.program_id(0), C, L, BLOCK_C, BLOCK_L, WIDE)


@triton.jit
def _tile_at(tile, C, L, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr):
    """(n, channel indices, pixel indices) of tile number `tile` of the (N, C blocks, L blocks)
    tiles, pixel blocks fastest (see _reversed_tile)."""
    l_blocks = tl.cdiv(L, BLOCK_L)
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = (tile // (l_blocks * c_blocks)).to(tl.int64)
    c = (tile // l_blocks) % c_blocks * BLOCK_C + tl.arange(0, BLOCK_C)
    l = tile % l_blocks * BLOCK_L + tl.arange(0, BLOCK_L)
    if WIDE:
        c = c.to(tl.int64)
        l = l.to(tl.int64)
    return n, c, l


@triton.jit
def _scale_tile(x, g, offsets, inside, res_ptr, y_ptr, mask_ptr, n, c, l, C, L, row_bytes,
                HAS_RES: tl.constexpr, OUT_RELU: tl.constexpr, PIXEL_ROWS: tl.constexpr, ACC: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, LAST: tl.constexpr = ""):
    """y = out_act(x * g + residual) for one tile; x: [BLOCK_C, BLOCK_L] in ACC, g: [BLOCK_C].
    LAST: the eviction policy of the residual's load and y's store ("evict_first" in the streamed
    plan: neither is read again, so their L2 lines go first)."""
    out = x * g[:, None]
    if HAS_RES:
        out += tl.load(res_ptr + offsets, mask=inside, other=0.0, eviction_policy=LAST).to(ACC)
    if OUT_RELU:
        _store_mask(mask_ptr, out > 0, n, c, l, C, L, row_bytes, BLOCK_C, BLOCK_L, PIXEL_ROWS)
        out = tl.where(out < 0, 0.0, out)  # keeps NaN, as torch.relu does
    tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=inside, eviction_policy=LAST)


@triton.jit
def _masked_grad(dy_ptr, mask_ptr, offsets, inside, n, c, l, C, L, row_bytes,
                 OUT_RELU: tl.constexpr, PIXEL_ROWS: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, LAST: tl.constexpr = ""):
    """dy' = dy where the relu let the output through (else 0), as a tile in ACC (LAST: dy's
    eviction policy)."""
    dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0, eviction_policy=LAST).to(ACC)
    if OUT_RELU:
        dy = tl.where(_load_mask(mask_ptr, n, c, l, C, L, row_bytes, BLOCK_C, BLOCK_L, PIXEL_ROWS), dy, 0.0)
    return dy


@triton.jit
def _tile_offsets(C, L, s_n, s_c, s_l, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr):
    """The backward element-wise kernels' tile, walked backwards (see _reversed_tile): (n, c, l,
    c_ok, inside, offsets). It takes no pointers: with dy_ptr passed through a helper that also
    returned the tile, the mutation analysis of torch.compile's tracing took dy for an output
    (tests/test_triton_aot.py::test_compiler_sees_the_triton_kernels)."""
    n, c, l = _reversed_tile(C, L, BLOCK_C, BLOCK_L, WIDE)
    c_ok = c < C
    inside = c_ok[:, None] & (l < L)[None, :]
    offsets = n * s_n + c[:, None] * s_c + l[None, :] * s_l
    return n, c, l, c_ok, inside, offsets


@triton.jit
def _tile_offsets_at(n, c, l, s_n, s_c, s_l, PIXEL_ROWS: tl.constexpr, ALIGN: tl.constexpr):
    """Element offsets of the tile (n, c, l). ALIGN > 1: the rows' length (H*W, or C for
    channels_last) is a multiple of ALIGN, and Triton is told that each row starts on one (its
    own hints cover only multiples of 16): ALIGN-element vector accesses where it would go
    element by element (14x14 maps: float32 16-byte, bfloat16 8-byte accesses)."""
    if ALIGN > 1:
        if PIXEL_ROWS:
            rows = tl.multiple_of(n * s_n + l * s_l, ALIGN)
            return c[:, None] * s_c + rows[None, :]
        else:
            rows = tl.multiple_of(n * s_n + c * s_c, ALIGN)
            return rows[:, None] + l[None, :] * s_l
    return n * s_n + c[:, None] * s_c + l[None, :] * s_l


@triton.jit
def _tile_inside(c, l, C, last, PIXEL_ROWS: tl.constexpr, ALIGN: tl.constexpr):
    """c < C and l < last over the tile; with ALIGN (see _tile_offsets_at; `last` a multiple of
    it) written so that Triton sees the mask constant over ALIGN elements of a row."""
    if ALIGN > 1:
        if PIXEL_ROWS:
            return ((c // ALIGN) < (C // ALIGN))[:, None] & (l < last)[None, :]
        else:
            return (c < C)[:, None] & ((l // ALIGN) < (last // ALIGN))[None, :]
    return (c < C)[:, None] & (l < last)[None, :]


@triton.jit
def _grad_tile(dy, g, dp, offsets, inside, dx_ptr, dres_ptr, NEED_DX: tl.constexpr, NEED_DRES: tl.constexpr,
               LAST: tl.constexpr = ""):
    """grad_x = dy' * g + dp, grad_residual = dy' for one tile (g, dp: [BLOCK_C]; LAST: the
    stores' eviction policy)."""
    if NEED_DRES:
        tl.store(dres_ptr + offsets, dy.to(dres_ptr.dtype.element_ty), mask=inside, eviction_policy=LAST)
    if NEED_DX:
        tl.store(dx_ptr + offsets, (dy * g[:, None] + dp[:, None]).to(dx_ptr.dtype.element_ty), mask=inside,
                 eviction_policy=LAST)


# ---- the kernels ---------------------------------------------------------------------------


@triton.jit
def se_forward_fused_kernel(
    x_ptr,  # (N, C, L) through (s_n, s_c, s_l)
    res_ptr,  # like x (unused unless HAS_RES)
    y_ptr,  # like x
    mask_ptr,  # uint8 relu mask (unused unless OUT_RELU)
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # (S, C), (S), (C, S), (C)
    pooled_ptr, hidden_ptr, logits_ptr,  # (N, C), (N, S), (N, C) in ACC
    C, S, L, s_n, s_c, s_l, row_bytes,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HAS_RES: tl.constexpr, OUT_RELU: tl.constexpr, PIXEL_ROWS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per sample; BLOCK_C >= C and BLOCK_L >= L: x is read once."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    l = tl.arange(0, BLOCK_L)
    c_ok = c < C
    inside = c_ok[:, None] & (l < L)[None, :]
    offsets = n * s_n + c[:, None] * s_c + l[None, :] * s_l
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(ACC)
    p = tl.sum(x, axis=1) / L
    tl.store(pooled_ptr + n * C + c, p, mask=c_ok)
    u2 = _excite(p, n, c, c_ok, w1_ptr, b1_ptr, w2_ptr, hidden_ptr, C, S, ACT, HAS_B1, ACC, BLOCK_C, BLOCK_S)
    if HAS_B2:
        u2 += tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(ACC)
    tl.store(logits_ptr + n * C + c, u2, mask=c_ok)
    _scale_tile(x, _gate(u2, GATE), offsets, inside, res_ptr, y_ptr, mask_ptr, n, c, l, C, L, row_bytes,
                HAS_RES, OUT_RELU, PIXEL_ROWS, ACC, BLOCK_C, BLOCK_L)


@triton.jit
def channel_sums_kernel(
    x_ptr,  # (N, C, L) through (s_n, s_c, s_l)
    dy_ptr,  # like x (read when DOT)
    mask_ptr,  # relu mask (read when DOT and OUT_RELU)
    partial_ptr,  # (N, SPLITS, C) in ACC
    C, L, s_n, s_c, s_l, row_bytes, pixels_per_split, SPLITS,
    DOT: tl.constexpr, OUT_RELU: tl.constexpr, PIXEL_ROWS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr,
):
    """partial[n, split, c] = sum over the split's pixels of x (DOT: of dy' * x). 1-D grid over
    (N, C blocks, SPLITS), splits fastest; pixels_per_split is a multiple of BLOCK_L."""
    _channel_sums_body(tl.program_id(0), x_ptr, dy_ptr, mask_ptr, partial_ptr, C, L, s_n, s_c, s_l, row_bytes,
                       pixels_per_split, SPLITS, DOT, OUT_RELU, PIXEL_ROWS, ACC, BLOCK_C, BLOCK_L, WIDE)


@triton.jit
def _channel_sums_body(pid, x_ptr, dy_ptr, mask_ptr, partial_ptr, C, L, s_n, s_c, s_l, row_bytes, pixels_per_split,
                       SPLITS, DOT: tl.constexpr, OUT_RELU: tl.constexpr, PIXEL_ROWS: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr,
                       LAST: tl.constexpr = "", ALIGN: tl.constexpr = 0):
    """channel_sums_kernel's program `pid` (LAST: the backward's eviction policy for x, which it
    does not read again)."""
    split = pid % SPLITS
    c = (pid // SPLITS) % tl.cdiv(C, BLOCK_C) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = (pid // (SPLITS * tl.cdiv(C, BLOCK_C))).to(tl.int64)
    if WIDE:  # C * L >= 2^31: offsets within a sample in int64
        c = c.to(tl.int64)
    c_ok = c < C
    first = split * pixels_per_split
    last = tl.minimum(first + pixels_per_split, L)
    acc = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    for l0 in range(first, last, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        if WIDE:
            l = l.to(tl.int64)
        inside = _tile_inside(c, l, C, last, PIXEL_ROWS, ALIGN)
        offsets = _tile_offsets_at(n, c, l, s_n, s_c, s_l, PIXEL_ROWS, ALIGN)
        if DOT:
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0, eviction_policy=LAST).to(ACC)
            x *= _masked_grad(dy_ptr, mask_ptr, offsets, inside, n, c, l, C, L, row_bytes, OUT_RELU, PIXEL_ROWS,
                              ACC, BLOCK_C, BLOCK_L)
        else:
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(ACC)
        acc += x
    tl.store(partial_ptr + (n * SPLITS + split) * C + c, tl.sum(acc, axis=1), mask=c_ok)


# ---- the split plans' MLP over blocks of samples ---------------------------------------------


@triton.jit
def _sample_block(N, BLOCK_N: tl.constexpr, BLOCK_X: tl.constexpr):
    """(samples, indices along the other axis, its block id) of this program in a 1-D grid over
    (blocks of the other axis, sample blocks), sample blocks fastest."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_x = tl.program_id(0) // n_blocks
    n = ((tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return n, pid_x * BLOCK_X + tl.arange(0, BLOCK_X), pid_x


@triton.jit
def _split_block(partial_ptr, n, c, nc_ok, C, SPLITS, s0, SHARED: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """Pixel splits s0 .. s0 + SPLIT_BLOCK of the (N, SPLITS, C) partials for samples n and
    channels c, [BLOCK_N, SPLIT_BLOCK, len(c)], zeros past SPLITS (SHARED: their cache modifier,
    ".cg" where this kernel's other programs wrote them). The GEMMs load the first block before
    their weights, whose conversion to the product's layout is the first thing to wait, so both
    arrive in that one L2 round trip."""
    split = s0 + tl.arange(0, SPLIT_BLOCK)
    return tl.load(partial_ptr + (n[:, None, None] * SPLITS + split[None, :, None]) * C + c[None, None, :],
                   mask=nc_ok[:, None, :] & (split < SPLITS)[None, :, None], other=0.0, cache_modifier=SHARED)


@triton.jit
def _split_sums_rest(first, partial_ptr, n, c, nc_ok, C, SPLITS, SHARED: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """The sums over the pixel splits: `first`'s (the first block), then SPLIT_BLOCK further splits
    per load (one L2 round trip each), block by block in order."""
    total = tl.sum(first, axis=1)
    for s0 in range(SPLIT_BLOCK, SPLITS, SPLIT_BLOCK):
        total += tl.sum(_split_block(partial_ptr, n, c, nc_ok, C, SPLITS, s0, SHARED, SPLIT_BLOCK), axis=1)
    return total


@triton.jit
def _chunks(t, R: tl.constexpr, K: tl.constexpr, UNROLL: tl.constexpr):
    """The UNROLL (1, 2 or 4) [R, K] chunks of an [R, UNROLL * K] tile, in column order (past
    UNROLL, repeats of the first ones, unused)."""
    if UNROLL == 4:
        h = tl.permute(tl.reshape(t, [R, 2, 2, K]), (0, 3, 1, 2))  # [R, K, hi, lo]: chunk 2 * hi + lo
        lo0, lo1 = tl.split(h)
        a, c = tl.split(lo0)
        b, d = tl.split(lo1)
    elif UNROLL == 2:
        a, b = tl.split(tl.permute(tl.reshape(t, [R, 2, K]), (0, 2, 1)))
        c = a
        d = b
    else:
        a = t
        b = t
        c = t
        d = t
    return a, b, c, d


@triton.jit
def _add_chunk_products(acc, xa, xb, xc, xd, wa, wb, wc, wd, UNROLL: tl.constexpr):
    """acc + the first UNROLL chunks' products x w^T ([BLOCK_N, K] x [R, K] -> [BLOCK_N, R]), added
    chunk by chunk in order."""
    acc += tl.sum(xa[:, None, :] * wa[None, :, :], axis=2)
    if UNROLL >= 2:
        acc += tl.sum(xb[:, None, :] * wb[None, :, :], axis=2)
    if UNROLL == 4:
        acc += tl.sum(xc[:, None, :] * wc[None, :, :], axis=2)
        acc += tl.sum(xd[:, None, :] * wd[None, :, :], axis=2)
    return acc


@triton.jit
def _matrix_tile(ptr, r, r_ok, k, K, STRIDE, ACC: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """[len(r), len(k)] tile, zeros outside, in ACC, of a row-major matrix of rows STRIDE apart:
    element (r, k) at r * STRIDE + k, k < K (TRANSPOSED: at k * STRIDE + r, the transpose of a
    (K, STRIDE) matrix)."""
    if TRANSPOSED:
        offsets = k[None, :] * STRIDE + r[:, None]
    else:
        offsets = r[:, None] * STRIDE + k[None, :]
    return tl.load(ptr + offsets, mask=r_ok[:, None] & (k < K)[None, :], other=0.0).to(ACC)


@triton.jit
def se_hidden_kernel(
    partial_ptr,  # (N, SPLITS, C) pixel sums of x
    w1_ptr, b1_ptr,  # (S, C), (S)
    pooled_ptr, hidden_ptr,  # (N, C), (N, S) in ACC
    N, C, S, L, SPLITS,
    HAS_B1: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    """The split plan's first GEMM over a block of samples: pooled = sum(partials) / L and
    hidden = pooled W1^T + b1 for BLOCK_N samples x BLOCK_S hidden units, so each W1 row is read
    once per BLOCK_N samples, and the programs (N blocks x S blocks) share the work. 1-D grid, N
    blocks fastest; the S block 0 programs store pooled."""
    n, s, pid_s = _sample_block(N, BLOCK_N, BLOCK_S)
    _hidden_body(n, n < N, s, pid_s, partial_ptr, w1_ptr, b1_ptr, pooled_ptr, hidden_ptr, C, S, L, SPLITS,
                 HAS_B1, ACC, BLOCK_N, BLOCK_S, BLOCK_C, "", UNROLL, SPLIT_BLOCK)


@triton.jit
def _hidden_body(n, n_ok, s, pid_s, partial_ptr, w1_ptr, b1_ptr, pooled_ptr, hidden_ptr, C, S, L, SPLITS,
                 HAS_B1: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_C: tl.constexpr, SHARED: tl.constexpr, UNROLL: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """se_hidden_kernel's work for samples n (n_ok: which are) and hidden units s of block pid_s.
    UNROLL (launch.py: up to 4) chunks of the inner dimension a step (chunks past it are zeros), each
    operand's chunks in one load, the activations' loads before the weights': a reduction's barriers
    hold back the loads after it, and Triton converts a loaded tile to the product's layout
    (through shared memory, between barriers) right after its load, so that conversion is the
    step's first wait and a step is one L2 round trip (the first GEMMs: plus one per further
    SPLIT_BLOCK pixel splits). The chunks are then added in order."""
    s_ok = s < S
    acc = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    for c0 in range(0, C, UNROLL * BLOCK_C):
        c = c0 + tl.arange(0, UNROLL * BLOCK_C)
        nc_ok = n_ok[:, None] & (c < C)[None, :]
        first = _split_block(partial_ptr, n, c, nc_ok, C, SPLITS, 0, SHARED, SPLIT_BLOCK)
        wa, wb, wc, wd = _chunks(_matrix_tile(w1_ptr, s, s_ok, c, C, C, ACC), BLOCK_S, BLOCK_C, UNROLL)
        p = _split_sums_rest(first, partial_ptr, n, c, nc_ok, C, SPLITS, SHARED, SPLIT_BLOCK) / L
        tl.store(pooled_ptr + n[:, None] * C + c[None, :], p, mask=nc_ok & (pid_s == 0))
        pa, pb, pc, pd = _chunks(p, BLOCK_N, BLOCK_C, UNROLL)
        acc = _add_chunk_products(acc, pa, pb, pc, pd, wa, wb, wc, wd, UNROLL)
    if HAS_B1:
        acc += tl.load(b1_ptr + s, mask=s_ok, other=0.0).to(ACC)[None, :]
    tl.store(hidden_ptr + n[:, None] * S + s[None, :], acc, mask=n_ok[:, None] & s_ok[None, :])


@triton.jit
def se_logits_kernel(
    hidden_ptr,  # (N, S) in ACC
    w2_ptr, b2_ptr,  # (C, S), (C)
    logits_ptr, gates_ptr,  # (N, C), (N, C) in ACC
    N, C, S,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_B2: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, UNROLL: tl.constexpr,
):
    """The split plan's second GEMM: logits = act(hidden) W2^T + b2 and the gates for BLOCK_N
    samples x BLOCK_C channels (each W2 row read once per BLOCK_N samples). 1-D grid over (C
    blocks, N blocks), N blocks fastest."""
    n, c, _ = _sample_block(N, BLOCK_N, BLOCK_C)
    _logits_body(n, n < N, c, hidden_ptr, w2_ptr, b2_ptr, logits_ptr, gates_ptr, C, S, ACT, GATE, HAS_B2, ACC,
                 BLOCK_N, BLOCK_C, BLOCK_S, "", UNROLL)


@triton.jit
def _logits_body(n, n_ok, c, hidden_ptr, w2_ptr, b2_ptr, logits_ptr, gates_ptr, C, S, ACT: tl.constexpr,
                 GATE: tl.constexpr, HAS_B2: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SHARED: tl.constexpr, UNROLL: tl.constexpr):
    """se_logits_kernel's work for samples n (n_ok: which are) and channels c; UNROLL chunks of S a
    step, as _hidden_body."""
    c_ok = c < C
    acc = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for s0 in range(0, S, UNROLL * BLOCK_S):
        s = s0 + tl.arange(0, UNROLL * BLOCK_S)
        u1 = tl.load(hidden_ptr + n[:, None] * S + s[None, :], mask=n_ok[:, None] & (s < S)[None, :], other=0.0,
                     cache_modifier=SHARED)
        wa, wb, wc, wd = _chunks(_matrix_tile(w2_ptr, c, c_ok, s, S, S, ACC), BLOCK_C, BLOCK_S, UNROLL)
        za, zb, zc, zd = _chunks(tl.where((s < S)[None, :], _activation(u1, ACT), 0.0), BLOCK_N, BLOCK_S, UNROLL)
        acc = _add_chunk_products(acc, za, zb, zc, zd, wa, wb, wc, wd, UNROLL)
    if HAS_B2:
        acc += tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
    out = n[:, None] * C + c[None, :]
    ok = n_ok[:, None] & c_ok[None, :]
    tl.store(logits_ptr + out, acc, mask=ok)
    tl.store(gates_ptr + out, _gate(acc, GATE), mask=ok)


@triton.jit
def se_scale_kernel(
    x_ptr, res_ptr, y_ptr, mask_ptr,  # as in se_forward_fused_kernel
    gates_ptr,  # (N, C) in ACC
    C, L, s_n, s_c, s_l, row_bytes,
    HAS_RES: tl.constexpr, OUT_RELU: tl.constexpr, PIXEL_ROWS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr,
):
    """y = out_act(x * g + residual), 1-D grid over (N, C blocks, L blocks) tiles, walked
    backwards (see _reversed_tile)."""
    n, c, l = _reversed_tile(C, L, BLOCK_C, BLOCK_L, WIDE)
    _scale_body(n, c, l, x_ptr, res_ptr, y_ptr, mask_ptr, gates_ptr, C, L, s_n, s_c, s_l, row_bytes,
                HAS_RES, OUT_RELU, PIXEL_ROWS, ACC, BLOCK_C, BLOCK_L)


@triton.jit
def _scale_body(n, c, l, x_ptr, res_ptr, y_ptr, mask_ptr, gates_ptr, C, L, s_n, s_c, s_l, row_bytes,
                HAS_RES: tl.constexpr, OUT_RELU: tl.constexpr, PIXEL_ROWS: tl.constexpr, ACC: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, SHARED: tl.constexpr = "", LAST: tl.constexpr = "",
                ALIGN: tl.constexpr = 0):
    """se_scale_kernel's tile (n, c, l): x's last read (LAST: its eviction policy), the gates
    (SHARED: their cache modifier); ALIGN: see _tile_offsets_at."""
    c_ok = c < C
    inside = _tile_inside(c, l, C, L, PIXEL_ROWS, ALIGN)
    offsets = _tile_offsets_at(n, c, l, s_n, s_c, s_l, PIXEL_ROWS, ALIGN)
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0, eviction_policy=LAST).to(ACC)
    g = tl.load(gates_ptr + n * C + c, mask=c_ok, other=0.0, cache_modifier=SHARED)
    _scale_tile(x, g, offsets, inside, res_ptr, y_ptr, mask_ptr, n, c, l, C, L, row_bytes,
                HAS_RES, OUT_RELU, PIXEL_ROWS, ACC, BLOCK_C, BLOCK_L, LAST)


@triton.jit
def se_backward_fused_kernel(
    dy_ptr, x_ptr, mask_ptr,  # grad_y and x (N, C, L) through (s_n, s_c, s_l); relu mask
    dx_ptr, dres_ptr,  # like x (written when NEED_DX / NEED_DRES)
    w1_ptr, w2_ptr,  # (S, C), (C, S)
    hidden_ptr, logits_ptr,  # saved (N, S), (N, C)
    dz1_ptr, dz2_ptr,  # (N, S), (N, C) in ACC, for the weight gradients
    C, S, L, s_n, s_c, s_l, row_bytes,
    ACT: tl.constexpr, GATE: tl.constexpr, OUT_RELU: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_DRES: tl.constexpr, PIXEL_ROWS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per sample: dg = sum dy' x, the MLP backward, grad_x; dy and x read once."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    l = tl.arange(0, BLOCK_L)
    c_ok = c < C
    inside = c_ok[:, None] & (l < L)[None, :]
    offsets = n * s_n + c[:, None] * s_c + l[None, :] * s_l
    dy = _masked_grad(dy_ptr, mask_ptr, offsets, inside, n, c, l, C, L, row_bytes, OUT_RELU, PIXEL_ROWS, ACC,
                      BLOCK_C, BLOCK_L)
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(ACC)
    dg = tl.sum(dy * x, axis=1)
    u2 = tl.load(logits_ptr + n * C + c, mask=c_ok, other=0.0)
    g = _gate(u2, GATE)
    dz2 = tl.where(c_ok, dg * _gate_grad(u2, g, GATE), 0.0)
    tl.store(dz2_ptr + n * C + c, dz2, mask=c_ok)
    dp = _excite_backward(dz2, n, c, c_ok, w1_ptr, w2_ptr, hidden_ptr, dz1_ptr, C, S, ACT, ACC, BLOCK_C, BLOCK_S)
    _grad_tile(dy, g, dp / L, offsets, inside, dx_ptr, dres_ptr, NEED_DX, NEED_DRES)


@triton.jit
def se_dz1_kernel(
    partial_ptr,  # (N, SPLITS, C) pixel sums of dy' * x
    w2_ptr, hidden_ptr, logits_ptr,  # (C, S); saved (N, S), (N, C)
    dz1_ptr, dz2_ptr, gates_ptr,  # (N, S), (N, C), (N, C) in ACC
    N, C, S, SPLITS,
    ACT: tl.constexpr, GATE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    """The split plan's backward first GEMM over a block of samples: dz2 = dg * gate'(logits)
    (and the gates; stored by the S block 0 programs), dz1 = (dz2 W2) * act'(hidden) for BLOCK_N
    samples x BLOCK_S hidden units. W2 is read as [BLOCK_S, BLOCK_C] tiles (W2^T) so that the
    product reduces along its last axis, like se_hidden_kernel's (reducing the middle axis
    spilled 4 B on sm_90). 1-D grid, N blocks fastest."""
    n, s, pid_s = _sample_block(N, BLOCK_N, BLOCK_S)
    _dz1_body(n, n < N, s, pid_s, partial_ptr, w2_ptr, hidden_ptr, logits_ptr, dz1_ptr, dz2_ptr, gates_ptr, C, S,
              SPLITS, ACT, GATE, ACC, BLOCK_N, BLOCK_S, BLOCK_C, "", UNROLL, SPLIT_BLOCK)


@triton.jit
def _dz1_body(n, n_ok, s, pid_s, partial_ptr, w2_ptr, hidden_ptr, logits_ptr, dz1_ptr, dz2_ptr, gates_ptr, C, S,
              SPLITS, ACT: tl.constexpr, GATE: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SHARED: tl.constexpr, UNROLL: tl.constexpr,
              SPLIT_BLOCK: tl.constexpr):
    """se_dz1_kernel's work for samples n (n_ok: which are) and hidden units s of block pid_s;
    UNROLL chunks of C a step, as _hidden_body."""
    s_ok = s < S
    acc = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    for c0 in range(0, C, UNROLL * BLOCK_C):
        c = c0 + tl.arange(0, UNROLL * BLOCK_C)
        nc_ok = n_ok[:, None] & (c < C)[None, :]
        first = _split_block(partial_ptr, n, c, nc_ok, C, SPLITS, 0, SHARED, SPLIT_BLOCK)
        u2 = tl.load(logits_ptr + n[:, None] * C + c[None, :], mask=nc_ok, other=0.0)
        wa, wb, wc, wd = _chunks(_matrix_tile(w2_ptr, s, s_ok, c, C, S, ACC, TRANSPOSED=True), BLOCK_S, BLOCK_C,
                                 UNROLL)
        dg = _split_sums_rest(first, partial_ptr, n, c, nc_ok, C, SPLITS, SHARED, SPLIT_BLOCK)
        g = _gate(u2, GATE)
        dz2 = tl.where(nc_ok, dg * _gate_grad(u2, g, GATE), 0.0)
        owner = nc_ok & (pid_s == 0)  # one program of each sample block stores dz2 and the gates
        tl.store(dz2_ptr + n[:, None] * C + c[None, :], dz2, mask=owner)
        tl.store(gates_ptr + n[:, None] * C + c[None, :], g, mask=owner)
        da, db, dc, dd = _chunks(dz2, BLOCK_N, BLOCK_C, UNROLL)
        acc = _add_chunk_products(acc, da, db, dc, dd, wa, wb, wc, wd, UNROLL)
    ns_ok = n_ok[:, None] & s_ok[None, :]
    u1 = tl.load(hidden_ptr + n[:, None] * S + s[None, :], mask=ns_ok, other=0.0)
    tl.store(dz1_ptr + n[:, None] * S + s[None, :], tl.where(ns_ok, acc * _activation_grad(u1, ACT), 0.0),
             mask=ns_ok)


@triton.jit
def se_dp_kernel(
    dz1_ptr,  # (N, S) in ACC
    w1_ptr,  # (S, C)
    dp_ptr,  # (N, C) in ACC
    N, C, S, L,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """The split plan's backward second GEMM: dp = (dz1 W1) / L, the gradient reaching each
    pooled value, for BLOCK_N samples x BLOCK_C channels; W1 read as [BLOCK_C, BLOCK_S] tiles
    (W1^T), the product reduced along its last axis. 1-D grid, N blocks fastest."""
    n, c, _ = _sample_block(N, BLOCK_N, BLOCK_C)
    _dp_body(n, n < N, c, dz1_ptr, w1_ptr, dp_ptr, C, S, L, ACC, BLOCK_N, BLOCK_C, BLOCK_S, "", UNROLL)


@triton.jit
def _dp_body(n, n_ok, c, dz1_ptr, w1_ptr, dp_ptr, C, S, L, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SHARED: tl.constexpr, UNROLL: tl.constexpr):
    """se_dp_kernel's work for samples n (n_ok: which are) and channels c; UNROLL chunks of S a step,
    as _hidden_body."""
    c_ok = c < C
    acc = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for s0 in range(0, S, UNROLL * BLOCK_S):
        s = s0 + tl.arange(0, UNROLL * BLOCK_S)
        dz1 = tl.load(dz1_ptr + n[:, None] * S + s[None, :], mask=n_ok[:, None] & (s < S)[None, :], other=0.0,
                      cache_modifier=SHARED)
        wa, wb, wc, wd = _chunks(_matrix_tile(w1_ptr, c, c_ok, s, S, C, ACC, TRANSPOSED=True), BLOCK_C, BLOCK_S,
                                 UNROLL)
        da, db, dc, dd = _chunks(dz1, BLOCK_N, BLOCK_S, UNROLL)
        acc = _add_chunk_products(acc, da, db, dc, dd, wa, wb, wc, wd, UNROLL)
    tl.store(dp_ptr + n[:, None] * C + c[None, :], acc / L, mask=n_ok[:, None] & c_ok[None, :])


@triton.jit
def se_grad_input_kernel(
    dy_ptr, mask_ptr, dx_ptr, dres_ptr,  # as in se_backward_fused_kernel
    gates_ptr, dp_ptr,  # (N, C) in ACC
    C, L, s_n, s_c, s_l, row_bytes,
    OUT_RELU: tl.constexpr, NEED_DX: tl.constexpr, NEED_DRES: tl.constexpr, PIXEL_ROWS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr,
):
    """grad_x = dy' * g + dp and grad_residual = dy', 1-D grid over (N, C blocks, L blocks)
    tiles, walked backwards (see _reversed_tile)."""
    n, c, l, c_ok, inside, offsets = _tile_offsets(C, L, s_n, s_c, s_l, BLOCK_C, BLOCK_L, WIDE)
    _grad_input_body(n, c, l, c_ok, inside, offsets, dy_ptr, mask_ptr, dx_ptr, dres_ptr, gates_ptr, dp_ptr, C, L,
                     row_bytes, OUT_RELU, NEED_DX, NEED_DRES, PIXEL_ROWS, ACC, BLOCK_C, BLOCK_L)


@triton.jit
def _grad_input_body(n, c, l, c_ok, inside, offsets, dy_ptr, mask_ptr, dx_ptr, dres_ptr, gates_ptr, dp_ptr, C, L,
                     row_bytes, OUT_RELU: tl.constexpr, NEED_DX: tl.constexpr, NEED_DRES: tl.constexpr,
                     PIXEL_ROWS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                     SHARED: tl.constexpr = "", LAST: tl.constexpr = ""):
    """se_grad_input_kernel's tile: dy's last read and the outputs' stores with eviction policy
    LAST, the gates and dp with cache modifier SHARED."""
    dy = _masked_grad(dy_ptr, mask_ptr, offsets, inside, n, c, l, C, L, row_bytes, OUT_RELU, PIXEL_ROWS, ACC,
                      BLOCK_C, BLOCK_L, LAST)
    g = tl.load(gates_ptr + n * C + c, mask=c_ok, other=0.0, cache_modifier=SHARED)
    dp = tl.load(dp_ptr + n * C + c, mask=c_ok, other=0.0, cache_modifier=SHARED)
    _grad_tile(dy, g, dp, offsets, inside, dx_ptr, dres_ptr, NEED_DX, NEED_DRES, LAST)


@triton.jit
def _wgrad_sample(n, end, c, s, c_ok, s_ok, dz1_ptr, dz2_ptr, hidden_ptr, pooled_ptr, C, S, ACT: tl.constexpr):
    """(dz2, dz1, act(hidden), pooled) of sample n for se_weight_grads_kernel; zeros from `end` on."""
    c_in = c_ok & (n < end)
    s_in = s_ok & (n < end)
    dz2 = tl.load(dz2_ptr + n * C + c, mask=c_in, other=0.0)
    dz1 = tl.load(dz1_ptr + n * S + s, mask=s_in, other=0.0)
    z = tl.where(s_in, _activation(tl.load(hidden_ptr + n * S + s, mask=s_in, other=0.0), ACT), 0.0)
    p = tl.load(pooled_ptr + n * C + c, mask=c_in, other=0.0)
    return dz2, dz1, z, p


@triton.jit
def se_weight_grads_kernel(
    dz1_ptr, dz2_ptr, hidden_ptr, pooled_ptr,  # (N, S), (N, C), (N, S), (N, C) in ACC
    dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,  # (S, C), (S), (C, S), (C): chunk k's at k * chunk_stride
    gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr,  # SUM_HERE: the weights' gradients
    done_ptr,  # SUM_HERE: int64 zeros from done_offset on, one per (C block, S block)
    N, C, S, per_chunk, chunk_stride, o_db1, o_dw2, o_db2,  # o_*: element offsets of db1, dW2, db2
    done_offset,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SUM_HERE: tl.constexpr,
    STEP: tl.constexpr,
):
    """dW2 = dz2^T act(hidden), dW1 = dz1^T pooled, db2 = sum dz2, db1 = sum dz1 over the samples
    [chunk * per_chunk, (chunk + 1) * per_chunk) for one (C block, S block), STEP (float64: 4)
    samples a step, the steps in order: deterministic. 1-D grid over (chunks, S blocks, C blocks),
    C blocks fastest. One chunk: the weights' gradients themselves (cast to their dtype); several:
    ACC partials in one buffer (passed four times, o_* apart), chunk k's at k * chunk_stride, added
    by se_sum_chunks_kernel or
    (SUM_HERE: where the streamed plan's counters are at hand) by the last program of each
    (C block, S block) to finish, which then sets its counter back to zero."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    s_blocks = tl.cdiv(S, BLOCK_S)
    pid_c = tl.program_id(0) % c_blocks
    pid_s = tl.program_id(0) // c_blocks % s_blocks
    chunk = tl.program_id(0) // (c_blocks * s_blocks)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = c < C
    s_ok = s < S
    dw2 = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    dw1 = tl.zeros([BLOCK_S, BLOCK_C], ACC)
    db2 = tl.zeros([BLOCK_C], ACC)
    db1 = tl.zeros([BLOCK_S], ACC)
    end = tl.minimum(N, (chunk + 1) * per_chunk)
    if ACC == tl.float32:
        # STEP samples a step as two products over the samples (FMA dots: exact float32 products,
        # no TF32), the step's loads together: one L2 round trip per STEP samples, where the outer
        # products took one per 4 (launch.py WGRAD_STEP: blocks and registers)
        for n0 in range(chunk * per_chunk, end, STEP):
            n = n0 + tl.arange(0, STEP)
            n_ok = n < end
            dz2 = tl.load(dz2_ptr + n[None, :] * C + c[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            dz1 = tl.load(dz1_ptr + n[None, :] * S + s[:, None], mask=s_ok[:, None] & n_ok[None, :], other=0.0)
            ns_ok = n_ok[:, None] & s_ok[None, :]
            z = tl.where(ns_ok, _activation(tl.load(hidden_ptr + n[:, None] * S + s[None, :], mask=ns_ok, other=0.0),
                                            ACT), 0.0)
            p = tl.load(pooled_ptr + n[:, None] * C + c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            dw2 = tl.dot(dz2, z, dw2, input_precision="ieee")
            dw1 = tl.dot(dz1, p, dw1, input_precision="ieee")
            db2 += tl.sum(dz2, axis=1)
            db1 += tl.sum(dz1, axis=1)
    else:  # float64 (tl.dot on float64 is too recent in Triton to rely on): 4 samples a step, loads together
        tl.static_assert(STEP == 4, "se_kernels: the float64 weight gradients take 4 samples a step")
        for n0 in range(chunk * per_chunk, end, STEP):
            a2, a1, az, ap = _wgrad_sample(n0, end, c, s, c_ok, s_ok, dz1_ptr, dz2_ptr, hidden_ptr, pooled_ptr, C, S,
                                           ACT)
            b2, b1, bz, bp = _wgrad_sample(n0 + 1, end, c, s, c_ok, s_ok, dz1_ptr, dz2_ptr, hidden_ptr, pooled_ptr, C,
                                           S, ACT)
            e2, e1, ez, ep = _wgrad_sample(n0 + 2, end, c, s, c_ok, s_ok, dz1_ptr, dz2_ptr, hidden_ptr, pooled_ptr, C,
                                           S, ACT)
            f2, f1, fz, fp = _wgrad_sample(n0 + 3, end, c, s, c_ok, s_ok, dz1_ptr, dz2_ptr, hidden_ptr, pooled_ptr, C,
                                           S, ACT)
            dw2 += a2[:, None] * az[None, :]
            dw2 += b2[:, None] * bz[None, :]
            dw2 += e2[:, None] * ez[None, :]
            dw2 += f2[:, None] * fz[None, :]
            dw1 += a1[:, None] * ap[None, :]
            dw1 += b1[:, None] * bp[None, :]
            dw1 += e1[:, None] * ep[None, :]
            dw1 += f1[:, None] * fp[None, :]
            db2 += a2
            db2 += b2
            db2 += e2
            db2 += f2
            db1 += a1
            db1 += b1
            db1 += e1
            db1 += f1
    base = chunk * chunk_stride
    tl.store(dw2_ptr + base + o_dw2 + c[:, None] * S + s[None, :], dw2.to(dw2_ptr.dtype.element_ty),
             mask=c_ok[:, None] & s_ok[None, :])
    tl.store(dw1_ptr + base + s[:, None] * C + c[None, :], dw1.to(dw1_ptr.dtype.element_ty),
             mask=s_ok[:, None] & c_ok[None, :])
    if pid_s == 0:
        tl.store(db2_ptr + base + o_db2 + c, db2.to(db2_ptr.dtype.element_ty), mask=c_ok)
    if pid_c == 0:
        tl.store(db1_ptr + base + o_db1 + s, db1.to(db1_ptr.dtype.element_ty), mask=s_ok)
    if SUM_HERE:
        # the last of the chunks' programs of this (C block, S block) to finish adds the chunks'
        # partials in chunk order, as se_sum_chunks_kernel would (the same bits), without its launch:
        # every thread's stores, then one release add; its acquire, then .cg loads of the others'
        tl.debug_barrier()
        finished = tl.atomic_add(done_ptr + done_offset + pid_s * c_blocks + pid_c, 1, sem="acq_rel")
        if finished == tl.num_programs(0) // (c_blocks * s_blocks) - 1:
            _sum_chunk_tile(dw1_ptr, c, s, c_ok, s_ok, pid_c, pid_s, chunk_stride, o_db1, o_dw2, o_db2, C, S,
                            tl.num_programs(0) // (c_blocks * s_blocks), gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr)
            # every program of the tile has added: its counter back to zero for the next launch
            tl.store(done_ptr + done_offset + pid_s * c_blocks + pid_c, 0)


@triton.jit
def _sum_chunk_tile(partial_ptr, c, s, c_ok, s_ok, pid_c, pid_s, chunk_stride, o_db1, o_dw2, o_db2, C, S, CHUNKS,
                    gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr):
    """The weight gradients of one (C block, S block): its CHUNKS partials added in chunk order."""
    cs_ok = c_ok[:, None] & s_ok[None, :]
    sc_ok = s_ok[:, None] & c_ok[None, :]
    w2_at = o_dw2 + c[:, None] * S + s[None, :]
    w1_at = s[:, None] * C + c[None, :]
    w2 = tl.load(partial_ptr + w2_at, mask=cs_ok, other=0.0, cache_modifier=".cg")
    w1 = tl.load(partial_ptr + w1_at, mask=sc_ok, other=0.0, cache_modifier=".cg")
    b2 = tl.load(partial_ptr + o_db2 + c, mask=c_ok, other=0.0, cache_modifier=".cg")
    b1 = tl.load(partial_ptr + o_db1 + s, mask=s_ok, other=0.0, cache_modifier=".cg")
    for k in range(1, CHUNKS):
        w2 += tl.load(partial_ptr + k * chunk_stride + w2_at, mask=cs_ok, other=0.0, cache_modifier=".cg")
        w1 += tl.load(partial_ptr + k * chunk_stride + w1_at, mask=sc_ok, other=0.0, cache_modifier=".cg")
        b2 += tl.load(partial_ptr + k * chunk_stride + o_db2 + c, mask=c_ok, other=0.0, cache_modifier=".cg")
        b1 += tl.load(partial_ptr + k * chunk_stride + o_db1 + s, mask=s_ok, other=0.0, cache_modifier=".cg")
    tl.store(gw2_ptr + c[:, None] * S + s[None, :], w2.to(gw2_ptr.dtype.element_ty), mask=cs_ok)
    tl.store(gw1_ptr + w1_at, w1.to(gw1_ptr.dtype.element_ty), mask=sc_ok)
    if pid_s == 0:
        tl.store(gb2_ptr + c, b2.to(gb2_ptr.dtype.element_ty), mask=c_ok)
    if pid_c == 0:
        tl.store(gb1_ptr + s, b1.to(gb1_ptr.dtype.element_ty), mask=s_ok)


@triton.jit
def se_sum_chunks_kernel(
    partial_ptr,  # (CHUNKS, total) in ACC: each row [dW1 (S*C) | db1 (S) | dW2 (C*S) | db2 (C)]
    dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,  # the weights' gradients
    C, S, CHUNKS, BLOCK: tl.constexpr,
):
    """The weight gradients: the chunks' partials added in chunk order (deterministic)."""
    sc = S * C
    total = 2 * sc + S + C
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < total
    acc = tl.load(partial_ptr + j, mask=ok, other=0.0)
    for k in range(1, CHUNKS):
        acc += tl.load(partial_ptr + k * total + j, mask=ok, other=0.0)
    tl.store(dw1_ptr + j, acc.to(dw1_ptr.dtype.element_ty), mask=ok & (j < sc))
    tl.store(db1_ptr + (j - sc), acc.to(db1_ptr.dtype.element_ty), mask=ok & (j >= sc) & (j < sc + S))
    tl.store(dw2_ptr + (j - sc - S), acc.to(dw2_ptr.dtype.element_ty), mask=ok & (j >= sc + S) & (j < 2 * sc + S))
    tl.store(db2_ptr + (j - 2 * sc - S), acc.to(db2_ptr.dtype.element_ty), mask=ok & (j >= 2 * sc + S))


# ---- the generic channel-attention path's stage kernels (se_kernels/triton/stages.py) ------------
# Its pool and gate gradient are channel_sums_kernel, its scale se_scale_kernel and its average
# squeeze's input gradient se_grad_input_kernel; the average + max squeeze adds these two.


@triton.jit
def channel_max_kernel(
    x_ptr,  # (N, C, L) through (s_n, s_c, s_l)
    max_ptr,  # (N, C) in x's dtype
    ties_ptr,  # (N, C) in ACC
    C, L, s_n, s_c, s_l,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr,
):
    """max[n, c] over the pixels (NaN if any is NaN, as torch.amax) and ties[n, c], how many
    pixels equal it (0 for NaN): one program per (sample, channel block), the max in one walk
    over the pixels and the count in a second (the block still in L2)."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    c = pid % c_blocks * BLOCK_C + tl.arange(0, BLOCK_C)
    n = (pid // c_blocks).to(tl.int64)
    if WIDE:
        c = c.to(tl.int64)
    c_ok = c < C
    best = tl.full([BLOCK_C, BLOCK_L], float("-inf"), ACC)
    nans = tl.zeros([BLOCK_C, BLOCK_L], tl.int32)
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        if WIDE:
            l = l.to(tl.int64)
        inside = c_ok[:, None] & (l < L)[None, :]
        v = tl.load(x_ptr + n * s_n + c[:, None] * s_c + l[None, :] * s_l, mask=inside,
                    other=float("-inf")).to(ACC)
        nans = tl.maximum(nans, (v != v).to(tl.int32))
        best = tl.maximum(best, tl.where(v != v, float("-inf"), v))
    m = tl.max(best, axis=1)
    count = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        if WIDE:
            l = l.to(tl.int64)
        inside = c_ok[:, None] & (l < L)[None, :]
        v = tl.load(x_ptr + n * s_n + c[:, None] * s_c + l[None, :] * s_l, mask=inside, other=0.0).to(ACC)
        count += tl.where(inside & (v == m[:, None]), 1.0, 0.0)
    has_nan = tl.max(nans, axis=1) > 0
    m = tl.where(has_nan, float("nan"), m)
    ties = tl.where(has_nan, 0.0, tl.sum(count, axis=1))
    tl.store(max_ptr + n * C + c, m.to(max_ptr.dtype.element_ty), mask=c_ok)
    tl.store(ties_ptr + n * C + c, ties, mask=c_ok)


@triton.jit
def ca_grad_input_max_kernel(
    dy_ptr, mask_ptr, dx_ptr, dres_ptr,  # as in se_grad_input_kernel
    gates_ptr, dp_ptr,  # (N, C) in ACC: g, dmean / L
    x_ptr,  # like dy
    max_ptr,  # (N, C) in x's dtype
    dm_ptr,  # (N, C) in ACC: dmax / ties (0 where no pixel is the max)
    C, L, s_n, s_c, s_l, row_bytes,
    OUT_RELU: tl.constexpr, NEED_DX: tl.constexpr, NEED_DRES: tl.constexpr, PIXEL_ROWS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr,
):
    """se_grad_input_kernel's grad_x = dy' * g + dp plus the max squeeze's share, dm where x is
    the max; grad_residual = dy'."""
    n, c, l, c_ok, inside, offsets = _tile_offsets(C, L, s_n, s_c, s_l, BLOCK_C, BLOCK_L, WIDE)
    dy = _masked_grad(dy_ptr, mask_ptr, offsets, inside, n, c, l, C, L, row_bytes, OUT_RELU, PIXEL_ROWS, ACC,
                      BLOCK_C, BLOCK_L)
    if NEED_DRES:
        tl.store(dres_ptr + offsets, dy.to(dres_ptr.dtype.element_ty), mask=inside)
    if NEED_DX:
        g = tl.load(gates_ptr + n * C + c, mask=c_ok, other=0.0)
        dp = tl.load(dp_ptr + n * C + c, mask=c_ok, other=0.0)
        mx = tl.load(max_ptr + n * C + c, mask=c_ok, other=0.0).to(ACC)
        dm = tl.load(dm_ptr + n * C + c, mask=c_ok, other=0.0)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(ACC)
        out = dy * g[:, None] + dp[:, None] + tl.where(x == mx[:, None], dm[:, None], 0.0)
        tl.store(dx_ptr + offsets, out.to(dx_ptr.dtype.element_ty), mask=inside)


# ---- flat tiles: the streamed plan on short NCHW rows with no 8-byte accesses (7x7 maps) -----------
#
# Rows of 49 pixels start on an odd element every other row, so a [BLOCK_C, BLOCK_L] tile goes
# element by element, an address each: few bytes in flight and many registers. But the rows of
# consecutive channels of a sample are one contiguous run, which starts on a 16-byte boundary when
# C and the tile's row count are multiples of FLAT_VEC (16 bytes of the element type;
# launch.Plan._stream checks C). A flat tile is FLAT_ROWS such rows (as many whole rows as its
# F-element vector holds, a multiple of FLAT_VEC: 160 of 7x7 in 8192 elements, 96% of them used),
# loaded and stored as one 1-D [F] vector (16-byte accesses; past the rows masked). Values move
# between the elements and the rows with tl.gather (a [BLOCK_R] per-row vector, BLOCK_R the power of
# two >= FLAT_ROWS): gates and dp out to the elements; the elements into [BLOCK_C, BLOCK_L] rows for
# the channel sums (BLOCK_C rows at a time); the relu mask's bytes as 16-bit windows of the run's bits.


@triton.jit
def _flat_tile(tile, C, s_n, FLAT_L: tl.constexpr, FLAT_VEC: tl.constexpr, FLAT_ROWS: tl.constexpr,
               BLOCK_R: tl.constexpr, F: tl.constexpr):
    """(n, c0, the rows' channels c, c_ok, rows, element offsets, inside) of flat tile number `tile`
    (channel blocks fastest): channels c0 + [0, rows) of sample n, their rows as one run."""
    c_blocks = tl.cdiv(C, FLAT_ROWS)
    n = (tile // c_blocks).to(tl.int64)
    c0 = tile % c_blocks * FLAT_ROWS
    f = tl.arange(0, F)
    r = tl.arange(0, BLOCK_R)
    rows = tl.multiple_of(tl.minimum(C - c0, FLAT_ROWS), FLAT_VEC)
    start = tl.multiple_of(n * s_n + c0 * FLAT_L, FLAT_VEC)
    return n, c0, c0 + r, r < rows, rows, start + f, f < rows * FLAT_L


@triton.jit
def _flat_per_row(v, FLAT_L: tl.constexpr, BLOCK_R: tl.constexpr, F: tl.constexpr):
    """A [BLOCK_R] per-row (per-channel) vector at each element of the flat tile."""
    f = tl.arange(0, F)
    return tl.gather(v, tl.minimum(f // FLAT_L, BLOCK_R - 1), 0)


@triton.jit
def _flat_row_sums(v, out_ptr, n_rows, ACC: tl.constexpr, FLAT_L: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Stores the sums of the flat tile's n_rows rows (v: [BLOCK_C * BLOCK_L], its elements past the
    rows are never read) at out_ptr[0 .. n_rows): BLOCK_C rows at a time (BLOCK_R / BLOCK_C <= 2 parts: the
    tile holds fewer than 2 * BLOCK_C rows of more than BLOCK_L / 2 pixels) gathered as [BLOCK_C,
    BLOCK_L] rows in v's dtype, their pixels from FLAT_L on masked."""
    l = tl.arange(0, BLOCK_L)
    for part in tl.static_range(0, BLOCK_R, BLOCK_C):
        r = part + tl.arange(0, BLOCK_C)
        at = r[:, None] * FLAT_L + tl.minimum(l, FLAT_L - 1)[None, :]
        at = tl.reshape(tl.minimum(at, BLOCK_C * BLOCK_L - 1), [BLOCK_C * BLOCK_L])
        rows = tl.reshape(tl.gather(v, at, 0), [BLOCK_C, BLOCK_L]).to(ACC)
        tl.store(out_ptr + r, tl.sum(tl.where((l < FLAT_L)[None, :], rows, 0.0), axis=1), mask=r < n_rows)


@triton.jit
def _flat_mask_bytes(mask_ptr, n, c, c_ok, C, row_bytes, ROW_BYTES: tl.constexpr):
    """Pointers to the tile's rows' mask bytes, [BLOCK_R, ROW_BYTES] (ROW_BYTES: the power of two
    >= row_bytes), and which are the tile's; the byte index b along the row."""
    b = tl.arange(0, ROW_BYTES)
    return (mask_ptr + (n * C + c)[:, None] * row_bytes + b[None, :],
            c_ok[:, None] & (b < row_bytes)[None, :], b)


@triton.jit
def _flat_run_bits(positive, F: tl.constexpr):
    """The flat tile's relu bits (positive: [F]) packed 8 to a byte along the run ([F // 8] int32;
    each thread's own when its 16-byte vector holds 8 elements)."""
    weights = (1 << tl.arange(0, 8))[None, :]
    return tl.sum(tl.reshape(positive.to(tl.int32), (F // 8, 8)) * weights, axis=1)


@triton.jit
def _flat_store_mask(mask_ptr, run, n, c, c_ok, C, row_bytes, FLAT_L: tl.constexpr, BLOCK_R: tl.constexpr,
                     F: tl.constexpr):
    """Stores the flat tile's relu bits (run: _flat_run_bits) as its rows' mask bytes: each row
    byte (bits r * FLAT_L + 8 b ..., up to 8 of them) the 16-bit window of two run bytes at the
    right shift."""
    ROW_BYTES: tl.constexpr = (1 if FLAT_L <= 8 else 2 if FLAT_L <= 16 else 4 if FLAT_L <= 32
                               else 8 if FLAT_L <= 64 else 16)  # the power of two >= row_bytes
    ptrs, ok, b = _flat_mask_bytes(mask_ptr, n, c, c_ok, C, row_bytes, ROW_BYTES)
    bit = (tl.arange(0, BLOCK_R) * FLAT_L)[:, None] + 8 * b[None, :]  # the row byte's first bit in the run
    at = tl.reshape(tl.minimum(bit // 8, F // 8 - 1), [BLOCK_R * ROW_BYTES])
    after = tl.reshape(tl.minimum(bit // 8 + 1, F // 8 - 1), [BLOCK_R * ROW_BYTES])
    lo = tl.reshape(tl.gather(run, at, 0), [BLOCK_R, ROW_BYTES])
    hi = tl.reshape(tl.gather(run, after, 0), [BLOCK_R, ROW_BYTES])
    shift = bit % 8
    keep = (1 << tl.maximum(tl.minimum(FLAT_L - 8 * b, 8), 0)) - 1  # the row's last byte: its pixels only
    packed = ((lo >> shift) | (hi << (8 - shift))) & keep[None, :]
    tl.store(ptrs, packed.to(tl.uint8), mask=ok)


@triton.jit
def _flat_load_mask(mask_ptr, n, c, c_ok, C, row_bytes, FLAT_L: tl.constexpr, BLOCK_R: tl.constexpr,
                    F: tl.constexpr):
    """The flat tile's relu bits ([F] booleans) from its rows' mask bytes (False past the rows)."""
    ROW_BYTES: tl.constexpr = (1 if FLAT_L <= 8 else 2 if FLAT_L <= 16 else 4 if FLAT_L <= 32
                               else 8 if FLAT_L <= 64 else 16)  # the power of two >= row_bytes
    ptrs, ok, _ = _flat_mask_bytes(mask_ptr, n, c, c_ok, C, row_bytes, ROW_BYTES)
    packed = tl.reshape(tl.load(ptrs, mask=ok, other=0).to(tl.int32), [BLOCK_R * ROW_BYTES])
    f = tl.arange(0, F)
    row = f // FLAT_L
    pixel = f - row * FLAT_L
    byte = tl.gather(packed, tl.minimum(row, BLOCK_R - 1) * ROW_BYTES + pixel // 8, 0)
    return ((byte >> (pixel % 8)) & 1) != 0


@triton.jit
def _flat_masked_grad(dy_ptr, mask_ptr, offsets, inside, n, c, c_ok, C, row_bytes, OUT_RELU: tl.constexpr,
                      ACC: tl.constexpr, FLAT_L: tl.constexpr, BLOCK_R: tl.constexpr, F: tl.constexpr,
                      LAST: tl.constexpr = ""):
    """_masked_grad over a flat tile."""
    dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0, eviction_policy=LAST).to(ACC)
    if OUT_RELU:
        dy = tl.where(_flat_load_mask(mask_ptr, n, c, c_ok, C, row_bytes, FLAT_L, BLOCK_R, F), dy, 0.0)
    return dy


@triton.jit
def _flat_sums_body(tile, x_ptr, dy_ptr, mask_ptr, partial_ptr, C, s_n, row_bytes, DOT: tl.constexpr,
                    OUT_RELU: tl.constexpr, ACC: tl.constexpr, FLAT_L: tl.constexpr, FLAT_VEC: tl.constexpr,
                    FLAT_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                    LAST: tl.constexpr = ""):
    """_channel_sums_body over flat tile `tile` (one pixel split: whole rows)."""
    n, c0, c, c_ok, rows, offsets, inside = _flat_tile(tile, C, s_n, FLAT_L, FLAT_VEC, FLAT_ROWS, BLOCK_R,
                                                       BLOCK_C * BLOCK_L)
    if DOT:
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0, eviction_policy=LAST).to(ACC)
        x *= _flat_masked_grad(dy_ptr, mask_ptr, offsets, inside, n, c, c_ok, C, row_bytes, OUT_RELU, ACC, FLAT_L,
                               BLOCK_R, BLOCK_C * BLOCK_L)
    else:  # gathered in x's dtype: half the shared memory of ACC's for 2-byte types
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    _flat_row_sums(x, partial_ptr + n * C + c0, rows, ACC, FLAT_L, BLOCK_R, BLOCK_C, BLOCK_L)


@triton.jit
def _flat_scale_part(x, res, y_ptr, mask_ptr, gates_ptr, offsets, inside, n, c, c_ok, C, row_bytes,
                     HAS_RES: tl.constexpr, OUT_RELU: tl.constexpr, ACC: tl.constexpr, FLAT_L: tl.constexpr,
                     BLOCK_R: tl.constexpr, F: tl.constexpr, SHARED: tl.constexpr, LAST: tl.constexpr):
    """The scale of flat rows whose x (and residual) are loaded: y = x * g [+ residual] [relu]."""
    g = tl.load(gates_ptr + n * C + c, mask=c_ok, other=0.0, cache_modifier=SHARED)
    out = x.to(ACC) * _flat_per_row(g, FLAT_L, BLOCK_R, F)
    if HAS_RES:
        out += res.to(ACC)
    if OUT_RELU:
        run = _flat_run_bits(out > 0, F)  # 1 register for 8 elements' bits
        out = tl.where(out < 0, 0.0, out)  # keeps NaN, as torch.relu does
    tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=inside, eviction_policy=LAST)
    if OUT_RELU:  # after y's store: out is dead by then
        _flat_store_mask(mask_ptr, run, n, c, c_ok, C, row_bytes, FLAT_L, BLOCK_R, F)


@triton.jit
def _flat_scale_body(tile, x_ptr, res_ptr, y_ptr, mask_ptr, gates_ptr, C, s_n, row_bytes, HAS_RES: tl.constexpr,
                     OUT_RELU: tl.constexpr, ACC: tl.constexpr, FLAT_L: tl.constexpr, FLAT_VEC: tl.constexpr,
                     FLAT_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, F: tl.constexpr, PARTS: tl.constexpr = 1,
                     SHARED: tl.constexpr = "", LAST: tl.constexpr = ""):
    """_scale_body and _scale_tile over flat tile `tile`. PARTS = 2: the tile as two halves of
    FLAT_ROWS / 2 rows (a multiple of FLAT_VEC) in F / 2 elements each, both halves' loads first,
    then each half's arithmetic and stores in turn: the loads of the whole tile in flight, the
    registers of half its arithmetic (one 16384-element bfloat16 vector with the residual and relu
    spilled 56 B, sm_90)."""
    if PARTS == 1:
        n, _, c, c_ok, _, offsets, inside = _flat_tile(tile, C, s_n, FLAT_L, FLAT_VEC, FLAT_ROWS, BLOCK_R, F)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0, eviction_policy=LAST)
        res = tl.load(res_ptr + offsets, mask=inside, other=0.0, eviction_policy=LAST) if HAS_RES else x
        _flat_scale_part(x, res, y_ptr, mask_ptr, gates_ptr, offsets, inside, n, c, c_ok, C, row_bytes, HAS_RES,
                         OUT_RELU, ACC, FLAT_L, BLOCK_R, F, SHARED, LAST)
    else:
        tl.static_assert(PARTS == 2 and FLAT_ROWS % (2 * FLAT_VEC) == 0)
        HALF: tl.constexpr = FLAT_ROWS // 2
        n, c0, _, _, rows, _, _ = _flat_tile(tile, C, s_n, FLAT_L, FLAT_VEC, FLAT_ROWS, BLOCK_R, F)
        rows_a = tl.minimum(rows, HALF)
        rows_b = rows - rows_a
        f = tl.arange(0, F // 2)
        r = tl.arange(0, BLOCK_R // 2)
        at_a = tl.multiple_of(n * s_n + c0 * FLAT_L, FLAT_VEC) + f
        at_b = tl.multiple_of(n * s_n + (c0 + HALF) * FLAT_L, FLAT_VEC) + f
        in_a = f < rows_a * FLAT_L
        in_b = f < rows_b * FLAT_L
        x_a = tl.load(x_ptr + at_a, mask=in_a, other=0.0, eviction_policy=LAST)
        x_b = tl.load(x_ptr + at_b, mask=in_b, other=0.0, eviction_policy=LAST)
        res_a = tl.load(res_ptr + at_a, mask=in_a, other=0.0, eviction_policy=LAST) if HAS_RES else x_a
        res_b = tl.load(res_ptr + at_b, mask=in_b, other=0.0, eviction_policy=LAST) if HAS_RES else x_b
        _flat_scale_part(x_a, res_a, y_ptr, mask_ptr, gates_ptr, at_a, in_a, n, c0 + r, r < rows_a, C, row_bytes,
                         HAS_RES, OUT_RELU, ACC, FLAT_L, BLOCK_R // 2, F // 2, SHARED, LAST)
        _flat_scale_part(x_b, res_b, y_ptr, mask_ptr, gates_ptr, at_b, in_b, n, c0 + HALF + r, r < rows_b, C,
                         row_bytes, HAS_RES, OUT_RELU, ACC, FLAT_L, BLOCK_R // 2, F // 2, SHARED, LAST)


@triton.jit
def _flat_grad_input_body(tile, dy_ptr, mask_ptr, dx_ptr, dres_ptr, gates_ptr, dp_ptr, C, s_n, row_bytes,
                          OUT_RELU: tl.constexpr, NEED_DX: tl.constexpr, NEED_DRES: tl.constexpr,
                          ACC: tl.constexpr, FLAT_L: tl.constexpr, FLAT_VEC: tl.constexpr, FLAT_ROWS: tl.constexpr,
                          BLOCK_R: tl.constexpr, F: tl.constexpr, SHARED: tl.constexpr = "",
                          LAST: tl.constexpr = ""):
    """_grad_input_body and _grad_tile over flat tile `tile`."""
    n, _, c, c_ok, _, offsets, inside = _flat_tile(tile, C, s_n, FLAT_L, FLAT_VEC, FLAT_ROWS, BLOCK_R, F)
    dy = _flat_masked_grad(dy_ptr, mask_ptr, offsets, inside, n, c, c_ok, C, row_bytes, OUT_RELU, ACC, FLAT_L,
                           BLOCK_R, F, LAST)
    if NEED_DRES:
        tl.store(dres_ptr + offsets, dy.to(dres_ptr.dtype.element_ty), mask=inside, eviction_policy=LAST)
    if NEED_DX:
        g = tl.load(gates_ptr + n * C + c, mask=c_ok, other=0.0, cache_modifier=SHARED)
        dp = tl.load(dp_ptr + n * C + c, mask=c_ok, other=0.0, cache_modifier=SHARED)
        out = dy * _flat_per_row(g, FLAT_L, BLOCK_R, F) + _flat_per_row(dp, FLAT_L, BLOCK_R, F)
        tl.store(dx_ptr + offsets, out.to(dx_ptr.dtype.element_ty), mask=inside, eviction_policy=LAST)


# ---- the streamed plan: one persistent kernel per direction ----------------------------------
#
# As the CUDA backend's (csrc/cuda/se_stream.h, where the schedule and the argument for progress
# are written out; se_kernels/triton/launch.py stream_schedule computes the same schedule): the
# split plan's four stages per group of GROUP samples, as numbered work items that programs claim
# in order from one atomic counter (the next number claimed when an item starts). Round r holds
# stage k's items of group r - lag[k]. An item of stage k > 0 waits (an acquire load, on one
# thread, then a barrier) until every item of stage k - 1 of its group has signalled (a barrier,
# then a release add on one thread). What items exchange is loaded with the ".cg" cache modifier
# (from L2); the element-wise items' last reads and their outputs carry evict-first hints, so that
# only x (backward: dy) and the mask compete for the L2 until a group's re-read. Items are one
# split-plan program each: a channel-sum tile, an MLP block of the group's samples, an
# element-wise tile (the group's last tile first).


@triton.jit
def _stream_item(i, GROUPS, P0, P1, P2, P3, LAG1, LAG2, LAG3):
    """(stage, group, index) of item number i; stage -1 where its group does not exist."""
    size = P0 + P1 + P2 + P3
    rnd = i // size
    j = i - rnd * size
    stage = tl.where(j < P0, 0, tl.where(j < P0 + P1, 1, tl.where(j < P0 + P1 + P2, 2, 3)))
    lag = tl.where(stage == 0, 0, tl.where(stage == 1, LAG1, tl.where(stage == 2, LAG2, LAG3)))
    start = tl.where(stage == 0, 0, tl.where(stage == 1, P0, tl.where(stage == 2, P0 + P1, P0 + P1 + P2)))
    g = rnd - lag
    return tl.where((g >= 0) & (g < GROUPS), stage, -1), g, j - start


@triton.jit
def _stream_claim(counters_ptr, GROUPS):
    """The next item number (the claim counter follows the 3 per group). Item numbers, tiles and
    channel-sum programs are below 2^31 (launch.Plan checks): int32, whose divisions are inline
    (int64 ones are a called routine with a stack frame, which spilled)."""
    return tl.atomic_add(counters_ptr + GROUPS * 3, 1).to(tl.int32)


@triton.jit
def _stream_start(i, counters_ptr, N, GROUP, GROUPS, P0, P1, P2, P3, LAG1, LAG2, LAG3):
    """(stage, group, index, its first sample, past its last) of item i, once it may run: an item
    of stage k > 0 first waits until every item of stage k - 1 of its group has signalled."""
    stage, g, index = _stream_item(i, GROUPS, P0, P1, P2, P3, LAG1, LAG2, LAG3)
    if stage > 0:
        need = tl.where(stage == 1, P0, tl.where(stage == 2, P1, P2))
        while tl.atomic_add(counters_ptr + g * 3 + stage - 1, 0, sem="acquire") < need:
            pass
    n0 = g * GROUP
    return stage, g, index, n0, tl.minimum(n0 + GROUP, N)


@triton.jit
def _stream_signal(counters_ptr, g, stage):
    """This item (of stage 0-2) is done: every thread's stores before one release add."""
    tl.debug_barrier()
    tl.atomic_add(counters_ptr + g * 3 + stage, 1, sem="release")


@triton.jit
def _stream_tiles(C, L, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, FLAT_L: tl.constexpr,
                  FLAT_ROWS: tl.constexpr):
    """(channel blocks, tiles) of a sample: flat tiles of FLAT_ROWS whole rows (a BLOCK_C * BLOCK_L
    vector, one pixel split), else [BLOCK_C, BLOCK_L] tiles."""
    if FLAT_L > 0:
        c_blocks = tl.cdiv(C, FLAT_ROWS)
        tiles = c_blocks
    else:
        c_blocks = tl.cdiv(C, BLOCK_C)
        tiles = c_blocks * tl.cdiv(L, BLOCK_L)
    return c_blocks, tiles


@triton.jit
def _stream_finish(counters_ptr, GROUPS, RESET_BLOCK: tl.constexpr):
    """This program has claimed a number past the items: it counts itself out on the exit counter
    (after the claim counter), and the last program out sets the 3 per group, the claim and the
    exit counters back to zero, so that the next launch on the stream finds them zero
    (launch._stream_counters keeps one buffer per device and stream). Every other program has
    stopped touching them by then: its exit add follows its last claim, wait and signal."""
    tl.debug_barrier()
    out = tl.atomic_add(counters_ptr + GROUPS * 3 + 1, 1, sem="acq_rel")
    if out == tl.num_programs(0) - 1:
        for k in range(0, GROUPS * 3 + 2, RESET_BLOCK):
            at = k + tl.arange(0, RESET_BLOCK)
            tl.store(counters_ptr + at, tl.zeros([RESET_BLOCK], tl.int64), mask=at < GROUPS * 3 + 2)


@triton.jit
def se_streamed_forward_kernel(
    x_ptr, res_ptr, y_ptr, mask_ptr,  # as in se_forward_fused_kernel
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    partial_ptr,  # (N, SPLITS, C): one split per pixel block
    pooled_ptr, hidden_ptr, logits_ptr, gates_ptr,  # (N, C), (N, S), (N, C), (N, C) in ACC
    counters_ptr,  # int64, zeros: 3 per group, the claim counter, the exit counter (left zero)
    N, C, S, L, s_n, s_c, s_l, row_bytes, SPLITS,
    GROUP, GROUPS, P0, P1, P2, P3, LAG1, LAG2, LAG3,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HAS_RES: tl.constexpr, OUT_RELU: tl.constexpr, PIXEL_ROWS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr,
    MLP_BLOCK_N: tl.constexpr, MLP_BLOCK_S: tl.constexpr, MLP_CHUNK_C: tl.constexpr,
    MLP_BLOCK_C: tl.constexpr, MLP_CHUNK_S: tl.constexpr, ALIGN: tl.constexpr, MLP_UNROLL_C: tl.constexpr,
    MLP_UNROLL_S: tl.constexpr, MLP_SPLIT_BLOCK: tl.constexpr, FLAT_L: tl.constexpr, FLAT_VEC: tl.constexpr,
    FLAT_ROWS: tl.constexpr, FLAT_BLOCK_R: tl.constexpr, FLAT_PARTS: tl.constexpr,
):
    """The forward's streamed plan: channel sums -> hidden -> logits and gates -> scale, per group."""
    c_blocks, tiles_per_sample = _stream_tiles(C, L, BLOCK_C, BLOCK_L, FLAT_L, FLAT_ROWS)
    items = (GROUPS + LAG3) * (P0 + P1 + P2 + P3)
    i = _stream_claim(counters_ptr, GROUPS)
    while i < items:
        ahead = _stream_claim(counters_ptr, GROUPS)
        stage, g, index, n0, n1 = _stream_start(i, counters_ptr, N, GROUP, GROUPS, P0, P1, P2, P3, LAG1, LAG2, LAG3)
        if stage >= 0:
            if stage == 0:
                pid = n0 * (c_blocks * SPLITS) + index
                if pid < n1 * (c_blocks * SPLITS):
                    if FLAT_L > 0:
                        _flat_sums_body(pid, x_ptr, x_ptr, mask_ptr, partial_ptr, C, s_n, row_bytes, False, False, ACC,
                                        FLAT_L, FLAT_VEC, FLAT_ROWS, FLAT_BLOCK_R, BLOCK_C, BLOCK_L)
                    else:
                        _channel_sums_body(pid, x_ptr, x_ptr, mask_ptr, partial_ptr, C, L, s_n, s_c, s_l, row_bytes,
                                           BLOCK_L, SPLITS, False, False, PIXEL_ROWS, ACC, BLOCK_C, BLOCK_L, WIDE,
                                           ALIGN=ALIGN)
            elif stage == 1:
                n = n0.to(tl.int64) + tl.arange(0, MLP_BLOCK_N)
                _hidden_body(n, n < n1, index * MLP_BLOCK_S + tl.arange(0, MLP_BLOCK_S), index, partial_ptr, w1_ptr,
                             b1_ptr, pooled_ptr, hidden_ptr, C, S, L, SPLITS, HAS_B1, ACC, MLP_BLOCK_N, MLP_BLOCK_S,
                             MLP_CHUNK_C, ".cg", MLP_UNROLL_C, MLP_SPLIT_BLOCK)
            elif stage == 2:
                n = n0.to(tl.int64) + tl.arange(0, MLP_BLOCK_N)
                _logits_body(n, n < n1, index * MLP_BLOCK_C + tl.arange(0, MLP_BLOCK_C), hidden_ptr, w2_ptr, b2_ptr,
                             logits_ptr, gates_ptr, C, S, ACT, GATE, HAS_B2, ACC, MLP_BLOCK_N, MLP_BLOCK_C,
                             MLP_CHUNK_S, ".cg", MLP_UNROLL_S)
            else:
                tile = n1 * tiles_per_sample - 1 - index
                if tile >= n0 * tiles_per_sample:
                    if FLAT_L > 0:
                        _flat_scale_body(tile, x_ptr, res_ptr, y_ptr, mask_ptr, gates_ptr, C, s_n, row_bytes, HAS_RES,
                                         OUT_RELU, ACC, FLAT_L, FLAT_VEC, FLAT_ROWS, FLAT_BLOCK_R, BLOCK_C * BLOCK_L,
                                         FLAT_PARTS, ".cg", "evict_first")
                    else:
                        nt, c, l = _tile_at(tile, C, L, BLOCK_C, BLOCK_L, WIDE)
                        _scale_body(nt, c, l, x_ptr, res_ptr, y_ptr, mask_ptr, gates_ptr, C, L, s_n, s_c, s_l,
                                    row_bytes, HAS_RES, OUT_RELU, PIXEL_ROWS, ACC, BLOCK_C, BLOCK_L, ".cg",
                                    "evict_first", ALIGN)
            if stage < 3:
                _stream_signal(counters_ptr, g, stage)
        i = ahead
    _stream_finish(counters_ptr, GROUPS, 512)


@triton.jit
def se_streamed_backward_kernel(
    dy_ptr, x_ptr, mask_ptr, dx_ptr, dres_ptr,  # as in se_backward_fused_kernel
    w1_ptr, w2_ptr, hidden_ptr, logits_ptr,  # (S, C), (C, S); saved (N, S), (N, C)
    partial_ptr,  # (N, SPLITS, C) in ACC
    dz1_ptr, dz2_ptr, gates_ptr, dp_ptr,  # (N, S), (N, C), (N, C), (N, C) in ACC
    counters_ptr,
    N, C, S, L, s_n, s_c, s_l, row_bytes, SPLITS,
    GROUP, GROUPS, P0, P1, P2, P3, LAG1, LAG2, LAG3,
    ACT: tl.constexpr, GATE: tl.constexpr, OUT_RELU: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_DRES: tl.constexpr, PIXEL_ROWS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, WIDE: tl.constexpr,
    MLP_BLOCK_N: tl.constexpr, MLP_BLOCK_S: tl.constexpr, MLP_CHUNK_C: tl.constexpr,
    MLP_BLOCK_C: tl.constexpr, MLP_CHUNK_S: tl.constexpr, ALIGN: tl.constexpr, MLP_UNROLL_C: tl.constexpr,
    MLP_UNROLL_S: tl.constexpr, MLP_SPLIT_BLOCK: tl.constexpr, FLAT_L: tl.constexpr, FLAT_VEC: tl.constexpr,
    FLAT_ROWS: tl.constexpr, FLAT_BLOCK_R: tl.constexpr,
):
    """The backward's streamed plan: sums of dy' * x -> dz1 (dz2, gates) -> dp -> grad_input, per
    group; the weight gradients follow as in the split plan."""
    c_blocks, tiles_per_sample = _stream_tiles(C, L, BLOCK_C, BLOCK_L, FLAT_L, FLAT_ROWS)
    items = (GROUPS + LAG3) * (P0 + P1 + P2 + P3)
    i = _stream_claim(counters_ptr, GROUPS)
    while i < items:
        ahead = _stream_claim(counters_ptr, GROUPS)
        stage, g, index, n0, n1 = _stream_start(i, counters_ptr, N, GROUP, GROUPS, P0, P1, P2, P3, LAG1, LAG2, LAG3)
        if stage >= 0:
            if stage == 0:
                pid = n0 * (c_blocks * SPLITS) + index
                if pid < n1 * (c_blocks * SPLITS):
                    if FLAT_L > 0:
                        _flat_sums_body(pid, x_ptr, dy_ptr, mask_ptr, partial_ptr, C, s_n, row_bytes, True, OUT_RELU,
                                        ACC, FLAT_L, FLAT_VEC, FLAT_ROWS, FLAT_BLOCK_R, BLOCK_C, BLOCK_L,
                                        "evict_first")
                    else:
                        _channel_sums_body(pid, x_ptr, dy_ptr, mask_ptr, partial_ptr, C, L, s_n, s_c, s_l, row_bytes,
                                           BLOCK_L, SPLITS, True, OUT_RELU, PIXEL_ROWS, ACC, BLOCK_C, BLOCK_L, WIDE,
                                           "evict_first", ALIGN)
            elif stage == 1:
                n = n0.to(tl.int64) + tl.arange(0, MLP_BLOCK_N)
                _dz1_body(n, n < n1, index * MLP_BLOCK_S + tl.arange(0, MLP_BLOCK_S), index, partial_ptr, w2_ptr,
                          hidden_ptr, logits_ptr, dz1_ptr, dz2_ptr, gates_ptr, C, S, SPLITS, ACT, GATE, ACC,
                          MLP_BLOCK_N, MLP_BLOCK_S, MLP_CHUNK_C, ".cg", MLP_UNROLL_C, MLP_SPLIT_BLOCK)
            elif stage == 2:
                n = n0.to(tl.int64) + tl.arange(0, MLP_BLOCK_N)
                _dp_body(n, n < n1, index * MLP_BLOCK_C + tl.arange(0, MLP_BLOCK_C), dz1_ptr, w1_ptr, dp_ptr, C, S,
                         L, ACC, MLP_BLOCK_N, MLP_BLOCK_C, MLP_CHUNK_S, ".cg", MLP_UNROLL_S)
            else:
                tile = n1 * tiles_per_sample - 1 - index
                if tile >= n0 * tiles_per_sample:
                    if FLAT_L > 0:
                        _flat_grad_input_body(tile, dy_ptr, mask_ptr, dx_ptr, dres_ptr, gates_ptr, dp_ptr, C, s_n,
                                              row_bytes, OUT_RELU, NEED_DX, NEED_DRES, ACC, FLAT_L, FLAT_VEC,
                                              FLAT_ROWS, FLAT_BLOCK_R, BLOCK_C * BLOCK_L, ".cg", "evict_first")
                    else:
                        nt, c, l = _tile_at(tile, C, L, BLOCK_C, BLOCK_L, WIDE)
                        c_ok = c < C
                        inside = _tile_inside(c, l, C, L, PIXEL_ROWS, ALIGN)
                        offsets = _tile_offsets_at(nt, c, l, s_n, s_c, s_l, PIXEL_ROWS, ALIGN)
                        _grad_input_body(nt, c, l, c_ok, inside, offsets, dy_ptr, mask_ptr, dx_ptr, dres_ptr,
                                         gates_ptr, dp_ptr, C, L, row_bytes, OUT_RELU, NEED_DX, NEED_DRES, PIXEL_ROWS,
                                         ACC, BLOCK_C, BLOCK_L, ".cg", "evict_first")
            if stage < 3:
                _stream_signal(counters_ptr, g, stage)
        i = ahead
    _stream_finish(counters_ptr, GROUPS, 512)
