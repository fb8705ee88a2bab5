"""Smoke test of benchmarks/bench_model.py: every variant of the model benchmark runs once on a
tiny configuration (SE-ResNet-18 at batch 2, torch.compile with the "eager" backend so nothing
is compiled by inductor), the correctness guard passes on the real models and fails on a wrong
one, and the CLI writes its table, CSV and markdown. Not a timing test."""

from __future__ import annotations

import csv
import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_model  # noqa: E402


@pytest.fixture(autouse=True)
def fast_harness():
    """One thread (tiny calls on two threads of a busy machine wait for a descheduled thread),
    and no torch structured tracing: under pytest's log capture, torch's "torch.__trace" logger
    ends up with pytest's capture handlers, so every dynamo/AOT step serialises its graphs and
    tensors into log records; that took this file from ~15 s to ~2.5 minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trace_log = logging.getLogger("torch.__trace")
    handlers = trace_log.handlers
    trace_log.handlers = []
    yield
    trace_log.handlers = handlers
    torch.set_num_threads(threads)


def tiny_config(**kw) -> bench_model.Config:
    base = dict(models=("cifar",), batch={"cifar": 2, "imagenet": 1}, compile_models=("cifar",),
                compile_backend="eager", target_s=0.0, min_rounds=1, max_rounds=1)
    base.update(kw)
    return bench_model.Config(**base)


@pytest.mark.parametrize("workload", bench_model.WORKLOADS)
def test_every_variant_runs(workload):
    # compiled-noSE only in inference: tracing the training graphs is the slow part of this file
    baseline = workload == "infer"
    cfg = tiny_config(compile_baseline=baseline)
    rows, compiles, checks = bench_model.bench(bench_model.MODEL_SPECS["cifar"], workload, cfg, log=lambda m: None)
    variants = list(bench_model.VARIANTS) if baseline else list(bench_model.VARIANTS[:-1])
    assert [r.variant for r in rows] == variants
    # one whole rotation: every variant once per round, as many rounds as variants
    assert all(r.calls == len(variants) for r in rows)
    assert all(r.median_ms > 0 and r.p20_ms <= r.median_ms <= r.p80_ms for r in rows)
    by = {r.variant: r for r in rows}
    assert by["noSE"].se_overhead is None
    for name in ("reference", "fused", "compiled"):
        assert by[name].se_overhead is not None
    assert (by["compiled"].overhead_vs_compiled_noSE is not None) == baseline
    assert [(c.workload, c.variant) for c in compiles] == [(workload, v) for v in variants[3:]]
    assert len(checks) == 2 and all("vs reference" in c for c in checks)
    assert bench_model.headline(rows) is not None


def test_guard_rejects_a_wrong_fused_model():
    cfg = tiny_config(compile_models=())
    spec = bench_model.MODEL_SPECS["cifar"]
    x, labels = bench_model.make_batch(spec, 2, cfg)
    variants = {name: bench_model.build_variant(spec, name, "infer", x, labels, cfg) for name in cfg.variants("cifar")}
    for v in variants.values():
        v.workload.run()
    assert bench_model.check_against_reference(variants, "infer", cfg, "cifar infer")
    variants["fused"].last["out"] = variants["fused"].last["out"] * 1.01
    with pytest.raises(bench_model.Mismatch, match="logits differ"):
        bench_model.check_against_reference(variants, "infer", cfg, "cifar infer")


def test_headline_verdicts():
    def rows(ref, fused):
        mk = lambda v, o: bench_model.Row("cifar", "SE-ResNet-18", 2, "train", v, 5, 1.0, 1.0, 1.0,  # noqa: E731
                                          o, None if o is None else o * 0.9, None if o is None else o * 1.1)
        return [mk("noSE", None), mk("reference", ref), mk("fused", fused)]

    yes, no, unresolved = (bench_model.headline(rows(*o)) for o in ((0.40, 0.10), (0.40, 0.30), (-0.01, 0.01)))
    assert (yes.halves, yes.status) == (True, "yes")
    assert (no.halves, no.status) == (False, "no")
    assert (unresolved.halves, unresolved.status) == (None, "unresolved")
    assert "YES, in every case" in bench_model.summary_lines([yes])[0]
    assert "NOT SHOWN" in bench_model.summary_lines([yes, unresolved])[0]


def test_cli(tmp_path, capsys):
    csv_path, md_path = tmp_path / "m.csv", tmp_path / "m.md"
    # without the compiled variants, which test_every_variant_runs covers: tracing is the slow part
    bench_model.main(["--models", "cifar", "--workloads", "infer", "--cifar-batch", "2", "--no-compile",
                      "--target-s", "0", "--min-rounds", "1", "--max-rounds", "1", "--system-malloc",
                      "--csv", str(csv_path), "--md", str(md_path)])
    out = capsys.readouterr().out
    assert "FusedSE removes" in out and "Issue target" in out and "torch:" in out
    with open(csv_path) as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["noSE", "reference", "fused"]
    md = md_path.read_text()
    assert "--cifar-batch 2" in md and "| SE-ResNet-18 |" in md


def test_amp_is_cuda_only():
    with pytest.raises(SystemExit):
        bench_model.parse_args(["--amp"])
