"""The CUDA kernels' index math and per-element math, on the host: csrc/cuda/se_tiles.h holds
them as __host__ __device__ functions; tests/cpp/tiles_host.cpp compiles that header with the
host C++ compiler (no GPU, no CUDA toolkit) and walks every (block, warp, lane, step) of the
element-wise launches (scale_kernel, grad_input_kernel) exactly as the kernels do. Checked: each
output element written exactly once, every access inside its row and tile, vector accesses
aligned, each element's gate index that of its (sample, channel), each relu-mask byte written
exactly once from the 8 elements it holds; the same for the flat tiles of short NCHW rows
(se_walk_flat: rows, the relu-bit image, the multiply-high division); and the per-element math
against the float64 reference."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from se_kernels.reference import ACTIVATION_GRADS, ACTIVATIONS, GATE_GRADS, GATES
from se_kernels.triton.launch import ACTIVATION_CODES, GATE_CODES  # = csrc/se_options.h's Act, Gate

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cpp" / "tiles_host.cpp"
WIDTHS = {"float32": 4, "bfloat16": 8, "float64": 2}  # 16 bytes of each


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    out = tmp_path_factory.mktemp("tiles") / "tiles_host.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", str(SOURCE), "-o",
                    str(out)], check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(out))
    i64 = ctypes.c_int64
    lib.se_walk.argtypes = [i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64,
                            ctypes.POINTER(i64), ctypes.c_char_p, ctypes.c_int]
    lib.se_walk.restype = ctypes.c_int
    lib.se_walk_flat.argtypes = [i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64,
                                 ctypes.POINTER(i64), ctypes.c_char_p, ctypes.c_int]
    lib.se_walk_flat.restype = ctypes.c_int
    lib.se_flat_division.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.se_flat_division.restype = ctypes.c_int
    lib.se_flat_plan.argtypes = [i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(i64),
                                 ctypes.POINTER(i64)]
    lib.se_flat_plan.restype = ctypes.c_int
    dptr = ctypes.POINTER(ctypes.c_double)
    lib.se_math.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, dptr, dptr, dptr, dptr]
    lib.se_math.restype = None
    return lib


def walk(lib, n, c, l, pixel_rows, width, vector, reversed_=True, first=-1, last=0):
    msg = ctypes.create_string_buffer(256)
    blocks = ctypes.c_int64()
    rc = lib.se_walk(n, c, l, int(pixel_rows), width, int(vector), int(reversed_), first, last,
                     ctypes.byref(blocks), msg, len(msg))
    assert rc == 0, f"(N, C, L) = ({n}, {c}, {l}) pixel_rows={pixel_rows} width={width} vector={vector}: " \
                    f"{msg.value.decode()}"
    return blocks.value


SHAPES = [(1, 1, 1), (3, 5, 7), (2, 24, 49), (2, 13, 196), (1, 8, 1), (3, 2048, 1), (2, 3, 100003),
          (2, 64, 3136), (4, 1000, 12), (1, 1, 520), (1, 1, 511), (1, 1, 512), (1, 1, 513), (2, 9, 1025)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pixel_rows", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", list(WIDTHS))
@pytest.mark.parametrize("vector", [True, False], ids=["vector", "scalar"])
def test_every_element_once(lib, shape, pixel_rows, dtype, vector):
    n, c, l = shape
    for reversed_ in (True, False):
        walk(lib, n, c, l, pixel_rows, WIDTHS[dtype], vector, reversed_)


@pytest.mark.parametrize("shape", [(1, 3, 2**31 + 5), (1, 2**31 + 16, 1), (2**20, 8, 1), (2**20, 3, 7),
                                   (2, 1, 4096**2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pixel_rows", [False, True], ids=["nchw", "channels_last"])
def test_large_shapes_first_and_last_blocks(lib, shape, pixel_rows):
    """Over 2^31 elements in one sample (int64 offsets) and 2^20 samples: the first and last 300
    blocks, and the block count within CUDA's grid.x limit."""
    n, c, l = shape
    for width, vector in ((4, True), (8, False)):
        blocks = walk(lib, n, c, l, pixel_rows, width, vector, True, first=300, last=300)
        assert 1 <= blocks <= 2**31 - 1


