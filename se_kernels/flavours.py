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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

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


def _se_layer_flavour(module: nn.Module) -> Optional[Flavour]:
    """A senet.pytorch-style SELayer: exactly the children avg_pool (AdaptiveAvgPool2d(1)) and
    fc = Sequential(Linear(C, S), activation, Linear(S, C), gate)."""
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


def same_output(original: nn.Module, fused: nn.Module) -> bool:
    """Whether the two modules agree on a random input (with their parameters' device and
    dtype). Uses its own generator: the caller's random state is left as it was."""
    param = next(original.parameters(), None)
    if param is None or param.device.type == "meta":
        return True
    device, dtype = param.device, param.dtype
    channels = fused.channels
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, channels, 3, 3, generator=generator, device=device, dtype=torch.float32).to(dtype)
    with torch.no_grad():
        expected, actual = original(x), fused(x)
    if not isinstance(expected, torch.Tensor) or expected.shape != actual.shape:
        return False
    rtol, atol = (1e-4, 1e-5) if dtype in (torch.float32, torch.float64) else (2e-2, 2e-2)
    return torch.allclose(actual.float(), expected.float(), rtol=rtol, atol=atol)

