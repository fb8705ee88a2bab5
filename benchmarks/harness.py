"""What bench_se.py, bench_model.py and test_bench_op.py share: timing in interleaved rounds with
quantiles (CPU: time.perf_counter; GPU: CUDA events after an L2 flush, as
triton.testing.do_bench), peak memory, the malloc setting, the CPU load of other processes, the
run's description, and the report writers (text and markdown tables, CSV, text files)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
L2_FLUSH_BYTES = 256 * 2**20  # over any GPU's L2 (H100/H200: 50 MB), as do_bench's buffer
OTHER_CORES_WARNING = 0.2  # CPUs kept busy by other processes from which the header warns
ENV_KEYS = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF", "SE_KERNELS_BACKEND", "OMP_NUM_THREADS",
            "CUDA_VISIBLE_DEVICES")  # the settings a run's command records
Summary = namedtuple("Summary", "median_s p20_s p80_s calls")
Table = Callable[[Sequence[str], Sequence[Sequence[str]]], List[str]]  # text_table or markdown_table


# run: the timed call; prepare: untimed, right before each call
Workload = namedtuple("Workload", "run prepare", defaults=(lambda: None,))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """Zeroed before each timed GPU call so that it starts with a cold L2: Triton's benchmark
    buffer where Triton (imported only here) has a driver for the GPU, else our own."""
    try:
        from triton.runtime import driver
        return driver.active.get_empty_cache_for_benchmark()
    except Exception:  # no Triton, or no driver for this GPU
        return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)


def measure(workloads: Dict[str, Workload], rounds: int, device: torch.device) -> Dict[str, List[float]]:
    """Per-call seconds of each workload over `rounds` rounds; round r calls every workload once,
    in an order rotated by r, so machine drift hits all alike. GPU: events around each call on
    the current stream, after the L2 flush, read after each round."""
    names = list(workloads)
    times: Dict[str, List[float]] = {name: [] for name in names}
    flush = l2_flush_buffer(device) if device.type == "cuda" else None
    for r in range(rounds):
        events = []
        for name in names[r % len(names):] + names[:r % len(names)]:
            workloads[name].prepare()
            if flush is None:
                t0 = time.perf_counter()
                workloads[name].run()
                times[name].append(time.perf_counter() - t0)
                continue
            events.append((name, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            flush.zero_()
            events[-1][1].record()
            workloads[name].run()
            events[-1][2].record()
        synchronize(device)
        for name, start, end in events:
            times[name].append(start.elapsed_time(end) / 1e3)
    return times


def rounds_for(times: Dict[str, List[float]], target_s: float, min_rounds: int, max_rounds: int) -> int:
    """Rounds giving about target_s of measured time per workload, from warm-up times."""
    per_call = statistics.fmean(statistics.median(t) for t in times.values())
    return max(min_rounds, min(max_rounds, math.ceil(target_s / per_call)))


def timed_rounds(workloads: Dict[str, Workload], device: torch.device, target_s: float, min_rounds: int,
                 max_rounds: int, budget_s: Optional[float] = None) -> Dict[str, List[float]]:
    """measure() in whole rotations (at least one) until the workloads have target_s of
    measured time on average or the rounds took budget_s, within [min_rounds, max_rounds]."""
    n, start = len(workloads), time.perf_counter()
    times: Dict[str, List[float]] = {name: [] for name in workloads}
    while True:
        for name, t in measure(workloads, n, device).items():
            times[name] += t
        rounds, measured = len(times[next(iter(times))]), statistics.fmean(sum(t) for t in times.values())
        over = budget_s is not None and time.perf_counter() - start >= budget_s
        if rounds + n > max_rounds or (rounds >= min_rounds and (measured >= target_s or over)):
            return times


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s, pos = sorted(values), q * (len(values) - 1)
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> Summary:
    return Summary(quantile(times, 0.5), quantile(times, 0.2), quantile(times, 0.8), len(times))


def first_call(workload: Workload, device: torch.device) -> Tuple[float, int, int]:
    """Seconds of one call (torch.compile: the compile) and inductor's FX graph cache hits and
    misses during it, which tell a cold compile from one served by the disk cache."""
    from torch._dynamo.utils import counters
    before = dict(counters["inductor"])
    workload.prepare()
    t0 = time.perf_counter()
    workload.run()
    synchronize(device)
    seconds, after = time.perf_counter() - t0, counters["inductor"]
    return seconds, *(after[k] - before.get(k, 0) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss"))


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """fd 2 to /dev/null: the profiler's C++ side logs there on every start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(workload: Workload, device: torch.device) -> int:
    """High-water mark of the bytes allocated during one call above what was live before it.
    CUDA: the allocator's peak statistics. CPU: the running sum of the profiler's memory
    events (allocations +bytes, frees -bytes, also of tensors from before the call)."""
    workload.prepare()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        workload.run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True) as prof:
        workload.run()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def choose_malloc(system_malloc: bool) -> str:
    """Unless system_malloc or a preloaded jemalloc/tcmalloc: glibc malloc keeps freed memory
    for reuse (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB, what GLIBC_TUNABLES=glibc.malloc.mmap_max=0:
    glibc.malloc.trim_threshold=2147483647 does); by default each large tensor gets fresh pages
    and a call pays a page fault per 4 KiB it writes. Returns the setting's description."""
    preloaded = [lib for lib in ("jemalloc", "tcmalloc") if lib in os.environ.get("LD_PRELOAD", "")]
    if preloaded:
        return f"{preloaded[0]} (LD_PRELOAD)"
    if system_malloc:
        tunables = os.environ.get("GLIBC_TUNABLES")
        return "glibc defaults (--system-malloc)" + (f", GLIBC_TUNABLES={tunables}" if tunables else "")
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    if mallopt is not None and mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1:
        return "glibc, freed memory kept for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2GiB)"
    return "system defaults (mallopt unavailable)"