# flat tiles (NCHW rows of at most 256 pixels, C a multiple of the width): (N, C, L)
FLAT_SHAPES = [(2, 24, 49), (3, 40, 81), (2, 2048, 49), (1, 16, 196), (2, 56, 196), (3, 8, 9), (1, 8, 8),
               (2, 72, 25), (1, 32, 256), (2, 48, 255), (1, 8, 2), (5, 16, 3), (2, 24, 100), (1, 1024, 14)]
ROUNDS = {2: 2, 4: 4, 8: 4}  # se_cuda.cu flat_round: steps whose loads go together (double: 2)


def flat_plan(lib, n, c, l, width, pixel_rows=False, aligned=True):
    rows, per_sample = ctypes.c_int64(), ctypes.c_int64()
    ok = lib.se_flat_plan(n, c, l, int(pixel_rows), width, int(aligned), ctypes.byref(rows), ctypes.byref(per_sample))
    return (rows.value, per_sample.value) if ok else None


@pytest.mark.parametrize("shape", FLAT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(WIDTHS))
def test_flat_tiles_every_element_once(lib, shape, dtype):
    """Each element written once with its own row's gate, the relu bits through the image into the
    rows' mask bytes and back, every access inside its tile and on a vector."""
    n, c, l = shape
    width = WIDTHS[dtype]
    if c % width or l < width:
        assert flat_plan(lib, n, c, l, width) is None
        return
    msg = ctypes.create_string_buffer(256)
    blocks = ctypes.c_int64()
    for reversed_ in (1, 0):
        rc = lib.se_walk_flat(n, c, l, width, ROUNDS[width], reversed_, -1, 0, ctypes.byref(blocks), msg, len(msg))
        assert rc == 0, f"{shape} width={width}: {msg.value.decode()}"


def test_flat_tiles_plan(lib):
    """Where flat tiles apply (NCHW, aligned, C a multiple of the width, width <= L <= 256) and how
    large they are: the most whole rows (a multiple of the width, at most 32) in 8 vector steps."""
    assert flat_plan(lib, 256, 2048, 49, 4) == (20, 103)  # 980 of 1024 elements
    assert flat_plan(lib, 256, 2048, 49, 8) == (32, 64)   # 1568 of 2048
    assert flat_plan(lib, 256, 1024, 196, 4) == (4, 256)
    assert flat_plan(lib, 256, 1024, 196, 8) == (8, 128)
    assert flat_plan(lib, 2, 8, 49, 8) == (8, 1)
    assert flat_plan(lib, 2, 2048, 49, 4, pixel_rows=True) is None
    assert flat_plan(lib, 2, 2048, 49, 4, aligned=False) is None
    assert flat_plan(lib, 2, 2044, 49, 8) is None  # C not a multiple of the width
    assert flat_plan(lib, 2, 64, 257, 4) is None   # longer rows keep row tiles
    assert flat_plan(lib, 2, 64, 3, 4) is None     # a vector would span three rows
    for l in range(4, 257):
        rows, _ = flat_plan(lib, 1, 4096, l, 4)
        assert rows % 4 == 0 and 4 <= rows <= 32 and rows * l <= 8 * 32 * 4


def test_flat_row_division(lib):
    """flat_row's multiply-high is d / L for every row length and tile offset (exhaustive)."""
    msg = ctypes.create_string_buffer(256)
    assert lib.se_flat_division(msg, len(msg)) == 0, msg.value.decode()


