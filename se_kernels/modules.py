"""FusedSE: the SE block as an nn.Module, parameter-compatible with torchvision's."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import check_options, fused_se


class FusedSE(nn.Module):
    """Squeeze-and-Excitation block running the fused se_kernels op.

    Parameters are fc1.weight (S, C, 1, 1), fc1.bias (S), fc2.weight (C, S, 1, 1) and
    fc2.bias (C), held in 1x1 nn.Conv2d modules exactly as torchvision.ops.SqueezeExcitation
    holds them, so its state_dict loads unchanged (and initialisation matches).

    Args:
        channels: C, the input channels.
        squeeze_channels: S; defaults to max(1, channels // reduction).
        reduction: used only when squeeze_channels is None.
        bias: whether fc1 and fc2 have biases.
        activation: "relu" | "silu" | "gelu" | "hardswish", after fc1.
        gate: "sigmoid" | "hardsigmoid", after fc2.
        out_activation: None | "relu", applied after the optional residual add.
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch".

    forward(x, residual=None): x (N, C, H, W) -> (N, C, H, W).
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
        backend: str = "auto",
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
        check_options(activation, gate, out_activation, backend)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1, bias=bias)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1, bias=bias)
        self.activation = activation
        self.gate = gate
        self.out_activation = out_activation
        self.backend = backend

    @property
    def channels(self) -> int:
        return self.fc1.in_channels

    @property
    def squeeze_channels(self) -> int:
        return self.fc1.out_channels

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_se(
            x,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            activation=self.activation,
            gate=self.gate,
            residual=residual,
            out_activation=self.out_activation,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, squeeze_channels={self.squeeze_channels}, "
            f"activation={self.activation!r}, gate={self.gate!r}, "
            f"out_activation={self.out_activation!r}, backend={self.backend!r}"
        )
