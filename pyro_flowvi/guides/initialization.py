r"""Where a flow guide starts: Gaussian starts measured from a log density.

Every function takes ``log_density``, a callable that maps one point :math:`z \in \mathbb R^D`
(a 1-D tensor) to the scalar :math:`\log p(z)` up to a constant, e.g. a model's log joint in
unconstrained coordinates (:func:`model_log_density` builds it from a Pyro model). They
are used by :class:`~pyro_flowvi.AutoFlowGuide` (``init_scale``) and by the benchmarks.

- :func:`curvature_scale`: the diagonal start, :math:`\sigma_i = 1/\sqrt{-H_{ii}}`.
- :func:`find_mode` and :func:`laplace_scale_tril`: the Laplace start, :math:`N(\hat z,
  (-H)^{-1})` at the mode :math:`\hat z`.
- :func:`gaussian_elbo`: the ELBO of a Gaussian start from a fixed set of draws, which
  :func:`initial_gaussian` uses to choose between the two.

Nothing here touches the global random state: draws and probes come from seeded generators.
Every computation runs with gradients enabled, whatever the caller's grad mode.
"""

from __future__ import annotations

__all__ = [
    "GaussianStart",
    "curvature_scale",
    "find_mode",
    "gaussian_elbo",
    "hessian",
    "initial_gaussian",
    "laplace_scale_tril",
    "model_log_density",
]

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from torch import Tensor

LogDensity = Callable[[Tensor], Tensor]

# Bounds of the curvature scale, the scale where the log density is not concave, and how the
# Hessian diagonal is computed.
MIN_SCALE = 1e-4
MAX_DIAG_SCALE = 5.0  # at an arbitrary start, a weakly curved coordinate starts no wider
MAX_FULL_SCALE = 1e3  # at the mode, a weakly curved direction is the posterior's
FALLBACK_SCALE = 0.1
EXACT_CURVATURE_DIM = 256
HUTCHINSON_PROBES = 64
MODE_MAX_ITER = 200
START_ELBO_DRAWS = 64


def model_log_density(
    model: Callable,
    unpack: Callable[[Tensor], Iterable[tuple[dict, Tensor]]],
    args: tuple,
    kwargs: dict,
) -> LogDensity:
    r"""The log joint of ``model`` in unconstrained coordinates, as a function of one point.

    .. math::

        \log p(\text{data}, T(z)) + \log |\det \partial T / \partial z|

    Arguments:
        model: a Pyro model, run as given (conditioned on the latent values; its own random
            draws, if any, are not replayed).
        unpack: maps a packed point ``z`` of shape ``(D,)`` to ``(site, unconstrained value)``
            pairs, each site a prototype-trace node with ``"name"`` and ``"fn"`` (as
            ``AutoContinuous._unpack_latent`` does).
        args, kwargs: the model's arguments.
    """

    def log_density(z: Tensor) -> Tensor:
        values = {}
        log_det = z.new_zeros(())
        for site, unconstrained in unpack(z):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            values[site["name"]] = value
            log_det = log_det + transform.log_abs_det_jacobian(unconstrained, value).sum()
        conditioned = poutine.condition(model, data=values)
        trace = poutine.block(poutine.trace(conditioned).get_trace)(*args, **kwargs)
        return trace.log_prob_sum() + log_det

    return log_density


@dataclass(frozen=True)
class GaussianStart:
    """A starting Gaussian: ``kind`` is ``"diag"`` (``scale`` a float or a ``(D,)`` tensor of
    standard deviations) or ``"full"`` (``scale`` a lower-triangular ``(D, D)`` factor)."""

    kind: str
    loc: Tensor
    scale: float | Tensor


