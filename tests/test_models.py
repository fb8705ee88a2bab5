"""se_kernels.models: every SE-ResNet builds in its three variants, the fused and reference
variants are the same network (keys, initial weights, outputs, gradients)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from se_kernels import FusedSE
from se_kernels.models import MODELS
from se_kernels.reference import ReferenceSE


@pytest.mark.parametrize("name", sorted(MODELS))
def test_variants(name):
    size = 64 if name == "se_resnet50" else 32
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    results = {}
    for se in ("fused", "reference", None):
        torch.manual_seed(0)
        model = MODELS[name](se=se).double()
        y = model(x)
        y.square().sum().backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        results[se] = (model, y, grads)
    fused, reference, plain = (results[k][0] for k in ("fused", "reference", None))
    assert all(isinstance(b.se, FusedSE) for b in fused.stages.modules() if hasattr(b, "se"))
    assert all(isinstance(b.se, ReferenceSE) for b in reference.stages.modules() if hasattr(b, "se"))
    assert fused.state_dict().keys() == reference.state_dict().keys()
    assert not any(".se." in k for k in plain.state_dict())
    assert rel_err(results["fused"][1], results["reference"][1]) < 1e-10
    for k, g in results["reference"][2].items():
        assert rel_err(results["fused"][2][k], g) < 1e-9, k


def test_se_resnet50_size():
    # the paper's SE-ResNet-50 has ~28.1M parameters against ResNet-50's ~25.6M
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(MODELS["se_resnet50"]()) == 28_088_024
    assert count(MODELS["se_resnet50"](se=None)) == 25_557_032


def test_bad_se_kind():
    with pytest.raises(ValueError, match="se must be one of"):
        MODELS["se_resnet20"](se="squeeze")
