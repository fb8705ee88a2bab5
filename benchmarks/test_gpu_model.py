"""Checks of benchmarks/gpu_model.py (no GPU): the floor arithmetic on a hand-computed shape,
the L2 re-read rule on both sides of the effective L2, and the script end to end."""

from __future__ import annotations

import gpu_model
from gpu_model import Device, Problem, Resources, predict
from shapes import Site

IMAGENET_56 = Site(32, 256, 56, 56, 16)  # x: 32 * 256 * 3136 float32 = 102,760,448 B
CIFAR_8 = Site(128, 256, 8, 8, 16)  # x: 128 * 256 * 64 float32 = 8,388,608 B


def test_floor_hand_computed():
    x = 32 * 256 * 56 * 56 * 4
    mask = 32 * 256 * 392  # a bit per pixel, each 3136-pixel row on 392 bytes
    assert x == 102_760_448 and mask == 3_211_264
    fwd = Problem(IMAGENET_56, "float32", "residual_relu", "forward")
    bwd = Problem(IMAGENET_56, "float32", "residual_relu", "backward")
    assert fwd.floor_bytes() == 3 * x + mask  # x, residual read; y, mask written
    assert bwd.floor_bytes() == 4 * x + mask  # dy, x, mask read; dx, d_residual written
    assert Problem(IMAGENET_56, "bfloat16", "none", "forward").floor_bytes() == x  # x + y at 2 B
    pred = predict(fwd, "triton", Device(), Resources.load())
    assert abs(pred.floor * 1e6 - (3 * x + mask) / 4.3e12 * 1e6) < 1e-9  # 72.44 us
    assert abs(pred.floor * 1e6 - 72.44) < 0.01


def _second_pass(p: Problem, backend: str):
    pred = predict(p, backend, Device(), Resources.load())
    second = [k for k in pred.kernels if k.name in ("scale", "grad_input")]  # the element-wise pass
    assert len(second) == 1, [k.name for k in pred.kernels]
    return pred, second[0]


def test_reread_hits_l2_only_when_it_fits():
    dev = Device()
    for backend in ("triton", "cuda"):
        # x + y = 16.8 MB <= 30 MB: the scale pass reads x from L2, writes y to HBM
        small = Problem(CIFAR_8, "float32", "none", "forward")
        assert small.reread_fits(dev)
        pred, scale = _second_pass(small, backend)
        assert pred.reread == "L2" and scale.name == "scale"
        assert scale.hbm == small.x_bytes and scale.l2 >= small.x_bytes
        assert pred.hbm_bytes == small.floor_bytes()
        # x + y = 205.5 MB: the whole re-read from HBM
        big = Problem(IMAGENET_56, "float32", "none", "forward")
        assert not big.reread_fits(dev)
        pred, scale = _second_pass(big, backend)
        assert pred.reread == "HBM" and scale.hbm == 2 * big.x_bytes and scale.l2 < big.x_bytes
        assert pred.hbm_bytes == big.floor_bytes() + big.x_bytes
        # backward: dy + x + dx + d_residual + mask = 33.8 MB > 30 MB: dy and the mask again from HBM
        back = Problem(CIFAR_8, "float32", "residual_relu", "backward")
        assert not back.reread_fits(dev)
        pred, grad_input = _second_pass(back, backend)
        assert grad_input.name == "grad_input" and pred.reread == "HBM"
        assert grad_input.hbm == 3 * back.x_bytes + back.mask_bytes  # dy, mask read; dx, d_residual written
        once = predict(back, backend, dev, Resources.load(), force_l2=True)
        assert once.hbm_bytes == back.floor_bytes() and once.seconds < pred.seconds


def test_script_end_to_end(tmp_path):
    out = tmp_path / "model.md"
    rc = gpu_model.main(["--out", str(out), "--check"])
    text = out.read_text()
    assert "## Summary" in text and "| triton |" in text and "| cuda |" in text
    assert "imagenet-se-resnet50@256" in text and "efficientnet-b0" in text
    assert rc == (1 if " MISS " in text else 0)
