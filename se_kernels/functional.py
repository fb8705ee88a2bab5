"""fused_se: the functional entry point, and the one place where inputs are checked."""

from __future__ import annotations

from typing import Optional

import torch

from . import ops, reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_options(activation, gate, out_activation, backend) -> None:
    """ValueError naming the allowed values (se_kernels/reference.py's lists) for an unknown one."""
    reference.check_options(activation, gate, out_activation)
    if backend != "auto" and backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + ops.BACKENDS}; got {backend!r}")


def _check_tensor(name: str, t, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}; got {type(t).__name__}")


def _weight_2d(name: str, w: torch.Tensor, rows: int, cols: int, rows_name: str, cols_name: str) -> torch.Tensor:
    if w.dim() == 4 and w.shape[2] == 1 and w.shape[3] == 1:
        w = w.reshape(w.shape[0], w.shape[1])
    if w.dim() != 2 or w.shape[0] != rows or w.shape[1] != cols:
        raise ValueError(
            f"{name} must have shape ({rows_name}, {cols_name}) = ({rows}, {cols}) or ({rows}, {cols}, 1, 1); "
            f"got {name}.shape = {_shape(w)}"
        )
    return w


def _autocast_inputs(x, w1, b1, w2, b2, residual):
    """Under torch.autocast the op runs in the autocast dtype, like a linear layer: every
    float32/float16/bfloat16 input is cast to it (float64 is left alone, as autocast does)."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return x, w1, b1, w2, b2, residual
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if t is None or t.dtype == dtype or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return t
        return t.to(dtype)

    return tuple(cast(t) for t in (x, w1, b1, w2, b2, residual))


def check_types(x, w1, b1, w2, b2, residual) -> None:
    _check_tensor("x", x)
    _check_tensor("w1", w1)
    _check_tensor("w2", w2)
    _check_tensor("b1", b1, optional=True)
    _check_tensor("b2", b2, optional=True)
    _check_tensor("residual", residual, optional=True)


def check_inputs(x, w1, b1, w2, b2, residual):
    """Raises TypeError/ValueError naming the argument and the shapes; returns w1, w2 as 2-D."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64; got x.dtype = {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W); got x.shape = {_shape(x)}")
    n, c, h, w = x.shape
    if c < 1:
        raise ValueError(f"x must have C >= 1 channels; got x.shape = {_shape(x)}")
    if h * w < 1:
        raise ValueError(f"x must have H*W >= 1; got x.shape = {_shape(x)}")
    if w1.dim() not in (2, 4) or w1.shape[0] < 1:
        raise ValueError(f"w1 must have shape (S, C) or (S, C, 1, 1) with S >= 1; got w1.shape = {_shape(w1)}")
    s = w1.shape[0]
    w1 = _weight_2d("w1", w1, s, c, "S", "C")
    w2 = _weight_2d("w2", w2, c, s, "C", "S")
    if b1 is not None and (b1.dim() != 1 or b1.shape[0] != s):
        raise ValueError(f"b1 must have shape (S,) = ({s},); got b1.shape = {_shape(b1)}")
    if b2 is not None and (b2.dim() != 1 or b2.shape[0] != c):
        raise ValueError(f"b2 must have shape (C,) = ({c},); got b2.shape = {_shape(b2)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"residual must have x's shape {_shape(x)}; got residual.shape = {_shape(residual)}"
        )
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("residual", residual)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
        if t.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype "
                "(or run under torch.autocast)"
            )
    return w1, w2


def fused_se(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    *,
    activation: str = "relu",
    gate: str = "sigmoid",
    residual: Optional[torch.Tensor] = None,
    out_activation: Optional[str] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Squeeze-and-Excitation as one fused op, forward and backward.

    y = out_activation(x * gate(act(mean_hw(x) w1^T + b1) w2^T + b2)[:, :, None, None] + residual)

    Args:
        x: (N, C, H, W), float32/float16/bfloat16/float64, NCHW or channels_last (other
            strides are copied to NCHW first).
        w1: (S, C) or (S, C, 1, 1); b1: (S,) or None.
        w2: (C, S) or (C, S, 1, 1); b2: (C,) or None.
        activation: "relu" | "silu" | "gelu" | "hardswish".
        gate: "sigmoid" | "hardsigmoid".
        residual: None or a tensor shaped like x, added before out_activation.
        out_activation: None | "relu".
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch" (see available_backends).
    Returns:
        y, (N, C, H, W), in x's dtype (the autocast dtype under torch.autocast).
    """
    check_options(activation, gate, out_activation, backend)
    check_types(x, w1, b1, w2, b2, residual)
    x, w1, b1, w2, b2, residual = _autocast_inputs(x, w1, b1, w2, b2, residual)
    w1_2d, w2_2d = check_inputs(x, w1, b1, w2, b2, residual)
    chosen = ops.resolve_backend(backend, x.device.type)
    if chosen == "torch":  # the reference takes the weights as given (an ONNX export then has no reshapes)
        return ops.run_backend(chosen, x, w1, b1, w2, b2, residual, activation, gate, out_activation)
    return ops.run_backend(chosen, x, w1_2d, b1, w2_2d, b2, residual, activation, gate, out_activation)
