"""FusedChannelAttention and convert_se_modules' generic path: every channel-attention flavour
FusedSE does not compute (timm ESE, hgnet ESE, ECA, circular ECA, SE with a norm layer, another
activation or add_maxpool, torchvision SE with Mish / tanh-GELU ...) converts losslessly: float64
outputs and every gradient equal to the original's, float32 close, checkpoints both ways, the same
Parameter objects, channels_last, bfloat16; and whole timm models of each family convert
completely and compute what the originals do, to the models' own float64 sensitivity."""

from __future__ import annotations

import copy
import functools
import io
import logging
import re

import pytest
import torch
from helpers import NATIVE_CPU, rel_err
from torch import nn

from se_kernels import FusedSE, convert_se_modules
from se_kernels.channel_attention import FusedChannelAttention
from se_kernels.convert import channel_attention_modules, convert_with_report
from se_kernels.flavours import UnsupportedSE, describe_attention

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from timm.layers.eca import CecaModule, EcaModule  # noqa: E402
from timm.layers.gather_excite import GatherExcite  # noqa: E402
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule, SqueezeExciteCl  # noqa: E402
from timm.models._efficientnet_blocks import SqueezeExcite  # noqa: E402
from timm.models.hgnet import EseModule  # noqa: E402

C = 24


