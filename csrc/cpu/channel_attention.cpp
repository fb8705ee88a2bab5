// The stage kernels of the generic channel-attention path (se_kernels/attention.py): the passes
// over x that every channel-attention block shares, with the excitation left to PyTorch.
//
//   ca_pool(x, with_max)            -> mean (N, C) in x's dtype; with_max: max (N, C) in x's dtype
//                                      and ties (N, C, accumulation type): how many elements equal it
//   ca_scale(x, g, residual, relu)  -> y = relu?(x * g + residual), relu_mask (se_forward's format)
//   ca_gate_grad(dy, x, mask, relu) -> dg = sum_hw dy' * x, (N, C) accumulation type
//   ca_input_grad(dy, mask, g, dmean, x, max, dmax, ties, relu, need_x, need_residual)
//                                   -> dx = dy' * g + dmean / HW + [x == max] * dmax / ties, dres = dy'
//
// x and every tensor shaped like it are NCHW- or channels_last-contiguous with x's layout (the
// Python layer makes them so); g, dmean, dmax and ties are contiguous (N, C) in the accumulation
// type. The loops are rows.h's, so the arithmetic is the fused SE op's.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "../ca_common.h"
#include "rows.h"

namespace se_kernels::cpu {
namespace {

using namespace se_kernels::ca;

// Outputs (y, dx, dres) of at least this many bytes are written with streaming stores (no
// read-for-ownership: the pass moves one byte per output byte instead of two, and leaves the
// cache to x). Not from 8 MiB on as the fused SE op: there the tile re-read from cache is what
// counts, here every pass streams the whole tensor, and an output the last-level cache holds
// is cheaper written there (measured on one core of a 32 MiB-L3 EPYC, ECA's scale pass against
// normal stores: 28x28 and 56x56 maps (51 and 103 MB) 1.2x faster streamed, 14x14 (26 MB) 5%
// and 7x7 (13 MB) 7% slower).
constexpr int64_t kStreamingStoreBytes = int64_t(32) << 20;

template <typename T>
bool streams(const at::Tensor& out, const Geometry& g, bool flat) {
  if (!kVectorized<T> || out.numel() * static_cast<int64_t>(sizeof(T)) < kStreamingStoreBytes) return false;
  // every 8-element store aligned: from a 32-byte base, rows of a multiple of 8 (or flat)
  return (flat || g.row_len % 8 == 0) && reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 32 == 0;
}

// ---- flat NCHW walks (rows.h) ----------------------------------------------------------------
// The whole tensor is one span: every row's gate exists before the pass.
bool flat_rows(const Geometry& g) {
  return cpu::flat_rows(g.L, g.pixel_rows);
}

// body(r0, r1, lo, hi) over the rows of x in parallel, the span the whole tensor.
template <typename Body>
void for_flat_rows(const Geometry& g, bool stream, const Body& body) {
  const int64_t rows = g.N * g.C;
  at::parallel_for(0, rows, grain_rows(g.L), [&](int64_t r0, int64_t r1) {
    body(r0, r1, int64_t(0), rows * g.L);
    if (stream) stream_fence();
  });
}

template <typename T, bool kResidual, bool kStream>
void scale_flat(const Geometry& g, const T* x, const float* gate, const T* r, T* y) {
  for_flat_rows(g, kStream, [&](int64_t r0, int64_t r1, int64_t lo, int64_t hi) {
    scale_flat_rows<T, kResidual, kStream>(x, gate, r, y, r0, r1, g.L, lo, hi);
  });
}

// dx = dy * g + dp (+ [x == max] * dm) over the flat tensor: no relu mask (the mask's bit rows
// follow the rows), dres is then dy itself.
template <typename T, bool kMax, bool kStream>
void input_grad_flat(const Geometry& g, const T* dy, const float* gate, const float* dp, const T* x, const T* mx,
                     const float* dm, T* dx) {
  for_flat_rows(g, kStream, [&](int64_t r0, int64_t r1, int64_t lo, int64_t hi) {
    if constexpr (!kMax) {
      grad_flat_rows<T, kStream>(dy, gate, dp, dx, r0, r1, g.L, lo, hi);
    } else {
      walk_flat_rows<4>(
          r0, r1, g.L, lo, hi,
          [&](int64_t row) {
            return RowVecs<4>{Vec(gate[row]), Vec(dp[row]), Vec(static_cast<float>(mx[row])), Vec(dm[row])};
          },
          [&](int64_t i, int64_t count, const RowVecs<4>& v) {
            Vec out = at::vec::fmadd(load8n(dy + i, count), v[0], v[1]);
            out = out + ((load8n(x + i, count) == v[2]) & v[3]);
            put8n<kStream>(dx + i, out, count);
          });
    }
  });
}

// ---- pool ----------------------------------------------------------------------------------

// channels_last sums over a sample's L pixels: partial sums of kPixelChunk pixels each (rows.h),
// added in order, as the fused SE op's pooling.

template <typename A, typename F>
void chunked_columns(const Geometry& g, A* out, A* part, F&& sum_rows) {
  std::fill(out, out + g.C, A(0));
  for (int64_t p0 = 0; p0 < g.L; p0 += kPixelChunk) {
    std::fill(part, part + g.C, A(0));
    sum_rows(p0, std::min(kPixelChunk, g.L - p0), part);
    for (int64_t c = 0; c < g.C; ++c) out[c] += part[c];
  }
}

template <typename T>
void pool(const Geometry& g, const T* x, acc_t<T>* mean) {
  using A = acc_t<T>;
  if (!g.pixel_rows) {
    at::parallel_for(0, g.N * g.C, grain_rows(g.L), [&](int64_t begin, int64_t end) {
      mean_rows<T>(x + begin * g.L, end - begin, g.L, mean + begin);
    });
    return;
  }
  at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> part(g.C);
    for (int64_t n = begin; n < end; ++n) {
      A* out = mean + n * g.C;
      chunked_columns(g, out, part.data(), [&](int64_t p0, int64_t rows, A* acc) {
        sum_columns<T>(x + (n * g.L + p0) * g.C, rows, g.C, acc);
      });
      for (int64_t c = 0; c < g.C; ++c) out[c] /= A(g.L);
    }
  });
}

