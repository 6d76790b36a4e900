"""Bayesian neural networks: multiplicative normalizing flows and local reparameterization."""

from __future__ import annotations

from .guides import AutoMeanFieldGuide
from .local_reparam import LocalReparameterizationMessenger, local_reparameterization
from .mnf import AutoMNFGuide
from .models import NOISE_SITE, BayesianConvNet, BayesianMLP, bayesian_layer
from .predictive import log_likelihood_draws, mixture_log_likelihood, predictive_log_likelihood
from .training import EpochFitResult, fit_epochs, kl_weight
from .weight import GaussianWeight

__all__ = [
    "NOISE_SITE",
    "AutoMNFGuide",
    "AutoMeanFieldGuide",
    "BayesianConvNet",
    "BayesianMLP",
    "EpochFitResult",
    "GaussianWeight",
    "LocalReparameterizationMessenger",
    "bayesian_layer",
    "fit_epochs",
    "kl_weight",
    "local_reparameterization",
    "log_likelihood_draws",
    "mixture_log_likelihood",
    "predictive_log_likelihood",
]
