// Fused SE forward and backward on the CPU.
//
// Launch plan. The op is memory-bound, so the aim is to stream x (and dy) from memory once:
//  * per-sample path (enough samples for the threads): each thread takes tiles of whole
//    samples sized to stay in its cache (make_plan), pools them, runs the MLP for the tile (the
//    weights are read once per tile, not once per sample), and scales them while x is still
//    in cache.
//  * split path (few samples, many threads): pooling, MLP and scaling run as three parallel
//    phases, each sample spread over threads by rows (and by pixel chunks for channels_last
//    pooling).
// Both paths do the same arithmetic in the same order for every element (channels_last
// pooling sums fixed chunks of kPixelChunk pixels, then the chunks in order), so results do
// not depend on the plan or the thread count. Weight gradients are one GEMM each over the
// per-sample vectors after the parallel part: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "../ca_common.h"
#include "mlp.h"
#include "rows.h"

namespace se_kernels::cpu {
namespace {

template <typename F>
void with_bools(bool a, bool b, F&& f) {
  with_bool(a, [&](auto ta) { with_bool(b, [&](auto tb) { f(ta, tb); }); });
}

struct CacheSizes {
  int64_t l2, l3;
};

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = [] {
    long l2 = 0, l3 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return CacheSizes{l2 > 0 ? l2 : 512 * 1024, l3 > 0 ? l3 : 8 * 1024 * 1024};
  }();
  return sizes;
}

struct Plan {
  bool split;
  int64_t tiles;  // tiles of consecutive samples on the per-sample path (sizes differ by <= 1)
};

// reread_bytes_per_element: bytes per element of x that the per-sample path reads twice (x in
// the forward; dy and x in the backward). A tile is at least what half the L2 holds, and grows
// (within a thread's half share of the L3) until streaming the MLP weights costs at most a
// quarter of the tile's own bytes.
Plan make_plan(const Geometry& g, int64_t reread_bytes_per_element, int64_t acc_bytes) {
  const int64_t threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  const CacheSizes& cache = cache_sizes();
  const int64_t sample_bytes = std::max<int64_t>(1, g.C * g.L * reread_bytes_per_element);
  const int64_t weight_bytes = 2 * g.S * g.C * acc_bytes;
  const int64_t by_l2 = std::max<int64_t>(1, cache.l2 / 2 / sample_bytes);
  // sysconf reports the whole L3 (in a VM, the host's); assume at most 4 MiB of it per thread.
  const int64_t l3_share = std::min<int64_t>(cache.l3 / threads, int64_t(4) << 20) / 2;
  const int64_t by_l3 = std::max<int64_t>(1, l3_share / sample_bytes);
  const int64_t by_weights = (4 * weight_bytes + sample_bytes - 1) / sample_bytes;
  int64_t tile = std::max(by_l2, std::min(by_weights, by_l3));
  tile = std::min(tile, std::max<int64_t>(1, (g.N + threads - 1) / threads));
  // Equal work per thread: a whole number of tiles per thread (at::parallel_for hands each
  // thread a contiguous range of them), their sizes within one sample of each other. With
  // tiles of the ideal size instead, 32 samples in tiles of 15 were 15 + 15 + 2, and one
  // thread got 30 of the 32 (measured: 1.5x slower).
  int64_t tiles = (g.N + tile - 1) / tile;
  tiles = std::min(g.N, (tiles + threads - 1) / threads * threads);
  const int64_t rounds = (tiles + threads - 1) / threads;
  // Whole tiles per thread keep tiles / (threads * rounds) of the threads busy; below 70%,
  // spreading samples over threads wins.
  const bool split = threads > 1 && tiles * 10 < threads * rounds * 7;
  return {split, std::max<int64_t>(1, tiles)};
}

// Outputs of at least this many bytes (y, grad_x, grad_residual) are written with streaming
// stores: no read-for-ownership, so a pass that reads one tensor and writes another moves 2
// bytes per element pair instead of 3 (measured here: 20-35% faster passes). 8 MiB is above a
// core's share of the last-level cache on common servers (1-4 MiB), so such an output would
// not stay cached for the next layer anyway; smaller outputs are stored normally.
constexpr int64_t kStreamingStoreBytes = int64_t(8) << 20;

// flat: the pass walks NCHW rows flat (rows.h's walk_flat_rows), whatever the row length.
template <typename T>
bool use_streaming_stores(const at::Tensor& out, const Geometry& g, bool flat) {
  if (!kVectorized<T> || out.numel() * static_cast<int64_t>(sizeof(T)) < kStreamingStoreBytes) return false;
  // every 8-element vector store must be aligned: 8-aligned row lengths (or a flat walk) from a
  // 32-byte base
  return (flat || g.row_len % 8 == 0) && reinterpret_cast<uintptr_t>(out.data_ptr()) % 32 == 0;
}

// Calls f(n, r0, r1) for the rows [b, e) of the flattened (N, rows) index space.
template <typename F>
void for_sample_rows(int64_t b, int64_t e, int64_t rows, F&& f) {
  while (b < e) {
    const int64_t n = b / rows, r0 = b % rows;
    const int64_t r1 = std::min(rows, r0 + (e - b));
    f(n, r0, r1);
    b += r1 - r0;
  }
}

template <typename A>
void add_into(A* acc, const A* part, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += part[i];
}

template <typename A>
void divide(A* v, int64_t n, int64_t L) {
  for (int64_t i = 0; i < n; ++i) v[i] /= A(L);
}

template <typename A>
struct WeightsHolder {
  at::Tensor w1, w2t, b1, b2;
  MlpWeights<A> view(const Geometry& g, Act act, Gate gate) const {
    return {w1.data_ptr<A>(), b1.defined() ? b1.data_ptr<A>() : nullptr, w2t.data_ptr<A>(),
            b2.defined() ? b2.data_ptr<A>() : nullptr, g.C, g.S, act, gate};
  }
};

template <typename A>
WeightsHolder<A> prepare_weights(const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                 const std::optional<at::Tensor>& b2) {
  const auto acc = c10::CppTypeToScalarType<A>::value;
  WeightsHolder<A> h;
  h.w1 = w1.to(acc).contiguous();
  h.w2t = w2.t().to(acc).contiguous();
  if (b1.has_value()) h.b1 = b1->to(acc).contiguous();
  if (b2.has_value()) h.b2 = b2->to(acc).contiguous();
  return h;
}

// ---------------------------------------------------------------------------------------
// The plan both passes follow: per-(n, c) sums over the pixels (the pool; the gate gradient),
// the MLP on tiles of samples, then a pass over the rows writing the outputs. The passes
// supply the stages:
//   rows(b, e)         the sums of NCHW rows [b, e) of the flattened (N * C) rows, final values
//   chunk(n, k, part)  part (C) = the sums over pixel chunk k of sample n (channels_last)
//   mlp(n0, n1)        the MLP for samples [n0, n1)
//   write(n, r0, r1)   the output rows [r0, r1) of sample n
// mean: the channels_last sums are divided by H*W. stream: write() used streaming stores.

// The sums of sample n: NCHW rows directly, channels_last as fixed pixel chunks added in order.
template <typename A, typename Rows, typename Chunk>
void sample_sums(const Geometry& g, int64_t n, A* sums, bool mean, A* part, const Rows& rows, const Chunk& chunk) {
  if (!g.pixel_rows) {
    rows(n * g.C, (n + 1) * g.C);
    return;
  }
  A* acc = sums + n * g.C;
  std::fill(acc, acc + g.C, A(0));
  for (int64_t k = 0; k * kPixelChunk < g.L; ++k) {
    chunk(n, k, part);
    add_into(acc, part, g.C);
  }
  if (mean) divide(acc, g.C, g.L);
}

template <typename A, typename Rows, typename Chunk, typename Mlp, typename Write>
void run_plan(const Geometry& g, const Plan& plan, A* sums, bool mean, bool stream, bool write_pass,
              const Rows& rows, const Chunk& chunk, const Mlp& mlp, const Write& write) {
  if (!plan.split) {
    const int64_t tiles = plan.tiles;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<A> part(g.pixel_rows ? g.C : 0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * g.N / tiles, n1 = (t + 1) * g.N / tiles;
        for (int64_t n = n0; n < n1; ++n) sample_sums(g, n, sums, mean, part.data(), rows, chunk);
        mlp(n0, n1);
        if (write_pass)
          for (int64_t n = n0; n < n1; ++n) write(n, 0, g.rows);
      }
      if (stream) stream_fence();
    });
    return;
  }
  // Split: each phase spreads the samples' rows (or pixel chunks) over the threads.
  if (!g.pixel_rows) {
    at::parallel_for(0, g.N * g.C, grain_rows(g.L), [&](int64_t b, int64_t e) { rows(b, e); });
  } else {
    const int64_t chunks = (g.L + kPixelChunk - 1) / kPixelChunk;
    std::vector<A> partials(g.N * chunks * g.C);
    at::parallel_for(0, g.N * chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) chunk(i / chunks, i % chunks, partials.data() + i * g.C);
    });
    at::parallel_for(0, g.N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        A* acc = sums + n * g.C;
        std::fill(acc, acc + g.C, A(0));
        for (int64_t k = 0; k < chunks; ++k) add_into(acc, partials.data() + (n * chunks + k) * g.C, g.C);
        if (mean) divide(acc, g.C, g.L);
      }
    });
  }
  at::parallel_for(0, g.N, 1, [&](int64_t b, int64_t e) { mlp(b, e); });
  if (write_pass) {
    at::parallel_for(0, g.N * g.rows, grain_rows(g.row_len), [&](int64_t b, int64_t e) {
      for_sample_rows(b, e, g.rows, [&](int64_t n, int64_t r0, int64_t r1) { write(n, r0, r1); });
      if (stream) stream_fence();
    });
  }
}