// The max of each (n, c) over its pixels (NaN if any is NaN, as torch.amax) and how many equal it
// (0 for NaN): one pass for the max, one counting, the row still in cache. 8 lanes at a time
// (at::vec::maximum propagates NaN); the max is one of the inputs, so it converts back exactly.
template <typename T>
acc_t<T> nan_max(acc_t<T> a, acc_t<T> b) {
  return (std::isnan(a) || a >= b) ? a : b;
}

template <typename T>
void max_of_rows(const T* x, int64_t nrows, int64_t n, T* mx, acc_t<T>* ties) {
  using A = acc_t<T>;
  for (int64_t r = 0; r < nrows; ++r) {
    const T* row = x + r * n;
    A best = static_cast<A>(row[0]);
    int64_t i = 0;
    if constexpr (kVectorized<T>) {
      if (n >= 8) {
        Vec vb = load8(row);
        for (i = 8; i + 8 <= n; i += 8) vb = at::vec::maximum(vb, load8(row + i));
        float lanes[8];
        vb.store(lanes);
        best = lanes[0];
        for (int k = 1; k < 8; ++k) best = nan_max<T>(best, lanes[k]);
      }
    }
    for (; i < n; ++i) best = nan_max<T>(best, static_cast<A>(row[i]));
    A count = 0;
    i = 0;
    if constexpr (kVectorized<T>) {
      const Vec vb(best), one(1.f);
      Vec vc(0.f);
      for (; i + 8 <= n; i += 8) vc = vc + ((load8(row + i) == vb) & one);
      count = lane_sum(vc);
    }
    for (; i < n; ++i) count += static_cast<A>(static_cast<A>(row[i]) == best);
    mx[r] = static_cast<T>(best);
    ties[r] = count;
  }
}

