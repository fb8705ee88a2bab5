// The streaming loops: each walks one contiguous row of x (H*W pixels of one channel for
// NCHW, C channels of one pixel for channels_last), reading storage type T and computing in
// acc_t<T> (float, or double for double). 8-lane vector bodies for float/bfloat16/float16,
// scalar tails (and scalar everything for double).
//
// The relu mask holds one bit per element, bit i of a row at byte i / 8, bit i % 8.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include "vec8.h"

namespace se_kernels::cpu {

template <typename T>
using acc_t = at::opmath_type<T>;

// What the SE op (se_cpu.cpp) and the generic path's stages (channel_attention.cpp) share, so
// that their pools give the same bits and their passes split work alike:
// channels_last pooling adds partial sums of kPixelChunk pixels in order (one running sum per
// channel over a 256x256 map lost 1e-5 of the mean in float32); parallel passes hand each task
// about kGrainElements elements.
constexpr int64_t kPixelChunk = 64;
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t grain_rows(int64_t row_len) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_len));
}

// f(std::true_type) or f(std::false_type) for a runtime bool.
template <typename F>
void with_bool(bool b, F&& f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// ---- Row reductions (NCHW rows: one result per row) ---------------------------------------
// A row's reduction: 8-lane vector accumulation over its first n - n % 8 elements, a lane
// reduction in lane_sum's order, then the tail terms in order. Short rows (fewer than
// kLongRow vector elements) go 8 rows at a time, one accumulator each, reduced together by
// sum_lanes8 (bit-identical to lane_sum), and the leftover rows alone with the same single
// accumulator; long rows go one at a time with four accumulators. The arithmetic depends only
// on n, never on how rows are grouped, so every launch plan gives the same bits.
constexpr int64_t kLongRow = 64;

// out[r] = sum_i term(r, i) for r < nrows, rows of n. vterm(r, i, acc) adds the 8 terms at
// i..i+7 of row r to acc; term(r, i) is one term in acc_t<T>.
template <typename T, typename VTerm, typename Term>
inline void reduce_rows(int64_t nrows, int64_t n, acc_t<T>* out, const VTerm& vterm, const Term& term) {
  using A = acc_t<T>;
  int64_t r = 0;
  const int64_t nv = kVectorized<T> ? (n & ~int64_t(7)) : 0;
  auto add_tail = [&](int64_t row, A total) {
    for (int64_t i = nv; i < n; ++i) total += term(row, i);
    return total;
  };
  if constexpr (kVectorized<T>) {
    if (nv >= kLongRow) {
      for (; r < nrows; ++r) {
        Vec a0 = vterm(r, 0, Vec(0.f)), a1 = vterm(r, 8, Vec(0.f));
        Vec a2 = vterm(r, 16, Vec(0.f)), a3 = vterm(r, 24, Vec(0.f));
        int64_t i = 32;
        for (; i + 32 <= nv; i += 32) {
          a0 = vterm(r, i, a0);
          a1 = vterm(r, i + 8, a1);
          a2 = vterm(r, i + 16, a2);
          a3 = vterm(r, i + 24, a3);
        }
        a0 = (a0 + a1) + (a2 + a3);
        for (; i < nv; i += 8) a0 = vterm(r, i, a0);
        out[r] = add_tail(r, lane_sum(a0));
      }
      return;
    }
    if (nv > 0) {
      for (; r + 8 <= nrows; r += 8) {
        Vec acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = vterm(r + j, 0, Vec(0.f));
        for (int64_t i = 8; i < nv; i += 8)
          for (int j = 0; j < 8; ++j) acc[j] = vterm(r + j, i, acc[j]);
        const Vec sums = sum_lanes8(acc);
        if (nv == n) {
          sums.store(out + r);
        } else {
          float t[8];
          sums.store(t);
          for (int j = 0; j < 8; ++j) out[r + j] = add_tail(r + j, t[j]);
        }
      }
    }
  }
  for (; r < nrows; ++r) {
    A total = 0;
    if constexpr (kVectorized<T>) {
      if (nv > 0) {
        Vec acc = vterm(r, 0, Vec(0.f));
        for (int64_t i = 8; i < nv; i += 8) acc = vterm(r, i, acc);
        total = lane_sum(acc);
      }
    }
    out[r] = add_tail(r, total);
  }
}

// out[r] = mean of row r of x (nrows rows of n).
template <typename T>
inline void mean_rows(const T* x, int64_t nrows, int64_t n, acc_t<T>* out) {
  using A = acc_t<T>;
  reduce_rows<T>(
      nrows, n, out, [&](int64_t r, int64_t i, const auto& acc) { return acc + load8(x + r * n + i); },
      [&](int64_t r, int64_t i) { return static_cast<A>(x[r * n + i]); });
  using V = at::vec::Vectorized<A>;
  at::vec::map([n](V v) { return v / V(A(n)); }, out, out, nrows);
}

// out[r] = sum_i dy'[r, i] * x[r, i]; mask rows are mask_row_bytes apart.
template <typename T, bool kMask>
inline void dot_rows(const T* dy, const T* x, const uint8_t* mask, int64_t mask_row_bytes, int64_t nrows, int64_t n,
                     acc_t<T>* out) {
  using A = acc_t<T>;
  reduce_rows<T>(
      nrows, n, out,
      [&](int64_t r, int64_t i, const auto& acc) {
        auto d = load8(dy + r * n + i);
        if constexpr (kMask) d = keep_lanes(d, mask[r * mask_row_bytes + (i >> 3)]);
        return at::vec::fmadd(d, load8(x + r * n + i), acc);
      },
      [&](int64_t r, int64_t i) {
        A d = static_cast<A>(dy[r * n + i]);
        if constexpr (kMask) d = mask_bit(mask + r * mask_row_bytes, i) ? d : A(0);
        return d * static_cast<A>(x[r * n + i]);
      });
}

// ---- Column reductions (channels_last rows: acc[c] accumulates over rows) -----------------
// Each channel adds its rows in order; blocks of 32 channels stay in registers.

// acc[c] += sum_r term(r, c) over nrows rows of C. vterm(r, c) is the 8-lane version.
template <typename T, typename VTerm, typename Term>
inline void accumulate_columns(int64_t nrows, int64_t C, acc_t<T>* acc, const VTerm& vterm, const Term& term) {
  int64_t c = 0;
  if constexpr (kVectorized<T>) {
    for (; c + 32 <= C; c += 32) {
      Vec a0 = Vec::loadu(acc + c), a1 = Vec::loadu(acc + c + 8);
      Vec a2 = Vec::loadu(acc + c + 16), a3 = Vec::loadu(acc + c + 24);
      for (int64_t r = 0; r < nrows; ++r) {
        a0 = vterm(r, c, a0);
        a1 = vterm(r, c + 8, a1);
        a2 = vterm(r, c + 16, a2);
        a3 = vterm(r, c + 24, a3);
      }
      a0.store(acc + c);
      a1.store(acc + c + 8);
      a2.store(acc + c + 16);
      a3.store(acc + c + 24);
    }
    for (; c + 8 <= C; c += 8) {
      Vec a = Vec::loadu(acc + c);
      for (int64_t r = 0; r < nrows; ++r) a = vterm(r, c, a);
      a.store(acc + c);
    }
  }
  for (; c < C; ++c) {
    acc_t<T> a = acc[c];
    for (int64_t r = 0; r < nrows; ++r) a += term(r, c);
    acc[c] = a;
  }
}

// acc[c] += x[r, c] over nrows rows of C (channels_last pooling).
template <typename T>
inline void sum_columns(const T* x, int64_t nrows, int64_t C, acc_t<T>* acc) {
  accumulate_columns<T>(
      nrows, C, acc, [&](int64_t r, int64_t c, const auto& a) { return a + load8(x + r * C + c); },
      [&](int64_t r, int64_t c) { return static_cast<acc_t<T>>(x[r * C + c]); });
}

// acc[c] += dy'[r, c] * x[r, c] over nrows rows of C (channels_last gate gradient).
template <typename T, bool kMask>
inline void dot_columns(const T* dy, const T* x, const uint8_t* mask, int64_t mask_row_bytes, int64_t nrows,
                        int64_t C, acc_t<T>* acc) {
  using A = acc_t<T>;
  accumulate_columns<T>(
      nrows, C, acc,
      [&](int64_t r, int64_t c, const auto& a) {
        Vec d = load8(dy + r * C + c);
        if constexpr (kMask) d = keep_lanes(d, mask[r * mask_row_bytes + (c >> 3)]);
        return at::vec::fmadd(d, load8(x + r * C + c), a);
      },
      [&](int64_t r, int64_t c) {
        A d = static_cast<A>(dy[r * C + c]);
        if constexpr (kMask) d = mask_bit(mask + r * mask_row_bytes, c) ? d : A(0);
        return d * static_cast<A>(x[r * C + c]);
      });
}

// ---- Element-wise rows ----------------------------------------------------------------------

// y = x * g (+ r), then relu, writing the row's relu mask. kPerLane: g[i] per element
// (channels_last rows); otherwise g[0] scales the whole row (NCHW rows). kVecs > 0: the row
// is exactly kVecs * 8 long (n is ignored), so short rows run fully unrolled. kStream: y is
// written with streaming stores (the row must start 8-element aligned).
template <typename T, bool kPerLane, bool kResidual, bool kRelu, int kVecs = 0, bool kStream = false>
inline void scale_row(const T* x, const acc_t<T>* g, const T* r, T* y, uint8_t* mask, int64_t n) {
  using A = acc_t<T>;
  if constexpr (kVecs > 0) n = 8 * kVecs;
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    const Vec g_row(kPerLane ? 0.f : g[0]);
    const Vec zero(0.f);
    for (; i + 8 <= n; i += 8) {
      Vec v = load8(x + i) * (kPerLane ? Vec::loadu(g + i) : g_row);
      if constexpr (kResidual) v = v + load8(r + i);
      if constexpr (kRelu) {
        mask[i >> 3] = positive_bits(v);
        v = at::vec::maximum(v, zero);
      }
      if constexpr (kStream)
        stream8(y + i, v);
      else
        store8(y + i, v);
    }
    if constexpr (kVecs == 0) {
      if (i < n) {  // the row's last n % 8 elements as one partial vector: the same arithmetic
        const int64_t count = n - i;
        Vec v = load8n(x + i, count) * (kPerLane ? load8n(g + i, count) : g_row);
        if constexpr (kResidual) v = v + load8n(r + i, count);
        if constexpr (kRelu) {
          mask[i >> 3] = positive_bits(v) & static_cast<uint8_t>((1u << count) - 1);
          v = at::vec::maximum(v, zero);
        }
        store8n(y + i, v, count);
      }
    }
  } else {
    uint8_t bits = 0;
    for (; i < n; ++i) {
      A v = static_cast<A>(x[i]) * (kPerLane ? g[i] : g[0]);
      if constexpr (kResidual) v += static_cast<A>(r[i]);
      if constexpr (kRelu) {
        bits |= static_cast<uint8_t>(v > A(0)) << (i & 7);
        if ((i & 7) == 7) {
          mask[i >> 3] = bits;
          bits = 0;
        }
        v = v < A(0) ? A(0) : v;  // keeps NaN, as torch.relu does
      }
      y[i] = static_cast<T>(v);
    }
    if constexpr (kRelu) {
      if (n & 7) mask[n >> 3] = bits;
    }
  }
}

