"""The ``pyro-flowvi`` command: try a guide on a shipped posterior, without writing code.

Subcommands:

- ``pyro-flowvi targets``: the posteriors that ship with the package: four synthetic ones
  (three with an exact log evidence) and six posteriordb references with gold-standard draws;
- ``pyro-flowvi fit TARGET``: fit a guide to one of them with :func:`pyro_flowvi.fit` and print
  the fit, the VI diagnostics (ELBO, importance-weighted ELBO, PSIS k-hat and its verdict),
  the exact KL divergence where the log evidence is known, and the error of the posterior
  means and standard deviations against the reference draws where there are some. With
  ``--checkpoint`` a fit stopped with Ctrl-C resumes when the same command is run again;
- ``pyro-flowvi info``: versions of the package and its dependencies, for bug reports.

Example:
    .. code-block:: console

        $ pyro-flowvi fit eight_schools_centered --guide iaf --num-steps 3000 --checkpoint fit.pt
"""

from __future__ import annotations

__all__ = ["GUIDES", "main"]

import argparse
import importlib.metadata
import json
import logging
import math
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

#: guide name -> (class name in pyro_flowvi or pyro.infer.autoguide, takes flow options)
GUIDES: dict[str, tuple[str, bool]] = {
    "normal": ("AutoNormal", False),
    "mvn": ("AutoMultivariateNormal", False),
    "iaf": ("AutoIAFGuide", True),
    "planar": ("AutoPlanarGuide", True),
    "radial": ("AutoRadialGuide", True),
    "sylvester": ("AutoSylvesterGuide", True),
    "householder": ("AutoHouseholderGuide", True),
    "spline": ("AutoNeuralSplineGuide", True),
    "realnvp": ("AutoRealNVPGuide", True),
    "naf": ("AutoNAFGuide", True),
}


_SYNTHETIC_TEXT = {
    "funnel": "Neal's funnel",
    "banana": "banana-shaped pairs",
    "rotated_gaussian": "correlated Gaussian, variances over three decades",
    "logistic_regression": "Bayesian logistic regression on synthetic data",
}


def _synthetic() -> dict[str, Callable[..., Any]]:
    from .benchmarks.synthetic import TARGETS

    return dict(TARGETS)


def _reference_names() -> tuple[str, ...]:
    from .benchmarks import NAMES

    return NAMES


def _targets(args: argparse.Namespace) -> int:
    from .benchmarks import load

    rows = []
    for name, make in _synthetic().items():
        target = make()
        known = "exact log Z = 0" if target.log_z is not None else "log Z unknown"
        text = _SYNTHETIC_TEXT.get(name, "")
        rows.append((name, f"{target.dim} (--dim)", f"synthetic, {known}; {text}"))
    for name in _reference_names():
        bench = load(name)
        rows.append((name, str(bench.dim), f"posteriordb reference draws; {bench.difficulty}"))
    rows.insert(0, ("target", "dimension", "description"))
    widths = [max(len(row[i]) for row in rows) for i in (0, 1)]
    for name, dim, text in rows:
        print(f"{name:<{widths[0]}}  {dim:<{widths[1]}}  {text}")
    return 0


def _make_guide(args: argparse.Namespace, model: Callable, init_loc_fn: Any) -> Any:
    import pyro.infer.autoguide

    import pyro_flowvi

    class_name, is_flow = GUIDES[args.guide]
    cls = getattr(pyro_flowvi, class_name, None) or getattr(pyro.infer.autoguide, class_name)
    options: dict[str, Any] = {}
    if init_loc_fn is not None:
        options["init_loc_fn"] = init_loc_fn
    if is_flow and args.num_transforms is not None:
        options["num_transforms"] = args.num_transforms
    return cls(model, **options)


def _reference_errors(idata: Any, reference: dict[str, Any]) -> dict[str, float]:
    """Largest posterior-mean and sd errors, in reference standard deviations."""
    import numpy as np

    from .diagnostics import flatten_draws

    approx = {name: np.asarray(idata["posterior"][name].values) for name in reference}
    ref, _ = flatten_draws(reference)
    q, _ = flatten_draws(approx, list(reference))
    sd = ref.std(0, ddof=1)
    varying = sd > 0  # structurally constant components (a Cholesky factor's zeros) say nothing
    mean_err = np.abs(q.mean(0) - ref.mean(0))[varying] / sd[varying]
    sd_err = np.abs(q.std(0, ddof=1)[varying] - sd[varying]) / sd[varying]
    return {
        "mean_err_max": float(mean_err.max()),
        "mean_err_avg": float(mean_err.mean()),
        "sd_err_max": float(sd_err.max()),
    }


def _fit(args: argparse.Namespace) -> int:
    import torch

    # a command's own settings, put back for callers of main() in a running interpreter
    dtype, pyro_logger = torch.get_default_dtype(), logging.getLogger("pyro")
    level = pyro_logger.level
    torch.set_default_dtype(torch.float64)
    pyro_logger.setLevel(logging.WARNING)  # Pyro's INFO lines ("Guessed max_plate_nesting")
    try:
        return _fit_and_report(args)
    finally:
        torch.set_default_dtype(dtype)
        pyro_logger.setLevel(level)


