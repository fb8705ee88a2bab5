// Index math and per-element math of the CUDA kernels, as __host__ __device__ functions so that
// a host-compiled test (tests/cpp/tiles_host.cpp, driven by tests/test_cuda_tiles.py) can walk
// every (block, warp, lane) of a launch and check what each writes and reads, without a GPU.
//
// The element-wise kernels (scale: y = out_act(x * g + residual); grad_input: dx = dy' * g + dp)
// see a sample as `rows` rows of `row_len` contiguous elements (NCHW: C rows of H*W pixels;
// channels_last: H*W rows of C channels; csrc/se_common.h). A warp takes one tile: kTileSteps
// steps over a run of one row, each lane kVecBytes (16) per step when the vector path applies
// (the row length a multiple of the vector width and every pointer 16-byte aligned), else one
// element a step for kTileSteps * width steps. Tiles are numbered row-major (row, chunk), so the
// only divisions are per warp (tile -> row, chunk; row -> sample), none per element.
#pragma once

#include <cstdint>

#include "../se_options.h"

#if defined(__CUDACC__)
#define SE_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define SE_HD inline
#endif

namespace se_kernels::tiles {

constexpr int kLanes = 32;
constexpr int kWarpsPerBlock = 8;  // 256 threads
#ifndef SE_TILE_STEPS  // overridden only by benchmarks/cuda_resources.py, to count instructions per step
#define SE_TILE_STEPS 4
#endif
constexpr int kTileSteps = SE_TILE_STEPS;  // vector steps per lane and tile: 4 x 16 B in flight per lane
constexpr int kVecBytes = 16;

// Elements in one 16-byte vector of T (float: 4, half/bfloat16: 8, double: 2).
template <typename T>
constexpr int vec_width() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

struct RowTiles {
  int64_t rows;             // rows over the batch: N * rows_per_sample
  int64_t rows_per_sample;  // C (NCHW) or H*W (channels_last)
  int64_t row_len;          // H*W (NCHW) or C (channels_last)
  int64_t C;                // channels: the gate of (n, c) is gates[n * C + c]
  int64_t chunks;           // tiles per row
  int64_t tile_len;         // kLanes * kTileSteps * width: a multiple of 8 (relu-mask bytes)
  int width;                // elements per 16-byte vector of the element type
  bool pixel_rows;          // channels_last rows: the gate changes along the row
  bool vector;              // 16-byte accesses (row_len % width == 0, pointers aligned)

