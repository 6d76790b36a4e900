r"""Bayesian neural networks with multiplicative normalizing flows on scikit-learn digits.

A Bayesian MLP (and a small Bayesian conv net) with :math:`\mathcal N(0, 1)` priors on every
weight and bias is written as a plain Pyro model (:class:`pyro_flowvi.bnn.BayesianMLP`,
:class:`~pyro_flowvi.bnn.BayesianConvNet`) and fit three ways, in lockstep on the same
mini-batches so that the load of a shared machine hits all of them alike:

- ``mnf``: :class:`~pyro_flowvi.bnn.AutoMNFGuide`, multiplicative normalizing flows
  (Louizos & Welling, 2017) with local reparameterization and ``TraceMeanField_ELBO``;
- ``mean-field``: :class:`~pyro_flowvi.bnn.AutoMeanFieldGuide` (Blundell et al., 2015) with
  local reparameterization (Kingma et al., 2015) and ``TraceMeanField_ELBO``;
- ``map``: Pyro's ``AutoDelta``, a MAP network (the prior acts as weight decay).

The networks train on the 8x8 digits of classes 0-4 (a fixed split into train and 300 test
images). Out-of-distribution inputs are the digits 5-9, the test digits rotated by 90 degrees,
and uniform noise images. The example reports test accuracy, negative log-likelihood (NLL),
expected calibration error (ECE, 15 bins), the AUROC of the predictive entropy for test vs each
out-of-distribution set, and the time per step as a ratio to the mean-field guide of the same
run. A second part fits the 1-D cubic toy of Hernandez-Lobato & Adams (2015),
:math:`y = x^3 + \epsilon,\ \epsilon \sim \mathcal N(0, 3^2)` on 20 points in [-4, 4], and plots
the predictive bands of both guides.

Example::

    python examples/bnn_mnf.py --num-steps 1500 --seed 0 --num-seeds 3 --outdir out
    python examples/bnn_mnf.py --no-digits --num-steps 3000 --lr 0.01 --outdir docs  # the toy

References:
    Multiplicative Normalizing Flows for Variational Bayesian Neural Networks (Louizos &
    Welling, 2017, arXiv 1703.01961)
    Weight Uncertainty in Neural Networks (Blundell et al., 2015, arXiv 1505.05424)
    Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015,
    arXiv 1506.02557)
    Probabilistic Backpropagation for Scalable Learning of Bayesian Neural Networks
    (Hernandez-Lobato & Adams, 2015, arXiv 1502.05336)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.optim import Adam

from pyro_flowvi.bnn import AutoMeanFieldGuide, AutoMNFGuide, BayesianConvNet, BayesianMLP

METHODS = ("mnf", "mean-field", "map")
ARCHS = ("mlp", "conv")
NUM_TEST = 300
IN_CLASSES = 5
OOD_SETS = ("digits 5-9", "rotated", "noise")


def load_data() -> dict[str, torch.Tensor]:
    """Digits scaled to [0, 1]: train/test of classes 0-4 and the out-of-distribution sets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.get_default_dtype()) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    inside = y < IN_CLASSES
    x_in, y_in = x[inside], y[inside]
    perm = torch.randperm(len(x_in), generator=torch.Generator().manual_seed(0))
    test, train = perm[:NUM_TEST], perm[NUM_TEST:]
    x_test = x_in[test]
    noise = torch.rand(NUM_TEST, 64, generator=torch.Generator().manual_seed(1))
    return {
        "x_train": x_in[train],
        "y_train": y_in[train],
        "x_test": x_test,
        "y_test": y_in[test],
        "digits 5-9": x[~inside],
        "rotated": torch.rot90(x_test.reshape(-1, 8, 8), 1, (1, 2)).reshape(-1, 64),
        "noise": noise.to(x.dtype),
    }


def lecun_init(site: dict) -> torch.Tensor:
    """MAP init: weight matrices N(0, 1/fan_in), everything else zero."""
    value = site["fn"].sample().detach()
    if value.dim() >= 2:
        return torch.randn_like(value) / value[0].numel() ** 0.5
    return torch.zeros_like(value)


