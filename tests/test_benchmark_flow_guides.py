"""The flow-guide benchmark script: exact log weights and moments, fit's optimizer, the cell
cache, recorded failures, and the zuko peer in its own process."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_flowvi import fit
from pyro_flowvi.benchmarks.synthetic import banana, funnel, rotated_gaussian

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    had = "flow_guides" in sys.modules
    module = _load("flow_guides")
    yield module
    if not had:
        sys.modules.pop("flow_guides", None)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


def test_default_optim_is_fits_default(bench):
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    result = fit(model, AutoNormal(model), num_steps=7, progress=False)
    ours = bench.default_optim(7)
    assert type(ours) is type(result.optim)
    assert ours.pt_optim_args == result.optim.pt_optim_args
    assert math.isclose(ours.pt_optim_args["lr"] * ours.pt_optim_args["lrd"] ** 7, 1e-4)


@pytest.mark.parametrize(
    "target", [banana(6), rotated_gaussian(5, decades=2.0)], ids=["banana", "rotated"]
)
def test_exact_draws_match_the_exact_moments(bench, target):
    num = 20000
    draws = bench.exact_draws(target, num, seed=1)
    assert draws.shape == (num, target.dim)
    errors = bench.draw_errors(draws, bench.exact_moments(target))
    # standard errors: 1/sqrt(N) for a mean in sd units; sd ratio: sqrt((kurtosis - 1) / 4N),
    # kurtosis <= 9 here (b of the banana); 4.5 of them covers the max over <= 6 coordinates
    assert errors["mean_err"] < 4.5 / math.sqrt(num)
    assert errors["sd_err"] < 4.5 * math.sqrt(8 / (4 * num))


def test_funnel_moments(bench):
    target = funnel(4)
    moments = bench.exact_moments(target)
    draws = bench.exact_draws(target, 20000, seed=2)
    assert moments["sd"][0] == 3.0
    assert abs(draws[:, 0].std() / 3.0 - 1) < 4.5 / math.sqrt(2 * 20000)
    assert moments["sd"][1] == pytest.approx(math.exp(2.25))
    # E[x^2] = E[e^v] = e^{9/2}: the mean of x^2 is unbiased (its noise is heavy-tailed)
    assert abs(draws[:, 1:].mean()) < 0.5


def test_draw_errors_see_a_shift(bench):
    draws = torch.randn(4000, 3).double().numpy() * 2.0 + 1.0
    errors = bench.draw_errors(draws, {"mean": [0.0] * 3, "sd": [2.0] * 3})
    assert errors["mean_err"] == pytest.approx(0.5, abs=0.1)
    assert errors["sd_err"] < 0.1


def _args(bench, tmp_path, *extra):
    return bench.parse_args(
        ["--num-steps", "6", "--warmup", "2", "--num-draws", "64", "--moment-draws", "20"]
        + ["--seeds", "0", "--targets", "funnel", "--outdir", str(tmp_path), *extra]
    )


def test_main_runs_end_to_end_and_reuses_its_cells(bench, tmp_path, restore_threads):
    guides = ["householder", "pyro_householder", "normal"]
    args = _args(bench, tmp_path, "--guides", *guides, "--elbo-only", "pyro_householder")
    rows = bench.main(args)
    assert {(r["guide"], r["estimator"]) for r in rows} == {
        ("householder", "elbo"),
        ("householder", "stl"),
        ("householder", "iw"),
        ("pyro_householder", "elbo"),
        ("normal", "elbo"),
        ("normal", "stl"),
        ("normal", "iw"),
    }
    for row in rows:
        assert row["error"] == ""
        assert math.isfinite(row["kl_gap"]) and math.isfinite(row["ms"])
        assert row["kl_gap"] >= -4 * row["elbo_se"]  # KL >= 0 up to Monte Carlo error
        assert row["config"]["num_steps"] == 6 and row["meta"]["commit"]
        for key in ("mean_err", "sd_err", "rs_mean_err", "rs_sd_err", "rs_khat"):
            assert math.isfinite(row[key]), key
    (plain,) = [r for r in rows if r["guide"] == "householder" and r["estimator"] == "elbo"]
    assert plain["counterpart"] == "pyro_householder" and plain["ratio"] > 0
    with open(tmp_path / "benchmark_flow_guides.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    report = (tmp_path / "benchmark_flow_guides.md").read_text()
    for text in ("### funnel", "python benchmarks/flow_guides.py", "Best configurations"):
        assert text in report
    assert "PSIS k-hat" in report and "exact draws" in report

    # --reuse trains nothing that is cached; --report-only assembles the same table
    cell = bench.cell_path(str(tmp_path), "funnel", "normal", "stl", 0)
    before = json.loads(cell.read_text())
    rows_again = bench.main(_args(bench, tmp_path, "--guides", *guides, "--reuse"))
    assert json.loads(cell.read_text()) == before
    assert len(rows_again) == len(rows) + 2  # pyro_householder's stl and iw were added
    bench.main(_args(bench, tmp_path, "--guides", "normal", "--report-only"))
    assert "| normal | stl |" in (tmp_path / "benchmark_flow_guides.md").read_text()

    # another configuration does not reuse these cells
    assert bench.load_cell(cell, {**before["config"], "num_steps": 7}) is None


def test_a_guide_without_an_inverse_fails_stl_and_is_recorded(bench, tmp_path, restore_threads):
    args = _args(bench, tmp_path, "--guides", "pyro_planar", "--estimators", "stl", "--elbo-only")
    (row,) = bench.main(args)
    assert row["error"].startswith("step 0:") and "cannot score" in row["error"]
    assert row["kl_gap"] == math.inf and row["steps_done"] == 0


def test_unknown_names_are_refused(bench):
    with pytest.raises(ValueError, match="nope"):
        bench.main(bench.parse_args(["--guides", "nope"]))
    with pytest.raises(ValueError, match="logistic_regression"):
        bench.main(bench.parse_args(["--targets", "logistic_regression"]))


def test_equal_capacity_peers_match_our_sizes(bench):
    dim = 10
    assert bench.hidden_widths("iaf", dim) == [20, 20]
    for name in ("spline-autoregressive", "spline-coupling", "realnvp", "naf"):
        assert bench.hidden_widths(name, dim) == [20, 20], name
    nsf = bench.pyro_nsf(dim)
    assert len(nsf) == bench.NUM_SPLINE
    realnvp = bench.pyro_realnvp(dim)
    assert sum(1 for t in realnvp if "Coupling" in type(t).__name__) == 4


def test_spline_gelu_builds_the_documented_configuration(bench):
    # docs/benchmark_flow_guides.md and docs/guides.md recommend this configuration by its
    # options: the guide the benchmark trains must be the one they name.
    target = banana()
    guide = bench.build_guide("spline_gelu", target.model, target, "stl")
    guide()
    assert guide.stick_the_landing and guide.flow_family == "spline-autoregressive"
    layers = [layer for layer in guide.flow.layers if hasattr(layer, "made")]
    assert len(layers) == 3
    for layer in layers:
        assert layer.transformer.bound == 8.0 and layer.transformer.bins == 8
        assert layer.made.hidden_dims == [64, 64]
        assert all(isinstance(a, torch.nn.GELU) for a in layer.made.activations)
    assert "spline_gelu" in bench.OURS and "spline_gelu" in bench.OPTIONAL


@pytest.mark.skipif(importlib.util.find_spec("zuko") is None, reason="zuko is not installed")
def test_zuko_peer_runs_in_its_own_process(bench, tmp_path, restore_threads):
    args = _args(bench, tmp_path, "--guides", "zuko_nsf", "--estimators", "elbo")
    imported_before = "zuko" in sys.modules  # an earlier test of the session may import it
    (row,) = bench.main(args)
    assert (row["guide"], row["estimator"], row["error"]) == ("zuko_nsf", "elbo", "")
    assert math.isfinite(row["kl_gap"]) and math.isfinite(row["rs_mean_err"])
    assert row["counterpart"].startswith("spline/zuko") and row["ratio"] > 0
    # zuko was imported in the subprocess only (its import switches validation off globally)
    assert ("zuko" in sys.modules) == imported_before
