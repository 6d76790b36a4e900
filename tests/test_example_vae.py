"""examples/vae_flows.py runs end to end with tiny arguments."""

from __future__ import annotations

import json
import math

import pytest
from conftest import load_example

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _load_example():
    return load_example("vae_flows")


def test_vae_flows_example(tmp_path):
    example = _load_example()
    families = "gaussian,planar,radial,householder,iaf,sylvester-orthogonal," + (
        "sylvester-householder,sylvester-triangular"
    )
    args = example.parser().parse_args(
        [
            "--num-steps", "3",
            "--num-seeds", "2",
            "--seed", "4",
            "--families", families,
            "--latent-dim", "2",
            "--hidden-dim", "8",
            "--num-transforms", "2",
            "--is-samples", "30",
            "--outdir", str(tmp_path),
        ]
    )  # fmt: skip
    table = example.main(args)
    assert [row["family"] for row in table] == families.split(",")
    for row in table:
        assert row["seeds"] == 2
        assert math.isfinite(row["test_neg_elbo"]) and row["test_neg_elbo"] > 0
        # the importance-sampled bound is never looser than the ELBO of the same draws
        assert row["test_neg_log_px"] <= row["test_neg_elbo"]
    assert table[0]["time_ratio"] == 1.0
    assert (tmp_path / "vae_flows.png").stat().st_size > 0
    saved = json.loads((tmp_path / "vae_flows.json").read_text())
    assert len(saved["results"]) == 2 * len(table)
    assert {r["seed"] for r in saved["results"]} == {4, 5}
    assert (tmp_path / "vae_flows.csv").read_text().startswith("family,seed,")


def test_vae_flows_example_rejects_an_unknown_family(tmp_path):
    example = _load_example()
    args = example.parser().parse_args(["--families", "gaussian,nice", "--outdir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown family 'nice'"):
        example.main(args)
