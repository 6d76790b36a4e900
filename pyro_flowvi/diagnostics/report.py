r"""Did the variational fit work? ELBO, importance-weighted ELBO, PSIS k-hat, IS-ESS and VI-LOO.

All quantities come from the ``sample_stats`` group that
:func:`~pyro_flowvi.diagnostics.to_arviz` writes: for :math:`S` draws
:math:`\theta_s \sim q` with log importance ratios
:math:`\log w_s = \log p(\theta_s, y) - \log q(\theta_s)`,

.. math::

    \mathrm{ELBO} = \frac1S \sum_s \log w_s, \qquad
    \mathrm{IW\text{-}ELBO} = \log \frac1S \sum_s w_s \;(\le \log p(y) \text{ in expectation}),

and the Pareto shape :math:`\hat k` of the right tail of the :math:`w_s` (PSIS). The
approximation is trusted when :math:`\hat k` is below the sample-size dependent threshold
:math:`\min(1 - 1/\log_{10} S, 0.7)`.

:math:`\hat k` is fitted to the :math:`M = \lceil\min(S/5, 3\sqrt S)\rceil` largest ratios
and is noisy: its standard error is about :math:`(1 + \hat k)/\sqrt M` (the asymptotic
standard error of the generalized Pareto shape, Smith 1987), 0.17 at :math:`S = 1000` and
0.09 at :math:`S = 20000` for :math:`\hat k \approx 0.8`. The report gives the 90% interval
:math:`\hat k \pm 1.645\,(1 + \max(\hat k, 0))/\sqrt M` and calls the verdict uncertain
when the interval contains the threshold.

References:
    Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018),
    arXiv:1802.02538.
    Pareto Smoothed Importance Sampling (Vehtari et al., 2024), arXiv:1507.02646.
    Importance Weighted Autoencoders (Burda et al., 2016), arXiv:1509.00519.
    Bayesian Leave-One-Out Cross-Validation for Large Data (Magnusson et al., 2019),
    arXiv:1904.10679.
    Maximum Likelihood Estimation in a Class of Nonregular Cases (Smith, 1985), Biometrika
    72(1); Estimating Tails of Probability Distributions (Smith, 1987), Ann. Statist. 15(3).
"""

from __future__ import annotations

__all__ = [
    "MIN_KHAT_DRAWS",
    "VIDiagnosticWarning",
    "VIDiagnostics",
    "VILoo",
    "khat_interval",
    "khat_threshold",
    "khat_verdict",
    "vi_diagnostics",
    "vi_loo",
]

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import _arviz


class VIDiagnosticWarning(UserWarning):
    """The PSIS k-hat says the variational approximation (or a LOO estimate) is unreliable."""


#: The fewest draws whose k-hat means anything. PSIS fits the Pareto tail to
#: ``min(S/5, 3 sqrt(S))`` ratios, fewer than 5 below 25 draws (ArviZ then returns inf).
MIN_KHAT_DRAWS = 25

# two-sided 90% normal quantile
_Z90 = 1.6448536269514722


def _tail_size(num_draws: int) -> int:
    """Number of largest ratios PSIS fits the generalized Pareto tail to (ArviZ 0.x, Pyro)."""
    return math.ceil(min(0.2 * num_draws, 3.0 * math.sqrt(num_draws)))


