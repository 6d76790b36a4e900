r"""Quickstart: swap AutoNormal for a flow guide, and see what Pyro's own flow guides get wrong.

Two targets, every guide with the same optimizer, number of steps, particles (8 by default:
a one-particle ELBO gradient is too noisy for a flow to shape itself in a few thousand steps)
and seed:

- a 10-D Neal's funnel written as a Pyro model with no observations, so its evidence is
  exactly one (log Z = 0) and the KL divergence from a fitted guide to the posterior is minus
  its ELBO. An ELBO above log Z by more than 4 Monte Carlo standard errors is impossible for
  a correct guide: Pyro's ``Sylvester`` transform multiplies in the wrong order and its guide
  reports exactly that;
- a 21-D Bayesian logistic regression, whose posterior is narrow: Pyro's
  ``AutoNormalizingFlow`` starts from a fixed N(0, I) and its planar stack cannot get there,
  while pyro-flowvi's guides start from a learnable Gaussian at ``init_loc_fn``.

For each guide the table gives the ELBO (or the KL where log Z is known), the
importance-weighted ELBO, the PSIS k-hat with its verdict (Yao et al., 2018,
arXiv:1802.02538) and the time per step. Two figures go to ``--outdir`` (default
``demo_output/``) with the table as CSV: ``funnel_draws.png``, each guide's draws of
:math:`(x_0, v)` over exact draws of the funnel (the neck, :math:`v \ll 0`, is where guides
fail), and ``elbo_traces.png``, the ELBO of every guide at every step.

References:
    Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015, arXiv:1505.05770)
    Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016,
    arXiv:1606.04934)
    Sylvester Normalizing Flows for Variational Inference (van den Berg et al., 2018,
    arXiv:1803.05649)
    Neural Spline Flows (Durkan et al., 2019, arXiv:1906.04032)
    Neural Autoregressive Flows (Huang et al., 2018, arXiv:1804.00779)

Usage::

    python examples/quickstart.py [--num-steps 1500] [--num-particles 8] [--seed 0]
        [--outdir demo_output]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.distributions.transforms import iterated, planar, sylvester
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal, AutoNormalizingFlow

from pyro_flowvi import (
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoNAFGuide,
    AutoNeuralSplineGuide,
    AutoPlanarGuide,
    AutoSylvesterGuide,
    fit,
)
from pyro_flowvi.benchmarks.synthetic import Target, funnel, logistic_regression
from pyro_flowvi.diagnostics import to_arviz, vi_diagnostics


def _pyro_sylvester(model):
    return AutoNormalizingFlow(model, functools.partial(iterated, 4, sylvester))


def _pyro_planar(model):
    return AutoNormalizingFlow(model, functools.partial(iterated, 8, planar))


GUIDES = {
    "AutoNormal (pyro)": AutoNormal,
    "planar x8 (pyro)": _pyro_planar,
    "Sylvester x4 (pyro)": _pyro_sylvester,
    "AutoIAFNormal (pyro)": AutoIAFNormal,
    "AutoPlanarGuide": AutoPlanarGuide,
    "AutoHouseholderGuide": AutoHouseholderGuide,
    "AutoSylvesterGuide": functools.partial(AutoSylvesterGuide, variant="householder"),
    "AutoIAFGuide": AutoIAFGuide,
    "AutoNeuralSplineGuide": AutoNeuralSplineGuide,
    "AutoNAFGuide": AutoNAFGuide,
}


def evaluate(target: Target, args: argparse.Namespace) -> list[dict]:
    """Fit every guide to ``target`` and score it from fresh draws."""
    rows = []
    for name, make_guide in GUIDES.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = make_guide(target.model)
        result = fit(
            target.model,
            guide,
            *target.args,
            num_steps=args.num_steps,
            lr=0.01,
            loss=Trace_ELBO(
                num_particles=args.num_particles, vectorize_particles=args.num_particles > 1
            ),
            progress=args.progress,
        )
        idata = to_arviz(
            guide, target.model, *target.args, num_draws=args.num_draws, fit_result=result
        )
        report = vi_diagnostics(idata, warn=False)
        impossible = target.log_z is not None and report.elbo > target.log_z + 4 * report.elbo_mcse
        funnel_draws = None
        if target.name == "funnel":  # its (x_0, v), for the figure
            v, x = (np.asarray(idata.posterior[name]) for name in ("v", "x"))
            funnel_draws = (x[..., 0].reshape(-1), v.reshape(-1))
        rows.append(
            {
                "target": target.name,
                "guide": name,
                "elbo": report.elbo,
                "mcse": report.elbo_mcse,
                "iw_elbo": report.iw_elbo,
                "khat": report.khat,
                "verdict": report.verdict,
                "ms_per_step": 1000 * result.wall_time / max(result.num_steps, 1),
                "impossible": impossible,
                "elbo_trace": np.asarray(result.elbo_trace),
                "draws": funnel_draws,
            }
        )
    return rows


def print_table(target: Target, rows: list[dict]) -> None:
    known = target.log_z is not None
    title = f"{target.name} ({target.dim}-D"
    title += f", log Z = {target.log_z:g}: KL = log Z - ELBO)" if known else ", log Z unknown)"
    first = "KL(q||p)" if known else "ELBO"
    header = f"{'guide':<22}{first:>18}{'IW-ELBO':>10}{'k-hat':>8}  {'verdict':<14}{'ms/step':>8}"
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for row in rows:
        value = target.log_z - row["elbo"] if known else row["elbo"]
        flag = "  <- ELBO above log Z: impossible" if row["impossible"] else ""
        print(
            f"{row['guide']:<22}{value:>10.3f} ± {row['mcse']:<5.3f}{row['iw_elbo']:>10.3f}"
            f"{row['khat']:>8.2f}  {row['verdict']:<14}{row['ms_per_step']:>8.1f}{flag}"
        )


def exact_funnel_draws(num_draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact draws of the funnel's ``(x_0, v)``: ``v ~ N(0, 3^2)``, ``x_0 | v ~ N(0, e^v)``."""
    gen = torch.Generator().manual_seed(seed)
    v = 3.0 * torch.randn(num_draws, generator=gen, dtype=torch.float64)
    x0 = torch.exp(v / 2) * torch.randn(num_draws, generator=gen, dtype=torch.float64)
    return x0.numpy(), v.numpy()


