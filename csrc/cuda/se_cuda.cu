// Fused SE forward and backward on CUDA: the C++/CUDA fallback of the Triton backend.
//
// Split plan (it fills the GPU for few large samples and for many small ones, because the pixel
// reduction is split over blocks):
//   forward:  channel_sums (per (sample, channel block, pixel split) partial sums of x)
//             -> hidden, logits (the MLP as GEMMs over blocks of 8 samples; gates)
//             -> scale (y = out_act(x * g + residual) and the relu mask, one warp per tile of a
//                row, 16-byte accesses, the tiles walked backwards: csrc/cuda/se_tiles.h)
//   backward: channel_sums of dy' * x -> dz1 (dz2, gates, dz1, act(hidden)) -> dp ->
//             grad_input (dx, d_residual; tiles as scale's) -> weight_grads (32 x 32 tiles of
//             both weight gradients per block over a chunk of the batch, the chunks then added in
//             order)
// Flat tiles (csrc/cuda/se_tiles.h; NCHW rows of at most 256 pixels, 7x7 and 14x14): channel sums,
// scale and grad_input over runs of whole rows in 16-byte vectors, in either plan.
// Streamed plan (csrc/cuda/se_stream.h; batches whose bytes exceed half the L2, 16-byte paths,
// not double): the same first four stages per group of samples, as the work items of one
// persistent kernel, so that the element-wise pass re-reads x (backward: dy) from L2, not HBM.
// Every reduction has a fixed order: results are deterministic (the streamed plan's atomics only
// hand out work items and count finished ones). Accumulation in float (double for double). x,
// residual, grad_y, y, grad_x and grad_residual share x's layout (NCHW or channels_last rows,
// csrc/se_common.h); the relu mask layout is csrc/se.cpp's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <type_traits>
#include <utility>

#include "../ca_common.h"
#include "../se_common.h"
#include "se_stream.h"
#include "se_tiles.h"

// The option switches of se_tiles.h compiled for the host as well, so that the host compiler's
// -Werror=switch (setup.py) rejects one that misses an Act or Gate: nvcc's device front end does
// not warn about a missing enumerator, and the kernels alone instantiate them for the device only.
namespace se_kernels::tiles {
template float activation<float>(float, Act);
template double activation<double>(double, Act);
template float activation_grad<float>(float, Act);
template double activation_grad<double>(double, Act);
template float gate_fn<float>(float, Gate);
template double gate_fn<double>(double, Gate);
template float gate_grad<float>(float, float, Gate);
template double gate_grad<double>(double, double, Gate);
}  // namespace se_kernels::tiles

namespace se_kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using tiles::activation;
using tiles::activation_grad;
using tiles::gate_fn;
using tiles::gate_grad;
using tiles::RowTiles;
using tiles::Tile;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // lane 0 holds the sum
}

// ---- shapes ------------------------------------------------------------------------------------

// Offsets of element (n, c, l) and of its relu-mask bit, for either row layout.
struct Layout {
  int64_t C, L, S, rows, row_len, row_bytes;
  bool pixel_rows;
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t c, int64_t l) const {
    return pixel_rows ? (n * L + l) * C + c : (n * C + c) * L + l;
  }
  __device__ __forceinline__ bool mask_bit(const uint8_t* mask, int64_t n, int64_t c, int64_t l) const {
    const int64_t row = pixel_rows ? n * L + l : n * C + c, i = pixel_rows ? c : l;
    return (mask[row * row_bytes + (i >> 3)] >> (i & 7)) & 1;
  }
};

Layout make_layout(const Geometry& g) {
  return Layout{g.C, g.L, g.S, g.rows, g.row_len, g.mask_row_bytes, g.pixel_rows};
}

// ---- kernels -----------------------------------------------------------------------------------

// Vectors the plans write in one kernel and read in another, or (the streamed plan) in the same
// kernel on another SM after a counter said they are written: read from L2 (ld.global.cg), never
// through the non-coherent or L1 paths.
template <typename A>
__device__ __forceinline__ A load_l2(const A* p) {
  return __ldcg(p);
}

// A per-(n, c) value: from L2 in the streamed plan (written by another block of the kernel), else
// a plain load (written by an earlier kernel).
template <bool kStreamed, typename A>
__device__ __forceinline__ A load_vector(const A* p) {
  if constexpr (kStreamed) {
    return load_l2(p);
  } else {
    return *p;
  }
}

// W elements of E, loaded and stored as one 16-byte access where W * sizeof(E) == 16 (two for
// float gates of 8 half/bfloat16 elements).
template <typename E, int W>
struct alignas(16) Pack {
  E v[W];
};

// How a 16-byte load is made. Keep: through the read-only path at normal L2 priority (the split
// plan's loads; the streamed plan's of what it reads again: x in the forward's channel sums, dy in
// the backward's). The streamed plan also uses Last for a last read (the element-wise items' x,
// residual and dy; the backward's x), ld.global.cs: the L2 line goes first, so it does not push out
// what is still to be re-read; and Coherent for what another block of the same kernel wrote,
// ld.global.cg: from L2, never a stale L1 line. Its outputs' 16-byte stores are st.global.cs
// (store_pack<kStream>: evicted first). Accesses of other sizes are plain (Coherent ones through
// load_l2). The split plan keeps plain accesses: the hints are inline assembly, whose addresses
// ptxas does not fold into the instructions' offsets (scale_kernel's float channels_last relu
// residual variant went from 12.00 to 12.75 SASS instructions per element with them).
enum class Hint { Keep, Last, Coherent };

template <Hint H>
__device__ __forceinline__ uint4 load16(const uint4* p) {
  if constexpr (H == Hint::Keep) {
    return __ldg(p);
  } else if constexpr (H == Hint::Last) {
    return __ldcs(p);
  } else {
    return __ldcg(p);
  }
}

// 16-byte multiples go through uint4, which nvcc always moves with one LDG/STG.128 each (a
// struct copy was split into four 4-byte stores).
template <typename E, int W, Hint H = Hint::Keep>
__device__ __forceinline__ Pack<E, W> load_pack(const E* p) {
  Pack<E, W> out;
  if constexpr (W * sizeof(E) % 16 == 0) {
    constexpr int kWords = W * sizeof(E) / 16;
#pragma unroll
    for (int k = 0; k < kWords; ++k)
      reinterpret_cast<uint4*>(&out)[k] = load16<H>(reinterpret_cast<const uint4*>(p) + k);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) {
      if constexpr (H == Hint::Coherent) {
        out.v[k] = load_l2(p + k);
      } else {
        out.v[k] = p[k];
      }
    }
  }
  return out;
}

template <typename E, int W, bool kStream = false>
__device__ __forceinline__ void store_pack(E* p, const Pack<E, W>& v) {
  if constexpr (W * sizeof(E) % 16 == 0) {
    constexpr int kWords = W * sizeof(E) / 16;
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      if constexpr (kStream) {
        __stcs(reinterpret_cast<uint4*>(p) + k, reinterpret_cast<const uint4*>(&v)[k]);
      } else {
        reinterpret_cast<uint4*>(p)[k] = reinterpret_cast<const uint4*>(&v)[k];
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) p[k] = v.v[k];
  }
}

// partial[n, split, c] = sum over the split's pixels of x (dot: of dy' * x). 1-D grid over
// (N, splits, channel blocks), channel blocks fastest: only grid.x may exceed 65535 blocks. NCHW:
// one warp per channel, lanes along the (contiguous) pixels, 16 bytes a lane and step when
// kVector (H*W a multiple of the vector width, x and dy aligned), else one element.
// channels_last: 32 channels per block along x (contiguous), 8 pixel lanes along y, reduced
// through shared memory in a fixed order.
template <typename T, typename A, bool kVector, bool kStreamed = false>
__device__ __forceinline__ void channel_sums_block(const T* __restrict__ x, const T* __restrict__ dy,
                                                   const uint8_t* __restrict__ mask, A* __restrict__ partial,
                                                   const Layout& lay, int64_t per_split, int splits, int64_t cblocks,
                                                   bool dot, bool masked, int64_t blk) {
  const int64_t block = blk % cblocks;
  const int64_t n = blk / cblocks / splits;
  const int split = static_cast<int>(blk / cblocks % splits);
  const int64_t l_begin = split * per_split, l_end = min(lay.L, l_begin + per_split);
  auto term = [&](int64_t c, int64_t l) {
    const int64_t o = lay.offset(n, c, l);
    A v = static_cast<A>(x[o]);
    if (dot) {
      A d = static_cast<A>(dy[o]);
      if (masked && !lay.mask_bit(mask, n, c, l)) d = A(0);
      v *= d;
    }
    return v;
  };
  if (!lay.pixel_rows) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t c = block * kWarps + warp;
    if (c >= lay.C) return;  // whole warps; no block-wide barrier on this path
    A acc = 0;
    if constexpr (kVector) {  // 16-byte loads: L a multiple of W, splits start on multiples of 32
      constexpr int W = tiles::vec_width<T>();
      const int64_t row = n * lay.C + c;
      const T* __restrict__ xr = x + row * lay.L;
      const T* __restrict__ dr = dot ? dy + row * lay.L : nullptr;
      const uint8_t* __restrict__ mr = masked ? mask + row * lay.row_bytes : nullptr;
#pragma unroll 4
      for (int64_t l = l_begin + lane * W; l < l_end; l += 32 * W) {
        // the forward re-reads x in its element-wise pass, the backward dy
        constexpr Hint kLast = kStreamed ? Hint::Last : Hint::Keep;
        const Pack<T, W> xv = dot ? load_pack<T, W, kLast>(xr + l) : load_pack<T, W, Hint::Keep>(xr + l);
        if (dot) {
          const Pack<T, W> dv = load_pack<T, W, Hint::Keep>(dr + l);
          const unsigned bits = masked ? unsigned(mr[l >> 3]) >> (l & 7) : 0xffu;  // W <= 8 bits, one byte
#pragma unroll
          for (int k = 0; k < W; ++k)
            acc += static_cast<A>(xv.v[k]) * (((bits >> k) & 1u) ? static_cast<A>(dv.v[k]) : A(0));
        } else {
#pragma unroll
          for (int k = 0; k < W; ++k) acc += static_cast<A>(xv.v[k]);
        }
      }
    } else {
      for (int64_t l = l_begin + lane; l < l_end; l += 32) acc += term(c, l);
    }
    acc = warp_sum(acc);
    if (lane == 0) partial[(n * splits + split) * lay.C + c] = acc;
  } else {
    __shared__ A sums[8][32];
    const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const int64_t c = block * 32 + tx;
    A acc = 0;
    if (c < lay.C)
      for (int64_t l = l_begin + ty; l < l_end; l += 8) acc += term(c, l);
    sums[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && c < lay.C) {
      A total = 0;
      for (int k = 0; k < 8; ++k) total += sums[k][tx];
      partial[(n * splits + split) * lay.C + c] = total;
    }
    __syncthreads();  // sums is reused by the block's next item (the streamed plan)
  }
}

template <typename T, typename A, bool kVector>
__global__ void channel_sums_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                    const uint8_t* __restrict__ mask, A* __restrict__ partial, Layout lay,
                                    int64_t per_split, int splits, int64_t cblocks, bool dot, bool masked) {
  channel_sums_block<T, A, kVector>(x, dy, mask, partial, lay, per_split, splits, cblocks, dot, masked, blockIdx.x);
}

// ---- the excitation MLP: small GEMMs over blocks of samples -------------------------------------
//
// Each block computes a [kMlpN samples] x [32 outputs] tile, one warp per sample and one lane per
// output, walking the inner dimension 32 at a time through shared memory: the block loads a
// [kMlpN, 32] tile of its samples' vectors and a [32, 32] tile of the weights (coalesced along
// the weights' contiguous axis), then each thread adds 32 products. Each weight is read once per
// kMlpN samples, and the work spreads over ceil(N / kMlpN) x ceil(outputs / 32) blocks. 1-D grids,
// sample blocks fastest (tile_gemm). The tiles' strides are padded to 33 so that a lane reading a
// column hits a different bank than its neighbours.
constexpr int kMlpN = kWarps;  // samples per block: one per warp
constexpr int kMlpT = 32;      // outputs per block (lanes) and inner tile

struct MlpBlock {
  int64_t n, x;  // this thread's sample and output (may be past the outputs)
  bool live;     // n is one of the block's samples (a warp past them adds zeros and stores nothing)
  bool first;    // the block of outputs 0..31: stores the per-sample vectors it computes
};

// The block of samples [n_begin, n_end) (at most kMlpN) and outputs [xb * 32, xb * 32 + 32).
__device__ __forceinline__ MlpBlock mlp_block_at(int64_t n_begin, int64_t n_end, int64_t xb) {
  const int64_t n = n_begin + threadIdx.x / 32;
  return {n, xb * kMlpT + threadIdx.x % 32, n < n_end, xb == 0};
}

// The split plan's grids: sample blocks fastest.
__device__ __forceinline__ MlpBlock mlp_block(int64_t N) {
  const int64_t n_blocks = (N + kMlpN - 1) / kMlpN;
  const int64_t n_begin = int64_t(blockIdx.x % n_blocks) * kMlpN;
  return mlp_block_at(n_begin, min(N, n_begin + kMlpN), blockIdx.x / n_blocks);
}

// acc = sum over k < K of vec(k) * W(output, k) for this thread's (sample, output), 32 values of k
// at a time through shared memory, kMlpSub such tiles per pass: their loads are issued together,
// one L2 round trip per 128 values of k. vec(k): this thread's sample's value at k (called with
// k = k0 + lane; 0 past the end). weight(i, j): the weight matrix at row i, column j (0 outside);
// kOutputRows: the outputs are W's rows (tile loaded along k, W's contiguous axis), else its
// columns (tile loaded along the outputs, then W's contiguous axis). The products are added in
// increasing k, whatever the pass size.
constexpr int kMlpSub = 4;