// dy' = dy masked by the relu mask; grad_x = dy' * g + dp (if dx), grad_residual = dy'
// (if dres). kPerLane, kVecs and kStream as in scale_row (g and dp follow kPerLane).
template <typename T, bool kPerLane, bool kMask, int kVecs = 0, bool kStream = false>
inline void grad_row(const T* dy, const uint8_t* mask, const acc_t<T>* g, const acc_t<T>* dp, T* dx, T* dres,
                     int64_t n) {
  using A = acc_t<T>;
  if constexpr (kVecs > 0) n = 8 * kVecs;
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    const Vec g_row(kPerLane ? 0.f : g[0]);
    const Vec dp_row(kPerLane ? 0.f : dp[0]);
    for (; i + 8 <= n; i += 8) {
      Vec d = load8(dy + i);
      if constexpr (kMask) d = keep_lanes(d, mask[i >> 3]);
      if (dres) {
        if constexpr (kStream)
          stream8(dres + i, d);
        else
          store8(dres + i, d);
      }
      if (dx) {
        const Vec gv = kPerLane ? Vec::loadu(g + i) : g_row;
        const Vec dpv = kPerLane ? Vec::loadu(dp + i) : dp_row;
        if constexpr (kStream)
          stream8(dx + i, at::vec::fmadd(d, gv, dpv));
        else
          store8(dx + i, at::vec::fmadd(d, gv, dpv));
      }
    }
    if constexpr (kVecs == 0) {
      if (i < n) {  // the row's last n % 8 elements as one partial vector: the same arithmetic
        const int64_t count = n - i;
        Vec d = load8n(dy + i, count);
        if constexpr (kMask) d = keep_lanes(d, mask[i >> 3]);
        if (dres) store8n(dres + i, d, count);
        if (dx) {
          const Vec gv = kPerLane ? load8n(g + i, count) : g_row;
          const Vec dpv = kPerLane ? load8n(dp + i, count) : dp_row;
          store8n(dx + i, at::vec::fmadd(d, gv, dpv), count);
        }
      }
    }
  } else {
    for (; i < n; ++i) {
      A d = static_cast<A>(dy[i]);
      if constexpr (kMask) d = mask_bit(mask, i) ? d : A(0);
      if (dres) dres[i] = static_cast<T>(d);
      if (dx) dx[i] = static_cast<T>(d * (kPerLane ? g[i] : g[0]) + (kPerLane ? dp[i] : dp[0]));
    }
  }
}

