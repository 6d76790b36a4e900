"""fit's default objective: "sticking the landing" for flow guides whose inverse is cheap."""

from __future__ import annotations

import functools

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_flowvi import (
    AutoFlowGuide,
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoNAFGuide,
    AutoNeuralSplineGuide,
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoRealNVPGuide,
    AutoSylvesterGuide,
    TraceSTL_ELBO,
    fit,
)
from tests.test_guides import _exact, _regression_data, regression_model

STL_BY_DEFAULT = {
    "planar": AutoPlanarGuide,
    "radial": AutoRadialGuide,
    "householder": AutoHouseholderGuide,
    "sylvester-orthogonal": AutoSylvesterGuide,
    "sylvester-householder": functools.partial(AutoSylvesterGuide, variant="householder"),
    "sylvester-triangular": functools.partial(AutoSylvesterGuide, variant="triangular"),
    "realnvp": AutoRealNVPGuide,
    "spline-coupling": functools.partial(AutoNeuralSplineGuide, coupling=True),
}
ELBO_BY_DEFAULT = {
    "iaf": AutoIAFGuide,
    "iaf-affine": functools.partial(AutoIAFGuide, update="affine"),
    "spline-autoregressive": AutoNeuralSplineGuide,
    "naf": AutoNAFGuide,
}


@pytest.mark.parametrize("name", list(STL_BY_DEFAULT) + list(ELBO_BY_DEFAULT))
def test_default_loss_of_each_family(name):
    x, y = _regression_data()
    guide = {**STL_BY_DEFAULT, **ELBO_BY_DEFAULT}[name](regression_model)
    assert guide.default_loss == "elbo"  # not built yet: nothing known about its layers
    guide(x, y)
    assert guide.default_loss == ("stl" if name in STL_BY_DEFAULT else "elbo")


def test_fit_without_a_loss_sticks_the_landing_for_the_fit_only():
    x, y = _regression_data()
    seen = []

    def model(x, y=None):
        seen.append(guide.stick_the_landing)
        regression_model(x, y)

    guide = AutoPlanarGuide(model)
    result = fit(model, guide, x, y, num_steps=3, progress=False)
    assert isinstance(result.loss, TraceSTL_ELBO)
    assert seen[-3:] == [True, True, True]  # every step: the guide's own STL pass
    assert guide.stick_the_landing is False  # the user's setting is back

    seen.clear()
    guide = AutoIAFGuide(model)
    result = fit(model, guide, x, y, num_steps=3, progress=False)
    assert type(result.loss) is Trace_ELBO and not any(seen)

    pyro.clear_param_store()
    result = fit(regression_model, AutoNormal(regression_model), x, y, num_steps=2, progress=False)
    assert type(result.loss) is Trace_ELBO  # any other guide: the plain ELBO

    # an explicit loss is kept, and loss="stl" uses the guide's option where it has one
    seen.clear()
    guide = AutoIAFGuide(model)
    result = fit(model, guide, x, y, num_steps=2, loss="stl", progress=False)
    assert isinstance(result.loss, TraceSTL_ELBO) and seen[-2:] == [True, True]
    guide = AutoPlanarGuide(model)
    result = fit(model, guide, x, y, num_steps=2, loss="elbo", progress=False)
    assert type(result.loss) is Trace_ELBO and guide.stick_the_landing is False


