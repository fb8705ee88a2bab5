"""The registered ops: fake kernels for se_kernels::se_forward/se_backward (schemas in
csrc/se.cpp, autograd in csrc/se_autograd.cpp), the memory-layout rule the kernels rely on,
and backend choice.

se_forward returns (y, pooled, hidden, gate_logits, relu_mask); the last four are what the
backward needs besides x and the weights: three (N, C)/(N, S) float tensors and, with the
relu epilogue, one bit per element of y (see csrc/se.cpp).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import List, Optional

import torch

from . import reference

BACKENDS = ("triton", "cuda", "cpu", "torch")

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.se_kernels.*)

    _EXT_ERROR: Optional[BaseException] = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _EXT_ERROR = exc

from . import differentiable  # noqa: E402, F401  (registers se_kernels::se_backward_differentiable)


def extension_error() -> Optional[BaseException]:
    """Why se_kernels._C did not load, or None if it did."""
    return _EXT_ERROR


# ---------------------------------------------------------------------------------------
# Memory layout. The kernels walk x as NCHW rows (H*W pixels of one channel) or as
# channels_last rows (C channels of one pixel; also whenever H*W == 1). Every tensor shaped
# like x that a kernel reads or writes has x's layout.


def uses_pixel_rows(x: torch.Tensor) -> bool:
    return x.shape[2] * x.shape[3] == 1 or not x.is_contiguous()


def as_kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself if the kernels can walk it, else a copy they can: NCHW, or channels_last when
    H*W == 1 (pixel rows; note an empty tensor is NCHW-contiguous whatever its strides, but
    not necessarily channels_last-contiguous)."""
    one_pixel = x.shape[2] * x.shape[3] == 1
    if not one_pixel and x.is_contiguous():
        return x
    if x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=torch.channels_last) if one_pixel else x.contiguous()


def like_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if uses_pixel_rows(x):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def relu_mask_shape(x: torch.Tensor) -> tuple:
    """The relu epilogue's bit mask for x: one row of ceil(row_len / 8) bytes per kernel row."""
    n, c, h, w = x.shape
    rows, row_len = (h * w, c) if uses_pixel_rows(x) else (c, h * w)
    return n, rows, (row_len + 7) // 8


# ---------------------------------------------------------------------------------------
# Fake kernels: output metadata without computing (torch.compile, export, meta tensors). They
# check what the native kernels check (csrc/se_common.h, check_forward_args and
# check_backward_args), with torch._check so that symbolic shapes become guards.

def _check_options(activation, gate, out_activation) -> None:
    for name, value in (("activation", activation), ("gate", gate), ("out_activation", out_activation)):
        message = reference.option_error(name, value)
        torch._check_value(message is None, lambda: f"se_kernels: {message}")  # noqa: B023 (called within this iteration)


