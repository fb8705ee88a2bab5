// Argument checks of the generic channel-attention path's stage ops (csrc/se.cpp's ca_*), shared
// by their CPU (csrc/cpu/channel_attention.cpp) and CUDA (csrc/cuda/se_cuda.cu) kernels. The
// Python layer (se_kernels/attention.py) raises friendlier errors first; these guard direct calls.
#pragma once

#include "se_common.h"

namespace se_kernels::ca {

inline void check_like_x(const at::Tensor& t, const at::Tensor& x, const Geometry& g, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
                    "se_kernels: ", name, " must match x (", x.sizes(), " ", x.scalar_type(), "); got ", t.sizes(),
                    " ", t.scalar_type());
  TORCH_CHECK_VALUE(same_layout(t, g), "se_kernels: ", name, " must have x's memory layout");
}

inline void check_vector(const at::Tensor& t, const at::Tensor& x, const char* name) {
  const auto acc = accumulation_type(x.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.is_contiguous() &&
                        t.scalar_type() == acc && t.device() == x.device(),
                    "se_kernels: ", name, " must be a contiguous (", x.size(0), ", ", x.size(1), ") ", acc,
                    " tensor; got ", t.sizes(), " ", t.scalar_type());
}

inline void check_mask(const at::Tensor& mask, const at::Tensor& x, const Geometry& g, bool out_relu) {
  if (!out_relu) return;
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kByte && mask.is_contiguous() &&
                        mask.sizes() == at::IntArrayRef({g.N, g.rows, g.mask_row_bytes}) &&
                        mask.device() == x.device(),
                    "se_kernels: relu_mask must be a contiguous uint8 (", g.N, ", ", g.rows, ", ", g.mask_row_bytes,
                    ") tensor; got ", mask.sizes(), " ", mask.scalar_type());
}

inline Geometry check_x(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) >= 1 && x.size(2) * x.size(3) >= 1,
                    "se_kernels: x must be (N, C, H, W) with C >= 1 and H*W >= 1; got ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "se_kernels: x must be floating point; got ",
                   x.scalar_type());
  return make_geometry(x, 1);
}

inline Geometry check_input_grad_args(const at::Tensor& dy, const at::Tensor& mask, const at::Tensor& gate,
                                      const at::Tensor& dmean, const std::optional<at::Tensor>& x,
                                      const std::optional<at::Tensor>& mx, const std::optional<at::Tensor>& dmax,
                                      const std::optional<at::Tensor>& ties, bool out_relu) {
  const Geometry g = check_x(dy);
  check_mask(mask, dy, g, out_relu);
  check_vector(gate, dy, "g");
  check_vector(dmean, dy, "dmean");
  const bool with_max = mx.has_value();
  TORCH_CHECK_VALUE(x.has_value() == with_max && dmax.has_value() == with_max && ties.has_value() == with_max,
                    "se_kernels: ca_input_grad takes x, max, dmax and ties together (the max squeeze) or none");
  if (with_max) {
    check_like_x(*x, dy, g, "x");
    TORCH_CHECK_VALUE(mx->dim() == 2 && mx->size(0) == g.N && mx->size(1) == g.C && mx->is_contiguous() &&
                          mx->scalar_type() == dy.scalar_type() && mx->device() == dy.device(),
                      "se_kernels: max must be a contiguous (N, C) tensor in x's dtype; got ", mx->sizes());
    check_vector(*dmax, dy, "dmax");
    check_vector(*ties, dy, "ties");
  }
  return g;
}

// ca_input_grad's outputs and per-(n, c) terms, after the checks: dx and dres (empty where not
// asked for; dres also without the relu, where it is dy itself), dp = dmean / HW and, with the max
// squeeze, dm = dmax / ties (0 where no element is the max: NaN). done: nothing to compute.
struct InputGrad {
  Geometry g;
  bool with_max, dres_out, done;
  at::Tensor dx, dres, dp, dm;
};

inline InputGrad prepare_input_grad(const at::Tensor& dy, const at::Tensor& mask, const at::Tensor& gate,
                                    const at::Tensor& dmean, const std::optional<at::Tensor>& x,
                                    const std::optional<at::Tensor>& mx, const std::optional<at::Tensor>& dmax,
                                    const std::optional<at::Tensor>& ties, bool out_relu, bool need_grad_x,
                                    bool need_grad_residual) {
  InputGrad a;
  a.g = check_input_grad_args(dy, mask, gate, dmean, x, mx, dmax, ties, out_relu);
  a.with_max = mx.has_value();
  a.dres_out = need_grad_residual && out_relu;
  a.dx = need_grad_x ? at::empty_like(dy) : at::empty({0}, dy.options());
  a.dres = a.dres_out ? at::empty_like(dy) : at::empty({0}, dy.options());
  a.done = a.g.N == 0 || (!need_grad_x && !a.dres_out);
  if (!a.done) {
    a.dp = dmean / static_cast<double>(a.g.L);
    if (a.with_max) a.dm = at::where(*ties > 0, *dmax / *ties, at::zeros_like(*dmax));
  }
  return a;
}

}  // namespace se_kernels::ca
