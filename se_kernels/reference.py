"""The SE block in plain PyTorch: the test oracle and the "torch" backend.

It computes exactly what torchvision.ops.SqueezeExcitation computes (adaptive average pool,
1x1 convolutions, activation, gate, ``scale * x``), followed by the optional epilogue
``out_activation(y + residual)``. Autograd differentiates it; nothing here is fused.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# The options: the one list of what the op computes, name -> function. Every backend takes these
# names and no others (check_option below, at the API). The native kernels' enums
# (csrc/se_options.h) and the Triton kernels' codes (se_kernels/triton/kernels.py) follow the
# order of ACTIVATIONS and GATES: an option's code is its index here; tests/test_options.py checks
# that they agree. An option added here needs its derivative below and code in every backend.
ACTIVATIONS = {
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf) form, as nn.GELU()
    "hardswish": F.hardswish,
}
GATES = {
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
}
OUT_ACTIVATIONS = {
    None: lambda y: y,
    "relu": F.relu,
}

# d act(u) / du and d gate(u) / du applied to an incoming gradient, as differentiable torch
# ops (se_kernels/differentiable.py builds second-order gradients from them). Each equals what
# autograd computes for the function above; silu and hardsigmoid are written out because
# PyTorch's silu_backward and hardsigmoid_backward have no derivative of their own.
ACTIVATION_GRADS = {
    "relu": lambda grad, u: torch.ops.aten.threshold_backward(grad, u, 0),
    "silu": lambda grad, u: grad * torch.sigmoid(u) * (1 + u * (1 - torch.sigmoid(u))),
    "gelu": lambda grad, u: torch.ops.aten.gelu_backward(grad, u),
    "hardswish": lambda grad, u: torch.ops.aten.hardswish_backward(grad, u),
}
GATE_GRADS = {
    "sigmoid": lambda grad, u, g: torch.ops.aten.sigmoid_backward(grad, g),
    "hardsigmoid": lambda grad, u, g: grad * ((u > -3) & (u < 3)).to(grad.dtype) / 6,
}

OPTIONS = {"activation": ACTIVATIONS, "gate": GATES, "out_activation": OUT_ACTIVATIONS}


def option_error(option: str, value) -> Optional[str]:
    """None if `value` names one of OPTIONS[option], else the message saying what it may be."""
    table = OPTIONS[option]
    try:
        known = value in table
    except TypeError:  # unhashable
        known = False
    if known:
        return None
    return f"{option} must be one of {', '.join(repr(name) for name in table)}; got {value!r}"


def check_option(option: str, value) -> None:
    """Raises ValueError naming the allowed values unless `value` is one of OPTIONS[option]."""
    message = option_error(option, value)
    if message is not None:
        raise ValueError(message)


def check_options(activation, gate, out_activation) -> None:
    check_option("activation", activation)
    check_option("gate", gate)
    check_option("out_activation", out_activation)


def se_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    *,
    activation: str = "relu",
    gate: str = "sigmoid",
    residual: Optional[torch.Tensor] = None,
    out_activation: Optional[str] = None,
) -> torch.Tensor:
    """Squeeze-and-Excitation, unfused.

    Args:
        x: (N, C, H, W).
        w1: (S, C) or (S, C, 1, 1); b1: (S,) or None.
        w2: (C, S) or (C, S, 1, 1); b2: (C,) or None.
        residual: None or like x.
    Returns:
        out_activation(x * gate(act(mean_hw(x) w1^T + b1) w2^T + b2) + residual), (N, C, H, W).
    """
    check_options(activation, gate, out_activation)
    if w1.dim() == 2:
        w1 = w1[:, :, None, None]
    if w2.dim() == 2:
        w2 = w2[:, :, None, None]
    scale = F.adaptive_avg_pool2d(x, 1)
    scale = ACTIVATIONS[activation](F.conv2d(scale, w1, b1))
    scale = GATES[gate](F.conv2d(scale, w2, b2))
    y = scale * x
    if residual is not None:
        y = y + residual
    return OUT_ACTIVATIONS[out_activation](y)


class SEBase(nn.Module):
    """What every SE module here shares: the parameters, held in 1x1 nn.Conv2d modules exactly
    as torchvision.ops.SqueezeExcitation holds them (fc1.weight (S, C, 1, 1), fc1.bias (S),
    fc2.weight (C, S, 1, 1), fc2.bias (C): its state_dict loads unchanged, and initialisation
    matches), and the options. Subclasses define forward(x, residual=None).

    A module converted from another SE flavour (FusedSE.from_module) keeps that flavour's
    layers at their own paths instead (e.g. conv_reduce/conv_expand, or fc.0/fc.2 Linears), so
    its state_dict keys stay the original's; reduce_layer/expand_layer find them."""

    _reduce_path = "fc1"
    _expand_path = "fc2"

    def __init__(
        self,
        channels: int,
        squeeze_channels: Optional[int] = None,
        *,
        reduction: int = 16,
        bias: bool = True,
        activation: str = "relu",
        gate: str = "sigmoid",
        out_activation: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an int >= 1; got {channels!r}")
        if squeeze_channels is None:
            if not isinstance(reduction, int) or reduction < 1:
                raise ValueError(f"reduction must be an int >= 1; got {reduction!r}")
            squeeze_channels = max(1, channels // reduction)
        if not isinstance(squeeze_channels, int) or squeeze_channels < 1:
            raise ValueError(f"squeeze_channels must be an int >= 1; got {squeeze_channels!r}")
        check_options(activation, gate, out_activation)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1, bias=bias)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1, bias=bias)
        self.activation = activation
        self.gate = gate
        self.out_activation = out_activation

    @property
    def reduce_layer(self) -> nn.Module:
        """The C -> S layer (fc1 unless converted from another flavour)."""
        return self.get_submodule(self._reduce_path)

    @property
    def expand_layer(self) -> nn.Module:
        """The S -> C layer (fc2 unless converted from another flavour)."""
        return self.get_submodule(self._expand_path)

    @property
    def channels(self) -> int:
        return self.reduce_layer.weight.shape[1]

    @property
    def squeeze_channels(self) -> int:
        return self.reduce_layer.weight.shape[0]

    def _layer(self, path: str) -> nn.Module:
        """self.get_submodule(path), walking _modules directly (this runs on every forward;
        get_submodule's checks cost ~3 us a call); get_submodule's error if it is missing."""
        module = self
        try:
            for name in path.split("."):
                module = module._modules[name]
        except (KeyError, AttributeError):
            return self.get_submodule(path)
        if module is None:
            return self.get_submodule(path)
        return module

    def se_arguments(self) -> tuple:
        """(w1, b1, w2, b2) and the option keywords, for se_reference or fused_se."""
        reduce, expand = self._layer(self._reduce_path), self._layer(self._expand_path)
        options = dict(activation=self.activation, gate=self.gate, out_activation=self.out_activation)
        return (reduce.weight, reduce.bias, expand.weight, expand.bias), options

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, squeeze_channels={self.squeeze_channels}, "
            f"activation={self.activation!r}, gate={self.gate!r}, out_activation={self.out_activation!r}"
        )


class ReferenceSE(SEBase):
    """torchvision.ops.SqueezeExcitation with the epilogue: the eager baseline. Same
    parameters and state_dict keys as torchvision's module and as FusedSE."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights, options = self.se_arguments()
        return se_reference(x, *weights, residual=residual, **options)
