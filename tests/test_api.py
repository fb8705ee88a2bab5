"""The public API: input checks, backend choice and fallback, FusedSE, and the torch.library
integration (opcheck, torch.compile, export, autocast)."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import CPU_BACKENDS, NATIVE_CPU, Case, fresh_seed, make_inputs, rel_err

from se_kernels import FusedSE, available_backends, fused_se, ops
from se_kernels.reference import ReferenceSE, se_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _valid():
    return dict(
        x=torch.randn(2, 8, 4, 4), w1=torch.randn(2, 8), b1=torch.randn(2), w2=torch.randn(8, 2), b2=torch.randn(8)
    )


def _call(**changes):
    args = _valid()
    kwargs = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return fused_se(args["x"], args["w1"], args["b1"], args["w2"], args["b2"], **kwargs)


BAD_INPUTS = [
    (dict(x=torch.randn(2, 8, 16)), ValueError, ["x must be 4-D", "(2, 8, 16)"]),
    (dict(x=torch.ones(2, 8, 4, 4, dtype=torch.int64)), TypeError, ["x.dtype", "int64"]),
    (dict(x=[[1.0]]), TypeError, ["x must be a torch.Tensor", "list"]),
    (dict(x=torch.randn(2, 8, 0, 4)), ValueError, ["H*W >= 1", "(2, 8, 0, 4)"]),
    (dict(x=torch.randn(2, 0, 4, 4), w1=torch.randn(2, 0), w2=torch.randn(0, 2), b2=torch.randn(0)), ValueError,
     ["C >= 1"]),
    (dict(w1=torch.randn(2, 6)), ValueError, ["w1", "(2, 6)", "C"]),
    (dict(w1=torch.randn(2, 8, 1)), ValueError, ["w1", "(2, 8, 1)"]),
    (dict(w1=torch.randn(0, 8), b1=None, w2=torch.randn(8, 0)), ValueError, ["w1", "S >= 1"]),
    (dict(w1=torch.randn(2, 8, 1, 2)), ValueError, ["w1", "(2, 8, 1, 2)"]),
    (dict(w2=torch.randn(8, 3)), ValueError, ["w2", "(8, 3)"]),
    (dict(w2=torch.randn(2, 8)), ValueError, ["w2", "(2, 8)"]),
    (dict(b1=torch.randn(3)), ValueError, ["b1", "(3,)"]),
    (dict(b2=torch.randn(4)), ValueError, ["b2", "(4,)"]),
    (dict(b1=[0.0, 0.0]), TypeError, ["b1 must be a torch.Tensor or None"]),
    (dict(residual=torch.randn(2, 8, 4, 5)), ValueError, ["residual", "(2, 8, 4, 5)", "(2, 8, 4, 4)"]),
    (dict(w1=torch.randn(2, 8, dtype=torch.float64)), TypeError, ["w1 has dtype torch.float64", "torch.float32"]),
    (dict(residual=torch.randn(2, 8, 4, 4, dtype=torch.float16)), TypeError, ["residual has dtype"]),
    (dict(b2=torch.randn(8, device="meta")), ValueError, ["b2 is on meta", "x is on cpu"]),
    (dict(activation="tanh"), ValueError, ["activation", "tanh"]),
    (dict(gate="softmax"), ValueError, ["gate", "softmax"]),
    (dict(out_activation="gelu"), ValueError, ["out_activation", "gelu"]),
    (dict(backend="gpu"), ValueError, ["backend", "gpu"]),
]


@pytest.mark.parametrize("changes,error,words", BAD_INPUTS)
def test_bad_inputs_raise_named_errors(changes, error, words):
    with pytest.raises(error) as info:
        _call(**changes)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@NATIVE_CPU
def test_direct_op_calls_check_their_inputs():
    a = _valid()
    with pytest.raises(ValueError, match="x must be 4-D"):
        torch.ops.se_kernels.se_forward(a["x"][0], a["w1"], None, a["w2"], None, None, "relu", "sigmoid", None)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.se_kernels.se_forward(a["x"], a["w1"], None, a["w2"], None, None, "tanh", "sigmoid", None)
    with pytest.raises(RuntimeError, match="contiguous"):
        x = torch.randn(2, 16, 4, 4)[:, ::2]
        torch.ops.se_kernels.se_forward(x, a["w1"], None, a["w2"], None, None, "relu", "sigmoid", None)


def test_available_backends():
    cpu = [b for b in available_backends("cpu") if b != "triton"]  # triton: only under TRITON_INTERPRET=1
    assert cpu[-1] == "torch"
    assert ("cpu" in cpu) == (ops.extension_error() is None)
    assert [b for b in available_backends(torch.device("cpu")) if b != "triton"] == cpu
    assert "torch" in available_backends("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_backends_need_a_gpu():
    """Built CUDA kernels and an importable Triton are not enough: without a visible GPU,
    "cuda" and "triton" are not offered for CUDA tensors, and naming them says why."""
    assert available_backends("cuda") == ["torch"]
    for backend in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match="not available: .*(no CUDA device is visible|not usable|without CUDA)"):
            ops.resolve_backend(backend, "cuda")


def test_named_backend_for_other_device_raises():
    with pytest.raises(RuntimeError, match="'cuda' backend takes CUDA tensors"):
        _call(backend="cuda")


def test_environment_variable_overrides_auto(monkeypatch):
    calls = []
    real = ops._FORWARD_OPS["cpu"]
    monkeypatch.setitem(ops._FORWARD_OPS, "cpu", lambda: calls.append(1) or real())
    monkeypatch.setenv("SE_KERNELS_BACKEND", "torch")
    _call()
    assert calls == []
    if "cpu" in CPU_BACKENDS:
        monkeypatch.setenv("SE_KERNELS_BACKEND", "cpu")
        _call()
        assert calls == [1]
        monkeypatch.delenv("SE_KERNELS_BACKEND")
        _call()
        assert calls == [1, 1]
    monkeypatch.setenv("SE_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SE_KERNELS_BACKEND"):
        _call()
    monkeypatch.setenv("SE_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="'cuda' backend takes CUDA tensors"):
        _call()


def test_without_extension_auto_falls_back_with_one_warning():
    """Run in a fresh interpreter where importing se_kernels._C fails."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys, warnings

        class BlockExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "se_kernels._C":
                    raise ImportError("blocked by the test")
                return None

        sys.meta_path.insert(0, BlockExtension())
        import torch
        import se_kernels
        from se_kernels import available_backends, fused_se
        from se_kernels.reference import se_reference

        assert available_backends("cpu") == ["torch"], available_backends("cpu")
        x, w1, w2 = torch.randn(2, 8, 3, 3), torch.randn(2, 8), torch.randn(8, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = fused_se(x, w1, None, w2, None)
            fused_se(x, w1, None, w2, None)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "pip install" in messages[0], messages
        assert torch.equal(y, se_reference(x, w1, None, w2, None))
        try:
            fused_se(x, w1, None, w2, None, backend="cpu")
        except RuntimeError as e:
            assert "did not load" in str(e) and "pip install" in str(e), str(e)
        else:
            raise AssertionError("backend='cpu' without the extension did not raise")
        print("fallback ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("SE_KERNELS_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fallback ok" in done.stdout


# ---- FusedSE ----------------------------------------------------------------------------


def test_fused_se_defaults_and_parameters():
    m = FusedSE(64)
    assert (m.channels, m.squeeze_channels) == (64, 4)
    assert FusedSE(8).squeeze_channels == 1
    assert FusedSE(64, reduction=4).squeeze_channels == 16
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "fc1.weight": (4, 64, 1, 1), "fc1.bias": (4,), "fc2.weight": (64, 4, 1, 1), "fc2.bias": (64,)
    }
    assert "fc1.bias" not in FusedSE(64, bias=False).state_dict()
    assert "channels=64" in repr(m)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(channels=0), "channels"),
        (dict(channels=8, squeeze_channels=0), "squeeze_channels"),
        (dict(channels=8, reduction=0), "reduction"),
        (dict(channels=8, activation="tanh"), "activation"),
        (dict(channels=8, gate="tanh"), "gate"),
        (dict(channels=8, backend="tpu"), "backend"),
    ],
)
def test_fused_se_constructor_checks(kwargs, words):
    with pytest.raises(ValueError, match=words):
        FusedSE(**kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_se_loads_torchvision_state_dict(backend):
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.ops.SqueezeExcitation(32, 8)
    m = FusedSE(32, 8, backend=backend)
    m.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(3, 32, 6, 6)
    torch.testing.assert_close(m(x), tv(x), rtol=1e-5, atol=1e-6)
    back = torchvision.ops.SqueezeExcitation(32, 8)
    back.load_state_dict(m.state_dict(), strict=True)


def test_fused_se_deepcopy_and_pickle():
    m = FusedSE(16, 4, activation="silu", out_activation="relu")
    x, r = torch.randn(2, 16, 3, 3), torch.randn(2, 16, 3, 3)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (copy.deepcopy(m), loaded):
        assert torch.equal(other(x, r), m(x, r))


# ---- torch.library integration ----------------------------------------------------------


def _op_args(case: Case, dtype=torch.float32):
    t = make_inputs(case, dtype, fresh_seed())
    return (t["x"], t["w1"], t["b1"], t["w2"], t["b2"], t["residual"], case.activation, case.gate,
            case.out_activation)


OPCHECK_CASES = [
    Case((2, 8, 3, 3), 2),
    Case((2, 8, 3, 3), 2, "silu", "hardsigmoid", False, True, "relu", channels_last=True),
    Case((3, 12, 1, 1), 3, "gelu", "sigmoid", True, False, "relu"),
    Case((0, 8, 2, 2), 2, "hardswish", "sigmoid", True, True, "relu"),
]


@NATIVE_CPU
@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(case, dtype):
    args = _op_args(case, dtype)
    torch.library.opcheck(torch.ops.se_kernels.se_forward.default, args)
    grad_args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.se_kernels.se_forward.default, grad_args)
    y, pooled, hidden, logits, mask = torch.ops.se_kernels.se_forward(*args)
    x, w1, _, w2 = args[:4]
    for need_x, need_r in [(True, True), (False, False)]:
        bargs = (torch.randn_like(y), x, w1, w2, pooled, hidden, logits, mask, case.activation, case.gate,
                 case.out_activation, need_x, need_r)
        torch.library.opcheck(torch.ops.se_kernels.se_backward.default, bargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    m = FusedSE(24, 6, activation="silu", out_activation="relu", backend=backend)
    x = torch.randn(3, 24, 5, 5, requires_grad=True)
    r = torch.randn(3, 24, 5, 5, requires_grad=True)

    def step(x, r):
        return (m(x, r) * torch.arange(5.0)).sum()

    explanation = torch._dynamo.explain(step)(x, r)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, r)
    loss.backward()
    got = [x.grad.clone(), r.grad.clone(), m.fc1.weight.grad.clone(), m.fc2.bias.grad.clone()]
    for t in (x, r, m.fc1.weight, m.fc2.bias):
        t.grad = None
    expected_loss = step(x, r)
    expected_loss.backward()
    expected = [x.grad, r.grad, m.fc1.weight.grad, m.fc2.bias.grad]
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-4)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_export(backend):
    m = FusedSE(16, 4, gate="hardsigmoid", out_activation="relu", backend=backend)
    x, r = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    ep = torch.export.export(m, (x, r))
    x2, r2 = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(ep.module()(x2, r2), m(x2, r2), rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_bfloat16_follows_autocast_dtype(backend):
    m = FusedSE(32, 8, backend=backend)
    x = torch.randn(4, 32, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.fc1.weight.grad.dtype == torch.float32
    ref = ReferenceSE(32, 8)
    ref.load_state_dict(m.state_dict())
    assert rel_err(y, ref(x.detach())) < 2e-2


def test_reference_backend_is_the_reference():
    t = make_inputs(Case((2, 8, 3, 3), 2, "gelu", "hardsigmoid"), torch.float32, fresh_seed())
    y = fused_se(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], activation="gelu", gate="hardsigmoid", backend="torch")
    assert torch.equal(y, se_reference(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], activation="gelu",
                                       gate="hardsigmoid"))