class LeakySELayer(nn.Module):
    """senet.pytorch's SELayer with a LeakyReLU (FusedSE has none)."""

    def __init__(self, channel, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channel, channel // reduction), nn.LeakyReLU(0.1),
                                nn.Linear(channel // reduction, channel), nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        return x * self.fc(y).view(b, c, 1, 1)


def se_with_bn():
    se = SEModule(C, rd_ratio=0.25, norm_layer=nn.BatchNorm2d)
    with torch.no_grad():  # eval mode then normalises with statistics that are not the identity
        se.bn.running_mean.uniform_(-0.3, 0.3)
        se.bn.running_var.uniform_(0.5, 2.0)
        se.bn.weight.uniform_(0.5, 1.5)
        se.bn.bias.uniform_(-0.5, 0.5)
    return se


# name -> (builder, train mode, the kind convert_se_modules reports)
FLAVOURS = {
    "ese": (lambda: EffectiveSEModule(C), False, "timm EffectiveSEModule"),
    "ese_add_maxpool": (lambda: EffectiveSEModule(C, add_maxpool=True), False, "timm EffectiveSEModule (add_maxpool)"),
    "hgnet_ese": (lambda: EseModule(C), False, "timm hgnet EseModule"),
    "eca": (lambda: EcaModule(C), False, "timm EcaModule"),
    "eca_k5_any_channels": (lambda: EcaModule(kernel_size=5), False, "timm EcaModule"),
    "eca_use_mlp": (lambda: EcaModule(C, use_mlp=True), False, "timm EcaModule (use_mlp)"),
    "ceca": (lambda: CecaModule(C), False, "timm CecaModule"),
    "ceca_k7": (lambda: CecaModule(kernel_size=7, act_layer=nn.ReLU), False, "timm CecaModule"),
    "se_bn_eval": (se_with_bn, False, "timm SEModule (BatchNorm2d)"),
    "se_bn_train": (se_with_bn, True, "timm SEModule (BatchNorm2d)"),
    "se_leaky_relu": (lambda: SEModule(C, rd_ratio=0.25, act_layer=nn.LeakyReLU), False, "timm SEModule (LeakyReLU)"),
    "se_prelu": (lambda: SEModule(C, rd_ratio=0.25, act_layer=nn.PReLU), False, "timm SEModule (PReLU)"),
    "se_add_maxpool": (lambda: SEModule(C, rd_ratio=0.25, add_maxpool=True), False, "timm SEModule (add_maxpool)"),
    "tv_mish": (lambda: torchvision.ops.SqueezeExcitation(C, 6, activation=nn.Mish), False,
                "torchvision SqueezeExcitation (Mish)"),
    "tv_gelu_tanh": (lambda: torchvision.ops.SqueezeExcitation(C, 6, activation=functools.partial(
        nn.GELU, approximate="tanh")), False, "torchvision SqueezeExcitation (GELU(approximate='tanh'))"),
    "effnet_se_elu_tanh": (lambda: SqueezeExcite(C, act_layer=nn.ELU, gate_layer=nn.Tanh), False,
                           "timm SqueezeExcite (ELU, Tanh)"),
    "se_layer_leaky": (lambda: LeakySELayer(C), False, "SELayer (senet.pytorch) (LeakyReLU)"),
    "gather_excite_global": (lambda: GatherExcite(C, use_mlp=False, add_maxpool=True), False,
                             "timm GatherExcite (add_maxpool)"),
}


def build(name, dtype=torch.float64):
    torch.manual_seed(0)
    builder, train, _ = FLAVOURS[name]
    return builder().to(dtype).train(train)


def inputs(dtype=torch.float64, shape=(4, C, 6, 5), seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    return x, dy


def step(module, x, dy, residual=None, **kw):
    """Output, x's gradient, every parameter's gradient and every buffer (after the call)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = module(x, **kw) if residual is None else module(x, residual=residual, **kw)
    y.backward(dy)
    out = {"y": y.detach(), "x": x.grad}
    out.update({f"grad {k}": p.grad for k, p in module.named_parameters()})
    out.update({f"buffer {k}": b.detach().clone() for k, b in module.named_buffers()})
    return out


def assert_matches(got, want, rtol, where=""):
    """Every tensor within rtol of its reference's norm, plus rtol of the largest parameter
    gradient's norm: a gradient that is 0 in exact arithmetic (fc1's bias before a train-mode
    BatchNorm) is rounding noise in both."""
    assert got.keys() == want.keys()
    grads = [v.double().norm().item() for k, v in want.items() if k.startswith("grad") and v is not None]
    scale = max(grads, default=0.0)
    for k in want:
        if want[k] is None:
            assert got[k] is None, f"{k}: {where}"
            continue
        assert got[k].dtype == want[k].dtype, f"{k}: {where}"
        if want[k].dtype in (torch.int64,):
            assert torch.equal(got[k], want[k]), f"{k}: {where}"
            continue
        diff = (got[k].double() - want[k].double()).norm().item()
        bound = rtol * want[k].double().norm().item() + (rtol * scale if k.startswith("grad") else 0.0)
        assert diff <= bound, f"{k}: |diff| {diff:.3g} > {bound:.3g} {where}"


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_recognised_and_converted_with_its_kind(name, caplog):
    original = build(name)
    expected_kind = FLAVOURS[name][2]
    assert describe_attention(original).kind == expected_kind
    with caplog.at_level(logging.INFO, logger="se_kernels.convert"):
        fused = convert_se_modules(original)
    assert isinstance(fused, FusedChannelAttention)
    assert f"converted 1 SE module(s) (1 {expected_kind} [generic]); left 0 unconverted" in caplog.text
    assert repr(expected_kind) in repr(fused)


@NATIVE_CPU
@pytest.mark.parametrize("name", list(FLAVOURS))
def test_float64_output_and_every_gradient_equal(name):
    """float64: output, x's gradient, every parameter gradient and the buffers after the call
    (BatchNorm running statistics) equal the original's up to summation order (1e-12)."""
    original = build(name)
    fused = FusedChannelAttention.from_module(copy.deepcopy(original), backend="cpu")
    shape = (4, 16, 6, 5) if name == "eca_k5_any_channels" else (4, C, 6, 5)  # it takes any C
    x, dy = inputs(shape=shape)
    assert_matches(step(fused, x, dy), step(original, x, dy), 1e-12, name)


def eca_module(kernel_size, gate=None, bias=False, dtype=torch.float64):
    torch.manual_seed(kernel_size)
    module = EcaModule(kernel_size=kernel_size)
    if bias:
        module.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=True)
    if gate is not None:
        module.gate = gate
    return module.to(dtype).eval()


def ops_called(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


@NATIVE_CPU
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,kernel_size", [((4, 24, 6, 5), 3), ((3, 70, 7, 7), 5), ((2, 2, 3, 1), 7),
                                               ((5, 9, 1, 1), 3), ((0, 8, 3, 3), 3), ((3, 33, 11, 13), 9)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("epilogue", [False, True])
def test_eca_inference_is_one_op_equal_to_the_original(dtype, shape, kernel_size, layout, epilogue):
    """ECA without gradients runs as se_kernels::ca_eca_forward alone (no stage op, no
    convolution), and gives the original's output (float64 to 1e-13, float32 to 1e-6), every
    element written (poisoned allocations), with the residual + relu epilogue too."""
    original = eca_module(kernel_size, dtype=dtype)
    fused = FusedChannelAttention.from_module(copy.deepcopy(original), out_activation="relu" if epilogue else None,
                                              backend="cpu")
    g = torch.Generator().manual_seed(sum(shape) + kernel_size)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) + 0.5
    residual = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if epilogue else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y, called = ops_called(lambda: fused(x, residual))
        if shape[0] == 0:  # timm's EcaModule cannot view an empty batch; the empty output
            want = torch.empty(shape, dtype=dtype)
        else:
            want = original(x) if residual is None else torch.relu(original(x) + residual)
    assert "se_kernels::ca_eca_forward" in called
    assert not [name for name in called if "ca_pool" in name or "ca_scale" in name or "conv" in name]
    assert y.shape == want.shape and y.dtype == dtype
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)


