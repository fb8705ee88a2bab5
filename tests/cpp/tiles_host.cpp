// Host build of csrc/cuda/se_tiles.h for tests/test_cuda_tiles.py (loaded with ctypes): walks
// every (block, warp, lane, step) of the CUDA element-wise launches exactly as the kernels do,
// and exposes the per-element math. No GPU, no CUDA toolkit: any C++17 compiler.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../../csrc/cuda/se_tiles.h"

using namespace se_kernels::tiles;

namespace {

// The kernels' W: the vector width on the vector path, 1 on the scalar path.
int step_offset_w(int w, int step, int lane) {
  switch (w) {
    case 1: return step_offset<1>(step, lane);
    case 2: return step_offset<2>(step, lane);
    case 4: return step_offset<4>(step, lane);
    default: return step_offset<8>(step, lane);
  }
}

int fail(char* msg, int len, const char* what, int64_t a, int64_t b, int64_t c) {
  std::snprintf(msg, len, "%s (%lld, %lld, %lld)", what, static_cast<long long>(a), static_cast<long long>(b),
                static_cast<long long>(c));
  return 1;
}

int mask_byte_in_tile_w(int w, int step, int lane, int size) {
  switch (w) {
    case 1: return mask_byte_in_tile<1>(step, lane, size);
    case 2: return mask_byte_in_tile<2>(step, lane, size);
    case 4: return mask_byte_in_tile<4>(step, lane, size);
    default: return mask_byte_in_tile<8>(step, lane, size);
  }
}

}  // namespace

