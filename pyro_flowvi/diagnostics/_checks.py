"""Checks of to_arviz's inputs that give clear errors before anything is drawn.

A misspelt option that would reach the model as an unknown keyword, and plates subsampled by
the model or by a guide that froze the mini-batch size of its first call.
"""

from __future__ import annotations

__all__ = [
    "check_full_plates",
    "check_model_call",
    "options",
    "sample_sites",
    "subsampled_frames",
]

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

# words users coming from Predictive or MCMC type for the options
_SYNONYMS = {"num_samples": "num_draws", "samples": "num_draws", "draws": "num_draws"}


def sample_sites(trace: Trace) -> list[tuple[str, dict[str, Any]]]:
    return [
        (n, s)
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and not site_is_subsample(s)
    ]


def subsampled_frames(trace: Trace) -> dict[str, tuple[int, int]]:
    """``{plate: (size, full_size)}`` of the subsampled plates of a trace."""
    return {
        frame.name: (frame.size, frame.full_size)
        for _, site in sample_sites(trace)
        for frame in site["cond_indep_stack"]
        if frame.full_size is not None and frame.size != frame.full_size
    }


def check_full_plates(
    guide_trace: Trace, model_trace: Trace, model: Callable, args: tuple, kwargs: dict
) -> None:
    """Raise if a plate is subsampled, saying whether the guide or the model subsamples it.

    A Pyro autoguide builds its plates from the model trace of its first call and keeps their
    subsample sizes; replayed against it, the model takes the guide's mini-batch indices even
    when it is given the full data set.
    """
    subsampled = subsampled_frames(model_trace)
    if not subsampled:
        return
    plate, (size, full_size) = next(iter(subsampled.items()))
    by_guide = plate in guide_trace.nodes and site_is_subsample(guide_trace.nodes[plate])
    by_guide = by_guide and plate in subsampled_frames(guide_trace)
    try:
        by_model: bool | None = plate in subsampled_frames(
            poutine.trace(model).get_trace(*args, **kwargs)
        )
    except Exception:  # the prior cannot be sampled (e.g. an improper site): do not guess
        by_model = None
    needs = "to_arviz needs every observation (LOO scores each one)"
    if by_model:
        raise ValueError(
            f"to_arviz: the model subsamples plate {plate!r} to {size} of {full_size} with "
            f"these arguments; {needs}: pass the arguments under which the model uses the "
            "full data set (no mini-batch size)"
        )
    fix = (
        f"build the guide with plates that follow the model's arguments, e.g. "
        f"AutoNormal(model, create_plates=fn) where fn(*args, **kwargs) returns "
        f"pyro.plate({plate!r}, {full_size}, subsample_size=<the batch size in args>), "
        "so that it uses the full plate when the model does"
    )
    if by_guide and by_model is False:
        raise ValueError(
            f"to_arviz: the guide subsamples plate {plate!r} to {size} of {full_size} "
            "although the model, called with these arguments, uses the full plate: the "
            f"guide froze the mini-batch size it was first called with ({size}), as Pyro "
            f"autoguides do when trained on mini-batches; {needs}. To fix it, {fix}"
        )
    raise ValueError(
        f"to_arviz: plate {plate!r} is subsampled to {size} of {full_size}; {needs}. Pass "
        "the full data set; if you did, the guide froze the mini-batch size of its first "
        f"call (Pyro autoguides do): {fix}"
    )


def _signature(fn: Callable) -> inspect.Signature | None:
    """The call signature of a model (``forward`` for an ``nn.Module``), if Python knows it."""
    try:
        return inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn)
    except (TypeError, ValueError):
        return None


def check_model_call(
    caller: str, model: Callable, args: tuple, kwargs: Mapping[str, Any], options: Sequence[str]
) -> None:
    """Raise a clear ``TypeError`` before drawing if ``model(*args, **kwargs)`` cannot bind.

    Keywords that are not ``caller``'s own ``options`` go to the model; one the model does not
    take is most likely a misspelt option (``num_samples`` for ``num_draws``), so the error
    names the closest option.
    """
    if not callable(model):
        raise TypeError(f"{caller}: the model must be callable, got {type(model).__name__}")
    signature = _signature(model)
    if signature is None:
        return
    name = getattr(model, "__name__", None) or type(model).__name__
    params = signature.parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        for key in kwargs:
            if key in signature.parameters:
                continue
            guess = _SYNONYMS.get(key) or next(
                iter(difflib.get_close_matches(key, options, n=1, cutoff=0.6)), None
            )
            hint = f"; did you mean {guess!r}?" if guess else ""
            raise TypeError(
                f"{caller}: unknown keyword {key!r}: it is not an option of {caller} "
                f"({', '.join(options)}), and the model {name}{signature} does not take it"
                f"{hint}"
            )
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"{caller}: the model {name}{signature} cannot be called with "
            f"{len(args)} positional arguments and keywords {sorted(kwargs)}: {error}"
        ) from None


def options(fn: Callable) -> list[str]:
    """The keyword-only options of one of this package's functions."""
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