def khat_interval(khat: float, num_draws: int) -> tuple[float, float]:
    r"""A 90% interval of a PSIS k-hat from ``num_draws`` draws.

    .. math::

        \hat k \pm 1.645\,\frac{1 + \max(\hat k, 0)}{\sqrt M}, \qquad
        M = \lceil \min(S/5,\, 3\sqrt S) \rceil,

    from the asymptotic standard error :math:`(1 + k)/\sqrt M` of the maximum-likelihood
    generalized Pareto shape fitted to the :math:`M` largest ratios (Smith, 1987); negative
    k-hats get the standard error of :math:`k = 0`. On fitted guides of garch11 and eight
    schools it was 0.86 to 1.45 times the spread of k-hat across disjoint sets of 1000 to
    20000 draws; on garch11 the interval covered the k-hat of all 200000 draws in 83-100%
    of the sets (docs/diagnostics.md).

    Arguments:
        khat: the k-hat.
        num_draws: the number of draws :math:`S` it was fitted from.

    Returns:
        ``(lower, upper)``; ``(khat, khat)`` when k-hat is not finite (equal ratios give
        ``-inf``; fewer than :data:`MIN_KHAT_DRAWS` draws give ``inf``).
    """
    if num_draws < 2:
        raise ValueError(f"khat_interval: need at least 2 draws, got {num_draws}")
    if not math.isfinite(khat):
        return khat, khat
    half = _Z90 * (1.0 + max(khat, 0.0)) / math.sqrt(max(_tail_size(num_draws), 1))
    return khat - half, khat + half


def _draws_to_settle(khat: float, boundary: float) -> int:
    """About how many draws make the 90% interval of ``khat`` clear ``boundary``."""
    gap = abs(khat - boundary)
    if gap == 0.0:
        return 10**9
    tail = (_Z90 * (1.0 + max(khat, 0.0)) / gap) ** 2
    # M = 3 sqrt(S) once S >= 225, M = S / 5 below
    return max(math.ceil((tail / 3.0) ** 2), math.ceil(5.0 * tail))


def khat_threshold(num_draws: int) -> float:
    """The sample-size dependent k-hat threshold ``min(1 - 1/log10(S), 0.7)``.

    Arguments:
        num_draws: the number of draws :math:`S` (at least 2).
    """
    if num_draws < 2:
        raise ValueError(f"khat_threshold: need at least 2 draws, got {num_draws}")
    return min(1.0 - 1.0 / math.log10(num_draws), 0.7)


def khat_verdict(khat: float, num_draws: int) -> tuple[str, str]:
    """Classify a k-hat of the importance ratios of ``num_draws`` draws.

    Fewer than :data:`MIN_KHAT_DRAWS` draws are always ``"too few draws"``: their k-hat is
    not an estimate of anything.

    Returns:
        ``(label, message)`` with ``label`` one of ``"good"``, ``"ok"``, ``"too few draws"``,
        ``"bad"`` and ``"very bad"``, and a sentence saying what it means.
    """
    if num_draws < MIN_KHAT_DRAWS:
        return "too few draws", (
            f"k-hat needs at least {MIN_KHAT_DRAWS} draws (PSIS fits the tail of the largest "
            f"min(S/5, 3 sqrt(S)) ratios), got {num_draws} draws; draw more from the guide "
            "before judging it (10^4 or more for a stable verdict)"
        )
    threshold = khat_threshold(num_draws)
    if khat <= 0.5 and khat < threshold:
        return "good", (
            "the approximation is close to the posterior; importance-weighted estimates are "
            "reliable and plain VI estimates are likely accurate"
        )
    if khat < threshold:
        return "ok", (
            "the approximation is usable but not exact; PSIS-weighted estimates are "
            "reliable, plain VI estimates may be biased"
        )
    if khat < 0.7:
        return "too few draws", (
            f"k-hat is above the threshold {threshold:.2f} for {num_draws} draws but below "
            "0.7; draw more from the guide before judging it"
        )
    if khat <= 1.0:
        return "bad", (
            "the approximation is unreliable: estimates from it, importance-weighted or not, "
            "can be far off; use a more flexible guide, fit longer, or use MCMC"
        )
    return "very bad", (
        "the importance ratios have no finite mean: the approximation misses a large part of "
        "the posterior and nothing computed from it can be trusted"
    )


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


