"""pyro-flowvi: normalizing-flow variational inference for Pyro.

Flow autoguides that drop in for ``AutoNormal`` (:mod:`pyro_flowvi.guides`), the flow layers
behind them (:mod:`pyro_flowvi.flows`) and the distribution that ties them together
(:class:`FlowDistribution`).
"""

from __future__ import annotations

from .distributions import FlowDistribution
from .guides import (
    AutoFlowGuide,
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoSylvesterGuide,
)

__version__ = "0.1.0"

__all__ = [
    "AutoFlowGuide",
    "AutoHouseholderGuide",
    "AutoIAFGuide",
    "AutoPlanarGuide",
    "AutoRadialGuide",
    "AutoSylvesterGuide",
    "FlowDistribution",
    "__version__",
]
