"""Tests for pyro_flowvi.bnn: local reparameterization, the Gaussian-weight KL, the MNF and
mean-field guides, and the BNN model helpers."""

from __future__ import annotations

import io

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.nn import PyroModule, PyroSample
from pyro.optim import Adam
from torch import nn
from torch.distributions import kl_divergence

from pyro_flowvi.bnn import (
    AutoMeanFieldGuide,
    AutoMNFGuide,
    BayesianConvNet,
    BayesianMLP,
    GaussianWeight,
    LocalReparameterizationMessenger,
    bayesian_layer,
    local_reparameterization,
)

GUIDES = [AutoMeanFieldGuide, AutoMNFGuide]


def classification_data(n=30, d=4, classes=3):
    x = torch.randn(n, d)
    y = torch.randint(0, classes, (n,))
    return x, y


def train(model, guide, loss, *args, steps=20, lr=1e-2, **kwargs):
    svi = SVI(model, guide, Adam({"lr": lr}), loss)
    for _ in range(steps):
        with guide.step_context():
            value = svi.step(*args, **kwargs)
    return value


# -- local reparameterization -------------------------------------------------------------------


def run_layer(layer_fn, loc, scale, x, noise=None):
    """One guide draw of the weight and one model call of the layer, under the handler."""

    def guide():
        pyro.sample("w", GaussianWeight(loc, scale, site="w", noise=noise))

    def model():
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand(loc.shape).to_event(loc.dim()))
        return layer_fn(x, w)

    with local_reparameterization():
        guide_trace = poutine.trace(guide).get_trace()
        return poutine.replay(model, trace=guide_trace)()


def assert_same_moments(a, b):
    """Two samples (rows) have the same mean and variance, within 5 standard errors."""
    for draws in (a, b):
        assert draws.dim() >= 2
    se_mean = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    assert bool(torch.all((a.mean(0) - b.mean(0)).abs() < 5 * se_mean))

    def var_se2(d):
        centred = d - d.mean(0)
        return (centred.pow(4).mean(0) - centred.pow(2).mean(0).pow(2)) / len(d)

    se_var = (var_se2(a) + var_se2(b)).sqrt()
    assert bool(torch.all((a.var(0) - b.var(0)).abs() < 5 * se_var))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("multiplicative", [False, True])
