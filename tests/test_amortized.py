"""Amortized flows: the encoder's density, Pyro integration, and the local-latent autoguide."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.optim import Adam, ClippedAdam
from torch import nn
from torch.autograd.functional import jacobian

from pyro_flowvi import AutoIAFGuide
from pyro_flowvi.amortized import (
    AutoAmortizedFlowGuide,
    FlowEncoder,
    conditional_families,
    conditional_flows,
)
from pyro_flowvi.distributions import FlowDistribution
from pyro_flowvi.flows import Compose, ElementwiseAffine, Flow

FAMILIES = list(conditional_families())


def _randomize(module: nn.Module, scale: float = 0.4) -> None:
    """Random parameters, so that no layer sits at its (identity) initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)


# ------------------------------------------------------------------------------------------
# FlowEncoder and its distribution


@pytest.mark.parametrize("family", FAMILIES)
def test_log_density_matches_autograd_per_batch_element(family):
    encoder = FlowEncoder(5, 3, hidden_dims=(6,), flow=family, num_transforms=2)
    _randomize(encoder)
    x = torch.randn(4, 5)
    h = encoder.context(x)
    eps = torch.randn(4, 3)
    z, ladj = encoder.flow(eps, h)
    for b in range(4):
        J = jacobian(lambda e, b=b: encoder.flow(e, h[b])[0], eps[b])
        sign, logabsdet = torch.linalg.slogdet(J)
        assert sign != 0
        assert torch.allclose(ladj[b], logabsdet, atol=1e-8), (family, b)
    # the distribution's density of the same points, through the inverse, agrees
    q = encoder(x)
    expected = dist.Normal(0.0, 1.0).log_prob(eps).sum(-1) - ladj
    assert torch.allclose(q.log_prob(z.detach()), expected, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_for_batched_contexts(family):
    encoder = FlowEncoder(4, 3, hidden_dims=(8, 6), flow=family, num_transforms=2)
    q = encoder(torch.randn(2, 5, 4))
    assert q.batch_shape == (2, 5) and q.event_shape == (3,)
    z, log_q = q.rsample_and_log_prob((7,))
    assert z.shape == (7, 2, 5, 3) and log_q.shape == (7, 2, 5)
    assert torch.isfinite(log_q).all()
    torch.testing.assert_close(q.log_prob(z), log_q)  # the inverse scores the draw exactly
    assert encoder(torch.randn(4)).batch_shape == ()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_encoder_parameter(family):
    encoder = FlowEncoder(4, 3, hidden_dims=(6,), flow=family, num_transforms=2)
    _randomize(encoder)
    z, log_q = encoder(torch.randn(8, 4)).rsample_and_log_prob()
    (log_q.sum() + (z**2).sum()).backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_fresh_encoder_is_its_gaussian():
    encoder = FlowEncoder(4, 3, hidden_dims=(6,), flow="sylvester-orthogonal", init_scale=0.5)
    x = torch.randn(5, 4)
    z, log_q = encoder(x).rsample_and_log_prob()
    loc, scale = encoder.flow.layers[0].loc_scale(encoder.context(x))
    assert torch.allclose(log_q, dist.Normal(loc, scale).log_prob(z).sum(-1), atol=1e-8)


def _vae_pieces(family, input_dim=4, latent_dim=2):
    decoder = nn.Linear(latent_dim, input_dim)
    encoder = FlowEncoder(input_dim, latent_dim, hidden_dims=(8,), flow=family, num_transforms=2)
    _randomize(encoder)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", encoder(x))

    def delta_guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            z, log_q = encoder(x).rsample_and_log_prob()
            pyro.sample("z", dist.Delta(z, log_density=log_q, event_dim=1))

    return model, guide, delta_guide, encoder


@pytest.mark.parametrize("family", [None, "planar", "iaf", "sylvester-triangular"])
def test_pyro_sample_of_encoder_gives_exact_elbo(family):
    model, guide, delta_guide, encoder = _vae_pieces(family)
    x = torch.randn(6, 4)
    for g in (guide, delta_guide):
        pyro.set_rng_seed(3)
        loss = Trace_ELBO().differentiable_loss(model, g, x)
        pyro.set_rng_seed(3)
        guide_trace = poutine.trace(g).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
        z = guide_trace.nodes["z"]["value"]
        # an independent evaluation of log q(z | x): the inverse of the stack at a copy of z
        z_fixed = z.detach().clone()
        eps, ladj_inv = encoder.flow.inverse(z_fixed, encoder.context(x))
        log_q = dist.Normal(0.0, 1.0).log_prob(eps).sum(-1) + ladj_inv
        elbo = model_trace.log_prob_sum() - log_q.sum()
        assert torch.allclose(-loss, elbo, atol=1e-6), g.__name__


def test_elbo_gradients_agree_between_guide_patterns():
    model, guide, delta_guide, encoder = _vae_pieces("sylvester-householder")
    x = torch.randn(6, 4)
    grads = []
    for g in (guide, delta_guide):
        pyro.set_rng_seed(5)
        encoder.zero_grad()
        Trace_ELBO().differentiable_loss(model, g, x).backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_vectorized_particles_draw_independently():
    model, _, _, encoder = _vae_pieces("radial")
    x = torch.randn(6, 4)
    draws = []

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            draws.append(pyro.sample("z", encoder(x)))

    elbo = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide, x)
    assert torch.isfinite(loss)
    z = draws[-1]
    assert z.shape == (5, 6, 2)
    assert not torch.allclose(z[0], z[1])


