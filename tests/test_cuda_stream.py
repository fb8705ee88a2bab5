"""The CUDA backend's streamed plan (csrc/cuda/se_stream.h) without a GPU: its schedule compiled
for the host (tests/cpp/stream_host.cpp), run with threads standing in for the persistent
kernel's blocks, as run_streamed in csrc/cuda/se_cuda.cu does: claim item numbers in order, wait
(acquire) for the previous stage of the item's group, signal (release). Checked: every item
claimed and run exactly once, no worker ever waits forever (1 worker, where every wait must
already be satisfied, and 2-8 competing ones), every item reads its inputs only after all of
them are written (plain memory, checked by value and, in the ThreadSanitizer build, by the race
detector), the apply items cover each group's tiles exactly once, last first; and when the plan
applies at all (at least kMinLag + 1 samples fit)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

try:  # the Triton streamed kernels' item decoding, run by Triton (its interpreter without a GPU)
    import triton
    import triton.language as tl

    from se_kernels.triton import kernels as triton_kernels

    @triton.jit
    def _decode(out_ptr, ITEMS, GROUPS, P0, P1, P2, P3, LAG1, LAG2, LAG3, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        ok = i < ITEMS
        stage, g, index = triton_kernels._stream_item(i, GROUPS, P0, P1, P2, P3, LAG1, LAG2, LAG3)
        tl.store(out_ptr + 3 * i, stage, mask=ok)
        tl.store(out_ptr + 3 * i + 1, g, mask=ok)
        tl.store(out_ptr + 3 * i + 2, index, mask=ok)
except ImportError:
    _decode = None

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cpp" / "stream_host.cpp"
FLAGS = ["-std=c++17", "-Wall", "-Wextra", "-Werror"]


def _cxx():
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    return cxx


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "stream_host.so"
    subprocess.run([_cxx(), *FLAGS, "-O2", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(out)], check=True,
                   capture_output=True, text=True)
    lib = ctypes.CDLL(str(out))
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib.se_stream_schedule.argtypes = [i64p, i64p]
    lib.se_stream_schedule.restype = ctypes.c_int
    lib.se_stream_run.argtypes = [i64p, ctypes.c_int, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_int]
    lib.se_stream_run.restype = ctypes.c_int
    lib.se_stream_items.argtypes = [i64p, i64p]
    lib.se_stream_items.restype = ctypes.c_int64
    return lib


def _shape(*values):
    """StreamShape's 9 fields (pool_tiles_per_block 1 where left out)."""
    return (ctypes.c_int64 * 9)(*values, *([1] if len(values) == 8 else []))


def schedule(lib, *shape):
    """None, or dict(group, groups, per, lag, rounds, items)."""
    out = (ctypes.c_int64 * 12)()
    if not lib.se_stream_schedule(_shape(*shape), out):
        return None
    v = list(out)
    return dict(group=v[0], groups=v[1], per=v[2:6], lag=v[6:10], rounds=v[10], items=v[11])


def run(lib, shape, workers, seed):
    msg = ctypes.create_string_buffer(256)
    rc = lib.se_stream_run(_shape(*shape), workers, seed, msg, len(msg))
    assert rc == 0, f"shape {shape}, {workers} workers, seed {seed}: {msg.value.decode()}"


