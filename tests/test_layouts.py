"""Memory layouts: every backend that runs here gives the reference's values and gradients for
any input PyTorch can make, and writes nothing outside its outputs.

PyTorch calls a tensor contiguous (or channels_last) whatever the strides of its size-1
dimensions are, so kernels must derive every stride from the layout rule (N, C, L = H*W) and
never read one off a size-1 dimension. Hypothesis draws shapes with size-1 dimensions and
views of every kind: NCHW and channels_last with arbitrary size-1 strides and storage
offsets, a (N, L, C) sequence viewed as (N, C, L, 1), transposed, sliced and expanded views.
x, residual and the incoming gradient each live inside a NaN-poisoned buffer with guard
regions; after forward and backward those buffers must be bit-for-bit unchanged (nothing
writes through an input), and outputs that the op allocates are poisoned too
(conftest.poisoned_allocations), so an unwritten element shows up as NaN."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from se_kernels import available_backends, fused_se
from se_kernels.reference import se_reference

BACKENDS = available_backends("cpu")
GPU_BACKENDS = [b for b in available_backends("cuda") if b != "torch"] if torch.cuda.is_available() else []
KINDS = ("nchw", "channels_last", "sequence", "transposed", "sliced", "expanded")
GUARD = 16


def strides_for(kind: str, shape, size1_strides):
    """Element strides of a view of `kind` with `shape` (size-1 dimensions take the drawn
    strides where the kind allows any)."""
    n, c, h, w = shape
    if kind == "nchw":
        strides = [c * h * w, h * w, w, 1]
    elif kind in ("channels_last", "sequence"):
        strides = [h * w * c, 1, w * c, c]
    elif kind == "transposed":  # memory order N, C, W, H
        strides = [c * w * h, w * h, 1, h]
    elif kind == "sliced":  # every other pixel of a row twice as long
        strides = [c * h * 2 * w, h * 2 * w, 2 * w, 2]
    else:  # expanded along H: one row repeated
        strides = [c * w, w, 0, 1]
    if kind in ("nchw", "channels_last", "sequence"):
        strides = [s if size != 1 else size1_strides[i] for i, (size, s) in enumerate(zip(shape, strides))]
    return strides


def in_guarded_buffer(values: torch.Tensor, kind: str, size1_strides, offset: int, device: str = "cpu"):
    """A view of `kind` holding `values`, inside a NaN buffer with GUARD elements either side."""
    shape = tuple(values.shape)
    strides = strides_for(kind, shape, size1_strides)
    if kind == "expanded":
        values = values[:, :, :1].expand(shape)  # an expanded view repeats one row
    span = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides)) if values.numel() else 0
    buffer = torch.full((GUARD + offset + span + GUARD,), float("nan"), dtype=values.dtype, device=device)
    view = buffer.as_strided(shape, strides, GUARD + offset)
    if kind == "expanded":
        buffer.as_strided(shape[:2] + (1,) + shape[3:], strides, GUARD + offset).copy_(values[:, :, :1])
    elif values.numel():
        view.copy_(values)
    return view, buffer


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64).clone()


layouts = st.fixed_dictionaries({
    "kind": st.sampled_from(KINDS),
    "size1_strides": st.lists(st.integers(1, 40), min_size=4, max_size=4),
    "offset": st.integers(0, 5),
})


def check(backend, n, c, h, w, s, x_layout, r_layout, dy_layout, residual, out_activation, seed, device="cpu"):
    if x_layout["kind"] == "sequence":
        w = 1  # a (N, L, C) sequence seen as (N, C, L, 1)
    shape = (n, c, h, w)
    g = torch.Generator().manual_seed(seed)
    values = {
        "x": torch.randn(shape, generator=g, dtype=torch.float64) + 0.5,
        "residual": torch.randn(shape, generator=g, dtype=torch.float64),
        "dy": torch.randn(shape, generator=g, dtype=torch.float64),
    }
    w1 = (torch.randn(s, c, generator=g, dtype=torch.float64) * (2.0 / c) ** 0.5).to(device)
    b1 = (torch.randn(s, generator=g, dtype=torch.float64) * 0.5).to(device)
    w2 = (torch.randn(c, s, generator=g, dtype=torch.float64) * (2.0 / s) ** 0.5).to(device)
    b2 = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).to(device)
    views, buffers = {}, {}
    for name, layout in (("x", x_layout), ("residual", r_layout), ("dy", dy_layout)):
        kind = layout["kind"] if layout["kind"] != "sequence" or w == 1 else "channels_last"
        views[name], buffers[name] = in_guarded_buffer(values[name].to(device), kind, layout["size1_strides"],
                                                       layout["offset"], device)
    before = {name: bits(b) for name, b in buffers.items()}

    results = []
    for which in (backend, "reference"):
        x = views["x"].detach().requires_grad_()
        r = views["residual"].detach().requires_grad_() if residual else None
        params = [t.clone().requires_grad_() for t in (w1, b1, w2, b2)]
        if which == "reference":
            y = se_reference(x.contiguous(), *params, residual=r.contiguous() if r is not None else None,
                             out_activation=out_activation, activation="silu")
            y.backward(views["dy"].contiguous())
        else:
            y = fused_se(x, *params, residual=r, out_activation=out_activation, activation="silu", backend=which)
            y.backward(views["dy"])
        grads = [x.grad] + [p.grad for p in params] + ([r.grad] if r is not None else [])
        results.append([y.detach()] + grads)
    where = (f"backend={backend} device={device} shape={shape} S={s} "
             f"x={x_layout} r={r_layout} dy={dy_layout} seed={seed}")
    for i, (ours, ref) in enumerate(zip(*results)):
        assert ours.shape == ref.shape, where
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9, msg=f"output {i}: {where}")
    for name, b in buffers.items():
        assert torch.equal(bits(b), before[name]), f"{name}'s buffer was written: {where}"


def _test(backend, max_examples, max_size, device="cpu"):
    @pytest.mark.usefixtures("poisoned_allocations")
    @settings(max_examples=max_examples, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(n=st.integers(0, 3), c=st.integers(1, max_size), h=st.integers(1, 5), w=st.integers(1, 5),
           s=st.integers(1, 4), x_layout=layouts, r_layout=layouts, dy_layout=layouts, residual=st.booleans(),
           out_activation=st.sampled_from([None, "relu"]), seed=st.integers(0, 2**31 - 1))
    def test(n, c, h, w, s, x_layout, r_layout, dy_layout, residual, out_activation, seed):
        check(backend, n, c, h, w, s, x_layout, r_layout, dy_layout, residual, out_activation, seed, device)

    return test


test_cpu = pytest.mark.skipif("cpu" not in BACKENDS, reason="se_kernels._C not built")(_test("cpu", 120, 20))
test_torch = _test("torch", 40, 20)
test_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="needs TRITON_INTERPRET=1")(
    _test("triton", 40, 10))
test_gpu_triton = pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="needs a GPU")(
    _test("triton", 150, 70, "cuda"))
test_gpu_cuda = pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="needs a GPU and the CUDA kernels")(
    _test("cuda", 150, 70, "cuda"))


def test_sequence_view_from_the_issue():
    """The view that broke the Triton backend: a (N, L, C) sequence seen as (N, C, L, 1), which is
    channels_last with an arbitrary stride(3)."""
    seq = torch.randn(2, 7, 16, dtype=torch.float64)
    x = seq.transpose(1, 2).unsqueeze(-1)
    assert x.is_contiguous(memory_format=torch.channels_last)
    w1, b1, w2, b2 = (torch.randn(*shape, dtype=torch.float64) for shape in ((4, 16), (4,), (16, 4), (16,)))
    for backend in BACKENDS:
        torch.testing.assert_close(fused_se(x, w1, b1, w2, b2, backend=backend), se_reference(x, w1, b1, w2, b2),
                                   rtol=1e-6, atol=1e-9, msg=backend)
