"""The fused SE op against eager and torch.compile'd PyTorch per SE site, variant, mode and
provider: median and p20-p80 time, GB/s and fraction of the copy-bandwidth floor, speedups, peak
memory. Run from the repository root with the extension built.

    python benchmarks/bench_se.py                   # --quick: cpu-quick set, float32, NCHW
    python benchmarks/bench_se.py --full            # + bfloat16/float16, channels_last, residual+ReLU
    python benchmarks/bench_se.py --shape-set efficientnet-b0 --modes forward full
    python benchmarks/bench_se.py --device cuda --shape-set imagenet-se-resnet50 --tag baseline

Modes: forward (no_grad), backward (autograd.grad of x, residual and weights after an untimed
forward), full (both). Providers: eager (ReferenceSE, the baseline), compile (torch.compile of
it, dynamic=False) and FusedSE per native backend (triton on a CPU, the interpreter, only by
--providers). Per case: first calls (compile's reported apart), then the correctness guard
against eager (float32: |got - eager| <= 1e-5 + 1e-4 |eager|, bias gradients tensor-wise; half
types: error vs float64 <= 2x eager's + atol; a se_kernels backend out of it aborts the run, a
baseline gets a note), then interleaved rounds of the providers and y.copy_(x) (harness.measure).
Floor: the bytes any implementation must move (forward 2|x|, backward 3|x|, full 5|x|, +|x| each
with the epilogue) at the copy's bandwidth. glibc keeps freed memory unless --system-malloc;
on a busy machine use --threads 1. Writes {device-slug}_{date}_{shape-set}[_{tag}].{csv,md,png}
to --results-dir (benchmarks/results/) unless --no-save.
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import os
import statistics
import sys
import time
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import harness
import torch
from harness import Workload
from shapes import SHAPE_SETS, ShapeSet, custom_set, shape_set
from torch import nn
from tqdm import tqdm

from se_kernels import FusedSE, available_backends
from se_kernels.attention import CA_BACKENDS
from se_kernels.channel_attention import FusedChannelAttention
from se_kernels.reference import ReferenceSE

MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
EPILOGUES = ("none", "residual_relu")
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs")
BASELINES = ("eager", "compile")  # the peers every provider is compared with
COMPILE_BACKEND = "inductor"  # the smoke test uses aot_eager
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RTOL, ATOL = 1e-4, 1e-5  # float32 guard; the bias gradients (sums that nearly cancel) tensor-wise
LOW_PRECISION_ATOL = {"bfloat16": 8e-3, "float16": 1e-3}  # as tests/test_kernels.py
TARGET_S = 0.5  # measured time per provider per (case, mode)
MIN_ROUNDS, MAX_ROUNDS, WARMUP_ROUNDS = 10, 200, 3


class MismatchError(RuntimeError):
    """A provider's result differs from eager's beyond the tolerance."""


class Variant(namedtuple("Variant", "dtype layout epilogue", defaults=("float32", "nchw", "none"))):
    residual = property(lambda self: self.epilogue == "residual_relu")
    label = property(lambda self: f"{self.dtype}, {self.layout}, "
                                  f"{'residual + relu' if self.residual else 'no epilogue'}")


class Case(namedtuple("Case", "site variant")):
    x_bytes = property(lambda self: math.prod(self.site.shape) * DTYPES[self.variant.dtype].itemsize)


Inputs = namedtuple("Inputs", "x residual dy")  # x and the residual (or None) require grad
# site: NxCxHxW/S; count: its uses in the model; speedup_vs_compile: nan when compile did not run
Row = namedtuple("Row", "shape_set site count activation gate dtype layout epilogue mode provider calls median_ms "
                 "p20_ms p80_ms floor_bytes copy_gbps gbps fraction_of_floor speedup_vs_eager speedup_vs_compile "
                 "peak_mib peak_over_x")
CompileTime = namedtuple("CompileTime", "site variant mode seconds fx_cache_hits fx_cache_misses")
CopyBandwidth = namedtuple("CopyBandwidth", "site variant mode median_ms gbps")


def provider_names(device: torch.device) -> List[str]:
    """eager and compile, then every native backend ("torch" is the eager reference again)."""
    return list(BASELINES) + [b for b in available_backends(device.type) if b != "torch"]


def default_providers(device: torch.device) -> List[str]:
    return [p for p in provider_names(device) if not (p == "triton" and device.type == "cpu")]


def timm_attention(site) -> nn.Module:
    """timm's own module of an ECA site (EcaModule, kernel s) or an ESE site (EffectiveSEModule,
    hard sigmoid; hgnet's EseModule, sigmoid)."""
    if site.kind == "eca":
        from timm.layers.eca import EcaModule

        return EcaModule(kernel_size=site.s)
    if site.gate == "hardsigmoid":
        from timm.layers.squeeze_excite import EffectiveSEModule

        return EffectiveSEModule(site.c)
    from timm.models.hgnet import EseModule

    return EseModule(site.c)


