"""Load a posteriordb reference posterior: its Pyro model, data and gold-standard draws.

The data and draws ship with the package in ``pyro_flowvi/benchmarks/data`` (posteriordb
snapshot 28f8d3d, BSD-3 licence in ``data/LICENCE.md``); nothing is downloaded. Another copy can
be read with ``load(name, data_dir=PATH)``.

Example:
    >>> from pyro_flowvi.benchmarks import load
    >>> bench = load("eight_schools_centered")
    >>> bench.model(*bench.args)            # a Pyro model
    >>> bench.reference["theta"].shape      # (chain, draw, 8) = (10, 1000, 8)
"""

from __future__ import annotations

__all__ = ["NAMES", "ReferencePosterior", "load", "reference_draws", "reference_to_arviz"]

import functools
import json
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import models

_DATA_PACKAGE = "pyro_flowvi.benchmarks"

# short name -> (posteriordb posterior name, posteriordb data name, dimension, difficulty)
_POSTERIORS: dict[str, tuple[str, str, int, str]] = {
    "eight_schools_centered": (
        "eight_schools-eight_schools_centered",
        "eight_schools",
        10,
        "funnel between tau and theta",
    ),
    "kilpisjarvi": (
        "kilpisjarvi_mod-kilpisjarvi",
        "kilpisjarvi_mod",
        3,
        "corr(alpha, beta) = -0.99999",
    ),
    "diamonds": (
        "diamonds-diamonds",
        "diamonds",
        26,
        "5000 rows, ill-conditioned (condition number ~2.6e5)",
    ),
    "gp_pois_regr": (
        "gp_pois_regr-gp_pois_regr",
        "gp_pois_regr",
        13,
        "latent Gaussian process, Poisson counts",
    ),
    "garch11": ("garch-garch11", "garch", 4, "nested constraint beta1 < 1 - alpha1"),
    "arK": ("arK-arK", "arK", 7, "AR(5) coefficients, moderate correlation"),
}

#: Short names of the six reference posteriors, in the order of the benchmark table.
NAMES: tuple[str, ...] = tuple(_POSTERIORS)


@dataclass(frozen=True)
class ReferencePosterior:
    """A posteriordb posterior: the Pyro model, its data and the reference draws.

    Attributes:
        name: short name (one of :data:`NAMES`).
        posterior_name: posteriordb name, e.g. ``"eight_schools-eight_schools_centered"``.
        model: the Pyro model; call it as ``model(*args)``.
        args: positional arguments of ``model``: data tensors in the default dtype and
            Python numbers.
        data: the posteriordb data dictionary as read from JSON (lists and numbers).
        reference: reference draws on the constrained scale, one array per parameter of shape
            ``(chain, draw, *shape)`` = ``(10, 1000, *shape)``, named as the model's sites.
        dim: number of scalar parameters in ``reference``.
        difficulty: what makes this posterior hard for variational inference.
        dims: dimension names of the reference variables that live in a plate of the model,
            as :func:`~pyro_flowvi.diagnostics.to_arviz` names them (``{"theta": ["school"]}``);
            other axes get ArviZ's default names, as in ``to_arviz``.
        init_loc_fn: an initialization strategy for autoguides that copes with the model's
            flat priors (:func:`~pyro_flowvi.benchmarks.models.init_to_median_or_feasible`).
    """

    name: str
    posterior_name: str
    model: Callable[..., None]
    args: tuple[Any, ...]
    data: dict[str, Any]
    reference: dict[str, np.ndarray]
    dim: int
    difficulty: str
    dims: dict[str, list[str]] = field(default_factory=dict)
    init_loc_fn: Callable[..., Any] = field(default=models.init_to_median_or_feasible)


def _resolve(name: str) -> str:
    if name in _POSTERIORS:
        return name
    for short, (posterior_name, *_) in _POSTERIORS.items():
        if name == posterior_name:
            return short
    raise ValueError(
        f"unknown reference posterior {name!r}; expected one of {list(NAMES)} "
        f"or their posteriordb names {[p[0] for p in _POSTERIORS.values()]}"
    )


@functools.lru_cache(maxsize=16)
def _read_json_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if m.endswith(".json")]
        if len(members) != 1:
            raise ValueError(f"{path} should hold exactly one JSON file, found {members}")
        return json.loads(archive.read(members[0]))


def _data_file(filename: str, data_dir: str | Path | None) -> str:
    if data_dir is not None:
        path = Path(data_dir) / filename
    else:
        path = Path(str(resources.files(_DATA_PACKAGE).joinpath("data", filename)))
    if not path.is_file():
        raise FileNotFoundError(f"posteriordb file {filename!r} not found at {str(path)!r}")
    return str(path)


_INDEXED = re.compile(r"^(?P<base>[^\[]+)\[(?P<index>[0-9, ]+)\]$")


