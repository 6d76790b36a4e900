r"""Convert any fitted Pyro guide into an ArviZ object with the quantities VI diagnostics need.

For each draw :math:`\theta_s \sim q` the guide is traced and the model is replayed against
the guide's trace; the draw's log densities are

.. math::

    \mathrm{lp}_s = \log p(\theta_s, y), \qquad
    \log q_s = \log q(\theta_s), \qquad
    \log w_s = \mathrm{lp}_s - \log q_s,

where :math:`\log q` is the sum of the log densities of *every* sample site of the guide,
auxiliary ones included (the same quantity ``Trace_ELBO`` uses), so the conversion works for
Pyro's autoguides, pyro-flowvi's flow guides and hand-written guide functions alike.

Draws are produced in chunks, vectorized with an outer ``pyro.plate`` left of the model's
plates (as ``pyro.infer.Predictive(parallel=True)`` does). Models or guides that cannot be
vectorized fall back to a loop over draws, with a :class:`VectorizationWarning` that says why.
"""

from __future__ import annotations

__all__ = ["VectorizationWarning", "to_arviz"]

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from . import _arviz
from ._checks import check_full_plates, check_model_call, options, sample_sites
from .resample import PROPOSALS_PER_DRAW, PSISResample, psis_resample

_DRAW_PLATE = "_pyro_flowvi_draws"


class VectorizationWarning(UserWarning):
    """The draws could not be vectorized and are drawn one at a time (much slower)."""


class _VectorizeError(RuntimeError):
    """A site's vectorized shape does not match its single-draw shape."""


@dataclass
class _Layout:
    """What the single-draw (prototype) traces say about each site."""

    latent: list[str] = field(default_factory=list)
    deterministic: set[str] = field(default_factory=set)
    observed: list[str] = field(default_factory=list)
    pointwise: list[str] = field(default_factory=list)
    value_shapes: dict[str, torch.Size] = field(default_factory=dict)
    batch_ndims: dict[str, int] = field(default_factory=dict)
    loglik_shapes: dict[str, torch.Size] = field(default_factory=dict)
    dims: dict[str, list[str]] = field(default_factory=dict)
    observed_values: dict[str, np.ndarray] = field(default_factory=dict)
    model_lp_shapes: dict[str, torch.Size] = field(default_factory=dict)
    guide_lp_shapes: dict[str, torch.Size] = field(default_factory=dict)
    max_plate_nesting: int = 0


def _is_deterministic(site: dict[str, Any]) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def _is_factor(site: dict[str, Any]) -> bool:
    return site["is_observed"] and bool(site["infer"].get("is_auxiliary", False))


def _site_log_prob(site: dict[str, Any]) -> Tensor:
    log_prob = site["fn"].log_prob(site["value"])
    return scale_and_mask(log_prob, site["scale"], site["mask"])


def _site_dims(name: str, site: dict[str, Any]) -> list[str]:
    """Dimension names of a site's value: plate names where known, ArviZ defaults otherwise."""
    batch_dims = len(site["fn"].batch_shape)
    frames = {f.dim: f.name for f in site["cond_indep_stack"] if f.dim is not None}
    names = [frames.get(axis - batch_dims, f"{name}_dim_{axis}") for axis in range(batch_dims)]
    # Unnamed trailing axes are left to ArviZ, which names them "{name}_dim_{axis}" too.
    while names and names[-1] == f"{name}_dim_{len(names) - 1}":
        names.pop()
    return names


def _max_plate_nesting(*traces: Trace) -> int:
    dims = [
        -frame.dim
        for trace in traces
        for _, site in sample_sites(trace)
        for frame in site["cond_indep_stack"]
        if frame.dim is not None
    ]
    return max(dims, default=0)


