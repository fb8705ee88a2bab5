// Autocast for se_kernels::se_forward: under torch.autocast the op computes in the autocast
// dtype, like a linear layer. Every float32/float16/bfloat16 input on the autocast device is
// cast to it (float64 is left alone, as autocast does; at::autocast::cached_cast), then the op
// runs below the Autocast key. fused_se casts in Python as well (its argument checks see the
// cast dtypes); this kernel makes direct calls of torch.ops.se_kernels.se_forward, and graphs
// exported with the op in them, behave the same.

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace se_kernels {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
Outputs se_forward_autocast(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                            const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                            const std::optional<at::Tensor>& residual, c10::string_view activation,
                            c10::string_view gate, std::optional<c10::string_view> out_activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("se_kernels::se_forward", "")
                             .typed<Outputs(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                            const at::Tensor&, const std::optional<at::Tensor>&,
                                            const std::optional<at::Tensor>&, c10::string_view, c10::string_view,
                                            std::optional<c10::string_view>)>();
  return op.call(cast(x), cast(w1), cast(b1), cast(w2), cast(b2), cast(residual), activation, gate, out_activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, AutocastCPU, m) {
  m.impl("se_forward", &se_forward_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(se_kernels, AutocastCUDA, m) {
  m.impl("se_forward", &se_forward_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

}  // namespace se_kernels
