r"""Guides for Bayesian neural networks written as plain Pyro models.

Both guides find the model's *weight sites* by running it once: a latent site is a weight site
when its value is passed as the ``weight`` of ``F.linear`` (``nn.Linear``) or ``F.conv2d``
(``nn.Conv2d``). Weight sites get a Gaussian that local reparameterization can use, sampled
from :class:`~pyro_flowvi.bnn.GaussianWeight`; every other latent site (biases, noise scales,
...) gets a mean-field Gaussian in unconstrained space,

.. math::

    q(\theta) = \prod_{\text{weights } W} q(W) \prod_{\text{other } s} \mathcal N(u_s \mid
    \mu_s, \sigma_s^2), \qquad \theta_s = T_s(u_s)

with :math:`T_s` the bijection onto the site's support. :class:`AutoMeanFieldGuide` uses
:math:`q(W) = \mathcal N(\mu, \sigma^2)`; :class:`~pyro_flowvi.bnn.AutoMNFGuide` makes the means
multiplicative in a flow-distributed auxiliary variable.
"""

from __future__ import annotations

__all__ = ["AutoMeanFieldGuide"]

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from operator import attrgetter
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from pyro.infer.autoguide.utils import deep_setattr, helpful_support_errors
from pyro.nn import PyroModule, PyroParam
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from .local_reparam import _WeightProbe, local_reparameterization
from .weight import GaussianWeight

#: An ``init_loc_fn``: takes Pyro's site dict, returns the initial value of the site.
InitFn = Callable[[dict[str, Any]], Tensor]


def _hide_all_but_latents(msg: dict[str, Any]) -> bool:
    """Block every message but latent sample sites (what an autoguide's prototype records)."""
    return msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg)


