"""The exact-start benchmark: a guide started at the posterior, fit, a time limit, the report."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from conftest import benchmark_script


@pytest.fixture(scope="module")
def exact():
    with benchmark_script("exact_start") as module:
        yield module


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _args(exact, tmp_path, *extra):
    return exact.parse_args(
        ["--dims", "6", "--num-steps", "20", "--num-draws", "200", "--moment-draws", "50"]
        + ["--outdir", str(tmp_path), *extra]
    )


def test_a_householder_guide_starts_and_stays_exact_with_stl(exact, tmp_path):
    pyro.enable_validation(False)  # as main does: validation's checks do not vectorize
    args = _args(exact, tmp_path)
    target = exact.make_target(6, 2.0)
    row = exact.run_cell(
        "householder", exact.builder("householder", target), target, "stl", 0, args
    )
    assert row["init_choice"] == "full" and row["error"] == ""
    assert abs(row["kl_start"]) < 1e-6  # the Laplace start of a Gaussian is exact
    assert row["steps_done"] == 20 and row["within"]
    # STL's gradient vanishes there; Adam's normalized steps still move it a little (training.md)
    assert abs(row["kl"]) < 1e-2
    for key in ("mean_err", "rs_mean_err", "rs_khat", "ms"):
        assert math.isfinite(row[key]), key


def test_the_time_limit_stops_the_fit_with_whole_steps(exact, tmp_path):
    pyro.enable_validation(False)
    args = _args(exact, tmp_path, "--num-steps", "100000", "--max-seconds", "1")
    target = exact.make_target(6, 2.0)
    row = exact.run_cell("normal", exact.builder("normal", target), target, "elbo", 0, args)
    assert row["error"].startswith("time limit 1 s after")
    assert 0 < row["steps_done"] < 100000
    assert math.isfinite(row["kl"])


def test_main_writes_the_report_and_reuses_cells(exact, tmp_path, restore_threads):
    args = _args(exact, tmp_path, "--guides", "radial", "normal", "--elbo-only", "normal")
    rows = exact.main(args)
    assert [(r["guide"], r["estimator"]) for r in rows] == [
        ("radial", "elbo"),
        ("radial", "stl"),
        ("radial", "iw"),
        ("normal", "elbo"),
    ]
    assert all(r["error"] == "" for r in rows)
    report = (tmp_path / "exact_start.md").read_text()
    assert "### 6-D" in report and "exact draws" in report and "python benchmarks/" in report
    path = exact.cell_path(str(tmp_path), 6, "radial", "iw", 0)
    stamp = path.stat().st_mtime_ns
    again = exact.main(_args(exact, tmp_path, "--guides", "radial", "--reuse"))
    assert len(again) == 3 and path.stat().st_mtime_ns == stamp
