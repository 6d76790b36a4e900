"""Flow layers: each maps ``x`` to ``(y, log|det dy/dx|)`` in one pass (see :class:`Flow`)."""

from __future__ import annotations

from .affine import ElementwiseAffine, TriangularAffine
from .base import Compose, Flow, Permute, Reverse
from .coupling import MaskedCoupling, alternating_mask
from .householder import Householder
from .iaf import IAF
from .made import MADE, MaskedLinear
from .planar import Planar
from .radial import Radial
from .sylvester import Sylvester

__all__ = [
    "IAF",
    "MADE",
    "Compose",
    "ElementwiseAffine",
    "Flow",
    "Householder",
    "MaskedCoupling",
    "MaskedLinear",
    "Permute",
    "Planar",
    "Radial",
    "Reverse",
    "Sylvester",
    "TriangularAffine",
    "alternating_mask",
]
