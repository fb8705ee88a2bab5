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
from torch.nn.modules import module as _nn_module

from . import ops, reference
from .attention import CA_BACKENDS, _check_arguments, _resolve, fused_channel_attention
from .flavours import PAD_CIRCULAR, AttentionFlavour, UnsupportedSE, _function_name, describe_attention
from .reference import GATES

CA_MODULE_BACKENDS = ("auto",) + CA_BACKENDS
_OWN_NAMES = frozenset({"kind", "squeeze", "pooled", "steps", "padding", "channels", "probe_channels",
                        "out_activation", "backend", "_excitation", "_gate_probe"})


def _is_pointwise_conv(layer: nn.Module) -> bool:
    """A Conv2d that on a 1x1 map is exactly F.linear with its weight as (C_out, C_in): 1x1
    kernel, no padding, one group, and no hooks that calling it would run."""
    return (
        type(layer) is nn.Conv2d and layer.kernel_size == (1, 1) and layer.padding in ((0, 0), "valid")
        and layer.groups == 1 and layer.stride == (1, 1) and layer.dilation == (1, 1)
        and not (layer._forward_hooks or layer._forward_pre_hooks or _global_hooks())
    )


def _is_channel_conv1d(layer: nn.Module, length: int, device_type: str) -> bool:
    """ECA's convolution along the channels of a (N, 1, length) vector: a Conv1d from one
    channel to one, zero padding, stride and dilation 1, a kernel no longer than the padded
    vector, no hooks, outside autocast (which would run the convolution in a narrower dtype)."""
    return (
        type(layer) is nn.Conv1d and layer.in_channels == 1 and layer.out_channels == 1 and layer.groups == 1
        and layer.stride == (1,) and layer.dilation == (1,) and isinstance(layer.padding, tuple)
        and layer.padding_mode == "zeros" and length + 2 * layer.padding[0] >= layer.kernel_size[0]
        and not torch.is_autocast_enabled(device_type)
        and not (layer._forward_hooks or layer._forward_pre_hooks or _global_hooks())
    )


def _shifted_sum(y: torch.Tensor, layer: nn.Conv1d) -> torch.Tensor:
    """layer(y) for _is_channel_conv1d's layers as the sum of k shifted copies of the padded (N, 1,
    C) vector: oneDNN's one-channel convolution took 2.6x the time forward and 5x forward and
    backward on one CPU core at ECA's (32, 1, 2048), k = 7."""
    k, pad = layer.kernel_size[0], layer.padding[0]
    if pad:
        y = F.pad(y, (pad, pad))
    length = y.shape[-1] - k + 1
    weight = layer.weight.reshape(k)
    out = y[..., :length] * weight[0]
    for j in range(1, k):
        out = out + y[..., j:j + length] * weight[j]
    return out + layer.bias if layer.bias is not None else out


def _global_hooks() -> bool:
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)


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
        """The original's excitation: pooled (N, C) -> gates (N, C), through the same layers on
        the same view of the pooled vector as the original. A plain 1x1 Conv2d on the (N, C, 1, 1)
        view runs as the matrix product it is (F.linear on (N, C) with the weight viewed as
        (C_out, C_in), gradients reaching the same Parameter): the same sums, in another order,
        where oneDNN's convolution of a (32, 1024, 1, 1) tensor took 2.3x the GEMM's time on one
        CPU core (1.75 against 0.77 ms)."""
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
                continue
            layer = getattr(self, step)
            if y.dim() == 4 and y.shape[2:] == (1, 1) and _is_pointwise_conv(layer):
                weight = layer.weight.reshape(layer.out_channels, layer.in_channels)
                y = F.linear(y.reshape(n, -1), weight, layer.bias).reshape(n, layer.out_channels, 1, 1)
            elif y.dim() == 3 and y.shape[1] == 1 and _is_channel_conv1d(layer, y.shape[-1], y.device.type):
                y = _shifted_sum(y, layer)
            else:
                y = layer(y)
        return y.reshape(n, c)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self._eca_inference(x, residual)
        if y is not None:
            return y
        return fused_channel_attention(x, self._excitation, squeeze=self.squeeze, residual=residual,
                                       out_activation=self.out_activation, backend=self.backend)

    def _gate_name(self, gate: nn.Module) -> Optional[str]:
        """"sigmoid" or "hardsigmoid" if `gate` computes one of them (torch's or timm's classes,
        recognised by flavours' probe, once per gate object), else None."""
        cached = self.__dict__.get("_gate_probe")
        if cached is None or cached[0] is not gate:
            try:
                name = _function_name(gate, GATES, "gate", self.kind)
            except UnsupportedSE:
                name = None
            cached = (gate, name)
            object.__setattr__(self, "_gate_probe", cached)  # not a child, not in the state_dict
        return cached[1]

    def _eca_inference(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """ECA (timm EcaModule: a one-channel Conv1d, then a sigmoid or hard-sigmoid gate) where
        nothing needs a gradient, on the cpu backend, in float32/float64: one native op
        (se_kernels::ca_eca_forward) that pools, convolves and gates per sample and scales while
        the sample is still in cache, where the generic path's two passes read x twice. None
        where it does not apply (the generic path then runs)."""
        if self.steps != ("conv", "gate") or self.pooled != "n1c" or self.squeeze != "avg":
            return None
        if torch.compiler.is_compiling():
            return None
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float64) or x.dim() != 4:
            return None
        conv, gate = self.conv, self.gate
        params = (conv.weight,) + ((conv.bias,) if conv.bias is not None else ())
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)
                                        or (isinstance(residual, torch.Tensor) and residual.requires_grad)):
            return None
        if not (_is_channel_conv1d(conv, x.shape[1], x.device.type) and 2 * conv.padding[0] + 1 == conv.kernel_size[0]
                and all(p.dtype == x.dtype and p.device == x.device for p in params)):
            return None
        _check_arguments(x, self._excitation, self.squeeze, residual, self.out_activation, self.backend)
        if _resolve(self.backend, x.device.type) != "cpu" or gate._forward_hooks or gate._forward_pre_hooks:
            return None
        gate_name = self._gate_name(gate)
        if gate_name is None:
            return None
        x_k = ops.as_kernel_layout(x)
        residual_k = ops.like_layout(residual, x_k) if residual is not None else None
        weight = conv.weight.detach().reshape(-1).contiguous()
        bias = conv.bias.detach() if conv.bias is not None else None
        return torch.ops.se_kernels.ca_eca_forward(x_k, weight, bias, conv.padding[0], gate_name, residual_k,
                                                   self.out_activation == "relu")[0]

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