// ---------------------------------------------------------------------------------------
// Forward

template <typename T>
struct ForwardArgs {
  using A = acc_t<T>;
  Geometry g;
  const T* x;
  const T* residual;  // or nullptr
  T* y;
  uint8_t* mask;      // or nullptr (no relu epilogue)
  MlpWeights<A> w;
  A *P, *U1, *Z, *U2, *G;  // (N, C), (N, S), (N, S), (N, C), (N, C)
  bool stream;             // y with streaming stores
};

template <typename T>
void pool_nchw_rows(const ForwardArgs<T>& a, int64_t b, int64_t e) {
  mean_rows(a.x + b * a.g.L, e - b, a.g.L, a.P + b);
}

// part (C) = sum of x over the pixels of chunk k of sample n (channels_last).
template <typename T>
void pool_pixel_chunk(const ForwardArgs<T>& a, int64_t n, int64_t k, acc_t<T>* part) {
  const Geometry& g = a.g;
  const int64_t p0 = k * kPixelChunk, p1 = std::min(g.L, p0 + kPixelChunk);
  std::fill(part, part + g.C, acc_t<T>(0));
  sum_columns(a.x + (n * g.L + p0) * g.C, p1 - p0, g.C, part);
}

// The passes that write outputs (the forward's scale, the backward's grad_x) walk NCHW rows flat
// where they can: without the relu mask (whose bit rows follow the rows; without it there is no
// grad_residual to write either, it is grad_y itself), rows of L >= 8 not a multiple of 8.
template <typename T>
bool flat_pass(const Geometry& g, bool relu_mask) {
  return kVectorized<T> && !relu_mask && flat_rows(g.L, g.pixel_rows);
}

