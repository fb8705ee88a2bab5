"""Recognising the SE modules people already use, so they can become FusedSE losslessly.

Each supported flavour is described by the submodules that hold its parameters (carried over
as they are, at the same attribute paths, so state_dict keys and shapes do not change), the
paths of the reduce and expand layers inside them, and its activation and gate.

Supported (see README.md, "Use it on your model"):
  torchvision.ops.SqueezeExcitation                 efficientnet_*, efficientnet_v2_*,
                                                    mobilenet_v3_* (hardsigmoid), regnet_y_*
  timm.layers.squeeze_excite.SEModule               seresnet*, seresnext*, regnety_*, senet154 ...
  timm.models._efficientnet_blocks.SqueezeExcite    timm efficientnet*, mobilenetv3* ...
  timm.models.senet.SEModule                        legacy_seresnet*, legacy_senet154 ...
  senet.pytorch-style SELayer                       avg_pool + fc = Sequential(Linear, act, Linear, gate)

describe_attention (below) describes, for se_kernels.channel_attention.FusedChannelAttention (the
generic path: fused squeeze and scale, the excitation as the original's own layers), every
channel-attention module it recognises, FusedSE's flavours included:
  the flavours above with any activation, gate or
  norm layer, and timm SEModule with add_maxpool    rexnet* (BatchNorm), sedarknet21 (LeakyReLU) ...
  timm.layers.squeeze_excite.EffectiveSEModule      ese_vovnet*, rdnet*, ... (also with add_maxpool)
  timm.models.hgnet.EseModule                       hgnet*, hgnetv2*
  timm.layers.eca.EcaModule (also use_mlp)          ecaresnet*, nf_ecaresnet*, eca_* byobnets ...
  timm.layers.eca.CecaModule                        circular-padding ECA
  timm.layers.gather_excite.GatherExcite            with a global extent (extent=0, no gather convs)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .reference import ACTIVATIONS, GATES


class UnsupportedSE(ValueError):
    """An SE module of a known flavour with a feature FusedSE does not compute."""


@dataclass
class Flavour:
    kind: str
    holders: Dict[str, nn.Module]  # attribute name -> submodule carried over unchanged
    reduce_path: str  # dotted path of the C -> S layer (Conv2d 1x1 or Linear)
    expand_path: str  # dotted path of the S -> C layer
    activation: str
    gate: str


def _probe_function(module: nn.Module, names: Dict[str, Callable]) -> Optional[str]:
    """Which of the named functions `module` computes, checked on a grid of inputs (so timm's
    own Swish/HardSigmoid/... classes and in-place variants are recognised too)."""
    x = torch.linspace(-8.0, 8.0, 321, dtype=torch.float32)
    try:
        with torch.no_grad():
            y = module(x.clone())
    except Exception:  # noqa: BLE001 - a module that cannot run on a 1-D float tensor is not an activation
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    for name, fn in names.items():
        if torch.allclose(y.float(), fn(x), rtol=1e-6, atol=1e-6):
            return name
    return None


_EXACT = {
    nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid",
}


def _function_name(module: nn.Module, names: Dict[str, Callable], role: str, where: str) -> str:
    name = _EXACT.get(type(module))
    if type(module) is nn.GELU:
        name = "gelu" if module.approximate == "none" else None
    if name is None or name not in names:
        name = _probe_function(module, names)
    if name is None:
        raise UnsupportedSE(
            f"{where}: its {role} {type(module).__name__} is none of {', '.join(sorted(names))}"
        )
    return name


def _check_layer(layer: nn.Module, where: str, name: str) -> None:
    if isinstance(layer, nn.Conv2d):
        plain = (
            layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid")
            and layer.dilation == (1, 1) and layer.groups == 1
        )
        if not plain:
            raise UnsupportedSE(f"{where}: {name} is not a plain 1x1 convolution ({layer})")
    elif not isinstance(layer, nn.Linear):
        raise UnsupportedSE(f"{where}: {name} is a {type(layer).__name__}, not a Conv2d 1x1 or Linear")


def _torchvision_types():
    try:
        from torchvision.ops import SqueezeExcitation
    except ImportError:
        return ()
    return (SqueezeExcitation,)


def _timm_types():
    """(SEModule, efficientnet SqueezeExcite, legacy senet SEModule) of the installed timm."""
    found = [None, None, None]
    try:
        from timm.layers.squeeze_excite import SEModule

        found[0] = SEModule
    except ImportError:
        pass
    try:
        from timm.models._efficientnet_blocks import SqueezeExcite

        found[1] = SqueezeExcite
    except ImportError:
        pass
    try:
        from timm.models.senet import SEModule as LegacySEModule

        found[2] = LegacySEModule
    except ImportError:
        pass
    return found


def _conv_flavour(kind, module, reduce_name, expand_name, act, gate) -> Flavour:
    where = f"{type(module).__module__}.{type(module).__name__}"
    reduce, expand = getattr(module, reduce_name), getattr(module, expand_name)
    _check_layer(reduce, where, reduce_name)
    _check_layer(expand, where, expand_name)
    return Flavour(
        kind=kind,
        holders={reduce_name: reduce, expand_name: expand},
        reduce_path=reduce_name,
        expand_path=expand_name,
        activation=_function_name(act, ACTIVATIONS, "activation", where),
        gate=_function_name(gate, GATES, "gate", where),
    )


def _se_layer_structure(module: nn.Module) -> Optional[nn.Sequential]:
    """fc if `module` has exactly the children avg_pool (AdaptiveAvgPool2d(1)) and
    fc = Sequential(Linear(C, S), activation, Linear(S, C), gate), else None."""
    children = dict(module.named_children())
    if set(children) != {"avg_pool", "fc"}:
        return None
    pool, fc = children["avg_pool"], children["fc"]
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
        return None
    if not isinstance(fc, nn.Sequential) or len(fc) != 4:
        return None
    if not (isinstance(fc[0], nn.Linear) and isinstance(fc[2], nn.Linear)):
        return None
    return fc


def _se_layer_flavour(module: nn.Module) -> Optional[Flavour]:
    """A senet.pytorch-style SELayer: exactly the children avg_pool (AdaptiveAvgPool2d(1)) and
    fc = Sequential(Linear(C, S), activation, Linear(S, C), gate)."""
    fc = _se_layer_structure(module)
    if fc is None:
        return None
    where = f"{type(module).__module__}.{type(module).__name__} (SELayer)"
    return Flavour(
        kind="SELayer (senet.pytorch)",
        holders={"fc": fc},
        reduce_path="fc.0",
        expand_path="fc.2",
        activation=_function_name(fc[1], ACTIVATIONS, "activation", where),
        gate=_function_name(fc[3], GATES, "gate", where),
    )


def describe(module: nn.Module) -> Optional[Flavour]:
    """The flavour of an SE module; None if `module` is not one. Raises UnsupportedSE (a
    ValueError) naming the reason for SE modules with features FusedSE does not compute."""
    torchvision_se = _torchvision_types()
    if torchvision_se and isinstance(module, torchvision_se):
        return _conv_flavour("torchvision SqueezeExcitation", module, "fc1", "fc2", module.activation,
                             module.scale_activation)
    timm_se, timm_efficientnet_se, timm_legacy_se = _timm_types()
    if timm_se is not None and isinstance(module, timm_se):
        if module.add_maxpool:
            raise UnsupportedSE("timm SEModule with add_maxpool=True: its squeeze averages in a global max pool")
        if not isinstance(module.bn, nn.Identity):
            raise UnsupportedSE(
                f"timm SEModule with a norm layer ({type(module.bn).__name__}) between fc1 and the activation"
            )
        return _conv_flavour("timm SEModule", module, "fc1", "fc2", module.act, module.gate)
    if timm_efficientnet_se is not None and isinstance(module, timm_efficientnet_se):
        return _conv_flavour("timm SqueezeExcite", module, "conv_reduce", "conv_expand", module.act1, module.gate)
    if timm_legacy_se is not None and isinstance(module, timm_legacy_se):
        return _conv_flavour("timm senet SEModule", module, "fc1", "fc2", module.relu, module.sigmoid)
    return _se_layer_flavour(module)


# ---- the generic path: any excitation, run as the original's own layers -----------------------

POOLED_FORMS = ("nc11", "nc", "n1c")  # how the excitation sees the pooled vector: (N, C, 1, 1), (N, C), (N, 1, C)
PAD_CIRCULAR = "<pad circular>"  # an excitation step that is no child: F.pad(y, (padding, padding), "circular")


@dataclass
class AttentionFlavour:
    """A channel-attention module as squeeze -> excitation -> x * gate, the excitation being the
    original's own children applied in order (`steps`) to the pooled vector, viewed as `pooled`."""

    kind: str
    holders: Dict[str, nn.Module]  # every child of the original, carried over unchanged at its name
    squeeze: str  # "avg" | "avg_max" (timm's add_maxpool: 0.5 * mean + 0.5 * amax)
    pooled: str  # one of POOLED_FORMS
    steps: Tuple[str, ...]  # child names (or PAD_CIRCULAR), applied in order; the last gives the gates
    channels: Optional[int]  # C; None when the module takes any C (ECA: a convolution along the channels)
    padding: int = 0  # PAD_CIRCULAR's padding
    probe_channels: int = 16  # the C same_output tries when `channels` is None


