"""What SE costs in whole networks, and how much of that FusedSE gives back: the SE overhead
(t_SE - t_noSE) / t_noSE of training steps and inference, per model and SE variant.

    python benchmarks/bench_model.py                      # --quick: ~4 minutes on 2 CPU cores
    python benchmarks/bench_model.py --full --csv m.csv --md m.md
    python benchmarks/bench_model.py --device cuda --amp  # bfloat16 autocast + channels_last

Models (se_kernels.models; one seed, the same weights for every variant): cifar (ResNet-18 /
SE-ResNet-18, 32x32 inputs) and imagenet (ResNet-50 / SE-ResNet-50, 224x224). Workloads: train
(forward, cross-entropy, backward, SGD step; zero_grad untimed) and infer (eval-mode forward
under no_grad, BatchNorm statistics set from the batch). Variants: noSE, reference (eager SE),
fused (FusedSE: SE + residual add + ReLU in one call), compiled (torch.compile of reference,
dynamic=False) and compiled-noSE (SE's overhead under compile is compiled vs compiled-noSE).
Method: every variant's first call (compiled: the compile, reported on its own), then the
correctness guard (fused and compiled against the reference: logits or loss tensor-wise and the
first step's gradients norm-wise; a mismatch aborts), then interleaved rounds
(harness.timed_rounds) until --target-s per variant or --case-budget-s. Brackets are the
p20/p80 of the per-round paired overhead. Headline: removed = 1 - overhead_fused /
overhead_reference, target >= 0.5; UNRESOLVED when eager SE's paired p20 <= 0, else YES / NO
by the medians and whether beyond the noise. --quick: CIFAR batch 32, ImageNet 8, ~10 s per
variant (5-40 rounds, <= 40 s per case), only CIFAR compiled on a CPU (a cold ResNet-50
compile takes minutes there); --full: CIFAR 128, ~30 s (10-200 rounds), both compiled; CUDA:
CIFAR 128, ImageNet 64, both compiled. glibc keeps freed memory unless --system-malloc.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import harness
import torch
import torch.nn.functional as F
from harness import Workload
from torch import nn

from se_kernels import FusedSE
from se_kernels.models import se_resnet18, se_resnet50
from se_kernels.ops import resolve_backend

ModelSpec = namedtuple("ModelSpec", "key arch factory image classes")  # arch: the SE model; noSE drops "SE-"
MODEL_SPECS = {"cifar": ModelSpec("cifar", "SE-ResNet-18", se_resnet18, 32, 10),
               "imagenet": ModelSpec("imagenet", "SE-ResNet-50", se_resnet50, 224, 1000)}
WORKLOADS = ("train", "infer")
VARIANTS = NO_SE, REFERENCE, FUSED, COMPILED, COMPILED_NO_SE = ("noSE", "reference", "fused", "compiled",
                                                                 "compiled-noSE")
SE_OF = {NO_SE: None, REFERENCE: "reference", FUSED: "fused", COMPILED: "reference", COMPILED_NO_SE: None}
MODES = {  # CIFAR batch on a CPU, timing (per variant, rounds, per case) and the models compiled on a CPU
    "quick": dict(cifar_batch=32, target_s=10.0, min_rounds=5, max_rounds=40, case_budget_s=40.0, warmup_rounds=0,
                  compile_models=("cifar",)),
    "full": dict(cifar_batch=128, target_s=30.0, min_rounds=10, max_rounds=200, case_budget_s=None, warmup_rounds=1,
                 compile_models=("cifar", "imagenet")),
}
IMAGENET_BATCH = {"cpu": 8, "cuda": 64}
CUDA_CIFAR_BATCH = 128
TARGET = 0.5  # the target: FusedSE removes at least half of eager SE's overhead
# The guard: logits / loss tensor-wise, max |diff| <= ATOL + RTOL max |ref|; the gradients of all
# parameters after the first step norm-wise, ||diff|| / ||ref|| <= GRAD_RTOL (loose: through
# training-mode BatchNorm float32 itself is ~1% from float64 here; a wrong kernel gives O(1)).
RTOL, ATOL, GRAD_RTOL = 1e-4, 1e-5, 5e-2
AMP_RTOL, AMP_ATOL, AMP_GRAD_RTOL = 5e-2, 1e-2, 3e-1
LR, SEED = 0.01, 0  # SGD (momentum 0.9); the weights and the batch


@dataclass
class Config:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    models: Tuple[str, ...] = ("cifar", "imagenet")
    workloads: Tuple[str, ...] = WORKLOADS
    batch: Dict[str, int] = field(default_factory=lambda: {"cifar": 32, "imagenet": 8})
    compile_models: Tuple[str, ...] = ("cifar",)  # models whose compiled variants run
    compile_baseline: bool = True  # compiled-noSE alongside compiled
    compile_backend: str = "inductor"
    fused_backend: str = "auto"
    amp: bool = False  # CUDA only: bfloat16 autocast and channels_last
    target_s: float = 10.0
    min_rounds: int = 5
    max_rounds: int = 40
    case_budget_s: Optional[float] = 40.0  # wall seconds of timed rounds per (model, workload)
    warmup_rounds: int = 0  # untimed rounds after the first calls

    def variants(self, model: str) -> List[str]:
        compiled = [COMPILED, COMPILED_NO_SE][:1 + self.compile_baseline] if model in self.compile_models else []
        return [NO_SE, REFERENCE, FUSED] + compiled


Variant = namedtuple("Variant", "model workload last")  # last: {"out": output of the latest call}


def build_model(spec: ModelSpec, variant: str, cfg: Config) -> nn.Module:
    torch.manual_seed(SEED)  # the same weights for every variant
    model = spec.factory(num_classes=spec.classes, se=SE_OF[variant])
    for m in model.modules():
        if isinstance(m, FusedSE):
            m.backend = cfg.fused_backend
    return model.to(cfg.device, memory_format=torch.channels_last if cfg.amp else torch.preserve_format)


def make_batch(spec: ModelSpec, batch: int, cfg: Config) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(batch, 3, spec.image, spec.image, generator=g).to(cfg.device)
    labels = torch.randint(0, spec.classes, (batch,), generator=g).to(cfg.device)
    return x.contiguous(memory_format=torch.channels_last) if cfg.amp else x, labels


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics = the batch's (one training-mode pass, cumulative average), so eval
    mode normalises like a trained net rather than by mean 0, var 1."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum


def build_variant(spec: ModelSpec, variant: str, workload: str, x: torch.Tensor, labels: torch.Tensor,
                  cfg: Config) -> Variant:
    model = build_model(spec, variant, cfg)
    if workload == "infer":
        calibrate_batchnorm(model, x)
    model.train(workload == "train")
    call = torch.compile(model, backend=cfg.compile_backend, dynamic=False) if variant in (
        COMPILED, COMPILED_NO_SE) else model
    amp = (lambda: torch.autocast(cfg.device.type, dtype=torch.bfloat16)) if cfg.amp else contextlib.nullcontext
    last: Dict[str, torch.Tensor] = {}
    if workload == "infer":
        def run() -> None:
            with torch.no_grad(), amp():
                last["out"] = call(x)
        return Variant(model, Workload(run=run), last)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step() -> None:
        with amp():
            loss = F.cross_entropy(call(x), labels)
        loss.backward()
        opt.step()
        last["out"] = loss.detach()  # no .item(): no device sync inside the timed call
    return Variant(model, Workload(run=step, prepare=lambda: opt.zero_grad(set_to_none=True)), last)


# ---------------------------------------------------------------------------------------
# The correctness guard


class Mismatch(RuntimeError):
    pass


def compare_gradients(ref: nn.Module, got: nn.Module, label: str, bound: float) -> float:
    """||got - ref|| / ||ref|| over every parameter's gradient; raises Mismatch beyond `bound`."""
    want, have = dict(ref.named_parameters()), dict(got.named_parameters())
    if want.keys() != have.keys() or any(p.grad is None for p in [*want.values(), *have.values()]):
        raise Mismatch(f"{label}: parameters or gradients differ from the reference's")
    g, gref = (torch.cat([ps[k].grad.float().flatten() for k in want]) for ps in (have, want))
    rel = ((g - gref).norm() / gref.norm()).item()
    if not rel <= bound:
        raise Mismatch(f"{label}: gradients (all parameters) differ from the eager reference: "
                       f"||diff|| / ||ref|| = {rel:.3g} > {bound}")
    return rel


