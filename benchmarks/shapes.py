"""Named sets of SE sites for benchmarks/bench_se.py (`--shape-set NAME`).

A site is one place an SE block runs: the input shape (N, C, H, W), the squeeze width S and
the activation/gate pair, plus how many times it occurs in the model it comes from.

    cpu-quick             the default on CPU: SE-ResNet CIFAR stages at batch 128 plus one
                          large-map, small-batch shape (the README's numbers use it)
    cifar-se-resnet18     SE-ResNet-18 on CIFAR-10 at batch 128: C 64/128/256/512 at 32/16/8/4
    imagenet-se-resnet50  SE-ResNet-50 on ImageNet at batch 32: C 256..2048 at 56..7
    efficientnet-b0       the SE sites of torchvision's efficientnet_b0 at batch 32, 224x224
    mobilenet-v3-large    the SE sites of torchvision's mobilenet_v3_large at batch 32, 224x224
    sweep                 N=32, C in {64, 256, 1024} x H*W in {1, 7x7, 14x14, 28x28, 56x56}

The two torchvision sets are derived, not typed in: the model is built (weights=None), run
once on a (1, 3, 224, 224) input with a forward hook on every torchvision.ops.SqueezeExcitation
recording C, H, W, S (= fc1.out_channels) and the activation/gate classes; identical sites are
merged and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

REDUCTION = 16  # S = C // REDUCTION for the SE-ResNet sets and --shapes
MODEL_BATCH = 32  # batch of the ImageNet-sized sets
MODEL_RESOLUTION = 224
SWEEP_MAX_BYTES = 200e6  # sweep: skip sites whose float32 x is larger than this

# torchvision's activation / gate classes -> se_kernels' names
TORCHVISION_ACTIVATIONS: Dict[type, str] = {
    nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu", nn.Hardswish: "hardswish",
}
TORCHVISION_GATES: Dict[type, str] = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}


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

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return self.n, self.c, self.h, self.w

    @property
    def label(self) -> str:
        """NxCxHxW/S"""
        return f"{self.n}x{self.c}x{self.h}x{self.w}/{self.s}"


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
    """The set "custom" of relu/sigmoid sites with S = C // 16 for plain (N, C, H, W) shapes
    (bench_se.py --shapes)."""
    sites = tuple(Site(n, c, h, w, max(1, c // REDUCTION)) for n, c, h, w in shapes)
    return ShapeSet("custom", "--shapes " + " ".join(site.label for site in sites), sites)


def torchvision_se_sites(model_name: str, batch: int = MODEL_BATCH,
                         resolution: int = MODEL_RESOLUTION) -> Tuple[Site, ...]:
    """The SE sites of torchvision.models.<model_name>, at `batch`, in order of first use,
    each with the number of SqueezeExcitation modules that see it."""
    import torchvision  # only the derived sets need it

    model = getattr(torchvision.models, model_name)(weights=None).eval()
    counts: Counter = Counter()

    def record(module: nn.Module, args: Tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        _, c, h, w = args[0].shape
        activation = TORCHVISION_ACTIVATIONS.get(type(module.activation))
        gate = TORCHVISION_GATES.get(type(module.scale_activation))
        if activation is None or gate is None:
            raise ValueError(f"{model_name}: SE module with {module.activation} / "
                             f"{module.scale_activation}, which se_kernels does not compute")
        counts[(c, h, w, module.fc1.out_channels, activation, gate)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, torchvision.ops.SqueezeExcitation)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, resolution, resolution))
    finally:
        for hook in hooks:
            hook.remove()
    if not counts:
        raise ValueError(f"{model_name}: no torchvision.ops.SqueezeExcitation module ran")
    return tuple(Site(batch, c, h, w, s, act, gate, count)
                 for (c, h, w, s, act, gate), count in counts.items())


def sweep_sites() -> Tuple[Site, ...]:
    return tuple(Site(MODEL_BATCH, c, hw, hw, c // REDUCTION)
                 for c in (64, 256, 1024) for hw in (1, 7, 14, 28, 56)
                 if MODEL_BATCH * c * hw * hw * 4 <= SWEEP_MAX_BYTES)


def _torchvision_set(name: str, model_name: str) -> Callable[[], ShapeSet]:
    def build() -> ShapeSet:
        return ShapeSet(name, f"SE sites of torchvision {model_name} at batch {MODEL_BATCH}, "
                              f"{MODEL_RESOLUTION}x{MODEL_RESOLUTION} input (derived by forward hooks)",
                        torchvision_se_sites(model_name), model=model_name)
    return build


# name -> builder (lazy: the derived sets build a torchvision model)
SHAPE_SETS: Dict[str, Callable[[], ShapeSet]] = {
    "cpu-quick": lambda: ShapeSet(
        "cpu-quick", "SE-ResNet CIFAR stages at batch 128 + 8x256x56x56 (the CPU default)",
        se_resnet_sites(128, [(64, 32), (128, 16), (256, 8), (512, 4)]) + (Site(8, 256, 56, 56, 16),)),
    "cifar-se-resnet18": lambda: ShapeSet(
        "cifar-se-resnet18", "SE-ResNet-18 CIFAR stages at batch 128",
        se_resnet_sites(128, [(64, 32), (128, 16), (256, 8), (512, 4)])),
    "imagenet-se-resnet50": lambda: ShapeSet(
        "imagenet-se-resnet50", f"SE-ResNet-50 ImageNet stages at batch {MODEL_BATCH}",
        se_resnet_sites(MODEL_BATCH, [(256, 56), (512, 28), (1024, 14), (2048, 7)])),
    "efficientnet-b0": _torchvision_set("efficientnet-b0", "efficientnet_b0"),
    "mobilenet-v3-large": _torchvision_set("mobilenet-v3-large", "mobilenet_v3_large"),
    "sweep": lambda: ShapeSet(
        "sweep", f"N={MODEL_BATCH}, C in 64/256/1024 x H=W in 1/7/14/28/56, float32 x <= 200 MB",
        sweep_sites()),
}


def shape_set(name: str) -> ShapeSet:
    return SHAPE_SETS[name]()
