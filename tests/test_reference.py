"""The reference is torchvision's SqueezeExcitation plus the epilogue, and differentiable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ACTIVATIONS, GATES, Case, fresh_seed, make_inputs
from torch import nn

from se_kernels.reference import ReferenceSE, se_reference

torchvision = pytest.importorskip("torchvision")

TORCH_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "hardswish": nn.Hardswish}
TORCH_GATES = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
def test_matches_torchvision(activation, gate):
    tv = torchvision.ops.SqueezeExcitation(
        24, 6, activation=TORCH_ACTIVATIONS[activation], scale_activation=TORCH_GATES[gate]
    )
    ref = ReferenceSE(24, 6, activation=activation, gate=gate)
    ref.load_state_dict(tv.state_dict())
    x = torch.randn(3, 24, 5, 7)
    torch.testing.assert_close(ref(x), tv(x), rtol=0, atol=0)


def test_epilogue():
    case = Case((2, 8, 3, 3), 2, residual=True, out_activation="relu")
    t = make_inputs(case, torch.float64, fresh_seed())
    y = se_reference(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], residual=t["residual"], out_activation="relu")
    plain = se_reference(t["x"], t["w1"], t["b1"], t["w2"], t["b2"])
    torch.testing.assert_close(y, F.relu(plain + t["residual"]), rtol=0, atol=0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
def test_gradcheck(activation, gate):
    case = Case((2, 6, 3, 3), 2, activation, gate, True, True, "relu")
    t = make_inputs(case, torch.float64, fresh_seed())
    args = tuple(t[k].clone().requires_grad_() for k in ("x", "w1", "b1", "w2", "b2", "residual"))

    def fn(x, w1, b1, w2, b2, r):
        return se_reference(x, w1, b1, w2, b2, activation=activation, gate=gate, residual=r, out_activation="relu")

    assert torch.autograd.gradcheck(fn, args)
