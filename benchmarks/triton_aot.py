"""Compile the Triton kernels ahead of time for GPUs this machine does not have, and report
what each compiled variant uses (registers, spills, stack, shared memory, occupancy).

    python benchmarks/triton_aot.py                      # sm_90 and sm_80, every shape set
    python benchmarks/triton_aot.py --arch 90 --out benchmarks/results/triton_resources.md
    python benchmarks/triton_aot.py --cold               # a fresh Triton cache (else build/triton-aot-cache)

No GPU is needed: a stand-in Triton driver reports the target GPUTarget("cuda", 90, 32) (or 80)
and the launch code of se_kernels/triton/launch.py runs as it does on a GPU, on meta tensors,
with every `kernels.NAME[grid](...)` launch redirected to `NAME.run(..., warmup=True)`, which
compiles (through the triton wheel's ptxas) without launching. So the variants compiled are
exactly the ones the launch code would launch: the same constexprs, num_warps, argument dtypes
and integer specialisations (divisibility by 16, == 1), with the split plans' pixel splits of
the target's SM count (H100/H200: 132, A100: 108).

What is compiled: for every benchmark shape set (benchmarks/shapes.py) and each of its sites
(with the site's own activation/gate), {float32, bfloat16} x {NCHW, channels_last} x epilogue
{none, residual + relu} x {forward, backward} (backward with grad_x, plus grad_residual with
the epilogue); biases as the benchmarks' modules have them; at each site also the generic
channel-attention path's stage launches (se_kernels/triton/stages.py: the average + max pool and
the scale forward, the gate gradient and both input gradients backward). Besides the benchmark sets, one
"wide" site whose samples exceed 2^31 elements (meta tensors: nothing is allocated) compiles the
int64-offset (WIDE) variants of the split kernels. Identical variants (same kernel, same Triton
specialisation key) compile once; --jobs worker processes (default: one per CPU) each compile
every jobs-th of them.

Triton cache: build/triton-aot-cache by default, so a second run is warm (~40 s for everything
here instead of ~6 minutes cold); --cold compiles into a fresh temporary one. Triton's cache key
covers the kernel source, the triton version and ptxas, so a warm cache cannot hide a change.

Resources per variant: registers, stack frame and local memory from `cuobjdump
--dump-resource-usage` on the cubin, spill stores/loads from ptxas' own -v log (captured while
Triton compiles; recorded next to Triton's cache so a warm cache still reports them), shared
memory from Triton's metadata (dynamic shared memory it requests at launch), and the resident
warps per SM this allows.

Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py on a machine without a GPU)
makes @triton.jit return InterpretedFunction objects, which cannot compile: this module refuses
to compile in such a process; `run_subprocess` runs the whole thing in a fresh process with
TRITON_INTERPRET removed.

Triton internals this relies on (tests/test_triton_aot.py notices when they change):
triton.runtime.driver's set_active/_active, JITFunction.run(warmup=True), the binder in
JITFunction.device_caches with triton.runtime.jit.compute_cache_key (variant_key), the
TRITON_DUMP_PTXAS_LOG knob, and launch.py's module globals kernels, WRAP_TRITON and sm_count.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # shapes.py, whatever the import mode

DEFAULT_CACHE_DIR = ROOT / "build" / "triton-aot-cache"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "triton_resources.md"
SIDECAR = "se_kernels_aot"  # folder in the Triton cache dir: ptxas -v results by kernel hash


@dataclass(frozen=True)
class Arch:
    """The per-SM limits the occupancy below is computed from (CUDA occupancy calculator rules)."""
    cc: int
    gpu: str
    sm_count: int  # the split plans' pixel splits are 4 programs per SM
    smem_per_sm: int  # bytes of shared memory per SM available to blocks
    l2_bytes: int  # the streamed plans count on half of it
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reg_granularity: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # the register file is split over 4 SM sub-partitions
    reserved_smem_per_block: int = 1024  # the CUDA runtime's share (sm_80 and later)

    def resident_warps(self, regs: int, smem: int, warps: int) -> int:
        """Warps of this kernel resident on one SM at once (blocks that fit x warps per block)."""
        regs_per_warp = -(-max(regs, 1) * 32 // self.reg_granularity) * self.reg_granularity
        warps_per_part = (self.regs_per_sm // self.sub_partitions) // regs_per_warp
        warps_alloc = -(-warps // self.sub_partitions) * self.sub_partitions
        by_regs = warps_per_part * self.sub_partitions // warps_alloc
        by_smem = self.smem_per_sm // (smem + self.reserved_smem_per_block)
        by_warps = self.max_warps_per_sm // warps
        return min(by_regs, by_smem, by_warps, self.max_blocks_per_sm) * warps


ARCHS: Dict[int, Arch] = {
    90: Arch(90, "H100/H200", sm_count=132, smem_per_sm=228 * 1024, l2_bytes=60 * 10**6),  # H200's L2
    80: Arch(80, "A100", sm_count=108, smem_per_sm=164 * 1024, l2_bytes=40 * 2**20),
}

DTYPES = ("float32", "bfloat16")
LAYOUTS = ("nchw", "channels_last")
EPILOGUES = ("none", "residual_relu")
DIRECTIONS = ("forward", "backward")

# Extra sites besides the benchmark shape sets (meta tensors: nothing is allocated): one whose
# samples exceed 2^31 elements, so the split kernels' WIDE (int64 offsets) variants are checked
# too; and SE-ResNet-50's four stages at batch 256 (benchmarks/gpu_model.py's largest set), which
# take the streamed plan on every arch where the 16-byte paths allow.
EXTRA_SETS = {"wide": ((1, 64, 8192, 4096, 4),),
              "streamed": tuple((256, c, hw, hw, s) for c, hw, s in ((256, 56, 16), (512, 28, 32), (1024, 14, 64),
                                                                   (2048, 7, 128)))}


# ---- what is compiled -----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One call of the op whose launches are compiled."""
    shape_set: str
    site: str  # NxCxHxW/S
    shape: Tuple[int, int, int, int]
    squeeze: int
    activation: str
    gate: str
    dtype: str
    layout: str
    epilogue: str
    direction: str


