"""The Triton kernels compile ahead of time for real GPUs (no GPU needed): every kernel the
launch code launches, for sm_90 over every benchmark shape set and for sm_80 over cpu-quick, the
int64-offset ("wide") site and the SE-ResNet-50 stages at batch 256 ("streamed"), in float32 and
bfloat16, NCHW and channels_last, every plan (fused, split, streamed), forward and backward, with
and without the residual + relu epilogue, and none of the compiled variants spills or has a
stack frame, and the memory-bound kernels' variants use at most 128
registers (benchmarks/triton_aot.py; its report is benchmarks/results/triton_resources.md).

The compilation runs in a subprocess without TRITON_INTERPRET: tests/conftest.py sets it on a
machine without a GPU, and under it @triton.jit returns InterpretedFunctions, which cannot be
compiled. The subprocess also keeps the stand-in driver (which reports a GPU that is not there)
out of this process, whose other tests run the interpreter.

Cost: about 660 distinct variants: from a cold cache 1.5 minutes here with both cores free, 3.5
with one; ~35 s warm. Environment:
  SE_KERNELS_AOT_CACHE=DIR   Triton cache to use (reused between runs: warm); default a fresh
                             temporary directory (cold, so compile errors cannot hide in a cache)
  SE_KERNELS_AOT_FULL=1      sm_80 over every shape set too (~1000 variants, ~6 minutes cold)
Without ptxas/cuobjdump in the triton wheel (or TRITON_PTXAS_PATH) the compiling tests skip.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import triton_aot  # noqa: E402

SM80_SETS = ("cpu-quick", "wide", "streamed")


def _selections():
    everything = triton_aot.Selection(archs=(90,))
    full = os.environ.get("SE_KERNELS_AOT_FULL") == "1"
    sm80 = triton_aot.Selection(archs=(80,), shape_sets=() if full else SM80_SETS)
    return [everything, sm80]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """arch -> triton_aot.Result (compile errors fail here, with the compiler's output). Minutes
    cold, on every core: every test that uses it is marked slow."""
    missing = triton_aot.tools_missing()
    if missing is not None:
        pytest.skip(f"cannot compile for NVIDIA GPUs here (no ptxas/cuobjdump in the triton wheel?): {missing}")
    cache = os.environ.get("SE_KERNELS_AOT_CACHE") or tmp_path_factory.mktemp("triton-aot-cache")
    results = {}
    for selection in _selections():
        try:
            result = triton_aot.run_subprocess(selection, Path(cache), jobs=os.cpu_count() or 1, timeout=1800)
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"AOT compilation for sm_{selection.archs} failed (exit {exc.returncode}):\n"
                        f"{exc.stderr[-8000:]}\n{exc.stdout[-2000:]}")
        results[selection.archs[0]] = result
    return results


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_no_spills_or_stack_frames(compiled, arch):
    bad = triton_aot.problems(compiled[arch])
    assert not bad, f"{len(bad)} compiled variant(s) for sm_{arch} spill or use a stack frame:\n" + "\n".join(bad)


# The memory-bound kernels: a thread holds a few tile elements and the GPU hides the memory
# latency with many loads in flight, i.e. with resident warps. At most 128 registers a thread
# leaves at least 16 warps resident per SM (65536 registers).
MEMORY_BOUND_KERNELS = ("channel_sums_kernel", "se_scale_kernel", "se_grad_input_kernel", "channel_max_kernel",
                        "ca_grad_input_max_kernel")
MEMORY_BOUND_MAX_REGISTERS = 128


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_memory_bound_kernels_fit_128_registers(compiled, arch):
    result = compiled[arch]
    launched_by = {}  # variant -> (constexprs and num_warps, the first call that launches it)
    for case, use_arch, _fused, _kernel, key, kw in result.uses:
        launched_by.setdefault(f"{use_arch}|{key}", (kw, case))
    seen, over = set(), []
    for k, d in result.variants.items():
        v = triton_aot.Resources(**d)
        if v.kernel not in MEMORY_BOUND_KERNELS:
            continue
        seen.add(v.kernel)
        if v.registers > MEMORY_BOUND_MAX_REGISTERS:
            kw, case = launched_by[k]
            consts = ", ".join(f"{name}={value}" for name, value in kw.items())
            over.append(f"sm_{arch} {v.kernel} [{consts}]: {v.registers} registers, {v.resident_warps} resident "
                        f"warps/SM; launched by {case['shape_set']} {case['site']} {case['dtype']} {case['layout']} "
                        f"{case['epilogue']} {case['direction']}")
    assert seen == set(MEMORY_BOUND_KERNELS), f"not compiled for sm_{arch}: {set(MEMORY_BOUND_KERNELS) - seen}"
    assert not over, (f"{len(over)} variant(s) of the memory-bound kernels use more than "
                      f"{MEMORY_BOUND_MAX_REGISTERS} registers on sm_{arch}:\n" + "\n".join(sorted(over)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_launched_kernel_is_compiled(compiled, arch):
    """The kernels compiled are all the kernels of kernels.py, and all the kernels launch.py
    names: a new kernel cannot be skipped silently (give it a shape that launches it)."""
    result = compiled[arch]
    built = {r.kernel for r in result.resources()}
    assert built == set(result.kernels_defined), (
        f"kernels.py defines {sorted(set(result.kernels_defined) - built)} that no benchmark shape launched")
    assert set(result.kernels_in_launch_code) == set(result.kernels_defined), (
        result.kernels_in_launch_code, result.kernels_defined)
    assert all(r.arch == arch for r in result.resources())


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_coverage_kernel_dtype_layout_plan(compiled, arch):
    """Both plans are compiled for every dtype x layout x direction, each with all the kernels
    its plan launches, and every kernel in every dtype and layout."""
    result = compiled[arch]
    by_combo = {}
    for case, _arch, plan, kernel, _key, _kw in result.uses:
        combo = (case["dtype"], case["layout"], case["direction"], plan)
        by_combo.setdefault(combo, set()).add(kernel)
    plans = ("fused", "split", "streamed")
    expected = set(itertools.product(triton_aot.DTYPES, triton_aot.LAYOUTS, triton_aot.DIRECTIONS, plans))
    assert set(by_combo) == expected, f"missing: {sorted(expected - set(by_combo))}"
    # se_sum_chunks_kernel runs where the batch exceeds 32 samples, and which batches take the split
    # plan depends on the dtype (the streamed plan takes those whose bytes exceed the L2 budget)
    for (dtype, layout, direction, plan), kernels in by_combo.items():
        for other, other_kernels in by_combo.items():
            if other[2:] == (direction, plan):
                assert kernels - {"se_sum_chunks_kernel"} == other_kernels - {"se_sum_chunks_kernel"}, (
                    dtype, layout, direction, plan, kernels, other, other_kernels)
    launched = {(case["dtype"], case["layout"], kernel) for case, _a, _f, kernel, _k, _kw in result.uses}
    assert launched == set(itertools.product(triton_aot.DTYPES, triton_aot.LAYOUTS, result.kernels_defined))
    epilogues = {case["epilogue"] for case, *_ in result.uses}
    assert epilogues == set(triton_aot.EPILOGUES)


@pytest.mark.slow
def test_report_renders(compiled, tmp_path):
    for arch, result in compiled.items():
        md = triton_aot.render_markdown(result, f"python benchmarks/triton_aot.py --arch {arch}")
        assert f"sm_{arch}: {len(result.variants)} distinct variants of {len(result.kernels_defined)} kernels" in md
        assert "| `se_forward_fused_kernel` |" in md


def test_resident_warps():
    h100 = triton_aot.ARCHS[90]
    assert h100.resident_warps(regs=32, smem=0, warps=4) == 64  # the 64-warp limit
    assert h100.resident_warps(regs=255, smem=0, warps=8) == 8  # 8192 registers a warp
    assert h100.resident_warps(regs=128, smem=0, warps=4) == 16
    assert h100.resident_warps(regs=16, smem=0, warps=1) == 32  # the 32-block limit
    assert h100.resident_warps(regs=32, smem=100 * 1024, warps=4) == 8  # 2 blocks of shared memory
    assert triton_aot.ARCHS[80].resident_warps(regs=32, smem=100 * 1024, warps=4) == 4


def test_target_leaves_the_driver_alone():
    """triton_aot.target() refuses under the interpreter (and touches nothing); elsewhere it
    puts the previous driver back."""
    pytest.importorskip("triton")
    from triton.runtime import driver

    before = driver._active
    if triton_aot.interpreter_active():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            with triton_aot.target(90):
                pass
    else:
        with triton_aot.target(90):
            assert driver.active.get_current_target().arch == 90
    assert driver._active is before


TRACE_SCRIPT = r'''
import sys, torch
sys.path.insert(0, "benchmarks")
import triton_aot
from se_kernels.ops import triton_error
assert triton_error() is None, triton_error()
from se_kernels.triton import launch, op
assert op.TRACEABLE, "the Triton ops are not triton_ops"
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._functorch.aot_autograd import aot_export_module
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
launch._SM_COUNT[0] = 132  # plan as on an H100/H200

# pointer arguments each kernel writes: anything else found mutated would be an input
WRITTEN = {"y_ptr", "mask_ptr", "pooled_ptr", "hidden_ptr", "logits_ptr", "partial_ptr", "gates_ptr",
           "dx_ptr", "dres_ptr", "dz1_ptr", "dz2_ptr", "dp_ptr", "dw1_ptr", "db1_ptr", "dw2_ptr", "db2_ptr",
           "counters_ptr"}

class Forward(torch.nn.Module):
    def forward(self, x, w1, b1, w2, b2, r):
        return tuple(torch.ops.se_kernels.triton_se_forward(x, w1, b1, w2, b2, r, "silu", "sigmoid", "relu"))

class Backward(torch.nn.Module):
    def forward(self, dy, x, w1, w2, pooled, hidden, logits, mask):
        return tuple(torch.ops.se_kernels.triton_se_backward(dy, x, w1, w2, pooled, hidden, logits, mask,
                                                            "silu", "sigmoid", "relu", True, True))

import os
with triton_aot.target(90):
    # the fused plan, the split plan, the streamed plan (a budget of 4 samples' x and mask)
    for shape in [(2, 16, 8, 8), (4, 256, 28, 28), (8, 256, 28, 28)]:
        n, c, h, w = shape
        if n == 8:
            os.environ["SE_KERNELS_STREAM_BUDGET"] = str(4 * (c * h * w * 4 + c * (h * w + 7) // 8))
        s = c // 4
        with FakeTensorMode():
            x = torch.empty(shape, device="cuda")
            params = [torch.empty(t, device="cuda") for t in [(s, c), (s,), (c, s), (c,)]]
            fwd, _ = aot_export_module(Forward(), (x, *params, torch.empty(shape, device="cuda")), trace_joint=False)
            outs = torch.ops.se_kernels.triton_se_forward(x, *params, x, "silu", "sigmoid", "relu")
            bwd, _ = aot_export_module(Backward(), (torch.empty(shape, device="cuda"), x, params[0], params[2],
                                                   *outs[1:]), trace_joint=False)
        for name, gm in (("forward", fwd), ("backward", bwd)):
            targets = [str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function"]
            kernels = [nd for nd in gm.graph.nodes if "triton_kernel_wrapper" in str(nd.target)]
            assert kernels, (shape, name, targets)
            names = [kernel_side_table.get_kernel(nd.kwargs["kernel_idx"]).fn.__name__ for nd in kernels]
            assert any("streamed" in k for k in names) == (n == 8), (shape, name, names)
            assert not any("se_kernels" in t for t in targets), (shape, name, targets)
            for nd in kernels:
                cloned = set(nd.kwargs["tensors_to_clone"])
                assert cloned <= WRITTEN, (shape, name, sorted(cloned - WRITTEN))
            print(shape, name, len(kernels), "kernels")
'''


def test_compiler_sees_the_triton_kernels():
    """On a GPU the Triton ops are torch.library.triton_ops: tracing them for torch.compile /
    AOTInductor (AOTAutograd's functionalisation, here on fake CUDA tensors with the stand-in
    sm_90 driver) yields the Triton kernels themselves, not an opaque op, and Triton's mutation
    analysis finds only the output pointers written (a dummy pointer aliasing an input, such as
    the unused relu-mask argument, must not be taken for a written one)."""
    if triton_aot.tools_missing() is not None:
        pytest.skip(f"no Triton compiler toolchain: {triton_aot.tools_missing()}")
    out = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], cwd=ROOT, env=triton_aot._clean_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-6000:]
    assert out.stdout.count("kernels") == 6, out.stdout
