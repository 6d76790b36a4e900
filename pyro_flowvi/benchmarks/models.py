r"""Pyro versions of six posteriordb models, written from the Stan programs' descriptions.

Each model takes its data as positional arguments (tensors, as built by
:func:`pyro_flowvi.benchmarks.load`) and puts every conditionally independent observation in a
``pyro.plate`` at ``dim=-1``, so that pointwise log-likelihoods (for LOO) are available and the
models can be vectorized over draws by an outer plate at ``dim=-2`` (which is what
:func:`pyro_flowvi.diagnostics.to_arviz` does). Global vector parameters are sampled with
``to_event(1)``; their products with data go through :func:`rowdot`, which keeps the trailing
batch dimension aligned with the data plate.

"Flat" priors of the Stan programs are :class:`pyro.distributions.ImproperUniform` on the stated
support. Pyro cannot sample those, so autoguides need an ``init_loc_fn`` that does not sample
them: use :func:`init_to_median_or_feasible`.

References:
    posteriordb: a set of posteriors for Bayesian inference and probabilistic programming
    (Magnusson et al., 2023), https://github.com/stan-dev/posteriordb, arXiv:2407.04967.
"""

from __future__ import annotations

__all__ = [
    "arK",
    "diamonds",
    "eight_schools_centered",
    "garch11",
    "garch11_variance",
    "gp_pois_regr",
    "init_to_median_or_feasible",
    "kilpisjarvi",
    "rowdot",
]

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor
from torch.distributions import transform_to


def init_to_median_or_feasible(site: dict[str, Any] | None = None) -> Any:
    """Initialize flat (improper) sites at the feasible point, every other site at its median.

    :class:`~pyro.distributions.ImproperUniform` cannot be sampled, so Pyro's
    ``init_to_median`` and ``init_to_feasible`` both fail on it. This strategy maps an
    unconstrained zero through ``transform_to(support)`` for those sites and defers to
    ``init_to_median`` everywhere else.

    Arguments:
        site: a Pyro sample-site message (``None`` returns the strategy itself, following the
            convention of ``pyro.infer.autoguide.initialization``).

    Returns:
        The initial value of the site, on the constrained scale.
    """
    if site is None:
        return init_to_median_or_feasible
    fn = site["fn"]
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, dist.ImproperUniform):
        shape = site["fn"].batch_shape + site["fn"].event_shape
        unconstrained = torch.zeros(shape, dtype=torch.get_default_dtype())
        value = transform_to(site["fn"].support)(unconstrained).detach()
        value._pyro_custom_init = False
        return value
    return init_to_median(site)


def _flat(support: constraints.Constraint) -> dist.ImproperUniform:
    return dist.ImproperUniform(support, (), ())


def rowdot(X: Tensor, b: Tensor) -> Tensor:
    """Return ``X @ b`` for a data matrix ``X`` of shape ``(N, K)`` and batched ``b``.

    Arguments:
        X: data, shape ``(N, K)``.
        b: coefficients, shape ``(K,)`` or ``(..., 1, K)`` when vectorized over draws (the
            trailing batch dimension of size one lines up with the data plate at ``dim=-1``).

    Returns:
        Shape ``(N,)`` or ``(..., N)``.
    """
    out_shape = torch.broadcast_shapes(b.shape[:-1], X.shape[:1])
    return torch.matmul(b, X.transpose(-1, -2)).reshape(out_shape)


