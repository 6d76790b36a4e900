r"""Data-parallel SVI with ``torchrun``: an MNF Bayesian network and an amortized VAE on digits.

Each process takes its shard of every mini-batch (a ``DistributedSampler``), scales its
likelihood to the full training set, and ``pyro_flowvi.fit(..., distributed=True)`` averages
the gradients across the processes after each backward pass, so the fit is that of one process
on the global mini-batch. Only rank 0 shows the progress bar, writes the checkpoint and prints.

Two models on the 1,797 8x8 digits of scikit-learn (1,497 for training, 300 held out):

- ``--model bnn``: a Bayesian MLP classifier with :math:`\mathcal N(0, 1)` priors and the
  multiplicative-normalizing-flow posterior of :class:`pyro_flowvi.bnn.AutoMNFGuide` (Louizos &
  Welling, 2017), local reparameterization and ``TraceMeanField_ELBO``; reports the test
  accuracy;
- ``--model vae``: a VAE on the binarized digits with a global latent (a per-pixel logit
  offset, guided by ``AutoNormal``) and a local latent per image guided by
  :class:`pyro_flowvi.AutoAmortizedFlowGuide` (an IAF encoder; Kingma et al., 2016), the two in
  an ``AutoGuideList``; reports the test ELBO per image.

It prints one JSON line: the world size, the seconds per epoch, the training ELBO per data
point (the mean over the last epoch's steps) and the test figure.

Example::

    python examples/distributed_bnn.py --model bnn --num-epochs 30           # one process
    torchrun --standalone --nproc_per_node=2 examples/distributed_bnn.py --model bnn \
        --num-epochs 30 --checkpoint bnn.pt                                    # two processes

References:
    Multiplicative Normalizing Flows for Variational Bayesian Neural Networks (Louizos &
    Welling, 2017, arXiv 1703.01961)
    Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016,
    arXiv 1606.04934)
    PyTorch Distributed: Experiences on Accelerating Data Parallel Training (Li et al., 2020,
    arXiv 2006.15704)
"""

from __future__ import annotations

import argparse
import json
import os

import pyro
import pyro.distributions as dist
import torch
import torch.distributed
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pyro_flowvi import AutoAmortizedFlowGuide, fit
from pyro_flowvi.bnn import AutoMNFGuide, BayesianMLP

NUM_TEST = 300
MODELS = ("bnn", "vae")


