"""pytest-benchmark view of bench_se.py: one benchmark per (site, mode, provider) of the cpu-quick
set (float32, NCHW), grouped by site and mode. Modules, inputs, the correctness guard and the
workloads are bench_se's, warm-up and round count harness's; pytest-benchmark then times one
provider after the other (bench_se.py interleaves them and adds the copy floor and peak memory).

    PYTHONPATH=. python -m pytest benchmarks --benchmark-only [-k "forward and 128x64x32x32"]
"""

from __future__ import annotations

import warnings

import bench_se
import harness
import pytest
import torch
from shapes import Site, shape_set

DEVICE = torch.device("cpu")


@pytest.mark.parametrize("provider", bench_se.default_providers(DEVICE))
@pytest.mark.parametrize("mode", bench_se.MODES)
@pytest.mark.parametrize("site", shape_set("cpu-quick").sites, ids=lambda site: site.label)
def test_se(benchmark, site: Site, mode: str, provider: str) -> None:
    case = bench_se.Case(site, bench_se.Variant())
    modules = bench_se.build_modules(case, DEVICE, [provider])
    inputs = bench_se.make_inputs(case, DEVICE)
    for note in bench_se.check_against_eager(modules, inputs, mode, case):  # baselines only
        warnings.warn(note, stacklevel=1)
    benchmark.group = f"{site.label} {mode}"
    benchmark.extra_info["floor_bytes"] = bench_se.floor_bytes(case, mode)
    with torch.set_grad_enabled(mode != "forward"):
        workload = bench_se.make_workload(modules[provider], inputs, mode)
        warmup = harness.measure({provider: workload}, 1 + bench_se.WARMUP_ROUNDS, DEVICE)
        rounds = harness.rounds_for(warmup, bench_se.TARGET_S, bench_se.MIN_ROUNDS, bench_se.MAX_ROUNDS)
        benchmark.pedantic(workload.run, setup=workload.prepare, rounds=rounds, iterations=1)
