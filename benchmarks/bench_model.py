"""What SE costs in a whole network, and how much of that FusedSE gives back.

Run from the repository root, with the extension built:

    python benchmarks/bench_model.py                      # --quick (the default): a few minutes on 2 CPU cores
    python benchmarks/bench_model.py --full --csv m.csv --md m.md
    python benchmarks/bench_model.py --device cuda --amp  # bf16 autocast + channels_last, on a GPU

The SENet paper puts SE-ResNet-50 at ~0.26% more FLOPs than ResNet-50. In time the overhead is
larger, because SE (pool, two tiny FCs, a full-tensor scale, then the residual add + ReLU) moves
the block's output tensor through memory several times and does almost no arithmetic. This
script measures that overhead and how much of it se_kernels.FusedSE removes. (On a small CPU,
where the convolutions run at tens of GFLOP/s, the overhead is a few percent of a step, the
same order as the noise of a shared machine: read the p20/p80 brackets and the verdict's
"beyond the noise" before the medians.)

Models (se_kernels.models; the same seed gives the same weights to every SE variant):
    cifar     ResNet-18 / SE-ResNet-18, 32x32 inputs, 10 classes, 3x3 stem
    imagenet  ResNet-50 / SE-ResNet-50, 224x224 inputs, 1000 classes
Workloads, on one fixed random batch and labels:
    train     forward, cross-entropy, backward and an SGD step (lr --lr, momentum 0.9), timed
              as one call; opt.zero_grad(set_to_none=True) runs untimed before it
    infer     the forward in eval mode under torch.no_grad(); BatchNorm running statistics are
              first set from one training-mode pass over the batch, so eval-mode activations
              have the scale they would have in a trained net
Variants of each model:
    noSE           the ResNet without SE (se=None)
    reference      SE-ResNet with the eager, unfused SE (se="reference")
    fused          SE-ResNet with FusedSE: SE + residual add + ReLU in one call (se="fused")
    compiled       torch.compile(reference model), default mode, dynamic=False
    compiled-noSE  torch.compile(noSE model), wherever the compiled variant runs (unless
                   --no-compile-baseline): compile also fuses the rest of the network (BN, ReLU,
                   adds), so the overhead of SE *under compile* is compiled vs compiled-noSE;
                   compiled vs eager noSE mixes SE's cost with what compile saves elsewhere.
                   Both are reported.
Only the model's forward is compiled; the loss, backward driver and optimizer step are the
same eager code for every variant.

Reported per (model, workload, variant): the median time of a call and its 20th-80th
percentiles; per SE variant the SE overhead (t_SE - t_noSE) / t_noSE from the medians and,
in brackets, the 20th-80th percentiles of the per-round paired overhead (t_SE and t_noSE of the
same round, which cancels drift between rounds); and the headline
    removed = 1 - overhead_fused / overhead_reference
the part of eager SE's overhead that FusedSE takes away. The issue's target is removed >= 0.5
("FusedSE cuts the eager SE overhead at least in half"). Each (model, workload) gets a verdict:
UNRESOLVED when eager SE's own overhead is not clear of the noise (its paired p20 <= 0: in a
fifth of the rounds or more eager SE was no slower than noSE); otherwise YES or NO by the
medians, and whether that holds beyond the noise (the removed fraction recomputed from the
p20/p80 paired overheads at their pessimistic or optimistic ends). A last line answers the
issue's question over all cases: YES, NO, or NOT SHOWN by this run.

Method (as benchmarks/bench_se.py, whose helpers this imports): per (model, workload) every
variant is built, then called once (for the compiled variants this compiles: that first call
is timed and reported on its own, with inductor's FX graph cache hits and misses, and never
enters the timings); then a correctness guard compares the fused and compiled variants with the
eager reference (inference: logits; training: the loss and the gradients of the first step)
and aborts on a mismatch; then --warmup-rounds untimed rounds (quick: none, the first call is
the warm-up; full: 1); then interleaved rounds (round r runs every variant once, in an order
rotated by r, in whole rotations so every variant takes every position equally often) until
each variant has about --target-s seconds of measured time or the rounds have taken
--case-budget-s, between --min-rounds and --max-rounds rounds. CPU: time.perf_counter around the call; CUDA:
CUDA events around the call, read after each round (bench_se.measure).

--quick (the default) vs --full on a CPU:
    quick  CIFAR batch 32, ImageNet batch 8, ~10 s measured per variant, but no more than ~40 s
           of timed rounds per (model, workload) (at least 5 rounds, at most 40);
           torch.compile for the CIFAR model only. Batch 32, not 128, because one SE-ResNet-18
           training step at batch 128 takes ~5 s here: 5 variants x 5 rounds alone would be
           two minutes. With inductor's on-disk cache warm the whole run took 3m40s-4m35s on
           the 2-core VM this was written on (1-min load average 1.3-2), but ~10 minutes while
           another job kept both cores busy (load 3-4): steps then took up to 5x longer, and the
           40 s cap cannot cut below the minimum of 5 rounds. The first run on a machine also
           compiles from scratch (see "compile cost" below).
    full   CIFAR batch 128 (the issue's workload), ImageNet batch 8, ~30 s measured per variant
           (10-200 rounds, no time cap), torch.compile for both models.
On CUDA both modes use CIFAR batch 128 and ImageNet batch 64 and compile both models.
--cifar-batch, --imagenet-batch, --compile-models, --target-s, --min-rounds, --max-rounds and
--case-budget-s override any of these.

Compile cost on the 2-core VM (float32, CPU, default mode, measured while writing this, on a
machine shared with other jobs, so only roughly): SE-ResNet-18 at batch 32 took ~87 s for the
training graph and ~35 s for the inference graph with an empty inductor cache (ResNet-18: ~40 s
and ~25 s), and 2-12 s each with a warm one (TORCHINDUCTOR_CACHE_DIR, else
/tmp/torchinductor_$USER, kept across runs). SE-ResNet-50 at batch 8 took ~155 s (training)
and ~52 s (inference) cold, ResNet-50 ~148 s and ~52 s: ~7 minutes, more than the whole quick
budget, so quick mode skips the ImageNet compile on a CPU and says so in the output; --full or
--compile-models cifar imagenet include it. A new batch size is a new graph: it compiles cold
once. The first quick run on a machine therefore takes ~3 minutes longer than later ones.

Malloc: as bench_se.py, glibc keeps freed memory (keep_freed_memory) unless --system-malloc.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# The environment as the user set it, for the command line in the report (inductor exports
# TORCHINDUCTOR_CACHE_DIR into os.environ itself once torch is imported).
ENVIRONMENT = dict(os.environ)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_se, when imported from tests
from bench_se import (  # noqa: E402
    OTHER_CORES_WARNING,
    CpuUsage,
    Workload,
    choose_malloc,
    cpu_model,
    device_name,
    repo_command,
    source_version,
    measure,
    summarize,
    synchronize,
)

from se_kernels import FusedSE  # noqa: E402
from se_kernels.models import se_resnet18, se_resnet50  # noqa: E402
from se_kernels.ops import resolve_backend  # noqa: E402


@dataclass(frozen=True)
class ModelSpec:
    key: str
    arch: str  # the SE model's name; the noSE variant is the same without "SE-"
    factory: Callable[..., nn.Module]
    image: int
    classes: int


MODEL_SPECS: Dict[str, ModelSpec] = {
    "cifar": ModelSpec("cifar", "SE-ResNet-18", se_resnet18, 32, 10),
    "imagenet": ModelSpec("imagenet", "SE-ResNet-50", se_resnet50, 224, 1000),
}
WORKLOADS = ("train", "infer")
NO_SE, REFERENCE, FUSED, COMPILED, COMPILED_NO_SE = "noSE", "reference", "fused", "compiled", "compiled-noSE"
VARIANTS = (NO_SE, REFERENCE, FUSED, COMPILED, COMPILED_NO_SE)
SE_OF = {NO_SE: None, REFERENCE: "reference", FUSED: "fused", COMPILED: "reference", COMPILED_NO_SE: None}

MODES = {
    # cifar batch (on a CPU), measured seconds per variant, rounds, timing seconds per (model,
    # workload) (None: no limit), models compiled on a CPU
    "quick": dict(cifar_batch=32, target_s=10.0, min_rounds=5, max_rounds=40, case_budget_s=40.0, warmup_rounds=0,
                  compile_models=("cifar",)),
    "full": dict(cifar_batch=128, target_s=30.0, min_rounds=10, max_rounds=200, case_budget_s=None, warmup_rounds=1,
                 compile_models=("cifar", "imagenet")),
}
IMAGENET_BATCH = {"cpu": 8, "cuda": 64}
CUDA_CIFAR_BATCH = 128
TARGET = 0.5  # the target: FusedSE removes at least half of eager SE's overhead

# The correctness guard. Logits and the loss, tensor-wise: max |got - reference| <= ATOL + RTOL
# max |reference| (they are sums over many terms, and another summation order in one SE block
# moves single elements, so they are compared against the tensor's scale). The gradients after
# the first training step, all parameters as one vector, norm-wise: ||got - ref|| / ||ref|| <=
# GRAD_RTOL. That bound is loose because float32 itself is loose here: at random init the
# gradients of these nets pass through training-mode BatchNorm in every layer, and eager float32
# differs from eager float64 by ~0.15% (SE-ResNet-18, batch 32) and ~0.9% (SE-ResNet-50, batch 8)
# over all parameters, by up to 1.2% on single BatchNorm biases; fused float32 is as far from
# float64 as eager float32 is. A wrong backward kernel gives O(1). The tests check the kernels
# and the models tightly (float64, tests/test_models.py); this guard keeps a broken build or a
# wrong model from being timed. Under --amp (bfloat16) the bounds are bfloat16's.
RTOL, ATOL, GRAD_RTOL = 1e-4, 1e-5, 5e-2
AMP_RTOL, AMP_ATOL, AMP_GRAD_RTOL = 5e-2, 1e-2, 3e-1


# ---------------------------------------------------------------------------------------
# Building the variants and their workloads


@dataclass
class Config:
    """Everything that shapes one run; parse_args fills it, the smoke test builds it directly."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    models: Tuple[str, ...] = ("cifar", "imagenet")
    workloads: Tuple[str, ...] = WORKLOADS
    batch: Dict[str, int] = field(default_factory=lambda: {"cifar": 32, "imagenet": 8})
    compile_models: Tuple[str, ...] = ("cifar",)  # models whose compiled variants run
    compile_baseline: bool = True  # compiled-noSE alongside compiled
    compile_backend: str = "inductor"
    fused_backend: str = "auto"
    amp: bool = False  # CUDA only: bfloat16 autocast and channels_last
    channels_last: bool = False
    lr: float = 0.01
    seed: int = 0
    target_s: float = 10.0
    min_rounds: int = 5
    max_rounds: int = 40
    case_budget_s: Optional[float] = 40.0  # wall seconds of timed rounds per (model, workload)
    warmup_rounds: int = 0  # untimed rounds after the first calls

    def variants(self, model: str) -> List[str]:
        names = [NO_SE, REFERENCE, FUSED]
        if model in self.compile_models:
            names += [COMPILED, COMPILED_NO_SE] if self.compile_baseline else [COMPILED]
        return names