// The flat walk's span for sample n: vectors stay inside the sample, because in the tiled plan
// the next sample's gate may not exist yet.
inline std::pair<int64_t, int64_t> sample_span(const Geometry& g, int64_t n) {
  return {n * g.rows * g.L, (n + 1) * g.rows * g.L};
}

template <typename T>
void scale_rows(const ForwardArgs<T>& a, int64_t n, int64_t r0, int64_t r1) {
  const Geometry& g = a.g;
  if constexpr (kVectorized<T>) {
    if (flat_pass<T>(g, a.mask != nullptr)) {
      const int64_t first = n * g.rows;
      const auto [lo, hi] = sample_span(g, n);
      with_bools(a.residual != nullptr, a.stream, [&](auto has_residual, auto streamed) {
        scale_flat_rows<T, decltype(has_residual)::value, decltype(streamed)::value>(
            a.x, a.G, a.residual, a.y, first + r0, first + r1, g.L, lo, hi);
      });
      return;
    }
  }
  with_bools(a.residual != nullptr, a.mask != nullptr, [&](auto has_residual, auto relu) {
    constexpr bool kRes = decltype(has_residual)::value, kRelu = decltype(relu)::value;
    with_bools(a.stream, g.pixel_rows, [&](auto streamed, auto pixel_rows) {
      constexpr bool kStream = decltype(streamed)::value && kVectorized<T>;
      constexpr bool kPerLane = decltype(pixel_rows)::value;
      with_row_vecs<T>(kPerLane ? 0 : g.row_len, [&](auto vecs) {
        constexpr int kVecs = decltype(vecs)::value;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = (n * g.rows + r) * g.row_len;
          const acc_t<T>* gate = a.G + n * g.C + (kPerLane ? 0 : r);
          scale_row<T, kPerLane, kRes, kRelu, kVecs, kStream>(
              a.x + off, gate, kRes ? a.residual + off : nullptr, a.y + off,
              kRelu ? a.mask + (n * g.rows + r) * g.mask_row_bytes : nullptr, g.row_len);
        }
      });
    });
  });
}

