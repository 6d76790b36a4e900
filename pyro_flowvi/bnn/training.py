r"""Mini-batch epochs: the training loop of the BNN benchmarks, as one call.

:func:`fit_epochs` shuffles the data once per epoch, cuts it into mini-batches of
``batch_size`` rows (the last one may be smaller) and runs :func:`pyro_flowvi.fit` over
them (``batches=``, one step per mini-batch, one call per epoch), passing the training-set
size to the model as ``num_data`` so that a subsampled ``pyro.plate`` scales the likelihood
by :math:`N / B`:

.. math::

    \widehat{\mathcal L}_t = \frac{N}{|B_t|} \sum_{n \in B_t}
        \mathbb E_q\bigl[\log p(y_n \mid x_n, W)\bigr] - \mathrm{KL}(q \,\|\, p),

an unbiased estimate of the full-data ELBO at every step. Each step is a full
:func:`~pyro_flowvi.fit` step: the guide's ``step_context()`` (local reparameterization) is
entered, and a non-finite loss or gradient stops the fit with
:class:`~pyro_flowvi.fit.NonFiniteLossError` before any update.

KL warm-up (Bowman et al. 2016; Sønderby et al. 2016): under :func:`kl_weight` every term of
the bound but the likelihood is scaled by :math:`\beta`,

.. math::

    \mathcal L_\beta = \mathbb E_q\bigl[\log p(y \mid x, W)\bigr]
        - \beta\, \mathrm{KL}(q \,\|\, p),

and ``fit_epochs(kl_warmup=E)`` raises :math:`\beta` linearly over the first :math:`E`
epochs, :math:`\beta_e = \min(1, e / E)` in epoch :math:`e = 1, 2, \dots`, so that the
network fits the data before the prior and the entropy pull the weights apart; from epoch
:math:`E` on the objective is the ELBO itself. (Only :math:`\beta = 1` is a bound on the log
evidence.)
"""

from __future__ import annotations

__all__ = ["EpochFitResult", "fit_epochs", "kl_weight"]

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger
from torch import Tensor

from ..fit import fit


