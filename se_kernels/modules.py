"""FusedSE: the SE block as an nn.Module, parameter-compatible with torchvision's."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .flavours import Flavour, describe
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

    @classmethod
    def from_module(cls, module: nn.Module, *, backend: str = "auto") -> "FusedSE":
        """A FusedSE computing what `module` computes, holding `module`'s own parameter layers
        (shared, not copied, as nn.SyncBatchNorm.convert_sync_batchnorm does) at their original
        attribute paths, so state_dict keys and shapes stay the same.

        Recognised: torchvision.ops.SqueezeExcitation; timm's SEModule (without add_maxpool or a
        norm layer), efficientnet-block SqueezeExcite and legacy senet SEModule; a
        senet.pytorch-style SELayer (avg_pool + fc = Sequential(Linear, act, Linear, gate)).
        Raises TypeError for any other module and ValueError (UnsupportedSE) naming the reason
        for an SE module with a feature FusedSE does not compute.
        """
        flavour = describe(module)
        if flavour is None:
            raise TypeError(
                f"FusedSE.from_module: {type(module).__module__}.{type(module).__name__} is not a "
                "recognised SE module (torchvision SqueezeExcitation, timm SEModule / SqueezeExcite, "
                "or a senet.pytorch-style SELayer)"
            )
        return cls.from_flavour(flavour, backend=backend)

    @classmethod
    def from_flavour(cls, flavour: Flavour, *, backend: str = "auto") -> "FusedSE":
        """The FusedSE for a described SE module (se_kernels.flavours.describe)."""
        check_options(flavour.activation, flavour.gate, None, backend)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name, layer in flavour.holders.items():
            fused.add_module(name, layer)
        fused._reduce_path, fused._expand_path = flavour.reduce_path, flavour.expand_path
        fused.activation, fused.gate, fused.out_activation = flavour.activation, flavour.gate, None
        fused.backend = backend
        return fused

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights, options = self.se_arguments()
        return fused_se(x, *weights, residual=residual, backend=self.backend, **options)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "FusedSE does not support TorchScript (torch.jit.script): its op dispatch is Python. "
            "Use torch.compile or torch.export instead, or torch.jit.trace, which records the "
            "registered op se_kernels::se_forward."
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