// The forward plan: pool (P), excite(n0, n1) the gates G of samples [n0, n1) from P, scale.
template <typename T, typename Excite>
void run_forward_plan(const ForwardArgs<T>& a, const Excite& excite) {
  using A = acc_t<T>;
  run_plan(
      a.g, make_plan(a.g, sizeof(T), sizeof(A)), a.P, /*mean=*/true, a.stream, /*write_pass=*/true,
      [&](int64_t b, int64_t e) { pool_nchw_rows(a, b, e); },
      [&](int64_t n, int64_t k, A* part) { pool_pixel_chunk(a, n, k, part); }, excite,
      [&](int64_t n, int64_t r0, int64_t r1) { scale_rows(a, n, r0, r1); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> se_forward_cpu(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& residual, c10::string_view activation,
    c10::string_view gate, std::optional<c10::string_view> out_activation) {
  const Act act = parse_activation(activation);
  const Gate gt = parse_gate(gate);
  const bool out_relu = parse_out_activation(out_activation);
  const Geometry g = check_forward_args(x, w1, b1, w2, b2, residual);
  TORCH_CHECK(x.device().is_cpu(), "se_kernels: the cpu kernels take CPU tensors; x is on ", x.device());

  const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
  at::Tensor y = at::empty_like(x);
  at::Tensor pooled = at::empty({g.N, g.C}, acc_opts);
  at::Tensor hidden = at::empty({g.N, g.S}, acc_opts);
  at::Tensor gate_logits = at::empty({g.N, g.C}, acc_opts);
  at::Tensor relu_mask = empty_relu_mask(x, g, out_relu);
  if (g.N == 0) return {y, pooled, hidden, gate_logits, relu_mask};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto weights = prepare_weights<A>(w1, b1, w2, b2);
    at::Tensor z = at::empty({g.N, g.S}, acc_opts);
    at::Tensor gates = at::empty({g.N, g.C}, acc_opts);
    ForwardArgs<scalar_t> a{g,
                            x.const_data_ptr<scalar_t>(),
                            residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr,
                            y.mutable_data_ptr<scalar_t>(),
                            out_relu ? relu_mask.mutable_data_ptr<uint8_t>() : nullptr,
                            weights.view(g, act, gt),
                            pooled.mutable_data_ptr<A>(),
                            hidden.mutable_data_ptr<A>(),
                            z.mutable_data_ptr<A>(),
                            gate_logits.mutable_data_ptr<A>(),
                            gates.mutable_data_ptr<A>(),
                            use_streaming_stores<scalar_t>(y, g, flat_pass<scalar_t>(g, out_relu))};
    run_forward_plan(a, [&](int64_t n0, int64_t n1) {
      mlp_forward(a.w, n1 - n0, a.P + n0 * g.C, a.U1 + n0 * g.S, a.Z + n0 * g.S, a.U2 + n0 * g.C, a.G + n0 * g.C);
    });
  });
  return {y, pooled, hidden, gate_logits, relu_mask};
}

// ---------------------------------------------------------------------------------------
// ECA's forward on the same plan: the pool, then per sample the convolution along the
// channels and the gate, then the scale; x is read once where a tile of samples stays in cache
// (the generic path's stages read it twice). The convolution is k taps over the zero-padded
// pooled vector, added in tap order: out = p[c - pad] * w[0], then out = out + p[c - pad + j] *
// w[j], then + bias, which is how se_kernels/channel_attention.py's excitation sums it.
// float32/float64 only: there the pooled vector, the taps and the gate are in x's dtype, as the
// original module computes them.

template <typename A>
void eca_taps(const A* p, int64_t C, const A* w, int64_t k, int64_t pad, const A* bias, A* out) {
  for (int64_t c = 0; c < C; ++c) {
    auto value = [&](int64_t i) { return i >= 0 && i < C ? p[i] : A(0); };
    A acc = value(c - pad) * w[0];
    for (int64_t j = 1; j < k; ++j) {
      const A term = value(c - pad + j) * w[j];
      acc = acc + term;
    }
    out[c] = bias != nullptr ? acc + *bias : acc;
  }
}

std::tuple<at::Tensor, at::Tensor> ca_eca_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, int64_t padding,
                                                      c10::string_view gate,
                                                      const std::optional<at::Tensor>& residual, bool out_relu) {
  const Gate gt = parse_gate(gate);
  const Geometry g = ca::check_x(x);
  TORCH_CHECK(x.device().is_cpu(), "se_kernels: the cpu kernels take CPU tensors; x is on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "se_kernels: ca_eca_forward takes float32 or float64 x; got ", x.scalar_type());
  TORCH_CHECK_VALUE(padding >= 0 && weight.dim() == 1 && weight.size(0) == 2 * padding + 1 &&
                        weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.is_cpu(),
                    "se_kernels: ca_eca_forward's weight must be a contiguous (2 * padding + 1,) tensor in x's "
                    "dtype on the CPU; got ", weight.sizes(), " ", weight.scalar_type(), " with padding ", padding);
  if (bias.has_value())
    TORCH_CHECK_VALUE(bias->numel() == 1 && bias->scalar_type() == x.scalar_type() && bias->is_cpu(),
                      "se_kernels: ca_eca_forward's bias must be one value in x's dtype; got ", bias->sizes(), " ",
                      bias->scalar_type());
  if (residual.has_value()) ca::check_like_x(*residual, x, g, "residual");
  at::Tensor y = at::empty_like(x);
  at::Tensor relu_mask = empty_relu_mask(x, g, out_relu);
  if (g.N == 0) return {y, relu_mask};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ca_eca_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    static_assert(std::is_same_v<A, scalar_t>);
    at::Tensor pooled = at::empty({g.N, g.C}, x.options());
    at::Tensor logits = at::empty({g.N, g.C}, x.options());
    at::Tensor gates = at::empty({g.N, g.C}, x.options());
    const A bias_value = bias.has_value() ? bias->item<A>() : A(0);
    const A* w = weight.const_data_ptr<A>();
    ForwardArgs<scalar_t> a{g,
                            x.const_data_ptr<scalar_t>(),
                            residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr,
                            y.mutable_data_ptr<scalar_t>(),
                            out_relu ? relu_mask.mutable_data_ptr<uint8_t>() : nullptr,
                            MlpWeights<A>{},
                            pooled.mutable_data_ptr<A>(),
                            nullptr,
                            nullptr,
                            logits.mutable_data_ptr<A>(),
                            gates.mutable_data_ptr<A>(),
                            use_streaming_stores<scalar_t>(y, g, flat_pass<scalar_t>(g, out_relu))};
    run_forward_plan(a, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        eca_taps(a.P + n * g.C, g.C, w, weight.size(0), padding, bias.has_value() ? &bias_value : nullptr,
                 a.U2 + n * g.C);
        apply_gate(gt, a.U2 + n * g.C, a.G + n * g.C, g.C);
      }
    });
  });
  return {y, relu_mask};
}

