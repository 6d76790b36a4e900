"""The one module that talks to ArviZ: an adapter for ArviZ 0.x (InferenceData) and 1.x (DataTree).

Everything else in :mod:`pyro_flowvi.diagnostics` hands this module plain NumPy arrays and gets
NumPy arrays or ArviZ objects back, so the rest of the package does not care which ArviZ is
installed. ArviZ is imported lazily, inside the functions.

This module imports nothing from torch or Pyro, so that its tests (``tests/arviz1``) run in a
Python 3.12 environment that holds only NumPy and ArviZ 1.x.

Differences handled here:

- ``from_dict``: 0.x takes one keyword per group; 1.x takes one mapping of groups and returns
  an :class:`xarray.DataTree`. Groups outside ArviZ's schema (the ELBO trace) are added with
  ``add_groups`` on 0.x and as a child node on 1.x.
- PSIS: 0.x's ``az.psislw(log_ratios)`` smooths the log importance ratios it is given. 1.x's
  ``psislw`` is written for leave-one-out and *negates its input* (it expects
  log-likelihoods), so it receives ``-log_ratios``. 1.x's ``pareto_khat(log_weights=True)``
  does not fit the right tail of the weights and is not used.

The plots (:mod:`.plots`) draw with matplotlib from the NumPy arrays this module returns, so
they look the same on both.
"""

from __future__ import annotations

__all__ = [
    "FIT_GROUP",
    "PROPOSALS_GROUP",
    "arviz_major",
    "coord_values",
    "dataset",
    "from_groups",
    "group_attrs",
    "group_names",
    "has_group",
    "import_arviz",
    "psislw",
    "sample_values",
    "var_dims",
    "var_names",
]

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Name of the group that holds the ELBO trace of a fit (dimension ``step``).
FIT_GROUP = "vi_fit"
#: Name of the group that holds the log importance ratios of the proposals behind
#: importance-resampled draws (dimension ``proposal``).
PROPOSALS_GROUP = "vi_proposals"

_SAMPLE_DIMS = ("chain", "draw")


