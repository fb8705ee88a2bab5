// Autograd for se_kernels::se_forward, for every device (the Autograd alias key): the
// backward is se_kernels::se_backward, dispatched to the same device's kernel.
//
// It lives in C++ rather than in torch.library.register_autograd because the Python path costs
// about 30 us per forward call and more per backward (measured in README.md, Architecture),
// which is a tenth of the whole op at the benchmark's smaller shapes. The fake kernels stay in
// Python (se_kernels/ops.py); torch.compile and torch.export trace through this kernel.
//
// Saved for backward: x, w1, b1, w2, b2 and the forward's (N, C)/(N, S) vectors and relu bit
// mask (csrc/se.cpp).
//
// Second order: se_backward's kernels have no derivative of their own (its Autograd kernel
// below raises if anything tries to differentiate it). A backward that runs with
// create_graph=True (GradMode on) calls se_kernels::se_backward_differentiable instead: the
// same gradients as differentiable ATen ops, defined in se_kernels/differentiable.py.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "se_common.h"

namespace se_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view, c10::string_view,
    std::optional<c10::string_view>);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view, std::optional<c10::string_view>, bool,
    bool);

using DifferentiableBackwardSignature = std::vector<at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, c10::string_view, c10::string_view,
    std::optional<c10::string_view>);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("se_kernels::se_forward", "").typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("se_kernels::se_backward", "").typed<BackwardSignature>();
  return op;
}

// Registered from Python (se_kernels/differentiable.py) when se_kernels is imported.
c10::TypedOperatorHandle<DifferentiableBackwardSignature> differentiable_backward_op() {
  const auto handle = c10::Dispatcher::singleton().findSchema({"se_kernels::se_backward_differentiable", ""});
  TORCH_CHECK(handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd),
              "se_kernels: second-order gradients (create_graph=True) need se_kernels::se_backward_differentiable, "
              "which `import se_kernels` registers; this process loaded the native library without it");
  return handle->typed<DifferentiableBackwardSignature>();
}

class SEFunction : public torch::autograd::Function<SEFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& residual,
                               c10::string_view activation, c10::string_view gate,
                               std::optional<c10::string_view> out_activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, pooled, hidden, gate_logits, relu_mask] =
        forward_op().call(x, w1, b1, w2, b2, residual, activation, gate, out_activation);
    ctx->mark_non_differentiable({pooled, hidden, gate_logits, relu_mask});
    const at::Tensor none;
    ctx->save_for_backward({x, w1, w2, pooled, hidden, gate_logits, relu_mask, b1.has_value() ? *b1 : none,
                            b2.has_value() ? *b2 : none});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["gate"] = std::string(gate);
    ctx->saved_data["out_relu"] = out_activation.has_value();
    // Positions of the optional tensors among the differentiable inputs (the graph's edges
    // count only the tensors that were passed).
    const bool has_b1 = b1.has_value() && b1->defined(), has_b2 = b2.has_value() && b2->defined();
    const bool has_residual = residual.has_value() && residual->defined();
    ctx->saved_data["has_b1"] = has_b1;
    ctx->saved_data["has_b2"] = has_b2;
    ctx->saved_data["has_residual"] = has_residual;
    return {y, pooled, hidden, gate_logits, relu_mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w1 = saved[1], &w2 = saved[2];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const std::string gate = ctx->saved_data["gate"].toStringRef();
    const bool out_relu = ctx->saved_data["out_relu"].toBool();
    const bool has_b1 = ctx->saved_data["has_b1"].toBool(), has_b2 = ctx->saved_data["has_b2"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();

    // Edge indices: x, w1, [b1], w2, [b2], [residual].
    const size_t e_b1 = 2, e_w2 = has_b1 ? 3 : 2, e_b2 = e_w2 + 1, e_res = e_w2 + (has_b2 ? 2 : 1);
    const bool need_x = ctx->needs_input_grad(0), need_w1 = ctx->needs_input_grad(1);
    const bool need_b1 = has_b1 && ctx->needs_input_grad(e_b1), need_w2 = ctx->needs_input_grad(e_w2);
    const bool need_b2 = has_b2 && ctx->needs_input_grad(e_b2);
    const bool need_residual = has_residual && ctx->needs_input_grad(e_res);

    at::Tensor grad_y = grads[0];
    if (!grad_y.defined()) grad_y = at::zeros_like(x);
    grad_y = uses_pixel_rows(x) ? grad_y.contiguous(at::MemoryFormat::ChannelsLast) : grad_y.contiguous();
    const std::optional<c10::string_view> out_activation =
        out_relu ? std::optional<c10::string_view>("relu") : std::nullopt;
    at::Tensor grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_residual;
    if (at::GradMode::is_enabled()) {  // create_graph=True: gradients that autograd can differentiate
      auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
      const auto g = differentiable_backward_op().call(grad_y, x, w1, optional(saved[7]), w2, optional(saved[8]),
                                                       saved[6], activation, gate, out_activation);
      grad_x = g[0], grad_w1 = g[1], grad_b1 = g[2], grad_w2 = g[3], grad_b2 = g[4], grad_residual = g[5];
    } else {
      std::tie(grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_residual) =
          backward_op().call(grad_y, x, w1, w2, saved[3], saved[4], saved[5], saved[6], activation, gate,
                             out_activation, need_x, need_residual);
      if (need_residual && !out_relu) grad_residual = grad_y;  // y = x * g + residual
    }
    const at::Tensor none;
    return {need_x ? grad_x : none,
            need_w1 ? grad_w1 : none,
            need_b1 ? grad_b1 : none,
            need_w2 ? grad_w2 : none,
            need_b2 ? grad_b2 : none,
            need_residual ? grad_residual : none,
            none,
            none,
            none};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> se_forward_autograd(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& residual, c10::string_view activation,
    c10::string_view gate, std::optional<c10::string_view> out_activation) {
  auto out = SEFunction::apply(x, w1, b1, w2, b2, residual, activation, gate, out_activation);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, Autograd, m) {
  m.impl("se_forward", &se_forward_autograd);
  // The fused backward is not differentiable: differentiating it raises rather than giving zeros.
  m.impl("se_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace se_kernels
