// Host-side pieces shared by every device's kernels: option parsing, the layout rule,
// the argument checks and the output allocation that the fake kernels in
// se_kernels/ops.py mirror.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

#include "se_options.h"

namespace se_kernels {

// The option named `name`, or TORCH_CHECK_VALUE naming the options there are (the names and their
// order: se_options.h, which follows se_kernels/reference.py).
template <typename Option>
Option parse_option(const char* what, c10::string_view name) {
  std::string allowed;
  for (int code = 0; option_name(static_cast<Option>(code)) != nullptr; ++code) {
    const c10::string_view candidate = option_name(static_cast<Option>(code));
    if (name == candidate) return static_cast<Option>(code);
    allowed += (code ? ", '" : "'") + std::string(candidate) + "'";
  }
  TORCH_CHECK_VALUE(false, "se_kernels: ", what, " must be one of ", allowed, "; got '", std::string(name), "'");
}

inline Act parse_activation(c10::string_view name) {
  return parse_option<Act>("activation", name);
}

inline Gate parse_gate(c10::string_view name) {
  return parse_option<Gate>("gate", name);
}

// true: out_activation == "relu"; false: None (se_kernels/reference.py's OUT_ACTIVATIONS).
inline bool parse_out_activation(const std::optional<c10::string_view>& name) {
  if (!name.has_value()) return false;
  TORCH_CHECK_VALUE(*name == "relu", "se_kernels: out_activation must be one of None, 'relu'; got '",
                    std::string(*name), "'");
  return true;
}

// After a switch over every Act or Gate: a value that is no enumerator (never made by the parsers
// above) stops here instead of computing something.
[[noreturn]] C10_NOINLINE inline void unknown_option(const char* what, int code) {
  TORCH_CHECK(false, "se_kernels: internal error: ", what, " code ", code, " is no option");
}

// How the kernels walk x: as rows of H*W pixels per channel (NCHW), or as rows of C channels
// per pixel (channels_last, and also whenever H*W == 1, where NCHW rows would be one long).
struct Geometry {
  int64_t N, C, S, L;      // L = H * W
  bool pixel_rows;         // true: channels_last rows
  int64_t rows, row_len;   // per sample: (C, L) or (L, C)
  int64_t mask_row_bytes;  // ceil(row_len / 8)
};

inline bool uses_pixel_rows(const at::Tensor& x) {
  const int64_t L = x.size(2) * x.size(3);
  if (L != 1 && x.is_contiguous()) return false;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "se_kernels: x must be NCHW-contiguous or channels_last-contiguous; got strides ", x.strides());
  return true;
}

inline Geometry make_geometry(const at::Tensor& x, int64_t S) {
  Geometry g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = S;
  g.L = x.size(2) * x.size(3);
  g.pixel_rows = uses_pixel_rows(x);
  g.rows = g.pixel_rows ? g.L : g.C;
  g.row_len = g.pixel_rows ? g.C : g.L;
  g.mask_row_bytes = (g.row_len + 7) / 8;
  return g;
}

// t has x's memory layout (so the kernels can walk both with the same offsets).
inline bool same_layout(const at::Tensor& t, const Geometry& g) {
  return g.pixel_rows ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous();
}

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks for the forward inputs. The Python layer raises friendlier errors first; these
// guard direct calls of torch.ops.se_kernels.se_forward.
inline Geometry check_forward_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                   const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                   const std::optional<at::Tensor>& residual) {
  TORCH_CHECK_VALUE(x.dim() == 4, "se_kernels: x must be 4-D (N, C, H, W); got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "se_kernels: x must be floating point; got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) * x.size(3) >= 1,
                    "se_kernels: x needs C >= 1 and H*W >= 1; got shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == C && w1.size(0) >= 1,
                    "se_kernels: w1 must have shape (S, C) with C = ", C, "; got ", w1.sizes());
  const int64_t S = w1.size(0);
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == C && w2.size(1) == S,
                    "se_kernels: w2 must have shape (C, S) = (", C, ", ", S, "); got ", w2.sizes());
  auto check_param = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "se_kernels: ", name, " has dtype ", t.scalar_type(),
                     " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), "se_kernels: ", name, " is on ", t.device(), " but x is on ",
                      x.device());
  };
  check_param(w1, "w1");
  check_param(w2, "w2");
  if (b1.has_value()) {
    check_param(*b1, "b1");
    TORCH_CHECK_VALUE(b1->dim() == 1 && b1->size(0) == S, "se_kernels: b1 must have shape (", S, ",); got ",
                      b1->sizes());
  }
  if (b2.has_value()) {
    check_param(*b2, "b2");
    TORCH_CHECK_VALUE(b2->dim() == 1 && b2->size(0) == C, "se_kernels: b2 must have shape (", C, ",); got ",
                      b2->sizes());
  }
  Geometry g = make_geometry(x, S);
  if (residual.has_value()) {
    check_param(*residual, "residual");
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "se_kernels: residual must have x's shape ", x.sizes(),
                      "; got ", residual->sizes());
    TORCH_CHECK(same_layout(*residual, g), "se_kernels: residual must have x's memory layout");
  }
  return g;
}

inline Geometry check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1,
                                    const at::Tensor& w2, const at::Tensor& pooled, const at::Tensor& hidden,
                                    const at::Tensor& gate_logits, const at::Tensor& relu_mask, bool out_relu) {
  Geometry g = check_forward_args(x, w1, std::nullopt, w2, std::nullopt, std::nullopt);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
                    "se_kernels: grad_y must match x in shape and dtype; got ", grad_y.sizes(), " ",
                    grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), "se_kernels: grad_y is on ", grad_y.device(), " but x is on ",
                    x.device());
  TORCH_CHECK(same_layout(grad_y, g), "se_kernels: grad_y must have x's memory layout");
  const auto acc = accumulation_type(x.scalar_type());
  auto check_saved = [&](const at::Tensor& t, const char* name, int64_t cols) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == g.N && t.size(1) == cols && t.is_contiguous() &&
                    t.scalar_type() == acc && t.device() == x.device(),
                "se_kernels: ", name, " must be a contiguous (", g.N, ", ", cols, ") ", acc, " tensor; got ",
                t.sizes(), " ", t.scalar_type());
  };
  check_saved(pooled, "pooled", g.C);
  check_saved(hidden, "hidden", g.S);
  check_saved(gate_logits, "gate_logits", g.C);
  if (out_relu) {
    TORCH_CHECK(relu_mask.scalar_type() == at::kByte && relu_mask.is_contiguous() &&
                    relu_mask.sizes() == at::IntArrayRef({g.N, g.rows, g.mask_row_bytes}) &&
                    relu_mask.device() == x.device(),
                "se_kernels: relu_mask must be a contiguous uint8 tensor of shape (", g.N, ", ", g.rows, ", ",
                g.mask_row_bytes, ") on ", x.device(), "; got ", relu_mask.sizes(), " ", relu_mask.scalar_type(),
                " on ", relu_mask.device());
  }
  return g;
}

inline at::Tensor empty_relu_mask(const at::Tensor& x, const Geometry& g, bool out_relu) {
  auto opts = x.options().dtype(at::kByte);
  return out_relu ? at::empty({g.N, g.rows, g.mask_row_bytes}, opts) : at::empty({0}, opts);
}

}  // namespace se_kernels