class AttentionReference(nn.Module):
    """timm's ECA / ESE module as it is, then the residual + relu epilogue when asked."""

    def __init__(self, site, out_activation: Optional[str]):
        super().__init__()
        self.attention, self.out_relu = timm_attention(site), out_activation == "relu"

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.attention(x)
        y = y + residual if residual is not None else y
        return torch.relu(y) if self.out_relu else y


class AttentionFused(nn.Module):
    """What a user gets: the same timm module converted (FusedChannelAttention.from_module), the
    epilogue fused; the state_dict keys are the reference's."""

    def __init__(self, site, out_activation: Optional[str], backend: str):
        super().__init__()
        self.attention = FusedChannelAttention.from_module(timm_attention(site), out_activation=out_activation,
                                                           backend=backend)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.attention(x, residual)


def site_module(case: Case, provider: str) -> nn.Module:
    """The eager module (baselines) or the se_kernels one (a backend name) of a case's site."""
    out_activation = "relu" if case.variant.residual else None
    site = case.site
    if site.kind != "se":
        return AttentionReference(site, out_activation) if provider in BASELINES else \
            AttentionFused(site, out_activation, provider)
    options = dict(activation=site.activation, gate=site.gate, out_activation=out_activation)
    return ReferenceSE(site.c, site.s, **options) if provider in BASELINES else \
        FusedSE(site.c, site.s, **options, backend=provider)


def build_modules(case: Case, device: torch.device, providers: Sequence[str],
                  compile_mode: str = "default") -> Dict[str, nn.Module]:
    """The modules of `providers` (eager first) for one case, with shared weights. Resets
    dynamo, so the case's graphs stay within the recompile limit; inductor's disk cache stays.
    ECA / ESE sites take the backends of the generic path only."""
    torch.manual_seed(0)
    state = site_module(case, "eager").state_dict()
    torch._dynamo.reset()
    modules = {}
    for name in ["eager"] + [p for p in providers if p != "eager"]:
        if case.site.kind != "se" and name not in BASELINES and name not in CA_BACKENDS:
            continue
        module = site_module(case, name)
        module.load_state_dict(state)
        modules[name] = module.to(device=device, dtype=DTYPES[case.variant.dtype])
        if name == "compile":
            modules[name] = torch.compile(module, backend=COMPILE_BACKEND, dynamic=False,
                                          mode=None if compile_mode == "default" else compile_mode)
    return modules


def make_inputs(case: Case, device: torch.device) -> Inputs:
    """Drawn in float32 from a fixed seed, so every dtype sees the same values."""
    generator = torch.Generator().manual_seed(1)

    def tensor(requires_grad: bool) -> torch.Tensor:
        t = torch.randn(case.site.shape, generator=generator).to(device, DTYPES[case.variant.dtype])
        return t.contiguous(memory_format=LAYOUTS[case.variant.layout]).requires_grad_(requires_grad)
    x, residual = tensor(True), tensor(True) if case.variant.residual else None
    return Inputs(x, residual, tensor(False))


def floor_bytes(case: Case, mode: str) -> int:
    """Forward reads x (and the residual) and writes y; backward reads dy and x and writes dx
    (and d_residual); the (N, C) vectors and the weights are negligible."""
    forward, backward = (3, 4) if case.variant.residual else (2, 3)
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode] * case.x_bytes


