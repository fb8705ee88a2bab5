"""Smoke test of the benchmark (benchmarks/bench_se.py), so that CI catches a broken one: every
provider once in every mode on a tiny shape through bench_se.main, the CSV/markdown/PNG writers,
the low-precision and epilogue variants, the correctness guard and the shape sets.

torch.compile runs with the aot_eager backend here (dynamo and AOTAutograd without inductor's
C++ code generation, which takes ~20 s with a cold cache): the harness is under test, not inductor.
"""

from __future__ import annotations

import copy
import csv
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_se  # noqa: E402
import harness  # noqa: E402
import shapes  # noqa: E402

CPU = torch.device("cpu")
SHAPE = "2x16x3x5"


@pytest.fixture(autouse=True)
def fast_harness(monkeypatch):
    """aot_eager, few rounds, one thread (tiny calls on two threads of a busy machine can take
    10 ms each, waiting for a descheduled thread). The tests also pass --system-malloc, so that
    the test process keeps glibc's defaults."""
    monkeypatch.setattr(bench_se, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(bench_se, "TARGET_S", 0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_provider_and_mode_with_result_files(tmp_path):
    argv = ["--shapes", SHAPE, "--system-malloc", "--results-dir", str(tmp_path), "--tag", "smoke"]
    results = bench_se.main(argv)
    providers = bench_se.default_providers(CPU)
    assert [(r.mode, r.provider) for r in results.rows] == [(m, p) for m in bench_se.MODES for p in providers]
    for r in results.rows:
        assert r.calls >= bench_se.MIN_ROUNDS and 0 < r.p20_ms <= r.median_ms <= r.p80_ms, r
        assert r.fraction_of_floor > 0 and r.speedup_vs_eager > 0 and r.speedup_vs_compile > 0, r
        assert r.peak_mib > 0 and r.peak_over_x > 0, r
    assert {(c.mode, c.site) for c in results.compiles} == {(m, "2x16x3x5/1") for m in bench_se.MODES}

    (csv_path,) = tmp_path.glob("*.csv")
    assert re.fullmatch(r"cpu-[a-z0-9-]+_\d{4}-\d{2}-\d{2}_custom_smoke", csv_path.stem), csv_path
    stem = csv_path.with_suffix("")
    assert sorted(p.name for p in tmp_path.iterdir()) == [stem.name + ext for ext in (".csv", ".md", ".png")]
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == len(results.rows)
    markdown = stem.with_suffix(".md").read_text()
    assert "bench_se.py --shapes 2x16x3x5 --system-malloc --results-dir" in markdown
    assert "malloc: glibc defaults (--system-malloc)" in markdown and "threads" in markdown
    assert stem.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_low_precision_channels_last_epilogue():
    fused = [p for p in bench_se.default_providers(CPU) if p not in bench_se.BASELINES]
    results = bench_se.main(["--shapes", SHAPE, "--dtypes", "bfloat16", "float16", "--layouts", "channels_last",
                             "--epilogue", "residual_relu", "--providers", "eager", *fused, "--system-malloc",
                             "--no-save"])
    x_bytes = 2 * 16 * 3 * 5 * 2
    floors = {"forward": 3 * x_bytes, "backward": 4 * x_bytes, "full": 7 * x_bytes}
    assert len(results.rows) == 2 * len(bench_se.MODES) * (1 + len(fused))
    for r in results.rows:
        assert r.floor_bytes == floors[r.mode] and r.speedup_vs_compile != r.speedup_vs_compile  # nan
        assert (r.dtype, r.layout, r.epilogue) in {("bfloat16", "channels_last", "residual_relu"),
                                                   ("float16", "channels_last", "residual_relu")}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["forward", "full"])
def test_guard_rejects_a_wrong_kernel(dtype, mode):
    case = bench_se.Case(shapes.Site(2, 16, 3, 5, 2), bench_se.Variant(dtype=dtype))
    modules = bench_se.build_modules(case, CPU, ["eager"])
    inputs = bench_se.make_inputs(case, CPU)
    modules["right"] = copy.deepcopy(modules["eager"])
    assert bench_se.check_against_eager(modules, inputs, mode, case) == []
    wrong = copy.deepcopy(modules["eager"])
    with torch.no_grad():
        wrong.fc2.bias.add_(0.5)
    with pytest.raises(bench_se.MismatchError, match="wrong 2x16x3x5/2"):
        bench_se.check_against_eager({**modules, "wrong": wrong}, inputs, mode, case)
    # a baseline out of tolerance is reported, not fatal
    notes = bench_se.check_against_eager({**modules, "compile": wrong}, inputs, mode, case)
    assert notes and all(note.startswith("compile 2x16x3x5/2") for note in notes)


def test_shape_sets():
    assert len(shapes.shape_set("cpu-quick").sites) == 5
    assert shapes.shape_set("cifar-se-resnet18").sites == shapes.shape_set("cpu-quick").sites[:4]
    assert [s.s for s in shapes.shape_set("imagenet-se-resnet50").sites] == [16, 32, 64, 128]
    sweep = shapes.shape_set("sweep").sites
    assert len(sweep) == 14 and all(s.n * s.c * s.h * s.w * 4 <= 200e6 for s in sweep)
    for name, modules, activation, gate in [("efficientnet-b0", 16, "silu", "sigmoid"),
                                            ("mobilenet-v3-large", 8, "relu", "hardsigmoid")]:
        sites = shapes.shape_set(name).sites
        assert sum(s.count for s in sites) == modules, name
        assert {(s.n, s.activation, s.gate) for s in sites} == {(32, activation, gate)}, name
        assert len(set(sites)) == len(sites), name


def test_device_slug():
    assert harness.slugify("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") == "intel-xeon-platinum-8375c"
    assert harness.slugify("AMD EPYC 7763 64-Core Processor") == "amd-epyc-7763"
    assert harness.slugify("NVIDIA H200") == "nvidia-h200"
    assert harness.device_slug(CPU).startswith("cpu-")


def test_harness_quantiles_rounds_and_tables():
    assert [harness.quantile([4.0, 1.0, 3.0, 2.0], q) for q in (0.0, 0.2, 0.5, 1.0)] == [1.0, 1.6, 2.5, 4.0]
    order = []
    workloads = {name: harness.Workload(run=lambda name=name: order.append(name)) for name in "abc"}
    times = harness.timed_rounds(workloads, CPU, target_s=0.0, min_rounds=4, max_rounds=100)
    assert {len(t) for t in times.values()} == {6} and order[:6] == list("abcbca")  # whole rotations
    text = harness.text_table(("name", "ms"), [("a", "1.5"), ("bb", "10.25")])
    assert text == ["name     ms", "-----------", "a       1.5", "bb    10.25"]
    assert harness.markdown_table(("a|b",), [("x",)]) == ["| a\\|b |", "| --- |", "| x |"]