@dataclass
class Variant:
    model: nn.Module  # the eager model (parameters, train/eval mode)
    call: nn.Module  # what the workload calls: the model, or torch.compile(model)
    workload: Workload  # the timed call (run) and, in training, zero_grad before it (prepare, untimed)
    last: Dict[str, torch.Tensor]  # the output of the latest call ("out"), for the guard


def autocast(cfg: Config):
    if cfg.amp:
        return torch.autocast(cfg.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(spec: ModelSpec, variant: str, cfg: Config) -> nn.Module:
    torch.manual_seed(cfg.seed)  # the same weights for every SE variant (and for the SE-free layers)
    model = spec.factory(num_classes=spec.classes, se=SE_OF[variant])
    for m in model.modules():
        if isinstance(m, FusedSE):
            m.backend = cfg.fused_backend
    model = model.to(cfg.device)
    if cfg.channels_last or cfg.amp:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_batch(spec: ModelSpec, batch: int, cfg: Config) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(batch, 3, spec.image, spec.image, generator=g)
    labels = torch.randint(0, spec.classes, (batch,), generator=g)
    x = x.to(cfg.device)
    if cfg.channels_last or cfg.amp:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, labels.to(cfg.device)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics = the batch's statistics (one training-mode pass, cumulative
    average), so that eval mode normalises like a trained net rather than by mean 0, var 1."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    model(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum


