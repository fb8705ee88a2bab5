"""pytest-benchmark view of benchmarks/bench_se.py: one benchmark per (site, mode, provider) of
the cpu-quick set (float32, NCHW, no epilogue), grouped by site and mode, so that each group's
table compares the providers.

    PYTHONPATH=. python -m pytest benchmarks --benchmark-only
    PYTHONPATH=. python -m pytest benchmarks --benchmark-only -k "forward and 128x64x32x32"

Modules, inputs, workloads and the correctness guard are bench_se's (imported, not copied),
and so is the malloc setting (conftest.py); each benchmark first checks its provider against
eager, makes its first call (for compile: the compile) and warm-up calls untimed, and runs
bench_se's adaptive number of rounds (benchmark.pedantic, with the backward mode's untimed
forward as `setup`). pytest-benchmark times one provider after the other, not in interleaved
rounds, and has no copy-bandwidth floor or peak memory: for those, and for ratios that machine
drift does not skew, use bench_se.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bench_se
from shapes import Site, shape_set

DEVICE = torch.device("cpu")
SITES = shape_set("cpu-quick").sites
PROVIDERS = bench_se.default_providers(DEVICE)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", bench_se.MODES)
@pytest.mark.parametrize("site", SITES, ids=lambda site: site.label)
def test_se(benchmark, site: Site, mode: str, provider: str) -> None:
    case = bench_se.Case(site, bench_se.Variant())
    modules = bench_se.build_modules(case, DEVICE, [provider])
    inputs = bench_se.make_inputs(case, DEVICE)
    for note in bench_se.check_against_eager(modules, inputs, mode, case):  # baselines only
        warnings.warn(note)
    benchmark.group = f"{site.label} {mode}"
    benchmark.extra_info["floor_bytes"] = bench_se.floor_bytes(case, mode)
    with bench_se.grad_mode(mode):
        workload = bench_se.make_workload(modules[provider], inputs, mode)
        warmup = bench_se.measure({provider: workload}, 1 + bench_se.WARMUP_ROUNDS, DEVICE)
        rounds = bench_se.rounds_for(warmup)
        benchmark.pedantic(workload.run, setup=workload.prepare, rounds=rounds, iterations=1)
