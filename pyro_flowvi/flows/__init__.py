"""Flow layers: each maps ``x`` to ``(y, log|det dy/dx|)`` in one pass (see :class:`Flow`).

:data:`FLOWS` lists the registered families; :func:`build_flows` builds a family's stack.
"""

from __future__ import annotations

from .affine import ElementwiseAffine, TriangularAffine
from .base import Compose, Flow, Permute, Reverse
from .coupling import MaskedCoupling, alternating_mask
from .householder import Householder
from .iaf import IAF
from .made import MADE, MaskedLinear
from .planar import Planar
from .radial import Radial
from .registry import FLOWS, FlowFamily, build_flows, register_flow
from .sylvester import Sylvester

__all__ = [
    "FLOWS",
    "IAF",
    "MADE",
    "Compose",
    "ElementwiseAffine",
    "Flow",
    "FlowFamily",
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
    "build_flows",
    "register_flow",
]
