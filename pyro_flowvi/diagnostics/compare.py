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
from .convert import to_arviz
from .report import vi_diagnostics


def _is_arviz(obj: Any) -> bool:
    return type(obj).__name__ in ("InferenceData", "DataTree")


def _reference_arrays(reference: Any) -> dict[str, np.ndarray]:
    """Reference draws as ``{name: (chain, draw, *shape)}`` from any accepted form."""
    if _is_arviz(reference):
        names = _arviz.var_names(reference, "posterior")
        return {n: _arviz.sample_values(reference, "posterior", n) for n in names}
    draws = getattr(reference, "reference", reference)
    if not isinstance(draws, Mapping):
        raise TypeError(
            "reference must be an ArviZ object, a ReferencePosterior or a mapping "
            f"{{name: array (chain, draw, ...)}}, got {type(reference).__name__}"
        )
    out = {}
    for name, value in draws.items():
        array = np.asarray(value, dtype=np.float64)
        if array.ndim < 2:
            raise ValueError(
                f"reference draws of {name!r} need shape (chain, draw, ...), got {array.shape}"
            )
        out[str(name)] = array
    return out


def flatten_draws(
    draws: Mapping[str, np.ndarray], names: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Stack variables of shape ``(chain, draw, *shape)`` into a matrix of scalar parameters.

    Arguments:
        draws: ``{name: array (chain, draw, *shape)}``.
        names: the variables to take, in order (default: all).

    Returns:
        ``(matrix of shape (chain * draw, P), labels)`` with labels ``"mu"``, ``"theta[0]"``,
        ``"L[1,0]"`` (0-based indices).
    """
    names = list(draws) if names is None else names
    columns, labels = [], []
    for name in names:
        array = np.asarray(draws[name], dtype=np.float64)
        shape = array.shape[2:]
        columns.append(array.reshape(array.shape[0] * array.shape[1], -1))
        if not shape:
            labels.append(name)
        else:
            labels += [f"{name}[{','.join(map(str, i))}]" for i in np.ndindex(*shape)]
    return np.concatenate(columns, axis=1), labels


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
    idata: Any,
    reference: dict[str, np.ndarray],
    per_parameter: bool,
    wasserstein_draws: int,
    seed: int,
) -> dict[str, float]:
    posterior = set(_arviz.var_names(idata, "posterior"))
    missing = [n for n in reference if n not in posterior]
    if missing:
        raise ValueError(
            f"the approximation has no posterior variables {missing} that the reference has; "
            f"it has {sorted(posterior)}"
        )
    approx = {n: _arviz.sample_values(idata, "posterior", n) for n in reference}
    for name in reference:
        if approx[name].shape[2:] != reference[name].shape[2:]:
            raise ValueError(
                f"posterior variable {name!r} has shape {approx[name].shape[2:]}, the "
                f"reference has {reference[name].shape[2:]}"
            )
    ref, labels = flatten_draws(reference)
    q, _ = flatten_draws(approx, list(reference))
    ref_mean, ref_sd = ref.mean(0), ref.std(0, ddof=1)
    if np.any(ref_sd <= 0):
        raise ValueError(f"reference draws of {np.array(labels)[ref_sd <= 0]} are constant")
    mean_err = np.abs(q.mean(0) - ref_mean) / ref_sd
    sd_err = np.abs(q.std(0, ddof=1) - ref_sd) / ref_sd
    z_ref = (ref - ref_mean) / ref_sd
    z_q = (q - ref_mean) / ref_sd
    row = {
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
    return row


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
        **kwargs: keyword arguments of the model and guides.

    Returns:
        A :class:`pandas.DataFrame` indexed by name with columns ``elbo``, ``elbo_mcse``,
        ``iw_elbo``, ``khat``, ``khat_threshold``, ``verdict``, ``is_ess``, ``fit_time`` and,
        with a reference, ``mean_err_max``, ``mean_err_avg``, ``sd_err_max`` (in reference sd
        units), ``w1_marginal`` and ``wasserstein`` (reference-standardized scale).
    """
    import pandas as pd

    ref = None if reference is None else _reference_arrays(reference)
    fit_results = dict(fit_results or {})
    rows = {}
    for name, approximation in approximations.items():
        if _is_arviz(approximation):
            idata = approximation
        else:
            if model is None:
                raise ValueError(f"compare_approximations: {name!r} is a guide; pass the model")
            idata = to_arviz(
                approximation,
                model,
                *args,
                num_draws=num_draws,
                fit_result=fit_results.get(name),
                **kwargs,
            )
        report = vi_diagnostics(idata, warn=False)
        row: dict[str, Any] = {
            "elbo": report.elbo,
            "elbo_mcse": report.elbo_mcse,
            "iw_elbo": report.iw_elbo,
            "khat": report.khat,
            "khat_threshold": report.khat_threshold,
            "verdict": report.verdict,
            "is_ess": report.is_ess,
            "fit_time": math.nan if report.fit_time is None else report.fit_time,
        }
        if ref is not None:
            row.update(_reference_metrics(idata, ref, per_parameter, wasserstein_draws, seed))
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")
