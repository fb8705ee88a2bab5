// Fused SE forward and backward on CUDA: the C++/CUDA fallback of the Triton backend.
//
// Plan (the same for every shape; it fills the GPU for few large samples and for many small
// ones, because the pixel reduction is split over blocks):
//   forward:  channel_sums (per (sample, channel block, pixel split) partial sums of x)
//             -> excite (one block per sample: pool, both GEMVs, gate)
//             -> scale (one warp per 32 elements of a row: y = out_act(x * g + residual),
//                the relu mask bits from a warp ballot)
//   backward: channel_sums of dy' * x -> excite_backward (dz2, dz1, dp) -> grad_input (dx,
//             d_residual) -> weight_grads (one thread per weight, the batch summed in order)
// Every reduction has a fixed order: results are deterministic (no atomics). Accumulation in
// float (double for double). x, residual, grad_y, y, grad_x and grad_residual share x's layout
// (NCHW or channels_last rows, csrc/se_common.h); the relu mask layout is csrc/se.cpp's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../se_common.h"

namespace se_kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---- element-wise functions (NaN-propagating like PyTorch's) ---------------------------------

template <typename A>
__device__ __forceinline__ A clamp06(A v) {
  return v < A(0) ? A(0) : (v > A(6) ? A(6) : v);
}

template <typename A>
__device__ __forceinline__ A activation(A u, int act) {
  switch (act) {
    case 0: return u < A(0) ? A(0) : u;
    case 1: return u / (A(1) + exp(-u));
    case 2: return A(0.5) * u * (A(1) + erf(u * A(0.7071067811865476)));
    default: return u * clamp06(u + A(3)) / A(6);
  }
}

template <typename A>
__device__ __forceinline__ A activation_grad(A u, int act) {
  switch (act) {
    case 0: return u > A(0) ? A(1) : A(0);
    case 1: {
      const A s = A(1) / (A(1) + exp(-u));
      return s * (A(1) + u * (A(1) - s));
    }
    case 2: {
      const A cdf = A(0.5) * (A(1) + erf(u * A(0.7071067811865476)));
      return cdf + u * exp(A(-0.5) * u * u) * A(0.3989422804014327);
    }
    default: return u < A(-3) ? A(0) : (u <= A(3) ? u / A(3) + A(0.5) : A(1));
  }
}

template <typename A>
__device__ __forceinline__ A gate_fn(A u, int gate) {
  return gate == 0 ? A(1) / (A(1) + exp(-u)) : clamp06(u + A(3)) / A(6);
}

template <typename A>
__device__ __forceinline__ A gate_grad(A u, A g, int gate) {
  return gate == 0 ? g * (A(1) - g) : ((u > A(-3) && u < A(3)) ? A(1) / A(6) : A(0));
}

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

// partial[n, split, c] = sum over the split's pixels of x (dot: of dy' * x). 1-D grid over
// (N, splits, channel blocks), channel blocks fastest: only grid.x may exceed 65535 blocks. NCHW: one warp per channel, lanes along the (contiguous) pixels.
// channels_last: 32 channels per block along x (contiguous), 8 pixel lanes along y, reduced
// through shared memory in a fixed order.
template <typename T, typename A>
__global__ void channel_sums_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                    const uint8_t* __restrict__ mask, A* __restrict__ partial, Layout lay,
                                    int64_t per_split, int splits, int64_t cblocks, bool dot, bool masked) {
  const int64_t block = blockIdx.x % cblocks;
  const int64_t n = blockIdx.x / cblocks / splits;
  const int split = static_cast<int>(blockIdx.x / cblocks % splits);
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
    if (c >= lay.C) return;
    A acc = 0;
    for (int64_t l = l_begin + lane; l < l_end; l += 32) acc += term(c, l);
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
  }
}