def build_variant(spec: ModelSpec, variant: str, workload: str, x: torch.Tensor, labels: torch.Tensor,
                  cfg: Config) -> Variant:
    model = build_model(spec, variant, cfg)
    if workload == "infer":
        calibrate_batchnorm(model, x)
        model.eval()
    else:
        model.train()
    call = model
    if variant in (COMPILED, COMPILED_NO_SE):
        # dynamic=False: one static graph for the one batch shape, as in bench_se.py
        call = torch.compile(model, backend=cfg.compile_backend, dynamic=False)
    last: Dict[str, torch.Tensor] = {}

    if workload == "infer":
        def run() -> None:
            with torch.no_grad(), autocast(cfg):
                last["out"] = call(x)

        return Variant(model, call, Workload(run=run), last)

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)

    def step() -> None:
        with autocast(cfg):
            loss = F.cross_entropy(call(x), labels)
        loss.backward()
        opt.step()
        last["out"] = loss.detach()  # no .item(): no device sync inside the timed call

    return Variant(model, call, Workload(run=step, prepare=lambda: opt.zero_grad(set_to_none=True)), last)


# ---------------------------------------------------------------------------------------
# The correctness guard


class Mismatch(RuntimeError):
    pass


def check_against_reference(variants: Dict[str, Variant], workload: str, cfg: Config, label: str) -> List[str]:
    """After every variant's first call: the fused and compiled SE variants against the eager
    reference (logits, or the loss and every parameter's gradient of the first training step).
    Raises Mismatch; returns one line per comparison for the report."""
    rtol, atol, grad_rtol = (AMP_RTOL, AMP_ATOL, AMP_GRAD_RTOL) if cfg.amp else (RTOL, ATOL, GRAD_RTOL)
    ref = variants[REFERENCE]
    want = ref.last["out"].float()
    lines = []
    for name in (FUSED, COMPILED):
        if name not in variants:
            continue
        got = variants[name].last["out"].float()
        what = "logits" if workload == "infer" else "loss"
        if got.shape != want.shape:
            raise Mismatch(f"{label} {name}: {what} have shape {tuple(got.shape)}, reference {tuple(want.shape)}")
        err = (got - want).abs().max().item()
        bound = atol + rtol * want.abs().max().item()
        if not err <= bound:  # also catches NaN
            raise Mismatch(f"{label} {name}: {what} differ from the eager reference by {err:.3g} > {bound:.3g} "
                           f"(atol {atol} + rtol {rtol} x max |reference|)")
        line = f"{label} {name:<9} vs reference: {what} max |diff| {err:.2e} <= {bound:.2e}"
        if workload == "train":
            ref_grads = {k: p.grad for k, p in ref.model.named_parameters()}
            got_grads = {k: p.grad for k, p in variants[name].model.named_parameters()}
            missing = [k for k in ref_grads if ref_grads[k] is None or got_grads.get(k) is None]
            if missing or ref_grads.keys() != got_grads.keys():
                raise Mismatch(f"{label} {name}: parameters or gradients differ from the reference's "
                               f"(e.g. {(missing or sorted(ref_grads.keys() ^ got_grads.keys()))[:3]})")
            g = torch.cat([got_grads[k].float().flatten() for k in ref_grads])
            gref = torch.cat([ref_grads[k].float().flatten() for k in ref_grads])
            rel = ((g - gref).norm() / gref.norm()).item()
            if not rel <= grad_rtol:
                raise Mismatch(f"{label} {name}: gradients (all parameters) differ from the eager reference: "
                               f"||diff|| / ||ref|| = {rel:.3g} > {grad_rtol}")
            line += f"; gradients ||diff||/||ref|| {rel:.2e} <= {grad_rtol:g}"
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------
# Timing one (model, workload)