template <bool kOutputRows, typename A, typename Vec, typename Weight>
__device__ __forceinline__ A tile_gemm(int64_t K, const MlpBlock& b, Vec vec, Weight weight) {
  __shared__ A vs[kMlpSub][kMlpN][kMlpT + 1];
  __shared__ A ws[kMlpSub][kMlpT][kMlpT + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t x0 = b.x - lane;
  A acc = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kMlpT * kMlpSub) {
#pragma unroll
    for (int t = 0; t < kMlpSub; ++t) {
      const int64_t kt = k0 + t * kMlpT;
      if (kt >= K) break;  // uniform over the block
      vs[t][warp][lane] = vec(kt + lane);
      for (int row = warp; row < kMlpT; row += kWarps)
        ws[t][row][lane] = kOutputRows ? weight(x0 + row, kt + lane) : weight(kt + row, x0 + lane);
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kMlpSub; ++t) {
      if (k0 + t * kMlpT >= K) break;
#pragma unroll 8
      for (int k = 0; k < kMlpT; ++k) acc += vs[t][warp][k] * (kOutputRows ? ws[t][lane][k] : ws[t][k][lane]);
    }
    __syncthreads();
  }
  return acc;
}

// hidden[n, s] = sum_c pooled[n, c] W1[s, c] + b1[s], with pooled = sum(partials) / L (stored by
// the first block of outputs).
template <typename T, typename A>
__device__ __forceinline__ void hidden_block(const A* __restrict__ partial, const T* __restrict__ w1,
                                             const T* __restrict__ b1, A* __restrict__ pooled, A* __restrict__ hidden,
                                             int64_t C, int64_t S, int64_t L, int splits, const MlpBlock& b) {
  auto pool = [&](int64_t c) {
    if (!b.live || c >= C) return A(0);
    A p = 0;
    for (int k = 0; k < splits; ++k) p += load_l2(partial + (b.n * splits + k) * C + c);
    p /= A(L);
    if (b.first) pooled[b.n * C + c] = p;
    return p;
  };
  auto w = [&](int64_t s, int64_t c) { return s < S && c < C ? static_cast<A>(w1[s * C + c]) : A(0); };
  const A acc = tile_gemm<true, A>(C, b, pool, w);
  if (b.live && b.x < S) hidden[b.n * S + b.x] = acc + (b1 ? static_cast<A>(b1[b.x]) : A(0));
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) hidden_kernel(const A* __restrict__ partial, const T* __restrict__ w1,
                                                          const T* __restrict__ b1, A* __restrict__ pooled,
                                                          A* __restrict__ hidden, int64_t N, int64_t C, int64_t S,
                                                          int64_t L, int splits) {
  hidden_block<T, A>(partial, w1, b1, pooled, hidden, C, S, L, splits, mlp_block(N));
}

// logits[n, c] = sum_s act(hidden[n, s]) W2[c, s] + b2[c], gates = gate(logits).
template <typename T, typename A>
__device__ __forceinline__ void logits_block(const A* __restrict__ hidden, const T* __restrict__ w2,
                                             const T* __restrict__ b2, A* __restrict__ logits, A* __restrict__ gates,
                                             int64_t C, int64_t S, Act act, Gate gate, const MlpBlock& b) {
  auto z = [&](int64_t s) { return b.live && s < S ? activation(load_l2(hidden + b.n * S + s), act) : A(0); };
  auto w = [&](int64_t c, int64_t s) { return c < C && s < S ? static_cast<A>(w2[c * S + s]) : A(0); };
  const A acc = tile_gemm<true, A>(S, b, z, w);
  if (b.live && b.x < C) {
    const A u2 = acc + (b2 ? static_cast<A>(b2[b.x]) : A(0));
    logits[b.n * C + b.x] = u2;
    gates[b.n * C + b.x] = gate_fn(u2, gate);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) logits_kernel(const A* __restrict__ hidden, const T* __restrict__ w2,
                                                          const T* __restrict__ b2, A* __restrict__ logits,
                                                          A* __restrict__ gates, int64_t N, int64_t C, int64_t S,
                                                          Act act, Gate gate) {
  logits_block<T, A>(hidden, w2, b2, logits, gates, C, S, act, gate, mlp_block(N));
}

// y = out_act(x * g + residual) over one tile per warp (csrc/cuda/se_tiles.h), last tile first;
// with the relu (kRelu), the tile's mask bytes: the lanes' bits gathered by shuffles (vector
// path) or a ballot (scalar path). kVector: W-element 16-byte accesses, else one element a step.
// kPixelRows: channels_last rows, a gate per element; NCHW rows share one gate. kRes: a residual.
// Every per-lane pointer is set once; a step adds a compile-time offset.
template <typename T, typename A, bool kVector, bool kPixelRows, bool kRelu, bool kRes, bool kStreamed = false>
__device__ __forceinline__ void scale_tile(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                                           uint8_t* __restrict__ mask, const A* __restrict__ gates,
                                           const RowTiles& t, int64_t row_bytes, const Tile& tile) {
  constexpr int W = kVector ? tiles::vec_width<T>() : 1;
  constexpr int kSteps = kVector ? tiles::kTileSteps : tiles::kTileSteps * tiles::vec_width<T>();
  constexpr int kStride = tiles::step_stride<W>();
  constexpr int kByteStride = tiles::mask_bytes_per_step<W>();
  constexpr Hint kLast = kStreamed ? Hint::Last : Hint::Keep, kShared = kStreamed ? Hint::Coherent : Hint::Keep;
  const int lane = threadIdx.x % 32;
  const int size = tiles::tile_size(tile);
  const int o0 = tiles::step_offset<W>(0, lane);                    // this lane's first element in the tile
  const int64_t first = tile.row * t.row_len + tile.begin + o0;
  const T* __restrict__ xl = x + first;
  const T* __restrict__ rl = kRes ? res + first : nullptr;
  T* __restrict__ yl = y + first;
  const A* __restrict__ gl = gates + tile.gate_base + (kPixelRows ? tile.begin + o0 : 0);
  const int byte0 = kRelu ? tiles::mask_byte_in_tile<W>(0, lane, 1 << 30) : -1;  // -1: not a writer
  uint8_t* __restrict__ ml = kRelu ? mask + tile.row * row_bytes + tile.begin / 8 + (byte0 > 0 ? byte0 : 0) : nullptr;
  Pack<A, W> gv;
  if (!kPixelRows) {
    const A g = load_vector<kStreamed>(gl);
#pragma unroll
    for (int k = 0; k < W; ++k) gv.v[k] = g;
  }
  // Vector path: all of the tile's loads first (predicated, not behind branches), kSteps x 16 B
  // per tensor in flight per lane, then the arithmetic and the stores. The scalar path (the
  // fallback for odd rows or unaligned tensors) loads step by step: kSteps is 8-32 there; so does
  // double, where loading ahead spilled 8 B with the relu mask (ptxas, sm_80 and sm_90).
  // (The streamed kernel with a residual in a 2-byte type loads step by step too: loading ahead, it
  // spilled at the 128 registers of two blocks per SM; ptxas, sm_90.)
  constexpr bool kLoadAhead = kVector && sizeof(T) < 8 && !(kStreamed && kRes && sizeof(T) == 2);
  constexpr int kAhead = kLoadAhead ? kSteps : 0;
  Pack<T, W> xv[kSteps], rv[kSteps];
  Pack<A, W> gvs[kPixelRows ? kSteps : 1];
#pragma unroll
  for (int step = 0; step < kAhead; ++step) {
    if (o0 + step * kStride < size) {
      xv[step] = load_pack<T, W, kLast>(xl + step * kStride);
      if (kRes) rv[step] = load_pack<T, W, kLast>(rl + step * kStride);
      if (kPixelRows) gvs[step] = load_pack<A, W, kShared>(gl + step * kStride);
    }
  }
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    if (step * kStride >= size) break;  // warp-uniform: short rows end early
    unsigned bits = 0;
    if (o0 + step * kStride < size) {
      if (!kLoadAhead) {
        xv[step] = load_pack<T, W, kLast>(xl + step * kStride);
        if (kRes) rv[step] = load_pack<T, W, kLast>(rl + step * kStride);
        if (kPixelRows) gvs[step] = load_pack<A, W, kShared>(gl + step * kStride);
      }
      const Pack<A, W>& gs = kPixelRows ? gvs[step] : gv;
      Pack<T, W> yv;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        bool through;
        const A out = tiles::scale_element(static_cast<A>(xv[step].v[k]), gs.v[k],
                                           kRes ? static_cast<A>(rv[step].v[k]) : A(0), kRes, kRelu, &through);
        yv.v[k] = static_cast<T>(out);
        bits |= unsigned(through) << k;
      }
      store_pack<T, W, kStreamed>(yl + step * kStride, yv);
    }
    if constexpr (kRelu) {  // every lane takes part in the shuffles / ballot
      unsigned byte_bits;
      if constexpr (kVector) {
        byte_bits = bits;
#pragma unroll
        for (int k = 1; k < 8 / W; ++k) byte_bits |= __shfl_down_sync(0xffffffffu, bits, k) << (k * W);
      } else {
        byte_bits = __ballot_sync(0xffffffffu, bits != 0) >> (8 * (lane % 4));
      }
      // = tiles::mask_byte_in_tile<W>(step, lane, size), in its linear form
      if (byte0 >= 0 && (byte0 + step * kByteStride) * 8 < size) ml[step * kByteStride] = static_cast<uint8_t>(byte_bits);
    }
  }
}

template <typename T, typename A, bool kVector, bool kPixelRows, bool kRelu, bool kRes>
__global__ void __launch_bounds__(kThreads) scale_kernel(const T* __restrict__ x, const T* __restrict__ res,
                                                         T* __restrict__ y, uint8_t* __restrict__ mask,
                                                         const A* __restrict__ gates, RowTiles t,
                                                         int64_t row_bytes) {
  Tile tile;
  if (!tiles::tile_of(t, blockIdx.x, threadIdx.x / 32, /*reversed=*/true, &tile)) return;  // whole warps
  scale_tile<T, A, kVector, kPixelRows, kRelu, kRes>(x, res, y, mask, gates, t, row_bytes, tile);
}

// dz2[n, c] = dg * gate'(logits) (dg: the partials' sum) and the gates (stored by the first block
// of outputs), dz1[n, s] = (sum_c dz2[n, c] W2[c, s]) * act'(hidden[n, s]), z = act(hidden) for
// the weight gradients. The outputs (s) are W2's columns.
template <typename T, typename A>
__device__ __forceinline__ void dz1_block(const A* __restrict__ partial, const T* __restrict__ w2,
                                          const A* __restrict__ hidden, const A* __restrict__ logits,
                                          A* __restrict__ dz1, A* __restrict__ dz2, A* __restrict__ z,
                                          A* __restrict__ gates, int64_t C, int64_t S, int splits, Act act, Gate gate,
                                          const MlpBlock& b) {
  auto grad_logit = [&](int64_t c) {
    if (!b.live || c >= C) return A(0);
    A dg = 0;
    for (int k = 0; k < splits; ++k) dg += load_l2(partial + (b.n * splits + k) * C + c);
    const A u2 = logits[b.n * C + c], g = gate_fn(u2, gate);
    const A d = dg * gate_grad(u2, g, gate);
    if (b.first) dz2[b.n * C + c] = d, gates[b.n * C + c] = g;
    return d;
  };
  auto w = [&](int64_t c, int64_t s) { return c < C && s < S ? static_cast<A>(w2[c * S + s]) : A(0); };
  const A acc = tile_gemm<false, A>(C, b, grad_logit, w);
  if (b.live && b.x < S) {
    const A u1 = hidden[b.n * S + b.x];
    dz1[b.n * S + b.x] = acc * activation_grad(u1, act);
    z[b.n * S + b.x] = activation(u1, act);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) dz1_kernel(const A* __restrict__ partial, const T* __restrict__ w2,
                                                       const A* __restrict__ hidden, const A* __restrict__ logits,
                                                       A* __restrict__ dz1, A* __restrict__ dz2, A* __restrict__ z,
                                                       A* __restrict__ gates, int64_t N, int64_t C, int64_t S,
                                                       int splits, Act act, Gate gate) {
  dz1_block<T, A>(partial, w2, hidden, logits, dz1, dz2, z, gates, C, S, splits, act, gate, mlp_block(N));
}

// dp[n, c] = (sum_s dz1[n, s] W1[s, c]) / L, the gradient reaching each pooled value. The outputs
// (c) are W1's columns.
template <typename T, typename A>
__device__ __forceinline__ void dp_block(const A* __restrict__ dz1, const T* __restrict__ w1, A* __restrict__ dp,
                                         int64_t C, int64_t S, int64_t L, const MlpBlock& b) {
  auto d = [&](int64_t s) { return b.live && s < S ? load_l2(dz1 + b.n * S + s) : A(0); };
  auto w = [&](int64_t s, int64_t c) { return s < S && c < C ? static_cast<A>(w1[s * C + c]) : A(0); };
  const A acc = tile_gemm<false, A>(S, b, d, w);
  if (b.live && b.x < C) dp[b.n * C + b.x] = acc / A(L);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) dp_kernel(const A* __restrict__ dz1, const T* __restrict__ w1,
                                                      A* __restrict__ dp, int64_t N, int64_t C, int64_t S,
                                                      int64_t L) {
  dp_block<T, A>(dz1, w1, dp, C, S, L, mlp_block(N));
}

// grad_x = dy' * g + dp, grad_residual = dy' over one tile per warp, last tile first (tiles,
// template flags and per-lane pointers as scale_kernel's; kMasked: the relu epilogue's mask
// zeroes dy).
template <typename T, typename A, bool kVector, bool kPixelRows, bool kMasked, bool kStreamed = false>
__device__ __forceinline__ void grad_input_tile(const T* __restrict__ dy, const uint8_t* __restrict__ mask,
                                                const A* __restrict__ gates, const A* __restrict__ dp,
                                                T* __restrict__ dx, T* __restrict__ dres, const RowTiles& t,
                                                int64_t row_bytes, const Tile& tile) {
  constexpr int W = kVector ? tiles::vec_width<T>() : 1;
  constexpr int kSteps = kVector ? tiles::kTileSteps : tiles::kTileSteps * tiles::vec_width<T>();
  constexpr int kStride = tiles::step_stride<W>();
  constexpr Hint kLast = kStreamed ? Hint::Last : Hint::Keep, kShared = kStreamed ? Hint::Coherent : Hint::Keep;
  const int lane = threadIdx.x % 32;
  const int size = tiles::tile_size(tile);
  const int o0 = tiles::step_offset<W>(0, lane);
  const int64_t first = tile.row * t.row_len + tile.begin + o0;
  const T* __restrict__ dyl = dy + first;
  T* __restrict__ dxl = dx ? dx + first : nullptr;
  T* __restrict__ drl = dres ? dres + first : nullptr;
  const int64_t vec_base = tile.gate_base + (kPixelRows ? tile.begin + o0 : 0);
  // W <= 8 bits from each step's first element (a multiple of W; tiles start on a byte): one byte
  const uint8_t* __restrict__ ml = kMasked ? mask + tile.row * row_bytes + (tile.begin + o0) / 8 : nullptr;
  const int shift = o0 & 7;  // a step moves by a multiple of 8 elements
  Pack<A, W> gv, pv;
  if (!kPixelRows) {
    const A g = load_vector<kStreamed>(gates + vec_base), p = load_vector<kStreamed>(dp + vec_base);
#pragma unroll
    for (int k = 0; k < W; ++k) gv.v[k] = g, pv.v[k] = p;
  }
  // the tile's loads first on the vector path (predicated), then the arithmetic and stores, as
  // scale_kernel
  constexpr int kAhead = kVector ? kSteps : 0;
  Pack<T, W> dyv[kSteps];
  unsigned bits[kSteps];
  Pack<A, W> gvs[kPixelRows ? kSteps : 1], pvs[kPixelRows ? kSteps : 1];
  auto load_step = [&](int step) {
    bits[step] = 0xffu;
    dyv[step] = load_pack<T, W, kLast>(dyl + step * kStride);
    if (kMasked) bits[step] = unsigned(ml[step * kStride / 8]) >> shift;
    if (kPixelRows) {
      gvs[step] = load_pack<A, W, kShared>(gates + vec_base + step * kStride);
      pvs[step] = load_pack<A, W, kShared>(dp + vec_base + step * kStride);
    }
  };
#pragma unroll
  for (int step = 0; step < kAhead; ++step)
    if (o0 + step * kStride < size) load_step(step);
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    if (o0 + step * kStride >= size) continue;  // so are the lane's later steps
    if (!kVector) load_step(step);
    const Pack<A, W>& gs = kPixelRows ? gvs[step] : gv;
    const Pack<A, W>& ps = kPixelRows ? pvs[step] : pv;
    Pack<T, W> dxv, drv;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const A d = ((bits[step] >> k) & 1u) ? static_cast<A>(dyv[step].v[k]) : A(0);
      drv.v[k] = static_cast<T>(d);
      dxv.v[k] = static_cast<T>(tiles::grad_input_element(d, gs.v[k], ps.v[k]));
    }
    if (drl) store_pack<T, W, kStreamed>(drl + step * kStride, drv);
    if (dxl) store_pack<T, W, kStreamed>(dxl + step * kStride, dxv);
  }
}

