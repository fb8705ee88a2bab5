"""pytest configuration of the benchmark suite (`pytest benchmarks --benchmark-only`; CI's
`pytest tests` does not collect benchmarks/)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_se and shapes, whatever the import mode

import bench_se  # noqa: E402

_settings = {}


def pytest_configure(config) -> None:
    """bench_se's allocator setting (see bench_se.keep_freed_memory), so that both time the same
    thing; --system-malloc has no pytest counterpart."""
    _settings["malloc"] = bench_se.choose_malloc(system_malloc=False)


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                        malloc=_settings["malloc"], cpu_model=bench_se.cpu_model())
