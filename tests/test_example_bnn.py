"""examples/bnn_mnf.py runs end to end with tiny arguments."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_example

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _load_example():
    return load_example("bnn_mnf")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bnn_mnf_example(tmp_path):
    example = _load_example()
    args = example.parser().parse_args(
        [
            "--num-steps", "3",
            "--num-seeds", "2",
            "--seed", "7",
            "--hidden-dim", "8",
            "--flow-hidden-dim", "4",
            "--batch-size", "50",
            "--num-samples", "3",
            "--outdir", str(tmp_path),
        ]
    )  # fmt: skip
    table = example.main(args)
    assert [(row["arch"], row["method"]) for row in table] == [
        (arch, method) for arch in ("mlp", "conv") for method in ("mnf", "mean-field", "map")
    ]
    for row in table:
        assert row["seeds"] == 2
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["ece"] <= 1.0
        assert math.isfinite(row["nll"]) and row["nll"] > 0
        for name in example.OOD_SETS:
            assert 0.0 <= row[f"auroc {name}"] <= 1.0
        if row["method"] == "mean-field":
            assert row["time_ratio"] == 1.0
    assert (tmp_path / "bnn_regression.png").stat().st_size > 0
    saved = json.loads((tmp_path / "bnn_mnf.json").read_text())
    assert {r["seed"] for r in saved["results"]} == {7, 8}


def test_metrics():
    example = _load_example()
    y = torch.tensor([0, 1, 1, 0])
    perfect = torch.nn.functional.one_hot(y, 2).double()
    assert example.expected_calibration_error(perfect, y) == 0.0
    # always 70% sure and right 3 times out of 4: |0.75 - 0.7| = 0.05
    probs = torch.tensor([[0.7, 0.3], [0.3, 0.7], [0.7, 0.3], [0.7, 0.3]], dtype=torch.float64)
    assert math.isclose(example.expected_calibration_error(probs, y), 0.05, abs_tol=1e-12)
    uniform = torch.full((4, 2), 0.5, dtype=torch.float64)
    metrics = example.classification_metrics(perfect, y, {"ood": uniform})
    assert metrics["accuracy"] == 1.0 and metrics["auroc ood"] == 1.0


def test_bnn_mnf_example_rejects_an_unknown_method(tmp_path):
    example = _load_example()
    args = example.parser().parse_args(["--methods", "mnf,svgd", "--outdir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown method 'svgd'"):
        example.main(args)