def timed_rounds(workloads: Dict[str, Workload], cfg: Config) -> Dict[str, List[float]]:
    """Interleaved rounds in whole rotations (bench_se.measure with rounds = the number of
    variants), until the variants have on average cfg.target_s of measured time each or the
    rounds have taken cfg.case_budget_s of wall time, but at least cfg.min_rounds (rounded up to
    whole rotations) and at most cfg.max_rounds. Round i of every list comes from the same
    rotation round, so per-round ratios are paired."""
    n = len(workloads)
    times: Dict[str, List[float]] = {name: [] for name in workloads}
    start = time.perf_counter()
    while True:
        for name, t in measure(workloads, n, cfg.device).items():
            times[name] += t
        rounds = len(times[next(iter(times))])
        measured = statistics.fmean(sum(t) for t in times.values())
        over_budget = cfg.case_budget_s is not None and time.perf_counter() - start >= cfg.case_budget_s
        if rounds + n > cfg.max_rounds or (rounds >= cfg.min_rounds and (measured >= cfg.target_s or over_budget)):
            return times


@dataclass
class Row:
    model: str
    arch: str
    batch: int
    workload: str
    variant: str
    calls: int
    median_ms: float
    p20_ms: float
    p80_ms: float
    se_overhead: Optional[float] = None  # (t - t_noSE) / t_noSE, medians
    se_overhead_p20: Optional[float] = None  # percentiles of the per-round paired overhead
    se_overhead_p80: Optional[float] = None
    overhead_vs_compiled_noSE: Optional[float] = None  # compiled only
    overhead_vs_compiled_noSE_p20: Optional[float] = None
    overhead_vs_compiled_noSE_p80: Optional[float] = None


def paired_overhead(t: Sequence[float], base: Sequence[float]) -> Tuple[float, float, float]:
    """(median-based overhead, p20, p80 of per-round overheads)."""
    per_round = [a / b - 1 for a, b in zip(t, base)]
    deciles = statistics.quantiles(per_round, n=10, method="inclusive") if len(per_round) > 1 else [per_round[0]] * 9
    return statistics.median(t) / statistics.median(base) - 1, deciles[1], deciles[7]


def rows_of(spec: ModelSpec, batch: int, workload: str, times: Dict[str, List[float]]) -> List[Row]:
    rows = []
    for name, t in times.items():
        s = summarize(t)
        row = Row(spec.key, spec.arch if SE_OF[name] else spec.arch.replace("SE-", ""), batch, workload, name,
                  s.calls, s.median_s * 1e3, s.p20_s * 1e3, s.p80_s * 1e3)
        if SE_OF[name] and NO_SE in times:
            row.se_overhead, row.se_overhead_p20, row.se_overhead_p80 = paired_overhead(t, times[NO_SE])
        if name == COMPILED and COMPILED_NO_SE in times:
            (row.overhead_vs_compiled_noSE, row.overhead_vs_compiled_noSE_p20,
             row.overhead_vs_compiled_noSE_p80) = paired_overhead(t, times[COMPILED_NO_SE])
        rows.append(row)
    return rows


@dataclass
class CompileTime:
    model: str
    batch: int
    workload: str
    variant: str
    seconds: float
    fx_cache_hits: int
    fx_cache_misses: int


def first_call(v: Variant, device: torch.device) -> Tuple[float, int, int]:
    """Seconds of the first call (for a compiled variant: the compile) and inductor's FX graph
    cache hits and misses during it, which tell a cold compile from one served by the disk cache."""
    before = dict(counters["inductor"])
    v.workload.prepare()
    t0 = time.perf_counter()
    v.workload.run()
    synchronize(device)
    seconds = time.perf_counter() - t0
    after = counters["inductor"]
    return (seconds, after["fxgraph_cache_hit"] - before.get("fxgraph_cache_hit", 0),
            after["fxgraph_cache_miss"] - before.get("fxgraph_cache_miss", 0))


def bench(spec: ModelSpec, workload: str, cfg: Config, log=print) -> Tuple[List[Row], List[CompileTime], List[str]]:
    """Rows for every variant of one (model, workload), the compile warm-ups and the guard's lines."""
    torch._dynamo.reset()  # fresh dynamo caches per (model, workload); inductor's disk caches stay
    batch = cfg.batch[spec.key]
    label = f"{spec.key} {workload}"
    x, labels = make_batch(spec, batch, cfg)
    variants = {name: build_variant(spec, name, workload, x, labels, cfg) for name in cfg.variants(spec.key)}
    compiles: List[CompileTime] = []
    for name, v in variants.items():  # first calls: compiles the compiled variants
        compiled = name in (COMPILED, COMPILED_NO_SE)
        if compiled:
            log(f"  {label}: compiling {name} ...")
        seconds, hits, misses = first_call(v, cfg.device)
        if compiled:
            compiles.append(CompileTime(spec.key, batch, workload, name, seconds, hits, misses))
            log(f"  {label}: compile warm-up {name} {seconds:.1f} s")
    checks = check_against_reference(variants, workload, cfg, label)
    workloads = {name: v.workload for name, v in variants.items()}
    if cfg.warmup_rounds:
        measure(workloads, cfg.warmup_rounds, cfg.device)
    log(f"  {label}: batch {batch}, timing ...")
    t0 = time.perf_counter()
    times = timed_rounds(workloads, cfg)
    log(f"  {label}: {len(times[NO_SE])} rounds in {time.perf_counter() - t0:.1f} s")
    return rows_of(spec, batch, workload, times), compiles, checks