template <typename T, typename A, bool kVector, bool kPixelRows, bool kMasked>
__global__ void __launch_bounds__(kThreads) grad_input_kernel(const T* __restrict__ dy,
                                                              const uint8_t* __restrict__ mask,
                                                              const A* __restrict__ gates, const A* __restrict__ dp,
                                                              T* __restrict__ dx, T* __restrict__ dres, RowTiles t,
                                                              int64_t row_bytes) {
  Tile tile;
  if (!tiles::tile_of(t, blockIdx.x, threadIdx.x / 32, /*reversed=*/true, &tile)) return;  // whole warps
  grad_input_tile<T, A, kVector, kPixelRows, kMasked>(dy, mask, gates, dp, dx, dres, t, row_bytes, tile);
}

// ---- flat tiles (csrc/cuda/se_tiles.h): NCHW rows of at most kFlatMaxL pixels -----------------
//
// A warp takes `rows` whole rows of a sample as one run of 16-byte vectors, kTileSteps steps' loads
// in flight at a time (two rounds at most; double: four of half as many steps). The tile's per-row
// values (gates; backward also dp) are staged in the warp's shared memory; a vector's elements take
// its first element's row r's, from `split` on row r + 1's (two shared loads). No warp-synchronous
// instructions in the steps (shuffles there cost divergence fallbacks in every step's code): the
// forward's relu bits go into a shared-memory bit image of the tile (element order) by shared
// atomic ORs (a lane's W bits lie in one word, at the same shift every step), then lane j writes
// row j's mask bytes from it; the backward first builds the image from the rows' bytes, then each
// vector reads its W bits from one word.

// A warp's shared memory for one flat tile.
template <typename A>
struct FlatShared {
  A rows[2][tiles::kFlatMaxRows + 1];         // per-row values (gates, dp); + 1: a vector's next row
  uint32_t image[tiles::kFlatImageWords];    // relu bits, one per element of the tile
};

// Steps whose loads are issued together (double: half as many; four ahead spilled, ptxas sm_90).
template <typename T>
constexpr int flat_round() {
  return sizeof(T) == 8 ? tiles::kTileSteps / 2 : tiles::kTileSteps;
}

// Stage the tile's per-row values of `v` (rows row0 ..) in `out` (lane j: row j's).
template <bool kStreamed, typename A>
__device__ __forceinline__ void flat_stage(A* __restrict__ out, const A* __restrict__ v, const tiles::FlatTile& tile,
                                           int lane) {
  if (lane < tile.rows) out[lane] = load_vector<kStreamed>(v + tile.row0 + lane);
}

// Zero the bit image of a tile of `size` elements: its words and the slack word past them.
__device__ __forceinline__ void flat_clear_image(uint32_t* __restrict__ image, int size, int lane) {
  for (int w = lane; w <= (size >> 5) + 1 && w < tiles::kFlatImageWords; w += 32) image[w] = 0;
}

// `p`, computed here once: ptxas otherwise rebuilds a per-lane pointer from the kernel parameter in
// every predicated step (3 instructions a load).
template <typename P>
__device__ __forceinline__ P* flat_pin(P* p) {
  asm volatile("" : "+l"(p));
  return p;
}

// Zero packs that are loaded under a predicate, for 2-byte types: left uninitialised there, nvcc
// kept one 2-byte element of a partly used pack in local memory (ptxas sm_90: stack frames in the
// bfloat16 variants); for wider types zeroing only costs instructions.
template <typename E, int W, int K>
__device__ __forceinline__ void flat_zero_narrow(Pack<E, W> (&packs)[K]) {
  if constexpr (sizeof(E) == 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) packs[k] = Pack<E, W>{};
  }
}

// The backward's bit image of a tile from its rows' relu-mask bytes (lane j: row j's; bits past a
// row's end dropped), ready for the whole warp.
__device__ __forceinline__ void flat_image_from_mask(uint32_t* __restrict__ image, const uint8_t* __restrict__ mask,
                                                     const tiles::FlatTiles& f, const tiles::FlatTile& tile,
                                                     int lane) {
  flat_clear_image(image, tile.size, lane);
  __syncwarp();
  if (lane < tile.rows) {
    const uint8_t* __restrict__ mr = mask + (tile.row0 + lane) * f.row_bytes;
    for (int b = 0; b < f.row_bytes; ++b)
      tiles::flat_image_add_byte(image, static_cast<int>(lane * f.L + 8 * b),
                                 unsigned(mr[b]) & ((1u << tiles::flat_byte_bits(f.L, b)) - 1u),
                                 [](uint32_t* p, unsigned v) { atomicOr(p, v); });
  }
  __syncwarp();
}

// Each element's per-row value: row r's before `split`, row r + 1's from it (split >= 1: the
// first element is in row r).
template <typename A, int W>
__device__ __forceinline__ Pack<A, W> flat_per_element(const A* __restrict__ rows, int r, int split) {
  const A a = rows[r], b = rows[r + 1];
  Pack<A, W> out;
  out.v[0] = a;
#pragma unroll
  for (int k = 1; k < W; ++k) out.v[k] = k < split ? a : b;
  return out;
}

template <typename T, typename A, bool kRelu, bool kRes, bool kStreamed = false>
__device__ __forceinline__ void flat_scale_tile(const T* __restrict__ x, const T* __restrict__ res,
                                                T* __restrict__ y, uint8_t* __restrict__ mask,
                                                const A* __restrict__ gates, const tiles::FlatTiles& f,
                                                const tiles::FlatTile& tile, FlatShared<A>& sh) {
  constexpr int W = tiles::vec_width<T>();
  constexpr int kRound = flat_round<T>();
  constexpr int kStride = tiles::step_stride<W>();
  const int lane = threadIdx.x % 32;
  const int o0 = tiles::step_offset<W>(0, lane);
  const int L = static_cast<int>(f.L);
  const int64_t first = tile.row0 * f.L + o0;
  const T* __restrict__ xl = flat_pin(x + first);
  const T* __restrict__ rl = kRes ? flat_pin(res + first) : nullptr;
  T* __restrict__ yl = flat_pin(y + first);
  flat_stage<kStreamed>(sh.rows[0], gates, tile, lane);
  if (kRelu) flat_clear_image(sh.image, tile.size, lane);
  __syncwarp();
  constexpr Hint kLast = kStreamed ? Hint::Last : Hint::Keep;  // x's and the residual's last read
  // this lane's image word at step s: (o0 + s * 32 W) / 32 = o0 / 32 + s W, at shift o0 % 32
  uint32_t* __restrict__ word = sh.image + (o0 >> 5);
  const int shift = o0 & 31;
#pragma unroll
  for (int round = 0; round < tiles::kFlatSteps / kRound; ++round) {
    if (round * kRound * kStride >= tile.size) break;  // warp-uniform
    Pack<T, W> xv[kRound], rv[kRound];
    flat_zero_narrow(xv);
    flat_zero_narrow(rv);
#pragma unroll
    for (int s = 0; s < kRound; ++s) {
      const int step = round * kRound + s;
      if (o0 + step * kStride < tile.size) {
        xv[s] = load_pack<T, W, kLast>(xl + step * kStride);
        if (kRes) rv[s] = load_pack<T, W, kLast>(rl + step * kStride);
      }
    }
#pragma unroll
    for (int s = 0; s < kRound; ++s) {
      const int step = round * kRound + s;
      const int d = o0 + step * kStride;
      if (d >= tile.size) break;  // so are the lane's later steps
      const int r = tiles::flat_row(d, f.magic);
      const Pack<A, W> gs = flat_per_element<A, W>(sh.rows[0], r, L - (d - r * L));
      unsigned bits = 0;
      Pack<T, W> yv;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        bool through;
        const A out = tiles::scale_element(static_cast<A>(xv[s].v[k]), gs.v[k],
                                           kRes ? static_cast<A>(rv[s].v[k]) : A(0), kRes, kRelu, &through);
        yv.v[k] = static_cast<T>(out);
        bits |= unsigned(through) << k;
      }
      store_pack<T, W, kStreamed>(yl + step * kStride, yv);
      if (kRelu) atomicOr(word + step * W, bits << shift);
    }
  }
  if constexpr (kRelu) {
    __syncwarp();
    if (lane < tile.rows) {
      uint8_t* __restrict__ mr = mask + (tile.row0 + lane) * f.row_bytes;
      for (int b = 0; b < f.row_bytes; ++b)
        mr[b] = static_cast<uint8_t>(
            tiles::flat_image_byte(sh.image, lane * L + 8 * b, tiles::flat_byte_bits(f.L, b)));
    }
  }
  __syncwarp();  // the shared memory is free for the warp's next tile
}

// Blocks per SM the flat kernels are compiled for: 2-byte types 2 (with the default bounds ptxas
// held the bfloat16 residual scale to 64 registers and spilled 8 B, sm_90; the double masked sums
// spilled 4 B on sm_80), others the default (with 2, the float32 relu + residual scale took 12.3
// SASS instructions an element, over the check's 12; 11.7 without).
template <typename T>
constexpr int flat_min_blocks() {
  return sizeof(T) == 2 || sizeof(T) == 8 ? 2 : 1;
}

template <typename T, typename A, bool kRelu, bool kRes>
__global__ void __launch_bounds__(kThreads, flat_min_blocks<T>())
    flat_scale_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y, uint8_t* __restrict__ mask,
                      const A* __restrict__ gates, tiles::FlatTiles f) {
  __shared__ FlatShared<A> shared[kWarps];
  tiles::FlatTile tile;
  if (!tiles::flat_tile_of(f, blockIdx.x, threadIdx.x / 32, /*reversed=*/true, &tile)) return;  // whole warps
  flat_scale_tile<T, A, kRelu, kRes>(x, res, y, mask, gates, f, tile, shared[threadIdx.x / 32]);
}

template <typename T, typename A, bool kMasked, bool kStreamed = false>
__device__ __forceinline__ void flat_grad_input_tile(const T* __restrict__ dy, const uint8_t* __restrict__ mask,
                                                     const A* __restrict__ gates, const A* __restrict__ dp,
                                                     T* __restrict__ dx, T* __restrict__ dres,
                                                     const tiles::FlatTiles& f, const tiles::FlatTile& tile,
                                                     FlatShared<A>& sh) {
  constexpr int W = tiles::vec_width<T>();
  constexpr int kRound = flat_round<T>();
  constexpr int kStride = tiles::step_stride<W>();
  const int lane = threadIdx.x % 32;
  const int o0 = tiles::step_offset<W>(0, lane);
  const int L = static_cast<int>(f.L);
  const int64_t first = tile.row0 * f.L + o0;
  const T* __restrict__ dyl = flat_pin(dy + first);
  T* __restrict__ dxl = dx ? flat_pin(dx + first) : nullptr;
  T* __restrict__ drl = dres ? flat_pin(dres + first) : nullptr;
  flat_stage<kStreamed>(sh.rows[0], gates, tile, lane);
  flat_stage<kStreamed>(sh.rows[1], dp, tile, lane);
  if constexpr (kMasked) flat_image_from_mask(sh.image, mask, f, tile, lane);
  __syncwarp();
  const uint32_t* __restrict__ word = sh.image + (o0 >> 5);  // as flat_scale_tile's
  const int shift = o0 & 31;
  constexpr Hint kLast = kStreamed ? Hint::Last : Hint::Keep;  // dy's last read
#pragma unroll
  for (int round = 0; round < tiles::kFlatSteps / kRound; ++round) {
    if (round * kRound * kStride >= tile.size) break;  // warp-uniform
    Pack<T, W> dyv[kRound];
    flat_zero_narrow(dyv);
#pragma unroll
    for (int s = 0; s < kRound; ++s) {
      const int step = round * kRound + s;
      if (o0 + step * kStride < tile.size) dyv[s] = load_pack<T, W, kLast>(dyl + step * kStride);
    }
#pragma unroll
    for (int s = 0; s < kRound; ++s) {
      const int step = round * kRound + s;
      const int d = o0 + step * kStride;
      if (d >= tile.size) break;  // so are the lane's later steps
      const int r = tiles::flat_row(d, f.magic);
      const int split = L - (d - r * L);
      const Pack<A, W> gs = flat_per_element<A, W>(sh.rows[0], r, split);
      const Pack<A, W> ps = flat_per_element<A, W>(sh.rows[1], r, split);
      const unsigned bits = kMasked ? word[step * W] >> shift : 0xffu;
      Pack<T, W> dxv, drv;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const A v = ((bits >> k) & 1u) ? static_cast<A>(dyv[s].v[k]) : A(0);
        drv.v[k] = static_cast<T>(v);
        dxv.v[k] = static_cast<T>(tiles::grad_input_element(v, gs.v[k], ps.v[k]));
      }
      if (drl) store_pack<T, W, kStreamed>(drl + step * kStride, drv);
      if (dxl) store_pack<T, W, kStreamed>(dxl + step * kStride, dxv);
    }
  }
  __syncwarp();  // the shared memory is free for the warp's next tile
}

