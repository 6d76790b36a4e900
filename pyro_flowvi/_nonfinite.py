"""The non-finite guard of :func:`pyro_flowvi.fit`: find what made a step NaN or infinite."""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "diagnose", "grads_finite", "step_context"]

import contextlib
import math
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.util import get_rng_state, set_rng_state


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient of :func:`fit` became NaN or infinite.

    Attributes:
        step: the 0-based step at which it happened (no update was applied at this step).
        site: the name of the first parameter or sample site found non-finite, or ``None``.
        kind: what ``site`` is: ``"parameter"``, ``"gradient"``, ``"guide site"``,
            ``"model site"`` or ``None``.
        loss: the loss value of the step.
    """

    def __init__(
        self, message: str, *, step: int, site: str | None, kind: str | None, loss: float
    ) -> None:
        super().__init__(message)
        self.step = step
        self.site = site
        self.kind = kind
        self.loss = loss


def step_context(guide: Callable) -> contextlib.AbstractContextManager:
    make = getattr(guide, "step_context", None)
    return make() if callable(make) else contextlib.nullcontext()


def grads_finite(params: set[torch.Tensor]) -> bool:
    sums = [p.grad.sum() for p in params if p.grad is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def _first_nonfinite_site(
    model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> tuple[str, str, str] | None:
    """Re-run guide then model; return ``(kind, name, what)`` of the first non-finite site."""
    # validation would raise on the non-finite parameters this replay is meant to locate
    with torch.no_grad(), step_context(guide), pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    for kind, trace in (("guide site", guide_trace), ("model site", model_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["infer"].get("_deterministic", False):
                continue
            value = site["value"]
            if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
                return kind, name, "its value is not finite"
            with pyro.validation_enabled(False):
                log_prob = site["fn"].log_prob(value)
            if not torch.isfinite(log_prob).all():
                return kind, name, "its log-density is not finite"
    return None


def diagnose(
    step: int,
    loss_value: float,
    params: set[torch.Tensor],
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    rng_state: dict,
) -> NonFiniteLossError | None:
    """Find what made a step non-finite; ``None`` when a finite loss has finite gradients.

    The gradient check before this call sums each gradient, which can overflow to infinity
    for finite gradients; then nothing is found here and the step goes ahead.
    """
    store = pyro.get_param_store()
    named = sorted((store.param_name(p), p) for p in params)
    tail = "; no update was applied at this step, parameters keep their previous values"
    for name, p in named:
        if not torch.isfinite(p).all():
            return NonFiniteLossError(
                f"fit: parameter {name!r} is not finite at step {step} (loss {loss_value}){tail}",
                step=step,
                site=name,
                kind="parameter",
                loss=loss_value,
            )
    if math.isfinite(loss_value):
        for name, p in named:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return NonFiniteLossError(
                    f"fit: the gradient of parameter {name!r} is not finite at step {step} "
                    f"(loss {loss_value}){tail}",
                    step=step,
                    site=name,
                    kind="gradient",
                    loss=loss_value,
                )
        return None
    after = get_rng_state()
    set_rng_state(rng_state)  # replay the draw that produced the bad loss
    try:
        found = _first_nonfinite_site(model, guide, args, kwargs)
    finally:
        set_rng_state(after)
    if found is not None:
        kind, name, what = found
        return NonFiniteLossError(
            f"fit: loss is {loss_value} at step {step}: first non-finite is {kind} {name!r}: "
            f"{what}{tail}",
            step=step,
            site=name,
            kind=kind,
            loss=loss_value,
        )
    return NonFiniteLossError(
        f"fit: loss is {loss_value} at step {step}; no parameter or sample site was found "
        f"non-finite when the step was replayed{tail}",
        step=step,
        site=None,
        kind=None,
        loss=loss_value,
    )
