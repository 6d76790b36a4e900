"""Posterior draws as NumPy arrays: reference draws in any accepted form, scalar components.

Shared by the comparison table and the plots. Like :mod:`._arviz`, this module imports nothing
from torch or Pyro, so the plots can be tested against ArviZ 1.x (``tests/arviz1``).
"""

from __future__ import annotations

__all__ = [
    "Component",
    "check_aligned",
    "components",
    "constant_columns",
    "flatten_draws",
    "is_arviz",
    "reference_arrays",
    "values",
]

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _arviz


def is_arviz(obj: Any) -> bool:
    """Whether ``obj`` is an ArviZ ``InferenceData`` (0.x) or ``DataTree`` (1.x)."""
    return type(obj).__name__ in ("InferenceData", "DataTree")


def reference_arrays(reference: Any) -> dict[str, np.ndarray]:
    """Reference draws as ``{name: (chain, draw, *shape)}`` from any accepted form.

    Arguments:
        reference: an ArviZ object with a ``posterior`` group, a
            :class:`~pyro_flowvi.benchmarks.ReferencePosterior` (its ``reference``) or
            ``{name: array (chain, draw, *shape)}``.
    """
    if is_arviz(reference):
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


# A component is structurally constant (the zeros and the leading one of a Cholesky factor)
# when its draws vary by less than this, relative to their size.
_CONSTANT_RTOL = 1e-9
_CONSTANT_ATOL = 1e-12


def constant_columns(draws: np.ndarray) -> np.ndarray:
    """Which columns of a ``(draws, P)`` matrix are structurally constant (a boolean mask).

    A column is constant when its draws span at most ``1e-12 + 1e-9 max|x|``.
    """
    draws = np.asarray(draws, dtype=np.float64)
    spread = np.ptp(draws, axis=0)
    scale = np.max(np.abs(draws), axis=0)
    return spread <= _CONSTANT_ATOL + _CONSTANT_RTOL * scale


@dataclass(frozen=True)
class Component:
    """One scalar parameter: a variable and a position in its non-sample shape."""

    var: str
    index: tuple[int, ...]
    label: str


def _coords(obj: Any, var: str, shape: tuple[int, ...]) -> tuple[tuple[str, ...], list[Any]]:
    """Dimension names and coordinate values of a variable (positions for plain arrays)."""
    if is_arviz(obj):
        dims = _arviz.var_dims(obj, "posterior", var)
        return dims, [_arviz.coord_values(obj, "posterior", var, d) for d in dims]
    dims = tuple(f"{var}_dim_{axis}" for axis in range(len(shape)))
    return dims, [np.arange(n) for n in shape]


def _is_positions(values: np.ndarray) -> bool:
    values = np.asarray(values)
    return values.dtype.kind in "iu" and np.array_equal(values, np.arange(values.size))


def _shape(obj: Any, var: str) -> tuple[int, ...]:
    if is_arviz(obj):
        return tuple(_arviz.sample_values(obj, "posterior", var).shape[2:])
    return tuple(np.shape(obj[var])[2:])


def _names(obj: Any) -> list[str]:
    return _arviz.var_names(obj, "posterior") if is_arviz(obj) else list(obj)


def components(
    obj: Any,
    var_names: Sequence[str] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    caller: str = "plot",
) -> list[Component]:
    """The scalar components of some variables, selected by coordinate labels.

    Arguments:
        obj: an ArviZ object with a ``posterior`` group, or ``{name: (chain, draw, *shape)}``.
        var_names: variables (default: all).
        coords: ``{dimension: [coordinate labels]}`` to select, e.g. ``{"school": ["Choate"]}``.
        caller: the public function, for error messages.

    Returns:
        One :class:`Component` per selected scalar, labelled ``theta[Choate]`` with the
        coordinate labels (``L[1,0]`` with positions where the dimensions have none).

    Raises:
        ValueError: naming a variable that is missing, or a coordinate label that is not one
            of its dimension's.
    """
    present = _names(obj)
    names = present if var_names is None else list(var_names)
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"{caller}: no posterior variables {missing}; there are {present}")
    coords = dict(coords or {})
    out = []
    for var in names:
        shape = _shape(obj, var)
        dims, values = _coords(obj, var, shape)
        axes = []
        for dim, labels in zip(dims, values, strict=True):
            labels = list(np.asarray(labels).tolist())
            if dim not in coords:
                axes.append(list(enumerate(labels)))
                continue
            wanted = list(np.atleast_1d(np.asarray(coords[dim], dtype=object)).tolist())
            unknown = [w for w in wanted if w not in labels]
            if unknown:
                raise ValueError(
                    f"{caller}: dimension {dim!r} of {var!r} has no coordinates {unknown}; "
                    f"its coordinates are {labels}"
                )
            axes.append([(labels.index(w), w) for w in wanted])
        for combo in _product(axes):
            index = tuple(position for position, _ in combo)
            label = var if not combo else f"{var}[{','.join(str(c) for _, c in combo)}]"
            out.append(Component(var, index, label))
    return out


def _product(axes: list[list[tuple[int, Any]]]) -> list[tuple[tuple[int, Any], ...]]:
    result: list[tuple[tuple[int, Any], ...]] = [()]
    for axis in axes:
        result = [prefix + (item,) for prefix in result for item in axis]
    return result


def check_aligned(primary: Any, other: Any, var: str, who: str, caller: str) -> None:
    """Raise unless ``other``'s ``var`` has the shape and coordinates of ``primary``'s.

    Coordinates match when they are equal, or when either side has plain positions
    ``0..n-1`` (then the two are matched by position).
    """
    shape = _shape(primary, var)
    other_shape = _shape(other, var)
    if shape != other_shape:
        raise ValueError(f"{caller}: {var!r} has shape {shape}, but {other_shape} in the {who}")
    dims, values = _coords(primary, var, shape)
    _, other_values = _coords(other, var, shape)
    for dim, labels, other_labels in zip(dims, values, other_values, strict=True):
        labels, other_labels = np.asarray(labels), np.asarray(other_labels)
        if _is_positions(labels) or _is_positions(other_labels):
            continue
        if labels.shape != other_labels.shape or not np.all(labels == other_labels):
            raise ValueError(
                f"{caller}: dimension {dim!r} of {var!r} has coordinates "
                f"{labels.tolist()} in the approximation but {other_labels.tolist()} in the "
                f"{who}; give both the same coordinates (integer positions 0..n-1 on one side "
                "are matched by position)"
            )


def values(obj: Any, component: Component) -> np.ndarray:
    """The draws of one scalar component, chains concatenated, as a 1-D float array."""
    if is_arviz(obj):
        array = _arviz.sample_values(obj, "posterior", component.var)
    else:
        array = np.asarray(obj[component.var], dtype=np.float64)
    array = array.reshape(array.shape[0] * array.shape[1], *array.shape[2:])
    return np.asarray(array[(slice(None), *component.index)], dtype=np.float64)
