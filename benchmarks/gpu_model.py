"""Performance model of the two GPU backends (Triton: se_kernels/triton/, CUDA:
csrc/cuda/se_cuda.cu) on an NVIDIA H200, kernel by kernel, as the kernels are written. No GPU:
shapes and arithmetic only (the Triton plan comes from launch.Plan on meta tensors).

    python benchmarks/gpu_model.py                  # writes benchmarks/results/gpu_model.md
    python benchmarks/gpu_model.py --hbm 4.8e12     # the datasheet bandwidth instead
    python benchmarks/gpu_model.py --check          # exit 1 if a >= 32 MiB site misses a target

Per kernel: bytes from HBM, bytes served by L2 hits, and the dependent L2 round trips of one
program (block). Its time is the largest of
  * HBM bytes / min(HBM bandwidth, bytes in flight / HBM latency, active SMs x per-SM bandwidth),
    bytes in flight = active SMs x resident warps/SM x bytes of loads one warp has outstanding;
    active SMs = min(SMs, programs); resident warps = min(what registers/shared memory allow,
    programs per SM x warps per program);
  * all bytes through L2 (HBM + hits) / min(L2 bandwidth, active SMs x per-SM bandwidth);
  * waves x round trips x L2 round-trip time (the serial loops: excite, weight grads).
A plan's time is the sum over its kernels plus one launch gap between consecutive kernels.
The floor is the op's compulsory HBM bytes at the HBM bandwidth, with no gaps.

Re-reads: the split plans read x (backward: dy and the mask) twice, the second pass walking
the tiles last-first. It is counted as L2 hits only if everything touched between the first
read of a tile and its re-read fits the effective L2 (forward: x + residual + y + mask,
backward: dy + x + mask + dx + d_residual, whole batch); otherwise the whole re-read is HBM.
Weights and the small (N, C) / (N, S) vectors are L2 hits (they fit and were just touched).

CUDA's streamed plan (csrc/cuda/se_stream.h), where the split plan's re-read would miss and
the 16-byte paths apply: one persistent kernel runs the split plan's stages per group of
samples, a group's element-wise items lag[3] rounds after its channel sums. It marks its loads
of last use and its output stores evict-first, so only what it re-reads is kept: x (backward
dy) and the mask (ASSUMPTION: evict-first lines leave the L2 before any other); (lag[3] + 1)
groups' kept bytes fit the effective L2 by construction, so its HBM bytes are the floor's. Its time
is the kernel's bandwidth time, or, where a group's chain of stages (its last channel-sum item,
the two GEMMs, three hand-offs between blocks) outlasts lag[3] groups' bandwidth time, chain / lag
per group (see pipelined()); then its last block counts the blocks out and sets the counters back
to zero (STREAM_FINISH_TRIPS L2 round trips after the rest). No fill launch before it: the
counters' buffer is kept per (device, stream) and every launch leaves it zero (a fill only under
CUDA graph capture, not modelled).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import shapes  # noqa: E402
import torch  # noqa: E402
from shapes import Site  # noqa: E402

from se_kernels.triton import launch  # noqa: E402

# ---- inputs (each with its source) ----------------------------------------------------------
# Bytes read + written per second by a device-to-device copy through PyTorch on an H200 lent to
# this project's workplace (2026-10-28 and 2026-11-04).
HBM_BW = 4.3e12
HBM_BW_DATASHEET = 4.8e12  # B/s: NVIDIA's H200 datasheet (--hbm 4.8e12)
SMS = 132  # PyTorch's device properties on that H200
L2_BYTES = 60e6  # PyTorch's device properties on that H200 ("60 MB")
# ASSUMPTION (conservative): Hopper's L2 is two partitions; a line used by SMs on both sides may be
# held in both, so only half of it is counted on for reuse.
L2_EFFECTIVE = L2_BYTES / 2
L2_BW_FACTOR = 2.0  # ASSUMPTION: L2 hit bandwidth = 2 x the HBM copy rate; replace by a GPU measurement
LAUNCH_GAP = 2e-6  # s, ASSUMPTION: gap between dependent kernels on one stream; to be measured
HBM_LATENCY = 800e-9  # s, ASSUMPTION (lead): loaded HBM latency; bytes in flight needed = bandwidth x it
# s, ASSUMPTION: one dependent L2-hit round trip under load (the brief's "~1 us / 4 in flight")
L2_ROUND_TRIP = 0.25e-6
SM_BW = 64 * 1.98e9  # B/s, ASSUMPTION: one SM's L1<->L2 path, 64 B/clock at the 1.98 GHz boost clock
SECTOR = 32  # bytes an L1 miss fetches from L2
# ASSUMPTION: loads in flight per thread in se_cuda.cu's runtime-length loops (nvcc's usual unroll
# by 4; check the SASS)
CUDA_UNROLL = 4
CUDA_WGRAD_TILE = 32  # se_cuda.cu kWgT: weight_grads_kernel's 32 x 32 output tiles and 32-sample steps
# ASSUMPTION: scale/grad_input issue the loads of a tile's 4 steps together (se_tiles.h: "4 x 16 B
# in flight per lane"); each step's loads sit behind branches, so check the SASS
CUDA_STEPS_IN_FLIGHT = 4
CUDA_THREADS = 256  # se_cuda.cu kThreads
CUDA_MLP_SUB = 4  # se_cuda.cu kMlpSub: tile_gemm's 32-wide inner tiles loaded per pass
# The streamed plan (csrc/cuda/se_stream.h, se_cuda.cu): channel-sum items of about this many bytes of x
STREAM_ITEM_BYTES = 16384  # se_cuda.cu kStreamItemBytes (the schedule itself: launch.stream_schedule)
# ASSUMPTION: one hand-off between stages of a group: the signalling block's fence waits for its
# stores (one L2 round trip), its atomic becomes visible (one), the waiting block's acquire poll
# sees it (one) plus half a 128 ns __nanosleep
STREAM_HANDOFF_TRIPS, STREAM_SLEEP = 3, 64e-9
# the streamed kernels' end (se_cuda.cu stream_finish, kernels.py _stream_finish): the last block's
# exit add (after a fence), the claim counter's check, the counters' zero stores
STREAM_FINISH_TRIPS = 3
REGS_PER_SM, MAX_WARPS_SM, MAX_BLOCKS_SM, SMEM_SM = 65536, 64, 32, 228 * 1024  # sm_90 limits
TRITON_DEFAULT_RESIDENT = 8  # fallback: the fewest resident warps/SM in triton_resources.md (flagged)
CUDA_DEFAULT_REGS = 64  # fallback registers of a CUDA kernel missing from cuda_ptxas.md (flagged)
TARGETS = {"forward": 0.85, "backward": 0.75}
SUMMARY_MIN_X = 32 * 2**20  # the summary covers sites whose x is at least this many bytes
TRITON_TABLE = HERE / "results" / "triton_resources.md"
CUDA_TABLE = HERE / "results" / "cuda_ptxas.md"
DEFAULT_OUT = HERE / "results" / "gpu_model.md"
DTYPES = {"float32": (torch.float32, 4, "float"), "bfloat16": (torch.bfloat16, 2, "c10::BFloat16")}
EPILOGUES, BACKENDS, DIRECTIONS = ("none", "residual_relu"), ("triton", "cuda"), ("forward", "backward")
# shapes.shape_set("efficientnet-b0") run on 2026-11-30 (torchvision 0.29.1): hard-coded because
# deriving it builds and runs the model (seconds); --derive-efficientnet derives it instead.
EFFICIENTNET_B0 = tuple(Site(32, c, hw, hw, s, "silu", "sigmoid", k) for c, hw, s, k in (
    (32, 112, 8, 1), (96, 56, 4, 1), (144, 56, 6, 1), (144, 28, 6, 1), (240, 28, 10, 1), (240, 14, 10, 1),
    (480, 14, 20, 3), (672, 14, 28, 2), (672, 7, 28, 1), (1152, 7, 48, 4)))


def cdiv(a: float, b: float) -> int:
    return int(-(-a // b))


@dataclass(frozen=True)
class Device:
    """The modelled GPU: bandwidths in B/s, times in s, sizes in bytes."""
    hbm_bw: float = HBM_BW
    l2_bw: float = L2_BW_FACTOR * HBM_BW
    launch_gap: float = LAUNCH_GAP
    sms: int = SMS
    l2_effective: float = L2_EFFECTIVE
    hbm_latency: float = HBM_LATENCY
    l2_round_trip: float = L2_ROUND_TRIP
    sm_bw: float = SM_BW


@dataclass
class Kernel:
    """One launch. hbm: bytes to/from HBM; l2: bytes served by L2 hits; chain: dependent L2
    round trips of one program; load_per_warp: bytes of loads one warp has outstanding at once;
    resident: warps/SM its registers and shared memory allow."""
    name: str
    programs: int
    warps: int
    resident: int
    load_per_warp: float
    hbm: float
    l2: float = 0.0
    chain: float = 0.0
    # a persistent kernel's pipeline (the streamed plan): (groups, lag in rounds, seconds from a
    # group's first read to its last stage's start); None: an ordinary launch
    pipeline: Optional[Tuple[int, int, float]] = None
    # dependent L2 round trips once after the last wave (the weight gradients' in-kernel chunk sums)
    tail: float = 0.0
    # dependent L2 round trips after everything else, pipeline included (the streamed kernels' end)
    after: float = 0.0
    # filled by timed():
    resident_used: int = 0
    seconds: float = 0.0
    bound: str = ""


@dataclass(frozen=True)
class Problem:
    """One (site, dtype, epilogue, direction): the bytes every plan moves at least."""
    site: Site
    dtype: str
    epilogue: str
    direction: str

    @property
    def elem(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def residual(self) -> bool:
        return self.epilogue == "residual_relu"

    @property
    def numel(self) -> int:
        return self.site.n * self.site.c * self.site.h * self.site.w

    x_bytes = property(lambda self: self.numel * self.elem)

    @property
    def mask_bytes(self) -> int:
        """The relu mask: one bit per element, each NCHW row (H*W pixels) starting on a byte."""
        return self.site.n * self.site.c * cdiv(self.site.h * self.site.w, 8) if self.residual else 0

    def floor_bytes(self) -> int:
        """forward: x [+ residual] read, y [+ mask] written; backward: dy, x [+ mask] read, dx
        [+ d_residual] written."""
        tensors = (3 if self.direction == "backward" else 2) + self.residual
        return tensors * self.x_bytes + self.mask_bytes

    def kept_bytes(self) -> int:
        """What CUDA's streamed plan keeps in L2 from a tile's first read to its re-read: its loads
        of last use and its output stores carry evict-first hints (se_cuda.cu Hint, store_pack), so
        only what is re-read counts: x (backward: dy) and the mask."""
        return self.x_bytes + self.mask_bytes

    def reread_fits(self, dev: Device) -> bool:
        """Whether what the split plans touch between a tile's first read and its re-read, (x +
        residual + y) or (dy + x + dx + d_residual), plus the mask (= the floor bytes), fits L2."""
        return self.floor_bytes() <= dev.l2_effective


# ---- resource tables ------------------------------------------------------------------------

def _cells(line: str) -> List[str]:
    return [c.strip().strip("`") for c in line.strip().strip("|").split("|")]


def _low(cell: str) -> int:
    """The sm_90 value of 'a / b', the low end of a range 'lo–hi'."""
    return int(cell.split(" / ")[0].split("–")[0])


@dataclass
class Resources:
    """triton_resources.md's variant rows and cuda_ptxas.md's sm_90 rows; `missing` collects
    the lookups that fell back to a default."""
    triton: List[List[str]]
    cuda: Dict[Tuple[str, frozenset], Tuple[int, int]]
    missing: set = field(default_factory=set)

    @classmethod
    def load(cls) -> "Resources":
        triton, section = [], ""
        for line in TRITON_TABLE.read_text().splitlines():
            section = line if line.startswith("## ") else section
            if section == "## Variants" and line.startswith("| `"):
                triton.append(_cells(line))
        cuda = {}
        for line in CUDA_TABLE.read_text().splitlines():
            m = re.match(r"\| 90 \| `(\w+)<(.*)>` \| (\d+) \| (\d+) \|", line)
            if m:
                args = tuple(a.strip() for a in m.group(2).split(","))
                cuda[(m.group(1), frozenset(args))] = (int(m.group(3)), int(m.group(4)))
                cuda[(m.group(1), args)] = (int(m.group(3)), int(m.group(4)))  # exact, with the flags
        return cls(triton, cuda)

    def triton_resident(self, kernel: str, dtype: str, block_c, block_l, block_s, warps: int) -> int:
        """Resident warps/SM of the Triton variant (NCHW; '-' cells match anything); the low
        end of the table's range."""
        want = [str(v) if v is not None else "-" for v in (block_c, block_l, block_s)]
        for row in self.triton:
            name, _plan, dtypes, layouts, bc, bl, bs, w = row[:8]
            if (name == kernel and dtype in dtypes.split(", ") and (layouts == "-" or "NCHW" in layouts)
                    and all(have in ("-", v) for have, v in zip((bc, bl, bs), want)) and int(w) == warps
                    and not row[-1].startswith("–")):  # "– / n": not compiled for sm_90
                return _low(row[-1])
        self.missing.add(f"triton {kernel} {dtype} NCHW BLOCK_C={block_c} BLOCK_L={block_l} BLOCK_S={block_s} "
                         f"{warps} warps: not in {TRITON_TABLE.name}, assumed {TRITON_DEFAULT_RESIDENT} warps/SM")
        return TRITON_DEFAULT_RESIDENT

    def cuda_resident(self, kernel: str, args: Sequence[str], smem: int = 0) -> int:
        """Resident warps/SM of a 256-thread CUDA kernel from its registers (allocated per warp
        in units of 256, 16384 per sub-partition) and shared memory (+1 KiB per block)."""
        # flag-specialised: the set of their arguments is ambiguous
        exact = ("scale_kernel", "grad_input_kernel", "channel_sums_kernel", "streamed_forward_kernel",
                 "streamed_backward_kernel", "flat_scale_kernel", "flat_grad_input_kernel", "flat_sums_kernel",
                 "flat_streamed_forward_kernel", "flat_streamed_backward_kernel")
        key = tuple(args) if kernel in exact else frozenset(args)
        regs, static = self.cuda.get((kernel, key), (None, 0))
        if regs is None:
            regs = CUDA_DEFAULT_REGS
            self.missing.add(f"cuda {kernel}<{', '.join(args)}>: not in {CUDA_TABLE.name}, "
                             f"assumed {CUDA_DEFAULT_REGS} registers")
        per_warp = cdiv(regs * 32, 256) * 256
        warps_by_regs = 4 * (REGS_PER_SM // 4 // per_warp)
        warps_per_block = CUDA_THREADS // 32
        blocks = min(MAX_BLOCKS_SM, warps_by_regs // warps_per_block, SMEM_SM // (smem + static + 1024),
                     MAX_WARPS_SM // warps_per_block)
        return blocks * warps_per_block


# ---- time of one kernel, of a plan ----------------------------------------------------------

def timed(k: Kernel, dev: Device) -> Kernel:
    """Fills k.seconds (see the module docstring), k.resident_used and k.bound."""
    active = min(dev.sms, k.programs)
    per_sm = cdiv(k.programs, active)
    k.resident_used = min(k.resident, per_sm * k.warps)
    waves = cdiv(per_sm, max(1, k.resident_used // k.warps))
    in_flight = active * k.resident_used * k.load_per_warp
    limits = {"HBM": dev.hbm_bw, "in-flight": in_flight / dev.hbm_latency, "SMs": active * dev.sm_bw}
    hbm_limit = min(limits, key=limits.get)
    terms = {
        hbm_limit: k.hbm / limits[hbm_limit] if k.hbm else 0.0,
        "L2": (k.hbm + k.l2) / min(dev.l2_bw, active * dev.sm_bw),
        "chain": (waves * k.chain + k.tail) * dev.l2_round_trip,
    }
    k.bound = max(terms, key=terms.get)
    k.seconds = terms[k.bound]
    if k.pipeline is not None:
        k.seconds, k.bound = pipelined(k.seconds, k.bound, *k.pipeline)
    k.seconds += k.after * dev.l2_round_trip
    return k


def pipelined(seconds: float, bound: str, groups: int, lag: int, chain: float) -> Tuple[float, str]:
    """A persistent kernel that streams `groups` groups through dependent stages, each group's last
    stage claimed `lag` rounds after its first: at most `lag` groups are in flight, so a round
    takes max(the bandwidth's time for a group, chain / lag), where chain is one group's latency
    from its first read to the start of its last stage. The first groups' chains are exposed as
    far as the reads of the groups claimed meanwhile (half a round's bytes each) do not cover them."""
    per_group = seconds / groups
    steady = groups * max(per_group, chain / lag)
    fill = max(0.0, chain - lag * per_group / 2)
    return steady + fill, (bound if per_group >= chain / lag else "pipeline")


@dataclass
class Prediction:
    problem: Problem
    backend: str
    kernels: List[Kernel]
    reread: str  # "HBM", "L2" or "-" (no second pass)
    hbm_bytes: float
    seconds: float
    floor: float

    @property
    def fraction(self) -> float:
        return self.floor / self.seconds

    @property
    def floor_bytes_cap(self) -> float:
        """The best fraction of floor the plan's HBM bytes allow."""
        return self.problem.floor_bytes() / self.hbm_bytes


def predict(p: Problem, backend: str, dev: Device, res: Resources, force_l2: bool = False) -> Prediction:
    """The plan of `backend` for `p`; force_l2: the second pass hits L2 whatever fits (the
    "x read once" bound)."""
    reread_l2 = force_l2 or p.reread_fits(dev)
    streamed = cuda_streamed(p, res, dev) if backend == "cuda" else None
    if backend == "triton":
        kernels = triton_kernels(p, res, reread_l2, dev)
        streamed = kernels if kernels[0].name == "streamed" else None
    else:
        kernels = streamed or cuda_kernels(p, res, reread_l2)
    kernels = [timed(k, dev) for k in kernels]
    second_pass = not (backend == "triton" and kernels[0].name.endswith("fused"))
    seconds = sum(k.seconds for k in kernels) + dev.launch_gap * (len(kernels) - 1)
    reread = "L2 (streamed)" if streamed else ("L2" if reread_l2 else "HBM") if second_pass else "-"
    return Prediction(p, backend, kernels, reread, sum(k.hbm for k in kernels), seconds, p.floor_bytes() / dev.hbm_bw)


def second_pass(p: Problem, reread_l2: bool) -> Tuple[float, float, float]:
    """(bytes loaded, HBM bytes, L2-hit bytes) of the split plans' second pass: scale re-reads x,
    reads the residual, writes y and the mask; grad_input re-reads dy and the mask, writes dx
    [and d_residual]. The re-read is HBM or L2 as a whole."""
    if p.direction == "backward":
        again, other_reads, writes = p.x_bytes + p.mask_bytes, 0, p.x_bytes * (1 + p.residual)
    else:
        again, other_reads, writes = p.x_bytes, p.x_bytes * p.residual, p.x_bytes + p.mask_bytes
    return again + other_reads, other_reads + writes + (0 if reread_l2 else again), again if reread_l2 else 0


# ---- Triton (se_kernels/triton/launch.py and kernels.py) ------------------------------------

def _triton_mlp(g, elem: int) -> Tuple[float, int]:
    """(L2 bytes of W1 and W2 one program reads, S-loop iterations) for _excite /
    _excite_backward: per iteration a [BLOCK_S, BLOCK_C] tile of W1 (rows along C: whole
    sectors) and a [BLOCK_C, BLOCK_S] tile of W2 (rows along S, cut into BLOCK_S pieces when
    BLOCK_S < S; each piece fetched as whole 32-byte sectors, no L1 reuse assumed)."""
    iters = cdiv(g.S, g.block_s)
    w1 = g.S * g.C * elem
    w2 = g.S * g.C * elem if iters == 1 else g.C * iters * cdiv(g.block_s * elem, SECTOR) * SECTOR
    return w1 + w2, iters


def _triton_gemm_trips(plan, c: int, sq: int, splits: int, streamed: bool) -> Tuple[int, int]:
    """Dependent L2 round trips of the two MLP GEMMs (kernels.py _hidden_body / _logits_body,
    backward _dz1_body / _dp_body): the plan's unroll (split kernels: plan.mlp_unroll_c / _s;
    streamed: plan.stream_unroll_c / _s) chunks of the inner dimension a step, each operand's
    chunks in one load, the activations' (the first GEMM: the first split block of pixel splits'
    partials) before the weights', whose layout conversion is the step's first wait: one round
    trip a step, plus one per further split block; one more each for the loads after the loop
    (bias; backward: hidden)."""
    unroll_c, unroll_s, split_block = ((plan.stream_unroll_c, plan.stream_unroll_s, plan.stream_split_block)
                                       if streamed else (plan.mlp_unroll_c, plan.mlp_unroll_s, plan.mlp_split_block))
    return (1 + cdiv(c, unroll_c * plan.mlp_chunk_c) * cdiv(max(1, splits), split_block),
            1 + cdiv(sq, unroll_s * plan.mlp_chunk_s))


def triton_kernels(p: Problem, res: Resources, reread_l2: bool, dev: Device = Device()) -> List[Kernel]:
    """launch.forward/backward's launches for `p` (plan, grids and warps from launch.py itself):
    fused (one program per sample), streamed (one persistent kernel, where the split plan's
    re-read would miss L2) or channel_sums -> excite -> scale / grad_input; backward then
    weight_grads."""
    s, e, dt = p.site, p.elem, p.dtype
    x = torch.empty(s.shape, dtype=DTYPES[dt][0], device="meta")
    g = launch.Geometry(x, s.s, p.residual)
    back = p.direction == "backward"
    plan = launch.Plan(g, backward=back, sm_count=SMS, budget=int(dev.l2_effective), elem=e,
                       tensors=(3 if back else 2) + p.residual)
    n, c, l, acc = s.n, s.c, g.L, 4
    mlp, iters = _triton_mlp(g, e)
    vectors = n * (3 * c + s.s) * acc  # pooled/logits/gates (dz2/gates/dp), hidden (dz1): small, L2
    xb, mask = p.x_bytes, p.mask_bytes
    ks: List[Kernel] = []
    if plan.fused:
        name = "se_backward_fused_kernel" if back else "se_forward_fused_kernel"
        warps = launch._warps((2 if back else 1) * g.block_c_all * g.block_l_all)
        resident = res.triton_resident(name, dt, g.block_c_all, g.block_l_all, g.block_s, warps)
        loads = (2 * xb + mask) if back else (xb * (2 if p.residual else 1))
        ks.append(Kernel(name.replace("se_", "").replace("_kernel", ""), n, warps, resident,
                         loads / n / warps, p.floor_bytes(), n * mlp + vectors, 1 + 2 * iters))
    elif plan.stream is not None:
        # items: one tile of channel sums (launch.STREAM_TILE_BYTES of x; backward dy and x; see Plan._stream), an MLP
        # program of the split plan over the group's samples, one element-wise tile; a tile's loads
        # together
        name = "se_streamed_backward_kernel" if back else "se_streamed_forward_kernel"
        warps = launch.STREAM_WARPS
        resident = res.triton_resident(name, dt, plan.stream_block_c, plan.stream_block_l, None, warps)
        bc, bl = plan.stream_block_c, plan.stream_block_l
        if plan.stream_flat[2]:  # flat tiles: plan.stream_flat[2] whole rows in a bc * bl vector
            valid = (c / cdiv(c, plan.stream_flat[2])) * l
        else:
            valid = (c / cdiv(c, bc)) * (l / cdiv(l, bl))  # elements of an average tile (14x14: 196 of 256 a row)
        tile_bytes = valid * e * (2 if back else 1)
        trips = sum(_triton_gemm_trips(plan, c, s.s, cdiv(l, plan.stream_block_l), streamed=True))
        ks += streamed_kernels(p, dev, plan.stream, plan.grids[name][0], warps, resident, tile_bytes / warps,
                               tile_bytes, trips, cdiv(l, plan.stream_block_l))
    else:
        c_blocks, l_blocks = cdiv(c, plan.block_c), cdiv(l, plan.block_l)
        tile = (c / c_blocks) * (l / l_blocks)  # valid elements of an average tile
        warps = launch._sums_warps(back)
        sums_reads = 2 * xb + mask if back else xb
        ks.append(Kernel("channel_sums", plan.grids["channel_sums_kernel"][0], warps,
                         res.triton_resident("channel_sums_kernel", dt, plan.block_c, plan.block_l, None, warps),
                         sums_reads / p.numel * tile / warps, sums_reads, n * plan.splits * c * acc))
        # the MLP: two GEMMs over blocks of mlp_block_n samples, each weight row read once per block.
        # forward: hidden (sample block x 16 hidden units; its W1 rows and its samples' partials
        # chunk by chunk of C), logits (sample block x 32 channels; its W2 rows, the hidden values);
        # backward: dz1 (as hidden, with W2 and the dot partials and logits), dp (as logits, with W1)
        bn = plan.mlp_block_n
        n_blocks = cdiv(n, bn)
        s_blocks, c_blocks2 = cdiv(s.s, plan.mlp_block_s), cdiv(c, plan.mlp_block_c)
        first, second = ("se_dz1_kernel", "se_dp_kernel") if back else ("se_hidden_kernel", "se_logits_kernel")
        w1, w2 = plan.mlp_warps
        first_extra = n * c * acc * (2 if back else 0)  # backward: logits read, dz2 and gates written
        first_trips, second_trips = _triton_gemm_trips(plan, c, s.s, plan.splits, streamed=False)
        ks.append(Kernel(first[3:-7], plan.grids[first][0], w1,
                         res.triton_resident(first, dt, plan.mlp_chunk_c, None, plan.mlp_block_s, w1),
                         0.0, 0.0, n_blocks * s.s * c * e + s_blocks * n * plan.splits * c * acc + n * c * acc
                         + first_extra, first_trips))
        ks.append(Kernel(second[3:-7], plan.grids[second][0], w2,
                         res.triton_resident(second, dt, plan.mlp_block_c, None, plan.mlp_chunk_s, w2),
                         0.0, 0.0, n_blocks * s.s * c * e + c_blocks2 * n * s.s * acc + 2 * n * c * acc,
                         second_trips))
        name = "se_grad_input_kernel" if back else "se_scale_kernel"
        warps = launch._warps(plan.block_c * plan.block_l)
        loads, hbm, l2 = second_pass(p, reread_l2)
        ks.append(Kernel(name[3:-7], plan.grids[name][0], warps,
                         res.triton_resident(name, dt, plan.block_c, plan.block_l, None, warps),
                         loads / p.numel * tile / warps, hbm, l2 + 2 * n * c * acc))
    if back:  # steps of plan.wgrad_step samples of its chunk, their loads in flight together: one L2 round trip a step
        bc, bs = plan.wgrad_block_c, plan.wgrad_block_s
        programs = plan.grids["se_weight_grads_kernel"][0]
        per_program = programs // plan.wgrad_chunks  # programs of one chunk
        outputs = 2 * s.s * c + s.s + c
        chunks = plan.wgrad_chunks
        here = chunks > 1 and "se_sum_chunks_kernel" not in plan.grids  # the streamed plan: summed in-kernel
        ks.append(Kernel("weight_grads", programs, 8,
                         res.triton_resident("se_weight_grads_kernel", dt, bc, None, bs, 8), 0.0, 0.0,
                         per_program * n * 2 * (bc + bs) * acc
                         + (outputs * acc * chunks if chunks > 1 else 2 * s.s * c * e)
                         + (chunks * outputs * acc + outputs * e if here else 0),
                         cdiv(plan.wgrad_per_chunk, plan.wgrad_step),
                         # in-kernel sums: the last program of a tile adds the chunks after its atomic
                         tail=(1 + chunks) if here else 0.0))
        if chunks > 1 and not here:  # the chunks added in order: one L2 round trip a chunk
            ks.append(Kernel("sum_chunks", plan.grids["se_sum_chunks_kernel"][0], 4,
                             res.triton_resident("se_sum_chunks_kernel", dt, None, None, None, 4), 0.0, 0.0,
                             plan.wgrad_chunks * outputs * acc + outputs * e, plan.wgrad_chunks))
    return ks


# ---- CUDA (csrc/cuda/se_cuda.cu, se_tiles.h) ------------------------------------------------

def cuda_splits(n: int, c: int, l: int) -> Tuple[int, int, int]:
    """(channel blocks, splits, pixels per split): channel_blocks() and pixel_splits() for
    NCHW (8 channels a block, one per warp; ~4 blocks per SM; splits of a multiple of 32)."""
    cblocks = cdiv(c, CUDA_THREADS // 32)
    wanted = max(1, cdiv(4 * SMS, max(1, n * cblocks)))
    splits = min(max(1, l // 32), wanted)
    per_split = cdiv(cdiv(l, splits), 32) * 32
    return cblocks, cdiv(l, per_split), per_split


def cuda_tiles(p: Problem) -> Tuple[int, int]:
    """(blocks, elements of an average warp's tile) of scale/grad_input: make_row_tiles() for
    NCHW rows of H*W, a tile 32 lanes x 4 steps x the 16-byte vector width, rows cut into
    tiles (the last one of a row shorter)."""
    l, width = p.site.h * p.site.w, 16 // p.elem
    chunks = cdiv(l, 32 * 4 * width)
    return cdiv(p.site.n * p.site.c * chunks, CUDA_THREADS // 32), l / chunks


CUDA_FLAT_STEPS = 8  # se_tiles.h kFlatSteps: vector steps of a flat tile at most
CUDA_FLAT_MAX_L = 256  # se_tiles.h kFlatMaxL
# se_cuda.cu flat_stream_smem<float>(): the flat streamed kernels' dynamic shared memory, 8 warps x
# FlatStreamShared<float> (the larger member, FlatSumsShared: 2 x 128 partials + 65 image words)
CUDA_FLAT_STREAM_SMEM = 8 * (2 * 128 * 4 + 65 * 4)


def cuda_flat(p: Problem) -> Optional[Tuple[int, int]]:
    """(rows per tile, tiles per sample) of se_tiles.h's flat tiles where they apply (NCHW, pointers
    assumed aligned, C a multiple of the vector width, width <= H*W <= kFlatMaxL): make_flat_tiles,
    the most whole rows (a multiple of the width, <= 32) within kFlatSteps vector steps; else None."""
    c, l, width = p.site.c, p.site.h * p.site.w, 16 // p.elem
    if c % width or not width <= l <= CUDA_FLAT_MAX_L:
        return None
    rows = max(width, min(min(CUDA_FLAT_STEPS * 32 * width // l, 32) // width * width, cdiv(c, width) * width))
    return rows, cdiv(c, rows)


def cuda_kernels(p: Problem, res: Resources, reread_l2: bool) -> List[Kernel]:
    """se_forward_cuda / se_backward_cuda's split-plan launches: channel_sums -> hidden -> logits
    -> scale, or channel_sums (dot) -> dz1 -> dp -> grad_input -> weight_grads [-> _sum] (flat_*
    kernels where flat tiles apply)."""
    s, e, acc = p.site, p.elem, 4
    n, c, l, sq = s.n, s.c, s.h * s.w, s.s
    args = ("float",) if p.dtype == "float32" else (DTYPES[p.dtype][2], "float")
    back = p.direction == "backward"
    xb, mask = p.x_bytes, p.mask_bytes
    warps = CUDA_THREADS // 32
    cblocks, splits, per_split = cuda_splits(n, c, l)
    ks: List[Kernel] = []
    # channel_sums: one warp per channel, lanes along the pixels, 16-byte loads when H*W is a multiple
    # of the vector width (pointers assumed aligned), else one element a lane; CUDA_UNROLL in flight
    per_elem = 2 * e + (1 / 8 if p.residual else 0) if back else e
    flat = cuda_flat(p)
    relu = "true" if p.residual else "false"
    if flat is not None:
        # flat_sums_kernel: a warp per flat tile (whole rows, one split), a round of CUDA_STEPS_IN_FLIGHT
        # vector steps' loads out at a time
        rows, per_sample = flat
        splits = 1
        tile = c * l / per_sample  # elements of an average tile
        variant = (args[0], "float", "true" if back else "false", relu if back else "false")
        ks.append(Kernel("flat_sums", cdiv(n * per_sample, warps), warps,
                         res.cuda_resident("flat_sums_kernel", variant),
                         min(CUDA_STEPS_IN_FLIGHT * 32 * 16 // e, tile) * per_elem, 2 * xb + mask if back else xb,
                         n * c * acc))
    else:
        sums_width = 16 // e if l % (16 // e) == 0 else 1
        sums_variant = (args[0], "float" if len(args) == 1 else args[1], "true" if sums_width > 1 else "false")
        ks.append(Kernel("channel_sums", cblocks * splits * n, warps,
                         res.cuda_resident("channel_sums_kernel", sums_variant),
                         min(CUDA_UNROLL * 32 * sums_width, per_split) * per_elem, 2 * xb + mask if back else xb,
                         n * splits * c * acc))
    # the MLP: two GEMMs over blocks of 8 samples x 32 outputs, the inner dimension 32 at a time
    # through shared memory, 4 such tiles per pass: each weight read once per sample block; round
    # trips: one per pass (its loads in flight together), the first GEMM's also summing the splits
    n_blocks = cdiv(n, 8)
    first, second = ("dz1_kernel", "dp_kernel") if back else ("hidden_kernel", "logits_kernel")
    ks.append(Kernel(first[:-7], n_blocks * cdiv(sq, 32), warps, res.cuda_resident(first, args), 0.0, 0.0,
                     n_blocks * sq * c * e + cdiv(sq, 32) * n * splits * c * acc + n * c * acc * (3 if back else 1),
                     cdiv(c, 32 * CUDA_MLP_SUB) * (1 + cdiv(splits, CUDA_UNROLL))))
    ks.append(Kernel(second[:-7], n_blocks * cdiv(c, 32), warps, res.cuda_resident(second, args), 0.0, 0.0,
                     n_blocks * sq * c * e + cdiv(c, 32) * n * sq * acc + 2 * n * c * acc, cdiv(sq, 32 * CUDA_MLP_SUB)))
    # scale / grad_input: a warp per tile, last tile first, CUDA_STEPS_IN_FLIGHT steps' loads out
    loads, hbm, l2 = second_pass(p, reread_l2)
    if flat is not None:  # flat_scale_kernel / flat_grad_input_kernel<T, float, relu mask[, residual]>
        rows, per_sample = flat
        blocks, tile, width = cdiv(n * per_sample, warps), c * l / per_sample, 16 // e
        name = "flat_grad_input_kernel" if back else "flat_scale_kernel"
        variant = (args[0], "float", relu) + (() if back else (relu,))
    else:
        blocks, tile = cuda_tiles(p)
        width = 16 // e if l % (16 // e) == 0 else 1  # vector path: H*W a multiple of it (pointers assumed aligned)
        name = "grad_input_kernel" if back else "scale_kernel"
        # the variant: <T, float, vector, pixel_rows (NCHW: false), relu mask[, residual]>
        flags = ("true" if width > 1 else "false", "false", relu) + (() if back else (relu,))
        variant = (args[0], "float") + flags
    in_flight_elems = min(CUDA_STEPS_IN_FLIGHT * 32 * width, tile)
    ks.append(Kernel(name[:-7], blocks, warps, res.cuda_resident(name, variant), in_flight_elems * loads / p.numel,
                     hbm, l2 + 2 * n * c * acc))
    if back:
        ks += cuda_weight_grads(p, res, args)
    return ks


def cuda_weight_grads(p: Problem, res: Resources, args: Tuple[str, ...]) -> List[Kernel]:
    """weight_grads: a block per (32 channels x 32 hidden units, chunk of the batch), the
    chunk's columns of dz2, pooled, z and dz1 loaded once into shared memory (one L2 round trip a
    32-sample step) [-> weight_grads_sum]."""
    n, c, sq, e, acc = p.site.n, p.site.c, p.site.s, p.elem, 4
    warps = CUDA_THREADS // 32
    tiles = cdiv(c, CUDA_WGRAD_TILE) * cdiv(sq, CUDA_WGRAD_TILE)
    chunks = max(1, min(cdiv(n, 32), cdiv(2 * SMS, tiles)))  # se_cuda.cu weight_grad_chunks
    per_chunk = cdiv(n, chunks)
    outputs = 2 * sq * c + sq + c
    ks = [Kernel("weight_grads", tiles * chunks, warps,
                 res.cuda_resident("weight_grads_kernel", ("float",) if chunks > 1 else args), 0.0, 0.0,
                 tiles * chunks * cdiv(per_chunk, CUDA_WGRAD_TILE) * 4 * CUDA_WGRAD_TILE * CUDA_WGRAD_TILE * acc
                 + chunks * outputs * acc,
                 cdiv(per_chunk, CUDA_WGRAD_TILE))]
    if chunks > 1:
        ks.append(Kernel("weight_grads_sum", cdiv(outputs, CUDA_THREADS), warps,
                         res.cuda_resident("weight_grads_sum_kernel", args), 0.0, 0.0,
                         chunks * outputs * acc + outputs * e, cdiv(chunks, CUDA_UNROLL)))
    return ks


def stream_splits(l: int, elem: int, channels: int = CUDA_THREADS // 32) -> Tuple[int, int]:
    """se_cuda.cu stream_splits (NCHW): (splits, pixels per split)."""
    per_split = min(cdiv(l, 32) * 32, max(32, STREAM_ITEM_BYTES // (channels * elem) // 32 * 32))
    return cdiv(l, per_split), per_split


def streamed_kernels(p: Problem, dev: Device, sched: dict, programs: int, warps: int, resident: int,
                     load_per_warp: float, pool_item: float, gemm_trips: int, splits: int) -> List[Kernel]:
    """The streamed plan's launch, either backend: the persistent kernel (no fill of its counters
    before it: the buffer is kept per stream and left zero by each launch's last block). Its HBM
    bytes are the floor's: each group's element-wise items re-read x (backward: dy and the mask)
    after lag[3] rounds, whose kept bytes fit the budget by construction. Its
    pipeline: one group's latency from its first read to its element-wise items is its last
    channel-sum item (pool_item bytes, as long as every resident program's item: they share the
    bandwidth), the two GEMMs' dependent L2 round trips (gemm_trips) and three hand-offs."""
    n, c, sq, e, acc = p.site.n, p.site.c, p.site.s, p.elem, 4
    groups = sched["groups"]
    reread = (p.x_bytes + p.mask_bytes) if p.direction == "backward" else p.x_bytes
    weights = groups * 2 * sq * c * e  # W1 and W2 once per group (its first and second GEMM items)
    vectors = n * splits * c * acc * (1 + cdiv(sq, 32)) + n * (4 * c + 2 * sq) * acc
    active = min(dev.sms, programs)
    rate = min(dev.hbm_bw, active * resident * load_per_warp / dev.hbm_latency)
    chain = (programs * pool_item / rate + gemm_trips * dev.l2_round_trip
             + 3 * (STREAM_HANDOFF_TRIPS * dev.l2_round_trip + STREAM_SLEEP))
    return [Kernel("streamed", programs, warps, resident, load_per_warp, p.floor_bytes(),
                   reread + weights + vectors + 8 * (groups * 3 + 2), pipeline=(groups, sched["lag"][3], chain),
                   after=STREAM_FINISH_TRIPS)]


def cuda_streamed(p: Problem, res: Resources, dev: Device) -> Optional[List[Kernel]]:
    """se_forward_cuda / se_backward_cuda's streamed plan where it applies (NCHW: flat tiles, or
    H*W a multiple of the 16-byte vector; pointers assumed aligned; the split plan's re-read would
    miss L2): streamed_kernels (-> the weight-gradient kernels, backward). Items: channel sums of
    8 channels x ~16 KiB (flat tiles: 8 warps' tiles), MLP blocks of 32 outputs, 8 element-wise
    tiles."""
    s, e = p.site, p.elem
    n, c, l, sq = s.n, s.c, s.h * s.w, s.s
    width = 16 // e
    back = p.direction == "backward"
    flat = cuda_flat(p)  # flat tiles take precedence where they apply (se_cuda.cu flat_tiles)
    if (flat is None and l % width) or p.reread_fits(dev):  # the split plan's re-read hits L2 already
        return None
    warps = CUDA_THREADS // 32
    tensors = 2 if back else 1  # loads one warp has out: a channel-sum step (CUDA_UNROLL x 16 B a lane)
    args = ("float",) if p.dtype == "float32" else (DTYPES[p.dtype][2], "float")
    relu = "true" if p.residual else "false"
    if flat is not None:  # flat_streamed_*_kernel: pool and apply items of 8 warps' flat tiles, one split
        _rows, per_sample = flat
        splits, tile = 1, c * l / per_sample
        sched = launch.stream_schedule(n, p.kept_bytes() // n, int(dev.l2_effective), per_sample, cdiv(sq, 32),
                                       cdiv(c, 32), per_sample, warps, per_pool_item=warps)
        name = "flat_streamed_backward_kernel" if back else "flat_streamed_forward_kernel"
        resident = res.cuda_resident(name, (args[0], "float", relu) + (() if back else (relu,)),
                                     smem=CUDA_FLAT_STREAM_SMEM)
        load_per_warp = min(CUDA_STEPS_IN_FLIGHT * 32 * width, tile) * e * tensors
        pool_item = warps * tile * e * tensors
    else:
        splits, per_split = stream_splits(l, e)
        cblocks = cdiv(c, CUDA_THREADS // 32)
        tiles_per_sample = c * cdiv(l, 32 * CUDA_STEPS_IN_FLIGHT * width)
        sched = launch.stream_schedule(n, p.kept_bytes() // n, int(dev.l2_effective), cblocks * splits,
                                       cdiv(sq, 32), cdiv(c, 32), tiles_per_sample, warps)
        name = "streamed_backward_kernel" if back else "streamed_forward_kernel"
        resident = res.cuda_resident(name, (args[0], "float", "false", relu) + (() if back else (relu,)))
        load_per_warp = min(CUDA_UNROLL * 32 * 16, per_split * e) * tensors
        pool_item = warps * per_split * e * tensors
    if sched is None:
        return None
    programs = min(sched["items"], dev.sms * (resident // warps))
    # GEMM round trips: one per pass over 128 of C (plus the partial sums), of S (plus hidden)
    trips = cdiv(c, 32 * CUDA_MLP_SUB) + cdiv(sq, 32 * CUDA_MLP_SUB) + 2
    ks = streamed_kernels(p, dev, sched, programs, warps, resident, load_per_warp, pool_item, trips, splits)
    if back:
        ks += cuda_weight_grads(p, res, args)
    return ks


# ---- eager PyTorch (ReferenceSE, the benchmarks' baseline) ---------------------------------

EAGER_TARGET = 3.0  # the "3x eager", reported per case and as geomeans (not part of --check)


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a strided tensor addresses (an expanded (N, C, 1, 1) gate:
    N * C elements, not N * C * H * W)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride != 0 else 1
    return n * t.element_size()


def eager_ops(p: Problem) -> List[Tuple[str, List[Tuple[int, int]], List[int]]]:
    """The ATen ops eager ReferenceSE runs for `p` (forward: the module call; backward: the
    autograd backward of the module's output), traced on meta tensors under a dispatch mode: per
    op that is neither a view nor an allocation, (name, [(bytes, the index of the last earlier op
    that read or wrote the tensor, -1 if none)] read, [bytes] written). The forward is traced
    with autograd on, as in training; the weights in x's dtype. The trace holds only weak
    references: a strong one would make autograd's AccumulateGrad copy the gradient it otherwise
    takes over."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from se_kernels.reference import ReferenceSE

    ops: list = []
    touched: list = []  # per op so far, weak references to the tensors it read or wrote

    def last_touch(t: torch.Tensor) -> int:
        return next((i for i in range(len(touched) - 1, -1, -1) if any(r() is t for r in touched[i])), -1)

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and "empty" not in str(func):
                ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                ops.append((str(func), [(_distinct_bytes(t), last_touch(t)) for t in ins],
                            [_distinct_bytes(t) for t in outs]))
                touched.append([weakref.ref(t) for t in ins + outs])
            return out

    s = p.site
    dtype = DTYPES[p.dtype][0]
    module = ReferenceSE(s.c, s.s, activation=s.activation, gate=s.gate,
                         out_activation="relu" if p.residual else None).to(device="meta", dtype=dtype)
    x = torch.empty(s.shape, device="meta", dtype=dtype, requires_grad=True)
    # the residual needs no gradient of its own: in a network it is a layer's output, and eager's
    # add passes the same gradient tensor on (as a leaf, AccumulateGrad would copy it)
    residual = torch.empty_like(x) if p.residual else None
    if p.direction == "forward":
        with Trace():
            module(x, residual)
    else:
        y = module(x, residual)
        dy = torch.empty_like(y)
        with Trace():
            y.backward(dy)
    return ops


@dataclass
class Eager:
    problem: Problem
    ops: int
    hbm_bytes: float
    seconds: float


def predict_eager(p: Problem, dev: Device) -> Eager:
    """Eager's time, counted in eager's favour: every op at the HBM bandwidth (reductions and
    cuDNN's small convolutions included), one launch gap between ops (eager's dispatch on the CPU
    is slower than that: ASSUMPTION in its favour), and a read of a tensor an earlier op touched
    is an L2 hit when the bytes of every op from that one to this one fit the effective L2 (a
    tensor counted once per op that touched it: an over-count, against eager)."""
    ops = eager_ops(p)
    seconds, hbm_total, op_bytes = 0.0, 0.0, []
    for _name, reads, writes in ops:
        touched = sum(b for b, _ in reads) + sum(writes)
        l2 = sum(b for b, last in reads if last >= 0 and sum(op_bytes[last:]) + touched <= dev.l2_effective)
        hbm = touched - l2
        hbm_total += hbm
        seconds += max(hbm / dev.hbm_bw, (hbm + l2) / dev.l2_bw)
        op_bytes.append(touched)
    seconds += dev.launch_gap * (len(ops) - 1)
    return Eager(p, len(ops), hbm_total, seconds)


# ---- the runs and the report ----------------------------------------------------------------

def shape_sets(derive_efficientnet: bool = False) -> List[Tuple[str, Tuple[Site, ...]]]:
    imagenet = shapes.shape_set("imagenet-se-resnet50").sites
    effnet = shapes.shape_set("efficientnet-b0").sites if derive_efficientnet else EFFICIENTNET_B0
    return [("cifar-se-resnet18", shapes.shape_set("cifar-se-resnet18").sites),
            ("imagenet-se-resnet50", imagenet),
            ("imagenet-se-resnet50@256", tuple(replace(site, n=256) for site in imagenet)),
            ("efficientnet-b0", effnet)]


@dataclass
class Row:
    set_name: str
    pred: Prediction
    once: Prediction  # the same plan with the second pass all L2 hits
    eager: Eager  # eager PyTorch on the same problem

    @property
    def speedup(self) -> float:
        """Predicted eager time / predicted time of the backend's plan."""
        return self.eager.seconds / self.pred.seconds


def run(dev: Device, res: Resources, derive_efficientnet: bool = False) -> List[Row]:
    """Every (set, site, dtype, epilogue, backend, direction), NCHW."""
    rows, eager = [], {}
    for set_name, sites in shape_sets(derive_efficientnet):
        for site, dtype, epi, backend, direction in product(sites, DTYPES, EPILOGUES, BACKENDS, DIRECTIONS):
            p = Problem(site, dtype, epi, direction)
            if p not in eager:
                eager[p] = predict_eager(p, dev)
            rows.append(Row(set_name, predict(p, backend, dev, res), predict(p, backend, dev, res, force_l2=True),
                            eager[p]))
    return rows


def inputs_table(dev: Device) -> List[str]:
    lines = ["| input | value | source |", "| --- | --- | --- |"]
    for name, value, source in (
        ("HBM bandwidth", f"{dev.hbm_bw:.3g} B/s", "device-to-device copy through PyTorch on an H200 lent to this "
         "project's workplace (2026-10-28, 2026-11-04), bytes read + written; datasheet 4.8e12 via --hbm"),
        ("SMs", dev.sms, "PyTorch's device properties on that H200"),
        ("L2 / effective for reuse", f"{L2_BYTES / 1e6:.0f} MB / {dev.l2_effective / 1e6:.0f} MB",
         "device properties / ASSUMPTION (conservative): two L2 partitions, a line used from both sides may be "
         "held twice"),
        ("L2 hit bandwidth", f"{dev.l2_bw:.3g} B/s", "ASSUMPTION: 2 x the HBM copy rate (--l2-bw); to be measured"),
        ("evict-first lines (CUDA streamed plan)", "leave L2 first", "ASSUMPTION: lines loaded or stored with .cs "
         "hints do not push out others: the plan's L2 budget counts only the re-read bytes; to be measured"),
        ("per-SM L2 bandwidth", f"{dev.sm_bw:.3g} B/s", "ASSUMPTION: 64 B/clock at 1.98 GHz; caps kernels on few SMs"),
        ("launch gap", f"{dev.launch_gap * 1e6:.1f} us", "ASSUMPTION: between dependent kernels on one stream "
         "(--launch-gap); to be measured"),
        ("HBM latency", f"{dev.hbm_latency * 1e9:.0f} ns", "ASSUMPTION (lead): bytes in flight needed = bandwidth "
         f"x latency = {dev.hbm_bw * dev.hbm_latency / 1e6:.2f} MB"),
        ("L2 round trip", f"{dev.l2_round_trip * 1e9:.0f} ns", "ASSUMPTION: one dependent L2-hit load under load "
         "(serial loops: excite, weight grads)"),
        ("CUDA loads in flight", f"loops {CUDA_UNROLL}/thread, tiles {CUDA_STEPS_IN_FLIGHT} steps/warp",
         "ASSUMPTION: nvcc's usual unroll / se_tiles.h's comment; weight_grads' `#pragma unroll 8` as written"),
        ("eager PyTorch", "ReferenceSE's ATen ops", "traced on meta tensors (predict_eager); each op at the HBM "
         "bandwidth with the launch gap between ops: ASSUMPTION in eager's favour (its CPU dispatch is slower)"),
        ("Triton resident warps/SM", TRITON_TABLE.name, "per kernel, dtype, tile, warps (sm_90, low end of range)"),
        ("CUDA registers", CUDA_TABLE.name, "sm_90 rows; 256 threads per block; resident warps from "
         "registers and shared memory"),
    ):
        lines.append(f"| {name} | {value} | {source} |")
    return lines


def rows_table(rows: List[Row]) -> List[str]:
    lines = ["| set | site | dtype | epilogue | backend | dir | HBM MB | floor MB | x/dy HBM passes | re-read | "
             "kernels: programs, resident warps/SM, us, bound | total us | floor us | frac of floor | x-once frac |",
             "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        pr, p = r.pred, r.pred.problem
        passes = 1 + (pr.reread == "HBM")
        kernels = "; ".join(f"{k.name} {k.programs}p {k.resident_used}w {k.seconds * 1e6:.1f} {k.bound}"
                            for k in pr.kernels)
        lines.append(f"| {r.set_name} | {p.site.label} | {p.dtype} | {p.epilogue} | {pr.backend} | {p.direction} | "
                     f"{pr.hbm_bytes / 1e6:.1f} | {p.floor_bytes() / 1e6:.1f} | {passes} | {pr.reread} | {kernels} | "
                     f"{pr.seconds * 1e6:.1f} | {pr.floor * 1e6:.1f} | {pr.fraction:.2f} | {r.once.fraction:.2f} |")
    return lines


def summary(rows: List[Row]) -> Tuple[List[str], List[str]]:
    """(markdown lines, misses) over the sites whose x is >= SUMMARY_MIN_X."""
    by_case: Dict[tuple, Dict[tuple, Row]] = {}
    for r in rows:
        p = r.pred.problem
        if p.x_bytes >= SUMMARY_MIN_X:
            by_case.setdefault((r.set_name, p.site.label, p.dtype, p.epilogue, p.x_bytes), {})[
                (r.pred.backend, p.direction)] = r
    lines = [f"Targets: forward >= {TARGETS['forward']}, backward >= {TARGETS['backward']} of floor "
             "(x-once: the same plan if its second pass hit L2; the streamed plan's re-read does). byte cap: "
             "floor bytes / the plan's HBM bytes, the best fraction the plan's traffic allows at any efficiency. "
             "plan: CUDA's (split or streamed).", "",
             "| set | site | dtype | epilogue | x MiB | byte cap fwd / bwd triton; cuda | cuda plan | triton fwd "
             "| triton bwd | cuda fwd | cuda bwd |",
             "| --- | --- | --- | --- | ---: | --- | --- | --- | --- | --- | --- |"]
    misses = []
    for (set_name, label, dtype, epilogue, xb), case in by_case.items():
        cells = []
        for backend, direction in product(BACKENDS, DIRECTIONS):
            r = case[(backend, direction)]
            ok = r.pred.fraction >= TARGETS[direction]
            cells.append(f"{r.pred.fraction:.2f} {'ok' if ok else 'MISS'} (x-once {r.once.fraction:.2f})")
            if not ok:
                misses.append(f"{set_name} {label} {dtype} {epilogue} {backend} {direction}: "
                              f"{r.pred.fraction:.2f} < {TARGETS[direction]}")
        cap = "; ".join(" / ".join(f"{case[(b, d)].pred.floor_bytes_cap:.2f}" for d in DIRECTIONS) for b in BACKENDS)
        plan = " / ".join(sorted({"streamed" if case[("cuda", d)].pred.reread == "L2 (streamed)" else "split"
                                  for d in DIRECTIONS}))
        lines.append(f"| {set_name} | {label} | {dtype} | {epilogue} | {xb / 2**20:.0f} | {cap} | {plan} | "
                     + " | ".join(cells) + " |")
    return lines, misses


def _geomean(values: Sequence[float]) -> float:
    import math
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def eager_section(rows: List[Row]) -> Tuple[List[str], int, int]:
    """(markdown lines, cases of >= SUMMARY_MIN_X below EAGER_TARGET, such cases): each backend's
    predicted time against eager PyTorch's (predict_eager), per >= 32 MiB case and as geomeans."""
    by_case: Dict[tuple, Dict[tuple, Row]] = {}
    for r in rows:
        p = r.pred.problem
        by_case.setdefault((r.set_name, p.site.label, p.dtype, p.epilogue, p.x_bytes), {})[
            (r.pred.backend, p.direction)] = r
    lines = [f"Eager: the ATen ops ReferenceSE runs (traced on meta tensors; the forward pools, runs two 1x1 "
             "convolutions, the activation and gate, multiplies, then adds the residual and applies relu; the "
             "backward is autograd's), counted in eager's favour: every op at the HBM bandwidth, one launch gap "
             "between ops, a tensor an earlier op touched read from L2 when the bytes of the ops from that one to "
             "this one fit the effective L2. eager bytes: eager's HBM bytes / the floor's, the most a plan at the "
             f"floor can gain from bytes alone. Target: {EAGER_TARGET:g}x eager (`ok` / `below`); not part of "
             "--check.", "",
             "| set | site | dtype | epilogue | eager ops fwd / bwd | eager bytes fwd / bwd | triton fwd | triton bwd "
             "| cuda fwd | cuda bwd |", "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    below = total = 0
    for (set_name, label, dtype, epilogue, xb), case in by_case.items():
        if xb < SUMMARY_MIN_X:
            continue
        cells = []
        for backend, direction in product(BACKENDS, DIRECTIONS):
            x = case[(backend, direction)].speedup
            total += 1
            below += x < EAGER_TARGET
            cells.append(f"{x:.2f}x {'ok' if x >= EAGER_TARGET else 'below'}")
        ops = " / ".join(str(case[("triton", d)].eager.ops) for d in DIRECTIONS)
        ratio = " / ".join(f"{case[('triton', d)].eager.hbm_bytes / case[('triton', d)].pred.problem.floor_bytes():.2f}"
                           for d in DIRECTIONS)
        lines.append(f"| {set_name} | {label} | {dtype} | {epilogue} | {ops} | {ratio} | " + " | ".join(cells) + " |")
    lines += ["", f"{total - below} of {total} cases of >= 32 MiB reach {EAGER_TARGET:g}x eager.", "",
              "Geomean of eager time / predicted time:", "",
              "| cases | triton fwd | triton bwd | cuda fwd | cuda bwd |", "| --- | ---: | ---: | ---: | ---: |"]
    for title, keep in (("x >= 32 MiB", lambda r: r.pred.problem.x_bytes >= SUMMARY_MIN_X), ("all", lambda r: True)):
        cells = [_geomean([r.speedup for r in rows
                           if keep(r) and r.pred.backend == b and r.pred.problem.direction == d])
                 for b, d in product(BACKENDS, DIRECTIONS)]
        lines.append(f"| {title} | " + " | ".join(f"{v:.2f}x" for v in cells) + " |")
    return lines, below, total


KERNEL_NOTES = (  # how the code was read; the ASSUMPTIONs are to be checked on a GPU or in SASS
    "Triton: a tile's loads are issued together before use (one cached sm_90 se_scale_kernel cubin: its "
    "LDG.128s precede the math); loops are not software-pipelined (no async copies in the cached TTGIR of "
    "channel_sums, excite, weight_grads), so a warp has one tile in flight.",
    "Triton streamed plan: one 16-warp program per SM; a tile of launch.STREAM_TILE_BYTES (backward: of dy and x "
    "together); 7x7 rows (49 pixels: no 8-byte accesses) flat tiles of launch.STREAM_FLAT_ELEMENTS, 16-byte accesses, "
    "as many whole rows as the vector holds (160 of 7x7 in 8192 elements); "
    "their tl.gather steps through shared memory not counted (at most ~14 B an element against 128 B/clock/SM); "
    "bytes in flight = the tile's valid elements (padding excluded). Loops over "
    "chunks that reduce across warps (the GEMM items) do not overlap by themselves (the SASS of a tl.range "
    "loop_unroll_factor=2 copy, sm_80: the second chunk's LDGs after the first's reduction barriers), and Triton "
    "converts a loaded weight tile to the product's layout right after its load (LDG, BAR, STS), so the GEMM "
    "bodies load up to launch.STREAM_MLP_UNROLL chunks of each operand at once (split kernels: MLP_UNROLL), "
    "activations before weights: one L2 round trip a step (_triton_gemm_trips).",
    "Triton MLP (split plan): se_hidden_kernel / se_logits_kernel (backward: se_dz1_kernel / se_dp_kernel), "
    "programs over (8-sample block, 16 hidden units) and (8-sample block, 32 channels); each reads its weight "
    "rows once per sample block; one L2 round trip per step of launch.MLP_UNROLL chunks of the inner dimension "
    "(fewer where it is shorter) and per launch.MLP_SPLIT_ELEMENTS of further pixel splits' partials. "
    "Triton fused plans' excite: per sample, all of W1 and W2 from L2; two L2 round trips per S-chunk (one cached "
    "sm_90 se_excite_kernel cubin: W2's loads come after the store of hidden and a reduction). W2 tiles "
    "[BLOCK_C, BLOCK_S] with BLOCK_S < S fetch a whole 32-byte sector per row piece: no L1 reuse counted.",
    "Triton weight_grads: each program walks its chunk of at most 32 samples in order, launch.WGRAD_STEP (16) "
    "samples a step as two FMA tl.dots; Triton pipelines the loop (one sm_90 cubin: the operands copied to shared "
    "memory by LDGSTS, the next step's copies issued before this step's FFMAs), counted here as one L2 round "
    "trip a step (conservative); with several chunks, se_sum_chunks_kernel adds them (one round trip a "
    "chunk), or in the streamed plan the last program of each tile to finish does (an atomic, then one round "
    "trip a chunk, after the last wave).",
    "CUDA channel_sums: 16 bytes per lane and iteration when H*W is a multiple of the vector width (else one "
    "element), CUDA_UNROLL iterations in flight (`#pragma unroll 4`; ASSUMPTION: the loads are issued together).",
    "CUDA scale/grad_input: 16-byte accesses only when H*W is a multiple of the vector width (pointers assumed "
    "aligned), else the scalar path; row tiles never span rows; on the 16-byte path a tile's loads are issued "
    "before its arithmetic (CUDA_STEPS_IN_FLIGHT steps in flight).",
    "CUDA flat tiles (either plan; NCHW, C a multiple of the vector width, width <= H*W <= 256: 7x7, 14x14): "
    "flat_sums / flat_scale / flat_grad_input, a warp per tile of whole rows (cuda_flat: at most 32 rows in "
    "CUDA_FLAT_STEPS 16-byte steps), one split, CUDA_STEPS_IN_FLIGHT steps' loads out at a time (the SASS: a "
    "round's LDG.128s precede its math); the per-row values and relu bits through shared memory, not counted.",
    "CUDA MLP: hidden/logits (backward dz1/dp) over blocks of 8 samples x 32 outputs, the inner dimension 32 "
    f"at a time through shared memory, {CUDA_MLP_SUB} such tiles per pass; each weight read once per sample "
    "block; one L2 round trip per pass.",
    "CUDA streamed plan: persistent blocks (as many as are resident), claiming numbered items (channel-sum "
    "blocks of ~16 KiB of x, the GEMMs' blocks, 8 element-wise tiles); a block's resident warps as the ptxas "
    "table's streamed_*_kernel row; bytes in flight as the channel sums' loads. Hand-off between stages: "
    f"{STREAM_HANDOFF_TRIPS} L2 round trips + {STREAM_SLEEP * 1e9:.0f} ns (ASSUMPTION: fence, atomic, "
    "acquire poll, half a __nanosleep). Its end: the last block out zeroes the counters "
    f"({STREAM_FINISH_TRIPS} L2 round trips); no fill launch before it (the counters' buffer is kept per "
    "stream; either backend).",
    "CUDA weight_grads: 32 x 32 (channel, unit) tiles of both weight gradients per block, each block "
    "loading its columns of dz2, pooled, z and dz1 once per 32-sample step (L2 bytes; one round trip a "
    "step); the batch in as few chunks of >= 32 samples as give 2 blocks per SM, added by a second kernel "
    "where there are several.",
    "The (N, C)/(N, S) vectors, partial sums and weight gradients count as L2 traffic (small next to x).",
)


def report(rows: List[Row], dev: Device, res: Resources, derived: bool, command: str) -> Tuple[str, List[str]]:
    summary_lines, misses = summary(rows)
    md = ["# GPU performance model: Triton and CUDA backends on an H200 (no GPU run)", "",
          f"Command: `{command}`. "
          "A model of the kernels as written, from the code and the compilers' resource tables: every input "
          "below marked ASSUMPTION is to be replaced by a GPU measurement. NCHW; weights in x's dtype; "
          "activations/gates as each site's own (they do not change the bytes).", "",
          "## Inputs", ""] + inputs_table(dev) + ["",
          "EfficientNet-B0 sites: " + ("derived by running torchvision now." if derived else
          "hard-coded (shapes.shape_set('efficientnet-b0') as run on 2026-11-30, torchvision 0.29.1); "
          "--derive-efficientnet re-derives them."), "",
          "## Model", "", __doc__.split("\n\n", 2)[2].strip(), ""] + [f"- {note}" for note in KERNEL_NOTES] + ["",
          "Kernel cell: name, programs (blocks), resident warps/SM used, predicted us, the bound "
          "(HBM; in-flight: too few bytes in flight for the HBM latency; SMs: too few SMs for the per-SM bandwidth; "
          "L2; chain: serial L2 round trips). HBM MB: predicted HBM "
          "bytes; x/dy HBM passes: how often the plan reads x (forward) or dy (backward) from HBM.", "",
          "## Summary: sites whose x is >= 32 MiB", ""] + summary_lines + [""]
    md += [f"{len(misses)} of {4 * sum(line.startswith('| ') for line in summary_lines[4:])} summary cases miss "
           "their target.", ""]
    eager_lines, _below, _total = eager_section(rows)
    md += ["## Against eager PyTorch (model)", ""] + eager_lines + [""]
    md += ["## Flags (resource rows not found: defaults used)", ""]
    md += [f"- {m}" for m in sorted(res.missing)] or ["- none"]
    md += ["", "## Every case", ""] + rows_table(rows)
    return "\n".join(md) + "\n", misses


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hbm", type=float, default=HBM_BW, help=f"HBM bandwidth, B/s (datasheet: {HBM_BW_DATASHEET:g})")
    ap.add_argument("--l2-bw", type=float, default=None, help=f"L2 hit bandwidth, B/s (default {L2_BW_FACTOR} x --hbm)")
    ap.add_argument("--launch-gap", type=float, default=LAUNCH_GAP * 1e6, help="gap between kernels, us")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="exit 1 if a >= 32 MiB site misses its target")
    ap.add_argument("--derive-efficientnet", action="store_true", help="derive the EfficientNet-B0 sites")
    args = ap.parse_args(argv)
    dev = Device(hbm_bw=args.hbm, l2_bw=args.l2_bw or L2_BW_FACTOR * args.hbm, launch_gap=args.launch_gap * 1e-6)
    res = Resources.load()
    rows = run(dev, res, args.derive_efficientnet)
    command = " ".join(["python benchmarks/gpu_model.py"] + list(sys.argv[1:] if argv is None else argv))
    md, misses = report(rows, dev, res, args.derive_efficientnet, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(md)
    if args.check and misses:
        print(f"{len(misses)} cases miss their targets:", *misses, sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