template <typename T, typename A, bool kMasked>
__global__ void __launch_bounds__(kThreads, flat_min_blocks<T>())
    flat_grad_input_kernel(const T* __restrict__ dy, const uint8_t* __restrict__ mask, const A* __restrict__ gates,
                           const A* __restrict__ dp, T* __restrict__ dx, T* __restrict__ dres, tiles::FlatTiles f) {
  __shared__ FlatShared<A> shared[kWarps];
  tiles::FlatTile tile;
  if (!tiles::flat_tile_of(f, blockIdx.x, threadIdx.x / 32, /*reversed=*/true, &tile)) return;  // whole warps
  flat_grad_input_tile<T, A, kMasked>(dy, mask, gates, dp, dx, dres, f, tile, shared[threadIdx.x / 32]);
}

// partial[row] = the sum over a flat tile's rows of x (kDot: of dy' * x, dy' = dy where the relu
// mask let the output through): each round's vectors leave two partials each in shared memory
// (se_tiles.h, the flat tile's channel sums), which lane j adds for row j in a fixed order.
template <typename A>
struct FlatSumsShared {
  A part[2][tiles::kTileSteps * 32];       // a round's partials: first row's, next row's
  uint32_t image[tiles::kFlatImageWords];  // the backward's relu bits
};

template <typename T, typename A, bool kDot, bool kMasked, bool kStreamed = false>
__device__ __forceinline__ void flat_sums_tile(const T* __restrict__ x, const T* __restrict__ dy,
                                               const uint8_t* __restrict__ mask, A* __restrict__ partial,
                                               const tiles::FlatTiles& f, const tiles::FlatTile& tile,
                                               FlatSumsShared<A>& sh) {
  constexpr int W = tiles::vec_width<T>();
  constexpr int kRound = flat_round<T>();
  constexpr int kStride = tiles::step_stride<W>();
  // the streamed plan re-reads x (forward) or dy (backward) in its element-wise items: the
  // backward's x is a last read (as channel_sums_block's)
  constexpr Hint kLast = kStreamed ? Hint::Last : Hint::Keep;
  const int lane = threadIdx.x % 32;
  const int o0 = tiles::step_offset<W>(0, lane);
  const int L = static_cast<int>(f.L);
  const int64_t first = tile.row0 * f.L + o0;
  const T* __restrict__ xl = flat_pin(x + first);
  const T* __restrict__ dl = kDot ? flat_pin(dy + first) : nullptr;
  if constexpr (kMasked) flat_image_from_mask(sh.image, mask, f, tile, lane);
  const uint32_t* __restrict__ word = sh.image + (o0 >> 5);
  const int shift = o0 & 31;
  const int u_first = tiles::flat_row_first_entry(f.L, W, lane), u_last = tiles::flat_row_last_entry(f.L, W, lane);
  A acc = 0;
#pragma unroll
  for (int round = 0; round < tiles::kFlatSteps / kRound; ++round) {
    if (round * kRound * kStride >= tile.size) break;  // warp-uniform
    Pack<T, W> xv[kRound], dv[kRound];
    flat_zero_narrow(xv);
    flat_zero_narrow(dv);
#pragma unroll
    for (int s = 0; s < kRound; ++s) {
      const int step = round * kRound + s;
      if (o0 + step * kStride < tile.size) {
        if (kDot) {
          xv[s] = load_pack<T, W, kLast>(xl + step * kStride);
          dv[s] = load_pack<T, W, Hint::Keep>(dl + step * kStride);
        } else {
          xv[s] = load_pack<T, W, Hint::Keep>(xl + step * kStride);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kRound; ++s) {
      const int step = round * kRound + s;
      const int d = o0 + step * kStride;
      A a = 0, b = 0;
      if (d < tile.size) {
        const int r = tiles::flat_row(d, f.magic);
        const int split = L - (d - r * L);
        const unsigned bits = kMasked ? word[step * W] >> shift : 0xffu;
#pragma unroll
        for (int k = 0; k < W; ++k) {
          A v = static_cast<A>(xv[s].v[k]);
          if (kDot) v *= ((bits >> k) & 1u) ? static_cast<A>(dv[s].v[k]) : A(0);
          if (k == 0 || k < split) {
            a += v;
          } else {
            b += v;
          }
        }
      }
      sh.part[0][s * 32 + lane] = a;
      sh.part[1][s * 32 + lane] = b;
    }
    __syncwarp();
    if (lane < tile.rows) {  // row `lane`'s entries of this round, in order
      const int begin = round * kRound * 32, end = begin + kRound * 32;
      for (int u = max(u_first, begin); u <= u_last && u < end; ++u)
        acc += sh.part[tiles::flat_entry_second(f.L, W, lane, u) ? 1 : 0][u - begin];
    }
    __syncwarp();  // the partials are free for the next round
  }
  if (lane < tile.rows) partial[tile.row0 + lane] = acc;
}

template <typename T, typename A, bool kDot, bool kMasked>
__global__ void __launch_bounds__(kThreads, flat_min_blocks<T>())
    flat_sums_kernel(const T* __restrict__ x, const T* __restrict__ dy, const uint8_t* __restrict__ mask,
                     A* __restrict__ partial, tiles::FlatTiles f) {
  __shared__ FlatSumsShared<A> shared[kWarps];
  tiles::FlatTile tile;
  if (!tiles::flat_tile_of(f, blockIdx.x, threadIdx.x / 32, /*reversed=*/false, &tile)) return;  // whole warps
  flat_sums_tile<T, A, kDot, kMasked>(x, dy, mask, partial, f, tile, shared[threadIdx.x / 32]);
}

// Weight gradients over the batch chunk [k * per_chunk, (k + 1) * per_chunk): dW2[c, s] =
// sum_n dz2[n, c] z[n, s], dW1[s, c] = sum_n dz1[n, s] pooled[n, c], db2 = sum_n dz2, db1 =
// sum_n dz1, as two small GEMMs over the batch: a block per tile of kWgT channels x kWgT hidden
// units, the chunk's samples kWgT at a time through shared memory (the tile's columns of dz2 and
// pooled, of z and dz1: each value read once per block, not once per output), each thread 4 (c, s)
// pairs of both (lane: the channel; warp w: units w, w + 8, w + 16, w + 24), the samples added in
// order: deterministic. The bias gradients by the tiles of the first units (db2) and channels (db1).
// 1-D grid over (chunk, unit tiles, channel tiles), channel tiles fastest. One chunk: the outputs
// (O = T); several: float partials (chunk-major, each of the four laid out as its output), added by
// weight_grads_sum_kernel.
constexpr int kWgT = 32;

template <typename A, typename O>
__global__ void __launch_bounds__(kThreads) weight_grads_kernel(
    const A* __restrict__ dz1, const A* __restrict__ dz2, const A* __restrict__ z, const A* __restrict__ pooled,
    O* __restrict__ dw1, O* __restrict__ db1, O* __restrict__ dw2, O* __restrict__ db2, int64_t N, int64_t C,
    int64_t S, int64_t per_chunk) {
  static_assert(kThreads == 8 * kWgT, "a lane per channel, 8 warps over the units");
  constexpr int kPer = kWgT / kWarps;  // units per thread
  __shared__ A g2[kWgT][kWgT + 1], po[kWgT][kWgT + 1], zs[kWgT][kWgT + 1], g1[kWgT][kWgT + 1];
  const int64_t ctiles = (C + kWgT - 1) / kWgT, stiles = (S + kWgT - 1) / kWgT;
  const int64_t c0 = int64_t(blockIdx.x % ctiles) * kWgT;
  const int64_t s0 = int64_t(blockIdx.x / ctiles % stiles) * kWgT;
  const int64_t k = blockIdx.x / ctiles / stiles;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c = c0 + lane;
  const int64_t n_begin = k * per_chunk, n_end = min(N, (k + 1) * per_chunk);
  A w2[kPer] = {}, w1[kPer] = {}, b1[kPer] = {}, b2 = 0;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kWgT) {
    for (int row = warp; row < kWgT; row += kWarps) {  // sample n0 + row of each operand, coalesced
      const int64_t n = n0 + row;
      const bool live = n < n_end;
      g2[row][lane] = live && c < C ? dz2[n * C + c] : A(0);
      po[row][lane] = live && c < C ? pooled[n * C + c] : A(0);
      zs[row][lane] = live && s0 + lane < S ? z[n * S + s0 + lane] : A(0);
      g1[row][lane] = live && s0 + lane < S ? dz1[n * S + s0 + lane] : A(0);
    }
    __syncthreads();
    for (int j = 0; j < kWgT; ++j) {  // in sample order (zeros past the chunk's end)
      const A a2 = g2[j][lane], p = po[j][lane];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int u = warp + kWarps * i;
        w2[i] += a2 * zs[j][u];
        w1[i] += g1[j][u] * p;
        b1[i] += g1[j][u];
      }
      b2 += a2;
    }
    __syncthreads();
  }
  if (c >= C) return;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t s = s0 + warp + kWarps * i;
    if (s >= S) break;
    dw2[k * C * S + c * S + s] = static_cast<O>(w2[i]);
    dw1[k * S * C + s * C + c] = static_cast<O>(w1[i]);
    if (c == 0) db1[k * S + s] = static_cast<O>(b1[i]);
  }
  if (s0 == 0 && warp == 0) db2[k * C + c] = static_cast<O>(b2);
}

// out[i] = sum over chunks k (in order) of partial[k * size + i], for the four weight gradients
// laid out one after another (sizes S*C, S, C*S, C).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) weight_grads_sum_kernel(const A* __restrict__ partial,
                                                                    T* __restrict__ dw1, T* __restrict__ db1,
                                                                    T* __restrict__ dw2, T* __restrict__ db2,
                                                                    int64_t C, int64_t S, int64_t chunks) {
  int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const A* p = partial;
  T* out = dw1;
  int64_t size = S * C;
  if (j >= size) {
    j -= size, p += chunks * size, out = db1, size = S;
    if (j >= size) {
      j -= size, p += chunks * size, out = dw2, size = C * S;
      if (j >= size) {
        j -= size, p += chunks * size, out = db2, size = C;
        if (j >= size) return;
      }
    }
  }
  A acc = 0;
  for (int64_t k = 0; k < chunks; ++k) acc += p[k * size + j];
  out[j] = static_cast<T>(acc);
}

// ---- the streamed plan (csrc/cuda/se_stream.h): one persistent kernel per direction -------------

__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// About 17 s of waiting (128 ns sleeps): only a broken schedule waits that long; it then stops the
// kernel with an error (cudaErrorLaunchFailure at the next synchronisation) instead of hanging.
constexpr long long kMaxSpins = 1LL << 27;

// A block of the streamed kernels has claimed a number past the items: it counts itself out, and
// the last block out leaves every counter zero for the next launch on the stream (se_stream.h).
// last: a shared word the block has finished reading (run_streamed's claimed).
__device__ __forceinline__ void stream_finish(const stream::Schedule& s, unsigned long long* counters,
                                              long long& last) {
  if (threadIdx.x == 0) {
    __threadfence();  // this block's claims, waits and signals before its exit add
    last = atomicAdd(counters + s.exit_counter(), 1ull) == gridDim.x - 1;
    if (last) {
      __threadfence();
      // each block's claims (a count that does not add up: another launch shared the buffer)
      if (load_acquire(counters + s.claim_counter()) != static_cast<unsigned long long>(s.final_claims(gridDim.x)))
        __trap();
    }
  }
  __syncthreads();
  if (last)
    for (int64_t k = threadIdx.x; k < s.counters(); k += blockDim.x) counters[k] = 0;
}

// The block claims item numbers in increasing order until none is left and runs each with the
// whole block (run(item); the stage is uniform over the block, so the bodies' barriers are).
// Thread 0 claims the next number as soon as the current item starts, so that the claim's round
// trip overlaps the item's work: a block holds at most two numbers, and runs them in order, so
// the smallest unfinished item is always the one its block is running, and its dependencies (smaller
// numbers) are done: no block waits forever. Before an item of stage k > 0, thread 0 waits until
// every item of stage k - 1 of its group has signalled (an acquire load), then the block passes a
// barrier; after an item of stages 0-2, every thread fences its stores, the block passes a barrier,
// and thread 0 signals (the threadfence-reduction pattern of the CUDA programming guide). What the
// items exchange is read with load_l2 / Hint::Coherent: never from a stale L1 line. Its first number
// past the items ends it (stream_finish).
template <typename Run>
__device__ __forceinline__ void run_streamed(const stream::Schedule& s, unsigned long long* counters, Run run) {
  __shared__ long long claimed;
  unsigned long long* const claim = counters + s.claim_counter();
  const int64_t items = s.items();
  if (threadIdx.x == 0) claimed = static_cast<long long>(atomicAdd(claim, 1ull));
  __syncthreads();
  for (;;) {
    const int64_t i = claimed;
    __syncthreads();  // every thread has read it before thread 0 replaces it
    if (i >= items) {
      stream_finish(s, counters, claimed);
      return;
    }
    unsigned long long ahead = 0;
    if (threadIdx.x == 0) ahead = atomicAdd(claim, 1ull);
    const stream::Item it = stream::item_of(s, i);
    if (it.stage != stream::kNone) {
      if (it.stage != stream::kPool) {
        if (threadIdx.x == 0) {
          const unsigned long long* done = counters + s.counter(it.group, it.stage - 1);
          const auto need = static_cast<unsigned long long>(stream::stage_items(s, it.stage - 1));
          for (long long spins = 0; load_acquire(done) < need; ++spins) {
            if (spins > kMaxSpins) __trap();
            __nanosleep(128);
          }
          __threadfence();
        }
        __syncthreads();
      }
      run(it);
      if (it.stage != stream::kApply) {
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) atomicAdd(counters + s.counter(it.group, it.stage), 1ull);
      }
    }
    if (threadIdx.x == 0) claimed = static_cast<long long>(ahead);
    __syncthreads();
  }
}