class _NoInverse(Flow):
    """A conditional shift with no inverse, to exercise the non-invertible path."""

    def __init__(self, input_dim: int, context_dim: int) -> None:
        super().__init__(input_dim, context_dim)
        self.head = nn.Linear(context_dim, input_dim)

    def forward(self, x, context=None):
        self._check_context(context)
        return x + torch.tanh(self.head(context)), x.new_zeros(x.shape[:-1])


def test_non_invertible_stack_samples_through_delta_and_rejects_log_prob():
    flow = Compose([ElementwiseAffine(2, context_dim=3), _NoInverse(2, 3)])
    context = torch.randn(4, 3)
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    q = FlowDistribution(base, flow, context)
    z, log_q = q.rsample_and_log_prob()
    with pytest.raises(NotImplementedError, match="_NoInverse"):
        q.log_prob(z)  # no record of past draws: any point needs the inverse

    def guide():
        with pyro.plate("data", 4):
            z, log_q = FlowDistribution(base, flow, context).rsample_and_log_prob()
            pyro.sample("z", dist.Delta(z, log_density=log_q, event_dim=1))

    trace = poutine.trace(guide).get_trace()
    trace.compute_log_prob()
    site = trace.nodes["z"]
    assert torch.isfinite(site["log_prob"]).all() and site["log_prob"].shape == (4,)


@pytest.mark.parametrize("family", ["iaf", "sylvester-orthogonal", "planar"])
def test_log_prob_depends_on_the_point_only(family):
    # No record of the last draw: after a parameter update the same point scores the same
    # whatever its requires_grad, and a fresh tensor of equal values gets a gradient.
    encoder = FlowEncoder(3, 2, hidden_dims=(5,), flow=family, num_transforms=2)
    _randomize(encoder)
    x = torch.randn(4, 3)
    q = encoder(x)
    z, log_q = q.rsample_and_log_prob()
    torch.testing.assert_close(q.log_prob(z), log_q)
    with torch.no_grad():
        for p in encoder.flow.parameters():
            p.add_(0.05)
    # the same distribution object (its context is fixed; its flow's parameters moved)
    attached, detached = q.log_prob(z), q.log_prob(z.detach())
    torch.testing.assert_close(attached, detached)
    assert not torch.allclose(attached, log_q)
    fresh = z.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(q.log_prob(fresh).sum(), fresh)
    assert bool((grad != 0).any())


@pytest.mark.parametrize("family", [None, "iaf", "radial"])
def test_encoder_sample_is_one_pass_and_draws_per_particle(family):
    model, _, _, encoder = _vae_pieces(family)
    x = torch.randn(6, 4)
    draws = []

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            draws.append(encoder.sample("z", x))

    trace = poutine.trace(guide).get_trace(x)
    trace.compute_log_prob()
    z = draws[-1].detach()
    expected = FlowDistribution(
        dist.Normal(torch.zeros(2), 1.0).to_event(1), encoder.flow, encoder.context(x)
    )
    torch.testing.assert_close(trace.nodes["z"]["log_prob"], expected.log_prob(z))
    elbo = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    assert torch.isfinite(elbo.differentiable_loss(model, guide, x))
    assert draws[-1].shape == (5, 6, 2)
    assert not torch.allclose(draws[-1][0], draws[-1][1])


def test_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="flow must be one of"):
        FlowEncoder(4, 2, flow="maf")
    with pytest.raises(ValueError, match="latent_dim"):
        FlowEncoder(4, 0)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        FlowEncoder(4, 2)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="num_transforms"):
        conditional_flows("planar", 2, 3, num_transforms=0)


# ------------------------------------------------------------------------------------------
# AutoAmortizedFlowGuide

