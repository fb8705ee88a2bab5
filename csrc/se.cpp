// The op schemas of se_kernels (one source of truth) and the Python module stub.
//
// Python (se_kernels/ops.py) registers the fake kernels and the autograd formula; each
// device folder registers its kernels with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda).
//
// Shapes: x (N, C, H, W), w1 (S, C), b1 (S), w2 (C, S), b2 (C), residual like x.
// x, residual and grad_y are NCHW-contiguous or channels_last-contiguous (the Python layer
// makes them so); every float output of se_forward other than y is in the accumulation
// type (float32 for float32/float16/bfloat16 inputs, float64 for float64):
//   pooled      (N, C)  mean of x over H*W
//   hidden      (N, S)  pooled @ w1^T + b1            (before the activation)
//   gate_logits (N, C)  act(hidden) @ w2^T + b2       (before the gate)
//   relu_mask   uint8, one bit per element of y telling y > 0, stored row by row, each row
//               starting on a byte: (N, C, ceil(H*W/8)) when x is read as NCHW rows,
//               (N, H*W, ceil(C/8)) when read as channels_last rows (also whenever
//               H*W == 1); shape (0,) when out_activation is None.
// se_backward returns grad_x (empty (0,) unless need_grad_x) and grad_residual (empty
// unless need_grad_residual and out_activation is "relu": without the relu the residual's
// gradient is grad_y itself, which the Python layer passes on without a copy).

#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing se_kernels._C loads this library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "se_kernels native kernels (ops are in torch.ops.se_kernels)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(se_kernels, m) {
  m.def(
      "se_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? residual, "
      "str activation, str gate, str? out_activation) "
      "-> (Tensor y, Tensor pooled, Tensor hidden, Tensor gate_logits, Tensor relu_mask)");
  m.def(
      "se_backward(Tensor grad_y, Tensor x, Tensor w1, Tensor w2, Tensor pooled, Tensor hidden, "
      "Tensor gate_logits, Tensor relu_mask, str activation, str gate, str? out_activation, "
      "bool need_grad_x, bool need_grad_residual) "
      "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2, "
      "Tensor grad_residual)");
  // The generic channel-attention path's stage kernels (csrc/cpu/channel_attention.cpp).
  m.def("ca_pool(Tensor x, bool with_max) -> (Tensor mean, Tensor max, Tensor ties)");
  m.def("ca_scale(Tensor x, Tensor g, Tensor? residual, bool out_relu) -> (Tensor y, Tensor relu_mask)");
  m.def("ca_gate_grad(Tensor grad_y, Tensor x, Tensor relu_mask, bool out_relu) -> Tensor");
  m.def(
      "ca_input_grad(Tensor grad_y, Tensor relu_mask, Tensor g, Tensor dmean, Tensor? x, Tensor? max, "
      "Tensor? dmax, Tensor? ties, bool out_relu, bool need_grad_x, bool need_grad_residual) "
      "-> (Tensor grad_x, Tensor grad_residual)");
  // ECA's forward in one plan (inference: no autograd; csrc/cpu/se_cpu.cpp): the pool, the k-tap
  // convolution along the channels with the gate per sample, and the scale.
  m.def(
      "ca_eca_forward(Tensor x, Tensor weight, Tensor? bias, int padding, str gate, Tensor? residual, "
      "bool out_relu) -> (Tensor y, Tensor relu_mask)");
}