def shape_set_sites(names: Sequence[str]) -> List[Tuple[str, Tuple[int, int, int, int], int, str, str]]:
    """(set, shape, S, activation, gate) of every site of the named sets (benchmarks/shapes.py
    SHAPE_SETS, or EXTRA_SETS)."""
    import shapes

    out = []
    for name in names:
        if name in EXTRA_SETS:
            out += [(name, (n, c, h, w), s, "relu", "sigmoid") for n, c, h, w, s in EXTRA_SETS[name]]
            continue
        for site in shapes.shape_set(name).sites:
            out.append((name, site.shape, site.s, site.activation, site.gate))
    return out


def all_set_names() -> List[str]:
    import shapes

    return list(shapes.SHAPE_SETS) + list(EXTRA_SETS)


def make_cases(set_names: Sequence[str], dtypes=DTYPES, layouts=LAYOUTS, epilogues=EPILOGUES,
               directions=DIRECTIONS, act_gate: Optional[Tuple[str, str]] = None) -> List[Case]:
    """act_gate: use this (activation, gate) for every site instead of the site's own."""
    cases = []
    for set_name, shape, s, act, gate in shape_set_sites(set_names):
        if act_gate is not None:
            act, gate = act_gate
        label = "x".join(map(str, shape)) + f"/{s}"
        for dtype in dtypes:
            for layout in layouts:
                for epilogue in epilogues:
                    for direction in directions:
                        cases.append(Case(set_name, label, shape, s, act, gate, dtype, layout, epilogue, direction))
    return cases


# ---- a Triton driver for a GPU that is not there ----------------------------------------------


def interpreter_active() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def _fake_driver_class():
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class AheadOfTimeDriver(DriverBase):
        """Just what JITFunction.run(..., warmup=True) needs: the target, a device id (one per
        arch, so that Triton's per-device binder caches, which hold the target, never mix
        arches) and a stream."""

        def __init__(self, arch: int):
            self.arch = arch

        @staticmethod
        def is_active():
            return False

        def get_current_target(self):
            return GPUTarget("cuda", self.arch, 32)

        def get_current_device(self):
            return 1000 + self.arch

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("meta")

        def _no_gpu(self, *args, **kwargs):
            raise RuntimeError(f"se_kernels triton_aot: no GPU here (compiling for sm_{self.arch} only)")

        map_python_to_cpp_type = get_benchmarker = get_device_interface = _no_gpu
        get_empty_cache_for_benchmark = clear_cache = _no_gpu

    return AheadOfTimeDriver


@contextlib.contextmanager
def target(arch: int):
    """Make Triton compile for sm_<arch>; the previous driver (None: not created yet) comes back
    on exit."""
    if interpreter_active():
        raise RuntimeError("TRITON_INTERPRET=1: @triton.jit made InterpretedFunctions, which cannot be "
                           "compiled; use triton_aot.run_subprocess (it drops TRITON_INTERPRET)")
    import triton
    from triton.runtime import driver

    previous = driver._active
    with triton.knobs.nvidia.scope():  # puts the knob (and its environment variable) back
        triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log, printed (compile_variant captures it)
        driver.set_active(_fake_driver_class()(arch))
        try:
            yield
        finally:
            driver.set_active(previous)


# ---- driving the launch code -------------------------------------------------------------------


@dataclass
class Launch:
    name: str
    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict  # constexprs and num_warps, as launch.py passes them


class _Recorder:
    """Stands in for a JITFunction in launch.py: `kernel[grid](*args, **kwargs)` records."""

    def __init__(self, name, fn, sink):
        self.name, self.fn, self.sink = name, fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.name, self.fn, tuple(grid), args, kwargs))

        return launch