// channels_last: per sample, the max of each column of L rows of C, then the counts.
template <typename T>
void max_of_columns(const T* x, int64_t L, int64_t C, T* mx, acc_t<T>* ties) {
  using A = acc_t<T>;
  int64_t c = 0;
  if constexpr (kVectorized<T>) {
    const Vec one(1.f);
    for (; c + 8 <= C; c += 8) {
      Vec vb = load8(x + c);
      for (int64_t p = 1; p < L; ++p) vb = at::vec::maximum(vb, load8(x + p * C + c));
      Vec vc(0.f);
      for (int64_t p = 0; p < L; ++p) vc = vc + ((load8(x + p * C + c) == vb) & one);
      float best[8], count[8];
      vb.store(best);
      vc.store(count);
      for (int k = 0; k < 8; ++k) {
        mx[c + k] = static_cast<T>(best[k]);
        ties[c + k] = count[k];
      }
    }
  }
  for (; c < C; ++c) {
    A best = static_cast<A>(x[c]);
    for (int64_t p = 1; p < L; ++p) best = nan_max<T>(best, static_cast<A>(x[p * C + c]));
    A count = 0;
    for (int64_t p = 0; p < L; ++p) count += static_cast<A>(static_cast<A>(x[p * C + c]) == best);
    mx[c] = static_cast<T>(best);
    ties[c] = count;
  }
}

template <typename T>
void pool_max(const Geometry& g, const T* x, T* mx, acc_t<T>* ties) {
  if (!g.pixel_rows) {
    at::parallel_for(0, g.N * g.C, grain_rows(g.L), [&](int64_t begin, int64_t end) {
      max_of_rows<T>(x + begin * g.L, end - begin, g.L, mx + begin, ties + begin);
    });
    return;
  }
  at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      max_of_columns<T>(x + n * g.L * g.C, g.L, g.C, mx + n * g.C, ties + n * g.C);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ca_pool_cpu(const at::Tensor& x, bool with_max) {
  const Geometry g = check_x(x);
  const auto acc = accumulation_type(x.scalar_type());
  at::Tensor mean_acc = at::empty({g.N, g.C}, x.options().dtype(acc));
  at::Tensor mx = at::empty({with_max ? g.N : 0, with_max ? g.C : 0}, x.options());
  at::Tensor ties = at::empty({with_max ? g.N : 0, with_max ? g.C : 0}, x.options().dtype(acc));
  if (g.N == 0) return {mean_acc.to(x.scalar_type()), mx, ties};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ca_pool_cpu", [&] {
    pool<scalar_t>(g, x.const_data_ptr<scalar_t>(), mean_acc.mutable_data_ptr<acc_t<scalar_t>>());
    if (with_max) pool_max<scalar_t>(g, x.const_data_ptr<scalar_t>(), mx.mutable_data_ptr<scalar_t>(),
                                     ties.mutable_data_ptr<acc_t<scalar_t>>());
  });
  return {mean_acc.to(x.scalar_type()), mx, ties};
}

// ---- scale ---------------------------------------------------------------------------------

template <typename T, bool kPerLane, bool kResidual, bool kRelu, bool kStream>
void scale_rows(const Geometry& g, const T* x, const acc_t<T>* gate, const T* r, T* y, uint8_t* mask) {
  const int64_t total = g.N * g.rows;
  at::parallel_for(0, total, grain_rows(g.row_len), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.rows;
      const acc_t<T>* gr = kPerLane ? gate + n * g.C : gate + row;  // NCHW rows: row = n * C + c
      const int64_t off = row * g.row_len;
      scale_row<T, kPerLane, kResidual, kRelu, 0, kStream>(x + off, gr, kResidual ? r + off : nullptr, y + off,
                                                           kRelu ? mask + row * g.mask_row_bytes : nullptr,
                                                           g.row_len);
    }
    if (kStream) stream_fence();
  });
}