// ---------------------------------------------------------------------------------------
// Backward

template <typename T>
struct BackwardArgs {
  using A = acc_t<T>;
  Geometry g;
  const T* dy;
  const T* x;
  const uint8_t* mask;  // or nullptr
  T* dx;                // or nullptr
  T* dres;              // or nullptr
  MlpWeights<A> w;
  const A *U1, *U2;                // saved (N, S), (N, C)
  A *DG, *G, *Z, *DZ2, *DZ1, *DP;  // (N, C), (N, C), (N, S), (N, C), (N, S), (N, C)
  bool stream;                     // grad_x and grad_residual with streaming stores
};

template <typename T>
void gate_grad_nchw_rows(const BackwardArgs<T>& a, int64_t b, int64_t e) {
  const Geometry& g = a.g;
  const int64_t off = b * g.L;
  if (a.mask)
    dot_rows<T, true>(a.dy + off, a.x + off, a.mask + b * g.mask_row_bytes, g.mask_row_bytes, e - b, g.L, a.DG + b);
  else
    dot_rows<T, false>(a.dy + off, a.x + off, nullptr, 0, e - b, g.L, a.DG + b);
}

template <typename T>
void gate_grad_pixel_chunk(const BackwardArgs<T>& a, int64_t n, int64_t k, acc_t<T>* part) {
  const Geometry& g = a.g;
  const int64_t p0 = k * kPixelChunk, p1 = std::min(g.L, p0 + kPixelChunk);
  const int64_t off = (n * g.L + p0) * g.C;
  std::fill(part, part + g.C, acc_t<T>(0));
  if (a.mask)
    dot_columns<T, true>(a.dy + off, a.x + off, a.mask + (n * g.L + p0) * g.mask_row_bytes,
                                 g.mask_row_bytes, p1 - p0, g.C, part);
  else
    dot_columns<T, false>(a.dy + off, a.x + off, nullptr, 0, p1 - p0, g.C, part);
}