// f(std::integral_constant<int, K>{}) with K = n / 8 for the short rows n in {8, 16, 32, 64}
// that get unrolled loops, K = 0 otherwise (and always for the scalar types).
template <typename T, typename F>
inline void with_row_vecs(int64_t n, F&& f) {
  if constexpr (!kVectorized<T>) {
    f(std::integral_constant<int, 0>{});
  } else {
    switch (n) {
      case 8: f(std::integral_constant<int, 1>{}); break;
      case 16: f(std::integral_constant<int, 2>{}); break;
      case 32: f(std::integral_constant<int, 4>{}); break;
      case 64: f(std::integral_constant<int, 8>{}); break;
      default: f(std::integral_constant<int, 0>{}); break;
    }
  }
}

// ---- Flat NCHW walks ---------------------------------------------------------------------
// NCHW rows whose length L = H*W is not a multiple of 8 (7x7, 14x14) end in a partial vector
// each and start unaligned (no streaming stores). Where each row's operands are one value per
// row (the gate, dp), the element-wise passes instead walk the rows as one flat array in aligned
// vectors of 8: a vector crosses at most one row boundary (L >= 8), and there its lanes take the
// two rows' values.
inline bool flat_rows(int64_t L, bool pixel_rows) {
  return !pixel_rows && L >= 8 && L % 8 != 0;
}

