"""Benchmark of the fused Squeeze-and-Excitation op against eager and compiled PyTorch.

Run from the repository root, with the extension built:

    python benchmarks/bench_se.py
    python benchmarks/bench_se.py --modes forward --shapes 128x64x32x32 --threads 1 --csv se.csv

What it measures, for each input shape (N, C, H, W) and each mode:
    forward  inference: the forward pass under torch.no_grad()
    full     training: forward + backward, with x and the parameters requiring grad and
             y.backward(dy) for a fixed random dy
and each provider:
    eager      se_kernels.reference.ReferenceSE, the math of torchvision.ops.SqueezeExcitation
    compile    torch.compile(ReferenceSE(...)), default mode
    <backend>  se_kernels.FusedSE(backend=<backend>) for every se_kernels backend available on
               the device other than "torch" (which is eager again): "cpu" on a CPU.
The block is float32 with S = C // 16, ReLU after fc1 and a sigmoid gate; --residual adds a
residual input and out_activation="relu". All providers of a shape share weights and inputs.

SE is memory bound, so each time is also set against a floor: the bytes any implementation
must move (floor_bytes) at the bandwidth y.copy_(x) reaches on the same shape, timed in the
same rounds as the providers. "fraction of floor" 1.0 means as fast as copying those bytes.

Method: each provider is warmed up (torch.compile's first call, which compiles, is timed and
reported on its own, never in the timings), then checked against eager (outputs and, in full
mode, gradients; the run aborts on a mismatch), then timed in interleaved rounds: round r calls
every provider once, in an order rotated by r, so machine drift hits all of them alike. The
number of rounds adapts to the speed of the shape (TARGET_S of measured time per provider,
between MIN_ROUNDS and MAX_ROUNDS). Reported: the median and the 20th/80th percentiles of the
per-call time, GB/s of floor bytes, the fraction of floor, speedups over eager and compile, and
per mode the geometric mean of the speedups over all shapes.

Two settings that shape the numbers:
- malloc: on glibc the script makes freed memory stay with the process (keep_freed_memory), so
  a call does not pay page faults for freshly mapped output pages; --system-malloc opts out.
- torch.compile compiles each shape statically (dynamic=False), two graphs per shape (no_grad
  and training), 10 for the default run. Nothing is done to shorten that beyond inductor's
  on-disk caches, which are on by default (TORCHINDUCTOR_CACHE_DIR, else
  /tmp/torchinductor_$USER): on the 2-core VM this was written on, the 10 warm-ups took ~45 s
  with an empty cache (whole run ~70 s) and ~2-3 s with a warm one (whole run ~25 s).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch._dynamo.utils import counters

from se_kernels import FusedSE, available_backends
from se_kernels.reference import ReferenceSE

Shape = Tuple[int, int, int, int]  # (N, C, H, W)

SHAPE_SETS: Dict[str, List[Shape]] = {
    # ImageNet-ish SE placements at batch 128 (the channels grow as the map shrinks), plus a
    # large-map, small-batch case: sized so the default run fits a few minutes on 2 CPU cores.
    "cpu": [
        (128, 64, 32, 32),
        (128, 128, 16, 16),
        (128, 256, 8, 8),
        (128, 512, 4, 4),
        (8, 256, 56, 56),
    ],
}
MODES = ("forward", "full")
DTYPE = torch.float32
REDUCTION = 16
ACTIVATION = "relu"
GATE = "sigmoid"
# The float32 correctness guard against eager: elementwise |got - eager| <= ATOL + RTOL |eager|
# for y, dx, d_residual and the weight gradients. The bias gradients are sums over N*H*W
# terms (up to ~1e5) that nearly cancel in places, and float32 rounding in another summation
# order moves single elements past that bound (eager's own error against float64 reaches
# half of it; compile's and cpu's reach 1-2x of it against eager on the default shapes), so
# they are compared tensor-wise: max |got - eager| <= ATOL + RTOL max |eager|.
RTOL, ATOL = 1e-4, 1e-5
TENSORWISE = ("d_fc1.bias", "d_fc2.bias")

TARGET_S = 0.5  # measured time per provider per (shape, mode)
MIN_ROUNDS, MAX_ROUNDS = 10, 200
COPY = "copy"  # the name of the copy workload in the timing rounds; not a provider
WARMUP_ROUNDS = 3  # after the first call and the check; timed only to choose the rounds
PARAMETERS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


# ---------------------------------------------------------------------------------------
# Providers: name -> factory building the module to time, with the given weights.


@dataclass(frozen=True)
class SESpec:
    channels: int
    squeeze_channels: int
    out_activation: Optional[str]

    def kwargs(self) -> Dict[str, Optional[str]]:
        return dict(activation=ACTIVATION, gate=GATE, out_activation=self.out_activation)


ProviderFactory = Callable[[SESpec, Dict[str, torch.Tensor], torch.device], nn.Module]


def _with_weights(module: nn.Module, state: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    module.load_state_dict(state)
    return module.to(device)


def eager_provider(spec: SESpec, state: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    module = ReferenceSE(spec.channels, spec.squeeze_channels, **spec.kwargs())
    return _with_weights(module, state, device)


def compile_provider(spec: SESpec, state: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    # dynamic=False: every shape gets its own static graph, as in a static-shape model; without
    # it dynamo would recompile the second shape with symbolic sizes (automatic dynamic).
    return torch.compile(eager_provider(spec, state, device), dynamic=False)


def fused_provider(backend: str) -> ProviderFactory:
    def make(spec: SESpec, state: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
        module = FusedSE(spec.channels, spec.squeeze_channels, **spec.kwargs(), backend=backend)
        return _with_weights(module, state, device)

    return make


def provider_registry(device: torch.device) -> Dict[str, ProviderFactory]:
    """eager and compile first (the baselines), then one provider per native backend."""
    registry: Dict[str, ProviderFactory] = {"eager": eager_provider, "compile": compile_provider}
    for backend in available_backends(device.type):
        if backend != "torch":  # the "torch" backend is the eager reference again
            registry[backend] = fused_provider(backend)
    return registry


# ---------------------------------------------------------------------------------------
# Inputs, byte counts, workloads


@dataclass
class Inputs:
    x: torch.Tensor  # requires grad; under no_grad (forward mode) that costs nothing
    residual: Optional[torch.Tensor]  # requires grad, like the skip branch of a ResNet block
    dy: torch.Tensor


def make_inputs(shape: Shape, residual: bool, channels_last: bool, device: torch.device) -> Inputs:
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def tensor(requires_grad: bool) -> torch.Tensor:
        t = torch.randn(shape, dtype=DTYPE, device=device).contiguous(memory_format=fmt)
        return t.requires_grad_(requires_grad)

    return Inputs(x=tensor(True), residual=tensor(True) if residual else None, dy=tensor(False))


def floor_bytes(shape: Shape, mode: str, residual: bool) -> int:
    """Bytes any implementation must move, in units of |x| (the bytes of x):
    forward: read x, write y (2); with a residual also read the residual (3).
    full:    forward, then backward: read dy and x, write dx (3); with a residual also write
             d_residual (4), so 5 without and 7 with a residual. The relu epilogue's
             backward also needs to know where y > 0 (at least one bit per element, |x| / 32);
             that is left out of the floor.
    The (N, C) and (N, S) vectors and the weights are negligible next to |x| and not counted.
    """
    x_bytes = math.prod(shape) * DTYPE.itemsize
    forward = 3 if residual else 2
    backward = 4 if residual else 3
    return x_bytes * (forward if mode == "forward" else forward + backward)


@dataclass
class Workload:
    run: Callable[[], object]  # the timed call
    reset: Callable[[], None]  # untimed, before each call


def make_workload(module: nn.Module, inputs: Inputs, mode: str) -> Workload:
    """The call to time. The caller sets the grad mode (no_grad for forward)."""
    if mode == "forward":
        return Workload(run=lambda: module(inputs.x, inputs.residual), reset=lambda: None)
    leaves = [module.get_parameter(name) for name in PARAMETERS] + [inputs.x]
    if inputs.residual is not None:
        leaves.append(inputs.residual)

    def reset() -> None:  # no gradient accumulation: every backward writes fresh gradients
        for leaf in leaves:
            leaf.grad = None

    return Workload(run=lambda: module(inputs.x, inputs.residual).backward(inputs.dy), reset=reset)


def results_of(module: nn.Module, inputs: Inputs, mode: str) -> Dict[str, torch.Tensor]:
    """y, and in full mode every gradient, of one call."""
    if mode == "forward":
        return {"y": module(inputs.x, inputs.residual)}
    make_workload(module, inputs, mode).reset()
    y = module(inputs.x, inputs.residual)
    y.backward(inputs.dy)
    results = {"y": y.detach(), "dx": inputs.x.grad}
    if inputs.residual is not None:
        results["d_residual"] = inputs.residual.grad
    for name in PARAMETERS:
        results["d_" + name] = module.get_parameter(name).grad
    return results


def check_against_eager(
    modules: Dict[str, nn.Module], inputs: Inputs, mode: str, shape: Shape
) -> None:
    """Abort unless every provider matches eager: timing a wrong kernel is worthless."""
    expected = results_of(modules["eager"], inputs, mode)
    for provider, module in modules.items():
        if provider == "eager":
            continue
        for name, actual in results_of(module, inputs, mode).items():
            want = expected[name]
            if actual is None or actual.shape != want.shape:
                got = None if actual is None else tuple(actual.shape)
                sys.exit(f"bench_se: {provider} {format_shape(shape)} {mode}: {name} is {got}, "
                         f"eager gives {tuple(want.shape)}; not benchmarking a wrong kernel")
            scale = want.abs().max() if name in TENSORWISE else want.abs()
            excess = (actual - want).abs() / (ATOL + RTOL * scale)  # > 1: out of tolerance
            if not excess.max() <= 1:  # also catches NaN
                worst = int(excess.nan_to_num(math.inf).argmax())
                sys.exit(
                    f"bench_se: {provider} {format_shape(shape)} {mode}: {name} differs from eager "
                    f"beyond rtol={RTOL}, atol={ATOL}{' (tensor-wise)' if name in TENSORWISE else ''} "
                    f"at flat index {worst}: got {actual.flatten()[worst].item():.7g}, "
                    f"eager {want.flatten()[worst].item():.7g}; not benchmarking a wrong kernel"
                )


# ---------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(workloads: Dict[str, Workload], rounds: int, device: torch.device) -> Dict[str, List[float]]:
    """Per-call seconds of each workload over `rounds` interleaved rounds; round r runs every
    workload once, starting at the r-th (rotating order). CPU: time.perf_counter around the
    call. CUDA: events around the call on the current stream, read after each round."""
    names = list(workloads)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        if device.type == "cuda":
            events = []
            for name in order:
                workloads[name].reset()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                workloads[name].run()
                end.record()
                events.append((name, start, end))
            torch.cuda.synchronize(device)
            for name, start, end in events:
                times[name].append(start.elapsed_time(end) / 1e3)
        else:
            for name in order:
                workloads[name].reset()
                t0 = time.perf_counter()
                workloads[name].run()
                times[name].append(time.perf_counter() - t0)
    return times


def rounds_for(times: Dict[str, List[float]]) -> int:
    """Rounds giving about TARGET_S of measured time per provider, from warm-up times."""
    per_call = statistics.mean(statistics.median(t) for t in times.values())
    return max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(TARGET_S / per_call)))


@dataclass
class Summary:
    median_s: float
    p20_s: float
    p80_s: float
    calls: int


def summarize(times: Sequence[float]) -> Summary:
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return Summary(statistics.median(times), deciles[1], deciles[7], len(times))


def copy_workload(inputs: Inputs) -> Tuple[Workload, int]:
    """y.copy_(x) into a preallocated y like x, and the bytes it moves (2|x|)."""
    x = inputs.x.detach()
    y = torch.empty_like(x)
    return Workload(run=lambda: y.copy_(x), reset=lambda: None), 2 * x.numel() * x.element_size()


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse: no mmap (M_MMAP_MAX = 0) and no trimming
    of the heap (M_TRIM_THRESHOLD = 2 GiB). PyTorch has no caching allocator on the CPU, and by
    default glibc hands each large tensor freshly mapped pages (always above 32 MiB, sometimes
    below), so a call pays a page fault per 4 KiB it writes: on the 2-core VM this benchmark was
    written on, eager 128x64x32x32 forward took ~21 ms with the faults and ~4.4 ms without,
    and whether a call faulted depended on malloc's state, not on the provider. With freed
    memory reused, every provider is timed like the copy (whose y is preallocated), as it would
    run under jemalloc or tcmalloc (for a whole program, GLIBC_TUNABLES=glibc.malloc.mmap_max=0:
    glibc.malloc.trim_threshold=2147483647 does the same). --system-malloc keeps glibc's
    defaults; an allocator in LD_PRELOAD is left alone. Returns whether malloc took the settings
    (False off glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


# ---------------------------------------------------------------------------------------
# One shape


@dataclass
class Row:
    shape: str
    mode: str
    provider: str
    calls: int
    median_ms: float
    p20_ms: float
    p80_ms: float
    floor_bytes: int
    copy_gbps: float
    gbps: float
    fraction_of_floor: float
    speedup_vs_eager: float
    speedup_vs_compile: float


@dataclass
class CompileTime:
    shape: str
    mode: str
    seconds: float
    fx_cache_hits: int
    fx_cache_misses: int


@dataclass
class CopyBandwidth:
    shape: str
    mode: str
    median_ms: float
    gbps: float


def compile_warmup(workload: Workload, shape: str, mode: str, device: torch.device) -> CompileTime:
    """The first call of the torch.compile provider, which compiles; with inductor's FX graph
    cache hits and misses, which tell a cold compile from one served by the on-disk cache."""
    before = dict(counters["inductor"])
    t0 = time.perf_counter()
    workload.reset()
    workload.run()
    synchronize(device)
    seconds = time.perf_counter() - t0
    after = counters["inductor"]
    return CompileTime(
        shape, mode, seconds,
        fx_cache_hits=after["fxgraph_cache_hit"] - before.get("fxgraph_cache_hit", 0),
        fx_cache_misses=after["fxgraph_cache_miss"] - before.get("fxgraph_cache_miss", 0),
    )


def format_shape(shape: Shape) -> str:
    return "x".join(map(str, shape))


def bench_shape(
    shape: Shape, modes: Sequence[str], args: argparse.Namespace, device: torch.device
) -> Tuple[List[Row], List[CompileTime], List[CopyBandwidth]]:
    """Rows for every (mode, provider) of one shape, torch.compile's warm-ups and the copy
    bandwidth. The copy runs in the same interleaved rounds as the providers, one more
    workload in the rotation, so it sees the same machine state."""
    c = shape[1]
    spec = SESpec(c, max(1, c // REDUCTION), "relu" if args.residual else None)
    torch.manual_seed(0)
    state = ReferenceSE(c, spec.squeeze_channels, **spec.kwargs()).state_dict()
    # A fresh dynamo cache per shape: the two graphs (no_grad, training) of this shape stay
    # within the recompile limit whatever the number of shapes. Inductor's on-disk caches
    # (FX graph and AOTAutograd, on by default) survive it, and across runs.
    torch._dynamo.reset()
    modules = {name: make(spec, state, device) for name, make in provider_registry(device).items()}
    inputs = make_inputs(shape, args.residual, args.channels_last, device)
    copy, copy_bytes = copy_workload(inputs)
    rows: List[Row] = []
    compiles: List[CompileTime] = []
    copies: List[CopyBandwidth] = []
    for mode in modes:
        with torch.set_grad_enabled(mode == "full"):
            workloads = {name: make_workload(m, inputs, mode) for name, m in modules.items()}
            compiles.append(compile_warmup(workloads["compile"], format_shape(shape), mode, device))
            check_against_eager(modules, inputs, mode, shape)
            workloads[COPY] = copy
            warmup = measure(workloads, WARMUP_ROUNDS, device)
            rounds = rounds_for({name: t for name, t in warmup.items() if name != COPY})
            print(f"  {format_shape(shape)} {mode}: compile warm-up {compiles[-1].seconds:.1f} s, "
                  f"{rounds} rounds", file=sys.stderr, flush=True)
            times = measure(workloads, rounds, device)
        copy_s = statistics.median(times.pop(COPY))
        bandwidth = copy_bytes / copy_s
        copies.append(CopyBandwidth(format_shape(shape), mode, copy_s * 1e3, bandwidth / 1e9))
        summaries = {name: summarize(t) for name, t in times.items()}
        floor = floor_bytes(shape, mode, args.residual)
        for name, s in summaries.items():
            rows.append(Row(
                shape=format_shape(shape), mode=mode, provider=name, calls=s.calls,
                median_ms=s.median_s * 1e3, p20_ms=s.p20_s * 1e3, p80_ms=s.p80_s * 1e3,
                floor_bytes=floor, copy_gbps=bandwidth / 1e9, gbps=floor / s.median_s / 1e9,
                fraction_of_floor=floor / bandwidth / s.median_s,
                speedup_vs_eager=summaries["eager"].median_s / s.median_s,
                speedup_vs_compile=summaries["compile"].median_s / s.median_s,
            ))
    return rows, compiles, copies


# ---------------------------------------------------------------------------------------
# Report


def machine_header(device: torch.device, malloc: str) -> List[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    lines = [
        f"date:    {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {platform.node()}, {cpu}, torch threads {torch.get_num_threads()}",
        f"torch:   {torch.__version__}",
        f"malloc:  {malloc}",
    ]
    if device.type == "cuda":
        lines.append(f"gpu:     {torch.cuda.get_device_name(device)}")
    return lines


def geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def report(rows: List[Row], compiles: List[CompileTime], copies: List[CopyBandwidth]) -> None:
    print("\ncopy bandwidth, y.copy_(x) moving 2|x| bytes, timed in the providers' rounds:")
    for cb in copies:
        print(f"  {cb.shape:<16} {cb.mode:<8} {cb.median_ms:8.3f} ms {cb.gbps:7.2f} GB/s")

    print("\ntorch.compile warm-up (first call; not in the timings):")
    for ct in compiles:
        print(f"  {ct.shape:<16} {ct.mode:<8} {ct.seconds:6.2f} s   "
              f"inductor FX graph cache: {ct.fx_cache_hits} hit, {ct.fx_cache_misses} miss")

    header = (f"{'shape':<16} {'mode':<8} {'provider':<8} {'calls':>5} {'median ms':>10} "
              f"{'p20-p80 ms':>17} {'GB/s':>7} {'of floor':>8} {'vs eager':>8} {'vs compile':>10}")
    print("\n" + header)
    print("-" * len(header))
    for i, r in enumerate(rows):
        if i and (r.shape, r.mode) != (rows[i - 1].shape, rows[i - 1].mode):
            print()
        spread = f"{r.p20_ms:.3f}-{r.p80_ms:.3f}"
        print(f"{r.shape:<16} {r.mode:<8} {r.provider:<8} {r.calls:>5} {r.median_ms:>10.3f} "
              f"{spread:>17} {r.gbps:>7.2f} {r.fraction_of_floor:>8.2f} "
              f"{r.speedup_vs_eager:>7.2f}x {r.speedup_vs_compile:>9.2f}x")

    print("\ngeometric mean of speedups over the shapes:")
    for mode in dict.fromkeys(r.mode for r in rows):
        for provider in dict.fromkeys(r.provider for r in rows):
            of = [r for r in rows if r.mode == mode and r.provider == provider]
            print(f"  {mode:<8} {provider:<8} vs eager {geomean([r.speedup_vs_eager for r in of]):5.2f}x"
                  f"   vs compile {geomean([r.speedup_vs_compile for r in of]):5.2f}x")


def write_csv(path: str, rows: List[Row], args: argparse.Namespace, device: torch.device) -> None:
    setting = {
        "device": str(device), "dtype": str(DTYPE).removeprefix("torch."),
        "channels_last": args.channels_last, "residual": args.residual,
        "system_malloc": args.system_malloc, "threads": torch.get_num_threads(),
    }
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(setting) + list(asdict(rows[0])))
        writer.writeheader()
        for r in rows:
            writer.writerow({**setting, **asdict(r)})


# ---------------------------------------------------------------------------------------


def parse_shape(text: str) -> Shape:
    try:
        n, c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxCxHxW, e.g. 128x64x32x32; got {text!r}")
    if min(n, c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be >= 1; got {text!r}")
    return n, c, h, w


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--shape-set", choices=sorted(SHAPE_SETS), default="cpu",
                   help="named set of (N, C, H, W) shapes (default: cpu)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="NxCxHxW",
                   help="shapes to run instead of --shape-set")
    p.add_argument("--channels-last", action="store_true", help="x (and dy, residual) channels_last")
    p.add_argument("--residual", action="store_true",
                   help='add a residual input and out_activation="relu" to every provider')
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    p.add_argument("--device", default="cpu", help='"cpu" (default) or "cuda"')
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc malloc's defaults: large tensors get fresh, page-faulting "
                        "memory on every call (see keep_freed_memory)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or SHAPE_SETS[args.shape_set]
    modes = list(dict.fromkeys(args.modes))
    preloaded = [lib for lib in ("jemalloc", "tcmalloc") if lib in os.environ.get("LD_PRELOAD", "")]
    if preloaded:
        malloc = f"{preloaded[0]} (LD_PRELOAD)"
    elif args.system_malloc:
        malloc = "glibc defaults (--system-malloc)" + (
            f", GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}" if "GLIBC_TUNABLES" in os.environ else "")
    elif keep_freed_memory():
        malloc = "glibc, freed memory kept for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2GiB)"
    else:
        malloc = "system defaults (mallopt unavailable)"

    print("\n".join(machine_header(device, malloc)))
    providers = ", ".join(provider_registry(device))
    print(f"setting: {device}, {str(DTYPE).removeprefix('torch.')}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, S = C // {REDUCTION}, "
          f"{ACTIVATION}/{GATE}, {'residual + relu' if args.residual else 'no residual'}; "
          f"providers: {providers}")

    rows: List[Row] = []
    compiles: List[CompileTime] = []
    copies: List[CopyBandwidth] = []
    for i, shape in enumerate(shapes, 1):
        print(f"[{i}/{len(shapes)}] {format_shape(shape)}", file=sys.stderr, flush=True)
        shape_rows, shape_compiles, shape_copies = bench_shape(shape, modes, args, device)
        rows += shape_rows
        compiles += shape_compiles
        copies += shape_copies

    report(rows, compiles, copies)
    if args.csv:
        write_csv(args.csv, rows, args, device)
        print(f"\nwrote {args.csv}")
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s (after imports), of which "
          f"torch.compile warm-up {sum(ct.seconds for ct in compiles):.1f} s")


if __name__ == "__main__":
    main()
