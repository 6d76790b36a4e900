"""The data-parallel examples run with tiny arguments: in one process, under torchrun, in
Lightning."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_example

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-epochs", "1", "--hidden-dim", "8", "--batch-size", "300", "--quiet"]


def _json_line(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert len(lines) == 1, output
    return json.loads(lines[0])


@pytest.mark.parametrize("model", ["bnn", "vae"])
def test_distributed_example_runs_in_one_process(tmp_path, model):
    example = load_example("distributed_bnn")
    args = example.parser().parse_args(["--model", model, *TINY, "--outdir", str(tmp_path)])
    report = example.main(args)
    assert report["world_size"] == 1
    assert report["steps"] == 1497 // 300  # one epoch of whole batches
    assert torch.isfinite(torch.tensor(report["train_elbo_per_point"]))
    if model == "bnn":
        assert 0.0 <= report["test_accuracy"] <= 1.0
    else:
        assert report["test_elbo_per_image"] < 0
    assert (tmp_path / f"{model}-1x1.json").exists()


def _torchrun_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.slow
@pytest.mark.skipif(not _torchrun_available(), reason="needs torch.distributed with gloo")
def test_distributed_example_under_torchrun_resumes_in_one_process(tmp_path):
    checkpoint = tmp_path / "vae.pt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "examples" / "distributed_bnn.py"),
        "--model",
        "vae",
        *TINY,
        "--checkpoint",
        str(checkpoint),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = _json_line(done.stdout)
    assert report["world_size"] == 2 and report["steps"] == 1497 // 300
    assert checkpoint.exists()

    # one process continues the two processes' fit from rank 0's checkpoint
    torch.set_default_dtype(torch.float32)  # the torchrun processes ran in float32
    example = load_example("distributed_bnn")
    args = example.parser().parse_args(
        ["--model", "vae", *TINY, "--num-epochs", "2", "--checkpoint", str(checkpoint)]
    )
    resumed = example.main(args)
    assert resumed["world_size"] == 1 and resumed["steps"] == 2 * (1497 // 300)


lightning_missing = importlib.util.find_spec("lightning") is None


@pytest.mark.skipif(lightning_missing, reason="needs lightning (the lightning extra)")
# Lightning 2.6's own deprecation notice (its pytree helper) and advice on loader workers
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_lightning_example_runs_in_one_process(tmp_path):
    example = load_example("lightning_bnn")
    args = example.parser().parse_args(["--devices", "1", *TINY, "--outdir", str(tmp_path)])
    report = example.main(args)
    assert report["world_size"] == 1
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert (tmp_path / "lightning-1.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    lightning_missing or not _torchrun_available(), reason="needs lightning and gloo"
)
def test_lightning_example_runs_on_two_processes(tmp_path):
    command = [str(ROOT / "examples" / "lightning_bnn.py"), "--devices", "2", *TINY]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, *command], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert _json_line(done.stdout)["world_size"] == 2
