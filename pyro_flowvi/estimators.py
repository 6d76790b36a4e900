r"""Reparameterized ELBO estimators: sticking the landing and importance-weighted bounds (DReG).

Both classes are Pyro ELBOs (``SVI(model, guide, optim, loss=...)``, ``fit(..., loss=...)``)
for any guide whose sample sites are reparameterized and carry :math:`\log q`: Pyro's
autoguides, pyro-flowvi's flow guides and hand-written guides. With draws
:math:`z_k = g_\phi(\epsilon_k)` and log weights :math:`\log w_k = \log p_\theta(x, z_k) -
\log q_\phi(z_k)`:

- :class:`TraceSTL_ELBO` estimates the ELBO :math:`\mathbb E_q[\log w]` and drops the score
  term :math:`\partial_\phi \log q_\phi(z)\rvert_{z\ \mathrm{fixed}}` from the guide gradient
  ("sticking the landing"): the estimator stays unbiased and its variance vanishes when
  :math:`q` equals the posterior.
- :class:`TraceIW_ELBO` estimates the importance-weighted bound :math:`\log \frac1K \sum_k w_k
  \le \log p(x)`, with the doubly-reparameterized guide gradient (DReG)
  :math:`\sum_k \tilde w_k^2\, \partial_{z_k} \log w_k\, \partial_\phi z_k`,
  :math:`\tilde w_k = w_k / \sum_j w_j`, and the standard IWAE gradient
  :math:`\sum_k \tilde w_k\, \partial_\theta \log p_\theta(x, z_k)` for model parameters.

Both need :math:`\log q_\phi(\bar z)` at the drawn point :math:`\bar z` held fixed, as a
function of :math:`\phi`; its gradient is the score term. It is computed without a new draw:

1. a guide with a method ``log_prob_at(trace, *args, **kwargs)`` supplies it (protocol below);
2. an :class:`~pyro.infer.autoguide.AutoContinuous` guide (pyro-flowvi's flow guides, Pyro's
   ``AutoMultivariateNormal``, ``AutoIAFNormal``, ``AutoNormalizingFlow``, ...) scores its packed
   unconstrained draw with ``get_posterior(*args, **kwargs).log_prob(z)`` (for a flow, its
   inverse); the constraining transforms after it do not depend on :math:`\phi`;
3. an :class:`~pyro.infer.autoguide.AutoGuideList` is handled part by part;
4. any other guide is replayed at the detached draws (``poutine.replay``) and each site scores
   its value with its own distribution (``AutoNormal``, ``AutoDelta``, hand-written guides).
   A ``Delta`` site must then be a parameter-free function of the sites before it.

A guide whose attribute ``stick_the_landing`` is true declares that the :math:`\log q` it
reports already carries the pathwise gradient only; these estimators then skip the score pass.

The ``log_prob_at`` protocol: ``guide.log_prob_at(trace, *args, **kwargs)`` receives the
guide's own trace of the current step (subsample sites included) and returns a dict from site
name to :math:`\log q_\phi` of that site's recorded value given the recorded values of the sites
before it, computed from the current parameters with every recorded value treated as a
constant, unscaled and unmasked, shaped as the site's batch shape. Sites whose density does not
depend on the parameters given those values may be left out. It is called inside the same
particle plate as the guide.

References:
    Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational Inference
    (Roeder et al., 2017, arXiv 1703.09194)
    Importance Weighted Autoencoders (Burda et al., 2016, arXiv 1509.00519)
    Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives (Tucker et al., 2019,
    arXiv 1810.04152)
    Tighter Variational Bounds are Not Necessarily Better (Rainforth et al., 2018,
    arXiv 1802.04537)
"""

from __future__ import annotations

__all__ = ["TraceIW_ELBO", "TraceSTL_ELBO"]

import functools
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.autoguide import AutoContinuous, AutoGuideList
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape, warn_if_nan
from torch import Tensor

from ._util import is_discrete

_PARTICLE_PLATE = "num_particles_vectorized"  # Pyro's name for the same plate
_DELTA_RTOL = 1e-5
_DELTA_ATOL = 1e-8


