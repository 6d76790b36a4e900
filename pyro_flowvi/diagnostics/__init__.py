"""ELBO and posterior diagnostics for any Pyro guide, read through ArviZ.

ArviZ is imported lazily, only by :mod:`pyro_flowvi.diagnostics._arviz` (which supports both
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

__all__ = [
    "MIN_KHAT_DRAWS",
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
    "to_arviz",
    "vi_diagnostics",
    "vi_loo",
    "wasserstein_distance",
]