def _check_like_x(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    torch._check_type(t.dtype == x.dtype, lambda: f"se_kernels: {name} has dtype {t.dtype} but x has {x.dtype}")
    torch._check_value(t.device == x.device, lambda: f"se_kernels: {name} is on {t.device} but x is on {x.device}")


def _check_layout(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    layout = torch.channels_last if uses_pixel_rows(x) else torch.contiguous_format
    torch._check(t.is_contiguous(memory_format=layout), lambda: f"se_kernels: {name} must have x's memory layout")


def check_forward_args(x, w1, b1, w2, b2, residual) -> None:
    torch._check_value(x.dim() == 4, lambda: f"se_kernels: x must be 4-D (N, C, H, W); got shape {list(x.shape)}")
    torch._check_type(x.dtype.is_floating_point, lambda: f"se_kernels: x must be floating point; got {x.dtype}")
    n, c, h, w = x.shape
    torch._check_value(c >= 1 and h * w >= 1,
                       lambda: f"se_kernels: x needs C >= 1 and H*W >= 1; got shape {list(x.shape)}")
    torch._check(
        x.is_contiguous(memory_format=torch.channels_last if uses_pixel_rows(x) else torch.contiguous_format),
        lambda: f"se_kernels: x must be NCHW-contiguous or channels_last-contiguous; got strides {list(x.stride())}",
    )
    torch._check_value(w1.dim() == 2 and w1.shape[1] == c and w1.shape[0] >= 1,
                       lambda: f"se_kernels: w1 must have shape (S, C) with C = {c}; got {list(w1.shape)}")
    s = w1.shape[0]
    torch._check_value(w2.dim() == 2 and w2.shape[0] == c and w2.shape[1] == s,
                       lambda: f"se_kernels: w2 must have shape (C, S) = ({c}, {s}); got {list(w2.shape)}")
    for name, t, size in (("w1", w1, None), ("w2", w2, None), ("b1", b1, s), ("b2", b2, c)):
        if t is None:
            continue
        _check_like_x(name, t, x)
        if size is not None:
            torch._check_value(t.dim() == 1 and t.shape[0] == size,
                               lambda: f"se_kernels: {name} must have shape ({size},); got {list(t.shape)}")  # noqa: B023 (called within this iteration)
    if residual is not None:
        _check_like_x("residual", residual, x)
        torch._check_value(residual.shape == x.shape,
                           lambda: f"se_kernels: residual must have x's shape {list(x.shape)}; "
                                   f"got {list(residual.shape)}")
        _check_layout("residual", residual, x)


def check_backward_args(grad_y, x, w1, w2, pooled, hidden, gate_logits, relu_mask, out_activation) -> None:
    check_forward_args(x, w1, None, w2, None, None)
    n, c, h, w = x.shape
    s = w1.shape[0]
    torch._check_value(grad_y.shape == x.shape and grad_y.dtype == x.dtype,
                       lambda: f"se_kernels: grad_y must match x in shape and dtype; "
                               f"got {list(grad_y.shape)} {grad_y.dtype}")
    torch._check_value(grad_y.device == x.device,
                       lambda: f"se_kernels: grad_y is on {grad_y.device} but x is on {x.device}")
    _check_layout("grad_y", grad_y, x)
    acc = accumulation_dtype(x.dtype)
    for name, t, cols in (("pooled", pooled, c), ("hidden", hidden, s), ("gate_logits", gate_logits, c)):
        torch._check(
            t.dim() == 2 and t.shape[0] == n and t.shape[1] == cols and t.is_contiguous() and t.dtype == acc
            and t.device == x.device,
            lambda: f"se_kernels: {name} must be a contiguous ({n}, {cols}) {acc} tensor on {x.device}; got "  # noqa: B023 (called within this iteration)
                    f"{list(t.shape)} {t.dtype} on {t.device}",  # noqa: B023 (called within this iteration)
        )
    if out_activation == "relu":
        expected = relu_mask_shape(x)
        torch._check(
            relu_mask.dtype == torch.uint8 and relu_mask.is_contiguous() and tuple(relu_mask.shape) == expected
            and relu_mask.device == x.device,
            lambda: f"se_kernels: relu_mask must be a contiguous uint8 tensor of shape {expected} on {x.device}; "
                    f"got {list(relu_mask.shape)} {relu_mask.dtype} on {relu_mask.device}",
        )


def forward_fake(x, w1, b1, w2, b2, residual, activation, gate, out_activation):
    _check_options(activation, gate, out_activation)
    check_forward_args(x, w1, b1, w2, b2, residual)
    n, c, h, w = x.shape
    s = w1.shape[0]
    acc = accumulation_dtype(x.dtype)
    if out_activation == "relu":
        relu_mask = x.new_empty(relu_mask_shape(x), dtype=torch.uint8)
    else:
        relu_mask = x.new_empty((0,), dtype=torch.uint8)
    return (
        torch.empty_like(x),
        x.new_empty((n, c), dtype=acc),
        x.new_empty((n, s), dtype=acc),
        x.new_empty((n, c), dtype=acc),
        relu_mask,
    )


def backward_fake(
    grad_y, x, w1, w2, pooled, hidden, gate_logits, relu_mask, activation, gate, out_activation,
    need_grad_x, need_grad_residual,
):
    _check_options(activation, gate, out_activation)
    check_backward_args(grad_y, x, w1, w2, pooled, hidden, gate_logits, relu_mask, out_activation)
    grad_x = torch.empty_like(x) if need_grad_x else x.new_empty((0,))
    if need_grad_residual and out_activation == "relu":
        grad_residual = torch.empty_like(x)
    else:
        grad_residual = x.new_empty((0,))
    return (
        grad_x,
        w1.new_empty(w1.shape),
        w1.new_empty((w1.shape[0],)),
        w2.new_empty(w2.shape),
        w2.new_empty((w2.shape[0],)),
        grad_residual,
    )


if _EXT_ERROR is None:
    # Autograd for se_forward is registered in C++ (csrc/se_autograd.cpp).
    torch.library.register_fake("se_kernels::se_forward")(forward_fake)
    torch.library.register_fake("se_kernels::se_backward")(backward_fake)


# ---------------------------------------------------------------------------------------
# Backends

# "auto" takes the first available backend in this order (the Triton interpreter on CPU tensors
# is for tests: last).
PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch", "triton")}

_triton_state: dict = {}


def triton_error() -> Optional[BaseException]:
    """Imports the Triton backend (registering torch.ops.se_kernels.triton_se_*) on first use;
    returns why it is unusable, or None. Importing Triton costs ~0.3-0.5 s, so `import
    se_kernels` does it only where the backend can run (a visible GPU, or TRITON_INTERPRET=1)."""
    if "error" not in _triton_state:
        try:
            import triton  # noqa: F401

            from .triton import op  # noqa: F401

            _triton_state["error"] = None
        except Exception as exc:  # noqa: BLE001 - Triton missing or unusable: the backend says why
            _triton_state["error"] = exc
    return _triton_state["error"]


if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    triton_error()


def _has_native_kernel(dispatch_key: str) -> bool:
    return _EXT_ERROR is None and torch.ops.se_kernels.se_forward.default.has_kernel_for_dispatch_key(dispatch_key)


_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the se_kernels checkout "
    "(see README.md, Install)"
)


def unavailable_reason(backend: str, device_type: str) -> Optional[str]:
    """None if `backend` can run tensors of `device_type`, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the 'cpu' backend takes CPU tensors, and x is on {device_type}"
        if _EXT_ERROR is not None:
            return f"the native extension se_kernels._C did not load ({_EXT_ERROR}); {_BUILD_HINT}"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the 'cuda' backend takes CUDA tensors, and x is on {device_type}"
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        if _EXT_ERROR is not None:
            return f"the native extension se_kernels._C did not load ({_EXT_ERROR}); {_BUILD_HINT}"
        if not _has_native_kernel("CUDA"):
            return (
                "se_kernels._C was built without CUDA kernels; rebuild with FORCE_CUDA=1 and "
                "CUDA_HOME pointing at a CUDA toolkit"
            )
        return None
    if backend == "triton":
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA device is visible (torch.cuda.is_available() is False)"
        elif device_type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
            return (
                f"the 'triton' backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, "
                f"for testing), and x is on {device_type}"
            )
        error = triton_error()
        if error is not None:
            return f"Triton is not usable ({error}); install the triton package that matches your torch"
        return None
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")


def available_backends(device="cpu") -> List[str]:
    """Backends that can run tensors on `device`, fastest first ("auto" takes the first)."""
    device_type = torch.device(device).type
    order = PREFERENCE.get(device_type, BACKENDS)
    return [b for b in order if unavailable_reason(b, device_type) is None]


_warned_fallback = set()
_auto_choice: dict = {}


def onnx_exporting() -> bool:
    """True inside torch.onnx.export (either exporter). torch.onnx is not imported by `import
    torch`; until something imports it, no export can be running."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def resolve_backend(backend: str, device_type: str) -> str:
    """The backend that runs a call: `backend` itself, or for "auto" the SE_KERNELS_BACKEND
    environment variable if set, else the fastest available. A backend named explicitly (by
    argument or variable) that cannot run raises RuntimeError saying why.

    Inside torch.onnx.export every call takes the "torch" backend, whatever was asked: the
    exported graph is then the standard ONNX operators of the unconverted model (the pool:
    ReduceMean with dynamo=True, GlobalAveragePool with the TorchScript exporter; Conv, the
    activation, Conv, the gate, Mul) that any ONNX runtime runs, rather than a custom op.

    torch.compile traces through this function (os.environ reads and the dict cache below are
    supported by Dynamo); it is deliberately not wrapped in torch.compiler.assume_constant_result,
    whose first use imports torch._dynamo (~1 s) at `import se_kernels`."""
    if onnx_exporting():
        return "torch"
    if backend == "auto":
        backend = os.environ.get("SE_KERNELS_BACKEND", "auto") or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(
                f"SE_KERNELS_BACKEND must be one of {('auto',) + BACKENDS}; got {backend!r}"
            )
    if backend != "auto":
        reason = unavailable_reason(backend, device_type)
        if reason is not None:
            raise RuntimeError(f"se_kernels backend {backend!r} is not available: {reason}")
        return backend
    # What "auto" picks for a device type is fixed once se_kernels is imported (the extension
    # and Triton either loaded or not), except that TRITON_INTERPRET lets Triton take CPU
    # tensors: cached per (device type, TRITON_INTERPRET), it costs a dict lookup per call.
    key = (device_type, os.environ.get("TRITON_INTERPRET"))
    chosen = _auto_choice.get(key)
    if chosen is None:
        chosen = _auto_choice[key] = available_backends(device_type)[0]
    if chosen == "torch" and device_type in PREFERENCE and device_type not in _warned_fallback:
        _warned_fallback.add(device_type)
        reasons = "; ".join(
            f"{b}: {unavailable_reason(b, device_type)}" for b in PREFERENCE[device_type] if b != "torch"
        )
        warnings.warn(
            f"se_kernels: no fused backend can run {device_type} tensors ({reasons}); backend 'auto' "
            f"falls back to the unfused 'torch' backend.",
            RuntimeWarning,
            stacklevel=3,
        )
    return chosen


_FORWARD_OPS = {
    "cpu": lambda: torch.ops.se_kernels.se_forward,
    "cuda": lambda: torch.ops.se_kernels.se_forward,
    "triton": lambda: torch.ops.se_kernels.triton_se_forward,
}


def run_backend(backend, x, w1, b1, w2, b2, residual, activation, gate, out_activation):
    """y from `backend`: the reference, or a fused op on the kernel layout."""
    if backend == "torch":
        return reference.se_reference(
            x, w1, b1, w2, b2, activation=activation, gate=gate, residual=residual,
            out_activation=out_activation,
        )
    x = as_kernel_layout(x)
    if residual is not None:
        residual = like_layout(residual, x)
    op = _FORWARD_OPS[backend]()
    return op(x, w1, b1, w2, b2, residual, activation, gate, out_activation)[0]