def test_default_training_stays_at_an_exact_start():
    # A planar guide started at the exact posterior of a conjugate regression: the plain
    # ELBO's score term pushes it away (KL 0.009-0.02 after 300 steps over seeds 0-2); with the
    # default (STL) the gradients start at zero and it stays within 0.0012. KL from 20,000
    # draws: log w varies by ~0.1 here, so its standard error is below 1e-3.
    x, y = _regression_data()
    log_z, mean, _ = _exact(x, y)
    kl = {}
    for loss in (None, "elbo"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoPlanarGuide(
            regression_model, init_loc_fn=init_to_value(values={"w": mean}), init_scale="full"
        )
        guide(x, y)
        fit(regression_model, guide, x, y, num_steps=300, loss=loss, progress=False)
        with torch.no_grad():
            elbo = Trace_ELBO(num_particles=20_000, vectorize_particles=True)
            kl[loss] = log_z + elbo.loss(regression_model, guide, x, y)
    assert abs(kl[None]) < 0.003 and kl["elbo"] > 0.005, kl


def test_a_custom_stack_without_inverse_falls_back_to_the_elbo():
    from pyro_flowvi.flows import Planar

    class NoInverse(Planar):
        has_inverse = False

    x, y = _regression_data()
    guide = AutoFlowGuide(regression_model, flows=[NoInverse])
    guide(x, y)
    assert guide.default_loss == "elbo"
    result = fit(regression_model, guide, x, y, num_steps=2, progress=False)
    assert type(result.loss) is Trace_ELBO
    assert torch.isfinite(torch.as_tensor(result.elbo_trace)).all()


@pytest.mark.parametrize("name", ["planar", "sylvester-orthogonal", "realnvp"])
def test_default_stl_training_moves_every_parameter_with_vectorized_particles(name):
    # Away from the optimum the STL default still trains every parameter, with particles,
    # for a guide first built under torch.no_grad() (as median() or Predictive build it).
    x, y = _regression_data()
    guide = STL_BY_DEFAULT[name](regression_model)
    with torch.no_grad():
        guide(x, y)
    before = {key: p.detach().clone() for key, p in guide.named_parameters()}
    result = fit(regression_model, guide, x, y, num_steps=5, num_particles=4, progress=False)
    assert isinstance(result.loss, TraceSTL_ELBO) and result.loss.num_particles == 4
    assert torch.isfinite(torch.as_tensor(result.elbo_trace)).all()
    unchanged = [key for key, p in guide.named_parameters() if torch.equal(p, before[key])]
    assert not unchanged, unchanged


def test_default_particles_of_fit():
    # 8 vectorized particles with the STL default, 16 with the plain ELBO default; a loss
    # given by name keeps its own default (1), other guides train with 1, and an explicit
    # num_particles wins.
    x, y = _regression_data()
    cases = [
        (AutoPlanarGuide, {}, 8),
        (AutoIAFGuide, {}, 16),
        (AutoIAFGuide, {"loss": "elbo"}, 1),
        (AutoPlanarGuide, {"loss": "stl"}, 1),
        (AutoIAFGuide, {"num_particles": 2}, 2),
        (AutoNormal, {}, 1),
    ]
    for make, options, expected in cases:
        pyro.clear_param_store()
        result = fit(
            regression_model, make(regression_model), x, y, num_steps=2, progress=False, **options
        )
        assert result.loss.num_particles == expected, (make, options)
        assert result.loss.vectorize_particles == (expected > 1)


def matmul_model(x, y=None):
    w = pyro.sample("w", pyro.distributions.Normal(torch.zeros(x.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        # x @ w cannot take a leading particle dimension of w
        pyro.sample("y", pyro.distributions.Normal(x @ w, 0.5), obs=y)


@pytest.mark.parametrize("make", [AutoIAFGuide, AutoPlanarGuide])
def test_a_model_without_a_particle_dimension_trains_with_one_particle_and_says_why(make):
    x, y = _regression_data()
    pyro.set_rng_seed(3)
    with pytest.warns(UserWarning, match=r"did not run with (8|16) vectorized particles"):
        fallback = fit(matmul_model, make(matmul_model), x, y, num_steps=4, progress=False)
    assert fallback.loss.num_particles == 1
    # the probe leaves the random numbers alone: the same trace as asking for one particle
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    one = fit(matmul_model, make(matmul_model), x, y, num_steps=4, num_particles=1, progress=False)
    assert fallback.elbo_trace.tolist() == one.elbo_trace.tolist()
