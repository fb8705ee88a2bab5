"""SE-ResNet models for the CIFAR-10 example and the model benchmarks (random weights)."""

from .resnet import (
    SEResNet,
    se_resnet18,
    se_resnet20,
    se_resnet32,
    se_resnet34,
    se_resnet50,
    se_resnet56,
    se_resnet110,
)

MODELS = {
    "se_resnet18": se_resnet18,
    "se_resnet20": se_resnet20,
    "se_resnet32": se_resnet32,
    "se_resnet34": se_resnet34,
    "se_resnet56": se_resnet56,
    "se_resnet110": se_resnet110,
    "se_resnet50": se_resnet50,
}

__all__ = ["MODELS", "SEResNet"] + sorted(MODELS)