@dataclass(frozen=True)
class VIDiagnostics:
    """The report of :func:`vi_diagnostics`; ``print`` it for a table.

    Attributes:
        elbo: Monte Carlo ELBO at the fitted guide, the mean of ``log_weight``.
        elbo_mcse: its Monte Carlo standard error, ``sd(log_weight) / sqrt(S)``.
        iw_elbo: importance-weighted ELBO ``log mean(exp(log_weight))``, an estimate of the
            log evidence (a lower bound in expectation; close to it when k-hat is small).
        khat: PSIS Pareto shape of the importance ratios.
        khat_threshold: ``min(1 - 1/log10(S), 0.7)``.
        verdict: ``"good"``, ``"ok"``, ``"too few draws"``, ``"bad"`` or ``"very bad"``, from
            the k-hat itself.
        message: what the verdict means, and whether it is uncertain.
        khat_interval: 90% interval of k-hat (:func:`khat_interval`).
        uncertain: whether that interval contains ``khat_threshold``: more draws could turn
            the verdict from reliable to unreliable or back.
        is_ess: importance-sampling effective sample size ``1 / sum(w_s^2)`` of the
            PSIS-smoothed normalized weights.
        num_draws: :math:`S`.
        fit_elbo: mean ELBO of the last 10% of the fit's trace, when the object has one.
        fit_time: wall time of the fit in seconds, when the object has one.
    """

    elbo: float
    elbo_mcse: float
    iw_elbo: float
    khat: float
    khat_threshold: float
    verdict: str
    message: str
    is_ess: float
    num_draws: int
    khat_interval: tuple[float, float] = (math.nan, math.nan)
    uncertain: bool = False
    fit_elbo: float | None = None
    fit_time: float | None = None

    @property
    def reliable(self) -> bool:
        """Whether k-hat is below the threshold."""
        return self.khat < self.khat_threshold

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dictionary."""
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            ("ELBO", f"{self.elbo:.4f} ± {self.elbo_mcse:.4f} (MCSE)"),
            ("IW-ELBO (log evidence estimate)", f"{self.iw_elbo:.4f}"),
            (
                "PSIS k-hat",
                f"{self.khat:.3f}, 90% interval [{self.khat_interval[0]:.2f}, "
                f"{self.khat_interval[1]:.2f}] (threshold {self.khat_threshold:.2f})",
            ),
            (
                "verdict",
                f"{self.verdict}{' (uncertain)' if self.uncertain else ''}: {self.message}",
            ),
            ("IS effective sample size", f"{self.is_ess:.1f} of {self.num_draws}"),
        ]
        if self.fit_elbo is not None:
            rows.append(("ELBO at the end of the fit", f"{self.fit_elbo:.4f}"))
        if self.fit_time is not None:
            rows.append(("fit time", f"{self.fit_time:.2f} s"))
        width = max(len(name) for name, _ in rows)
        lines = ["VI diagnostics", "-" * (width + 40)]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)


def _check_arviz(obj: Any, caller: str) -> None:
    """Raise a TypeError saying what to pass when ``obj`` is not an ArviZ object."""
    if type(obj).__name__ in ("InferenceData", "DataTree"):
        return
    hint = (
        "; convert a guide first: idata = to_arviz(guide, model, *args)"
        if callable(obj)
        else " (the output of pyro_flowvi.diagnostics.to_arviz)"
    )
    raise TypeError(
        f"{caller} takes an ArviZ object (InferenceData or DataTree) with a sample_stats "
        f"group, got {type(obj).__name__}{hint}"
    )


def _log_weights(idata: Any, caller: str) -> np.ndarray:
    """The log importance ratios of the guide's own draws (the proposals, if resampled)."""
    _check_arviz(idata, caller)
    if _arviz.has_group(idata, _arviz.PROPOSALS_GROUP):
        return _arviz.sample_values(idata, _arviz.PROPOSALS_GROUP, "log_weight").reshape(-1)
    try:
        log_weight = _arviz.sample_values(idata, "sample_stats", "log_weight")
    except KeyError as error:
        raise ValueError(
            "vi_diagnostics needs sample_stats.log_weight, as written by "
            f"pyro_flowvi.diagnostics.to_arviz: {error}"
        ) from error
    log_weight = log_weight.reshape(-1)
    if not np.all(np.isfinite(log_weight)):
        bad = int(np.sum(~np.isfinite(log_weight)))
        raise ValueError(f"sample_stats.log_weight has {bad} non-finite values")
    return log_weight


