"""Regression BNNs: the learned-noise likelihood, the predictive log-likelihood helpers and the
mini-batch epoch loop of pyro_flowvi.bnn."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal, init_to_value
from pyro.nn import PyroModule

from pyro_flowvi.bnn import (
    NOISE_SITE,
    AutoMeanFieldGuide,
    AutoMNFGuide,
    BayesianMLP,
    fit_epochs,
    kl_weight,
    log_likelihood_draws,
    mixture_log_likelihood,
    predictive_log_likelihood,
)
from pyro_flowvi.fit import NonFiniteLossError


def regression_model(d=3, hidden=(6,)):
    return BayesianMLP(d, 1, hidden, likelihood="normal", noise_precision_prior=(6.0, 6.0))


# -- the model ----------------------------------------------------------------------------------


def test_learned_noise_site_and_likelihood():
    model = regression_model()
    x, y = torch.randn(7, 3), torch.randn(7)
    trace = poutine.trace(model).get_trace(x, y, num_data=70)
    site = trace.nodes[NOISE_SITE]
    assert isinstance(site["fn"], dist.Gamma) and not site["cond_indep_stack"]
    assert float(site["fn"].concentration) == 6.0 and float(site["fn"].rate) == 6.0
    obs = trace.nodes["obs"]
    assert torch.allclose(obs["fn"].scale, site["value"].rsqrt().expand(7))
    assert torch.equal(obs["fn"].loc, trace.nodes["mean"]["value"])
    assert obs["scale"] == 10.0  # the mini-batch is scaled to num_data
    # fixed noise: no latent noise site, the given scale
    fixed = BayesianMLP(3, 1, (6,), likelihood="normal", noise_scale=0.3)
    trace = poutine.trace(fixed).get_trace(x, y)
    assert NOISE_SITE not in trace.nodes and bool(torch.all(trace.nodes["obs"]["fn"].scale == 0.3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_precision_prior": (6.0, 6.0), "noise_scale": 1.0}, "not both"),
        ({"noise_precision_prior": (0.0, 6.0)}, "concentration > 0 and rate > 0"),
        ({"noise_precision_prior": "gamma"}, "pair"),
        ({"noise_precision_prior": (6.0, 6.0), "likelihood": "categorical"}, "normal"),
        ({"noise_scale": -1.0}, "noise_scale must be > 0"),
    ],
)
def test_bad_regression_arguments(kwargs, match):
    kwargs = {"likelihood": "normal", **kwargs}
    with pytest.raises(ValueError, match=match):
        BayesianMLP(3, 1, (4,), **kwargs)


def test_bad_regression_inputs():
    with pytest.raises(ValueError, match="normal likelihood needs out_features=1, got 2"):
        BayesianMLP(3, 2, (4,), likelihood="normal")
    model = regression_model()
    with pytest.raises(ValueError, match=r"site 'obs' needs targets y of shape \(5,\).*\(5, 1\)"):
        model(torch.randn(5, 3), torch.randn(5, 1))
    with pytest.raises(ValueError, match="num_data.*>= the batch size 5, got 3"):
        model(torch.randn(5, 3), torch.randn(5), num_data=3)


def test_regression_model_moves_its_priors_with_the_module():
    model = regression_model().to(torch.float32)
    assert model.noise_concentration.dtype == torch.float32
    assert {name for name, _ in model.named_buffers()} >= {"noise_concentration", "noise_rate"}


# -- predictive log-likelihood ------------------------------------------------------------------


def test_mixture_log_likelihood_is_log_mean_exp():
    draws = torch.tensor([[0.0, -1.0], [-2.0, -1.0], [-4.0, -1.0]])
    expected = torch.log(torch.exp(draws).mean(0))
    assert torch.allclose(mixture_log_likelihood(draws), expected)
    # above the mean of the log-likelihoods (Jensen), equal where the draws agree
    assert mixture_log_likelihood(draws)[0] > draws[:, 0].mean()
    assert torch.allclose(mixture_log_likelihood(draws)[1], torch.tensor(-1.0))
    # y_scale: the density of y = s * y_std
    assert torch.allclose(mixture_log_likelihood(draws, 2.0), expected - math.log(2.0))
    # no underflow for very negative log-likelihoods
    far = torch.tensor([[-2000.0], [-2001.0]])
    assert torch.allclose(
        mixture_log_likelihood(far), -2000.0 + torch.log((1 + torch.exp(torch.tensor(-1.0))) / 2)
    )


def test_mixture_of_ensemble_members_weights_members_equally():
    a = torch.tensor([[-1.0, 0.0]])  # one draw
    b = torch.tensor([[-3.0, 0.0], [-5.0, 0.0], [-7.0, 0.0]])  # three draws
    expected = torch.log(0.5 * torch.exp(a).mean(0) + 0.5 * torch.exp(b).mean(0))
    assert torch.allclose(mixture_log_likelihood([a, b]), expected)


@pytest.mark.parametrize(
    "draws, y_scale, match",
    [
        (torch.zeros(0, 3), 1.0, "at least one draw"),
        ([], 1.0, "at least one member"),
        ([torch.zeros(2, 3), torch.zeros(2, 4)], 1.0, "disagree on the data shape"),
        (torch.zeros(2, 3), 0.0, "y_scale must be > 0"),
    ],
)
def test_mixture_log_likelihood_errors(draws, y_scale, match):
    with pytest.raises(ValueError, match=match):
        mixture_log_likelihood(draws, y_scale)


def conjugate_model(y):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=y)


def test_predictive_log_likelihood_matches_the_exact_predictive_density():
    # guide = q(loc) = N(m, v) exactly, so p(y* | q) = N(y* | m, 1 + v) in closed form
    m, v = 0.4, 0.3
    init = init_to_value(values={"loc": torch.tensor(m)})
    guide = AutoNormal(conjugate_model, init_loc_fn=init, init_scale=v**0.5)
    y = torch.tensor([-1.0, 0.5, 2.5])
    exact = dist.Normal(m, (1 + v) ** 0.5).log_prob(y)
    num = 1000
    pyro.set_rng_seed(5)
    draws = log_likelihood_draws(conjugate_model, guide, y, num_samples=num)
    assert draws.shape == (num, 3)
    pyro.set_rng_seed(5)
    lpd = predictive_log_likelihood(conjugate_model, guide, y, num_samples=num)
    assert torch.allclose(lpd, mixture_log_likelihood(draws))
    # delta method: sd of the log of a mean of S densities ~ sd(p) / (mean(p) sqrt(S))
    density = draws.exp()
    se = density.std(0) / density.mean(0) / num**0.5
    assert bool(torch.all((lpd - exact).abs() < 4 * se))
    # the average of the log-likelihoods is lower (Jensen), here by more than the error
    assert bool(torch.all(draws.mean(0) < lpd))
    assert float((lpd - draws.mean(0)).max()) > 0.2
    # a point guide: every draw is the same density
    point = AutoDelta(conjugate_model, init_loc_fn=init)
    lpd = predictive_log_likelihood(conjugate_model, point, y, num_samples=3, y_scale=2.0)
    assert torch.allclose(lpd, dist.Normal(m, 1.0).log_prob(y) - math.log(2.0))


def test_log_likelihood_draws_errors():
    guide = AutoNormal(conjugate_model)
    y = torch.randn(4)
    with pytest.raises(ValueError, match="no site 'y'.*'loc'"):
        log_likelihood_draws(conjugate_model, guide, y, num_samples=2, obs_site="y")
    with pytest.raises(ValueError, match="site 'loc' is not observed"):
        log_likelihood_draws(conjugate_model, guide, y, num_samples=2, obs_site="loc")
    with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 0"):
        log_likelihood_draws(conjugate_model, guide, y, num_samples=0)


def test_predictive_draws_use_explicit_weights_outside_local_reparameterization():
    # under local reparameterization every test point would draw its own weights; the
    # predictive needs one weight draw shared by all points: refit-free check via the weights
    model = regression_model(d=2, hidden=(3,))
    guide = AutoMNFGuide(model, hidden_dims=(4,))
    x, y = torch.randn(9, 2), torch.randn(9)
    guide(x, y)
    pyro.set_rng_seed(1)
    draws = log_likelihood_draws(model, guide, x, y, num_samples=2)
    pyro.set_rng_seed(1)
    expected = []
    for _ in range(2):
        guide_trace = poutine.trace(guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
        w0 = guide_trace.nodes["layers.0.weight"]["value"]
        assert type(w0) is torch.Tensor  # an explicit weight, not a reparameterized stand-in
        expected.append(model_trace.nodes["obs"]["fn"].log_prob(y))
    assert torch.allclose(draws, torch.stack(expected))


# -- mini-batch epochs --------------------------------------------------------------------------


class RecordingModel(PyroModule):
    """A one-parameter regression that records the rows and num_data of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, index, y, num_data=None):
        self.calls.append((index.clone(), num_data))
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", num_data or len(y), subsample=index):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=y)