template <typename T>
void grad_rows(const BackwardArgs<T>& a, int64_t n, int64_t r0, int64_t r1) {
  const Geometry& g = a.g;
  if constexpr (kVectorized<T>) {
    if (a.dx && flat_pass<T>(g, a.mask != nullptr)) {  // no mask: no dres (flat_pass)
      const int64_t first = n * g.rows;
      const auto [lo, hi] = sample_span(g, n);
      with_bool(a.stream, [&](auto streamed) {
        grad_flat_rows<T, decltype(streamed)::value>(a.dy, a.G, a.DP, a.dx, first + r0, first + r1, g.L, lo, hi);
      });
      return;
    }
  }
  with_bools(g.pixel_rows, a.mask != nullptr, [&](auto pixel_rows, auto masked) {
    constexpr bool kPerLane = decltype(pixel_rows)::value, kMask = decltype(masked)::value;
    with_bools(a.stream, false, [&](auto streamed, auto) {
      constexpr bool kStream = decltype(streamed)::value && kVectorized<T>;
      with_row_vecs<T>(kPerLane ? 0 : g.row_len, [&](auto vecs) {
        constexpr int kVecs = decltype(vecs)::value;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = (n * g.rows + r) * g.row_len;
          const uint8_t* m = kMask ? a.mask + (n * g.rows + r) * g.mask_row_bytes : nullptr;
          const int64_t v = kPerLane ? n * g.C : n * g.C + r;  // offset of this row's g and dp
          grad_row<T, kPerLane, kMask, kVecs, kStream>(a.dy + off, m, a.G + v, a.DP + v,
                                                       a.dx ? a.dx + off : nullptr,
                                                       a.dres ? a.dres + off : nullptr, g.row_len);
        }
      });
    });
  });
}

template <typename T>
void mlp_backward_range(const BackwardArgs<T>& a, int64_t n0, int64_t n1) {
  const Geometry& g = a.g;
  mlp_backward(a.w, n1 - n0, g.L, a.U1 + n0 * g.S, a.U2 + n0 * g.C, a.DG + n0 * g.C, a.G + n0 * g.C,
               a.Z + n0 * g.S, a.DZ2 + n0 * g.C, a.DZ1 + n0 * g.S, a.DP + n0 * g.C);
}

