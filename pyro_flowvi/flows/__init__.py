"""Flow layers: each maps ``x`` to ``(y, log|det dy/dx|)`` in one pass (see :class:`Flow`)."""

from __future__ import annotations

from .affine import ElementwiseAffine
from .base import Compose, Flow, Permute, Reverse

__all__ = [
    "Compose",
    "ElementwiseAffine",
    "Flow",
    "Permute",
    "Reverse",
]