def _fit_and_report(args: argparse.Namespace) -> int:
    import pyro
    from pyro.infer import Trace_ELBO

    from .diagnostics import to_arviz, vi_diagnostics
    from .fit import fit

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    reference = None
    synthetic = _synthetic()
    if args.target in synthetic:
        target = synthetic[args.target](**({"dim": args.dim} if args.dim is not None else {}))
        model, model_args, log_z, init_loc_fn = target.model, target.args, target.log_z, None
        description = f"{args.target}, {target.dim} dimensions"
    else:
        from .benchmarks import load

        bench = load(args.target)
        model, model_args, log_z = bench.model, bench.args, None
        init_loc_fn, reference = bench.init_loc_fn, bench.reference
        description = f"{args.target}, {bench.dim} parameters: {bench.difficulty}"
    guide = _make_guide(args, model, init_loc_fn)
    loss = Trace_ELBO(num_particles=args.num_particles, vectorize_particles=args.num_particles > 1)
    result = fit(
        model,
        guide,
        *model_args,
        num_steps=args.num_steps,
        lr=args.lr,
        loss=loss,
        progress=not args.json,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        divergence=args.divergence,
    )
    idata = to_arviz(guide, model, *model_args, num_draws=args.num_draws, fit_result=result)
    report = vi_diagnostics(idata, warn=False)
    summary: dict[str, Any] = {
        "target": args.target,
        "guide": type(guide).__name__,
        "num_steps": result.num_steps,
        "interrupted": result.interrupted,
        "diverged_at": result.diverged_at,
        "restored_best": result.restored_best,
        "wall_time": result.wall_time,
        **report.to_dict(),
    }
    if log_z is not None:
        summary["kl"] = log_z - report.elbo  # KL(q || p) = log Z - ELBO
    if reference is not None:
        summary.update(_reference_errors(idata, reference))
    if args.json:
        print(json.dumps(summary, default=float))
        return 0
    print(f"target: {description}")
    print(f"guide:  {summary['guide']}")
    print(f"fit:    {result!r}")
    print(report)
    if log_z is not None:
        print(f"KL(q || p) = log Z - ELBO = {summary['kl']:.4f} (exact log Z = {log_z:g})")
    if reference is not None:
        print(
            "against the reference draws, in reference standard deviations: posterior means "
            f"off by {summary['mean_err_max']:.3f} at most ({summary['mean_err_avg']:.3f} on "
            f"average), standard deviations off by {100 * summary['sd_err_max']:.1f}% at most"
        )
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__

    rows = [
        ("pyro-flowvi", __version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
    ]
    for package in ("torch", "pyro-ppl", "numpy", "scipy", "arviz", "tqdm"):
        try:
            rows.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((package, "not installed"))
    cuda = torch.version.cuda if torch.cuda.is_available() else None
    rows.append(("cuda", f"{cuda} ({torch.cuda.device_count()} devices)" if cuda else "none"))
    for name, value in rows:
        print(f"{name:<12} {value}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-flowvi",
        description="Normalizing-flow variational inference for Pyro: try a guide on a "
        "shipped posterior and read its diagnostics.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    targets = commands.add_parser("targets", help="list the posteriors shipped with the package")
    targets.set_defaults(run=_targets)

    run = commands.add_parser(
        "fit",
        help="fit a guide to a shipped posterior and print its diagnostics",
        description="Fit a guide to a shipped posterior (see `pyro-flowvi targets`) and print "
        "the fit, ELBO, IW-ELBO, PSIS k-hat with its verdict, the exact KL where log Z is "
        "known and the error against reference draws where there are some.",
    )
    run.add_argument("target", help="a name from `pyro-flowvi targets`")
    run.add_argument("--guide", choices=list(GUIDES), default="iaf", help="default: iaf")
    run.add_argument("--num-steps", type=_positive_int, default=2000, help="default: 2000")
    run.add_argument("--lr", type=_positive_float, default=1e-2, help="Adam's; default: 0.01")
    run.add_argument(
        "--num-particles", type=_positive_int, default=1, help="ELBO particles; default: 1"
    )
    run.add_argument(
        "--num-draws", type=_positive_int, default=1000, help="draws to score; default: 1000"
    )
    run.add_argument("--num-transforms", type=_positive_int, help="flow layers (flow guides)")
    run.add_argument("--dim", type=_positive_int, help="dimension of a synthetic target")
    run.add_argument("--seed", type=int, default=0, help="default: 0")
    run.add_argument(
        "--checkpoint", help="checkpoint file: written as it goes, resumed from when present"
    )
    run.add_argument("--checkpoint-every", type=_positive_int, default=500, help="default: 500")
    run.add_argument(
        "--divergence", choices=["stop", "warn", "ignore"], default="stop", help="default: stop"
    )
    run.add_argument("--json", action="store_true", help="print one JSON object instead")
    run.set_defaults(run=_fit)

    info = commands.add_parser("info", help="versions of the package and its dependencies")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pyro-flowvi`` command with ``argv`` (default: ``sys.argv[1:]``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "fit":
        known = set(_synthetic()) | set(_reference_names())
        if args.target not in known:
            parser.error(f"unknown target {args.target!r}; choose from {sorted(known)}")
        if args.dim is not None and args.target not in _synthetic():
            parser.error(f"--dim applies to the synthetic targets only, not {args.target!r}")
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