def jit_kernels() -> Dict[str, object]:
    """name -> JITFunction of the kernels in se_kernels/triton/kernels.py (the helpers, named
    _like_this, are inlined into them)."""
    from triton.runtime.jit import JITFunction

    from se_kernels.triton import kernels

    return {name: obj for name, obj in vars(kernels).items()
            if isinstance(obj, JITFunction) and not name.startswith("_")}


def kernels_named_in_launch_code() -> List[str]:
    """The `kernels.NAME_kernel` that se_kernels/triton/launch.py (the SE op) and stages.py (the
    generic channel-attention path) launch (a name ending in _kernel: prose in comments that names
    kernels.py or one of its helpers is not a launch)."""
    from se_kernels.triton import launch, stages

    text = Path(launch.__file__).read_text() + Path(stages.__file__).read_text()
    return sorted(set(re.findall(r"\bkernels\.(\w+_kernel)\b", text)))


@contextlib.contextmanager
def _recording(arch: Arch, sink: List[Launch]):
    """launch.py and stages.py with their kernels replaced by recorders, no wrap_triton, and arch's
    SM count and L2 budget (the streamed plans)."""
    from se_kernels.triton import launch, stages

    proxy = types.SimpleNamespace(**{name: _Recorder(name, fn, sink) for name, fn in jit_kernels().items()})
    saved = launch.kernels, launch.WRAP_TRITON, launch.sm_count, launch.stream_budget, stages.kernels
    launch.kernels, launch.WRAP_TRITON, launch.sm_count = proxy, False, lambda device: arch.sm_count
    launch.stream_budget = lambda device: arch.l2_bytes // 2
    stages.kernels = proxy
    try:
        yield
    finally:
        launch.kernels, launch.WRAP_TRITON, launch.sm_count, launch.stream_budget, stages.kernels = saved


def _meta_inputs(case: Case):
    import torch

    from se_kernels import ops

    dtype = getattr(torch, case.dtype)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    n, c, h, w = case.shape
    s = case.squeeze
    x = ops.as_kernel_layout(torch.empty(case.shape, dtype=dtype, device="meta", memory_format=fmt))
    like = lambda: ops.like_layout(torch.empty(case.shape, dtype=dtype, device="meta"), x)  # noqa: E731
    w1 = torch.empty((s, c), dtype=dtype, device="meta")
    b1 = torch.empty((s,), dtype=dtype, device="meta")
    w2 = torch.empty((c, s), dtype=dtype, device="meta")
    b2 = torch.empty((c,), dtype=dtype, device="meta")
    residual = like() if case.epilogue == "residual_relu" else None
    return x, w1, b1, w2, b2, residual, like


def case_launches(case: Case, arch: Arch) -> Tuple[bool, List[Launch]]:
    """(the plan: "fused", "split" or "streamed"; the launches) of one call, as launch.py makes them
    for arch."""
    from se_kernels import ops
    from se_kernels.triton import launch

    x, w1, b1, w2, b2, residual, like = _meta_inputs(case)
    out_activation = "relu" if case.epilogue == "residual_relu" else None
    sink: List[Launch] = []
    backward = case.direction == "backward"
    with _recording(arch, sink):
        if not backward:
            launch.forward(x, w1, b1, w2, b2, residual, case.activation, case.gate, out_activation)
        else:
            _, pooled, hidden, logits, mask = ops.forward_fake(x, w1, b1, w2, b2, residual, case.activation,
                                                               case.gate, out_activation)
            launch.backward(like(), x, w1, w2, pooled, hidden, logits, mask, case.activation, case.gate,
                            out_activation, True, residual is not None)
        plan = ("fused" if any("fused" in item.name for item in sink) else
                "streamed" if any("streamed" in item.name for item in sink) else "split")
        _stage_launches(x, like, residual, out_activation == "relu", backward)
    return plan, sink


def _stage_launches(x, like, residual, out_relu: bool, backward: bool) -> None:
    """The generic channel-attention path's launches at the same site (stages.py): forward the
    average + max pool and the scale, backward the gate gradient and both input gradients."""
    import torch

    from se_kernels import ops
    from se_kernels.triton import stages

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    vector = lambda: torch.empty(x.shape[:2], dtype=acc, device=x.device)  # noqa: E731
    if not backward:
        stages.pool(x, True)
        stages.scale(x, vector(), residual, out_relu)
        return
    mask = x.new_empty(ops.relu_mask_shape(x) if out_relu else (0,), dtype=torch.uint8)
    dy = like()
    stages.gate_grad(dy, x, mask, out_relu)
    _, mx, ties = stages.pool(x, True)
    for args in [(None, None, None, None), (x, mx, vector(), ties)]:
        stages.input_grad(dy, mask, vector(), vector(), *args, out_relu, True, residual is not None)


