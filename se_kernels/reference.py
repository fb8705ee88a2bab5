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


class ReferenceSE(nn.Module):
    """torchvision.ops.SqueezeExcitation with the epilogue: the eager baseline.

    Same parameters and state_dict keys as torchvision's module and as FusedSE.
    """

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
        squeeze_channels = squeeze_channels or max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1, bias=bias)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1, bias=bias)
        self.activation = activation
        self.gate = gate
        self.out_activation = out_activation

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return se_reference(
            x,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            activation=self.activation,
            gate=self.gate,
            residual=residual,
            out_activation=self.out_activation,
        )
