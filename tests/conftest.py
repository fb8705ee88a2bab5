"""Shared helpers: input builders, the float64 oracle, error measures, poisoned allocations."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import pytest
import torch

# Without a GPU, the Triton kernels run (slowly) in Triton's interpreter on CPU tensors. The
# variable must be set before se_kernels imports Triton, so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from se_kernels import available_backends, ops  # noqa: E402
from se_kernels.reference import se_reference

# Backends that run CPU tensors here ("torch" always; "cpu" when se_kernels._C is built). The
# Triton interpreter is too slow for these sweeps: tests/test_triton.py covers it.
CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]
# The fused backends; "torch" is eager PyTorch itself (tested against torchvision and by
# float64 gradcheck), whose float32 rounding over long sums can exceed the 1e-5 rule.
FUSED_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]
NATIVE_CPU = pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason=f"se_kernels._C not built: {ops.extension_error()}")

ACTIVATIONS = ("relu", "silu", "gelu", "hardswish")
GATES = ("sigmoid", "hardsigmoid")
GRAD_NAMES = ("x", "w1", "b1", "w2", "b2", "residual")


def pytest_configure(config):
    # make test sets SE_KERNELS_REQUIRE_EXT=1: a build that silently failed must fail the run,
    # not skip every native-kernel test.
    if os.environ.get("SE_KERNELS_REQUIRE_EXT") == "1" and ops.extension_error() is not None:
        raise pytest.UsageError(f"SE_KERNELS_REQUIRE_EXT=1 but se_kernels._C did not load: {ops.extension_error()}")


@pytest.fixture
def poisoned_allocations():
    """Every torch.empty* is filled with NaN (deterministic mode), so an output element or a
    scratch buffer that a kernel forgets to write shows up as NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(previous)


@dataclass
class Case:
    shape: Tuple[int, int, int, int]
    squeeze: int
    activation: str = "relu"
    gate: str = "sigmoid"
    bias: bool = True
    residual: bool = False
    out_activation: Optional[str] = None
    channels_last: bool = False

    def options(self) -> dict:
        return dict(activation=self.activation, gate=self.gate, out_activation=self.out_activation)


def fresh_seed() -> int:
    """A new seed per check (fresh inputs every run); assertion messages print it."""
    return int.from_bytes(os.urandom(4), "little")


def make_inputs(case: Case, dtype: torch.dtype, seed: int) -> Dict[str, Optional[torch.Tensor]]:
    """Random inputs drawn in float64 and cast to dtype. Weights are scaled so the hidden layer
    and gate logits are O(1), where the activations and gates are not flat."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = case.shape
    s = case.squeeze
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) + 0.5
    t = {
        "x": x,
        "w1": torch.randn(s, c, generator=g, dtype=torch.float64) * (2.0 / c) ** 0.5,
        "b1": torch.randn(s, generator=g, dtype=torch.float64) * 0.5 if case.bias else None,
        "w2": torch.randn(c, s, generator=g, dtype=torch.float64) * (2.0 / s) ** 0.5,
        "b2": torch.randn(c, generator=g, dtype=torch.float64) * 0.5 if case.bias else None,
        "residual": torch.randn(n, c, h, w, generator=g, dtype=torch.float64) if case.residual else None,
    }
    out = {}
    for k, v in t.items():
        if v is None:
            out[k] = None
            continue
        v = v.to(dtype)
        if case.channels_last and v.dim() == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def run(fn, inputs: Dict[str, Optional[torch.Tensor]], dy: torch.Tensor, case: Case, **kw):
    """y and the gradients of every tensor input, for fn(x, w1, b1, w2, b2, residual=..., ...)."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y = fn(
        leaves["x"], leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"],
        residual=leaves["residual"], **case.options(), **kw,
    )
    y.backward(dy)
    grads = {k: (v.grad if v is not None else None) for k, v in leaves.items()}
    return y.detach(), grads


def reference64(inputs, dy, case: Case):
    """The oracle: the unfused reference in float64."""
    inputs64 = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    return run(se_reference, inputs64, dy.double(), case)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64 (0 when both are 0)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


# float32 unit roundoff, and how many of it (times magnitudes64's scale) a float32 result may
# be off by beyond DESIGN's 1e-5 relative rule. Over 18000 random cases (the odd shapes, every
# option and layout), the cpu kernels needed at most 2.5 and eager PyTorch in float32 2.6 (one
# GELU/hardsigmoid w2 gradient; all else below 0.8): 16 leaves a 6x margin and is still a
# rounding-sized floor (tests/test_kernels.py checks that it rejects a gradient missing one
# sample or off by 1e-4).
FLOAT32_U = 2.0 ** -24
ROUNDING_STEPS = 16