def _is_subsample(site: dict) -> bool:
    return type(site["fn"]).__name__ == "_Subsample"


def _sample_sites(trace: Trace) -> Iterator[tuple[str, dict]]:
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not _is_subsample(site):
            yield name, site


def _unwrap(fn: dist.Distribution) -> dist.Distribution:
    """The distribution under Pyro's expand / mask / to_event wrappers."""
    while isinstance(fn, (dist.ExpandedDistribution, dist.MaskedDistribution, dist.Independent)):
        fn = fn.base_dist
    return fn


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without growing it."""
    lead = len(shape) - len(target)
    if lead > 0 and any(size != 1 for size in shape[:lead]):
        return False
    tail = shape[max(lead, 0) :]
    return all(a in (1, b) for a, b in zip(tail, target[len(target) - len(tail) :], strict=True))


def _sum_to_shape(tensor: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast tensor back to ``shape``."""
    extra = tensor.dim() - len(shape)
    if extra > 0:
        tensor = tensor.sum(tuple(range(extra)))
    dims = tuple(i for i, size in enumerate(shape) if size == 1 and tensor.shape[i] != 1)
    return tensor.sum(dims, keepdim=True) if dims else tensor


class _Weights:
    """Per-particle factors for the gradient that reaches the draws through the model; they
    are known only after the model has run, so the backward pass reads them from here."""

    def __init__(self) -> None:
        self.value: Tensor | None = None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the incoming gradient by per-particle weights."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, weights: _Weights, event_dim: int) -> Tensor:
        ctx.weights = weights
        ctx.event_dim = event_dim
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        weights = ctx.weights.value
        if weights is None:
            raise RuntimeError("TraceIW_ELBO: backward ran before the particle weights were set")
        weights = weights.reshape(weights.shape + (1,) * ctx.event_dim)
        if weights.dim() > grad.dim():
            lead = weights.dim() - grad.dim()
            weights = weights.reshape(weights.shape[lead:])
        scaled = grad * weights
        if scaled.shape != grad.shape:
            scaled = _sum_to_shape(scaled, grad.shape)
        return scaled, None, None


def _reduce(tensor: Tensor, keep: frozenset[int], rank: int) -> Tensor:
    """Sum ``tensor`` over every dimension whose negative index is not in ``keep``; the result
    has ``rank`` dimensions, of size 1 outside ``keep``."""
    dims = [i for i in range(tensor.dim()) if i - tensor.dim() not in keep]
    if dims:
        tensor = tensor.sum(dims, keepdim=True)
    if tensor.dim() > rank:
        tensor = tensor.reshape(tensor.shape[tensor.dim() - rank :])
    elif tensor.dim() < rank:
        tensor = tensor.reshape((1,) * (rank - tensor.dim()) + tensor.shape)
    return tensor


def _declares_stl(guide: object) -> bool:
    return getattr(guide, "stick_the_landing", False) is True


def _any_declares_stl(guide: object) -> bool:
    if _declares_stl(guide):
        return True
    return isinstance(guide, AutoGuideList) and any(_any_declares_stl(part) for part in guide)


