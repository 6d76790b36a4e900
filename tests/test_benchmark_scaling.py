"""The scaling benchmark: its model, one cell in-process, a time limit, the figure."""

from __future__ import annotations

import pyro
import pytest
from conftest import benchmark_script
from pyro import poutine


@pytest.fixture(scope="module")
def scaling():
    with benchmark_script("scaling") as module:
        yield module


def test_the_model_has_d_group_effects(scaling):
    model, data = scaling.hierarchical(7)
    trace = poutine.trace(model).get_trace(*data)
    assert trace.nodes["theta"]["value"].shape == (7,)
    assert trace.nodes["y"]["is_observed"] and data[0].shape == (7,)


def test_one_cell_in_this_process(scaling):
    args = scaling.parse_args(
        ["--worker", "--guide", "householder", "--dim", "5", "--max-steps", "4"]
    )
    row = scaling.worker(args)
    pyro.clear_param_store()
    assert row["latent_dim"] == 7 and row["steps"] == 4 and row["error"] == ""
    assert row["ms"] > 0 and row["rss_mb"] > 0 and row["num_params"] > 7


def test_a_cell_past_its_time_limit_is_a_failure(scaling, tmp_path):
    args = scaling.parse_args(["--timeout", "0.5", "--outdir", str(tmp_path)])
    row = scaling.run_cell("iaf", 10, args)
    assert row["error"].startswith("time limit")


def test_report_and_figure(scaling, tmp_path):
    args = scaling.parse_args(["--outdir", str(tmp_path)])
    rows = [
        {"guide": "iaf", "dim": 10, "latent_dim": 12, "ms": 3.0, "rss_mb": 300.0, "error": ""},
        {"guide": "iaf", "dim": 100, "latent_dim": 102, "ms": 9.0, "rss_mb": 320.0, "error": ""},
        {"guide": "pyro_iaf_default", "dim": 100, "latent_dim": 102, "error": "memory: ..."},
    ]
    meta = {"commit": "abc", "date": "today", "load": [1.0, 1.0, 1.0]}
    scaling.write_outputs(rows, args, meta)
    assert (tmp_path / "scaling_flow_guides.png").stat().st_size > 1000
    table = (tmp_path / "scaling.md").read_text()
    assert "| pyro_iaf_default | 102 |" in table and "memory" in table
