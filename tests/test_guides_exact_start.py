"""Every named guide starts at the Gaussian its initialisation chose."""

from __future__ import annotations

import functools
import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import init_to_value

from pyro_flowvi import (
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoNAFGuide,
    AutoNeuralSplineGuide,
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoRealNVPGuide,
    AutoSylvesterGuide,
)
from pyro_flowvi.flows import build_flows
from pyro_flowvi.guides.base import _initial_gain
from tests.test_guides import _exact, _regression_data, regression_model

GUIDES = {
    "planar": AutoPlanarGuide,
    "radial": AutoRadialGuide,
    "householder": AutoHouseholderGuide,
    "sylvester": AutoSylvesterGuide,
    "sylvester-triangular": functools.partial(AutoSylvesterGuide, variant="triangular"),
    "iaf": AutoIAFGuide,
    "iaf-affine": functools.partial(AutoIAFGuide, update="affine"),
    "spline": AutoNeuralSplineGuide,
    "spline-coupling": functools.partial(AutoNeuralSplineGuide, coupling=True),
    "realnvp": AutoRealNVPGuide,
    "naf": AutoNAFGuide,
}


@pytest.mark.parametrize("init_scale", ["full", "diag"])
@pytest.mark.parametrize("name", list(GUIDES))
def test_a_fresh_guide_is_the_chosen_gaussian(name, init_scale):
    # Started at the posterior mean of a conjugate regression with its Laplace covariance,
    # a guide is the exact posterior ("full") when its fresh layers are the identity or an
    # elementwise scaling (the gated IAF: sigmoid(2)^3 = 0.68 per coordinate, 11.6 nats off
    # at D = 100 before the affine layer undid it). NAF's fresh layers are a nonlinear map.
    x, y = _regression_data()
    log_z, mean, _ = _exact(x, y)
    pyro.set_rng_seed(0)
    guide = GUIDES[name](
        regression_model, init_loc_fn=init_to_value(values={"w": mean}), init_scale=init_scale
    )
    guide(x, y)
    with torch.no_grad():
        elbo = Trace_ELBO(num_particles=4000, vectorize_particles=True)
        kl = log_z + elbo.loss(regression_model, guide, x, y)
    if init_scale == "full":
        assert kl < (0.05 if name == "naf" else 1e-8), kl
    # its median is the chosen location (within the Monte Carlo error of its summary draws)
    median = guide.median(x, y)["w"]
    assert torch.allclose(median, mean, atol=0.1), (median, mean)


def test_initial_gain_of_the_gated_iaf_and_of_identity_stacks():
    gated = build_flows("iaf", 4)
    torch.testing.assert_close(
        _initial_gain(gated, 4), torch.full((4,), 1 / (1 + math.exp(-2.0)) ** 3)
    )
    torch.testing.assert_close(_initial_gain(build_flows("planar", 4), 4), torch.ones(4))
    # a nonlinear fresh map (NAF) is left alone
    torch.testing.assert_close(_initial_gain(build_flows("naf", 4), 4), torch.ones(4))