N, D, SIGMA, BATCH = 40, 2, 0.5, 10


def _conjugate_data():
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(D, generator=gen)
    z = mu + torch.randn(N, D, generator=gen)
    return z + SIGMA * torch.randn(N, D, generator=gen)


def conjugate_model(x, subsample_size=BATCH):
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
    with pyro.plate("data", N, subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, SIGMA).to_event(1), obs=x[idx])


def _log_evidence(x):
    """x_n = mu + (z_n - mu) + noise: per coordinate, MVN(0, 11^T + (1 + sigma^2) I)."""
    cov = torch.ones(N, N) + (1.0 + SIGMA**2) * torch.eye(N)
    mvn = dist.MultivariateNormal(torch.zeros(N), covariance_matrix=cov)
    return mvn.log_prob(x.T).sum()


def _conjugate_guide(flow="iaf"):
    guide = AutoGuideList(conjugate_model)
    guide.append(AutoNormal(poutine.block(conjugate_model, hide=["z"])))
    guide.append(
        AutoAmortizedFlowGuide(
            poutine.block(conjugate_model, expose=["z"]),
            plate="data",
            flow=flow,
            num_transforms=2,
            hidden_dims=(16,),
        )
    )
    return guide


def _full_data_elbo(guide, x, num_samples=400):
    """Monte Carlo ELBO over all N rows from the guide's own pieces (no subsampling)."""
    with torch.no_grad():
        normal, amortized = guide[0], guide[1]
        q_mu = dist.Normal(normal.locs.mu, normal.scales.mu).to_event(1)
        mu = q_mu.sample((num_samples,))
        z, log_qz = amortized.encode(x).rsample_and_log_prob((num_samples,))
        log_p = (
            dist.Normal(0.0, 1.0).log_prob(mu).sum(-1)
            + dist.Normal(mu.unsqueeze(1), 1.0).log_prob(z).sum((-1, -2))
            + dist.Normal(z, SIGMA).log_prob(x).sum((-1, -2))
        )
        terms = log_p - q_mu.log_prob(mu) - log_qz.sum(-1)
    return terms.mean(), terms.std() / math.sqrt(num_samples)


def test_subsampled_local_latents_train_below_exact_evidence():
    torch.set_num_threads(1)
    x = _conjugate_data()
    log_z = _log_evidence(x)
    guide = _conjugate_guide()
    steps = 600
    optim = ClippedAdam({"lr": 0.05, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(conjugate_model, guide, optim, Trace_ELBO())
    svi.step(x)
    start, _ = _full_data_elbo(guide, x)
    for _ in range(steps):
        svi.step(x)
    elbo, se = _full_data_elbo(guide, x)
    assert elbo <= log_z + 4 * se  # a bound, up to Monte Carlo error
    assert elbo > start + 20  # it trained ...
    # ... to within a few nats (the best guide of this family misses 0.22 nats, the mu-z
    # correlation; the rest is the encoder's regression error after 600 noisy steps)
    assert log_z - elbo < 6.0
    # Pyro's mini-batch estimate (scaled by N / BATCH) is unbiased for the same full ELBO
    with torch.no_grad():
        estimates = torch.stack(
            [-Trace_ELBO().differentiable_loss(conjugate_model, guide, x) for _ in range(200)]
        )
    assert abs(estimates.mean() - elbo) < 4 * estimates.std() / math.sqrt(200) + 4 * se


def test_guide_encodes_the_rows_of_the_models_subsample():
    x = _conjugate_data()
    guide = _conjugate_guide("planar")
    guide(x)  # set up
    inputs = []
    handle = guide[1].encoder.net.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    guide_trace = poutine.trace(guide).get_trace(x)
    handle.remove()
    model_trace = poutine.trace(poutine.replay(conjugate_model, trace=guide_trace)).get_trace(x)
    indices = model_trace.nodes["data"]["value"]
    assert indices.shape == (BATCH,)
    assert torch.equal(inputs[-1], x[indices])
    assert torch.equal(model_trace.nodes["x"]["value"], x[indices])


def test_constrained_locals_and_their_jacobian():
    x = torch.randn(8, 3)

    def model(x):
        with pyro.plate("rows", 8):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
            pyro.sample(
                "x", dist.Normal(z.sum(-1, keepdim=True), s.unsqueeze(-1)).to_event(1), obs=x
            )

    guide = AutoAmortizedFlowGuide(model, plate="rows", flow="householder", hidden_dims=(5,))
    trace = poutine.trace(guide).get_trace(x)
    trace.compute_log_prob()
    assert guide.local_sites == ["z", "s"]
    s = trace.nodes["s"]["value"]
    assert s.shape == (8,) and bool((s > 0).all())
    assert trace.nodes["z"]["value"].shape == (8, 2)
    # log q(z, s) = log q(u) - log s, where u = (z, log s) is the packed latent
    total = sum(trace.nodes[n]["log_prob"] for n in ("z", "s", f"_{guide._pyro_name}_latent"))
    u = torch.cat([trace.nodes["z"]["value"], s.log().unsqueeze(-1)], -1).detach()
    expected = guide.encode(x).log_prob(u) - s.log()
    assert torch.allclose(total, expected, atol=1e-8)


def test_vectorized_particles_with_the_autoguide():
    x = _conjugate_data()
    guide = _conjugate_guide("sylvester-orthogonal")
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(conjugate_model, guide, x)
    assert torch.isfinite(loss)


def test_user_subsample_indices_through_create_plates():
    x = _conjugate_data()

    def model(x, idx):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        with pyro.plate("data", N, subsample=idx):
            z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, SIGMA).to_event(1), obs=x[idx])

    guide = AutoGuideList(model, create_plates=lambda x, idx: pyro.plate("data", N, subsample=idx))
    guide.append(AutoNormal(poutine.block(model, hide=["z"])))
    guide.append(
        AutoAmortizedFlowGuide(poutine.block(model, expose=["z"]), plate="data", hidden_dims=(4,))
    )
    inputs = []
    guide(x, torch.arange(5))
    guide[1].encoder.net.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    idx = torch.tensor([3, 17, 8])
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(x, idx))
    assert torch.equal(inputs[-1], x[idx])