# ---------------------------------------------------------------------------------------
# FLOPs (context for the time overheads)


def forward_flops(spec: ModelSpec, se: Optional[str]) -> Tuple[int, int]:
    """For one image's forward, on the meta device (nothing is computed): the FLOPs that
    torch.utils.flop_counter counts (convolutions and matrix products, 2 per multiply-add; of SE
    only its two FCs), and the elements SE's pool reads and its scale writes (sum of C*H*W over
    the SE blocks), the elementwise work that flop counter leaves out."""
    from torch.utils.flop_counter import FlopCounterMode

    from se_kernels.reference import SEBase

    with torch.device("meta"):
        model = spec.factory(num_classes=spec.classes, se=se)
        x = torch.empty(1, 3, spec.image, spec.image)
    elements = []
    for m in model.modules():
        if isinstance(m, SEBase):
            m.register_forward_hook(lambda mod, args, out: elements.append(args[0][0].numel()))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops(), sum(elements)


def flops_line(spec: ModelSpec) -> str:
    (se, se_elements), (plain, _) = forward_flops(spec, "reference"), forward_flops(spec, None)
    # the paper's convention (3.86 GFLOPs for ResNet-50): a multiply-add is one FLOP; SE's pool
    # and scale are one per element each
    paper = (se / 2 + 2 * se_elements) / (plain / 2) - 1
    return (f"FLOPs:   {spec.arch} {se / 1e9:.2f} vs {plain / 1e9:.2f} GFLOP per image forward: "
            f"{(se / plain - 1) * 100:+.2f}% counting convolutions and FCs (torch.utils.flop_counter), "
            f"{paper * 100:+.2f}% with SE's pool and scale, multiply-adds as one (the SENet paper's "
            f"+0.26% for SE-ResNet-50)")


# ---------------------------------------------------------------------------------------
# Report


def fmt_pct(v: Optional[float]) -> str:
    return "" if v is None else f"{v * 100:+.1f}%"


def fmt_overhead(v: Optional[float], lo: Optional[float], hi: Optional[float]) -> str:
    return "" if v is None else f"{fmt_pct(v)} [{fmt_pct(lo)}, {fmt_pct(hi)}]"


TABLE_COLUMNS = ("model", "batch", "workload", "variant", "calls", "median ms", "p20-p80 ms",
                 "SE overhead vs noSE [paired p20, p80]", "vs compiled-noSE [p20, p80]")


def table_cells(r: Row) -> List[str]:
    model = r.arch
    return [model, str(r.batch), r.workload, r.variant, str(r.calls), f"{r.median_ms:.1f}",
            f"{r.p20_ms:.1f}-{r.p80_ms:.1f}", fmt_overhead(r.se_overhead, r.se_overhead_p20, r.se_overhead_p80),
            fmt_overhead(r.overhead_vs_compiled_noSE, r.overhead_vs_compiled_noSE_p20,
                         r.overhead_vs_compiled_noSE_p80)]


def text_table(rows: List[Row]) -> List[str]:
    cells = [list(TABLE_COLUMNS)] + [table_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
    right = {1, 4, 5, 6}

    def line(c: List[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))).rstrip()

    out = [line(cells[0]), "-" * len(line(cells[0]))]
    for i, r in enumerate(rows):
        if i and (r.model, r.workload) != (rows[i - 1].model, rows[i - 1].workload):
            out.append("")
        out.append(line(cells[i + 1]))
    return out


def markdown_table(rows: List[Row]) -> List[str]:
    out = ["| " + " | ".join(TABLE_COLUMNS) + " |",
           "|" + "|".join("---:" if i in {1, 4, 5, 6} else "---" for i in range(len(TABLE_COLUMNS))) + "|"]
    out += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    return out


@dataclass
class Headline:
    model: str
    arch: str
    batch: int
    workload: str
    overhead_reference: float
    overhead_fused: float
    removed: Optional[float]  # 1 - overhead_fused / overhead_reference (None: no eager overhead)
    removed_low: Optional[float]  # from the paired p80 (fused) and p20 (reference) overheads
    removed_high: Optional[float]  # from the paired p20 (fused) and p80 (reference) overheads
    verdict: str
    halves: Optional[bool]  # by the medians; None when unresolved
    status: str  # yes | yes by the medians | no | no by the medians | unresolved
    overhead_compiled: Optional[float] = None  # compiled SE model vs eager noSE
    overhead_compiled_vs_compiled: Optional[float] = None  # compiled SE model vs compiled noSE


