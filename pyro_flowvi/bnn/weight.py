r"""The Gaussian weight distribution that opts a guide site into local reparameterization.

:class:`GaussianWeight` is a diagonal Gaussian :math:`\mathcal N(\mu, \sigma^2)` over a whole
weight tensor (``event_dim`` rightmost dimensions form the event). It samples and scores like
``Normal(loc, scale).to_event(event_dim)``; what it adds is identity: under
:func:`~pyro_flowvi.bnn.local_reparameterization` every fresh draw from a ``GaussianWeight``
carries its ``(loc, scale)`` into the model, where ``F.linear`` / ``F.conv2d`` draw the
pre-activations instead of using the weight sample.

Its analytic KL divergence to a Gaussian prior, used by ``TraceMeanField_ELBO``, is

.. math::

    \mathrm{KL}(q \,\|\, p) = \sum_i \log\frac{\sigma_{p,i}}{\sigma_i}
        + \frac{\sigma_i^2 + (\mu_i - \mu_{p,i})^2}{2 \sigma_{p,i}^2} - \frac12 ,

summed over the event dimensions. For a prior that is not Gaussian the KL raises a
:class:`ValueError` naming the site rather than silently falling back to a Monte Carlo term.
"""

from __future__ import annotations

__all__ = ["GaussianWeight"]

import math
from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import sum_rightmost
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal, register_kl
from torch.distributions.utils import broadcast_all


class GaussianWeight(TorchDistribution):
    r"""Diagonal Gaussian over a weight tensor, the guide side of local reparameterization.

    Arguments:
        loc: :math:`\mu`, of shape ``batch_shape + event_shape``.
        scale: :math:`\sigma > 0`, broadcastable to ``loc``.
        event_dim: how many rightmost dimensions form the event (default: all of them).
        site: the name of the sample site, quoted by errors.
        noise: for multiplicative-noise posteriors (MNF), a pair ``(mu, sample_z)`` such that
            ``loc = z * mu`` for one draw of ``z``, where ``sample_z(n)`` returns ``n``
            independent draws of shape ``(n, D)``: ``z`` scales the fan-in (last axis) of a
            dense weight or the output channels (first axis) of a conv kernel. Sampling and
            scoring ignore it; under local reparameterization each data point draws its own
            ``z`` (Louizos & Welling, 2017, Algorithms 1-2).

    Example:
        >>> q = GaussianWeight(torch.zeros(3, 4), 0.1 * torch.ones(3, 4), site="fc.weight")
        >>> w = q.rsample()
        >>> q.log_prob(w).shape
        torch.Size([])
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor | float,
        event_dim: int | None = None,
        *,
        site: str | None = None,
        noise: tuple[Tensor, Callable[[int], Tensor]] | None = None,
        validate_args: bool | None = None,
    ) -> None:
        self.loc, self.scale = broadcast_all(loc, scale)
        if event_dim is None:
            event_dim = self.loc.dim()
        if not 0 <= event_dim <= self.loc.dim():
            raise ValueError(
                f"GaussianWeight{'' if site is None else f' at site {site!r}'}: event_dim "
                f"must be in [0, {self.loc.dim()}] for loc of shape {tuple(self.loc.shape)}, "
                f"got {event_dim}"
            )
        self.site = site
        self.noise = noise
        split = self.loc.dim() - event_dim
        super().__init__(self.loc.shape[:split], self.loc.shape[split:], validate_args)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return self.scale.pow(2)

    def expand(
        self, batch_shape: torch.Size, _instance: GaussianWeight | None = None
    ) -> GaussianWeight:
        new = self._get_checked_instance(GaussianWeight, _instance)
        shape = torch.Size(batch_shape) + self.event_shape
        new.loc = self.loc.expand(shape)
        new.scale = self.scale.expand(shape)
        new.site = self.site
        new.noise = self.noise
        super(GaussianWeight, new).__init__(torch.Size(batch_shape), self.event_shape, False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * eps

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) / self.scale
        log_prob = -0.5 * z.pow(2) - self.scale.log() - 0.5 * math.log(2 * math.pi)
        return sum_rightmost(log_prob, len(self.event_shape))

    def entropy(self) -> Tensor:
        entropy = 0.5 + 0.5 * math.log(2 * math.pi) + self.scale.log()
        return sum_rightmost(entropy.expand(self.loc.shape), len(self.event_shape))


def _gaussian_base(p: Distribution) -> Normal | None:
    """The Normal under ``Independent`` / expand wrappers, or ``None`` if there is none."""
    while True:
        if isinstance(p, Normal):
            return p
        if isinstance(p, Independent):
            p = p.base_dist
        elif isinstance(p, ExpandedDistribution):
            p = p.base_dist
        else:
            return None


@register_kl(GaussianWeight, Distribution)
def _kl_gaussian_weight(q: GaussianWeight, p: Distribution) -> Tensor:
    site = "" if q.site is None else f" at site {q.site!r}"
    base = _gaussian_base(p)
    if base is None:
        raise ValueError(
            f"the analytic KL(q(W) || p(W)){site} (TraceMeanField_ELBO) needs a Gaussian prior, "
            f"got {type(p).__name__}; use Trace_ELBO, which scores the sampled weight, or a "
            "Normal prior"
        )
    q_shape = q.batch_shape + q.event_shape
    p_shape = p.batch_shape + p.event_shape
    if torch.broadcast_shapes(q_shape, p_shape) != q_shape:
        raise ValueError(
            f"the prior{site} has shape {tuple(p_shape)}, which does not broadcast to the "
            f"weight shape {tuple(q_shape)}"
        )
    var_ratio = (q.scale / base.scale).pow(2)
    mean_term = ((q.loc - base.loc) / base.scale).pow(2)
    kl = 0.5 * (var_ratio + mean_term - 1 - var_ratio.log())
    return sum_rightmost(kl.expand(q_shape), len(q.event_shape))
