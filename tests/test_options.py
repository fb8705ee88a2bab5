"""The options (activation, gate, out_activation) have one list, se_kernels/reference.py's
ACTIVATIONS, GATES and OUT_ACTIVATIONS, and everything else follows it:

* the native enums (csrc/se_options.h: Act, Gate, and option_name, which the C++ parsers read)
  list the same names in the same order, and the Triton codes are the indices in that order;
* the Triton functions compute the option their code names, and an unknown code fails to
  compile (no silent fallback to the last option); the CUDA kernels' option math, compiled for
  the host, misses no option (-Werror: the build of a switch without a case fails) and gives NaN
  for a value that is no option;
* an unknown name is a ValueError naming the allowed ones, in every backend and entry point.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from se_kernels import FusedSE, available_backends, fused_se, ops
from se_kernels.reference import (
    ACTIVATION_GRADS,
    ACTIVATIONS,
    GATE_GRADS,
    GATES,
    OUT_ACTIVATIONS,
    ReferenceSE,
    se_reference,
)

ROOT = Path(__file__).resolve().parent.parent
OPTIONS_HEADER = ROOT / "csrc" / "se_options.h"
TABLES = {"Act": ("ACTIVATIONS", ACTIVATIONS), "Gate": ("GATES", GATES)}
BAD = {"activation": "no_such_activation", "gate": "no_such_gate", "out_activation": "no_such_epilogue"}
ALLOWED = {"activation": ACTIVATIONS, "gate": GATES, "out_activation": OUT_ACTIVATIONS}


def allowed_text(option: str) -> str:
    """How every error message lists the allowed values: in the reference's order."""
    return ", ".join(repr(name) for name in ALLOWED[option])


# ---- the lists agree ---------------------------------------------------------------------------


def native_enum(source: str, enum: str) -> list:
    m = re.search(rf"enum\s+class\s+{enum}\s*(?::\s*\w+\s*)?\{{([^}}]*)\}}", source)
    assert m, f"no `enum class {enum}` in {OPTIONS_HEADER}"
    body = re.sub(r"//[^\n]*", "", m.group(1))
    enumerators = [e.strip() for e in body.split(",") if e.strip()]
    assert all(re.fullmatch(r"\w+", e) for e in enumerators), (
        f"{enum}'s enumerators take their values from their order (an option's code is its index in the "
        f"reference's list); give none an explicit value: {enumerators}")
    return enumerators


def native_names(source: str, enum: str) -> dict:
    """enumerator -> name, from option_name(enum)'s switch."""
    m = re.search(rf"option_name\(\s*{enum}\s+\w+\s*\)\s*\{{(.*?)\n\}}", source, flags=re.S)
    assert m, f"no option_name({enum}) in {OPTIONS_HEADER}"
    return dict(re.findall(rf'case\s+{enum}::(\w+)\s*:\s*return\s+"([^"]*)"\s*;', m.group(1)))


@pytest.mark.parametrize("enum", list(TABLES))
def test_native_enums_list_the_reference_options_in_order(enum):
    source = OPTIONS_HEADER.read_text()
    table_name, table = TABLES[enum]
    enumerators = native_enum(source, enum)
    names = native_names(source, enum)
    hint = (f"csrc/se_options.h's enum class {enum} and option_name({enum}) must list "
            f"se_kernels/reference.py's {table_name} in its order")
    assert [names.get(e) for e in enumerators] == list(table), (
        f"{hint}: the enum is {enumerators}, named {names}; the reference has {list(table)}")
    for e, name in zip(enumerators, table):
        assert e.lower() == name.replace("_", ""), f"{hint}: enumerator {enum}::{e} is named {name!r}"


def test_one_native_list():
    """The enums are defined once (se_options.h, included by se_common.h and the CUDA tiles)."""
    definitions = [(path.relative_to(ROOT), enum) for path in sorted((ROOT / "csrc").rglob("*"))
                   if path.suffix in (".h", ".cpp", ".cu", ".cuh")
                   for enum in re.findall(r"enum\s+class\s+(Act|Gate)\b", path.read_text())]
    assert definitions == [(Path("csrc/se_options.h"), "Act"), (Path("csrc/se_options.h"), "Gate")], definitions
    assert '#include "se_options.h"' in (ROOT / "csrc" / "se_common.h").read_text()
    assert '#include "../se_options.h"' in (ROOT / "csrc" / "cuda" / "se_tiles.h").read_text()