def test_fit_epochs_visits_every_row_once_per_epoch():
    model = RecordingModel()
    guide = AutoNormal(model)
    n, batch, epochs = 10, 4, 3
    index, y = torch.arange(n), torch.randn(n)
    guide(index, y)  # set up, so that only training calls are recorded below
    model.calls.clear()
    seen = []
    result = fit_epochs(
        model,
        guide,
        index,
        y,
        num_epochs=epochs,
        batch_size=batch,
        lr=0.01,
        callback=lambda epoch, elbo: seen.append((epoch, elbo)),
    )
    steps = epochs * math.ceil(n / batch)
    assert result.num_steps == steps == len(result.elbo_trace)
    assert result.num_epochs == epochs and result.epoch_elbo.shape == (epochs,)
    assert [e for e, _ in seen] == [0, 1, 2]
    assert result.epoch_elbo[0] == pytest.approx(result.elbo_trace[:3].mean())
    assert result.seconds_per_epoch == pytest.approx(result.wall_time / epochs)
    # the model runs once per step (Trace_ELBO replays it once) and once per epoch for fit's
    # set-up (which sees the epoch's first batch); rows: an epoch is a permutation
    setup = [3 * epoch + epoch for epoch in range(epochs)]
    assert len(model.calls) == steps + epochs and {num for _, num in model.calls} == {n}
    assert all(
        torch.equal(model.calls[i][0], model.calls[i + 1][0]) for i in setup
    )  # the set-up run takes the batch the first step takes
    calls = [c for i, c in enumerate(model.calls) if i not in setup]
    for epoch in range(epochs):
        rows = torch.cat([c for c, _ in calls[3 * epoch : 3 * epoch + 3]])
        assert sorted(rows.tolist()) == list(range(n))
    assert [len(c) for c, _ in calls[:3]] == [4, 4, 2]
    # without shuffling the order is kept
    model.calls.clear()
    fit_epochs(model, guide, index, y, num_epochs=1, batch_size=batch, shuffle=False)
    assert torch.equal(torch.cat([c for c, _ in model.calls[1:]]), index)  # [0]: set-up


