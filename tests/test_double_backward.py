"""Second-order gradients (create_graph=True): gradient penalties, Hessian-vector products,
MAML. The fused backward kernels are first-order only; with create_graph=True every fused
backend switches to the differentiable formula (se_kernels/differentiable.py), and a first-order
backward still runs the fused kernel. Nothing may return a silent zero: differentiating the
fused backward op itself raises."""

from __future__ import annotations

import pytest
import torch
from helpers import ACTIVATIONS, GATES, GRAD_NAMES, Case, fresh_seed, make_inputs, rel_err

from se_kernels import available_backends, fused_se
from se_kernels.reference import se_reference

# Every backend that runs CPU tensors here; triton only under TRITON_INTERPRET=1 (tiny shapes).
BACKENDS = available_backends("cpu")
FUSED = [b for b in BACKENDS if b != "torch"]

EPILOGUES = [(False, None), (True, None), (True, "relu")]


def leaves(inputs):
    return [inputs[k].clone().requires_grad_() if inputs[k] is not None else None for k in GRAD_NAMES]


def se_fn(backend, case):
    def fn(x, w1, b1, w2, b2, residual=None):
        if backend == "reference":
            return se_reference(x, w1, b1, w2, b2, residual=residual, **case.options())
        return fused_se(x, w1, b1, w2, b2, residual=residual, backend=backend, **case.options())

    return fn


def gradgradcheck(backend, case, seed, fast_mode=False):
    inputs = make_inputs(case, torch.float64, seed)
    args = [t for t in leaves(inputs) if t is not None]
    names = [k for k in GRAD_NAMES if inputs[k] is not None]
    fn = se_fn(backend, case)

    def call(*tensors):
        kw = dict(zip(names, tensors))
        return fn(kw["x"], kw["w1"], kw.get("b1"), kw["w2"], kw.get("b2"), kw.get("residual"))

    return torch.autograd.gradgradcheck(call, tuple(args), fast_mode=fast_mode, atol=1e-6, rtol=1e-4)


# Piecewise-linear functions (relu, hardswish's ends, hardsigmoid, the relu epilogue) have
# kinks where finite differences disagree with any derivative: the inputs are continuous
# random draws, so the chance of landing within gradgradcheck's eps (1e-6) of one is tiny.
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
def test_gradgradcheck_options(backend, activation, gate):
    shape = (2, 5, 3, 3) if backend != "triton" else (2, 4, 2, 3)
    case = Case(shape, 2, activation, gate, bias=True)
    seed = fresh_seed()
    assert gradgradcheck(backend, case, seed, fast_mode=backend == "triton"), f"seed={seed}"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("residual,out_activation", EPILOGUES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradgradcheck_epilogue_and_layout(backend, residual, out_activation, channels_last):
    # channels_last with an odd channel count exercises the relu mask's row padding.
    case = Case((2, 9, 2, 3), 3, "silu", "sigmoid", bias=not residual, residual=residual,
                out_activation=out_activation, channels_last=channels_last)
    seed = fresh_seed()
    assert gradgradcheck(backend, case, seed, fast_mode=backend == "triton"), f"seed={seed}"


def test_gradgradcheck_reference():
    """The torch backend is the reference itself: autograd differentiates it twice, except
    through F.hardsigmoid, whose backward PyTorch cannot differentiate (it raises; the fused
    backends give the exact second derivative there, checked above)."""
    seed = fresh_seed()
    assert gradgradcheck("torch", Case((2, 5, 3, 3), 2, "gelu", "sigmoid", residual=True, out_activation="relu"),
                         seed), f"seed={seed}"
    with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
        gradgradcheck("torch", Case((2, 5, 3, 3), 2, "relu", "hardsigmoid"), seed)


def gradient_penalty_grads(fn, inputs, dtype):
    """R1-style penalty: loss = ||d sum(y * v) / d x||^2; its gradient w.r.t. every input."""
    args = [t.to(dtype) if t is not None else None for t in leaves(inputs)]
    args = [t.detach().requires_grad_() if t is not None else None for t in args]
    x, w1, b1, w2, b2, residual = args
    y = fn(x, w1, b1, w2, b2, residual)
    v = torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)
    (gx,) = torch.autograd.grad((y * v).sum(), x, create_graph=True)
    penalty = gx.square().sum()
    wrt = [t for t in args if t is not None]
    grads = torch.autograd.grad(penalty, wrt, allow_unused=True)  # residual: unused without the relu
    return penalty.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, wrt)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("residual,out_activation", EPILOGUES)
def test_gradient_penalty_matches_reference(backend, residual, out_activation):
    """The second-order gradients of a gradient penalty, in float32, against the float64
    reference; and never all zero."""
    shape = (3, 16, 5, 5) if backend != "triton" else (2, 8, 3, 3)
    case = Case(shape, 4, "gelu", "sigmoid", residual=residual, out_activation=out_activation)
    seed = fresh_seed()
    inputs = make_inputs(case, torch.float64, seed)
    p_ref, g_ref = gradient_penalty_grads(se_fn("reference", case), inputs, torch.float64)
    p, g = gradient_penalty_grads(se_fn(backend, case), inputs, torch.float32)
    assert rel_err(p, p_ref) < 1e-4, f"seed={seed}"
    for ours, ref in zip(g, g_ref):
        assert ours.abs().max() > 0 or ref.abs().max() == 0, f"silent zero, seed={seed}"
        # float32 against float64 through two differentiations: a loose, host-independent bound
        assert rel_err(ours, ref) < 1e-3, f"rel err {rel_err(ours, ref):.3g}, seed={seed}"