def test_reference_has_every_derivative_and_the_native_epilogues():
    assert list(ACTIVATION_GRADS) == list(ACTIVATIONS), "reference.py: ACTIVATION_GRADS must follow ACTIVATIONS"
    assert list(GATE_GRADS) == list(GATES), "reference.py: GATE_GRADS must follow GATES"
    # the native and Triton kernels take out_activation as a flag (csrc/se_common.h,
    # parse_out_activation; OUT_RELU): another epilogue needs code there first
    assert list(OUT_ACTIVATIONS) == [None, "relu"]


def _triton_modules():
    if ops.triton_error() is not None:
        pytest.skip(f"Triton is not usable: {ops.triton_error()}")
    from se_kernels.triton import kernels, launch

    return kernels, launch


def test_triton_codes_are_the_reference_order():
    kernels, launch = _triton_modules()
    assert launch.ACTIVATION_CODES is kernels.ACTIVATION_CODES and launch.GATE_CODES is kernels.GATE_CODES
    assert kernels.ACTIVATION_CODES == {name: i for i, name in enumerate(ACTIVATIONS)}
    assert kernels.GATE_CODES == {name: i for i, name in enumerate(GATES)}
    source = OPTIONS_HEADER.read_text()
    for enum, codes in (("Act", kernels.ACTIVATION_CODES), ("Gate", kernels.GATE_CODES)):
        names = native_names(source, enum)
        assert {names[e]: i for i, e in enumerate(native_enum(source, enum))} == codes, (
            f"the Triton codes and csrc/se_options.h's {enum} values differ")


# ---- the Triton option functions ---------------------------------------------------------------

try:  # after tests/conftest.py has set TRITON_INTERPRET where there is no GPU
    import triton
    import triton.language as tl

    from se_kernels.triton import kernels as triton_kernels
except Exception:  # noqa: BLE001 - no usable Triton: the tests below skip (_triton_modules)
    triton = None

if triton is not None:

    @triton.jit
    def option_probe(u_ptr, out_ptr, WHICH: tl.constexpr, CODE: tl.constexpr):
        """One of kernels.py's option functions (WHICH: 0 _activation, 1 _activation_grad, 2
        _gate, 3 _gate_grad) of the option with code CODE, over 64 values."""
        i = tl.arange(0, 64)
        u = tl.load(u_ptr + i)
        if WHICH == 0:
            out = triton_kernels._activation(u, CODE)
        elif WHICH == 1:
            out = triton_kernels._activation_grad(u, CODE)
        elif WHICH == 2:
            out = triton_kernels._gate(u, CODE)
        else:
            out = triton_kernels._gate_grad(u, triton_kernels._gate(u, CODE), CODE)
        tl.store(out_ptr + i, out)


def run_probe(which: int, code: int, u: torch.Tensor) -> torch.Tensor:
    _triton_modules()
    out = torch.empty_like(u)
    option_probe[(1,)](u, out, WHICH=which, CODE=code)
    return out


def _triton_device() -> str:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")


def probe_points(device) -> torch.Tensor:
    edges = torch.tensor([0.0, -3.0, 3.0, -2.5, 2.5, 40.0, -40.0, 0.5])
    return torch.cat([torch.linspace(-6, 6, 56), edges]).to(device)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_triton_activation_code_computes_its_name(name):
    kernels, _ = _triton_modules()
    u = probe_points(_triton_device())
    code = kernels.ACTIVATION_CODES[name]
    torch.testing.assert_close(run_probe(0, code, u), ACTIVATIONS[name](u), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run_probe(1, code, u), ACTIVATION_GRADS[name](torch.ones_like(u), u),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(GATES))
def test_triton_gate_code_computes_its_name(name):
    kernels, _ = _triton_modules()
    u = probe_points(_triton_device())
    code = kernels.GATE_CODES[name]
    g = GATES[name](u)
    torch.testing.assert_close(run_probe(2, code, u), g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run_probe(3, code, u), GATE_GRADS[name](torch.ones_like(u), u, g),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which,what", [(0, "activation"), (1, "activation"), (2, "gate"), (3, "gate")],
                         ids=["activation", "activation_grad", "gate", "gate_grad"])
def test_triton_unknown_code_fails_to_compile(which, what):
    """A code no branch takes raises (static_assert; the interpreter's InterpreterError, the
    compiler's CompilationError) instead of computing the last option."""
    u = probe_points(_triton_device())
    unknown = len(ACTIVATIONS if what == "activation" else GATES)
    for code in (unknown, 99):
        with pytest.raises(Exception) as info:
            run_probe(which, code, u)
        assert f"is no {what} code" in _messages(info.value), _messages(info.value)