template <int K>
using RowVecs = std::array<Vec, K>;

// f(i, count, vals) over rows [r0, r1) of L elements (L >= 8), element i of row r at flat index
// r * L: count == 8 for an aligned vector i..i+7, vals the per-row operands of each lane (row(r)
// broadcasts row r's K values). Vectors stay inside the span [lo, hi) the rows belong to (one
// sample of the fused SE plan, where the next sample's gate may not exist yet; the whole tensor
// for the stage kernels); the span's first and last unaligned elements come as one partial
// vector each (count < 8, i unaligned, one row). Row r takes the vectors that start in it, the
// one crossing into row r + 1 included, so the lanes of a range's first row that the previous
// row's crossing vector holds belong to whoever walks that row. A partial vector gets a full
// vector's arithmetic (load8n / store8n), so no element's value depends on the span or on how a
// pass splits the rows.
template <int K, typename Row, typename F>
inline void walk_flat_rows(int64_t r0, int64_t r1, int64_t L, int64_t lo, int64_t hi, const Row& row, const F& f) {
  const Vec lane = Vec::arange(0.f, 1.f);
  RowVecs<K> here = row(r0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t start = r * L, end = start + L;
    int64_t i = (start + 7) / 8 * 8;
    if (start == lo && i != start) f(start, i - start, here);
    const int64_t cross = end / 8 * 8;  // the vector holding row r's last elements
    for (; i < cross; i += 8) f(i, int64_t(8), here);
    if (cross == end) {
      if (r + 1 < r1) here = row(r + 1);
    } else if (cross + 8 <= hi) {
      const RowVecs<K> next = row(r + 1);
      const Vec in_row = lane < Vec(static_cast<float>(end - cross));
      RowVecs<K> mixed;
      for (int k = 0; k < K; ++k) mixed[k] = Vec::blendv(next[k], here[k], in_row);
      f(cross, int64_t(8), mixed);
      here = next;
    } else {
      f(cross, end - cross, here);  // the span's last row
    }
  }
}

// y = x * g[row] (+ r) over rows [r0, r1) of a flat walk (T vectorized); kStream: y's full
// vectors with streaming stores (y 32-byte aligned).
template <typename T, bool kResidual, bool kStream>
inline void scale_flat_rows(const T* x, const float* gate, const T* r, T* y, int64_t r0, int64_t r1, int64_t L,
                            int64_t lo, int64_t hi) {
  walk_flat_rows<1>(
      r0, r1, L, lo, hi, [&](int64_t row) { return RowVecs<1>{Vec(gate[row])}; },
      [&](int64_t i, int64_t count, const RowVecs<1>& v) {
        Vec out = load8n(x + i, count) * v[0];
        if constexpr (kResidual) out = out + load8n(r + i, count);
        put8n<kStream>(y + i, out, count);
      });
}

// dx = dy * g[row] + dp[row] over rows [r0, r1) of a flat walk (no relu mask: its bit rows follow
// the rows); kStream as in scale_flat_rows.
template <typename T, bool kStream>
inline void grad_flat_rows(const T* dy, const float* gate, const float* dp, T* dx, int64_t r0, int64_t r1, int64_t L,
                           int64_t lo, int64_t hi) {
  walk_flat_rows<2>(
      r0, r1, L, lo, hi, [&](int64_t row) { return RowVecs<2>{Vec(gate[row]), Vec(dp[row])}; },
      [&](int64_t i, int64_t count, const RowVecs<2>& v) {
        put8n<kStream>(dx + i, at::vec::fmadd(load8n(dy + i, count), v[0], v[1]), count);
      });
}

}  // namespace se_kernels::cpu