def variant_key(item: Launch) -> str:
    """Triton's own cache key of the launch (its specialisation and options), prefixed by the
    kernel name: equal keys are one compiled kernel. Needs the target's driver active."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import compute_cache_key

    fn = item.fn
    kwargs = dict(item.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    _, kernel_key_cache, _, _, binder = fn.device_caches[driver.active.get_current_device()]
    _, specialization, options = binder(*item.args, **kwargs)
    return item.name + ":" + compute_cache_key(kernel_key_cache, specialization, options)


@dataclass
class Planned:
    """Every launch of every case for one arch, and the distinct variants in first-seen order."""
    arch: int
    uses: List[Tuple[Case, str, str, str, dict]]  # (case, plan, kernel, variant key, kwargs)
    variants: Dict[str, Launch]


def plan(arch: int, cases: Sequence[Case]) -> Planned:
    info = ARCHS[arch]
    uses, variants = [], {}
    with target(arch):
        for case in cases:
            plan_name, launches = case_launches(case, info)
            for item in launches:
                key = variant_key(item)
                variants.setdefault(key, item)
                kw = {k: (str(v) if not isinstance(v, (int, bool, str)) else v) for k, v in item.kwargs.items()}
                uses.append((case, plan_name, item.name, key, kw))
    return Planned(arch, uses, variants)


# ---- compiling and measuring ---------------------------------------------------------------------


@dataclass
class Resources:
    kernel: str
    arch: int
    hash: str
    num_warps: int
    registers: int
    stack: int  # bytes of stack frame per thread
    local: int  # bytes of local memory per thread (cuobjdump LOCAL)
    spill_stores: int
    spill_loads: int
    shared: int  # bytes of (dynamic) shared memory Triton launches it with
    resident_warps: int
    seconds: float  # compile (or cache load) time
    cached: bool  # found in the Triton cache


def _tool(name: str) -> str:
    import triton

    path = getattr(triton.knobs.nvidia, name).path
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"{name} not found (triton wheel without NVIDIA tools?)")
    return path


def tools_missing() -> Optional[str]:
    """Why this machine cannot compile for NVIDIA GPUs (None if it can): ptxas and cuobjdump of
    the triton wheel (or TRITON_PTXAS_PATH / TRITON_CUOBJDUMP_PATH)."""
    try:
        import triton  # noqa: F401

        for name in ("ptxas", "cuobjdump"):
            _tool(name)
    except Exception as exc:  # noqa: BLE001  (any reason is a reason to skip)
        return f"{type(exc).__name__}: {exc}"
    return None


_PTXAS_FN = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_CUOBJDUMP = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_ptxas_log(log: str) -> dict:
    frames = _PTXAS_FRAME.findall(log)
    regs = _PTXAS_REGS.findall(log)
    if len(frames) != 1 or len(regs) != 1:
        raise ValueError(f"unexpected ptxas -v log:\n{log}")
    stack, st, ld = map(int, frames[0])
    return {"stack": stack, "spill_stores": st, "spill_loads": ld, "registers": int(regs[0])}


def _ptxas_again(ptx: str, arch: int) -> str:
    """ptxas -v of the PTX with Triton's flags (only when the Triton cache had the kernel but
    not our record of its log)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               str(src), "-o", str(Path(tmp) / "k.cubin")]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def cubin_resources(cubin: bytes, name: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    m = re.search(rf"Function {re.escape(name)}:\s*\n\s*" + _CUOBJDUMP.pattern, out)
    if m is None:
        raise ValueError(f"no resource usage of {name} in:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def compile_variant(item: Launch, arch: int, cache_dir: Path) -> Resources:
    """Compile one launch (the target's driver active) and measure the result."""
    start = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = item.fn.run(*item.args, grid=item.grid, warmup=True, **item.kwargs)
    seconds = time.perf_counter() - start
    sidecar = cache_dir / SIDECAR / f"{kernel.hash}.json"
    cached = not _PTXAS_FN.search(log.getvalue())
    if not cached:
        ptxas = parse_ptxas_log(log.getvalue())
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(ptxas))
        tmp.replace(sidecar)
    elif sidecar.exists():
        ptxas = json.loads(sidecar.read_text())
    else:
        ptxas = parse_ptxas_log(_ptxas_again(kernel.asm["ptx"], arch))
    res = cubin_resources(kernel.asm["cubin"], kernel.name)
    if res["registers"] != ptxas["registers"] or res["stack"] != ptxas["stack"]:
        raise AssertionError(f"{item.name}: cuobjdump {res} disagrees with ptxas -v {ptxas}")
    shared = kernel.metadata.shared + res["static_shared"]
    warps = kernel.metadata.num_warps
    assert kernel.metadata.target.arch == arch, (kernel.metadata.target, arch)
    return Resources(item.name, arch, kernel.hash, warps, res["registers"], res["stack"], res["local"],
                     ptxas["spill_stores"], ptxas["spill_loads"], shared,
                     ARCHS[arch].resident_warps(res["registers"], shared, warps), round(seconds, 3), cached)


def compile_planned(planned: Planned, cache_dir: Path, worker: int = 0, workers: int = 1,
                    progress: bool = False) -> Dict[str, Resources]:
    """Compile this worker's share (every workers-th variant) of a plan."""
    keys = list(planned.variants)[worker::workers]
    out = {}
    with target(planned.arch):
        for i, key in enumerate(keys):
            out[key] = compile_variant(planned.variants[key], planned.arch, cache_dir)
            if progress:
                r = out[key]
                print(f"[worker {worker}] sm_{planned.arch} {i + 1}/{len(keys)} {r.kernel} {r.registers} regs "
                      f"{r.seconds:.2f}s{' (cached)' if r.cached else ''}", file=sys.stderr, flush=True)
    return out


# ---- the whole run ---------------------------------------------------------------------------------


@dataclass
class Selection:
    archs: Tuple[int, ...] = (90, 80)
    shape_sets: Tuple[str, ...] = ()  # () = every benchmark shape set + EXTRA_SETS
    act_gate: Optional[Tuple[str, str]] = None  # None: each site's own

    def cases(self) -> List[Case]:
        return make_cases(self.shape_sets or tuple(all_set_names()), act_gate=self.act_gate)

    def argv(self) -> List[str]:
        out = ["--arch", *map(str, self.archs)]
        if self.shape_sets:
            out += ["--shape-sets", *self.shape_sets]
        if self.act_gate:
            out += ["--act-gate", ":".join(self.act_gate)]
        return out


@dataclass
class Result:
    selection: dict
    cache_dir: str
    uses: list = field(default_factory=list)  # [case dict, arch, plan, kernel, key, kwargs]
    variants: dict = field(default_factory=dict)  # "arch|key" -> Resources dict
    seconds: float = 0.0
    versions: dict = field(default_factory=dict)
    kernels_defined: list = field(default_factory=list)  # the @triton.jit kernels of kernels.py
    kernels_in_launch_code: list = field(default_factory=list)  # the kernels.NAME launch.py names

    def resources(self) -> List[Resources]:
        return [Resources(**v) for v in self.variants.values()]


def _versions() -> dict:
    import torch
    import triton

    ptxas = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), (V[\d.]+)", ptxas)
    return {"triton": triton.__version__, "torch": torch.__version__,
            "ptxas": f"{m.group(1)} ({m.group(2)})" if m else "?", "python": sys.version.split()[0]}


