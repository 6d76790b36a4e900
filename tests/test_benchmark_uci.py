"""benchmarks/uci_regression.py runs end to end on a tiny synthetic data set written in the
layout of the UCI folders (the real data are not needed, nor shipped)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("uci_regression", "uci_regression_benchmark") as module:
        yield module


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_dataset(root: Path, name: str, rows: int = 48, splits: int = 2, seed: int = 0) -> None:
    """``data.txt`` (3 inputs, one constant, then the target), index files, 2 splits."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3)) * [1.0, 10.0, 0.0] + [0.0, 5.0, 3.0]
    y = 20.0 + 4.0 * x[:, 0] - 0.3 * x[:, 1] + rng.normal(scale=0.5, size=rows)
    folder = root / name
    folder.mkdir(parents=True)
    np.savetxt(folder / "data.txt", np.column_stack([x, y]))
    (folder / "index_features.txt").write_text("0\n1\n2\n")
    (folder / "index_target.txt").write_text("3\n")
    for k in range(splits):
        order = rng.permutation(rows)
        test, train = order[: rows // 8], order[rows // 8 :]
        np.savetxt(folder / f"index_train_{k}.txt", train, fmt="%d")
        np.savetxt(folder / f"index_test_{k}.txt", test, fmt="%d")
    (folder / "n_hidden.txt").write_text("50\n")
    (folder / "n_epochs.txt").write_text("40\n")


def tiny_args(bench, data_dir, outdir, *extra):
    return bench.parser().parse_args(
        [
            "--data-dir", str(data_dir),
            "--outdir", str(outdir),
            "--epochs", "2",
            "--batch-size", "16",
            "--num-samples", "3",
            "--ensemble-size", "2",
            *extra,
        ]
    )  # fmt: skip


def test_runs_end_to_end_and_resumes(bench, tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(data, "yacht")  # a published name: the table shows the anchor beside it
    out = tmp_path / "out"
    args = tiny_args(bench, data, out, "--datasets", "yacht", "--splits", "2")
    result = bench.main(args)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(bench.METHODS)
    printed = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert printed == lines
    keys = {(r["dataset"], r["split"], r["method"]) for r in lines}
    assert keys == {("yacht", s, m) for s in (0, 1) for m in bench.METHODS}
    for r in lines:
        assert math.isfinite(r["rmse"]) and r["rmse"] > 0
        assert math.isfinite(r["test_ll"])
        assert r["fit_seconds"] > 0 and r["seconds_per_epoch"] == pytest.approx(
            r["fit_seconds"] / 2, abs=1e-3
        )
        assert (r["epochs"], r["batch_size"], r["n_train"], r["n_test"]) == (2, 16, 42, 6)
        members = 2 if r["method"] == "ensemble" else 1
        assert r["num_steps"] == 2 * 3 * members
    table = (out / "uci_table.md").read_text()
    assert "| yacht | 2 |" in table and "-1.25 ± 0.01" in table  # the published anchor
    assert "MNF / mean-field" in table and "### Targets" in table
    summary = result["summary"]
    assert summary["yacht"]["mnf"]["splits"] == 2
    assert set(summary["yacht"]["mnf_vs_meanfield"]) == {"time_ratio", "ll_difference"}
    # a rerun finds every entry done and only rewrites the table
    bench.main(args)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)


def test_parallel_jobs_give_the_same_numbers(bench, tmp_path):
    data = tmp_path / "data"
    write_dataset(data, "toy")
    write_dataset(data, "toy2", seed=1)
    common = (
        "--datasets",
        "toy",
        "toy2",
        "--splits",
        "2",
        "toy2=1",
        "--methods",
        "meanfield",
        "map",
    )
    serial = bench.main(tiny_args(bench, data, tmp_path / "serial", *common))["records"]
    parallel = bench.main(tiny_args(bench, data, tmp_path / "par", *common, "--jobs", "2"))
    assert {(r["dataset"], r["split"]) for r in serial} == {("toy", 0), ("toy", 1), ("toy2", 0)}
    key = lambda r: (r["dataset"], r["split"], r["method"])  # noqa: E731
    for a, b in zip(sorted(serial, key=key), sorted(parallel["records"], key=key), strict=True):
        assert key(a) == key(b)
        assert a["test_ll"] == pytest.approx(b["test_ll"], rel=1e-9)
        assert a["rmse"] == pytest.approx(b["rmse"], rel=1e-9)


def test_protocol_pieces(bench, tmp_path):
    write_dataset(tmp_path, "toy")
    split = bench.load_split(tmp_path, "toy", 1)
    assert split["x_train"].shape == (42, 3) and split["y_test"].shape == (6,)
    data = bench.standardize(split)
    x = data["x_train"]
    assert torch.allclose(x[:, :2].mean(0), torch.zeros(2), atol=1e-9)
    assert torch.allclose(x[:, :2].std(0, unbiased=False), torch.ones(2))
    assert bool(torch.all(x[:, 2] == 0))  # a constant input stays finite
    assert data["y_sd"] == pytest.approx(float(split["y_train"].std()))
    # the test split uses the training moments, so its targets map back exactly
    y_back = data["y_test"].numpy() * data["y_sd"] + data["y_mean"]
    assert np.allclose(y_back, split["y_test"])
    assert bench.num_splits(tmp_path, "toy") == 2
    assert bench.parse_budget("yacht=400:32,toy=5:8") == {"yacht": (400, 32), "toy": (5, 8)}


def test_default_optimizer_and_kl_warmup(bench, tmp_path, monkeypatch):
    # the defaults of docs/bnn_uci.md's table: lr 0.02 decaying to 0.001, KL warm-up over 10%
    args = tiny_args(bench, tmp_path, tmp_path / "o")
    assert (args.lr, args.lr_decay, args.kl_warmup) == (0.02, 0.05, 0.1)
    assert args.lr * args.lr_decay == pytest.approx(1e-3)
    # every method's epoch e of E runs under kl_weight(min(1, e / (0.3 E)))
    seen = []
    real = bench.kl_weight
    monkeypatch.setattr(bench, "kl_weight", lambda beta: seen.append(beta) or real(beta))
    write_dataset(tmp_path, "toy", rows=24)
    data = bench.standardize(bench.load_split(tmp_path, "toy", 0))
    task = tiny_args(
        bench, tmp_path, tmp_path / "o", "--methods", "mnf", "map", "--kl-warmup", "0.3"
    )
    task.budget = (10, 32)
    bench.train_methods(["mnf", "map"], data, task, seed=0)
    assert seen == pytest.approx([b for b in (1 / 3, 2 / 3) for _ in range(2)])
    task.kl_warmup = 0.0  # no warm-up: the ELBO from the first epoch
    seen.clear()
    bench.train_methods(["map"], data, task, seed=0)
    assert seen == []


def test_bad_arguments(bench, tmp_path):
    write_dataset(tmp_path, "toy")
    with pytest.raises(SystemExit, match="--splits must be in \\[1, 2\\]"):
        bench.main(
            tiny_args(bench, tmp_path, tmp_path / "o", "--datasets", "toy", "--splits", "3")
        )
    write_dataset(tmp_path, "toy2", seed=1)
    with pytest.raises(SystemExit, match="no count for \\['toy2'\\]"):
        bench.main(
            tiny_args(
                bench, tmp_path, tmp_path / "o", "--datasets", "toy", "toy2", "--splits", "toy=1"
            )
        )
    with pytest.raises(SystemExit, match="names 'x', not in --datasets"):
        bench.main(
            tiny_args(bench, tmp_path, tmp_path / "o", "--datasets", "toy", "--splits", "x=1")
        )
    with pytest.raises(SystemExit, match="K or NAME=K, got 'toy=two'"):
        bench.main(
            tiny_args(bench, tmp_path, tmp_path / "o", "--datasets", "toy", "--splits", "toy=two")
        )
    with pytest.raises(SystemExit, match="--kl-warmup must be in \\[0, 1\\], got 1.5"):
        bench.main(
            tiny_args(
                bench,
                tmp_path,
                tmp_path / "o",
                "--datasets",
                "toy",
                "--splits",
                "1",
                "--kl-warmup",
                "1.5",
            )
        )
    with pytest.raises(SystemExit, match="no splits for 'nope'"):
        bench.main(tiny_args(bench, tmp_path, tmp_path / "o", "--datasets", "nope"))
    overlap = tmp_path / "toy" / "index_test_0.txt"
    overlap.write_text((tmp_path / "toy" / "index_train_0.txt").read_text().splitlines()[0])
    with pytest.raises(ValueError, match="train and test overlap"):
        bench.load_split(tmp_path, "toy", 0)


def test_mnf_options_reach_the_guide(bench, tmp_path):
    write_dataset(tmp_path, "toy", rows=24)
    data = bench.standardize(bench.load_split(tmp_path, "toy", 0))
    args = tiny_args(bench, tmp_path, tmp_path / "o")
    assert (args.mnf_reverse_model, args.mnf_init_z_scale) == ("tanh", 0.1)
    args = tiny_args(
        bench,
        tmp_path,
        tmp_path / "o",
        "--mnf-reverse-model",
        "conjugate",
        "--mnf-init-z-scale",
        "0.2",
    )
    args.budget = (1, 32)
    fit = bench._Fit("mnf", data, args, seed=0)
    assert (fit.guide.reverse_model, fit.guide.init_z_scale) == ("conjugate", 0.2)
    fit.epoch()
    assert math.isfinite(fit.elbo)
    with pytest.raises(SystemExit):
        tiny_args(bench, tmp_path, tmp_path / "o", "--mnf-reverse-model", "paper")


def test_docs_budget_table_is_the_default(bench):
    # docs/bnn_uci.md states the budget of the full run; it must be what the script runs
    text = (Path(__file__).parents[1] / "docs" / "bnn_uci.md").read_text()
    for name, (epochs, batch) in bench.DEFAULT_BUDGET.items():
        assert batch == 128
        assert f"| {name} | " in text
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} | "))
        assert f" {epochs:,} |" in row, (name, row)