def test_fit_epochs_callback_stops_early_and_generator_reproduces():
    model = RecordingModel()
    index, y = torch.arange(12), torch.randn(12)

    def run(seed):
        pyro.clear_param_store()
        guide = AutoNormal(model)
        return fit_epochs(
            model,
            guide,
            index,
            y,
            num_epochs=5,
            batch_size=5,
            generator=torch.Generator().manual_seed(seed),
            callback=lambda epoch, elbo: epoch == 1,
        )

    model.calls.clear()
    result = run(3)
    assert result.num_epochs == 2 and result.num_steps == 6
    first = [c.tolist() for c, _ in model.calls]
    model.calls.clear()
    run(3)
    assert [c.tolist() for c, _ in model.calls][1:] == first[1:]  # [0] is the guide's setup


# -- KL warm-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize("guide_class", [AutoMeanFieldGuide, AutoMNFGuide])
def test_kl_weight_scales_the_kl_term_and_not_the_likelihood(guide_class):
    # the estimate is linear in beta at fixed draws: loss(beta) = -E[log p(y | W)] + beta KL,
    # with the MNF guide's log r factor and auxiliary site inside the KL
    model = regression_model()
    x, y = torch.randn(9, 3), torch.randn(9)
    guide = guide_class(model)
    guide(x, y, num_data=90)
    elbo = TraceMeanField_ELBO()

    def loss(beta):
        pyro.set_rng_seed(5)
        with guide.step_context(), kl_weight(beta):
            return elbo.differentiable_loss(model, guide, x, y, num_data=90).item()

    losses = {beta: loss(beta) for beta in (0.0, 0.25, 1.0)}
    kl = losses[1.0] - losses[0.0]
    assert kl > 1.0  # a real KL term, not a rounding difference
    assert losses[0.25] == pytest.approx(losses[0.0] + 0.25 * kl, rel=1e-10)
    # beta = 0 leaves the likelihood alone: minus the log-likelihood of the drawn network
    pyro.set_rng_seed(5)
    with kl_weight(0.0):
        guide_trace = poutine.trace(guide).get_trace(x, y, num_data=90)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            x, y, num_data=90
        )
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    assert model_trace.nodes["obs"]["scale"] == 10.0  # the plate's N / B, not scaled by beta
    for trace in (model_trace, guide_trace):
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and name != "obs":
                assert float(site["log_prob_sum"].detach()) == 0.0, name


def test_kl_weight_rejects_beta_outside_the_unit_interval():
    for beta in (-0.1, 1.5, True, "1"):
        with pytest.raises(ValueError, match=r"kl_weight: beta must be a number in \[0, 1\]"):
            kl_weight(beta)


