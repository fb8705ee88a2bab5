"""fused_channel_attention (se_kernels/attention.py), the generic channel-attention path, on the
backends that run CPU tensors here: "cpu" (the stage ops ca_pool / ca_scale / ca_gate_grad /
ca_input_grad of csrc/cpu/channel_attention.cpp inside an autograd.Function) and "torch" (the
unfused composition, `_reference`).

Every check draws fresh random inputs (seed in the message) and compares against the "torch"
backend run in float64 on the same (rounded) values, for y and the gradients of x, the residual
and every parameter of the excitation (`check_against_reference`, `_assert_close`):

- float64: relative error <= 1e-12 (and torch.autograd.gradcheck);
- float32: relative error <= 1e-5 (docs/design.md's relative rule; its magnitudes64 floor is
  SE-specific and does not apply to an arbitrary excitation);
- float16/bfloat16: docs/design.md's rule, max error at most twice eager PyTorch's own error in
  that dtype plus an atol (helpers.LOW_PRECISION_ATOL), relative to max |ref|.

Where the plain rule fails the quantity may be ill-conditioned rather than wrong: the gradients
through a train-mode BatchNorm over a few samples, the 1-3 elements of a C = 1 MLP's or an ECA
convolution's weight gradient (sums over the batch with cancellation). Then the case is re-run
on nearby inputs (`rolled_errors`, in the manner of docs/design.md's whole-model rule) and the
best error of ours over ROLLS inputs must be within FLOAT32_FACTOR (float32) / 2 (float16,
bfloat16) of eager PyTorch's rms error in the same dtype (plus the rtol / atol), and a float64
error within FLOAT64_PER_FLOAT32_ERROR of eager float32's rms error. A wrong result is wrong in
every roll. A gradient the float64 reference shows to be analytically zero (fc1's bias in front
of a train-mode BatchNorm: the batch mean removes it) is measured against the largest quantity.

With the relu epilogue a result in a lower precision may take the other relu decision where the
pre-activation is within its rounding of 0, moving that element's gradient by |dy * g|: the
reference then takes the result's decisions, after checking that they differ from its own only
near 0 (`reference64`).

Measured over 130000 random cases (every excitation, dtype, layout, squeeze, epilogue, shape
class): no failure (before the rolls and the relu decisions were taken into account, about 1 in
1000 cases failed on rounding alone, eager PyTorch failing the plain float32 rule as often).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_BACKENDS, LOW_PRECISION_ATOL, NATIVE_CPU, fresh_seed, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from se_kernels import available_backends, ops
from se_kernels.attention import fused_channel_attention

# The generic path's backends that run CPU tensors here ("cpu" needs se_kernels._C).
CA_BACKENDS = [b for b in CPU_BACKENDS if b in ("cpu", "torch")]
# The GPU backends that can run here (none without a GPU): every one has stage kernels.
GPU_BACKENDS = [b for b in ("triton", "cuda") if torch.cuda.is_available() and b in available_backends("cuda")]
SQUEEZES = ("avg", "avg_max")
# (residual, out_activation)
EPILOGUES = [(False, None), (True, None), (True, "relu"), (False, "relu")]
LAYOUTS = ("nchw", "channels_last", "strided")
FLOAT64_RTOL = 1e-12
FLOAT32_RTOL = 1e-5
# The ill-conditioned fallback (module docstring, `rolled_errors`): how many inputs, how far apart
# (relative), by what factor float32's best error may exceed eager float32's rms error, and how
# many float64 roundings per float32 rounding (2^-53 / 2^-24) of eager float32's rms error a
# float64 result may be off by.
ROLLS = 5
ROLL_SIZE = 2.0 ** -6
FLOAT32_FACTOR = 4
FLOAT64_PER_FLOAT32_ERROR = 64 * 2.0 ** -29


# ---- excitations -------------------------------------------------------------------------


class ECA(nn.Module):
    """ECA-Net: a 1-D convolution over the channel axis of the pooled vector, then sigmoid."""

    def __init__(self, channels: int, k: int):
        super().__init__()
        assert k % 2 == 1
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, p):
        return torch.sigmoid(self.conv(p.unsqueeze(1)).squeeze(1))


class ESE(nn.Module):
    """VoVNet's effective SE: one Linear C -> C, then hardsigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, p):
        return F.hardsigmoid(self.fc(p))