@NATIVE_CPU
@pytest.mark.parametrize("gate,bias", [(nn.Hardsigmoid(), False), (nn.Sigmoid(), True)])
def test_eca_inference_gates_and_bias(gate, bias):
    original = eca_module(5, gate=gate, bias=bias)
    fused = FusedChannelAttention.from_module(copy.deepcopy(original), backend="cpu")
    x = torch.randn(3, 40, 5, 5, dtype=torch.float64) * 3
    with torch.no_grad():
        y, called = ops_called(lambda: fused(x))
        assert "se_kernels::ca_eca_forward" in called
        torch.testing.assert_close(y, original(x), rtol=1e-13, atol=1e-13)


@NATIVE_CPU
def test_eca_inference_only_where_it_applies():
    """Where a gradient is wanted, in bfloat16, under autocast, with a hooked gate or another
    gate class, the generic path runs (and still matches)."""
    original = eca_module(5, dtype=torch.float32)
    fused = FusedChannelAttention.from_module(copy.deepcopy(original), backend="cpu")
    x = torch.randn(2, 16, 4, 4)
    _, called = ops_called(lambda: fused(x))  # grad mode, parameters require grad
    assert "se_kernels::ca_eca_forward" not in called and "se_kernels::ca_pool" in called
    with torch.no_grad():
        _, called = ops_called(lambda: fused(x.bfloat16()))
        assert "se_kernels::ca_eca_forward" not in called
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, called = ops_called(lambda: fused(x))
        assert "se_kernels::ca_eca_forward" not in called
        handle = fused.gate.register_forward_hook(lambda *args: None)
        _, called = ops_called(lambda: fused(x))
        assert "se_kernels::ca_eca_forward" not in called
        handle.remove()
        tanh_gated = FusedChannelAttention.from_module(eca_module(5, gate=nn.Tanh(), dtype=torch.float32))
        y, called = ops_called(lambda: tanh_gated(x))
        assert "se_kernels::ca_eca_forward" not in called
        torch.testing.assert_close(y, eca_module(5, gate=nn.Tanh(), dtype=torch.float32)(x))


@NATIVE_CPU
@pytest.mark.parametrize("out_relu", [False, True])
def test_opcheck_eca_forward(out_relu):
    x = torch.randn(3, 20, 5, 6)
    residual = torch.randn(3, 20, 5, 6)
    args = (x, torch.randn(5), torch.randn(1), 2, "sigmoid", residual, out_relu)
    torch.library.opcheck(torch.ops.se_kernels.ca_eca_forward, args)


