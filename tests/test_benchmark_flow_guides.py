"""The flow-guide benchmark script: its log-weight helper is exact, and main runs end to end."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal, init_to_value

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "flow_guides.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("flow_guides_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _plated_model(y):
    # mu.unsqueeze(-1) does not broadcast over an outer plate of draws: the helper must cope.
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", y.shape[-1], dim=-1):
        pyro.sample("y", dist.Normal(mu.unsqueeze(-1), 1.0), obs=y)


def test_log_weights_of_the_exact_posterior_equal_log_z(bench):
    y = torch.tensor([0.3, -1.2, 2.0, 0.7])
    n = y.numel()
    post_mean, post_sd = y.sum() / (n + 1), (1.0 / (n + 1)) ** 0.5
    log_z = dist.MultivariateNormal(torch.zeros(n), torch.eye(n) + torch.ones(n, n)).log_prob(y)
    guide = AutoNormal(
        _plated_model, init_loc_fn=init_to_value(values={"mu": post_mean}), init_scale=post_sd
    )
    guide(y)  # set up its parameters
    log_w = bench.log_weights(_plated_model, guide, (y,), num_draws=50, chunk=20)
    assert log_w.shape == (50,)
    assert torch.allclose(log_w, log_z.expand(50), atol=1e-8)


def test_main_runs_end_to_end(bench, tmp_path):
    args = bench.parse_args(
        [
            "--num-steps",
            "20",
            "--warmup",
            "5",
            "--num-draws",
            "64",
            "--reference-draws",
            "500",
            "--targets",
            "funnel",
            "logistic_regression",
            "--guides",
            "normal",
            "householder",
            "pyro_householder",
            "--outdir",
            str(tmp_path),
        ]
    )
    threads = torch.get_num_threads()
    try:
        rows = bench.main(args)
    finally:
        torch.set_num_threads(threads)
    assert {(r["target"], r["guide"]) for r in rows} == {
        (t, g)
        for t in ("funnel", "logistic_regression")
        for g in ("normal", "householder", "pyro_householder")
    }
    for row in rows:
        assert row["error"] == ""
        assert math.isfinite(row["elbo"]) and math.isfinite(row["ms"])
        assert row["elbo"] <= row["log_z"] + 4 * math.hypot(row["elbo_se"], row["log_z_se"])
    ratios = [r["ratio"] for r in rows if r["guide"] == "householder"]
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    with open(tmp_path / "benchmark_flow_guides.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    report = (tmp_path / "benchmark_flow_guides.md").read_text()
    for heading in ("## funnel", "## logistic_regression", "## Verdict", "python benchmarks/"):
        assert heading in report

    # The report can be rebuilt from the run's files alone.
    bench.main(
        bench.parse_args(["--report-from", str(tmp_path), "--outdir", str(tmp_path / "re")])
    )
    assert (tmp_path / "re" / "benchmark_flow_guides.md").read_text() == report


def test_optional_guides_run_only_when_named(bench, tmp_path):
    assert bench.OPTIONAL == ["iaf_affine", "iaf_t"]
    assert not set(bench.OPTIONAL) & set(bench.parse_args([]).guides)
    args = bench.parse_args(
        ["--num-steps", "5", "--warmup", "1", "--num-draws", "32", "--targets", "funnel"]
        + ["--guides", *bench.OPTIONAL, "pyro_iaf", "--outdir", str(tmp_path)]
    )
    threads = torch.get_num_threads()
    try:
        rows = bench.main(args)
    finally:
        torch.set_num_threads(threads)
    for name in bench.OPTIONAL:
        (row,) = [r for r in rows if r["guide"] == name]
        assert row["error"] == "" and math.isfinite(row["elbo"]) and math.isfinite(row["ratio"])