@pytest.mark.parametrize("shape", [(2**20, 8, 49), (4096, 2048, 49), (2, 2**28, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_flat_tiles_large_first_and_last_blocks(lib, shape):
    """int64 offsets past 2^31 elements: the first and last 300 blocks."""
    n, c, l = shape
    msg = ctypes.create_string_buffer(256)
    blocks = ctypes.c_int64()
    rc = lib.se_walk_flat(n, c, l, 4, 4, 1, 300, 300, ctypes.byref(blocks), msg, len(msg))
    assert rc == 0, msg.value.decode()
    assert 1 <= blocks.value <= 2**31 - 1


def math(lib, which, code, dtype, u, v=None, w=None):
    arrays = [np.ascontiguousarray(a, dtype=np.float64) if a is not None else None for a in (u, v, w)]
    out = np.empty_like(arrays[0])
    ptr = lambda a: a.ctypes.data_as(ctypes.POINTER(ctypes.c_double)) if a is not None else None  # noqa: E731
    lib.se_math(which, code, dtype, out.size, ptr(arrays[0]), ptr(arrays[1]), ptr(arrays[2]), ptr(out))
    return torch.from_numpy(out)


def special_points():
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([0.0, -0.0, 3.0, -3.0, 1e-30, -1e-30, 40.0, -40.0, 100.0, -100.0, 3.0000001, -2.9999999])
    return torch.cat([torch.randn(4000, generator=g, dtype=torch.float64) * 4, edges.double()])


def check_function_and_grad(lib, which, code, bits, fn, grad_fn):
    """se_math's function `which` and its derivative `which + 1` (code: the option) against the
    reference's, at random and special points, in float64 or float32 arithmetic."""
    u = special_points()
    if bits == 32:
        u = u.float().double()
    tol = 1e-15 if bits == 64 else 2e-6  # float32: a few ulps of the intermediate terms
    torch.testing.assert_close(math(lib, which, code, bits, u), fn(u), rtol=tol, atol=tol)
    torch.testing.assert_close(math(lib, which + 1, code, bits, u), grad_fn(u), rtol=tol, atol=tol)


@pytest.mark.parametrize("bits", [64, 32])
@pytest.mark.parametrize("activation", list(ACTIVATION_CODES))
def test_activation_math(lib, activation, bits):
    # hardswish' at -3 and 3: 0 and 1, as aten's
    check_function_and_grad(lib, 0, ACTIVATION_CODES[activation], bits, ACTIVATIONS[activation],
                            lambda u: ACTIVATION_GRADS[activation](torch.ones_like(u), u))


@pytest.mark.parametrize("bits", [64, 32])
@pytest.mark.parametrize("gate", list(GATE_CODES))
def test_gate_math(lib, gate, bits):
    # the reference's formula: aten's float64 hardsigmoid backward multiplies by a float32 1/6
    check_function_and_grad(lib, 2, GATE_CODES[gate], bits, GATES[gate],
                            lambda u: GATE_GRADS[gate](torch.ones_like(u), u, GATES[gate](u)))


@pytest.mark.parametrize("has_res", [False, True])
@pytest.mark.parametrize("out_relu", [False, True])
def test_epilogue_math(lib, has_res, out_relu):
    g = torch.Generator().manual_seed(1)
    x, gate, res = (torch.randn(3000, generator=g, dtype=torch.float64) for _ in range(3))
    x[:3] = torch.tensor([float("nan"), 0.0, -0.0])
    ref = x * gate + (res if has_res else 0)
    code = int(has_res) + 2 * int(out_relu)
    got = math(lib, 4, code, 64, x, gate, res)
    expected = F.relu(ref) if out_relu else ref
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=1e-15, equal_nan=True)
    bits = math(lib, 5, code, 64, x, gate, res)
    assert torch.equal(bits, (ref > 0).double()), "mask bit: the output before the relu > 0 (NaN: 0)"
    dy, dp = res, gate.flip(0)
    torch.testing.assert_close(math(lib, 6, 0, 64, dy, gate, dp), dy * gate + dp, rtol=1e-15, atol=1e-15)
