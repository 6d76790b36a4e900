"""Tests of pyro_flowvi.estimators: sticking the landing, importance-weighted bounds, DReG.

The conjugate model (Normal prior, Normal likelihood, two independent coordinates) has an exact
posterior, log evidence and ELBO, so every statistical check compares against exact numbers
with tolerances of a few standard errors.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import (
    AutoGuideList,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)

from pyro_flowvi import AutoFlowGuide, AutoIAFGuide, AutoPlanarGuide, fit
from pyro_flowvi._util import plate_batch_shape
from pyro_flowvi.estimators import TraceIW_ELBO, TraceSTL_ELBO

PRIOR_SCALE = 2.0
NOISE = 0.8
DIM = 2


def data() -> torch.Tensor:
    return torch.tensor(
        [[0.5, -1.0], [1.2, -0.4], [-0.3, -1.6], [0.8, -0.9], [2.0, -0.2]],
        dtype=torch.get_default_dtype(),
    )


def model(x):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(DIM), PRIOR_SCALE).to_event(1))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("x", dist.Normal(mu, NOISE).to_event(1), obs=x)


def model_with_param(x):
    """The conjugate model with a learnable prior location (a model parameter)."""
    loc = pyro.param("prior_loc", torch.full((DIM,), 0.3))
    mu = pyro.sample("mu", dist.Normal(loc, PRIOR_SCALE).to_event(1))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("x", dist.Normal(mu, NOISE).to_event(1), obs=x)


def posterior(x):
    """Exact posterior mean and standard deviation of ``mu`` (each coordinate independent)."""
    precision = 1 / PRIOR_SCALE**2 + x.shape[0] / NOISE**2
    return x.sum(0) / NOISE**2 / precision, torch.full((DIM,), precision**-0.5)


def log_evidence(x):
    n = x.shape[0]
    cov = NOISE**2 * torch.eye(n) + PRIOR_SCALE**2 * torch.ones(n, n)
    evidence = dist.MultivariateNormal(torch.zeros(n), covariance_matrix=cov)
    return evidence.log_prob(x.T).sum().item()


def exact_elbo(x, loc, cov):
    """ELBO of q = N(loc, cov) on the conjugate model, differentiable in (loc, cov)."""
    var = cov.diagonal()
    prior = -0.5 * math.log(2 * math.pi * PRIOR_SCALE**2) - (loc**2 + var) / (2 * PRIOR_SCALE**2)
    lik = -0.5 * math.log(2 * math.pi * NOISE**2) - ((x - loc) ** 2 + var) / (2 * NOISE**2)
    entropy = 0.5 * DIM * math.log(2 * math.pi * math.e) + 0.5 * torch.logdet(cov)
    return prior.sum() + lik.sum() + entropy


def assign(module, name, value):
    """Set a parameter of a PyroModule (constrained ``PyroParam``) or a plain ``nn.Parameter``."""
    own = dict(module.named_parameters(recurse=False))
    if name in own:
        with torch.no_grad():
            own[name].copy_(value)
    else:
        setattr(module, name, value)


def make_guide(kind, the_model=model):
    """A guide of the given kind, built and set to the exact posterior."""
    x = data()
    loc, scale = posterior(x)
    if kind == "normal":
        guide = AutoNormal(the_model)
        guide(x)
        guide.locs.mu = loc
        guide.scales.mu = scale
    elif kind == "mvn":
        guide = AutoMultivariateNormal(the_model)
        guide(x)
        assign(guide, "loc", loc)
        assign(guide, "scale", scale)
        assign(guide, "scale_tril", torch.eye(DIM))
    elif kind == "planar":  # planar layers start as the identity: q = N(loc, scale^2)
        guide = AutoPlanarGuide(the_model, num_transforms=2, init_scale=0.1)
        guide(x)
        affine = guide.flow.layers[-1]
        with torch.no_grad():
            affine.loc.copy_(loc)
            affine.raw_scale.copy_(scale + torch.log(-torch.expm1(-scale)))
    else:
        raise AssertionError(kind)
    return guide


def move_off_optimum(guide, kind):
    """Shift the guide away from the posterior: location +0.7, scales x1.8, a correlation."""
    loc, scale = posterior(data())
    if kind == "normal":
        guide.locs.mu = loc + 0.7
        guide.scales.mu = 1.8 * scale
    else:
        assign(guide, "loc", loc + 0.7)
        assign(guide, "scale", 1.8 * scale)
        assign(guide, "scale_tril", torch.tensor([[1.0, 0.0], [0.6, 1.0]]))


def guide_moments(guide, kind):
    if kind == "normal":
        return guide.locs.mu, torch.diag(guide.scales.mu**2)
    posterior_ = guide.get_posterior()
    return posterior_.loc, posterior_.covariance_matrix


def draw_grads(elbo, the_model, guide, params, seeds, x=None):
    """One gradient of the loss per seed (``loss_and_grads``), stacked ``(len(seeds), P)``."""
    x = data() if x is None else x
    rows = []
    for seed in seeds:
        for p in params:
            p.grad = None
        pyro.set_rng_seed(seed)
        elbo.loss_and_grads(the_model, guide, x)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
            )
        )
    for p in params:
        p.grad = None
    return torch.stack(rows)


def mean_and_se(rows):
    return rows.mean(0), rows.std(0) / math.sqrt(rows.shape[0])


# --------------------------------------------------------------------------------------------
# sticking the landing


@pytest.mark.parametrize("kind", ["normal", "mvn", "planar"])
def test_stl_gradient_is_zero_at_the_exact_posterior_and_plain_is_not(kind):
    guide = make_guide(kind)
    params = list(guide.parameters())
    seeds = range(10)
    stl = draw_grads(TraceSTL_ELBO(), model, guide, params, seeds)
    plain = draw_grads(Trace_ELBO(), model, guide, params, seeds)
    vectorized = draw_grads(
        TraceSTL_ELBO(3, vectorize_particles=True, max_plate_nesting=1),
        model,
        guide,
        params,
        seeds,
    )
    assert stl.abs().max() < 1e-9
    assert vectorized.abs().max() < 1e-9
    # every single draw of the plain estimator has a clearly non-zero gradient
    assert (plain.abs().amax(1) > 1e-2).all()


@pytest.mark.parametrize("kind", ["normal", "mvn"])
def test_stl_is_unbiased_at_a_non_optimal_guide(kind):
    x = data()
    guide = make_guide(kind)
    move_off_optimum(guide, kind)
    params = list(guide.parameters())
    loc, cov = guide_moments(guide, kind)
    exact = torch.autograd.grad(-exact_elbo(x, loc, cov), params)
    exact = torch.cat([g.reshape(-1) for g in exact])
    # 40 independent means of 10 single-draw gradients each (vectorized particles)
    options = {"vectorize_particles": True, "max_plate_nesting": 1}
    for elbo in (TraceSTL_ELBO(10, **options), Trace_ELBO(10, **options)):
        mean, se = mean_and_se(draw_grads(elbo, model, guide, params, range(40)))
        assert ((mean - exact).abs() <= 4 * se + 1e-12).all(), (type(elbo).__name__, mean, exact)
    # the test has power: the exact gradient is many standard errors from zero
    assert (exact.abs()[se > 0] / se[se > 0]).max() > 20


def test_stl_value_is_the_elbo_and_model_gradients_are_trace_elbos():
    x = data()
    guide = make_guide("normal", model_with_param)
    move_off_optimum(guide, "normal")
    params = [pyro.param("prior_loc").unconstrained()]
    stl = draw_grads(TraceSTL_ELBO(), model_with_param, guide, params, range(5))
    plain = draw_grads(Trace_ELBO(), model_with_param, guide, params, range(5))
    assert torch.allclose(stl, plain, atol=1e-12)
    pyro.set_rng_seed(3)
    value = TraceSTL_ELBO(num_particles=2).loss(model_with_param, guide, x)
    pyro.set_rng_seed(3)
    expected = Trace_ELBO(num_particles=2).loss(model_with_param, guide, x)
    assert value == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------
# the importance-weighted bound


def batch_bounds(num_particles, guide, repeats=20, num_bounds=50):
    """``repeats`` means of ``num_bounds`` independent K-particle bounds each."""
    elbo = TraceIW_ELBO(
        num_particles, num_bounds=num_bounds, vectorize_particles=True, max_plate_nesting=1
    )
    return torch.tensor([-elbo.loss(model, guide, data()) for _ in range(repeats)])


def test_iw_bound_is_below_log_z_increases_with_k_and_is_the_elbo_at_k1():
    x = data()
    log_z = log_evidence(x)
    guide = make_guide("normal")
    move_off_optimum(guide, "normal")
    with torch.no_grad():
        elbo = exact_elbo(x, *guide_moments(guide, "normal")).item()
    means, ses = [], []
    for k in (1, 4, 32):
        mean, se = mean_and_se(batch_bounds(k, guide))
        means.append(mean.item())
        ses.append(se.item())
        assert mean <= log_z + 3 * se
    assert abs(means[0] - elbo) <= 4 * ses[0]
    for i in range(2):
        assert means[i + 1] - means[i] > 3 * math.hypot(ses[i], ses[i + 1]), (means, ses)
    assert log_z - means[0] > 1.0  # the guide is far enough from the posterior to show it


@pytest.mark.parametrize("kind", ["normal", "mvn", "planar"])
def test_iw_bound_is_log_z_with_zero_variance_at_the_exact_posterior(kind):
    guide = make_guide(kind)
    log_z = log_evidence(data())
    for elbo in (
        TraceIW_ELBO(8, vectorize_particles=True, max_plate_nesting=1),
        TraceIW_ELBO(3),
        TraceIW_ELBO(1, num_bounds=4, vectorize_particles=True),
    ):
        values = [-elbo.loss(model, guide, data()) for _ in range(5)]
        assert values == pytest.approx([log_z] * 5, abs=1e-9)


@pytest.mark.parametrize("kind", ["normal", "mvn", "planar"])
def test_dreg_gradient_is_zero_at_the_exact_posterior_and_iwae_is_not(kind):
    guide = make_guide(kind)
    params = list(guide.parameters())
    dreg = TraceIW_ELBO(8, vectorize_particles=True, max_plate_nesting=1)
    iwae = TraceIW_ELBO(8, gradient="iwae", vectorize_particles=True, max_plate_nesting=1)
    assert draw_grads(dreg, model, guide, params, range(5)).abs().max() < 1e-9
    assert draw_grads(TraceIW_ELBO(3), model, guide, params, range(5)).abs().max() < 1e-9
    assert (draw_grads(iwae, model, guide, params, range(5)).abs().amax(1) > 1e-2).all()


def test_iwae_gradient_equals_pyros_renyi_elbo_draw_by_draw():
    guide = make_guide("mvn", model_with_param)
    move_off_optimum(guide, "mvn")
    params = [pyro.param("prior_loc").unconstrained(), *guide.parameters()]
    ours = TraceIW_ELBO(6, gradient="iwae", vectorize_particles=True, max_plate_nesting=1)
    pyros = RenyiELBO(alpha=0, num_particles=6, vectorize_particles=True, max_plate_nesting=1)
    a = draw_grads(ours, model_with_param, guide, params, range(4))
    b = draw_grads(pyros, model_with_param, guide, params, range(4))
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    pyro.set_rng_seed(1)
    value = ours.loss(model_with_param, guide, data())
    pyro.set_rng_seed(1)
    assert value == pytest.approx(pyros.loss(model_with_param, guide, data()), abs=1e-10)


@pytest.mark.parametrize("vectorize", [True, False])
def test_model_parameter_gradients_of_dreg_equal_iwae(vectorize):
    guide = make_guide("normal", model_with_param)
    move_off_optimum(guide, "normal")
    params = [pyro.param("prior_loc").unconstrained()]
    options = {"vectorize_particles": vectorize, "max_plate_nesting": 1}
    dreg = draw_grads(TraceIW_ELBO(5, **options), model_with_param, guide, params, range(4))
    iwae = TraceIW_ELBO(5, gradient="iwae", **options)
    assert torch.allclose(dreg, draw_grads(iwae, model_with_param, guide, params, range(4)))
    assert dreg.abs().min() > 1e-3


@pytest.mark.parametrize("kind", ["normal", "mvn"])
def test_dreg_agrees_with_iwae_in_expectation(kind):
    guide = make_guide(kind)
    move_off_optimum(guide, kind)
    params = list(guide.parameters())
    options = {"vectorize_particles": True, "max_plate_nesting": 1}
    # the same draws for both, 40 times the mean of 10 independent 8-particle bounds: the
    # difference of the two gradients has mean zero and a small standard error
    dreg = draw_grads(TraceIW_ELBO(8, num_bounds=10, **options), model, guide, params, range(40))
    iwae = TraceIW_ELBO(8, num_bounds=10, gradient="iwae", **options)
    iwae = draw_grads(iwae, model, guide, params, range(40))
    mean, se = mean_and_se(dreg - iwae)
    assert (mean.abs() <= 4 * se).all(), (mean, se)
    # the gradient being matched is not noise
    iwae_mean, iwae_se = mean_and_se(iwae)
    assert (iwae_mean.abs()[iwae_se > 0] / iwae_se[iwae_se > 0]).max() > 4


def test_dreg_signal_to_noise_beats_iwae_at_large_k():
    guide = make_guide("normal")
    move_off_optimum(guide, "normal")
    params = list(guide.parameters())
    options = {"vectorize_particles": True, "max_plate_nesting": 1}
    seeds = range(100)
    dreg = draw_grads(TraceIW_ELBO(64, **options), model, guide, params, seeds)
    iwae = draw_grads(TraceIW_ELBO(64, gradient="iwae", **options), model, guide, params, seeds)
    snr_dreg = dreg.mean(0).abs() / dreg.std(0)
    snr_iwae = iwae.mean(0).abs() / iwae.std(0)
    # every coordinate (locations and scales): here 1.6, 1.4, 0.81, 0.60 against
    # 0.27, 0.10, 0.22, 0.006 (benchmarks/estimators.py measures more)
    assert (snr_dreg > 2 * snr_iwae).all(), (snr_dreg, snr_iwae)


# --------------------------------------------------------------------------------------------
# bounds per plate element (local latents)


def local_model(x):
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(0.0, PRIOR_SCALE))
        pyro.sample("x", dist.Normal(z, NOISE), obs=x)


def local_guide(x):
    loc = pyro.param("loc", torch.zeros(x.shape[0]) + 0.3)
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(loc, 1.5))


def test_iw_bound_factorizes_over_a_plate_around_every_site():
    x = torch.tensor([0.4, -1.0, 2.0])
    k = 7
    elbo = TraceIW_ELBO(k, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    value = -elbo.loss(local_model, local_guide, x)
    # the same draws by hand: one bound per data point, summed
    pyro.set_rng_seed(0)
    plate = pyro.plate("num_particles_vectorized", k, dim=-2)
    guide_trace = poutine.trace(plate(local_guide)).get_trace(x)
    model_trace = poutine.trace(poutine.replay(plate(local_model), trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_w = model_trace.nodes["z"]["log_prob"] + model_trace.nodes["x"]["log_prob"]
    log_w = log_w - guide_trace.nodes["z"]["log_prob"]  # (k, 3)
    per_point = torch.logsumexp(log_w, 0) - math.log(k)
    assert value == pytest.approx(per_point.sum().item(), abs=1e-10)


def test_iw_bound_per_element_is_scaled_after_the_log_mean_exp():
    x = torch.tensor([0.4, -1.0, 2.0])
    elbo = TraceIW_ELBO(5, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    plain = elbo.loss(local_model, local_guide, x)
    pyro.set_rng_seed(0)
    scaled = elbo.loss(poutine.scale(local_model, 10.0), poutine.scale(local_guide, 10.0), x)
    assert scaled == pytest.approx(10 * plain, rel=1e-12)
    with pytest.raises(ValueError, match="one scale shared by every site"):
        elbo.loss(poutine.scale(local_model, 10.0), local_guide, x)


# --------------------------------------------------------------------------------------------
# guide protocols


def test_a_guide_with_log_prob_at_is_scored_by_it():
    """A guide whose site is a Delta carrying log q (like the flow guides) and which scores
    fixed points with ``log_prob_at`` gives the same gradients as the plain Normal guide."""
    x = data()

    def normal_guide(x):
        loc = pyro.param("q_loc", torch.zeros(DIM))
        scale = pyro.param("q_scale", torch.ones(DIM), constraint=dist.constraints.positive)
        pyro.sample("mu", dist.Normal(loc, scale).to_event(1))

    class DeltaGuide:
        def __call__(self, x):
            q = self.q()
            z = q.rsample(plate_batch_shape())  # one draw per particle under the plate
            pyro.sample("mu", dist.Delta(z, log_density=q.log_prob(z), event_dim=1))

        def q(self):
            loc = pyro.param("q_loc", torch.zeros(DIM))
            scale = pyro.param("q_scale", torch.ones(DIM), constraint=dist.constraints.positive)
            return dist.Normal(loc, scale).to_event(1)

        def log_prob_at(self, trace, *args, **kwargs):
            return {"mu": self.q().log_prob(trace.nodes["mu"]["value"].detach())}

    normal_guide(x)
    params = [pyro.param("q_loc").unconstrained(), pyro.param("q_scale").unconstrained()]
    vectorized = TraceIW_ELBO(4, vectorize_particles=True, max_plate_nesting=1)
    for elbo in (TraceSTL_ELBO(), TraceIW_ELBO(4), vectorized):
        a = draw_grads(elbo, model, normal_guide, params, range(3))
        b = draw_grads(elbo, model, DeltaGuide(), params, range(3))
        assert torch.allclose(a, b, atol=1e-12), type(elbo).__name__
    # without the method the replay finds a new point at the Delta site and says so
    bare = DeltaGuide()
    bare_guide = bare.__call__
    with pytest.raises(ValueError, match="Delta site 'mu' took a different point"):
        TraceSTL_ELBO().loss_and_grads(model, bare_guide, x)


def test_a_guide_that_declares_stick_the_landing_is_not_scored_again():
    x = data()

    def normal_guide(x):
        loc = pyro.param("q_loc", torch.zeros(DIM))
        pyro.sample("mu", dist.Normal(loc, 1.3).to_event(1))

    def stl_guide(x):  # log q with the parameters detached: the pathwise gradient only
        loc = pyro.param("q_loc", torch.zeros(DIM))
        z = dist.Normal(loc, 1.3).to_event(1).rsample()
        log_q = dist.Normal(loc.detach(), 1.3).to_event(1).log_prob(z)
        pyro.sample("mu", dist.Delta(z, log_density=log_q, event_dim=1))

    stl_guide.stick_the_landing = True
    normal_guide(x)
    params = [pyro.param("q_loc").unconstrained()]
    for elbo in (TraceSTL_ELBO(), TraceIW_ELBO(4)):
        a = draw_grads(elbo, model, normal_guide, params, range(3))
        b = draw_grads(elbo, model, stl_guide, params, range(3))
        assert torch.allclose(a, b, atol=1e-12), type(elbo).__name__
    with pytest.raises(ValueError, match="stick_the_landing=True"):
        TraceIW_ELBO(4, gradient="iwae").loss_and_grads(model, stl_guide, x)


def test_dreg_with_one_particle_is_stl():
    guide = make_guide("mvn")
    move_off_optimum(guide, "mvn")
    params = list(guide.parameters())
    a = draw_grads(TraceIW_ELBO(1, num_bounds=3), model, guide, params, range(4))
    b = draw_grads(TraceSTL_ELBO(3), model, guide, params, range(4))
    assert torch.allclose(a, b, atol=1e-12)


def test_auto_guide_list_is_scored_part_by_part():
    def two_site_model(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(torch.zeros(DIM), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("x", dist.Normal(a + b, NOISE).to_event(1), obs=x)

    guide = AutoGuideList(two_site_model)
    guide.append(AutoNormal(poutine.block(two_site_model, hide=["b"])))
    guide.append(AutoIAFGuide(poutine.block(two_site_model, expose=["b"]), init_scale=0.1))
    svi = SVI(two_site_model, guide, pyro.optim.Adam({"lr": 0.01}), TraceIW_ELBO(3))
    losses = [svi.step(data()) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)


# --------------------------------------------------------------------------------------------
# guides through SVI and fit


GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoMultivariateNormal": lambda m: AutoMultivariateNormal(m),
    "AutoIAFNormal": lambda m: AutoIAFNormal(m, hidden_dim=[8]),
    "AutoIAFGuide": lambda m: AutoIAFGuide(m, init_scale=0.1),
    "AutoPlanarGuide": lambda m: AutoPlanarGuide(m, init_scale=0.1, num_transforms=2),
    "AutoFlowGuide": lambda m: AutoFlowGuide(m, init_scale=0.1),
}

LOSSES = {
    "stl": lambda: TraceSTL_ELBO(),
    "stl-vectorized": lambda: TraceSTL_ELBO(2, vectorize_particles=True),
    "iw-dreg": lambda: TraceIW_ELBO(3),
    "iw-dreg-vectorized": lambda: TraceIW_ELBO(4, num_bounds=2, vectorize_particles=True),
}


def _snapshot(guide):
    return [p.detach().clone() for p in guide.parameters()]


def _changed(before, guide):
    return any(not torch.equal(a, b) for a, b in zip(before, guide.parameters(), strict=True))


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("name", list(GUIDES))
def test_guides_train_through_svi(name, loss):
    x = data()
    guide = GUIDES[name](model)
    guide(x)
    before = _snapshot(guide)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), LOSSES[loss]())
    losses = [svi.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert _changed(before, guide)


@pytest.mark.parametrize("name", ["AutoMultivariateNormal", "AutoIAFNormal", "AutoIAFGuide"])
def test_guides_train_through_fit(name):
    x = data()
    guide = GUIDES[name](model)
    guide(x)
    before = _snapshot(guide)
    loss = TraceIW_ELBO(4, vectorize_particles=True)
    result = fit(model, guide, x, num_steps=4, loss=loss, progress=False)
    assert result.elbo_trace.shape == (4,)
    assert torch.isfinite(torch.as_tensor(result.elbo_trace)).all()
    assert _changed(before, guide)
    result = fit(model, guide, x, num_steps=2, loss=TraceSTL_ELBO(), progress=False)
    assert torch.isfinite(torch.as_tensor(result.elbo_trace)).all()


def test_differentiable_loss_works_with_a_torch_optimizer():
    x = data()
    guide = AutoIAFGuide(model, init_scale=0.1)
    guide(x)
    module = TraceIW_ELBO(4, vectorize_particles=True)(model, guide)
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.01)
    before = _snapshot(guide)
    for _ in range(2):
        optimizer.zero_grad()
        loss = module(x)
        loss.backward()
        optimizer.step()
    assert math.isfinite(loss.item()) and _changed(before, guide)


# --------------------------------------------------------------------------------------------
# errors


def test_non_reparameterized_guide_site_is_named():
    def circular_model():
        pyro.sample("angle", dist.VonMises(0.0, 1.0))

    def circular_guide():
        loc = pyro.param("angle_loc", torch.tensor(0.1))
        pyro.sample("angle", dist.VonMises(loc, 2.0))

    for elbo in (TraceSTL_ELBO(), TraceIW_ELBO(2)):
        with pytest.raises(ValueError, match="guide site 'angle' .*not reparameterizable"):
            elbo.loss_and_grads(circular_model, circular_guide)


def test_discrete_sites_are_refused_with_their_name():
    def mixed_model():
        pyro.sample("c", dist.Bernoulli(0.3))
        pyro.sample("y", dist.Normal(0.0, 1.0))

    def guide_with_c():
        pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("y", dist.Normal(pyro.param("y_loc", torch.tensor(0.0)), 1.0))

    def guide_without_c():
        pyro.sample("y", dist.Normal(pyro.param("y_loc", torch.tensor(0.0)), 1.0))

    with pytest.raises(ValueError, match="guide site 'c' is discrete"):
        TraceIW_ELBO(2).loss(mixed_model, guide_with_c)
    with (
        pyro.validation_enabled(False),
        pytest.raises(ValueError, match="model site 'c' is a discrete latent"),
    ):
        TraceSTL_ELBO().loss(mixed_model, guide_without_c)


def test_latent_missing_from_the_guide_is_named():
    def guide(x):
        pyro.sample("unused", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})

    with (
        pyro.validation_enabled(False),
        pytest.raises(ValueError, match="model site 'mu' is latent but the guide does not"),
    ):
        TraceIW_ELBO(2).loss(model, guide, data())


def test_a_failed_inverse_is_refused_clearly():
    """A fixed-value log q that is not finite where the draw's own log q is (a flow inverse
    that overflowed) stops the step with the site's name, not a NaN gradient."""

    class BrokenInverse:
        def __call__(self, x):
            loc = pyro.param("q_loc", torch.zeros(DIM))
            pyro.sample("mu", dist.Normal(loc, 1.0).to_event(1))

        def log_prob_at(self, trace, *args, **kwargs):
            value = trace.nodes["mu"]["value"].detach()
            return {"mu": dist.Normal(pyro.param("q_loc"), 1.0).to_event(1).log_prob(value) / 0.0}

    for elbo in (TraceSTL_ELBO(), TraceIW_ELBO(3)):
        with pytest.raises(ValueError, match="log q of guide site 'mu' at its own draws"):
            elbo.loss_and_grads(model, BrokenInverse(), data())


