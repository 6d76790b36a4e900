r"""Compare several variational approximations, with or without reference posterior draws.

:func:`compare_approximations` returns one row per approximation: the diagnostics of
:func:`~pyro_flowvi.diagnostics.vi_diagnostics` and the fit time, and, given reference draws,
the error of every posterior mean and standard deviation in reference-sd units and two
Wasserstein distances on the reference-standardized scale (each parameter minus its reference
mean, over its reference sd):

- ``w1_marginal``: the 1-D Wasserstein-1 distance of each parameter's marginal, computed
  exactly from all draws, averaged over parameters;
- ``wasserstein``: the multivariate Wasserstein-1 distance (Euclidean cost) between random
  subsamples of ``wasserstein_draws`` draws from each side, solved exactly as an assignment
  problem. Being computed on subsamples, it has a positive floor even for two samples of the
  same distribution (about :math:`n^{-1/d}` in :math:`d` dimensions); compare it across rows,
  or against :func:`wasserstein_distance` between two halves of the reference.
"""

from __future__ import annotations

__all__ = [
    "compare_approximations",
    "flatten_draws",
    "marginal_wasserstein",
    "wasserstein_distance",
]

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import _arviz
from ._checks import check_model_call, options
from ._draws import constant_columns, flatten_draws, is_arviz, reference_arrays
from .convert import to_arviz
from .report import vi_diagnostics

# an approximation agrees with such a constant up to float32 rounding of a transform
_AGREE_TOL = 1e-5


def marginal_wasserstein(x: np.ndarray, y: np.ndarray) -> float:
    """Exact 1-D Wasserstein-1 distance between two samples (equal weights per draw).

    Computed as :math:`\\int |F_x(t) - F_y(t)|\\,dt` over the merged sorted values.
    """
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())
    y = np.sort(np.asarray(y, dtype=np.float64).ravel())
    values = np.sort(np.concatenate([x, y]))
    deltas = np.diff(values)
    cdf_x = np.searchsorted(x, values[:-1], side="right") / x.size
    cdf_y = np.searchsorted(y, values[:-1], side="right") / y.size
    return float(np.sum(np.abs(cdf_x - cdf_y) * deltas))


def wasserstein_distance(
    x: np.ndarray, y: np.ndarray, *, num_draws: int = 1000, seed: int = 0
) -> float:
    """Exact multivariate Wasserstein-1 distance between random subsamples of two samples.

    Arguments:
        x: draws, shape ``(N, P)``.
        y: draws, shape ``(M, P)``.
        num_draws: the subsample size ``n = min(num_draws, N, M)`` taken from each side.
        seed: seed of the subsampling.

    Returns:
        The mean Euclidean distance of the optimal one-to-one matching of the subsamples
        (``scipy.optimize.linear_sum_assignment``).
    """
    from scipy.optimize import linear_sum_assignment

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"wasserstein_distance: need (N, P) and (M, P), got {x.shape}, {y.shape}")
    rng = np.random.default_rng(seed)
    n = min(num_draws, x.shape[0], y.shape[0])
    xs = x[rng.choice(x.shape[0], n, replace=False)]
    ys = y[rng.choice(y.shape[0], n, replace=False)]
    sq = (xs**2).sum(1)[:, None] + (ys**2).sum(1)[None, :] - 2.0 * xs @ ys.T
    cost = np.sqrt(np.maximum(sq, 0.0))
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _reference_metrics(
    name: str,
    idata: Any,
    reference: dict[str, np.ndarray],
    per_parameter: bool,
    wasserstein_draws: int,
    seed: int,
) -> tuple[dict[str, float], dict[str, float]]:
    posterior = set(_arviz.var_names(idata, "posterior"))
    missing = [n for n in reference if n not in posterior]
    if missing:
        raise ValueError(
            f"the approximation {name!r} has no posterior variables {missing} that the "
            f"reference has; it has {sorted(posterior)}"
        )
    approx = {n: _arviz.sample_values(idata, "posterior", n) for n in reference}
    for var in reference:
        if approx[var].shape[2:] != reference[var].shape[2:]:
            raise ValueError(
                f"posterior variable {var!r} of {name!r} has shape {approx[var].shape[2:]}, "
                f"the reference has {reference[var].shape[2:]}"
            )
    ref, labels = flatten_draws(reference)
    q, _ = flatten_draws(approx, list(reference))
    constant = constant_columns(ref)
    skipped = {}
    for j in np.flatnonzero(constant):
        value = float(ref[0, j])
        deviation = float(np.max(np.abs(q[:, j] - value)))
        if deviation > _AGREE_TOL * max(1.0, abs(value)):
            raise ValueError(
                f"compare_approximations: the approximation {name!r} moves {labels[j]} by up "
                f"to {deviation:.3g}, where the reference draws are constant ({value:g}); "
                "they do not describe the same parameter"
            )
        skipped[labels[j]] = value
    if np.all(constant):
        raise ValueError(f"all reference components {labels} are constant: nothing to compare")
    keep = ~constant
    ref, q = ref[:, keep], q[:, keep]
    labels = [label for label, k in zip(labels, keep, strict=True) if k]
    ref_mean, ref_sd = ref.mean(0), ref.std(0, ddof=1)
    mean_err = np.abs(q.mean(0) - ref_mean) / ref_sd
    sd_err = np.abs(q.std(0, ddof=1) - ref_sd) / ref_sd
    z_ref = (ref - ref_mean) / ref_sd
    z_q = (q - ref_mean) / ref_sd
    row = {
        "num_params": len(labels),
        "mean_err_max": float(mean_err.max()),
        "mean_err_avg": float(mean_err.mean()),
        "sd_err_max": float(sd_err.max()),
        "w1_marginal": float(
            np.mean([marginal_wasserstein(z_q[:, j], z_ref[:, j]) for j in range(len(labels))])
        ),
        "wasserstein": wasserstein_distance(z_q, z_ref, num_draws=wasserstein_draws, seed=seed),
    }
    if per_parameter:
        row.update({f"mean_err[{lab}]": float(e) for lab, e in zip(labels, mean_err, strict=True)})
        row.update({f"sd_err[{lab}]": float(e) for lab, e in zip(labels, sd_err, strict=True)})
    return row, skipped