def check_against_reference(variants: Dict[str, Variant], workload: str, cfg: Config, label: str) -> List[str]:
    """After the first calls: fused and compiled against the eager reference (logits, or the
    loss and the gradients of the first step). Raises Mismatch; returns the report's lines."""
    rtol, atol, grad_rtol = (AMP_RTOL, AMP_ATOL, AMP_GRAD_RTOL) if cfg.amp else (RTOL, ATOL, GRAD_RTOL)
    want, what = variants[REFERENCE].last["out"].float(), "logits" if workload == "infer" else "loss"
    lines = []
    for name in [n for n in (FUSED, COMPILED) if n in variants]:
        got = variants[name].last["out"].float()
        if got.shape != want.shape:
            raise Mismatch(f"{label} {name}: {what} have shape {tuple(got.shape)}, reference {tuple(want.shape)}")
        err, bound = (got - want).abs().max().item(), atol + rtol * want.abs().max().item()
        if not err <= bound:  # also catches NaN
            raise Mismatch(f"{label} {name}: {what} differ from the eager reference by {err:.3g} > {bound:.3g} "
                           f"(atol {atol} + rtol {rtol} x max |reference|)")
        line = f"{label} {name:<9} vs reference: {what} max |diff| {err:.2e} <= {bound:.2e}"
        if workload == "train":
            rel = compare_gradients(variants[REFERENCE].model, variants[name].model, f"{label} {name}", grad_rtol)
            line += f"; gradients ||diff||/||ref|| {rel:.2e} <= {grad_rtol:g}"
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------
# Timing one (model, workload)