def import_arviz() -> Any:
    """Import and return :mod:`arviz`, without the FutureWarning 0.2x prints on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def arviz_major() -> int:
    """Return the major version of the installed ArviZ (0 or 1)."""
    version = import_arviz().__version__
    return int(version.split(".")[0])


def _is_datatree(obj: Any) -> bool:
    return type(obj).__name__ == "DataTree"


def from_groups(
    groups: Mapping[str, Mapping[str, np.ndarray]],
    *,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
    extra_groups: Mapping[str, tuple[Mapping[str, tuple[Sequence[str], np.ndarray]], dict]]
    | None = None,
) -> Any:
    """Build an ArviZ object from NumPy arrays.

    Arguments:
        groups: ``{group: {variable: array}}`` for ArviZ's own groups. Arrays in sample groups
            (``posterior``, ``sample_stats``, ``log_likelihood``, ...) have shape
            ``(chain, draw, *shape)``; ``observed_data`` arrays have no sample dimensions.
        dims: dimension names of each variable's non-sample axes, as in ``from_dict``.
        coords: coordinates of the named dimensions.
        attrs: attributes added to every group built from ``groups``.
        extra_groups: ``{group: ({variable: (dims, array)}, attrs)}`` for groups outside
            ArviZ's schema; their arrays have no sample dimensions.

    Returns:
        ``arviz.InferenceData`` on ArviZ 0.x, ``xarray.DataTree`` on ArviZ 1.x.
    """
    az = import_arviz()
    dims = {k: list(v) for k, v in (dims or {}).items()}
    coords = dict(coords or {})
    attrs = dict(attrs or {})
    groups = {g: dict(v) for g, v in groups.items() if v}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if arviz_major() >= 1:
            obj = az.from_dict(groups, dims=dims, coords=coords)
        else:
            obj = az.from_dict(**groups, dims=dims, coords=coords)
    for group in groups:
        # 0.x's from_dict(attrs=...) sets the top level only; put them on every group
        if _is_datatree(obj):
            obj[group].attrs = {**obj[group].attrs, **attrs}
        else:
            getattr(obj, group).attrs.update(attrs)
    if extra_groups:
        import xarray as xr

        datasets = {
            name: xr.Dataset(
                {var: (list(var_dims), np.asarray(arr)) for var, (var_dims, arr) in data.items()},
                attrs=dict(group_attrs_),
            )
            for name, (data, group_attrs_) in extra_groups.items()
        }
        if _is_datatree(obj):
            for name, ds in datasets.items():
                obj[name] = ds
        else:
            obj.add_groups(datasets, warn_on_custom_groups=False)
    return obj


def group_names(obj: Any) -> list[str]:
    """Return the names of the groups of an InferenceData or DataTree."""
    if _is_datatree(obj):
        return list(obj.children)
    return list(obj.groups())


def has_group(obj: Any, group: str) -> bool:
    """Whether ``obj`` has a group called ``group``."""
    return group in group_names(obj)


def dataset(obj: Any, group: str) -> Any:
    """Return one group as an :class:`xarray.Dataset`.

    Raises:
        KeyError: naming the missing group and the ones present.
    """
    if not has_group(obj, group):
        raise KeyError(f"the ArviZ object has no {group!r} group; it has {group_names(obj)}")
    if _is_datatree(obj):
        return obj[group].to_dataset()
    return getattr(obj, group)


def var_names(obj: Any, group: str) -> list[str]:
    """Return the variable names of one group."""
    return [str(v) for v in dataset(obj, group).data_vars]


def group_attrs(obj: Any, group: str) -> dict[str, Any]:
    """Return the attributes of one group."""
    return dict(dataset(obj, group).attrs)


def sample_values(obj: Any, group: str, var: str) -> np.ndarray:
    """Return a variable as an array with the sample dimensions ``(chain, draw)`` first.

    Variables of groups without sample dimensions (``observed_data``, the fit trace) come
    back as they are stored.

    Raises:
        KeyError: naming the missing variable and the ones present.
    """
    ds = dataset(obj, group)
    if var not in ds.data_vars:
        raise KeyError(f"{group!r} has no variable {var!r}; it has {var_names(obj, group)}")
    da = ds[var]
    present = [d for d in _SAMPLE_DIMS if d in da.dims]
    if present:
        da = da.transpose(*present, *[d for d in da.dims if d not in present])
    return np.asarray(da.values)


def coord_values(obj: Any, group: str, var: str, dim: str) -> np.ndarray:
    """Return the coordinate values of one dimension of a variable (``0..n-1`` if it has none)."""
    da = dataset(obj, group)[var]
    if dim in da.coords:
        return np.asarray(da.coords[dim].values)
    return np.arange(da.sizes[dim])


def var_dims(obj: Any, group: str, var: str) -> tuple[str, ...]:
    """Return the dimension names of a variable, sample dimensions excluded."""
    da = dataset(obj, group)[var]
    return tuple(str(d) for d in da.dims if d not in _SAMPLE_DIMS)


def psislw(log_ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed importance sampling of log importance ratios, along the last axis.

    Arguments:
        log_ratios: ``log p(theta_s) - log q(theta_s)`` (up to a constant), shape
            ``(..., S)``.

    Returns:
        ``(log_weights, khat)``: smoothed log weights normalized to sum to one along the last
        axis (shape ``(..., S)``), and the Pareto shape estimate of the right tail (shape
        ``(...)``; ``-inf`` where all ratios are equal to within 1e-8, which leaves no tail).
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    if log_ratios.ndim == 0 or log_ratios.shape[-1] < 2:
        raise ValueError(f"psislw needs at least 2 draws on the last axis, got {log_ratios.shape}")
    if not np.all(np.isfinite(log_ratios)):
        raise ValueError("psislw: log importance ratios must be finite")
    # Equal ratios (an exact approximation) leave no tail to fit; ArviZ returns k = inf there.
    # Their weights are uniform and the Pareto shape is -inf (no tail at all).
    spread = np.ptp(log_ratios, axis=-1)
    if np.all(spread <= 1e-8):
        lw = np.full(log_ratios.shape, -np.log(log_ratios.shape[-1]))
        return lw, np.full(log_ratios.shape[:-1], -np.inf)
    az = import_arviz()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if arviz_major() >= 1:
            import arviz_stats  # noqa: F401  (registers the .azstats accessor)
            import xarray as xr

            names = [f"_axis_{i}" for i in range(log_ratios.ndim - 1)] + ["_draw"]
            # ArviZ 1.x psislw expects log-likelihoods and smooths their negation.
            lw, khat = xr.DataArray(-log_ratios, dims=names).azstats.psislw(dim=["_draw"])
            lw = lw.transpose(*names).values
            khat = np.asarray(khat.values)
        else:
            lw, khat = az.psislw(log_ratios, reff=1.0)
            lw = np.asarray(lw)
            khat = np.asarray(khat)
    khat = khat.reshape(log_ratios.shape[:-1])
    flat = spread <= 1e-8
    if np.any(flat):
        lw = np.where(flat[..., None], -np.log(log_ratios.shape[-1]), lw)
        khat = np.where(flat, -np.inf, khat)
    return lw, khat