// Blocks per SM the streamed kernels are compiled for: 2 (<= 128 registers, 16 warps resident),
// except 2-byte types in channels_last, whose element-wise tiles hold a float gate (and dp) per
// element: at 128 registers they spilled (ptxas, sm_90), so 1 block (<= 255 registers). (3 blocks,
// <= 80 registers, spilled in most variants. Each kernel's GEMMs keep their own shared tiles,
// 42 KiB in all: one set per accumulation type, through a shared reference, made dz1_kernel spill.)
template <typename T, bool kPixelRows>
constexpr int streamed_min_blocks() {
  return sizeof(T) == 2 && kPixelRows ? 1 : 2;
}

// The forward's stages over one group: channel sums of its samples (channel_sums_kernel's blocks,
// numbered from the group's first), hidden and logits over its samples (one MLP block of <= 8
// samples), scale over its tiles (16-byte path only), each as the split plan's kernels compute it.
template <typename T, typename A, bool kPixelRows, bool kRelu, bool kRes>
__global__ void __launch_bounds__(kThreads, streamed_min_blocks<T, kPixelRows>()) streamed_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w1, const T* __restrict__ b1,
    const T* __restrict__ w2, const T* __restrict__ b2, T* __restrict__ y, uint8_t* __restrict__ mask,
    A* __restrict__ partial, A* __restrict__ pooled, A* __restrict__ hidden, A* __restrict__ logits,
    A* __restrict__ gates, unsigned long long* __restrict__ counters, stream::Schedule s, Layout lay, RowTiles t,
    int64_t per_split, int splits, int64_t cblocks, Act act, Gate gate) {
  const int64_t tiles_per_sample = t.rows_per_sample * t.chunks;
  run_streamed(s, counters, [&](const stream::Item& it) {
    const int64_t n0 = stream::group_first(s, it.group), n1 = stream::group_end(s, it.group);
    if (it.stage == stream::kPool) {
      const int64_t blk = n0 * cblocks * splits + it.index;
      if (blk < n1 * cblocks * splits)
        channel_sums_block<T, A, !kPixelRows, true>(x, nullptr, nullptr, partial, lay, per_split, splits, cblocks,
                                                    false, false, blk);
    } else if (it.stage == stream::kFirst) {
      hidden_block<T, A>(partial, w1, b1, pooled, hidden, lay.C, lay.S, lay.L, splits, mlp_block_at(n0, n1, it.index));
    } else if (it.stage == stream::kSecond) {
      logits_block<T, A>(hidden, w2, b2, logits, gates, lay.C, lay.S, act, gate, mlp_block_at(n0, n1, it.index));
    } else {
      const int64_t k = stream::apply_tile(s, it.group, it.index, threadIdx.x / 32, tiles_per_sample, kWarps);
      if (k >= 0)
        scale_tile<T, A, true, kPixelRows, kRelu, kRes, true>(x, res, y, mask, gates, t, lay.row_bytes,
                                                              tiles::tile_at(t, k));
    }
  });
}

// The backward's: channel sums of dy' * x, dz1 (with dz2, the gates and act(hidden)), dp, grad_input;
// the weight gradients follow as in the split plan (they need every group).
template <typename T, typename A, bool kPixelRows, bool kMasked>
__global__ void __launch_bounds__(kThreads, streamed_min_blocks<T, kPixelRows>()) streamed_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const uint8_t* __restrict__ mask, const T* __restrict__ w1,
    const T* __restrict__ w2, const A* __restrict__ hidden, const A* __restrict__ logits, T* __restrict__ dx,
    T* __restrict__ dres, A* __restrict__ partial, A* __restrict__ dz1, A* __restrict__ dz2, A* __restrict__ z,
    A* __restrict__ gates, A* __restrict__ dp, unsigned long long* __restrict__ counters, stream::Schedule s,
    Layout lay, RowTiles t, int64_t per_split, int splits, int64_t cblocks, Act act, Gate gate) {
  const int64_t tiles_per_sample = t.rows_per_sample * t.chunks;
  run_streamed(s, counters, [&](const stream::Item& it) {
    const int64_t n0 = stream::group_first(s, it.group), n1 = stream::group_end(s, it.group);
    if (it.stage == stream::kPool) {
      const int64_t blk = n0 * cblocks * splits + it.index;
      if (blk < n1 * cblocks * splits)
        channel_sums_block<T, A, !kPixelRows, true>(x, dy, mask, partial, lay, per_split, splits, cblocks, true,
                                                    kMasked, blk);
    } else if (it.stage == stream::kFirst) {
      dz1_block<T, A>(partial, w2, hidden, logits, dz1, dz2, z, gates, lay.C, lay.S, splits, act, gate,
                      mlp_block_at(n0, n1, it.index));
    } else if (it.stage == stream::kSecond) {
      dp_block<T, A>(dz1, w1, dp, lay.C, lay.S, lay.L, mlp_block_at(n0, n1, it.index));
    } else {
      const int64_t k = stream::apply_tile(s, it.group, it.index, threadIdx.x / 32, tiles_per_sample, kWarps);
      if (k >= 0)
        grad_input_tile<T, A, true, kPixelRows, kMasked, true>(dy, mask, gates, dp, dx, dres, t, lay.row_bytes,
                                                               tiles::tile_at(t, k));
    }
  });
}

// The streamed plan on flat tiles (se_tiles.h; NCHW rows of at most kFlatMaxL pixels): the same
// stages, the pool items' warps taking the group's flat tiles in order (stream::pool_tile, one
// split: whole rows), the apply items' last-first (stream::apply_tile). Each warp's flat buffers are
// dynamic shared memory (flat_stream_smem): with the GEMMs' 42 KiB of static tiles they are over the
// 48 KiB a kernel's static shared memory may hold.
template <typename A>
union FlatStreamShared {
  FlatShared<A> apply;
  FlatSumsShared<A> sums;
};

template <typename A>
constexpr size_t flat_stream_smem() {
  return sizeof(FlatStreamShared<A>) * kWarps;
}

template <typename A>
__device__ __forceinline__ FlatStreamShared<A>& flat_stream_shared() {
  extern __shared__ __align__(16) unsigned char flat_stream_bytes[];
  return reinterpret_cast<FlatStreamShared<A>*>(flat_stream_bytes)[threadIdx.x / 32];
}

template <typename T, typename A, bool kRelu, bool kRes>
__global__ void __launch_bounds__(kThreads, streamed_min_blocks<T, false>()) flat_streamed_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w1, const T* __restrict__ b1,
    const T* __restrict__ w2, const T* __restrict__ b2, T* __restrict__ y, uint8_t* __restrict__ mask,
    A* __restrict__ partial, A* __restrict__ pooled, A* __restrict__ hidden, A* __restrict__ logits,
    A* __restrict__ gates, unsigned long long* __restrict__ counters, stream::Schedule s, Layout lay,
    tiles::FlatTiles f, Act act, Gate gate) {
  FlatStreamShared<A>& sh = flat_stream_shared<A>();
  const int warp = threadIdx.x / 32;
  run_streamed(s, counters, [&](const stream::Item& it) {
    const int64_t n0 = stream::group_first(s, it.group), n1 = stream::group_end(s, it.group);
    if (it.stage == stream::kPool) {
      const int64_t k = stream::pool_tile(s, it.group, it.index, warp, f.tiles_per_sample, kWarps);
      if (k >= 0)
        flat_sums_tile<T, A, false, false, true>(x, nullptr, nullptr, partial, f, tiles::flat_tile_at(f, k), sh.sums);
    } else if (it.stage == stream::kFirst) {
      hidden_block<T, A>(partial, w1, b1, pooled, hidden, lay.C, lay.S, lay.L, 1, mlp_block_at(n0, n1, it.index));
    } else if (it.stage == stream::kSecond) {
      logits_block<T, A>(hidden, w2, b2, logits, gates, lay.C, lay.S, act, gate, mlp_block_at(n0, n1, it.index));
    } else {
      const int64_t k = stream::apply_tile(s, it.group, it.index, warp, f.tiles_per_sample, kWarps);
      if (k >= 0)
        flat_scale_tile<T, A, kRelu, kRes, true>(x, res, y, mask, gates, f, tiles::flat_tile_at(f, k), sh.apply);
    }
  });
}

template <typename T, typename A, bool kMasked>
__global__ void __launch_bounds__(kThreads, streamed_min_blocks<T, false>()) flat_streamed_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const uint8_t* __restrict__ mask, const T* __restrict__ w1,
    const T* __restrict__ w2, const A* __restrict__ hidden, const A* __restrict__ logits, T* __restrict__ dx,
    T* __restrict__ dres, A* __restrict__ partial, A* __restrict__ dz1, A* __restrict__ dz2, A* __restrict__ z,
    A* __restrict__ gates, A* __restrict__ dp, unsigned long long* __restrict__ counters, stream::Schedule s,
    Layout lay, tiles::FlatTiles f, Act act, Gate gate) {
  FlatStreamShared<A>& sh = flat_stream_shared<A>();
  const int warp = threadIdx.x / 32;
  run_streamed(s, counters, [&](const stream::Item& it) {
    const int64_t n0 = stream::group_first(s, it.group), n1 = stream::group_end(s, it.group);
    if (it.stage == stream::kPool) {
      const int64_t k = stream::pool_tile(s, it.group, it.index, warp, f.tiles_per_sample, kWarps);
      if (k >= 0)
        flat_sums_tile<T, A, true, kMasked, true>(x, dy, mask, partial, f, tiles::flat_tile_at(f, k), sh.sums);
    } else if (it.stage == stream::kFirst) {
      dz1_block<T, A>(partial, w2, hidden, logits, dz1, dz2, z, gates, lay.C, lay.S, 1, act, gate,
                      mlp_block_at(n0, n1, it.index));
    } else if (it.stage == stream::kSecond) {
      dp_block<T, A>(dz1, w1, dp, lay.C, lay.S, lay.L, mlp_block_at(n0, n1, it.index));
    } else {
      const int64_t k = stream::apply_tile(s, it.group, it.index, warp, f.tiles_per_sample, kWarps);
      if (k >= 0)
        flat_grad_input_tile<T, A, kMasked, true>(dy, mask, gates, dp, dx, dres, f, tiles::flat_tile_at(f, k),
                                                  sh.apply);
    }
  });
}

// ---- the generic channel-attention path's stage ops (se_kernels/attention.py) -------------------
// ca_pool and ca_gate_grad are channel_sums_kernel (the splits' partials added after, in order),
// ca_scale is scale_kernel and the average squeeze's ca_input_grad grad_input_kernel, given the
// gates and dp = dmean / HW; where flat tiles apply (short NCHW rows), flat_sums_kernel,
// flat_scale_kernel and flat_grad_input_kernel. The average + max squeeze adds ca_channel_max_kernel
// and ca_grad_input_max_kernel.

template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  return (a != a || a >= b) ? a : b;  // NaN wins, as torch.amax
}

// max[n, c] over the pixels (NaN if any is NaN) and ties[n, c], how many pixels equal it (0 for
// NaN): first the max, then the count (the channel still in L1/L2). 1-D grid over (N, channel
// blocks), laid out as channel_sums_kernel's: NCHW one warp per channel, lanes along the pixels;
// channels_last 32 channels along x, 8 pixel lanes along y, combined through shared memory.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) ca_channel_max_kernel(const T* __restrict__ x, T* __restrict__ mx,
                                                                  A* __restrict__ ties, Layout lay,
                                                                  int64_t cblocks) {
  const int64_t block = blockIdx.x % cblocks;
  const int64_t n = blockIdx.x / cblocks;
  if (!lay.pixel_rows) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t c = block * kWarps + warp;
    if (c >= lay.C) return;
    const T* __restrict__ row = x + (n * lay.C + c) * lay.L;
    A best = static_cast<A>(row[0]);
    for (int64_t l = lane; l < lay.L; l += 32) best = nan_max(best, static_cast<A>(row[l]));
    for (int offset = 16; offset > 0; offset /= 2) best = nan_max(best, __shfl_xor_sync(0xffffffffu, best, offset));
    A count = 0;
    for (int64_t l = lane; l < lay.L; l += 32) count += static_cast<A>(static_cast<A>(row[l]) == best);
    count = warp_sum(count);
    if (lane == 0) {
      mx[n * lay.C + c] = static_cast<T>(best);
      ties[n * lay.C + c] = best != best ? A(0) : count;
    }
  } else {
    __shared__ A part[8][32];
    const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const int64_t c = block * 32 + tx;
    const bool live = c < lay.C;
    A best = live ? static_cast<A>(x[lay.offset(n, c, 0)]) : A(0);
    if (live)
      for (int64_t l = ty; l < lay.L; l += 8) best = nan_max(best, static_cast<A>(x[lay.offset(n, c, l)]));
    part[ty][tx] = best;
    __syncthreads();
    for (int k = 0; k < 8; ++k) best = nan_max(best, part[k][tx]);  // every ty: the same order, the same max
    __syncthreads();
    A count = 0;
    if (live)
      for (int64_t l = ty; l < lay.L; l += 8) count += static_cast<A>(static_cast<A>(x[lay.offset(n, c, l)]) == best);
    part[ty][tx] = count;
    __syncthreads();
    if (ty == 0 && live) {
      A total = 0;
      for (int k = 0; k < 8; ++k) total += part[k][tx];
      mx[n * lay.C + c] = static_cast<T>(best);
      ties[n * lay.C + c] = best != best ? A(0) : total;
    }
  }
}

