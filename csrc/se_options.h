// The options every backend computes: the activation after the first layer and the gate after
// the second. The one list is se_kernels/reference.py's ACTIVATIONS and GATES: the enumerators
// here are those names in the same order (an option's code, which the CUDA kernels take and the
// Triton kernels use too, is its index there), and tests/test_options.py checks that they, the
// names below and the Triton codes agree. Adding an option: the reference's function and
// derivative first, then an enumerator and its name here, then a case in every switch that the
// compiler (-Werror=switch, setup.py) and that test point to.
//
// No dependencies (no ATen): csrc/cuda/se_tiles.h includes it, and its host test compiles it alone.
#pragma once

namespace se_kernels {

enum class Act { ReLU, SiLU, GELU, HardSwish };
enum class Gate { Sigmoid, HardSigmoid };

// The Python name of each option; nullptr for a value that is no enumerator (how the parsers in
// se_common.h find the end of the list).
constexpr const char* option_name(Act act) {
  switch (act) {
    case Act::ReLU: return "relu";
    case Act::SiLU: return "silu";
    case Act::GELU: return "gelu";
    case Act::HardSwish: return "hardswish";
  }
  return nullptr;
}

constexpr const char* option_name(Gate gate) {
  switch (gate) {
    case Gate::Sigmoid: return "sigmoid";
    case Gate::HardSigmoid: return "hardsigmoid";
  }
  return nullptr;
}

}  // namespace se_kernels
