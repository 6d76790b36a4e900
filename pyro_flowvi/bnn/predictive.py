r"""Posterior predictive log-likelihood of held-out data, the test-LL of the BNN literature.

For posterior draws :math:`\theta_s \sim q(\theta)`, :math:`s = 1..S`, the log predictive
density of a test point is the log of a Monte Carlo *mixture*,

.. math::

    \log p(y_n \mid x_n, \mathcal D) \approx \log \frac1S \sum_{s=1}^S p(y_n \mid x_n, \theta_s)
    = \operatorname{logsumexp}_s \log p(y_n \mid x_n, \theta_s) - \log S ,

not the average :math:`\frac1S \sum_s \log p(y_n \mid x_n, \theta_s)`, which (by Jensen) is
lower and penalises exactly the spread that a Bayesian predictive is for. For an ensemble of
:math:`M` members, each member is one mixture component of weight :math:`1/M`.

If the targets were standardized, :math:`\tilde y = (y - m) / s`, the density in the original
units is :math:`p(y) = p(\tilde y) / s`, so ``y_scale=s`` subtracts :math:`\log s`.
"""

from __future__ import annotations

__all__ = ["log_likelihood_draws", "mixture_log_likelihood", "predictive_log_likelihood"]

import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro.poutine as poutine
import torch
from torch import Tensor


def _check_count(value: Any, name: str, site: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{site}: {name} must be an int >= 1, got {value!r}")
    return value


@torch.no_grad()
def log_likelihood_draws(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 100,
    obs_site: str = "obs",
    **kwargs: Any,
) -> Tensor:
    r"""Pointwise log-likelihoods :math:`\log p(y_n \mid x_n, \theta_s)` under guide draws.

    Each draw runs the guide once and replays the model on its values, outside any
    local-reparameterization handler, so every draw is one explicit set of weights shared by
    all test points (as the posterior predictive requires).

    Arguments:
        model: a Pyro model whose observed site ``obs_site`` gets the targets from ``args``.
        guide: a guide of the model (any Pyro guide, including ``AutoDelta``).
        *args: the model's arguments, targets included (e.g. ``x_test, y_test``).
        num_samples: :math:`S`, the number of posterior draws.
        obs_site: the name of the observed likelihood site.
        **kwargs: further keyword arguments of the model and guide.

    Returns:
        A tensor of shape ``(S,) + batch_shape`` of the site (``(S, N)`` for a plate of N
        points): the log-density of every observation, not scaled by any subsampling.

    Raises:
        ValueError: if ``obs_site`` is missing from the model or not observed.
    """
    num_samples = _check_count(num_samples, "num_samples", "log_likelihood_draws")
    draws = []
    for _ in range(num_samples):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        if obs_site not in model_trace.nodes:
            sites = [n for n, s in model_trace.nodes.items() if s["type"] == "sample"]
            raise ValueError(
                f"log_likelihood_draws: the model has no site {obs_site!r}; its sample sites "
                f"are {sites}"
            )
        site = model_trace.nodes[obs_site]
        if site["type"] != "sample" or not site["is_observed"]:
            raise ValueError(
                f"log_likelihood_draws: site {obs_site!r} is not observed; pass the targets "
                "to the model"
            )
        draws.append(site["fn"].log_prob(site["value"]))
    return torch.stack(draws)


def mixture_log_likelihood(
    draws: Tensor | Sequence[Tensor], y_scale: float | Tensor = 1.0
) -> Tensor:
    r"""Log predictive density of each point from pointwise log-likelihood draws.

    Arguments:
        draws: a tensor ``(S, ...)`` of :math:`\log p(y_n \mid \theta_s)` (from
            :func:`log_likelihood_draws`), or a sequence of such tensors, one per member of
            an equally weighted ensemble (members may have different numbers of draws).
        y_scale: the standard deviation the targets were divided by; the result is then the
            density of the original, unstandardized targets.

    Returns:
        :math:`\log \frac1M \sum_m \frac1{S_m} \sum_s p(y_n \mid \theta_{ms}) - \log s`, of
        the shape of one draw.

    Raises:
        ValueError: for no draws, members of different shapes, or ``y_scale`` <= 0.
    """
    members = [draws] if torch.is_tensor(draws) else list(draws)
    if not members or any(m.dim() == 0 or m.shape[0] == 0 for m in members):
        raise ValueError(
            "mixture_log_likelihood: needs at least one member with at least one draw, got "
            f"shapes {[tuple(m.shape) for m in members]}"
        )
    if len({m.shape[1:] for m in members}) > 1:
        raise ValueError(
            "mixture_log_likelihood: ensemble members disagree on the data shape: "
            f"{[tuple(m.shape) for m in members]}"
        )
    scale = torch.as_tensor(y_scale, dtype=members[0].dtype, device=members[0].device)
    if not bool(torch.all(scale > 0)):
        raise ValueError(f"mixture_log_likelihood: y_scale must be > 0, got {y_scale}")
    per_member = torch.stack([m.logsumexp(0) - math.log(m.shape[0]) for m in members])
    return per_member.logsumexp(0) - math.log(len(members)) - scale.log()


def predictive_log_likelihood(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 100,
    obs_site: str = "obs",
    y_scale: float | Tensor = 1.0,
    **kwargs: Any,
) -> Tensor:
    r"""Monte Carlo log predictive density of every held-out point (see the module docstring).

    Arguments:
        model: a Pyro model whose observed site ``obs_site`` gets the targets from ``args``.
        guide: a guide of the model.
        *args: the model's arguments, targets included (e.g. ``x_test, y_test``).
        num_samples: :math:`S`, posterior draws in the mixture.
        obs_site: the name of the observed likelihood site.
        y_scale: the standard deviation the targets were divided by (1 if they were not).
        **kwargs: further keyword arguments of the model and guide.

    Returns:
        A tensor of the site's batch shape (``(N,)``); its mean is the "test log-likelihood"
        of the UCI tables.

    Example:
        >>> lpd = predictive_log_likelihood(model, guide, x_test, y_test_std,
        ...                                 num_samples=100, y_scale=y_sd)  # doctest: +SKIP
        >>> test_ll = lpd.mean()
    """
    draws = log_likelihood_draws(
        model, guide, *args, num_samples=num_samples, obs_site=obs_site, **kwargs
    )
    return mixture_log_likelihood(draws, y_scale)