def test_pyro_flow_without_inverse_is_refused_clearly():
    guide = AutoNormalizingFlow(model, lambda d: dist.transforms.Planar(d))
    with pytest.raises(ValueError, match="cannot score a point it did not just draw"):
        TraceSTL_ELBO().loss_and_grads(model, guide, data())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TraceIW_ELBO(0), "num_particles must be an int >= 1, got 0"),
        (lambda: TraceIW_ELBO(4, num_bounds=1.5), "num_bounds must be an int >= 1, got 1.5"),
        (lambda: TraceIW_ELBO(4, gradient="stl"), "gradient must be 'dreg' or 'iwae'"),
        (lambda: TraceSTL_ELBO(True), "num_particles must be an int >= 1, got True"),
        (lambda: TraceSTL_ELBO(max_plate_nesting=-1), "max_plate_nesting must be"),
    ],
)
def test_bad_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------------------------
# the benchmark script


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "estimators.py"
    spec = importlib.util.spec_from_file_location("estimators_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_log_weights_give_the_exact_kl(bench):
    x = torch.tensor(bench.DATA)
    guide = bench.conjugate_guide(x, 0.0, 1.0)
    kl, se, gap = bench.quality(bench.conjugate_model, guide, (x,), 1, bench.conjugate_log_z(x))
    assert abs(kl) < 1e-9 and se < 1e-9 and abs(gap) < 1e-9
    guide = bench.conjugate_guide(x, 0.7, 1.8)
    with torch.no_grad():
        exact = bench.conjugate_log_z(x) - exact_elbo(
            x, guide.locs.mu, torch.diag(guide.scales.mu**2)
        )
    kl, se, _ = bench.quality(bench.conjugate_model, guide, (x,), 1, bench.conjugate_log_z(x))
    assert abs(kl - exact.item()) < 4 * se


@pytest.mark.parametrize(
    "argv",
    [
        ["--section", "snr", "--num-draws", "2", "--train-steps", "1"],
        ["--section", "fit", "--num-steps", "2"],
        ["--section", "drift", "--dim", "4", "--num-steps", "2", "--guides", "planar", "--decay"],
    ],
)
def test_benchmark_script_runs(bench, argv):
    text = bench.main(bench.parse_args(argv))
    assert "nan" not in text.lower() and "inf" not in text.lower()
    assert len(text.splitlines()) >= 3  # header, rule, at least one row


def test_all_names_the_public_classes():
    import inspect

    import pyro_flowvi.estimators as module

    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and inspect.isclass(value)
        and value.__module__ == module.__name__
    }
    assert public == set(module.__all__) == {"TraceIW_ELBO", "TraceSTL_ELBO"}
