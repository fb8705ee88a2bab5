"""The CUDA C++ backend (csrc/cuda) on a GPU: the same checks as the Triton backend's
(tests/test_triton.py) against the float64 reference, odd sizes, every option, dtype and
layout, determinism, CUDA graphs. Skipped without a GPU or without CUDA kernels in
se_kernels._C; CI compiles csrc/cuda on every run, so a compile error fails it there."""

from __future__ import annotations

from typing import List

import pytest
import torch
from helpers import ACTIVATIONS, GATES, GRAD_NAMES, Case, fresh_seed, make_inputs, rel_err, run, stream_kept_bytes
from test_triton import (
    EPILOGUES,
    ODD,
    aoti_package_matches_eager,
    capture_and_replay,
    check,
    streamed_counters_across_streams,
    to_device,
)

from se_kernels import available_backends, fused_se, ops

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in available_backends("cuda"),
                       reason=f"cuda backend unavailable: {ops.unavailable_reason('cuda', 'cuda')}"),
    pytest.mark.usefixtures("poisoned_allocations"),
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_options(activation, gate, channels_last):
    i = ACTIVATIONS.index(activation) + len(ACTIVATIONS) * GATES.index(gate)
    residual, out_activation = EPILOGUES[i % len(EPILOGUES)]
    case = Case((3, 24, 5, 7), 6, activation, gate, i % 3 != 0, residual, out_activation, channels_last)
    check(case, torch.float32, fresh_seed(), backend="cuda")


