"""Tests of the ``pyro-flowvi`` command (pyro_flowvi.cli) and its console-script entry."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_flowvi import cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_console_script_entry_point_resolves_to_main():
    pyproject = (ROOT / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]")[1].split("\n[")[0]
    (entry,) = re.findall(r'^pyro-flowvi = "([\w.]+:\w+)"$', scripts, flags=re.M)
    module, _, function = entry.partition(":")
    assert getattr(importlib.import_module(module), function) is cli.main


def test_help_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "pyro_flowvi.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for command in ("targets", "fit", "info"):
        assert command in done.stdout


def test_fit_runs_end_to_end_as_a_command_and_resumes_its_checkpoint(tmp_path):
    path = tmp_path / "fit.pt"
    command = [sys.executable, "-m", "pyro_flowvi.cli", "fit", "funnel", "--dim", "3"]
    command += ["--guide", "planar", "--num-transforms", "2"]
    options = ["--num-steps", "30", "--num-draws", "50", "--checkpoint", str(path), "--json"]
    done = subprocess.run(command + options, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["guide"] == "AutoPlanarGuide" and summary["num_steps"] == 30
    # funnel has log Z = 0: the KL is minus the ELBO, and positive up to Monte Carlo error
    assert summary["kl"] == pytest.approx(-summary["elbo"])
    assert summary["kl"] > -4 * summary["elbo_mcse"]
    assert {"khat", "verdict", "iw_elbo"} <= set(summary)

    # the same command with more steps continues the checkpoint (here in this interpreter)
    options[1] = "40"
    assert cli.main(command[3:] + options) == 0
    assert torch.load(path, weights_only=True)["step"] == 40
    assert torch.get_default_dtype() == torch.float64  # conftest's, put back by the command


def test_fit_on_a_reference_posterior_reports_its_errors(capsys):
    argv = ["fit", "kilpisjarvi", "--guide", "normal", "--num-steps", "20", "--num-draws", "40"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "target: kilpisjarvi, 3 parameters" in out and "guide:  AutoNormal" in out
    assert "against the reference draws" in out and "PSIS k-hat" in out


def test_every_guide_name_is_a_guide_class():
    import pyro.infer.autoguide

    import pyro_flowvi

    for class_name, _ in cli.GUIDES.values():
        assert hasattr(pyro_flowvi, class_name) or hasattr(pyro.infer.autoguide, class_name)


def test_targets_lists_the_synthetic_and_reference_posteriors(capsys):
    assert cli.main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("funnel", "banana", "rotated_gaussian", "logistic_regression", "eight_schools"):
        assert name in out


def test_info_prints_the_versions(capsys):
    import pyro_flowvi

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"pyro-flowvi  {pyro_flowvi.__version__}" in out and "torch" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "nowhere"], "unknown target 'nowhere'"),
        (["fit", "arK", "--dim", "3"], "--dim applies to the synthetic targets only"),
        (["fit", "funnel", "--num-steps", "0"], "must be an int >= 1, got 0"),
        (["fit", "funnel", "--lr", "-1"], "must be a positive number, got -1"),
        (["fit", "funnel", "--guide", "flowy"], "invalid choice: 'flowy'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_with_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
