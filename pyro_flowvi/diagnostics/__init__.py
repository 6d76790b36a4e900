"""ELBO and posterior diagnostics for any Pyro guide, read through ArviZ.

ArviZ is imported lazily, only by ``pyro_flowvi.diagnostics._arviz`` (which supports both
ArviZ 0.x and 1.x); importing this package does not import ArviZ, pandas or matplotlib.
"""

from __future__ import annotations

from .compare import (
    compare_approximations,
    flatten_draws,
    marginal_wasserstein,
    wasserstein_distance,
)
from .convert import VectorizationWarning, to_arviz
from .plots import plot_elbo, plot_marginals, plot_pair
from .predictive import PosteriorSamples, sample_posterior
from .report import (
    MIN_KHAT_DRAWS,
    VIDiagnostics,
    VIDiagnosticWarning,
    VILoo,
    khat_interval,
    khat_threshold,
    khat_verdict,
    vi_diagnostics,
    vi_loo,
)
from .resample import PROPOSALS_PER_DRAW, PSISResample, psis_resample

__all__ = [
    "MIN_KHAT_DRAWS",
    "PROPOSALS_PER_DRAW",
    "PSISResample",
    "PosteriorSamples",
    "VIDiagnosticWarning",
    "VIDiagnostics",
    "VILoo",
    "VectorizationWarning",
    "compare_approximations",
    "flatten_draws",
    "khat_interval",
    "khat_threshold",
    "khat_verdict",
    "marginal_wasserstein",
    "plot_elbo",
    "plot_marginals",
    "plot_pair",
    "psis_resample",
    "sample_posterior",
    "to_arviz",
    "vi_diagnostics",
    "vi_loo",
    "wasserstein_distance",
]
