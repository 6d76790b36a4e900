"""benchmarks/distributed_speedup.py: its table, and (slow) a tiny run end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed_speedup.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("distributed_speedup_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _run(model, procs, threads, seconds, elbo, params=1000):
    test = {"test_accuracy": 0.9} if model == "bnn" else {"test_elbo_per_image": -30.0}
    return {
        "model": model,
        "world_size": procs,
        "threads": threads,
        "seconds_per_epoch": seconds,
        "ms_per_step": 1000 * seconds / 14,
        "train_elbo_per_point": elbo,
        "num_params": params,
        **test,
    }


def test_table_takes_medians_and_ratios_to_the_one_process_run(bench):
    runs = [
        _run("bnn", 1, 1, 1.0, -2.0),
        _run("bnn", 1, 1, 3.0, -2.0),
        _run("bnn", 1, 1, 2.0, -2.0),
        _run("bnn", 2, 1, 0.5, -2.1),
        _run("bnn", 2, 1, 1.5, -2.1),
        _run("vae", 2, 1, 1.0, -30.0, params=50),
    ]
    text = bench.table(runs, {1000: 0.0005, 50: 0.0001})
    lines = text.splitlines()
    bnn_one = next(line for line in lines if "bnn" in line and "| 1 x 1 |" in line)
    bnn_two = next(line for line in lines if "bnn" in line and "| 2 x 1 |" in line)
    assert "| 2.000 | 1.00 |" in bnn_one  # the median of 1, 3, 2 seconds
    assert "| 1.000 | 2.00 |" in bnn_two and "| 0.50 |" in bnn_two  # 2 s / 1 s; 0.5 ms
    vae = next(line for line in lines if "vae" in line)
    assert "| n/a |" in vae  # no one-process run to compare with


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
    assert [(r["world_size"], r["threads"]) for r in runs] == [(1, 1), (2, 1)]
    assert (tmp_path / "out.json").exists()
