"""The reference-posterior benchmark script runs end to end and scores its goals as stated."""

from __future__ import annotations

import pandas as pd
import pyro
import pytest
import torch
from conftest import benchmark_script
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_validation_enabled

from pyro_flowvi.benchmarks import init_to_median_or_feasible


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("reference_posteriors", "reference_posteriors_benchmark") as module:
        yield module


def test_every_flow_guide_also_runs_with_a_studentt_base(bench):
    flows = [name for name in bench.FLOW_GUIDES if not name.endswith(", t base")]
    # planar ... Householder, the spline, RealNVP and NAF guides, then the banana's spline
    assert len(flows) == 11
    assert flows[-1] == bench.SPLINE_GELU == bench.FLOW_GUIDES[-1]
    assert [f"{name}, t base" for name in flows[:-1]] == bench.FLOW_GUIDES[10:-1]
    assert "AutoNormal" not in bench.FLOW_GUIDES


def test_the_banana_spline_is_one_gaussian_base_flow_guide_as_chosen(bench):
    # The configuration chosen on the banana (benchmarks/flow_guides.py, "spline_gelu"), as it
    # was chosen: a Gaussian base and no t-base twin, counted by the goal's rule.
    assert f"{bench.SPLINE_GELU}, t base" not in bench.GUIDES
    factory, ours = bench.GUIDES[bench.SPLINE_GELU]
    assert ours
    guide = factory(lambda: None, init_to_median_or_feasible)
    assert guide.base == "normal"
    assert guide.flow_family == "spline-autoregressive"
    assert guide.flow_options["hidden_dims"] == [64, 64]
    assert guide.flow_options["activation"] is torch.nn.GELU
    assert guide.flow_options["bound"] == 8.0


def test_main_writes_rows_and_goals(bench, tmp_path):
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    validation = is_validation_enabled()
    try:
        args = bench.parse_args(
            [
                "--posteriors",
                "arK",
                "--num-steps",
                "30",
                "--num-draws",
                "200",
                "--num-particles",
                "2",
                "--wasserstein-draws",
                "100",
                "--guides",
                "AutoNormal",
                "AutoPlanarGuide",
                "AutoPlanarGuide, t base",
                "--results-dir",
                str(tmp_path / "parts"),
                "--out",
                str(tmp_path / "table.md"),
            ]
        )
        table = bench.main(args)
    finally:  # main works in float64, on one thread, without validation
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        pyro.enable_validation(validation)
    assert list(table.index) == ["AutoNormal", "AutoPlanarGuide", "AutoPlanarGuide, t base"]
    assert (table["error"].fillna("") == "").all(), table["error"]
    cached = pd.read_csv(tmp_path / "parts" / "arK.csv", index_col=0)
    assert list(cached.index) == list(table.index)
    text = (tmp_path / "table.md").read_text()
    assert "| AutoPlanarGuide, t base |" in text
    # --training default: our guides train as fit does without a loss, Pyro's with Trace_ELBO
    # and --num-particles; the table says which.
    assert list(table["training"]) == ["ELBO x 2", "STL x 8", "STL x 8"]
    assert "| AutoPlanarGuide | STL x 8 |" in text
    assert "| AutoNormal | ELBO x 2 |" in text
    # The goal row names the flow guide with the highest ELBO, whichever its base.
    flows = table.loc[["AutoPlanarGuide", "AutoPlanarGuide, t base"]]
    best = flows["elbo"].idxmax()
    assert f"| arK | {best} |" in text


@pytest.mark.parametrize(
    "ours, training, fits_default",
    [
        (True, "default", True),
        (True, "elbo", False),
        (False, "default", False),
        (False, "elbo", False),
    ],
)
def test_loss_of_each_guide(bench, ours, training, fits_default):
    # None lets fit choose the guide's documented default; otherwise Trace_ELBO, K particles
    args = bench.parse_args(["--training", training, "--num-particles", "3"])
    loss = bench._loss(ours, args)
    if fits_default:
        assert loss is None
    else:
        assert type(loss) is Trace_ELBO
        assert loss.num_particles == 3 and loss.vectorize_particles
