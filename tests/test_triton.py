"""The Triton backend against the float64 reference: on a GPU when there is one, else in
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py), on small shapes.
Both launch plans (fused: one program per sample; split: partial sums + excite + elementwise)
are exercised for every option, dtype and layout, the streamed plan (one persistent kernel) on
its own cases, plus odd sizes, NaN propagation, poisoned
allocations, determinism, opcheck and torch.compile; CUDA-graph capture needs a GPU.
tests/test_cuda.py runs the same checks (check(), capture_and_replay()) on the CUDA backend."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ACTIVATIONS,
    GATES,
    GRAD_NAMES,
    Case,
    assert_float32_matches,
    assert_low_precision_matches,
    fresh_seed,
    make_inputs,
    reference64,
    rel_err,
    run,
    stream_kept_bytes,
    temp_dir,
)

from se_kernels import available_backends, fused_se, ops
from se_kernels.reference import se_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif("triton" not in available_backends(DEVICE),
                       reason=f"triton backend: {ops.unavailable_reason('triton', DEVICE)}"),
    pytest.mark.usefixtures("poisoned_allocations"),
]

EPILOGUES = [(False, None), (True, None), (True, "relu"), (False, "relu")]


@pytest.fixture(params=["fused", "split"])
def plan(request, monkeypatch):
    """Forces the launch plan: "split" disables the one-program-per-sample kernels."""
    if request.param == "split":
        from se_kernels.triton import launch

        monkeypatch.setattr(launch, "FUSED_FORWARD_ELEMENTS", 0)
        monkeypatch.setattr(launch, "FUSED_BACKWARD_ELEMENTS", 0)
    return request.param


def to_device(inputs):
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in inputs.items()}


def check(case: Case, dtype: torch.dtype, seed: int, backend: str = "triton") -> None:
    """Output and every gradient of `backend` against the float64 reference."""
    inputs = to_device(make_inputs(case, dtype, seed))
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    y, grads = run(fused_se, inputs, dy, case, backend=backend)
    y_ref, grads_ref = reference64({k: (v.cpu() if v is not None else None) for k, v in inputs.items()}, dy.cpu(),
                                   case)
    where = f"{backend} {case} {dtype} seed={seed}"
    assert y.dtype == dtype and y.shape == case.shape and y.device.type == DEVICE, where
    pairs = [("y", y, y_ref)] + [(k, grads[k], grads_ref[k]) for k in GRAD_NAMES if inputs[k] is not None]
    if dtype in (torch.float32, torch.float64):
        if dtype == torch.float64:
            for name, out, ref in pairs:
                assert not torch.isnan(out).any(), f"NaN in {name} (unwritten?): {where}"
                assert rel_err(out.cpu(), ref) < 1e-5, f"{name}: rel err {rel_err(out.cpu(), ref):.3g} {where}"
            return
        assert_float32_matches({name: out for name, out, _ in pairs}, {name: ref for name, _, ref in pairs},
                               inputs, dy, case, where)
        return
    y_eager, grads_eager = run(se_reference, inputs, dy, case)
    assert_low_precision_matches({name: out for name, out, _ in pairs}, {"y": y_eager, **grads_eager},
                                 {name: ref for name, _, ref in pairs}, dtype, where)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_options(plan, activation, gate, channels_last):
    i = ACTIVATIONS.index(activation) + len(ACTIVATIONS) * GATES.index(gate)
    residual, out_activation = EPILOGUES[i % len(EPILOGUES)]
    case = Case((3, 24, 5, 7), 6, activation, gate, i % 3 != 0, residual, out_activation, channels_last)
    check(case, torch.float32, fresh_seed())


ODD = [
    ((2, 1, 3, 3), 1),     # C = 1, S = 1
    ((2, 3, 1, 13), 2),    # C = 3, prime H*W
    ((3, 16, 1, 1), 4),    # H*W = 1
    ((0, 8, 3, 3), 2),     # N = 0
    ((2, 37, 2, 3), 7),    # non-power-of-two C, H*W < 8
    ((2, 5, 19, 17), 3),   # 323 pixels: several tiles and splits
]


@pytest.mark.parametrize("shape,squeeze", ODD)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("epilogue", [(False, None), (True, "relu")])
def test_odd_sizes(plan, shape, squeeze, channels_last, epilogue):
    case = Case(shape, squeeze, "silu", "sigmoid", True, epilogue[0], epilogue[1], channels_last)
    check(case, torch.float32, fresh_seed())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reduced_precision(plan, dtype, channels_last):
    case = Case((2, 40, 6, 6), 10, "gelu", "hardsigmoid", True, True, "relu", channels_last)
    check(case, dtype, fresh_seed())


def test_float64(plan):
    check(Case((2, 12, 4, 5), 3, "hardswish", "sigmoid", True, True, "relu", True), torch.float64, fresh_seed())


@pytest.mark.parametrize("fast_mode", [False, True])
def test_gradcheck(fast_mode):
    """Full gradcheck on a tiny fused case; the fast (random-projection) mode on a split one."""
    shape = (2, 4, 2, 3) if not fast_mode else (2, 9, 11, 13)
    case = Case(shape, 2, "silu", "sigmoid", True, True, "relu", channels_last=fast_mode)
    seed = fresh_seed()
    inputs = to_device(make_inputs(case, torch.float64, seed))
    names = list(GRAD_NAMES)
    args = tuple(inputs[k].clone().requires_grad_() for k in names)

    def fn(x, w1, b1, w2, b2, residual):
        return fused_se(x, w1, b1, w2, b2, residual=residual, backend="triton", **case.options())

    assert torch.autograd.gradcheck(fn, args, fast_mode=fast_mode, atol=1e-6, rtol=1e-4), f"seed={seed}"


@pytest.mark.parametrize("gate", GATES)
def test_nan_propagates_like_reference(gate):
    case = Case((2, 16, 4, 4), 4, "relu", gate, out_activation="relu")
    inputs = to_device(make_inputs(case, torch.float32, fresh_seed()))
    inputs["x"][1, 2, 1, 1] = float("nan")
    y = fused_se(inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], gate=gate,
                 out_activation="relu", backend="triton")
    y_ref = se_reference(inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], gate=gate,
                         out_activation="relu")
    assert torch.isnan(y_ref[1]).all()
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


def test_deterministic_and_plans_agree(monkeypatch):
    case = Case((4, 24, 6, 6), 6, "gelu", "sigmoid", True, True, "relu")
    inputs = to_device(make_inputs(case, torch.float32, fresh_seed()))
    dy = torch.randn(case.shape, device=DEVICE)
    y1, g1 = run(fused_se, inputs, dy, case, backend="triton")
    y2, g2 = run(fused_se, inputs, dy, case, backend="triton")
    assert torch.equal(y1, y2) and all(torch.equal(g1[k], g2[k]) for k in GRAD_NAMES)
    from se_kernels.triton import launch

    monkeypatch.setattr(launch, "FUSED_FORWARD_ELEMENTS", 0)
    monkeypatch.setattr(launch, "FUSED_BACKWARD_ELEMENTS", 0)
    y3, g3 = run(fused_se, inputs, dy, case, backend="triton")
    assert rel_err(y3, y1) < 1e-6 and all(rel_err(g3[k], g1[k]) < 1e-6 for k in GRAD_NAMES)


@pytest.mark.parametrize("n", [33, 70])
def test_weight_grads_over_batch_chunks(n):
    """Over WGRAD_CHUNK (32) samples the weight gradients are summed per chunk of the batch by
    more programs, the chunks then added in order (se_sum_chunks_kernel): right in float32 and
    float64, and deterministic. float32: 16 samples a step (tl.dot; a chunk of 17 or 24 ends in a
    partial step), C = 12 and S = 4 in blocks of 16; float64: 4 samples a step, blocks of C and S."""
    from se_kernels.triton import launch

    case = Case((n, 12, 2, 3), 4, "hardswish", "sigmoid", True, False, None)
    g = launch.Geometry(torch.empty(case.shape, device="meta"), 4, out_relu=False)
    plan = launch.Plan(g, backward=True, sm_count=132)
    assert plan.wgrad_chunks == 2 + (n > 64) and "se_sum_chunks_kernel" in plan.grids
    assert (plan.wgrad_block_c, plan.wgrad_block_s, plan.wgrad_step) == (16, 16, 16)
    g64 = launch.Geometry(torch.empty(case.shape, device="meta", dtype=torch.float64), 4, out_relu=False)
    plan64 = launch.Plan(g64, backward=True, sm_count=132)
    assert (plan64.wgrad_block_c, plan64.wgrad_block_s, plan64.wgrad_step) == (16, 4, 4)
    # many (C block, S block) tiles: no more chunks than give each of the SMs a program (2 x 128
    # tiles of 64 x 32 for 132 SMs, not 8 chunks of 32 samples); the interpreter's sm_count 0: 8
    big = launch.Geometry(torch.empty((256, 2048, 7, 7), device="meta"), 128, out_relu=False)
    assert launch.Plan(big, backward=True, sm_count=132).wgrad_chunks == 2
    assert launch.Plan(big, backward=True, sm_count=0).wgrad_chunks == 8
    for dtype in (torch.float32, torch.float64):
        check(case, dtype, fresh_seed())
    inputs = to_device(make_inputs(case, torch.float32, fresh_seed()))
    dy = torch.randn(case.shape, device=DEVICE)
    _, g1 = run(fused_se, inputs, dy, case, backend="triton")
    _, g2 = run(fused_se, inputs, dy, case, backend="triton")
    assert all(torch.equal(g1[k], g2[k]) for k in ("w1", "b1", "w2", "b2"))


@pytest.mark.skipif(ops.extension_error() is not None, reason="needs se_kernels._C for se_forward's schema")
def test_schemas_match_the_native_ops():
    """The Triton ops are declared in Python; their schemas must stay se_forward/se_backward's."""
    for native, triton_op in [("se_forward", "triton_se_forward"), ("se_backward", "triton_se_backward")]:
        a = getattr(torch.ops.se_kernels, native).default._schema
        b = getattr(torch.ops.se_kernels, triton_op).default._schema
        assert [(x.name, str(x.type)) for x in a.arguments] == [(x.name, str(x.type)) for x in b.arguments]
        assert [str(x.type) for x in a.returns] == [str(x.type) for x in b.returns]


