"""Did it work? Diagnosing variational fits of the eight-schools funnel through ArviZ.

Fits four guides to the centred eight-schools model (Rubin, 1981), whose posterior is a
funnel between ``tau`` and ``theta``: Pyro's ``AutoNormal`` and ``AutoMultivariateNormal`` and
pyro-flowvi's ``AutoIAFGuide``, with a Gaussian base and with a heavy-tailed Student-t base
(``base="studentt"``). Each fit becomes an ArviZ object (``to_arviz``), is judged by
PSIS k-hat, the importance-weighted ELBO and the importance-sampling ESS
(``vi_diagnostics``), scored by VI-corrected PSIS-LOO (``vi_loo``), and compared with the
gold-standard NUTS draws of posteriordb (``compare_approximations``), as it is and after PSIS
importance resampling (``to_arviz(..., resample=True)``), which can only be trusted where
k-hat is below 0.7. Figures: the ELBO
traces, the marginals over the reference, a pair plot of the funnel.

k-hat is noisy: with ``--khat-sets N`` each guide also draws N disjoint sets of
``--num-draws`` draws and prints how much k-hat and its verdict vary across them, next to the
standard error and interval that ``vi_diagnostics`` reports from one set (the measurement
behind the uncertain verdicts of docs/diagnostics.md).

References:
    Estimation in Parallel Randomized Experiments (Rubin, 1981).
    Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018),
    arXiv:1802.02538.
    Pareto Smoothed Importance Sampling (Vehtari et al., 2024), arXiv:1507.02646.
    Bayesian Leave-One-Out Cross-Validation for Large Data (Magnusson et al., 2019),
    arXiv:1904.10679.
    Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016),
    arXiv:1606.04934.
    Pathfinder: Parallel quasi-Newton variational inference (Zhang et al., 2022),
    arXiv:2108.03782.

Run::

    python examples/diagnostics_eight_schools.py --num-steps 3000 --outdir out/eight_schools
    python examples/diagnostics_eight_schools.py --khat-sets 100   # k-hat across draw sets
"""

from __future__ import annotations

import argparse
import functools
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_flowvi.benchmarks import load, reference_to_arviz
from pyro_flowvi.diagnostics import (
    VIDiagnosticWarning,
    _arviz,
    compare_approximations,
    plot_elbo,
    plot_marginals,
    plot_pair,
    to_arviz,
    vi_diagnostics,
    vi_loo,
)
from pyro_flowvi.fit import fit
from pyro_flowvi.guides import AutoIAFGuide

GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoIAFGuide": AutoIAFGuide,
    "AutoIAFGuide, t base": functools.partial(AutoIAFGuide, base="studentt"),
}


SCHOOLS = [
    "Choate",
    "Deerfield",
    "Phillips Andover",
    "Phillips Exeter",
    "Hotchkiss",
    "Lawrenceville",
    "St. Paul's",
    "Mt. Hermon",
]


def khat_spread(guide, bench, num_sets: int, num_draws: int) -> dict:
    """k-hat of ``num_sets`` disjoint sets of ``num_draws`` draws, against all of them."""
    idata = to_arviz(guide, bench.model, *bench.args, num_draws=num_sets * num_draws)
    log_weight = _arviz.sample_values(idata, "sample_stats", "log_weight").reshape(num_sets, -1)
    truth = float(_arviz.psislw(log_weight.ravel())[1])
    reports = [
        vi_diagnostics(_arviz.from_groups({"sample_stats": {"log_weight": lw[None]}}), warn=False)
        for lw in log_weight
    ]
    khats = np.array([r.khat for r in reports])
    lows, highs = (np.array(x) for x in zip(*(r.khat_interval for r in reports), strict=True))
    reliable = truth < reports[0].khat_threshold
    verdicts = {
        v: sum(r.verdict == v for r in reports) for v in sorted({r.verdict for r in reports})
    }
    return {
        "khat_all": truth,
        "sd": float(np.std(khats, ddof=1)),
        "reported_se": float(np.mean(highs - lows) / (2 * 1.6448536)),
        "covers": float(np.mean((lows <= truth) & (truth <= highs))),
        "uncertain": float(np.mean([r.uncertain for r in reports])),
        "confidently_wrong": float(
            np.mean([not r.uncertain and r.reliable != reliable for r in reports])
        ),
        "verdicts": verdicts,
    }