def _layout(guide_trace: Trace, model_trace: Trace) -> _Layout:
    layout = _Layout(
        max_plate_nesting=_max_plate_nesting(guide_trace, model_trace),
        model_lp_shapes=_log_prob_shapes(model_trace),
        guide_lp_shapes={
            name: shape
            for name, shape in _log_prob_shapes(guide_trace).items()
            if not guide_trace.nodes[name]["is_observed"]
        },
    )
    unguided = []
    for name, site in sample_sites(model_trace):
        if _is_factor(site):
            continue
        value = site["value"]
        if not site["is_observed"] or _is_deterministic(site):
            if not site["is_observed"] and name not in guide_trace.nodes:
                unguided.append(name)
            layout.latent.append(name)
            if site["is_observed"]:
                layout.deterministic.add(name)
            layout.value_shapes[name] = value.shape
            layout.batch_ndims[name] = len(site["fn"].batch_shape)
            layout.dims[name] = _site_dims(name, site)
            continue
        layout.observed.append(name)
        layout.observed_values[name] = value.detach().cpu().numpy()
        layout.dims[name] = _site_dims(name, site)
        if site["cond_indep_stack"]:
            layout.pointwise.append(name)
            layout.loglik_shapes[name] = _site_log_prob(site).shape
    if unguided:
        raise ValueError(
            f"to_arviz: latent sites {unguided} of the model are not sampled by the guide; "
            "every latent site must be in the guide for log q to be the guide's density"
        )
    return layout


def _per_draw(x: Tensor, num_draws: int, shape: torch.Size, site: str) -> Tensor:
    """Reshape a vectorized tensor to ``(num_draws, *shape)``."""
    size = math.prod(shape)
    if x.numel() == num_draws * size:
        return x.reshape((num_draws, *shape))
    if x.numel() == size:
        return x.reshape(shape).expand((num_draws, *shape))
    raise _VectorizeError(
        f"site {site!r}: vectorized shape {tuple(x.shape)} does not hold {num_draws} draws "
        f"of shape {tuple(shape)}"
    )


def _log_prob_shapes(trace: Trace) -> dict[str, torch.Size]:
    return {
        name: _site_log_prob(site).shape
        for name, site in sample_sites(trace)
        if not _is_deterministic(site)
    }


def _sum_per_draw(trace: Trace, shapes: dict[str, torch.Size], num_draws: int) -> Tensor:
    total = torch.zeros(num_draws)
    for name, site in sample_sites(trace):
        if name in shapes:
            lp = _per_draw(_site_log_prob(site), num_draws, shapes[name], name)
            total = total.to(lp) + lp.reshape(num_draws, -1).sum(1)
    return total


def _collect(
    guide_trace: Trace, model_trace: Trace, layout: _Layout, num_draws: int
) -> dict[str, Tensor]:
    """Per-draw lp, log q, latent values and pointwise log-likelihoods of one chunk."""
    out = {
        "lp": _sum_per_draw(model_trace, layout.model_lp_shapes, num_draws),
        "log_q": _sum_per_draw(guide_trace, layout.guide_lp_shapes, num_draws),
    }
    for name in layout.latent:
        value = model_trace.nodes[name]["value"]
        out["posterior/" + name] = _per_draw(value, num_draws, layout.value_shapes[name], name)
    for name in layout.pointwise:
        site = model_trace.nodes[name]
        lp = scale_and_mask(site["fn"].log_prob(site["value"]), 1.0, site["mask"])
        out["log_likelihood/" + name] = _per_draw(lp, num_draws, layout.loglik_shapes[name], name)
    return out