  SE_HD int64_t tiles() const { return rows * chunks; }
  SE_HD int64_t blocks() const { return (tiles() + kWarpsPerBlock - 1) / kWarpsPerBlock; }
  // Steps of one lane in a tile (the kernels: a compile-time constant, as their W).
  SE_HD int steps() const { return vector ? kTileSteps : kTileSteps * width; }
};

SE_HD RowTiles make_row_tiles(int64_t N, int64_t C, int64_t L, bool pixel_rows, int width, bool vector) {
  RowTiles t{};
  t.rows_per_sample = pixel_rows ? L : C;
  t.row_len = pixel_rows ? C : L;
  t.rows = N * t.rows_per_sample;
  t.C = C;
  t.width = width;
  t.pixel_rows = pixel_rows;
  t.vector = vector && t.row_len % width == 0;
  t.tile_len = int64_t(kLanes) * kTileSteps * width;
  t.chunks = (t.row_len + t.tile_len - 1) / t.tile_len;
  return t;
}

struct Tile {
  int64_t row;        // over the batch
  int64_t begin, end; // elements [begin, end) of the row
  int64_t gate_base;  // gate index of element i of the row: gate_base + (pixel_rows ? i : 0)
};

// Tile number `item` of the launch, row-major over (row, chunk).
SE_HD Tile tile_at(const RowTiles& t, int64_t item) {
  Tile tile;
  const int64_t row = item / t.chunks;
  const int64_t n = row / t.rows_per_sample;
  tile.row = row;
  tile.begin = (item - row * t.chunks) * t.tile_len;
  tile.end = tile.begin + t.tile_len < t.row_len ? tile.begin + t.tile_len : t.row_len;
  tile.gate_base = t.pixel_rows ? n * t.C : n * t.C + (row - n * t.rows_per_sample);
  return tile;
}

// The tile of warp `warp` of block `block`; `reversed`: the last tile first (the second pass of
// the split plan walks x backwards, reading first what the first pass read last, most likely
// still in L2). Returns false for the warps past the last tile. (The streamed plan,
// csrc/cuda/se_stream.h, numbers each group's tiles itself and calls tile_at.)
SE_HD bool tile_of(const RowTiles& t, int64_t block, int warp, bool reversed, Tile* out) {
  const int64_t k = block * kWarpsPerBlock + warp;
  if (k >= t.tiles()) return false;
  *out = tile_at(t, reversed ? t.tiles() - 1 - k : k);
  return true;
}

// Offset from the tile's first element of lane `lane`'s elements at step `step`, the step
// covering W elements (W: the vector width on the vector path, 1 on the scalar path): all inside
// the tile when the first is (offset < tile_size), none otherwise. Consecutive lanes take
// consecutive elements (vectors): each step of a warp is one contiguous, coalesced run of 32 * W
// elements, and the kernels stop at the first step that starts past the tile.
template <int W>
SE_HD int step_offset(int step, int lane) {
  return (step * kLanes + lane) * W;
}

// step_offset and mask_byte_in_tile are linear in the step: the kernels add step * these
// strides to a per-lane base (the host test checks the identity).
template <int W>
SE_HD constexpr int step_stride() {
  return kLanes * W;
}
template <int W>
SE_HD constexpr int mask_bytes_per_step() {
  return kLanes * W / 8;
}

// Elements in the tile (at most tile_len).
SE_HD int tile_size(const Tile& tile) {
  return static_cast<int>(tile.end - tile.begin);
}

// ---- flat tiles: NCHW rows of at most kFlatMaxL pixels (7x7, 14x14, 3x3) -----------------------
//
// A row tile of a 49-pixel row keeps 49 of a warp's lanes' elements busy, one element a step (49 is
// no multiple of the vector); a 196-pixel row, 1.5 vector steps. In NCHW the rows of a sample are one
// contiguous run, so a flat tile takes `rows` (R) whole rows of one sample as one run of R * L
// elements in 16-byte vectors, up to kFlatSteps steps. R is a multiple of the vector width and the
// sample's channels are too (flat_tiles_apply), so every tile starts on a vector and holds whole
// vectors. A vector's elements lie in one row, or (L >= width) in two consecutive rows; the row of
// offset d in the tile is d / L, by one multiply-high (flat_row). The tile's R <= 32 gates are
// held one per lane and moved to the elements by shuffles. The relu-mask bytes of the tile's rows
// (the row layout above) belong to the tile alone: a warp gathers its bits into a bit image of the
// tile (one bit per element, in element order, flat_image_*) in shared memory, then writes the rows'
// bytes from it; the backward builds the image from the bytes, then reads each vector's bits.
constexpr int kFlatSteps = 2 * kTileSteps;  // vector steps of one tile at most: two rounds of kTileSteps in flight
constexpr int kFlatMaxRows = kLanes;        // a lane holds each row's gate
constexpr int64_t kFlatMaxL = 256;          // longer rows keep row tiles (R = width rows must fit kFlatSteps)
constexpr int kFlatImageWords = kFlatSteps * 8 + 1;  // the largest tile's bits (width <= 8) and a word of slack

struct FlatTiles {
  int64_t N, C, L;
  int64_t rows_per_tile;     // R: a multiple of the width, <= kFlatMaxRows, R * L <= kFlatSteps * 32 * width
  int64_t tiles_per_sample;  // ceil(C / R)
  int64_t row_bytes;         // relu-mask bytes of a row: ceil(L / 8)
  uint32_t magic;            // floor(2^32 / L) + 1: d / L == (d * magic) >> 32 for every d of a tile