def test_local_reparameterization_matches_weight_sampling(kind, multiplicative):
    num = 20000
    if kind == "linear":
        loc, scale = torch.randn(3, 5), 0.2 + torch.rand(3, 5)
        x0, bias, z_dim = torch.randn(1, 5), torch.randn(3), 5

        def layer(x, w):
            return F.linear(x, w, bias.repeat(w.shape[0] // 3))

        def times_z(w, z):  # z scales the fan-in
            return w * z.unsqueeze(-2)
    else:
        loc, scale = torch.randn(2, 1, 3, 3), 0.2 + torch.rand(2, 1, 3, 3)
        x0, bias, z_dim = torch.randn(1, 1, 4, 4), torch.randn(2), 2

        def layer(x, w):
            return F.conv2d(x, w, bias.repeat(w.shape[0] // 2), padding=1)

        def times_z(w, z):  # z scales the output channels
            return w * z[..., None, None, None]

    z_loc, z_scale = 1.0 + 0.3 * torch.randn(z_dim), 0.2 + 0.3 * torch.rand(z_dim)

    def sample_z(rows):
        return z_loc + z_scale * torch.randn(rows, z_dim)

    if multiplicative:  # MNF: the guide's own z, and a z per data point under the handler
        noise = (loc, sample_z)
        weight_loc = times_z(loc, sample_z(1)[0])
        weights_loc = times_z(loc, sample_z(num))
    else:
        noise, weight_loc, weights_loc = None, loc, loc
    # local reparameterization: one call, an independent pre-activation draw per row
    local = run_layer(layer, weight_loc, scale, x0.expand(num, *x0.shape[1:]), noise)
    # explicit weight sampling: one weight draw per row, all draws stacked into one layer
    weights = weights_loc + scale * torch.randn(num, *loc.shape)
    explicit = layer(x0, weights.flatten(0, 1))[0].unflatten(0, (num, loc.shape[0]))
    assert_same_moments(local, explicit)
    if not multiplicative:  # and both match the closed form
        mean = layer(x0, loc)[0]
        if kind == "linear":
            var = F.linear(x0**2, scale**2)[0]
        else:
            var = F.conv2d(x0**2, scale**2, padding=1)[0]
        assert bool(torch.all((local.mean(0) - mean).abs() < 5 * (var / num).sqrt()))
        assert bool(torch.all((local.var(0) - var).abs() < 5 * var * (2 / num) ** 0.5))


def test_handler_leaves_plain_weights_outside_and_after_errors():
    loc, scale = torch.randn(2, 3), torch.ones(2, 3)

    def guide():
        return pyro.sample("w", GaussianWeight(loc, scale))

    assert type(guide()) is torch.Tensor
    with pytest.raises(RuntimeError, match="boom"), local_reparameterization():
        assert type(guide()) is not torch.Tensor
        raise RuntimeError("boom")
    assert type(guide()) is torch.Tensor
    # inside, the draw is still the weight for every other use and keeps its gradient path
    loc.requires_grad_(True)
    with local_reparameterization():
        w = guide()
    (w * 2).sum().backward()
    assert torch.equal(loc.grad, 2 * torch.ones(2, 3))


def test_weight_used_twice_raises():
    loc, scale = torch.randn(3, 3), torch.ones(3, 3)
    with pytest.raises(ValueError, match="used in two linear calls"):
        run_layer(lambda x, w: F.linear(F.linear(x, w), w), loc, scale, torch.randn(4, 3))


def test_vectorized_particles_raise_a_clear_error():
    model = BayesianMLP(4, 3, hidden_dims=(5,))
    x, y = classification_data(d=4)
    guide = AutoMeanFieldGuide(model)
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    with pytest.raises(ValueError, match="single \\(unbatched\\) weight draw"):
        train(model, guide, elbo, x, y, steps=1)


# -- the Gaussian weight and its KL -------------------------------------------------------------


def test_analytic_kl_matches_monte_carlo():
    q = GaussianWeight(torch.randn(4, 6), 0.3 + torch.rand(4, 6), site="w")
    prior = dist.Normal(0.5, 1.7).expand([4, 6]).to_event(2)
    kl = kl_divergence(q, prior)
    w = q.rsample((20000,))
    terms = q.log_prob(w) - prior.log_prob(w)
    assert terms.shape == (20000,)
    assert abs(terms.mean() - kl) < 4 * terms.std() / 20000**0.5
    # also with a batch dimension and a prior that only broadcasts
    q = GaussianWeight(torch.randn(2, 3), torch.rand(2, 3) + 0.1, event_dim=1)
    kl = kl_divergence(q, dist.Normal(torch.zeros(3), 2.0).to_event(1))
    assert kl.shape == (2,)
    assert torch.allclose(
        kl, kl_divergence(dist.Normal(q.loc, q.scale), dist.Normal(0.0, 2.0)).sum(-1)
    )


def test_gaussian_weight_matches_normal():
    loc, scale = torch.randn(2, 3), torch.rand(2, 3) + 0.1
    q, ref = GaussianWeight(loc, scale), dist.Normal(loc, scale).to_event(2)
    w = torch.randn(5, 2, 3)
    assert torch.allclose(q.log_prob(w), ref.log_prob(w))
    assert torch.allclose(q.entropy(), ref.entropy())
    assert q.expand([4]).batch_shape == (4,) and q.expand([4]).rsample().shape == (4, 2, 3)
    with pytest.raises(ValueError, match="event_dim"):
        GaussianWeight(loc, scale, event_dim=3)


class LaplaceNet(PyroModule):
    def __init__(self):
        super().__init__()
        self.fc = PyroModule[nn.Linear](4, 3)
        self.fc.weight = PyroSample(dist.Laplace(0.0, 1.0).expand([3, 4]).to_event(2))
        self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    def forward(self, x, y=None):
        logits = self.fc(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


def test_non_gaussian_prior_needs_trace_elbo():
    x, y = classification_data(d=4)
    model = LaplaceNet()
    guide = AutoMNFGuide(model)
    with pytest.raises(ValueError, match="site 'fc.weight'.*needs a Gaussian prior"):
        train(model, guide, TraceMeanField_ELBO(), x, y, steps=1)
    assert torch.isfinite(torch.tensor(train(model, guide, Trace_ELBO(), x, y, steps=2)))


# -- guides ----------------------------------------------------------------------------------


@pytest.mark.parametrize("guide_cls", GUIDES)
@pytest.mark.parametrize("loss_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_guides_train_with_minibatches_and_predictive_shapes(guide_cls, loss_cls):
    x, y = classification_data(n=40, d=4)
    model = BayesianMLP(4, 3, hidden_dims=(6,))
    guide = guide_cls(model)
    loss = train(model, guide, loss_cls(), x[:10], y[:10], num_data=40, steps=3)
    assert torch.isfinite(torch.tensor(loss))
    assert guide.weight_sites == {"layers.0.weight": "linear", "layers.1.weight": "linear"}
    samples = Predictive(model, guide=guide, num_samples=5, return_sites=("obs", "logits"))(x)
    assert samples["obs"].shape == (5, 40)
    assert samples["logits"].shape == (5, 40, 3)
    median = guide.median()
    assert median["layers.0.weight"].shape == (6, 4) and median["layers.1.bias"].shape == (3,)


def test_conv_net_sites_and_predictive():
    model = BayesianConvNet(8, 3, channels=(2, 3))
    guide = AutoMNFGuide(model, hidden_dims=(8,))
    x, y = torch.randn(6, 64), torch.randint(0, 3, (6,))
    train(model, guide, TraceMeanField_ELBO(), x, y, steps=2)
    assert guide.weight_sites == {
        "conv1.weight": "conv2d",
        "conv2.weight": "conv2d",
        "fc.weight": "linear",
    }
    z0 = poutine.trace(guide).get_trace(x, y).nodes["conv2.weight_z0"]["value"]
    assert z0.shape == (3,)  # one multiplicative noise per output channel
    samples = Predictive(model, guide=guide, num_samples=4, return_sites=("logits",))(x)
    assert samples["logits"].shape == (4, 6, 3)


def test_mnf_without_flows_and_unit_noise_is_mean_field():
    x, y = classification_data(n=12, d=3, classes=2)
    model = BayesianMLP(3, 2, hidden_dims=(4,))
    mean_field = AutoMeanFieldGuide(model)
    mnf = AutoMNFGuide(model, num_transforms=0, num_r_transforms=0)
    mean_field(x, y)
    mnf(x, y)
    with torch.no_grad():
        for name in mean_field.weight_sites:
            layer = mnf.weights.get_submodule(name)
            layer.loc_unconstrained.copy_(
                mean_field.locs.get_submodule(name.rsplit(".", 1)[0]).weight
            )
            layer.scale_unconstrained.copy_(
                mean_field.scales.get_submodule(name.rsplit(".", 1)[0]).weight_unconstrained
            )
        for name, param in mean_field.named_parameters():
            if "bias" in name:
                dict(mnf.named_parameters())[name].copy_(param)
    ones = {
        f"{name}_z0": torch.zeros(n)
        for name, n in (("layers.0.weight", 3), ("layers.1.weight", 4))
    }
    pyro.set_rng_seed(3)
    mf_trace = poutine.trace(mean_field).get_trace(x, y)
    pyro.set_rng_seed(3)
    mnf_trace = poutine.trace(poutine.condition(mnf, ones)).get_trace(x, y)
    extra = 0.0
    for name, site in mnf_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name in mf_trace.nodes:
            ref = mf_trace.nodes[name]
            assert torch.allclose(site["value"], ref["value"]), name
            if name in mean_field.weight_sites:
                assert torch.allclose(site["fn"].loc, ref["fn"].loc)
                assert torch.allclose(site["fn"].scale, ref["fn"].scale)
        else:  # eps = 0 (so z = 1) and the auxiliary factor: the only difference in the bound
            extra = extra + site["fn"].log_prob(site["value"]).sum()

    def elbo(guide_trace):
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
        return model_trace.log_prob_sum() - guide_trace.log_prob_sum()

    assert torch.allclose(elbo(mnf_trace), elbo(mf_trace) - extra)


@pytest.mark.parametrize("reverse_model", ["tanh", "conjugate"])
def test_reverse_model_at_initialisation(reverse_model):
    # with Gaussian z (no flows) and r's offsets at the moments of q(z0), the fresh r is q(z)
    # (tanh form) or the exact conditional q(z | W) = q(z) q(W | z) / q(W) (conjugate form)
    model = BayesianMLP(3, 4, hidden_dims=())
    guide = AutoMNFGuide(
        model, num_transforms=0, num_r_transforms=0, init_scale=0.3, reverse_model=reverse_model
    )
    guide(torch.randn(5, 3), torch.randint(0, 4, (5,)))
    layer = guide.weights.get_submodule("layers.0.weight")
    vectors, flows = layer.unpack()
    mu, sigma = layer.loc.detach(), layer.scale.detach()
    m, s = vectors["z_loc"].detach(), vectors["z_scale"].detach()
    z = m + s * torch.randn(3)
    w = z * mu + sigma * torch.randn(4, 3)
    log_q_z = dist.Normal(m, s).log_prob(z).sum()
    log_r = layer.log_r(z, w, sigma, vectors, flows)
    if reverse_model == "tanh":
        assert torch.allclose(log_r, log_q_z)
    else:
        log_q_w_given_z = dist.Normal(z * mu, sigma).log_prob(w).sum()
        columns = [
            dist.MultivariateNormal(
                m[j] * mu[:, j],
                s[j] ** 2 * torch.outer(mu[:, j], mu[:, j]) + sigma[:, j].diag() ** 2,
            ).log_prob(w[:, j])
            for j in range(3)
        ]
        assert torch.allclose(log_r, log_q_z + log_q_w_given_z - sum(columns))


def test_mnf_bound_stays_below_exact_log_evidence():
    n, d, sigma = 20, 3, 0.5
    x = torch.randn(n, d)
    y = x @ torch.tensor([1.0, -0.5, 0.3]) + 0.2 + sigma * torch.randn(n)
    # y ~ N(0, sigma^2 I + X X^T + 1 1^T) under the N(0, 1) priors on weights and bias
    cov = sigma**2 * torch.eye(n) + x @ x.T + torch.ones(n, n)
    log_evidence = dist.MultivariateNormal(torch.zeros(n), cov).log_prob(y)
    model = BayesianMLP(d, 1, hidden_dims=(), likelihood="normal", noise_scale=sigma)
    guide = AutoMNFGuide(model, init_scale=0.1, hidden_dims=(8,))
    train(model, guide, TraceMeanField_ELBO(), x, y, steps=150, lr=0.03)
    elbo = Trace_ELBO()
    values = torch.tensor([-elbo.loss(model, guide, x, y) for _ in range(80)])
    se = values.std() / len(values) ** 0.5
    assert values.mean() - 3 * se < log_evidence
    assert log_evidence - values.mean() < 5.0  # and the fit is not vacuous


def test_step_context_and_local_reparam_flag():
    model = BayesianMLP(4, 3, hidden_dims=(5,))
    assert isinstance(AutoMNFGuide(model).step_context(), LocalReparameterizationMessenger)
    context = AutoMeanFieldGuide(model, local_reparam=False).step_context()
    assert not isinstance(context, LocalReparameterizationMessenger)
    with context:
        pass


def test_state_dict_round_trip():
    x, y = classification_data(d=4)
    model = BayesianMLP(4, 3, hidden_dims=(5,))
    guide = AutoMNFGuide(model)
    train(model, guide, TraceMeanField_ELBO(), x, y, steps=3)
    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)
    buffer.seek(0)
    pyro.clear_param_store()
    other = AutoMNFGuide(model)
    other(x, y)
    other.load_state_dict(torch.load(buffer))
    for name, value in guide.median().items():
        assert torch.equal(other.median()[name], value)


# -- errors --------------------------------------------------------------------------------


def test_model_without_weight_sites():
    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    with pytest.raises(ValueError, match="no weight sites.*'loc'"):
        AutoMNFGuide(model)(torch.randn(5))


def test_local_latents_in_a_subsampled_plate_are_refused():
    net = bayesian_layer(nn.Linear(2, 1))

    def model(x, y):
        out = net(x).squeeze(-1)
        with pyro.plate("data", 100, subsample=torch.arange(len(x))):
            shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(out + shift, 1.0), obs=y)

    with pytest.raises(ValueError, match="'shift' is inside the subsampled plate 'data'"):
        AutoMeanFieldGuide(model)(torch.randn(5, 2), torch.randn(5))


def test_guide_factor_without_has_rsample():
    model = BayesianMLP(4, 3, hidden_dims=(5,))
    inner = AutoMeanFieldGuide(model)

    def guide(x, y):
        inner(x, y)
        pyro.factor("aux", torch.tensor(0.5))

    x, y = classification_data(d=4)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    with (
        pytest.raises(ValueError, match="guide factor site 'aux'.*has_rsample"),
        local_reparameterization(),
    ):
        svi.step(x, y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init_scale": 0.0}, "init_scale"),
        ({"max_variance": -1.0}, "max_variance"),
        ({"num_transforms": -1}, "num_transforms"),
        ({"hidden_dims": ()}, "hidden_dims"),
        ({"reverse_model": "mlp"}, "reverse_model"),
    ],
)
def test_bad_guide_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoMNFGuide(BayesianMLP(2, 2), **kwargs)


def test_model_helpers():
    layer = bayesian_layer(nn.Linear(3, 2), prior_scale=2.0)
    trace = poutine.trace(layer).get_trace(torch.randn(4, 3))
    assert bool(torch.all(trace.nodes["weight"]["fn"].base_dist.scale == 2.0))
    with pytest.raises(ValueError, match="likelihood"):
        BayesianMLP(2, 2, likelihood="poisson")
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        bayesian_layer(nn.Conv1d(1, 1, 3))


@pytest.mark.cuda
def test_cuda():
    x, y = classification_data(d=4)
    x, y = x.cuda(), y.cuda()
    for guide_cls in GUIDES:
        pyro.clear_param_store()
        model = BayesianMLP(4, 3, hidden_dims=(5,)).cuda()
        guide = guide_cls(model)
        for loss in (Trace_ELBO(), TraceMeanField_ELBO()):
            assert torch.isfinite(torch.tensor(train(model, guide, loss, x, y, steps=2)))
        samples = Predictive(model, guide=guide, num_samples=3, return_sites=("logits",))(x)
        assert samples["logits"].device.type == "cuda"