def make_model(arch: str, hidden_dim: int) -> pyro.nn.PyroModule:
    if arch == "mlp":
        return BayesianMLP(64, IN_CLASSES, hidden_dims=(hidden_dim, hidden_dim))
    if arch == "conv":
        return BayesianConvNet(8, IN_CLASSES, channels=(8, 16))
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}")


def make_guide(method: str, model: pyro.nn.PyroModule, args: argparse.Namespace):
    if method == "mnf":
        return AutoMNFGuide(model, hidden_dims=(args.flow_hidden_dim,))
    if method == "mean-field":
        return AutoMeanFieldGuide(model)
    if method == "map":
        return AutoDelta(model, init_loc_fn=lecun_init)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def train_lockstep(
    model, guides: dict, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> dict[str, float]:
    """One step of each guide in turn on the same mini-batch; returns mean seconds per step."""
    svis = {
        name: SVI(
            model,
            guide,
            Adam({"lr": args.lr}),
            Trace_ELBO() if name == "map" else TraceMeanField_ELBO(),
        )
        for name, guide in guides.items()
    }
    seconds = dict.fromkeys(guides, 0.0)
    num_data = len(x)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(num_data, generator=generator)
    position = 0
    for _ in range(args.num_steps):
        if position + args.batch_size > num_data:
            order, position = torch.randperm(num_data, generator=generator), 0
        batch = order[position : position + args.batch_size]
        position += args.batch_size
        for name, svi in svis.items():
            context = getattr(guides[name], "step_context", None)
            start = time.perf_counter()
            if context is None:
                svi.step(x[batch], y[batch], num_data=num_data)
            else:
                with context():
                    svi.step(x[batch], y[batch], num_data=num_data)
            seconds[name] += time.perf_counter() - start
    return {name: total / max(args.num_steps, 1) for name, total in seconds.items()}


@torch.no_grad()
def predictive_probs(model, guide, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Posterior predictive class probabilities, averaged over ``num_samples`` weight draws."""
    predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=("logits",))
    return predictive(x)["logits"].softmax(-1).mean(0)


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15) -> float:
    confidence, prediction = probs.max(-1)
    correct = (prediction == y).to(probs.dtype)
    bins = torch.clamp((confidence * num_bins).long(), max=num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        members = bins == b
        if members.any():
            gap = (correct[members].mean() - confidence[members].mean()).abs()
            ece += members.to(probs.dtype).mean().item() * gap.item()
    return ece


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def classification_metrics(
    probs: torch.Tensor, y: torch.Tensor, ood_probs: dict[str, torch.Tensor]
) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    metrics = {
        "accuracy": (probs.argmax(-1) == y).double().mean().item(),
        "nll": -probs[torch.arange(len(y)), y].clamp_min(1e-12).log().mean().item(),
        "ece": expected_calibration_error(probs, y),
    }
    h_in = entropy(probs)
    for name, p_out in ood_probs.items():
        h_out = entropy(p_out)
        labels = [0] * len(h_in) + [1] * len(h_out)
        scores = torch.cat([h_in, h_out]).tolist()
        metrics[f"auroc {name}"] = float(roc_auc_score(labels, scores))
    return metrics


def run_digits(arch: str, seed: int, data: dict, args: argparse.Namespace) -> list[dict]:
    """Fit every method for one architecture and seed; one row of metrics per method."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = make_model(arch, args.hidden_dim)
    guides = {method: make_guide(method, model, args) for method in args.methods}
    seconds = train_lockstep(model, guides, data["x_train"], data["y_train"], args)
    eval_sets = ("x_test", *OOD_SETS)
    x_eval = torch.cat([data[name] for name in eval_sets])
    sizes = [len(data[name]) for name in eval_sets]
    rows = []
    for method, guide in guides.items():
        num_samples = 1 if method == "map" else args.num_samples
        probs = predictive_probs(model, guide, x_eval, num_samples).split(sizes)
        metrics = classification_metrics(
            probs[0], data["y_test"], dict(zip(OOD_SETS, probs[1:], strict=True))
        )
        reference = seconds.get("mean-field", seconds[method])
        metrics["time_ratio"] = seconds[method] / reference
        metrics["ms_per_step"] = 1000 * seconds[method]
        rows.append({"arch": arch, "method": method, "seed": seed, **metrics})
    return rows


def run_regression(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The cubic toy: returns the data and the predictive mean/std of each guide on a grid."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    x = torch.empty(20).uniform_(-4.0, 4.0)
    y = x**3 + 3.0 * torch.randn(20)
    x_scale, y_scale = 4.0, float(y.std())
    grid = torch.linspace(-6.0, 6.0, 200)
    model = BayesianMLP(1, 1, hidden_dims=(50,), likelihood="normal", noise_scale=3.0 / y_scale)
    out = {"x": x, "y": y, "grid": grid}
    for method in ("mnf", "mean-field"):
        guide = make_guide(method, model, args)
        svi = SVI(model, guide, Adam({"lr": args.lr}), TraceMeanField_ELBO())
        for _ in range(args.num_steps):
            with guide.step_context():
                svi.step((x / x_scale)[:, None], y / y_scale)
        with torch.no_grad():
            predictive = Predictive(
                model, guide=guide, num_samples=args.num_samples, return_sites=("mean",)
            )
            means = predictive((grid / x_scale)[:, None])["mean"] * y_scale
        out[method] = torch.stack([means.mean(0), means.std(0)])
    return out


def plot_regression(toy: dict[str, torch.Tensor], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = toy["grid"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, method in zip(axes, ("mnf", "mean-field"), strict=True):
        mean, std = toy[method]
        total = (std**2 + 9.0).sqrt()  # epistemic + the known noise variance 3^2
        ax.fill_between(grid, mean - 2 * total, mean + 2 * total, alpha=0.2, label="±2 sd (y)")
        ax.fill_between(grid, mean - 2 * std, mean + 2 * std, alpha=0.4, label="±2 sd (f)")
        ax.plot(grid, grid**3, "k--", lw=1, label="x³")
        ax.plot(grid, mean, lw=2, label="predictive mean")
        ax.scatter(toy["x"], toy["y"], s=12, c="k", zorder=3)
        ax.set_title(method)
        ax.set_ylim(-150, 150)
        ax.set_xlabel("x")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds for each (arch, method)."""
    table = []
    keys = [k for k in rows[0] if k not in ("arch", "method", "seed")]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            group = [r for r in rows if r["arch"] == arch and r["method"] == method]
            if not group:
                continue
            entry = {"arch": arch, "method": method, "seeds": len(group)}
            for key in keys:
                values = [r[key] for r in group]
                entry[key] = statistics.fmean(values)
                entry[key + " sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            table.append(entry)
    return table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-steps", type=int, default=3000, help="SVI steps per fit")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--num-seeds", type=int, default=1)
    p.add_argument("--outdir", default=".")
    p.add_argument("--archs", default="mlp,conv", help=f"comma-separated, from {ARCHS}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"from {METHODS}")
    p.add_argument("--hidden-dim", type=int, default=100, help="MLP width (two hidden layers)")
    p.add_argument("--flow-hidden-dim", type=int, default=50, help="MNF coupling width")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-samples", type=int, default=100, help="posterior predictive draws")
    p.add_argument("--no-regression", action="store_true", help="skip the 1-D toy")
    p.add_argument("--no-digits", action="store_true", help="only the 1-D toy")
    return p


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    args.methods = tuple(args.methods.split(","))
    archs = tuple(args.archs.split(","))
    for method in args.methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}")
    os.makedirs(args.outdir, exist_ok=True)
    rows = []
    if not args.no_digits:
        data = load_data()
        first_seed = args.seed
        for seed in range(first_seed, first_seed + args.num_seeds):
            args.seed = seed
            for arch in archs:
                rows.extend(run_digits(arch, seed, data, args))
        args.seed = first_seed
    table = summarize(rows) if rows else []
    for entry in table:
        print(
            f"{entry['arch']:5s} {entry['method']:10s} acc {entry['accuracy']:.4f} "
            f"nll {entry['nll']:.4f} ece {entry['ece']:.4f} "
            + " ".join(f"auroc[{name}] {entry['auroc ' + name]:.3f}" for name in OOD_SETS)
            + f" time x{entry['time_ratio']:.2f}"
        )
    if not args.no_regression:
        toy = run_regression(args)
        plot_regression(toy, os.path.join(args.outdir, "bnn_regression.png"))
    if rows:
        with open(os.path.join(args.outdir, "bnn_mnf.json"), "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)
    return table


if __name__ == "__main__":
    main(parser().parse_args())