def test_misuse_raises_naming_the_site_or_plate():
    x = _conjugate_data()
    with pytest.raises(ValueError, match=r"\['mu'\].*outside plate 'data'"):
        AutoAmortizedFlowGuide(conjugate_model, plate="data")(x)
    with pytest.raises(ValueError, match="plate 'rows' holds no latent"):
        AutoAmortizedFlowGuide(conjugate_model, plate="rows")(x)
    with pytest.raises(ValueError, match="data_fn returned 7 rows"):
        AutoAmortizedFlowGuide(
            poutine.block(conjugate_model, expose=["z"]), plate="data", data_fn=lambda x: x[:7]
        )(x)

    def nested(x):
        with pyro.plate("data", N, dim=-2), pyro.plate("feat", D, dim=-1):
            pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 'w' is in plates \\['feat'\\]"):
        AutoAmortizedFlowGuide(nested, plate="data")(x)

    def discrete(x):
        with pyro.plate("data", N):
            pyro.sample("c", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="site 'c' is discrete"):
        AutoAmortizedFlowGuide(discrete, plate="data")(x)
    with pytest.raises(ValueError, match="flow must be one of"):
        AutoAmortizedFlowGuide(conjugate_model, plate="data", flow="nice")


def test_state_dict_round_trip():
    x = _conjugate_data()
    guide = _conjugate_guide("radial")
    svi = SVI(conjugate_model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    state = guide.state_dict()
    pyro.clear_param_store()
    fresh = _conjugate_guide("radial")
    fresh(x)
    u = torch.randn(N, D)
    assert not torch.allclose(fresh[1].encode(x).log_prob(u), guide[1].encode(x).log_prob(u))
    fresh.load_state_dict(state)
    assert torch.allclose(fresh[1].encode(x).log_prob(u), guide[1].encode(x).log_prob(u))


def test_predictive_with_the_amortized_guide():
    x = _conjugate_data()
    guide = _conjugate_guide("householder")
    guide(x)
    samples = Predictive(conjugate_model, guide=guide, num_samples=4)(x)
    assert samples["z"].shape == (4, BATCH, D)
    assert samples["mu"].shape == (4, 1, D)  # Predictive keeps the plate dim


def test_autoguidelist_median_and_quantiles_with_the_amortized_guide():
    x = _conjugate_data()
    guide = AutoGuideList(conjugate_model)
    guide.append(AutoIAFGuide(poutine.block(conjugate_model, hide=["z"]), init_scale=0.1))
    guide.append(
        AutoAmortizedFlowGuide(
            poutine.block(conjugate_model, expose=["z"]), plate="data", hidden_dims=(8,)
        )
    )
    svi = SVI(conjugate_model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    median = guide.median(x)
    assert set(median) == {"mu", "z"}
    assert median["z"].shape == (N, D)  # every row of the full data, as AutoNormal's
    quantiles = guide.quantiles([0.1, 0.5, 0.9], x)
    assert quantiles["z"].shape == (3, N, D)
    assert bool((quantiles["z"][0] < quantiles["z"][2]).all())
    torch.testing.assert_close(quantiles["z"][1], median["z"])
    # the amortized median is the encoder's, row by row (Monte Carlo over the flow)
    u = guide[1].encode(x).sample((4000,))
    torch.testing.assert_close(median["z"], u.median(0).values, atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="quantiles must be"):
        guide[1].quantiles([1.5], x)


@pytest.mark.parametrize("family", [None, "planar", "iaf-affine", "sylvester-triangular"])
def test_stick_the_landing_gradient_vanishes_for_an_exact_encoder(family):
    # z_n ~ N(0, 1), x_n ~ N(z_n, s^2): q(z | x) = N(x / (1 + s^2), s^2 / (1 + s^2)) is linear
    # in x, which an encoder without hidden layers holds exactly (its flow at the identity).
    s2 = 0.25
    x = torch.randn(7, 1)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, s2**0.5).to_event(1), obs=x)

    largest = {}
    for stl in (True, False):
        encoder = FlowEncoder(1, 1, hidden_dims=(), flow=family, num_transforms=2)
        with torch.no_grad():
            head = encoder.flow.layers[0].head
            head.weight.zero_()
            head.weight[0, 0] = 1 / (1 + s2)  # loc = x / (1 + s^2)
            sd = torch.tensor((s2 / (1 + s2)) ** 0.5)
            head.bias.copy_(torch.stack([torch.tensor(0.0), sd + torch.log(-torch.expm1(-sd))]))

        def guide(x, encoder=encoder, stl=stl):
            with pyro.plate("data", x.shape[0]):
                encoder.sample("z", x, stick_the_landing=stl)

        worst = 0.0
        for _ in range(3):
            loss = Trace_ELBO().differentiable_loss(model, guide, x)
            grads = torch.autograd.grad(loss, list(encoder.parameters()), allow_unused=True)
            worst = max([worst] + [g.abs().max().item() for g in grads if g is not None])
        largest[stl] = worst
    assert largest[True] < 1e-8, largest
    assert largest[False] > 1e-3, largest


