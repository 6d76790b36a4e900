"""benchmarks/distributed_speedup.py: its table, and (slow) a tiny run end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("distributed_speedup", "distributed_speedup_benchmark") as module:
        yield module


def _run(model, config, seconds, elbo, params=1000, steps_per_epoch=14):
    test = {"test_accuracy": 0.9} if model == "bnn" else {"test_elbo_per_image": -30.0}
    procs, threads = int(config[0]), int(config[2])
    return {
        "config": config,
        "model": model,
        "world_size": procs,
        "threads": threads,
        "seconds_per_epoch": seconds,
        "ms_per_step": 1000 * seconds / steps_per_epoch,
        "train_elbo_per_point": elbo,
        "num_params": params,
        **test,
    }


def test_table_takes_medians_ratios_and_the_bound_from_the_half_batch_run(bench):
    runs = [
        _run("bnn", "1x1", 1.4, -2.0),
        _run("bnn", "1x1", 4.2, -2.0),
        _run("bnn", "1x1", 2.8, -2.0),  # median 2.8 s per epoch of 14 steps: 200 ms per step
        _run("bnn", "2x1", 0.7, -2.1),
        _run("bnn", "2x1", 2.1, -2.1),  # median 1.4 s
        _run("bnn", "1x1/2", 4.2, -2.0, steps_per_epoch=28),  # 150 ms per step
        _run("vae", "2x1", 1.0, -30.0, params=50),
    ]
    text = bench.table(runs, {1000: 0.05, 50: 0.0001})  # all-reduce: 50 ms, 0.1 ms
    lines = text.splitlines()
    bnn_one = next(line for line in lines if "bnn" in line and "| 1 x 1 |" in line)
    bnn_two = next(line for line in lines if "bnn" in line and "| 2 x 1 |" in line)
    half = next(line for line in lines if "half batch" in line)
    assert "| 2.800 | 1.00 | 200.0 |" in bnn_one
    # 2.8 s / 1.4 s; bound 200 ms / (150 ms + 50 ms)
    assert "| 1.400 | 2.00 | 100.0 | 50.00 | 1.00 |" in bnn_two
    assert "| 4.200 | - | 150.0 |" in half
    vae = next(line for line in lines if "vae" in line)
    assert "| 1.000 | - | 71.4 |" in vae  # no one-process run to compare with


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_tiny_benchmark_runs_end_to_end(bench, tmp_path):
    args = bench.parser().parse_args(
        [
            "--models",
            "vae",
            "--num-epochs",
            "1",
            "--repeats",
            "1",
            "--configs",
            "1x1",
            "2x1",
            "--out",
            str(tmp_path / "out.json"),
        ]
    )
    runs = bench.main(args)
    assert [(r["config"], r["world_size"]) for r in runs] == [("1x1", 1), ("2x1", 2)]
    assert (tmp_path / "out.json").exists()
