"""The SVI loop as one call: ELBO trace, progress bar, NaN and divergence guards, checkpoints.

:func:`fit` runs stochastic variational inference for any Pyro model and guide and returns a
:class:`FitResult` with the ELBO of every step and the wall time. Each step does what
:meth:`pyro.infer.SVI.step` does (loss and gradients, then one optimizer update), with these
differences:

- the loss and the gradients are checked *before* the update, so a non-finite step stops the
  fit with the parameters still at their last finite values and an error that names the
  parameter or sample site responsible (:class:`NonFiniteLossError`);
- an ELBO that falls far below its best (:class:`DivergenceRule`) stops the fit with the best
  parameters put back, or warns (:class:`DivergenceWarning`);
- Ctrl-C is deferred while an update and its bookkeeping run, so an interrupted fit always
  holds a whole number of steps and resumes from its checkpoint bit for bit;
- checkpoints hold tensors and plain data only and load without running code
  (:class:`CheckpointError` for anything else);
- with ``batches``, each step takes the next mini-batch of an iterable (a ``DataLoader``),
  epoch after epoch, and a resume continues at the same batch;
- with ``distributed=True``, every process of a ``torch.distributed`` group runs the same fit
  on its own shard of each mini-batch, and the gradients are averaged across the processes
  before the update (see :mod:`pyro_flowvi.distributed`).

Guides that need an effect handler around every step (for example the local
reparameterization of multiplicative-normalizing-flow weights) expose a method
``step_context()`` that returns a context manager; :func:`fit` enters a fresh one around each
step.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DivergenceRule",
    "DivergenceWarning",
    "FitResult",
    "NonFiniteLossError",
    "fit",
]

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.util import zero_grads
from pyro.util import get_rng_state, set_rng_state

from ._checkpoint import (
    CheckpointError,
    describe_constraint,
    load_optimizer_states,
    optimizer_description,
    optimizer_states,
    own_state,
    process_state,
    read_checkpoint,
    restore_optimizer,
    restore_params_and_buffers,
    rng_from_plain,
    write_checkpoint,
)
from ._collective import Collective
from ._divergence import DivergenceGuard, DivergenceRule, DivergenceWarning
from ._fit_helpers import (
    BatchStream,
    SigintGuard,
    build_params,
    check_call,
    closing,
    progress_bar,
    split_batch,
)
from ._nonfinite import NonFiniteLossError, diagnose, grads_finite, step_context

_LOG = logging.getLogger(__name__)

# defined in private modules, public here: tracebacks and pickles name this module
for _public in (CheckpointError, DivergenceRule, DivergenceWarning, NonFiniteLossError):
    _public.__module__ = __name__


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
        diverged_at: the first step at which the divergence rule fired (see
            :class:`DivergenceRule`), or ``None``.
        best_step: the last step of the window with the best median ELBO, or ``None`` when no
            full window was seen (or ``divergence="ignore"``).
        best_elbo: that best median ELBO, or ``None``.
        restored_best: whether the parameters, buffers and optimizer state were put back to
            those ``best_step`` was estimated at (``divergence="stop"``).
        world_size: the number of processes that fitted together (1 unless
            ``distributed``); the ELBO trace is their mean, the same in every process.
        epoch: with ``batches``, the epoch of the last batch taken (0-based), else ``None``.
        optim: the Pyro optimizer the fit used (the default one when none was passed), e.g.
            to go on training with its state.
        loss: the ELBO object (or callable) the fit used.
    """

    elbo_trace: np.ndarray
    wall_time: float
    num_steps: int
    interrupted: bool = False
    resumed_from: int = 0
    checkpoint: str | None = None
    diverged_at: int | None = None
    best_step: int | None = None
    best_elbo: float | None = None
    restored_best: bool = False
    world_size: int = 1
    epoch: int | None = None
    optim: Any = field(default=None, repr=False)
    loss: Any = field(default=None, repr=False)

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
        last = f"{self.smoothed_elbo():.6g}" if self.num_steps else "n/a"
        text = (
            f"FitResult(num_steps={self.num_steps}, smoothed_elbo={last}, "
            f"wall_time={self.wall_time:.2f}s, interrupted={self.interrupted}"
        )
        if self.diverged_at is not None:
            best = "n/a" if self.best_elbo is None else f"{self.best_elbo:.6g}"
            text += (
                f", diverged_at={self.diverged_at}, best_step={self.best_step}, "
                f"best_elbo={best}, restored_best={self.restored_best}"
            )
        return text + ")"


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