@torch.enable_grad()
def hessian(log_density: LogDensity, loc: Tensor, diagonal: bool = False) -> Tensor | None:
    """The Hessian of ``log_density`` at ``loc`` (or only its diagonal).

    The full Hessian takes one backward pass per coordinate. The diagonal is exact up to 256
    coordinates and above that Hutchinson's estimate :math:`E[v \\odot Hv]` with 64 Rademacher
    probes (a seeded generator). ``None`` where the log density is not finite or not twice
    differentiable at ``loc``.
    """
    z = loc.detach().clone().requires_grad_(True)
    value = log_density(z)
    if not value.requires_grad or not torch.isfinite(value):
        return None
    (grad,) = torch.autograd.grad(value, z, create_graph=True)
    if not grad.requires_grad:  # linear log density: no curvature anywhere
        return None
    dim = z.numel()
    if not diagonal or dim <= EXACT_CURVATURE_DIM:
        rows = []
        for i in range(dim):
            (row,) = torch.autograd.grad(grad[i], z, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(z) if row is None else row)
        full = torch.stack(rows).detach()
        return full.diagonal() if diagonal else full
    gen = torch.Generator(device=z.device).manual_seed(0)
    diag = torch.zeros_like(z)
    for _ in range(HUTCHINSON_PROBES):
        probe = torch.randint(0, 2, z.shape, generator=gen, device=z.device)
        probe = (2 * probe - 1).to(z.dtype)
        (hvp,) = torch.autograd.grad(grad, z, probe, retain_graph=True)
        diag = diag + probe * hvp / HUTCHINSON_PROBES
    return diag.detach()


def curvature_scale(log_density: LogDensity, loc: Tensor) -> Tensor:
    r"""Per-coordinate scale :math:`1/\sqrt{-H_{ii}}` from the Hessian diagonal at ``loc``.

    This is the spread of the conditional Laplace approximation of each coordinate: never wider
    than the posterior's marginal spread where the log density is Gaussian, and of the right
    order where it is not. Starting there saves the flow layers from having to learn the
    posterior's scale (a base that starts far too narrow lets the flow's gates saturate while
    the scale grows). Clipped to ``[1e-4, 5]``; 0.1 where :math:`H_{ii} \ge 0` or is not finite.
    """
    fallback = torch.full_like(loc, FALLBACK_SCALE).detach()
    diag = hessian(log_density, loc, diagonal=True)
    if diag is None:
        return fallback
    good = torch.isfinite(diag) & (diag < 0)
    scale = (-diag).clamp_min(torch.finfo(loc.dtype).tiny).rsqrt()
    scale = scale.clamp(MIN_SCALE, MAX_DIAG_SCALE)
    return torch.where(good, scale, fallback)


@torch.enable_grad()
def find_mode(
    log_density: LogDensity, loc: Tensor, max_iter: int = MODE_MAX_ITER
) -> tuple[Tensor, bool]:
    """Maximize ``log_density`` from ``loc`` with L-BFGS (strong Wolfe line search, at most
    ``max_iter`` iterations).

    Returns:
        ``(mode, found)``. ``found`` is True when the search ended at a finite point, no worse
        than ``loc``, whose gradient is below ``1e-3 * max(1, |log density|)`` in every
        coordinate. Otherwise (no maximum, as in a funnel; a non-finite trial point;
        ``max_iter`` spent) it is False and ``mode`` is ``loc``.
    """
    start = loc.detach().clone()
    z = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [z], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_change=1e-12
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = -log_density(z)
        if loss.requires_grad:
            loss.backward()
        return loss

    with torch.no_grad():
        before = log_density(start)
    try:
        optimizer.step(closure)
        mode = z.detach().clone().requires_grad_(True)
        after = log_density(mode)
        (grad,) = torch.autograd.grad(after, mode, allow_unused=True)
    except (RuntimeError, ValueError):  # a non-finite or out-of-support trial point
        return start, False
    if grad is None:
        grad = torch.zeros_like(mode)
    after = after.detach()
    tolerance = 1e-3 * max(1.0, abs(after.item())) if torch.isfinite(after) else 0.0
    found = (
        bool(torch.isfinite(mode).all())
        and bool(torch.isfinite(after))
        and bool(after >= before)
        and bool(grad.abs().max() <= tolerance)
    )
    return (mode.detach(), True) if found else (start, False)