// One block per sample: pooled = sum(partials) / L, hidden = W1 pooled + b1, logits = W2
// act(hidden) + b2, gates = gate(logits). Shared memory: C + S values.
template <typename T, typename A>
__global__ void excite_kernel(const A* __restrict__ partial, const T* __restrict__ w1, const T* __restrict__ b1,
                              const T* __restrict__ w2, const T* __restrict__ b2, A* __restrict__ pooled,
                              A* __restrict__ hidden, A* __restrict__ logits, A* __restrict__ gates, int64_t C,
                              int64_t S, int64_t L, int splits, int act, int gate) {
  extern __shared__ unsigned char smem_raw[];
  A* p = reinterpret_cast<A*>(smem_raw);
  A* z = p + C;
  const int64_t n = blockIdx.x;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    A acc = 0;
    for (int k = 0; k < splits; ++k) acc += partial[(n * splits + k) * C + c];
    p[c] = acc / A(L);
    pooled[n * C + c] = p[c];
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t s = warp; s < S; s += kWarps) {
    A acc = 0;
    for (int64_t c = lane; c < C; c += 32) acc += static_cast<A>(w1[s * C + c]) * p[c];
    acc = warp_sum(acc);
    if (lane == 0) {
      const A u1 = acc + (b1 ? static_cast<A>(b1[s]) : A(0));
      hidden[n * S + s] = u1;
      z[s] = activation(u1, act);
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    A acc = b2 ? static_cast<A>(b2[c]) : A(0);
    for (int64_t s = 0; s < S; ++s) acc += static_cast<A>(w2[c * S + s]) * z[s];
    logits[n * C + c] = acc;
    gates[n * C + c] = gate_fn(acc, gate);
  }
}

// One warp per (row, 32 elements of it): y = out_act(x * g + residual), and with the relu the
// row's mask bytes from a ballot (lanes 0-3 write the warp's 4 bytes).
template <typename T, typename A>
__global__ void scale_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                             uint8_t* __restrict__ mask, const A* __restrict__ gates, Layout lay, int64_t total_rows,
                             bool out_relu) {
  const int64_t segments = (lay.row_len + 31) / 32;
  const int64_t item = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (item >= total_rows * segments) return;  // whole warps leave together
  const int64_t row = item / segments, i = (item % segments) * 32 + lane;
  const int64_t n = row / lay.rows, r = row % lay.rows;
  const bool inside = i < lay.row_len;
  const int64_t c = lay.pixel_rows ? i : r;
  A out = 0;
  if (inside) {
    const int64_t o = row * lay.row_len + i;
    out = static_cast<A>(x[o]) * gates[n * lay.C + c];
    if (res) out += static_cast<A>(res[o]);
    if (out_relu && out < A(0)) out = A(0);
    y[o] = static_cast<T>(out);
  }
  if (out_relu) {
    const unsigned bits = __ballot_sync(0xffffffffu, inside && out > A(0));
    const int64_t byte = (item % segments) * 4 + lane;
    if (lane < 4 && byte < lay.row_bytes) mask[row * lay.row_bytes + byte] = static_cast<uint8_t>(bits >> (8 * lane));
  }
}

// One block per sample: dz2 = dg * gate'(logits), gates, dz1 = (W2^T dz2) * act'(hidden),
// dp = (W1^T dz1) / L. Shared memory: C + S values.
template <typename T, typename A>
__global__ void excite_backward_kernel(const A* __restrict__ partial, const T* __restrict__ w1,
                                       const T* __restrict__ w2, const A* __restrict__ hidden,
                                       const A* __restrict__ logits, A* __restrict__ dz1_out, A* __restrict__ dz2_out,
                                       A* __restrict__ gates, A* __restrict__ dp, int64_t C, int64_t S, int64_t L,
                                       int splits, int act, int gate) {
  extern __shared__ unsigned char smem_raw[];
  A* dz2 = reinterpret_cast<A*>(smem_raw);
  A* dz1 = dz2 + C;
  const int64_t n = blockIdx.x;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    A dg = 0;
    for (int k = 0; k < splits; ++k) dg += partial[(n * splits + k) * C + c];
    const A u2 = logits[n * C + c], g = gate_fn(u2, gate);
    dz2[c] = dg * gate_grad(u2, g, gate);
    dz2_out[n * C + c] = dz2[c];
    gates[n * C + c] = g;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t s = warp; s < S; s += kWarps) {
    A acc = 0;
    for (int64_t c = lane; c < C; c += 32) acc += static_cast<A>(w2[c * S + s]) * dz2[c];
    acc = warp_sum(acc);
    if (lane == 0) {
      dz1[s] = acc * activation_grad(hidden[n * S + s], act);
      dz1_out[n * S + s] = dz1[s];
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    A acc = 0;
    for (int64_t s = 0; s < S; ++s) acc += static_cast<A>(w1[s * C + c]) * dz1[s];
    dp[n * C + c] = acc / A(L);
  }
}