class MLP(nn.Module):
    """SE's two-layer MLP, optionally with BatchNorm1d between fc1 and the activation (timm's
    SEModule with a norm layer)."""

    def __init__(self, channels: int, act: nn.Module, bn: bool = False):
        super().__init__()
        s = max(1, channels // 4)
        self.fc1 = nn.Linear(channels, s)
        self.bn = nn.BatchNorm1d(s) if bn else nn.Identity()
        self.act = act
        self.fc2 = nn.Linear(s, channels)

    def forward(self, p):
        return torch.sigmoid(self.fc2(self.act(self.bn(self.fc1(p)))))


class Conv4d(nn.Module):
    """torchvision's SqueezeExcitation layers on the pooled (N, C, 1, 1): returns (N, C, 1, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        s = max(1, channels // 4)
        self.fc1 = nn.Conv2d(channels, s, 1)
        self.fc2 = nn.Conv2d(s, channels, 1)

    def forward(self, p):
        return torch.sigmoid(self.fc2(F.silu(self.fc1(p[:, :, None, None]))))


EXCITATIONS: Dict[str, Callable[[int], Callable]] = {
    "eca3": lambda c: ECA(c, 3),
    "eca5": lambda c: ECA(c, 5),
    "ese": ESE,
    "se_bn_train": lambda c: MLP(c, nn.ReLU(), bn=True).train(),
    "se_bn_eval": lambda c: MLP(c, nn.ReLU(), bn=True).eval(),
    "se_leaky": lambda c: MLP(c, nn.LeakyReLU(0.1)),
    "se_mish": lambda c: MLP(c, nn.Mish()),
    "se_gelu_tanh": lambda c: MLP(c, nn.GELU(approximate="tanh")),
    "sigmoid_fn": lambda c: torch.sigmoid,
    "conv_4d": Conv4d,
}
# BatchNorm in train mode needs two or more samples (as in eager PyTorch), and over exactly two
# it is degenerate: each feature becomes +-1/sqrt(1 + eps/var) whatever the input, its gradient
# to fc1 is eps-driven (var/eps, some 10^4, times smaller than its terms) and float32's error
# there depends on which way each pooled value was rounded, not on the kernels; the accuracy
# checks use three or more samples (gradcheck also runs two).
NEEDS_BATCH = {"se_bn_train"}
MIN_BATCH = 3


def make_excite(kind: str, channels: int, seed: int):
    """An excitation with parameters drawn from `seed`, scaled so that its activations and
    gates work away from their flat parts (and, for BatchNorm in eval mode, with running stats
    that are not the identity)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        excite = EXCITATIONS[kind](channels)
        if isinstance(excite, nn.Module):
            with torch.no_grad():
                for name, p in excite.named_parameters():
                    if name.startswith("bn."):
                        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
                    elif p.dim() >= 2:
                        p.copy_(torch.randn_like(p) * 1.5 / math.sqrt(p[0].numel()))
                    else:
                        p.copy_(torch.randn_like(p) * 0.5)
                for name, b in excite.named_buffers():
                    if name == "bn.running_mean":
                        b.copy_(0.3 * torch.randn_like(b))
                    elif name == "bn.running_var":
                        b.copy_(0.5 + torch.rand_like(b))
    return excite


def excite_copy(excite, dtype: torch.dtype):
    """An independent copy of the excitation in dtype (its own parameters, gradients, stats)."""
    return copy.deepcopy(excite).to(dtype) if isinstance(excite, nn.Module) else excite


# ---- inputs and runs ---------------------------------------------------------------------


def make_x(shape, dtype, layout: str, seed: int, offset: float = 0.5, ties: bool = False) -> torch.Tensor:
    """x drawn in float64 and rounded to dtype, in the given layout ("strided": a
    non-contiguous view, every other element of a wider tensor along W). ties: x rounded to a
    few values, so that maxima are tied."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + offset
    if ties:
        x = torch.round(x * 2) / 2
    x = relayout(x.to(dtype), layout)
    if layout == "strided":
        assert x.numel() == 0 or shape[3] == 1 or not x.is_contiguous()
    return x


def run_ca(excite, x, dy, residual=None, *, squeeze="avg", out_activation=None, backend="cpu",
           grad_x=True, grad_residual=True, grad_params=True, mask=None) -> Dict[str, Optional[torch.Tensor]]:
    """y and the gradients of x, the residual and every parameter of excite ("p.<name>") after
    y.backward(dy). excite is used as it is (pass a copy). mask: y is multiplied by it (the
    reference with given relu decisions, see `reference64`)."""
    xl = x.detach().requires_grad_(grad_x)  # a new leaf with x's strides (a view of it when x is one)
    rl = residual.detach().requires_grad_(grad_residual) if residual is not None else None
    params = dict(excite.named_parameters()) if isinstance(excite, nn.Module) else {}
    for p in params.values():
        p.requires_grad_(grad_params)
        p.grad = None
    y = fused_channel_attention(xl, excite, squeeze=squeeze, residual=rl, out_activation=out_activation,
                                backend=backend)
    if mask is not None:
        y = y * mask
    out = {"y": y.detach()}
    if y.requires_grad:
        y.backward(dy)
    out["x"] = xl.grad
    if rl is not None:
        out["residual"] = rl.grad
    for name, p in params.items():
        out[f"p.{name}"] = p.grad
    return out


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in the given layout (make_x's)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        n, c, h, w = t.shape
        wide = torch.zeros(n, c, h, 2 * w, dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


# How far from 0 (relative to max |x * g + residual|) the float64 pre-activation of an element
# may be where a result in that dtype takes the other relu decision: its gates, computed by the
# excitation in that dtype, are off by that dtype's rounding (amplified by the excitation; see
# `reference64` for the wider band of an excitation that amplifies it much).
RELU_BAND = {torch.float32: 1e-4, torch.bfloat16: 0.05, torch.float16: 0.01}


def _f64(t):
    return t.double() if t is not None else None


def reference64(excite, x, dy, r, kw, y_out=None, where=""):
    """The float64 reference (the "torch" backend) on the values of x, dy and r. With the relu
    epilogue and y_out (a result in a lower precision) given: the reference that takes y_out's
    relu decisions (y_out > 0), after checking that y_out differs from the reference's own
    decisions only where the pre-activation is within RELU_BAND of 0. A decision that rounding
    can flip moves that element's gradient by |dy * g|, far beyond any tolerance, and the
    reduced-precision rule (twice eager's error) cannot tell a rounding flip from a wrong mask
    bit; this way a wrong bit far from 0 fails, and the gradients are compared as what they
    are, the gradients of the function on the side of the kink the result is on. Returns
    (the quantities, the excitation copy it ran with)."""
    ref_excite = excite_copy(excite, torch.float64)
    if y_out is None or kw["out_activation"] != "relu" or y_out.dtype == torch.float64:
        return run_ca(ref_excite, _f64(x), _f64(dy), _f64(r), backend="torch", **kw), ref_excite
    with torch.no_grad():
        lin = fused_channel_attention(_f64(x), excite_copy(excite, torch.float64), squeeze=kw["squeeze"],
                                      residual=_f64(r), backend="torch")
    decisions = y_out > 0
    # A positive pre-activation below the dtype's smallest normal number may underflow to y = 0:
    # eager's relu then passes no gradient (it masks by its output), the kernels' relu bits
    # (taken before rounding) do, as the float64 reference does. There the reference keeps its
    # own decision: the kernels agree with it, eager's gradient is off by |dy * g|.
    underflow = (y_out == 0) & (lin.abs() <= torch.finfo(y_out.dtype).tiny)
    decisions = torch.where(underflow, lin > 0, decisions)
    band = RELU_BAND[y_out.dtype] * (lin.abs().max().item() if lin.numel() else 0.0)
    if lin.numel():
        # and at least 4x as far as eager's own pre-activation is off (an excitation that
        # amplifies rounding, a train-mode BatchNorm over 3 samples in bfloat16, moves its gates
        # by more than RELU_BAND)
        with torch.no_grad():
            lin_low = fused_channel_attention(x, excite_copy(excite, y_out.dtype), squeeze=kw["squeeze"],
                                              residual=r, backend="torch")
        band = max(band, 4 * (lin_low.double() - lin).abs().max().item())
    wrong = (decisions != (lin > 0)) & (lin.abs() > band)
    assert not wrong.any(), (f"relu decision of {int(wrong.sum())} elements wrong, e.g. pre-activation "
                             f"{lin[wrong][0].item():.4g} gives y {y_out[wrong][0].item():.4g} {where}")
    lin_kw = dict(kw, out_activation=None)
    return run_ca(ref_excite, _f64(x), _f64(dy), _f64(r), backend="torch", mask=decisions.double(),
                  **lin_kw), ref_excite


def _errors(out, refs, dtype) -> Dict[str, float]:
    """Per quantity: the relative error ||out - ref|| / ||ref|| (float32), or max |out - ref| /
    max |ref| (float16/bfloat16, the reduced-precision rule's measure); an analytic zero (a
    reference below 1e-9 of the largest quantity: fc1's bias in front of a train-mode
    BatchNorm) is measured against the largest quantity instead of itself."""
    low = dtype in (torch.float16, torch.bfloat16)
    size = {n: (t.double().abs().max().item() if low else t.double().norm().item())
            for n, t in refs.items() if t is not None and t.numel()}
    norms = {n: t.double().norm().item() for n, t in refs.items() if t is not None and t.numel()}
    biggest, biggest_size = max(norms.values(), default=0.0), max(size.values(), default=0.0)
    errs = {}
    for name in size:
        scale = max(biggest_size if norms[name] <= 1e-9 * biggest else size[name], 1e-300)
        t, o = refs[name].double(), out[name].double()
        errs[name] = ((o - t).abs().max().item() if low else (o - t).norm().item()) / scale
    return errs


def rolled_errors(excite, x, dy, r, kw, backend, layout, seed, dtype) -> Dict[str, Tuple[float, float]]:
    """How well `dtype` itself can do on this case: over ROLLS inputs (x, dy and r themselves,
    then nearby copies: each (n, c) row of x scaled by its own 1 + ROLL_SIZE z, which keeps its
    ties and its max where they are, and dy and r moved elementwise as much), the errors
    (`_errors`) of `backend` and of eager PyTorch (the "torch" backend), both in dtype, each
    against the float64 reference of the same inputs (taking the result's relu decisions,
    `reference64`). Returns per quantity (the best of `backend`'s errors, the root mean square
    of eager's). One draw of rounding errors is no yardstick where a quantity has a few
    elements that are sums with cancellation (a 2-element BatchNorm weight gradient, a 1x1
    fc1): there ours and eager are each off by a different few ulps of its terms, and moving
    the inputs by an ulp does not re-draw which (the pooled vector's rounding stays the same),
    hence the larger moves. A wrong result is wrong in every roll, so its best error shows it."""
    g = torch.Generator().manual_seed(seed + 2)

    def roll(t, k, rows=False):
        if t is None:
            return None
        if k:
            shape = (t.shape[0], t.shape[1], 1, 1) if rows else t.shape
            t = t.double() * (1 + ROLL_SIZE * torch.randn(shape, generator=g, dtype=torch.float64))
        return relayout(t.to(dtype), layout)

    ours_errs: Dict[str, list] = {}
    eager_errs: Dict[str, list] = {}
    for k in range(ROLLS):
        xk, dyk, rk = roll(x, k, rows=True), roll(dy, k), roll(r, k)
        for b, acc in (("torch", eager_errs), (backend, ours_errs)):
            out = run_ca(excite_copy(excite, dtype), xk, dyk, rk, backend=b, **kw)
            for name, e in _errors(out, reference64(excite, xk, dyk, rk, kw, out["y"])[0], dtype).items():
                acc.setdefault(name, []).append(e)
    return {name: (min(ours_errs[name]), math.sqrt(sum(e * e for e in eager_errs[name]) / ROLLS))
            for name in ours_errs}


def _assert_close(outs, refs, dtype, where, eager=None, eager_refs=None, rolled=None) -> None:
    """Every quantity of `refs` in `outs` by the rule of its dtype (module docstring). rolled():
    `rolled_errors` (of float32 for a float64 case), asked for only where the plain rule fails."""
    assert set(outs) == set(refs), f"{sorted(outs)} vs {sorted(refs)} {where}"
    low = dtype in (torch.float16, torch.bfloat16)
    ours_errs = _errors(outs, refs, dtype if dtype != torch.float64 else torch.float32)
    eager_errs = _errors(eager, eager_refs, dtype) if low else {}
    errors = None
    for name, ref in refs.items():
        out = outs[name]
        if ref is None:
            assert out is None, f"{name}: a gradient where the reference has none {where}"
            continue
        assert out is not None, f"{name}: no gradient {where}"
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)} {where}"
        assert out.dtype == dtype, f"{name}: dtype {out.dtype} {where}"
        if ref.numel() == 0:
            continue
        assert not (torch.isnan(out) & ~torch.isnan(ref)).any(), f"{name}: NaN (unwritten output?) {where}"
        ours = ours_errs[name]
        if low:
            theirs, atol = eager_errs[name], LOW_PRECISION_ATOL[dtype]
            if ours <= 2 * theirs + atol:
                continue
            errors = errors if errors is not None else rolled()
            best, eager_rms = errors[name]
            assert best <= 2 * eager_rms + atol, (f"{name}: error {ours:.3g} vs eager {theirs:.3g}, and over "
                                                  f"{ROLLS} rolls best {best:.3g} vs eager rms {eager_rms:.3g} "
                                                  f"{dtype} {where}")
            continue
        rtol = FLOAT64_RTOL if dtype == torch.float64 else FLOAT32_RTOL
        if ours <= rtol:
            continue
        # ill-conditioned: within what float32 itself can do (module docstring)
        errors = errors if errors is not None else rolled()
        best, eager_rms = errors[name]
        if dtype == torch.float64:
            bound = FLOAT64_RTOL + FLOAT64_PER_FLOAT32_ERROR * eager_rms
            assert ours <= bound, (f"{name}: rel err {ours:.3g} > {bound:.3g} (eager float32's rms error "
                                   f"{eager_rms:.3g}) {where}")
        else:
            bound = FLOAT32_FACTOR * eager_rms + FLOAT32_RTOL
            assert best <= bound, (f"{name}: rel err {ours:.3g} > {FLOAT32_RTOL}, and over {ROLLS} rolls best "
                                   f"{best:.3g} > {bound:.3g} ({FLOAT32_FACTOR}x eager's rms {eager_rms:.3g}) "
                                   f"{where}")


def check_against_reference(kind, shape, dtype, layout, squeeze, epilogue, backend="cpu", seed=None,
                            ties=False, grads=(True, True, True)) -> None:
    """One case: `backend` in dtype against the "torch" backend in float64 (and, for
    float16/bfloat16, against eager PyTorch in dtype)."""
    seed = fresh_seed() if seed is None else seed
    residual, out_activation = epilogue
    where = (f"[{kind} shape={shape} {dtype} {layout} squeeze={squeeze} residual={residual} "
             f"out={out_activation} backend={backend} grads={grads} ties={ties} seed={seed}]")
    excite = make_excite(kind, shape[1], seed)
    x = make_x(shape, dtype, layout, seed, ties=ties)
    g = torch.Generator().manual_seed(seed + 1)
    r = relayout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout) if residual else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    gx, gr, gp = grads
    kw = dict(squeeze=squeeze, out_activation=out_activation, grad_x=gx, grad_residual=gr, grad_params=gp)
    ours_excite = excite_copy(excite, dtype)
    ours = run_ca(ours_excite, x, dy, r, backend=backend, **kw)
    assert ours["y"].dtype == dtype and ours["y"].shape == shape, where
    refs, ref_excite = reference64(excite, x, dy, r, kw, ours["y"], where)
    eager = eager_refs = None
    if dtype in (torch.float16, torch.bfloat16):
        eager = run_ca(excite_copy(excite, dtype), x, dy, r, backend="torch", **kw)
        eager_refs = reference64(excite, x, dy, r, kw, eager["y"])[0]
    roll_dtype = torch.float32 if dtype == torch.float64 else dtype
    rolled = lambda: rolled_errors(excite, x, dy, r, kw, backend, layout, seed, roll_dtype)  # noqa: E731
    _assert_close(ours, refs, dtype, where, eager, eager_refs, rolled)
    # BatchNorm's running statistics: updated once, as by the reference. Errors relative to the
    # largest of the buffer before, after, and its change (the update 0.9 * before + 0.1 * batch
    # statistic can cancel); where beyond the dtype's tolerance, at most 4x eager's error.
    before = dict(_buffers(excite))
    for (name, b), (_, b_ref) in zip(_buffers(ours_excite), _buffers(ref_excite)):
        if not b.dtype.is_floating_point:
            assert torch.equal(b, b_ref), f"buffer {name}: {b} vs {b_ref} {where}"
            continue
        b0 = before[name].double()
        scale = max(b_ref.norm().item(), b0.norm().item(), (b_ref - b0).norm().item(), 1e-300)
        err, tol = (b.double() - b_ref).norm().item() / scale, {torch.float64: 1e-12, torch.float32: 1e-5}.get(
            dtype, 1e-3)
        if err > tol:
            eager_excite = excite_copy(excite, dtype)
            run_ca(eager_excite, x, dy, r, backend="torch", **kw)
            eager_err = (dict(eager_excite.named_buffers())[name].double() - b_ref).norm().item() / scale
            assert err <= tol + 4 * eager_err, f"buffer {name}: error {err:.3g} vs eager {eager_err:.3g} {where}"


def _buffers(excite):
    return list(excite.named_buffers()) if isinstance(excite, nn.Module) else []


# ---- accuracy against the reference ------------------------------------------------------


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("backend", CA_BACKENDS)
@pytest.mark.parametrize("kind", list(EXCITATIONS))
@pytest.mark.parametrize("squeeze", SQUEEZES)
def test_float64_equals_reference(backend, kind, squeeze):
    for i, (layout, epilogue) in enumerate([("nchw", (True, "relu")), ("channels_last", (False, None)),
                                            ("strided", (True, None))]):
        shape = [(3, 12, 5, 4), (4, 10, 3, 3), (3, 9, 2, 7)][i]
        check_against_reference(kind, shape, torch.float64, layout, squeeze, epilogue, backend)


@NATIVE_CPU
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("kind", list(EXCITATIONS))
@pytest.mark.parametrize("squeeze", SQUEEZES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_float32_matches_reference(kind, squeeze, epilogue):
    i = EPILOGUES.index(epilogue)
    check_against_reference(kind, (4, 24, 6, 5), torch.float32, LAYOUTS[i % 3], squeeze, epilogue)


@NATIVE_CPU
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["eca3", "ese", "se_bn_train", "se_bn_eval", "se_mish", "sigmoid_fn", "conv_4d"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_reduced_precision(dtype, kind, layout):
    for squeeze, epilogue in [("avg", (True, "relu")), ("avg_max", (False, None)), ("avg_max", (True, "relu"))]:
        check_against_reference(kind, (4, 20, 7, 7), dtype, layout, squeeze, epilogue)


# Odd sizes: C = 1, 3, 130; H*W = 1 (walked as pixel rows), prime 7x7 and 67x1; N = 0 and 1.
ODD_SHAPES = [
    (2, 1, 3, 3),
    (3, 3, 4, 5),
    (2, 130, 3, 2),
    (3, 16, 1, 1),
    (2, 40, 7, 7),
    (2, 6, 67, 1),
    (0, 16, 4, 4),
    (1, 24, 5, 5),
]


@NATIVE_CPU
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_odd_shapes(shape, layout, dtype):
    kinds = [k for k in EXCITATIONS if shape[0] >= MIN_BATCH or k not in NEEDS_BATCH]
    i = ODD_SHAPES.index(shape) + LAYOUTS.index(layout)
    for j, squeeze in enumerate(SQUEEZES):
        kind = kinds[(2 * i + j) % len(kinds)]
        check_against_reference(kind, shape, dtype, layout, squeeze, EPILOGUES[(i + j) % 4])


@NATIVE_CPU
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("epilogue", [(False, None), (True, "relu")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_tied_maxima_share_the_gradient(layout, epilogue, dtype):
    """x rounded to multiples of 1/2: most (n, c) rows have several elements equal to their max,
    and the max's gradient must be split equally among them as torch.amax's is."""
    for kind, shape in [("ese", (3, 8, 4, 4)), ("eca3", (2, 5, 9, 1)), ("sigmoid_fn", (2, 16, 1, 3))]:
        check_against_reference(kind, shape, dtype, layout, "avg_max", epilogue, ties=True)


@NATIVE_CPU
def test_tied_maxima_exact_shares():
    """With g independent of x and dmax known, dx is dy * g + dmean / HW + dmax / ties on each
    tied max: checked element by element."""
    x = torch.tensor([[[[1.0, 3.0], [3.0, 3.0]], [[2.0, 0.0], [2.0, -1.0]]]], dtype=torch.float64,
                     requires_grad=True)
    gate = torch.tensor([0.25, 0.5], dtype=torch.float64)
    # g = gate in value, with dg/dp = diag(gate): dp = dg * gate
    y = fused_channel_attention(x, lambda p: gate * (1 + p - p.detach()), squeeze="avg_max", backend="cpu")
    dy = torch.ones_like(y)
    y.backward(dy)
    # dg[c] = sum x[c]; dp = dg * gate; dmean = dmax = dp / 2
    dg = x.detach().sum((2, 3))[0]
    dp = dg * gate
    expected = dy[0] * gate[:, None, None] + (dp / 2 / 4)[:, None, None]
    expected[0] += torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64) * (dp[0] / 2 / 3)
    expected[1] += torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64) * (dp[1] / 2 / 2)
    torch.testing.assert_close(x.grad[0], expected, rtol=1e-14, atol=1e-14)


@NATIVE_CPU
@pytest.mark.parametrize("grads", [(True, False, False), (False, False, True), (False, True, False),
                                   (True, True, False), (False, True, True)],
                         ids=["x_only", "params_only", "residual_only", "x_residual", "residual_params"])
@pytest.mark.parametrize("kind", ["se_bn_train", "eca5", "sigmoid_fn"])
@pytest.mark.parametrize("squeeze", SQUEEZES)
def test_partial_requires_grad(grads, kind, squeeze):
    for epilogue, dtype in [((True, "relu"), torch.float64), ((True, None), torch.float32)]:
        check_against_reference(kind, (3, 12, 4, 4), dtype, "nchw", squeeze, epilogue, grads=grads)


@NATIVE_CPU
def test_batchnorm_running_stats_updated_once():
    """Train-mode BatchNorm in the excitation: batch statistics over the pooled vectors, and one
    running-stat update per forward (num_batches_tracked 1), as in the reference; also without
    gradients (the no-grad path)."""
    seed = fresh_seed()
    excite = make_excite("se_bn_train", 16, seed)
    x = make_x((4, 16, 5, 5), torch.float64, "nchw", seed)
    for requires_grad in (True, False):
        ours, ref = excite_copy(excite, torch.float64), excite_copy(excite, torch.float64)
        xi = x.clone().requires_grad_(requires_grad)
        y = fused_channel_attention(xi, ours, squeeze="avg_max", backend="cpu")
        y_ref = fused_channel_attention(xi, ref, squeeze="avg_max", backend="torch")
        assert rel_err(y, y_ref) < 1e-12, seed
        assert ours.bn.num_batches_tracked.item() == 1
        assert rel_err(ours.bn.running_mean, ref.bn.running_mean) < 1e-12, seed
        assert rel_err(ours.bn.running_var, ref.bn.running_var) < 1e-12, seed
        assert not torch.equal(ours.bn.running_mean, excite.bn.running_mean.double())


@NATIVE_CPU
@pytest.mark.parametrize("squeeze", SQUEEZES)
@pytest.mark.parametrize("gates", ["identity", "constant", "detached", "scaled_leaf"])
def test_unusual_gate_functions(squeeze, gates):
    """Gates that are the pooled tensor itself, do not depend on it, or are cut from the graph."""
    excite = {
        "identity": lambda p: p,
        "constant": lambda p: torch.full_like(p, 0.25),
        "detached": lambda p: torch.sigmoid(p).detach(),
        "scaled_leaf": lambda p: 0.5 * p + 0.5,
    }[gates]
    seed = fresh_seed()
    x = make_x((3, 7, 4, 5), torch.float64, "nchw", seed)
    r = torch.randn(3, 7, 4, 5, dtype=torch.float64)
    dy = torch.randn(3, 7, 4, 5, dtype=torch.float64)
    kw = dict(squeeze=squeeze, out_activation="relu")
    ours = run_ca(excite, x, dy, r, backend="cpu", **kw)
    ref = run_ca(excite, x, dy, r, backend="torch", **kw)
    _assert_close(ours, ref, torch.float64, f"{gates} {squeeze} seed={seed}")


@NATIVE_CPU
@pytest.mark.parametrize("squeeze", ["avg", "avg_max"])
@pytest.mark.parametrize("excite_kind", ["inplace_fn", "inplace_relu_module"])
def test_excitation_may_modify_the_pooled_tensor_in_place(squeeze, excite_kind):
    """excite(p) may work on p in place (an nn.ReLU(inplace=True) first, p.sigmoid_()), as it can
    in the modules the generic path replaces: the reference takes it."""
    seed = fresh_seed()
    if excite_kind == "inplace_fn":
        excite = lambda p: p.mul_(0.5).sigmoid_()  # noqa: E731
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            excite = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Sigmoid()).double()
    x = make_x((2, 6, 3, 4), torch.float64, "nchw", seed)
    dy = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    ours = run_ca(excite_copy(excite, torch.float64), x, dy, backend="cpu", squeeze=squeeze)
    ref = run_ca(excite_copy(excite, torch.float64), x, dy, backend="torch", squeeze=squeeze)
    _assert_close(ours, ref, torch.float64, f"{excite_kind} {squeeze} seed={seed}")


@NATIVE_CPU
@pytest.mark.parametrize("squeeze", SQUEEZES)
def test_mixed_layouts_and_expanded_grad(squeeze):
    """x channels_last, the residual NCHW, a strided x; and y.sum().backward(), whose grad_y is an
    expanded (stride 0) tensor."""
    seed = fresh_seed()
    excite = make_excite("ese", 10, seed).double()
    for x_layout, r_layout in [("channels_last", "nchw"), ("nchw", "channels_last"), ("strided", "channels_last"),
                               ("channels_last", "strided")]:
        x = make_x((3, 10, 5, 3), torch.float64, x_layout, seed)
        r = relayout(torch.randn(3, 10, 5, 3, dtype=torch.float64), r_layout)
        outs = {}
        for backend in ("cpu", "torch"):
            ex = excite_copy(excite, torch.float64)
            xl, rl = x.detach().requires_grad_(), r.detach().requires_grad_()
            y = fused_channel_attention(xl, ex, squeeze=squeeze, residual=rl, out_activation="relu", backend=backend)
            y.sum().backward()
            outs[backend] = {"y": y.detach(), "x": xl.grad, "residual": rl.grad, "p.fc.weight": ex.fc.weight.grad}
        _assert_close(outs["cpu"], outs["torch"], torch.float64, f"x {x_layout} residual {r_layout} seed={seed}")


@NATIVE_CPU
def test_auto_backend_is_the_cpu_backend(monkeypatch):
    monkeypatch.delenv("SE_KERNELS_BACKEND", raising=False)
    seed = fresh_seed()
    excite = make_excite("eca3", 12, seed)
    x = make_x((3, 12, 4, 4), torch.float32, "nchw", seed)
    dy = torch.randn(3, 12, 4, 4)
    auto = run_ca(excite_copy(excite, torch.float32), x, dy, backend="auto", squeeze="avg_max")
    cpu = run_ca(excite_copy(excite, torch.float32), x, dy, backend="cpu", squeeze="avg_max")
    for name in cpu:
        assert torch.equal(auto[name], cpu[name]), name


# ---- gradcheck ---------------------------------------------------------------------------


GRADCHECK_CASES = [
    ("eca3", "avg", (2, 6, 3, 3), "nchw", (True, "relu")),
    ("eca5", "avg_max", (2, 7, 2, 3), "channels_last", (False, None)),
    ("ese", "avg_max", (2, 5, 3, 2), "nchw", (True, None)),
    ("se_bn_train", "avg", (3, 8, 2, 2), "strided", (False, "relu")),
    ("se_bn_train", "avg_max", (2, 6, 3, 2), "channels_last", (True, "relu")),
    ("se_bn_eval", "avg_max", (2, 8, 3, 1), "channels_last", (True, "relu")),
    ("se_mish", "avg", (2, 8, 1, 1), "nchw", (True, "relu")),
    ("se_gelu_tanh", "avg_max", (2, 4, 2, 3), "strided", (True, None)),
    ("se_leaky", "avg", (1, 3, 5, 1), "channels_last", (False, None)),
    ("sigmoid_fn", "avg_max", (2, 3, 3, 3), "nchw", (True, "relu")),
    ("conv_4d", "avg", (2, 8, 2, 2), "channels_last", (True, "relu")),
]


@pytest.mark.parametrize("backend", CA_BACKENDS)
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in GRADCHECK_CASES])
def test_gradcheck_float64(backend, case):
    kind, squeeze, shape, layout, (residual, out_activation) = case
    seed = fresh_seed()
    excite = excite_copy(make_excite(kind, shape[1], seed), torch.float64)
    params = list(excite.parameters()) if isinstance(excite, nn.Module) else []
    for p in params:
        p.requires_grad_()
    x = make_x(shape, torch.float64, layout, seed).requires_grad_()
    inputs = [x]
    if residual:
        r = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
        inputs.append(r.requires_grad_())

    def f(x, *rest):
        return fused_channel_attention(x, excite, squeeze=squeeze, residual=rest[0] if residual else None,
                                       out_activation=out_activation, backend=backend)

    assert torch.autograd.gradcheck(f, tuple(inputs + params), eps=1e-6, atol=1e-7, rtol=1e-5), \
        f"{case} seed={seed}"


# ---- poisoned outputs, NaN, layout -------------------------------------------------------


@NATIVE_CPU
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("squeeze", SQUEEZES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_poisoned_outputs_are_all_written(poisoned_allocations, layout, squeeze, epilogue):
    """Under deterministic mode every torch.empty* (the stage ops' outputs and scratch included)
    starts as NaN: a finite input must give finite outputs and gradients everywhere."""
    assert torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory
    probe = torch.empty(64)
    assert torch.isnan(probe).all()
    for shape in [(3, 13, 5, 3), (2, 9, 1, 1), (1, 17, 11, 1)]:
        seed = fresh_seed()
        excite = make_excite("se_mish", shape[1], seed)
        x = make_x(shape, torch.float32, layout, seed)
        r = torch.randn(shape) if epilogue[0] else None
        out = run_ca(excite, x, torch.randn(shape), r, squeeze=squeeze, out_activation=epilogue[1])
        for name, t in out.items():
            assert t is not None and torch.isfinite(t).all(), f"{name}: {shape} {layout} seed={seed}"
        # without gradients (the no-grad path)
        with torch.no_grad():
            y = fused_channel_attention(x, excite, squeeze=squeeze, residual=r, out_activation=epilogue[1])
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", CA_BACKENDS)
@pytest.mark.parametrize("kind", ["eca3", "ese", "sigmoid_fn"])
@pytest.mark.parametrize("squeeze", SQUEEZES)
@pytest.mark.parametrize("out_activation", [None, "relu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_propagates_like_reference(backend, kind, squeeze, out_activation, layout):
    """A NaN in x gives NaN where the reference has NaN, in y and in every gradient."""
    seed = fresh_seed()
    excite = make_excite(kind, 16, seed)
    x = make_x((3, 16, 4, 4), torch.float32, layout, seed)
    x[1, 5, 2, 1] = float("nan")
    r, dy = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    kw = dict(squeeze=squeeze, out_activation=out_activation)
    ours = run_ca(excite_copy(excite, torch.float32), x, dy, r, backend=backend, **kw)
    ref = run_ca(excite_copy(excite, torch.float32), x, dy, r, backend="torch", **kw)
    assert torch.isnan(ref["y"][1, 5]).all()
    assert not torch.isnan(ours["y"][0]).any() and not torch.isnan(ours["y"][2]).any()
    for name in ref:
        assert torch.equal(torch.isnan(ours[name]), torch.isnan(ref[name])), f"{name} seed={seed}"


@pytest.mark.parametrize("backend", CA_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_dtype_and_layout(backend, layout):
    x = make_x((2, 8, 3, 5), torch.float32, layout, fresh_seed())
    y = fused_channel_attention(x, make_excite("ese", 8, 0), backend=backend)
    assert y.dtype == torch.float32 and y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


# ---- the Triton stage kernels (under TRITON_INTERPRET=1 here) --------------------------------
# se_kernels/triton/stages.py: the SE op's split-plan pass kernels plus the max squeeze's two.
# The interpreter is slow: small shapes, chosen to cover several channel blocks, the relu mask's
# padded rows, ties and both layouts.

TRITON = pytest.mark.skipif("triton" not in available_backends("cpu"),
                            reason="Triton does not run CPU tensors here (needs triton and TRITON_INTERPRET=1)")


@TRITON
@pytest.mark.parametrize("kind", ["eca3", "ese", "se_bn_train", "sigmoid_fn", "conv_4d"])
@pytest.mark.parametrize("squeeze", SQUEEZES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_matches_reference(kind, squeeze, epilogue, layout):
    for dtype in (torch.float64, torch.float32):
        check_against_reference(kind, (3, 12, 5, 3), dtype, layout, squeeze, epilogue, backend="triton")


@TRITON
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 7), (2, 5, 7, 7), (2, 300, 3, 3), (3, 9, 11, 13)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("squeeze", SQUEEZES)
def test_triton_odd_shapes_and_ties(shape, layout, squeeze):
    """One channel or pixel, C not a multiple of 8 under the channels_last relu mask, several
    channel blocks (C = 300), and inputs with tied maxima."""
    for epilogue, ties in [((True, "relu"), False), ((False, None), True)]:
        check_against_reference("eca5", shape, torch.float32, layout, squeeze, epilogue, backend="triton", ties=ties)


@TRITON
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("squeeze", SQUEEZES)
def test_triton_reduced_precision(dtype, squeeze):
    check_against_reference("se_mish", (3, 16, 4, 5), dtype, "nchw", squeeze, (True, "relu"), backend="triton")
    check_against_reference("eca3", (3, 16, 4, 5), dtype, "channels_last", squeeze, (False, None), backend="triton")


@TRITON
@pytest.mark.parametrize("squeeze", SQUEEZES)
def test_triton_split_pixel_sums(monkeypatch, squeeze):
    """On a GPU the pixel sums are split over several programs per (sample, channel block) and
    the splits' partials added after; the interpreter reports no SMs (one split), so pretend 8."""
    from se_kernels.triton import launch, stages

    monkeypatch.setattr(launch, "sm_count", lambda device: 8)
    run = stages._Launch(torch.empty(2, 4, 32, 32), out_relu=False)
    assert run.plan.splits > 1
    for layout in ("nchw", "channels_last"):
        check_against_reference("ese", (2, 4, 32, 32), torch.float64, layout, squeeze, (True, "relu"), backend="triton")


@TRITON
@pytest.mark.parametrize("squeeze", SQUEEZES)
def test_triton_gradcheck(squeeze):
    seed = fresh_seed()
    excite = excite_copy(make_excite("se_leaky", 6, seed), torch.float64)
    x = make_x((2, 6, 3, 2), torch.float64, "channels_last", seed).requires_grad_()
    r = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)

    def f(x, r, *params):
        return fused_channel_attention(x, excite, squeeze=squeeze, residual=r, out_activation="relu",
                                       backend="triton")

    assert torch.autograd.gradcheck(f, (x, r, *excite.parameters()), eps=1e-6, atol=1e-7, rtol=1e-5), seed


@TRITON
@pytest.mark.parametrize("squeeze", SQUEEZES)
@pytest.mark.parametrize("out_activation", [None, "relu"])
def test_triton_nan_and_poisoned_outputs(poisoned_allocations, squeeze, out_activation):
    """A NaN in x gives NaN where the reference has; with every allocation NaN, a finite input
    gives finite outputs and gradients (every element written)."""
    seed = fresh_seed()
    excite = make_excite("eca3", 16, seed)
    x = make_x((3, 16, 4, 4), torch.float32, "nchw", seed)
    r, dy = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    kw = dict(squeeze=squeeze, out_activation=out_activation)
    clean = run_ca(excite_copy(excite, torch.float32), x, dy, r, backend="triton", **kw)
    for name, t in clean.items():
        assert t is not None and torch.isfinite(t).all(), f"{name} seed={seed}"
    x[1, 5, 2, 1] = float("nan")
    ours = run_ca(excite_copy(excite, torch.float32), x, dy, r, backend="triton", **kw)
    ref = run_ca(excite_copy(excite, torch.float32), x, dy, r, backend="torch", **kw)
    for name in ref:
        assert torch.equal(torch.isnan(ours[name]), torch.isnan(ref[name])), f"{name} seed={seed}"


@TRITON
@NATIVE_CPU
def test_triton_stage_values_equal_the_cpu_stages():
    """The Triton stage functions against the CPU stage ops on the same inputs (float64)."""
    from se_kernels.triton import stages

    se = torch.ops.se_kernels
    for layout in ("nchw", "channels_last"):
        x = ops.as_kernel_layout(make_x((3, 10, 4, 3), torch.float64, layout, fresh_seed(), ties=True))
        dy = ops.like_layout(torch.randn(3, 10, 4, 3, dtype=torch.float64), x)
        g, dmean, dmax = (torch.rand(3, 10, dtype=torch.float64) for _ in range(3))
        for a, b in zip(stages.pool(x, True), se.ca_pool(x, True)):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
        _, mx, ties = se.ca_pool(x, True)
        y, mask = stages.scale(x, g, dy, True)
        y_ref, mask_ref = se.ca_scale(x, g, dy, True)
        torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=0)
        assert torch.equal(mask, mask_ref)
        torch.testing.assert_close(stages.gate_grad(dy, x, mask, True), se.ca_gate_grad(dy, x, mask, True),
                                   rtol=1e-13, atol=1e-15)
        for args in [(None, None, None, None), (x, mx, dmax, ties)]:
            got = stages.input_grad(dy, mask, g, dmean, *args, True, True, True)
            want = se.ca_input_grad(dy, mask, g, dmean, *args, True, True, True)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)




def _to(t, device, dtype=None):
    return None if t is None else t.to(device=device, dtype=dtype or t.dtype)


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("shape", [(3, 12, 5, 3), (4, 300, 14, 14), (2, 64, 56, 56), (1, 2048, 7, 7)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("squeeze", SQUEEZES)
@pytest.mark.parametrize("epilogue", [(False, None), (True, "relu")])
def test_stages_on_gpu(backend, shape, layout, squeeze, epilogue):
    """The GPU stage kernels (Triton's and the CUDA C++ ones): float64 y and every gradient as
    the float64 reference on the CPU (relative 1e-12), float32 y within 1e-5."""
    seed = fresh_seed()
    excite = make_excite("eca5", shape[1], seed)
    x = make_x(shape, torch.float64, layout, seed, ties=True)
    r = relayout(torch.randn(shape, dtype=torch.float64), layout) if epilogue[0] else None
    dy = torch.randn(shape, dtype=torch.float64)
    kw = dict(squeeze=squeeze, out_activation=epilogue[1])
    ref = run_ca(excite_copy(excite, torch.float64), x, dy, r, backend="torch", **kw)
    ours = run_ca(excite_copy(excite, torch.float64).cuda(), x.cuda(), dy.cuda(), _to(r, "cuda"), backend=backend,
                  **kw)
    for name in ref:
        err = rel_err(ours[name].cpu(), ref[name])
        assert err <= FLOAT64_RTOL, f"{name}: {err:.3g} {shape} {layout} seed={seed}"
    x32, r32 = x.float(), _to(r, "cpu", torch.float32)
    ref32 = run_ca(excite_copy(excite, torch.float64), x32.double(), dy, _to(r32, "cpu", torch.float64),
                   backend="torch", **kw)
    y32 = run_ca(excite_copy(excite, torch.float32).cuda(), x32.cuda(), dy.float().cuda(), _to(r32, "cuda"),
                 backend=backend, **kw)["y"]
    assert y32.dtype == torch.float32 and rel_err(y32.cpu(), ref32["y"]) <= FLOAT32_RTOL, seed


# ---- large outputs: streaming stores ----------------------------------------------------------


@NATIVE_CPU
@pytest.mark.parametrize("shape,layout", [((2, 64, 256, 256), "nchw"), ((2, 64, 256, 256), "channels_last"),
                                          ((96, 2048, 7, 7), "nchw")], ids=["rows", "pixel_rows", "flat_7x7"])
@pytest.mark.parametrize("squeeze", SQUEEZES)
@pytest.mark.parametrize("epilogue", [(False, None), (True, "relu")])
def test_large_outputs_streamed(shape, layout, squeeze, epilogue):
    """Outputs of 32 MiB and more (here 34-39 MB in float32) are written with streaming stores:
    by rows (H*W or C a multiple of 8), or flat over the whole tensor (7x7 maps, no relu). y and
    every gradient against the float64 reference by the float32 rule (check_against_reference:
    relu decisions within rounding of 0 and ill-conditioned weight gradients as it says)."""
    check_against_reference("eca5", shape, torch.float32, layout, squeeze, epilogue)


# ---- torch.library.opcheck of the stage ops ----------------------------------------------


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


OPCHECK_CASES = [
    ((2, 5, 3, 3), "nchw", torch.float32),
    ((2, 9, 3, 2), "channels_last", torch.float32),
    ((3, 4, 1, 1), "nchw", torch.bfloat16),
    ((2, 12, 2, 5), "channels_last", torch.float64),
    ((0, 6, 2, 3), "nchw", torch.float32),
]


@NATIVE_CPU
@pytest.mark.parametrize("case", OPCHECK_CASES,
                         ids=["x".join(map(str, c[0])) + f"-{c[1]}-{str(c[2])[6:]}" for c in OPCHECK_CASES])
@pytest.mark.parametrize("out_relu", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    "cuda" not in GPU_BACKENDS, reason="needs a GPU and se_kernels' CUDA kernels"))])
def test_opcheck_stage_ops(case, out_relu, device):
    shape, layout, dtype = case
    seed = fresh_seed()
    x = make_x(shape, dtype, layout, seed).to(device)
    x = ops.as_kernel_layout(x)
    lay = lambda t: ops.like_layout(t.to(device), x)  # noqa: E731
    n, c = shape[:2]
    g = torch.rand(n, c, dtype=_acc(dtype), device=device)
    r = lay(torch.randn(shape).to(dtype))
    dy = lay(torch.randn(shape).to(dtype))
    se = torch.ops.se_kernels
    torch.library.opcheck(se.ca_pool.default, (x, out_relu))  # with_max follows the parametrization
    y, mask = se.ca_scale(x, g, r, out_relu)
    torch.library.opcheck(se.ca_scale.default, (x, g, r, out_relu))
    torch.library.opcheck(se.ca_scale.default, (x, g, None, out_relu))
    torch.library.opcheck(se.ca_gate_grad.default, (dy, x, mask, out_relu))
    _, mx, ties = se.ca_pool(x, True)
    dmean, dmax = (torch.randn(n, c, dtype=_acc(dtype), device=device) for _ in range(2))
    for need_x, need_r in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(se.ca_input_grad.default,
                              (dy, mask, g, dmean, None, None, None, None, out_relu, need_x, need_r))
        torch.library.opcheck(se.ca_input_grad.default,
                              (dy, mask, g, dmean, x, mx, dmax, ties, out_relu, need_x, need_r))


@NATIVE_CPU
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_stage_op_values(layout):
    """The stage ops on their own, in float64, against their definitions."""
    seed = fresh_seed()
    x = ops.as_kernel_layout(make_x((3, 6, 4, 3), torch.float64, layout, seed, ties=True))
    se = torch.ops.se_kernels
    mean, mx, ties = se.ca_pool(x, True)
    torch.testing.assert_close(mean, x.mean((2, 3)), rtol=1e-14, atol=1e-14)
    assert torch.equal(mx, x.amax((2, 3)))
    assert torch.equal(ties, (x == mx[:, :, None, None]).sum((2, 3)).double())
    g = torch.rand(3, 6, dtype=torch.float64)
    r = ops.like_layout(torch.randn(3, 6, 4, 3, dtype=torch.float64), x)
    y, mask = se.ca_scale(x, g, r, True)
    y_ref = torch.relu(x * g[:, :, None, None] + r)
    torch.testing.assert_close(y, y_ref, rtol=1e-14, atol=1e-14)
    dy = ops.like_layout(torch.randn(3, 6, 4, 3, dtype=torch.float64), x)
    dyp = dy * (y_ref > 0)
    dg = se.ca_gate_grad(dy, x, mask, True)
    torch.testing.assert_close(dg, (dyp * x).sum((2, 3)), rtol=1e-13, atol=1e-13)
    dmean, dmax = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    dx, dres = se.ca_input_grad(dy, mask, g, dmean, x, mx, dmax, ties, True, True, True)
    at_max = (x == mx[:, :, None, None]).double()
    dx_ref = dyp * g[:, :, None, None] + (dmean / 12)[:, :, None, None] + at_max * (dmax / ties)[:, :, None, None]
    torch.testing.assert_close(dx, dx_ref, rtol=1e-14, atol=1e-14)
    assert torch.equal(dres, dyp)


# ---- argument errors ---------------------------------------------------------------------


def _x(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _call(b, rg, excite=torch.sigmoid, shape=(2, 4, 3, 3), **kw):
    return fused_channel_attention(_x(*shape, requires_grad=rg), excite, backend=b, **kw)


ERROR_CASES = [
    # (id, call(backend, requires_grad), error type, words in the message)
    ("squeeze", lambda b, rg: _call(b, rg, squeeze="max"), ValueError, "squeeze"),
    ("squeeze_none", lambda b, rg: _call(b, rg, squeeze=None), ValueError, "squeeze"),
    ("out_activation", lambda b, rg: _call(b, rg, out_activation="gelu"), ValueError, "out_activation"),
    ("backend", lambda b, rg: _call("numpy", rg), ValueError, "backend"),
    ("rank3", lambda b, rg: _call(b, rg, shape=(4, 3, 3)), ValueError, "(N, C, H, W)"),
    ("rank5", lambda b, rg: _call(b, rg, shape=(1, 2, 4, 3, 3)), ValueError, "(N, C, H, W)"),
    ("hw0", lambda b, rg: _call(b, rg, shape=(2, 4, 0, 3)), ValueError, "H*W"),
    ("int_x", lambda b, rg: fused_channel_attention(torch.ones(2, 4, 3, 3, dtype=torch.int32), torch.sigmoid,
                                                    backend=b), TypeError, "dtype"),
    ("not_callable", lambda b, rg: _call(b, rg, excite=3), TypeError, "callable"),
    ("gate_shape", lambda b, rg: _call(b, rg, excite=lambda p: torch.sigmoid(p[:, :3])), ValueError, "(2, 3)"),
    ("gate_transposed", lambda b, rg: _call(b, rg, excite=lambda p: torch.sigmoid(p.t())), ValueError, "(4, 2)"),
    ("gate_4d_wrong", lambda b, rg: _call(b, rg, excite=lambda p: p[:, :, None, None].expand(2, 4, 3, 3)),
     ValueError, "(2, 4, 3, 3)"),
    ("gate_4d_spatial", lambda b, rg: _call(b, rg, excite=lambda p: torch.sigmoid(p)[:, :, None, None].expand(
        2, 4, 1, 3)), ValueError, "(2, 4, 1, 3)"),
    ("gate_4d_batch", lambda b, rg: _call(b, rg, excite=lambda p: torch.sigmoid(p)[:1, :, None, None]), ValueError,
     "(1, 4"),
    ("gate_3d", lambda b, rg: _call(b, rg, excite=lambda p: p[:, :, None]), ValueError, "(2, 4, 1)"),
    ("gate_not_tensor", lambda b, rg: _call(b, rg, excite=lambda p: p.tolist()), ValueError, "list"),
    ("gate_int", lambda b, rg: _call(b, rg, excite=lambda p: (p > 0).int()), TypeError, "floating-point"),
    ("residual_shape", lambda b, rg: _call(b, rg, residual=_x(2, 4, 3, 2)), ValueError, "residual"),
    ("residual_dtype", lambda b, rg: _call(b, rg, residual=_x(2, 4, 3, 3, dtype=torch.float64)), TypeError,
     "residual"),
    ("residual_not_tensor", lambda b, rg: _call(b, rg, residual=1.0), TypeError, "residual"),
]


@pytest.mark.parametrize("backend", CA_BACKENDS)
@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_bad_arguments_raise(backend, case, requires_grad):
    _, call, error, words = case
    with pytest.raises(error) as info:
        call(backend, requires_grad)
    assert words in str(info.value), str(info.value)


@NATIVE_CPU
@pytest.mark.parametrize("gate_dtype,x_dtype", [(torch.float64, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_wider_gates_are_refused_by_the_fused_path(gate_dtype, x_dtype, requires_grad):
    x = _x(2, 4, 3, 3).to(x_dtype).requires_grad_(requires_grad)
    with pytest.raises(TypeError, match="gates"):
        fused_channel_attention(x, lambda p: torch.sigmoid(p.to(gate_dtype)), backend="cpu")
    # the unfused composition promotes, as x * g does
    y = fused_channel_attention(x, lambda p: torch.sigmoid(p.to(gate_dtype)), backend="torch")
    assert y.dtype == torch.promote_types(x_dtype, gate_dtype)


@NATIVE_CPU
def test_narrower_gates_are_accepted():
    """float16 gates for float32 x: x * g is float32, and so is the fused result."""
    seed = fresh_seed()
    x = make_x((2, 8, 3, 3), torch.float32, "nchw", seed).requires_grad_()
    ex = lambda p: torch.sigmoid(p).half()  # noqa: E731
    y = fused_channel_attention(x, ex, squeeze="avg_max", backend="cpu")
    y_ref = fused_channel_attention(x, ex, squeeze="avg_max", backend="torch")
    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-6, seed


@NATIVE_CPU
@pytest.mark.parametrize("via", ["tensor", "module_in_function"])
@pytest.mark.parametrize("requires_grad", ["x", "residual", "none"])
def test_closure_over_requires_grad_tensor_is_refused(via, requires_grad):
    """Refused whichever inputs require grad: with none of x, the residual or an nn.Module's
    parameters requiring grad the fused path once ran excite under no_grad, and the closure's
    gradient was silently lost (y came back with requires_grad=False)."""
    w = torch.randn(6, requires_grad=True)
    lin = nn.Linear(6, 6)
    ex = (lambda p: torch.sigmoid(p * w)) if via == "tensor" else (lambda p: torch.sigmoid(lin(p)))
    x = torch.randn(2, 6, 3, 3, requires_grad=requires_grad == "x")
    r = torch.randn(2, 6, 3, 3, requires_grad=requires_grad == "residual")
    # the reference keeps the graph to w / lin's parameters
    assert fused_channel_attention(x, ex, residual=r, backend="torch").requires_grad
    with pytest.raises(ValueError, match="require grad"):
        fused_channel_attention(x, ex, residual=r, backend="cpu")
    # with no gradient wanted at all there is nothing to lose
    with torch.no_grad():
        y = fused_channel_attention(x, ex, residual=r, backend="cpu")
        y_ref = fused_channel_attention(x, ex, residual=r, backend="torch")
    assert rel_err(y, y_ref) < 1e-5


@NATIVE_CPU
def test_closure_over_plain_tensors_is_fine():
    w = torch.randn(6)
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    y = fused_channel_attention(x, lambda p: torch.sigmoid(p * w), backend="cpu")
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    fused_channel_attention(x2, lambda p: torch.sigmoid(p * w), backend="torch").sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-5


def test_cuda_backend_on_cpu_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        fused_channel_attention(_x(2, 4, 3, 3), torch.sigmoid, backend="cuda")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):
        fused_channel_attention(_x(2, 4, 3, 3), torch.sigmoid, backend="triton")


@NATIVE_CPU
@pytest.mark.parametrize("squeeze", SQUEEZES)
@pytest.mark.parametrize("kind", ["se_leaky", "sigmoid_fn"])
def test_create_graph_raises(squeeze, kind):
    excite = make_excite(kind, 8, 0)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    y = fused_channel_attention(x, excite, squeeze=squeeze, backend="cpu")
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    # the torch backend differentiates twice
    y = fused_channel_attention(x, excite, squeeze=squeeze, backend="torch")
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    gx.sum().backward()


@NATIVE_CPU
def test_backward_twice_with_retain_graph():
    seed = fresh_seed()
    excite = make_excite("se_bn_train", 12, seed).double()
    x = make_x((3, 12, 4, 4), torch.float64, "nchw", seed).requires_grad_()
    y = fused_channel_attention(x, excite, squeeze="avg_max", out_activation="relu", backend="cpu")
    dy = torch.randn_like(y)
    y.backward(dy, retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in excite.parameters()]
    y.backward(dy)
    second = [x.grad] + [p.grad for p in excite.parameters()]
    for a, b in zip(first, second):
        torch.testing.assert_close(b, 2 * a, rtol=1e-14, atol=1e-14)


# ---- torch.compile -----------------------------------------------------------------------


def _compile_check(compile_backend: str, seed: int) -> None:
    torch._dynamo.reset()
    excite = make_excite("eca3", 16, seed)
    eager_excite = copy.deepcopy(excite)
    x = make_x((3, 16, 5, 5), torch.float32, "channels_last", seed)
    r = torch.randn(3, 16, 5, 5, generator=torch.Generator().manual_seed(seed + 1))

    def step(x, r, excite):
        y = fused_channel_attention(x, excite, squeeze="avg_max", residual=r, out_activation="relu")
        return (y * torch.arange(5.0)).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    xc, rc = x.clone().requires_grad_(), r.clone().requires_grad_()
    loss = compiled(xc, rc, excite)
    loss.backward()
    xe, re = x.clone().requires_grad_(), r.clone().requires_grad_()
    expected = step(xe, re, eager_excite)  # eager: the "cpu" backend
    expected.backward()
    where = f"compile backend={compile_backend} seed={seed}"
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4, msg=where)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5, msg=where)
    torch.testing.assert_close(rc.grad, re.grad, rtol=1e-5, atol=1e-5, msg=where)
    torch.testing.assert_close(excite.conv.weight.grad, eager_excite.conv.weight.grad, rtol=1e-5, atol=1e-4,
                               msg=where)


@NATIVE_CPU
def test_compile_fullgraph_matches_eager_aot_eager():
    _compile_check("aot_eager", fresh_seed())


@NATIVE_CPU
def test_compile_fullgraph_matches_eager_inductor():
    _compile_check("inductor", fresh_seed())


# ---- determinism -------------------------------------------------------------------------


class ChannelAffine(nn.Module):
    """sigmoid(p * w + b) per channel: an excitation whose own ops give the same bits for any
    thread count (PyTorch's Linear and Conv1d do not: their results change with
    torch.set_num_threads, so they cannot show the stage ops' thread independence)."""

    def __init__(self, channels: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(channels))
        self.b = nn.Parameter(torch.randn(channels) * 0.5)

    def forward(self, p):
        return torch.sigmoid(p * self.w + self.b)


def _with_threads(threads: int, fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return fn()
    finally:
        torch.set_num_threads(before)


@NATIVE_CPU
@pytest.mark.parametrize("kind", list(EXCITATIONS))
def test_two_calls_give_identical_bits(kind):
    seed = fresh_seed()
    shape = (5, 48, 9, 7)
    excite = make_excite(kind, shape[1], seed)
    x = make_x(shape, torch.float32, "channels_last" if seed % 2 else "nchw", seed, ties=True)
    r, dy = torch.randn(shape), torch.randn(shape)
    for squeeze in SQUEEZES:
        a, b = (run_ca(excite_copy(excite, torch.float32), x, dy, r, squeeze=squeeze, out_activation="relu")
                for _ in range(2))
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} {kind} {squeeze} seed={seed}"


@NATIVE_CPU
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 40, 33, 31), (1, 24, 56, 56), (9, 72, 4, 4)])
def test_stage_ops_thread_independent(layout, shape):
    """Each stage op gives the same bits with 1 and 2 threads, on shapes the ops split between
    threads (rows of a sample and samples)."""
    se = torch.ops.se_kernels
    seed = fresh_seed()
    x = ops.as_kernel_layout(make_x(shape, torch.float32, layout, seed, ties=True))
    lay = lambda t: ops.like_layout(t, x)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    g, dmean, dmax = (torch.randn(n, c, generator=gen) for _ in range(3))
    r, dy = lay(torch.randn(shape, generator=gen)), lay(torch.randn(shape, generator=gen))

    def stages():
        mean, mx, ties = se.ca_pool(x, True)
        y, mask = se.ca_scale(x, g, r, True)
        dg = se.ca_gate_grad(dy, x, mask, True)
        dx, dres = se.ca_input_grad(dy, mask, g, dmean, x, mx, dmax, ties, True, True, True)
        dx_avg, _ = se.ca_input_grad(dy, mask, g, dmean, None, None, None, None, True, True, False)
        return dict(mean=mean, mx=mx, ties=ties, y=y, mask=mask, dg=dg, dx=dx, dres=dres, dx_avg=dx_avg)

    one, two = _with_threads(1, stages), _with_threads(2, stages)
    for name in one:
        assert torch.equal(one[name], two[name]), f"{name} seed={seed}"


