"""Calibrate fit's divergence rule: how far healthy ELBO traces fall below their best median.

Fits every guide in ``--guides`` to the four synthetic targets (Adam at lr 1e-2, one particle)
and to the six posteriordb references (``AutoNormal`` and ``AutoIAFGuide``, each with Adam at
lr 1e-2 and one particle, and with ClippedAdam decaying from 1e-2 to 1e-3 and eight
particles), all with ``divergence="ignore"``, then applies the rule of
:class:`pyro_flowvi.fit.DivergenceRule` to each trace: the largest fall of a 50-step median
below the best median so far, in nats and in standard errors of the best window's median,
and whether the default rule (20 standard errors + 10 nats) fires. A diverging fit (the
exact-start 200-D Gaussian of issue 13, ``AutoIAFGuide(init_scale=0.1)``) is the control.
The traces are cached in ``--cache`` (JSON), so an interrupted run continues.

    python benchmarks/divergence_rule.py                 # about 40 fits of 1000 steps
    python benchmarks/divergence_rule.py --num-steps 300 --cache /tmp/traces.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_flowvi import AutoIAFGuide, AutoPlanarGuide, AutoSylvesterGuide, fit
from pyro_flowvi._divergence import DivergenceGuard, noise_scale
from pyro_flowvi.benchmarks import NAMES, load
from pyro_flowvi.benchmarks.synthetic import banana, funnel, logistic_regression, rotated_gaussian
from pyro_flowvi.fit import DivergenceRule

GUIDES = {
    "normal": lambda m, **k: AutoNormal(m, **k),
    "iaf": AutoIAFGuide,
    "planar": AutoPlanarGuide,
    "sylv": lambda m, **k: AutoSylvesterGuide(m, variant="householder", **k),
}


def gaussian_200():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(200), 0.1).to_event(1))

    return model


def jobs(args):
    for target in (funnel(10), banana(10), rotated_gaussian(20), logistic_regression(21)):
        for guide in args.guides:
            yield f"{target.name}/{guide}/p1", target.model, target.args, guide, {}, "p1"
    for name in NAMES:
        bench = load(name)
        for guide in ("normal", "iaf"):
            for mode in ("p1", "decay"):
                options = {"init_loc_fn": bench.init_loc_fn}
                yield f"{name}/{guide}/{mode}", bench.model, bench.args, guide, options, mode
    start = {"init_loc_fn": init_to_value(values={"x": torch.zeros(200)}), "init_scale": 0.1}
    yield "diverging: gaussian200/iaf/p1", gaussian_200(), (), "iaf", start, "p1"


def run(args, traces):
    for key, model, model_args, guide_name, options, mode in jobs(args):
        if key in traces:
            continue
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = GUIDES[guide_name](model, **options)
        start = time.perf_counter()
        if mode == "p1":
            optim, loss = pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()
        else:
            decay = (1e-3 / 1e-2) ** (1.0 / args.num_steps)
            optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": decay})
            loss = Trace_ELBO(num_particles=8, vectorize_particles=True)
        result = fit(
            model,
            guide,
            *model_args,
            num_steps=args.num_steps,
            optim=optim,
            loss=loss,
            progress=False,
            divergence="ignore",
        )
        traces[key] = result.elbo_trace.tolist()
        args.cache.write_text(json.dumps(traces))
        print(f"{key}: {time.perf_counter() - start:.1f} s", flush=True)


def largest_fall(trace, window):
    """The largest fall of a window median below the best so far, in nats and in s.e."""
    se_unit = math.sqrt(math.pi / 2.0) / math.sqrt(window)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(trace), window)
    medians = np.median(windows, axis=-1)
    best, se_best, worst_nats, worst_se = -np.inf, None, (0.0, 0.0), 0.0
    for i, median in enumerate(medians):
        if median > best:
            best, se_best = median, se_unit * noise_scale(windows[i])
            continue
        fall = best - median
        in_se = fall / max(se_best, 1e-300)
        if fall > worst_nats[0]:
            worst_nats = (fall, in_se)
        worst_se = max(worst_se, in_se)
    return worst_nats, worst_se


def fires(trace, rule):
    guard, seen = DivergenceGuard(rule), []
    for value in trace:
        seen.append(value)
        if guard.observe(seen) == "diverged":
            return f"step {len(seen) - 1} (best median {guard.best:.4g} at step {guard.best_step})"
    return "no"


def table(traces, rule):
    lines = [
        "| trace | largest fall below the best median: nats (s.e.) | largest fall in s.e. "
        "| default rule fires |",
        "|---|---|---|---|",
    ]
    for key, trace in traces.items():
        (nats, at_se), worst_se = largest_fall(trace, rule.window)
        lines.append(
            f"| {key} | {nats:.3g} ({at_se:.1f}) | {worst_se:.1f} | {fires(trace, rule)} |"
        )
    return "\n".join(lines)


def main(args):
    torch.set_default_dtype(torch.float64)
    logging.getLogger("pyro").setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    traces = json.loads(args.cache.read_text()) if args.cache.exists() else {}
    run(args, traces)
    print(table(traces, DivergenceRule()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    parser.add_argument("--cache", type=Path, default=Path("divergence_traces.json"))
    main(parser.parse_args())
