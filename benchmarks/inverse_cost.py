r"""What the inverse of a flow costs: ``log_prob`` calls and "sticking the landing" steps.

A guide built with ``stick_the_landing=True`` adds :math:`\log q(z)` of the detached draw, one
pass through the inverse of the whole stack, to every training step. This script measures, for
each named guide on :func:`pyro_flowvi.benchmarks.synthetic.rotated_gaussian` and each latent
size D:

- ``plain``: the time of one ``svi.step`` (``Trace_ELBO``, one particle, ``pyro.optim.Adam``);
  the reference every other figure is divided by;
- ``stl``: the same step with ``stick_the_landing=True`` (the same guide and parameters, the
  flag switched between blocks of steps);
- ``log_prob(1)``: ``guide.get_posterior().log_prob(z)`` of one point, without gradients;
- ``log_prob(N)``: the same for a batch of N points (``--points``, default 1000);
- ``non-finite``: the fraction of non-finite values among the losses of the timed steps and
  the log-densities of the ``log_prob(N)`` calls (an inverse that overflows).

Each guide first trains ``--train`` plain steps (default 50), so that the layers sit away from
their identity start (where a Newton solve converges at once). The measurements are then taken
in ``--rounds`` rounds, one of each kind per round in rotating order, each a block of calls that
lasts at least ``--min-time`` seconds; the figure is the median over the rounds of the time per
call. Time is the process's CPU time (``time.process_time``; run with one torch thread, the
default), which a loaded machine inflates far less than wall time: a process that waits for a
core does not count the wait (``--wall-clock`` measures wall time instead). The points of
``log_prob`` are drawn from the current posterior before each block. On a shared machine only
the ratios within one run mean anything.

Run it from a checkout with that checkout first on the path (``PYTHONPATH=.``), since a script
run puts its own folder first; the first output line names the package it measured.

Example::

    PYTHONPATH=. nice -n 10 python benchmarks/inverse_cost.py --dims 10 100
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_flowvi
from pyro_flowvi import (
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoNAFGuide,
    AutoNeuralSplineGuide,
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoSylvesterGuide,
)
from pyro_flowvi.benchmarks.synthetic import rotated_gaussian

GUIDES: dict[str, Callable] = {
    "planar": AutoPlanarGuide,
    "radial": AutoRadialGuide,
    "householder": AutoHouseholderGuide,
    "sylvester-orthogonal": lambda model: AutoSylvesterGuide(model, variant="orthogonal"),
    "sylvester-householder": lambda model: AutoSylvesterGuide(model, variant="householder"),
    "sylvester-triangular": lambda model: AutoSylvesterGuide(model, variant="triangular"),
    "iaf": AutoIAFGuide,
    "spline": AutoNeuralSplineGuide,
    "naf": AutoNAFGuide,
}
KINDS = ("plain", "stl", "log_prob(1)", "log_prob(N)")


def _per_call(call: Callable[[], object], min_time: float, clock: Callable[[], float]) -> float:
    """Seconds per call of ``call``, over a block of at least ``min_time`` seconds."""
    count = 0
    start = clock()
    while True:
        call()
        count += 1
        elapsed = clock() - start
        if elapsed >= min_time:
            return elapsed / count


def measure(name: str, dim: int, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per call of each kind in :data:`KINDS` for guide ``name`` at size ``dim``,
    and ``"bad"``: the fraction of non-finite values among the timed steps' losses and the
    log-densities of the ``log_prob(N)`` calls."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    target = rotated_gaussian(dim, decades=2.0)
    clock = time.perf_counter if args.wall_clock else time.process_time
    guide = GUIDES[name](target.model)
    svi = SVI(target.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(args.train):
        svi.step()

    def draw() -> torch.Tensor:
        # From the current posterior: the steps move it, and a point drawn from an older one
        # can sit where an inverse overflows (a gated IAF stack at D = 100 does after two steps;
        # a few fresh draws per thousand overflow too after ~80 steps).
        with torch.no_grad():
            return guide.get_posterior().sample((args.points,))

    values: list[torch.Tensor] = []  # losses and log-densities, for the non-finite count

    def step(stl: bool) -> Callable[[], object]:
        def call() -> object:
            guide.stick_the_landing = stl
            loss = svi.step()
            values.append(torch.tensor([loss]))
            return loss

        return call

    points = draw()

    def log_prob(count: int) -> Callable[[], object]:
        def call() -> object:
            # Without validation: a non-finite value is counted, not raised.
            with torch.no_grad(), pyro.validation_enabled(False):
                log_q = guide.get_posterior().log_prob(points[:count])
            if count > 1:
                values.append(log_q)
            return log_q

        return call

    calls = {
        "plain": step(False),
        "stl": step(True),
        "log_prob(1)": log_prob(1),
        "log_prob(N)": log_prob(args.points),
    }
    for kind in KINDS:  # warm up every path once
        if kind.startswith("log_prob"):
            points = draw()
        calls[kind]()
    values.clear()
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for round_ in range(args.rounds):
        order = KINDS[round_ % len(KINDS) :] + KINDS[: round_ % len(KINDS)]
        for kind in order:
            if kind.startswith("log_prob"):
                points = draw()
            times[kind].append(_per_call(calls[kind], args.min_time, clock))
    guide.stick_the_landing = False
    result = {kind: statistics.median(per_call) for kind, per_call in times.items()}
    checked = torch.cat(values)
    result["bad"] = float((~checked.isfinite()).double().mean())
    return result


def main(args: argparse.Namespace) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(args.threads)
    print(f"# pyro_flowvi from {pyro_flowvi.__file__}")
    print(
        f"# torch {torch.__version__}, pyro {pyro.__version__}, {args.threads} thread(s), "
        f"float64, {args.train} training steps first, {args.rounds} rounds, "
        f"log_prob(N) with N = {args.points}, "
        f"{'wall' if args.wall_clock else 'process CPU'} time"
    )
    print(
        "| guide | D | plain step (ms) | STL / plain | log_prob(1) / plain | log_prob(N) / plain "
        "| non-finite |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dim in args.dims:
        for name in args.guides:
            result = measure(name, dim, args)
            plain = result["plain"]
            print(
                f"| {name} | {dim} | {1e3 * plain:.1f} | {result['stl'] / plain:.2f} "
                f"| {result['log_prob(1)'] / plain:.2f} | {result['log_prob(N)'] / plain:.2f} "
                f"| {result['bad']:.1e} |",
                flush=True,
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), default=list(GUIDES))
    parser.add_argument("--train", type=int, default=50, help="plain steps before timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per block")
    parser.add_argument("--points", type=int, default=1000, help="N of log_prob(N)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wall-clock",
        action="store_true",
        help="time with time.perf_counter instead of the process's CPU time",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