def main(args: argparse.Namespace) -> dict:
    torch.set_default_dtype(torch.float64)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    bench = load("eight_schools_centered")

    idatas, resampled, reports, spreads = {}, {}, {}, {}
    for name, guide_class in GUIDES.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = guide_class(bench.model, init_loc_fn=bench.init_loc_fn)
        decay = (args.final_lr / args.lr) ** (1.0 / max(args.num_steps, 1))
        result = fit(
            bench.model,
            guide,
            *bench.args,
            num_steps=args.num_steps,
            optim=pyro.optim.ClippedAdam({"lr": args.lr, "lrd": decay}),
            progress=args.progress,
        )
        idatas[name] = to_arviz(
            guide,
            bench.model,
            *bench.args,
            num_draws=args.num_draws,
            fit_result=result,
            coords={"school": SCHOOLS},
        )
        # PSIS importance resampling: 10 proposals per kept draw; a guide whose k-hat is
        # above 0.7 warns that the resample cannot be trusted (recorded, not raised, here)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", VIDiagnosticWarning)
            resampled[f"{name}, resampled"] = to_arviz(
                guide,
                bench.model,
                *bench.args,
                num_draws=args.num_draws,
                coords={"school": SCHOOLS},
                resample=True,
            )
        print(f"\n=== {name} ({result.wall_time:.1f} s)")
        for warning in caught:
            print("resampling:", warning.message)
        # an unreliable fit warns (VIDiagnosticWarning); here the verdict is printed anyway
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always", VIDiagnosticWarning)
            reports[name] = vi_diagnostics(idatas[name])
            loo = vi_loo(idatas[name])
        print(reports[name])
        print(loo)
        if args.khat_sets:
            spreads[name] = khat_spread(guide, bench, args.khat_sets, args.num_draws)
            print(f"k-hat across {args.khat_sets} sets of {args.num_draws} draws:", spreads[name])

    # the reference's school axis has integer positions: the plots match them to the names
    reference = reference_to_arviz(bench)
    # one row per guide, then its PSIS-resampled draws (scored against the reference, with
    # the k-hat of the guide's proposals beside them)
    table = compare_approximations({**idatas, **resampled}, reference=bench)
    columns = ["khat", "khat_lo", "khat_hi", "resampled", "is_ess", "mean_err_max", "sd_err_max"]
    print("\n", table[columns].round(3).to_string())
    table.to_csv(outdir / "comparison.csv")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {
        "elbo.png": plot_elbo(idatas, skip=min(100, args.num_steps // 10)),
        "marginals.png": plot_marginals(idatas, reference, var_names=["mu", "tau"]),
        "funnel.png": plot_pair(
            idatas["AutoIAFGuide"],
            reference,
            var_names=["tau", "theta"],
            coords={"school": ["Choate"]},
        ),
    }
    for filename, figure in figures.items():
        figure.savefig(outdir / filename, dpi=100)
    plt.close("all")
    print(f"\nwrote {', '.join(figures)} and comparison.csv to {outdir}")
    return {
        "table": table,
        "reports": reports,
        "idatas": idatas,
        "resampled": resampled,
        "khat_spreads": spreads,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=3000)
    parser.add_argument("--num-draws", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.05, help="initial learning rate")
    parser.add_argument("--final-lr", type=float, default=1e-3, help="final learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--khat-sets",
        type=int,
        default=0,
        help="also draw this many disjoint sets of --num-draws draws per guide and report "
        "the spread of k-hat across them",
    )
    parser.add_argument("--outdir", default="out/diagnostics_eight_schools")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
