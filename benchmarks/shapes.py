"""Named sets of SE sites for the benchmarks (bench_se.py --shape-set NAME). A site is the input
shape (N, C, H, W), the squeeze width S, the activation/gate pair and how often it occurs in its
model. The efficientnet-b0 and mobilenet-v3-large sets are read from torchvision's models
(weights=None) by a forward hook on every torchvision.ops.SqueezeExcitation; identical sites are
merged and counted."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

REDUCTION = 16  # S = C // REDUCTION for the SE-ResNet sets and --shapes
MODEL_BATCH, MODEL_RESOLUTION = 32, 224  # of the ImageNet-sized sets
SWEEP_MAX_BYTES = 200e6  # sweep: no site whose float32 x is larger
ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu", nn.Hardswish: "hardswish"}
GATES = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}


@dataclass(frozen=True)
class Site:
    n: int
    c: int
    h: int
    w: int
    s: int
    activation: str = "relu"
    gate: str = "sigmoid"
    count: int = 1  # occurrences in the model the site comes from
    kind: str = "se"  # "se"; "eca" (Conv1d of kernel s over the pooled channels, sigmoid); "ese" (C -> C, hardsigmoid)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return self.n, self.c, self.h, self.w

    @property
    def label(self) -> str:
        suffix = {"se": f"{self.s}", "eca": f"eca{self.s}", "ese": "ese"}[self.kind]
        return f"{self.n}x{self.c}x{self.h}x{self.w}/{suffix}"


@dataclass(frozen=True)
class ShapeSet:
    name: str
    description: str
    sites: Tuple[Site, ...]
    model: Optional[str] = None  # the torchvision model the sites were derived from


def se_resnet_sites(n: int, stages: Iterable[Tuple[int, int]]) -> Tuple[Site, ...]:
    """One relu/sigmoid site per (C, H=W) stage, S = C // 16."""
    return tuple(Site(n, c, hw, hw, max(1, c // REDUCTION)) for c, hw in stages)


def custom_set(shapes: Sequence[Tuple[int, int, int, int]]) -> ShapeSet:
    """Relu/sigmoid sites with S = C // 16 for plain (N, C, H, W) shapes (bench_se.py --shapes)."""
    sites = tuple(Site(n, c, h, w, max(1, c // REDUCTION)) for n, c, h, w in shapes)
    return ShapeSet("custom", "--shapes " + " ".join(site.label for site in sites), sites)


def torchvision_set(name: str, model_name: str) -> ShapeSet:
    """The SE sites of torchvision.models.<model_name> at MODEL_BATCH, in order of first use."""
    import torchvision  # only the derived sets need it

    model, counts = getattr(torchvision.models, model_name)(weights=None).eval(), Counter()

    def record(module: nn.Module, args: Tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        activation, gate = ACTIVATIONS.get(type(module.activation)), GATES.get(type(module.scale_activation))
        if activation is None or gate is None:
            raise ValueError(f"{model_name}: SE module with {module.activation} / {module.scale_activation}, "
                             "which se_kernels does not compute")
        counts[(*args[0].shape[1:], module.fc1.out_channels, activation, gate)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, torchvision.ops.SqueezeExcitation)]
    with torch.no_grad():
        model(torch.zeros(1, 3, MODEL_RESOLUTION, MODEL_RESOLUTION))
    for hook in hooks:
        hook.remove()
    if not counts:
        raise ValueError(f"{model_name}: no torchvision.ops.SqueezeExcitation module ran")
    return ShapeSet(name, f"SE sites of torchvision {model_name} at batch {MODEL_BATCH}, {MODEL_RESOLUTION}x"
                          f"{MODEL_RESOLUTION} input (derived by forward hooks)",
                    tuple(Site(MODEL_BATCH, c, h, w, s, act, gate, count)
                          for (c, h, w, s, act, gate), count in counts.items()), model=model_name)


def timm_attention_set(name: str, model_name: str) -> ShapeSet:
    """The ECA / ESE sites of timm's <model_name> at MODEL_BATCH (forward hooks, random weights).
    EffectiveSEModule (hard sigmoid) and hgnet's EseModule (sigmoid) are both "ese" sites."""
    import timm
    from timm.layers.eca import EcaModule
    from timm.layers.squeeze_excite import EffectiveSEModule
    from timm.models.hgnet import EseModule

    model, counts = timm.create_model(model_name).eval(), Counter()

    def record(module: nn.Module, args: Tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        if isinstance(module, EcaModule):
            key = ("eca", module.conv.kernel_size[0], "sigmoid")
        else:
            gate = "sigmoid" if isinstance(module, EseModule) else "hardsigmoid"
            key = ("ese", args[0].shape[1], gate)
        counts[(*args[0].shape[1:], *key)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, (EcaModule, EffectiveSEModule, EseModule))]
    with torch.no_grad():
        model(torch.zeros(1, 3, MODEL_RESOLUTION, MODEL_RESOLUTION))
    for hook in hooks:
        hook.remove()
    return ShapeSet(name, f"channel-attention sites of timm {model_name} at batch {MODEL_BATCH}, "
                          f"{MODEL_RESOLUTION}x{MODEL_RESOLUTION} input (forward hooks)",
                    tuple(Site(MODEL_BATCH, c, h, w, s, "relu", gate, count, kind)
                          for (c, h, w, kind, s, gate), count in counts.items()), model=model_name)


CIFAR_STAGES = [(64, 32), (128, 16), (256, 8), (512, 4)]
# name -> builder (lazy: the derived sets build a torchvision model)
SHAPE_SETS: Dict[str, Callable[[], ShapeSet]] = {
    "cpu-quick": lambda: ShapeSet(
        "cpu-quick", "SE-ResNet CIFAR stages at batch 128 + 8x256x56x56 (the CPU default)",
        se_resnet_sites(128, CIFAR_STAGES) + (Site(8, 256, 56, 56, 16),)),
    "cifar-se-resnet18": lambda: ShapeSet(
        "cifar-se-resnet18", "SE-ResNet-18 CIFAR stages at batch 128", se_resnet_sites(128, CIFAR_STAGES)),
    "imagenet-se-resnet50": lambda: ShapeSet(
        "imagenet-se-resnet50", f"SE-ResNet-50 ImageNet stages at batch {MODEL_BATCH}",
        se_resnet_sites(MODEL_BATCH, [(256, 56), (512, 28), (1024, 14), (2048, 7)])),
    "efficientnet-b0": lambda: torchvision_set("efficientnet-b0", "efficientnet_b0"),
    "mobilenet-v3-large": lambda: torchvision_set("mobilenet-v3-large", "mobilenet_v3_large"),
    "ecaresnet50d": lambda: timm_attention_set("ecaresnet50d", "ecaresnet50d"),
    "ese-vovnet39b": lambda: timm_attention_set("ese-vovnet39b", "ese_vovnet39b"),
    "hgnet-tiny": lambda: timm_attention_set("hgnet-tiny", "hgnet_tiny"),
    "sweep": lambda: ShapeSet(
        "sweep", f"N={MODEL_BATCH}, C in 64/256/1024 x H=W in 1/7/14/28/56, float32 x <= 200 MB",
        se_resnet_sites(MODEL_BATCH, [(c, hw) for c in (64, 256, 1024) for hw in (1, 7, 14, 28, 56)
                                      if MODEL_BATCH * c * hw * hw * 4 <= SWEEP_MAX_BYTES])),
}


def shape_set(name: str) -> ShapeSet:
    return SHAPE_SETS[name]()