# ---- the op's own contract (direct torch.ops calls, fake kernels, autocast) --------------

# (change to the valid arguments, exception, words) for the fake kernels: what the native
# kernels check (csrc/se_common.h), under meta tensors and torch.compile.
FAKE_BAD = [
    (dict(w1=torch.randn(3, 5)), ValueError, ["w1 must have shape (S, C) with C = 8", "[3, 5]"]),
    (dict(w2=torch.randn(8, 3)), ValueError, ["w2 must have shape (C, S) = (8, 2)", "[8, 3]"]),
    (dict(b1=torch.randn(5)), ValueError, ["b1 must have shape (2,)", "[5]"]),
    (dict(b2=torch.randn(8, dtype=torch.float64)), TypeError, ["b2 has dtype"]),
    (dict(residual=torch.randn(2, 8, 4, 5)), ValueError, ["residual must have x's shape"]),
    (dict(x=torch.randn(2, 8, 16)), ValueError, ["x must be 4-D"]),
]


def _forward_ops():
    out = []
    if "cpu" in CPU_BACKENDS:
        out.append(torch.ops.se_kernels.se_forward.default)
    if "triton" in available_backends("cpu"):
        out.append(torch.ops.se_kernels.triton_se_forward.default)
    return out


@pytest.mark.parametrize("op", _forward_ops(), ids=str)
@pytest.mark.parametrize("change,error,words", FAKE_BAD)
def test_fake_kernel_checks_like_the_kernel(op, change, error, words):
    args = dict(x=torch.randn(2, 8, 4, 4), w1=torch.randn(2, 8), b1=torch.randn(2), w2=torch.randn(8, 2),
                b2=torch.randn(8), residual=None)
    args.update(change)
    call = lambda **a: op(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], a["residual"], "relu", "sigmoid", None)  # noqa: E731
    meta = {k: (v.to("meta") if v is not None else None) for k, v in args.items()}
    for where, a in (("meta", meta), ("real", args)):
        with pytest.raises(error) as info:
            call(**a)
        for w in words:
            assert w in str(info.value), f"{where}: {info.value}"


