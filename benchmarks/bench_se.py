"""Benchmark of the fused Squeeze-and-Excitation op against eager and compiled PyTorch.

Run from the repository root, with the extension built:

    python benchmarks/bench_se.py                       # --quick: cpu-quick set, float32, NCHW
    python benchmarks/bench_se.py --full                # + bfloat16/float16, channels_last, epilogue
    python benchmarks/bench_se.py --shape-set efficientnet-b0 --modes forward
    python benchmarks/bench_se.py --shapes 128x64x32x32 --dtypes bfloat16 --layouts channels_last
    python benchmarks/bench_se.py --device cuda --shape-set imagenet-se-resnet50 --tag baseline
    python -m pytest benchmarks --benchmark-only        # the same workloads under pytest-benchmark

Shape sets (--shape-set; benchmarks/shapes.py): cpu-quick (default), cifar-se-resnet18,
imagenet-se-resnet50, efficientnet-b0, mobilenet-v3-large (both derived from torchvision's
model definitions), sweep. A site is (N, C, H, W, S, activation, gate); tables write it
NxCxHxW/S and give how often it occurs in the model ("uses"). --shapes NxCxHxW ... runs plain
relu/sigmoid sites with S = C // 16 instead.

Modes (--modes; all three by default):
    forward   inference: the forward pass under torch.no_grad()
    backward  the backward pass alone: torch.autograd.grad(y, leaves, dy) (leaves: x, the
              residual, the weights), y from a forward made untimed right before each call
              (not one graph reused with retain_graph=True: see make_workload)
    full      training step: y = module(x, residual) and torch.autograd.grad(y, leaves, dy)
Providers (--providers to pick; eager is always run, it is the baseline):
    eager      se_kernels.reference.ReferenceSE, the math and parameter layout of
               torchvision.ops.SqueezeExcitation (adaptive_avg_pool2d + 1x1 convs)
    compile    torch.compile(ReferenceSE(...), dynamic=False), mode from --compile-mode
    <backend>  se_kernels.FusedSE(backend=<backend>) for every backend available on the device
               except "torch" (the eager reference again): "cpu" on a CPU ("triton" there only
               when asked for by --providers: on a CPU it is Triton's interpreter)
Variants: --dtypes float32 bfloat16 float16 (default float32 on CPU, float32 bfloat16 on CUDA),
--layouts nchw channels_last (default nchw), --epilogue none residual_relu (default none;
residual_relu adds a residual input and out_activation="relu"). Weights are in the same dtype
as x; all providers of a case share weights and inputs.

Presets: --quick (the default) = cpu-quick, float32, NCHW, no epilogue, all three modes; on
the 2-core VM this was written on it takes ~50 s with a warm inductor cache and ~2 min with
a cold one. --full = every dtype, layout and epilogue of the chosen set (12 variants; ~10 min
warm on cpu-quick there, more with a cold cache). Options given explicitly override the preset.

What is reported, per (case, mode, provider): median per-call time with the 20th/80th
percentiles, GB/s of floor bytes, the fraction of floor, the speedups over eager and over
compile, and the peak memory, in MiB and in units of |x| (the bytes of x); per variant and
mode the geometric mean of the speedups over the sites (and, for the sets derived from a
model, the SE time of one batch through the model: sum over sites of uses x median).

Floor: SE is memory bound, so each time is set against the bytes any implementation must move
(floor_bytes: forward 2|x|, backward 3|x|, full 5|x|; the epilogue adds |x| to forward and
backward) at the bandwidth y.copy_(x) reaches on the same tensor, timed in the same rounds.
"fraction of floor" 1.0 means as fast as copying those bytes.

Peak memory: the high-water mark of bytes allocated during one call above what was live when
it started (inputs, weights and, in backward mode, the graph with its saved tensors are not
counted; the outputs and gradients are; in backward mode what the backward frees of the saved
tensors counts against what it allocates). CUDA: torch.cuda.max_memory_allocated() after
reset_peak_memory_stats(), minus memory_allocated() before the call. CPU, which has no
allocator statistics: one call under torch.profiler.profile(activities=[CPU],
profile_memory=True); its memory events (one per allocation, +bytes, and per free, -bytes)
are walked in time order, accumulating bytes, and the maximum of the running sum is the peak.

Method: each provider's first call per mode is made and timed on its own (for compile it
compiles; the times are reported with inductor's FX-graph cache hits and misses, never mixed
into the timings). Then every provider is checked against eager (y and every gradient): a
se_kernels backend out of tolerance aborts the run (timing a wrong kernel is worthless);
torch.compile out of tolerance is a PyTorch baseline's numerics, reported under "accuracy
notes" and still timed (seen: inductor's bfloat16 d_fc1.bias on CPU, 4x eager's error). float32: elementwise |got - eager| <=
1e-5 + 1e-4 |eager| (tensor-wise for the bias gradients, see RTOL). bfloat16/float16: the
DESIGN rule, max |got - ref| <= 2 max |eager - ref| + atol max |ref| against a float64 reference,
atol 8e-3 (bfloat16) / 1e-3 (float16), as tests/test_kernels.py. Then the providers and the
copy are timed in interleaved rounds: round r calls every workload once, in an order rotated by
r, so machine drift hits all of them alike; the number of rounds adapts to the speed of the case
(TARGET_S of measured time per provider, between MIN_ROUNDS and MAX_ROUNDS). CPU times are
time.perf_counter around the call; CUDA times are events around it (TF32 is switched off so
that every provider computes float32 in float32).

Settings that shape the numbers:
- malloc: on glibc the script makes freed memory stay with the process (keep_freed_memory), so
  a call does not pay page faults for freshly mapped output pages; --system-malloc opts out.
- torch.compile compiles each case statically (dynamic=False), two graphs per case (no_grad
  and training); inductor's on-disk caches (TORCHINDUCTOR_CACHE_DIR, else
  /tmp/torchinductor_$USER) make later runs much faster to start. --compile-mode max-autotune
  also uses CUDA graphs on a GPU (not yet run there).
- a busy machine: when other processes compete for the cores, a multi-threaded call stalls
  each time one of its threads is descheduled, so eager (several parallel ops per call) loses
  more than a fused kernel (one), and times and speedups inflate several-fold (seen on the
  2-core VM: every parallel call took a multiple of ~8 ms). The header reports how many CPUs
  other processes kept busy during the timed rounds (from /proc/stat, minus this process's
  CPU time) and warns from OTHER_CORES_WARNING on; --threads 1 gives sane numbers there.

Outputs: the tables on stdout, a progress bar on stderr, and (unless --no-save) under
--results-dir (default benchmarks/results/) a CSV, a markdown report (with the exact command,
machine, torch version, threads, malloc setting and date) and a PNG plot, named
{device-slug}_{YYYY-MM-DD}_{shape-set}[_{tag}].{csv,md,png}, e.g. cpu-amd-epyc_2026-11-29_cpu-quick.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import ctypes
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch._dynamo.utils import counters
from tqdm import tqdm

from se_kernels import FusedSE, available_backends
from se_kernels.reference import ReferenceSE
from shapes import SHAPE_SETS, ShapeSet, Site, custom_set, shape_set

MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
EPILOGUES = ("none", "residual_relu")
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs")
PARAMETERS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
BASELINES = ("eager", "compile")  # the peers every provider is compared with
# torch.compile's backend. tests/test_bench_smoke.py switches it to "aot_eager" (dynamo and
# AOTAutograd without inductor's C++ codegen, seconds instead of ~20 s cold): there the
# harness is under test, not inductor.
COMPILE_BACKEND = "inductor"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The float32 correctness guard against eager: elementwise |got - eager| <= ATOL + RTOL |eager|
# for y, d_x, d_residual and the weight gradients. The bias gradients are sums over N*H*W
# terms (up to ~1e5) that nearly cancel in places, and float32 rounding in another summation
# order moves single elements past that bound (eager's own error against float64 reaches
# half of it; compile's and cpu's reach 1-2x of it against eager on the cpu-quick shapes), so
# they are compared tensor-wise: max |got - eager| <= ATOL + RTOL max |eager|.
RTOL, ATOL = 1e-4, 1e-5
TENSORWISE = ("d_fc1.bias", "d_fc2.bias")
# bfloat16/float16: error against float64 at most 2x eager's own plus this atol, both relative
# to max |reference| (the tolerance rules of tests/conftest.py and tests/test_kernels.py).
LOW_PRECISION_ATOL = {"bfloat16": 8e-3, "float16": 1e-3}

TARGET_S = 0.5  # measured time per provider per (case, mode)
MIN_ROUNDS, MAX_ROUNDS = 10, 200
WARMUP_ROUNDS = 3  # after the first call and the check; timed only to choose the rounds
COPY = "copy"  # the name of the copy workload in the timing rounds; not a provider
OTHER_CORES_WARNING = 0.2  # CPUs kept busy by other processes during the timed rounds


class MismatchError(RuntimeError):
    """A provider's result differs from eager's beyond the tolerance."""


# ---------------------------------------------------------------------------------------
# Cases: a site (shape, S, activation, gate) in a variant (dtype, layout, epilogue)


@dataclass(frozen=True)
class Variant:
    dtype: str = "float32"
    layout: str = "nchw"
    epilogue: str = "none"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def residual(self) -> bool:
        return self.epilogue == "residual_relu"

    @property
    def label(self) -> str:
        return f"{self.dtype}, {self.layout}, {'residual + relu' if self.residual else 'no epilogue'}"


@dataclass(frozen=True)
class Case:
    site: Site
    variant: Variant

    @property
    def x_bytes(self) -> int:
        return math.prod(self.site.shape) * self.variant.torch_dtype.itemsize


def make_cases(sites: Sequence[Site], dtypes: Sequence[str], layouts: Sequence[str],
               epilogues: Sequence[str]) -> List[Case]:
    """Variant-major, so each variant's sites run (and are tabulated) together."""
    return [Case(site, Variant(dtype, layout, epilogue))
            for dtype in dtypes for layout in layouts for epilogue in epilogues for site in sites]