// grad_x = dy' * g + dp, grad_residual = dy'. One thread per element.
template <typename T, typename A>
__global__ void grad_input_kernel(const T* __restrict__ dy, const uint8_t* __restrict__ mask,
                                  const A* __restrict__ gates, const A* __restrict__ dp, T* __restrict__ dx,
                                  T* __restrict__ dres, Layout lay, int64_t numel, bool masked) {
  const int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= numel) return;
  const int64_t row = o / lay.row_len, i = o % lay.row_len;
  const int64_t n = row / lay.rows, r = row % lay.rows;
  const int64_t c = lay.pixel_rows ? i : r;
  A d = static_cast<A>(dy[o]);
  if (masked && !((mask[row * lay.row_bytes + (i >> 3)] >> (i & 7)) & 1)) d = A(0);
  if (dres) dres[o] = static_cast<T>(d);
  if (dx) dx[o] = static_cast<T>(d * gates[n * lay.C + c] + dp[n * lay.C + c]);
}

// dW2[c, s] = sum_n dz2[n, c] act(hidden[n, s]), dW1[s, c] = sum_n dz1[n, s] pooled[n, c],
// db2 = sum_n dz2, db1 = sum_n dz1: one thread per (c, s), the batch summed in order. 1-D grid
// over (S, channel blocks), channel blocks fastest.
template <typename T, typename A>
__global__ void weight_grads_kernel(const A* __restrict__ dz1, const A* __restrict__ dz2,
                                    const A* __restrict__ hidden, const A* __restrict__ pooled, T* __restrict__ dw1,
                                    T* __restrict__ db1, T* __restrict__ dw2, T* __restrict__ db2, int64_t N, int64_t C,
                                    int64_t S, int act) {
  const int64_t cblocks = (C + blockDim.x - 1) / blockDim.x;
  const int64_t c = int64_t(blockIdx.x % cblocks) * blockDim.x + threadIdx.x;
  const int64_t s = blockIdx.x / cblocks;
  if (c >= C) return;
  A w2 = 0, w1 = 0, b2 = 0, b1 = 0;
  for (int64_t n = 0; n < N; ++n) {
    const A g2 = dz2[n * C + c], g1 = dz1[n * S + s];
    w2 += g2 * activation(hidden[n * S + s], act);
    w1 += g1 * pooled[n * C + c];
    b2 += g2;
    b1 += g1;
  }
  dw2[c * S + s] = static_cast<T>(w2);
  dw1[s * C + c] = static_cast<T>(w1);
  if (s == 0) db2[c] = static_cast<T>(b2);
  if (c == 0) db1[s] = static_cast<T>(b1);
}

// ---- host ----------------------------------------------------------------------------------------

// A 1-D grid of `blocks` blocks (grid.x allows 2^31 - 1; y and z only 65535).
unsigned int grid_1d(int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int32_t>::max(), "se_kernels: a launch would need ",
              blocks, " blocks, over CUDA's grid limit");
  return static_cast<unsigned int>(blocks);
}

int activation_code(Act a) {
  return static_cast<int>(a);
}

int gate_code(Gate g) {
  return static_cast<int>(g);
}

struct Splits {
  int splits;
  int64_t per_split;
};

int multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Enough blocks for the pixel reduction to fill the GPU: 4 per multiprocessor.
Splits pixel_splits(const Geometry& g, int64_t channel_blocks) {
  const int sms = multiprocessors();
  const int64_t blocks = std::max<int64_t>(1, g.N * channel_blocks);
  const int64_t wanted = std::max<int64_t>(1, (4 * sms + blocks - 1) / blocks);
  const int64_t splits = std::min<int64_t>(std::max<int64_t>(1, g.L / 32), wanted);
  const int64_t per_split = (g.L + splits - 1) / splits;
  return {static_cast<int>((g.L + per_split - 1) / per_split), per_split};
}

int64_t channel_blocks(const Geometry& g) {
  return g.pixel_rows ? (g.C + 31) / 32 : (g.C + kWarps - 1) / kWarps;
}

void check_cuda_inputs(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors)
    TORCH_CHECK(t.is_cuda(), "se_kernels: the cuda kernels take CUDA tensors; got one on ", t.device());
}

