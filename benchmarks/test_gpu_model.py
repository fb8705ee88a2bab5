"""Checks of benchmarks/gpu_model.py (no GPU): the floor arithmetic on a hand-computed shape,
the L2 re-read rule on both sides of the effective L2, and the script end to end."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import gpu_model
import pytest
from gpu_model import Device, Problem, Resources, predict
from shapes import Site

ROOT = Path(__file__).resolve().parent.parent
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
    # the element-wise pass (CUDA flat tiles on 8x8 maps: flat_scale, flat_grad_input)
    second = [k for k in pred.kernels if k.name.replace("flat_", "") in ("scale", "grad_input")]
    assert len(second) == 1, [k.name for k in pred.kernels]
    return pred, second[0]


def test_reread_hits_l2_only_when_it_fits():
    """The split plans re-read x from L2 only if everything the batch touches fits; where it does
    not, the streamed plans run (both backends, HBM bytes = the floor's), except where they cannot
    (CUDA: 7x7 rows, not a multiple of the 16-byte vector, with C no multiple of it either: no flat
    tiles), and there the re-read is HBM."""
    dev = Device()
    for backend in ("triton", "cuda"):
        # x + y = 16.8 MB <= 30 MB: the scale pass reads x from L2, writes y to HBM
        small = Problem(CIFAR_8, "float32", "none", "forward")
        assert small.reread_fits(dev)
        pred, scale = _second_pass(small, backend)
        assert pred.reread == "L2" and scale.name.replace("flat_", "") == "scale"
        assert scale.hbm == small.x_bytes and scale.l2 >= small.x_bytes
        assert pred.hbm_bytes == small.floor_bytes()
        # x + y = 205.5 MB; backward dy + x + dx + d_residual + mask = 33.8 MB > 30 MB
        for big in (Problem(IMAGENET_56, "float32", "none", "forward"),
                    Problem(CIFAR_8, "float32", "residual_relu", "backward")):
            assert not big.reread_fits(dev)
            pred = predict(big, backend, dev, Resources.load())
            assert pred.reread == "L2 (streamed)" and pred.hbm_bytes == big.floor_bytes(), backend
    odd = Problem(Site(256, 2050, 7, 7, 128), "float32", "residual_relu", "backward")
    pred, grad_input = _second_pass(odd, "cuda")
    assert grad_input.name == "grad_input" and pred.reread == "HBM"
    assert grad_input.hbm == 3 * odd.x_bytes + odd.mask_bytes  # dy, mask read; dx, d_residual written
    once = predict(odd, "cuda", dev, Resources.load(), force_l2=True)
    assert once.hbm_bytes == odd.floor_bytes() and once.seconds < pred.seconds


def test_cuda_streams_where_the_split_plan_would_miss():
    """CUDA: the streamed plan wherever the split plan's re-read would miss and the 16-byte paths
    or flat tiles apply; its HBM bytes are the floor's. 7x7 rows (49 pixels) stream on flat tiles
    where C is a multiple of the vector width, and keep the split plan where it is not."""
    dev, backend = Device(), "cuda"
    for direction in ("forward", "backward"):
        # CIFAR_8 backward: 33.8 MB touched (the forward's 25.4 MB fit: split plan, L2 re-read)
        for site in (IMAGENET_56, CIFAR_8) if direction == "backward" else (IMAGENET_56,):
            p = Problem(site, "float32", "residual_relu", direction)
            pred = predict(p, backend, dev, Resources.load())
            names = [k.name for k in pred.kernels]
            assert names[0] == "streamed" and pred.reread == "L2 (streamed)", names
            assert pred.hbm_bytes == p.floor_bytes()
            assert (direction == "backward") == ("weight_grads" in names)
        flat = Problem(Site(256, 2048, 7, 7, 128), "float32", "none", direction)
        pred = predict(flat, backend, dev, Resources.load())
        assert pred.reread == "L2 (streamed)" and pred.hbm_bytes == flat.floor_bytes()
        assert gpu_model.cuda_flat(flat) == (20, 103)  # se_tiles.h make_flat_tiles: 980-element tiles
        odd = Problem(Site(256, 2050, 7, 7, 128), "float32", "none", direction)
        assert not odd.reread_fits(dev) and gpu_model.cuda_flat(odd) is None
        assert predict(odd, backend, dev, Resources.load()).reread == "HBM"


def test_pipeline_bound():
    """A round takes max(a group's bandwidth time, chain / lag); the first chain is exposed as
    far as the reads claimed meanwhile do not cover it."""
    assert gpu_model.pipelined(10.0, "HBM", 10, 4, 2.0) == (10.0, "HBM")  # chain 2 <= 4 x 1 / 2
    seconds, bound = gpu_model.pipelined(10.0, "HBM", 10, 2, 4.0)  # chain / lag = 2 > 1 a group
    assert bound == "pipeline" and abs(seconds - (10 * 2.0 + (4.0 - 2 * 1.0 / 2))) < 1e-12


def test_stream_schedule_is_the_kernels(tmp_path):
    """The schedule the model uses (se_kernels/triton/launch.py stream_schedule, also the Triton
    streamed plan's) against csrc/cuda/se_stream.h's make_schedule, compiled for the host
    (tests/cpp/stream_host.cpp), on every site of the model and on edge cases."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    lib_path = tmp_path / "stream_host.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-pthread",
                    str(ROOT / "tests" / "cpp" / "stream_host.cpp"), "-o", str(lib_path)], check=True)
    lib = ctypes.CDLL(str(lib_path))
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib.se_stream_schedule.argtypes = [i64p, i64p]
    shapes = [(9, 1000, 8000, 1, 1, 1, 1), (8, 1000, 8000, 1, 1, 1, 1), (100, 1000, 3999, 1, 1, 1, 1),
              (1000, 1000, 77000, 3, 2, 5, 40)]
    dev = Device()
    for _, sites in gpu_model.shape_sets():
        for site in sites:
            for dtype in gpu_model.DTYPES:
                p = Problem(site, dtype, "residual_relu", "forward")
                splits, _ = gpu_model.stream_splits(site.h * site.w, p.elem)
                l, width = site.h * site.w, 16 // p.elem
                shapes.append((site.n, p.kept_bytes() // site.n, int(dev.l2_effective),
                               -(-site.c // 8) * splits, -(-site.s // 32), -(-site.c // 32),
                               site.c * -(-l // (32 * gpu_model.CUDA_STEPS_IN_FLIGHT * width))))
                flat = gpu_model.cuda_flat(p)
                if flat is not None:  # the flat tiles' schedule: pool and apply items of 8 warps' tiles
                    shapes.append((site.n, p.kept_bytes() // site.n, int(dev.l2_effective), flat[1],
                                   -(-site.s // 32), -(-site.c // 32), flat[1], 8))
    streamed = 0
    for shape in shapes:
        out = (ctypes.c_int64 * 12)()
        pool_item = 8 if len(shape) == 8 else 1
        applies = lib.se_stream_schedule((ctypes.c_int64 * 9)(*shape[:7], 8, pool_item), out)
        model = gpu_model.launch.stream_schedule(*shape[:7], 8, per_pool_item=pool_item)
        assert (model is not None) == bool(applies), shape
        if model is not None:
            streamed += 1
            v = list(out)
            assert (model["group"], model["groups"], model["per"], model["lag"]) == (v[0], v[1], v[2:6], v[6:10]), shape
    assert streamed >= 10


@pytest.mark.parametrize("epilogue, direction, x_passes, ops", [
    # mean reads x; mul reads x, writes y
    ("none", "forward", 3, ["mean", "convolution", "relu", "convolution", "sigmoid", "mul"]),
    # + add (reads y, the residual, writes), relu (reads, writes)
    ("residual_relu", "forward", 8, ["mean", "convolution", "relu", "convolution", "sigmoid", "mul", "add", "relu"]),
    # dy*gate (2), dy*x (3), sum (1), mean's backward divides an expanded tensor into a full one
    # (1), add (3); no copy: the gradient is taken over, not copied
    ("none", "backward", 10, ["mul", "mul", "sum", "sigmoid_backward", "convolution_backward",
                              "threshold_backward", "convolution_backward", "div", "add"]),
    # + relu's backward first (reads dy and the output, writes)
    ("residual_relu", "backward", 13, ["threshold_backward", "mul", "mul", "sum", "sigmoid_backward",
                                       "convolution_backward", "threshold_backward", "convolution_backward",
                                       "div", "add"]),
])
def test_eager_trace_hand_counted(epilogue, direction, x_passes, ops):
    """The traced eager ops and their HBM bytes, counted by hand: at 102 MB no two ops fit the L2
    together, so every full-size read and write goes to HBM."""
    p = Problem(IMAGENET_56, "float32", epilogue, direction)
    traced = gpu_model.eager_ops(p)
    assert [name.split(".")[1] for name, _, _ in traced] == ops
    eager = gpu_model.predict_eager(p, Device())
    x = 32 * 256 * 56 * 56 * 4
    assert eager.ops == len(ops)
    assert x_passes * x <= eager.hbm_bytes < x_passes * x + 0.01 * x  # + the (N, C) tensors and weights
    assert eager.seconds > eager.hbm_bytes / Device().hbm_bw


def test_eager_small_ops_hit_l2():
    """On a small site the ops from mean to mul fit the L2 together: mul's read of x (mean read it
    four ops before) is an L2 hit; y's write is not."""
    p = Problem(CIFAR_8, "float32", "none", "forward")
    x = 128 * 256 * 64 * 4
    eager = gpu_model.predict_eager(p, Device())
    small = 3 * 128 * 256 * 4 + 2 * 128 * 16 * 4 + 2 * 16 * 256 * 4 + (16 + 256) * 4  # (N, C), (N, S), weights
    assert eager.hbm_bytes == 2 * x + small  # mean's read of x, mul's write of y


def test_script_end_to_end(tmp_path):
    out = tmp_path / "model.md"
    rc = gpu_model.main(["--out", str(out), "--check"])
    text = out.read_text()
    assert "## Summary" in text and "| triton |" in text and "| cuda |" in text
    assert "imagenet-se-resnet50@256" in text and "efficientnet-b0" in text
    assert rc == (1 if " MISS " in text else 0)
    assert "## Against eager PyTorch (model)" in text and "reach 3x eager" in text