@NATIVE_CPU
def test_eca_forward_op_refuses_bad_arguments():
    x = torch.randn(2, 8, 3, 3)
    op = torch.ops.se_kernels.ca_eca_forward
    with pytest.raises(ValueError, match="2 \\* padding \\+ 1"):
        op(x, torch.randn(4), None, 2, "sigmoid", None, False)
    with pytest.raises(TypeError, match="float32 or float64"):
        op(x.bfloat16(), torch.randn(5).bfloat16(), None, 2, "sigmoid", None, False)
    with pytest.raises(ValueError, match="gate"):
        op(x, torch.randn(5), None, 2, "tanh", None, False)


@pytest.mark.parametrize("name", ["ese", "hgnet_ese", "se_bn_train", "eca", "ceca", "ceca_k7"])
def test_excitation_convolutions_run_without_conv_ops(name):
    """Plain 1x1 Conv2d steps run as F.linear and ECA's one-channel Conv1d as a shifted sum: no
    convolution op runs, forward or backward, and the values and gradients are the original's."""
    original = build(name)
    fused = FusedChannelAttention.from_module(copy.deepcopy(original), backend="cpu")
    x, dy = inputs()
    with torch.profiler.profile() as prof:
        got = step(fused, x, dy)
    assert not [e.name for e in prof.events() if "conv" in e.name], name
    assert_matches(got, step(original, x, dy), 1e-12, name)