// se_backward_cpu in its four steps: the checks, the outputs, the kernels that fill them
// (everything but the weight gradients), then the weight gradients from their per-sample factors.

// The parsed options and the checked arguments of one backward call.
struct BackwardCall {
  Act act;
  Gate gate;
  bool out_relu;
  bool need_grad_x;
  bool need_grad_residual;  // and out_relu: without the relu, grad_residual is grad_y itself
  Geometry g;
};

BackwardCall check_backward_call(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1,
                                 const at::Tensor& w2, const at::Tensor& pooled, const at::Tensor& hidden,
                                 const at::Tensor& gate_logits, const at::Tensor& relu_mask,
                                 c10::string_view activation, c10::string_view gate,
                                 std::optional<c10::string_view> out_activation, bool need_grad_x,
                                 bool need_grad_residual) {
  const Act act = parse_activation(activation);
  const Gate gt = parse_gate(gate);
  const bool out_relu = parse_out_activation(out_activation);
  const Geometry g = check_backward_args(grad_y, x, w1, w2, pooled, hidden, gate_logits, relu_mask, out_relu);
  TORCH_CHECK(x.device().is_cpu(), "se_kernels: the cpu kernels take CPU tensors; x is on ", x.device());
  return {act, gt, out_relu, need_grad_x, need_grad_residual && out_relu, g};
}

// What the kernels write: grad_x and grad_residual ((0,) when not needed), and the per-sample
// factors of the weight gradients, in the accumulation type: dz2 (N, C) = dL/d gate_logits,
// dz1 (N, S) = dL/d hidden, z (N, S) = act(hidden).
struct BackwardOutputs {
  at::Tensor grad_x, grad_residual;
  at::Tensor dz2, dz1, z;
};

BackwardOutputs allocate_backward_outputs(const at::Tensor& x, const BackwardCall& call) {
  const Geometry& g = call.g;
  const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
  BackwardOutputs out;
  out.grad_x = call.need_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  out.grad_residual = call.need_grad_residual ? at::empty_like(x) : at::empty({0}, x.options());
  out.dz2 = at::empty({g.N, g.C}, acc_opts);
  out.dz1 = at::empty({g.N, g.S}, acc_opts);
  out.z = at::empty({g.N, g.S}, acc_opts);
  return out;
}

// The gate gradient's sums over the pixels, the MLP backward and grad_x / grad_residual, on the
// plan of run_plan, for x's dtype; fills `out` (N >= 1).
void run_backward_kernels(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                          const at::Tensor& hidden, const at::Tensor& gate_logits, const at::Tensor& relu_mask,
                          const BackwardCall& call, BackwardOutputs& out) {
  const Geometry& g = call.g;
  const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto weights = prepare_weights<A>(w1, std::nullopt, w2, std::nullopt);
    at::Tensor dg = at::empty({g.N, g.C}, acc_opts);
    at::Tensor gates = at::empty({g.N, g.C}, acc_opts);
    at::Tensor dp = at::empty({g.N, g.C}, acc_opts);
    BackwardArgs<scalar_t> a{
        g,
        grad_y.const_data_ptr<scalar_t>(),
        x.const_data_ptr<scalar_t>(),
        call.out_relu ? relu_mask.const_data_ptr<uint8_t>() : nullptr,
        call.need_grad_x ? out.grad_x.mutable_data_ptr<scalar_t>() : nullptr,
        call.need_grad_residual ? out.grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
        weights.view(g, call.act, call.gate),
        hidden.const_data_ptr<A>(),
        gate_logits.const_data_ptr<A>(),
        dg.mutable_data_ptr<A>(),
        gates.mutable_data_ptr<A>(),
        out.z.mutable_data_ptr<A>(),
        out.dz2.mutable_data_ptr<A>(),
        out.dz1.mutable_data_ptr<A>(),
        dp.mutable_data_ptr<A>(),
        use_streaming_stores<scalar_t>(call.need_grad_x ? out.grad_x : out.grad_residual, g,
                                       call.need_grad_x && flat_pass<scalar_t>(g, call.out_relu)) &&
            (!call.need_grad_residual || use_streaming_stores<scalar_t>(out.grad_residual, g, false))};
    run_plan(
        g, make_plan(g, 2 * sizeof(scalar_t), sizeof(A)), a.DG, /*mean=*/false, a.stream,
        /*write_pass=*/a.dx || a.dres, [&](int64_t b, int64_t e) { gate_grad_nchw_rows(a, b, e); },
        [&](int64_t n, int64_t k, A* part) { gate_grad_pixel_chunk(a, n, k, part); },
        [&](int64_t n0, int64_t n1) { mlp_backward_range(a, n0, n1); },
        [&](int64_t n, int64_t r0, int64_t r1) { grad_rows(a, n, r0, r1); });
  });
}

