"""SE-ResNets: the CIFAR nets of the SENet paper's CIFAR experiments (He et al.'s 3-stage
ResNet-20/32/56/110 and the 4-stage ResNet-18/34 with a 3x3 stem) and the ImageNet
SE-ResNet-50, each with SE in every residual block.

se="fused": the SE block, the residual add and the ReLU of a block are one FusedSE call with
the epilogue (relu(x * g + shortcut)); se="reference": the same with the unfused ReferenceSE
(identical parameters and state_dict keys, so checkpoints move between the two); se=None: the
same network without SE (relu(x + shortcut)), for measuring what SE costs.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import FusedSE
from ..reference import ReferenceSE, SEBase

SE_KINDS = ("fused", "reference", None)


def make_se(kind: Optional[str], channels: int, reduction: int) -> Optional[nn.Module]:
    """The SE module that also does a block's residual add and ReLU, or None."""
    if kind not in SE_KINDS:
        raise ValueError(f"se must be one of {SE_KINDS}; got {kind!r}")
    if kind is None:
        return None
    cls = FusedSE if kind == "fused" else ReferenceSE
    return cls(channels, reduction=reduction, out_activation="relu")


def add_relu(out: torch.Tensor, shortcut: torch.Tensor, se: Optional[nn.Module]) -> torch.Tensor:
    """relu(se(out) + shortcut), fused into the SE call when there is one."""
    return se(out, residual=shortcut) if se is not None else F.relu(out + shortcut)


def projection(in_planes: int, planes: int, stride: int) -> nn.Module:
    """The shortcut: identity, or a strided 1x1 convolution + BN where the shape changes."""
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, se: Optional[str], reduction: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = make_se(se, planes, reduction)
        self.shortcut = projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return add_relu(out, self.shortcut(x), self.se)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, se: Optional[str], reduction: int):
        super().__init__()
        width, out_planes = planes, planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)  # stride on the 3x3
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.se = make_se(se, out_planes, reduction)
        self.shortcut = projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return add_relu(out, self.shortcut(x), self.se)


class SEResNet(nn.Module):
    """A ResNet whose blocks end in SE + residual add + ReLU.

    stem: "cifar" (3x3 conv, stride 1) or "imagenet" (7x7 conv, stride 2, 3x3 max pool).
    widths/depths: channels (before expansion) and blocks per stage; stage i > 0 halves the map.
    """

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        depths: Sequence[int],
        widths: Sequence[int],
        *,
        stem: str = "cifar",
        num_classes: int = 10,
        reduction: int = 16,
        se: Optional[str] = "fused",
    ):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
            )
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet'; got {stem!r}")
        in_planes = widths[0]
        stages: List[nn.Module] = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_planes, width, stride, se, reduction))
                in_planes = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        # He initialisation for the network's convolutions; the SE layers keep nn.Conv2d's
        # default, as torchvision's SqueezeExcitation does.
        in_se = {id(c) for m in self.modules() if isinstance(m, SEBase) for c in m.modules()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in in_se:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _cifar3(depth: int, **kwargs) -> SEResNet:
    if (depth - 2) % 6:
        raise ValueError(f"3-stage CIFAR ResNets have depth 6n + 2; got {depth}")
    n = (depth - 2) // 6
    return SEResNet(BasicBlock, [n, n, n], [16, 32, 64], stem="cifar", **kwargs)


def se_resnet20(num_classes: int = 10, reduction: int = 16, se: Optional[str] = "fused") -> SEResNet:
    return _cifar3(20, num_classes=num_classes, reduction=reduction, se=se)


def se_resnet32(num_classes: int = 10, reduction: int = 16, se: Optional[str] = "fused") -> SEResNet:
    return _cifar3(32, num_classes=num_classes, reduction=reduction, se=se)


def se_resnet56(num_classes: int = 10, reduction: int = 16, se: Optional[str] = "fused") -> SEResNet:
    return _cifar3(56, num_classes=num_classes, reduction=reduction, se=se)


def se_resnet110(num_classes: int = 10, reduction: int = 16, se: Optional[str] = "fused") -> SEResNet:
    return _cifar3(110, num_classes=num_classes, reduction=reduction, se=se)


def se_resnet18(num_classes: int = 10, reduction: int = 16, se: Optional[str] = "fused") -> SEResNet:
    return SEResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], stem="cifar", num_classes=num_classes,
                    reduction=reduction, se=se)


def se_resnet34(num_classes: int = 10, reduction: int = 16, se: Optional[str] = "fused") -> SEResNet:
    return SEResNet(BasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], stem="cifar", num_classes=num_classes,
                    reduction=reduction, se=se)


def se_resnet50(num_classes: int = 1000, reduction: int = 16, se: Optional[str] = "fused") -> SEResNet:
    """The ImageNet SE-ResNet-50 (224x224 inputs): bottleneck blocks [3, 4, 6, 3]."""
    return SEResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], stem="imagenet", num_classes=num_classes,
                    reduction=reduction, se=se)