def leaves_of(module: nn.Module, inputs: Inputs) -> Dict[str, torch.Tensor]:
    """What gradients are taken for: the weights, x and the residual."""
    leaves = {name.removeprefix("_orig_mod."): p for name, p in module.named_parameters()}
    return {**leaves, "x": inputs.x, **({"residual": inputs.residual} if inputs.residual is not None else {})}


def make_workload(module: nn.Module, inputs: Inputs, mode: str) -> Workload:
    """The call to time (under no_grad in forward mode); gradients are returned, not
    accumulated. backward: `prepare` runs the forward, `run` its backward, without
    retain_graph (which torch.compile refuses when its backward donates buffers)."""
    call = lambda: module(inputs.x, inputs.residual)  # noqa: E731
    if mode == "forward":
        return Workload(run=call)
    leaves = list(leaves_of(module, inputs).values())
    if mode == "full":
        return Workload(run=lambda: torch.autograd.grad(call(), leaves, inputs.dy))
    graph: List[torch.Tensor] = []
    return Workload(run=lambda: torch.autograd.grad(graph.pop(), leaves, inputs.dy),
                    prepare=lambda: graph.append(call()))


# ---------------------------------------------------------------------------------------
# Correctness guard


def results_of(module: nn.Module, inputs: Inputs, mode: str) -> Dict[str, torch.Tensor]:
    """y and, outside forward mode, every gradient of one call."""
    leaves = leaves_of(module, inputs)
    with torch.set_grad_enabled(mode != "forward"):
        y = module(inputs.x, inputs.residual)
        grads = torch.autograd.grad(y, list(leaves.values()), inputs.dy) if mode != "forward" else ()
    return {"y": y.detach(), **{"d_" + name: g for name, g in zip(leaves, grads)}}


def mismatch(name: str, got: Optional[torch.Tensor], eager: torch.Tensor, ref: Optional[torch.Tensor],
             dtype: str) -> Optional[str]:
    """None if `got` passes the guard against eager (in half types: and the float64 `ref`)."""
    if got is None or got.shape != eager.shape or got.dtype != eager.dtype:
        return (f"is {None if got is None else (tuple(got.shape), got.dtype)}, "
                f"eager gives {(tuple(eager.shape), eager.dtype)}")
    if dtype == "float32":
        tensorwise = name.endswith(".bias")  # sums over the batch that nearly cancel
        excess = (got - eager).abs() / (ATOL + RTOL * (eager.abs().max() if tensorwise else eager.abs()))
        if excess.max() <= 1:  # False for NaN too
            return None
        i = int(excess.nan_to_num(math.inf).argmax())
        return (f"differs from eager beyond rtol={RTOL}, atol={ATOL}"
                f"{' (tensor-wise)' if tensorwise else ''} at flat index {i}: "
                f"got {got.flatten()[i].item():.7g}, eager {eager.flatten()[i].item():.7g}")
    scale = max(ref.abs().max().item(), 1e-30)
    ours, theirs = ((t.double() - ref).abs().max().item() / scale for t in (got, eager))
    if ours <= 2 * theirs + LOW_PRECISION_ATOL[dtype]:  # False for NaN too
        return None
    return (f"error vs float64 {ours:.3g} (relative to max |ref|) exceeds 2 x eager's {theirs:.3g} + "
            f"{LOW_PRECISION_ATOL[dtype]}")


def check_against_eager(modules: Dict[str, nn.Module], inputs: Inputs, mode: str, case: Case) -> List[str]:
    """Every provider against eager: a se_kernels backend out of tolerance raises
    MismatchError, a baseline (PyTorch's numerics) yields a note for the report."""
    eager, dtype = results_of(modules["eager"], inputs, mode), case.variant.dtype
    reference = {} if dtype == "float32" else results_of(copy.deepcopy(modules["eager"]).double(), Inputs(*(
        None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs)), mode)
    notes = []
    for provider in [p for p in modules if p != "eager"]:
        got = results_of(modules[provider], inputs, mode)
        for name, want in eager.items():
            problem = mismatch(name, got.get(name), want, reference.get(name), dtype)
            where = f"{provider} {case.site.label} {case.variant.label} {mode}: {name} {problem}"
            if problem and provider not in BASELINES:
                raise MismatchError(f"{where}; not benchmarking a wrong kernel")
            notes += [f"{where} (a PyTorch baseline: reported, still timed)"] if problem else []
    return notes