  SE_HD int64_t tiles() const { return N * tiles_per_sample; }
  SE_HD int64_t blocks() const { return (tiles() + kWarpsPerBlock - 1) / kWarpsPerBlock; }
};

// Whether an (N, C, L) tensor takes flat tiles: NCHW, 16-byte accesses possible (every pointer
// aligned), C a multiple of the width (tiles start on vectors), width <= L <= kFlatMaxL.
SE_HD bool flat_tiles_apply(int64_t C, int64_t L, bool pixel_rows, int width, bool aligned) {
  return !pixel_rows && aligned && C % width == 0 && L >= width && L <= kFlatMaxL;
}

// The most rows (a multiple of the width, <= 32, <= C rounded up to the width) whose elements fit
// kFlatSteps vector steps: the most bytes in flight a tile allows.
SE_HD FlatTiles make_flat_tiles(int64_t N, int64_t C, int64_t L, int width) {
  FlatTiles f{};
  f.N = N;
  f.C = C;
  f.L = L;
  const int64_t fit = int64_t(kFlatSteps) * kLanes * width / L;  // >= width, as L <= kFlatMaxL
  int64_t rows = (fit < kFlatMaxRows ? fit : kFlatMaxRows) / width * width;
  const int64_t c_up = (C + width - 1) / width * width;
  if (rows > c_up) rows = c_up;
  if (rows < width) rows = width;
  f.rows_per_tile = rows;
  f.tiles_per_sample = (C + rows - 1) / rows;
  f.row_bytes = (L + 7) / 8;
  f.magic = static_cast<uint32_t>((uint64_t(1) << 32) / uint64_t(L) + 1);
  return f;
}

struct FlatTile {
  int64_t row0;  // first row over the batch (n * C + c0): also the gate index of that row
  int rows;      // rows in the tile (the sample's last tile may have fewer, a multiple of the width)
  int size;      // elements: rows * L
};

// Tile number `item` (sample-major: a sample's tiles in channel order).
SE_HD FlatTile flat_tile_at(const FlatTiles& f, int64_t item) {
  const int64_t n = item / f.tiles_per_sample;
  const int64_t j = item - n * f.tiles_per_sample;
  const int64_t c0 = j * f.rows_per_tile;
  FlatTile tile;
  tile.row0 = n * f.C + c0;
  tile.rows = static_cast<int>(f.C - c0 < f.rows_per_tile ? f.C - c0 : f.rows_per_tile);
  tile.size = static_cast<int>(tile.rows * f.L);
  return tile;
}

// The tile of warp `warp` of block `block`, last tile first when reversed (as tile_of).
SE_HD bool flat_tile_of(const FlatTiles& f, int64_t block, int warp, bool reversed, FlatTile* out) {
  const int64_t k = block * kWarpsPerBlock + warp;
  if (k >= f.tiles()) return false;
  *out = flat_tile_at(f, reversed ? f.tiles() - 1 - k : k);
  return true;
}

// d / L for an offset d in a tile (d < kFlatSteps * 32 * 8 + 8: checked exhaustively by the host test).
SE_HD int flat_row(int d, uint32_t magic) {
#if defined(__CUDA_ARCH__)
  return static_cast<int>(__umulhi(static_cast<unsigned>(d), magic));
#else
  return static_cast<int>((uint64_t(static_cast<uint32_t>(d)) * magic) >> 32);
#endif
}

// ---- the flat tile's channel sums -----------------------------------------------------------
//
// Entry u of a tile is the vector at offset u * W (step u / 32, lane u % 32). Each lane adds its
// vector's elements into two partials, of its first element's row and (past `split`) the next
// row's, and stores them; then lane j adds row j's partials in increasing u: the entries from
// flat_row_first_entry to flat_row_last_entry, taking the second partial of the first one where it
// starts in row j - 1 (flat_entry_second). A fixed order: the sums are bitwise reproducible.

SE_HD int flat_row_first_entry(int64_t L, int W, int j) { return static_cast<int>(j * L / W); }
SE_HD int flat_row_last_entry(int64_t L, int W, int j) { return static_cast<int>(((j + 1) * L - 1) / W); }
// Whether row j's elements in entry u are the entry's second partial (it starts in row j - 1).
SE_HD bool flat_entry_second(int64_t L, int W, int j, int u) { return int64_t(u) * W < j * L; }

// ---- the flat tile's relu bits: an image of one bit per element, in element order ------------

// The image word a lane writes at a step, after a shuffle tree gathered the W-bit groups of
// 32 / W lanes into one word (lane i holds lanes i .. i + 32 / W - 1); -1 for the other lanes.
template <int W>
SE_HD int flat_image_word(int step, int lane) {
  return lane % (kLanes / W) == 0 ? step * W + lane / (kLanes / W) : -1;
}

// The count of row bits in mask byte b of a row of L (8, or fewer in the row's last byte).
SE_HD int flat_byte_bits(int64_t L, int b) {
  return L - 8 * b < 8 ? static_cast<int>(L - 8 * b) : 8;
}

// The byte (its `count` low bits) starting at bit q of the image: two words, funnel-shifted.
SE_HD unsigned flat_image_byte(const uint32_t* image, int q, int count) {
  const uint64_t pair = (uint64_t(image[(q >> 5) + 1]) << 32) | image[q >> 5];
  return static_cast<unsigned>(pair >> (q & 31)) & ((1u << count) - 1u);
}

// OR a byte's bits (at most 8) into the image at bit q: the one or two words it covers, through
// `orw(word pointer, value)` (the kernels: a shared-memory atomicOr; lanes share words).
template <typename Or>
SE_HD void flat_image_add_byte(uint32_t* image, int q, unsigned byte, Or orw) {
  const int w = q >> 5, sh = q & 31;
  if (byte == 0) return;
  orw(image + w, byte << sh);
  if (sh > 24) orw(image + w + 1, byte >> (32 - sh));
}

// ---- relu-mask bytes (bit i of a row at byte i / 8, each row starting on a byte) -------------

// The mask byte lane `lane` writes at step `step`, counted from the tile's first byte
// (tile.begin / 8: tiles start on multiples of 8 elements), after gathering its bits; -1 when
// it writes none; a writer lane's byte b at a step is written when b * 8 < size. W > 1 (vector path): a byte holds the bits of 8 / W lanes' vectors (float:
// 2 lanes, half: 1, double: 4), the lowest of them writes it. W == 1 (scalar path): a step
// covers 32 elements, 4 bytes, written by lanes 0-3.
template <int W>
SE_HD int mask_byte_in_tile(int step, int lane, int size) {
  static_assert(W == 1 || W == 2 || W == 4 || W == 8, "a vector's bits must tile a byte");
  if (W > 1) {
    const int offset = step_offset<W>(step, lane);
    return (lane % (8 / (W > 1 ? W : 8)) == 0 && offset < size) ? offset / 8 : -1;
  }
  const int first = step * kLanes + lane * 8;
  return (lane < kLanes / 8 && first < size) ? first / 8 : -1;
}

// ---- per-element math (NaN-propagating like PyTorch's) -----------------------------------------

SE_HD float se_exp(float v) { return expf(v); }
SE_HD double se_exp(double v) { return exp(v); }
SE_HD float se_erf(float v) { return erff(v); }
SE_HD double se_erf(double v) { return erf(v); }
SE_HD float se_nan(float) { return __builtin_nanf(""); }
SE_HD double se_nan(double) { return __builtin_nan(""); }

template <typename A>
SE_HD A clamp06(A v) {
  return v < A(0) ? A(0) : (v > A(6) ? A(6) : v);
}

// The options (csrc/se_options.h). Each switch lists every Act or Gate with no default: nvcc's
// device front end does not warn about a missing enumerator, but these are __host__ __device__, and
// the host compiler does (-Werror=switch in setup.py; se_cuda.cu instantiates them for the host;
// tests/cpp/tiles_host.cpp compiles them with -Wall -Werror). A value that is no option gives NaN.
template <typename A>
SE_HD A activation(A u, Act act) {
  switch (act) {
    case Act::ReLU: return u < A(0) ? A(0) : u;
    case Act::SiLU: return u / (A(1) + se_exp(-u));
    case Act::GELU: return A(0.5) * u * (A(1) + se_erf(u * A(0.7071067811865476)));
    case Act::HardSwish: return u * clamp06(u + A(3)) / A(6);
  }
  return se_nan(u);
}

template <typename A>
SE_HD A activation_grad(A u, Act act) {
  switch (act) {
    case Act::ReLU: return u > A(0) ? A(1) : A(0);
    case Act::SiLU: {
      const A s = A(1) / (A(1) + se_exp(-u));
      return s * (A(1) + u * (A(1) - s));
    }
    case Act::GELU: {
      const A cdf = A(0.5) * (A(1) + se_erf(u * A(0.7071067811865476)));
      return cdf + u * se_exp(A(-0.5) * u * u) * A(0.3989422804014327);
    }
    case Act::HardSwish: return u <= A(-3) ? A(0) : (u < A(3) ? u / A(3) + A(0.5) : A(1));
  }
  return se_nan(u);
}

template <typename A>
SE_HD A gate_fn(A u, Gate gate) {
  switch (gate) {
    case Gate::Sigmoid: return A(1) / (A(1) + se_exp(-u));
    case Gate::HardSigmoid: return clamp06(u + A(3)) / A(6);
  }
  return se_nan(u);
}

template <typename A>
SE_HD A gate_grad(A u, A g, Gate gate) {
  switch (gate) {
    case Gate::Sigmoid: return g * (A(1) - g);
    case Gate::HardSigmoid: return (u > A(-3) && u < A(3)) ? A(1) / A(6) : A(0);
  }
  return se_nan(u);
}

// The scale epilogue of one element: out_act(x * g + residual), and whether the relu let it
// through (the mask bit). relu keeps NaN, as torch.relu does.
// relu that keeps NaN (torch.relu's): one max.NaN instruction for float on the GPU.
template <typename A>
SE_HD A relu_keep_nan(A v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(A) == 4) {
    float out;
    asm("max.NaN.f32 %0, %1, 0f00000000;" : "=f"(out) : "f"(v));
    return out;
  }
#endif
  return v < A(0) ? A(0) : v;
}

template <typename A>
SE_HD A scale_element(A x, A g, A res, bool has_res, bool out_relu, bool* through) {
  A out = x * g;
  if (has_res) out += res;
  *through = out > A(0);
  return out_relu ? relu_keep_nan(out) : out;
}

// grad_x of one element given dy' (dy where the relu let the output through, else 0).
template <typename A>
SE_HD A grad_input_element(A dy_kept, A g, A dp) {
  return dy_kept * g + dp;
}

}  // namespace se_kernels::tiles