@pytest.mark.parametrize("backend", FUSED)
def test_hessian_vector_product_float64(backend):
    """Hessian-vector product w.r.t. the weights via double backward, float64, equal to the
    reference's to rounding."""
    case = Case((2, 6, 3, 3), 3, "hardswish", "sigmoid", residual=True, out_activation="relu")
    seed = fresh_seed()
    inputs = make_inputs(case, torch.float64, seed)
    results = []
    for which in (backend, "reference"):
        x, w1, b1, w2, b2, residual = leaves(inputs)
        y = se_fn(which, case)(x, w1, b1, w2, b2, residual)
        loss = (y.square() * torch.linspace(0, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()
        grads = torch.autograd.grad(loss, (w1, w2), create_graph=True)
        vs = [torch.ones_like(t) for t in (w1, w2)]
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        results.append(torch.autograd.grad(dot, (x, w1, b1, w2, b2, residual), allow_unused=True))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12, msg=f"seed={seed}")


@pytest.mark.parametrize("backend", FUSED)
def test_first_order_keeps_the_fused_backward(backend):
    """Without create_graph the backward is the fused kernel (se_backward / triton_se_backward),
    and the differentiable formula does not run; with it, the other way round."""
    case = Case((2, 8, 3, 3), 2)
    x, w1, b1, w2, b2, _ = leaves(make_inputs(case, torch.float32, fresh_seed()))
    fused_name = "se_kernels::se_backward" if backend != "triton" else "se_kernels::triton_se_backward"

    def ops_called(create_graph):
        y = fused_se(x, w1, b1, w2, b2, backend=backend)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.autograd.grad(y.sum(), (x, w1), create_graph=create_graph)
        return {e.name for e in prof.events()}

    first = ops_called(False)
    assert fused_name in first and "se_kernels::se_backward_differentiable" not in first
    if backend != "triton":  # the Triton path calls the Python formula directly, not through the op
        second = ops_called(True)
        assert "se_kernels::se_backward_differentiable" in second and fused_name not in second


@pytest.mark.parametrize("backend", FUSED)
def test_differentiating_the_fused_backward_op_raises(backend):
    """The fused backward op has no derivative: calling it on tensors that need gradients and
    differentiating the result raises, never returns zeros."""
    case = Case((2, 8, 3, 3), 2)
    t = make_inputs(case, torch.float32, fresh_seed())
    op = torch.ops.se_kernels.se_forward if backend != "triton" else torch.ops.se_kernels.triton_se_forward
    bop = torch.ops.se_kernels.se_backward if backend != "triton" else torch.ops.se_kernels.triton_se_backward
    with torch.no_grad():
        y, pooled, hidden, logits, mask = op(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], None, "relu", "sigmoid", None)
    w1 = t["w1"].clone().requires_grad_()
    gy = torch.randn_like(y).requires_grad_()
    out = bop(gy, t["x"], w1, t["w2"], pooled, hidden, logits, mask, "relu", "sigmoid", None, True, False)
    with pytest.raises(RuntimeError, match="not (implemented|differentiable)"):
        torch.autograd.grad(out[1].sum(), (gy, w1))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("residual,out_activation", EPILOGUES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_create_graph_first_order_values(backend, activation, gate, residual, out_activation, channels_last):
    """gradgradcheck checks that the create_graph gradients are differentiated consistently; this
    checks their values in float64: equal to the fused first-order backward's to rounding, and to
    the reference's to 1e-7 (PyTorch's float64 hardsigmoid backward multiplies by a 1/6 rounded
    to float32, 3e-8 off: the reference itself is off by that much there)."""
    case = Case((2, 9, 3, 2), 3, activation, gate, residual=residual, out_activation=out_activation,
                channels_last=channels_last)
    seed = fresh_seed()
    inputs = make_inputs(case, torch.float64, seed)
    results = []
    for which, create_graph in ((backend, True), (backend, False), ("reference", False)):
        args = leaves(inputs)
        y = se_fn(which, case)(*args)
        dy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        wrt = [a for a in args if a is not None]
        results.append(torch.autograd.grad(y, wrt, dy, create_graph=create_graph))
    for name, ours, fused, ref in zip([k for k in GRAD_NAMES if inputs[k] is not None], *results):
        assert ours.grad_fn is not None or name == "residual", name  # d residual = dy: constant
        torch.testing.assert_close(ours, fused, rtol=1e-10, atol=1e-12, msg=f"{name} vs fused, seed={seed}")
        assert rel_err(ours, ref) < 1e-7, f"{name} vs reference: {rel_err(ours, ref):.3g}, seed={seed}"