def reference_draws(chains: list[Mapping[str, list[float]]]) -> dict[str, np.ndarray]:
    """Stack posteriordb draws (a list of chains of ``{"theta[1]": [...], ...}``) into arrays.

    Stan's 1-based, comma-separated indices become array axes: ``theta[1]`` ... ``theta[8]``
    become ``theta`` of shape ``(chain, draw, 8)``.

    Arguments:
        chains: the JSON content of a posteriordb draws file.

    Returns:
        ``{name: array of shape (chain, draw, *shape)}``, in the order of first appearance.
    """
    if not chains:
        raise ValueError("reference_draws: got no chains")
    columns: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    for key in chains[0]:
        values = np.stack([np.asarray(chain[key], dtype=np.float64) for chain in chains])
        match = _INDEXED.match(key)
        if match is None:
            columns.setdefault(key, {})[()] = values
        else:
            index = tuple(int(i) - 1 for i in match["index"].split(","))
            columns.setdefault(match["base"], {})[index] = values
    draws: dict[str, np.ndarray] = {}
    for base, entries in columns.items():
        if list(entries) == [()]:
            draws[base] = entries[()]
            continue
        shape = tuple(
            max(index[d] for index in entries) + 1 for d in range(len(next(iter(entries))))
        )
        array = np.full(entries[next(iter(entries))].shape + shape, np.nan)
        for index, values in entries.items():
            array[(Ellipsis, *index)] = values
        if np.isnan(array).any():
            raise ValueError(f"reference_draws: {base!r} has missing indices for shape {shape}")
        draws[base] = array
    return draws


def _tensor(values: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.get_default_dtype())


def _build_args(name: str, data: dict[str, Any]) -> tuple[Any, ...]:
    if name == "eight_schools_centered":
        return (_tensor(data["sigma"]), _tensor(data["y"]))
    if name == "kilpisjarvi":
        return (
            _tensor(data["x"]),
            _tensor(data["y"]),
            float(data["pmualpha"]),
            float(data["psalpha"]),
            float(data["pmubeta"]),
            float(data["psbeta"]),
        )
    if name == "diamonds":
        X = _tensor(data["X"])[:, 1:]
        return (X - X.mean(0), _tensor(data["Y"]))
    if name == "gp_pois_regr":
        return (_tensor(data["x"]), _tensor(data["k"]))
    if name == "garch11":
        return (_tensor(data["y"]), float(data["sigma1"]))
    if name == "arK":
        return (_tensor(data["y"]), int(data["K"]))
    raise AssertionError(f"no argument builder for {name!r}")


def load(name: str, *, data_dir: str | Path | None = None) -> ReferencePosterior:
    """Load one of the six reference posteriors.

    Arguments:
        name: a short name from :data:`NAMES` (``"eight_schools_centered"``,
            ``"kilpisjarvi"``, ``"diamonds"``, ``"gp_pois_regr"``, ``"garch11"``, ``"arK"``)
            or the posteriordb name (``"garch-garch11"``).
        data_dir: a folder holding posteriordb's ``data-*.json.zip`` and
            ``draws-*.json.zip`` files; by default the copy shipped with the package.

    Returns:
        A :class:`ReferencePosterior`; tensors are built in the current default dtype
        (use float64: the reference draws resolve differences that float32 rounds away).
    """
    short = _resolve(name)
    posterior_name, data_name, dim, difficulty = _POSTERIORS[short]
    data = _read_json_zip(_data_file(f"data-{data_name}.json.zip", data_dir))
    chains = _read_json_zip(_data_file(f"draws-{posterior_name}.json.zip", data_dir))
    reference = reference_draws(chains)
    num_scalars = sum(int(np.prod(v.shape[2:])) for v in reference.values())
    if num_scalars != dim:
        raise ValueError(f"{posterior_name}: expected {dim} parameters, found {num_scalars}")
    return ReferencePosterior(
        name=short,
        posterior_name=posterior_name,
        model=getattr(models, short),
        args=_build_args(short, data),
        data=data,
        reference=reference,
        dim=dim,
        difficulty=difficulty,
        dims={"theta": ["school"]} if short == "eight_schools_centered" else {},
    )


def reference_to_arviz(
    reference: ReferencePosterior | Mapping[str, np.ndarray],
    *,
    dims: Mapping[str, list[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
) -> Any:
    """Wrap reference draws in an ArviZ object (InferenceData on ArviZ < 1, DataTree on 1.x).

    Arguments:
        reference: a :class:`ReferencePosterior` or ``{name: array (chain, draw, *shape)}``.
        dims: dimension names per variable, as in ``arviz.from_dict`` (default: those of the
            :class:`ReferencePosterior`, which match :func:`~pyro_flowvi.diagnostics.to_arviz`).
        coords: optional coordinates, as in ``arviz.from_dict``.

    Returns:
        An ArviZ object with one ``posterior`` group.
    """
    from ..diagnostics import _arviz

    draws = reference.reference if isinstance(reference, ReferencePosterior) else reference
    if dims is None and isinstance(reference, ReferencePosterior):
        dims = reference.dims
    return _arviz.from_groups(
        {"posterior": {k: np.asarray(v) for k, v in draws.items()}},
        dims=dims,
        coords=coords,
    )