struct WeightGrads {
  at::Tensor w1, b1, w2, b2;
};

// dW2^T (S, C) = z^T dz2, dW1 (S, C) = dz1^T pooled, db2 = column sums of dz2, db1 = column sums
// of dz1, in the accumulation type, then cast to the weights' dtypes: each element sums the batch
// in order (see outer_sum_columns), whatever the thread count. Zeros for an empty batch.
WeightGrads weight_gradients(const Geometry& g, const BackwardOutputs& out, const at::Tensor& pooled,
                             at::ScalarType w1_dtype, at::ScalarType w2_dtype) {
  const auto acc_opts = out.dz2.options();
  at::Tensor grad_w2t = at::empty({g.S, g.C}, acc_opts);
  at::Tensor grad_w1 = at::empty({g.S, g.C}, acc_opts);
  at::Tensor grad_b2 = at::empty({g.C}, acc_opts);
  at::Tensor grad_b1 = at::empty({g.S}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES(grad_w1.scalar_type(), "se_weight_grads_cpu", [&] {
    using A = scalar_t;
    const A *zp = out.z.const_data_ptr<A>(), *dz2p = out.dz2.const_data_ptr<A>();
    const A *dz1p = out.dz1.const_data_ptr<A>(), *pp = pooled.const_data_ptr<A>();
    A *gw2t = grad_w2t.mutable_data_ptr<A>(), *gw1 = grad_w1.mutable_data_ptr<A>();
    A *gb2 = grad_b2.mutable_data_ptr<A>(), *gb1 = grad_b1.mutable_data_ptr<A>();
    at::parallel_for(0, (g.C + 63) / 64, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.N * g.S)),
                     [&](int64_t b, int64_t e) {
                       const int64_t c0 = b * 64, c1 = std::min(g.C, e * 64);
                       outer_sum_columns(zp, dz2p, g.N, g.S, g.C, c0, c1, gw2t, gb2);
                       outer_sum_columns(dz1p, pp, g.N, g.S, g.C, c0, c1, gw1, static_cast<A*>(nullptr));
                     });
    for (int64_t s = 0; s < g.S; ++s) {
      A acc = 0;
      for (int64_t n = 0; n < g.N; ++n) acc += dz1p[n * g.S + s];
      gb1[s] = acc;
    }
  });
  return {grad_w1.to(w1_dtype), grad_b1.to(w1_dtype), grad_w2t.t().contiguous().to(w2_dtype),
          grad_b2.to(w2_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> se_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& gate_logits, const at::Tensor& relu_mask,
    c10::string_view activation, c10::string_view gate, std::optional<c10::string_view> out_activation,
    bool need_grad_x, bool need_grad_residual) {
  const BackwardCall call = check_backward_call(grad_y, x, w1, w2, pooled, hidden, gate_logits, relu_mask, activation,
                                                gate, out_activation, need_grad_x, need_grad_residual);
  BackwardOutputs out = allocate_backward_outputs(x, call);
  if (call.g.N > 0) run_backward_kernels(grad_y, x, w1, w2, hidden, gate_logits, relu_mask, call, out);
  const WeightGrads dw = weight_gradients(call.g, out, pooled, w1.scalar_type(), w2.scalar_type());
  return {out.grad_x, dw.w1, dw.b1, dw.w2, dw.b2, out.grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("se_forward", &se_forward_cpu);
  m.impl("se_backward", &se_backward_cpu);
  m.impl("ca_eca_forward", &ca_eca_forward_cpu);
}

}  // namespace se_kernels::cpu
