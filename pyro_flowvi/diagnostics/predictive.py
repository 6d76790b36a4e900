r"""Posterior draws as tensors, like ``pyro.infer.Predictive``, optionally importance-resampled.

:func:`sample_posterior` is the tensor counterpart of
:func:`~pyro_flowvi.diagnostics.to_arviz`: it draws from a guide, can keep the draws chosen by
PSIS importance resampling (:func:`~pyro_flowvi.diagnostics.psis_resample`), and draws the
model's observed sites given each kept draw (posterior predictive replicates of the data).
The k-hat of the importance ratios comes with the draws.
"""

from __future__ import annotations

__all__ = ["PosteriorSamples", "sample_posterior"]

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from . import _arviz
from ._checks import check_model_call, options
from .convert import _check_counts, _draw, _predict, _resample_draws
from .report import khat_threshold


class PosteriorSamples(dict):
    """``{site: tensor of shape (num_samples, *site shape)}``, with how far to trust it.

    A ``dict`` like the one ``pyro.infer.Predictive`` returns, with attributes:

    Attributes:
        khat: PSIS k-hat of the importance ratios of the guide's draws (of all proposals
            when resampled).
        khat_threshold: ``min(1 - 1/log10(M), 0.7)`` for :math:`M` guide draws.
        is_ess: importance-sampling effective sample size of those draws.
        num_proposals: :math:`M`, the guide draws the samples come from.
        resampled: whether the samples were chosen by PSIS importance resampling.
        replace: whether the resampling drew with replacement (``False`` when not
            resampled).
    """

    def __init__(
        self,
        samples: Mapping[str, Tensor],
        *,
        khat: float,
        khat_threshold: float,
        is_ess: float,
        num_proposals: int,
        resampled: bool,
        replace: bool,
    ) -> None:
        super().__init__(samples)
        self.khat = khat
        self.khat_threshold = khat_threshold
        self.is_ess = is_ess
        self.num_proposals = num_proposals
        self.resampled = resampled
        self.replace = replace

    @property
    def reliable(self) -> bool:
        """Whether k-hat is below the threshold."""
        return self.khat < self.khat_threshold

    def __repr__(self) -> str:
        shapes = {name: tuple(value.shape) for name, value in self.items()}
        return (
            f"PosteriorSamples({shapes}, khat={self.khat:.3f}, "
            f"khat_threshold={self.khat_threshold:.2f}, resampled={self.resampled}, "
            f"num_proposals={self.num_proposals})"
        )


def sample_posterior(
    guide: Callable,
    model: Callable,
    *args: Any,
    num_samples: int = 1000,
    resample: bool | str = False,
    num_proposals: int | None = None,
    return_sites: Sequence[str] | None = None,
    chunk_size: int = 1000,
    parallel: bool | None = None,
    **kwargs: Any,
) -> PosteriorSamples:
    r"""Draw posterior samples of every site from a guide, optionally PSIS-resampled.

    Latent (and ``pyro.deterministic``) sites come from the guide: ``num_samples`` draws,
    or, with ``resample=True``, ``num_samples`` of ``num_proposals`` draws kept by sampling
    importance resampling with Pareto-smoothed weights (without replacement when
    ``num_samples <= num_proposals``; see
    :func:`~pyro_flowvi.diagnostics.psis_resample`). Observed sites are then drawn from the
    model given each kept draw: posterior predictive replicates of the data, as
    ``Predictive(model, guide=guide)`` gives when the observations are left out.

    Arguments:
        guide: a fitted guide (any Pyro guide).
        model: the model.
        *args: positional arguments of ``model`` and ``guide``, with the observed data (the
            importance ratios need it).
        num_samples: draws to return.
        resample: ``False`` (default), or ``True`` / ``"psis"`` for PSIS importance
            resampling.
        num_proposals: guide draws to resample from (default ``10 * num_samples``; only with
            ``resample``).
        return_sites: the sites to return (default: every latent, deterministic and
            observed site).
        chunk_size: draws per vectorized pass.
        parallel: as in :func:`~pyro_flowvi.diagnostics.to_arviz`.
        **kwargs: keyword arguments of ``model`` and ``guide``.

    Returns:
        A :class:`PosteriorSamples`: ``{site: tensor (num_samples, *shape)}`` with ``khat``,
        ``khat_threshold``, ``is_ess``, ``num_proposals``, ``resampled`` and ``replace``.

    Raises:
        ValueError: as :func:`~pyro_flowvi.diagnostics.to_arviz`, or for an unknown site in
            ``return_sites``.

    Warns:
        VIDiagnosticWarning: with ``resample``, when k-hat is at or above the threshold: the
            resampled draws cannot be trusted.

    Example:
        >>> samples = sample_posterior(guide, model, X, y, num_samples=1000, resample=True)
        >>> samples["w"].mean(0), samples.khat
    """
    num_guide_draws = _check_counts(
        "sample_posterior", num_samples, chunk_size, resample, num_proposals
    )
    check_model_call("sample_posterior", model, args, kwargs, options(sample_posterior))
    layout, draws, vectorized = _draw(
        guide, model, args, kwargs, num_guide_draws, chunk_size, parallel, "sample_posterior", 2
    )
    if resample:
        draws, picked = _resample_draws(draws, num_samples, "sample_posterior", 2)
        khat, threshold, is_ess, replace = (
            picked.khat,
            picked.khat_threshold,
            picked.is_ess,
            picked.replace,
        )
    else:
        log_ratios = (draws["lp"] - draws["log_q"]).detach().cpu().double().numpy()
        log_weights, khat = _arviz.psislw(log_ratios)
        khat, threshold = float(khat), khat_threshold(num_guide_draws)
        is_ess, replace = float(1.0 / np.sum(np.exp(2.0 * log_weights))), False
    latent = {name: draws["posterior/" + name] for name in layout.latent}
    observed = list(layout.observed)
    known = list(latent) + observed
    wanted = known if return_sites is None else list(return_sites)
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(
            f"sample_posterior: return_sites {unknown} are not sites of the model; it has {known}"
        )
    conditioned = {n: v for n, v in latent.items() if n not in layout.deterministic}
    predicted = _predict(
        model,
        args,
        kwargs,
        layout,
        conditioned,
        [name for name in wanted if name in observed],
        vectorized and parallel is not False,
    )
    samples = {name: latent[name] if name in latent else predicted[name] for name in wanted}
    return PosteriorSamples(
        samples,
        khat=khat,
        khat_threshold=threshold,
        is_ess=is_ess,
        num_proposals=num_guide_draws,
        resampled=bool(resample),
        replace=bool(replace),
    )