@pytest.mark.parametrize("out_activation", [None, "relu"])
def test_opcheck(out_activation):
    case = Case((2, 8, 3, 3), 2, "silu", "hardsigmoid", True, True, out_activation)
    t = to_device(make_inputs(case, torch.float32, fresh_seed()))
    args = (t["x"], t["w1"], t["b1"], t["w2"], t["b2"], t["residual"], "silu", "hardsigmoid", out_activation)
    torch.library.opcheck(torch.ops.se_kernels.triton_se_forward.default, args)
    grad_args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.se_kernels.triton_se_forward.default, grad_args)
    y, pooled, hidden, logits, mask = torch.ops.se_kernels.triton_se_forward(*args)
    bargs = (torch.randn_like(y), t["x"], t["w1"], t["w2"], pooled, hidden, logits, mask, "silu", "hardsigmoid",
             out_activation, True, True)
    torch.library.opcheck(torch.ops.se_kernels.triton_se_backward.default, bargs)


def test_compile_fullgraph():
    from se_kernels import FusedSE

    torch._dynamo.reset()
    m = FusedSE(16, 4, out_activation="relu", backend="triton").to(DEVICE)
    x = torch.randn(2, 16, 5, 5, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 16, 5, 5, device=DEVICE, requires_grad=True)
    compiled = torch.compile(lambda x, r: m(x, r).square().sum(), fullgraph=True)
    loss = compiled(x, r)
    loss.backward()
    gx = x.grad.clone()
    x.grad = None
    expected = m(x, r).square().sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)