def collect(selection: Selection, cache_dir: Path, jobs: int = 1, progress: bool = False) -> Result:
    """Plan every case for every arch, compile the distinct variants (jobs > 1: in that many
    worker processes, each taking every jobs-th variant) and gather the results."""
    start = time.perf_counter()
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)  # read by Triton at each compile
    cases = selection.cases()
    result = Result(asdict(selection), str(cache_dir), versions=_versions(), kernels_defined=sorted(jit_kernels()),
                    kernels_in_launch_code=kernels_named_in_launch_code())
    planned = {arch: plan(arch, cases) for arch in selection.archs}
    for arch, p in planned.items():
        result.uses += [[asdict(case), arch, plan_name, name, key, kw] for case, plan_name, name, key, kw in p.uses]
    if jobs <= 1:
        for arch, p in planned.items():
            for key, r in compile_planned(p, cache_dir, progress=progress).items():
                result.variants[f"{arch}|{key}"] = asdict(r)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            procs = []
            for w in range(jobs):
                out = Path(tmp) / f"worker{w}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), *selection.argv(), "--cache-dir", str(cache_dir),
                       "--worker", f"{w}/{jobs}", "--json", str(out)] + (["--progress"] if progress else [])
                procs.append((subprocess.Popen(cmd, env=_clean_env()), out))
            failed = [p.args for p, _ in procs if p.wait() != 0]
            if failed:
                raise RuntimeError(f"{len(failed)} compile worker(s) failed (their stderr is above): {failed[0]}")
            for _, out in procs:
                worker = json.loads(out.read_text())
                result.variants.update(worker["variants"])
        expected = {f"{arch}|{key}" for arch, p in planned.items() for key in p.variants}
        if set(result.variants) != expected:
            raise RuntimeError(f"the workers planned other variants than the parent: {len(expected)} planned, "
                               f"{len(result.variants)} compiled, {len(expected ^ set(result.variants))} differ")
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_subprocess(selection: Selection, cache_dir: Path, jobs: int = 1, out_json: Optional[Path] = None,
                   out_md: Optional[Path] = None, timeout: Optional[float] = None) -> Result:
    """collect() in a fresh Python without TRITON_INTERPRET (safe to call from a process that
    runs Triton's interpreter, e.g. pytest on a machine without a GPU). Raises
    subprocess.CalledProcessError (with the output) if anything failed to compile; spills and
    stack frames are in the result (see problems())."""
    with tempfile.TemporaryDirectory() as tmp:
        json_path = out_json or Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *selection.argv(), "--cache-dir", str(cache_dir),
               "--jobs", str(jobs), "--json", str(json_path), "--out", str(out_md) if out_md else "-",
               "--exit-zero-on-spills"]
        proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return Result(**json.loads(json_path.read_text()))


