"""examples/diagnostics_eight_schools.py runs end to end with tiny arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import load_example


@pytest.fixture
def example():
    return load_example("diagnostics_eight_schools")


def test_example_runs_and_writes_its_outputs(example, tmp_path):
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = example.parse_args(
            [
                *("--num-steps", "15", "--num-draws", "60", "--khat-sets", "3"),
                *("--outdir", str(tmp_path), "--no-progress"),
            ]
        )
        out = example.main(args)
    finally:
        torch.set_num_threads(threads)
    table = out["table"]
    assert list(table.index) == list(example.GUIDES) + [f"{g}, resampled" for g in example.GUIDES]
    assert not table["resampled"].iloc[:4].any() and table["resampled"].iloc[4:].all()
    assert table["khat"].notna().all() and table["wasserstein"].notna().all()
    for filename in ("comparison.csv", "elbo.png", "marginals.png", "funnel.png"):
        assert (tmp_path / filename).stat().st_size > 0
    for report in out["reports"].values():
        assert report.num_draws == 60 and report.fit_time is not None
        lo, hi = report.khat_interval
        assert lo <= report.khat <= hi
    assert set(out["khat_spreads"]) == set(example.GUIDES)
    for spread in out["khat_spreads"].values():
        assert sum(spread["verdicts"].values()) == 3
        assert 0.0 <= spread["covers"] <= 1.0 and spread["reported_se"] > 0
