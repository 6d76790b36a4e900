"""Plots: the ELBO trace, marginals of several approximations over a reference, a pair plot.

Every figure is drawn with matplotlib from the NumPy draws (the same figure on ArviZ 0.x and
1.x) and is meant to be read at a glance:

- the reference is drawn last, on top, in black (a line on the marginals, density contours on
  the pair plot), so no number of approximation draws can hide it, and a figure legend names
  every source;
- axis limits come from quantiles (0.5% to 99.5% of each source's draws; for the ELBO, the
  running median of the settled second half of each run), not from the extremes, so one
  outlier, an early ELBO or a diverged run does not squash the rest;
- figures use matplotlib's constrained layout, so labels and legends are not clipped, and
  their size grows with the number of panels.

Every function returns a :class:`matplotlib.figure.Figure`; matplotlib (and SciPy's KDE) are
imported only here, inside the functions. This module imports nothing from torch or Pyro.
"""

from __future__ import annotations

__all__ = ["plot_elbo", "plot_marginals", "plot_pair"]

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _arviz
from ._draws import is_arviz
from ._plotting import (
    GRID,
    REFERENCE_COLOR,
    as_reference,
    check_arviz,
    draw_contours,
    draw_marginal,
    figure_legend,
    gather,
    interquartile,
    note_constants,
    robust_limits,
    shared_names,
    subsample,
)


def _elbo_trace(obj: Any) -> np.ndarray:
    if is_arviz(obj):
        return _arviz.sample_values(obj, _arviz.FIT_GROUP, "elbo")
    trace = getattr(obj, "elbo_trace", None)
    if trace is None:
        trace = obj
    trace = np.asarray(trace, dtype=np.float64)
    if trace.ndim != 1:
        raise ValueError(f"plot_elbo: an ELBO trace must be 1-D, got shape {trace.shape}")
    return trace