def headline(rows: List[Row]) -> Optional[Headline]:
    by = {r.variant: r for r in rows}
    if REFERENCE not in by or FUSED not in by or by[REFERENCE].se_overhead is None:
        return None
    ref, fused = by[REFERENCE], by[FUSED]
    removed = low = high = halves = None
    if ref.se_overhead > 0:
        removed = 1 - fused.se_overhead / ref.se_overhead
        if ref.se_overhead_p20 > 0:
            low = 1 - fused.se_overhead_p80 / ref.se_overhead_p20
        high = 1 - fused.se_overhead_p20 / ref.se_overhead_p80 if ref.se_overhead_p80 > 0 else None
    if ref.se_overhead <= 0 or ref.se_overhead_p20 <= 0:
        # in at least a fifth of the rounds eager SE was no slower than noSE
        status, verdict = "unresolved", "UNRESOLVED: eager SE's overhead is within this run's noise"
    else:
        halves = removed >= TARGET
        if halves:
            sure = low >= TARGET
            status = "yes" if sure else "yes by the medians"
            verdict = "YES, FusedSE at least halves it" + ("" if sure else " by the medians, but not beyond the noise")
        else:
            sure = high is None or high < TARGET
            status = "no" if sure else "no by the medians"
            verdict = "NO, FusedSE does not halve it" + ("" if sure else " by the medians, but within the noise")
    compiled = by.get(COMPILED)
    return Headline(ref.model, ref.arch, ref.batch, ref.workload, ref.se_overhead, fused.se_overhead,
                    removed, low, high, verdict, halves, status,
                    compiled.se_overhead if compiled else None,
                    compiled.overhead_vs_compiled_noSE if compiled else None)


def headline_line(h: Headline) -> str:
    compiled = ""
    if h.overhead_compiled is not None:
        compiled = f"; [torch.compile: {fmt_pct(h.overhead_compiled)} vs eager noSE"
        if h.overhead_compiled_vs_compiled is not None:
            compiled += f", {fmt_pct(h.overhead_compiled_vs_compiled)} vs compiled noSE"
        compiled += "]"
    if h.removed is None:
        return (f"{h.arch} b{h.batch} {h.workload}: eager SE {fmt_pct(h.overhead_reference)}, "
                f"FusedSE {fmt_pct(h.overhead_fused)}: {h.verdict}{compiled}")
    rng = ""
    if h.removed_low is not None or h.removed_high is not None:
        lo = "?" if h.removed_low is None else f"{h.removed_low * 100:.0f}%"
        hi = "?" if h.removed_high is None else f"{h.removed_high * 100:.0f}%"
        rng = f" (paired p20/p80 range {lo} to {hi})"
    return (f"{h.arch} b{h.batch} {h.workload}: SE overhead eager {fmt_pct(h.overhead_reference)}, "
            f"FusedSE {fmt_pct(h.overhead_fused)} -> FusedSE removes {h.removed * 100:.0f}% of it{rng}: {h.verdict}"
            f"{compiled}")


def summary_lines(headlines: List[Headline]) -> List[str]:
    """The plain answer to the issue's question, over all (model, workload) cases."""
    question = "Issue target (FusedSE cuts the eager SE overhead at least in half on this machine): "
    by_status: Dict[str, List[str]] = {}
    for h in headlines:
        by_status.setdefault(h.status, []).append(f"{h.arch} {h.workload}")
    statuses = set(by_status)
    if not headlines:
        answer = "no cases measured"
    elif statuses == {"yes"}:
        answer = "YES, in every case, beyond the run's noise"
    elif statuses <= {"yes", "yes by the medians"}:
        answer = "YES by the medians in every case; beyond the noise only in " + (
            ", ".join(by_status.get("yes", [])) or "none")
    elif statuses == {"no"}:
        answer = "NO, in no case, beyond the run's noise"
    else:
        answer = "NOT SHOWN by this run"
    lines = [question + answer]
    if answer == "NOT SHOWN by this run" or len(statuses) > 1:
        for status in ("yes", "yes by the medians", "no by the medians", "no", "unresolved"):
            if status in by_status:
                lines.append(f"  {status}: {', '.join(by_status[status])}")
    if "unresolved" in by_status:
        lines.append("  (unresolved: eager SE was no slower than noSE in at least a fifth of the rounds; more rounds "
                     "(--target-s, --case-budget-s 0, --full) or a quieter machine can resolve it)")
    if any(h.removed is not None and h.removed > 1 for h in headlines):
        lines.append("  (over 100% means FusedSE ran faster than noSE; that need not be noise: its one pass does "
                     "the residual add and ReLU that noSE does in two, F.relu(out + shortcut))")
    return lines


def write_csv(path: str, rows: List[Row], setting: Dict[str, object]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(setting) + list(asdict(rows[0])))
        writer.writeheader()
        for r in rows:
            writer.writerow({**setting, **asdict(r)})


def write_markdown(path: str, command: str, header: List[str], rows: List[Row], compiles: List[CompileTime],
                   headlines: List[Headline], notes: List[str], checks: List[str]) -> None:
    out = ["# SE overhead in whole networks (benchmarks/bench_model.py)", "", "Command:", "",
           "```", command, "```", "", "```", *header, "```", "", *markdown_table(rows), ""]
    out += ["SE overhead = (t_SE - t_noSE) / t_noSE from the medians; brackets: 20th/80th percentiles "
            "of the per-round paired overhead.", ""]
    out += ["## Headline", ""] + [f"- {headline_line(h)}" for h in headlines] + [""]
    out += [f"**{line.strip()}**" if i == 0 else line for i, line in enumerate(summary_lines(headlines))] + [""]
    if compiles:
        out += ["## torch.compile warm-up (first call; not in the timings)", "",
                "| model | batch | workload | variant | seconds | FX graph cache hit | miss |",
                "|---|---:|---|---|---:|---:|---:|"]
        out += [f"| {c.model} | {c.batch} | {c.workload} | {c.variant} | {c.seconds:.1f} | {c.fx_cache_hits} | "
                f"{c.fx_cache_misses} |" for c in compiles]
        out.append("")
    out += ["## Correctness guard", ""] + [f"- {c}" for c in checks] + [""]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    with open(path, "w") as f:
        f.write("\n".join(out))