extern "C" {

// The launch over an (N, C, L) tensor (pixel_rows: channels_last rows) with `width`-element
// vectors (vector: the 16-byte path). Checks, for every element each lane touches: inside its row
// and tile, aligned to the vector width on the vector path, its gate index that of its (n, c);
// that every element is touched exactly once; and that every relu-mask byte is written exactly
// once, by a lane whose step covers the byte's 8 elements. Blocks [0, first_blocks) and the last
// last_blocks are walked (-1: all; counts of writes are then checked over the whole tensor).
// Returns 0, or 1 with a description in msg. out_blocks: the launch's block count.
int se_walk(int64_t N, int64_t C, int64_t L, int pixel_rows, int width, int vector, int reversed,
            int64_t first_blocks, int64_t last_blocks, int64_t* out_blocks, char* msg, int msg_len) {
  const RowTiles t = make_row_tiles(N, C, L, pixel_rows != 0, width, vector != 0);
  if (vector && !t.vector && (pixel_rows ? C : L) % width == 0) return fail(msg, msg_len, "vector path refused", C, L, width);
  const int64_t blocks = t.blocks();
  *out_blocks = blocks;
  if (blocks * kWarpsPerBlock < t.tiles() || (blocks - 1) * kWarpsPerBlock >= t.tiles())
    return fail(msg, msg_len, "block count does not cover the tiles tightly", blocks, t.tiles(), 0);
  const bool whole = first_blocks < 0;
  const int64_t row_bytes = (t.row_len + 7) / 8;
  std::vector<uint8_t> writes(whole ? static_cast<size_t>(N * C * L) : 0);
  std::vector<uint8_t> mask_writes(whole ? static_cast<size_t>(t.rows * row_bytes) : 0);
  auto walk_block = [&](int64_t block) -> int {
    for (int warp = 0; warp < kWarpsPerBlock; ++warp) {
      Tile tile;
      if (!tile_of(t, block, warp, reversed != 0, &tile)) {
        if (block * kWarpsPerBlock + warp < t.tiles()) return fail(msg, msg_len, "live warp got no tile", block, warp, 0);
        continue;
      }
      if (tile.row < 0 || tile.row >= t.rows || tile.begin < 0 || tile.begin >= tile.end || tile.end > t.row_len ||
          tile.begin % t.tile_len != 0 || tile.begin % 8 != 0)
        return fail(msg, msg_len, "bad tile", tile.row, tile.begin, tile.end);
      const int64_t n = tile.row / t.rows_per_sample, r = tile.row % t.rows_per_sample;
      const int w = t.vector ? t.width : 1;
      const int size = tile_size(tile);
      if (size != tile.end - tile.begin || size > t.tile_len) return fail(msg, msg_len, "bad tile size", size, 0, 0);
      for (int step = 0; step < t.steps(); ++step) {
        const int64_t warp_first = tile.begin + step_offset_w(w, step, 0);
        if (warp_first >= tile.end) break;  // as the kernels
        for (int lane = 0; lane < kLanes; ++lane) {
          const int64_t i = tile.begin + step_offset_w(w, step, lane);
          if (i < tile.end) {
            if (i < tile.begin || i + w > tile.end) return fail(msg, msg_len, "step outside its tile", tile.row, i, w);
            if (t.vector && i % t.width != 0) return fail(msg, msg_len, "unaligned vector", tile.row, i, t.width);
            for (int k = 0; k < w; ++k) {
              const int64_t e = i + k;
              const int64_t c = pixel_rows ? e : r;
              const int64_t gate = tile.gate_base + (t.pixel_rows ? e : 0);
              if (gate != n * C + c) return fail(msg, msg_len, "wrong gate index", tile.row, e, gate);
              if (whole) {
                const int64_t flat = tile.row * t.row_len + e;
                if (flat < 0 || flat >= N * C * L) return fail(msg, msg_len, "element out of bounds", tile.row, e, flat);
                if (++writes[static_cast<size_t>(flat)] > 1) return fail(msg, msg_len, "element written twice", tile.row, e, 0);
              }
            }
          }
          // the kernels' form: a per-lane base plus step * a stride
          const int base = mask_byte_in_tile_w(w, 0, lane, 1 << 30);
          const int strided = base >= 0 && (base + step * 4 * w) * 8 < size ? base + step * 4 * w : -1;
          const int rel = mask_byte_in_tile_w(w, step, lane, size);
          if (rel != strided) return fail(msg, msg_len, "mask byte not linear in the step", step, lane, rel);
          if (step_offset_w(w, step, lane) != step * 32 * w + step_offset_w(w, 0, lane))
            return fail(msg, msg_len, "element offset not linear in the step", step, lane, w);
          if (rel < 0) continue;
          const int64_t byte = tile.begin / 8 + rel;
          if (byte >= row_bytes) return fail(msg, msg_len, "mask byte out of the row", tile.row, byte, row_bytes);
          // the bits gathered for this byte: the 8 elements from 8 * byte, all in this step
          const int64_t covered_first = t.vector ? i : warp_first + 8 * int64_t(lane);
          if (covered_first != 8 * byte) return fail(msg, msg_len, "mask byte gathered from other elements", tile.row, byte, covered_first);
          if (whole && ++mask_writes[static_cast<size_t>(tile.row * row_bytes + byte)] > 1)
            return fail(msg, msg_len, "mask byte written twice", tile.row, byte, 0);
        }
      }
    }
    return 0;
  };
  if (whole) {
    for (int64_t b = 0; b < blocks; ++b)
      if (walk_block(b)) return 1;
    for (size_t e = 0; e < writes.size(); ++e)
      if (writes[e] != 1) return fail(msg, msg_len, "element never written", static_cast<int64_t>(e), 0, 0);
    for (size_t e = 0; e < mask_writes.size(); ++e)
      if (mask_writes[e] != 1) return fail(msg, msg_len, "mask byte never written", static_cast<int64_t>(e), 0, 0);
    return 0;
  }
  for (int64_t b = 0; b < blocks && b < first_blocks; ++b)
    if (walk_block(b)) return 1;
  for (int64_t b = blocks - last_blocks < 0 ? 0 : blocks - last_blocks; b < blocks; ++b)
    if (walk_block(b)) return 1;
  return 0;
}

// The per-element math of the kernels, elementwise over n values in double or float (dtype 64 or
// 32; the inputs are converted to it and the result back). which: 0 activation(u, code),
// 1 activation_grad(u, code), 2 gate_fn(u, code), 3 gate_grad(u, gate_fn(u), code) (code: the
// Act or Gate value; one that is no option gives NaN),
// 4 scale_element(u, v, w, has_res = code & 1, out_relu = code & 2) (out), 5 its mask bit,
// 6 grad_input_element(u, v, w).
void se_math(int which, int code, int dtype, int64_t n, const double* u, const double* v, const double* w,
             double* out) {
  for (int64_t i = 0; i < n; ++i) {
    auto run = [&](auto zero) -> double {
      using A = decltype(zero);
      const A a = static_cast<A>(u[i]), b = v ? static_cast<A>(v[i]) : A(0), c = w ? static_cast<A>(w[i]) : A(0);
      const auto act = static_cast<se_kernels::Act>(code);
      const auto gate = static_cast<se_kernels::Gate>(code);
      bool through = false;
      switch (which) {
        case 0: return activation(a, act);
        case 1: return activation_grad(a, act);
        case 2: return gate_fn(a, gate);
        case 3: return gate_grad(a, gate_fn(a, gate), gate);
        case 4: return scale_element(a, b, c, (code & 1) != 0, (code & 2) != 0, &through);
        case 5: scale_element(a, b, c, (code & 1) != 0, (code & 2) != 0, &through); return through ? 1.0 : 0.0;
        default: return grad_input_element(a, b, c);
      }
    };
    out[i] = dtype == 64 ? run(0.0) : run(0.0f);
  }
}

}  // extern "C"
