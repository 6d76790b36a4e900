r"""Synthetic targets with known normalising constants, for guides and benchmarks.

The first three are *generative* models with no observations, so their evidence is exactly
one: :math:`\log Z = 0` and :math:`\mathrm{KL}(q \,\|\, p) = -\mathrm{ELBO}`.

- ``funnel``: Neal's funnel, :math:`v \sim \mathcal N(0, 3^2)`,
  :math:`x_i \mid v \sim \mathcal N(0, e^{v})`, :math:`i = 1..D-1`.
- ``banana``: :math:`D/2` independent twisted pairs,
  :math:`a \sim \mathcal N(0, 2^2)`, :math:`b \mid a \sim \mathcal N(\tfrac14 (a^2 - 4), 1)`.
- ``rotated_gaussian``: :math:`\mathcal N(0, Q \Lambda Q^\top)` with a random rotation
  :math:`Q` and variances :math:`\Lambda` log-spaced over three decades.
- ``logistic_regression``: a Bayesian logistic regression on fixed synthetic data
  (intercept plus ``D - 1`` coefficients, standard normal priors); its evidence is unknown.
"""

from __future__ import annotations

__all__ = ["Target", "banana", "funnel", "logistic_regression", "rotated_gaussian", "TARGETS"]

from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch


@dataclass
class Target:
    """A model with its arguments and, where known, its exact log evidence.

    Attributes:
        name: short name.
        model: the Pyro model.
        args: positional arguments for ``model``.
        log_z: exact log evidence, or ``None`` when unknown.
        dim: number of unconstrained latent dimensions.
    """

    name: str
    model: Callable
    args: tuple = field(default_factory=tuple)
    log_z: float | None = None
    dim: int = 0


def funnel(dim: int = 10) -> Target:
    """Neal's funnel in ``dim`` dimensions (log Z = 0)."""
    if dim < 2:
        raise ValueError(f"funnel: dim must be >= 2, got {dim}")

    def model() -> None:
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        scale = torch.exp(v / 2).unsqueeze(-1).expand(v.shape + (dim - 1,))
        pyro.sample("x", dist.Normal(torch.zeros_like(scale), scale).to_event(1))

    return Target("funnel", model, (), 0.0, dim)


def banana(dim: int = 10, curvature: float = 0.25) -> Target:
    """``dim / 2`` independent banana-shaped pairs (log Z = 0)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"banana: dim must be an even number >= 2, got {dim}")

    def model() -> None:
        a = pyro.sample("a", dist.Normal(torch.zeros(dim // 2), 2.0).to_event(1))
        pyro.sample("b", dist.Normal(curvature * (a**2 - 4.0), 1.0).to_event(1))

    return Target("banana", model, (), 0.0, dim)


def rotated_gaussian(dim: int = 40, decades: float = 3.0, seed: int = 0) -> Target:
    """A correlated Gaussian whose variances span ``decades`` orders of magnitude (log Z = 0)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    variances = torch.logspace(-decades / 2, decades / 2, dim, dtype=torch.float64)
    cov = q @ torch.diag(variances) @ q.T
    scale_tril = torch.linalg.cholesky(cov)

    def model() -> None:
        dtype = torch.get_default_dtype()
        pyro.sample(
            "x",
            dist.MultivariateNormal(
                torch.zeros(dim, dtype=dtype), scale_tril=scale_tril.to(dtype)
            ),
        )

    return Target("rotated_gaussian", model, (), 0.0, dim)


def logistic_regression(dim: int = 21, num_data: int = 200, seed: int = 0) -> Target:
    """Bayesian logistic regression with an intercept and ``dim - 1`` coefficients."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_data, dim - 1, generator=gen, dtype=torch.float64)
    w = torch.randn(dim - 1, generator=gen, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(x @ w + 0.5), generator=gen)
    x, y = x.to(torch.get_default_dtype()), y.to(torch.get_default_dtype())

    def model(x: torch.Tensor, y: torch.Tensor) -> None:
        intercept = pyro.sample("intercept", dist.Normal(0.0, 1.0))
        coef = pyro.sample("coef", dist.Normal(torch.zeros(x.shape[-1]), 1.0).to_event(1))
        # Under a particle plate both have a size-1 slot for the data plate: no unsqueeze.
        logits = intercept + (x * coef).sum(-1)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

    return Target("logistic_regression", model, (x, y), None, dim)


#: Every target by name, as a function of its size arguments (with defaults) that returns
#: a :class:`Target`.
TARGETS: dict[str, Callable[[], Target]] = {
    "funnel": funnel,
    "banana": banana,
    "rotated_gaussian": rotated_gaussian,
    "logistic_regression": logistic_regression,
}
