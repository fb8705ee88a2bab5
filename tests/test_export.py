"""Deploying converted models: ONNX with both exporters and AOTInductor packages.

ONNX: inside torch.onnx.export, with the torch.export-based exporter (dynamo=True) and the
TorchScript-based one (dynamo=False), every FusedSE call takes the "torch" backend
(se_kernels.ops.resolve_backend), so the exported graph is standard ONNX operators that
onnxruntime (or any ONNX runtime) runs, not a custom op none of them knows. Checked here: the
file passes onnx.checker, every node (in the graph, its subgraphs and its functions) is in the
default domain, onnxruntime gives the converted model's eager (fused kernel) output, each SE is
the original model's six-node chain, and the "torch" choice ends with the export.

AOTInductor: torch.export keeps the fused op (se_kernels::se_forward), which the compiled
package calls through its proxy executor: the package runs the fused CPU kernel, and the
process that loads it must have imported se_kernels.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import NATIVE_CPU, fresh_seed, rel_err, temp_dir
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from se_kernels import FusedSE, convert_se_modules, ops

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo=True exporter builds its graphs with it

# The TorchScript exporter traces shapes as tensors, so fused_se's argument checks
# (functional.check_inputs: `if c < 1`, ...) each warn that the trace treats them as constants,
# which they are for a given model; and it warns that it is the legacy exporter.
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

# name -> (builder, SE modules converted); random weights, nothing downloads
MODELS = {
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), 9),
    "tv_mobilenet_v3_large": (lambda: torchvision.models.mobilenet_v3_large(weights=None), 8),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None), 16),
    "tv_regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(weights=None), 16),
    "timm_seresnet18": (lambda: timm.create_model("seresnet18", pretrained=False), 8),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False), 16),
}
EXPORTERS = pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
STANDARD_DOMAINS = ("", "ai.onnx")
# One SE in ONNX, data path: pool -> Conv -> activation -> Conv -> gate -> Mul with x. The
# dynamo exporter writes the pool as ReduceMean over (H, W), the TorchScript one as
# GlobalAveragePool; SiLU (Sigmoid + Mul) does not occur in the models checked by chain.
POOLS = {"GlobalAveragePool", "ReduceMean"}
ACTIVATION_OPS = {"Relu", "HardSwish", "Gelu"}
GATE_OPS = {"Sigmoid", "HardSigmoid"}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def count_fused(model: nn.Module) -> int:
    return sum(isinstance(m, FusedSE) for m in model.modules())


def export_onnx(model: nn.Module, args: tuple, path: Path, dynamo: bool, **kwargs) -> None:
    """torch.onnx.export to `path` (verbose=False: the dynamo exporter's progress lines off)."""
    torch.onnx.export(model, args, str(path), dynamo=dynamo, verbose=False, **kwargs)


def load_checked(path: Path):
    """The ONNX model at `path` (external weights, if any, from beside it), after onnx.checker."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return proto


def all_nodes(proto):
    """Every node of the model: its graph, the subgraphs of control-flow nodes (If, Loop, Scan)
    and the bodies of its ONNX functions, recursively."""

    def walk(nodes):
        for node in nodes:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g.node)

    yield from walk(proto.graph.node)
    for function in proto.functions:
        yield from walk(function.node)


def assert_standard_ops(proto) -> None:
    """Every node is a default-domain ONNX operator: no se_kernels (or other custom) op that an
    ONNX runtime would not know."""
    custom = sorted({f"{n.domain}::{n.op_type}" for n in all_nodes(proto) if n.domain not in STANDARD_DOMAINS})
    assert not custom, f"non-standard ONNX ops in the export: {custom}"
    assert not any("se_kernels" in n.op_type for n in all_nodes(proto))


def run_onnxruntime(path: Path, *inputs: torch.Tensor) -> torch.Tensor:
    """The first output of the model at `path`, run by onnxruntime on the CPU."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    assert len(feed) == len(session.get_inputs()) == len(inputs)
    return torch.from_numpy(session.run(None, feed)[0])


def random_input(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def data_path_ops(proto) -> collections.Counter:
    """Op types of the nodes that depend on a graph input (the per-image computation), as
    opposed to those computing from initializers alone (weight reshapes, Identity copies),
    which a runtime folds once at load time. The graph's nodes are in topological order."""
    initializers = {t.name for t in proto.graph.initializer}
    live = {i.name for i in proto.graph.input if i.name not in initializers}
    ops_ = collections.Counter()
    for node in proto.graph.node:
        if any(name in live for name in node.input):
            ops_[node.op_type] += 1
            live.update(node.output)
    return ops_


def se_chains(proto) -> list:
    """Every Mul(gate(Conv(act(Conv(pool(x))))), x) in the graph, as its op types in data order
    (pool first): the SE blocks, six nodes each."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    chains = []
    for mul in proto.graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        for gate_name, x_name in (mul.input, mul.input[::-1]):
            chain, name = [], gate_name
            for allowed in (GATE_OPS, {"Conv"}, ACTIVATION_OPS, {"Conv"}, POOLS):
                node = producer.get(name)
                if node is None or node.op_type not in allowed:
                    break
                chain.append(node.op_type)
                name = node.input[0]
            else:
                if name == x_name:  # the pool's input is the Mul's other input
                    chains.append(tuple(reversed(chain)) + ("Mul",))
                    break
    return chains


@EXPORTERS
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_exports_to_onnx(name, dynamo, tmp_path):
    """The converted model exports with both ONNX exporters to a valid model of standard ONNX
    ops only, and onnxruntime computes the converted model's eager output (the fused kernel
    where the extension is built) on a fresh input: relative error <= 1e-5 in float32."""
    model = convert_se_modules(build(name))
    assert count_fused(model) == MODELS[name][1]
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, (torch.randn(2, 3, 64, 64),), path, dynamo)
    assert_standard_ops(load_checked(path))

    seed = fresh_seed()
    x = random_input((2, 3, 64, 64), seed)
    with torch.no_grad():
        expected = model(x)
    got = run_onnxruntime(path, x)
    assert got.shape == expected.shape
    err = rel_err(got, expected)
    assert err <= 1e-5, f"onnxruntime vs eager: relative error {err:.3g} (seed {seed})"


@EXPORTERS
def test_onnx_graph_is_the_original_graph(dynamo, tmp_path):
    """mobilenet_v3_small converted and not, exported the same way: each SE is the original's
    six-node chain (pool, Conv, Relu, Conv, HardSigmoid, Mul), and the per-image computation
    (nodes fed by the input) has exactly the original's op types and counts, and the whole graph
    has the original's node count with either exporter (the "torch" backend takes the weights
    as the module holds them, so no reshape of a weight is added).
    """
    original = build("tv_mobilenet_v3_small")
    converted = convert_se_modules(copy.deepcopy(original))
    n_se = count_fused(converted)
    assert n_se == MODELS["tv_mobilenet_v3_small"][1]
    protos = {}
    for label, model in (("original", original), ("converted", converted)):
        path = tmp_path / f"{label}.onnx"
        export_onnx(model, (torch.randn(2, 3, 64, 64),), path, dynamo)
        protos[label] = load_checked(path)

    pool = "ReduceMean" if dynamo else "GlobalAveragePool"
    se_chain = (pool, "Conv", "Relu", "Conv", "HardSigmoid", "Mul")
    for label, proto in protos.items():
        assert se_chains(proto) == [se_chain] * n_se, label
    assert data_path_ops(protos["converted"]) == data_path_ops(protos["original"])

    all_ops = {k: collections.Counter(n.op_type for n in p.graph.node) for k, p in protos.items()}
    extra = all_ops["converted"] - all_ops["original"]
    missing = all_ops["original"] - all_ops["converted"]
    assert not missing, f"ops of the original missing from the converted export: {missing}"
    assert not extra, extra
    assert len(protos["converted"].graph.node) == len(protos["original"].graph.node)


class EpilogueBlock(nn.Module):
    """A residual block ending in one FusedSE with the epilogue: relu(x * gate + shortcut)."""

    def __init__(self, channels: int, activation: str, gate: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.se = FusedSE(channels, 4, activation=activation, gate=gate, out_activation="relu")

    def forward(self, x):
        return self.se(self.conv(x), residual=x)


@EXPORTERS
@pytest.mark.parametrize("activation,gate", [("relu", "sigmoid"), ("silu", "hardsigmoid"), ("gelu", "sigmoid"),
                                             ("hardswish", "hardsigmoid")])
def test_epilogue_exports_to_onnx(activation, gate, dynamo, tmp_path):
    """FusedSE(out_activation="relu") called with a residual, every activation and gate, with
    both exporters and a dynamic batch dimension: standard ops ending in Add then Relu, and
    onnxruntime matches eager on a fresh input of another batch size (relative error <= 1e-5)."""
    torch.manual_seed(0)
    model = EpilogueBlock(16, activation, gate).eval()
    path = tmp_path / "block.onnx"
    if dynamo:
        dynamic = dict(dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        dynamic = dict(input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    export_onnx(model, (torch.randn(2, 16, 9, 9),), path, dynamo, **dynamic)
    proto = load_checked(path)
    assert_standard_ops(proto)
    assert [n.op_type for n in proto.graph.node][-2:] == ["Add", "Relu"]

    seed = fresh_seed()
    x = random_input((3, 16, 9, 9), seed)
    with torch.no_grad():
        expected = model(x)
    err = rel_err(run_onnxruntime(path, x), expected)
    assert err <= 1e-5, f"onnxruntime vs eager: relative error {err:.3g} (seed {seed})"


class RecordOps(TorchDispatchMode):
    """The names of the ops that reach the dispatcher's Python key (below autograd)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def exception_chain(exc: BaseException) -> list:
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def se_ops(names) -> list:
    return [n for n in names if "se_kernels" in n]