def test_eca_convolution_under_autocast_and_on_short_vectors_is_the_layer():
    """Under autocast (the convolution would run in bfloat16) and where the padded vector is
    shorter than the kernel (the layer raises), the Conv1d layer itself runs."""
    original = build("eca_k5_any_channels", torch.float32).eval()
    fused = FusedChannelAttention.from_module(copy.deepcopy(original), backend="cpu")
    x = torch.randn(2, 16, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
        got = fused(x)
    assert "aten::conv1d" in {e.name for e in prof.events()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(got, original(x))
    short = EcaModule(kernel_size=9)
    short.conv.padding = (0,)
    with pytest.raises(RuntimeError):
        FusedChannelAttention.from_module(short, backend="cpu")(torch.randn(2, 4, 3, 3))


def test_pointwise_convs_run_as_linear_unless_hooked_or_not_plain():
    """A plain 1x1 Conv2d step runs as F.linear (no conv2d call), with the same values and the
    gradients on the same Parameters; a hooked conv runs through its module (the hooks see the
    call), and a grouped 1x1 conv too."""
    original = build("se_bn_eval")
    fused = FusedChannelAttention.from_module(copy.deepcopy(original), backend="cpu")
    x, dy = inputs()
    with torch.profiler.profile() as prof:
        got = step(fused, x, dy)
    names = {e.name for e in prof.events()}
    assert "aten::linear" in names and "aten::conv2d" not in names
    assert_matches(got, step(original, x, dy), 1e-12)
    calls = []
    fused.fc1.register_forward_hook(lambda *args: calls.append("fc1"))
    fused.fc2.register_forward_pre_hook(lambda *args: calls.append("fc2"))
    assert_matches(step(fused, x, dy), step(original, x, dy), 1e-12, "hooked")
    assert calls == ["fc1", "fc2"]
    grouped = SEModule(C, rd_ratio=0.25)
    grouped.fc1 = nn.Conv2d(C, grouped.fc1.out_channels, 1, groups=2)
    grouped = grouped.double()
    fused = FusedChannelAttention.from_module(copy.deepcopy(grouped), backend="cpu")
    with torch.profiler.profile() as prof:
        got = step(fused, x, dy)
    assert "aten::conv2d" in {e.name for e in prof.events()}
    assert_matches(got, step(grouped, x, dy), 1e-12, "grouped")


@NATIVE_CPU
@pytest.mark.parametrize("name", ["ese_add_maxpool", "eca_use_mlp", "se_bn_train", "tv_mish"])
def test_float64_residual_relu_epilogue(name):
    original = build(name)
    fused = FusedChannelAttention.from_module(copy.deepcopy(original), out_activation="relu", backend="cpu")
    x, dy = inputs()
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)

    class Epilogue(nn.Module):
        def __init__(self, se):
            super().__init__()
            self.se = se

        def forward(self, x, residual):
            return torch.relu(self.se(x) + residual)

    got = step(fused, x, dy, residual=residual)
    want = step(Epilogue(original), x, dy, residual=residual)
    want = {k.replace("grad se.", "grad ").replace("buffer se.", "buffer "): v for k, v in want.items()}
    assert_matches(got, want, 1e-12, name)


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_float32_close(name):
    """float32: the output and every gradient within 1e-5 of the original's (the same formulas in
    another summation order)."""
    original = build(name, torch.float32)
    fused = FusedChannelAttention.from_module(copy.deepcopy(original))
    shape = (4, 16, 6, 5) if name == "eca_k5_any_channels" else (4, C, 6, 5)
    x, dy = inputs(torch.float32, shape=shape, seed=1)
    assert_matches(step(fused, x, dy), step(original, x, dy), 1e-5, name)


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_channels_last(name):
    original = build(name)
    fused = FusedChannelAttention.from_module(copy.deepcopy(original))
    shape = (3, 16, 5, 7) if name == "eca_k5_any_channels" else (3, C, 5, 7)
    x, dy = inputs(shape=shape, seed=2, channels_last=True)
    got, want = step(fused, x, dy), step(original, x, dy)
    assert_matches(got, want, 1e-12, name)


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_bfloat16_forward_and_backward_run(name):
    original = build(name, torch.bfloat16)
    fused = FusedChannelAttention.from_module(copy.deepcopy(original))
    shape = (4, 16, 6, 5) if name == "eca_k5_any_channels" else (4, C, 6, 5)
    x, dy = inputs(torch.bfloat16, shape=shape, seed=3)
    got, want = step(fused, x, dy), step(original, x, dy)
    assert got["y"].dtype == torch.bfloat16
    assert rel_err(got["y"], want["y"]) < 2e-2
    assert rel_err(got["x"], want["x"]) < 5e-2
    with torch.no_grad():
        assert rel_err(fused(x), original(x)) < 2e-2


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_state_dict_and_parameters_are_the_originals(name):
    original = build(name, torch.float32)
    fused = FusedChannelAttention.from_module(original)
    assert [id(p) for p in fused.parameters()] == [id(p) for p in original.parameters()]
    assert [id(b) for b in fused.buffers()] == [id(b) for b in original.buffers()]
    assert [k for k, _ in fused.named_parameters()] == [k for k, _ in original.named_parameters()]
    assert {k: (v.shape, v.dtype) for k, v in fused.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in original.state_dict().items()}
    assert list(fused.state_dict()) == list(original.state_dict())
    # checkpoints both ways, strict: a changed converted module's into a fresh original, and back
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.01)
    fresh = build(name, torch.float32)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    other = FusedChannelAttention.from_module(build(name, torch.float32))
    other.load_state_dict(original.state_dict(), strict=True)
    shape = (2, 16, 4, 4) if name == "eca_k5_any_channels" else (2, C, 4, 4)
    x = torch.randn(shape)
    for m in (fresh, other, original, fused):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), fresh(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other(x), original(x), rtol=1e-5, atol=1e-6)


def test_optimizer_built_before_conversion_keeps_working():
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), se_with_bn(), nn.Conv2d(C, C, 1), EcaModule(C),
                          nn.Conv2d(C, C, 1), CecaModule(C))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.clone() for i in (1, 3, 5) for p in model[i].parameters()]
    convert_se_modules(model)
    assert all(isinstance(model[i], FusedChannelAttention) for i in (1, 3, 5))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    after = [p for i in (1, 3, 5) for p in model[i].parameters()]
    assert len(after) == len(before) and all(not torch.equal(b, p) for b, p in zip(before, after))