// The per-sample kernels keep C + S values in shared memory (48 KiB without opting in).
size_t excite_shared_bytes(const Geometry& g, size_t value_bytes) {
  const size_t bytes = (g.C + g.S) * value_bytes;
  TORCH_CHECK(bytes <= 48 * 1024, "se_kernels: the cuda backend supports C + S up to ", 48 * 1024 / value_bytes,
              " (C = ", g.C, ", S = ", g.S, "); use the triton or torch backend");
  return bytes;
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
  at::Tensor partial = at::empty({g.N, sp.splits, g.C}, acc_opts);
  at::Tensor gates = at::empty({g.N, g.C}, acc_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    channel_sums_kernel<scalar_t, A><<<grid_1d(cblocks * sp.splits * g.N), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), nullptr, nullptr, partial.mutable_data_ptr<A>(), lay, sp.per_split,
        sp.splits, cblocks, false, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    excite_kernel<scalar_t, A><<<grid_1d(g.N), kThreads, excite_shared_bytes(g, sizeof(A)), stream>>>(
        partial.const_data_ptr<A>(), w1.const_data_ptr<scalar_t>(),
        b1c.defined() ? b1c.const_data_ptr<scalar_t>() : nullptr, w2.const_data_ptr<scalar_t>(),
        b2c.defined() ? b2c.const_data_ptr<scalar_t>() : nullptr, pooled.mutable_data_ptr<A>(),
        hidden.mutable_data_ptr<A>(), logits.mutable_data_ptr<A>(), gates.mutable_data_ptr<A>(), g.C, g.S, g.L,
        sp.splits, activation_code(act), gate_code(gt));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t rows = g.N * g.rows, warps = rows * ((g.row_len + 31) / 32);
    scale_kernel<scalar_t, A><<<grid_1d((warps * 32 + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr,
        y.mutable_data_ptr<scalar_t>(), out_relu ? mask.mutable_data_ptr<uint8_t>() : nullptr,
        gates.const_data_ptr<A>(), lay, rows, out_relu);
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
  at::Tensor partial = at::empty({g.N, sp.splits, g.C}, acc_opts);
  at::Tensor dz1 = at::empty({g.N, g.S}, acc_opts);
  at::Tensor dz2 = at::empty({g.N, g.C}, acc_opts);
  at::Tensor gates = at::empty({g.N, g.C}, acc_opts);
  at::Tensor dp = at::empty({g.N, g.C}, acc_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const uint8_t* mask = out_relu ? relu_mask.const_data_ptr<uint8_t>() : nullptr;
    channel_sums_kernel<scalar_t, A><<<grid_1d(cblocks * sp.splits * g.N), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(), mask, partial.mutable_data_ptr<A>(), lay,
        sp.per_split, sp.splits, cblocks, true, out_relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    excite_backward_kernel<scalar_t, A><<<grid_1d(g.N), kThreads, excite_shared_bytes(g, sizeof(A)), stream>>>(
        partial.const_data_ptr<A>(), w1.const_data_ptr<scalar_t>(), w2.const_data_ptr<scalar_t>(),
        hidden.const_data_ptr<A>(), logits.const_data_ptr<A>(), dz1.mutable_data_ptr<A>(),
        dz2.mutable_data_ptr<A>(), gates.mutable_data_ptr<A>(), dp.mutable_data_ptr<A>(), g.C, g.S, g.L, sp.splits,
        activation_code(act), gate_code(gt));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_grad_x || need_grad_residual) {
      const int64_t numel = x.numel();
      grad_input_kernel<scalar_t, A><<<grid_1d((numel + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), mask, gates.const_data_ptr<A>(), dp.const_data_ptr<A>(),
          need_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
          need_grad_residual ? grad_res.mutable_data_ptr<scalar_t>() : nullptr, lay, numel, out_relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    weight_grads_kernel<scalar_t, A><<<grid_1d((g.C + kThreads - 1) / kThreads * g.S), kThreads, 0, stream>>>(
        dz1.const_data_ptr<A>(), dz2.const_data_ptr<A>(), hidden.const_data_ptr<A>(), pooled.const_data_ptr<A>(),
        grad_w1.mutable_data_ptr<scalar_t>(), grad_b1.mutable_data_ptr<scalar_t>(),
        grad_w2.mutable_data_ptr<scalar_t>(), grad_b2.mutable_data_ptr<scalar_t>(), g.N, g.C, g.S,
        activation_code(act));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_res};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CUDA, m) {
  m.impl("se_forward", &se_forward_cuda);
  m.impl("se_backward", &se_backward_cuda);
}

}  // namespace se_kernels::cuda