# ---- the report ------------------------------------------------------------------------------------

KERNEL_ORDER = ("se_forward_fused_kernel", "channel_sums_kernel", "se_hidden_kernel", "se_logits_kernel",
                "se_scale_kernel", "se_streamed_forward_kernel", "se_backward_fused_kernel", "se_dz1_kernel",
                "se_dp_kernel", "se_grad_input_kernel", "se_streamed_backward_kernel", "se_weight_grads_kernel",
                "se_sum_chunks_kernel")
LAYOUT_SHORT = {"nchw": "NCHW", "channels_last": "channels_last"}


def _layout_label(case: dict, kwargs: dict) -> str:
    """The layout the kernel is specialised for: NCHW rows or channels_last rows (pixel rows;
    also any H*W == 1 input), '-' for the kernels without a layout (PIXEL_ROWS) constexpr."""
    if "PIXEL_ROWS" not in kwargs:
        return "-"
    return "channels_last" if kwargs["PIXEL_ROWS"] else "NCHW"


def table_rows(result: Result) -> List[dict]:
    """One row per (kernel, arch, dtype, layout, plan, block sizes, warps), over its variants."""
    rows: Dict[tuple, dict] = {}
    for case, arch, plan_name, name, key, kw in result.uses:
        r = result.variants[f"{arch}|{key}"]
        blocks = tuple(kw.get(b, "-") for b in ("BLOCK_C", "BLOCK_L", "BLOCK_S"))
        row_key = (name, arch, case["dtype"], _layout_label(case, kw), blocks, kw["num_warps"])
        row = rows.setdefault(row_key, {"plans": set(), "variants": {}})
        row["plans"].add(plan_name)
        row["variants"][key] = r
    out = []
    for (name, arch, dtype, layout, blocks, warps), row in rows.items():
        vs = list(row["variants"].values())
        out.append(dict(
            kernel=name, arch=arch, dtype=dtype, layout=layout, plan="+".join(sorted(row["plans"])),
            block_c=blocks[0], block_l=blocks[1], block_s=blocks[2], warps=warps, variants=len(vs),
            regs_min=min(v["registers"] for v in vs), regs_max=max(v["registers"] for v in vs),
            shared=max(v["shared"] for v in vs), stack=max(v["stack"] for v in vs),
            local=max(v["local"] for v in vs),
            spills=(max(v["spill_stores"] for v in vs), max(v["spill_loads"] for v in vs)),
            resident_min=min(v["resident_warps"] for v in vs), resident_max=max(v["resident_warps"] for v in vs),
        ))

    def order(r):
        k = KERNEL_ORDER.index(r["kernel"]) if r["kernel"] in KERNEL_ORDER else len(KERNEL_ORDER)
        num = lambda v: v if isinstance(v, int) else -1  # noqa: E731
        return (-r["arch"], k, r["kernel"], r["dtype"], r["layout"], num(r["block_c"]), num(r["block_l"]),
                num(r["block_s"]), r["warps"])

    return sorted(out, key=order)


def _span(lo, hi) -> str:
    return str(lo) if lo == hi else f"{lo}–{hi}"


def report_rows(result: Result) -> List[dict]:
    """table_rows with the arches side by side (cells "sm_90 / sm_80"), then the rows that
    differ only in dtype, then only in layout, merged (those columns list the values)."""
    archs = list(result.selection["archs"])
    groups: Dict[tuple, dict] = {}
    for r in table_rows(result):  # sorted: the first arch's rows come first
        key = tuple(r[k] for k in ("kernel", "plan", "dtype", "layout", "block_c", "block_l", "block_s", "warps"))
        groups.setdefault(key, {})[r["arch"]] = r
    rows = []
    for key, by_arch in groups.items():
        def cell(f):
            return " / ".join(f(by_arch[a]) if a in by_arch else "–" for a in archs)  # noqa: B023 (called within this iteration)

        row = dict(zip(("kernel", "plan", "dtype", "layout", "block_c", "block_l", "block_s", "warps"), key))
        row.update(
            variants=cell(lambda r: str(r["variants"])),
            registers=cell(lambda r: _span(r["regs_min"], r["regs_max"])),
            smem=cell(lambda r: str(r["shared"])),
            stack=cell(lambda r: str(r["stack"] + r["local"])),
            spills=cell(lambda r: f"{r['spills'][0]}/{r['spills'][1]}"),
            resident=cell(lambda r: _span(r["resident_min"], r["resident_max"])),
        )
        rows.append(row)
    kernel_rank = {k: i for i, k in enumerate(KERNEL_ORDER)}
    num = lambda v: v if isinstance(v, int) else -1  # noqa: E731
    rows.sort(key=lambda r: (kernel_rank.get(r["kernel"], 99), r["kernel"], r["dtype"], r["layout"], num(r["block_c"]),
                             num(r["block_l"]), num(r["block_s"]), r["warps"]))

    def merge(rows, column):
        merged: Dict[tuple, dict] = {}
        for r in rows:
            key = tuple((k, str(v)) for k, v in r.items() if k != column)
            if key in merged:
                merged[key][column] += ", " + r[column]
            else:
                merged[key] = dict(r)
        return list(merged.values())

    return merge(merge(rows, "dtype"), "layout")