Row = namedtuple("Row", "model arch batch workload variant calls median_ms p20_ms p80_ms "
                 "se_overhead se_overhead_p20 se_overhead_p80 "  # vs noSE: medians, paired p20, p80
                 "overhead_vs_compiled_noSE overhead_vs_compiled_noSE_p20 overhead_vs_compiled_noSE_p80",
                 defaults=(None,) * 6)
CompileTime = namedtuple("CompileTime", "model batch workload variant seconds fx_cache_hits fx_cache_misses")


def paired_overhead(t: Sequence[float], base: Sequence[float]) -> Tuple[float, float, float]:
    """(overhead of the medians, p20 and p80 of the per-round overheads)."""
    per_round = [a / b - 1 for a, b in zip(t, base)]
    return (harness.quantile(t, 0.5) / harness.quantile(base, 0.5) - 1, harness.quantile(per_round, 0.2),
            harness.quantile(per_round, 0.8))


def rows_of(spec: ModelSpec, batch: int, workload: str, times: Dict[str, List[float]]) -> List[Row]:
    rows = []
    for name, t in times.items():
        s = harness.summarize(t)
        vs_noSE = paired_overhead(t, times[NO_SE]) if SE_OF[name] and NO_SE in times else (None,) * 3
        vs_compiled = (paired_overhead(t, times[COMPILED_NO_SE]) if name == COMPILED and COMPILED_NO_SE in times
                       else (None,) * 3)
        rows.append(Row(spec.key, spec.arch if SE_OF[name] else spec.arch.replace("SE-", ""), batch, workload, name,
                        s.calls, s.median_s * 1e3, s.p20_s * 1e3, s.p80_s * 1e3, *vs_noSE, *vs_compiled))
    return rows


