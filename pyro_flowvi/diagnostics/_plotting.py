"""Helpers of the diagnostics plots: robust limits, densities, contours, legends, sources.

Imported only by :mod:`.plots`; like it, this module imports nothing from torch or Pyro, and
matplotlib and SciPy only inside the functions.
"""

from __future__ import annotations

__all__ = [
    "GRID",
    "KDE_DRAWS",
    "LIMIT_QUANTILES",
    "REFERENCE_COLOR",
    "as_reference",
    "check_arviz",
    "draw_contours",
    "draw_marginal",
    "figure_legend",
    "gather",
    "in_window",
    "interquartile",
    "kde_density",
    "note_constants",
    "robust_limits",
    "shared_names",
    "subsample",
]

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _arviz
from ._draws import (
    Component,
    check_aligned,
    components,
    constant_columns,
    is_arviz,
    reference_arrays,
    values,
)

#: Quantiles of each source's draws that set the axis limits.
LIMIT_QUANTILES = (0.005, 0.995)
REFERENCE_COLOR = "black"
# draws behind one KDE and one contour set: enough for a smooth curve, fast to evaluate
KDE_DRAWS = 2000
GRID = 200


def check_arviz(obj: Any, caller: str, what: str) -> None:
    if not is_arviz(obj):
        hint = "; convert a guide with to_arviz(guide, model, *args)" if callable(obj) else ""
        raise TypeError(
            f"{caller}: {what} must be an ArviZ object (InferenceData or DataTree, the output "
            f"of to_arviz), got {type(obj).__name__}{hint}"
        )


def interquartile(x: np.ndarray) -> float:
    return float(np.subtract(*np.quantile(x, [0.75, 0.25]))) if x.size else 0.0


def as_reference(reference: Any) -> Any:
    """Reference draws as an ArviZ object or ``{name: (chain, draw, *shape)}`` arrays."""
    if is_arviz(reference):
        return reference
    return reference_arrays(reference)


def shared_names(primary: Any, reference: Any) -> list[str]:
    """The reference's variables, in the approximation's order (then the reference's)."""
    ref_names = (
        _arviz.var_names(reference, "posterior") if is_arviz(reference) else list(reference)
    )
    own = _arviz.var_names(primary, "posterior")
    return [n for n in own if n in ref_names] + [n for n in ref_names if n not in own]


def robust_limits(samples: Sequence[np.ndarray]) -> tuple[float, float]:
    """Axis limits covering the 0.5%-99.5% quantiles of every sample, padded by 5%."""
    lows, highs = [], []
    for x in samples:
        x = x[np.isfinite(x)]
        if x.size:
            # draws, not interpolations: a 0.5% share of outliers does not pull the limit
            lows.append(float(np.quantile(x, LIMIT_QUANTILES[0], method="higher")))
            highs.append(float(np.quantile(x, LIMIT_QUANTILES[1], method="lower")))
    if not lows:
        return -1.0, 1.0
    lo, hi = min(lows), max(highs)
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        return lo - 0.5 * max(1.0, abs(lo)), hi + 0.5 * max(1.0, abs(hi))
    pad = 0.05 * (hi - lo)
    nonnegative = all(np.all(x[np.isfinite(x)] >= 0) for x in samples)
    return (max(lo - pad, 0.0) if nonnegative else lo - pad), hi + pad


def subsample(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] <= size:
        return x
    # fixed positions, not a random draw: the figure does not depend on a global seed
    return x[np.linspace(0, x.shape[0] - 1, size).round().astype(int)]


def in_window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Which values lie within the axis range widened by its width on each side.

    Draws further out are outliers for the picture: left out of the density estimate (whose
    bandwidth they would inflate), their mass still counted.
    """
    width = hi - lo
    return np.isfinite(x) & (x >= lo - width) & (x <= hi + width)


def kde_density(x: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Gaussian KDE of ``x`` on ``grid``, reflected at 0 for non-negative draws.

    The bandwidth is Silverman's robust rule, ``0.9 min(sd, IQR / 1.349) n^(-1/5)``, and
    draws far outside the grid are left out (their share of the mass is kept out of the
    curve), so a few outliers neither flatten nor widen it.
    """
    from scipy.stats import gaussian_kde

    finite = x[np.isfinite(x)]
    inside = finite[in_window(finite, grid[0], grid[-1])]
    kept = subsample(inside, KDE_DRAWS)
    if kept.size < 2 or np.ptp(kept) <= 1e-12 * max(1.0, float(np.max(np.abs(kept)))):
        return None
    sd = float(np.std(kept, ddof=1))
    iqr = interquartile(kept) / 1.349
    scale = min(sd, iqr) if iqr > 0 else sd
    kde = gaussian_kde(kept, bw_method=0.9 * scale / sd * kept.size ** (-0.2))
    density = kde(grid)
    if np.all(finite >= 0):
        density = density + kde(-grid)
    return density * inside.size / max(finite.size, 1)