// The max squeeze's input gradient: dy' = dy masked by the relu mask; dx = dy' * g + dp + (x == max
// ? dm : 0), dres = dy'; g, dp, max and dm per (n, c). One warp per row (grid-stride over the
// rows), lanes along it: the (n, c) of an element from one division per row, none per element
// (a 64-bit division per element is a called routine with a stack frame: it spilled on sm_90).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) ca_grad_input_max_kernel(
    const T* __restrict__ dy, const uint8_t* __restrict__ mask, const A* __restrict__ gates, const A* __restrict__ dp,
    const T* __restrict__ x, const T* __restrict__ mx, const A* __restrict__ dm, T* __restrict__ dx,
    T* __restrict__ dres, Layout lay, int64_t rows) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * int64_t(kWarps) + warp; row < rows; row += int64_t(gridDim.x) * kWarps) {
    const int64_t base = row * lay.row_len;
    const int64_t v0 = lay.pixel_rows ? row / lay.L * lay.C : row;  // channels_last rows: (n, c) = v0 + col
    const uint8_t* __restrict__ mrow = mask != nullptr ? mask + row * lay.row_bytes : nullptr;
    for (int64_t col = lane; col < lay.row_len; col += 32) {
      const int64_t i = base + col, v = lay.pixel_rows ? v0 + col : v0;
      A d = static_cast<A>(dy[i]);
      if (mrow != nullptr && !((mrow[col >> 3] >> (col & 7)) & 1)) d = A(0);
      if (dres != nullptr) dres[i] = static_cast<T>(d);
      if (dx != nullptr) {
        A out = d * gates[v] + dp[v];
        if (static_cast<A>(x[i]) == static_cast<A>(mx[v])) out += dm[v];
        dx[i] = static_cast<T>(out);
      }
    }
  }
}

// ---- host ----------------------------------------------------------------------------------------

// A 1-D grid of `blocks` blocks (grid.x allows 2^31 - 1; y and z only 65535).
unsigned int grid_1d(int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int32_t>::max(), "se_kernels: a launch would need ",
              blocks, " blocks, over CUDA's grid limit");
  return static_cast<unsigned int>(blocks);
}

struct Splits {
  int splits;
  int64_t per_split;
};

// An attribute of the current device, queried once per (device, attribute).
int device_attribute(cudaDeviceAttr attr) {
  static std::mutex lock;
  static std::map<std::pair<int, int>, int> values;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> hold(lock);
  auto it = values.find({device, static_cast<int>(attr)});
  if (it == values.end()) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
    it = values.emplace(std::make_pair(device, static_cast<int>(attr)), value).first;
  }
  return it->second;
}

int multiprocessors() {
  return device_attribute(cudaDevAttrMultiProcessorCount);
}

// Enough blocks for the pixel reduction to fill the GPU: 4 per multiprocessor. Each split's
// pixels are a multiple of 32 (NCHW: a warp's 32 lanes along the pixels start aligned).
Splits pixel_splits(const Geometry& g, int64_t channel_blocks) {
  const int sms = multiprocessors();
  const int64_t blocks = std::max<int64_t>(1, g.N * channel_blocks);
  const int64_t wanted = std::max<int64_t>(1, (4 * sms + blocks - 1) / blocks);
  const int64_t splits = std::min<int64_t>(std::max<int64_t>(1, g.L / 32), wanted);
  const int64_t per_split = ((g.L + splits - 1) / splits + 31) / 32 * 32;
  return {static_cast<int>((g.L + per_split - 1) / per_split), per_split};
}

// Whether every given tensor (nullptr: absent) starts on 16 bytes, as 16-byte accesses need.
bool aligned16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// The element-wise kernels' tiles: 16-byte accesses when every tensor they touch is aligned
// (rows then start aligned too when the row length is a multiple of the vector).
template <typename T>
RowTiles element_tiles(const Geometry& g, std::initializer_list<const void*> pointers) {
  return tiles::make_row_tiles(g.N, g.C, g.L, g.pixel_rows, tiles::vec_width<T>(), aligned16(pointers));
}

// The element-wise kernels' compile-time variants, picked at run time.
template <typename T, typename A>
auto scale_variant(bool vector, bool pixel_rows, bool relu, bool res) {
  using Kernel = void (*)(const T*, const T*, T*, uint8_t*, const A*, RowTiles, int64_t);
  const Kernel table[16] = {
      scale_kernel<T, A, false, false, false, false>, scale_kernel<T, A, false, false, false, true>,
      scale_kernel<T, A, false, false, true, false>,  scale_kernel<T, A, false, false, true, true>,
      scale_kernel<T, A, false, true, false, false>,  scale_kernel<T, A, false, true, false, true>,
      scale_kernel<T, A, false, true, true, false>,   scale_kernel<T, A, false, true, true, true>,
      scale_kernel<T, A, true, false, false, false>,  scale_kernel<T, A, true, false, false, true>,
      scale_kernel<T, A, true, false, true, false>,   scale_kernel<T, A, true, false, true, true>,
      scale_kernel<T, A, true, true, false, false>,   scale_kernel<T, A, true, true, false, true>,
      scale_kernel<T, A, true, true, true, false>,    scale_kernel<T, A, true, true, true, true>};
  return table[8 * vector + 4 * pixel_rows + 2 * relu + res];
}

template <typename T, typename A>
auto grad_input_variant(bool vector, bool pixel_rows, bool masked) {
  using Kernel = void (*)(const T*, const uint8_t*, const A*, const A*, T*, T*, RowTiles, int64_t);
  const Kernel table[8] = {
      grad_input_kernel<T, A, false, false, false>, grad_input_kernel<T, A, false, false, true>,
      grad_input_kernel<T, A, false, true, false>,  grad_input_kernel<T, A, false, true, true>,
      grad_input_kernel<T, A, true, false, false>,  grad_input_kernel<T, A, true, false, true>,
      grad_input_kernel<T, A, true, true, false>,   grad_input_kernel<T, A, true, true, true>};
  return table[4 * vector + 2 * pixel_rows + masked];
}

// The flat tiles of an element-wise pass (csrc/cuda/se_tiles.h), or false for row tiles.
template <typename T>
bool flat_tiles(const Geometry& g, std::initializer_list<const void*> pointers, tiles::FlatTiles* out) {
  if (!tiles::flat_tiles_apply(g.C, g.L, g.pixel_rows, tiles::vec_width<T>(), aligned16(pointers))) return false;
  *out = tiles::make_flat_tiles(g.N, g.C, g.L, tiles::vec_width<T>());
  return true;
}

template <typename T, typename A>
auto flat_scale_variant(bool relu, bool res) {
  using Kernel = void (*)(const T*, const T*, T*, uint8_t*, const A*, tiles::FlatTiles);
  const Kernel table[4] = {flat_scale_kernel<T, A, false, false>, flat_scale_kernel<T, A, false, true>,
                           flat_scale_kernel<T, A, true, false>, flat_scale_kernel<T, A, true, true>};
  return table[2 * relu + res];
}

template <typename T, typename A>
auto flat_sums_variant(bool dot, bool masked) {
  return !dot ? flat_sums_kernel<T, A, false, false>
              : masked ? flat_sums_kernel<T, A, true, true> : flat_sums_kernel<T, A, true, false>;
}

template <typename T, typename A>
auto flat_grad_input_variant(bool masked) {
  return masked ? flat_grad_input_kernel<T, A, true> : flat_grad_input_kernel<T, A, false>;
}

// Whether the NCHW channel sums can load 16 bytes a lane (per_split is a multiple of 32, so each
// split starts on a vector).
template <typename T>
bool sums_vector(const Geometry& g, const void* x, const void* dy) {
  return !g.pixel_rows && g.L % tiles::vec_width<T>() == 0 && aligned16({x, dy});
}

// Weight gradients: the batch in chunks of at least kWeightGradChunk samples, as few as give
// two blocks per SM (a block sums its chunk's samples in series, 32 a step): one chunk where the
// output tiles fill the GPU already (no partials, no second kernel); else the chunks' partial sums
// are added in order by a second kernel.
constexpr int64_t kWeightGradChunk = 32;

int64_t weight_grad_chunks(const Geometry& g) {
  const int64_t tiles = (g.C + kWgT - 1) / kWgT * ((g.S + kWgT - 1) / kWgT);
  const int64_t most = (g.N + kWeightGradChunk - 1) / kWeightGradChunk;
  return std::max<int64_t>(1, std::min(most, (2 * int64_t(multiprocessors()) + tiles - 1) / tiles));
}

int64_t channel_blocks(const Geometry& g) {
  return g.pixel_rows ? (g.C + 31) / 32 : (g.C + kWarps - 1) / kWarps;
}

void check_cuda_inputs(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors)
    TORCH_CHECK(t.is_cuda(), "se_kernels: the cuda kernels take CUDA tensors; got one on ", t.device());
}

// ---- host: the streamed plan ------------------------------------------------------------------

// The L2 bytes the streamed plan counts on keeping between a group's first read and its re-read:
// half of the device's L2 (what is touched from both L2 partitions may be held twice), queried
// once per device. SE_KERNELS_STREAM_BUDGET (bytes) overrides it: 0 never streams, a small
// value streams small batches (the tests compare both plans that way).
int64_t stream_budget() {
  if (const char* env = std::getenv("SE_KERNELS_STREAM_BUDGET")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && v >= 0,
                "se_kernels: SE_KERNELS_STREAM_BUDGET must be a byte count >= 0; got '", env, "'");
    return v;
  }
  return int64_t(device_attribute(cudaDevAttrL2CacheSize)) / 2;
}

// The streamed schedule of an op over g, or false for the split plan: the streamed kernels take the
// 16-byte paths only (the element-wise tiles' and, NCHW, the channel sums'), not double, and
// csrc/cuda/se_stream.h's make_schedule decides from the bytes per sample.
// The streamed plan's pixel splits: channel-sum items of about kStreamItemBytes of x, as large as an
// element-wise item's loads (8 tiles x 2 KiB), so that a group's sums finish soon after they are
// claimed (the split plan's splits only fill the GPU: a whole 3136-pixel row per block at batch 256).
// Splits are multiples of 32 pixels, as the NCHW 16-byte channel sums need.
constexpr int64_t kStreamItemBytes = 16384;

Splits stream_splits(const Geometry& g, int64_t elem) {
  const int64_t channels = g.pixel_rows ? 32 : kWarps;  // channels of one channel-sum block
  const int64_t whole = (g.L + 31) / 32 * 32;
  const int64_t per_split = std::min(whole, std::max<int64_t>(32, kStreamItemBytes / (channels * elem) / 32 * 32));
  return {static_cast<int>((g.L + per_split - 1) / per_split), per_split};
}

template <typename T>
bool streamed_schedule(const Geometry& g, const RowTiles& t, bool sums_vector_ok, int64_t cblocks, const Splits& sp,
                       int64_t kept, int64_t touched, stream::Schedule* out) {
  if (std::is_same_v<T, double> || !t.vector || (!g.pixel_rows && !sums_vector_ok)) return false;
  if (g.N * touched <= stream_budget()) return false;
  const stream::StreamShape shape{g.N, kept, stream_budget(), cblocks * sp.splits, (g.S + kMlpT - 1) / kMlpT,
                                  (g.C + kMlpT - 1) / kMlpT, t.rows_per_sample * t.chunks, kWarps};
  return stream::make_schedule(shape, out);
}

// A persistent grid: as many blocks as fit on the device at once (more would only wait to claim
// items), at most one per item. smem: the kernel's dynamic shared memory.
template <typename Kernel>
unsigned int streamed_grid(Kernel kernel, const stream::Schedule& s, size_t smem = 0) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  return grid_1d(std::min<int64_t>(s.items(), int64_t(std::max(per_sm, 1)) * multiprocessors()));
}

// The flat tiles' streamed schedule (se_stream.h; pool and apply items both 8 warps' tiles).
bool flat_streamed_schedule(const Geometry& g, const tiles::FlatTiles& f, int64_t kept, int64_t touched,
                            stream::Schedule* out) {
  if (g.N * touched <= stream_budget()) return false;
  const stream::StreamShape shape{g.N, kept, stream_budget(), f.tiles_per_sample, (g.S + kMlpT - 1) / kMlpT,
                                  (g.C + kMlpT - 1) / kMlpT, f.tiles_per_sample, kWarps, kWarps};
  return stream::make_schedule(shape, out);
}

// A flat streamed kernel's dynamic shared memory, allowed past the 48 KiB default (its static
// GEMM tiles take 42 KiB): set once per (device, kernel), as device_attribute queries once.
template <typename A, typename Kernel>
size_t flat_stream_prepare(Kernel kernel) {
  static std::mutex lock;
  static std::set<std::pair<int, const void*>> done;
  const size_t smem = flat_stream_smem<A>();
  const std::pair<int, const void*> key{c10::cuda::current_device(), reinterpret_cast<const void*>(kernel)};
  const std::lock_guard<std::mutex> hold(lock);
  if (done.count(key) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    done.insert(key);
  }
  return smem;
}

// The streamed kernels' counters (stream::Schedule::counters() of them), zero: one buffer per
// (device, stream), kept between launches, since each launch leaves its counters zero again
// (stream_finish): no fill before each launch. Launches on one stream run in order, so they never
// share it at once; a larger schedule replaces it (the old one is freed in stream order). While the
// stream captures a CUDA graph, a fresh buffer as before (the zero fill is then part of the graph,
// and replays never touch an eager launch's buffer). The map is never destroyed: its tensors would
// otherwise be freed after the CUDA caching allocator at exit.
at::Tensor stream_counters(const at::Tensor& x, int64_t n, cudaStream_t stream) {
  const at::TensorOptions options = x.options().dtype(at::kLong);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return at::zeros({n}, options);
  static std::mutex lock;
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> hold(lock);
  at::Tensor& buffer = (*buffers)[{static_cast<int>(x.get_device()), stream}];
  if (!buffer.defined() || buffer.numel() < n) buffer = at::zeros({std::max<int64_t>(n, 1024)}, options);
  return buffer;
}

template <typename T, typename A>
auto flat_streamed_forward_variant(bool relu, bool res) {
  using Kernel = decltype(&flat_streamed_forward_kernel<T, A, false, false>);
  const Kernel table[4] = {
      flat_streamed_forward_kernel<T, A, false, false>, flat_streamed_forward_kernel<T, A, false, true>,
      flat_streamed_forward_kernel<T, A, true, false>, flat_streamed_forward_kernel<T, A, true, true>};
  return table[2 * relu + res];
}

