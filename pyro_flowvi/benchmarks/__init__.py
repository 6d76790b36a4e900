"""Reference posteriors from posteriordb with their Pyro models and gold-standard draws."""

from __future__ import annotations

from .models import init_to_median_or_feasible
from .registry import NAMES, ReferencePosterior, load, reference_draws, reference_to_arviz

__all__ = [
    "NAMES",
    "ReferencePosterior",
    "init_to_median_or_feasible",
    "load",
    "reference_draws",
    "reference_to_arviz",
]