def problems(result: Result) -> List[str]:
    """Variants that spill or have a stack frame / local memory (what CI fails on), each with
    the calls that launch it."""
    calls: Dict[str, List[str]] = {}
    for case, arch, _fused, _name, key, _kw in result.uses:
        c = (f"{case['shape_set']} {case['site']} {case['dtype']} {case['layout']} {case['epilogue']} "
             f"{case['direction']} {case['activation']}/{case['gate']}")
        calls.setdefault(f"{arch}|{key}", []).append(c)
    out = []
    for k, d in result.variants.items():
        v = Resources(**d)
        if v.spill_stores or v.spill_loads or v.stack or v.local:
            kw = next(u[5] for u in result.uses if f"{u[1]}|{u[4]}" == k)
            tile = ", ".join(f"{b}={kw[b]}" for b in ("BLOCK_C", "BLOCK_L", "BLOCK_S", "num_warps") if b in kw)
            seen = list(dict.fromkeys(calls[k]))
            more = f" (+{len(seen) - 2} more)" if len(seen) > 2 else ""
            out.append(f"sm_{v.arch} {v.kernel} [{tile}]: {v.registers} regs, stack {v.stack} B, local {v.local} B, "
                       f"spills {v.spill_stores}/{v.spill_loads} B; launched by {'; '.join(seen[:2])}{more}")
    return sorted(out)


