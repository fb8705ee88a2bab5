"""Hypothesis fuzzing of the native CPU kernels over shapes, dtypes, layouts and options, against
the float64 reference (outputs and every gradient)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ACTIVATIONS,
    GATES,
    GRAD_NAMES,
    NATIVE_CPU,
    Case,
    assert_float32_matches,
    assert_low_precision_matches,
    make_inputs,
    reference64,
    run,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from se_kernels import fused_se
from se_kernels.reference import se_reference

cases = st.builds(
    Case,
    shape=st.tuples(st.integers(0, 5), st.integers(1, 70), st.integers(1, 11), st.integers(1, 11)),
    squeeze=st.integers(1, 12),
    activation=st.sampled_from(ACTIVATIONS),
    gate=st.sampled_from(GATES),
    bias=st.booleans(),
    residual=st.booleans(),
    out_activation=st.sampled_from([None, "relu"]),
    channels_last=st.booleans(),
)


@NATIVE_CPU
@pytest.mark.usefixtures("poisoned_allocations")
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_cpu_backend_matches_reference(case, dtype, seed):
    inputs = make_inputs(case, dtype, seed)
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y, grads = run(fused_se, inputs, dy, case, backend="cpu")
    y_ref, grads_ref = reference64(inputs, dy, case)
    pairs = [("y", y, y_ref)] + [(k, grads[k], grads_ref[k]) for k in GRAD_NAMES if inputs[k] is not None]
    if dtype == torch.float32:
        assert_float32_matches({name: out for name, out, _ in pairs}, {name: ref for name, _, ref in pairs},
                               inputs, dy, case, f"seed={seed} {case}")
        return
    y_eager, grads_eager = run(se_reference, inputs, dy, case)
    assert_low_precision_matches({name: out for name, out, _ in pairs}, {"y": y_eager, **grads_eager},
                                 {name: ref for name, _, ref in pairs}, dtype, f"seed={seed} {case}")
