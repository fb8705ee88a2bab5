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

// Walks blocks [0, first_blocks) and the last last_blocks of a launch (first_blocks < 0: all of
// them, then every element and mask byte must have been written once: the counts in writes and
// mask_writes). 0, or 1 with a description in msg.
template <typename Walk>
int walk_blocks(int64_t blocks, int64_t first_blocks, int64_t last_blocks, Walk walk_block,
                const std::vector<uint8_t>& writes, const std::vector<uint8_t>& mask_writes, char* msg, int msg_len) {
  if (first_blocks < 0) {
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
  return walk_blocks(blocks, first_blocks, last_blocks, walk_block, writes, mask_writes, msg, msg_len);
}

// The flat-tile launch (csrc/cuda/se_tiles.h, flat_scale_kernel / flat_grad_input_kernel) over an
// NCHW (N, C, L) tensor with `width`-element vectors, walked as the kernels walk it: each lane's
// steps (rounds of `round` steps), the row and split of each vector, the per-row value each element
// takes (rows[r] before split, rows[r + 1] from it), the relu bits through the bit image into the
// rows' mask bytes (forward) and back from the bytes (backward). Checked: the tile's rows, start
// (on a vector) and size; every vector inside its tile, aligned, whole; flat_row == d / L; each
// element's row that of its offset (the gate index n * C + c), at most row kFlatMaxRows; each element
// written once; the image words used inside the cleared range and the array; each mask byte written
// once, equal to its row's bits (made up from the element's index); the backward's image giving back
// every element's bit. Blocks [0, first_blocks) and the last last_blocks (-1: all, and the write
// counts over the whole tensor). Returns 0, or 1 with a description in msg.
int se_walk_flat(int64_t N, int64_t C, int64_t L, int width, int round, int reversed, int64_t first_blocks,
                 int64_t last_blocks, int64_t* out_blocks, char* msg, int msg_len) {
  if (!flat_tiles_apply(C, L, false, width, true)) return fail(msg, msg_len, "flat tiles refused", C, L, width);
  const FlatTiles f = make_flat_tiles(N, C, L, width);
  const int64_t R = f.rows_per_tile;
  if (R % width != 0 || R < width || R > kFlatMaxRows || R * L > int64_t(kFlatSteps) * kLanes * width)
    return fail(msg, msg_len, "bad rows per tile", R, L, width);
  const int64_t blocks = f.blocks();
  *out_blocks = blocks;
  if (blocks * kWarpsPerBlock < f.tiles() || (blocks - 1) * kWarpsPerBlock >= f.tiles())
    return fail(msg, msg_len, "block count does not cover the tiles tightly", blocks, f.tiles(), 0);
  const bool whole = first_blocks < 0;
  std::vector<uint8_t> writes(whole ? static_cast<size_t>(N * C * L) : 0);
  std::vector<uint8_t> mask_writes(whole ? static_cast<size_t>(N * C * f.row_bytes) : 0);
  auto bit_of = [](int64_t flat) { return static_cast<unsigned>((flat * 2654435761u) >> 7) & 1u; };
  const int stride = kLanes * width;
  auto walk_block = [&](int64_t block) -> int {
    for (int warp = 0; warp < kWarpsPerBlock; ++warp) {
      FlatTile tile;
      if (!flat_tile_of(f, block, warp, reversed != 0, &tile)) {
        if (block * kWarpsPerBlock + warp < f.tiles()) return fail(msg, msg_len, "live warp got no tile", block, warp, 0);
        continue;
      }
      const int64_t n = tile.row0 / C, c0 = tile.row0 % C;
      if (n < 0 || n >= N || c0 % R != 0 || tile.rows < 1 || tile.rows > R || tile.rows != (C - c0 < R ? C - c0 : R) ||
          tile.rows % width != 0 || tile.size != tile.rows * L || (tile.row0 * L) % width != 0)
        return fail(msg, msg_len, "bad tile", tile.row0, tile.rows, tile.size);
      uint32_t image[kFlatImageWords + 8];
      for (auto& w : image) w = 0xdeadbeefu;  // what the kernel does not clear must not matter
      const int cleared = (tile.size >> 5) + 1;
      for (int w = 0; w <= cleared && w < kFlatImageWords; ++w) image[w] = 0;
      for (int lane = 0; lane < kLanes; ++lane) {
        const int o0 = step_offset_w(width, 0, lane);
        for (int r0 = 0; r0 < kFlatSteps / round; ++r0) {
          if (r0 * round * stride >= tile.size) break;  // warp-uniform, as the kernels
          for (int s = 0; s < round; ++s) {
            const int step = r0 * round + s;
            const int d = o0 + step * stride;
            if (d != step_offset_w(width, step, lane)) return fail(msg, msg_len, "offset not linear", step, lane, d);
            if (d >= tile.size) break;
            if (d % width != 0 || d + width > tile.size) return fail(msg, msg_len, "vector outside its tile", tile.row0, d, width);
            const int r = flat_row(d, f.magic);
            if (r != d / L) return fail(msg, msg_len, "flat_row wrong", d, L, r);
            const int split = static_cast<int>(L - (d - r * L));
            unsigned bits = 0;
            for (int k = 0; k < width; ++k) {
              const int row = k < split ? r : r + 1;
              if (row != (d + k) / L || row >= tile.rows || row > kFlatMaxRows)
                return fail(msg, msg_len, "element in the wrong row", d + k, row, L);
              const int64_t flat = tile.row0 * L + d + k;  // == (n * C + c) * L + l
              if ((tile.row0 + row) != n * C + c0 + row) return fail(msg, msg_len, "wrong gate index", flat, row, 0);
              if (whole) {
                if (flat < 0 || flat >= N * C * L) return fail(msg, msg_len, "element out of bounds", flat, 0, 0);
                if (++writes[static_cast<size_t>(flat)] > 1) return fail(msg, msg_len, "element written twice", flat, 0, 0);
              }
              bits |= bit_of(flat) << k;
            }
            const int word = (o0 >> 5) + step * width;
            if (word != d >> 5 || (o0 & 31) != (d & 31) || word >= cleared || word >= kFlatImageWords)
              return fail(msg, msg_len, "image word", d, word, cleared);
            image[word] |= bits << (o0 & 31);
          }
        }
      }
      // lane j < rows writes row j's bytes; then the backward's image from them
      uint32_t back[kFlatImageWords + 8];
      for (auto& w : back) w = 0xdeadbeefu;
      for (int w = 0; w <= cleared && w < kFlatImageWords; ++w) back[w] = 0;
      for (int lane = 0; lane < tile.rows; ++lane) {
        for (int b = 0; b < f.row_bytes; ++b) {
          const int q = static_cast<int>(lane * L + 8 * b), count = flat_byte_bits(L, b);
          if ((q >> 5) + 1 > cleared || (q >> 5) + 1 >= kFlatImageWords) return fail(msg, msg_len, "image read past the cleared words", q, cleared, 0);
          const unsigned byte = flat_image_byte(image, q, count);
          unsigned expected = 0;
          for (int i = 0; i < count; ++i) expected |= bit_of(tile.row0 * L + q + i) << i;
          if (byte != expected) return fail(msg, msg_len, "mask byte differs from its row's bits", tile.row0 + lane, b, byte);
          const int64_t at = (tile.row0 + lane) * f.row_bytes + b;
          if (whole && ++mask_writes[static_cast<size_t>(at)] > 1) return fail(msg, msg_len, "mask byte written twice", at, 0, 0);
          flat_image_add_byte(back, q, byte, [](uint32_t* p, unsigned v) { *p |= v; });
        }
      }
      // the channel sums: lane j adds entries flat_row_first_entry .. flat_row_last_entry of its row
      // (the second partial where flat_entry_second), which must be exactly row j's elements
      for (int j = 0; j < tile.rows; ++j) {
        int64_t covered = 0;
        const int u0 = flat_row_first_entry(L, width, j), u1 = flat_row_last_entry(L, width, j);
        if (u0 < 0 || u1 < u0 || int64_t(u1) * width >= tile.size || u1 >= kFlatSteps * kLanes)
          return fail(msg, msg_len, "row's entries outside the tile", j, u0, u1);
        for (int u = u0; u <= u1; ++u) {
          const int start = u * width, r = start / static_cast<int>(L);
          const bool second = flat_entry_second(L, width, j, u);
          for (int k = 0; k < width && start + k < tile.size; ++k) {
            const int row = (start + k) / static_cast<int>(L);
            const bool in_second = row != r;
            if (in_second == second) {  // the partial the lane takes holds this element
              if (row != j) return fail(msg, msg_len, "channel sum takes another row's element", j, u, start + k);
              ++covered;
            }
          }
        }
        if (covered != L) return fail(msg, msg_len, "channel sum misses elements of its row", j, covered, L);
      }
      for (int d = 0; d < tile.size; ++d) {
        const unsigned got = (back[d >> 5] >> (d & 31)) & 1u;
        if (got != bit_of(tile.row0 * L + d)) return fail(msg, msg_len, "backward image bit differs", tile.row0, d, got);
      }
    }
    return 0;
  };
  return walk_blocks(blocks, first_blocks, last_blocks, walk_block, writes, mask_writes, msg, msg_len);
}

// flat_row(d, magic of L) == d / L for every L the flat tiles take and every offset of a tile
// (and 8 past the largest); 0, or 1 with the first miss in msg.
int se_flat_division(char* msg, int msg_len) {
  for (int64_t L = 2; L <= kFlatMaxL; ++L) {
    const FlatTiles f = make_flat_tiles(1, 8, L, 2);
    for (int d = 0; d < kFlatSteps * kLanes * 8 + 8; ++d)
      if (flat_row(d, f.magic) != d / L) return fail(msg, msg_len, "flat_row(d) != d / L", d, L, flat_row(d, f.magic));
  }
  return 0;
}

// Whether flat tiles apply, and their rows per tile and tiles per sample (for the Python side).
int se_flat_plan(int64_t N, int64_t C, int64_t L, int pixel_rows, int width, int aligned, int64_t* rows,
                 int64_t* tiles_per_sample) {
  if (!flat_tiles_apply(C, L, pixel_rows != 0, width, aligned != 0)) return 0;
  const FlatTiles f = make_flat_tiles(N, C, L, width);
  *rows = f.rows_per_tile;
  *tiles_per_sample = f.tiles_per_sample;
  return 1;
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