def test_encoder_with_a_zuko_conditional_flow():
    zuko = pytest.importorskip("zuko")
    flow = zuko.flows.NSF(2, context=5, transforms=2, hidden_features=(8,))
    encoder = FlowEncoder(4, 2, hidden_dims=(5,), flow=flow)
    _randomize(encoder, 0.2)
    x = torch.randn(6, 4)
    q = encoder(x)
    z, log_q = q.rsample_and_log_prob()
    torch.testing.assert_close(q.log_prob(z), log_q)  # the zuko inverse agrees
    # the density against the Jacobian of the whole stack, per batch element
    h = encoder.context(x)
    eps = torch.randn(6, 2)
    for i in range(6):
        y, ladj = encoder.flow(eps[i], h[i])
        jac = jacobian(lambda e, i=i: encoder.flow(e, h[i])[0], eps[i])
        torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1])
    with pytest.raises(ValueError, match="flow_options apply to a family name"):
        FlowEncoder(4, 2, hidden_dims=(5,), flow=flow, flow_options={"bins": 3})
    with pytest.raises(ValueError):  # context size 5 is not the encoder's 7
        FlowEncoder(4, 2, hidden_dims=(7,), flow=zuko.flows.NSF(2, context=5))
    with pytest.raises(ValueError):  # Pyro's validation is on again after the zuko import
        dist.Normal(0.0, -1.0)


@pytest.mark.parametrize("vectorize", [False, True])
def test_amortized_guide_under_the_stl_and_iw_estimators(vectorize):
    from pyro_flowvi.estimators import TraceIW_ELBO, TraceSTL_ELBO

    x = _conjugate_data()
    for loss in (
        TraceSTL_ELBO(num_particles=2, vectorize_particles=vectorize, max_plate_nesting=1),
        TraceIW_ELBO(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=1),
    ):
        pyro.clear_param_store()
        guide = _conjugate_guide("iaf")
        guide(x)
        before = {k: v.detach().clone() for k, v in guide.named_parameters()}
        svi = SVI(conjugate_model, guide, Adam({"lr": 0.01}), loss)
        assert all(math.isfinite(svi.step(x)) for _ in range(3))
        assert any(not torch.equal(v, before[k]) for k, v in guide.named_parameters())
    # log_prob_at scores the recorded draw: the same log q as the draw's own pass
    trace = poutine.trace(guide).get_trace(x)
    name = f"_{guide[1]._pyro_name}_latent"
    torch.testing.assert_close(
        guide[1].log_prob_at(trace, x)[name],
        trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"]),
    )
