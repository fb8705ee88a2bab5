"""FusedChannelAttention: any recognised channel-attention module on the generic fused path.

The squeeze (mean, or timm's add_maxpool mean + max) and the scale run as fused_channel_attention's
stage kernels; the excitation is the original module's own children, applied to the pooled vector
exactly as the original applies them (se_kernels.flavours.describe_attention says which, in which
order, on which view of the pooled vector). The children are carried over unchanged at their
attribute names: the state_dict (keys, shapes, buffers such as a BatchNorm's running statistics)
is the original's, and the Parameter objects are the same ones.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .attention import CA_BACKENDS, fused_channel_attention
from .flavours import PAD_CIRCULAR, AttentionFlavour, UnsupportedSE, describe_attention

CA_MODULE_BACKENDS = ("auto",) + CA_BACKENDS
_OWN_NAMES = frozenset({"kind", "squeeze", "pooled", "steps", "padding", "channels", "probe_channels",
                        "out_activation", "backend", "_excitation"})


class _Excitation(nn.Module):
    """What fused_channel_attention calls with the pooled (N, C) vector: the owner's excitation.

    fused_channel_attention takes the gradients of `excite.parameters()`: this module registers
    its owner as its one child, so its parameters are exactly the owner's (the carried-over ones),
    while the owner keeps it outside its own children (no second copy of any state_dict key, and
    model.modules() does not list it)."""

    def __init__(self, owner: "FusedChannelAttention") -> None:
        super().__init__()
        self.owner = owner

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.owner.excite(pooled)


class FusedChannelAttention(nn.Module):
    """A channel-attention block, out_activation(x * excite(squeeze(x)) + residual), with the
    squeeze and the scale fused (se_kernels.fused_channel_attention) and the excitation the
    original module's own layers.

    Build it with FusedChannelAttention.from_module(original) (or convert_se_modules, which
    prefers FusedSE where FusedSE computes the module). Recognised: see
    se_kernels.flavours.describe_attention (timm EffectiveSEModule, hgnet EseModule, EcaModule,
    CecaModule, GatherExcite with a global extent, and the SE flavours FusedSE takes, with any
    activation, gate or norm layer, and add_maxpool).

    forward(x, residual=None): x (N, C, H, W) -> (N, C, H, W).
    """

    channels: Optional[int]

    def __init__(self, flavour: AttentionFlavour, *, out_activation: Optional[str] = None,
                 backend: str = "auto") -> None:
        super().__init__()
        reference.check_option("out_activation", out_activation)
        if backend not in CA_MODULE_BACKENDS:
            raise ValueError(f"backend must be one of {CA_MODULE_BACKENDS}; got {backend!r}")
        clashes = [name for name in flavour.holders if name in _OWN_NAMES or hasattr(type(self), name)]
        if clashes:
            raise UnsupportedSE(f"{flavour.kind}: its children {clashes} would shadow FusedChannelAttention's "
                                "own attributes")
        for name, child in flavour.holders.items():
            self.add_module(name, child)
        self.kind = flavour.kind
        self.squeeze = flavour.squeeze
        self.pooled = flavour.pooled
        self.steps = flavour.steps
        self.padding = flavour.padding
        self.channels = flavour.channels
        self.probe_channels = flavour.probe_channels
        self.out_activation = out_activation
        self.backend = backend
        # not a child: see _Excitation
        object.__setattr__(self, "_excitation", _Excitation(self))

    @classmethod
    def from_module(cls, module: nn.Module, *, out_activation: Optional[str] = None,
                    backend: str = "auto") -> "FusedChannelAttention":
        """The FusedChannelAttention computing what `module` computes, holding `module`'s own
        children (shared, not copied) at their attribute names. Raises TypeError for a module
        that is not a recognised channel-attention module and ValueError (UnsupportedSE) naming
        the reason for a recognised class configured so that it is not one (e.g. GatherExcite
        with a spatial extent)."""
        flavour = describe_attention(module)
        if flavour is None:
            raise TypeError(
                f"FusedChannelAttention.from_module: {type(module).__module__}.{type(module).__name__} is not a "
                "recognised channel-attention module (see se_kernels.flavours.describe_attention)"
            )
        return cls(flavour, out_activation=out_activation, backend=backend)

    @classmethod
    def from_flavour(cls, flavour: AttentionFlavour, *, backend: str = "auto") -> "FusedChannelAttention":
        return cls(flavour, backend=backend)

    def excite(self, pooled: torch.Tensor) -> torch.Tensor:
        """The original's excitation: pooled (N, C) -> gates (N, C), through the same ops on the
        same view of the pooled vector as the original."""
        n, c = pooled.shape
        if self.pooled == "nc11":
            y = pooled.reshape(n, c, 1, 1)
        elif self.pooled == "n1c":
            y = pooled.reshape(n, 1, c)
        else:
            y = pooled
        for step in self.steps:
            if step == PAD_CIRCULAR:
                y = F.pad(y, (self.padding, self.padding), mode="circular")
            else:
                y = getattr(self, step)(y)
        return y.reshape(n, c)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_channel_attention(x, self._excitation, squeeze=self.squeeze, residual=residual,
                                       out_activation=self.out_activation, backend=self.backend)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "FusedChannelAttention does not support TorchScript (torch.jit.script): its op dispatch is Python. "
            "Use torch.compile or torch.export instead."
        )

    def extra_repr(self) -> str:
        steps = " -> ".join(f"pad_circular({self.padding})" if s == PAD_CIRCULAR else s for s in self.steps)
        text = f"kind={self.kind!r}, squeeze={self.squeeze!r}, excite={self.pooled}: {steps}"
        if self.out_activation is not None:
            text += f", out_activation={self.out_activation!r}"
        return text + f", backend={self.backend!r}"