@NATIVE_CPU
@EXPORTERS
def test_onnx_export_does_not_change_the_backend_outside_it(dynamo, tmp_path, monkeypatch):
    """The "torch" backend is for calls inside torch.onnx.export only: after an export (and
    after one that fails midway), eager calls run the fused op and torch.export records it.
    "auto"'s cached choice is emptied first, so the first resolution happens inside the export
    and a cache filled there would show."""
    monkeypatch.setattr(ops, "_auto_choice", {})
    monkeypatch.delenv("SE_KERNELS_BACKEND", raising=False)
    model = EpilogueBlock(16, "relu", "sigmoid").eval()
    x = torch.randn(2, 16, 9, 9)
    export_onnx(model, (x,), tmp_path / "block.onnx", dynamo)
    assert_standard_ops(load_checked(tmp_path / "block.onnx"))

    class FailsAfterSE(nn.Module):
        def __init__(self):
            super().__init__()
            self.se = FusedSE(16, 4)

        def forward(self, x):
            self.se(x)
            raise ValueError("fails after the SE call")

    with pytest.raises(Exception) as failed:  # the exporters wrap the error in their own
        export_onnx(FailsAfterSE().eval(), (x,), tmp_path / "fails.onnx", dynamo)
    assert "fails after the SE call" in "".join(str(e) for e in exception_chain(failed.value))

    assert not torch.onnx.is_in_onnx_export()
    assert ops.resolve_backend("auto", "cpu") == "cpu"
    with RecordOps() as recorded, torch.no_grad():
        model(x)
    assert se_ops(recorded.names) == ["se_kernels.se_forward.default"], recorded.names
    ep = torch.export.export(model, (x,))
    assert any("se_kernels.se_forward" in str(n.target) for n in ep.graph.nodes), ep.graph