# ---------------------------------------------------------------------------------------
# Providers: name -> factory of the module to time, given the case and eager's weights


ProviderFactory = Callable[[Case, Dict[str, torch.Tensor], torch.device], nn.Module]


def se_options(case: Case) -> Dict[str, Optional[str]]:
    return dict(activation=case.site.activation, gate=case.site.gate,
                out_activation="relu" if case.variant.residual else None)


def _placed(module: nn.Module, state: Dict[str, torch.Tensor], case: Case, device: torch.device) -> nn.Module:
    module.load_state_dict(state)
    return module.to(device=device, dtype=case.variant.torch_dtype)


def eager_provider(case: Case, state: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    return _placed(ReferenceSE(case.site.c, case.site.s, **se_options(case)), state, case, device)


def compile_provider(mode: str) -> ProviderFactory:
    def make(case: Case, state: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
        # dynamic=False: every shape gets its own static graph, as in a static-shape model;
        # without it dynamo would recompile the second shape with symbolic sizes.
        return torch.compile(eager_provider(case, state, device), backend=COMPILE_BACKEND,
                             dynamic=False, mode=None if mode == "default" else mode)
    return make


def fused_provider(backend: str) -> ProviderFactory:
    def make(case: Case, state: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
        module = FusedSE(case.site.c, case.site.s, **se_options(case), backend=backend)
        return _placed(module, state, case, device)
    return make


def provider_registry(device: torch.device, compile_mode: str = "default") -> Dict[str, ProviderFactory]:
    """eager and compile first (the baselines), then one provider per native backend."""
    registry: Dict[str, ProviderFactory] = {"eager": eager_provider, "compile": compile_provider(compile_mode)}
    for backend in available_backends(device.type):
        if backend != "torch":  # the "torch" backend is the eager reference again
            registry[backend] = fused_provider(backend)
    return registry


def build_modules(case: Case, device: torch.device, providers: Sequence[str],
                  compile_mode: str = "default") -> Dict[str, nn.Module]:
    """The modules of `providers` (eager always first) for one case, with shared weights.
    Resets dynamo, so the case's two compiled graphs (no_grad, training) stay within the
    recompile limit however many cases run; inductor's on-disk caches survive the reset."""
    torch.manual_seed(0)
    state = ReferenceSE(case.site.c, case.site.s, **se_options(case)).state_dict()
    torch._dynamo.reset()
    registry = provider_registry(device, compile_mode)
    names = ["eager"] + [p for p in providers if p != "eager"]
    return {name: registry[name](case, state, device) for name in names}


# ---------------------------------------------------------------------------------------
# Inputs, byte counts, workloads


@dataclass
class Inputs:
    x: torch.Tensor  # requires grad; under no_grad (forward mode) that costs nothing
    residual: Optional[torch.Tensor]  # requires grad, like the skip branch of a ResNet block
    dy: torch.Tensor

    def to(self, dtype: torch.dtype) -> "Inputs":
        """Detached copies in another dtype (for the float64 reference), same layout."""
        def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
        return Inputs(cast(self.x), cast(self.residual), cast(self.dy))


def make_inputs(case: Case, device: torch.device) -> Inputs:
    """Drawn in float32 from a fixed seed, so every dtype sees the same values."""
    generator = torch.Generator().manual_seed(1)

    def tensor(requires_grad: bool) -> torch.Tensor:
        t = torch.randn(case.site.shape, generator=generator).to(device=device, dtype=case.variant.torch_dtype)
        return t.contiguous(memory_format=LAYOUTS[case.variant.layout]).requires_grad_(requires_grad)

    residual = tensor(True) if case.variant.residual else None
    return Inputs(x=tensor(True), residual=residual, dy=tensor(False))


def floor_bytes(case: Case, mode: str) -> int:
    """Bytes any implementation must move, in units of |x| (the bytes of x):
    forward:  read x, write y (2); with the epilogue also read the residual (3).
    backward: read dy and x, write dx (3); with the epilogue also write d_residual (4). The
              relu epilogue's backward also needs to know where y > 0 (at least one bit per
              element, |x| / 32 for float32); that is left out of the floor.
    full:     forward + backward: 5, or 7 with the epilogue.
    The (N, C) and (N, S) vectors and the weights are negligible next to |x| and not counted.
    """
    forward = 3 if case.variant.residual else 2
    backward = 4 if case.variant.residual else 3
    units = {"forward": forward, "backward": backward, "full": forward + backward}[mode]
    return units * case.x_bytes


def leaves_of(module: nn.Module, inputs: Inputs) -> Dict[str, torch.Tensor]:
    """What gradients are taken for: the weights, x and the residual."""
    leaves = {name: module.get_parameter(name) for name in PARAMETERS}
    leaves["x"] = inputs.x
    if inputs.residual is not None:
        leaves["residual"] = inputs.residual
    return leaves


@dataclass
class Workload:
    run: Callable[[], object]  # the timed call
    prepare: Callable[[], None] = lambda: None  # untimed, right before each call


def grad_mode(mode: str) -> contextlib.AbstractContextManager:
    """The grad mode a mode's workload is built and timed under."""
    return torch.no_grad() if mode == "forward" else torch.enable_grad()


def make_workload(module: nn.Module, inputs: Inputs, mode: str) -> Workload:
    """The call to time, for use under grad_mode(mode). Gradients are returned, never
    accumulated into .grad. In backward mode, `prepare` runs the forward (untimed) and `run`
    is the backward of that graph alone, as in training: without retain_graph, which
    torch.compile refuses for backward graphs that donate buffers (whether they do depends
    on the state of its caches) and which would keep the saved tensors from being freed."""
    call = lambda: module(inputs.x, inputs.residual)  # noqa: E731
    if mode == "forward":
        return Workload(run=call)
    leaves = list(leaves_of(module, inputs).values())
    if mode == "full":
        return Workload(run=lambda: torch.autograd.grad(call(), leaves, inputs.dy))
    graph: List[torch.Tensor] = []

    def prepare() -> None:
        graph[:] = [call()]

    return Workload(run=lambda: torch.autograd.grad(graph.pop(), leaves, inputs.dy), prepare=prepare)


def copy_workload(inputs: Inputs) -> Tuple[Workload, int]:
    """y.copy_(x) into a preallocated y like x, and the bytes it moves (2|x|)."""
    x = inputs.x.detach()
    y = torch.empty_like(x)
    return Workload(run=lambda: y.copy_(x)), 2 * x.numel() * x.element_size()


# ---------------------------------------------------------------------------------------
# Correctness guard


def results_of(module: nn.Module, inputs: Inputs, mode: str) -> Dict[str, torch.Tensor]:
    """y, and outside forward mode every gradient, of one call made the way the workloads make
    it (backward and full mode compute the same things)."""
    if mode == "forward":
        with torch.no_grad():
            return {"y": module(inputs.x, inputs.residual)}
    leaves = leaves_of(module, inputs)
    with torch.enable_grad():
        y = module(inputs.x, inputs.residual)
        grads = torch.autograd.grad(y, list(leaves.values()), inputs.dy)
    return {"y": y.detach(), **{"d_" + name: g for name, g in zip(leaves, grads)}}


def float32_error(name: str, got: torch.Tensor, eager: torch.Tensor) -> Optional[str]:
    """None if got matches eager within RTOL/ATOL (tensor-wise for TENSORWISE), else why not."""
    scale = eager.abs().max() if name in TENSORWISE else eager.abs()
    excess = (got - eager).abs() / (ATOL + RTOL * scale)  # > 1: out of tolerance
    if excess.max() <= 1:  # False for NaN too
        return None
    worst = int(excess.nan_to_num(math.inf).argmax())
    return (f"differs from eager beyond rtol={RTOL}, atol={ATOL}"
            f"{' (tensor-wise)' if name in TENSORWISE else ''} at flat index {worst}: got "
            f"{got.flatten()[worst].item():.7g}, eager {eager.flatten()[worst].item():.7g}")


def low_precision_error(got: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: str) -> Optional[str]:
    """None if max |got - ref| <= 2 max |eager - ref| + atol, all relative to max |ref|."""
    scale = max(ref.abs().max().item(), 1e-30)
    ours = (got.double() - ref).abs().max().item() / scale
    theirs = (eager.double() - ref).abs().max().item() / scale
    bound = 2 * theirs + LOW_PRECISION_ATOL[dtype]
    if ours <= bound:  # False for NaN too
        return None
    return (f"error vs float64 {ours:.3g} (relative to max |ref|) exceeds 2 x eager's "
            f"{theirs:.3g} + {LOW_PRECISION_ATOL[dtype]}")


def check_against_eager(modules: Dict[str, nn.Module], inputs: Inputs, mode: str, case: Case) -> List[str]:
    """Check every provider against eager (see the module docstring). A se_kernels backend out
    of tolerance raises MismatchError; torch.compile, a baseline whose numerics are PyTorch's
    (inductor on CPU keeps some bfloat16 intermediates eager does not), only yields a note for
    the report. Returns the notes."""
    eager = results_of(modules["eager"], inputs, mode)
    dtype = case.variant.dtype
    if dtype != "float32":
        reference = results_of(copy.deepcopy(modules["eager"]).double(), inputs.to(torch.float64), mode)
    notes = []
    for provider, module in modules.items():
        if provider == "eager":
            continue
        got = results_of(module, inputs, mode)
        for name, want in eager.items():
            actual = got.get(name)
            if actual is None or actual.shape != want.shape or actual.dtype != want.dtype:
                problem = (f"is {None if actual is None else (tuple(actual.shape), actual.dtype)}, "
                           f"eager gives {(tuple(want.shape), want.dtype)}")
            elif dtype == "float32":
                problem = float32_error(name, actual, want)
            else:
                problem = low_precision_error(actual, want, reference[name], dtype)
            if not problem:
                continue
            where = f"{provider} {case.site.label} {case.variant.label} {mode}: {name} {problem}"
            if provider not in BASELINES:
                raise MismatchError(f"{where}; not benchmarking a wrong kernel")
            notes.append(f"{where} (a PyTorch baseline: reported, still timed)")
    return notes


# ---------------------------------------------------------------------------------------
# Timing and memory


L2_FLUSH_BYTES = 256 * 2**20  # over any GPU's L2 (H100/H200: 50 MB)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(workloads: Dict[str, Workload], rounds: int, device: torch.device) -> Dict[str, List[float]]:
    """Per-call seconds of each workload over `rounds` interleaved rounds; round r runs every
    workload once, starting at the r-th (rotating order). CPU: time.perf_counter around the
    call. CUDA: events around the call on the current stream (after an L2 flush), read after
    each round."""
    names = list(workloads)
    times: Dict[str, List[float]] = {name: [] for name in names}
    # On a GPU, every call starts with a cold L2 (as triton.testing.do_bench does): a write of
    # L2_FLUSH_BYTES before the start event evicts what the previous call left, or the smaller
    # shapes (4 MiB CIFAR maps) would time at L2 speed. Not counted: it precedes the event.
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None
    for r in range(rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        if device.type == "cuda":
            events = []
            for name in order:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                workloads[name].prepare()
                flush.zero_()
                start.record()
                workloads[name].run()
                end.record()
                events.append((name, start, end))
            torch.cuda.synchronize(device)
            for name, start, end in events:
                times[name].append(start.elapsed_time(end) / 1e3)
        else:
            for name in order:
                workloads[name].prepare()
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


@dataclass
class CpuUsage:
    """Seconds of wall-clock time, of CPU time of this process (all its threads) and of busy
    CPU time of the whole machine (/proc/stat; nan where there is none)."""
    wall: float = 0.0
    own: float = 0.0
    machine: float = 0.0

    @classmethod
    def now(cls) -> "CpuUsage":
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
            machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            machine = math.nan
        return cls(time.perf_counter(), time.process_time(), machine)

    def __add__(self, other: "CpuUsage") -> "CpuUsage":
        return CpuUsage(self.wall + other.wall, self.own + other.own, self.machine + other.machine)

    def __sub__(self, other: "CpuUsage") -> "CpuUsage":
        return CpuUsage(self.wall - other.wall, self.own - other.own, self.machine - other.machine)

    @property
    def other_cores(self) -> float:
        """CPUs that other processes kept busy, on average."""
        return (self.machine - self.own) / self.wall if self.wall > 0 else math.nan


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side (kineto) logs a few lines
    there on every start and stop, through any log-level setting."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(workload: Workload, device: torch.device) -> int:
    """The high-water mark of bytes allocated during one call of `workload` above what was
    live when it started; see "Peak memory" in the module docstring."""
    workload.prepare()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        workload.run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with stderr_silenced(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        workload.run()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # allocations > 0, frees < 0 (also of
        # tensors allocated before the call, such as the saved tensors the backward releases)
        live += event.nbytes()
        peak = max(peak, live)
    return peak


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


def choose_malloc(system_malloc: bool) -> str:
    """Apply the malloc setting (see keep_freed_memory) and describe it."""
    preloaded = [lib for lib in ("jemalloc", "tcmalloc") if lib in os.environ.get("LD_PRELOAD", "")]
    if preloaded:
        return f"{preloaded[0]} (LD_PRELOAD)"
    if system_malloc:
        tunables = os.environ.get("GLIBC_TUNABLES")
        return "glibc defaults (--system-malloc)" + (f", GLIBC_TUNABLES={tunables}" if tunables else "")
    if keep_freed_memory():
        return "glibc, freed memory kept for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2GiB)"
    return "system defaults (mallopt unavailable)"


# ---------------------------------------------------------------------------------------
# One case


@dataclass
class Row:
    shape_set: str
    site: str  # NxCxHxW/S
    count: int
    activation: str
    gate: str
    dtype: str
    layout: str
    epilogue: str
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
    speedup_vs_compile: float  # nan when compile was not run
    peak_mib: float
    peak_over_x: float

    @property
    def variant(self) -> Variant:
        return Variant(self.dtype, self.layout, self.epilogue)


@dataclass
class CompileTime:
    site: str
    variant: str
    mode: str
    seconds: float
    fx_cache_hits: int
    fx_cache_misses: int


@dataclass
class CopyBandwidth:
    site: str
    variant: str
    mode: str
    median_ms: float
    gbps: float


@dataclass
class Results:
    rows: List[Row] = field(default_factory=list)
    compiles: List[CompileTime] = field(default_factory=list)
    copies: List[CopyBandwidth] = field(default_factory=list)
    accuracy_notes: List[str] = field(default_factory=list)  # baselines out of tolerance
    timed_cpu: CpuUsage = field(default_factory=CpuUsage)  # over the timed rounds

    def extend(self, other: "Results") -> None:
        self.rows += other.rows
        self.compiles += other.compiles
        self.copies += other.copies
        self.accuracy_notes += other.accuracy_notes
        self.timed_cpu += other.timed_cpu


def first_calls(modules: Dict[str, nn.Module], inputs: Inputs, mode: str, device: torch.device,
                case: Case) -> Tuple[Dict[str, Workload], Optional[CompileTime]]:
    """Each provider's workload, built and called once (under grad_mode(mode)); the compile
    provider's build + first call, which compile, are timed, with inductor's FX graph cache
    hits and misses, which tell a cold compile from one served by the on-disk cache."""
    workloads: Dict[str, Workload] = {}
    compile_time = None
    for name, module in modules.items():
        before = dict(counters["inductor"])
        t0 = time.perf_counter()
        workloads[name] = make_workload(module, inputs, mode)
        workloads[name].prepare()
        workloads[name].run()
        synchronize(device)
        if name == "compile":
            after = counters["inductor"]
            compile_time = CompileTime(
                case.site.label, case.variant.label, mode, time.perf_counter() - t0,
                fx_cache_hits=after["fxgraph_cache_hit"] - before.get("fxgraph_cache_hit", 0),
                fx_cache_misses=after["fxgraph_cache_miss"] - before.get("fxgraph_cache_miss", 0))
    return workloads, compile_time


def make_rows(case: Case, mode: str, shape_set_name: str, summaries: Dict[str, Summary],
              peaks: Dict[str, int], bandwidth: float) -> List[Row]:
    floor = floor_bytes(case, mode)
    peer = {name: summaries[name].median_s if name in summaries else math.nan for name in BASELINES}
    return [Row(
        shape_set=shape_set_name, site=case.site.label, count=case.site.count,
        activation=case.site.activation, gate=case.site.gate, dtype=case.variant.dtype,
        layout=case.variant.layout, epilogue=case.variant.epilogue, mode=mode, provider=name,
        calls=s.calls, median_ms=s.median_s * 1e3, p20_ms=s.p20_s * 1e3, p80_ms=s.p80_s * 1e3,
        floor_bytes=floor, copy_gbps=bandwidth / 1e9, gbps=floor / s.median_s / 1e9,
        fraction_of_floor=floor / bandwidth / s.median_s,
        speedup_vs_eager=peer["eager"] / s.median_s, speedup_vs_compile=peer["compile"] / s.median_s,
        peak_mib=peaks[name] / 2**20, peak_over_x=peaks[name] / case.x_bytes,
    ) for name, s in summaries.items()]


def bench_case(case: Case, modes: Sequence[str], providers: Sequence[str], device: torch.device,
               shape_set_name: str, compile_mode: str = "default",
               progress: Optional[tqdm] = None) -> Results:
    """Rows for every (mode, provider) of one case, torch.compile's first calls and the copy
    bandwidth. The copy runs in the same interleaved rounds as the providers, one more
    workload in the rotation, so it sees the same machine state."""
    modules = build_modules(case, device, providers, compile_mode)
    inputs = make_inputs(case, device)
    copy_run, copy_bytes = copy_workload(inputs)
    results = Results()
    checked = set()  # backward and full mode compute the same results: check them once
    for mode in modes:
        if progress is not None:
            progress.set_description(f"{case.site.label} {case.variant.dtype} {case.variant.layout} "
                                     f"{case.variant.epilogue} {mode}")
        with grad_mode(mode):
            workloads, compile_time = first_calls(modules, inputs, mode, device, case)
            kind = "outputs" if mode == "forward" else "gradients"
            if kind not in checked:
                results.accuracy_notes += check_against_eager(modules, inputs, mode, case)
                checked.add(kind)
            peaks = {name: peak_memory_bytes(w, device) for name, w in workloads.items()}
            workloads[COPY] = copy_run
            warmup = measure(workloads, WARMUP_ROUNDS, device)
            rounds = rounds_for({name: t for name, t in warmup.items() if name != COPY})
            before = CpuUsage.now()
            times = measure(workloads, rounds, device)
            results.timed_cpu += CpuUsage.now() - before
        if compile_time is not None:
            results.compiles.append(compile_time)
        copy_s = statistics.median(times.pop(COPY))
        bandwidth = copy_bytes / copy_s
        results.copies.append(CopyBandwidth(case.site.label, case.variant.label, mode, copy_s * 1e3, bandwidth / 1e9))
        summaries = {name: summarize(t) for name, t in times.items()}
        results.rows += make_rows(case, mode, shape_set_name, summaries, peaks, bandwidth)
        if progress is not None:
            progress.set_postfix_str(f"{rounds} rounds" + (
                f", compile first call {compile_time.seconds:.1f} s" if compile_time else ""))
            progress.update()
    return results


# ---------------------------------------------------------------------------------------
# Run description


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slugify(name: str) -> str:
    """A CPU or GPU name for file names: "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz" ->
    "intel-xeon-platinum-8375c", "AMD EPYC 7763 64-Core Processor" -> "amd-epyc-7763"."""
    name = re.sub(r"\((r|tm)\)|@.*$|\b(cpu|processor)\b|\b\d+-core\b", " ", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """e.g. cpu-amd-epyc, cuda-nvidia-h200."""
    return f"{device.type}-{slugify(device_name(device))}"


def source_version() -> str:
    """The git commit of the checkout this runs from, "+ uncommitted changes" when tracked
    source files differ from it; "unknown" outside a git checkout."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        # results files and the README they feed are not source
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results", ":!README.md"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"git {sha}" + (" + uncommitted changes" if dirty else "")


@dataclass
class RunInfo:
    command: str
    date: str
    machine: str
    device: str
    torch: str
    source: str  # source_version() when the run started
    threads: int
    malloc: str
    shape_set: ShapeSet
    compile_mode: str
    providers: List[str]
    other_cores: float = math.nan  # set with wall_s when the run is over
    wall_s: float = math.nan

    def header(self) -> List[Tuple[str, str]]:
        """(key, value) lines describing the run, for the terminal and the markdown file."""
        items = [
            ("date", self.date),
            ("machine", f"{self.machine}, torch threads {self.threads}"),
            ("device", self.device),
            ("torch", self.torch),
            ("source", self.source),
            ("malloc", self.malloc),
            ("others", f"other processes kept {self.other_cores:.2f} of the {os.cpu_count()} CPUs busy "
                       "during the timed rounds (/proc/stat)"),
            ("shape set", f"{self.shape_set.name}: {self.shape_set.description}"),
            ("providers", ", ".join(f"compile (mode {self.compile_mode})" if p == "compile" else p
                                    for p in self.providers)),
            ("wall time", f"{self.wall_s:.1f} s after imports"),
        ]
        if self.other_cores >= OTHER_CORES_WARNING:
            items.append(("WARNING", "other processes competed for the cores. Then a "
                          "multi-threaded call stalls whenever one of its threads is descheduled (eager, "
                          "with more parallel ops per call, more often), which inflates times and speedups: "
                          "rerun on an idle machine or with --threads 1."))
        return items


ROOT = Path(__file__).resolve().parent.parent


def repo_command(environ, keys: Sequence[str], argv: Sequence[str], script: str = __file__) -> str:
    """The command that reproduces this run, from the repository root: the settings among `keys`
    (a preloaded library by its name, found on the loader's path), the interpreter (relative
    when it is the repository's .venv, else `python`) and the script relative to the root. No
    machine paths and no caches: results record only what changes the numbers."""
    env = []
    for k in keys:
        if k in environ:
            v = environ[k]
            if k == "LD_PRELOAD":
                v = " ".join(os.path.basename(part) for part in v.split())
            env.append(f"{k}={shlex.quote(v)}")
    exe = Path(sys.executable)
    python = os.path.relpath(exe, ROOT) if ROOT in exe.absolute().parents else "python"
    return " ".join(env + [shlex.join([python, os.path.relpath(Path(script).resolve(), ROOT), *argv])])


def run_info(argv: Sequence[str], device: torch.device, malloc: str, shapes: ShapeSet,
             compile_mode: str, providers: List[str]) -> RunInfo:
    return RunInfo(
        command=repo_command(os.environ, ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF", "SE_KERNELS_BACKEND",
                                          "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"), argv),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=f"{platform.node()}, {cpu_model()}, {os.cpu_count()} logical CPUs",
        device=f"{device} ({device_name(device)})", torch=torch.__version__, source=source_version(),
        threads=torch.get_num_threads(), malloc=malloc, shape_set=shapes,
        compile_mode=compile_mode, providers=providers)


# ---------------------------------------------------------------------------------------
# Report: terminal, CSV, markdown, PNG


def geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def speedup(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


TABLE_COLUMNS = ("site NxCxHxW/S", "uses", "mode", "provider", "calls", "median ms", "p20-p80 ms", "GB/s",
                 "of floor", "vs eager", "vs compile", "peak MiB", "peak/|x|")
TABLE_WIDTHS = (-18, 4, -8, -8, 5, 10, 17, 7, 8, 8, 10, 9, 8)  # negative: left-aligned


def row_cells(r: Row) -> List[str]:
    return [r.site, str(r.count), r.mode, r.provider, str(r.calls), f"{r.median_ms:.3f}",
            f"{r.p20_ms:.3f}-{r.p80_ms:.3f}", f"{r.gbps:.2f}", f"{r.fraction_of_floor:.2f}",
            speedup(r.speedup_vs_eager), speedup(r.speedup_vs_compile), f"{r.peak_mib:.1f}",
            f"{r.peak_over_x:.2f}"]


def by_variant(rows: Sequence[Row]) -> Dict[Variant, List[Row]]:
    groups: Dict[Variant, List[Row]] = {}
    for r in rows:
        groups.setdefault(r.variant, []).append(r)
    return groups


def summary_lines(rows: Sequence[Row]) -> List[Tuple[str, str, str, str]]:
    """(mode, provider, geomean vs eager, geomean vs compile) over one variant's sites."""
    out = []
    for mode in dict.fromkeys(r.mode for r in rows):
        for provider in dict.fromkeys(r.provider for r in rows):
            of = [r for r in rows if r.mode == mode and r.provider == provider]
            out.append((mode, provider, speedup(geomean([r.speedup_vs_eager for r in of])),
                        speedup(geomean([r.speedup_vs_compile for r in of]))))
    return out


def model_totals(rows: Sequence[Row]) -> List[Tuple[str, str, float, str]]:
    """(mode, provider, sum of uses x median ms, speedup of that sum over eager's)."""
    out = []
    for mode in dict.fromkeys(r.mode for r in rows):
        totals = {p: sum(r.count * r.median_ms for r in rows if r.mode == mode and r.provider == p)
                  for p in dict.fromkeys(r.provider for r in rows)}
        out += [(mode, p, t, speedup(totals["eager"] / t)) for p, t in totals.items()]
    return out


def format_table(rows: Sequence[Row]) -> List[str]:
    def line(cells: Sequence[str]) -> str:
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(cells, TABLE_WIDTHS))
    header = line(TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for i, r in enumerate(rows):
        if i and (r.site, r.mode) != (rows[i - 1].site, rows[i - 1].mode):
            lines.append("")
        lines.append(line(row_cells(r)))
    return lines


def report(info: RunInfo, results: Results) -> None:
    for key, value in info.header():
        print(textwrap.fill(value, width=110, initial_indent=f"{key + ':':<11}", subsequent_indent=" " * 11))
    print("\ncopy bandwidth, y.copy_(x) moving 2|x| bytes, timed in the providers' rounds:")
    for cb in results.copies:
        print(f"  {cb.site:<18} {cb.variant:<38} {cb.mode:<8} {cb.median_ms:8.3f} ms {cb.gbps:7.2f} GB/s")
    if results.compiles:
        print("\ntorch.compile first call per mode (compiles; not in the timings):")
        for ct in results.compiles:
            print(f"  {ct.site:<18} {ct.variant:<38} {ct.mode:<8} {ct.seconds:6.2f} s   "
                  f"inductor FX graph cache: {ct.fx_cache_hits} hit, {ct.fx_cache_misses} miss")
    if results.accuracy_notes:
        print("\naccuracy notes (baselines outside the correctness guard's tolerance):")
        for note in results.accuracy_notes:
            print(textwrap.fill(note, width=110, initial_indent="  ", subsequent_indent="    "))
    for variant, rows in by_variant(results.rows).items():
        print(f"\n== {variant.label} ==")
        print("\n".join(format_table(rows)))
        print("\ngeometric mean of speedups over the sites:")
        for mode, provider, vs_eager, vs_compile in summary_lines(rows):
            print(f"  {mode:<8} {provider:<8} vs eager {vs_eager:>6}   vs compile {vs_compile:>6}")
        if info.shape_set.model:
            print(f"\nSE time of one {info.shape_set.model} batch (sum over sites of uses x median):")
            for mode, provider, total, vs_eager in model_totals(rows):
                print(f"  {mode:<8} {provider:<8} {total:9.3f} ms   vs eager {vs_eager:>6}")


def write_csv(path: Path, info: RunInfo, rows: Sequence[Row]) -> None:
    setting = {"device": info.device, "torch": info.torch, "threads": info.threads,
               "malloc": info.malloc, "compile_mode": info.compile_mode}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(setting) + [fl.name for fl in fields(Row)])
        writer.writeheader()
        for r in rows:
            writer.writerow({**setting, **asdict(r)})


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> List[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return [line(header), line(["---"] * len(header))] + [line(cells) for cells in body]


def write_markdown(path: Path, info: RunInfo, results: Results) -> None:
    lines = [f"# SE op benchmark: {info.shape_set.name} on {info.device}", "",
             f"Command: `{info.command}`", ""]
    lines += [f"- {key}: {value}" for key, value in info.header()]
    lines += ["", "Median of interleaved rounds, p20-p80 spread; GB/s of floor bytes (forward 2|x|, "
              "backward 3|x|, full 5|x|, +|x| each way with the residual epilogue); of floor = floor "
              "bytes / copy bandwidth measured in the same rounds / time; peak = high-water mark of "
              "bytes allocated during one call, in MiB and in units of |x|; uses = occurrences of "
              "the site in the model. Method: the docstring of benchmarks/bench_se.py."]
    for variant, rows in by_variant(results.rows).items():
        lines += ["", f"## {variant.label}", ""]
        lines += markdown_table(TABLE_COLUMNS, [row_cells(r) for r in rows])
        lines += ["", "Geometric mean of speedups over the sites:", ""]
        lines += markdown_table(("mode", "provider", "vs eager", "vs compile"), summary_lines(rows))
        if info.shape_set.model:
            lines += ["", f"SE time of one {info.shape_set.model} batch (sum over sites of uses x median):", ""]
            lines += markdown_table(("mode", "provider", "ms", "vs eager"),
                                    [(m, p, f"{t:.3f}", s) for m, p, t, s in model_totals(rows)])
    lines += ["", "## Copy bandwidth (y.copy_(x), in the providers' rounds)", ""]
    lines += markdown_table(("site", "variant", "mode", "ms", "GB/s"), [
        (cb.site, cb.variant, cb.mode, f"{cb.median_ms:.3f}", f"{cb.gbps:.2f}") for cb in results.copies])
    if results.accuracy_notes:
        lines += ["", "## Accuracy notes (baselines outside the correctness guard's tolerance)", ""]
        lines += [f"- {note}" for note in results.accuracy_notes]
    if results.compiles:
        lines += ["", "## torch.compile first call per mode (not in the timings)", ""]
        lines += markdown_table(("site", "variant", "mode", "seconds", "FX cache hit", "FX cache miss"), [
            (ct.site, ct.variant, ct.mode, f"{ct.seconds:.2f}", str(ct.fx_cache_hits), str(ct.fx_cache_misses))
            for ct in results.compiles])
    path.write_text("\n".join(lines) + "\n")


def speedup_pairs(providers: Sequence[str]) -> List[Tuple[str, str]]:
    """(provider, peer) for every provider over every baseline ahead of it."""
    return [(p, peer) for peer in BASELINES if peer in providers
            for p in providers if p not in BASELINES[:BASELINES.index(peer) + 1]]


def write_png(path: Path, info: RunInfo, rows: Sequence[Row]) -> None:
    """Two panels per mode, one above the other: the fraction of floor per case and provider,
    and (log scale) every provider's speedup over eager and over compile."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several_variants = len(by_variant(rows)) > 1

    def case_label(r: Row) -> str:
        if not several_variants:
            return r.site
        short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "nchw": "nchw", "channels_last": "cl"}
        return f"{r.site} {short[r.dtype]} {short[r.layout]}" + (" +res" if r.variant.residual else "")

    modes = list(dict.fromkeys(r.mode for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    cases = list(dict.fromkeys(case_label(r) for r in rows))
    table = {(case_label(r), r.mode, r.provider): r for r in rows}

    def values(mode: str, provider: str, column: str) -> List[float]:
        return [getattr(table[(c, mode, provider)], column) for c in cases]

    width = min(40.0, max(8.0, 3 + 0.13 * len(cases) * len(providers)))
    height = 3.4 if len(cases) <= 20 else 4.8  # room for the rotated labels
    fig, axes = plt.subplots(2 * len(modes), 1, figsize=(width, height * 2 * len(modes)), squeeze=False,
                             layout="constrained")
    for i, mode in enumerate(modes):
        floor_ax, speedup_ax = axes[2 * i][0], axes[2 * i + 1][0]
        _bar_panel(floor_ax, cases, [(p, values(mode, p, "fraction_of_floor")) for p in providers],
                   f"{mode}: fraction of floor (1 = as fast as copying the floor bytes)")
        _bar_panel(speedup_ax, cases, [(f"{p} vs {peer}", values(mode, p, f"speedup_vs_{peer}"))
                                       for p, peer in speedup_pairs(providers)],
                   f"{mode}: speedup (> 1: faster than the peer)", base=1.0)
        _log_ratio_axis(speedup_ax, [v for p, peer in speedup_pairs(providers)
                                     for v in values(mode, p, f"speedup_vs_{peer}")])
    fig.suptitle(f"SE op, {info.shape_set.name}, {info.device}, torch {info.torch}, {info.date[:10]}")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _log_ratio_axis(ax, ratios: Sequence[float]) -> None:
    """Log scale, ticks at powers of 2 labelled 0.5x, 1x, 2x, ..."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    finite = [r for r in ratios if r > 0 and math.isfinite(r)] or [1.0]
    low, high = min(-1, math.floor(math.log2(min(finite)))), max(1, math.ceil(math.log2(max(finite))))
    ax.set_yscale("log")
    ax.set_ylim(2.0 ** low / 1.1, 2.0 ** high * 1.1)
    ax.set_yticks([2.0 ** k for k in range(low, high + 1)])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _bar_panel(ax, cases: Sequence[str], series: Sequence[Tuple[str, Sequence[float]]], title: str,
               base: float = 0.0) -> None:
    """Grouped bars, one group per case, from `base` (1 for ratios: up = faster, down = slower)."""
    bar = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series):
        ax.bar([j + (k - (len(series) - 1) / 2) * bar for j in range(len(cases))],
               [v - base for v in values], bar, bottom=base, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)))
    rotate = 0 if len(cases) <= 6 else 30 if len(cases) <= 20 else 60
    ax.set_xticklabels(cases, rotation=rotate, ha="right" if rotate else "center", fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def results_stem(device: torch.device, date: str, shape_set_name: str, tag: Optional[str]) -> str:
    """{device-slug}_{YYYY-MM-DD}_{shape-set}[_{tag}]"""
    stem = f"{device_slug(device)}_{date[:10]}_{shape_set_name}"
    return stem + (f"_{tag}" if tag else "")


def save(results_dir: Path, stem: str, info: RunInfo, results: Results) -> List[Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = [results_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png")]
    write_csv(paths[0], info, results.rows)
    write_markdown(paths[1], info, results)
    write_png(paths[2], info, results.rows)
    return paths


# ---------------------------------------------------------------------------------------
# Command line


def parse_shape(text: str) -> Tuple[int, int, int, int]:
    try:
        n, c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxCxHxW, e.g. 128x64x32x32; got {text!r}")
    if min(n, c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be >= 1; got {text!r}")
    return n, c, h, w


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="(default) float32 (and bfloat16 on CUDA), NCHW, no epilogue, all modes")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="every dtype, layout and epilogue, all modes")
    p.set_defaults(preset="quick")
    p.add_argument("--shape-set", choices=list(SHAPE_SETS), default="cpu-quick",
                   help="named set of SE sites (benchmarks/shapes.py); default: cpu-quick")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="NxCxHxW",
                   help="relu/sigmoid sites with S = C // 16 instead of --shape-set")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: all")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                   help="default: float32 (--quick on CPU), float32 bfloat16 (--quick on CUDA), all (--full)")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), help="default: nchw (--quick), both (--full)")
    p.add_argument("--epilogue", nargs="+", choices=EPILOGUES, help="default: none (--quick), both (--full)")
    p.add_argument("--providers", nargs="+", metavar="NAME",
                   help="providers to run (eager always runs); default: all available (on a CPU "
                        "without the Triton interpreter)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile mode")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    p.add_argument("--device", default="cpu", help='"cpu" (default) or "cuda"')
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc malloc's defaults: large tensors get fresh, page-faulting "
                        "memory on every call (see keep_freed_memory)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="default: benchmarks/results")
    p.add_argument("--tag", help="suffix of the result file names")
    p.add_argument("--no-save", action="store_true", help="write no result files")
    return p.parse_args(argv)


def apply_preset(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the variant options not given explicitly from --quick / --full."""
    full = args.preset == "full"
    args.modes = ordered(args.modes or MODES, MODES)
    quick_dtypes = ["float32", "bfloat16"] if device.type == "cuda" else ["float32"]
    args.dtypes = ordered(args.dtypes or (list(DTYPES) if full else quick_dtypes), DTYPES)
    args.layouts = ordered(args.layouts or (list(LAYOUTS) if full else ["nchw"]), LAYOUTS)
    args.epilogue = ordered(args.epilogue or (list(EPILOGUES) if full else ["none"]), EPILOGUES)


def ordered(chosen: Sequence[str], canonical: Sequence[str]) -> List[str]:
    """The chosen names without duplicates, in the canonical order."""
    return [name for name in canonical if name in chosen]


def default_providers(device: torch.device) -> List[str]:
    """Every provider of the device, except "triton" on a CPU: it runs there only in Triton's
    interpreter (TRITON_INTERPRET=1, as the test suite sets), an emulator not worth timing;
    --providers triton still takes it."""
    return [p for p in provider_registry(device) if not (p == "triton" and device.type == "cpu")]


def select_providers(requested: Optional[Sequence[str]], device: torch.device) -> List[str]:
    available = list(provider_registry(device))
    if requested is None:
        return default_providers(device)
    unknown = [p for p in requested if p not in available]
    if unknown:
        raise SystemExit(f"bench_se: providers {unknown} are not available on {device}; available: {available}")
    return ordered(["eager", *requested], available)


def main(argv: Optional[Sequence[str]] = None) -> Results:
    start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_se: --device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
    if device.type == "cuda":  # every provider computes float32 in float32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    apply_preset(args, device)
    shapes = custom_set(args.shapes) if args.shapes else shape_set(args.shape_set)
    providers = select_providers(args.providers, device)
    info = run_info(argv, device, choose_malloc(args.system_malloc), shapes, args.compile_mode, providers)
    cases = make_cases(shapes.sites, args.dtypes, args.layouts, args.epilogue)

    results = Results()
    with tqdm(total=len(cases) * len(args.modes), file=sys.stderr, unit="step", dynamic_ncols=True) as progress:
        for case in cases:
            try:
                results.extend(bench_case(case, args.modes, providers, device, shapes.name,
                                          args.compile_mode, progress))
            except MismatchError as error:
                raise SystemExit(f"bench_se: {error}")

    info.other_cores, info.wall_s = results.timed_cpu.other_cores, time.perf_counter() - start
    report(info, results)
    if not args.no_save:
        paths = save(args.results_dir, results_stem(device, info.date, shapes.name, args.tag), info, results)
        print("\nwrote " + ", ".join(os.path.relpath(p) for p in paths))
    print(f"\ntotal wall time {info.wall_s:.1f} s (after imports), of which "
          f"torch.compile first calls {sum(ct.seconds for ct in results.compiles):.1f} s")
    return results


if __name__ == "__main__":
    main()
