"""The predictive-chance benchmark: Pyro's predictive test repeated over optimizer seeds."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import benchmark_script


@pytest.fixture(scope="module")
def chance():
    with benchmark_script("predictive_chance") as module:
        yield module


def test_summary_counts_passes_and_ratios_to_the_anchor(chance):
    records = [
        {"guide": "pyro_diag_normal", "seed": 0, "passed": True, "errors_sd": [0.0, 0.5]},
        {"guide": "pyro_diag_normal", "seed": 1, "passed": False, "errors_sd": [0.5, 0.0]},
        {"guide": "planar", "seed": 0, "passed": True, "errors_sd": [0.1, 0.1]},
        {"guide": "planar", "seed": 1, "passed": True, "errors_sd": [0.1, 0.1]},
    ]
    rows = {row["guide"]: row for row in chance.summarize(records)}
    assert rows["pyro_diag_normal"]["passed"] == 1
    assert rows["planar"]["passed"] == 2
    assert rows["planar"]["pass_rate_vs_anchor"] == pytest.approx(2.0)
    assert rows["pyro_diag_normal"]["rms_error_sd"] == pytest.approx(0.125**0.5)
    assert rows["planar"]["rms_error_sd"] == pytest.approx(0.1)


def test_the_exact_posterior_has_errors_within_monte_carlo_error(chance, monkeypatch):
    # A guide that draws the exact Beta(k + 1, n - k + 1) posterior: its predictive means
    # differ from the exact ones by Monte Carlo error only, about 1 / sqrt(num_samples)
    # predictive sd (0.016 for 4000 draws); 4 of those is the tolerance.
    counts = torch.tensor(chance.COUNTS)

    def exact_guide(num_trials):
        with pyro.plate("data", num_trials.size(0)):
            pyro.sample("phi", dist.Beta(counts + 1, num_trials - counts + 1))

    monkeypatch.setitem(chance.GUIDES, "exact", lambda model: exact_guide)
    record = chance.run_one("exact", 0, num_steps=0, lr=0.1, num_samples=4000)
    assert record["passed"]
    assert max(abs(e) for e in record["errors_sd"]) < 4 / 4000**0.5


def test_main_prints_a_row_per_guide(chance, capsys):
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    rows = chance.main(
        ["--guides", "pyro_diag_normal", "planar", "--seeds", "2", "--num-steps", "20"]
        + ["--num-samples", "100"]
    )
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    assert [row["guide"] for row in rows] == ["pyro_diag_normal", "planar"]
    assert all(row["runs"] == 2 for row in rows)
    out = capsys.readouterr().out
    assert "| planar | " in out