def compare_approximations(
    approximations: Mapping[str, Any],
    model: Callable | None = None,
    *args: Any,
    reference: Any | None = None,
    num_draws: int = 2000,
    fit_results: Mapping[str, Any] | None = None,
    per_parameter: bool = False,
    wasserstein_draws: int = 1000,
    seed: int = 0,
    resample: bool | str = False,
    num_proposals: int | None = None,
    **kwargs: Any,
) -> Any:
    """Tabulate the quality of several approximations of one posterior.

    Arguments:
        approximations: ``{name: guide or ArviZ object}``. Guides (any Pyro guide) are
            converted with :func:`~pyro_flowvi.diagnostics.to_arviz`; ArviZ objects must hold
            what ``to_arviz`` writes.
        model: the model, needed when some approximation is a guide.
        *args: positional arguments of the model and guides.
        reference: reference posterior draws: an ArviZ object with a ``posterior`` group, a
            :class:`~pyro_flowvi.benchmarks.ReferencePosterior`, or
            ``{name: array (chain, draw, *shape)}``. Every reference variable must be a
            posterior variable of each approximation.
        num_draws: draws per guide.
        fit_results: ``{name: FitResult}`` for guides, to report their fit time.
        per_parameter: add one ``mean_err[...]`` and one ``sd_err[...]`` column per scalar
            parameter.
        wasserstein_draws: subsample size of the multivariate Wasserstein distance.
        seed: seed of that subsampling.
        resample: convert guides with PSIS importance resampling
            (``to_arviz(..., resample=True)``): the reference metrics then score the
            resampled draws, while ``khat`` and the other diagnostics judge the guide's
            proposals.
        num_proposals: proposals per guide when resampling (default ``10 * num_draws``).
        **kwargs: keyword arguments of the model and guides.

    Returns:
        A :class:`pandas.DataFrame` indexed by name with columns ``elbo``, ``elbo_mcse``,
        ``iw_elbo``, ``khat``, ``khat_lo`` and ``khat_hi`` (its 90% interval),
        ``khat_threshold``, ``verdict``, ``uncertain``, ``resampled`` (the row scores
        importance-resampled draws), ``is_ess``, ``fit_time`` and, with a
        reference, ``num_params`` (scalar parameters compared), ``mean_err_max``,
        ``mean_err_avg``, ``sd_err_max`` (in reference sd units), ``w1_marginal`` and
        ``wasserstein`` (reference-standardized scale). Reference components that are
        structurally constant (the fixed zeros and ones of a Cholesky factor) are left out
        of the metrics and listed, with their value, in ``table.attrs["skipped"]``.

    Raises:
        TypeError: if a keyword is neither an option nor a parameter of the model, or an
            approximation is neither a guide nor an ArviZ object.
        ValueError: if an approximation lacks a reference variable or its shape, or varies
            where the reference is constant.
    """
    import pandas as pd

    if not isinstance(approximations, Mapping):
        raise TypeError(
            "compare_approximations takes {name: guide or ArviZ object}, got "
            f"{type(approximations).__name__}"
        )
    if model is not None:
        check_model_call(
            "compare_approximations", model, args, kwargs, options(compare_approximations)
        )
    ref = None if reference is None else reference_arrays(reference)
    fit_results = dict(fit_results or {})
    rows = {}
    skipped: dict[str, float] = {}
    for name, approximation in approximations.items():
        if is_arviz(approximation):
            idata = approximation
        else:
            if not callable(approximation):
                raise TypeError(
                    f"compare_approximations: {name!r} must be a guide or an ArviZ object, "
                    f"got {type(approximation).__name__}"
                )
            if model is None:
                raise ValueError(f"compare_approximations: {name!r} is a guide; pass the model")
            idata = to_arviz(
                approximation,
                model,
                *args,
                num_draws=num_draws,
                fit_result=fit_results.get(name),
                resample=resample,
                num_proposals=num_proposals,
                **kwargs,
            )
        report = vi_diagnostics(idata, warn=False)
        row: dict[str, Any] = {
            "elbo": report.elbo,
            "elbo_mcse": report.elbo_mcse,
            "iw_elbo": report.iw_elbo,
            "khat": report.khat,
            "khat_lo": report.khat_interval[0],
            "khat_hi": report.khat_interval[1],
            "khat_threshold": report.khat_threshold,
            "verdict": report.verdict,
            "uncertain": report.uncertain,
            "resampled": _arviz.has_group(idata, _arviz.PROPOSALS_GROUP),
            "is_ess": report.is_ess,
            "fit_time": math.nan if report.fit_time is None else report.fit_time,
        }
        if ref is not None:
            metrics, skipped = _reference_metrics(
                name, idata, ref, per_parameter, wasserstein_draws, seed
            )
            row.update(metrics)
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.attrs["skipped"] = skipped
    return table