def vi_diagnostics(idata: Any, *, warn: bool = True) -> VIDiagnostics:
    """Summarize how good a variational approximation is, from its importance ratios.

    Arguments:
        idata: the output of :func:`~pyro_flowvi.diagnostics.to_arviz` (any ArviZ object whose
            ``sample_stats`` has ``log_weight``). For importance-resampled draws
            (``to_arviz(..., resample=True)``) the report judges the guide from the log
            weights of all its proposals (group ``vi_proposals``), not from the kept draws.
        warn: emit a :class:`VIDiagnosticWarning` when k-hat is at or above the threshold.

    Returns:
        A :class:`VIDiagnostics` report.
    """
    log_weight = _log_weights(idata, "vi_diagnostics")
    num_draws = log_weight.shape[0]
    smoothed, khat = _arviz.psislw(log_weight)
    khat = float(khat)
    threshold = khat_threshold(num_draws)
    verdict, message = khat_verdict(khat, num_draws)
    interval = khat_interval(khat, num_draws)
    uncertain = num_draws >= MIN_KHAT_DRAWS and interval[0] < threshold <= interval[1]
    if uncertain:
        message = (
            f"uncertain: the 90% interval of k-hat [{interval[0]:.2f}, {interval[1]:.2f}] "
            f"contains the threshold {threshold:.2f}, so another {num_draws} draws could "
            f"give the other verdict; about {_draws_to_settle(khat, 0.7):,} draws would "
            f"settle it. {message[0].upper()}{message[1:]}"
        )
    fit_elbo = fit_time = None
    if _arviz.has_group(idata, _arviz.FIT_GROUP):
        trace = _arviz.sample_values(idata, _arviz.FIT_GROUP, "elbo")
        if trace.size:
            fit_elbo = float(np.mean(trace[-max(1, trace.size // 10) :]))
        fit_time = float(_arviz.group_attrs(idata, _arviz.FIT_GROUP).get("wall_time", math.nan))
    report = VIDiagnostics(
        elbo=float(np.mean(log_weight)),
        elbo_mcse=float(np.std(log_weight, ddof=1) / math.sqrt(num_draws)),
        iw_elbo=float(_logsumexp(log_weight) - math.log(num_draws)),
        khat=khat,
        khat_threshold=threshold,
        verdict=verdict,
        message=message,
        is_ess=float(1.0 / np.sum(np.exp(2.0 * smoothed))),
        num_draws=num_draws,
        khat_interval=interval,
        uncertain=uncertain,
        fit_elbo=fit_elbo,
        fit_time=fit_time,
    )
    if warn and not report.reliable:
        warnings.warn(
            f"PSIS k-hat of the importance ratios is {khat:.2f} >= {threshold:.2f} "
            f"({verdict}): {message} (Yao et al., 2018)",
            VIDiagnosticWarning,
            stacklevel=2,
        )
    return report


@dataclass(frozen=True)
class VILoo:
    """The result of :func:`vi_loo`; ``print`` it for a summary.

    Attributes:
        elpd: PSIS-LOO estimate of the expected log pointwise predictive density.
        se: its standard error.
        p_loo: effective number of parameters, ``lppd - elpd``.
        elpd_i: pointwise elpd, shape of the observations.
        pareto_k: pointwise k-hat, shape of the observations.
        khat_threshold: ``min(1 - 1/log10(S), 0.7)``.
        num_draws: :math:`S`.
        var_name: the log-likelihood variable used.
    """

    elpd: float
    se: float
    p_loo: float
    elpd_i: np.ndarray = field(repr=False)
    pareto_k: np.ndarray = field(repr=False)
    khat_threshold: float
    num_draws: int
    var_name: str

    @property
    def num_bad(self) -> int:
        """Number of observations with k-hat at or above the threshold."""
        return int(np.sum(self.pareto_k >= self.khat_threshold))

    def __str__(self) -> str:
        n = self.pareto_k.size
        return "\n".join(
            [
                f"VI-corrected PSIS-LOO ({self.var_name!r}, {n} observations, "
                f"{self.num_draws} draws)",
                f"elpd_loo  {self.elpd:.2f} ± {self.se:.2f}",
                f"p_loo     {self.p_loo:.2f}",
                f"k-hat >= {self.khat_threshold:.2f}: {self.num_bad} of {n} observations",
            ]
        )


def vi_loo(idata: Any, var_name: str | None = None, *, warn: bool = True) -> VILoo:
    r"""PSIS-LOO cross-validation from draws of a variational approximation.

    The draws come from :math:`q`, not the posterior, so the leave-one-out ratios carry the
    approximation correction of Magnusson et al. (2019):

    .. math::

        \log r_{is} = \log p(\theta_s, y) - \log q(\theta_s) - \log p(y_i \mid \theta_s),

    smoothed by PSIS per observation; then
    :math:`\mathrm{elpd}_i = \log \sum_s \tilde w_{is}\, p(y_i \mid \theta_s)`.

    Arguments:
        idata: the output of :func:`~pyro_flowvi.diagnostics.to_arviz` (needs
            ``sample_stats.log_weight`` and a ``log_likelihood`` group).
        var_name: the log-likelihood variable (default: the only one).
        warn: emit a :class:`VIDiagnosticWarning` when some observations have k-hat at or
            above the threshold.

    Returns:
        A :class:`VILoo`.
    """
    if type(idata).__name__ in ("InferenceData", "DataTree") and _arviz.has_group(
        idata, _arviz.PROPOSALS_GROUP
    ):
        raise ValueError(
            "vi_loo needs the guide's own draws with their importance weights, but this "
            "object holds importance-resampled draws (to_arviz(..., resample=True)); convert "
            "the guide again with resample=False"
        )
    log_weight = _log_weights(idata, "vi_loo")
    names = _arviz.var_names(idata, "log_likelihood")
    if var_name is None:
        if len(names) != 1:
            raise ValueError(f"vi_loo: pass var_name, one of {names}")
        var_name = names[0]
    loglik = _arviz.sample_values(idata, "log_likelihood", var_name)
    num_draws = log_weight.shape[0]
    obs_shape = loglik.shape[2:]
    loglik = loglik.reshape(num_draws, -1).T  # (observations, draws)
    log_ratios = log_weight[None, :] - loglik
    log_ratios = log_ratios - log_ratios.max(axis=1, keepdims=True)
    smoothed, pareto_k = _arviz.psislw(log_ratios)
    elpd_i = _logsumexp(smoothed + loglik)
    lppd_i = _logsumexp(loglik) - math.log(num_draws)
    n = elpd_i.shape[0]
    result = VILoo(
        elpd=float(np.sum(elpd_i)),
        se=float(math.sqrt(n * np.var(elpd_i))),
        p_loo=float(np.sum(lppd_i - elpd_i)),
        elpd_i=elpd_i.reshape(obs_shape),
        pareto_k=np.asarray(pareto_k).reshape(obs_shape),
        khat_threshold=khat_threshold(num_draws),
        num_draws=num_draws,
        var_name=var_name,
    )
    if warn and result.num_bad:
        warnings.warn(
            f"vi_loo: {result.num_bad} of {n} observations have k-hat >= "
            f"{result.khat_threshold:.2f}; their elpd estimates are unreliable",
            VIDiagnosticWarning,
            stacklevel=2,
        )
    return result