# ---------------------------------------------------------------------------------------
# The run


@dataclass
class Results:
    command: str
    device: torch.device
    shape_set: ShapeSet
    providers: List[str]
    compile_mode: str = "default"
    about: List[Tuple[str, str]] = field(default_factory=list)  # harness.run_header()
    rows: List[Row] = field(default_factory=list)
    compiles: List[CompileTime] = field(default_factory=list)
    copies: List[CopyBandwidth] = field(default_factory=list)
    accuracy_notes: List[str] = field(default_factory=list)  # baselines out of tolerance
    timed_cpu: List[float] = field(default_factory=lambda: [0.0] * 3)  # harness.cpu_times() of the timed rounds
    wall_s: float = math.nan

    def header(self) -> List[str]:
        return [f"- {key}: {value}" for key, value in self.about + [
            ("others", harness.others_line(self.timed_cpu, "the timed rounds")),
            ("shape set", f"{self.shape_set.name}: {self.shape_set.description}"),
            ("providers", ", ".join(f"compile (mode {self.compile_mode})" if p == "compile" else p
                                    for p in self.providers)),
            ("wall time", f"{self.wall_s:.1f} s after imports")]]


def bench_mode(case: Case, mode: str, modules: Dict[str, nn.Module], inputs: Inputs, check: bool,
               run: Results) -> int:
    """Times every provider of one case in one mode into `run`; returns the rounds."""
    x = inputs.x.detach()
    y = torch.empty_like(x)
    copy_run, copy_bytes = Workload(run=lambda: y.copy_(x)), 2 * x.numel() * x.element_size()
    with torch.set_grad_enabled(mode != "forward"):
        workloads = {name: make_workload(module, inputs, mode) for name, module in modules.items()}
        for name, workload in workloads.items():  # first calls (compile: compiles)
            seconds, hits, misses = harness.first_call(workload, run.device)
            if name == "compile":
                run.compiles.append(CompileTime(case.site.label, case.variant.label, mode, seconds, hits, misses))
        run.accuracy_notes += check_against_eager(modules, inputs, mode, case) if check else []
        peaks = {name: harness.peak_memory_bytes(w, run.device) for name, w in workloads.items()}
        rounds = harness.rounds_for(harness.measure(workloads, WARMUP_ROUNDS, run.device), TARGET_S, MIN_ROUNDS,
                                    MAX_ROUNDS)
        before = harness.cpu_times()
        times = harness.measure({**workloads, "copy": copy_run}, rounds, run.device)
        run.timed_cpu[:] = [t + e - b for t, b, e in zip(run.timed_cpu, before, harness.cpu_times())]
    copy_s = statistics.median(times.pop("copy"))
    bandwidth, floor = copy_bytes / copy_s, floor_bytes(case, mode)
    run.copies.append(CopyBandwidth(case.site.label, case.variant.label, mode, copy_s * 1e3, bandwidth / 1e9))
    summaries = {name: harness.summarize(t) for name, t in times.items()}
    peer = {name: summaries[name].median_s if name in summaries else math.nan for name in BASELINES}
    run.rows += [Row(run.shape_set.name, case.site.label, case.site.count, case.site.activation, case.site.gate,
                     *case.variant, mode, name, s.calls, s.median_s * 1e3, s.p20_s * 1e3, s.p80_s * 1e3, floor,
                     bandwidth / 1e9, floor / s.median_s / 1e9, floor / bandwidth / s.median_s,
                     peer["eager"] / s.median_s, peer["compile"] / s.median_s, peaks[name] / 2**20,
                     peaks[name] / case.x_bytes) for name, s in summaries.items()]
    return rounds