template <typename T, typename A>
auto flat_streamed_backward_variant(bool masked) {
  return masked ? flat_streamed_backward_kernel<T, A, true> : flat_streamed_backward_kernel<T, A, false>;
}

template <typename T, typename A>
auto streamed_forward_variant(bool pixel_rows, bool relu, bool res) {
  using Kernel = decltype(&streamed_forward_kernel<T, A, false, false, false>);
  const Kernel table[8] = {
      streamed_forward_kernel<T, A, false, false, false>, streamed_forward_kernel<T, A, false, false, true>,
      streamed_forward_kernel<T, A, false, true, false>,  streamed_forward_kernel<T, A, false, true, true>,
      streamed_forward_kernel<T, A, true, false, false>,  streamed_forward_kernel<T, A, true, false, true>,
      streamed_forward_kernel<T, A, true, true, false>,   streamed_forward_kernel<T, A, true, true, true>};
  return table[4 * pixel_rows + 2 * relu + res];
}

template <typename T, typename A>
auto streamed_backward_variant(bool pixel_rows, bool masked) {
  using Kernel = decltype(&streamed_backward_kernel<T, A, false, false>);
  const Kernel table[4] = {streamed_backward_kernel<T, A, false, false>, streamed_backward_kernel<T, A, false, true>,
                           streamed_backward_kernel<T, A, true, false>, streamed_backward_kernel<T, A, true, true>};
  return table[2 * pixel_rows + masked];
}

// Blocks of the MLP kernels: sample blocks x blocks of 32 outputs.
int64_t mlp_blocks(const Geometry& g, int64_t outputs) {
  return (g.N + kMlpN - 1) / kMlpN * ((outputs + kMlpT - 1) / kMlpT);
}

// Bytes per sample of `tensors` x-sized tensors and the relu mask. The split plan touches, between
// a tile's first read and its re-read (it has no eviction hints), forward x [+ residual] and y,
// backward dy, x, dx [+ d_residual]: where the whole batch's fit the L2 budget its re-read is an L2
// hit already and the streamed plan is not used. The streamed plan keeps one tensor, x (backward
// dy), and the mask: everything else is read once or written with evict-first hints (Hint,
// store_pack), which leave those lines first.
int64_t sample_bytes(const Geometry& g, int64_t elem, int tensors, bool mask) {
  return tensors * g.C * g.L * elem + (mask ? g.rows * g.mask_row_bytes : 0);
}

// The forward as one streamed kernel where csrc/cuda/se_stream.h says it pays; false: run the
// split plan. The blocks' arithmetic is the split plan's; only the pixel splits of the channel sums
// differ (stream_splits), so pooled values may differ from the split plan's in the last bits.
template <typename T, typename A>
bool forward_streamed(const Geometry& g, const at::Tensor& x, const T* res, const at::Tensor& w1, const T* b1,
                      const at::Tensor& w2, const T* b2, at::Tensor& y, at::Tensor& mask, at::Tensor& pooled,
                      at::Tensor& hidden, at::Tensor& logits, at::Tensor& gates, const RowTiles& t,
                      const tiles::FlatTiles* flat, int64_t cblocks, bool out_relu, Act act, Gate gate,
                      cudaStream_t stream) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    stream::Schedule s;
    if (flat != nullptr) {  // short NCHW rows: flat tiles, one split
      if (!flat_streamed_schedule(g, *flat, sample_bytes(g, sizeof(T), 1, out_relu),
                                  sample_bytes(g, sizeof(T), 2 + (res != nullptr), out_relu), &s))
        return false;
      at::Tensor partial = at::empty({g.N, 1, g.C}, pooled.options());
      at::Tensor counters = stream_counters(x, s.counters(), stream);
      const auto kernel = flat_streamed_forward_variant<T, A>(out_relu, res != nullptr);
      const size_t smem = flat_stream_prepare<A>(kernel);
      kernel<<<streamed_grid(kernel, s, smem), kThreads, smem, stream>>>(
          x.const_data_ptr<T>(), res, w1.const_data_ptr<T>(), b1, w2.const_data_ptr<T>(), b2, y.mutable_data_ptr<T>(),
          out_relu ? mask.mutable_data_ptr<uint8_t>() : nullptr, partial.mutable_data_ptr<A>(),
          pooled.mutable_data_ptr<A>(), hidden.mutable_data_ptr<A>(), logits.mutable_data_ptr<A>(),
          gates.mutable_data_ptr<A>(), reinterpret_cast<unsigned long long*>(counters.mutable_data_ptr<int64_t>()), s,
          make_layout(g), *flat, act, gate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    }
    const Splits sp = stream_splits(g, sizeof(T));
    if (!streamed_schedule<T>(g, t, sums_vector<T>(g, x.const_data_ptr(), nullptr), cblocks, sp,
                              sample_bytes(g, sizeof(T), 1, out_relu),
                              sample_bytes(g, sizeof(T), 2 + (res != nullptr), out_relu), &s))
      return false;
    at::Tensor partial = at::empty({g.N, sp.splits, g.C}, pooled.options());
    at::Tensor counters = stream_counters(x, s.counters(), stream);
    const auto kernel = streamed_forward_variant<T, A>(g.pixel_rows, out_relu, res != nullptr);
    kernel<<<streamed_grid(kernel, s), kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), res, w1.const_data_ptr<T>(), b1, w2.const_data_ptr<T>(), b2, y.mutable_data_ptr<T>(),
        out_relu ? mask.mutable_data_ptr<uint8_t>() : nullptr, partial.mutable_data_ptr<A>(),
        pooled.mutable_data_ptr<A>(), hidden.mutable_data_ptr<A>(), logits.mutable_data_ptr<A>(),
        gates.mutable_data_ptr<A>(), reinterpret_cast<unsigned long long*>(counters.mutable_data_ptr<int64_t>()), s,
        make_layout(g), t, sp.per_split, sp.splits, cblocks, act, gate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

