"""Bayesian neural networks: multiplicative normalizing flows and local reparameterization."""

from __future__ import annotations

from .guides import AutoMeanFieldGuide
from .local_reparam import LocalReparameterizationMessenger, local_reparameterization
from .mnf import AutoMNFGuide
from .models import BayesianConvNet, BayesianMLP, bayesian_layer
from .weight import GaussianWeight

__all__ = [
    "AutoMNFGuide",
    "AutoMeanFieldGuide",
    "BayesianConvNet",
    "BayesianMLP",
    "GaussianWeight",
    "LocalReparameterizationMessenger",
    "bayesian_layer",
    "local_reparameterization",
]