def _is_real(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class _BayesianLayerGuide(AutoGuide):
    """Shared machinery: weight-site discovery, mean-field non-weight sites, step context."""

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        init_loc_fn: InitFn | None = None,
        init_scale: float = 0.01,
        max_variance: float = 1.0,
        local_reparam: bool = True,
        create_plates: Callable[..., Any] | None = None,
    ) -> None:
        name = type(self).__name__
        if isinstance(init_scale, bool) or not isinstance(init_scale, int | float):
            raise ValueError(f"{name}: init_scale must be a float > 0, got {init_scale!r}")
        if not init_scale > 0:
            raise ValueError(f"{name}: init_scale must be > 0, got {init_scale}")
        if not max_variance > 0:
            raise ValueError(f"{name}: max_variance must be > 0, got {max_variance}")
        if init_scale**2 > max_variance:
            raise ValueError(
                f"{name}: init_scale**2 = {init_scale**2} exceeds max_variance = {max_variance}"
            )
        self.init_loc_fn = init_loc_fn
        self.init_scale = float(init_scale)
        self.max_variance = float(max_variance)
        self.local_reparam = bool(local_reparam)
        super().__init__(model, create_plates=create_plates)

    # -- structure --------------------------------------------------------------------------

    def _init_value(self, site: dict[str, Any]) -> Tensor:
        return (self.init_loc_fn or init_to_feasible)(site)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        probe = _WeightProbe()
        model = poutine.block(InitMessenger(self._init_value)(self.model), _hide_all_but_latents)
        self.prototype_trace = poutine.block(poutine.trace(probe(model)).get_trace)(
            *args, **kwargs
        )
        if self.master is not None:  # a part of an AutoGuideList
            self._check_against_master(self.master().prototype_trace)
        self._prototype_frames = {}
        latent = list(self.prototype_trace.iter_stochastic_nodes())
        for site_name, site in latent:
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized:
                    raise NotImplementedError(f"{name} does not support sequential pyro.plate")
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(
                        f"{name}: latent site {site_name!r} is inside the subsampled plate "
                        f"{frame.name!r}; this guide covers global sites only (put local "
                        "latents in an amortized guide and combine them with AutoGuideList)"
                    )
                self._prototype_frames[frame.name] = frame
        self._weight_kinds: dict[str, str] = {}
        for site_name, kinds in probe.uses.items():
            if len(kinds) > 1:
                raise ValueError(
                    f"{name}: site {site_name!r} is used as the weight of both "
                    f"{sorted(kinds)}; a weight site must feed one kind of layer"
                )
            site = self.prototype_trace.nodes[site_name]
            if not _is_real(site["fn"].support):
                raise ValueError(
                    f"{name}: weight site {site_name!r} has support {site['fn'].support}; a "
                    "Gaussian weight posterior needs a real-valued prior (e.g. Normal)"
                )
            if site["cond_indep_stack"]:
                raise ValueError(
                    f"{name}: weight site {site_name!r} is inside plates "
                    f"{[f.name for f in site['cond_indep_stack']]}; weights must be global"
                )
            self._weight_kinds[site_name] = kinds.pop()
        if not self._weight_kinds:
            raise ValueError(
                f"{name}: the model has no weight sites: no latent sample was passed as the "
                "weight of F.linear or F.conv2d (nn.Linear / nn.Conv2d with a PyroSample "
                f"weight); latent sites: {[n for n, _ in latent]}"
            )
        self.weights = PyroModule()
        self.locs = PyroModule()
        self.scales = PyroModule()
        self._event_dims: dict[str, int] = {}
        for site_name, site in latent:
            if site_name in self._weight_kinds:
                self._setup_weight(site_name, site)
            else:
                self._setup_other(site_name, site)

    def _check_against_master(self, master_trace: Trace | None) -> None:
        """The sites of this part must have the shapes the ``AutoGuideList`` saw."""
        if master_trace is None:
            return
        name = type(self).__name__
        for site_name, site in self.prototype_trace.iter_stochastic_nodes():
            if site_name not in master_trace.nodes:
                raise ValueError(
                    f"{name}: site {site_name!r} of this AutoGuideList part is not a site of "
                    "the list's model"
                )
            ref = master_trace.nodes[site_name]
            for what in ("batch_shape", "event_shape"):
                mine, theirs = getattr(site["fn"], what), getattr(ref["fn"], what)
                if mine != theirs:
                    raise ValueError(
                        f"{name}: site {site_name!r} has {what} {tuple(mine)} in this part "
                        f"but {tuple(theirs)} in the AutoGuideList's model"
                    )

    def _init_weight_loc(self, site: dict[str, Any]) -> Tensor:
        """The user's init when given, else LeCun normal N(0, 1 / fan_in)."""
        value = site["value"].detach()
        if self.init_loc_fn is not None:
            return value.clone()
        fan_in = value[0].numel()
        return torch.randn_like(value) / fan_in**0.5

    def _setup_weight(self, name: str, site: dict[str, Any]) -> None:
        raise NotImplementedError

    def _add_loc_scale(self, name: str, init: torch.Tensor, event_dim: int) -> None:
        """Register a mean-field (loc, scale) pair for site ``name``, loc starting at ``init``."""
        self._event_dims[name] = event_dim
        deep_setattr(self.locs, name, PyroParam(init, constraints.real, event_dim))
        scale = torch.full_like(init, self.init_scale)
        deep_setattr(self.scales, name, PyroParam(scale, constraints.softplus_positive, event_dim))

    def _setup_other(self, name: str, site: dict[str, Any]) -> None:
        with helpful_support_errors(site):
            init = biject_to(site["fn"].support).inv(site["value"].detach()).detach()
        self._add_loc_scale(name, init, site["fn"].event_dim + init.dim() - site["value"].dim())

    def _clip(self, scale: Tensor) -> Tensor:
        return scale.clamp(max=self.max_variance**0.5)

    # -- sampling ---------------------------------------------------------------------------

    def _sample_weight(self, name: str, site: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def _sample_other(self, name: str, site: dict[str, Any], plates: dict[str, Any]) -> Tensor:
        transform = biject_to(site["fn"].support)
        loc = attrgetter(name)(self.locs)
        scale = attrgetter(name)(self.scales)
        with ExitStack() as stack:
            for frame in site["cond_indep_stack"]:
                stack.enter_context(plates[frame.name])
            base = dist.Normal(loc, scale).to_event(self._event_dims[name])
            fn = (
                base
                if _is_real(site["fn"].support)
                else dist.TransformedDistribution(base, transform)
            )
            return pyro.sample(name, fn)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample every latent site; takes the model's ``*args, **kwargs``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if name in self._weight_kinds:
                result[name] = self._sample_weight(name, site)
            else:
                result[name] = self._sample_other(name, site, plates)
        return result

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """A point summary: the weight means (at the base median of any auxiliary flow) and
        the medians of the other sites."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if name in self._weight_kinds:
                result[name] = self._weight_median(name).clone()
            else:
                result[name] = biject_to(site["fn"].support)(attrgetter(name)(self.locs)).clone()
        return result

    def _weight_median(self, name: str) -> Tensor:
        raise NotImplementedError

    @property
    def weight_sites(self) -> dict[str, str]:
        """The weight sites found in the model, mapped to ``"linear"`` or ``"conv2d"``."""
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__}: call the guide once (or fit) before weight_sites"
            )
        return dict(self._weight_kinds)

    def step_context(self) -> AbstractContextManager[Any]:
        """The context ``pyro_flowvi.fit`` enters around each ``svi.step``:
        :func:`~pyro_flowvi.bnn.local_reparameterization` (or a no-op when built with
        ``local_reparam=False``)."""
        return local_reparameterization() if self.local_reparam else nullcontext()


class AutoMeanFieldGuide(_BayesianLayerGuide):
    r"""Mean-field Gaussian guide for BNNs whose weights admit local reparameterization.

    .. math::

        q(W) = \mathcal N(\mu, \mathrm{diag}(\sigma^2)), \qquad
        \sigma = \min(\mathrm{softplus}(\rho), \sqrt{v_{\max}})

    for every weight site (sampled from :class:`~pyro_flowvi.bnn.GaussianWeight`, so the
    analytic KL of ``TraceMeanField_ELBO`` and :func:`~pyro_flowvi.bnn.local_reparameterization`
    both apply), and a mean-field Normal in unconstrained space for every other latent site.
    This is the baseline of Blundell et al. (2015) with the estimator of Kingma et al. (2015).

    Arguments:
        model: a Pyro model whose layers are ``PyroModule[nn.Linear]`` / ``PyroModule[nn.Conv2d]``
            with ``PyroSample`` weights (see :class:`~pyro_flowvi.bnn.BayesianMLP`).
        init_loc_fn: per-site init (Pyro's ``init_to_*``); by default weight means are drawn
            from :math:`\mathcal N(0, 1/\text{fan-in})` and other sites start at
            ``init_to_feasible``.
        init_scale: initial :math:`\sigma` of every site.
        max_variance: :math:`v_{\max}`, the clip on the weight variance in every draw.
        local_reparam: whether :meth:`step_context` turns on local reparameterization.
        create_plates: as in Pyro's autoguides.

    Example:
        >>> model = BayesianMLP(4, 3, hidden_dims=(16,))
        >>> guide = AutoMeanFieldGuide(model)
        >>> svi = SVI(model, guide, Adam({"lr": 1e-2}), TraceMeanField_ELBO())  # doctest: +SKIP
        >>> with guide.step_context():  # doctest: +SKIP
        ...     svi.step(x, y)

    References:
        Weight Uncertainty in Neural Networks (Blundell et al., 2015, arXiv:1505.05424).
        Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015,
        arXiv:1506.02557).
    """

    def _setup_weight(self, name: str, site: dict[str, Any]) -> None:
        init = self._init_weight_loc(site)
        self._add_loc_scale(name, init, site["fn"].event_dim)

    def _sample_weight(self, name: str, site: dict[str, Any]) -> Tensor:
        loc = attrgetter(name)(self.locs)
        scale = self._clip(attrgetter(name)(self.scales))
        return pyro.sample(name, GaussianWeight(loc, scale, self._event_dims[name], site=name))

    def _weight_median(self, name: str) -> Tensor:
        return attrgetter(name)(self.locs)