def capture_and_replay(backend: str) -> None:
    """Forward and backward captured in a CUDA graph, replayed on new data: the output must
    be the reference's for the new data."""
    from se_kernels import FusedSE

    m = FusedSE(64, 4, out_activation="relu", backend=backend).cuda()
    x = torch.randn(8, 64, 14, 14, device="cuda", requires_grad=True)
    r = torch.randn(8, 64, 14, 14, device="cuda")
    dy = torch.randn(8, 64, 14, 14, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) on a side stream, as CUDA graphs require
        for _ in range(3):
            m(x, r).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        y = m(x, r)
        y.backward(dy)
    x.data.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    expected = se_reference(x.detach(), m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, residual=r,
                            out_activation="relu")
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay(plan):
    capture_and_replay("triton")


def streamed_counters_across_streams(backend: str, monkeypatch) -> None:
    """The streamed plan's counters buffer (one per device and stream, left zero by each launch's
    last program): launches on the current stream, on a side stream, captured in a CUDA graph
    (a fresh buffer there) and replayed, then on the current stream again, each one right against
    the reference. A launch that left its counters dirty would hand the next one on that stream
    wrong claims: unwritten outputs or a trap."""
    from se_kernels import FusedSE

    case = Case((12, 64, 7, 7), 4, "relu", "sigmoid", True, True, "relu", False)
    monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", str(4 * stream_kept_bytes(case, torch.float32)))
    m = FusedSE(64, 4, out_activation="relu", backend=backend).cuda()
    x = torch.randn(case.shape, device="cuda", requires_grad=True)
    r = torch.randn(case.shape, device="cuda")
    dy = torch.randn(case.shape, device="cuda")

    def expect(y):
        ref = se_reference(x.detach(), m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, residual=r,
                           out_activation="relu")
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)

    side = torch.cuda.Stream()
    for _ in range(2):
        expect(m(x, r))
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            y = m(x, r)
            y.backward(dy)
        torch.cuda.current_stream().wait_stream(side)
        expect(y)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        y = m(x, r)
        y.backward(dy)
    for _ in range(2):
        x.data.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        expect(y)
    expect(m(x, r))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_streamed_counters_across_streams(monkeypatch):
    streamed_counters_across_streams("triton", monkeypatch)