def test_fit_epochs_kl_warmup_runs_epoch_e_at_beta_e_over_E():
    # kl_warmup=3 over 4 epochs = epochs at beta 1/3, 2/3, 1, 1 under kl_weight, bit for bit
    x, y = torch.randn(12, 3), torch.randn(12)

    def run(warmup, betas):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        model = regression_model()
        guide = AutoMeanFieldGuide(model)
        common = dict(
            batch_size=5, optim=pyro.optim.Adam({"lr": 0.05}), loss=TraceMeanField_ELBO()
        )
        if warmup:
            fit_epochs(model, guide, x, y, num_epochs=4, kl_warmup=warmup, **common)
        for beta in betas:
            with kl_weight(beta):
                fit_epochs(model, guide, x, y, num_epochs=1, **common)
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    warm = run(3, ())
    manual = run(0, (1 / 3, 2 / 3, 1.0, 1.0))
    plain = run(0, (1.0, 1.0, 1.0, 1.0))
    assert warm.keys() == manual.keys() == plain.keys()
    assert all(torch.equal(warm[k], manual[k]) for k in warm)
    assert not all(torch.equal(warm[k], plain[k]) for k in warm)


@pytest.mark.parametrize(
    "data, kwargs, match",
    [
        ((), {}, "pass the data tensors"),
        ((torch.zeros(3), torch.zeros(4)), {}, r"same number of rows >= 1, got \[3, 4\]"),
        ((torch.tensor(1.0),), {}, "data\\[0\\] must be a tensor with a first"),
        ((torch.zeros(3),), {"num_epochs": 0}, "num_epochs must be an int >= 1, got 0"),
        ((torch.zeros(3),), {"batch_size": 2.5}, "batch_size must be an int >= 1, got 2.5"),
        ((torch.zeros(3),), {"lr": 0.1, "optim": pyro.optim.Adam({})}, "lr .* or optim"),
        ((torch.zeros(3),), {"kl_warmup": -1}, "kl_warmup must be an int >= 0, got -1"),
        ((torch.zeros(3),), {"kl_warmup": 0.5}, "kl_warmup must be an int >= 0, got 0.5"),
    ],
)
def test_fit_epochs_rejects_bad_input_before_any_step(data, kwargs, match):
    def model(*args, **kw):
        raise AssertionError("the model must not run")

    kwargs = {"num_epochs": 1, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit_epochs(model, model, *data, **kwargs)


def test_fit_epochs_stops_at_a_non_finite_step():
    model = RecordingModel()
    guide = AutoNormal(model)
    y = torch.tensor([0.0, 1e200, 1.0])  # the squared error overflows
    with pytest.raises(NonFiniteLossError):
        fit_epochs(model, guide, torch.arange(3), y, num_epochs=2, batch_size=3)


@pytest.mark.parametrize("guide_cls", [AutoMeanFieldGuide, AutoMNFGuide])
def test_regression_bnn_learns_the_noise_level(guide_cls):
    # y = 2 x + N(0, 0.3^2): a short fit moves the noise sd from its start (1) toward 0.3, and
    # the test log-likelihood is far above that of a fit that ignores x
    n, sd = 100, 0.3
    x = torch.rand(n, 1) * 2 - 1
    y = 2 * x[:, 0] + sd * torch.randn(n)
    model = regression_model(d=1, hidden=(8,))
    guide = guide_cls(model, **({"hidden_dims": (8,)} if guide_cls is AutoMNFGuide else {}))
    fit_epochs(
        model, guide, x, y, num_epochs=40, batch_size=50, lr=0.05, loss=TraceMeanField_ELBO()
    )
    precision = guide.median()[NOISE_SITE]
    assert 0.25 < float(precision.rsqrt()) < 0.6
    x_test = torch.rand(100, 1) * 2 - 1
    y_test = 2 * x_test[:, 0] + sd * torch.randn(100)
    lpd = predictive_log_likelihood(model, guide, x_test, y_test, num_samples=20)
    exact = dist.Normal(2 * x_test[:, 0], sd).log_prob(y_test).mean()
    marginal = dist.Normal(y.mean(), y.std()).log_prob(y_test).mean()  # ignores x
    assert float(marginal) + 0.8 < float(lpd.mean()) < float(exact) + 0.1


def test_bnn_guide_as_a_part_of_an_auto_guide_list():
    model = regression_model(d=2, hidden=(4,))
    guide = AutoGuideList(model)
    guide.append(AutoMeanFieldGuide(poutine.block(model, hide=[NOISE_SITE])))
    guide.append(AutoNormal(poutine.block(model, expose=[NOISE_SITE])))
    x, y = torch.randn(10, 2), torch.randn(10)
    fit_epochs(model, guide, x, y, num_epochs=2, batch_size=5, loss=TraceMeanField_ELBO())
    trace = poutine.trace(guide).get_trace(x, y)
    assert {"layers.0.weight", "layers.1.bias", NOISE_SITE} <= set(trace.nodes)