std::tuple<at::Tensor, at::Tensor> ca_scale_cpu(const at::Tensor& x, const at::Tensor& gate,
                                                const std::optional<at::Tensor>& residual, bool out_relu) {
  const Geometry g = check_x(x);
  check_vector(gate, x, "g");
  if (residual.has_value()) check_like_x(*residual, x, g, "residual");
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = out_relu ? at::empty({g.N, g.rows, g.mask_row_bytes}, x.options().dtype(at::kByte))
                             : at::empty({0}, x.options().dtype(at::kByte));
  if (g.N == 0) return {y, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ca_scale_cpu", [&] {
    using T = scalar_t;
    const T* r = residual.has_value() ? residual->const_data_ptr<T>() : nullptr;
    if constexpr (kVectorized<T>) {
      if (!out_relu && flat_rows(g)) {
        with_bool(r != nullptr, [&](auto has_res) {
          with_bool(streams<T>(y, g, /*flat=*/true), [&](auto stream) {
            scale_flat<T, decltype(has_res)::value, decltype(stream)::value>(
                g, x.const_data_ptr<T>(), gate.const_data_ptr<float>(), r, y.mutable_data_ptr<T>());
          });
        });
        return;
      }
    }
    with_bool(g.pixel_rows, [&](auto per_lane) {
      with_bool(r != nullptr, [&](auto has_res) {
        with_bool(out_relu, [&](auto relu) {
          with_bool(streams<T>(y, g, /*flat=*/false), [&](auto stream) {
            scale_rows<T, decltype(per_lane)::value, decltype(has_res)::value, decltype(relu)::value,
                       decltype(stream)::value>(g, x.const_data_ptr<T>(), gate.const_data_ptr<acc_t<T>>(), r,
                                                y.mutable_data_ptr<T>(),
                                                out_relu ? mask.mutable_data_ptr<uint8_t>() : nullptr);
          });
        });
      });
    });
  });
  return {y, mask};
}

// ---- backward ------------------------------------------------------------------------------

template <typename T, bool kMask>
void gate_grad(const Geometry& g, const T* dy, const T* x, const uint8_t* mask, acc_t<T>* dg) {
  using A = acc_t<T>;
  if (!g.pixel_rows) {
    at::parallel_for(0, g.N * g.C, grain_rows(g.L), [&](int64_t begin, int64_t end) {
      dot_rows<T, kMask>(dy + begin * g.L, x + begin * g.L, kMask ? mask + begin * g.mask_row_bytes : nullptr,
                         g.mask_row_bytes, end - begin, g.L, dg + begin);
    });
    return;
  }
  at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> part(g.C);
    for (int64_t n = begin; n < end; ++n) {
      chunked_columns(g, dg + n * g.C, part.data(), [&](int64_t p0, int64_t rows, A* acc) {
        const int64_t off = (n * g.L + p0) * g.C;
        dot_columns<T, kMask>(dy + off, x + off, kMask ? mask + (n * g.L + p0) * g.mask_row_bytes : nullptr,
                              g.mask_row_bytes, rows, g.C, acc);
      });
    }
  });
}

at::Tensor ca_gate_grad_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask, bool out_relu) {
  const Geometry g = check_x(x);
  check_like_x(dy, x, g, "grad_y");
  check_mask(mask, x, g, out_relu);
  at::Tensor dg = at::empty({g.N, g.C}, x.options().dtype(accumulation_type(x.scalar_type())));
  if (g.N == 0) return dg;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ca_gate_grad_cpu", [&] {
    using T = scalar_t;
    auto* out = dg.mutable_data_ptr<acc_t<T>>();
    if (out_relu)
      gate_grad<T, true>(g, dy.const_data_ptr<T>(), x.const_data_ptr<T>(), mask.const_data_ptr<uint8_t>(), out);
    else
      gate_grad<T, false>(g, dy.const_data_ptr<T>(), x.const_data_ptr<T>(), nullptr, out);
  });
  return dg;
}