def test_conversion_probe_leaves_batchnorm_statistics_alone():
    """The same_output check runs both modules on a probe input: in train mode that would move a
    BatchNorm's running statistics; they are restored."""
    se = se_with_bn().train()
    saved = {k: v.clone() for k, v in se.state_dict().items()}
    fused = convert_se_modules(se)
    assert isinstance(fused, FusedChannelAttention)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_fusedse_flavours_stay_on_fusedse():
    """What FusedSE computes stays FusedSE (the faster fused op); FusedChannelAttention takes it
    too when asked."""
    se = SEModule(C, rd_ratio=0.25)
    assert isinstance(convert_se_modules(copy.deepcopy(se)), FusedSE)
    fused = FusedChannelAttention.from_module(se)
    x = torch.randn(2, C, 5, 5)
    torch.testing.assert_close(fused(x), se(x), rtol=1e-5, atol=1e-6)


def test_left_alone_with_a_reason(caplog):
    model = nn.Sequential(GatherExcite(C, use_mlp=False, extent=2), nn.Identity())
    with caplog.at_level(logging.WARNING, logger="se_kernels.convert"):
        _, report = convert_with_report(model)
    assert isinstance(model[0], GatherExcite)
    assert "spatial extent" in caplog.text and report.skipped[0][0] == "0"
    with pytest.raises(UnsupportedSE, match="channels-last"):
        FusedChannelAttention.from_module(SqueezeExciteCl(C))
    with pytest.raises(TypeError, match="not a recognised channel-attention module"):
        FusedChannelAttention.from_module(nn.Conv2d(3, 3, 1))


def test_deepcopy_pickle_compile_and_no_torchscript():
    module = FusedChannelAttention.from_module(build("se_bn_eval", torch.float32)).eval()
    x = torch.randn(2, C, 5, 5)
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    with torch.no_grad():
        for other in (copy.deepcopy(module), torch.load(buf, weights_only=False)):
            assert other._excitation.owner is other and other.fc1 is not module.fc1
            assert torch.equal(other(x), module(x))
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="does not support TorchScript"):
        torch.jit.script(module)
    assert module not in list(module.modules())[1:] and len(list(module.modules())) == 6  # no cycle in modules()


# ---- whole models --------------------------------------------------------------------------

# Independently of se_kernels' own recognition: the channel-attention classes these families use.
ATTENTION_CLASSES = re.compile(r"^(SEModule|EffectiveSEModule|EseModule|EcaModule|CecaModule|SqueezeExcite|"
                               r"SqueezeExcitation|GatherExcite)$")
# model -> kind of its channel-attention modules (all converted through the generic path)
ZOO = {
    "ese_vovnet19b_dw": "timm EffectiveSEModule",
    "hgnet_tiny": "timm hgnet EseModule",
    "ecaresnet26t": "timm EcaModule",
    "rexnet_100": "timm SEModule (BatchNorm2d)",
    "sedarknet21": "timm SEModule (LeakyReLU)",
}
PERTURBATION = 1e-15
# The converted model's difference from the original may be this many times the original's own
# difference under a PERTURBATION-relative change of its input, or FLOOR relative, whichever is
# larger. The fused pool sums in another order than torch.mean: a rounding-sized (~1e-16)
# perturbation at each attention module, as the input perturbation (~5 ulps) is one at the
# input. Measured diff / sensitivity: 0.58-1.48 here (outputs and both gradients, all models),
# median 0.9 and at most 2.0 over the outputs of the 147 models benchmarks/timm_zoo.py ran; 10
# leaves a margin, and a 1e-9 relative change of one attention module's gates already exceeds the
# bound in eval mode (the FLOOR, 1e-10, is what decides there: these sensitivities are ~1e-15).
SENSITIVITY_FACTOR = 10.0
FLOOR = 1e-10