# (N, kept bytes per sample, L2 budget, pool items per sample, first-GEMM items, second-GEMM items,
#  apply tiles per sample, tiles per block[, pool tiles per block]): small ones with partial last
# groups, a lag of every group (the batch fits), one item per stage; the ImageNet SE-ResNet-50
# stage-1 site at batch 256 (bfloat16: x = 1.6 MB a sample; 32 channel blocks x 4 pixel splits;
# 1 + 8 MLP blocks; 256 rows x 4 tiles); flat tiles (se_tiles.h), whose pool items are 8 warps'
# tiles as the apply items are: odd tile counts, and stage 4 at batch 256 in bfloat16 (2048 rows of
# 7x7 in 64 tiles of 32 rows a sample)
SHAPES = [
    (37, 1000, 30000, 3, 1, 2, 5, 8),
    (9, 1000, 5000, 2, 2, 3, 17, 8),
    (64, 500, 20000, 4, 1, 8, 9, 8),
    (5, 1000, 4000, 1, 1, 1, 1, 8),
    (100, 100, 9000, 2, 4, 1, 3, 8),
    (9, 10, 89, 1, 1, 1, 1, 8),
    (12, 10, 1000, 2, 1, 3, 7, 8),
    (256, 256 * 3136 * 2, 30 * 2**20, 128, 1, 8, 1024, 8),
    (37, 1000, 30000, 13, 1, 2, 13, 8, 8),
    (20, 1000, 9000, 3, 2, 1, 3, 8, 8),
    (256, 2048 * 49 * 2, 30 * 2**20, 64, 4, 64, 64, 8, 8),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-fit{s[2] // s[1]}")
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_schedule_runs_every_item_once_in_order(lib, shape, workers):
    for seed in range(3 if workers > 1 else 1):
        run(lib, shape, workers, seed)


def test_when_the_plan_applies(lib):
    # the whole batch within the budget (se_cuda.cu runs the split plan there when everything
    # it touches fits): a lag of every group, no more
    s = schedule(lib, 8, 1000, 9000, 1, 1, 1, 1, 8)
    assert s["groups"] == 8 and s["lag"][3] == 8 and s["rounds"] == 16
    # fewer than kMinLag + 1 = 4 samples fit: the re-read would miss anyway
    assert schedule(lib, 100, 1000, 3999, 1, 1, 1, 1, 8) is None
    assert schedule(lib, 100, 1000, 4000, 1, 1, 1, 1, 8)["lag"] == [0, 1, 2, 3]
    # one sample, or a batch that is one group, is not streamed
    assert schedule(lib, 1, 10**9, 4000, 1, 1, 1, 1, 8) is None


def test_group_and_lag_fit_the_budget(lib):
    for fit in range(4, 200, 7):
        s = schedule(lib, 1000, 1000, fit * 1000, 3, 2, 5, 40, 8)
        assert 1 <= s["group"] <= 8
        assert s["lag"][0] == 0 and s["lag"] == sorted(s["lag"]) and s["lag"][1] >= 1
        # (lag + 1) groups of reads and writes fit the budget: the re-read is still in L2
        assert (s["lag"][3] + 1) * s["group"] <= fit or s["lag"][3] == s["groups"]
        assert s["lag"][3] >= 3
        assert s["per"] == [3 * s["group"], 2, 5, -(-40 * s["group"] // 8)]
        assert s["items"] == s["rounds"] * sum(s["per"]) and s["rounds"] == s["groups"] + s["lag"][3]


def test_thread_sanitizer(tmp_path):
    """The same runs under ThreadSanitizer: every read of a previous stage's plain data must be
    ordered after its write by the counters' release/acquire (a relaxed counter, or a wait for one
    item fewer, is reported as a data race)."""
    exe = tmp_path / "stream_tsan"
    build = subprocess.run([_cxx(), *FLAGS, "-O1", "-g", "-fsanitize=thread", "-pthread", "-DSE_STREAM_MAIN",
                            str(SOURCE), "-o", str(exe)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"no ThreadSanitizer build here: {build.stderr.strip()[-300:]}")
    probe = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    if "FATAL: ThreadSanitizer" in probe.stderr:  # e.g. an unsupported memory layout (ASLR)
        pytest.skip(f"ThreadSanitizer cannot run here: {probe.stderr.strip()[:300]}")
    assert probe.returncode == 0 and "ThreadSanitizer" not in probe.stderr, probe.stdout + probe.stderr[-3000:]
    assert probe.stdout.strip() == "ok"


@pytest.mark.parametrize("shape", SHAPES[:6] + SHAPES[8:10], ids=lambda s: f"N{s[0]}-fit{s[2] // s[1]}")
def test_schedule_is_the_python_and_triton_one(lib, shape):
    """se_kernels/triton/launch.py stream_schedule gives the same schedule, and the Triton streamed
    kernels' item decoding (kernels._stream_item; run by Triton, in its interpreter without a GPU)
    the same (stage, group, index) for every item number as the C++ item_of."""
    if _decode is None:
        pytest.skip("no triton")
    import torch

    from se_kernels.triton import launch

    s = schedule(lib, *shape)
    py = launch.stream_schedule(*shape)  # (flat shapes: per_pool_item as the ninth argument)
    assert {k: s[k] for k in py} == py
    out = (ctypes.c_int64 * (3 * s["items"]))()
    assert lib.se_stream_items(_shape(*shape), out) == s["items"]
    want = torch.tensor(list(out), dtype=torch.int64).view(-1, 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = torch.empty((s["items"], 3), dtype=torch.int32, device=device)
    block = 1 << max(0, s["items"] - 1).bit_length()
    _decode[(1,)](got, s["items"], s["groups"], *s["per"], *s["lag"][1:], BLOCK=block)
    got = got.cpu().long()
    got[got[:, 0] < 0, 1:] = -1  # no group or index where the group does not exist (as the C++ reports)
    assert torch.equal(got, want)