def _attention_types() -> Dict[str, type]:
    """The channel-attention classes of timm, by short name, those whose timm module is loaded
    (a module of a class defined there cannot exist otherwise, and nothing is imported here)."""
    found: Dict[str, type] = {}
    places = {
        "EffectiveSEModule": "timm.layers.squeeze_excite",
        "SqueezeExciteCl": "timm.layers.squeeze_excite",
        "EseModule": "timm.models.hgnet",
        "EcaModule": "timm.layers.eca",
        "CecaModule": "timm.layers.eca",
        "GatherExcite": "timm.layers.gather_excite",
    }
    for name, place in places.items():
        cls = getattr(sys.modules.get(place), name, None)
        if isinstance(cls, type):
            found[name] = cls
    return found


def _in_channels(layer: nn.Module) -> Optional[int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return None


def _features(act: nn.Module, gate: nn.Module, norm: Optional[nn.Module] = None, add_maxpool: bool = False) -> str:
    """What makes an SE module FusedSE cannot take different: ' (add_maxpool, BatchNorm2d, LeakyReLU)'."""
    found = []
    if add_maxpool:
        found.append("add_maxpool")
    if norm is not None and not isinstance(norm, nn.Identity):
        found.append(type(norm).__name__)
    for role, fn, names in (("activation", act, ACTIVATIONS), ("gate", gate, GATES)):
        try:
            _function_name(fn, names, role, "")
        except UnsupportedSE:
            found.append(type(fn).__name__ if type(fn) is not nn.GELU else f"GELU(approximate={fn.approximate!r})")
    return f" ({', '.join(found)})" if found else ""


def _attention(kind, module, steps, *, squeeze="avg", pooled="nc11", channels=None, padding=0) -> AttentionFlavour:
    where = f"{type(module).__module__}.{type(module).__name__}"
    own = [n for n, t in list(module._parameters.items()) + list(module._buffers.items()) if t is not None]
    if own:
        raise UnsupportedSE(f"{where}: holds tensors of its own ({', '.join(own)}), not only in its children")
    holders = dict(module.named_children())
    for step in steps:
        if step != PAD_CIRCULAR and not isinstance(holders.get(step), nn.Module):
            raise UnsupportedSE(f"{where}: has no child module {step!r}")
    return AttentionFlavour(kind=kind, holders=holders, squeeze=squeeze, pooled=pooled, steps=tuple(steps),
                            channels=channels, padding=padding, probe_channels=max(16, 2 * padding + 1))


def describe_attention(module: nn.Module) -> Optional[AttentionFlavour]:
    """The generic (FusedChannelAttention) description of a channel-attention module; None if
    `module` is not one recognised. Raises UnsupportedSE naming the reason for a recognised
    class configured so that it is not a global squeeze -> excitation -> x * gate (e.g.
    GatherExcite with a spatial extent)."""
    torchvision_se = _torchvision_types()
    if torchvision_se and isinstance(module, torchvision_se):
        kind = "torchvision SqueezeExcitation" + _features(module.activation, module.scale_activation)
        return _attention(kind, module, ("fc1", "activation", "fc2", "scale_activation"),
                          channels=_in_channels(module.fc1))
    timm_se, timm_efficientnet_se, timm_legacy_se = _timm_types()
    if timm_se is not None and isinstance(module, timm_se):
        kind = "timm SEModule" + _features(module.act, module.gate, module.bn, module.add_maxpool)
        return _attention(kind, module, ("fc1", "bn", "act", "fc2", "gate"), channels=_in_channels(module.fc1),
                          squeeze="avg_max" if module.add_maxpool else "avg")
    if timm_efficientnet_se is not None and isinstance(module, timm_efficientnet_se):
        kind = "timm SqueezeExcite" + _features(module.act1, module.gate)
        return _attention(kind, module, ("conv_reduce", "act1", "conv_expand", "gate"),
                          channels=_in_channels(module.conv_reduce))
    if timm_legacy_se is not None and isinstance(module, timm_legacy_se):
        kind = "timm senet SEModule" + _features(module.relu, module.sigmoid)
        return _attention(kind, module, ("fc1", "relu", "fc2", "sigmoid"), channels=_in_channels(module.fc1))
    types = _attention_types()
    if "EffectiveSEModule" in types and isinstance(module, types["EffectiveSEModule"]):
        kind = "timm EffectiveSEModule" + (" (add_maxpool)" if module.add_maxpool else "")
        return _attention(kind, module, ("fc", "gate"), channels=_in_channels(module.fc),
                          squeeze="avg_max" if module.add_maxpool else "avg")
    if "EseModule" in types and isinstance(module, types["EseModule"]):
        return _attention("timm hgnet EseModule", module, ("conv", "sigmoid"), channels=_in_channels(module.conv))
    if "EcaModule" in types and isinstance(module, types["EcaModule"]):
        if module.conv2 is not None:
            return _attention("timm EcaModule (use_mlp)", module, ("conv", "act", "conv2", "gate"), pooled="n1c")
        return _attention("timm EcaModule", module, ("conv", "gate"), pooled="n1c")
    if "CecaModule" in types and isinstance(module, types["CecaModule"]):
        return _attention("timm CecaModule", module, (PAD_CIRCULAR, "conv", "gate"), pooled="n1c",
                          padding=int(module.padding))
    if "GatherExcite" in types and isinstance(module, types["GatherExcite"]):
        if module.gather is not None or module.extent != 0:
            raise UnsupportedSE(
                "timm GatherExcite with a spatial extent or gather convolutions: its gates vary over H, W "
                "(not a global squeeze)"
            )
        mlp = module.mlp
        channels = _in_channels(mlp.fc1) if hasattr(mlp, "fc1") else None
        kind = "timm GatherExcite" + (" (add_maxpool)" if module.add_maxpool else "")
        return _attention(kind, module, ("mlp", "gate"), channels=channels,
                          squeeze="avg_max" if module.add_maxpool else "avg")
    if "SqueezeExciteCl" in types and isinstance(module, types["SqueezeExciteCl"]):
        raise UnsupportedSE("timm SqueezeExciteCl: its input is channels-last (N, H, W, C), pooled over dims 1, 2")
    fc = _se_layer_structure(module)
    if fc is not None:
        kind = "SELayer (senet.pytorch)" + _features(fc[1], fc[3])
        return _attention(kind, module, ("fc",), pooled="nc", channels=fc[0].in_features)
    return None


def same_output(original: nn.Module, fused: nn.Module) -> bool:
    """Whether the two modules agree on a random input (with their parameters' device and
    dtype; a module without any, float32 on the CPU). Uses its own generator: the caller's
    random state is left as it was. `fused` is a FusedSE or a FusedChannelAttention: its
    `channels` gives the input's C (None: the module takes any C, e.g. ECA, and its
    `probe_channels` is used). The buffers (the running statistics of a BatchNorm inside,
    updated by both calls in train mode) are restored afterwards."""
    tensors = [t for t in list(original.parameters()) + list(original.buffers()) if t.is_floating_point()]
    if tensors and tensors[0].device.type == "meta":
        return True
    device, dtype = (tensors[0].device, tensors[0].dtype) if tensors else (torch.device("cpu"), torch.float32)
    channels = fused.channels if fused.channels is not None else getattr(fused, "probe_channels", 16)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, channels, 3, 3, generator=generator, device=device, dtype=torch.float32).to(dtype)
    buffers = {id(b): (b, b.clone()) for b in list(original.buffers()) + list(fused.buffers())}
    try:
        with torch.no_grad():
            expected, actual = original(x), fused(x)
    finally:
        with torch.no_grad():
            for b, saved in buffers.values():
                b.copy_(saved)
    if not isinstance(expected, torch.Tensor) or not isinstance(actual, torch.Tensor) or expected.shape != actual.shape:
        return False
    rtol, atol = (1e-4, 1e-5) if dtype in (torch.float32, torch.float64) else (2e-2, 2e-2)
    return torch.allclose(actual.float(), expected.float(), rtol=rtol, atol=atol)