def cpu_times() -> Tuple[float, float, float]:
    """Seconds of wall time, of this process's CPU time and of the machine's busy CPU time
    (/proc/stat without idle and iowait; nan where there is none)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
        machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        machine = math.nan
    return time.perf_counter(), time.process_time(), machine


def others_line(span: Sequence[float], what: str) -> str:
    """How many CPUs other processes kept busy over a (wall, own, machine) span of cpu_times()."""
    wall, own, machine = span
    cores = (machine - own) / wall if wall > 0 else math.nan
    return (f"other processes kept {cores:.2f} of the {os.cpu_count()} CPUs busy during {what} (/proc/stat)"
            + (" - WARNING: they competed for the cores; a multi-threaded call stalls whenever one of its threads "
               "is descheduled, which inflates times and speedups: rerun on an idle machine or with --threads 1"
               if cores >= OTHER_CORES_WARNING else ""))


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options both benchmarks take: --device, --threads, --system-malloc."""
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N); 1 on a busy machine")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc malloc's defaults (page faults)")


def start_run(args: argparse.Namespace, script: str, tf32_off: bool = True) -> Tuple[torch.device, str]:
    """Applies --threads and the malloc setting, checks the device, and switches TF32 off (float32
    is float32 for every provider, and the guards stay tight). Returns (device, malloc)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{script}: --device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
    if tf32_off:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return device, choose_malloc(args.system_malloc)


def run_header(device: torch.device, malloc: str) -> List[Tuple[str, str]]:
    """(key, value) lines that describe a run: date, machine, device, torch, git commit, malloc."""
    return [("date", datetime.datetime.now().isoformat(timespec="seconds")),
            ("machine", f"{platform.node()}, {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads "
                        f"{torch.get_num_threads()}"),
            ("device", f"{device} ({device_name(device)})"), ("torch", torch.__version__),
            ("source", source_version()), ("malloc", malloc)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slugify(name: str) -> str:
    """"AMD EPYC 7763 64-Core Processor" -> "amd-epyc-7763", for file names."""
    name = re.sub(r"\((r|tm)\)|@.*$|\b(cpu|processor)\b|\b\d+-core\b", " ", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    return f"{device.type}-{slugify(device_name(device))}"


def source_version() -> str:
    """The git commit of the checkout, "+ uncommitted changes" when tracked sources differ."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results",
                    ":!README.md", ":!benchmarks/README.md")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"git {sha}" + (" + uncommitted changes" if dirty else "")


def repo_command(argv: Sequence[str], script: str) -> str:
    """The command reproducing this run from the repository root: the ENV_KEYS settings (a
    preloaded library by name), the interpreter (relative if it is the repository's), the
    script relative to the root. No machine paths."""
    env = [f"{k}={shlex.quote(' '.join(map(os.path.basename, v.split())) if k == 'LD_PRELOAD' else v)}"
           for k, v in ((k, os.environ[k]) for k in ENV_KEYS if k in os.environ)]
    exe = Path(sys.executable)
    python = os.path.relpath(exe, ROOT) if ROOT in exe.absolute().parents else "python"
    return " ".join(env + [shlex.join([python, os.path.relpath(Path(script).resolve(), ROOT), *argv])])


# ---------------------------------------------------------------------------------------
# Report writers


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """Aligned columns; those of numbers (digits, signs, ., x, %, brackets) to the right."""
    cols = list(zip(header, *rows))
    widths = [max(map(len, col)) for col in cols]
    right = [all(re.fullmatch(r"[-+\d.,x%\[\] ]*", c) for c in col[1:]) for col in cols]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()
    return [line(header), "-" * len(line(header))] + [line(r) for r in rows]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(header), line(["---"] * len(header))] + [line(r) for r in rows]


def write_csv(path: Path, rows: Sequence[Tuple], setting: Dict[str, object]) -> None:
    """One line per row (a namedtuple) after the columns of `setting`, the same on every line."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(setting) + list(rows[0]._fields if rows else ()))
        writer.writeheader()
        writer.writerows({**setting, **r._asdict()} for r in rows)


def write_text(path: Path, lines: Sequence[str]) -> None:
    Path(path).write_text("\n".join(lines) + "\n")
