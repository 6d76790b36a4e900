r"""The estimators of :mod:`pyro_flowvi.estimators` against Pyro's plain ones: gradient noise,
short fits, and the drift away from an exact start.

Three sections (``--section``):

- ``snr``: at fixed guides, ``--num-draws`` independent gradients of the loss with respect to
  the guide's parameters per estimator, summarized as the median over coordinates of the
  signal-to-noise ratio :math:`|\bar g_i| / \mathrm{sd}(g_i)` and the total variance
  :math:`\sum_i \mathrm{var}(g_i)`, with the milliseconds per gradient. Guides: ``AutoNormal``
  at the exact posterior and off it on a conjugate Gaussian model (two coordinates, five
  observations), ``AutoNormal`` after ``--train-steps`` / 20 plain steps on the 10-D funnel
  (far from the posterior), ``AutoNormal`` and ``AutoIAFGuide`` after ``--train-steps`` plain
  steps there (trained-like guides).
- ``fit``: ``AutoNormal`` and ``AutoIAFGuide`` on the 10-D funnel from the same start, trained
  with each estimator for ``--num-steps`` Adam steps (lr ``--lr``), over ``--seeds``; then
  KL(q || p) = -ELBO and the gap :math:`\log Z - \mathcal L_8` of the 8-particle
  importance-weighted bound, both from 4096 fresh draws (:math:`\log Z = 0`), and ms per step.
- ``drift``: flow guides on a correlated Gaussian (``--dim`` coordinates, variances over three
  decades, :math:`\log Z = 0`) start at its exact posterior (their Laplace start is exact on a
  Gaussian); ``--num-steps`` steps of Adam (lr 1e-2, one particle; with ``--decay`` also a rate
  decaying exponentially to 1e-4) with the plain ELBO or with sticking the landing; final KL.
  The plain gradient is noisy at the optimum, STL's is zero there.

Estimators: ``plain`` (``Trace_ELBO``), ``stl`` (``TraceSTL_ELBO``), ``iwae-K``
(``TraceIW_ELBO(K, gradient="iwae")``, as Pyro's ``RenyiELBO(alpha=0)``) and ``dreg-K``
(``TraceIW_ELBO(K)``); every multi-particle estimator is vectorized.

Example::

    python benchmarks/estimators.py --section snr --num-draws 200
    python benchmarks/estimators.py --section fit --num-steps 2000 --seeds 0 1
    python benchmarks/estimators.py --section drift --dim 100 --num-steps 800 --decay
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_flowvi.benchmarks.synthetic import funnel, rotated_gaussian
from pyro_flowvi.estimators import TraceIW_ELBO, TraceSTL_ELBO
from pyro_flowvi.guides import (
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoSylvesterGuide,
)

# --------------------------------------------------------------------------------------------
# the conjugate model

PRIOR_SCALE, NOISE = 2.0, 0.8
DATA = [[0.5, -1.0], [1.2, -0.4], [-0.3, -1.6], [0.8, -0.9], [2.0, -0.2]]


def conjugate_model(x):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(x.shape[-1]), PRIOR_SCALE).to_event(1))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("x", dist.Normal(mu, NOISE).to_event(1), obs=x)


def conjugate_log_z(x) -> float:
    n = x.shape[0]
    cov = NOISE**2 * torch.eye(n) + PRIOR_SCALE**2 * torch.ones(n, n)
    return (
        dist.MultivariateNormal(torch.zeros(n), covariance_matrix=cov).log_prob(x.T).sum().item()
    )


def conjugate_guide(x, shift: float, widen: float) -> AutoNormal:
    """AutoNormal at the exact posterior moved by ``shift`` and widened by ``widen``."""
    precision = 1 / PRIOR_SCALE**2 + x.shape[0] / NOISE**2
    guide = AutoNormal(conjugate_model)
    guide(x)
    guide.locs.mu = x.sum(0) / NOISE**2 / precision + shift
    guide.scales.mu = torch.full((x.shape[-1],), widen * precision**-0.5)
    return guide


# --------------------------------------------------------------------------------------------
# helpers


def estimator(name: str, nesting: int) -> object:
    """``plain``, ``plain-K``, ``stl``, ``stl-K``, ``iwae-K`` or ``dreg-K``."""
    kind, _, k = name.partition("-")
    k = int(k or 1)
    options = {"vectorize_particles": k > 1, "max_plate_nesting": nesting}
    if kind == "plain":
        return Trace_ELBO(num_particles=k, **options)
    if kind == "stl":
        return TraceSTL_ELBO(k, **options)
    if kind in ("iwae", "dreg"):
        return TraceIW_ELBO(k, gradient=kind, **options)
    raise ValueError(f"unknown estimator {name!r}")


def log_weights(model: Callable, guide: Callable, args: tuple, nesting: int, num: int):
    """``log p(x, z_s) - log q(z_s)`` for ``num`` fresh draws, shape ``(num,)``."""
    plate = pyro.plate("_draws", num, dim=-(nesting + 1))
    with torch.no_grad():
        guide_trace = poutine.trace(plate(guide)).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(plate(model), trace=guide_trace)).get_trace(
            *args
        )
        total = torch.zeros(num)
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            trace.compute_log_prob()
            for site in trace.nodes.values():
                if site["type"] == "sample" and type(site["fn"]).__name__ != "_Subsample":
                    lp = site["log_prob"]  # (..., num, plates of the model)
                    if nesting:
                        lp = lp.sum(tuple(range(lp.dim() - nesting, lp.dim())))
                    total = total + sign * lp.reshape(num)
    return total


def quality(
    model: Callable,
    guide: Callable,
    args: tuple,
    nesting: int,
    log_z: float = 0.0,
    num: int = 4096,
):
    """``(KL, its standard error, gap of the 8-particle IW bound)`` from ``num`` draws: KL =
    log Z - mean log w; the IW-8 bound is the mean over ``num / 8`` disjoint groups of 8 draws
    of ``log mean w`` (an unbiased estimate of the bound that ``dreg-8`` maximizes)."""
    log_w = log_weights(model, guide, args, nesting, num)
    groups = log_w.reshape(-1, 8)
    iw8 = (torch.logsumexp(groups, 1) - math.log(8)).mean().item()
    return log_z - log_w.mean().item(), log_w.std().item() / math.sqrt(num), log_z - iw8


def gradient_stats(loss: object, model: Callable, guide, args: tuple, num_draws: int):
    """Median SNR over coordinates, total variance and ms per gradient of ``num_draws``."""
    params = list(guide.parameters())
    loss.loss_and_grads(model, guide, *args)  # warm-up, not timed
    rows, seconds = [], 0.0
    for _ in range(num_draws):
        for p in params:
            p.grad = None
        start = time.perf_counter()
        loss.loss_and_grads(model, guide, *args)
        seconds += time.perf_counter() - start
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
            )
        )
    for p in params:
        p.grad = None
    grads = torch.stack(rows)
    mean, sd = grads.mean(0), grads.std(0)
    live = sd > 0
    snr = (mean[live].abs() / sd[live]).median().item() if live.any() else float("nan")
    return snr, sd.square().sum().item(), 1e3 * seconds / num_draws


def train(model, guide, args, loss, num_steps: int, lr: float, final_lr: float | None = None):
    """``num_steps`` of Adam, its rate decaying exponentially to ``final_lr`` when given;
    returns the median ms per step."""
    if final_lr is None:
        optim = pyro.optim.Adam({"lr": lr})
    else:
        gamma = (final_lr / lr) ** (1 / max(num_steps, 1))
        optim = pyro.optim.ExponentialLR(
            {"optimizer": torch.optim.Adam, "optim_args": {"lr": lr}, "gamma": gamma}
        )
    svi = SVI(model, guide, optim, loss)
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        svi.step(*args)
        times.append(time.perf_counter() - start)
        if final_lr is not None:
            optim.step()
    return 1e3 * statistics.median(times)


def table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# sections


def section_snr(args: argparse.Namespace) -> str:
    estimators = ["plain", "stl", "iwae-8", "dreg-8", "iwae-64", "dreg-64"]
    x = torch.tensor(DATA)
    target = funnel(10)

    def trained(make: Callable, num_steps: int) -> Callable:
        def build():
            pyro.set_rng_seed(args.seeds[0])
            guide = make(target.model)
            loss = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
            train(target.model, guide, (), loss, num_steps, args.lr)
            return guide

        return build

    steps = f"{args.train_steps} plain steps"
    early = max(1, args.train_steps // 20)
    # (target, guide state, model, model args, plate nesting, log Z, guide factory)
    cases = [
        ("conjugate", "AutoNormal, exact", conjugate_model, (x,), 1, conjugate_log_z(x),
         lambda: conjugate_guide(x, 0.0, 1.0)),
        ("conjugate", "AutoNormal, off", conjugate_model, (x,), 1, conjugate_log_z(x),
         lambda: conjugate_guide(x, 0.7, 1.8)),
        ("funnel-10", f"AutoNormal, {early} plain steps", target.model, (), 0, 0.0,
         trained(AutoNormal, early)),
        ("funnel-10", f"AutoNormal, {steps}", target.model, (), 0, 0.0,
         trained(AutoNormal, args.train_steps)),
        ("funnel-10", f"AutoIAFGuide, {steps}", target.model, (), 0, 0.0,
         trained(AutoIAFGuide, args.train_steps)),
    ]  # fmt: skip
    rows = []
    for name, state, model, model_args, nesting, log_z, make in cases:
        pyro.clear_param_store()
        guide = make()
        kl = quality(model, guide, model_args, nesting, log_z)[0]
        for est in estimators:
            pyro.set_rng_seed(args.seeds[0])
            snr, var, ms = gradient_stats(
                estimator(est, nesting), model, guide, model_args, args.num_draws
            )
            rows.append([name, state, f"{kl:.3f}", est, snr, var, ms])
            print(rows[-1], flush=True)
    header = ["target", "guide", "KL at guide", "estimator", "median SNR", "total var", "ms/grad"]
    return table(header, rows)


def section_fit(args: argparse.Namespace) -> str:
    estimators = ["plain", "stl", "plain-8", "stl-8", "iwae-8", "dreg-8"]
    target = funnel(10)
    guides = {"AutoNormal": AutoNormal, "AutoIAFGuide": AutoIAFGuide}
    results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for seed in args.seeds:
        for label, cls in guides.items():
            for est in estimators:
                pyro.clear_param_store()
                pyro.set_rng_seed(seed)
                guide = cls(target.model)
                guide()
                ms = train(target.model, guide, (), estimator(est, 0), args.num_steps, args.lr)
                pyro.set_rng_seed(10_000 + seed)
                kl, se, gap = quality(target.model, guide, (), 0)
                results.setdefault((label, est), []).append((kl, se, gap, ms))
                print(
                    label,
                    est,
                    seed,
                    f"KL {kl:.3f} +- {se:.3f} IW-8 gap {gap:.3f} {ms:.2f} ms",
                    flush=True,
                )
    rows = []
    for (label, est), values in results.items():
        kls = ", ".join(f"{v[0]:.3f}" for v in values)
        gaps = ", ".join(f"{v[2]:.3f}" for v in values)
        rows.append([label, est, kls, gaps, statistics.median(v[3] for v in values)])
    header = ["guide", "estimator", "KL per seed", "IW-8 gap per seed", "ms/step"]
    return table(header, rows)


def section_drift(args: argparse.Namespace) -> str:
    target = rotated_gaussian(args.dim)
    guides = {
        "planar": AutoPlanarGuide,
        "radial": AutoRadialGuide,
        "householder": AutoHouseholderGuide,
        "sylvester": AutoSylvesterGuide,
        "iaf": AutoIAFGuide,
    }
    schedules = [("1e-2", None), ("1e-2 -> 1e-4", 1e-4)] if args.decay else [("1e-2", None)]
    rows = []
    for label, cls in guides.items():
        if args.guides and label not in args.guides:
            continue
        for seed in args.seeds:
            for schedule, final_lr in schedules:
                row = [label, seed, schedule]
                for est in ("plain", "stl"):
                    pyro.clear_param_store()
                    pyro.set_rng_seed(seed)
                    guide = cls(target.model)
                    guide()
                    pyro.set_rng_seed(10_000 + seed)
                    start = quality(target.model, guide, (), 0)[0]
                    try:
                        ms = train(
                            target.model, guide, (), estimator(est, 0), args.num_steps, 1e-2,
                            final_lr,
                        )  # fmt: skip
                    except ValueError as error:  # e.g. a flow inverse that overflows
                        print(label, seed, est, "failed:", str(error)[:300], flush=True)
                        row += [start, "failed", "-"] if est == "plain" else ["failed", "-"]
                        continue
                    pyro.set_rng_seed(10_000 + seed)
                    end = quality(target.model, guide, (), 0)[0]
                    row += [start, end, ms] if est == "plain" else [end, ms]
                    print(label, seed, schedule, est, f"KL {start:.3f} -> {end:.3g}", flush=True)
                rows.append(row)
    header = ["guide", "seed", "lr", "KL at start", "KL plain", "ms plain", "KL STL", "ms STL"]
    return table(header, rows)


def main(args: argparse.Namespace) -> str:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(args.threads)
    sections = {"snr": section_snr, "fit": section_fit, "drift": section_drift}
    text = sections[args.section](args)
    print(text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=["snr", "fit", "drift"], default="snr")
    parser.add_argument("--num-draws", type=int, default=200, help="gradients per estimator (snr)")
    parser.add_argument("--train-steps", type=int, default=1000, help="plain steps before snr")
    parser.add_argument("--num-steps", type=int, default=2000, help="steps of fit and drift")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dim", type=int, default=100, help="size of the drift target")
    parser.add_argument("--guides", nargs="*", default=None, help="drift: a subset of guides")
    parser.add_argument(
        "--decay", action="store_true", help="drift: also with lr decaying to 1e-4"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