def _replay_log_probs(
    owner: str, guide: Callable, trace: Trace, args: tuple, kwargs: dict
) -> dict[str, Tensor]:
    """Replay ``guide`` at the detached values of ``trace``; each site scores its value."""
    fixed = trace.copy()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and torch.is_tensor(site["value"]):
            fixed.nodes[name] = {**site, "value": site["value"].detach()}
    replayed = poutine.trace(poutine.replay(guide, trace=fixed)).get_trace(*args, **kwargs)
    result = {}
    for name, site in _sample_sites(replayed):
        if site["is_observed"]:
            continue
        if name not in trace.nodes:
            raise ValueError(
                f"{owner}: guide site {name!r} appeared when the guide was replayed at its own "
                "draws but not in the run that drew them; the guide's structure must not "
                "change between runs"
            )
        base = _unwrap(site["fn"])
        if isinstance(base, dist.Delta):
            # A point mass: held at the replayed value, it must be a function of the sites
            # before it, and then only its log_density (the Jacobian term) matters.
            value = site["value"]
            matches = base.v.shape == value.shape[value.dim() - base.v.dim() :] and bool(
                torch.allclose(base.v, value, rtol=_DELTA_RTOL, atol=_DELTA_ATOL)
            )
            if not matches:
                raise ValueError(
                    f"{owner}: guide {type(guide).__name__} is not replayable: its Delta site "
                    f"{name!r} took a different point when the guide was replayed at its own "
                    "draws, so the point comes from randomness that is no sample site (as in a "
                    "flow guide whose site carries log q). Give the guide a method "
                    "log_prob_at(trace, *args, **kwargs) (see pyro_flowvi.estimators)"
                )
            density = base.log_density
            if torch.is_tensor(density) and density.requires_grad:
                raise ValueError(
                    f"{owner}: guide {type(guide).__name__}'s Delta site {name!r} has a "
                    "log_density that depends on the guide's parameters with the draws held "
                    "fixed, which the replay cannot separate from the draw; give the guide a "
                    "method log_prob_at(trace, *args, **kwargs) (see pyro_flowvi.estimators)"
                )
            continue
        result[name] = site["fn"].log_prob(site["value"])
    return result


def _fixed_value_log_probs(
    owner: str, guide: Callable, trace: Trace, args: tuple, kwargs: dict
) -> dict[str, Tensor]:
    r"""Site name -> :math:`\log q_\phi` of the site's recorded value, values held fixed."""
    if _declares_stl(guide):
        return {}
    hook = getattr(guide, "log_prob_at", None)
    if callable(hook):
        result = hook(trace, *args, **kwargs)
        if not isinstance(result, dict):
            raise TypeError(
                f"{owner}: {type(guide).__name__}.log_prob_at must return a dict from site "
                f"name to tensor, got {type(result).__name__}"
            )
        return result
    if isinstance(guide, AutoGuideList):
        result = {}
        for part in guide:
            result.update(_fixed_value_log_probs(owner, part, trace, args, kwargs))
        return result
    if isinstance(guide, AutoContinuous):
        name = f"_{guide._pyro_name}_latent"
        if name not in trace.nodes:
            raise ValueError(
                f"{owner}: {type(guide).__name__} drew no site {name!r}; an AutoContinuous "
                "guide whose sample_latent differs needs a log_prob_at method"
            )
        latent = trace.nodes[name]["value"].detach()
        posterior = guide.get_posterior(*args, **kwargs)
        try:
            return {name: posterior.log_prob(latent)}
        except (KeyError, NotImplementedError) as error:
            raise ValueError(
                f"{owner}: the posterior of {type(guide).__name__} ({type(posterior).__name__}) "
                f"cannot score a point it did not just draw ({type(error).__name__}: {error}); "
                "its transforms need an inverse (Pyro's planar, radial and Sylvester "
                "transforms have none; pyro-flowvi's layers do)"
            ) from error
        except ValueError as error:  # validation of a non-finite inverse
            raise ValueError(
                f"{owner}: the posterior of {type(guide).__name__} failed to score its own draw "
                f"at site {name!r} with the parameters held fixed: {error}"
            ) from error
    return _replay_log_probs(owner, guide, trace, args, kwargs)


@dataclass
class _Run:
    """One execution of guide and model: one particle, or all of them under the plate."""

    model_trace: Trace
    guide_trace: Trace
    fixed: dict[str, Tensor] | None