def bench(spec: ModelSpec, workload: str, cfg: Config, log=print) -> Tuple[List[Row], List[CompileTime], List[str]]:
    """Rows for every variant of one (model, workload), the compile warm-ups and the guard's lines."""
    torch._dynamo.reset()  # fresh dynamo caches per (model, workload); inductor's disk caches stay
    batch, label = cfg.batch[spec.key], f"{spec.key} {workload}"
    x, labels = make_batch(spec, batch, cfg)
    variants = {name: build_variant(spec, name, workload, x, labels, cfg) for name in cfg.variants(spec.key)}
    compiles = []
    for name, v in variants.items():  # first calls: compiles the compiled variants
        seconds, hits, misses = harness.first_call(v.workload, cfg.device)
        if name in (COMPILED, COMPILED_NO_SE):
            compiles.append(CompileTime(spec.key, batch, workload, name, seconds, hits, misses))
            log(f"  {label}: compile warm-up {name} {seconds:.1f} s")
    checks = check_against_reference(variants, workload, cfg, label)
    workloads = {name: v.workload for name, v in variants.items()}
    harness.measure(workloads, cfg.warmup_rounds, cfg.device)
    log(f"  {label}: batch {batch}, timing ...")
    t0 = time.perf_counter()
    times = harness.timed_rounds(workloads, cfg.device, cfg.target_s, cfg.min_rounds, cfg.max_rounds, cfg.case_budget_s)
    log(f"  {label}: {len(times[NO_SE])} rounds in {time.perf_counter() - t0:.1f} s")
    return rows_of(spec, batch, workload, times), compiles, checks


# ---------------------------------------------------------------------------------------
# Headline and report


def fmt_pct(v: Optional[float]) -> str:
    return "" if v is None else f"{v * 100:+.1f}%"


def fmt_overhead(v: Optional[float], lo: Optional[float], hi: Optional[float]) -> str:
    return "" if v is None else f"{fmt_pct(v)} [{fmt_pct(lo)}, {fmt_pct(hi)}]"


TABLE_COLUMNS = ("model", "batch", "workload", "variant", "calls", "median ms", "p20-p80 ms",
                 "SE overhead vs noSE [paired p20, p80]", "vs compiled-noSE [p20, p80]")


def table_cells(r: Row) -> List[str]:
    return [r.arch, str(r.batch), r.workload, r.variant, str(r.calls), f"{r.median_ms:.1f}",
            f"{r.p20_ms:.1f}-{r.p80_ms:.1f}", fmt_overhead(*r[9:12]), fmt_overhead(*r[12:15])]


# removed: 1 - overhead_fused / overhead_reference (None: no eager overhead); removed_low/high: the
# same from the paired p80/p20 (fused) and p20/p80 (reference); halves: by the medians (None:
# unresolved); status: yes | yes by the medians | no | no by the medians | unresolved;
# overhead_compiled: vs eager noSE, overhead_compiled_vs_compiled: vs compiled noSE
Headline = namedtuple("Headline", "model arch batch workload overhead_reference overhead_fused removed removed_low "
                      "removed_high verdict halves status overhead_compiled overhead_compiled_vs_compiled")


def headline(rows: List[Row]) -> Optional[Headline]:
    by = {r.variant: r for r in rows}
    if REFERENCE not in by or FUSED not in by or by[REFERENCE].se_overhead is None:
        return None
    ref, fused, compiled = by[REFERENCE], by[FUSED], by.get(COMPILED)
    removed = low = high = halves = None
    if ref.se_overhead > 0:
        removed = 1 - fused.se_overhead / ref.se_overhead
        low = 1 - fused.se_overhead_p80 / ref.se_overhead_p20 if ref.se_overhead_p20 > 0 else None
        high = 1 - fused.se_overhead_p20 / ref.se_overhead_p80 if ref.se_overhead_p80 > 0 else None
    if ref.se_overhead <= 0 or ref.se_overhead_p20 <= 0:  # in a fifth of the rounds eager SE was no slower
        status, verdict = "unresolved", "UNRESOLVED: eager SE's overhead is within this run's noise"
    elif removed >= TARGET:
        halves, sure = True, low >= TARGET
        status = "yes" if sure else "yes by the medians"
        verdict = "YES, FusedSE at least halves it" + ("" if sure else " by the medians, but not beyond the noise")
    else:
        halves, sure = False, high is None or high < TARGET
        status = "no" if sure else "no by the medians"
        verdict = "NO, FusedSE does not halve it" + ("" if sure else " by the medians, but within the noise")
    return Headline(ref.model, ref.arch, ref.batch, ref.workload, ref.se_overhead, fused.se_overhead, removed, low,
                    high, verdict, halves, status, compiled.se_overhead if compiled else None,
                    compiled.overhead_vs_compiled_noSE if compiled else None)


