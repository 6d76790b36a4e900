"""Plots: the ELBO trace, marginals of several approximations over a reference, a pair plot.

The ELBO trace is drawn with matplotlib (ArviZ has no such plot); marginals and pair plots go
through ArviZ (``plot_density`` / ``plot_pair`` on ArviZ 0.x, ``arviz_plots`` on 1.x). Every
function returns a :class:`matplotlib.figure.Figure`; matplotlib is imported only here, inside
the functions.
"""

from __future__ import annotations

__all__ = ["plot_elbo", "plot_marginals", "plot_pair"]

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _arviz
from .compare import _is_arviz, _reference_arrays


def _elbo_trace(obj: Any) -> np.ndarray:
    if _is_arviz(obj):
        return _arviz.sample_values(obj, _arviz.FIT_GROUP, "elbo")
    trace = getattr(obj, "elbo_trace", None)
    if trace is None:
        trace = obj
    trace = np.asarray(trace, dtype=np.float64)
    if trace.ndim != 1:
        raise ValueError(f"plot_elbo: an ELBO trace must be 1-D, got shape {trace.shape}")
    return trace


def plot_elbo(
    results: Any | Mapping[str, Any],
    *,
    window: int | None = None,
    skip: int = 0,
    ax: Any | None = None,
) -> Any:
    """Plot ELBO traces: each step faintly, and a running mean over ``window`` steps.

    Arguments:
        results: a :class:`~pyro_flowvi.FitResult`, an ArviZ object with a ``vi_fit`` group,
            an array, or ``{label: any of these}`` to overlay several fits.
        window: width of the running mean (default: 2% of the longest trace, at least 1).
        skip: leave out the first ``skip`` steps (the early ELBO dwarfs the rest).
        ax: matplotlib axes to draw on (default: a new figure).

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if isinstance(results, Mapping):
        traces = {str(k): _elbo_trace(v) for k, v in results.items()}
    else:
        traces = {"ELBO": _elbo_trace(results)}
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    else:
        fig = ax.get_figure()
    longest = max((t.size for t in traces.values()), default=0)
    if window is None:
        window = max(1, longest // 50)
    if window < 1:
        raise ValueError(f"plot_elbo: window must be >= 1, got {window}")
    for i, (label, trace) in enumerate(traces.items()):
        steps = np.arange(trace.size)[skip:]
        values = trace[skip:]
        color = f"C{i % 10}"
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.5)
        if values.size >= window:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color=color, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO")
    ax.legend()
    return fig


def _as_reference_object(reference: Any) -> Any:
    if _is_arviz(reference):
        return reference
    dims = getattr(reference, "dims", None)
    return _arviz.from_groups({"posterior": _reference_arrays(reference)}, dims=dims)


def plot_marginals(
    approximations: Mapping[str, Any],
    reference: Any | None = None,
    *,
    var_names: Sequence[str] | None = None,
) -> Any:
    """Overlay the 1-D marginals of several approximations (and of reference draws).

    Arguments:
        approximations: ``{label: ArviZ object}`` (outputs of
            :func:`~pyro_flowvi.diagnostics.to_arviz`).
        reference: reference draws (an ArviZ object, a
            :class:`~pyro_flowvi.benchmarks.ReferencePosterior` or
            ``{name: array (chain, draw, *shape)}``), shown as the model ``"reference"``.
        var_names: variables to show (default: the reference's, else all).

    Returns:
        The matplotlib figure.
    """
    objects = dict(approximations)
    if not objects:
        raise ValueError("plot_marginals: got no approximations")
    for label, obj in objects.items():
        if not _is_arviz(obj):
            raise TypeError(
                f"plot_marginals: {label!r} must be an ArviZ object (use to_arviz), "
                f"got {type(obj).__name__}"
            )
    if reference is not None:
        ref = _as_reference_object(reference)
        if var_names is None:
            var_names = _arviz.var_names(ref, "posterior")
        objects = {"reference": ref, **objects}
    return _arviz.plot_marginals(objects, var_names)


def plot_pair(
    idata: Any,
    reference: Any | None = None,
    *,
    var_names: Sequence[str] | None = None,
    coords: Mapping[str, Any] | None = None,
) -> Any:
    """Pair plot of one approximation, over reference draws when given.

    Arguments:
        idata: an ArviZ object (an output of :func:`~pyro_flowvi.diagnostics.to_arviz`).
        reference: reference draws, in any form :func:`plot_marginals` accepts.
        var_names: variables to show (default: the reference's, else all).
        coords: coordinates to select, e.g. ``{"school": [0, 1]}`` (the reference must use
            the same dimension names: see ``ReferencePosterior.dims``).

    Returns:
        The matplotlib figure.
    """
    ref = None if reference is None else _as_reference_object(reference)
    if var_names is None and ref is not None:
        var_names = _arviz.var_names(ref, "posterior")
    return _arviz.plot_pair(idata, var_names, ref, coords)
