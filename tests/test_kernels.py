"""The fused op on every CPU backend against the float64 reference: gradcheck, float32 and
reduced-precision accuracy of the output and of every gradient, odd shapes, layouts, poisoned
allocations, NaN propagation, launch-plan independence, determinism and saved memory."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import (
    ACTIVATIONS,
    CPU_BACKENDS,
    FUSED_CPU_BACKENDS,
    GATES,
    GRAD_NAMES,
    NATIVE_CPU,
    Case,
    assert_float32_matches,
    assert_low_precision_matches,
    float32_close,
    fresh_seed,
    magnitudes64,
    make_inputs,
    reference64,
    rel_err,
    run,
)

from se_kernels import available_backends, fused_se
from se_kernels.reference import se_reference

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

# (residual, out_activation)
EPILOGUES = [(False, None), (True, None), (True, "relu"), (False, "relu")]

# (shape, S): every size class the kernels treat differently.
ODD_SHAPES = [
    ((2, 1, 3, 3), 1),      # C = 1
    ((2, 3, 4, 5), 1),      # C = 3, S = 1
    ((3, 16, 1, 1), 4),     # H*W = 1 (walked as channels_last rows)
    ((2, 24, 1, 13), 5),    # prime H*W
    ((2, 40, 7, 7), 10),    # 49: vector body + scalar tail
    ((0, 16, 4, 4), 4),     # N = 0
    ((5, 37, 3, 2), 7),     # C and H*W not multiples of 8, H*W < 8
    ((1, 64, 8, 8), 4),     # N = 1: the split plan when there are 2+ threads
    ((9, 72, 4, 4), 6),     # short rows: groups of 8 rows and a remainder
    ((2, 8, 16, 16), 2),    # long rows (256)
    ((3, 130, 2, 4), 9),    # 130 channels: vector blocks + tail
    ((2, 3, 67, 67), 2),    # channels_last pooling over several pixel chunks (4489 pixels)
]


def _check_float32(backend: str, case: Case, seed: int) -> None:
    inputs = make_inputs(case, torch.float32, seed)
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(seed + 1))
    y, grads = run(fused_se, inputs, dy, case, backend=backend)
    y_ref, grads_ref = reference64(inputs, dy, case)
    where = f"backend={backend} {case} seed={seed}"
    assert y.dtype == torch.float32 and y.shape == case.shape, where
    for name in GRAD_NAMES:
        if inputs[name] is None:
            continue
        g = grads[name]
        assert g is not None and g.shape == inputs[name].shape and g.dtype == torch.float32, f"grad {name}: {where}"
    assert_float32_matches({"y": y, **{k: grads[k] for k in GRAD_NAMES if inputs[k] is not None}},
                           {"y": y_ref, **grads_ref}, inputs, dy, case, where)


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,squeeze", ODD_SHAPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_float32_odd_shapes(backend, channels_last, shape, squeeze, epilogue):
    i = ODD_SHAPES.index((shape, squeeze))
    case = Case(
        shape, squeeze, ACTIVATIONS[i % len(ACTIVATIONS)], GATES[i % len(GATES)], bias=i % 3 != 0,
        residual=epilogue[0], out_activation=epilogue[1], channels_last=channels_last,
    )
    _check_float32(backend, case, fresh_seed())


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_options(backend, activation, gate, epilogue, bias, channels_last):
    case = Case((4, 48, 5, 5), 12, activation, gate, bias, epilogue[0], epilogue[1], channels_last)
    _check_float32(backend, case, fresh_seed())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("shape,channels_last", [((2, 6, 3, 3), False), ((2, 10, 3, 2), True), ((3, 9, 1, 1), False)])
def test_gradcheck_float64(backend, activation, gate, epilogue, shape, channels_last):
    case = Case(shape, 3, activation, gate, True, epilogue[0], epilogue[1], channels_last)
    seed = fresh_seed()
    inputs = make_inputs(case, torch.float64, seed)
    names = [k for k in ("x", "w1", "b1", "w2", "b2", "residual") if inputs[k] is not None]
    tensors = tuple(inputs[k].clone().requires_grad_() for k in names)

    def fn(*args):
        kw = dict(zip(names, args))
        return fused_se(
            kw["x"], kw["w1"], kw["b1"], kw["w2"], kw["b2"], residual=kw.get("residual"), backend=backend,
            **case.options(),
        )

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, rtol=1e-4), f"{case} seed={seed}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case_index", range(4))
def test_reduced_precision(backend, dtype, channels_last, case_index):
    """Error against the float64 reference at most twice eager PyTorch's error in the same dtype,
    plus atol (relative to the largest reference value): the flash-attention test rule."""
    shape, squeeze = [((4, 64, 6, 6), 4), ((2, 40, 7, 7), 10), ((3, 24, 1, 1), 6), ((2, 130, 3, 5), 8)][case_index]
    epilogue = EPILOGUES[case_index]
    case = Case(shape, squeeze, ACTIVATIONS[case_index % len(ACTIVATIONS)], GATES[case_index % len(GATES)], True,
                epilogue[0], epilogue[1], channels_last)
    seed = fresh_seed()
    inputs = make_inputs(case, dtype, seed)
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y, grads = run(fused_se, inputs, dy, case, backend=backend)
    y_eager, grads_eager = run(se_reference, inputs, dy, case)
    y_ref, grads_ref = reference64(inputs, dy, case)
    outputs = {"y": y, **{k: grads[k] for k in GRAD_NAMES if inputs[k] is not None}}
    assert_low_precision_matches(outputs, {"y": y_eager, **grads_eager}, {"y": y_ref, **grads_ref}, dtype,
                                 f"{case} seed={seed}")


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    seed = fresh_seed()
    case = Case((3, 20, 6, 5), 5, "silu", "sigmoid", True, True, "relu")
    inputs = make_inputs(case, torch.float32, seed)
    # x and residual as strided views (every other channel of a wider tensor), weights transposed views
    wide = torch.randn(3, 40, 6, 5)
    wide[:, ::2] = inputs["x"]
    inputs["x"] = wide[:, ::2]
    inputs["residual"] = inputs["residual"].transpose(2, 3).contiguous().transpose(2, 3)
    inputs["w1"] = inputs["w1"].t().contiguous().t()
    assert not inputs["x"].is_contiguous() and not inputs["w1"].is_contiguous()
    dy = torch.randn(case.shape).transpose(0, 1).contiguous().transpose(0, 1)  # odd strides for grad_y
    y, grads = run(fused_se, inputs, dy, case, backend=backend)
    y_ref, grads_ref = reference64(inputs, dy, case)
    assert_float32_matches({"y": y, **grads}, {"y": y_ref, **grads_ref}, inputs, dy, case, f"seed={seed}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_layout_follows_input(backend, channels_last):
    case = Case((2, 16, 5, 5), 4, channels_last=channels_last)
    x = make_inputs(case, torch.float32, fresh_seed())
    y = fused_se(x["x"], x["w1"], x["b1"], x["w2"], x["b2"], backend=backend)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("out_activation", [None, "relu"])
def test_nan_propagates_like_reference(backend, gate, out_activation):
    case = Case((3, 16, 4, 4), 4, "silu", gate, out_activation=out_activation)
    inputs = make_inputs(case, torch.float32, fresh_seed())
    inputs["x"][1, 3, 2, 2] = float("nan")
    y = fused_se(inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], gate=gate,
                 activation="silu", out_activation=out_activation, backend=backend)
    y_ref = se_reference(inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"], gate=gate,
                         activation="silu", out_activation=out_activation)
    assert torch.isnan(y_ref[1]).all()
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


@NATIVE_CPU
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(6, 48, 7, 7), (5, 72, 4, 4), (3, 8, 40, 40), (4, 13, 5, 3)])
@pytest.mark.parametrize("out_activation", ["relu", None])
def test_results_do_not_depend_on_threads_or_batch(channels_last, shape, out_activation):
    """Per-sample results (y, grad_x, and the per-sample vectors) are bit-identical whatever the
    thread count and whichever other samples share the batch: the launch plan (per-sample tiles
    or split phases) changes only who computes, not the arithmetic. Without the relu, 7x7 and
    5x3 NCHW maps take the flat walk (13 * 15 odd: sample 1 starts unaligned in the batch)."""
    case = Case(shape, max(1, shape[1] // 4), "gelu", "sigmoid", True, True, out_activation, channels_last)
    inputs = make_inputs(case, torch.float32, fresh_seed())
    dy = torch.randn(shape)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(run(fused_se, inputs, dy, case, backend="cpu"))
        # sample 1 alone (a one-sample batch: the split plan when threads > 1)
        torch.set_num_threads(2)
        alone = {k: (v[1:2] if v is not None and v.dim() == 4 else v) for k, v in inputs.items()}
        y_alone, g_alone = run(fused_se, alone, dy[1:2], case, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    (y1, g1) = results[0]
    for y, g in results[1:]:
        assert torch.equal(y, y1)
        for k in GRAD_NAMES:
            assert torch.equal(g[k], g1[k]), k
    assert torch.equal(y_alone, y1[1:2])
    assert torch.equal(g_alone["x"], g1["x"][1:2])
    assert torch.equal(g_alone["residual"], g1["residual"][1:2])


# NCHW maps with H*W >= 8 not a multiple of 8 are walked flat (rows.h: walk_flat_rows); C * H*W
# odd here, so samples start unaligned. The last shape's y is 8.6 MB: streaming stores.
FLAT_SHAPES = [(5, 13, 7, 7), (3, 7, 3, 3), (4, 9, 14, 14), (4, 1023, 23, 23)]


def _packed_rows(positive: torch.Tensor) -> torch.Tensor:
    """The relu mask's format for NCHW x: per (n, c) row, bit i of byte i // 8 = element i > 0,
    each row padded with zero bits to whole bytes."""
    n, c, h, w = positive.shape
    bits = positive.reshape(n, c, h * w)
    bits = torch.nn.functional.pad(bits, (0, -(h * w) % 8)).reshape(n, c, -1, 8).to(torch.int64)
    return (bits << torch.arange(8)).sum(-1).to(torch.uint8)


@NATIVE_CPU
@pytest.mark.parametrize("shape", FLAT_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_flat_walk_relu_mask_and_gradients(shape, residual):
    """Without the relu epilogue these maps take the flat walk; with it (a relu mask to write)
    the row walk. Bit for bit, the one against the other on the same inputs: y_relu == relu(y);
    the relu mask is (y > 0) in its row format; grad_x with the relu is grad_x without it for dy
    masked by y > 0, and grad_residual that masked dy; the same for the ECA op's y and mask; and
    every result the same at 1, 2 and 3 threads (the tiled and the split plan)."""
    n, c = shape[:2]
    gen = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(shape, generator=gen)
    r = torch.randn(shape, generator=gen) if residual else None
    s = max(1, c // 4)
    w1, w2 = torch.randn(s, c, generator=gen) * 0.3, torch.randn(c, s, generator=gen) * 0.3
    taps = torch.randn(5, generator=gen)
    dy = torch.randn(shape, generator=gen)
    se = torch.ops.se_kernels

    def grads(out_activation, grad_y):
        xl = x.clone().requires_grad_()
        rl = r.clone().requires_grad_() if residual else None
        fused_se(xl, w1, None, w2, None, residual=rl, out_activation=out_activation, backend="cpu").backward(grad_y)
        return xl.grad, rl.grad if residual else None

    threads, results = torch.get_num_threads(), []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y = se.se_forward(x, w1, None, w2, None, r, "relu", "sigmoid", None)[0]
            y_relu, *_, mask = se.se_forward(x, w1, None, w2, None, r, "relu", "sigmoid", "relu")
            positive = y > 0
            assert torch.equal(y_relu, torch.relu(y)), t
            assert torch.equal(mask.reshape(n, c, -1), _packed_rows(positive)), t
            dx_relu, dres_relu = grads("relu", dy)
            masked = torch.where(positive, dy, torch.zeros_like(dy))
            dx_masked, _ = grads(None, masked)
            assert torch.equal(dx_relu, dx_masked), t
            if residual:
                assert torch.equal(dres_relu, masked), t
            eca, _ = se.ca_eca_forward(x, taps, None, 2, "sigmoid", r, False)
            eca_relu, eca_mask = se.ca_eca_forward(x, taps, None, 2, "sigmoid", r, True)
            assert torch.equal(eca_relu, torch.relu(eca)), t
            assert torch.equal(eca_mask.reshape(n, c, -1), _packed_rows(eca > 0)), t
            results.append((y_relu, mask, dx_relu, eca_relu))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@NATIVE_CPU
def test_backward_is_deterministic():
    case = Case((16, 64, 6, 6), 8, "silu", "hardsigmoid", True, True, "relu")
    inputs = make_inputs(case, torch.float32, fresh_seed())
    dy = torch.randn(case.shape)
    _, g1 = run(fused_se, inputs, dy, case, backend="cpu")
    _, g2 = run(fused_se, inputs, dy, case, backend="cpu")
    for k in GRAD_NAMES:
        assert torch.equal(g1[k], g2[k]), k


@NATIVE_CPU
@pytest.mark.parametrize("needs", ["x", "weights", "residual"])
def test_partial_requires_grad(needs):
    case = Case((3, 16, 5, 5), 4, "relu", "sigmoid", True, True, "relu")
    inputs = make_inputs(case, torch.float32, fresh_seed())
    leaves = {k: v.clone() for k, v in inputs.items()}
    wanted = {"x": ["x"], "weights": ["w1", "b1", "w2", "b2"], "residual": ["residual"]}[needs]
    for k in wanted:
        leaves[k].requires_grad_()
    y = fused_se(leaves["x"], leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"], residual=leaves["residual"],
                 out_activation="relu", backend="cpu")
    dy = torch.randn(case.shape)
    y.backward(dy)
    _, grads_ref = reference64(inputs, dy, case)
    assert_float32_matches({k: leaves[k].grad for k in wanted}, grads_ref, inputs, dy, case)
    for k in GRAD_NAMES:
        if k not in wanted:
            assert leaves[k].grad is None, k


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while fn() builds the graph."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@NATIVE_CPU
@pytest.mark.parametrize("out_activation", [None, "relu"])
def test_saves_only_x_small_vectors_and_mask(out_activation):
    n, c, h, w, s = 8, 64, 16, 16, 4
    x = torch.randn(n, c, h, w, requires_grad=True)
    r = torch.randn(n, c, h, w, requires_grad=True)
    w1, w2 = torch.randn(s, c, requires_grad=True), torch.randn(c, s, requires_grad=True)
    saved = _saved_bytes(lambda: fused_se(x, w1, None, w2, None, residual=r, out_activation=out_activation,
                                          backend="cpu"))
    x_bytes = x.numel() * 4
    small = (3 * n * c + n * s) * 4 + (w1.numel() + w2.numel()) * 4
    mask = n * c * ((h * w + 7) // 8) if out_activation else 0
    assert saved <= x_bytes + small + mask
    eager = _saved_bytes(lambda: se_reference(x, w1, None, w2, None, residual=r, out_activation=out_activation))
    assert saved < eager or out_activation is None


@NATIVE_CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_outputs(dtype, channels_last):
    """Outputs of 8 MiB and more are written with streaming stores: that path against the
    float64 reference."""
    shape = (4, 64, 96, 96) if dtype == torch.float32 else (8, 64, 96, 96)  # 9 MiB of y
    case = Case(shape, 8, "relu", "sigmoid", True, True, "relu", channels_last)
    seed = fresh_seed()
    inputs = make_inputs(case, dtype, seed)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    # The output relu's kink: among 2.4M outputs, one whose float64 value before the relu is within
    # float32 rounding of 0 can land on the other side in float32 (seed 1093749788: one such
    # element put dx 0.37 off, 15x the rounding floor). Where |pre-relu| < 1e-5, dy is 0: those
    # elements' gradients are ambiguous in float32, every other element is checked as before.
    pre64 = run(se_reference, {k: (v.double() if v is not None else None) for k, v in inputs.items()},
                dy.double(), replace(case, out_activation=None))[0]
    dy = torch.where(pre64.abs() < 1e-5, torch.zeros((), dtype=dtype), dy)
    y, grads = run(fused_se, inputs, dy, case, backend="cpu")
    y_ref, grads_ref = reference64(inputs, dy, case)
    if dtype == torch.float32:
        assert_float32_matches({"y": y, **grads}, {"y": y_ref, **grads_ref}, inputs, dy, case, f"seed={seed}")
        return
    assert rel_err(y, y_ref) < 1e-2
    for k in GRAD_NAMES:
        assert rel_err(grads[k], grads_ref[k]) < 1e-2, k


@pytest.mark.parametrize("activation,gate,x_error",
                         [("silu", "hardsigmoid", 1e-4), ("gelu", "sigmoid", 2e-3), ("hardswish", "sigmoid", 2e-3)])
@pytest.mark.parametrize("shape,squeeze", [((4, 48, 5, 5), 12), ((8, 20, 3, 3), 5)])
def test_float32_rule_rejects_wrong_gradients(shape, squeeze, activation, gate, x_error):
    """The condition-aware floor in float32_close is rounding-sized: weight gradients made of
    sample 0 alone (the other samples' terms missing), or x/residual gradients off by 1e-4
    relative (x_error), fail it. The floor on dx is 2-3e-5 of ||dx|| with silu/hardsigmoid on
    these shapes but 1-3e-4 with GELU or hardswish (their MLP term's magnitudes, and the
    evaluation magnitudes of helpers.EVALUATION_MAGNITUDES), so there x_error is 2e-3. (Batches
    of 4 and 8, so the missing terms are never negligible; with 2 samples one of them can
    legitimately contribute less than rounding.)"""
    case = Case(shape, squeeze, activation, gate, True, True, "relu")
    seed = fresh_seed()
    inputs = make_inputs(case, torch.float32, seed)
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(seed + 1))
    _, grads_ref = reference64(inputs, dy, case)
    magnitude = magnitudes64(inputs, dy, case)
    first = {k: (v[:1] if v is not None and v.dim() == 4 else v) for k, v in inputs.items()}
    _, grads_first = reference64(first, dy[:1], case)  # the weight gradients of sample 0 alone
    for name in ("w1", "b1", "w2", "b2"):
        assert float32_close(grads_ref[name].float(), grads_ref[name], magnitude[name])[0], name
        assert not float32_close(grads_first[name].float(), grads_ref[name], magnitude[name])[0], name
    for name in ("x", "residual"):
        wrong = grads_ref[name] * (1 + x_error * torch.randn_like(grads_ref[name]).sign())
        assert not float32_close(wrong.float(), grads_ref[name], magnitude[name])[0], name


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu")])  # triton: a tiny case
@pytest.mark.parametrize("channels_last", [False, True])
def test_hardswish_kinks_like_reference(backend, channels_last):
    """Hidden units exactly at hardswish's kinks (-3 and 3) and the gate logits exactly at
    hardsigmoid's: every gradient equals the reference's (aten: hardswish' is 0 at -3 and 1 at 3;
    hardsigmoid' 0 at both), in float64, where the hidden values are exact."""
    x = torch.zeros(2, 4, 3, 5, dtype=torch.float64)
    x[:, 0] = 1.0  # pooled: (1, 0, 0, 0) per sample
    w1 = torch.zeros(4, 4, dtype=torch.float64)
    w1[:, 0] = torch.tensor([-3.0, 3.0, -2.0, 2.0])  # hidden: -3, 3, -2, 2
    w2 = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    b2 = torch.tensor([0.0, 0.0, -3.0, 3.0], dtype=torch.float64)  # logits: 0, 3, -3, 3, all exact
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [t.clone().requires_grad_() for t in (x, w1, w2, b2)]
    refs = [t.clone().requires_grad_() for t in (x, w1, w2, b2)]
    dy = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(fresh_seed()))
    kw = dict(activation="hardswish", gate="hardsigmoid")
    y = fused_se(inputs[0], inputs[1], None, inputs[2], inputs[3], backend=backend, **kw)
    ref = se_reference(refs[0], refs[1], None, refs[2], refs[3], **kw)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y, inputs, dy)
    ref_grads = torch.autograd.grad(ref, refs, dy)
    # 1e-7: aten's float64 hardsigmoid backward multiplies by 1/6 rounded to float32 (3e-8 off);
    # a kink taken on the wrong side is off by O(1)
    for name, got, want in zip(("x", "w1", "w2", "b2"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=lambda m: f"grad {name}: {m}")  # noqa: B023 (called within this iteration)