def headline_line(h: Headline) -> str:
    text = f"{h.arch} b{h.batch} {h.workload}: SE overhead eager {fmt_pct(h.overhead_reference)}, FusedSE " + (
        fmt_pct(h.overhead_fused))
    if h.removed is not None:
        lo, hi = ("?" if v is None else f"{v * 100:.0f}%" for v in (h.removed_low, h.removed_high))
        text += f" -> FusedSE removes {h.removed * 100:.0f}% of it (paired p20/p80 range {lo} to {hi})"
    text += f": {h.verdict}"
    if h.overhead_compiled is not None:
        text += f"; [torch.compile: {fmt_pct(h.overhead_compiled)} vs eager noSE" + (
            "" if h.overhead_compiled_vs_compiled is None else
            f", {fmt_pct(h.overhead_compiled_vs_compiled)} vs compiled noSE") + "]"
    return text


def summary_lines(headlines: List[Headline]) -> List[str]:
    """The plain answer to the issue's question, over all (model, workload) cases."""
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
    lines = ["Issue target (FusedSE cuts the eager SE overhead at least in half on this machine): " + answer]
    if answer == "NOT SHOWN by this run" or len(statuses) > 1:
        lines += [f"  {status}: {', '.join(by_status[status])}" for status in
                  ("yes", "yes by the medians", "no by the medians", "no", "unresolved") if status in by_status]
    if "unresolved" in by_status:
        lines.append("  (unresolved: eager SE was no slower than noSE in at least a fifth of the rounds; more rounds "
                     "(--target-s, --case-budget-s 0, --full) or a quieter machine can resolve it)")
    if any(h.removed is not None and h.removed > 1 for h in headlines):
        lines.append("  (over 100% means FusedSE ran faster than noSE; that need not be noise: its one pass does "
                     "the residual add and ReLU that noSE does in two, F.relu(out + shortcut))")
    return lines


def report_lines(rows: List[Row], compiles: List[CompileTime], checks: List[str], notes: List[str],
                 table: harness.Table) -> List[str]:
    """The results after the header, with harness.markdown_table (the .md file) or text_table."""
    headlines = [h for h in (headline([r for r in rows if (r.model, r.workload) == key])
                             for key in dict.fromkeys((r.model, r.workload) for r in rows)) if h]
    out = table(TABLE_COLUMNS, [table_cells(r) for r in rows]) + [
        "", "SE overhead = (t_SE - t_noSE) / t_noSE from the medians; brackets: 20th/80th percentiles "
        "of the per-round paired overhead.", "", "## Headline", "",
        "How much of eager SE's overhead FusedSE removes (1 - overhead_fused / overhead_reference):", ""]
    out += [f"- {headline_line(h)}" for h in headlines] + [""]
    summary = summary_lines(headlines)
    out += [f"**{summary[0]}**" if table is harness.markdown_table else summary[0], *summary[1:], ""]
    if compiles:
        out += ["## torch.compile warm-up (first call; not in the timings)", ""]
        out += table(("model", "batch", "workload", "variant", "seconds", "FX graph cache hit", "miss"),
                     [(c.model, str(c.batch), c.workload, c.variant, f"{c.seconds:.1f}", str(c.fx_cache_hits),
                       str(c.fx_cache_misses)) for c in compiles]) + [""]
    out += ["## Correctness guard", ""] + [f"- {c}" for c in checks] + [""]
    return out + (["## Notes", ""] + [f"- {n}" for n in notes] + [""] if notes else [])


