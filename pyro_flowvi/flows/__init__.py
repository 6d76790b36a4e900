"""Flow layers: each maps ``x`` to ``(y, log|det dy/dx|)`` in one pass (see :class:`Flow`).

:data:`FLOWS` lists the registered families; :func:`build_flows` builds a family's stack.
"""

from __future__ import annotations

from .affine import ElementwiseAffine, TriangularAffine
from .autoregressive import Autoregressive
from .base import Compose, Flow, Permute, Reverse
from .coupling import MaskedCoupling, alternating_mask
from .householder import Householder
from .iaf import IAF
from .made import MADE, MaskedLinear
from .planar import Planar
from .radial import Radial
from .registry import FLOWS, FlowFamily, build_flows, register_flow
from .sylvester import Sylvester
from .transformers import (
    AffineTransformer,
    DeepSigmoidTransformer,
    GatedAffineTransformer,
    RationalQuadraticSpline,
    Transformer,
)
from .zuko import ZukoFlow, as_flow

__all__ = [
    "FLOWS",
    "IAF",
    "MADE",
    "AffineTransformer",
    "Autoregressive",
    "Compose",
    "DeepSigmoidTransformer",
    "ElementwiseAffine",
    "Flow",
    "FlowFamily",
    "GatedAffineTransformer",
    "Householder",
    "MaskedCoupling",
    "MaskedLinear",
    "Permute",
    "Planar",
    "Radial",
    "RationalQuadraticSpline",
    "Reverse",
    "Sylvester",
    "Transformer",
    "ZukoFlow",
    "TriangularAffine",
    "alternating_mask",
    "as_flow",
    "build_flows",
    "register_flow",
]