def _params(names: list[str]) -> dict[str, torch.Tensor]:
    """Name -> unconstrained tensor in Pyro's parameter store (the tensors the optimizer steps)."""
    store = dict(pyro.get_param_store().named_parameters())
    return {name: store[name] for name in names}


def _constraints(names: list[str]) -> dict[str, Any]:
    store = pyro.get_param_store()
    return {name: store._constraints[name] for name in names}


def _buffers(model: Callable, guide: Callable) -> dict[str, dict[str, torch.Tensor]]:
    def own(obj: Any) -> dict[str, torch.Tensor]:
        return dict(obj.named_buffers()) if isinstance(obj, torch.nn.Module) else {}

    return {"model_buffers": own(model), "guide_buffers": own(guide)}


def _can_save_optim(optim: Any) -> bool:
    return isinstance(optim, pyro.optim.PyroOptim) or (
        hasattr(optim, "get_state") and hasattr(optim, "set_state")
    )


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in tensors.items()}


def _snapshot(names: list[str], model: Callable, guide: Callable, optim: Any) -> dict[str, Any]:
    """Copies of the parameters, module buffers and optimizer state, for the best window."""
    return {
        "params": _clone(_params(names)),
        "buffers": {key: _clone(own) for key, own in _buffers(model, guide).items()},
        "optim": optimizer_states(optim, names, clone=True) if _can_save_optim(optim) else None,
    }


def _restore_snapshot(
    snapshot: dict[str, Any], names: list[str], model: Callable, guide: Callable, optim: Any
) -> None:
    params, buffers = _params(names), _buffers(model, guide)
    with torch.no_grad():
        for name, value in snapshot["params"].items():
            params[name].copy_(value)
        for key, own in buffers.items():
            for name, value in snapshot["buffers"].get(key, {}).items():
                own[name].copy_(value)
    if snapshot.get("optim") is not None:
        load_optimizer_states(optim, snapshot["optim"])


