r"""Variational autoencoders with flow posteriors on binarized scikit-learn digits.

A VAE with a Bernoulli decoder :math:`p_\theta(x \mid z)` and a standard normal prior on
:math:`z \in \mathbb R^L` is fit by ``Trace_ELBO`` with one amortized posterior family per run:
a diagonal Gaussian (Kingma & Welling, 2014) or the Gaussian pushed through ``K`` conditional
planar, radial, Householder, IAF or Sylvester layers whose parameters come from the encoder's
output (van den Berg et al., 2018), all built by :class:`pyro_flowvi.amortized.FlowEncoder`.
The guide is one line, ``encoder.sample("z", x)`` (the draw and its exact log q, one pass).

On the held-out digits it reports the test :math:`-\mathrm{ELBO}` and an importance-sampled
:math:`-\log p(x) \approx -\log \frac1S \sum_s p(x, z_s) / q(z_s \mid x)` with ``--is-samples``
draws per test point (the same draws give the ELBO as their mean log weight), per seed, and the
training time per epoch of each family as a ratio to the Gaussian encoder of the same run. The
families of one seed train in lockstep (one step of each in turn, on the same mini-batches), so
the load of a shared machine hits all of them alike; each keeps its own RNG stream.

The data are the 1,797 8x8 digits of scikit-learn, binarized at half intensity (a static
binarization), split into 1,497 training and 300 test images with a fixed permutation.

Example::

    python examples/vae_flows.py --num-epochs 200 --seed 0 --num-seeds 3 --outdir out

References:
    Sylvester Normalizing Flows for Variational Inference (van den Berg et al., 2018,
    arXiv 1803.05649)
    Auto-Encoding Variational Bayes (Kingma & Welling, 2014, arXiv 1312.6114)
    Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015, arXiv 1505.05770)
    Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016,
    arXiv 1606.04934)
    Improving Variational Auto-Encoders using Householder Flow (Tomczak & Welling, 2016,
    arXiv 1611.09630)
    Importance Weighted Autoencoders (Burda et al., 2016, arXiv 1509.00519)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam
from torch import nn

from pyro_flowvi.amortized import FlowEncoder, conditional_families

FAMILY_NAMES = {family: family or "gaussian" for family in conditional_families()}
NUM_TEST = 300


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarized 8x8 digits, ``(train, test)`` of shapes ``(1497, 64)`` and ``(300, 64)``."""
    from sklearn.datasets import load_digits as sklearn_digits

    pixels = torch.as_tensor(sklearn_digits().data)
    x = (pixels >= 8).to(torch.get_default_dtype())
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = x[order]
    return x[NUM_TEST:], x[:NUM_TEST]


class VAE:
    """A decoder, a flow encoder, and the Pyro model and guide that use them."""

    def __init__(self, name: str, family: str | None, args: argparse.Namespace) -> None:
        self.name = name
        self.latent_dim = args.latent_dim
        self.decoder = nn.Sequential(
            nn.Linear(args.latent_dim, args.hidden_dim),
            nn.ELU(),
            nn.Linear(args.hidden_dim, args.hidden_dim),
            nn.ELU(),
            nn.Linear(args.hidden_dim, 64),
        )
        self.encoder = FlowEncoder(
            64,
            args.latent_dim,
            hidden_dims=(args.hidden_dim, args.hidden_dim),
            flow=family,
            num_transforms=args.num_transforms,
        )

    def model(self, x: torch.Tensor) -> None:
        pyro.module(f"{self.name}_decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module(f"{self.name}_encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            self.encoder.sample("z", x)  # the draw and its exact log q, one pass

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, num_samples: int, chunk: int = 100) -> torch.Tensor:
        """``log p(x, z_s) - log q(z_s | x)`` for ``num_samples`` draws, shape ``(S, N)``."""
        q = self.encoder(x)
        prior = dist.Normal(0.0, 1.0)
        parts = []
        for start in range(0, num_samples, chunk):
            z, log_q = q.rsample_and_log_prob((min(chunk, num_samples - start),))
            log_px = dist.Bernoulli(logits=self.decoder(z)).log_prob(x).sum(-1)
            parts.append(log_px + prior.log_prob(z).sum(-1) - log_q)
        return torch.cat(parts)

    def evaluate(self, x: torch.Tensor, num_samples: int) -> tuple[float, float]:
        """Mean over the rows of ``x`` of ``-ELBO`` and of the importance-sampled ``-log p(x)``."""
        log_w = self.log_weights(x, num_samples)
        elbo = log_w.mean(0)
        log_px = torch.logsumexp(log_w, 0) - math.log(num_samples)
        return -float(elbo.mean()), -float(log_px.mean())


