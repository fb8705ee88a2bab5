"""pytest configuration of the benchmark suite (`pytest benchmarks --benchmark-only`; CI's
`pytest tests` does not collect benchmarks/): the benchmarks' malloc setting, and the machine
facts in pytest-benchmark's report."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, bench_se and shapes, whatever the import mode

import harness  # noqa: E402

_malloc = []


def pytest_configure(config) -> None:
    _malloc.append(harness.choose_malloc(system_malloc=False))


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), malloc=_malloc[-1],
                        cpu_model=harness.cpu_model())