def magnitudes64(inputs, dy, case: "Case") -> Dict[str, torch.Tensor]:
    """For y and every gradient, the float64 scale that float32 rounding errors in it are
    relative to: each sum taken over the absolute values of its terms, and each factor that is
    a function of a rounded sum (h = act(u1), act'(u1), g, gate'(u2)) widened by how far that
    sum's own rounding can move it (first order: |f'| times the sum's magnitude). Where terms
    cancel (a one-element db1 that is the small difference of large per-sample terms, a u1
    near 0, an act'(u1) near a zero of GELU' or hardswish'), ||ref|| is far below this scale
    and a 1e-5 relative error is out of float32's reach, for eager PyTorch as for any kernel."""
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    x, w1, b1, w2, b2, r = (d(inputs[k]) for k in ("x", "w1", "b1", "w2", "b2", "residual"))
    gy = d(dy)
    w1, w2 = w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)
    from se_kernels.reference import ACTIVATIONS as ACT, GATES as GATE

    def first_derivative(fn, t):
        t = t.detach().requires_grad_()
        out = fn(t)
        (grad,) = torch.autograd.grad(out.sum(), t) if t.numel() else (torch.zeros_like(t),)
        return out.detach(), grad

    def derivatives(fn, t):
        """fn(t), fn'(t) and |fn''(t)|, elementwise, in float64; fn'' by central differences of
        fn' (PyTorch has no double backward for hardsigmoid), step 1e-6 (1 + |t|): within a
        step of a kink (relu, hardsigmoid, hardswish') it is large, as it should be there."""
        out, first = first_derivative(fn, t)
        step = 1e-6 * (1 + t.abs())
        second = (first_derivative(fn, t + step)[1] - first_derivative(fn, t - step)[1]) / (2 * step)
        return out, first, second.abs()

    hw = x.shape[2] * x.shape[3]
    p = x.mean((2, 3))
    u1 = p @ w1.t() + (b1 if b1 is not None else 0)
    h, dact, ddact = derivatives(ACT[case.activation], u1)
    u2 = h @ w2.t() + (b2 if b2 is not None else 0)
    g, dgate, ddgate = derivatives(GATE[case.gate], u2)
    y0 = x * g[:, :, None, None] + (r if r is not None else 0)
    mask = (y0 > 0).double() if case.out_activation == "relu" else torch.ones_like(y0)
    A = {}
    # forward
    ap = x.abs().mean((2, 3))
    au1 = ap @ w1.abs().t() + (b1.abs() if b1 is not None else 0)
    ah = h.abs() + dact.abs() * au1
    au2 = ah @ w2.abs().t() + (b2.abs() if b2 is not None else 0)
    ag = g.abs() + dgate.abs() * au2
    A["y"] = x.abs() * ag[:, :, None, None] + (r.abs() if r is not None else 0)
    # backward
    dyp = gy.abs() * mask
    adg = (dyp * x.abs()).sum((2, 3))
    adz = adg * (dgate.abs() + ddgate.abs() * au2)
    ada = (adz @ w2.abs()) * (dact.abs() + ddact.abs() * au1)
    A["x"] = dyp * ag[:, :, None, None] + ((ada @ w1.abs()) / hw)[:, :, None, None]
    A["w1"] = ada.t() @ ap
    A["b1"] = ada.sum(0)
    A["w2"] = adz.t() @ ah
    A["b2"] = adz.sum(0)
    A["residual"] = dyp
    return A


def float32_close(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> Tuple[bool, str]:
    """DESIGN.md's float32 rule, ||out - ref|| < 1e-5 ||ref||, plus a condition-aware floor:
    what float32 rounding can produce at the magnitudes the sums run through
    (ROUNDING_STEPS * u * ||magnitude||). Returns (ok, description)."""
    diff = (out.double() - ref.double()).norm().item()
    ref_norm = ref.double().norm().item()
    floor = ROUNDING_STEPS * FLOAT32_U * magnitude.reshape(out.shape).norm().item()
    ok = diff < 1e-5 * ref_norm + floor or diff == 0.0
    return ok, f"rel err {diff / ref_norm if ref_norm else diff:.3g} (|diff| {diff:.3g}, 1e-5|ref| {1e-5 * ref_norm:.3g}, rounding floor {floor:.3g})"


def assert_float32_matches(outputs: Dict[str, Optional[torch.Tensor]], refs: Dict[str, torch.Tensor], inputs, dy,
                           case: "Case", where: str = "") -> None:
    """Every float32 output named in `outputs` ("y" and gradient names; None entries skipped)
    against its float64 reference, by float32_close."""
    magnitude = magnitudes64({k: (v.cpu() if v is not None else None) for k, v in inputs.items()}, dy.cpu(), case)
    for name, out in outputs.items():
        if out is None:
            continue
        assert not torch.isnan(out).any(), f"NaN in {name} (unwritten output?): {where}"
        ok, msg = float32_close(out.cpu(), refs[name], magnitude[name])
        assert ok, f"{name}: {msg} {where}"


# The atol of the reduced-precision rule, relative to max |reference|.
LOW_PRECISION_ATOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3}


def assert_low_precision_matches(outputs: Dict[str, torch.Tensor], eager: Dict[str, torch.Tensor],
                                 refs: Dict[str, torch.Tensor], dtype: torch.dtype, where: str = "") -> None:
    """DESIGN.md's float16/bfloat16 rule (flash-attention's): max |out - ref| at most twice eager
    PyTorch's max |eager - ref| in the same dtype, plus LOW_PRECISION_ATOL, both relative to
    max |ref|, for every output named in `outputs`."""
    for name, out in outputs.items():
        ref = refs[name]
        assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype} {where}"
        scale = max(ref.abs().max().item(), 1e-30) if ref.numel() else 1.0
        ours, theirs = max_err(out.cpu(), ref) / scale, max_err(eager[name].cpu(), ref) / scale
        assert ours <= 2 * theirs + LOW_PRECISION_ATOL[dtype], f"{name}: error {ours:.3g} vs eager {theirs:.3g} {dtype} {where}"


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