def train_seed(
    args: argparse.Namespace, seed: int, families: list[str | None]
) -> tuple[list[dict], list[dict]]:
    """Fit one VAE per family for one seed, in lockstep, and evaluate them."""
    train, test = load_digits()
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    num_steps = args.num_epochs * steps_per_epoch
    if args.num_steps is not None:
        num_steps = min(num_steps, args.num_steps)
    runs = []
    for family in families:
        name = FAMILY_NAMES[family]
        pyro.set_rng_seed(seed)  # the same initial decoder, the same start of the RNG stream
        vae = VAE(name, family, args)
        optim = ClippedAdam({"lr": args.learning_rate, "clip_norm": 10.0})
        svi = SVI(vae.model, vae.guide, optim, Trace_ELBO())
        runs.append({"vae": vae, "svi": svi, "rng": torch.get_rng_state(), "step_seconds": []})
    batches = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=batches)
    train_loss = {FAMILY_NAMES[f]: 0.0 for f in families}
    for step in range(num_steps):
        position = step % steps_per_epoch
        if position == 0 and step:
            order = torch.randperm(len(train), generator=batches)
        batch = train[order[position * args.batch_size : (position + 1) * args.batch_size]]
        shift = step % len(runs)  # rotate who goes first, so load spikes hit all alike
        for run in runs[shift:] + runs[:shift]:
            torch.set_rng_state(run["rng"])
            start = time.perf_counter()
            loss = run["svi"].step(batch)
            run["step_seconds"].append(time.perf_counter() - start)
            run["rng"] = torch.get_rng_state()
            if not math.isfinite(loss):
                raise RuntimeError(f"{run['vae'].name}: loss {loss} at step {step}, seed {seed}")
            if step >= num_steps - steps_per_epoch:  # the last epoch's mean training loss
                train_loss[run["vae"].name] += loss / len(train)
    epochs = num_steps / steps_per_epoch
    results = []
    for run in runs:
        vae = run["vae"]
        torch.manual_seed(seed + 1)
        neg_elbo, neg_log_px = vae.evaluate(test, args.is_samples)
        results.append(
            {
                "family": vae.name,
                "seed": seed,
                "epochs": round(epochs, 3),
                "train_neg_elbo": train_loss[vae.name],
                "test_neg_elbo": neg_elbo,
                "test_neg_log_px": neg_log_px,
                # the median step (robust to load spikes and to the first, set-up step)
                "seconds_per_epoch": statistics.median(run["step_seconds"]) * steps_per_epoch,
            }
        )
    gaussian = {r["seed"]: r["seconds_per_epoch"] for r in results if r["family"] == "gaussian"}
    for r in results:
        if r["seed"] in gaussian:
            r["time_ratio"] = r["seconds_per_epoch"] / gaussian[r["seed"]]
    return results, runs