@pytest.mark.parametrize("op", _forward_ops(), ids=str)
def test_fake_kernel_checks_under_compile(op):
    """A graph that passes a w1 of the wrong width fails when traced, not with wrong output."""
    torch._dynamo.reset()
    x, w1, w2 = torch.randn(2, 8, 4, 4), torch.randn(3, 5), torch.randn(8, 3)
    fn = torch.compile(lambda x, w1, w2: op(x, w1, None, w2, None, None, "relu", "sigmoid", None)[0],
                       fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="w1 must have shape"):
        fn(x, w1, w2)


@pytest.mark.parametrize("op", _forward_ops(), ids=str)
def test_direct_op_call_follows_autocast(op):
    """torch.ops.se_kernels.se_forward itself (not only fused_se) computes in the autocast dtype,
    and float64 is left alone, as autocast does."""
    t = make_inputs(Case((2, 8, 3, 3), 2), torch.float32, fresh_seed())
    args = (t["x"], t["w1"], t["b1"], t["w2"], t["b2"], None, "relu", "sigmoid", None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(*args)[0]
        y64 = op(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))[0]
    assert y.dtype == torch.bfloat16 and y64.dtype == torch.float64
    expected = op(*(a.bfloat16() if isinstance(a, torch.Tensor) else a for a in args))[0]
    assert torch.equal(y, expected)


def test_import_is_light():
    """`import se_kernels` must not import torch._dynamo (~1 s) or, on a machine where the Triton
    backend cannot run, Triton (~0.4 s); and it costs at most 0.3 s beyond `import torch`
    (asserted with a 2x margin, medians of 3 runs: the machine may be busy)."""
    code = textwrap.dedent(
        """
        import sys, time
        t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
        import se_kernels; t2 = time.perf_counter()
        print(t2 - t1, "torch._dynamo" in sys.modules, "triton" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        seconds, dynamo, triton = out.stdout.split()
        assert dynamo == "False", "import se_kernels imported torch._dynamo"
        assert triton == "False", "import se_kernels imported Triton on a machine that cannot run it"
        runs.append(float(seconds))
    assert sorted(runs)[1] < 0.6, f"import se_kernels took {sorted(runs)[1]:.2f} s beyond import torch"