@NATIVE_CPU
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("excite_kind", ["affine", "sigmoid_fn"])
def test_results_thread_independent(layout, excite_kind):
    """The whole fused path, y and every gradient, gives the same bits for 1 and 2 threads when
    the excitation's own ops do."""
    seed = fresh_seed()
    shape = (3, 40, 33, 31)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        excite = ChannelAffine(shape[1]) if excite_kind == "affine" else torch.sigmoid
    x = make_x(shape, torch.float32, layout, seed, ties=True)
    r, dy = torch.randn(shape), torch.randn(shape)
    for squeeze in SQUEEZES:
        def go(squeeze=squeeze):
            return run_ca(excite_copy(excite, torch.float32), x, dy, r, squeeze=squeeze, out_activation="relu")

        one, two = _with_threads(1, go), _with_threads(2, go)
        for name in one:
            assert torch.equal(one[name], two[name]), f"{name} {squeeze} seed={seed}"


# ---- fuzzing -----------------------------------------------------------------------------


@NATIVE_CPU
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 4), c=st.integers(1, 40), h=st.integers(1, 9), w=st.integers(1, 9),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    layout=st.sampled_from(LAYOUTS), squeeze=st.sampled_from(SQUEEZES), epilogue=st.sampled_from(EPILOGUES),
    kind=st.sampled_from(list(EXCITATIONS)), ties=st.booleans(),
    grads=st.sampled_from([(True, True, True), (True, False, False), (False, True, True), (False, False, True)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz(n, c, h, w, dtype, layout, squeeze, epilogue, kind, ties, grads, seed):
    if kind in NEEDS_BATCH and n < MIN_BATCH:
        n = MIN_BATCH
    check_against_reference(kind, (n, c, h, w), dtype, layout, squeeze, epilogue, seed=seed, ties=ties, grads=grads)
