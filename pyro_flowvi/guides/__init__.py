r"""Flow autoguides that drop in for :class:`~pyro.infer.autoguide.AutoNormal`.

Every guide packs the model's continuous latents into one unconstrained vector (Pyro's
:class:`~pyro.infer.autoguide.AutoContinuous`) and models it as

.. math::

    z = \mu + \sigma \odot f_K \circ \dots \circ f_1(\epsilon), \qquad
    \epsilon \sim \mathcal N(0, I),

so that a freshly built guide (every layer near the identity) starts as a Gaussian: by
default at ``init_loc_fn`` with scales from the model's curvature there, or at a Laplace
approximation (then :math:`z = \mu_0 + L(\mu + \sigma \odot f(\epsilon))` with a fixed
:math:`L`) where that starts with a higher ELBO; see ``init_scale`` and
:mod:`pyro_flowvi.guides.initialization`. The flow layers act in standardized coordinates, which
keeps their parameters of order one whatever the scale of the posterior. The log-density of
each draw comes from the same forward pass as the draw.
"""

from __future__ import annotations

from .base import AutoFlowGuide
from .named import (
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoNAFGuide,
    AutoNeuralSplineGuide,
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoRealNVPGuide,
    AutoSylvesterGuide,
)

__all__ = [
    "AutoFlowGuide",
    "AutoHouseholderGuide",
    "AutoIAFGuide",
    "AutoNAFGuide",
    "AutoNeuralSplineGuide",
    "AutoPlanarGuide",
    "AutoRadialGuide",
    "AutoRealNVPGuide",
    "AutoSylvesterGuide",
]
