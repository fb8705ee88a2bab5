"""The GPU backends' plans side by side on a GPU: the split plan (its re-read of x comes from HBM
once the batch outgrows the L2) and the plan the backend picks (the streamed plan, one persistent
kernel, where the split plan's re-read would miss: csrc/cuda/se_stream.h, se_kernels/triton), on
the same inputs, with a device-to-device copy of the same bytes as the floor.
SE_KERNELS_STREAM_BUDGET=0 forces the split plan; unset, the backend picks.

    python benchmarks/bench_plans.py                                   # SE-ResNet-50 sites, batch 256
    python benchmarks/bench_plans.py --batch 32 --dtypes bfloat16 --backends cuda --out results.md

Per (backend, site, dtype, direction): the median of the timed calls (CUDA events, L2 flushed
before each call; harness.measure, plans interleaved), the fraction of the floor (the op's
compulsory bytes at the copy's measured rate) and which plan the backend picked (from the
profiler's kernel names). The backward is timed alone (its inputs saved once from a forward)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402
import shapes  # noqa: E402

import se_kernels  # noqa: E402  (also registers the ops)

BUDGET = "SE_KERNELS_STREAM_BUDGET"


def with_budget(value: Optional[str], fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        old = os.environ.pop(BUDGET, None)
        if value is not None:
            os.environ[BUDGET] = value
        try:
            return fn()
        finally:
            os.environ.pop(BUDGET, None)
            if old is not None:
                os.environ[BUDGET] = old
    return run


def picked_plan(fn: Callable[[], object]) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return "streamed" if any("streamed_" in e.name for e in prof.events()) else "split"


OPS = {"cuda": ("se_forward", "se_backward"), "triton": ("triton_se_forward", "triton_se_backward")}


def measure_case(backend: str, site, dtype_name: str, batch: int, rounds: int) -> List[List[str]]:
    """The table rows of one (backend, site, dtype): forward and backward, both plans."""
    dev, dtype = torch.device("cuda"), getattr(torch, dtype_name)
    fwd_op, bwd_op = (getattr(torch.ops.se_kernels, name) for name in OPS[backend])
    n, c, h, w, s = batch, site.c, site.h, site.w, site.s
    x = torch.randn(n, c, h, w, device=dev, dtype=dtype)
    w1 = torch.randn(s, c, device=dev, dtype=dtype) * c ** -0.5
    w2 = torch.randn(c, s, device=dev, dtype=dtype) * s ** -0.5
    b1, b2 = torch.zeros(s, device=dev, dtype=dtype), torch.zeros(c, device=dev, dtype=dtype)
    dy = torch.randn_like(x)
    copy_dst = torch.empty_like(x)

    def forward():
        return fwd_op(x, w1, b1, w2, b2, None, "relu", "sigmoid", None)

    _, pooled, hidden, logits, mask = forward()

    def backward():
        return bwd_op(dy, x, w1, w2, pooled, hidden, logits, mask, "relu", "sigmoid", None, True, False)

    work = {"copy": harness.Workload(lambda: copy_dst.copy_(x))}
    for plan, budget in (("split", "0"), ("auto", None)):
        work[f"forward {plan}"] = harness.Workload(with_budget(budget, forward))
        work[f"backward {plan}"] = harness.Workload(with_budget(budget, backward))
    for wl in work.values():  # warm-up: allocator, first launches
        wl.run()
    med = {k: statistics.median(v) for k, v in harness.measure(work, rounds, dev).items()}
    elem = x.element_size()
    rate = 2 * x.numel() * elem / med["copy"]  # bytes read + written per second
    floors = {"forward": 2 * x.numel() * elem, "backward": 3 * x.numel() * elem}  # x, y / dy, x, dx
    rows = []
    for direction, fn in (("forward", forward), ("backward", backward)):
        split, auto = med[f"{direction} split"], med[f"{direction} auto"]
        floor_s = floors[direction] / rate
        rows.append([backend, f"{n}x{c}x{h}x{w}/{s}", dtype_name, direction, f"{rate / 1e12:.2f}", f"{split * 1e6:.1f}",
                     f"{floor_s / split:.2f}", picked_plan(fn), f"{auto * 1e6:.1f}", f"{floor_s / auto:.2f}",
                     f"{split / auto:.2f}"])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape-set", default="imagenet-se-resnet50")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--backends", nargs="+", default=["cuda", "triton"], choices=sorted(OPS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_plans: no CUDA device; nothing to measure")
        return 0
    rows: List[List[str]] = []
    for backend in args.backends:
        if backend not in se_kernels.available_backends("cuda"):
            print(f"bench_plans: {backend} unavailable: {se_kernels.ops.unavailable_reason(backend, 'cuda')}")
            continue
        for site in shapes.shape_set(args.shape_set).sites:
            for dtype_name in args.dtypes:
                rows += measure_case(backend, site, dtype_name, args.batch, args.rounds)
                torch.cuda.empty_cache()
    header = ["backend", "site", "dtype", "dir", "copy TB/s", "split us", "split frac", "auto plan", "auto us",
              "auto frac", "split / auto"]
    lines = [f"# Split and picked plans on {torch.cuda.get_device_name()}", "",
             f"Command: `{harness.repo_command(list(sys.argv[1:] if argv is None else argv), __file__)}`; "
             f"torch {torch.__version__}; medians of {args.rounds} calls, L2 flushed before each.", ""]
    lines += harness.markdown_table(header, rows)
    print("\n".join(lines))
    if args.out is not None:
        harness.write_text(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
