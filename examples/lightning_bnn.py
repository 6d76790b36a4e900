r"""The data-parallel MNF Bayesian network of ``distributed_bnn.py``, trained by PyTorch Lightning.

Pyro's :class:`~pyro.infer.elbo.ELBOModule` (``TraceMeanField_ELBO()(model, guide)``) is an
``nn.Module`` whose forward pass is the differentiable negative ELBO, so a LightningModule can
return it from ``training_step``. With ``--devices 2`` Lightning's ``ddp`` strategy starts two
processes, gives each a ``DistributedSampler`` shard of every mini-batch, copies rank 0's
parameters to the others when it wraps the module in ``DistributedDataParallel``, and averages
the gradients across the processes after each backward pass: the same data-parallel step as
``pyro_flowvi.fit(..., distributed=True)``. The model scales its likelihood by the training-set
size over the *local* batch size, so the average is the gradient of the global mini-batch.

The guide is :class:`pyro_flowvi.bnn.AutoMNFGuide` (Louizos & Welling, 2017) on a Bayesian MLP
for the 10 classes of scikit-learn's 8x8 digits; its ``step_context()`` (local
reparameterization) is entered around every training step. Lightning is an optional
dependency (``pip install pyro-flowvi[lightning]``).

Example::

    python examples/lightning_bnn.py --devices 1 --num-epochs 30
    python examples/lightning_bnn.py --devices 2 --num-epochs 30     # Lightning starts rank 1
    torchrun --standalone --nproc_per_node=2 examples/lightning_bnn.py --devices 2

References:
    Multiplicative Normalizing Flows for Variational Bayesian Neural Networks (Louizos &
    Welling, 2017, arXiv 1703.01961)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import lightning
import pyro
import torch
from pyro.infer import Predictive, TraceMeanField_ELBO
from pyro.infer.elbo import ELBOModule
from torch.utils.data import DataLoader, TensorDataset

from pyro_flowvi.bnn import AutoMNFGuide, BayesianMLP

NUM_TEST = 300


def load_digits() -> dict[str, torch.Tensor]:
    """Digits in [0, 1], a fixed split into 1,497 training and 300 test images."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.as_tensor(digits.data, dtype=torch.get_default_dtype()) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:NUM_TEST], order[NUM_TEST:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


class PyroLightningModule(lightning.LightningModule):
    """Trains the model and guide of an ELBOModule; the loss is its negative ELBO."""

    def __init__(self, loss_fn: ELBOModule, lr: float, num_data: int, seed: int) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.lr, self.num_data, self.seed = lr, num_data, seed

    def setup(self, stage: str) -> None:
        # independent draws in every process (the parameters come from rank 0 anyway)
        pyro.set_rng_seed(self.seed + self.global_rank)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        with self.loss_fn.guide.step_context():  # local reparameterization
            loss = self.loss_fn(x, y, num_data=self.num_data)
        # the ELBO of the full data set per data point, averaged over the processes
        self.log("elbo_per_point", -loss / self.num_data, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.loss_fn.parameters(), lr=self.lr)


def main(args: argparse.Namespace) -> dict | None:
    """Fit with Lightning; the global-zero process returns (and prints) the results."""
    torch.set_num_threads(args.threads)
    if args.batch_size % args.devices:
        raise ValueError(
            f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}"
        )
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_digits()
    train = TensorDataset(data["x_train"], data["y_train"])
    # the batch size of one process; Lightning shards the data with a DistributedSampler
    loader = DataLoader(
        train, batch_size=args.batch_size // args.devices, shuffle=True, drop_last=True
    )
    model = BayesianMLP(64, 10, hidden_dims=(args.hidden_dim,))
    guide = AutoMNFGuide(model)
    loss_fn = TraceMeanField_ELBO()(model, guide)
    # build the guide's parameters before Lightning wraps the module (DDP needs them)
    x0, y0 = next(iter(loader))
    with guide.step_context():
        loss_fn(x0, y0, num_data=len(train))

    module = PyroLightningModule(loss_fn, args.lr, len(train), args.seed)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.num_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.quiet,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return None
    with torch.no_grad():
        draws = Predictive(model, guide=guide, num_samples=20, return_sites=["logits"])(
            data["x_test"]
        )
    probs = draws["logits"].softmax(-1).mean(0)
    report = {
        "world_size": trainer.world_size,
        "num_epochs": args.num_epochs,
        "seconds_per_epoch": seconds / args.num_epochs,
        "train_elbo_per_point": float(trainer.callback_metrics["elbo_per_point_epoch"]),
        "test_accuracy": float((probs.argmax(-1) == data["y_test"]).double().mean()),
    }
    print(json.dumps(report))
    if args.outdir:
        os.makedirs(args.outdir, exist_ok=True)
        with open(os.path.join(args.outdir, f"lightning-{trainer.world_size}.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=1, help="processes (CPU)")
    p.add_argument("--num-epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=100, help="global: over all processes")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--hidden-dim", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
