"""FusedSE: the SE block as an nn.Module, parameter-compatible with torchvision's."""

from __future__ import annotations

from typing import Optional

import torch

from .functional import check_options, fused_se
from .reference import SEBase


class FusedSE(SEBase):
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
        super().__init__(
            channels, squeeze_channels, reduction=reduction, bias=bias, activation=activation, gate=gate,
            out_activation=out_activation,
        )
        check_options(activation, gate, out_activation, backend)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights, options = self.se_arguments()
        return fused_se(x, *weights, residual=residual, backend=self.backend, **options)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