def aoti_package_matches_eager(backend: str, tmp_path) -> None:
    """torch.export + AOTInductor of a small network with a FusedSE (and the epilogue) on the
    GPU: the package's output equals eager's. The Triton backend's triton_op is compiled into
    the package; the CUDA backend's op is called through the dispatcher."""
    from se_kernels import FusedSE

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.se = FusedSE(32, 8, activation="silu", out_activation="relu", backend=backend)

        def forward(self, x):
            h = self.conv(x)
            return self.se(h, residual=h)

    model = Block().cuda().eval()
    x = torch.randn(4, 3, 20, 20, device="cuda")
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "block.pt2"))
        with temp_dir(tmp_path):
            runner = torch._inductor.aoti_load_package(path)
        x2 = torch.randn(4, 3, 20, 20, device="cuda")
        torch.testing.assert_close(runner(x2), model(x2), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AOTInductor for the GPU needs a GPU")
def test_aoti_package_gpu(tmp_path):
    aoti_package_matches_eager("triton", tmp_path)


# (N, C, H, W) at the edges of what a GPU holds: N up to 2^20, H*W up to 4096^2, C up to 8192.
LARGE_SHAPES = [(2**20, 8, 2, 2), (2**20, 64, 1, 1), (1, 16, 4096, 4096), (2, 8192, 7, 7), (1, 8192, 64, 64),
                (4, 2048, 4096, 4096), (1, 8192, 4096, 4096)]


@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_launch_plan_grid_limits(shape, channels_last, backward):
    """Every grid is 1-D (CUDA's y and z stop at 65535, x at 2^31 - 1), and the elementwise and
    channel-sum grids cover every (sample, channel block, pixel block) tile; checked on meta
    tensors as an H200 (132 SMs) would plan them. Offsets within a sample switch to int64
    (WIDE) when C*H*W reaches 2^31."""
    import triton

    from se_kernels.triton import launch

    x = torch.empty(shape, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = shape
    g = launch.Geometry(x, max(1, c // 16), out_relu=True)
    plan = launch.Plan(g, backward=backward, sm_count=132)
    for name, grid in plan.grids.items():
        assert len(grid) == 1 and 1 <= grid[0] <= launch.GRID_X_MAX, (name, grid)
    if not plan.fused:
        c_blocks = triton.cdiv(c, plan.block_c)
        elementwise = "se_grad_input_kernel" if backward else "se_scale_kernel"
        assert plan.grids[elementwise][0] == n * c_blocks * triton.cdiv(h * w, plan.block_l)
        assert plan.grids["channel_sums_kernel"][0] == n * c_blocks * plan.splits
        assert plan.splits * plan.per_split >= h * w and plan.per_split % plan.block_l == 0
    assert g.wide == (c * h * w >= 2**31)


# ---- the streamed plan (se_kernels/triton/kernels.py se_streamed_*_kernel) ---------------------

STREAM_CASES = [  # split-plan sizes (C x H*W padded over 8192 elements), small for the interpreter
    Case((9, 40, 16, 16), 10, "silu", "sigmoid", True, True, "relu", False),
    Case((7, 24, 20, 20), 6, "relu", "hardsigmoid", False, False, None, True),
    Case((11, 72, 9, 13), 20, "gelu", "sigmoid", True, True, "relu", True),
    # few channels, rows of 16-element multiples: the tile grows along the rows (16 x 512)
    Case((5, 12, 32, 32), 3, "relu", "sigmoid", True, True, "relu", False),
    # 14x14 rows (196 = 4 x 49): the kernels' ALIGN = 4 hints (channels_last C = 24 and 72 above: 8)
    Case((5, 40, 14, 14), 5, "silu", "sigmoid", True, True, "relu", False),
    # flat tiles (kernels.py _flat_tile): 7x7 rows, 200 channels in tiles of 164 rows (float32;
    # bfloat16: 160), a last tile of 36 (40); 3x3 rows, 520 channels in one tile (of up to 908 rows);
    # 7x7 with C = 150, no multiple of 16 bytes' elements: the element-by-element tiles
    Case((5, 200, 7, 7), 9, "relu", "sigmoid", True, True, "relu", False),
    Case((6, 520, 3, 3), 8, "silu", "hardsigmoid", False, False, None, False),
    Case((5, 150, 7, 7), 7, "gelu", "sigmoid", True, False, "relu", False),
]
# shape: (FLAT_L, the vector's BLOCK_C x BLOCK_L, rows a tile: float32, bfloat16); 2-byte types'
# forward without the relu mask: twice the vector's elements
FLAT_CASES = {(5, 200, 7, 7): (49, (128, 64), (164, 160)), (6, 520, 3, 3): (9, (512, 16), (520, 520)),
              (5, 150, 7, 7): (0, None, None)}


def _launched(monkeypatch) -> list:
    """The names of the kernels launch.py launches from now on."""
    from se_kernels.triton import launch

    names, real = [], launch._k

    def spy(kernel):
        names.append(getattr(kernel, "fn", kernel).__name__)
        return real(kernel)
    monkeypatch.setattr(launch, "_k", spy)
    return names


def _counters_left_zero() -> dict:
    """launch._stream_counters' kept buffers (key: data pointer), each all zero again after its
    launches (kernels.py _stream_finish, the weight gradients' last program of each tile): the next
    launch on the stream takes the buffer as it is."""
    from se_kernels.triton import launch

    assert launch._COUNTERS, "no streamed launch kept a counters buffer"
    for key, buffer in launch._COUNTERS.items():
        assert not buffer.any(), (key, buffer.nonzero().flatten().tolist())
    return {key: buffer.data_ptr() for key, buffer in launch._COUNTERS.items()}


def _case_id(case: Case) -> str:
    return "x".join(map(str, case.shape)) + ("-cl" if case.channels_last else "")


@pytest.mark.parametrize("case", [c for c in STREAM_CASES if c.shape in FLAT_CASES], ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_tiles_planned(case, dtype):
    """Which streamed plans take flat tiles: a vector of launch.STREAM_FLAT_ELEMENTS (twice that for
    2-byte types in the forward without the relu mask), as many whole rows as it holds, a multiple
    of 16 bytes' elements, at most C."""
    from se_kernels.triton import launch

    flat_l, block, rows = FLAT_CASES[case.shape]
    elem = torch.empty((), dtype=dtype).element_size()
    for backward in (False, True):
        x = torch.empty(case.shape, dtype=dtype, device="meta")
        g = launch.Geometry(x, case.squeeze, case.out_activation == "relu")
        p = launch.Plan(g, backward=backward, sm_count=132, budget=4 * stream_kept_bytes(case, dtype), elem=elem,
                        tensors=3)
        assert p.stream is not None
        if flat_l:
            vec = 16 // elem
            tile_rows = rows[elem == 2]
            assert p.stream_flat == (flat_l, vec, tile_rows, launch._pow2(tile_rows), 1)
            assert tile_rows % vec == 0 and tile_rows * flat_l <= p.stream_block_c * p.stream_block_l
            block_c = block[0] * (2 if elem == 2 and not backward and case.out_activation is None else 1)
            assert (p.stream_block_c, p.stream_block_l) == (min(block_c, launch._pow2(case.shape[1])), block[1])
        else:
            assert p.stream_flat == (0, 0, 0, 0, 1)


def test_flat_tiles_in_halves(monkeypatch):
    """bfloat16 forward with the relu mask: a doubled flat vector (16384 elements, 320 rows of 7x7)
    scaled in two halves of 160 rows (kernels.py _flat_scale_body PARTS = 2), where the rows
    allow; 336 channels: a second tile of 16 rows, its second half empty. Right against the
    float64 reference; the counters left zero."""
    from se_kernels.triton import launch

    case = Case((4, 336, 7, 7), 21, "relu", "sigmoid", True, True, "relu", False)
    meta = launch.Geometry(torch.empty(case.shape, dtype=torch.bfloat16, device="meta"), 21, out_relu=True)
    budget = 4 * stream_kept_bytes(case, torch.bfloat16)
    plan = launch.Plan(meta, backward=False, sm_count=132, budget=budget, elem=2, tensors=3)
    assert plan.stream is not None and plan.stream_flat == (49, 8, 320, 512, 2)
    assert (plan.stream_block_c, plan.stream_block_l) == (256, 64)
    # C = 200: 200 rows, no multiple of 16: one tile of the plain size
    small = launch.Geometry(torch.empty((4, 200, 7, 7), dtype=torch.bfloat16, device="meta"), 10, out_relu=True)
    plan = launch.Plan(small, backward=False, sm_count=132, budget=budget, elem=2, tensors=3)
    assert plan.stream_flat == (49, 8, 160, 256, 1)
    monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", str(budget))
    names = _launched(monkeypatch)
    check(case, torch.bfloat16, fresh_seed())
    assert "se_streamed_forward_kernel" in names, names
    _counters_left_zero()


@pytest.mark.parametrize("case", STREAM_CASES, ids=_case_id)
@pytest.mark.parametrize("fit", [4, 6])
def test_streamed_plan(monkeypatch, case, fit):
    """SE_KERNELS_STREAM_BUDGET of `fit` samples' kept bytes streams the batch (groups of one
    sample, lags 3-5, every stage's items in the interpreter's one-program order or, on a GPU,
    claimed by competing programs): the float64 reference's values, the split plan's (budget 0)
    up to rounding (the pixel sums are split per tile), the same bits twice."""
    seed = fresh_seed()
    names = _launched(monkeypatch)
    monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", str(fit * stream_kept_bytes(case, torch.float32)))
    check(case, torch.float32, seed)
    assert names.count("se_streamed_forward_kernel") == 1 and names.count("se_streamed_backward_kernel") == 1, names
    inputs = to_device(make_inputs(case, torch.float32, seed))
    dy = torch.randn(case.shape, device=DEVICE)
    streamed = run(fused_se, inputs, dy, case, backend="triton")
    buffers = _counters_left_zero()
    again = run(fused_se, inputs, dy, case, backend="triton")
    assert _counters_left_zero() == buffers  # the same buffers again, no new ones
    monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", "0")
    del names[:]
    split = run(fused_se, inputs, dy, case, backend="triton")
    assert "channel_sums_kernel" in names and not any("streamed" in n for n in names), names
    assert torch.equal(streamed[0], again[0])
    assert rel_err(streamed[0], split[0]) < 1e-5
    for k in GRAD_NAMES:
        if inputs[k] is not None:
            assert torch.equal(streamed[1][k], again[1][k]), k
            assert rel_err(streamed[1][k], split[1][k]) < 1e-5, k


def test_streamed_weight_grads_over_batch_chunks(monkeypatch):
    """Streamed, over WGRAD_CHUNK samples: the last program of each weight-gradient tile adds the
    chunks (no se_sum_chunks_kernel), right against the float64 reference, the same bits twice,
    and the split plan's values up to rounding."""
    case = Case((34, 40, 9, 16), 12, "silu", "sigmoid", True, False, None)
    names = _launched(monkeypatch)
    monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", str(5 * stream_kept_bytes(case, torch.float32)))
    check(case, torch.float32, fresh_seed())
    assert "se_streamed_backward_kernel" in names and "se_sum_chunks_kernel" not in names, names
    inputs = to_device(make_inputs(case, torch.float32, fresh_seed()))
    dy = torch.randn(case.shape, device=DEVICE)
    _, g1 = run(fused_se, inputs, dy, case, backend="triton")
    _counters_left_zero()  # the weight-gradient tiles' counters too
    _, g2 = run(fused_se, inputs, dy, case, backend="triton")
    monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", "0")
    del names[:]
    _, split = run(fused_se, inputs, dy, case, backend="triton")
    assert "se_sum_chunks_kernel" in names, names
    for k in ("w1", "b1", "w2", "b2"):
        assert torch.equal(g1[k], g2[k]), k
        assert rel_err(g1[k], split[k]) < 1e-5, k


@pytest.mark.parametrize("unroll, split_elements, split_block", [(4, 128, 1), (4, 512, 4), (2, 128, 2)])
def test_mlp_steps_and_split_blocks(monkeypatch, unroll, split_elements, split_block):
    """The MLP GEMMs with small products (launch.MLP_PRODUCT_ELEMENTS = 512) in steps of `unroll`
    chunks of C (4 channels each: 40 channels, the last step partly past C) and of S (2 hidden
    units each: 10), the partial sums' 5 pixel splits split_block at a time (the last block partly
    past them); split plan (launch.MLP_UNROLL = unroll) and streamed plan (4 chunks a step): the
    float64 reference's values, and the plans agree up to rounding."""
    from se_kernels.triton import launch

    monkeypatch.setattr(launch, "FUSED_FORWARD_ELEMENTS", 0)
    monkeypatch.setattr(launch, "FUSED_BACKWARD_ELEMENTS", 0)
    monkeypatch.setattr(launch, "MLP_PRODUCT_ELEMENTS", 512)
    monkeypatch.setattr(launch, "MLP_UNROLL", unroll)
    monkeypatch.setattr(launch, "MLP_SPLIT_ELEMENTS", split_elements)
    monkeypatch.setattr(launch, "sm_count", lambda device: 132)  # pixel splits in the interpreter too
    case = Case((5, 40, 24, 24), 10, "silu", "sigmoid", True, True, "relu", False)
    for backward in (False, True):
        p = launch.Plan(launch.Geometry(torch.empty(case.shape, device="meta"), 10, out_relu=True),
                        backward=backward, sm_count=132)
        assert (p.mlp_unroll_c, p.mlp_chunk_c, p.mlp_unroll_s, p.mlp_chunk_s) == (unroll, 4, unroll, 2)
        assert (p.splits, p.mlp_split_block) == (5, split_block)
    seed = fresh_seed()
    names = _launched(monkeypatch)
    check(case, torch.float32, seed)
    assert "se_hidden_kernel" in names and "se_dz1_kernel" in names, names
    inputs = to_device(make_inputs(case, torch.float32, seed))
    dy = torch.randn(case.shape, device=DEVICE)
    split = run(fused_se, inputs, dy, case, backend="triton")
    monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", str(4 * stream_kept_bytes(case, torch.float32)))
    del names[:]
    check(case, torch.float32, seed)
    assert "se_streamed_forward_kernel" in names and "se_streamed_backward_kernel" in names, names
    streamed = run(fused_se, inputs, dy, case, backend="triton")
    assert rel_err(streamed[0], split[0]) < 1e-5
    for k in GRAD_NAMES:
        if inputs[k] is not None:
            assert rel_err(streamed[1][k], split[1][k]) < 1e-5, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", [STREAM_CASES[0], STREAM_CASES[5], STREAM_CASES[6]], ids=_case_id)
def test_streamed_plan_dtypes(monkeypatch, dtype, case):
    monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", str(5 * stream_kept_bytes(case, dtype)))
    names = _launched(monkeypatch)
    check(case, dtype, fresh_seed())
    assert "se_streamed_forward_kernel" in names and "se_streamed_backward_kernel" in names, names


def test_stream_budget_variable(monkeypatch):
    monkeypatch.setenv("SE_KERNELS_STREAM_BUDGET", "lots")
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="SE_KERNELS_STREAM_BUDGET must be a byte count"):
        fused_se(x, torch.randn(2, 8, device=DEVICE), None, torch.randn(8, 2, device=DEVICE), None, backend="triton")