def wake_zero_parameters(model, generator):
    """Every all-zero non-bias parameter (zero-initialised last BatchNorm of a residual block)
    set to ones (1-D) or fan-in-scaled random values: otherwise the attention modules behind it
    compute on zeros and no difference can show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("bias") and p.numel() and not p.any():
                p.copy_(torch.ones_like(p) if p.dim() <= 1 else
                        torch.randn(p.shape, generator=generator, dtype=p.dtype) / p[0].numel() ** 0.5)


def model_run(model, x, names, train):
    """Output and the gradients of the named parameters, for a fixed weighting of the output."""
    model.train(train).zero_grad(set_to_none=True)
    torch.manual_seed(7)  # dropout alike in each run
    y = model(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    (y * weights).sum().backward()
    params = dict(model.named_parameters())
    return {"y": y.detach(), **{n: params[n].grad.clone() for n in names}}


@pytest.mark.parametrize("name,train", [(n, False) for n in ZOO] + [("rexnet_100", True)])
def test_zoo_model_converts_completely_and_matches(name, train):
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False).to(torch.float64)
    wake_zero_parameters(original, torch.Generator().manual_seed(1))
    found = [n for n, m in original.named_modules() if ATTENTION_CLASSES.match(type(m).__name__)]
    assert found and len(found) == len(channel_attention_modules(original))
    converted, report = convert_with_report(copy.deepcopy(original))
    assert report.skipped == [] and dict(report.converted) == {ZOO[name] + " [generic]": len(found)}
    modules = dict(converted.named_modules())
    assert all(isinstance(modules[n], FusedChannelAttention) for n in found)
    assert not [n for n, m in converted.named_modules() if ATTENTION_CLASSES.match(type(m).__name__)]
    assert {k: v.shape for k, v in converted.state_dict().items()} == {
        k: v.shape for k, v in original.state_dict().items()}

    # the first parameter of the model (its gradient goes back through every attention module)
    # and of the first attention module (the excitation's gradient path)
    first = next(n for n, _ in original.named_parameters())
    first_attention = next(f"{found[0]}.{n}" for n, _ in modules[found[0]].named_parameters())
    names = [first, first_attention]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    perturbed = x * (1 + PERTURBATION * (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1))
    want = model_run(original, x, names, train)
    sensitivity = model_run(original, perturbed, names, train)
    got = model_run(converted, x, names, train)
    for k in want:
        diff, own = rel_err(got[k], want[k]), rel_err(sensitivity[k], want[k])
        assert diff <= max(SENSITIVITY_FACTOR * own, FLOOR), f"{name} {k}: diff {diff:.3g}, sensitivity {own:.3g}"
    # and the comparison can see the attention modules: their output channels scaled by 1 +- 1e-6
    # (alternating, which no norm layer after them undoes) move the output and gradients by far more
    hooks = [modules[n].register_forward_hook(nudge) for n in found]
    nudged = model_run(converted, x, names, train)
    for hook in hooks:
        hook.remove()
    for k in want:
        assert rel_err(nudged[k], got[k]) > 1e-3 * NUDGE, f"{name} {k}: the attention modules do not reach it"


NUDGE = 1e-6


def nudge(_module, _inputs, out):
    signs = 1 - 2 * (torch.arange(out.shape[1]) % 2)
    return out * (1 + NUDGE * signs.to(out.dtype).reshape(1, -1, 1, 1))


def test_converted_model_compiles_exports_and_autocasts():
    """A converted model: torch.compile without graph breaks (train mode: the BatchNorm inside
    the attention modules in batch-statistics mode), torch.export, CPU autocast to bfloat16."""
    torch.manual_seed(0)
    original = timm.create_model("rexnet_100", pretrained=False).eval()
    converted = convert_se_modules(copy.deepcopy(original))
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(copy.deepcopy(converted).train())(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    exported = torch.export.export(converted, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), original(x), rtol=1e-4, atol=1e-5)
        y32 = original(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_eager, y_fused = original(x), converted(x)
    assert y_fused.dtype == y_eager.dtype
    assert rel_err(y_fused, y32) <= 2 * rel_err(y_eager, y32) + 1e-3