def draw_marginal(ax: Any, x: np.ndarray, grid: np.ndarray, **style: Any) -> Any:
    density = kde_density(x, grid)
    if density is None:  # a constant: a vertical line at its value
        return ax.axvline(float(np.median(x)), **style)
    return ax.plot(grid, density, **style)[0]


def gather(
    primary: Any,
    others: Mapping[str, Any],
    reference: Any | None,
    var_names: Sequence[str] | None,
    coords: Mapping[str, Sequence[Any]] | None,
    caller: str,
) -> tuple[
    list[Component], dict[str, list[np.ndarray]], list[np.ndarray | None], dict[str, float]
]:
    """Components of ``primary`` and the draws of every source, aligned by coordinates.

    Components that are the same constant in every source (the fixed zeros and ones of a
    Cholesky factor) are dropped and returned as ``{label: value}``.
    """
    comps = components(primary, var_names, coords, caller)
    draws = {}
    for label, obj in others.items():
        for var in {c.var for c in comps}:
            check_aligned(primary, obj, var, f"approximation {label!r}", caller)
        draws[label] = [values(obj, c) for c in comps]
    ref_draws: list[np.ndarray | None] = [None] * len(comps)
    if reference is not None:
        present = set(
            _arviz.var_names(reference, "posterior") if is_arviz(reference) else reference
        )
        for var in {c.var for c in comps} & present:
            check_aligned(primary, reference, var, "reference", caller)
        ref_draws = [values(reference, c) if c.var in present else None for c in comps]
    constants, keep = {}, []
    for j, comp in enumerate(comps):
        sources = [d[j] for d in draws.values()]
        if ref_draws[j] is not None:
            sources.append(ref_draws[j])
        pooled = np.concatenate(sources)[:, None]
        if constant_columns(pooled)[0]:
            constants[comp.label] = float(pooled[0, 0])
        else:
            keep.append(j)
    comps = [comps[j] for j in keep]
    draws = {label: [d[j] for j in keep] for label, d in draws.items()}
    ref_draws = [ref_draws[j] for j in keep]
    return comps, draws, ref_draws, constants


def note_constants(fig: Any, constants: dict[str, float]) -> None:
    if constants:
        listed = ", ".join(f"{label} = {value:g}" for label, value in constants.items())
        fig.supxlabel(f"constant, not shown: {listed}", fontsize="small", wrap=True)


def figure_legend(fig: Any, handles: list[Any], labels: list[str]) -> Any:
    """A legend above the panels, in as many columns as fit the figure's width."""
    renderer = fig.canvas.get_renderer()
    width = fig.get_window_extent(renderer).width
    legend = None
    for ncols in range(len(labels), 0, -1):
        if legend is not None:
            legend.remove()
        legend = fig.legend(
            handles, labels, loc="outside upper center", ncols=ncols, frameon=False
        )
        if legend.get_window_extent(renderer).width <= 0.98 * width:
            break
    return legend


def draw_contours(ax: Any, x: np.ndarray, y: np.ndarray, xlim: tuple, ylim: tuple) -> Any | None:
    """Reference density contours enclosing 50%, 80% and 95% of its draws (None if flat)."""
    from scipy.stats import gaussian_kde

    keep = in_window(x, *xlim) & in_window(y, *ylim)
    points = subsample(np.stack([x[keep], y[keep]]).T, KDE_DRAWS).T
    if points.shape[1] < 3:
        return None
    try:
        kde = gaussian_kde(points)
    except np.linalg.LinAlgError:  # singular: the draws lie on a line
        return None
    gx, gy = np.meshgrid(np.linspace(*xlim, 80), np.linspace(*ylim, 80))
    density = kde(np.stack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
    at_draws = kde(points)
    levels = np.unique(np.quantile(at_draws, [0.05, 0.2, 0.5]))
    if levels.size < 2 or not np.all(np.isfinite(levels)):
        return None
    contour = ax.contour(
        gx, gy, density, levels=levels, colors=REFERENCE_COLOR, linewidths=1.0, zorder=3
    )
    contour.set_label("reference")
    contour.set_gid("reference")
    return contour
