"""What Pyro's autoguide users rely on: get_base_dist/get_transform (and NeuTra on top of
them), exact medians wherever the guide is symmetric, and init_loc_fn as the start."""

from __future__ import annotations

import functools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.autoguide import init_to_median, init_to_sample, init_to_value
from pyro.infer.reparam import NeuTraReparam

from pyro_flowvi import (
    AutoFlowGuide,
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoSylvesterGuide,
)
from pyro_flowvi.flows import IAF, Planar, Reverse

GUIDES = {
    "planar": functools.partial(AutoPlanarGuide, num_transforms=3),
    "radial": functools.partial(AutoRadialGuide, num_transforms=3),
    "householder": AutoHouseholderGuide,
    "sylvester-orthogonal": AutoSylvesterGuide,
    "sylvester-householder": functools.partial(AutoSylvesterGuide, variant="householder"),
    "sylvester-triangular": functools.partial(AutoSylvesterGuide, variant="triangular"),
    "iaf": AutoIAFGuide,
    "iaf-studentt": functools.partial(AutoIAFGuide, base="studentt"),
    "flow-mixed": functools.partial(AutoFlowGuide, flows=[Planar, IAF, Reverse]),
}


def correlated_model() -> None:
    """A 4-D posterior with a positive site, a correlated pair and a simplex."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("b", dist.Normal(a, 0.5))
    pyro.sample("s", dist.LogNormal(0.0, 0.3))
    pyro.sample("p", dist.Dirichlet(torch.ones(2)))


def _perturbed(name: str, **kwargs) -> AutoFlowGuide:
    """A built guide with every parameter moved off its start (trained-like values)."""
    guide = GUIDES[name](correlated_model, **kwargs)
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return guide


@pytest.mark.parametrize("name", list(GUIDES))
def test_base_dist_and_transform_describe_the_posterior(name):
    guide = _perturbed(name)
    base, transform = guide.get_base_dist(), guide.get_transform()
    assert isinstance(transform, torch.distributions.Transform)
    assert base.event_shape == (guide.latent_dim,)
    with torch.no_grad():
        eps = base.sample((64,))
        z = transform(eps)
        # Pyro's documented identity: the posterior is the base pushed through the transform.
        pushed = dist.TransformedDistribution(base, transform)
        torch.testing.assert_close(pushed.log_prob(z.clone()), guide.get_posterior().log_prob(z))
        torch.testing.assert_close(transform.inv(z.clone()), eps)
    # log|det J| against the autograd Jacobian at a few points
    for point in eps[:3]:
        jacobian = torch.autograd.functional.jacobian(transform, point)
        expected = torch.linalg.slogdet(jacobian).logabsdet
        actual = transform.log_abs_det_jacobian(point, transform(point))
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(
            transform.inv.log_abs_det_jacobian(transform(point), point), -expected
        )


def test_get_base_dist_before_the_guide_is_built_says_so():
    guide = AutoIAFGuide(correlated_model)
    with pytest.raises(RuntimeError, match=r"AutoIAFGuide.get_base_dist: call the guide once"):
        guide.get_base_dist()
    with pytest.raises(RuntimeError, match=r"AutoIAFGuide.get_transform: call the guide once"):
        guide.get_transform()


def test_neutra_reparam_with_a_flow_guide():
    # NeuTra HMC: the model seen through a trained guide's transform. The warped model's log
    # joint at the shared latent z must be log p(T(z)) + log|det J_T(z)| (in unconstrained
    # coordinates, with the bijections to each site's support).
    guide = _perturbed("iaf")
    neutra = NeuTraReparam(guide)
    warped = poutine.reparam(correlated_model, config=lambda _: neutra)
    trace = poutine.trace(warped).get_trace()
    shared = next(name for name in trace.stochastic_nodes if name.endswith("_shared_latent"))
    z = trace.nodes[shared]["value"]
    logp_warped = sum(
        site["fn"].log_prob(site["value"]).sum()
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and name != shared
    )
    transform = guide.get_transform()
    x = transform(z)
    expected = transform.log_abs_det_jacobian(z, x)
    values = {}
    for site, unconstrained in guide._unpack_latent(x):
        bijection = torch.distributions.biject_to(site["fn"].support)
        value = bijection(unconstrained)
        values[site["name"]] = value
        expected = expected + bijection.log_abs_det_jacobian(unconstrained, value).sum()
    model_trace = poutine.trace(poutine.condition(correlated_model, values)).get_trace()
    expected = expected + model_trace.log_prob_sum()
    torch.testing.assert_close(logp_warped, expected)
    samples = neutra.transform_sample(z.unsqueeze(0))
    for name, value in values.items():
        torch.testing.assert_close(samples[name][0], value)


@pytest.mark.parametrize("name", list(GUIDES))
def test_median_of_a_symmetric_guide_is_its_centre_exactly(name):
    # Every guide starts as a Gaussian (point-symmetric) around the init_loc_fn location; its
    # median and symmetric quantiles must be exact there, not within Monte Carlo error.
    init = {"a": torch.tensor(0.7), "b": torch.tensor(-1.3), "s": torch.tensor(2.0)}
    guide = GUIDES[name](correlated_model, init_loc_fn=init_to_value(values=init))
    guide()
    median = guide.median()
    for site, value in init.items():
        torch.testing.assert_close(median[site], value, atol=1e-12, rtol=0)
    q = guide.quantiles([0.2, 0.5, 0.8])
    torch.testing.assert_close(q["a"][0] + q["a"][2], 2 * init["a"], atol=1e-12, rtol=0)
    torch.testing.assert_close(q["s"][0] * q["s"][2], init["s"] ** 2, atol=1e-12, rtol=1e-12)


def test_an_init_function_of_the_users_pins_the_start():
    # A plain function site -> value is the user's choice of start, like init_to_value: the
    # default init_scale="auto" must not move it to the mode (here the prior mode 0).
    values = {"a": torch.tensor(1.5), "b": torch.tensor(-0.5), "s": torch.tensor(3.0)}

    def my_start(site):
        return values.get(site["name"], init_to_median(site))

    guide = AutoIAFGuide(correlated_model, init_loc_fn=my_start)
    guide()
    median = guide.median()
    for site, value in values.items():
        torch.testing.assert_close(median[site], value, atol=1e-12, rtol=0)


@pytest.mark.parametrize("init_loc_fn", [init_to_median, init_to_sample])
def test_pyro_strategies_still_seed_the_mode_search(init_loc_fn):
    # Pyro's generic strategies only seed the search: the "full" start is at the mode.
    guide = AutoIAFGuide(correlated_model, init_loc_fn=init_loc_fn)
    guide()
    assert guide.init_choice == "full"
    mode = guide.flow.layers[-1].loc
    torch.testing.assert_close(mode[:2], torch.zeros(2), atol=1e-4, rtol=0)  # a and b


def test_a_frozen_guide_runs_without_warnings():
    # guide.requires_grad_(False) freezes a trained guide (before prediction, or for NeuTra);
    # calling it then must not warn once per parameter (warnings are errors in this suite).
    guide = AutoSylvesterGuide(correlated_model)
    guide()
    guide.requires_grad_(False)
    with torch.no_grad():
        samples = Predictive(correlated_model, guide=guide, num_samples=5)()
        trace = poutine.trace(guide).get_trace()
    assert samples["a"].shape == (5,)
    assert not any(p.requires_grad for p in guide.parameters())
    assert not trace.param_nodes  # nothing frozen is handed to an optimizer
