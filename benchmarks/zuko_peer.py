r"""The zuko peer of the flow benchmarks, in a process of its own; prints one JSON row a line.

``import zuko`` (1.6) switches off torch's distribution validation for the whole process
(``Distribution._validate_args = False``), so the benchmarks run this script as a subprocess
instead of importing zuko themselves.

The guide is written as Pyro's tutorial "SVI with a Normalizing Flow guide" writes one:
``zuko.flows.NSF`` with ``flow.transform = flow.transform.inv`` (the inverse-autoregressive
direction, fast to sample), registered with ``pyro.module`` and sampled through
``pyro.contrib.zuko.ZukoToPyro``. The tutorial's model has one latent site; for a model with
several, the flow's vector is split into the model's sites with ``Delta`` sites (all the
targets here are unconstrained). Its size matches ``AutoNeuralSplineGuide``'s defaults: as many
layers, bins and hidden widths. zuko's base is a fixed standard normal.

Modes:

- ``lockstep`` (for ``flow_guides.py``): ``zuko_nsf`` and pyro-flowvi's ``spline`` trained in
  lockstep with ``flow_guides``' protocol, per estimator; the zuko rows carry the time ratio
  ``spline`` / ``zuko_nsf`` of this run.
- ``fit`` (for ``exact_start.py``): ``zuko_nsf`` trained by :func:`pyro_flowvi.fit` with its
  defaults, per estimator, as ``exact_start.run_cell`` does for the other guides.

Example::

    python benchmarks/zuko_peer.py --mode lockstep --target funnel --seed 0 --num-steps 50
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flow_guides  # noqa: E402

from pyro_flowvi.benchmarks.synthetic import TARGETS, Target, rotated_gaussian  # noqa: E402


def zuko_nsf_guide(target: Target) -> Callable:
    """A zuko NSF guide for ``target``'s model, as Pyro's flow-guide tutorial writes one."""
    import zuko
    from pyro.contrib.zuko import ZukoToPyro

    shapes = flow_guides.latent_shapes(target.model, target.args)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    dim = sum(sizes.values())
    flow = zuko.flows.NSF(
        features=dim,
        transforms=flow_guides.NUM_SPLINE,
        bins=flow_guides.SPLINE_BINS,
        hidden_features=flow_guides.hidden_widths("spline-autoregressive", dim),
    )
    flow.transform = flow.transform.inv  # as the tutorial: IAF direction, fast sampling

    def guide(*args: object, **kwargs: object) -> None:
        pyro.module("zuko_flow", flow)
        z = pyro.sample("_zuko_latent", ZukoToPyro(flow()), infer={"is_auxiliary": True})
        offset = 0
        for name, shape in shapes.items():
            value = z[..., offset : offset + sizes[name]].reshape(z.shape[:-1] + shape)
            pyro.sample(name, dist.Delta(value, event_dim=len(shape)))
            offset += sizes[name]

    return guide


def lockstep(target: Target, args: argparse.Namespace) -> list[dict]:
    runs = []
    for estimator in args.estimators:
        runs.append(
            flow_guides.start_run(
                "zuko_nsf",
                estimator,
                target,
                args.seed,
                args.num_steps,
                args.lr,
                args.final_lr,
                args.num_particles,
                builder=lambda: zuko_nsf_guide(target),
            )
        )
        if estimator not in args.partner_estimators:
            continue
        runs.append(
            flow_guides.start_run(
                "spline",
                estimator,
                target,
                args.seed,
                args.num_steps,
                args.lr,
                args.final_lr,
                args.num_particles,
            )
        )
    flow_guides.train_lockstep(runs, target, args.num_steps)
    rows = flow_guides.rows_of_runs(runs, target, args.seed, args, f"{target.name}-zuko")
    spline_ms = {r["estimator"]: r["ms"] for r in rows if r["guide"] == "spline"}
    for row in rows:
        if row["guide"] == "zuko_nsf":
            row["counterpart"] = "spline/zuko (same process)"
            row["ratio"] = spline_ms.get(row["estimator"], math.nan) / row["ms"]
    return rows


def fit_cells(target: Target, args: argparse.Namespace) -> list[dict]:
    import exact_start

    return [
        exact_start.run_cell(
            "zuko_nsf", lambda: zuko_nsf_guide(target), target, estimator, args.seed, args
        )
        for estimator in args.estimators
    ]


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, args.dtype))
    pyro.enable_validation(False)
    if args.target == "rotated_gaussian":
        target = rotated_gaussian(args.dim, decades=args.decades)
    else:
        target = TARGETS[args.target]()
    rows = lockstep(target, args) if args.mode == "lockstep" else fit_cells(target, args)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["lockstep", "fit"], default="lockstep")
    parser.add_argument("--target", default="funnel")
    parser.add_argument("--dim", type=int, default=100, help="rotated_gaussian only")
    parser.add_argument("--decades", type=float, default=2.0, help="rotated_gaussian only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=3000)
    parser.add_argument("--num-particles", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--final-lr", type=float, default=1e-4)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--num-draws", type=int, default=10000)
    parser.add_argument("--moment-draws", type=int, default=1000)
    parser.add_argument("--loop-draws", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--estimators", nargs="+", default=list(flow_guides.ESTIMATORS))
    parser.add_argument(
        "--partner-estimators",
        nargs="*",
        default=["elbo"],
        help="lockstep: estimators for which `spline` is trained beside zuko_nsf",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
