"""pyro-flowvi: normalizing-flow variational inference for Pyro.

Flow autoguides that drop in for ``AutoNormal`` (:mod:`pyro_flowvi.guides`), the flow layers
behind them (:mod:`pyro_flowvi.flows`), the distribution that ties them together
(:class:`FlowDistribution`), amortized flows for local latents (:mod:`pyro_flowvi.amortized`),
multiplicative normalizing flows for Bayesian neural networks (:mod:`pyro_flowvi.bnn`), the
SVI loop :func:`fit` and ArviZ diagnostics (:mod:`pyro_flowvi.diagnostics`).
"""

from __future__ import annotations

from .amortized import AutoAmortizedFlowGuide, FlowEncoder
from .distributions import FlowDistribution
from .estimators import TraceIW_ELBO, TraceSTL_ELBO
from .fit import (
    CheckpointError,
    DivergenceRule,
    DivergenceWarning,
    FitResult,
    NonFiniteLossError,
    fit,
)
from .guides import (
    AutoFlowGuide,
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoNAFGuide,
    AutoNeuralSplineGuide,
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoRealNVPGuide,
    AutoSylvesterGuide,
)

__version__ = "0.1.0"

__all__ = [
    "AutoAmortizedFlowGuide",
    "AutoFlowGuide",
    "AutoHouseholderGuide",
    "AutoIAFGuide",
    "AutoNAFGuide",
    "AutoNeuralSplineGuide",
    "AutoPlanarGuide",
    "AutoRadialGuide",
    "AutoRealNVPGuide",
    "AutoSylvesterGuide",
    "CheckpointError",
    "DivergenceRule",
    "DivergenceWarning",
    "FitResult",
    "FlowDistribution",
    "FlowEncoder",
    "NonFiniteLossError",
    "TraceIW_ELBO",
    "TraceSTL_ELBO",
    "__version__",
    "fit",
]