// dx (and dres) of the average squeeze: rows.h's grad_row with dp = dmean / HW.
template <typename T, bool kPerLane, bool kMask, bool kStream>
void input_grad_rows(const Geometry& g, const T* dy, const uint8_t* mask, const acc_t<T>* gate, const acc_t<T>* dp,
                     T* dx, T* dres) {
  at::parallel_for(0, g.N * g.rows, grain_rows(g.row_len), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.rows;
      const int64_t v = kPerLane ? n * g.C : row;
      const int64_t off = row * g.row_len;
      grad_row<T, kPerLane, kMask, 0, kStream>(dy + off, kMask ? mask + row * g.mask_row_bytes : nullptr, gate + v,
                                               dp + v, dx ? dx + off : nullptr, dres ? dres + off : nullptr,
                                               g.row_len);
    }
    if (kStream) stream_fence();
  });
}

// dx of the average + max squeeze: the average's terms plus dm = dmax / ties on the elements
// equal to the max (grad_row's arithmetic, then the max term added), in the accumulation type.
template <typename T, bool kPerLane, bool kMask, bool kStream>
void grad_row_max(const T* dy, const uint8_t* mask, const acc_t<T>* gate, const acc_t<T>* dp, const T* x,
                  const T* mx, const acc_t<T>* dm, T* dx, T* dres, int64_t n) {
  using A = acc_t<T>;
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    auto put = [](T* p, const Vec& v) {
      if constexpr (kStream)
        stream8(p, v);
      else
        store8(p, v);
    };
    const Vec g_row(kPerLane ? 0.f : gate[0]), dp_row(kPerLane ? 0.f : dp[0]);
    const Vec m_row(kPerLane ? 0.f : static_cast<float>(mx[0])), dm_row(kPerLane ? 0.f : dm[0]);
    for (; i + 8 <= n; i += 8) {
      Vec d = load8(dy + i);
      if constexpr (kMask) d = keep_lanes(d, mask[i >> 3]);
      if (dres) put(dres + i, d);
      if (dx) {
        const Vec gv = kPerLane ? Vec::loadu(gate + i) : g_row;
        const Vec dpv = kPerLane ? Vec::loadu(dp + i) : dp_row;
        const Vec mv = kPerLane ? load8(mx + i) : m_row;
        const Vec dmv = kPerLane ? Vec::loadu(dm + i) : dm_row;
        put(dx + i, at::vec::fmadd(d, gv, dpv) + ((load8(x + i) == mv) & dmv));
      }
    }
  }
  for (; i < n; ++i) {
    const int64_t v = kPerLane ? i : 0;
    A d = static_cast<A>(dy[i]);
    if constexpr (kMask) d = mask_bit(mask, i) ? d : A(0);
    if (dres) dres[i] = static_cast<T>(d);
    if (dx) {
      A out = d * gate[v] + dp[v];
      if (static_cast<A>(x[i]) == static_cast<A>(mx[v])) out += dm[v];
      dx[i] = static_cast<T>(out);
    }
  }
}

template <typename T, bool kPerLane, bool kMask, bool kStream>
void input_grad_max(const Geometry& g, const T* dy, const uint8_t* mask, const acc_t<T>* gate, const acc_t<T>* dp,
                    const T* x, const T* mx, const acc_t<T>* dm, T* dx, T* dres) {
  at::parallel_for(0, g.N * g.rows, grain_rows(g.row_len), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t v = kPerLane ? (row / g.rows) * g.C : row;
      const int64_t off = row * g.row_len;
      grad_row_max<T, kPerLane, kMask, kStream>(dy + off, kMask ? mask + row * g.mask_row_bytes : nullptr,
                                                gate + v, dp + v, x + off, mx + v, dm + v, dx ? dx + off : nullptr,
                                                dres ? dres + off : nullptr, g.row_len);
    }
    if (kStream) stream_fence();
  });
}