# ---------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="(default) a few minutes on a 2-core CPU: CIFAR batch 32, compile CIFAR only")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="CIFAR batch 128, longer timing, compile both models")
    p.set_defaults(mode="quick")
    p.add_argument("--models", nargs="+", choices=sorted(MODEL_SPECS), default=list(MODEL_SPECS))
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--cifar-batch", type=int, help="CIFAR batch (quick: 32 on CPU; full and CUDA: 128)")
    p.add_argument("--imagenet-batch", type=int, help="ImageNet batch (default 8 on CPU, 64 on CUDA)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    p.add_argument("--compile-models", nargs="+", choices=sorted(MODEL_SPECS),
                   help="models whose compiled variants run (quick on CPU: cifar; otherwise both)")
    p.add_argument("--no-compile-baseline", action="store_true",
                   help="leave out compiled-noSE (then the compiled variant's overhead is against eager noSE only)")
    p.add_argument("--compile-backend", default="inductor",
                   help='torch.compile backend (default inductor; "eager"/"aot_eager" for quick checks)')
    p.add_argument("--fused-backend", default="auto", help="FusedSE backend (default auto)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="CUDA only: bfloat16 autocast and channels_last")
    p.add_argument("--channels-last", action="store_true", help="channels_last models and inputs")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-s", type=float, help="measured seconds per variant per (model, workload)")
    p.add_argument("--min-rounds", type=int)
    p.add_argument("--max-rounds", type=int)
    p.add_argument("--warmup-rounds", type=int, help="untimed rounds after the first calls (quick 0, full 1)")
    p.add_argument("--case-budget-s", type=float,
                   help="stop timing a (model, workload) after this many seconds of rounds, once --min-rounds "
                        "are done (quick: 40; full and 0: no limit)")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc malloc's defaults (see bench_se.py)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument("--md", metavar="PATH", help="also write a markdown report (with the exact command)")
    args = p.parse_args(argv)
    if args.amp and args.device != "cuda":
        p.error("--amp is for --device cuda only (bfloat16 autocast on this CPU is not the workload measured here)")
    for name in ("cifar_batch", "imagenet_batch", "min_rounds", "max_rounds", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def config_from_args(args: argparse.Namespace) -> Tuple[Config, List[str]]:
    """The Config, and notes on choices the output should state."""
    device = torch.device(args.device)
    mode = MODES[args.mode]
    cuda = device.type == "cuda"
    notes = []
    batch = {"cifar": args.cifar_batch or (CUDA_CIFAR_BATCH if cuda else mode["cifar_batch"]),
             "imagenet": args.imagenet_batch or IMAGENET_BATCH[device.type]}
    if not cuda and args.mode == "quick" and args.cifar_batch is None and "cifar" in args.models:
        notes.append(f"quick mode runs CIFAR at batch {batch['cifar']} to stay within ~4 minutes on a 2-core CPU; "
                     f"the issue's batch 128 is --full or --cifar-batch 128")
    if args.no_compile:
        compile_models: Tuple[str, ...] = ()
        notes.append("--no-compile: no torch.compile variants")
    elif args.compile_models:
        compile_models = tuple(args.compile_models)
    elif cuda:
        compile_models = tuple(MODEL_SPECS)
    else:
        compile_models = mode["compile_models"]
        if "imagenet" in args.models and "imagenet" not in compile_models:
            notes.append("ImageNet torch.compile skipped in quick mode on CPU: compiling ResNet-50 (training and "
                         "inference graphs, with and without SE) takes minutes per graph on 2 cores with a cold "
                         "inductor cache, more than the whole quick budget; --full or --compile-models cifar "
                         "imagenet include it")
    cfg = Config(
        device=device, models=tuple(dict.fromkeys(args.models)), workloads=tuple(dict.fromkeys(args.workloads)),
        batch=batch, compile_models=compile_models, compile_baseline=not args.no_compile_baseline,
        compile_backend=args.compile_backend, fused_backend=args.fused_backend, amp=args.amp,
        channels_last=args.channels_last, lr=args.lr, seed=args.seed,
        target_s=args.target_s if args.target_s is not None else mode["target_s"],
        min_rounds=args.min_rounds or mode["min_rounds"], max_rounds=args.max_rounds or mode["max_rounds"],
        case_budget_s=(args.case_budget_s if args.case_budget_s is not None else mode["case_budget_s"]) or None,
        warmup_rounds=args.warmup_rounds if args.warmup_rounds is not None else mode["warmup_rounds"],
    )
    if cfg.compile_models and not cfg.compile_baseline:
        notes.append("--no-compile-baseline: the compiled variant's overhead is against eager noSE only, which "
                     "mixes SE's cost with what compile saves in the rest of the network")
    return cfg, notes


def machine_header(device: torch.device, malloc: str) -> List[str]:
    return [
        f"date:    {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {platform.node()}, {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads "
        f"{torch.get_num_threads()}",
        f"device:  {device} ({device_name(device)})",
        f"torch:   {torch.__version__}",
        f"source:  {source_version()}",
        f"malloc:  {malloc}",
    ]


def main(argv: Optional[Sequence[str]] = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    script_args = list(sys.argv[1:] if argv is None else argv)
    command = repo_command(ENVIRONMENT, ("LD_PRELOAD", "GLIBC_TUNABLES", "SE_KERNELS_BACKEND", "OMP_NUM_THREADS",
                                         "CUDA_VISIBLE_DEVICES"), script_args, script=__file__)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg, notes = config_from_args(args)
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_model: --device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
    if cfg.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if not cfg.amp:  # float32 means float32 (as bench_se.py): TF32 would also loosen the guard
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    malloc = choose_malloc(args.system_malloc)
    usage_start = CpuUsage.now()

    header = machine_header(cfg.device, malloc)
    precision = "bfloat16 autocast, channels_last" if cfg.amp else (
        "float32" + (", channels_last" if cfg.channels_last else ", NCHW"))
    header.append(f"setting: {args.mode}, {cfg.device}, {precision}, FusedSE backend "
                  f"{resolve_backend(cfg.fused_backend, cfg.device.type)}, torch.compile backend "
                  f"{cfg.compile_backend} (default mode, dynamic=False), SGD lr {cfg.lr} momentum 0.9, seed {cfg.seed}")
    timing = (f"~{cfg.target_s:g} s per variant, {cfg.min_rounds}-{cfg.max_rounds} rounds after "
              f"{cfg.warmup_rounds} warm-up round(s)")
    if cfg.case_budget_s:
        timing += f", at most ~{cfg.case_budget_s:g} s of rounds per model and workload"
    if cfg.device.type == "cuda":
        timing += ", cudnn.benchmark" + ("" if cfg.amp else ", TF32 off")
    header.append("batches: " + ", ".join(f"{k} {cfg.batch[k]}" for k in cfg.models)
                  + f"; compiled: {', '.join(cfg.compile_models) or 'none'}"
                  + (" (+ compiled-noSE)" if cfg.compile_models and cfg.compile_baseline else "")
                  + f"; timing: {timing}")
    header += [flops_line(MODEL_SPECS[key]) for key in cfg.models]
    print("\n".join(header))
    for n in notes:
        print(f"note:    {n}")
    sys.stdout.flush()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows: List[Row] = []
    compiles: List[CompileTime] = []
    checks: List[str] = []
    headlines: List[Headline] = []
    for key in cfg.models:
        for workload in cfg.workloads:
            log(f"[{MODEL_SPECS[key].arch} {workload}]")
            try:
                r, c, ch = bench(MODEL_SPECS[key], workload, cfg, log)
            except Mismatch as e:
                sys.exit(f"bench_model: correctness guard failed: {e}; not benchmarking a wrong model")
            rows += r
            compiles += c
            checks += ch
            h = headline(r)
            if h is not None:
                headlines.append(h)

    print("\ncorrectness guard (before timing; fused and compiled against the eager reference):")
    for c in checks:
        print(f"  {c}")
    if compiles:
        print("\ntorch.compile warm-up (first call, compiles forward and, in training, backward; not in the timings):")
        for ct in compiles:
            print(f"  {ct.model:<8} b{ct.batch:<4} {ct.workload:<6} {ct.variant:<14} {ct.seconds:7.1f} s   "
                  f"inductor FX graph cache: {ct.fx_cache_hits} hit, {ct.fx_cache_misses} miss")
    print("\nSE overhead = (t_SE - t_noSE) / t_noSE from the medians; [p20, p80] of the per-round paired overhead\n")
    print("\n".join(text_table(rows)))
    print("\nHow much of eager SE's overhead FusedSE removes (1 - overhead_fused / overhead_reference):")
    for h in headlines:
        print(f"  {headline_line(h)}")
    print()
    print("\n".join(summary_lines(headlines)))

    setting = {"device": str(cfg.device), "precision": precision, "threads": torch.get_num_threads(),
               "malloc": malloc, "mode": args.mode, "compile_backend": cfg.compile_backend,
               "fused_backend": resolve_backend(cfg.fused_backend, cfg.device.type), "torch": torch.__version__}
    if args.csv:
        write_csv(args.csv, rows, setting)
        print(f"\nwrote {args.csv}")
    total = time.perf_counter() - start
    compile_s = sum(ct.seconds for ct in compiles)
    others = (CpuUsage.now() - usage_start).other_cores
    load = (f"others:  other processes kept {others:.2f} of the {os.cpu_count()} logical CPUs busy during the run "
            "(/proc/stat)")
    if others >= OTHER_CORES_WARNING:
        load += " - they shared the cores with this run: steps slow down and vary more"
    print(f"\n{load}")
    if args.md:
        write_markdown(args.md, command,
                       header + [load, f"wall:    {total:.0f} s, of which torch.compile warm-up {compile_s:.0f} s"],
                       rows, compiles, headlines, notes, checks)
        print(f"wrote {args.md}")
    print(f"\ntotal wall time {total:.1f} s (after imports), of which torch.compile warm-up {compile_s:.1f} s")


if __name__ == "__main__":
    main()