def _messages(exc) -> str:
    """The exception and its causes (the compiler's CompilationError holds the static_assert's
    CompileTimeAssertionFailure as its cause)."""
    out = []
    while exc is not None:
        out.append(f"{exc!r} {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


# ---- the CUDA kernels' option math, compiled for the host --------------------------------------


def _compile_tiles(tmp: Path, options_header: str) -> subprocess.CompletedProcess:
    """tests/cpp/tiles_host.cpp (which includes csrc/cuda/se_tiles.h and csrc/se_options.h) built
    as tests/test_cuda_tiles.py builds it, against `options_header` as se_options.h."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    (tmp / "csrc" / "cuda").mkdir(parents=True)
    (tmp / "tests" / "cpp").mkdir(parents=True)
    shutil.copy(ROOT / "csrc" / "cuda" / "se_tiles.h", tmp / "csrc" / "cuda" / "se_tiles.h")
    shutil.copy(ROOT / "tests" / "cpp" / "tiles_host.cpp", tmp / "tests" / "cpp" / "tiles_host.cpp")
    (tmp / "csrc" / "se_options.h").write_text(options_header)
    return subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                           str(tmp / "tests" / "cpp" / "tiles_host.cpp"), "-o", str(tmp / "tiles_host.so")],
                          capture_output=True, text=True)


def test_cuda_option_math_gives_nan_for_no_option(tmp_path):
    built = _compile_tiles(tmp_path, OPTIONS_HEADER.read_text())
    assert built.returncode == 0, built.stderr[-4000:]
    lib = ctypes.CDLL(str(tmp_path / "tiles_host.so"))
    dptr = ctypes.POINTER(ctypes.c_double)
    lib.se_math.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, dptr, dptr, dptr, dptr]
    lib.se_math.restype = None
    u = torch.linspace(-5, 5, 11, dtype=torch.float64)

    def math(which, code):
        out = torch.empty_like(u)
        ptr = lambda t: ctypes.cast(t.data_ptr(), dptr)  # noqa: E731
        lib.se_math(which, code, 64, u.numel(), ptr(u), None, None, ptr(out))
        return out

    for which, table in ((0, ACTIVATIONS), (1, ACTIVATIONS), (2, GATES), (3, GATES)):
        for code, name in enumerate(table):
            assert math(which, code).isfinite().all(), (
                f"se_math({which}, code {code}): csrc/cuda/se_tiles.h has no case for {name!r}")
        for code in (len(table), 99, -1):
            assert math(which, code).isnan().all(), f"se_math({which}, code {code}) computed an option"


def test_cuda_option_switches_miss_no_option(tmp_path):
    """An enumerator without a case in se_tiles.h's switches fails the build (-Werror; setup.py
    has -Werror=switch for the extension, whose se_cuda.cu instantiates them for the host)."""
    header = OPTIONS_HEADER.read_text()
    extended = re.sub(r"(enum\s+class\s+Act\s*\{[^}]*?)(\s*\})", r"\1, Extra\2", header, count=1)
    assert extended != header
    built = _compile_tiles(tmp_path, extended)
    assert built.returncode != 0 and "Extra" in built.stderr and "not handled in switch" in built.stderr, \
        built.stderr[-4000:]


# ---- unknown names at the API ------------------------------------------------------------------


def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 3, generator=g)
    w1, b1 = torch.randn(2, 8, generator=g), torch.randn(2, generator=g)
    w2, b2 = torch.randn(8, 2, generator=g), torch.randn(8, generator=g)
    return tuple(t.to(device) for t in (x, w1, b1, w2, b2))


def _options(option: str, value) -> dict:
    options = dict(activation="relu", gate="sigmoid", out_activation=None)
    options[option] = value
    return options


def assert_names_the_options(info, option: str, value=None) -> None:
    message = str(info.value)
    assert f"{option} must be one of {allowed_text(option)}" in message, message
    assert repr(BAD[option] if value is None else value) in message, message


@pytest.mark.parametrize("option", list(BAD))
@pytest.mark.parametrize("backend", ["auto"] + list(ops.BACKENDS))
def test_fused_se_rejects_unknown_names(backend, option):
    """Checked before any backend is chosen: the same error whichever backend (available here
    or not)."""
    x, w1, b1, w2, b2 = _inputs()
    with pytest.raises(ValueError) as info:
        fused_se(x, w1, b1, w2, b2, backend=backend, **_options(option, BAD[option]))
    assert_names_the_options(info, option)


@pytest.mark.parametrize("option", list(BAD))
def test_modules_and_reference_reject_unknown_names(option):
    with pytest.raises(ValueError) as info:
        FusedSE(8, 2, **_options(option, BAD[option]))
    assert_names_the_options(info, option)
    with pytest.raises(ValueError) as info:
        ReferenceSE(8, 2, **_options(option, BAD[option]))
    assert_names_the_options(info, option)
    x, w1, b1, w2, b2 = _inputs()
    with pytest.raises(ValueError) as info:
        se_reference(x, w1, b1, w2, b2, **_options(option, BAD[option]))
    assert_names_the_options(info, option)
    for module in (FusedSE(8, 2, backend="torch"), ReferenceSE(8, 2)):  # options changed after construction
        setattr(module, option, BAD[option])
        with pytest.raises(ValueError) as info:
            module(x)
        assert_names_the_options(info, option)


@pytest.mark.parametrize("value", [["relu"], 3, "", "ReLU"], ids=repr)
def test_odd_values_are_value_errors(value):
    x, w1, b1, w2, b2 = _inputs()
    with pytest.raises(ValueError) as info:
        fused_se(x, w1, b1, w2, b2, activation=value, backend="torch")
    assert_names_the_options(info, "activation", value)


def _triton_op_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _forward_and_backward(forward, backward, device):
    """Calls of a registered forward and backward op with the given options: each must raise."""

    def calls(activation, gate, out_activation):
        x, w1, b1, w2, b2 = _inputs(device)
        y, pooled, hidden, logits, mask = forward(x, w1, b1, w2, b2, None, "relu", "sigmoid", "relu")
        return [
            lambda: forward(x, w1, b1, w2, b2, None, activation, gate, out_activation),
            lambda: backward(torch.ones_like(y), x, w1, w2, pooled, hidden, logits, mask, activation, gate,
                             out_activation if out_activation is not None else "relu", True, True),
        ]

    return calls


def _differentiable(activation, gate, out_activation):
    x, w1, b1, w2, b2 = _inputs()
    return [lambda: torch.ops.se_kernels.se_backward_differentiable(
        torch.ones_like(x), x, w1, b1, w2, b2, torch.empty(0, dtype=torch.uint8), activation, gate, out_activation)]


def _fake(activation, gate, out_activation):
    """The fake kernels (torch.compile, export, meta tensors)."""
    x, w1, b1, w2, b2 = _inputs("meta")
    mask = x.new_empty(0, dtype=torch.uint8)
    return [
        lambda: ops.forward_fake(x, w1, b1, w2, b2, None, activation, gate, out_activation),
        lambda: ops.backward_fake(x, x, w1, w2, x.new_empty(2, 8), x.new_empty(2, 2), x.new_empty(2, 8), mask,
                                  activation, gate, out_activation, True, True),
    ]


def _op_calls():
    native = lambda: (torch.ops.se_kernels.se_forward, torch.ops.se_kernels.se_backward)  # noqa: E731
    triton_ops = lambda: (torch.ops.se_kernels.triton_se_forward, torch.ops.se_kernels.triton_se_backward)  # noqa: E731
    return [
        pytest.param(native, "cpu", id="cpu", marks=pytest.mark.skipif(
            ops.extension_error() is not None, reason="se_kernels._C did not load")),
        pytest.param(native, "cuda", id="cuda", marks=pytest.mark.skipif(
            "cuda" not in available_backends("cuda"), reason="no CUDA backend here")),
        pytest.param(triton_ops, _triton_op_device(), id="triton", marks=pytest.mark.skipif(
            "triton" not in available_backends(_triton_op_device()), reason="no Triton backend here")),
        pytest.param(None, "cpu", id="differentiable"),
        pytest.param(None, "meta", id="fake"),
    ]


@pytest.mark.parametrize("option", list(BAD))
@pytest.mark.parametrize("op_pair,device", _op_calls())
def test_registered_ops_reject_unknown_names(op_pair, device, option):
    """Calling the registered ops directly (no Python checks in front): the native parsers
    (csrc/se_common.h) and the Python fake kernels give the same ValueError, forward and
    backward."""
    if op_pair is not None:
        calls = _forward_and_backward(*op_pair(), device)
    else:
        calls = _fake if device == "meta" else _differentiable
    for call in calls(**_options(option, BAD[option])):
        with pytest.raises(ValueError) as info:
            call()
        assert_names_the_options(info, option)