class TinySENet(nn.Module):
    """conv -> torchvision SqueezeExcitation (converted) -> conv -> FusedSE with the epilogue."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.se = torchvision.ops.SqueezeExcitation(16, 4)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.block = FusedSE(16, 4, activation="silu", out_activation="relu")

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = self.se(y)
        return self.block(self.conv(y), residual=y)


# Loads the package in a fresh interpreter, first without se_kernels imported, then with it.
LOAD_IN_SUBPROCESS = """
import sys, torch
package, inputs, out = sys.argv[1:4]
try:
    torch._inductor.aoti_load_package(package)
    print("loaded without se_kernels")
except RuntimeError as exc:
    print("without se_kernels:", exc)
import se_kernels
runner = torch._inductor.aoti_load_package(package)
torch.save(runner(torch.load(inputs)), out)
"""


@NATIVE_CPU
def test_aoti_package_runs_the_fused_op(tmp_path):
    """torch.export keeps se_kernels::se_forward (both SE calls), AOTInductor compiles the
    program into a package whose extern calls are that op (the fused CPU kernel, run through
    the proxy executor), and the loaded package matches eager on a fresh input (relative error
    <= 1e-5). Loading needs se_kernels imported first (the op schema), which a fresh
    interpreter shows; after `import se_kernels` it loads and gives the same result."""
    torch.manual_seed(0)
    model = convert_se_modules(TinySENet().eval())
    assert count_fused(model) == 2
    ep = torch.export.export(model, (torch.randn(2, 3, 16, 16),))
    se_nodes = [n for n in ep.graph.nodes if "se_kernels" in str(n.target)]
    assert len(se_nodes) == 2 and all("se_kernels.se_forward" in str(n.target) for n in se_nodes), ep.graph

    start = time.perf_counter()
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    print(f"aoti_compile_and_package: {time.perf_counter() - start:.1f} s")
    with zipfile.ZipFile(package) as archive:
        extern = [json.loads(archive.read(f)) for f in archive.namelist() if f.endswith(".wrapper.json")]
    targets = [node["node"]["target"] for graph in extern for node in graph["nodes"]]
    assert targets == ["se_kernels::se_forward"] * 2, targets

    with temp_dir(tmp_path):
        runner = torch._inductor.aoti_load_package(package)
    seed = fresh_seed()
    x = random_input((2, 3, 16, 16), seed)
    with torch.no_grad():
        expected = model(x)
    got = runner(x)
    err = rel_err(got, expected)
    assert err <= 1e-5, f"AOTInductor package vs eager: relative error {err:.3g} (seed {seed})"

    torch.save(x, tmp_path / "x.pt")
    repo = Path(__file__).resolve().parents[1]
    pythonpath = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_IN_SUBPROCESS, package, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "without se_kernels: Could not find schema for se_kernels::se_forward" in proc.stdout, proc.stdout
    assert rel_err(torch.load(tmp_path / "y.pt"), expected) <= 1e-5