def _traces(guide: Callable, model: Callable, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    return guide_trace, model_trace


def _vectorize(fn: Callable, num_draws: int, dim: int) -> Callable:
    def vectorized(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(_DRAW_PLATE, num_draws, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def _check_lp(model: Callable, args: tuple, kwargs: dict, chunk: dict, layout: _Layout) -> None:
    """Recompute draw 0's log joint without vectorization; raise if it differs."""
    data = {n: chunk["posterior/" + n][0] for n in layout.latent if n not in layout.deterministic}
    trace = poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)
    lp = sum(
        float(_site_log_prob(site).sum())
        for _, site in sample_sites(trace)
        if not _is_deterministic(site)
    )
    expected = float(chunk["lp"][0])
    tol = 1e-7 if chunk["lp"].dtype == torch.float64 else 1e-3
    if not math.isclose(float(lp), expected, rel_tol=tol, abs_tol=tol):
        raise _VectorizeError(
            f"vectorized log joint {expected} differs from the single-draw one {float(lp)}"
        )


def _draw_chunks(
    guide: Callable,
    model: Callable,
    args: tuple,
    kwargs: dict,
    layout: _Layout,
    num_draws: int,
    chunk_size: int,
    parallel: bool | None,
    caller: str,
    stacklevel: int,
) -> tuple[dict[str, Tensor], bool]:
    dim = -(layout.max_plate_nesting + 1)
    chunks: list[dict[str, Tensor]] = []
    done = 0
    while parallel is not False and done < num_draws:
        size = min(chunk_size, num_draws - done)
        if size < 2 and parallel is None:
            break
        try:
            guide_trace, model_trace = _traces(
                _vectorize(guide, size, dim), _vectorize(model, size, dim), args, kwargs
            )
            chunk = _collect(guide_trace, model_trace, layout, size)
            if not chunks and parallel is None:
                _check_lp(model, args, kwargs, chunk, layout)
        except Exception as error:
            if parallel:
                raise
            # Pyro appends a table of trace shapes to its errors: the first line is the reason
            reason = (str(error).strip().splitlines() or [""])[0]
            warnings.warn(
                f"{caller}: the draws could not be vectorized, so they are drawn one at a "
                f"time, which is much slower. The reason: {type(error).__name__}: {reason}. "
                "Make the model and guide broadcast over a batch dimension left of their "
                "plates (no Python floats or .item() of sampled values, a pyro.plate for "
                "every batch dimension), or pass parallel=False to loop without this warning",
                VectorizationWarning,
                stacklevel=stacklevel,
            )
            parallel = False
            break
        chunks.append(chunk)
        done += size
    vectorized = done == num_draws
    while done < num_draws:
        guide_trace, model_trace = _traces(guide, model, args, kwargs)
        chunks.append(_collect(guide_trace, model_trace, layout, 1))
        done += 1
    return {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}, vectorized


def _check_counts(
    caller: str,
    num_draws: int,
    chunk_size: int,
    resample: bool | str,
    num_proposals: int | None,
) -> int:
    """Check the draw counts and the resampling options; return the number of guide draws."""
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"{caller}: num_draws must be an int >= 2, got {num_draws!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{caller}: chunk_size must be a positive int, got {chunk_size!r}")
    if resample not in (False, True, "psis") or not isinstance(resample, (bool, str)):
        raise ValueError(f"{caller}: resample must be False, True or 'psis', got {resample!r}")
    if not resample:
        if num_proposals is not None:
            raise ValueError(
                f"{caller}: num_proposals={num_proposals!r} is used only with resample=True"
            )
        return num_draws
    if num_proposals is None:
        return PROPOSALS_PER_DRAW * num_draws
    if isinstance(num_proposals, bool) or not isinstance(num_proposals, int) or num_proposals < 2:
        raise ValueError(f"{caller}: num_proposals must be an int >= 2, got {num_proposals!r}")
    return num_proposals


def _draw(
    guide: Callable,
    model: Callable,
    args: tuple,
    kwargs: dict,
    num_draws: int,
    chunk_size: int,
    parallel: bool | None,
    caller: str,
    stacklevel: int,
) -> tuple[_Layout, dict[str, Tensor], bool]:
    """Check the guide and the plates, then draw: ``(layout, draws, vectorized)``.

    ``stacklevel`` is that of a warning issued by the caller itself (2: the caller's caller).

    ``draws`` holds ``lp``, ``log_q``, ``posterior/<site>`` and ``log_likelihood/<site>``,
    each with the draws along the first axis.
    """
    if not callable(guide):
        raise TypeError(f"{caller}: the guide must be callable, got {type(guide).__name__}")
    with torch.no_grad():
        guide_trace, model_trace = _traces(guide, model, args, kwargs)
        check_full_plates(guide_trace, model_trace, model, args, kwargs)
        layout = _layout(guide_trace, model_trace)
        draws, vectorized = _draw_chunks(
            guide,
            model,
            args,
            kwargs,
            layout,
            num_draws,
            chunk_size,
            parallel,
            caller,
            stacklevel + 2,
        )
    return layout, draws, vectorized


def _predict(
    model: Callable,
    args: tuple,
    kwargs: dict,
    layout: _Layout,
    latents: dict[str, Tensor],
    sites: Sequence[str],
    parallel: bool,
) -> dict[str, Tensor]:
    """Draw observed ``sites`` of the model, unconditioned, given latent draws ``(S, *shape)``.

    Vectorized like the draws (an outer plate left of the model's plates); one draw at a time
    when ``parallel`` is false or the vectorized pass fails.
    """
    if not sites:
        return {}
    num = next(iter(latents.values())).shape[0]
    unconditioned = poutine.uncondition(model)
    with torch.no_grad():
        if parallel:
            dim = -(layout.max_plate_nesting + 1)
            data = {
                name: value.reshape(
                    (num,)
                    + (1,) * (layout.max_plate_nesting - layout.batch_ndims[name])
                    + tuple(layout.value_shapes[name])
                )
                for name, value in latents.items()
            }
            try:
                vectorized = poutine.condition(_vectorize(unconditioned, num, dim), data=data)
                trace = poutine.trace(vectorized).get_trace(*args, **kwargs)
                return {
                    name: _per_draw(
                        trace.nodes[name]["value"],
                        num,
                        torch.Size(layout.observed_values[name].shape),
                        name,
                    )
                    for name in sites
                }
            except Exception:  # as in to_arviz: a model that does not vectorize loops
                pass
        rows = []
        for s in range(num):
            conditioned = poutine.condition(
                unconditioned, data={name: value[s] for name, value in latents.items()}
            )
            trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
            rows.append({name: trace.nodes[name]["value"] for name in sites})
        return {name: torch.stack([row[name] for row in rows]) for name in sites}


def _numpy_rng() -> np.random.Generator:
    """A NumPy generator seeded from torch's global one, so ``pyro.set_rng_seed`` fixes it."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


def _resample_draws(
    draws: dict[str, Tensor], num_draws: int, caller: str, stacklevel: int
) -> tuple[dict[str, Tensor], PSISResample]:
    """Keep ``num_draws`` of the draws by their PSIS weights (warns when k-hat is too large)."""
    log_ratios = (draws["lp"] - draws["log_q"]).detach().cpu().double().numpy()
    if not np.all(np.isfinite(log_ratios)):
        bad = int(np.sum(~np.isfinite(log_ratios)))
        raise ValueError(f"{caller}: {bad} proposals have a non-finite log importance ratio")
    picked = psis_resample(log_ratios, num_draws, rng=_numpy_rng(), stacklevel=stacklevel + 2)
    index = torch.as_tensor(picked.indices, device=draws["lp"].device)
    return {key: value[index] for key, value in draws.items()}, picked


def to_arviz(
    guide: Callable,
    model: Callable,
    *args: Any,
    num_draws: int = 1000,
    fit_result: Any | None = None,
    chunk_size: int = 1000,
    parallel: bool | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
    resample: bool | str = False,
    num_proposals: int | None = None,
    **kwargs: Any,
) -> Any:
    """Draw from any Pyro guide and return an ArviZ object for posterior and VI diagnostics.

    With ``resample=True`` the posterior holds importance-resampled draws: ``num_proposals``
    draws of the guide are weighted by their Pareto-smoothed importance ratios and
    ``num_draws`` of them are kept (without replacement when ``num_draws <= num_proposals``;
    :func:`~pyro_flowvi.diagnostics.psis_resample`), as multi-path Pathfinder does. The
    k-hat of the proposals goes beside them, and a
    :class:`~pyro_flowvi.diagnostics.VIDiagnosticWarning` says when it is too large for the
    resample to be trusted.

    Arguments:
        guide: a fitted guide: a pyro-flowvi flow guide, a Pyro autoguide, or a guide function.
        model: the model the guide approximates.
        *args: positional arguments of ``model`` and ``guide`` (the full data: LOO needs the
            log-likelihood of every observation).
        num_draws: number of draws :math:`S` from the guide (at least 2).
        fit_result: a :class:`pyro_flowvi.FitResult` (or any object with ``elbo_trace`` and
            ``wall_time``); its ELBO trace goes to the ``vi_fit`` group.
        chunk_size: draws per vectorized pass (bounds memory).
        parallel: ``True`` vectorizes (errors propagate), ``False`` loops over draws, ``None``
            vectorizes, checks the first draw's log joint against an unvectorized run and
            falls back to the loop if that fails.
        dims: dimension names per variable, overriding the plate names.
        coords: coordinates of named dimensions, as in ``arviz.from_dict``.
        resample: ``False`` (default), or ``True`` / ``"psis"`` for PSIS importance
            resampling.
        num_proposals: guide draws to resample from (default ``10 * num_draws``; only with
            ``resample``).
        **kwargs: keyword arguments of ``model`` and ``guide``.

    Returns:
        ``arviz.InferenceData`` (ArviZ < 1) or ``xarray.DataTree`` (ArviZ 1.x) with groups

        - ``posterior``: one variable per latent (and deterministic) site of the model, shape
          ``(chain=1, draw=S, *site shape)``, dims named after the site's plates;
        - ``sample_stats``: ``lp`` = log p(theta, y), ``log_q``, ``log_weight = lp - log_q``;
        - ``log_likelihood``: pointwise log-likelihood of each observed site inside a plate;
        - ``observed_data``: the observed values;
        - ``vi_fit`` (when ``fit_result`` is given): ``elbo`` over ``step``, with the fit's
          ``wall_time`` and ``num_steps`` as attributes.

        With ``resample``, ``posterior``, ``sample_stats`` (which adds ``proposal``, the index
        of each kept proposal) and ``log_likelihood`` hold the kept draws; every group has
        the attributes ``resampled="psis"``, ``psis_khat``, ``psis_khat_threshold``,
        ``num_proposals``, ``replace`` (0 or 1) and ``is_ess``; and the group
        ``vi_proposals`` holds ``log_weight`` of all proposals (dimension ``proposal``),
        from which :func:`~pyro_flowvi.diagnostics.vi_diagnostics` judges the guide.

    Raises:
        ValueError: if a latent site of the model is missing from the guide, a plate is
            subsampled (by the model, or by a guide that froze a mini-batch size: the message
            says which, and how to fix it), or ``num_draws`` is not an int >= 2.
        TypeError: if a keyword is neither an option of ``to_arviz`` nor a parameter of the
            model (a misspelt option such as ``num_samples``), or the model's signature does
            not accept ``args``.

    Warns:
        VectorizationWarning: when ``parallel=None`` falls back to drawing one at a time,
            with the reason.
        VIDiagnosticWarning: with ``resample``, when the proposals' k-hat is at or above
            ``min(1 - 1/log10(num_proposals), 0.7)``: the resample cannot be trusted.

    Example:
        >>> guide = AutoNormal(model)
        >>> result = fit(model, guide, data, num_steps=2000)
        >>> idata = to_arviz(guide, model, data, num_draws=2000, fit_result=result)
        >>> vi_diagnostics(idata)
    """
    num_guide_draws = _check_counts("to_arviz", num_draws, chunk_size, resample, num_proposals)
    check_model_call("to_arviz", model, args, kwargs, options(to_arviz))
    layout, draws, _ = _draw(
        guide, model, args, kwargs, num_guide_draws, chunk_size, parallel, "to_arviz", 2
    )

    def numpy(x: Tensor) -> np.ndarray:
        return x.detach().cpu().double().numpy()[None]

    name = getattr(guide, "__name__", None) or type(guide).__name__
    attrs: dict[str, Any] = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "approximation": str(name),
    }
    extra: dict[str, Any] = {}
    stats = {}
    if resample:
        proposals = numpy(draws["lp"] - draws["log_q"])[0]
        draws, picked = _resample_draws(draws, num_draws, "to_arviz", 2)
        stats["proposal"] = picked.indices[None]
        attrs.update(
            {
                "resampled": "psis",
                "psis_khat": picked.khat,
                "psis_khat_threshold": picked.khat_threshold,
                "num_proposals": picked.num_proposals,
                # ints, not bools: netCDF attributes cannot hold bools
                "replace": int(picked.replace),
                "is_ess": picked.is_ess,
            }
        )
        extra[_arviz.PROPOSALS_GROUP] = (
            {"log_weight": (["proposal"], proposals)},
            {"psis_khat": picked.khat, "num_proposals": picked.num_proposals},
        )
    lp, log_q = numpy(draws["lp"]), numpy(draws["log_q"])
    groups = {
        "posterior": {n: numpy(draws["posterior/" + n]) for n in layout.latent},
        "sample_stats": {"lp": lp, "log_q": log_q, "log_weight": lp - log_q, **stats},
        "log_likelihood": {n: numpy(draws["log_likelihood/" + n]) for n in layout.pointwise},
        "observed_data": layout.observed_values,
    }
    all_dims = {k: v for k, v in layout.dims.items() if v}
    all_dims.update({k: list(v) for k, v in (dims or {}).items()})
    if fit_result is not None:
        elbo = np.asarray(fit_result.elbo_trace, dtype=np.float64)
        extra[_arviz.FIT_GROUP] = (
            {"elbo": (["step"], elbo)},
            {"wall_time": float(fit_result.wall_time), "num_steps": int(elbo.shape[0])},
        )
    return _arviz.from_groups(
        groups, dims=all_dims, coords=coords, attrs=attrs, extra_groups=extra or None
    )