def summarize(results: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds, per family, in the order of first appearance."""
    table = []
    for name in dict.fromkeys(r["family"] for r in results):
        rows = [r for r in results if r["family"] == name]
        entry = {"family": name, "seeds": len(rows)}
        for key in ("test_neg_elbo", "test_neg_log_px", "time_ratio"):
            values = [r[key] for r in rows if key in r]
            if values:
                entry[key] = statistics.fmean(values)
                entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def plot(runs: list[dict], test: torch.Tensor, path: str, num_images: int = 8) -> None:
    """Test digits, their reconstructions and prior samples, one row per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = 9  # an 8x8 digit and a one-pixel white border
    rows = len(runs) + 1
    canvas = torch.zeros(rows * cell, (2 * num_images + 1) * cell)
    images = test[:num_images]

    def place(row: int, column: int, image: torch.Tensor) -> None:
        top, left = row * cell, column * cell
        canvas[top : top + 8, left : left + 8] = image.reshape(8, 8)

    labels = ["test digits"]
    for j in range(num_images):
        place(0, j, images[j])
    with torch.no_grad():
        for i, run in enumerate(runs, start=1):
            vae = run["vae"]
            z = vae.encoder(images).sample()
            recon = torch.sigmoid(vae.decoder(z))
            prior = torch.sigmoid(vae.decoder(torch.randn(num_images, vae.latent_dim)))
            for j in range(num_images):
                place(i, j, recon[j])
                place(i, num_images + 1 + j, prior[j])
            labels.append(vae.name)
    fig, axis = plt.subplots(figsize=(0.5 * (2 * num_images + 1) + 2.2, 0.5 * rows))
    axis.imshow(canvas.cpu().numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks([row * cell + 3.5 for row in range(rows)], labels, fontsize=8)
    axis.set_xticks([num_images * cell / 2, (1.5 * num_images + 1) * cell])
    axis.set_xticklabels(["reconstructions", "prior samples"], fontsize=8)
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(table: list[dict]) -> str:
    """A Markdown table of the summary."""
    lines = [
        "| posterior | seeds | test -ELBO (nats) | test -log p(x), IS (nats) "
        "| time / epoch vs Gaussian |",
        "|---|---|---|---|---|",
    ]
    for e in table:
        ratio = f"{e['time_ratio']:.2f} ± {e['time_ratio_sd']:.2f}" if "time_ratio" in e else "-"
        lines.append(
            f"| {e['family']} | {e['seeds']} | {e['test_neg_elbo']:.2f} ± "
            f"{e['test_neg_elbo_sd']:.2f} | {e['test_neg_log_px']:.2f} ± "
            f"{e['test_neg_log_px_sd']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    families = [None if f == "gaussian" else f for f in args.families.split(",")]
    for family in families:
        if family not in conditional_families():
            names = ",".join(FAMILY_NAMES.values())
            raise ValueError(f"--families: unknown family {family!r}; choose from {names}")
    os.makedirs(args.outdir, exist_ok=True)
    results = []
    for seed in range(args.seed, args.seed + args.num_seeds):
        pyro.clear_param_store()
        seed_results, runs = train_seed(args, seed, families)
        results += seed_results
        for r in seed_results:
            print(
                f"seed {seed} {r['family']:>22}: test -ELBO {r['test_neg_elbo']:.2f}, "
                f"-log p(x) {r['test_neg_log_px']:.2f}, "
                f"{r['seconds_per_epoch']:.3f} s/epoch",
                flush=True,
            )
        if seed == args.seed and not args.no_plot:
            plot(runs, load_digits()[1], os.path.join(args.outdir, "vae_flows.png"))
    with open(os.path.join(args.outdir, "vae_flows.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    table = summarize(results)
    with open(os.path.join(args.outdir, "vae_flows.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "summary": table}, f, indent=2)
    print(format_table(table))
    return table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-epochs", type=int, default=200)
    p.add_argument("--num-steps", type=int, default=None, help="cap on the SVI steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-seeds", type=int, default=3)
    p.add_argument("--outdir", default="vae_flows_out")
    p.add_argument("--families", default=",".join(FAMILY_NAMES.values()))
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-transforms", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--is-samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-plot", action="store_true")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
