"""The SVI loop as one call: ELBO trace, progress bar, NaN guard, Ctrl-C and checkpoints.

:func:`fit` runs stochastic variational inference for any Pyro model and guide and returns a
:class:`FitResult` with the ELBO of every step and the wall time. Each step does what
:meth:`pyro.infer.SVI.step` does (loss and gradients, then one optimizer update), with one
difference: the loss and the gradients are checked *before* the update, so a non-finite step
stops the fit with the parameters still at their last finite values and an error that names
the parameter or sample site responsible.

Guides that need an effect handler around every step (for example the local
reparameterization of multiplicative-normalizing-flow weights) expose a method
``step_context()`` that returns a context manager; :func:`fit` enters a fresh one around each
step.
"""

from __future__ import annotations

__all__ = ["FitResult", "NonFiniteLossError", "fit"]

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.util import zero_grads
from pyro.util import get_rng_state, set_rng_state
from torch.distributions import transform_to

_LOG = logging.getLogger(__name__)
_CHECKPOINT_VERSION = 1


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


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        elbo_trace: the ELBO estimate (minus the loss) of every step, shape ``(num_steps,)``;
            after a resume it holds the steps before the checkpoint too.
        wall_time: seconds spent in the optimization loop, summed over resumed runs.
        num_steps: number of steps completed (``len(elbo_trace)``).
        interrupted: whether the fit was stopped with Ctrl-C (``KeyboardInterrupt``).
        resumed_from: the step a checkpoint was resumed from (0 for a fresh fit).
        checkpoint: the checkpoint path, if any.
    """

    elbo_trace: np.ndarray
    wall_time: float
    num_steps: int
    interrupted: bool = False
    resumed_from: int = 0
    checkpoint: str | None = None

    def smoothed_elbo(self, window: int | None = None) -> float:
        """Mean ELBO over the last ``window`` steps (default: the last 10%, at least one).

        Raises:
            ValueError: if no step was completed or ``window`` is not positive.
        """
        if self.num_steps == 0:
            raise ValueError("FitResult.smoothed_elbo: no step was completed")
        if window is None:
            window = max(1, self.num_steps // 10)
        if window < 1:
            raise ValueError(f"FitResult.smoothed_elbo: window must be >= 1, got {window}")
        return float(np.mean(self.elbo_trace[-window:]))

    def __repr__(self) -> str:
        last = f"{self.smoothed_elbo():.4g}" if self.num_steps else "n/a"
        return (
            f"FitResult(num_steps={self.num_steps}, smoothed_elbo={last}, "
            f"wall_time={self.wall_time:.2f}s, interrupted={self.interrupted})"
        )


def _step_context(guide: Callable) -> contextlib.AbstractContextManager:
    make = getattr(guide, "step_context", None)
    return make() if callable(make) else contextlib.nullcontext()


def _loss_and_grads(loss: Any, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
    if hasattr(loss, "loss_and_grads"):
        return loss.loss_and_grads(model, guide, *args, **kwargs)
    value = loss(model, guide, *args, **kwargs)
    value.backward()
    return value


def _as_float(loss: Any) -> float:
    if isinstance(loss, tuple):
        raise TypeError("fit: the loss must return one number, got a tuple")
    if torch.is_tensor(loss):
        return float(loss.detach())
    return float(loss)


def _grads_finite(params: set[torch.Tensor]) -> bool:
    sums = [p.grad.sum() for p in params if p.grad is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def _first_nonfinite_site(
    model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> tuple[str, str, str] | None:
    """Re-run guide then model; return ``(kind, name, what)`` of the first non-finite site."""
    # validation would raise on the non-finite parameters this replay is meant to locate
    with torch.no_grad(), _step_context(guide), pyro.validation_enabled(False):
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


def _diagnose(
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


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="fit", unit="step", dynamic_ncols=True)


@contextlib.contextmanager
def _closing(bar: Any) -> Iterator[Any]:
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _module_buffers(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return {k: v.detach().clone() for k, v in obj.named_buffers()}
    return {}


def _save_checkpoint(
    path: Path,
    optim: Any,
    model: Callable,
    guide: Callable,
    elbo: list[float],
    wall_time: float,
) -> None:
    state = {
        "version": _CHECKPOINT_VERSION,
        "step": len(elbo),
        "elbo_trace": list(elbo),
        "wall_time": wall_time,
        "param_store": pyro.get_param_store().get_state(),
        "optim": optim.get_state(),
        "rng": get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "model_buffers": _module_buffers(model),
        "guide_buffers": _module_buffers(guide),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _restore_params(saved: dict, path: Path) -> None:
    store = pyro.get_param_store()
    current = dict(store.named_parameters())
    missing = sorted(set(current) - set(saved["params"]))
    if missing:
        raise ValueError(
            f"fit: checkpoint {str(path)!r} does not match this model and guide: it has no "
            f"values for parameters {missing}"
        )
    with torch.no_grad():
        for name, value in saved["params"].items():
            if name not in current:
                constraint = saved["constraints"][name]
                pyro.param(name, transform_to(constraint)(value.detach()), constraint=constraint)
                continue
            if current[name].shape != value.shape:
                raise ValueError(
                    f"fit: checkpoint {str(path)!r} holds parameter {name!r} with shape "
                    f"{tuple(value.shape)}, the model and guide have {tuple(current[name].shape)}"
                )
            # in place, so modules that own these tensors and the optimizer keep pointing at them
            current[name].copy_(value)


def _load_buffers(obj: Any, buffers: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.nn.Module) and buffers:
        own = dict(obj.named_buffers())
        with torch.no_grad():
            for name, value in buffers.items():
                if name in own:
                    own[name].copy_(value)


def _resume(
    path: Path, optim: Any, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"fit: {str(path)!r} is not a pyro-flowvi fit checkpoint")
    # Create every parameter (lazy autoguides build theirs on the first call), then overwrite.
    with torch.no_grad(), _step_context(guide):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    _load_buffers(model, state["model_buffers"])
    _load_buffers(guide, state["guide_buffers"])
    _restore_params(state["param_store"], path)
    optim.set_state(state["optim"])
    set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def fit(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_steps: int,
    optim: Any | None = None,
    loss: Any | None = None,
    lr: float | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    **kwargs: Any,
) -> FitResult:
    """Fit ``guide`` to ``model`` by stochastic variational inference.

    Arguments:
        model: a Pyro model.
        guide: a Pyro guide (a pyro-flowvi flow guide, a Pyro autoguide or a function). If it
            has a method ``step_context()``, the context manager it returns is entered around
            every step.
        *args: positional arguments of ``model`` and ``guide``.
        num_steps: total number of steps; a resumed fit runs only the steps still missing.
        optim: a Pyro optimizer (default ``pyro.optim.Adam({"lr": lr})``).
        loss: an ELBO object (default :class:`pyro.infer.Trace_ELBO`) or a callable
            ``loss(model, guide, *args, **kwargs)`` returning a differentiable tensor.
        lr: learning rate of the default optimizer (default ``1e-2``); only without ``optim``.
        progress: show a tqdm progress bar (step, smoothed ELBO, rate). It stays quiet when
            stderr is not a terminal or tqdm is not installed.
        checkpoint: a file path. The parameter store, the optimizer state, the RNG state and
            the ELBO trace are saved there every ``checkpoint_every`` steps, at the end and
            on Ctrl-C; if the file exists, the fit resumes from it and reproduces the trace of
            an uninterrupted fit. Checkpoints are pickles: load only your own.
        checkpoint_every: steps between checkpoints.
        **kwargs: keyword arguments of ``model`` and ``guide``.

    Returns:
        A :class:`FitResult`. Parameters stay in Pyro's parameter store (and in the guide).

    Raises:
        NonFiniteLossError: at the first step whose loss or gradient is NaN or infinite,
            naming the first non-finite parameter or sample site; no update is applied at
            that step.
        ValueError: for a bad ``num_steps``, ``lr``, ``checkpoint_every`` or a checkpoint
            that does not match the model and guide.

    Ctrl-C (``KeyboardInterrupt``) ends the loop cleanly: the parameters learned so far are
    kept, a checkpoint is written when one was asked for, and the result has
    ``interrupted=True``.

    Example:
        >>> guide = AutoIAFGuide(model)
        >>> result = fit(model, guide, data, num_steps=5000, lr=1e-2, checkpoint="fit.pt")
        >>> result.elbo_trace[-10:]
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"fit: num_steps must be an int >= 0, got {num_steps!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ValueError(f"fit: checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if checkpoint_every < 1:
        raise ValueError(f"fit: checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if optim is not None and lr is not None:
        raise ValueError(f"fit: pass lr (got {lr!r}) or optim, not both")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"fit: lr must be a positive number, got {lr!r}")
    if optim is None:
        optim = pyro.optim.Adam({"lr": 1e-2 if lr is None else float(lr)})
    if loss is None:
        loss = Trace_ELBO()
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and not (hasattr(optim, "get_state") and hasattr(optim, "set_state")):
        raise ValueError(
            f"fit: checkpoints need an optimizer with get_state/set_state, got {type(optim)}"
        )

    elbo: list[float] = []
    prior_time = 0.0
    if path is not None and path.exists():
        state = _resume(path, optim, model, guide, args, kwargs)
        elbo = [float(x) for x in state["elbo_trace"]]
        prior_time = float(state["wall_time"])
        _LOG.info("fit: resumed from %s at step %d", path, len(elbo))
    resumed_from = len(elbo)

    interrupted = False
    smoothed = elbo[-1] if elbo else None
    start = time.perf_counter()

    def elapsed() -> float:
        return prior_time + time.perf_counter() - start

    rng_state = None
    with (
        _closing(_progress_bar(progress, num_steps, min(resumed_from, num_steps))) as bar,
        warnings.catch_warnings(),
    ):
        # Pyro's "Encountered NaN: loss" would only precede the NonFiniteLossError below
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        try:
            for step in range(resumed_from, num_steps):
                rng_state = get_rng_state()
                with poutine.trace(param_only=True) as capture, _step_context(guide):
                    loss_value = _as_float(_loss_and_grads(loss, model, guide, args, kwargs))
                params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
                if not (math.isfinite(loss_value) and _grads_finite(params)):
                    error = _diagnose(
                        step, loss_value, params, model, guide, args, kwargs, rng_state
                    )
                    if error is not None:
                        zero_grads(params)
                        raise error
                optim(params)
                zero_grads(params)
                elbo.append(-loss_value)
                rng_state = None  # the step is complete
                smoothed = -loss_value if smoothed is None else 0.95 * smoothed - 0.05 * loss_value
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0 or step == num_steps - 1:
                        bar.set_postfix(elbo=f"{smoothed:.4g}", refresh=False)
                if path is not None and len(elbo) % checkpoint_every == 0:
                    _save_checkpoint(path, optim, model, guide, elbo, elapsed())
        except KeyboardInterrupt:
            interrupted = True
            if rng_state is not None:
                # interrupted inside a step, before its update: rewind the step's draws too,
                # so that a resume from the checkpoint repeats it exactly
                set_rng_state(rng_state)
            # drop gradients a half-finished step may have left behind
            for _, p in pyro.get_param_store().named_parameters():
                p.grad = None
            _LOG.warning(
                "fit: interrupted after %d steps; the parameters learned so far are kept",
                len(elbo),
            )
    wall_time = elapsed()
    if path is not None and (interrupted or len(elbo) % checkpoint_every != 0 or not elbo):
        _save_checkpoint(path, optim, model, guide, elbo, wall_time)
    return FitResult(
        elbo_trace=np.asarray(elbo, dtype=np.float64),
        wall_time=wall_time,
        num_steps=len(elbo),
        interrupted=interrupted,
        resumed_from=resumed_from,
        checkpoint=None if path is None else str(path),
    )