def _running_median(
    steps: np.ndarray, values_: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Centred running median over the steps where the whole window fits.

    A median, not a mean: the rare very low ELBO estimates of a noisy fit do not pull it
    down. Steps within half a window of either end are left out rather than padded.
    """
    from scipy.ndimage import median_filter

    if window <= 1 or values_.size < window:
        return steps, values_
    smooth = median_filter(values_, size=window, mode="nearest")
    left = window // 2
    right = values_.size - (window - 1 - left)
    return steps[left:right], smooth[left:right]


def _elbo_limits(
    settled: dict[str, np.ndarray], smoothed: dict[str, np.ndarray]
) -> tuple[float, float, list[str]]:
    """y-limits from the settled halves of the runs, and the runs left below them.

    The limits span the running medians of the settled halves, widened by twice the largest
    interquartile range of the steps (their noise). A run is left below the axis when its
    settled median lies further below the runs above it than ten times their spread (at
    least a tenth of the best median's magnitude), unless that would leave most runs below:
    then the best run is the odd one (an ELBO above the others that may be impossible, from a
    wrong log-density) and the limits span every run.
    """
    finite = {k: v[np.isfinite(v)] for k, v in settled.items()}
    finite = {k: v for k, v in finite.items() if v.size}
    if not finite:
        return -1.0, 1.0, []
    medians = {k: float(np.median(v)) for k, v in finite.items()}
    order = sorted(medians, key=medians.__getitem__, reverse=True)
    kept = [order[0]]
    for name in order[1:]:
        spread = max(
            medians[order[0]] - medians[kept[-1]],
            max(interquartile(finite[k]) for k in kept),
            0.1 * abs(medians[order[0]]),
            1e-3,
        )
        if medians[kept[-1]] - medians[name] > 10.0 * spread:
            break
        kept.append(name)
    if 2 * len(kept) < len(order):
        kept = order
    below = [k for k in order if k not in kept]
    smooth = [smoothed[k][np.isfinite(smoothed[k])] for k in kept]
    lo = min(float(np.min(x)) for x in smooth if x.size)
    hi = max(float(np.max(x)) for x in smooth if x.size)
    noise = 2.0 * max(interquartile(finite[k]) for k in kept)
    lo, hi = lo - noise, hi + noise
    pad = 0.05 * max(hi - lo, 1e-9 * max(1.0, abs(hi)))
    return lo - pad, hi + pad, below


def plot_elbo(
    results: Any | Mapping[str, Any],
    *,
    window: int | None = None,
    skip: int = 0,
    ylim: tuple[float, float] | None = None,
    ax: Any | None = None,
) -> Any:
    """Plot ELBO traces: each step faintly, and a running median over ``window`` steps.

    The running median (not mean) keeps the rare very low estimates of a noisy ELBO from
    pulling the line down. The y-axis covers the settled second half of every run (its
    running median, widened by twice the interquartile range of its steps), so the early
    ELBO, rare spikes and a run that diverged do not set the scale. A run whose settled ELBO
    lies far below the others (further than ten times their spread) is left below the axis,
    and its final running median is written in the legend; never most of the runs, which a
    single run far above them (an impossible ELBO) would otherwise push below.

    Arguments:
        results: a :class:`~pyro_flowvi.FitResult`, an ArviZ object with a ``vi_fit`` group,
            an array, or ``{label: any of these}`` to overlay several fits.
        window: width of the running median (default: 2% of the longest trace, at least 1).
        skip: leave out the first ``skip`` steps.
        ylim: y-limits, overriding the automatic ones.
        ax: matplotlib axes to draw on (default: a new figure).

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    # an InferenceData is a Mapping of groups: not several fits
    several = isinstance(results, Mapping) and not is_arviz(results)
    if several:
        traces = {str(k): _elbo_trace(v) for k, v in results.items()}
    else:
        traces = {"ELBO": _elbo_trace(results)}
    if not traces:
        raise ValueError("plot_elbo: got no ELBO traces")
    longest = max(t.size for t in traces.values())
    if window is None:
        window = max(1, longest // 50)
    if window < 1:
        raise ValueError(f"plot_elbo: window must be >= 1, got {window}")
    if skip < 0:
        raise ValueError(f"plot_elbo: skip must be >= 0, got {skip}")
    own_figure = ax is None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.0, 4.0), layout="constrained")
    else:
        fig = ax.get_figure()
    settled, smooth_settled, finals, lines = {}, {}, {}, {}
    for i, (label, trace) in enumerate(traces.items()):
        steps = np.arange(trace.size)[skip:]
        raw = trace[skip:]
        color = f"C{i % 10}"
        ax.plot(steps, raw, color=color, alpha=0.25, linewidth=0.5, zorder=1)
        half = raw.size // 2
        settled[label] = raw[half:]
        smooth_steps, smooth = _running_median(steps, raw, window)
        lines[label] = ax.plot(smooth_steps, smooth, color=color, linewidth=1.5, zorder=2)[0]
        smooth_settled[label] = smooth[smooth_steps >= steps[half]] if raw.size else smooth
        finals[label] = float(smooth[-1]) if smooth.size else math.nan
    lo, hi, below = _elbo_limits(settled, smooth_settled)
    ax.set_ylim(ylim if ylim is not None else (lo, hi))
    if ylim is not None:
        below = [k for k in traces if finals[k] < ylim[0]]
    labels = [f"{k} (below the axis: final {finals[k]:.4g})" if k in below else k for k in traces]
    handles = [lines[k] for k in traces]
    # one unnamed run needs a legend only to say that it is below the axis
    if several or below:
        if own_figure:
            figure_legend(fig, handles, labels)
        else:
            ax.legend(handles, labels, loc="best", fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO")
    if window > 1:
        ax.set_title(
            f"ELBO per step (faint) and its running median over {window} steps", fontsize="medium"
        )
    ax.grid(alpha=0.3)
    return fig


def plot_marginals(
    approximations: Mapping[str, Any],
    reference: Any | None = None,
    *,
    var_names: Sequence[str] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    max_panels: int = 40,
) -> Any:
    """Overlay the 1-D marginals of several approximations, with the reference on top.

    One panel per scalar parameter (``theta[Choate]``); each approximation is a coloured
    density line, the reference a black line drawn last. The x-limits cover the 0.5%-99.5%
    quantiles of every source. Densities are Gaussian KDEs (of at most 2000 evenly spaced
    draws), reflected at zero for non-negative parameters; a constant is a vertical line.

    Arguments:
        approximations: ``{label: ArviZ object}`` (outputs of
            :func:`~pyro_flowvi.diagnostics.to_arviz`).
        reference: reference draws (an ArviZ object, a
            :class:`~pyro_flowvi.benchmarks.ReferencePosterior` or
            ``{name: array (chain, draw, *shape)}``).
        var_names: variables to show (default: the reference's, else all of the first
            approximation's).
        coords: coordinate labels to select, e.g. ``{"school": ["Choate"]}``. Coordinates are
            those of the first approximation; another source whose coordinates along a
            dimension are plain positions ``0..n-1`` is matched by position.
        max_panels: refuse more panels than this (select with ``var_names`` / ``coords``).

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: if the sources' coordinates or shapes disagree, a variable or
            coordinate label is missing, or there would be more than ``max_panels`` panels.
    """
    import matplotlib.pyplot as plt

    if not isinstance(approximations, Mapping) or not approximations:
        raise ValueError(
            "plot_marginals: pass {label: ArviZ object} with at least one approximation, got "
            f"{approximations!r:.80}"
        )
    for label, obj in approximations.items():
        check_arviz(obj, "plot_marginals", f"approximation {label!r}")
    ref = None if reference is None else as_reference(reference)
    primary = next(iter(approximations.values()))
    if var_names is None and ref is not None:
        var_names = shared_names(primary, ref)
    comps, draws, ref_draws, constants = gather(
        primary, approximations, ref, var_names, coords, "plot_marginals"
    )
    if not comps:
        raise ValueError(f"plot_marginals: every component is constant: {constants}")
    if len(comps) > max_panels:
        raise ValueError(
            f"plot_marginals: {len(comps)} panels is more than max_panels={max_panels}; "
            "select some with var_names or coords"
        )
    ncols = min(4, len(comps))
    nrows = math.ceil(len(comps) / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        # at least 6.5 inches wide, so that a long legend does not dwarf one or two panels
        figsize=(max(2.8 * ncols, 6.5), 2.1 * nrows + 0.5),
        layout="constrained",
        squeeze=False,
    )
    handles: dict[str, Any] = {}
    for j, (ax, comp) in enumerate(zip(axes.flat, comps, strict=False)):
        sources = [d[j] for d in draws.values()]
        if ref_draws[j] is not None:
            sources.append(ref_draws[j])
        lo, hi = robust_limits(sources)
        grid = np.linspace(lo, hi, GRID)
        for i, label in enumerate(draws):
            handles[label] = draw_marginal(
                ax,
                draws[label][j],
                grid,
                color=f"C{i % 10}",
                linewidth=1.4,
                zorder=2,
                label=label,
            )
        if ref_draws[j] is not None:
            handles["reference"] = draw_marginal(
                ax,
                ref_draws[j],
                grid,
                color=REFERENCE_COLOR,
                linewidth=1.6,
                linestyle="--",
                zorder=3,
                label="reference",
            )
        ax.set_xlim(lo, hi)
        ax.set_ylim(bottom=0.0)
        ax.set_yticks([])
        ax.set_title(comp.label, fontsize="medium")
    for ax in axes.flat[len(comps) :]:
        ax.set_visible(False)
    figure_legend(fig, list(handles.values()), list(handles))
    note_constants(fig, constants)
    return fig


def plot_pair(
    idata: Any,
    reference: Any | None = None,
    *,
    var_names: Sequence[str] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    max_draws: int = 4000,
    max_components: int = 10,
    label: str | None = None,
) -> Any:
    """Pair plot of one approximation, with the reference on top.

    Below the diagonal: the approximation's draws as points and the reference's density as
    black contours (enclosing 50%, 80% and 95% of its draws), drawn last; on the diagonal,
    the marginals as in :func:`plot_marginals`. Axis limits cover the 0.5%-99.5% quantiles of
    both.

    Arguments:
        idata: an ArviZ object (an output of :func:`~pyro_flowvi.diagnostics.to_arviz`).
        reference: reference draws, in any form :func:`plot_marginals` accepts.
        var_names: variables to show (default: the reference's, else all).
        coords: coordinate labels to select, e.g. ``{"school": ["Choate"]}`` (as in
            :func:`plot_marginals`).
        max_draws: approximation draws shown as points (evenly spaced through the draws).
        max_components: refuse more scalar components than this.
        label: the approximation's name in the legend (default: the ``approximation``
            attribute :func:`~pyro_flowvi.diagnostics.to_arviz` writes, e.g. ``AutoIAFGuide``).

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: as :func:`plot_marginals`, or for fewer than 2 or more than
            ``max_components`` components.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    check_arviz(idata, "plot_pair", "idata")
    ref = None if reference is None else as_reference(reference)
    if var_names is None and ref is not None:
        var_names = shared_names(idata, ref)
    comps, draws, ref_draws, constants = gather(
        idata, {"approximation": idata}, ref, var_names, coords, "plot_pair"
    )
    k = len(comps)
    if not 2 <= k <= max_components:
        raise ValueError(
            f"plot_pair: needs 2 to max_components={max_components} scalar components, got "
            f"{k} ({[c.label for c in comps][:12]}); select with var_names or coords"
        )
    approx = draws["approximation"]
    if label is None:
        label = str(_arviz.group_attrs(idata, "posterior").get("approximation", "approximation"))
    limits = [
        robust_limits([approx[j]] + ([ref_draws[j]] if ref_draws[j] is not None else []))
        for j in range(k)
    ]
    size = min(2.2 * k, 12.0)
    fig, axes = plt.subplots(k, k, figsize=(size, size + 0.4), layout="constrained", squeeze=False)
    marker_size = 4.0 if approx[0].size <= 1000 else 1.5
    for row in range(k):
        for col in range(k):
            ax = axes[row, col]
            if col > row:
                ax.set_visible(False)
                continue
            if row == col:
                grid = np.linspace(*limits[col], GRID)
                draw_marginal(
                    ax,
                    approx[col],
                    grid,
                    color="C0",
                    linewidth=1.4,
                    zorder=2,
                    label=label,
                )
                if ref_draws[col] is not None:
                    draw_marginal(
                        ax,
                        ref_draws[col],
                        grid,
                        color=REFERENCE_COLOR,
                        linewidth=1.6,
                        zorder=3,
                        label="reference",
                    )
                ax.set_yticks([])
                ax.set_ylim(bottom=0.0)
            else:
                x, y = subsample(approx[col], max_draws), subsample(approx[row], max_draws)
                ax.scatter(
                    x,
                    y,
                    s=marker_size,
                    color="C0",
                    alpha=0.35,
                    linewidths=0,
                    zorder=1,
                    rasterized=True,
                    label=label,
                )
                if ref_draws[col] is not None and ref_draws[row] is not None:
                    draw_contours(ax, ref_draws[col], ref_draws[row], limits[col], limits[row])
                ax.set_ylim(limits[row])
            ax.set_xlim(limits[col])
            if row == k - 1:
                ax.set_xlabel(comps[col].label)
            else:
                ax.tick_params(labelbottom=False)
            if col == 0 and row > 0:
                ax.set_ylabel(comps[row].label)
            elif row != col:
                ax.tick_params(labelleft=False)
    handles = [Line2D([], [], marker="o", linestyle="", color="C0", label=label)]
    if any(r is not None for r in ref_draws):
        handles.append(
            Line2D(
                [],
                [],
                color=REFERENCE_COLOR,
                label="reference (contours enclose 50, 80, 95%)",
            )
        )
    figure_legend(fig, handles, [h.get_label() for h in handles])
    note_constants(fig, constants)
    return fig