class _KLWeightMessenger(Messenger):
    """Scales every sample site but an observed site of the model by ``beta``."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] != "sample":
            return
        # a model's likelihood is observed; a guide's factor is observed but auxiliary
        if not msg["is_observed"] or msg["infer"].get("is_auxiliary", False):
            msg["scale"] = msg["scale"] * self.beta


def kl_weight(beta: float) -> Messenger:
    r"""A context (effect handler) under which an ELBO weighs its KL term by ``beta``.

    Every sample site is scaled by :math:`\beta` except the observed sites of the model: the
    model's latent sites (:math:`\log p(W)`) and every site of the guide (:math:`\log q`,
    auxiliary sites and guide factors such as :class:`~pyro_flowvi.bnn.AutoMNFGuide`'s
    :math:`\log r` term included). An ELBO run inside it estimates
    :math:`\mathbb E_q[\log p(y \mid W)] - \beta\, \mathrm{KL}(q \| p)` (the analytic KL
    of ``TraceMeanField_ELBO`` too). Wrap the whole step (the model and the guide runs).

    Arguments:
        beta: the weight :math:`\beta \in [0, 1]` (1: the ELBO; 0: the expected
            log-likelihood alone).

    Raises:
        ValueError: for ``beta`` outside [0, 1].

    Example:
        >>> with kl_weight(0.5):  # doctest: +SKIP
        ...     fit_epochs(model, guide, x, y, num_epochs=1, batch_size=128)

    References:
        Generating Sentences from a Continuous Space (Bowman et al., 2016, arXiv:1511.06349).
        Ladder Variational Autoencoders (Sønderby et al., 2016, arXiv:1602.02282).
    """
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta <= 1:
        raise ValueError(f"kl_weight: beta must be a number in [0, 1], got {beta!r}")
    return _KLWeightMessenger(float(beta))


@dataclass
class EpochFitResult:
    """What :func:`fit_epochs` returns.

    Attributes:
        elbo_trace: the ELBO estimate of every step (each scaled to the full data set),
            shape ``(num_steps,)``.
        epoch_elbo: the mean ELBO estimate of each epoch, shape ``(num_epochs,)``.
        wall_time: seconds spent in the loop (steps, shuffling and batching).
        num_epochs: epochs completed.
        num_steps: steps completed.
    """

    elbo_trace: np.ndarray
    epoch_elbo: np.ndarray
    wall_time: float
    num_epochs: int
    num_steps: int

    @property
    def seconds_per_epoch(self) -> float:
        """Mean wall time of one epoch (``nan`` before the first epoch)."""
        return self.wall_time / self.num_epochs if self.num_epochs else math.nan


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"fit_epochs: {name} must be an int >= 1, got {value!r}")
    return value


def fit_epochs(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *data: Tensor,
    num_epochs: int,
    batch_size: int,
    optim: Any | None = None,
    lr: float | None = None,
    loss: Any | None = None,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    num_data_kwarg: str | None = "num_data",
    callback: Callable[[int, float], Any] | None = None,
    kl_warmup: int = 0,
    **kwargs: Any,
) -> EpochFitResult:
    r"""Fit ``guide`` to ``model`` by SVI over mini-batch epochs.

    Arguments:
        model: a Pyro model called as ``model(*batch, num_data=N, **kwargs)``, where
            ``batch`` holds the same rows of every tensor in ``data`` (e.g.
            :class:`~pyro_flowvi.bnn.BayesianMLP`, whose ``"data"`` plate is subsampled).
        guide: a guide with the model's signature.
        *data: tensors with the same first dimension N (e.g. ``x, y``).
        num_epochs: passes over the data.
        batch_size: rows per step; an epoch has :math:`\lceil N / B \rceil` steps.
        optim: a Pyro optimizer (default ``Adam({"lr": lr})``); build it once outside to
            keep a learning-rate decay across epochs (``ClippedAdam({"lr": ..., "lrd": ...})``).
        lr: learning rate of the default optimizer (default ``1e-2``); only without ``optim``.
        loss: an ELBO (default ``Trace_ELBO()``).
        shuffle: draw a new order of the rows every epoch (else keep their order).
        generator: the random generator of the shuffles (default: torch's global one, which
            ``pyro.set_rng_seed`` seeds).
        num_data_kwarg: the keyword under which the model takes N, or ``None`` if it takes
            none (then the model must scale its likelihood itself).
        callback: called as ``callback(epoch, mean_elbo)`` after every epoch; a return value
            of ``True`` stops the fit early.
        kl_warmup: epochs :math:`E` of KL warm-up: epoch :math:`e` (1-based) runs under
            :func:`kl_weight` with :math:`\beta = \min(1, e / E)`; 0 (the default) fits the
            ELBO from the start.
        **kwargs: further keyword arguments of the model and guide.

    Returns:
        An :class:`EpochFitResult`.

    Raises:
        ValueError: for no data, tensors of different lengths, or bad ``num_epochs`` /
            ``batch_size`` / ``kl_warmup``, before any step.
        NonFiniteLossError: as :func:`pyro_flowvi.fit`, at the first non-finite step.

    Example:
        >>> model = BayesianMLP(8, 1, (50,), likelihood="normal",
        ...                     noise_precision_prior=(6.0, 6.0))
        >>> guide = AutoMNFGuide(model)
        >>> result = fit_epochs(model, guide, x, y, num_epochs=40, batch_size=32,
        ...                     loss=TraceMeanField_ELBO())  # doctest: +SKIP
    """
    num_epochs = _positive_int(num_epochs, "num_epochs")
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(kl_warmup, bool) or not isinstance(kl_warmup, int) or kl_warmup < 0:
        raise ValueError(f"fit_epochs: kl_warmup must be an int >= 0, got {kl_warmup!r}")
    if not data:
        raise ValueError("fit_epochs: pass the data tensors (e.g. x, y) to split into batches")
    for i, tensor in enumerate(data):
        if not torch.is_tensor(tensor) or tensor.dim() == 0:
            raise ValueError(
                f"fit_epochs: data[{i}] must be a tensor with a first (row) dimension, got "
                f"{type(tensor).__name__}{'' if not torch.is_tensor(tensor) else ' of dim 0'}"
            )
    num_data = data[0].shape[0]
    lengths = [t.shape[0] for t in data]
    if any(n != num_data for n in lengths) or num_data == 0:
        raise ValueError(
            f"fit_epochs: the data tensors need the same number of rows >= 1, got {lengths}"
        )
    if optim is not None and lr is not None:
        raise ValueError(f"fit_epochs: pass lr (got {lr!r}) or optim, not both")
    if optim is None:
        optim = pyro.optim.Adam({"lr": 1e-2 if lr is None else float(lr)})
    if loss is None:
        loss = Trace_ELBO()
    if num_data_kwarg is not None:
        kwargs = {**kwargs, num_data_kwarg: num_data}
    device = data[0].device
    steps: list[float] = []
    epochs: list[float] = []
    start = time.perf_counter()
    for epoch in range(num_epochs):
        if shuffle:
            order = torch.randperm(num_data, generator=generator).to(device)
        else:
            order = torch.arange(num_data, device=device)
        first = len(steps)
        # one fit per epoch over its mini-batches: fit's set-up (one run of the model and the
        # guide) once per epoch, not once per step
        epoch_batches = [
            tuple(t[order[begin : begin + batch_size]] for t in data)
            for begin in range(0, num_data, batch_size)
        ]
        beta = min(1.0, (epoch + 1) / kl_warmup) if kl_warmup else 1.0
        with kl_weight(beta) if beta < 1 else contextlib.nullcontext():
            result = fit(
                model,
                guide,
                num_steps=len(epoch_batches),
                batches=epoch_batches,
                optim=optim,
                loss=loss,
                progress=False,
                **kwargs,
            )
        steps.extend(float(v) for v in result.elbo_trace)
        epochs.append(float(np.mean(steps[first:])))
        if callback is not None and callback(epoch, epochs[-1]) is True:
            break
    return EpochFitResult(
        elbo_trace=np.asarray(steps, dtype=np.float64),
        epoch_elbo=np.asarray(epochs, dtype=np.float64),
        wall_time=time.perf_counter() - start,
        num_epochs=len(epochs),
        num_steps=len(steps),
    )
