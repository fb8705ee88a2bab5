"""pytest configuration of the test suite: the TRITON_INTERPRET setting, the
SE_KERNELS_REQUIRE_EXT check and the poisoned_allocations fixture. The helpers the tests share
(input builders, the float64 oracle, the tolerance rules) are in tests/helpers.py; the markers
(float32_models, slow) are declared in pyproject.toml."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels run (slowly) in Triton's interpreter on CPU tensors. The
# variable must be set before se_kernels imports Triton, so it is set here, first (pytest loads
# this file before any test module).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from se_kernels import ops  # noqa: E402


def pytest_configure(config):
    # make test sets SE_KERNELS_REQUIRE_EXT=1: a build that silently failed must fail the run,
    # not skip every native-kernel test.
    if os.environ.get("SE_KERNELS_REQUIRE_EXT") == "1" and ops.extension_error() is not None:
        raise pytest.UsageError(f"SE_KERNELS_REQUIRE_EXT=1 but se_kernels._C did not load: {ops.extension_error()}")


@pytest.fixture
def poisoned_allocations():
    """Every torch.empty* is filled with NaN (deterministic mode), so an output element or a
    scratch buffer that a kernel forgets to write shows up as NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(previous)