// The backward's streamed kernel (dx, d_residual and the MLP's per-sample gradients); false: the
// split plan's kernels. The weight gradients follow in either case.
template <typename T, typename A>
bool backward_streamed(const Geometry& g, const at::Tensor& grad_y, const at::Tensor& x, const uint8_t* mask,
                       const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& hidden, const at::Tensor& logits,
                       T* dx, T* dres, at::Tensor& dz1, at::Tensor& dz2, at::Tensor& z, at::Tensor& gates,
                       at::Tensor& dp, const RowTiles& t, const tiles::FlatTiles* flat, int64_t cblocks, Act act,
                       Gate gate, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    stream::Schedule s;
    if (flat != nullptr) {  // short NCHW rows: flat tiles, one split
      if (!flat_streamed_schedule(g, *flat, sample_bytes(g, sizeof(T), 1, mask != nullptr),
                                  sample_bytes(g, sizeof(T), 2 + (dx != nullptr) + (dres != nullptr), mask != nullptr),
                                  &s))
        return false;
      at::Tensor partial = at::empty({g.N, 1, g.C}, dz1.options());
      at::Tensor counters = stream_counters(x, s.counters(), stream);
      const auto kernel = flat_streamed_backward_variant<T, A>(mask != nullptr);
      const size_t smem = flat_stream_prepare<A>(kernel);
      kernel<<<streamed_grid(kernel, s, smem), kThreads, smem, stream>>>(
          grad_y.const_data_ptr<T>(), x.const_data_ptr<T>(), mask, w1.const_data_ptr<T>(), w2.const_data_ptr<T>(),
          hidden.const_data_ptr<A>(), logits.const_data_ptr<A>(), dx, dres, partial.mutable_data_ptr<A>(),
          dz1.mutable_data_ptr<A>(), dz2.mutable_data_ptr<A>(), z.mutable_data_ptr<A>(), gates.mutable_data_ptr<A>(),
          dp.mutable_data_ptr<A>(), reinterpret_cast<unsigned long long*>(counters.mutable_data_ptr<int64_t>()), s,
          make_layout(g), *flat, act, gate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    }
    const Splits sp = stream_splits(g, sizeof(T));
    if (!streamed_schedule<T>(g, t, sums_vector<T>(g, x.const_data_ptr(), grad_y.const_data_ptr()), cblocks, sp,
                              sample_bytes(g, sizeof(T), 1, mask != nullptr),
                              sample_bytes(g, sizeof(T), 2 + (dx != nullptr) + (dres != nullptr), mask != nullptr),
                              &s))
      return false;
    at::Tensor partial = at::empty({g.N, sp.splits, g.C}, dz1.options());
    at::Tensor counters = stream_counters(x, s.counters(), stream);
    const auto kernel = streamed_backward_variant<T, A>(g.pixel_rows, mask != nullptr);
    kernel<<<streamed_grid(kernel, s), kThreads, 0, stream>>>(
        grad_y.const_data_ptr<T>(), x.const_data_ptr<T>(), mask, w1.const_data_ptr<T>(), w2.const_data_ptr<T>(),
        hidden.const_data_ptr<A>(), logits.const_data_ptr<A>(), dx, dres, partial.mutable_data_ptr<A>(),
        dz1.mutable_data_ptr<A>(), dz2.mutable_data_ptr<A>(), z.mutable_data_ptr<A>(), gates.mutable_data_ptr<A>(),
        dp.mutable_data_ptr<A>(), reinterpret_cast<unsigned long long*>(counters.mutable_data_ptr<int64_t>()), s,
        make_layout(g), t, sp.per_split, sp.splits, cblocks, act, gate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> se_forward_cuda(
    const at::Tensor& x, const at::Tensor& w1_in, const std::optional<at::Tensor>& b1, const at::Tensor& w2_in,
    const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& residual, c10::string_view activation,
    c10::string_view gate, std::optional<c10::string_view> out_activation) {
  const Act act = parse_activation(activation);
  const Gate gt = parse_gate(gate);
  const bool out_relu = parse_out_activation(out_activation);
  const Geometry g = check_forward_args(x, w1_in, b1, w2_in, b2, residual);
  check_cuda_inputs({x, w1_in, w2_in});
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor b1c = b1.has_value() ? b1->contiguous() : at::Tensor(), b2c = b2.has_value() ? b2->contiguous()
                                                                                                   : at::Tensor();
  const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
  at::Tensor y = at::empty_like(x);
  at::Tensor pooled = at::empty({g.N, g.C}, acc_opts);
  at::Tensor hidden = at::empty({g.N, g.S}, acc_opts);
  at::Tensor logits = at::empty({g.N, g.C}, acc_opts);
  at::Tensor mask = empty_relu_mask(x, g, out_relu);
  if (g.N == 0) return {y, pooled, hidden, logits, mask};
  const Layout lay = make_layout(g);
  const int64_t cblocks = channel_blocks(g);
  const Splits sp = pixel_splits(g, cblocks);
  at::Tensor gates = at::empty({g.N, g.C}, acc_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* res = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b1p = b1c.defined() ? b1c.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b2p = b2c.defined() ? b2c.const_data_ptr<scalar_t>() : nullptr;
    const RowTiles t = element_tiles<scalar_t>(g, {x.const_data_ptr(), res, y.const_data_ptr()});
    tiles::FlatTiles f;  // flat tiles for both passes (x, the residual and y aligned)
    const bool flat = flat_tiles<scalar_t>(g, {x.const_data_ptr(), res, y.const_data_ptr()}, &f);
    if (forward_streamed<scalar_t, A>(g, x, res, w1, b1p, w2, b2p, y, mask, pooled, hidden, logits, gates, t,
                                      flat ? &f : nullptr, cblocks, out_relu, act, gt, stream))
      return;
    // the split plan's partial sums (stream-ordered free): flat tiles sum whole rows (one split)
    const int splits = flat ? 1 : sp.splits;
    at::Tensor partial = at::empty({g.N, splits, g.C}, acc_opts);
    if (flat) {
      flat_sums_variant<scalar_t, A>(false, false)<<<grid_1d(f.blocks()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), nullptr, nullptr, partial.mutable_data_ptr<A>(), f);
    } else {
      (sums_vector<scalar_t>(g, x.const_data_ptr(), nullptr) ? channel_sums_kernel<scalar_t, A, true>
                                                              : channel_sums_kernel<scalar_t, A, false>)
          <<<grid_1d(cblocks * sp.splits * g.N), kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), nullptr, nullptr, partial.mutable_data_ptr<A>(), lay, sp.per_split,
              sp.splits, cblocks, false, false);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    hidden_kernel<scalar_t, A><<<grid_1d(mlp_blocks(g, g.S)), kThreads, 0, stream>>>(
        partial.const_data_ptr<A>(), w1.const_data_ptr<scalar_t>(), b1p, pooled.mutable_data_ptr<A>(),
        hidden.mutable_data_ptr<A>(), g.N, g.C, g.S, g.L, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    logits_kernel<scalar_t, A><<<grid_1d(mlp_blocks(g, g.C)), kThreads, 0, stream>>>(
        hidden.const_data_ptr<A>(), w2.const_data_ptr<scalar_t>(), b2p, logits.mutable_data_ptr<A>(),
        gates.mutable_data_ptr<A>(), g.N, g.C, g.S, act, gt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (flat) {
      flat_scale_variant<scalar_t, A>(out_relu, res != nullptr)<<<grid_1d(f.blocks()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), res, y.mutable_data_ptr<scalar_t>(),
          out_relu ? mask.mutable_data_ptr<uint8_t>() : nullptr, gates.const_data_ptr<A>(), f);
    } else {
      scale_variant<scalar_t, A>(t.vector, t.pixel_rows, out_relu, res != nullptr)
          <<<grid_1d(t.blocks()), kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), res, y.mutable_data_ptr<scalar_t>(),
              out_relu ? mask.mutable_data_ptr<uint8_t>() : nullptr, gates.const_data_ptr<A>(), t, g.mask_row_bytes);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, pooled, hidden, logits, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> se_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1_in, const at::Tensor& w2_in,
    const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& logits, const at::Tensor& relu_mask,
    c10::string_view activation, c10::string_view gate, std::optional<c10::string_view> out_activation,
    bool need_grad_x, bool need_grad_residual) {
  const Act act = parse_activation(activation);
  const Gate gt = parse_gate(gate);
  const bool out_relu = parse_out_activation(out_activation);
  const Geometry g = check_backward_args(grad_y, x, w1_in, w2_in, pooled, hidden, logits, relu_mask, out_relu);
  check_cuda_inputs({grad_y, x, w1_in, w2_in, pooled, hidden, logits});
  const c10::cuda::CUDAGuard guard(x.device());
  need_grad_residual = need_grad_residual && out_relu;
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
  at::Tensor grad_x = need_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_res = need_grad_residual ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_w1 = at::empty({g.S, g.C}, w1.options());
  at::Tensor grad_b1 = at::empty({g.S}, w1.options());
  at::Tensor grad_w2 = at::empty({g.C, g.S}, w2.options());
  at::Tensor grad_b2 = at::empty({g.C}, w2.options());
  if (g.N == 0) {
    for (auto* t : {&grad_w1, &grad_b1, &grad_w2, &grad_b2}) t->zero_();
    return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_res};
  }
  const Layout lay = make_layout(g);
  const int64_t cblocks = channel_blocks(g);
  const Splits sp = pixel_splits(g, cblocks);
  at::Tensor dz1 = at::empty({g.N, g.S}, acc_opts);
  at::Tensor dz2 = at::empty({g.N, g.C}, acc_opts);
  at::Tensor gates = at::empty({g.N, g.C}, acc_opts);
  at::Tensor dp = at::empty({g.N, g.C}, acc_opts);
  at::Tensor z = at::empty({g.N, g.S}, acc_opts);
  const int64_t wchunks = weight_grad_chunks(g);
  const int64_t per_chunk = (g.N + wchunks - 1) / wchunks;
  at::Tensor wpartial = wchunks > 1 ? at::empty({wchunks * (2 * g.S * g.C + g.S + g.C)}, acc_opts) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const uint8_t* mask = out_relu ? relu_mask.const_data_ptr<uint8_t>() : nullptr;
    scalar_t* dx = need_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dres = need_grad_residual ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
    const RowTiles t = element_tiles<scalar_t>(g, {grad_y.const_data_ptr(), dx, dres});
    tiles::FlatTiles f;  // flat tiles for both passes (x, dy, dx and d_residual aligned)
    const bool flat = flat_tiles<scalar_t>(g, {x.const_data_ptr(), grad_y.const_data_ptr(), dx, dres}, &f);
    const bool streamed = (dx != nullptr || dres != nullptr) &&
                          backward_streamed<scalar_t, A>(g, grad_y, x, mask, w1, w2, hidden, logits, dx, dres, dz1,
                                                         dz2, z, gates, dp, t, flat ? &f : nullptr, cblocks, act, gt,
                                                         stream);
    if (!streamed) {
      const int splits = flat ? 1 : sp.splits;
      at::Tensor partial = at::empty({g.N, splits, g.C}, acc_opts);
      if (flat) {
        flat_sums_variant<scalar_t, A>(true, out_relu)<<<grid_1d(f.blocks()), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(), mask, partial.mutable_data_ptr<A>(), f);
      } else {
        (sums_vector<scalar_t>(g, x.const_data_ptr(), grad_y.const_data_ptr()) ? channel_sums_kernel<scalar_t, A, true>
                                                                              : channel_sums_kernel<scalar_t, A, false>)
            <<<grid_1d(cblocks * sp.splits * g.N), kThreads, 0, stream>>>(
                x.const_data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(), mask, partial.mutable_data_ptr<A>(),
                lay, sp.per_split, sp.splits, cblocks, true, out_relu);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dz1_kernel<scalar_t, A><<<grid_1d(mlp_blocks(g, g.S)), kThreads, 0, stream>>>(
          partial.const_data_ptr<A>(), w2.const_data_ptr<scalar_t>(), hidden.const_data_ptr<A>(),
          logits.const_data_ptr<A>(), dz1.mutable_data_ptr<A>(), dz2.mutable_data_ptr<A>(), z.mutable_data_ptr<A>(),
          gates.mutable_data_ptr<A>(), g.N, g.C, g.S, splits, act, gt);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dp_kernel<scalar_t, A><<<grid_1d(mlp_blocks(g, g.C)), kThreads, 0, stream>>>(
          dz1.const_data_ptr<A>(), w1.const_data_ptr<scalar_t>(), dp.mutable_data_ptr<A>(), g.N, g.C, g.S, g.L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if ((dx != nullptr || dres != nullptr) && flat) {
        flat_grad_input_variant<scalar_t, A>(out_relu)<<<grid_1d(f.blocks()), kThreads, 0, stream>>>(
            grad_y.const_data_ptr<scalar_t>(), mask, gates.const_data_ptr<A>(), dp.const_data_ptr<A>(), dx, dres, f);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if (dx != nullptr || dres != nullptr) {
        grad_input_variant<scalar_t, A>(t.vector, t.pixel_rows, out_relu)<<<grid_1d(t.blocks()), kThreads, 0, stream>>>(
            grad_y.const_data_ptr<scalar_t>(), mask, gates.const_data_ptr<A>(), dp.const_data_ptr<A>(), dx, dres, t,
            g.mask_row_bytes);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    const int64_t wblocks = (g.C + kWgT - 1) / kWgT * ((g.S + kWgT - 1) / kWgT) * wchunks;
    if (wchunks == 1) {
      weight_grads_kernel<A, scalar_t><<<grid_1d(wblocks), kThreads, 0, stream>>>(
          dz1.const_data_ptr<A>(), dz2.const_data_ptr<A>(), z.const_data_ptr<A>(), pooled.const_data_ptr<A>(),
          grad_w1.mutable_data_ptr<scalar_t>(), grad_b1.mutable_data_ptr<scalar_t>(),
          grad_w2.mutable_data_ptr<scalar_t>(), grad_b2.mutable_data_ptr<scalar_t>(), g.N, g.C, g.S, per_chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      A* part = wpartial.mutable_data_ptr<A>();
      A* pw1 = part;
      A* pb1 = pw1 + wchunks * g.S * g.C;
      A* pw2 = pb1 + wchunks * g.S;
      A* pb2 = pw2 + wchunks * g.C * g.S;
      weight_grads_kernel<A, A><<<grid_1d(wblocks), kThreads, 0, stream>>>(
          dz1.const_data_ptr<A>(), dz2.const_data_ptr<A>(), z.const_data_ptr<A>(), pooled.const_data_ptr<A>(), pw1,
          pb1, pw2, pb2, g.N, g.C, g.S, per_chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t outputs = 2 * g.S * g.C + g.S + g.C;
      weight_grads_sum_kernel<scalar_t, A><<<grid_1d((outputs + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          part, grad_w1.mutable_data_ptr<scalar_t>(), grad_b1.mutable_data_ptr<scalar_t>(),
          grad_w2.mutable_data_ptr<scalar_t>(), grad_b2.mutable_data_ptr<scalar_t>(), g.C, g.S, wchunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_res};
}

// ---- host: the stage ops ---------------------------------------------------------------------

// (N, C) sums over the pixels of x (dot: of dy' * x) in the accumulation type.
at::Tensor channel_sums(const at::Tensor& x, const at::Tensor* dy, const at::Tensor* mask, const Geometry& g) {
  const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
  const Layout lay = make_layout(g);
  const int64_t cblocks = channel_blocks(g);
  const Splits sp = pixel_splits(g, cblocks);
  at::Tensor partial;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ca_channel_sums_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* dyp = dy ? dy->const_data_ptr<scalar_t>() : nullptr;
    const uint8_t* m = mask ? mask->const_data_ptr<uint8_t>() : nullptr;
    tiles::FlatTiles f;  // short NCHW rows: flat tiles, whole rows (one split)
    if (flat_tiles<scalar_t>(g, {x.const_data_ptr(), dyp}, &f)) {
      partial = at::empty({g.N, 1, g.C}, acc_opts);
      flat_sums_variant<scalar_t, A>(dy != nullptr, mask != nullptr)<<<grid_1d(f.blocks()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), dyp, m, partial.mutable_data_ptr<A>(), f);
    } else {
      partial = at::empty({g.N, sp.splits, g.C}, acc_opts);
      (sums_vector<scalar_t>(g, x.const_data_ptr(), dyp) ? channel_sums_kernel<scalar_t, A, true>
                                                         : channel_sums_kernel<scalar_t, A, false>)
          <<<grid_1d(cblocks * sp.splits * g.N), kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), dyp, m, partial.mutable_data_ptr<A>(), lay, sp.per_split, sp.splits,
              cblocks, dy != nullptr, mask != nullptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.size(1) == 1 ? partial.select(1, 0) : partial.sum(1);  // the splits in order
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ca_pool_cuda(const at::Tensor& x, bool with_max) {
  const Geometry g = ca::check_x(x);
  check_cuda_inputs({x});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = accumulation_type(x.scalar_type());
  const int64_t rows = with_max ? g.N : 0, cols = with_max ? g.C : 0;
  at::Tensor mx = at::empty({rows, cols}, x.options());
  at::Tensor ties = at::empty({rows, cols}, x.options().dtype(acc));
  if (g.N == 0) return {at::empty({0, g.C}, x.options()), mx, ties};
  at::Tensor mean = (channel_sums(x, nullptr, nullptr, g) / static_cast<double>(g.L)).to(x.scalar_type());
  if (with_max) {
    const int64_t cblocks = channel_blocks(g);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ca_pool_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      ca_channel_max_kernel<scalar_t, A><<<grid_1d(cblocks * g.N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), mx.mutable_data_ptr<scalar_t>(), ties.mutable_data_ptr<A>(), make_layout(g),
          cblocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {mean, mx, ties};
}

std::tuple<at::Tensor, at::Tensor> ca_scale_cuda(const at::Tensor& x, const at::Tensor& gate,
                                                 const std::optional<at::Tensor>& residual, bool out_relu) {
  const Geometry g = ca::check_x(x);
  ca::check_vector(gate, x, "g");
  if (residual.has_value()) ca::check_like_x(*residual, x, g, "residual");
  check_cuda_inputs({x, gate});
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = empty_relu_mask(x, g, out_relu);
  if (g.N == 0) return {y, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ca_scale_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* res = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const RowTiles t = element_tiles<scalar_t>(g, {x.const_data_ptr(), res, y.const_data_ptr()});
    tiles::FlatTiles f;
    if (flat_tiles<scalar_t>(g, {x.const_data_ptr(), res, y.const_data_ptr()}, &f)) {
      flat_scale_variant<scalar_t, A>(out_relu, res != nullptr)
          <<<grid_1d(f.blocks()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), res, y.mutable_data_ptr<scalar_t>(),
              out_relu ? mask.mutable_data_ptr<uint8_t>() : nullptr, gate.const_data_ptr<A>(), f);
    } else {
      scale_variant<scalar_t, A>(t.vector, t.pixel_rows, out_relu, res != nullptr)
          <<<grid_1d(t.blocks()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), res, y.mutable_data_ptr<scalar_t>(),
              out_relu ? mask.mutable_data_ptr<uint8_t>() : nullptr, gate.const_data_ptr<A>(), t, g.mask_row_bytes);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mask};
}

at::Tensor ca_gate_grad_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask, bool out_relu) {
  const Geometry g = ca::check_x(x);
  ca::check_like_x(dy, x, g, "grad_y");
  ca::check_mask(mask, x, g, out_relu);
  check_cuda_inputs({dy, x});
  const c10::cuda::CUDAGuard guard(x.device());
  if (g.N == 0) return at::empty({0, g.C}, x.options().dtype(accumulation_type(x.scalar_type())));
  return channel_sums(x, &dy, out_relu ? &mask : nullptr, g).contiguous();
}

std::tuple<at::Tensor, at::Tensor> ca_input_grad_cuda(const at::Tensor& dy, const at::Tensor& mask,
                                                      const at::Tensor& gate, const at::Tensor& dmean,
                                                      const std::optional<at::Tensor>& x,
                                                      const std::optional<at::Tensor>& mx,
                                                      const std::optional<at::Tensor>& dmax,
                                                      const std::optional<at::Tensor>& ties, bool out_relu,
                                                      bool need_grad_x, bool need_grad_residual) {
  check_cuda_inputs({dy, gate, dmean});
  const c10::cuda::CUDAGuard guard(dy.device());
  ca::InputGrad a = ca::prepare_input_grad(dy, mask, gate, dmean, x, mx, dmax, ties, out_relu, need_grad_x,
                                           need_grad_residual);
  if (a.done) return {a.dx, a.dres};
  const Geometry& g = a.g;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "ca_input_grad_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    scalar_t* dxp = need_grad_x ? a.dx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* drp = a.dres_out ? a.dres.mutable_data_ptr<scalar_t>() : nullptr;
    const uint8_t* m = out_relu ? mask.const_data_ptr<uint8_t>() : nullptr;
    if (a.with_max) {
      const int64_t rows = g.N * g.rows;
      const int64_t blocks = std::min<int64_t>((rows + kWarps - 1) / kWarps, int64_t(32) * multiprocessors());
      ca_grad_input_max_kernel<scalar_t, A><<<grid_1d(blocks), kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), m, gate.const_data_ptr<A>(), a.dp.const_data_ptr<A>(),
          x->const_data_ptr<scalar_t>(), mx->const_data_ptr<scalar_t>(), a.dm.const_data_ptr<A>(), dxp, drp,
          make_layout(g), rows);
    } else {
      const RowTiles t = element_tiles<scalar_t>(g, {dy.const_data_ptr(), dxp, drp});
      tiles::FlatTiles f;
      if (flat_tiles<scalar_t>(g, {dy.const_data_ptr(), dxp, drp}, &f)) {
        flat_grad_input_variant<scalar_t, A>(out_relu)<<<grid_1d(f.blocks()), kThreads, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), m, gate.const_data_ptr<A>(), a.dp.const_data_ptr<A>(), dxp, drp, f);
      } else {
        grad_input_variant<scalar_t, A>(t.vector, t.pixel_rows, out_relu)
            <<<grid_1d(t.blocks()), kThreads, 0, stream>>>(dy.const_data_ptr<scalar_t>(), m, gate.const_data_ptr<A>(),
                                                           a.dp.const_data_ptr<A>(), dxp, drp, t, g.mask_row_bytes);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {a.dx, a.dres};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CUDA, m) {
  m.impl("se_forward", &se_forward_cuda);
  m.impl("se_backward", &se_backward_cuda);
  m.impl("ca_pool", &ca_pool_cuda);
  m.impl("ca_scale", &ca_scale_cuda);
  m.impl("ca_gate_grad", &ca_gate_grad_cuda);
  m.impl("ca_input_grad", &ca_input_grad_cuda);
}

}  // namespace se_kernels::cuda
