// The excitation MLP on a tile of samples, in the accumulation type A (float or double),
// with its activations, gates and their derivatives.
//
// Forward, per sample t (p = pooled row):      Backward, given dg = sum_hw dy' * x:
//   u1 = W1 p + b1            (S)                 dz2 = dg * gate'(u2)          (C)
//   z  = act(u1)              (S)                 dz1 = (W2^T dz2) * act'(u1)   (S)
//   u2 = W2 z + b2            (C)                 dp  = (W1^T dz1) / (H W)      (C)
//   g  = gate(u2)             (C)
// W2 is kept transposed (S, C) so that both products stream contiguous rows of C.
// Every element's arithmetic is independent of how samples are grouped into tiles, so the
// results do not depend on the thread count or the launch plan.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../se_common.h"

namespace se_kernels::cpu {

template <typename A>
struct MlpWeights {
  const A* w1;   // (S, C)
  const A* b1;   // (S) or nullptr
  const A* w2t;  // (S, C): W2 transposed
  const A* b2;   // (C) or nullptr
  int64_t C, S;
  Act act;
  Gate gate;
};

template <typename A>
inline A reduce_lanes(const at::vec::Vectorized<A>& v) {
  constexpr int64_t W = at::vec::Vectorized<A>::size();
  A lanes[W];
  v.store(lanes);
  A total = 0;
  for (int64_t j = 0; j < W; ++j) total += lanes[j];
  return total;
}

// A block of TB x SB dot products: out[t, s] = bias[s] + sum_c a[t, c] * b[s, c] for t in
// [t0, t0 + TB), s in [s0, s0 + SB). One accumulator per (t, s): every product gets the same
// arithmetic whatever the blocking (full 8- or 4-lane blocks of c in order, lane reduction,
// then the tail).
template <int TB, int SB, typename A>
inline void dot_block(const A* a, const A* b, const A* bias, int64_t C, int64_t S, int64_t t0, int64_t s0, A* out) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  V acc[TB][SB];
  for (int i = 0; i < TB; ++i)
    for (int j = 0; j < SB; ++j) acc[i][j] = V(A(0));
  int64_t c = 0;
  for (; c + W <= C; c += W) {
    V bv[SB];
    for (int j = 0; j < SB; ++j) bv[j] = V::loadu(b + (s0 + j) * C + c);
    for (int i = 0; i < TB; ++i) {
      const V av = V::loadu(a + (t0 + i) * C + c);
      for (int j = 0; j < SB; ++j) acc[i][j] = at::vec::fmadd(av, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < TB; ++i) {
    for (int j = 0; j < SB; ++j) {
      A total = reduce_lanes(acc[i][j]);
      for (int64_t k = c; k < C; ++k) total += a[(t0 + i) * C + k] * b[(s0 + j) * C + k];
      out[(t0 + i) * S + s0 + j] = (bias ? bias[s0 + j] : A(0)) + total;
    }
  }
}

// f(std::integral_constant<int, TB>{}, t0) over [0, nt) in blocks of 4 samples and one block
// of the 1-3 left over, so that a tile of 3 samples (common when samples are large) still
// shares every weight load between its samples.
template <typename F>
inline void for_sample_blocks(int64_t nt, F&& f) {
  int64_t t0 = 0;
  for (; t0 + 4 <= nt; t0 += 4) f(std::integral_constant<int, 4>{}, t0);
  switch (nt - t0) {
    case 3: f(std::integral_constant<int, 3>{}, t0); break;
    case 2: f(std::integral_constant<int, 2>{}, t0); break;
    case 1: f(std::integral_constant<int, 1>{}, t0); break;
    case 0: break;  // nt - t0 is 0 to 3
  }
}

// out (nt, S) = a (nt, C) b^T + bias, b (S, C). Blocks of b rows outside, so that they stay
// in L1 while all of the tile's samples pass.
template <typename A>
void matmul_nt(const A* a, const A* b, const A* bias, int64_t nt, int64_t S, int64_t C, A* out) {
  int64_t s0 = 0;
  for (; s0 + 2 <= S; s0 += 2)
    for_sample_blocks(nt, [&](auto tb, int64_t t0) { dot_block<decltype(tb)::value, 2>(a, b, bias, C, S, t0, s0, out); });
  for (; s0 < S; ++s0)
    for_sample_blocks(nt, [&](auto tb, int64_t t0) { dot_block<decltype(tb)::value, 1>(a, b, bias, C, S, t0, s0, out); });
}

// Rows of b that matmul_nn streams at once: that many sequential streams, which the hardware
// prefetchers follow (walking all S rows per column block instead, a stride of C floats,
// waits on the cache for every row once b outgrows L1: 5-10x slower for S = C / 4 here).
constexpr int64_t kRowChunk = 8;

// out[t, c..c+K*W) for t in [t0, t0 + TB), adding rows [s0, s1) of b: TB x K accumulators, so
// that each loaded vector of b serves TB samples and each broadcast z serves K vectors. The
// accumulators start from init (or 0) at s0 == 0 and from out afterwards.
template <int TB, int K, typename A>
inline void axpy_block(const A* z, const A* b, const A* init, int64_t S, int64_t C, int64_t t0, int64_t c,
                       int64_t s0, int64_t s1, A* out) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  V acc[TB][K];
  for (int i = 0; i < TB; ++i)
    for (int k = 0; k < K; ++k)
      acc[i][k] = s0 > 0 ? V::loadu(out + (t0 + i) * C + c + k * W) : init ? V::loadu(init + c + k * W) : V(A(0));
  for (int64_t s = s0; s < s1; ++s) {
    V bv[K];
    for (int k = 0; k < K; ++k) bv[k] = V::loadu(b + s * C + c + k * W);
    for (int i = 0; i < TB; ++i) {
      const V zv(z[(t0 + i) * S + s]);
      for (int k = 0; k < K; ++k) acc[i][k] = at::vec::fmadd(zv, bv[k], acc[i][k]);
    }
  }
  for (int i = 0; i < TB; ++i)
    for (int k = 0; k < K; ++k) acc[i][k].store(out + (t0 + i) * C + c + k * W);
}

// out (nt, C) = init + z (nt, S) b (S, C), init (C) or nullptr. Every element adds its S terms
// in order s = 0, 1, ... (one fused multiply-add each, starting from init), whatever nt and
// the blocking: chunks of kRowChunk rows of b outside, column blocks, then sample blocks.
template <typename A>
void matmul_nn(const A* z, const A* b, const A* init, int64_t nt, int64_t S, int64_t C, A* out) {
  constexpr int64_t W = at::vec::Vectorized<A>::size();
  const int64_t cv = C - C % W;  // columns in vector blocks
  for (int64_t s0 = 0; s0 < S; s0 += kRowChunk) {
    const int64_t s1 = std::min(S, s0 + kRowChunk);
    int64_t c = 0;
    for (; c + 2 * W <= cv; c += 2 * W)
      for_sample_blocks(nt, [&](auto tb, int64_t t0) {
        axpy_block<decltype(tb)::value, 2>(z, b, init, S, C, t0, c, s0, s1, out);
      });
    for (; c < cv; c += W)
      for_sample_blocks(nt, [&](auto tb, int64_t t0) {
        axpy_block<decltype(tb)::value, 1>(z, b, init, S, C, t0, c, s0, s1, out);
      });
  }
  for (int64_t c = cv; c < C; ++c) {
    for (int64_t t = 0; t < nt; ++t) {
      A acc = init ? init[c] : A(0);
      for (int64_t s = 0; s < S; ++s) acc += z[t * S + s] * b[s * C + c];
      out[t * C + c] = acc;
    }
  }
}

// The element-wise functions go through at::vec::map, so a value gets the same result
// whatever its position (vector lane or tail) and whichever pass computes it. Each switch over
// Act or Gate lists every option and has no default (-Werror=switch: a new option fails to
// compile until it has a case here); a value that is no option stops at unknown_option.

// exp(-v) for sigmoid and silu: PyTorch's fast exp (20 ulp, about half the cost of the 1-ulp
// Sleef exp), which clamps its input, so NaN is put back explicitly.
template <typename A>
inline at::vec::Vectorized<A> exp_neg(const at::vec::Vectorized<A>& v) {
  using V = at::vec::Vectorized<A>;
  return V::blendv(v.neg().exp_u20(), v, v.isnan());
}
template <typename A>
inline void apply_activation(Act act, const A* u, A* z, int64_t n) {
  using V = at::vec::Vectorized<A>;
  switch (act) {
    case Act::ReLU:
      at::vec::map([](V v) { return at::vec::maximum(v, V(A(0))); }, z, u, n);
      return;
    case Act::SiLU:
      at::vec::map([](V v) { return v / (V(A(1)) + exp_neg(v)); }, z, u, n);
      return;
    case Act::GELU:
      at::vec::map([](V v) { return V(A(0.5)) * v * (V(A(1)) + (v * V(A(M_SQRT1_2))).erf()); }, z, u, n);
      return;
    case Act::HardSwish:
      at::vec::map(
          [](V v) { return v * at::vec::minimum(at::vec::maximum(v + V(A(3)), V(A(0))), V(A(6))) / V(A(6)); }, z,
          u, n);
      return;
  }
  unknown_option("activation", static_cast<int>(act));
}

template <typename A>
inline void apply_gate(Gate gate, const A* u, A* g, int64_t n) {
  using V = at::vec::Vectorized<A>;
  switch (gate) {
    case Gate::Sigmoid:
      at::vec::map([](V v) { return V(A(1)) / (V(A(1)) + exp_neg(v)); }, g, u, n);
      return;
    case Gate::HardSigmoid:
      at::vec::map([](V v) { return at::vec::minimum(at::vec::maximum(v + V(A(3)), V(A(0))), V(A(6))) / V(A(6)); },
                   g, u, n);
      return;
  }
  unknown_option("gate", static_cast<int>(gate));
}

// d act(u) / du, following PyTorch's backward formulas (relu'(0) = 0, hardswish' = u/3 + 1/2
// on the open interval (-3, 3), 0 at -3 and 1 at 3, as aten::hardswish_backward).
template <typename A>
inline A activation_grad(Act act, A u) {
  switch (act) {
    case Act::ReLU:
      return u > A(0) ? A(1) : A(0);
    case Act::SiLU: {
      const A s = A(1) / (A(1) + std::exp(-u));
      return s * (A(1) + u * (A(1) - s));
    }
    case Act::GELU: {
      const A cdf = A(0.5) * (A(1) + std::erf(u * A(M_SQRT1_2)));
      const A pdf = std::exp(A(-0.5) * u * u) * A(0.5 * M_2_SQRTPI * M_SQRT1_2);
      return cdf + u * pdf;
    }
    case Act::HardSwish:
      return u <= A(-3) ? A(0) : (u < A(3) ? u / A(3) + A(0.5) : A(1));
  }
  unknown_option("activation", static_cast<int>(act));
}

// d gate(u) / du given g = gate(u) (hardsigmoid' = 1/6 on the open interval (-3, 3)).
template <typename A>
inline A gate_grad(Gate gate, A u, A g) {
  switch (gate) {
    case Gate::Sigmoid:
      return g * (A(1) - g);
    case Gate::HardSigmoid:
      return (u > A(-3) && u < A(3)) ? A(1) / A(6) : A(0);
  }
  unknown_option("gate", static_cast<int>(gate));
}

// nt samples: P (nt, C) -> U1 (nt, S), Z (nt, S), U2 (nt, C), G (nt, C).
template <typename A>
void mlp_forward(const MlpWeights<A>& w, int64_t nt, const A* P, A* U1, A* Z, A* U2, A* G) {
  matmul_nt(P, w.w1, w.b1, nt, w.S, w.C, U1);
  apply_activation(w.act, U1, Z, nt * w.S);
  matmul_nn(Z, w.w2t, w.b2, nt, w.S, w.C, U2);
  apply_gate(w.gate, U2, G, nt * w.C);
}

// nt samples: U1, U2 (saved by the forward) and DG (nt, C) -> G, Z recomputed,
// DZ2 (nt, C), DZ1 (nt, S), DP (nt, C). L = H * W.
template <typename A>
void mlp_backward(const MlpWeights<A>& w, int64_t nt, int64_t L, const A* U1, const A* U2, const A* DG, A* G,
                  A* Z, A* DZ2, A* DZ1, A* DP) {
  const int64_t C = w.C, S = w.S;
  apply_gate(w.gate, U2, G, nt * C);
  apply_activation(w.act, U1, Z, nt * S);
  for (int64_t i = 0; i < nt * C; ++i) DZ2[i] = DG[i] * gate_grad(w.gate, U2[i], G[i]);
  matmul_nt(DZ2, w.w2t, static_cast<const A*>(nullptr), nt, S, C, DZ1);
  for (int64_t i = 0; i < nt * S; ++i) DZ1[i] *= activation_grad(w.act, U1[i]);
  matmul_nn(DZ1, w.w1, static_cast<const A*>(nullptr), nt, S, C, DP);
  for (int64_t i = 0; i < nt * C; ++i) DP[i] /= A(L);
}

// Weight gradients over the batch, for the columns [c0, c1) of C:
//   out (S, C) = left^T right, out[s, c] = sum_n left[n, s] * right[n, c]   (left (N, S), right (N, C))
//   col_sum (C) = sum_n right[n, c]   (if col_sum is not null)
// Each element adds the samples in order: the result does not depend on how columns are split
// over threads (no atomics, no thread-count-dependent reduction trees).
template <typename A>
void outer_sum_columns(const A* left, const A* right, int64_t N, int64_t S, int64_t C, int64_t c0, int64_t c1,
                       A* out, A* col_sum) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  constexpr int K = 4;
  for (int64_t s = 0; s < S; ++s) {
    int64_t c = c0;
    for (; c + K * W <= c1; c += K * W) {
      V acc[K];
      for (int k = 0; k < K; ++k) acc[k] = V(A(0));
      for (int64_t n = 0; n < N; ++n) {
        const V l(left[n * S + s]);
        for (int k = 0; k < K; ++k) acc[k] = at::vec::fmadd(l, V::loadu(right + n * C + c + k * W), acc[k]);
      }
      for (int k = 0; k < K; ++k) acc[k].store(out + s * C + c + k * W);
    }
    for (; c < c1; ++c) {
      A acc = 0;
      for (int64_t n = 0; n < N; ++n) acc += left[n * S + s] * right[n * C + c];
      out[s * C + c] = acc;
    }
  }
  if (col_sum) {
    for (int64_t c = c0; c < c1; ++c) {
      A acc = 0;
      for (int64_t n = 0; n < N; ++n) acc += right[n * C + c];
      col_sum[c] = acc;
    }
  }
}

}  // namespace se_kernels::cpu