def laplace_scale_tril(log_density: LogDensity, loc: Tensor) -> tuple[Tensor, bool]:
    r"""Cholesky factor :math:`L` of :math:`(-H)^{-1}` at ``loc`` (the covariance of the Laplace
    approximation there), and whether :math:`-H` is positive definite (a maximum).

    :math:`-H` is made positive definite in its eigenbasis: each eigenvalue :math:`\lambda`
    becomes a variance :math:`1/\lambda` with its scale clipped to ``[1e-4, 1e3]``, and a
    direction with :math:`\lambda \le 0` gets scale 0.1.
    """
    dim = loc.numel()
    eye = torch.eye(dim, dtype=loc.dtype, device=loc.device)
    full = hessian(log_density, loc)
    if full is None or not bool(torch.isfinite(full).all()):
        return FALLBACK_SCALE * eye, False
    precision = -0.5 * (full + full.T)
    eigenvalues, vectors = torch.linalg.eigh(precision)
    scales = eigenvalues.clamp_min(torch.finfo(loc.dtype).tiny).rsqrt()
    scales = scales.clamp(MIN_SCALE, MAX_FULL_SCALE)
    scales = torch.where(eigenvalues > 0, scales, torch.full_like(scales, FALLBACK_SCALE))
    is_max = bool((eigenvalues > 0).all())
    covariance = (vectors * scales**2) @ vectors.T
    covariance = 0.5 * (covariance + covariance.T)
    tril, info = torch.linalg.cholesky_ex(covariance)
    if int(info) != 0:  # rounding at a condition number beyond 1e16
        return torch.diag(covariance.diagonal().sqrt()), is_max
    return tril, is_max


@torch.no_grad()
def gaussian_elbo(
    log_density: LogDensity, loc: Tensor, scale_tril: Tensor, num_draws: int = START_ELBO_DRAWS
) -> float:
    """ELBO of ``N(loc, L L^T)`` from ``num_draws`` fixed draws (a seeded generator); ``-inf``
    if any draw has a non-finite log density."""
    gen = torch.Generator(device=loc.device).manual_seed(0)
    eps = torch.randn((num_draws, loc.numel()), generator=gen, device=loc.device, dtype=loc.dtype)
    draws = loc + eps @ scale_tril.T
    values = torch.stack([log_density(z) for z in draws])
    if not bool(torch.isfinite(values).all()):
        return -math.inf
    entropy = 0.5 * loc.numel() * math.log(2 * math.pi * math.e)
    entropy += scale_tril.diagonal().log().sum().item()
    return values.mean().item() + entropy


def initial_gaussian(
    log_density: LogDensity,
    init_loc: Tensor,
    init_scale: float | str,
    *,
    pinned: bool = False,
    noisy: bool = False,
) -> GaussianStart:
    """The Gaussian a flow guide starts from (its ``init_scale`` option).

    Arguments:
        log_density: the unconstrained log joint.
        init_loc: the ``init_loc_fn`` location, shape ``(D,)``.
        init_scale: a number (every scale equal to it, at ``init_loc``), ``"diag"``
            (:func:`curvature_scale` at ``init_loc``), ``"full"`` (the Laplace approximation at
            the mode :func:`find_mode` reaches from ``init_loc``) or ``"auto"``: ``"full"`` if a
            maximum is found and that start has the higher :func:`gaussian_elbo`, else
            ``"diag"``; ``"diag"`` alone above 256 dimensions or when ``noisy``.
        pinned: keep the start centred at ``init_loc`` (the user gave the values): ``"full"``
            and ``"auto"`` take the curvature there instead of searching the mode.
        noisy: the log density is a noisy estimate (a subsampled plate): no mode search.
    """
    if not isinstance(init_scale, str):
        return GaussianStart("diag", init_loc, float(init_scale))
    choice = init_scale
    if choice == "auto" and (init_loc.numel() > EXACT_CURVATURE_DIM or noisy):
        choice = "diag"
    if choice in ("auto", "diag"):
        diag = GaussianStart("diag", init_loc, curvature_scale(log_density, init_loc))
        if choice == "diag":
            return diag
    if pinned:
        mode, found = init_loc, True
    else:
        mode, found = find_mode(log_density, init_loc)
    if choice == "auto" and not found:  # no mode, no Laplace approximation: it would mislead
        return diag
    tril, is_max = laplace_scale_tril(log_density, mode)
    full = GaussianStart("full", mode, tril)
    if choice == "full":
        return full
    if not is_max:  # a saddle or a flat direction at the point L-BFGS stopped
        return diag
    diag_elbo = gaussian_elbo(log_density, diag.loc, torch.diag(diag.scale))
    full_elbo = gaussian_elbo(log_density, full.loc, full.scale)
    return full if full_elbo > diag_elbo else diag