# ---------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="(default) CIFAR batch 32, compile CIFAR only (on a CPU)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="CIFAR batch 128, longer timing, compile both models")
    p.set_defaults(mode="quick")
    p.add_argument("--models", nargs="+", choices=sorted(MODEL_SPECS), default=list(MODEL_SPECS))
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--cifar-batch", type=int, help="quick: 32 on CPU; full and CUDA: 128")
    p.add_argument("--imagenet-batch", type=int, help="8 on CPU, 64 on CUDA")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    p.add_argument("--compile-models", nargs="+", choices=sorted(MODEL_SPECS),
                   help="models whose compiled variants run (quick on CPU: cifar; otherwise both)")
    p.add_argument("--no-compile-baseline", action="store_true", help="leave out compiled-noSE")
    p.add_argument("--compile-backend", default="inductor", help='torch.compile backend ("aot_eager" for checks)')
    p.add_argument("--fused-backend", default="auto", help="FusedSE backend (default auto)")
    p.add_argument("--amp", action="store_true", help="CUDA only: bfloat16 autocast and channels_last")
    p.add_argument("--target-s", type=float, help="measured seconds per variant per (model, workload)")
    p.add_argument("--min-rounds", type=int)
    p.add_argument("--max-rounds", type=int)
    p.add_argument("--case-budget-s", type=float, help="seconds of rounds per (model, workload), once --min-rounds "
                   "are done (quick: 40; full and 0: no limit)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument("--md", metavar="PATH", help="also write a markdown report (with the exact command)")
    harness.add_run_options(p)
    args = p.parse_args(argv)
    if args.amp and not args.device.startswith("cuda"):
        p.error("--amp is for --device cuda only (bfloat16 autocast on this CPU is not the workload measured here)")
    for name in ("cifar_batch", "imagenet_batch", "min_rounds", "max_rounds", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def config_from_args(args: argparse.Namespace, device: torch.device) -> Tuple[Config, List[str]]:
    """The Config, and notes on choices the output should state."""
    mode, cuda, notes = MODES[args.mode], device.type == "cuda", []
    batch = {"cifar": args.cifar_batch or (CUDA_CIFAR_BATCH if cuda else mode["cifar_batch"]),
             "imagenet": args.imagenet_batch or IMAGENET_BATCH[device.type]}
    if not cuda and args.mode == "quick" and args.cifar_batch is None and "cifar" in args.models:
        notes.append(f"quick mode runs CIFAR at batch {batch['cifar']} to stay within ~4 minutes on a 2-core CPU; "
                     f"the issue's batch 128 is --full or --cifar-batch 128")
    compile_models = () if args.no_compile else tuple(args.compile_models or (
        MODEL_SPECS if cuda else mode["compile_models"]))
    if args.no_compile:
        notes.append("--no-compile: no torch.compile variants")
    elif "imagenet" in args.models and "imagenet" not in compile_models and not args.compile_models:
        notes.append("ImageNet torch.compile skipped in quick mode on CPU: compiling ResNet-50 takes minutes per "
                     "graph on 2 cores with a cold inductor cache; --full or --compile-models cifar imagenet "
                     "include it")
    if compile_models and args.no_compile_baseline:
        notes.append("--no-compile-baseline: the compiled variant's overhead is against eager noSE only, which "
                     "mixes SE's cost with what compile saves in the rest of the network")
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else mode[name]  # noqa: E731
    return Config(
        device=device, models=tuple(dict.fromkeys(args.models)), workloads=tuple(dict.fromkeys(args.workloads)),
        batch=batch, compile_models=compile_models, compile_baseline=not args.no_compile_baseline,
        compile_backend=args.compile_backend, fused_backend=args.fused_backend, amp=args.amp,
        target_s=pick("target_s"), min_rounds=args.min_rounds or mode["min_rounds"],
        max_rounds=args.max_rounds or mode["max_rounds"], case_budget_s=pick("case_budget_s") or None,
        warmup_rounds=mode["warmup_rounds"]), notes


def setting_lines(args: argparse.Namespace, cfg: Config) -> List[str]:
    """What this run measures: precision, backends, batches, the compiled models and the timing."""
    timing = (f"~{cfg.target_s:g} s per variant, {cfg.min_rounds}-{cfg.max_rounds} rounds after "
              f"{cfg.warmup_rounds} warm-up round(s)")
    timing += f", at most ~{cfg.case_budget_s:g} s of rounds per model and workload" if cfg.case_budget_s else ""
    timing += (", cudnn.benchmark" + ("" if cfg.amp else ", TF32 off")) if cfg.device.type == "cuda" else ""
    compiled = ", ".join(cfg.compile_models) or "none"
    return [f"setting: {args.mode}, {cfg.device}, {precision(cfg)}, FusedSE backend "
            f"{resolve_backend(cfg.fused_backend, cfg.device.type)}, torch.compile backend {cfg.compile_backend} "
            f"(default mode, dynamic=False), SGD lr {LR} momentum 0.9, seed {SEED}",
            "batches: " + ", ".join(f"{k} {cfg.batch[k]}" for k in cfg.models) + f"; compiled: {compiled}"
            + (" (+ compiled-noSE)" if cfg.compile_models and cfg.compile_baseline else "") + f"; timing: {timing}"]


def precision(cfg: Config) -> str:
    return "bfloat16 autocast, channels_last" if cfg.amp else "float32, NCHW"


def run_all(cfg: Config) -> Tuple[List[Row], List[CompileTime], List[str]]:
    """bench() every (model, workload); a failed correctness guard ends the run."""
    rows, compiles, checks = [], [], []
    for key in cfg.models:
        for workload in cfg.workloads:
            print(f"[{MODEL_SPECS[key].arch} {workload}]", file=sys.stderr, flush=True)
            try:
                r, c, ch = bench(MODEL_SPECS[key], workload, cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
            except Mismatch as e:
                sys.exit(f"bench_model: correctness guard failed: {e}; not benchmarking a wrong model")
            rows, compiles, checks = rows + r, compiles + c, checks + ch
    return rows, compiles, checks


def main(argv: Optional[Sequence[str]] = None) -> None:
    start, usage = time.perf_counter(), harness.cpu_times()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device, malloc = harness.start_run(args, "bench_model", tf32_off=not args.amp)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    cfg, notes = config_from_args(args, device)
    header = [f"{k + ':':<8} {v}" for k, v in harness.run_header(device, malloc)] + setting_lines(args, cfg)
    print("\n".join(header + [f"note:    {n}" for n in notes]), flush=True)
    rows, compiles, checks = run_all(cfg)
    print("\n" + "\n".join(report_lines(rows, compiles, checks, [], harness.text_table)))
    if args.csv:
        harness.write_csv(args.csv, rows, {
            "device": str(cfg.device), "precision": precision(cfg), "threads": torch.get_num_threads(),
            "malloc": malloc, "mode": args.mode, "compile_backend": cfg.compile_backend,
            "fused_backend": resolve_backend(cfg.fused_backend, cfg.device.type), "torch": torch.__version__})
        print(f"wrote {args.csv}")
    total, compile_s = time.perf_counter() - start, sum(ct.seconds for ct in compiles)
    header += [f"others:  {harness.others_line([e - s for s, e in zip(usage, harness.cpu_times())], 'the run')}",
               f"wall:    {total:.0f} s, of which torch.compile warm-up {compile_s:.0f} s"]
    print(header[-2])
    if args.md:
        harness.write_text(args.md, ["# SE overhead in whole networks (benchmarks/bench_model.py)", "", "Command:", "",
                                     "```", harness.repo_command(argv, __file__), "```", "", "```", *header, "```", ""]
                           + report_lines(rows, compiles, checks, notes, harness.markdown_table))
        print(f"wrote {args.md}")
    print(f"\ntotal wall time {total:.1f} s (after imports), of which torch.compile warm-up {compile_s:.1f} s")


if __name__ == "__main__":
    main()