std::tuple<at::Tensor, at::Tensor> ca_input_grad_cpu(const at::Tensor& dy, const at::Tensor& mask,
                                                     const at::Tensor& gate, const at::Tensor& dmean,
                                                     const std::optional<at::Tensor>& x,
                                                     const std::optional<at::Tensor>& mx,
                                                     const std::optional<at::Tensor>& dmax,
                                                     const std::optional<at::Tensor>& ties, bool out_relu,
                                                     bool need_grad_x, bool need_grad_residual) {
  InputGrad a = prepare_input_grad(dy, mask, gate, dmean, x, mx, dmax, ties, out_relu, need_grad_x,
                                   need_grad_residual);
  if (a.done) return {a.dx, a.dres};
  const Geometry& g = a.g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "ca_input_grad_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    T* dx_p = need_grad_x ? a.dx.mutable_data_ptr<T>() : nullptr;
    T* dres_p = a.dres_out ? a.dres.mutable_data_ptr<T>() : nullptr;
    const uint8_t* m = out_relu ? mask.const_data_ptr<uint8_t>() : nullptr;
    if constexpr (kVectorized<T>) {
      if (!out_relu && need_grad_x && flat_rows(g)) {
        with_bool(a.with_max, [&](auto has_max) {
          with_bool(streams<T>(a.dx, g, /*flat=*/true), [&](auto stream) {
            input_grad_flat<T, decltype(has_max)::value, decltype(stream)::value>(
                g, dy.const_data_ptr<T>(), gate.const_data_ptr<float>(), a.dp.const_data_ptr<float>(),
                a.with_max ? x->const_data_ptr<T>() : nullptr, a.with_max ? mx->const_data_ptr<T>() : nullptr,
                a.with_max ? a.dm.const_data_ptr<float>() : nullptr, dx_p);
          });
        });
        return;
      }
    }
    // streaming stores only when every output written streams (an unaligned one would not)
    const bool stream = (!need_grad_x || streams<T>(a.dx, g, /*flat=*/false)) &&
                        (!a.dres_out || streams<T>(a.dres, g, /*flat=*/false));
    auto run = [&](auto per_lane, auto masked, auto streamed) {
      constexpr bool kPerLane = decltype(per_lane)::value, kMask = decltype(masked)::value;
      constexpr bool kStream = decltype(streamed)::value;
      if (a.with_max)
        input_grad_max<T, kPerLane, kMask, kStream>(g, dy.const_data_ptr<T>(), m, gate.const_data_ptr<A>(),
                                                    a.dp.const_data_ptr<A>(), x->const_data_ptr<T>(),
                                                    mx->const_data_ptr<T>(), a.dm.const_data_ptr<A>(), dx_p, dres_p);
      else
        input_grad_rows<T, kPerLane, kMask, kStream>(g, dy.const_data_ptr<T>(), m, gate.const_data_ptr<A>(),
                                                     a.dp.const_data_ptr<A>(), dx_p, dres_p);
    };
    with_bool(g.pixel_rows, [&](auto per_lane) {
      with_bool(out_relu, [&](auto masked) {
        with_bool(stream, [&](auto streamed) { run(per_lane, masked, streamed); });
      });
    });
  });
  return {a.dx, a.dres};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("ca_pool", &ca_pool_cpu);
  m.impl("ca_scale", &ca_scale_cpu);
  m.impl("ca_gate_grad", &ca_gate_grad_cpu);
  m.impl("ca_input_grad", &ca_input_grad_cpu);
}

}  // namespace se_kernels::cpu