def load_digits(binarize: bool) -> dict[str, torch.Tensor]:
    """Digits in [0, 1] (or binarized at half intensity), a fixed train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.as_tensor(digits.data, dtype=torch.get_default_dtype()) / 16.0
    if binarize:
        x = (x >= 0.5).to(x.dtype)
    y = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:NUM_TEST], order[NUM_TEST:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


class DigitsVAE(nn.Module):
    """Bernoulli decoder with a global per-pixel offset and a local latent per image."""

    def __init__(self, latent_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ELU(), nn.Linear(hidden_dim, 64)
        )

    def plate(self, x: torch.Tensor, num_data: int) -> pyro.plate:
        """The data plate: ``num_data`` images, of which ``x`` is the (sub)sample."""
        return pyro.plate("data", num_data, subsample=torch.arange(len(x), device=x.device))

    def forward(self, x: torch.Tensor, num_data: int) -> None:
        pyro.module("decoder", self.decoder)
        offset = pyro.sample("offset", dist.Normal(x.new_zeros(64), 1.0).to_event(1))
        with self.plate(x, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            logits = self.decoder(z) + offset
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def build(args: argparse.Namespace):
    """The model, its guide and its ELBO."""
    if args.model == "bnn":
        model = BayesianMLP(64, 10, hidden_dims=(args.hidden_dim,))
        return model, AutoMNFGuide(model), TraceMeanField_ELBO()
    model = DigitsVAE(args.latent_dim, args.hidden_dim)
    # the plate's size changes from training to test: the guide list makes it for its parts
    guide = AutoGuideList(model, create_plates=model.plate)
    guide.append(AutoNormal(poutine.block(model, hide=["z"])))
    guide.append(
        AutoAmortizedFlowGuide(
            poutine.block(model, expose=["z"]),
            plate="data",
            hidden_dims=(args.hidden_dim,),
            num_transforms=args.num_transforms,
        )
    )
    return model, guide, Trace_ELBO()


@torch.no_grad()
def evaluate(args: argparse.Namespace, model, guide, data: dict[str, torch.Tensor]) -> dict:
    """Test accuracy (BNN, 20 posterior draws) or test ELBO per image (VAE, 10 particles)."""
    x_test, y_test = data["x_test"], data["y_test"]
    if args.model == "bnn":
        draws = Predictive(model, guide=guide, num_samples=20, return_sites=["logits"])(x_test)
        probs = draws["logits"].softmax(-1).mean(0)
        return {"test_accuracy": float((probs.argmax(-1) == y_test).double().mean())}
    elbo = Trace_ELBO(num_particles=10)
    loss = elbo.loss(model, guide, x_test, len(x_test))
    return {"test_elbo_per_image": -loss / len(x_test)}


def main(args: argparse.Namespace) -> dict:
    """Fit on this process's shard; rank 0 returns (and prints) the results."""
    if args.model not in MODELS:
        raise ValueError(f"--model must be one of {MODELS}, got {args.model!r}")
    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started_group = world > 1 and not torch.distributed.is_initialized()
    if started_group:
        torch.distributed.init_process_group("gloo")  # torchrun's environment says where
    rank = torch.distributed.get_rank() if world > 1 else 0
    try:
        pyro.set_rng_seed(args.seed + rank)  # independent draws; rank 0's start is broadcast
        pyro.clear_param_store()
        data = load_digits(binarize=args.model == "vae")
        if args.model == "bnn":
            train = TensorDataset(data["x_train"], data["y_train"])
        else:
            train = TensorDataset(data["x_train"])
        if args.batch_size % world:
            raise ValueError(
                f"--batch-size {args.batch_size} must be a multiple of the {world} processes"
            )
        local_batch = args.batch_size // world
        if world > 1:
            sampler = DistributedSampler(train, shuffle=True, seed=args.seed, drop_last=True)
            loader = DataLoader(train, batch_size=local_batch, sampler=sampler, drop_last=True)
        else:
            loader = DataLoader(train, batch_size=local_batch, shuffle=True, drop_last=True)
        model, guide, loss = build(args)
        # torch imports its compiler lazily when the first optimizer is made (seconds on a
        # loaded machine); make one here so that the time per epoch is the fit's own
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        steps_per_epoch = len(loader)
        result = fit(
            model,
            guide,
            batches=loader,
            num_steps=args.num_epochs * steps_per_epoch,
            lr=args.lr,
            loss=loss,
            num_data=len(train),
            distributed=world > 1,
            checkpoint=args.checkpoint,
            checkpoint_every=max(1, steps_per_epoch * 5),
            progress=not args.quiet,
        )
        report = {
            "model": args.model,
            "world_size": result.world_size,
            "threads": args.threads,
            "global_batch": args.batch_size,
            "num_epochs": args.num_epochs,
            "steps": result.num_steps,
            "seconds_per_epoch": result.wall_time / max(result.num_steps / steps_per_epoch, 1),
            "ms_per_step": 1000 * result.wall_time / max(result.num_steps, 1),
            "train_elbo_per_point": result.elbo_trace[-steps_per_epoch:].mean() / len(train),
            "num_params": sum(p.numel() for _, p in pyro.get_param_store().named_parameters()),
        }
        if rank == 0:
            report.update(evaluate(args, model, guide, data))
            print(json.dumps(report))
            if args.outdir:
                os.makedirs(args.outdir, exist_ok=True)
                name = f"{args.model}-{world}x{args.threads}.json"
                with open(os.path.join(args.outdir, name), "w") as handle:
                    json.dump(report, handle, indent=1)
        if started_group:
            torch.distributed.barrier()  # no process tears down while rank 0 evaluates
        return report
    finally:
        if started_group:
            torch.distributed.destroy_process_group()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bnn", choices=MODELS)
    p.add_argument("--num-epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=100, help="global: over all processes")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--hidden-dim", type=int, default=100)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--num-transforms", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--outdir", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