def plot_funnel_draws(rows: list[dict], path: Path, seed: int) -> None:
    """A panel per guide: its draws of ``(x_0, v)`` on top of exact draws, same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [row for row in rows if row["draws"] is not None]
    num_draws = max(row["draws"][0].size for row in rows)
    exact_x0, exact_v = exact_funnel_draws(num_draws, seed + 1)
    # x_0 over the central 95% of the exact draws (the mouth, v >> 0, spreads far wider): the
    # neck, v << 0 with x_0 near 0, stays visible; v over its 0.5%-99.5% quantiles
    xlim = np.quantile(np.abs(exact_x0), 0.95) * np.array([-1.0, 1.0])
    ylim = np.quantile(exact_v, [0.005, 0.995]) + np.array([-0.5, 0.5])
    cols = 4 if len(rows) <= 8 else 5
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.2 * cols, 3.0 * nrows + 0.6), sharex=True, sharey=True,
        layout="constrained", squeeze=False,
    )  # fmt: skip
    for ax, row in zip(axes.flat, rows, strict=False):
        x0, v = row["draws"]
        exact = ax.scatter(exact_x0, exact_v, s=2, color="0.75", alpha=0.6, linewidths=0)
        guide = ax.scatter(x0, v, s=2, color="C3", alpha=0.35, linewidths=0)
        kl = -row["elbo"]  # the funnel's log Z is 0
        verdict = "  ELBO > log Z!" if row["impossible"] else ""
        ax.set_title(f"{row['guide']}\nKL {kl:.2f} ± {row['mcse']:.2f}{verdict}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(rows) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("v (log-variance of x)")
    for ax in axes[-1, :]:
        ax.set_xlabel("x$_0$")
    axes[0, 0].set_xlim(*xlim)
    # no tick at the edges, where neighbouring panels' labels would run into each other
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(nbins=4, symmetric=True, prune="both"))
    axes[0, 0].set_ylim(*ylim)
    fig.suptitle(
        f"{rows[0]['target']}, {len(rows[0]['elbo_trace'])} steps: each guide's draws over exact "
        "draws. The neck (v < -3) is where guides fail.",
        fontsize=10,
    )
    fig.legend(
        [exact, guide], ["exact draws", "guide draws"], loc="outside lower center", ncols=2,
        markerscale=5, fontsize=9,
    )  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_elbo_traces(targets: list[Target], rows: list[dict], path: Path) -> None:
    """A panel per target: every guide's ELBO per step and its running median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_flowvi.diagnostics import plot_elbo

    fig, axes = plt.subplots(
        1, len(targets), figsize=(6.0 * len(targets), 4.6), layout="constrained", squeeze=False
    )
    for ax, target in zip(axes.flat, targets, strict=True):
        traces = {row["guide"]: row["elbo_trace"] for row in rows if row["target"] == target.name}
        plot_elbo(traces, ax=ax)
        # the legend below the panel, not over the traces
        legend = ax.get_legend()
        handles, labels = legend.legend_handles, [text.get_text() for text in legend.texts]
        legend.remove()
        if target.log_z is not None:
            # show log Z when it is near the settled ELBOs (not when a short run is far off)
            lo, hi = ax.get_ylim()
            if hi < target.log_z < hi + (hi - lo):
                ax.set_ylim(lo, target.log_z + 0.05 * (target.log_z - lo))
            handles.append(ax.axhline(target.log_z, color="black", linestyle="--", linewidth=1))
            labels.append(f"log Z = {target.log_z:g}: no correct guide's ELBO is above it")
        ax.legend(
            handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, fontsize=8
        )
        ax.set_title(f"{target.name} ({target.dim}-D)", fontsize=10)
    fig.suptitle("ELBO per step (faint) and its running median", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _DropPlateGuess(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Guessed max_plate_nesting")


@contextlib.contextmanager
def quiet_plate_guess() -> Iterator[None]:
    """Drop Pyro's ``Guessed max_plate_nesting`` INFO lines while the demo runs, only."""
    logger = logging.getLogger("pyro.infer.elbo")
    dropper = _DropPlateGuess()
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    targets = [funnel(args.dim), logistic_regression(2 * args.dim + 1)]
    print(
        f"{args.num_steps} steps of Adam(lr=0.01), {args.num_particles}-particle ELBO, for every "
        f"guide, seed {args.seed}."
    )
    rows = []
    with quiet_plate_guess():
        for target in targets:
            target_rows = evaluate(target, args)
            print_table(target, target_rows)
            rows += target_rows
    threshold = min(1 - 1 / math.log10(args.num_draws), 0.7)
    print(f"\nk-hat threshold for {args.num_draws} draws: {threshold:.2f} (lower is better).")
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    lines = ["target,guide,elbo,mcse,iw_elbo,khat,verdict,ms_per_step"]
    lines += [
        f"{r['target']},{r['guide']},{r['elbo']:.4f},{r['mcse']:.4f},{r['iw_elbo']:.4f},"
        f"{r['khat']:.3f},{r['verdict']},{r['ms_per_step']:.2f}"
        for r in rows
    ]
    written = [outdir / "quickstart.csv", outdir / "funnel_draws.png", outdir / "elbo_traces.png"]
    written[0].write_text("\n".join(lines) + "\n")
    plot_funnel_draws(rows, written[1], args.seed)
    plot_elbo_traces(targets, rows, written[2])
    print("\nWritten: " + ", ".join(str(path) for path in written))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=1500)
    parser.add_argument("--num-draws", type=int, default=4000)
    parser.add_argument("--num-particles", type=int, default=8)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--outdir", type=str, default="demo_output", help="where the figures and CSV go"
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    return parser.parse_args(argv)


if __name__ == "__main__":
    start = time.perf_counter()
    main(parse_args())
    print(f"Done in {time.perf_counter() - start:.0f} s.")