class _ReparamELBO(ELBO):
    """Shared machinery of :class:`TraceSTL_ELBO` and :class:`TraceIW_ELBO`."""

    _mode = "stl"

    def __init__(
        self,
        num_particles: int,
        num_bounds: int,
        max_plate_nesting: float,
        vectorize_particles: bool,
        retain_graph: bool | None,
    ) -> None:
        name = type(self).__name__
        for label, value in (("num_particles", num_particles), ("num_bounds", num_bounds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {label} must be an int >= 1, got {value!r}")
        if not (max_plate_nesting == math.inf or isinstance(max_plate_nesting, int)) or (
            isinstance(max_plate_nesting, bool) or max_plate_nesting < 0
        ):
            raise ValueError(
                f"{name}: max_plate_nesting must be an int >= 0 or inf, got {max_plate_nesting!r}"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,  # the particle plate is placed here, not by ELBO
            retain_graph=retain_graph,
        )
        self.vectorize_particles = bool(vectorize_particles)
        self.num_bounds = num_bounds
        self._model_nesting: int | None = (
            None if max_plate_nesting == math.inf else int(max_plate_nesting)
        )

    # ----------------------------------------------------------------------------------------
    # traces

    @property
    def _total_particles(self) -> int:
        return self.num_particles * self.num_bounds

    def _vectorized(self) -> bool:
        return self.vectorize_particles and self._total_particles > 1

    def _model_plate_nesting(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> int:
        """How many plates the model nests (guessed from one run when not given)."""
        if self._model_nesting is None:
            with poutine.block():
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                    *args, **kwargs
                )
            dims = [
                frame.dim
                for trace in (model_trace, guide_trace)
                for _, site in _sample_sites(trace)
                for frame in site["cond_indep_stack"]
                if frame.vectorized and frame.dim is not None
            ]
            self._model_nesting = -min(dims) if dims else 0
        return self._model_nesting

    def _check_guide(self, guide_trace: Trace) -> None:
        name = type(self).__name__
        for site_name, site in _sample_sites(guide_trace):
            if site["is_observed"]:
                continue
            fn = site["fn"]
            if site["infer"].get("enumerate"):
                raise ValueError(
                    f"{name}: guide site {site_name!r} is marked for enumeration; these "
                    "estimators need reparameterized continuous sites (use TraceEnum_ELBO)"
                )
            if is_discrete(fn):
                raise ValueError(
                    f"{name}: guide site {site_name!r} is discrete ({type(fn).__name__}); "
                    "discrete latents are not supported by these estimators: marginalize them "
                    "in the model or use TraceEnum_ELBO / Trace_ELBO"
                )
            if not fn.has_rsample:
                raise ValueError(
                    f"{name}: guide site {site_name!r} ({type(fn).__name__}) is not "
                    "reparameterizable (has_rsample=False); these estimators differentiate "
                    "through the draws"
                )

    def _check_model(self, model_trace: Trace, guide_trace: Trace) -> None:
        name = type(self).__name__
        for site_name, site in _sample_sites(model_trace):
            if site["is_observed"]:
                continue
            if is_discrete(site["fn"]):
                raise ValueError(
                    f"{name}: model site {site_name!r} is a discrete latent "
                    f"({type(site['fn']).__name__}); not supported by these estimators: "
                    "marginalize it in the model or use TraceEnum_ELBO"
                )
            if site_name not in guide_trace.nodes:
                raise ValueError(
                    f"{name}: model site {site_name!r} is latent but the guide does not sample "
                    "it; every latent needs a guide density in log w = log p - log q"
                )

    def _run(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        plate: pyro.plate | None,
        weights: _Weights | None,
        score: bool,
        nesting: float,
    ) -> _Run:
        run_guide = guide if plate is None else plate(guide)
        run_model = model if plate is None else plate(model)
        guide_trace = poutine.trace(run_guide).get_trace(*args, **kwargs)
        self._check_guide(guide_trace)
        inputs = guide_trace
        if weights is not None:
            inputs = guide_trace.copy()
            for site_name, site in _sample_sites(guide_trace):
                value = site["value"]
                if not site["is_observed"] and torch.is_tensor(value) and value.requires_grad:
                    scaled = _ScaleGrad.apply(value, weights, site["fn"].event_dim)
                    inputs.nodes[site_name] = {**site, "value": scaled}
        model_trace = poutine.trace(poutine.replay(run_model, trace=inputs)).get_trace(
            *args, **kwargs
        )
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, nesting)
        self._check_model(model_trace, guide_trace)
        fixed = None
        if score:
            owner = type(self).__name__

            def fixed_log_probs(*a: Any, **k: Any) -> dict[str, Tensor]:
                return _fixed_value_log_probs(owner, guide, guide_trace, a, k)

            run = fixed_log_probs if plate is None else plate(fixed_log_probs)
            fixed = run(*args, **kwargs)
        model_trace = prune_subsample_sites(model_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for _, site in _sample_sites(trace):
                    check_site_shape(site, nesting)
        if fixed is not None:
            for site_name, value in fixed.items():
                site = guide_trace.nodes.get(site_name)
                if site is None or site["type"] != "sample":
                    raise ValueError(
                        f"{type(self).__name__}: the guide scored site {site_name!r}, which it "
                        "did not sample"
                    )
                shape = site["log_prob"].shape
                if not (torch.is_tensor(value) and _broadcasts_to(value.shape, shape)):
                    got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    raise ValueError(
                        f"{type(self).__name__}: the fixed-value log q of guide site "
                        f"{site_name!r} has shape {got}, the site's batch shape is {tuple(shape)}"
                    )
                bad = ~torch.isfinite(value.detach())
                if bool(bad.any()) and bool(torch.isfinite(site["log_prob"].detach()).all()):
                    raise ValueError(
                        f"{type(self).__name__}: log q of guide site {site_name!r} at its own "
                        f"draws, with the parameters held fixed, is not finite at "
                        f"{int(bad.sum())} of {value.numel()} draws although their log q is: "
                        "the guide's inverse (or log_prob_at) failed there, e.g. a flow "
                        "inverse that overflows"
                    )
        return _Run(model_trace, guide_trace, fixed)

    def _get_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Trace, Trace]:
        run = self._run(model, guide, args, kwargs, None, None, False, self.max_plate_nesting)
        return run.model_trace, run.guide_trace

    def _runs(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        weights: list[_Weights] | None,
        score: bool,
    ) -> tuple[list[_Run], int | None]:
        """All particles: one vectorized run, or one run per particle. Returns the runs and
        the particle dimension (``None`` when not vectorized)."""
        if self._vectorized():
            nesting = self._model_plate_nesting(model, guide, args, kwargs) + 1
            plate = pyro.plate(_PARTICLE_PLATE, self._total_particles, dim=-nesting)
            holder = weights[0] if weights else None
            return [self._run(model, guide, args, kwargs, plate, holder, score, nesting)], -nesting
        runs = [
            self._run(
                model,
                guide,
                args,
                kwargs,
                None,
                weights[i] if weights else None,
                score,
                self.max_plate_nesting,
            )
            for i in range(self._total_particles)
        ]
        return runs, None

    # ----------------------------------------------------------------------------------------
    # log weights

    def _kept_dims(self, run: _Run, particle_dim: int | None) -> frozenset[int]:
        """Dimensions that are not summed in a log weight: the particle plate and, for the
        importance-weighted bound, plates around every site of model and guide (then the
        bound factorizes over their elements)."""
        keep = set() if particle_dim is None else {particle_dim}
        if self._mode != "stl":
            stacks = [
                {
                    (frame.name, frame.dim)
                    for frame in site["cond_indep_stack"]
                    if frame.vectorized and frame.dim is not None
                }
                for trace in (run.model_trace, run.guide_trace)
                for _, site in _sample_sites(trace)
            ]
            if stacks:
                keep |= {dim for _, dim in set.intersection(*stacks)}
        return frozenset(keep)

    def _temperature(self, run: _Run, keep: frozenset[int], particle_dim: int | None) -> float:
        """The common scale of every site when the bound factorizes over plate elements (a
        subsampled plate, ``poutine.scale``): the bound is computed per element from unscaled
        log weights and then scaled."""
        if not (keep - {particle_dim}):
            return 1.0
        scales = {}
        for trace in (run.model_trace, run.guide_trace):
            for site_name, site in _sample_sites(trace):
                scale = site["scale"]
                if torch.is_tensor(scale):
                    if scale.numel() != 1:
                        raise ValueError(
                            f"{type(self).__name__}: site {site_name!r} has a tensor scale of "
                            f"shape {tuple(scale.shape)}; a bound per plate element needs one "
                            "scale shared by every site"
                        )
                    scale = scale.item()
                scales[site_name] = float(scale)
        values = set(scales.values())
        if len(values) > 1:
            raise ValueError(
                f"{type(self).__name__}: the importance-weighted bound factorizes over the plate "
                f"elements here, which needs one scale shared by every site; got {scales}"
            )
        return values.pop()

    def _log_terms(
        self, runs: list[_Run], particle_dim: int | None
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        """Stacked ``(log p, log q, pathwise log q, temperature)`` with the particles first."""
        keep = self._kept_dims(runs[0], particle_dim)
        temperature = self._temperature(runs[0], keep, particle_dim)
        rank = max((-d for d in keep), default=0)

        def total(values: Iterator[Tensor], empty: Tensor | None = None) -> Tensor:
            terms = [_reduce(value, keep, rank) for value in values]
            if not terms:
                if empty is None:
                    raise ValueError(f"{type(self).__name__}: the model has no sample site")
                return torch.zeros_like(empty)
            return functools.reduce(operator.add, terms)

        log_p, log_q, log_q_path = [], [], []
        for run in runs:
            lp = total(site["log_prob"] for _, site in _sample_sites(run.model_trace))
            guide_sites = [s for _, s in _sample_sites(run.guide_trace) if not s["is_observed"]]
            lq = total((site["log_prob"] for site in guide_sites), lp)
            path = lq
            if run.fixed:
                nodes = run.guide_trace.nodes
                score = total(
                    (
                        scale_and_mask(value, nodes[name]["scale"], nodes[name]["mask"])
                        for name, value in run.fixed.items()
                    ),
                    lq,
                )
                path = lq - score + score.detach()
            log_p.append(lp)
            log_q.append(lq)
            log_q_path.append(path)
        if particle_dim is None:
            return torch.stack(log_p), torch.stack(log_q), torch.stack(log_q_path), temperature
        return log_p[0], log_q[0], log_q_path[0], temperature

    def _trainable(self, runs: list[_Run]) -> bool:
        return any(
            site["type"] == "param"
            for run in runs
            for trace in (run.model_trace, run.guide_trace)
            for site in trace.nodes.values()
        )

    # ----------------------------------------------------------------------------------------
    # Pyro's ELBO interface

    def _loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Tensor, Tensor | None, bool]:
        raise NotImplementedError

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Tensor:
        """The loss as a tensor whose gradient is this estimator's (for torch optimizers and
        :class:`~pyro.infer.elbo.ELBOModule`)."""
        loss, surrogate, _ = self._loss_and_surrogate(model, guide, args, kwargs)
        warn_if_nan(loss, "loss")
        if surrogate is None:
            return loss
        return loss + (surrogate - surrogate.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Estimate the loss and accumulate this estimator's gradients into ``.grad``.

        Returns:
            The loss (the negative bound estimate) as a float.
        """
        loss, surrogate, trainable = self._loss_and_surrogate(model, guide, args, kwargs)
        if trainable and surrogate is not None and surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        value = loss.item()
        warn_if_nan(value, "loss")
        return value

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Estimate the loss (the negative bound) without gradients."""
        with torch.no_grad():
            value = self._bound(model, guide, args, kwargs)
        warn_if_nan(value, "loss")
        return value

    def _bound(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> float:
        runs, particle_dim = self._runs(model, guide, args, kwargs, None, False)
        log_p, log_q, _, temperature = self._log_terms(runs, particle_dim)
        return -self._value(log_p - log_q, temperature).item()

    def _value(self, log_w: Tensor, temperature: float) -> Tensor:
        raise NotImplementedError

    def _grouped(self, tensor: Tensor) -> Tensor:
        """``(num_bounds * num_particles, ...) -> (num_bounds, num_particles, ...)``."""
        return tensor.reshape((self.num_bounds, self.num_particles) + tensor.shape[1:])


class TraceSTL_ELBO(_ReparamELBO):
    r"""The ELBO with the "sticking the landing" guide gradient, for any reparameterized guide.

    .. math::

        \mathcal L = \mathbb E_{q_\phi}\bigl[\log p_\theta(x, z) - \log q_\phi(z)\bigr],
        \qquad
        \hat\nabla_\phi = \frac1N \sum_{n=1}^N
            \partial_z \bigl[\log p_\theta(x, z) - \log q_{\bar\phi}(z)\bigr]_{z = z_n}
            \partial_\phi z_n,

    with :math:`\bar\phi` the guide parameters held fixed: the surrogate :math:`\log q_\phi(z)
    - \log q_\phi(\bar z) + \mathrm{sg}[\log q_\phi(\bar z)]` (:math:`\bar z` the detached
    draw) has the value of :math:`\log q` and only its pathwise gradient. The dropped score term
    has mean zero, so the estimator is unbiased; at :math:`q = p(z \mid x)` every single-draw
    gradient is zero, where :class:`~pyro.infer.Trace_ELBO`'s is not. The loss value is
    ``Trace_ELBO``'s. The gradients of model parameters are ``Trace_ELBO``'s.

    The score term costs one extra evaluation of :math:`\log q` at the draws per step (for a
    flow guide, one pass through the inverse of its flow); see :mod:`pyro_flowvi.estimators`
    for how it is obtained from each kind of guide.

    Arguments:
        num_particles: draws per step, averaged.
        max_plate_nesting: the model's plate nesting; guessed from one run when not given
            (needed with ``vectorize_particles``).
        vectorize_particles: draw the particles in one pass, inside an outermost plate.
        retain_graph: passed to ``backward``.

    Example:
        >>> svi = SVI(model, AutoIAFGuide(model), pyro.optim.Adam({"lr": 1e-2}),
        ...           loss=TraceSTL_ELBO(num_particles=4, vectorize_particles=True))
        >>> fit(model, guide, data, num_steps=2000, loss=TraceSTL_ELBO())

    References:
        Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
        Inference (Roeder et al., 2017, arXiv 1703.09194)
    """

    _mode = "stl"

    def __init__(
        self,
        num_particles: int = 1,
        *,
        max_plate_nesting: float = math.inf,
        vectorize_particles: bool = False,
        retain_graph: bool | None = None,
    ) -> None:
        super().__init__(num_particles, 1, max_plate_nesting, vectorize_particles, retain_graph)

    def _value(self, log_w: Tensor, temperature: float) -> Tensor:
        return log_w.sum() / self.num_particles

    def _loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Tensor, Tensor | None, bool]:
        runs, particle_dim = self._runs(model, guide, args, kwargs, None, True)
        log_p, log_q, log_q_path, _ = self._log_terms(runs, particle_dim)
        loss = -((log_p - log_q).detach().sum() / self.num_particles)
        surrogate = -((log_p - log_q_path).sum() / self.num_particles)
        return loss, surrogate, self._trainable(runs)


class TraceIW_ELBO(_ReparamELBO):
    r"""The importance-weighted bound with doubly-reparameterized guide gradients.

    With :math:`K` = ``num_particles`` draws :math:`z_k \sim q_\phi` and
    :math:`w_k = p_\theta(x, z_k) / q_\phi(z_k)`,

    .. math::

        \mathcal L_K = \mathbb E\Bigl[\log \frac1K \sum_{k=1}^K w_k\Bigr] \le \log p_\theta(x),

    non-decreasing in :math:`K`, equal to the ELBO at :math:`K = 1`. The loss is minus an
    estimate of :math:`\mathcal L_K`, averaged over ``num_bounds`` independent sets of
    :math:`K` draws. With :math:`\tilde w_k = w_k / \sum_j w_j`:

    - model parameters get the IWAE gradient :math:`\sum_k \tilde w_k\, \partial_\theta \log
      p_\theta(x, z_k)`;
    - guide parameters (``gradient="dreg"``) get the DReG gradient :math:`\sum_k \tilde w_k^2\,
      \partial_{z_k} \bigl[\log p_\theta(x, z_k) - \log q_{\bar\phi}(z_k)\bigr]\, \partial_\phi
      z_k`, unbiased for :math:`\nabla_\phi \mathcal L_K`, whose signal-to-noise ratio grows with
      :math:`K` where the plain IWAE gradient's falls as :math:`K^{-1/2}`; at :math:`q =
      p(z\mid x)` it is exactly zero. ``gradient="iwae"`` gives the plain IWAE gradient
      :math:`\sum_k \tilde w_k \nabla_\phi \log w_k` (as Pyro's ``RenyiELBO(alpha=0)``).

    When every sample site of model and guide lies in a plate (local latents of a VAE), the
    bound factorizes over its elements and is computed per element,
    :math:`\sum_n \log \frac1K \sum_k w_{nk}` (Burda et al.'s per-data-point bound); a
    subsampled plate's scale then multiplies the per-element bounds (it must be shared by
    every site). Otherwise one bound covers all latents, with a subsampled likelihood's scale
    inside :math:`\log w` (an unbiased :math:`\log w`, not an unbiased bound).

    The DReG gradient costs one extra evaluation of :math:`\log q` at the draws (for a flow
    guide, one pass through the inverse of its flow) and a backward pass whose gradient into
    the draws through the model is reweighted; see :mod:`pyro_flowvi.estimators`.

    Arguments:
        num_particles: :math:`K`, the draws inside one bound.
        num_bounds: independent bounds averaged per step (``num_particles * num_bounds`` draws).
        gradient: ``"dreg"`` (default) or ``"iwae"``.
        max_plate_nesting: the model's plate nesting; guessed from one run when not given
            (needed with ``vectorize_particles``).
        vectorize_particles: draw all particles in one pass, inside an outermost plate.
        retain_graph: passed to ``backward``.

    Example:
        >>> loss = TraceIW_ELBO(num_particles=16, vectorize_particles=True)
        >>> svi = SVI(model, AutoIAFGuide(model), pyro.optim.Adam({"lr": 1e-3}), loss=loss)
        >>> fit(model, guide, data, num_steps=2000, loss=loss)

    References:
        Importance Weighted Autoencoders (Burda et al., 2016, arXiv 1509.00519)
        Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives (Tucker et al.,
        2019, arXiv 1810.04152)
        Tighter Variational Bounds are Not Necessarily Better (Rainforth et al., 2018,
        arXiv 1802.04537)
    """

    _mode = "iw"

    def __init__(
        self,
        num_particles: int = 8,
        *,
        num_bounds: int = 1,
        gradient: str = "dreg",
        max_plate_nesting: float = math.inf,
        vectorize_particles: bool = False,
        retain_graph: bool | None = None,
    ) -> None:
        if gradient not in ("dreg", "iwae"):
            raise ValueError(f"TraceIW_ELBO: gradient must be 'dreg' or 'iwae', got {gradient!r}")
        self.gradient = gradient
        super().__init__(
            num_particles, num_bounds, max_plate_nesting, vectorize_particles, retain_graph
        )

    def _value(self, log_w: Tensor, temperature: float) -> Tensor:
        grouped = self._grouped(log_w / temperature)
        bounds = torch.logsumexp(grouped, dim=1) - math.log(self.num_particles)
        return temperature * bounds.sum() / self.num_bounds

    def _loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Tensor, Tensor | None, bool]:
        dreg = self.gradient == "dreg"
        if _any_declares_stl(guide) and not dreg:
            raise ValueError(
                "TraceIW_ELBO: gradient='iwae' needs the full gradient of log q, but the guide "
                "declares stick_the_landing=True; use gradient='dreg' or turn the option off"
            )
        count = 1 if self._vectorized() else self._total_particles
        weights = [_Weights() for _ in range(count)] if dreg else None
        runs, particle_dim = self._runs(model, guide, args, kwargs, weights, dreg)
        log_p, log_q, log_q_path, temperature = self._log_terms(runs, particle_dim)
        log_w = (log_p - log_q).detach()
        loss = -self._value(log_w, temperature)
        grouped = self._grouped(log_w / temperature)
        normalized = torch.softmax(grouped, dim=1).reshape(log_w.shape)
        if dreg:
            if particle_dim is None:
                for holder, weight in zip(weights, normalized, strict=True):
                    holder.value = weight
            else:
                weights[0].value = normalized
            bound = normalized * log_p - normalized.square() * log_q_path
        else:
            bound = normalized * (log_p - log_q)
        surrogate = -(bound.sum() / self.num_bounds)
        return loss, surrogate, self._trainable(runs)