def bench_case(case: Case, modes: Sequence[str], run: Results, progress: tqdm) -> None:
    modules = build_modules(case, run.device, run.providers, run.compile_mode)
    inputs = make_inputs(case, run.device)
    for mode in modes:
        progress.set_description(f"{case.site.label} {' '.join(case.variant)} {mode}")
        # backward and full mode compute the same results: check them once
        rounds = bench_mode(case, mode, modules, inputs, mode != "full" or "backward" not in modes, run)
        progress.set_postfix_str(f"{rounds} rounds")
        progress.update()


# ---------------------------------------------------------------------------------------
# Report


def speedup(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def geomean(values: Sequence[float]) -> str:
    return speedup(math.exp(statistics.fmean(math.log(v) for v in values)))


TABLE_COLUMNS = ("site NxCxHxW/S", "uses", "mode", "provider", "calls", "median ms", "p20-p80 ms", "GB/s",
                 "of floor", "vs eager", "vs compile", "peak MiB", "peak/|x|")
NOTE = ("Median of interleaved rounds, p20-p80 spread; GB/s of floor bytes (forward 2|x|, backward 3|x|, full "
        "5|x|, +|x| each way with the residual epilogue); of floor = floor bytes / copy bandwidth measured in the "
        "same rounds / time; peak = high-water mark of bytes allocated during one call, in MiB and in units of "
        "|x|; uses = occurrences of the site in the model. Method: the docstring of benchmarks/bench_se.py.")


def row_cells(r: Row) -> List[str]:
    return [r.site, str(r.count), r.mode, r.provider, str(r.calls), f"{r.median_ms:.3f}",
            f"{r.p20_ms:.3f}-{r.p80_ms:.3f}", f"{r.gbps:.2f}", f"{r.fraction_of_floor:.2f}",
            speedup(r.speedup_vs_eager), speedup(r.speedup_vs_compile), f"{r.peak_mib:.1f}", f"{r.peak_over_x:.2f}"]


def by_variant(rows: Sequence[Row]) -> Dict[Variant, List[Row]]:
    groups: Dict[Variant, List[Row]] = {}
    for r in rows:
        groups.setdefault(Variant(r.dtype, r.layout, r.epilogue), []).append(r)
    return groups


def variant_summary(rows: Sequence[Row], model: Optional[str], table: harness.Table) -> List[str]:
    """Per (mode, provider) over one variant's sites: the geometric mean of the speedups and,
    for a model's set, the SE time of one batch (sum over sites of uses x median)."""
    geo, totals = [], []
    for mode in dict.fromkeys(r.mode for r in rows):
        of = {p: [r for r in rows if (r.mode, r.provider) == (mode, p)]
              for p in dict.fromkeys(r.provider for r in rows)}
        ms = {p: sum(r.count * r.median_ms for r in rs) for p, rs in of.items()}
        geo += [(mode, p, geomean([r.speedup_vs_eager for r in rs]), geomean([r.speedup_vs_compile for r in rs]))
                for p, rs in of.items()]
        totals += [(mode, p, f"{t:.3f}", speedup(ms["eager"] / t)) for p, t in ms.items()]
    lines = ["", "Geometric mean of speedups over the sites:", ""]
    lines += table(("mode", "provider", "vs eager", "vs compile"), geo)
    if model:
        lines += ["", f"SE time of one {model} batch (sum over sites of uses x median):", ""]
        lines += table(("mode", "provider", "ms", "vs eager"), totals)
    return lines


def report_lines(run: Results, table: harness.Table) -> List[str]:
    """The report after its title, with harness.markdown_table (the .md file) or text_table."""
    lines = run.header() + ["", NOTE]
    for variant, rows in by_variant(run.rows).items():
        lines += ["", f"## {variant.label}", ""] + table(TABLE_COLUMNS, [row_cells(r) for r in rows])
        lines += variant_summary(rows, run.shape_set.model, table)
    lines += ["", "## Copy bandwidth (y.copy_(x), in the providers' rounds)", ""]
    lines += table(("site", "variant", "mode", "ms", "GB/s"),
                   [(*c[:3], f"{c.median_ms:.3f}", f"{c.gbps:.2f}") for c in run.copies])
    if run.accuracy_notes:
        lines += ["", "## Accuracy notes (baselines outside the correctness guard's tolerance)", ""]
        lines += [f"- {note}" for note in run.accuracy_notes]
    if run.compiles:
        lines += ["", "## torch.compile first call per mode (not in the timings)", ""]
        lines += table(("site", "variant", "mode", "seconds", "FX cache hit", "FX cache miss"),
                       [(*c[:3], f"{c.seconds:.2f}", str(c.fx_cache_hits), str(c.fx_cache_misses))
                        for c in run.compiles])
    return lines


def write_png(path: Path, title: str, rows: Sequence[Row]) -> None:
    """Two panels per mode, stacked: the fraction of floor per case and provider (bars) and
    every provider's speedup over eager and over compile (log scale); a 64-colour PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    short = {"float32": " f32", "bfloat16": " bf16", "float16": " f16", "nchw": "", "channels_last": " cl",
             "none": "", "residual_relu": " +res"}
    several = len(by_variant(rows)) > 1
    label = lambda r: r.site + ("".join(short[v] for v in (r.dtype, r.layout, r.epilogue)) if several else "")  # noqa: E731
    modes, providers = list(dict.fromkeys(r.mode for r in rows)), list(dict.fromkeys(r.provider for r in rows))
    cases = list(dict.fromkeys(label(r) for r in rows))
    table = {(label(r), r.mode, r.provider): r for r in rows}
    pairs = [(p, peer) for peer in BASELINES if peer in providers for p in providers
             if p not in BASELINES[:BASELINES.index(peer) + 1]]
    fig, axes = plt.subplots(2 * len(modes), 1, sharex=True, squeeze=False, layout="constrained",
                             figsize=(min(16, max(6, 3 + 0.12 * len(cases) * len(providers))), 3.6 * len(modes) + 1))
    for i, mode in enumerate(modes):
        for ax, series, log in ((axes[2 * i][0], [(p, p, "fraction_of_floor") for p in providers], False),
                                (axes[2 * i + 1][0], [(f"{p} vs {peer}", p, f"speedup_vs_{peer}")
                                                      for p, peer in pairs], True)):
            for k, (name, p, column) in enumerate(series):
                xs = [j + (k - (len(series) - 1) / 2) * 0.8 / len(series) for j in range(len(cases))]
                ys = [getattr(table[(c, mode, p)], column) for c in cases]
                if log:
                    ax.plot(xs, ys, "o", markersize=3, label=name)
                else:
                    ax.bar(xs, ys, 0.8 / len(series), label=name)
            if log:
                ax.set_yscale("log", base=2)
                ax.set_ylim(min(ax.get_ylim()[0], 0.45), max(ax.get_ylim()[1], 2.2))
                ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}x")
            ax.axhline(1.0, color="black", linewidth=0.6)
            ax.set_title(f"{mode}: " + ("speedup, > 1: faster than the peer" if log else
                                        "fraction of floor (1 = as fast as copying the floor bytes)"), fontsize=8)
            ax.tick_params(labelsize=6)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=6)
    axes[-1][0].set_xticks(range(len(cases)), cases, rotation=90 if len(cases) > 6 else 0, fontsize=6)
    fig.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    Image.open(buffer).convert("RGB").quantize(64).save(path, optimize=True)


def save(run: Results, results_dir: Path, tag: Optional[str]) -> List[Path]:
    """{device-slug}_{YYYY-MM-DD}_{shape-set}[_{tag}].{csv,md,png} under results_dir."""
    about = dict(run.about)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{harness.device_slug(run.device)}_{about['date'][:10]}_{run.shape_set.name}" + (f"_{tag}" if tag else "")
    paths = [results_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png")]
    harness.write_csv(paths[0], run.rows, {"device": about["device"], "torch": torch.__version__,
                                           "threads": torch.get_num_threads(), "malloc": about["malloc"],
                                           "compile_mode": run.compile_mode})
    harness.write_text(paths[1], [f"# SE op benchmark: {run.shape_set.name} on {about['device']}", "",
                                  f"Command: `{run.command}`", ""] + report_lines(run, harness.markdown_table))
    write_png(paths[2], f"SE op, {run.shape_set.name}, {about['device']}, torch {torch.__version__}, "
                        f"{about['date'][:10]}", run.rows)
    return paths


# ---------------------------------------------------------------------------------------
# Command line


def parse_shape(text: str) -> Tuple[int, ...]:
    shape = tuple(int(v) for v in text.lower().split("x") if v.isdigit())
    if len(shape) != 4 or min(shape) < 1 or "x".join(map(str, shape)) != text.lower():
        raise argparse.ArgumentTypeError(f"a shape is NxCxHxW with sizes >= 1, e.g. 128x64x32x32; got {text!r}")
    return shape


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="(default) float32 (and bfloat16 on CUDA), NCHW, no epilogue, all modes")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="every dtype, layout and epilogue, all modes")
    p.set_defaults(preset="quick")
    p.add_argument("--shape-set", choices=list(SHAPE_SETS), default="cpu-quick", help="see benchmarks/shapes.py")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="NxCxHxW",
                   help="relu/sigmoid sites with S = C // 16 instead of --shape-set")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: all")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: float32 (+ bfloat16 on CUDA)")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), help="default: nchw; --full: both")
    p.add_argument("--epilogue", nargs="+", choices=EPILOGUES, help="default: none; --full: both")
    p.add_argument("--providers", nargs="+", metavar="NAME", help="eager always runs; default: all but "
                   "the Triton interpreter")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile mode")
    harness.add_run_options(p)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="default: benchmarks/results")
    p.add_argument("--tag", help="suffix of the result file names")
    p.add_argument("--no-save", action="store_true", help="write no result files")
    args = p.parse_args(argv)
    full, cuda = args.preset == "full", args.device.startswith("cuda")

    def ordered(chosen: Optional[Sequence[str]], canonical: Sequence[str], quick: Sequence[str]) -> List[str]:
        return [name for name in canonical if name in (chosen or (canonical if full else quick))]
    args.modes = ordered(args.modes, MODES, MODES)
    args.dtypes = ordered(args.dtypes, list(DTYPES), ["float32", "bfloat16"] if cuda else ["float32"])
    args.layouts = ordered(args.layouts, list(LAYOUTS), ["nchw"])
    args.epilogue = ordered(args.epilogue, EPILOGUES, ["none"])
    return args


def select_providers(requested: Optional[Sequence[str]], device: torch.device) -> List[str]:
    available = provider_names(device)
    unknown = [p for p in requested or () if p not in available]
    if unknown:
        raise SystemExit(f"bench_se: providers {unknown} are not available on {device}; available: {available}")
    return [p for p in available if p in ["eager", *requested]] if requested else default_providers(device)


def main(argv: Optional[Sequence[str]] = None) -> Results:
    start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device, malloc = harness.start_run(args, "bench_se")
    shapes = custom_set(args.shapes) if args.shapes else shape_set(args.shape_set)
    run = Results(harness.repo_command(argv, __file__), device, shapes, select_providers(args.providers, device),
                  args.compile_mode, harness.run_header(device, malloc))
    # variant-major: each variant's sites run and are tabulated together
    cases = [Case(site, Variant(dtype, layout, epilogue)) for dtype in args.dtypes for layout in args.layouts
             for epilogue in args.epilogue for site in shapes.sites]
    with tqdm(total=len(cases) * len(args.modes), file=sys.stderr, unit="step", dynamic_ncols=True) as progress:
        for case in cases:
            try:
                bench_case(case, args.modes, run, progress)
            except MismatchError as error:
                raise SystemExit(f"bench_se: {error}") from None
    run.wall_s = time.perf_counter() - start
    print("\n".join(report_lines(run, harness.text_table)))
    if not args.no_save:
        print("\nwrote " + ", ".join(os.path.relpath(p) for p in save(run, args.results_dir, args.tag)))
    print(f"\ntotal wall time {run.wall_s:.1f} s (after imports), of which "
          f"torch.compile first calls {sum(ct.seconds for ct in run.compiles):.1f} s")
    return run


if __name__ == "__main__":
    main()