def eight_schools_centered(sigma: Tensor, y: Tensor | None = None) -> None:
    r"""Eight schools, centred parameterization (a funnel between ``tau`` and ``theta``).

    .. math::

        \mu \sim N(0, 5),\quad \tau \sim \mathrm{HalfCauchy}(5),\quad
        \theta_j \sim N(\mu, \tau),\quad y_j \sim N(\theta_j, \sigma_j).

    Arguments:
        sigma: known standard errors, shape ``(J,)``.
        y: observed effects, shape ``(J,)`` (``None`` samples them).
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def kilpisjarvi(
    x: Tensor,
    y: Tensor | None,
    pmualpha: float,
    psalpha: float,
    pmubeta: float,
    psbeta: float,
) -> None:
    r"""Linear trend of summer temperatures at Kilpisjärvi (``corr(alpha, beta) ~ -0.99999``).

    .. math::

        \alpha \sim N(\mu_\alpha, s_\alpha),\quad \beta \sim N(\mu_\beta, s_\beta),\quad
        \sigma \propto 1 \text{ on } (0, \infty),\quad y_n \sim N(\alpha + \beta x_n, \sigma).

    Arguments:
        x: years, shape ``(N,)``; not centred, hence the extreme correlation.
        y: temperatures, shape ``(N,)``.
        pmualpha: prior mean of ``alpha``.
        psalpha: prior sd of ``alpha``.
        pmubeta: prior mean of ``beta``.
        psbeta: prior sd of ``beta``.
    """
    alpha = pyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = pyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = pyro.sample("sigma", _flat(constraints.positive))
    with pyro.plate("year", x.shape[-1]):
        pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def diamonds(Xc: Tensor, Y: Tensor | None = None) -> None:
    r"""Log price of diamonds on 24 centred predictors (ill-conditioned design).

    .. math::

        b_k \sim N(0, 1),\quad \mathrm{Intercept} \sim t_3(8, 10),\quad
        \sigma \sim t_3^{+}(0, 10),\quad Y \sim N(\mathrm{Intercept} + X_c b, \sigma).

    Arguments:
        Xc: centred predictors without the intercept column, shape ``(N, K - 1)``.
        Y: log prices, shape ``(N,)``.
    """
    b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([Xc.shape[-1]]).to_event(1))
    intercept = pyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    sigma = pyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0.0, 10.0)))
    mean = intercept + rowdot(Xc, b)
    with pyro.plate("obs", Xc.shape[0]):
        pyro.sample("Y", dist.Normal(mean, sigma), obs=Y)


def gp_pois_regr(x: Tensor, k: Tensor | None = None) -> None:
    r"""Latent Gaussian process with Poisson counts, non-centred in ``f``.

    .. math::

        \rho \sim \mathrm{Gamma}(25, 4),\quad \alpha \sim \mathrm{HalfNormal}(2),\quad
        \tilde f_n \sim N(0, 1),\quad f = \mathrm{chol}(K)\,\tilde f,\quad
        k_n \sim \mathrm{Poisson}(e^{f_n}),

    with :math:`K_{ij} = \alpha^2 \exp(-(x_i - x_j)^2 / (2\rho^2)) + 10^{-10}\delta_{ij}`.
    ``f`` is recorded as a deterministic site (the reference draws carry ``f``, not
    ``f_tilde``). Run it in float64: in float32 the Cholesky factor of a kernel this smooth
    fails.

    Arguments:
        x: inputs, shape ``(N,)``.
        k: counts, shape ``(N,)``.
    """
    n = x.shape[-1]
    rho = pyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(2.0))
    point = pyro.plate("point", n)
    with point:
        f_tilde = pyro.sample("f_tilde", dist.Normal(0.0, 1.0))
    sq_dist = (x.unsqueeze(-1) - x.unsqueeze(-2)) ** 2
    rho = rho.unsqueeze(-1)
    alpha = alpha.unsqueeze(-1)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    cov = alpha**2 * torch.exp(-sq_dist / (2 * rho**2)) + 1e-10 * eye
    f = (torch.linalg.cholesky(cov) @ f_tilde.unsqueeze(-1)).squeeze(-1)
    f = pyro.deterministic("f", f)
    with point:
        pyro.sample("k", dist.Poisson(f.exp()), obs=k)


def garch11_variance(
    y: Tensor, sigma1: float | Tensor, mu: Tensor, alpha0: Tensor, alpha1: Tensor, beta1: Tensor
) -> Tensor:
    r"""Conditional variances of the GARCH(1, 1) recursion, for all times at once.

    With :math:`s_1 = \sigma_1^2` and :math:`s_t = c_t + \beta_1 s_{t-1}`,
    :math:`c_t = \alpha_0 + \alpha_1 (y_{t-1} - \mu)^2`, the solution
    :math:`s_t = \beta_1^{t-1} \sum_{j \le t} \beta_1^{-(j-1)} d_j` (``d_1 = s_1``,
    ``d_j = c_j``) is evaluated in log space with ``logcumsumexp``: one vectorized pass
    instead of a Python loop over ``T``.

    Arguments:
        y: series, shape ``(T,)``.
        sigma1: the initial standard deviation.
        mu, alpha0, alpha1, beta1: parameters, shape ``()`` or ``(..., 1)``.

    Returns:
        The variances :math:`\sigma_t^2`, shape ``(T,)`` or ``(..., T)``.
    """
    c = alpha0 + alpha1 * (y[:-1] - mu) ** 2
    s1 = torch.as_tensor(sigma1, dtype=c.dtype, device=c.device) ** 2
    d = torch.cat([s1.expand(c.shape[:-1] + (1,)), c], dim=-1)
    t = torch.arange(d.shape[-1], dtype=d.dtype, device=d.device)
    # beta1 > 0 in exact arithmetic; the clamp keeps 0 * log(0) out of the j = 1 term.
    log_b = torch.log(beta1).clamp(min=-700.0)
    return torch.exp(t * log_b + torch.logcumsumexp(torch.log(d) - t * log_b, dim=-1))


def garch11(y: Tensor | None, sigma1: float) -> None:
    r"""GARCH(1, 1) volatility model with flat priors and a nested constraint.

    .. math::

        \mu \propto 1,\ \alpha_0 \propto 1 \text{ on } (0, \infty),\
        \alpha_1 \propto 1 \text{ on } (0, 1),\ \beta_1 \propto 1 \text{ on } (0, 1 - \alpha_1),
        \quad y_t \sim N(\mu, \sigma_t).

    Autoguides fix each site's support when they are built, so a support that depends on
    ``alpha1`` cannot be sampled directly. The model samples ``beta1_unit`` flat on
    ``(0, 1)``, sets ``beta1 = (1 - alpha1) * beta1_unit`` (a deterministic site) and adds the
    log-Jacobian ``log(1 - alpha1)``, which leaves the posterior of
    ``(mu, alpha0, alpha1, beta1)`` exactly that of the Stan program.

    Arguments:
        y: series, shape ``(T,)``; required (the flat priors cannot be sampled).
        sigma1: the initial standard deviation.
    """
    if y is None:
        raise ValueError("garch11: y is required (its flat priors cannot be sampled), got None")
    mu = pyro.sample("mu", _flat(constraints.real))
    alpha0 = pyro.sample("alpha0", _flat(constraints.positive))
    alpha1 = pyro.sample("alpha1", _flat(constraints.unit_interval))
    beta1_unit = pyro.sample("beta1_unit", _flat(constraints.unit_interval))
    beta1 = pyro.deterministic("beta1", (1.0 - alpha1) * beta1_unit)
    pyro.factor("beta1_log_jacobian", torch.log1p(-alpha1))
    sigma = garch11_variance(y, sigma1, mu, alpha0, alpha1, beta1).sqrt()
    with pyro.plate("time", y.shape[-1]):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def arK(y: Tensor, K: int) -> None:
    r"""Autoregressive model of order ``K``.

    .. math::

        \alpha \sim N(0, 10),\quad \beta_k \sim N(0, 10),\quad
        \sigma \sim \mathrm{HalfCauchy}(2.5),\quad
        y_t \sim N\Big(\alpha + \sum_{k=1}^K \beta_k y_{t-k}, \sigma\Big),\ t > K.

    Arguments:
        y: series, shape ``(T,)``; the first ``K`` values only condition.
        K: the order.
    """
    if isinstance(K, bool) or not isinstance(K, int) or K < 1 or K >= y.shape[-1]:
        raise ValueError(f"arK: K must be an int in [1, {y.shape[-1] - 1}], got {K!r}")
    T = y.shape[-1]
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([K]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    # lags[i, k] = y[K + i - (k + 1)], the value k + 1 steps before time K + i
    lags = torch.stack([y[K - k - 1 : T - k - 1] for k in range(K)], dim=-1)
    with pyro.plate("time", T - K):
        pyro.sample("y", dist.Normal(alpha + rowdot(lags, beta), sigma), obs=y[K:])