@pytest.mark.parametrize("shape,squeeze", ODD + [((2, 256, 56, 56), 16), ((64, 512, 4, 4), 32)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("epilogue", [(False, None), (True, "relu")])
def test_odd_and_real_sizes(shape, squeeze, channels_last, epilogue):
    case = Case(shape, squeeze, "silu", "sigmoid", True, epilogue[0], epilogue[1], channels_last)
    check(case, torch.float32, fresh_seed(), backend="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtypes(dtype, channels_last):
    case = Case((4, 40, 9, 9), 10, "gelu", "hardsigmoid", True, True, "relu", channels_last)
    check(case, dtype, fresh_seed(), backend="cuda")


def test_gradcheck():
    case = Case((2, 6, 3, 4), 2, "silu", "sigmoid", True, True, "relu")
    inputs = to_device(make_inputs(case, torch.float64, fresh_seed()))
    args = tuple(inputs[k].clone().requires_grad_() for k in GRAD_NAMES)

    def fn(x, w1, b1, w2, b2, residual):
        return fused_se(x, w1, b1, w2, b2, residual=residual, backend="cuda", **case.options())

    assert torch.autograd.gradcheck(fn, args, atol=1e-6, rtol=1e-4)


def test_deterministic():
    case = Case((16, 128, 14, 14), 8, "relu", "sigmoid", True, True, "relu")
    inputs = to_device(make_inputs(case, torch.float32, fresh_seed()))
    dy = torch.randn(case.shape, device="cuda")
    y1, g1 = run(fused_se, inputs, dy, case, backend="cuda")
    y2, g2 = run(fused_se, inputs, dy, case, backend="cuda")
    assert torch.equal(y1, y2) and all(torch.equal(g1[k], g2[k]) for k in GRAD_NAMES)


def test_environment_variable_forces_cuda(monkeypatch):
    monkeypatch.setenv("SE_KERNELS_BACKEND", "cuda")
    calls = []
    real = ops._FORWARD_OPS["cuda"]
    monkeypatch.setitem(ops._FORWARD_OPS, "cuda", lambda: calls.append(1) or real())
    x = torch.randn(2, 8, 4, 4, device="cuda")
    y = fused_se(x, torch.randn(2, 8, device="cuda"), None, torch.randn(8, 2, device="cuda"), None)
    assert calls == [1] and y.shape == x.shape


def test_cuda_graph_capture_and_replay():
    capture_and_replay("cuda")


def test_streamed_counters_across_streams(monkeypatch):
    streamed_counters_across_streams("cuda", monkeypatch)


def test_agrees_with_triton():
    if "triton" not in available_backends("cuda"):
        pytest.skip("no triton")
    case = Case((8, 96, 10, 10), 6, "hardswish", "sigmoid", True, True, "relu", True)
    inputs = to_device(make_inputs(case, torch.float32, fresh_seed()))
    dy = torch.randn(case.shape, device="cuda")
    y1, g1 = run(fused_se, inputs, dy, case, backend="cuda")
    y2, g2 = run(fused_se, inputs, dy, case, backend="triton")
    assert rel_err(y1, y2) < 1e-5 and all(rel_err(g1[k], g2[k]) < 1e-5 for k in GRAD_NAMES)


def test_aoti_package_gpu(tmp_path):
    aoti_package_matches_eager("cuda", tmp_path)


@pytest.mark.parametrize("n,c,squeeze", [(33, 40, 10), (70, 40, 10), (129, 40, 10), (70, 2048, 160), (5, 72, 33)])
def test_weight_grads_over_batch_chunks(n, c, squeeze):
    """The weight gradients as 32 x 32 (channel, unit) tiles over the batch, 32 samples a step:
    few tiles split the batch into chunks whose sums weight_grads_sum_kernel adds in order (C = 40:
    2 tiles); 2048 x 160 (320 tiles) fills the GPU with one chunk of 70 samples (3 steps, the last
    partial); 72 x 33: partial tiles on both axes."""
    case = Case((n, c, 3, 3), squeeze, "hardswish", "sigmoid", True, False, None)
    check(case, torch.float32, fresh_seed(), backend="cuda")
    check(case, torch.float64, fresh_seed(), backend="cuda")


def _shifted(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t's values in a tensor of the same layout that starts one element into its storage."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    n, c, h, w = t.shape
    out = buf[1:].view(n, h, w, c).permute(0, 3, 1, 2) if channels_last else buf[1:].view(n, c, h, w)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unaligned_tensors_give_the_same_bits(dtype, channels_last):
    """The element-wise kernels use 16-byte accesses only when every tensor they touch is 16-byte
    aligned; tensors starting one element into their storage take the scalar path, which must
    compute the same bits (the same per-element math). 17x17 rows: longer than flat tiles take
    (their channel sums add in another order: test_flat_tiles)."""
    case = Case((3, 24, 17, 17), 6, "silu", "sigmoid", True, True, "relu", channels_last)
    inputs = to_device(make_inputs(case, dtype, fresh_seed()))
    dy = torch.randn(case.shape, device="cuda", dtype=dtype)
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    y, grads = run(fused_se, inputs, dy, case, backend="cuda")
    x = _shifted(inputs["x"], channels_last).requires_grad_()
    res = _shifted(inputs["residual"], channels_last).requires_grad_()
    assert x.data_ptr() % 16 != 0 and x.is_contiguous(memory_format=torch.channels_last if channels_last
                                                      else torch.contiguous_format)
    y2 = fused_se(x, inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], residual=res, backend="cuda",
                  **case.options())
    y2.backward(_shifted(dy, channels_last))
    assert torch.equal(y2, y)
    assert torch.equal(x.grad, grads["x"]) and torch.equal(res.grad, grads["residual"])


FLAT_CASES = [  # se_tiles.h flat tiles: NCHW, C a multiple of 16 bytes' elements, 8 (bf16) <= H*W <= 256
    Case((5, 56, 7, 7), 14, "silu", "sigmoid", True, True, "relu"),   # float32: tiles of 20, 20, 16 rows
    Case((3, 24, 14, 14), 6, "relu", "hardsigmoid", False, False, None),
    Case((4, 40, 3, 3), 10, "gelu", "sigmoid", True, True, "relu"),
]


@pytest.mark.parametrize("case", FLAT_CASES, ids=lambda c: "x".join(map(str, c.shape)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_flat_tiles(case, dtype):
    """Short NCHW rows (7x7, 14x14, 3x3) take flat tiles (flat_sums_kernel, flat_scale_kernel,
    flat_grad_input_kernel): against the float64 reference, and against the row tiles that the
    same values one element into their storage take (unaligned: no 16-byte accesses)."""
    seed = fresh_seed()
    check(case, dtype, seed, backend="cuda")
    inputs = to_device(make_inputs(case, dtype, seed))
    dy = torch.randn(case.shape, device="cuda", dtype=dtype)
    names = _kernel_names(lambda: run(fused_se, inputs, dy, case, backend="cuda"))
    for kernel in ("flat_sums_kernel", "flat_scale_kernel", "flat_grad_input_kernel"):
        assert any(kernel in n for n in names), (kernel, [n for n in names if "kernel" in n])
    y, grads = run(fused_se, inputs, dy, case, backend="cuda")
    x = _shifted(inputs["x"], False).requires_grad_()
    res = _shifted(inputs["residual"], False).requires_grad_() if inputs["residual"] is not None else None
    names = _kernel_names(lambda: fused_se(x, inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], residual=res,
                                           backend="cuda", **case.options()))
    assert not any("flat_" in n for n in names), [n for n in names if "kernel" in n]
    y2 = fused_se(x, inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], residual=res, backend="cuda",
                  **case.options())
    y2.backward(_shifted(dy, False))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)  # the channel sums' order differs
    assert rel_err(y2, y) < tol and rel_err(x.grad, grads["x"]) < tol
    if res is not None:
        assert rel_err(res.grad, grads["residual"]) < tol


@pytest.mark.parametrize("shape,squeeze", [((3, 13000, 1, 1), 40), ((17, 72, 2, 3), 37), ((9, 33, 4, 4), 70)])
def test_mlp_gemm_tiles(shape, squeeze):
    """The MLP runs as GEMMs over blocks of 8 samples x 32 outputs with 32-wide inner tiles: sample
    counts, C and S that are not multiples of 8 or 32, S > C, and C + S beyond what the former
    per-sample kernels could keep in 48 KiB of shared memory."""
    case = Case(shape, squeeze, "gelu", "hardsigmoid", True, False, None)
    check(case, torch.float32, fresh_seed(), backend="cuda")
    check(case, torch.float64, fresh_seed(), backend="cuda")


# ---- the streamed plan (csrc/cuda/se_stream.h): one persistent kernel per direction ---------------

def _kernel_names(fn) -> List[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


STREAM_CASES = [  # the 16-byte paths: H*W (NCHW) or C (channels_last) a multiple of 8 elements
    Case((37, 40, 4, 6), 10, "silu", "sigmoid", True, True, "relu", False),  # NCHW: flat tiles (H*W <= 256)
    Case((21, 64, 5, 5), 16, "relu", "hardsigmoid", False, False, None, True),
    Case((9, 200, 16, 16), 12, "gelu", "sigmoid", True, False, None, False),  # flat tiles
    Case((50, 136, 2, 4), 70, "hardswish", "sigmoid", True, True, "relu", True),
    Case((11, 24, 16, 20), 6, "silu", "sigmoid", True, True, "relu", False),  # NCHW row tiles (320 pixels)
    Case((13, 56, 7, 7), 14, "relu", "sigmoid", True, True, "relu", False),  # 7x7: flat tiles only
]


def _case_id(case: Case) -> str:
    return "x".join(map(str, case.shape)) + ("-cl" if case.channels_last else "")


@pytest.mark.parametrize("case", STREAM_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fit", [4, 11, 40])
def test_streamed_plan(monkeypatch, case, dtype, fit):
    """The streamed kernels (forced by a small L2 budget: `fit` samples' kept bytes; groups of
    1-5 samples, lags 3-39, partial last groups) against the float64 reference, and against the
    split plan (budget 0) on the same inputs; the profiler shows which kernels ran."""
    if fit >= case.shape[0]:
        pytest.skip("the whole batch fits: the split plan runs")
    seed = fresh_seed()
    inputs = to_device(make_inputs(case, dtype, seed))
    dy = torch.randn(case.shape, device="cuda", dtype=dtype)
    if case.channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    outs = {}
    for plan, budget in (("split", 0), ("streamed", fit * stream_kept_bytes(case, dtype))):
        monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", str(budget))
        names = _kernel_names(lambda: run(fused_se, inputs, dy, case, backend="cuda"))
        ran = any("streamed_forward_kernel" in n for n in names), any("streamed_backward_kernel" in n for n in names)
        assert ran == ((plan == "streamed"),) * 2, (plan, [n for n in names if "kernel" in n])
        if plan == "streamed":  # flat tiles (se_tiles.h flat_tiles_apply) or row tiles
            _, c, h, w = case.shape
            width = 16 // torch.empty((), dtype=dtype).element_size()
            flat = not case.channels_last and c % width == 0 and width <= h * w <= 256
            assert any("flat_streamed_forward_kernel" in n for n in names) == flat, names
        outs[plan] = run(fused_se, inputs, dy, case, backend="cuda")
        if plan == "streamed":
            check(case, dtype, seed, backend="cuda")
            again = run(fused_se, inputs, dy, case, backend="cuda")
            assert torch.equal(again[0], outs[plan][0]), "streamed forward not deterministic"
            assert all(torch.equal(again[1][k], outs[plan][1][k]) for k in GRAD_NAMES if inputs[k] is not None)
    (y1, g1), (y2, g2) = outs["split"], outs["streamed"]
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # the channel sums' pixel splits differ
    assert rel_err(y2, y1) < tol
    assert all(rel_err(g2[k], g1[k]) < tol for k in GRAD_NAMES if inputs[k] is not None)


def test_streamed_plan_budget_variable(monkeypatch):
    monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", "many")
    x = torch.randn(2, 8, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="SE_KERNELS_STREAM_BUDGET must be a byte count"):
        fused_se(x, torch.randn(2, 8, device="cuda"), None, torch.randn(8, 2, device="cuda"), None, backend="cuda")