def render_markdown(result: Result, command: str) -> str:
    sel = result.selection
    v = result.versions
    res = result.resources()
    sets = sel["shape_sets"] or all_set_names()
    n_cases = len({json.dumps(u[0], sort_keys=True) for u in result.uses})
    lines = [
        "# Triton kernels compiled ahead of time: resources per variant",
        "",
        f"Command (from the repository root, no GPU needed): `{command}`. "
        f"triton {v['triton']} (its ptxas {v['ptxas']}), torch {v['torch']}, {datetime.date.today().isoformat()}.",
        "",
        f"Compiled: the launch plans of {n_cases} calls per arch, every site of the shape sets "
        f"{', '.join(sets)} (`wide`: one sample over 2^31 elements, for the int64-offset variants; `streamed`: "
        "SE-ResNet-50's stages at batch 256, the streamed plan) "
        f"x {{float32, bfloat16}} x {{NCHW, channels_last}} x epilogue {{none, residual + relu}} x "
        f"{{forward, backward}}; activation/gate: "
        + (f"{sel['act_gate'][0]}/{sel['act_gate'][1]} everywhere" if sel["act_gate"] else "each site's own")
        + "; split plans for the GPU's SM count ("
        + ", ".join(f"sm_{a}: {ARCHS[a].gpu}, {ARCHS[a].sm_count} SMs" for a in sel["archs"]) + "). "
        "Each row aggregates the distinct compiled variants (other constexprs and integer "
        "specialisations) of one kernel, arch, dtype, layout and tile; ranges are min–max over them.",
        "",
        "Registers, stack and local memory: `cuobjdump --dump-resource-usage` of the cubin; spills: "
        "ptxas -v; smem: the shared memory Triton launches the kernel with. Resident warps/SM: "
        "from registers (65536 per SM in 4 sub-partitions, allocated per warp in units of 256), "
        "shared memory (+1 KiB per block; sm_90 228 KiB, sm_80 164 KiB per SM), 64 warps and 32 "
        "blocks per SM. Layout '-': the kernel has no layout constexpr.",
        "",
        "## Summary",
        "",
    ]
    for arch in sel["archs"]:
        mine = [r for r in res if r.arch == arch]
        by_kernel: Dict[str, List[Resources]] = {}
        for r in mine:
            by_kernel.setdefault(r.kernel, []).append(r)
        spills = sum(1 for r in mine if r.spill_stores or r.spill_loads)
        stacks = sum(1 for r in mine if r.stack or r.local)
        lines.append(f"- sm_{arch}: {len(mine)} distinct variants of {len(by_kernel)} kernels, "
                     f"max {max(r.registers for r in mine)} registers, max {max(r.shared for r in mine)} B "
                     f"shared memory, {spills} with spills, {stacks} with a stack frame or local memory; "
                     f"fewest resident warps/SM {min(r.resident_warps for r in mine)}.")
    lines += ["", "| kernel | variants sm_" + " | variants sm_".join(map(str, sel["archs"]))
              + " | max regs sm_" + " | max regs sm_".join(map(str, sel["archs"])) + " |",
              "| --- |" + " ---: |" * (2 * len(sel["archs"]))]
    names = sorted({r.kernel for r in res}, key=lambda k: (KERNEL_ORDER.index(k) if k in KERNEL_ORDER else 99, k))
    for name in names:
        counts = [sum(1 for r in res if r.kernel == name and r.arch == a) for a in sel["archs"]]
        regs = [max((r.registers for r in res if r.kernel == name and r.arch == a), default=0) for a in sel["archs"]]
        lines.append(f"| `{name}` | " + " | ".join(map(str, counts + regs)) + " |")
    per_arch = " / ".join(f"sm_{a}" for a in sel["archs"])
    lines += ["", "## Variants", "",
              f"Cells with two values: {per_arch}.", "",
              "| kernel | plan | dtype | layout | BLOCK_C | BLOCK_L | BLOCK_S | warps | variants | registers | "
              "smem (B) | stack (B) | spill st/ld (B) | resident warps/SM |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report_rows(result):
        lines.append(
            f"| `{r['kernel']}` | {r['plan']} | {r['dtype']} | {r['layout']} | {r['block_c']} | {r['block_l']} | "
            f"{r['block_s']} | {r['warps']} | {r['variants']} | {r['registers']} | {r['smem']} | {r['stack']} | "
            f"{r['spills']} | {r['resident']} |")
    bad = problems(result)
    lines += ["", "Spills / stack frames: " + ("none." if not bad else ""), *[f"- {b}" for b in bad], ""]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS))
    p.add_argument("--shape-sets", nargs="+", default=[], help="default: every set of benchmarks/shapes.py + 'wide'")
    p.add_argument("--act-gate", default=None, help="ACT:GATE for every site (default: each site's own)")
    p.add_argument("--out", default=str(DEFAULT_OUT.relative_to(ROOT)), help="markdown report ('-': none)")
    p.add_argument("--json", default=None, help="also write the raw result here")
    p.add_argument("--cache-dir", default=None, help=f"Triton cache (default {DEFAULT_CACHE_DIR.relative_to(ROOT)})")
    p.add_argument("--cold", action="store_true", help="compile into a fresh temporary Triton cache")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--exit-zero-on-spills", action="store_true",
                   help="exit 0 even if a variant spills or has a stack frame (compile errors still fail)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "i/n": compile every n-th variant from i
    args = p.parse_args(argv)
    if interpreter_active():
        p.error("TRITON_INTERPRET=1 is set: unset it (the interpreter's kernels cannot be compiled)")
    missing = tools_missing()
    if missing:
        print(f"triton_aot: cannot compile for NVIDIA GPUs here: {missing}", file=sys.stderr)
        return 2
    selection = Selection(tuple(args.arch), tuple(args.shape_sets),
                          tuple(args.act_gate.split(":")) if args.act_gate else None)
    with contextlib.ExitStack() as stack:
        if args.cold:
            cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triton-aot-")))
        else:
            cache_dir = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE_DIR
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
        if args.worker:  # one share of the variants, resources as JSON
            worker, workers = map(int, args.worker.split("/"))
            variants = {}
            for arch in selection.archs:
                planned = plan(arch, selection.cases())
                for key, r in compile_planned(planned, cache_dir, worker, workers, args.progress).items():
                    variants[f"{arch}|{key}"] = asdict(r)
            Path(args.json).write_text(json.dumps({"variants": variants}))
            return 0
        result = collect(selection, cache_dir, jobs=args.jobs, progress=args.progress)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result)))
    res = result.resources()
    cached = sum(r.cached for r in res)
    print(f"triton_aot: {len(res)} variants ({cached} from the cache) for sm_{', sm_'.join(map(str, selection.archs))} "
          f"in {result.seconds:.0f} s, max {max(r.registers for r in res)} registers")
    if args.out != "-":
        command = "python benchmarks/triton_aot.py " + " ".join(
            ["--arch", *map(str, selection.archs)]
            + (["--shape-sets", *selection.shape_sets] if selection.shape_sets else [])
            + (["--act-gate", args.act_gate] if args.act_gate else []))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_markdown(result, command.strip()))
        print(f"triton_aot: wrote {out}")
    bad = problems(result)
    for b in bad:
        print(f"triton_aot: {b}", file=sys.stderr)
    return 1 if bad and not args.exit_zero_on_spills else 0


if __name__ == "__main__":
    sys.exit(main())