def _checkpoint_state(
    names: list[str],
    model: Callable,
    guide: Callable,
    optim: Any,
    elbo: list[float],
    wall_time: float,
    guard: DivergenceGuard,
    stopped: bool,
    process: dict[str, Any],
    ranks: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    params, constraints = _params(names), _constraints(names)
    return {
        "step": len(elbo),
        "elbo_trace": torch.tensor(elbo, dtype=torch.float64),
        "wall_time": float(wall_time),
        "params": _clone(params),
        "constraints": {name: describe_constraint(c) for name, c in constraints.items()},
        "optim": {
            "description": optimizer_description(optim, params),
            "states": optimizer_states(optim, names, clone=False),
        },
        **process,  # rank 0's random-number state and position in the batches
        **{key: _clone(own) for key, own in _buffers(model, guide).items()},
        "divergence": guard.state(stopped),
        "world_size": 1 if ranks is None else len(ranks),
        "ranks": ranks,  # every process's, for a data-parallel fit
    }


def _resume(
    path: Path,
    state: dict,
    names: list[str],
    optim: Any,
    model: Callable,
    guide: Callable,
    adjust: Callable[[dict], None] | None,
    rank: int,
    stream: BatchStream | None,
) -> None:
    params = _params(names)
    restore_params_and_buffers(path, state, params, _constraints(names), _buffers(model, guide))
    restore_optimizer(path, optim, state["optim"], params, adjust=adjust)
    own = own_state(state, rank)
    if own is not None:
        set_rng_state(rng_from_plain(own["rng"]))
        if own["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["cuda_rng"])
    position = state.get("batches")
    if stream is not None and position is not None:
        # every process takes the same number of batches; the epoch's draws are its own
        own_position = None if own is None else own.get("batches")
        epoch_rng = None if own_position is None else own_position["epoch_rng"]
        stream.seek(
            position["epoch"],
            position["index"],
            None if epoch_rng is None else rng_from_plain(epoch_rng),
        )


def _on_schedule(schedule: tuple[float, float], step: int) -> Callable[[dict], None]:
    """Put an optimizer parameter group on this call's learning-rate schedule at ``step``.

    After a resume with the same arguments the saved rate already is the schedule's (it is
    kept as saved, so the resumed fit is the uninterrupted one bit for bit); otherwise (more
    steps, another ``lr`` or ``final_lr``) the rate becomes ``lr * lrd**step`` of this call.
    """
    start_lr, decay = schedule
    target = start_lr * decay**step

    def adjust(group: dict) -> None:
        if group["lrd"] != decay or not math.isclose(group["lr"], target, rel_tol=1e-9):
            group["lr"], group["lrd"] = target, decay

    return adjust


def _divergence_rule(divergence: str | DivergenceRule) -> DivergenceRule:
    if isinstance(divergence, DivergenceRule):
        return divergence
    if isinstance(divergence, str):
        return DivergenceRule(action=divergence)
    raise ValueError(
        f"fit: divergence must be 'stop', 'warn', 'ignore' or a DivergenceRule, got {divergence!r}"
    )


def _divergence_message(guard: DivergenceGuard, restored: bool, action: str) -> str:
    rule = guard.rule
    text = (
        f"fit: the ELBO diverged at step {guard.diverged_at}: the median of the last "
        f"{rule.window} steps fell more than {guard.threshold:.4g} below the best median "
        f"{guard.best:.6g} (step {guard.best_step}), that is {rule.noise_multiple:g} standard "
        f"errors of a median ({guard.standard_error:.4g} each) plus {rule.floor:g} nats"
    )
    if action == "warn":
        return text + "; continuing (divergence='warn'); the parameters at the end are the last"
    if restored:
        return (
            text + f"; stopped, with the parameters (and optimizer state) of step "
            f"{guard.best_step} put back. A smaller learning rate, more particles or another "
            "start usually help"
        )
    return (
        text + "; stopped, but the best parameters could not be put back (the checkpoint "
        "resumed from holds no copy of them)"
    )


_DEFAULT_LR = 1e-2
_DEFAULT_LR_DROP = 1e-2  # final_lr = lr / 100 by default
_LOSSES = ("elbo", "stl", "iw")


def _loss(loss: Any, num_particles: int | None) -> Any:
    """The loss object for ``fit``'s ``loss`` and ``num_particles`` words."""
    if num_particles is not None and (
        isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1
    ):
        raise ValueError(f"fit: num_particles must be an int >= 1, got {num_particles!r}")
    if loss is None:
        loss = "elbo"
    if not isinstance(loss, str):
        if num_particles is not None:
            raise ValueError(
                "fit: num_particles applies to a loss given by name ('elbo', 'stl', 'iw'); set "
                f"the particles of {type(loss).__name__} on the object itself"
            )
        return loss
    if loss not in _LOSSES:
        raise ValueError(f"fit: loss must be one of {list(_LOSSES)} or an ELBO, got {loss!r}")
    from .estimators import TraceIW_ELBO, TraceSTL_ELBO

    if loss == "iw":
        return TraceIW_ELBO(num_particles or 8, vectorize_particles=True)
    particles = num_particles or 1
    if loss == "stl":
        return TraceSTL_ELBO(particles, vectorize_particles=particles > 1)
    return Trace_ELBO(particles, vectorize_particles=particles > 1)


def _default_training(guide: Any) -> tuple[str, int | None]:
    """The loss name and particles for ``loss=None``: a flow guide's ``default_loss`` and
    ``default_num_particles``, else ``"elbo"`` and ``None`` (the loss name's default)."""
    from .guides.base import AutoFlowGuide

    if isinstance(guide, AutoFlowGuide):
        return guide.default_loss, guide.default_num_particles
    return "elbo", None


def _vectorizable_or_one(
    loss: Any, name: str, model: Callable, guide: Any, args: tuple, kwargs: dict
) -> Any:
    """``loss`` (vectorized particles) if the model and guide run with a leading particle
    dimension, else the same loss with one particle and a warning that says why.

    The probe is one pass of the loss without gradients; the random-number state is restored
    after it, so the fit draws the same numbers as without it.
    """
    state = get_rng_state()
    try:
        with torch.no_grad(), poutine.block():
            loss.loss(model, guide, *args, **kwargs)
    except (RuntimeError, ValueError, NotImplementedError, IndexError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(
            f"fit: the model did not run with {loss.num_particles} vectorized particles, the "
            f"default for this guide ({type(error).__name__}: {reason[:200]}); training with "
            "1 particle instead. Let every tensor op of the model broadcast over a leading "
            "batch dimension (e.g. `(x * w.unsqueeze(-2)).sum(-1)` for `x @ w`) to get the "
            "default's steadier steps, or pass num_particles=1 to keep this choice quietly.",
            UserWarning,
            stacklevel=3,
        )
        return _loss(name, 1)
    finally:
        set_rng_state(state)
    return loss


@contextlib.contextmanager
def _sticking(guide: Any, stl: bool) -> Iterator[None]:
    """With ``loss="stl"`` and a flow guide whose layers all invert, turn on the guide's
    ``stick_the_landing`` for the fit (one pass through the inverse at the known preimage, no
    separate scoring pass: :class:`~pyro_flowvi.estimators.TraceSTL_ELBO` skips its own when a
    guide declares the option); the guide's own setting is back afterwards."""
    from .guides.base import AutoFlowGuide

    flow = getattr(guide, "flow", None)
    if not (stl and isinstance(guide, AutoFlowGuide) and flow is not None and flow.has_inverse):
        yield
        return
    before = guide.stick_the_landing
    guide.stick_the_landing = True
    try:
        yield
    finally:
        guide.stick_the_landing = before


# gradients on whatever the caller's grad mode: a step needs them, and a guide's start may
@torch.enable_grad()
def fit(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_steps: int,
    optim: Any | None = None,
    loss: Any | None = None,
    lr: float | None = None,
    final_lr: float | None = None,
    num_particles: int | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    divergence: str | DivergenceRule = "stop",
    batches: Iterable[Any] | None = None,
    distributed: bool | Any = False,
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
        optim: a Pyro optimizer. Default: Adam whose learning rate decays geometrically from
            ``lr`` at the first step to ``final_lr`` at the last (``pyro.optim.ClippedAdam``
            with ``lrd = (final_lr / lr) ** (1 / num_steps)`` and no clipping). Adam's steps
            are about ``lr`` in size whatever the gradient's scale, so at a constant rate a
            fit keeps jittering by about ``lr`` around the optimum (and, from an exact start,
            drifts away from it); the decay removes that without tuning per model (see
            docs/training.md).
        loss: the objective: ``"elbo"`` (:class:`pyro.infer.Trace_ELBO`), ``"stl"``
            (:class:`~pyro_flowvi.estimators.TraceSTL_ELBO`, the ELBO with the "sticking the
            landing" gradient; a flow guide's own ``stick_the_landing`` is switched on for the
            fit, which is cheaper), ``"iw"`` (:class:`~pyro_flowvi.estimators.TraceIW_ELBO`,
            the ``num_particles``-sample importance-weighted bound with DReG gradients), each
            with ``num_particles`` vectorized particles; or an ELBO object, or a callable
            ``loss(model, guide, *args, **kwargs)`` returning a differentiable tensor. Default:
            a pyro-flowvi flow guide's
            :attr:`~pyro_flowvi.guides.AutoFlowGuide.default_loss` (``"stl"`` for planar,
            radial, Householder, Sylvester, RealNVP and spline-coupling stacks, ``"elbo"`` for
            autoregressive ones), ``"elbo"`` for every other guide. ``FitResult.loss`` holds
            the ELBO object used.
        lr: initial learning rate of the default optimizer (default ``1e-2``); only without
            ``optim``.
        final_lr: learning rate of the default optimizer at the last step (default ``lr /
            100``; ``final_lr=lr`` keeps it constant); only without ``optim``.
        num_particles: vectorized particles per step for a loss given by name or the
            default one. Default: with ``loss=None``, a flow guide's
            :attr:`~pyro_flowvi.guides.AutoFlowGuide.default_num_particles` (8 with STL, 16
            with the plain ELBO: fewer particles let Adam wander off the optimum), 1 for
            other guides; with a loss name, 1 for ``"elbo"`` and ``"stl"``, 8 for ``"iw"``.
            Not with an ELBO object.
        progress: show a tqdm progress bar (step, smoothed ELBO, rate) on a terminal or in a
            Jupyter kernel (a notebook widget there when ipywidgets is installed); quiet in
            other processes (CI, pytest, output piped to a file) and without tqdm.
        checkpoint: a file path. The parameters of this model and guide, their module
            buffers, the optimizer state, the random-number state and the ELBO trace are
            saved there every ``checkpoint_every`` steps, at the end, on Ctrl-C and when the
            divergence rule stops the fit; if the file exists, the fit resumes from it and
            reproduces the trace of an uninterrupted fit bit for bit. The file holds tensors
            and plain data only and is read with ``torch.load(weights_only=True)``, so a
            file crafted to run code is refused without running it. A checkpoint from
            another model, guide or optimizer class is refused, naming what differs. An
            optimizer with other hyper-parameters (a new ``lr``) takes over the checkpoint's
            optimizer state (Adam's moments) with its own hyper-parameters; without ``optim``
            and ``lr``, the checkpoint's hyper-parameters are kept.
        checkpoint_every: steps between checkpoints.
        divergence: what to do when the ELBO falls far below its best: ``"stop"`` (default;
            put back the parameters, module buffers and optimizer state of the best window
            and stop), ``"warn"`` (warn once and go on) or ``"ignore"``; or a
            :class:`DivergenceRule` with its own thresholds. Either way a
            :class:`DivergenceWarning` says what happened, and the result has
            ``diverged_at``, ``best_step``, ``best_elbo`` and ``restored_best``. The rule
            assumes a fixed objective: pass ``"ignore"`` for an annealed loss.
        batches: mini-batches: an iterable that can be iterated again every epoch (a
            ``torch.utils.data.DataLoader``, a list). Each step takes the next one and passes
            it to the model and the guide after ``*args``: a tuple or list is unpacked into
            positional arguments, a dict gives keyword arguments, anything else is one more
            positional argument. ``num_steps`` counts mini-batches. Before each epoch,
            ``set_epoch(epoch)`` is called on the iterable and on its sampler when they have
            one (``DistributedSampler``). A resume continues at the batch after the last
            recorded step, with the batches of an uninterrupted fit when their order is set by
            the epoch or drawn from torch's global generator at the epoch's start
            (``DataLoader(shuffle=True)`` without a ``generator``, ``DistributedSampler``).
        distributed: ``True`` to fit data-parallel on the default ``torch.distributed``
            process group (or pass a ``ProcessGroup``); every process of the group calls
            ``fit`` with the same arguments and its own shard of the data (e.g. ``batches``
            with a ``DistributedSampler``). The parameters and module buffers start from rank
            0's values; at every step the gradients and the loss are averaged across the
            processes (one all-reduce) before the update, so every process applies the same
            update and sees the same ELBO trace, NaN guard and divergence decision. Only rank 0
            shows the progress bar and writes the checkpoint (with every process's
            random-number state); every process resumes from it, and so does a single
            process. See ``docs/distributed.md``.
        **kwargs: keyword arguments of ``model`` and ``guide``; each must be a parameter of
            both (or both must take ``**kwargs``).

    Returns:
        A :class:`FitResult`. Parameters stay in Pyro's parameter store (and in the guide).

    Raises:
        NonFiniteLossError: at the first step whose loss or gradient is NaN or infinite,
            naming the first non-finite parameter or sample site; no update is applied at
            that step.
        CheckpointError: (a ``ValueError``) for a checkpoint file that is empty, truncated,
            foreign, unsafe, of another format version, or written for another model, guide
            or optimizer.
        TypeError: before fitting, for a keyword argument that the model or the guide does
            not take (``learning_rate=`` suggests ``lr=``), or positional arguments they
            cannot take.
        ValueError: for a bad ``num_steps``, ``lr``, ``checkpoint_every``, ``divergence``,
            ``batches`` or ``distributed`` (``True`` without an initialized process group).
        RuntimeError: in a data-parallel fit, when the processes built different parameters,
            a parameter is first created after the first run, or rank 0 could not write the
            checkpoint (in every process alike).

    ``fit`` runs with gradients enabled, also when called under ``torch.no_grad()``. Before
    the first step, it runs the guide and the model once (as a step does) so that lazy guides
    create their parameters; the random-number state is put back afterwards, so the trace
    does not depend on whether the guide was built already.

    Ctrl-C (``KeyboardInterrupt``) ends the loop cleanly: the parameters learned so far are
    kept, a checkpoint is written when one was asked for, and the result has
    ``interrupted=True``. An interrupt during the loss and gradient computation drops that
    step (its draws are rewound); one during the optimizer update or its bookkeeping (trace,
    random-number state, checkpoint) takes effect once the step is recorded. In a
    data-parallel fit a Ctrl-C in any process is a flag that travels with the next all-reduce,
    and every process stops after that same step.

    Example:
        >>> guide = AutoIAFGuide(model)
        >>> result = fit(model, guide, data, num_steps=5000, lr=1e-2, checkpoint="fit.pt")
        >>> result.elbo_trace[-10:]
        >>> loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
        >>> result = fit(model, guide, batches=loader, num_steps=10 * len(loader),
        ...              num_data=len(x))   # 10 epochs; num_data is passed to the model
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"fit: num_steps must be an int >= 0, got {num_steps!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ValueError(f"fit: checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if checkpoint_every < 1:
        raise ValueError(f"fit: checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if optim is not None and lr is not None:
        raise ValueError(f"fit: pass lr (got {lr!r}) or optim, not both")
    if lr is not None and not (
        isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0
    ):
        raise ValueError(f"fit: lr must be a positive number, got {lr!r}")
    if optim is not None and final_lr is not None:
        raise ValueError(f"fit: final_lr (got {final_lr!r}) applies to the default optimizer only")
    if final_lr is not None and not (
        isinstance(final_lr, (int, float)) and not isinstance(final_lr, bool) and final_lr > 0
    ):
        raise ValueError(f"fit: final_lr must be a positive number, got {final_lr!r}")
    rule = _divergence_rule(divergence)
    sync = Collective.from_option(distributed, "fit")
    rank = 0 if sync is None else sync.rank
    stream = None if batches is None else BatchStream(batches)
    first_args, first_kwargs = (
        (args, kwargs) if stream is None else split_batch(stream.peek(), args, kwargs)
    )
    requested = loss
    loss = _loss("elbo" if loss is None else loss, num_particles)  # checks the words now
    check_call(model, guide, first_args, first_kwargs)
    schedule = None
    if optim is None:
        start_lr = _DEFAULT_LR if lr is None else float(lr)
        end_lr = start_lr * _DEFAULT_LR_DROP if final_lr is None else float(final_lr)
        schedule = (start_lr, (end_lr / start_lr) ** (1.0 / max(num_steps, 1)))
        optim = pyro.optim.ClippedAdam({"lr": start_lr, "lrd": schedule[1], "clip_norm": math.inf})
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and not _can_save_optim(optim):
        raise ValueError(
            f"fit: checkpoints need an optimizer with get_state/set_state, got {type(optim)}"
        )
    if sync is not None:
        options = [num_steps, checkpoint_every, path is not None, stream is not None]
        sync.check_same(options, "fit: num_steps, checkpoint_every, checkpoint?, batches?")
    if sync is None:
        saved = read_checkpoint(path) if path is not None and path.exists() else None
    else:
        saved = sync.read_checkpoint(path)

    names = build_params(model, guide, first_args, first_kwargs)
    if requested is None:
        requested, default_particles = _default_training(guide)
        particles = num_particles or default_particles
        loss = _loss(requested, particles)
        if num_particles is None and particles is not None and particles > 1:
            loss = _vectorizable_or_one(loss, requested, model, guide, first_args, first_kwargs)
    if sync is not None:
        sync.start_together(_params(names), _buffers(model, guide), "fit")
    known = set(names)
    guard = DivergenceGuard(rule)
    elbo: list[float] = []
    prior_time = 0.0
    if saved is not None:
        adjust = None if schedule is None else _on_schedule(schedule, len(saved["elbo_trace"]))
        _resume(path, saved, names, optim, model, guide, adjust, rank, stream)
        elbo = saved["elbo_trace"].tolist()
        prior_time = float(saved["wall_time"])
        guard.resume(elbo, saved["divergence"])
        _LOG.info("fit: resumed from %s at step %d", path, len(elbo))
    resumed_from = len(elbo)
    last_saved = resumed_from if saved is not None else None
    # the tensors whose gradients are averaged, in the same order in every process
    synced = list(_params(names).values()) if sync is not None else []

    interrupted = stopped = restored = False
    smoothed = elbo[-1] if elbo else None
    start = time.perf_counter()

    def elapsed() -> float:
        return prior_time + time.perf_counter() - start

    def save() -> None:
        nonlocal last_saved
        process = process_state(None if stream is None else stream.mark())
        ranks = None if sync is None else sync.gather(process)
        state = _checkpoint_state(
            names, model, guide, optim, elbo, elapsed(), guard, stopped, process, ranks
        )
        if sync is None:
            write_checkpoint(path, state)
        else:
            sync.write_checkpoint(path, state)
        last_saved = len(elbo)

    rng_state = mark = None
    with (
        SigintGuard() as sigint,
        closing(
            progress_bar(progress and rank == 0, num_steps, min(resumed_from, num_steps))
        ) as bar,
        warnings.catch_warnings(),
        sigint.held(sync is not None),
        _sticking(guide, requested == "stl"),
    ):
        # Pyro's "Encountered NaN: loss" would only precede the NonFiniteLossError below
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        try:
            for step in range(resumed_from, num_steps):
                rng_state = get_rng_state()
                if stream is not None:
                    mark = stream.mark()
                    step_args, step_kwargs = split_batch(stream.next(), args, kwargs)
                else:
                    step_args, step_kwargs = args, kwargs
                with poutine.trace(param_only=True) as capture, step_context(guide):
                    loss_value = _as_float(
                        _loss_and_grads(loss, model, guide, step_args, step_kwargs)
                    )
                params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
                created = [name for name in capture.trace.nodes if name not in known]
                if created:
                    # a parameter first created in a step (a branch the first run missed)
                    names += created
                    known.update(created)
                stop_requested = False
                if sync is not None:
                    local_loss = loss_value
                    flags = [not math.isfinite(loss_value), len(created), sigint.take_pending()]
                    reduced = sync.reduce_step(synced, loss_value, flags)
                    if reduced.flags[1] > 0:
                        zero_grads(params | set(synced))
                        raise RuntimeError(
                            f"fit: a parameter was first created at step {step} (in this "
                            f"process: {created}); a data-parallel fit needs every parameter "
                            "from the first run of the guide and the model, so that every "
                            "process averages the same gradients"
                        )
                    loss_value = reduced.loss
                    params = {p for p, used in zip(synced, reduced.used, strict=True) if used}
                    stop_requested = reduced.flags[2] > 0
                if not (math.isfinite(loss_value) and grads_finite(params)):
                    error = diagnose(
                        step, loss_value, params, model, guide, step_args, step_kwargs, rng_state
                    )
                    if error is not None:
                        zero_grads(params)
                        if sync is not None:
                            error = sync.annotate(error, reduced.flags[0], local_loss)
                        raise error
                # From here to the end of the step a Ctrl-C waits: the update, the trace and
                # the checkpoint are one unit, so a resume never repeats or loses a step.
                with sigint.deferred():
                    elbo.append(-loss_value)
                    event = guard.observe(elbo)
                    if event == "improved" and rule.action == "stop":
                        # the parameters now are the ones this step's ELBO was estimated at
                        guard.take_snapshot(_snapshot(names, model, guide, optim))
                    if event == "diverged" and rule.action == "stop":
                        stopped = True
                        if guard.snapshot is not None:
                            _restore_snapshot(guard.snapshot, names, model, guide, optim)
                            restored = True
                    else:
                        optim(params)
                    zero_grads(params)
                    rng_state = None  # the step is complete
                    smoothed = (
                        -loss_value if smoothed is None else 0.95 * smoothed - 0.05 * loss_value
                    )
                    if bar is not None:
                        bar.update(1)
                        if step % 10 == 0 or step == num_steps - 1:
                            bar.set_postfix(elbo=f"{smoothed:.6g}", refresh=False)
                    if path is not None and (len(elbo) % checkpoint_every == 0 or stopped):
                        save()
                if stopped:
                    break
                if event == "diverged":
                    warnings.warn(
                        _divergence_message(guard, False, "warn"), DivergenceWarning, stacklevel=2
                    )
                if stop_requested:
                    # a Ctrl-C in some process: every process stops after this same step
                    interrupted = True
                    _LOG.warning(
                        "fit: interrupted after %d steps; the parameters learned so far are kept",
                        len(elbo),
                    )
                    break
        except KeyboardInterrupt:
            if sync is not None:
                # not the interrupt the processes agreed on (that one is a flag, above): the
                # others may be waiting in a collective, so no checkpoint is attempted
                raise
            interrupted = True
            if rng_state is not None:
                # interrupted inside a step, before its update: rewind the step's draws (and
                # batch) too, so that a resume from the checkpoint repeats it exactly
                set_rng_state(rng_state)
                if stream is not None and mark is not None:
                    stream.seek(*mark)
            # drop gradients a half-finished step may have left behind
            for p in _params(names).values():
                p.grad = None
            _LOG.warning(
                "fit: interrupted after %d steps; the parameters learned so far are kept",
                len(elbo),
            )
        if path is not None and last_saved != len(elbo):
            with sigint.deferred(reraise=False) as section:
                save()
            interrupted = interrupted or section.interrupted
        if sync is not None:
            # a Ctrl-C after the last step's all-reduce: every process reports it alike
            interrupted = sync.mean(float(interrupted or sigint.take_pending())) > 0
    wall_time = elapsed()
    if stopped:
        warnings.warn(
            _divergence_message(guard, restored, "stop"), DivergenceWarning, stacklevel=2
        )
    return FitResult(
        elbo_trace=np.asarray(elbo, dtype=np.float64),
        wall_time=wall_time,
        num_steps=len(elbo),
        interrupted=interrupted,
        resumed_from=resumed_from,
        checkpoint=None if path is None else str(path),
        diverged_at=guard.diverged_at,
        best_step=guard.best_step,
        best_elbo=guard.best,
        restored_best=restored,
        world_size=1 if sync is None else sync.world_size,
        epoch=None if stream is None else stream.epoch,
        optim=optim,
        loss=loss,
    )
