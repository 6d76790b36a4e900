"""Flow autoguides: exact evidence bounds, the AutoNormal-compatible API, and bad input."""

from __future__ import annotations

import functools
import io
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    Predictive,
    RenyiELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.autoguide import AutoGuideList, AutoNormal, init_to_median, init_to_value

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
)
from pyro_flowvi.diagnostics import to_arviz, vi_diagnostics
from pyro_flowvi.flows import IAF, Planar, Reverse
from pyro_flowvi.guides.base import _initial_gain
from pyro_flowvi.guides.initialization import find_mode

GUIDES = {
    "planar": functools.partial(AutoPlanarGuide, num_transforms=4),
    "radial": functools.partial(AutoRadialGuide, num_transforms=4),
    "householder": AutoHouseholderGuide,
    "sylvester-orthogonal": functools.partial(AutoSylvesterGuide, variant="orthogonal"),
    "sylvester-householder": functools.partial(AutoSylvesterGuide, variant="householder"),
    "sylvester-triangular": functools.partial(AutoSylvesterGuide, variant="triangular"),
    "iaf": AutoIAFGuide,
    "iaf-affine": functools.partial(AutoIAFGuide, update="affine"),
    "iaf-studentt": functools.partial(AutoIAFGuide, base="studentt"),
    "flow-mixed": functools.partial(AutoFlowGuide, flows=[Planar, IAF, Reverse], num_transforms=2),
    "spline-autoregressive": functools.partial(AutoNeuralSplineGuide, num_transforms=2),
    "spline-coupling": functools.partial(AutoNeuralSplineGuide, coupling=True),
    "realnvp": AutoRealNVPGuide,
    "naf": functools.partial(AutoNAFGuide, num_transforms=2),
}
# The plain-MADE IAF moves its means along a strongly correlated direction more slowly.
STEPS = {"iaf": 1000, "iaf-affine": 1000, "iaf-studentt": 1000}

# Guides that can correlate coordinates must close most of the diagonal Gaussian's gap on a
# correlated Gaussian posterior (radial cannot: it only moves mass along rays from a centre).
CORRELATING = set(GUIDES) - {"radial"}


# ------------------------------------------------------------------------------------------
# A conjugate model with exact posterior and log evidence: Bayesian linear regression.

SIGMA = 0.5


def _regression_data(n: int = 12, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 0.3 * x[:, 1]  # correlated posterior
    w = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    y = x @ w + SIGMA * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def regression_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), SIGMA), obs=y)


def _exact(x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    n, d = x.shape
    log_z = dist.MultivariateNormal(torch.zeros(n), x @ x.T + SIGMA**2 * torch.eye(n)).log_prob(y)
    precision = torch.eye(d) + x.T @ x / SIGMA**2
    cov = torch.linalg.inv(precision)
    mean = cov @ x.T @ y / SIGMA**2
    return float(log_z), mean, precision


def _log_joint(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    prior = dist.Normal(0.0, 1.0).log_prob(w).sum(-1)
    return prior + dist.Normal(w @ x.T, SIGMA).log_prob(y).sum(-1)


def _train(guide, model, *args, steps: int = 400, lr: float = 0.05, loss=None):
    # 16 vectorized particles and a learning rate decaying 50-fold: converged in 400 steps.
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.02 ** (1 / steps)})
    loss = loss or Trace_ELBO(num_particles=16, vectorize_particles=True)
    svi = SVI(model, guide, optim, loss)
    for _ in range(steps):
        svi.step(*args)
    return svi


@pytest.mark.parametrize("name", list(GUIDES))
def test_elbo_bounded_by_exact_evidence_and_approaches_it(name):
    x, y = _regression_data()
    log_z, mean, precision = _exact(x, y)
    # A diagonal start: the Laplace start ("auto") would already be exact on this model.
    guide = GUIDES[name](regression_model, init_scale="diag")
    _train(guide, regression_model, x, y, steps=STEPS.get(name, 400))

    with torch.no_grad():
        w, log_q = guide.get_posterior().rsample_and_log_prob((20000,))
        log_w = _log_joint(w, x, y) - log_q
    elbo, se = log_w.mean().item(), log_w.std().item() / math.sqrt(log_w.numel())
    assert elbo <= log_z + 4 * se, (name, elbo, log_z, se)

    # The best diagonal Gaussian's gap, in closed form: 0.5 (sum log L_ii - log det L).
    diag_gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)).item()
    gap = log_z - elbo
    assert gap < diag_gap + 0.05, (name, gap, diag_gap)
    if name in CORRELATING:
        assert gap < 0.25 * diag_gap, (name, gap, diag_gap)
    # The SVI loss goes through the Delta auxiliary site: it must estimate the same ELBO.
    loss = Trace_ELBO(num_particles=4000, vectorize_particles=True)
    with torch.no_grad():
        svi_elbo = -loss.loss(regression_model, guide, x, y)
    assert abs(svi_elbo - elbo) < 4 * se * math.sqrt(20000 / 4000) + 1e-6, (svi_elbo, elbo)
    # The fit is centred on the exact posterior mean.
    assert torch.allclose(w.mean(0), mean, atol=0.05), (w.mean(0), mean)


def test_diagonal_base_alone_matches_autonormal_optimum():
    x, y = _regression_data()
    log_z, _, precision = _exact(x, y)
    guide = AutoFlowGuide(regression_model, init_scale="diag")
    _train(guide, regression_model, x, y)
    with torch.no_grad():
        w, log_q = guide.get_posterior().rsample_and_log_prob((20000,))
        gap = log_z - (_log_joint(w, x, y) - log_q).mean().item()
    diag_gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)).item()
    assert abs(gap - diag_gap) < 0.03, (gap, diag_gap)


@pytest.mark.parametrize("name", list(GUIDES))
def test_log_prob_of_arbitrary_points_matches_forward_pass(name):
    x, y = _regression_data()
    guide = GUIDES[name](regression_model)
    guide(x, y)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
        posterior = guide.get_posterior()
        z, log_q = posterior.rsample_and_log_prob((50,))
        # A fresh tensor with the same values: no identity-keyed cache can help.
        assert torch.allclose(posterior.log_prob(z.clone()), log_q, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The AutoNormal-compatible API


def constrained_model() -> None:
    pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("b", dist.LogNormal(0.0, 0.5))
    pyro.sample("c", dist.Beta(2.0, 3.0))
    pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    pyro.sample("L", dist.LKJCholesky(3, 1.0))
    pyro.sample("u", dist.Uniform(-1.0, 2.0))


def _in_support(name: str, value: torch.Tensor) -> bool:
    if name == "b":
        return bool(torch.all(value > 0))
    if name == "c":
        return bool(torch.all((value > 0) & (value < 1)))
    if name == "p":
        return bool(torch.all(value > 0)) and torch.allclose(value.sum(-1), torch.ones(()))
    if name == "L":
        return bool(dist.constraints.corr_cholesky.check(value).all())
    if name == "u":
        return bool(torch.all((value > -1) & (value < 2)))
    return bool(torch.isfinite(value).all())


@pytest.mark.parametrize("name", ["iaf", "planar", "sylvester-triangular", "householder"])
def test_constrained_sites_median_quantiles_predictive(name):
    guide = GUIDES[name](constrained_model)
    _train(guide, constrained_model, steps=5)
    samples = guide()
    assert set(samples) == {"a", "b", "c", "p", "L", "u"}
    for site, value in samples.items():
        assert _in_support(site, value), site
    median = guide.median()
    quantiles = guide.quantiles([0.1, 0.5, 0.9])
    for site, value in median.items():
        assert value.shape == samples[site].shape
        assert _in_support(site, value), site
        assert quantiles[site].shape == (3,) + samples[site].shape
        assert torch.allclose(quantiles[site][1], value)
    for site in ("a", "b", "c", "u"):
        assert torch.all(quantiles[site][0] < quantiles[site][1])
        assert torch.all(quantiles[site][1] < quantiles[site][2])
    assert torch.equal(guide.median()["a"], median["a"]), "median must be reproducible"

    for parallel in (False, True):
        draws = Predictive(constrained_model, guide=guide, num_samples=7, parallel=parallel)()
        assert draws["L"].shape == (7, 3, 3)
        assert draws["a"].shape == (7, 2)


def test_median_and_quantiles_match_gaussian_posterior():
    x, y = _regression_data()
    _, mean, precision = _exact(x, y)
    sd = torch.linalg.inv(precision).diagonal().sqrt()
    guide = AutoIAFGuide(regression_model)
    _train(guide, regression_model, x, y, steps=STEPS["iaf"])
    q = guide.quantiles([0.1587, 0.5, 0.8413], x, y)["w"]
    # 4000 draws: the median's standard error is about 1.25 sd / sqrt(4000) = 0.02 sd.
    assert torch.all((q[1] - mean).abs() < 0.1 * sd + 0.02), (q[1], mean)
    assert torch.all(((q[2] - q[0]) / 2 - sd).abs() < 0.1 * sd), ((q[2] - q[0]) / 2, sd)
    assert torch.allclose(guide.median(x, y)["w"], q[1])


def test_init_loc_fn_is_respected():
    init = torch.tensor([3.0, -2.0, 0.5])
    x, y = _regression_data()
    for make in GUIDES.values():
        pyro.clear_param_store()
        guide = make(regression_model, init_loc_fn=init_to_value(values={"w": init}))
        median = guide.median(x, y)["w"]
        assert torch.allclose(median, init, atol=0.05), (make, median)


def test_inside_autoguidelist_with_autonormal():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a.unsqueeze(-1) * torch.ones(2), 0.5).to_event(1))
        pyro.sample("obs", dist.Normal(a, 1.0), obs=torch.tensor(0.3))

    guide = AutoGuideList(model)
    guide.append(AutoIAFGuide(poutine.block(model, hide=["a"])))
    guide.append(AutoNormal(poutine.block(model, expose=["a"])))
    _train(guide, model, steps=20)
    assert set(guide.median()) == {"a", "b"}
    quantiles = guide.quantiles([0.25, 0.75])
    assert quantiles["b"].shape == (2, 2)
    assert Predictive(model, guide=guide, num_samples=5)()["b"].shape == (5, 2)


@pytest.mark.parametrize("name", ["iaf", "sylvester-orthogonal", "radial"])
def test_vectorized_particles_and_mean_field_elbo(name):
    x, y = _regression_data()
    guide = GUIDES[name](regression_model)
    svi = _train(
        guide,
        regression_model,
        x,
        y,
        steps=20,
        loss=Trace_ELBO(num_particles=8, vectorize_particles=True),
    )
    assert math.isfinite(svi.evaluate_loss(x, y))
    svi = SVI(regression_model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    assert math.isfinite(svi.step(x, y))
    assert guide.sample_latent(x, y).shape == (3,)


@pytest.mark.parametrize("base", ["normal", "studentt"])
def test_state_dict_and_param_store_round_trip(base):
    x, y = _regression_data()
    guide = AutoIAFGuide(regression_model, base=base)
    _train(guide, regression_model, x, y, steps=30)
    z = torch.randn(5, 3)
    expected = guide.get_posterior().log_prob(z)

    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)
    pyro.clear_param_store()
    fresh = AutoIAFGuide(regression_model, base=base)
    fresh(x, y)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    if base == "studentt":  # the learned degrees of freedom travel with the state dict
        assert not torch.allclose(guide.base_df, torch.full_like(guide.base_df, 10.0))
        torch.testing.assert_close(fresh.base_df, guide.base_df)
    assert torch.allclose(fresh.get_posterior().log_prob(z), expected)
    assert torch.equal(fresh.median(x, y)["w"], guide.median(x, y)["w"])


def test_float32_guide():
    torch.set_default_dtype(torch.float32)
    x, y = (t.float() for t in _regression_data())
    guide = AutoSylvesterGuide(regression_model)
    _train(guide, regression_model, x, y, steps=5)
    assert all(p.dtype == torch.float32 for p in guide.parameters())
    assert guide.median(x, y)["w"].dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.parametrize("base", ["normal", "studentt"])
def test_cuda_guide(base):
    x, y = (t.cuda() for t in _regression_data())
    guide = AutoIAFGuide(regression_model, base=base)
    _train(guide, regression_model, x, y, steps=5)
    assert all(p.is_cuda for p in guide.parameters())
    assert guide.median(x, y)["w"].is_cuda


# ------------------------------------------------------------------------------------------
# init_scale="auto": the diagonal curvature of the unconstrained log joint


def test_auto_init_scale_is_the_conditional_sd_of_a_gaussian_posterior():
    x, y = _regression_data()
    _, _, precision = _exact(x, y)
    guide = AutoIAFGuide(
        regression_model,
        init_loc_fn=init_to_value(values={"w": torch.ones(3)}),
        init_scale="diag",
    )
    guide(x, y)

    def start_scale(guide):
        # the affine layer's scale times the gain of the fresh gated IAF layers before it
        _, scale = guide.flow.layers[-1].loc_scale()
        return scale.detach() * _initial_gain(list(guide.flow.layers)[:-1], 3)

    expected = precision.diagonal().rsqrt()  # a Gaussian's curvature is the same everywhere
    assert torch.allclose(start_scale(guide), expected, rtol=1e-6), (guide, expected)
    # A fixed number still means what it says.
    fixed = AutoIAFGuide(regression_model, init_scale=0.3)
    fixed(x, y)
    assert torch.allclose(start_scale(fixed), torch.full((3,), 0.3))


def test_auto_init_scale_constrained_clipped_and_not_concave_sites():
    def model() -> None:
        pyro.sample("sigma", dist.LogNormal(0.0, 0.4))  # log sigma ~ N(0, 0.4): scale 0.4
        pyro.sample("wide", dist.Normal(0.0, 100.0))  # clipped to 5
        pyro.sample("tail", dist.Cauchy(0.0, 1.0))  # convex at 3: falls back to 0.1

    init = init_to_value(
        values={"sigma": torch.tensor(2.0), "wide": torch.tensor(0.0), "tail": torch.tensor(3.0)}
    )
    guide = AutoFlowGuide(model, init_loc_fn=init, init_scale="diag")
    guide()
    _, scale = guide.flow.layers[-1].loc_scale()
    assert torch.allclose(scale.detach(), torch.tensor([0.4, 5.0, 0.1]), rtol=1e-5), scale


def test_auto_init_scale_hutchinson_above_256_coordinates():
    # Independent coordinates: Hutchinson's v * Hv is the exact diagonal for any probe.
    scales = torch.logspace(-2, 0.5, 300)

    def model() -> None:
        pyro.sample("x", dist.Normal(torch.zeros(300), scales).to_event(1))

    guide = AutoFlowGuide(model)  # "auto" is "diag" above 256 dimensions
    guide()
    assert guide.init_choice == "diag"
    _, scale = guide.flow.layers[-1].loc_scale()
    assert torch.allclose(scale.detach(), scales, rtol=1e-4)


@pytest.mark.parametrize("init_scale", ["full", "auto"])
def test_full_init_is_the_exact_laplace_approximation_of_a_gaussian_posterior(init_scale):
    # The posterior is Gaussian, so its Laplace approximation is exact: the mode is the
    # posterior mean and L L^T its covariance; "auto" must prefer it to the diagonal start.
    x, y = _regression_data()
    log_z, mean, precision = _exact(x, y)
    guide = AutoFlowGuide(regression_model, init_scale=init_scale)
    guide(x, y)
    assert guide.init_choice == "full"
    pre = guide.flow.layers[-1]
    torch.testing.assert_close(pre.loc, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(pre.scale_tril @ pre.scale_tril.T, torch.linalg.inv(precision))
    # With no flow layers the starting guide is the posterior: ELBO = log Z for every draw.
    with torch.no_grad():
        w, log_q = guide.get_posterior().rsample_and_log_prob((100,))
        log_w = _log_joint(w, x, y) - log_q
    torch.testing.assert_close(log_w, torch.full_like(log_w, log_z), atol=1e-6, rtol=0)
    # log_prob of arbitrary points goes through the inverse of every layer.
    points = mean + torch.randn(10, 3)
    exact = dist.MultivariateNormal(mean, precision_matrix=precision).log_prob(points)
    with torch.no_grad():
        torch.testing.assert_close(guide.get_posterior().log_prob(points), exact)
    # The learned layers sit in whitened coordinates and start at the identity.
    loc, scale = guide.flow.layers[-2].loc_scale()
    assert bool((loc == 0).all()) and torch.allclose(scale, torch.ones(3))


def test_auto_init_keeps_diag_where_the_mode_is_unrepresentative():
    # A 5-D funnel's log joint peaks at x = 0, v = -18 (maximize -v^2/18 - 2v), far out in
    # the neck; the Laplace start there has a far lower ELBO than the diagonal one.
    def funnel() -> None:
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)).expand([4]).to_event(1))

    guide = AutoIAFGuide(
        funnel, init_loc_fn=init_to_value(values={"v": torch.tensor(0.5), "x": torch.ones(4)})
    )
    guide()
    assert guide.init_choice == "diag"
    mode, found = find_mode(guide._log_density(), torch.tensor([0.5, 1.0, 1.0, 1.0, 1.0]))
    assert found
    torch.testing.assert_close(mode, torch.tensor([-18.0, 0, 0, 0, 0]), atol=1e-4, rtol=0)

    # Without a mode (log joint u^2 / 2, unbounded) there is no Laplace start either.
    def unbounded() -> None:
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        pyro.factor("tilt", u**2)

    flat = AutoFlowGuide(unbounded, init_loc_fn=init_to_value(values={"u": torch.tensor(0.3)}))
    flat()
    assert flat.init_choice == "diag"


def test_auto_init_is_diag_when_the_model_subsamples():
    # A subsampled likelihood makes the log joint noisy: no L-BFGS search on it.
    x, y = _regression_data(n=40)

    def subsampled(x: torch.Tensor, y: torch.Tensor) -> None:
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", 40, subsample_size=10) as idx:
            pyro.sample("y", dist.Normal((x[idx] * w).sum(-1), SIGMA), obs=y[idx])

    guide = AutoFlowGuide(subsampled)
    guide(x, y)
    assert guide.init_choice == "diag"
    full_batch = AutoFlowGuide(regression_model)
    full_batch(x, y)
    assert full_batch.init_choice == "full"


@pytest.mark.parametrize("init_scale", ["auto", "full", "diag"])
def test_start_search_leaves_init_loc_fn_and_the_global_rng_alone(init_scale):
    # The L-BFGS search, the Hessians and the start's ELBO evaluate the model as given: no
    # init_loc_fn call (init_to_median draws 15 prior samples per call) and no global random
    # draws beyond those of the fixed-scale guide's setup.
    x, y = _regression_data()
    calls = []

    def counting_init(site):
        calls.append(site["name"])
        return init_to_median(site)

    states = {}
    for scale in (init_scale, 1.0):
        calls.clear()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(regression_model, init_loc_fn=counting_init, init_scale=scale)
        guide._setup_prototype(x, y)
        states[scale] = (list(calls), torch.get_rng_state())
    (search_calls, search_state), (plain_calls, plain_state) = states.values()
    assert search_calls == plain_calls == ["w"]
    assert torch.equal(search_state, plain_state)


def test_studentt_base_learns_the_tails_and_bounds_the_importance_ratios():
    # Target: two independent Student-t(3) coordinates, so log Z = 0. A Gaussian q has
    # lighter tails: the ratios p/q are unbounded and PSIS k-hat is far above 0.7. The
    # Student-t base (with its elementwise affine) holds the target exactly and must find it.
    def heavy() -> None:
        pyro.sample("x", dist.StudentT(3.0, torch.zeros(2), torch.ones(2)).to_event(1))

    reports = {}
    for base in ("normal", "studentt"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(heavy, base=base, init_scale=1.0)
        _train(guide, heavy, steps=800)
        reports[base] = vi_diagnostics(to_arviz(guide, heavy, num_draws=4000), warn=False)
    df = guide.base_df.detach()
    assert df.shape == (2,) and bool(((df - 3.0).abs() < 0.75).all()), df
    assert reports["normal"].khat > 0.7, reports["normal"]
    assert reports["studentt"].khat < 0.5, reports["studentt"]
    assert abs(reports["studentt"].elbo) < 0.01, reports["studentt"]  # log Z = 0
    assert reports["normal"].elbo < -0.05, reports["normal"]


# ------------------------------------------------------------------------------------------
# Bad input, before any fitting


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="init_scale must be.*-0.1"):
        AutoIAFGuide(regression_model, init_scale=-0.1)
    with pytest.raises(ValueError, match="AutoPlanarGuide: base must be.*'cauchy'"):
        AutoPlanarGuide(regression_model, base="cauchy")
    with pytest.raises(
        ValueError, match="init_scale must be a number > 0, 'auto', 'diag' or 'full'.*'laplace'"
    ):
        AutoIAFGuide(regression_model, init_scale="laplace")
    with pytest.raises(ValueError, match="update must be 'gated' or 'affine', got 'clamp'"):
        AutoIAFGuide(regression_model, update="clamp")
    with pytest.raises(ValueError, match="num_transforms must be >= 1, got 0"):
        AutoPlanarGuide(regression_model, num_transforms=0)
    with pytest.raises(ValueError, match="variant.*'qr'"):
        AutoSylvesterGuide(regression_model, variant="qr")
    with pytest.raises(ValueError, match="built layers"):
        AutoFlowGuide(regression_model, flows=[Planar(3)], num_transforms=2)


def test_bad_family_options():
    x, y = _regression_data()
    guide = AutoIAFGuide(regression_model, hidden_dims=[0])
    with pytest.raises(ValueError, match="hidden_dims.*0"):
        guide(x, y)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bins'\] of flow family 'iaf'"):
        AutoFlowGuide(regression_model, "iaf", flow_options={"bins": 4})
    with pytest.raises(ValueError, match="unknown flow family 'nice'.*'naf'"):
        AutoFlowGuide(regression_model, "nice")
    with pytest.raises(ValueError, match="flow_options apply to a flow family given by name"):
        AutoFlowGuide(regression_model, IAF, flow_options={"hidden_dims": [4]})
    with pytest.raises(ValueError, match="coupling must be True or False, got 'yes'"):
        AutoNeuralSplineGuide(regression_model, coupling="yes")


def test_wrong_layer_size():
    x, y = _regression_data()
    guide = AutoFlowGuide(regression_model, flows=[Planar(5)])
    with pytest.raises(ValueError, match="input_dim=5.*3 unconstrained"):
        guide(x, y)


def test_local_latent_in_subsampled_plate_is_an_error():
    data = torch.randn(100)

    def model():
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10) as idx:
            z = pyro.sample("z_local", dist.Normal(loc, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data[idx])

    guide = AutoIAFGuide(model)
    with pytest.raises(ValueError, match="'z_local'.*'data'.*subsampled.*AutoGuideList"):
        SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO()).step()

    def full_batch_model():  # the same latent without subsampling is fine
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100):
            z = pyro.sample("z_local", dist.Normal(loc, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data)

    pyro.clear_param_store()
    AutoIAFGuide(full_batch_model)()


def test_discrete_latent_is_an_error():
    def model():
        k = pyro.sample("k_switch", dist.Bernoulli(0.3))
        pyro.sample("obs", dist.Normal(k, 1.0), obs=torch.tensor(0.5))

    with pytest.raises(ValueError, match="'k_switch' is discrete"):
        AutoPlanarGuide(model)()


def test_discrete_latent_error_links_the_enumeration_tutorial():
    def model():
        k = pyro.sample("k_switch", dist.Bernoulli(0.3))
        pyro.sample("obs", dist.Normal(k, 1.0), obs=torch.tensor(0.5))

    with pytest.raises(ValueError, match=r"https://pyro.ai/examples/enumeration.html"):
        AutoIAFGuide(model)()


# ------------------------------------------------------------------------------------------
# Nothing silent: the start, the saved state and the data a guide was built for


@pytest.mark.parametrize("init_scale", ["auto", "full", "diag"])
def test_start_does_not_depend_on_grad_mode(init_scale):
    # fit's resume and median() before fitting build the guide under torch.no_grad(), where
    # L-BFGS and the Hessian cannot run: the start must be the same guide all the same.
    x, y = _regression_data()
    states = []
    for grad in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoIAFGuide(regression_model, init_scale=init_scale)
        with torch.set_grad_enabled(grad):
            guide(x, y)
        states.append((guide.init_choice, guide.state_dict()))
    (choice, state), (choice_no_grad, state_no_grad) = states
    assert choice == choice_no_grad
    if init_scale != "diag":
        assert choice == "full"  # the correlated regression posterior: the Laplace start
    assert state.keys() == state_no_grad.keys()
    for key, value in state.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, state_no_grad[key], rtol=0, atol=0, msg=key)


def test_median_before_fitting_then_load_state_dict():
    x, y = _regression_data()
    trained = AutoIAFGuide(regression_model)
    _train(trained, regression_model, x, y, steps=30)
    state = trained.state_dict()
    expected = trained.median(x, y)["w"]
    pyro.clear_param_store()
    fresh = AutoIAFGuide(regression_model)
    fresh.median(x, y)  # builds the guide under no_grad
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.median(x, y)["w"], expected)


def test_load_state_dict_refuses_a_guide_with_another_start():
    x, y = _regression_data()
    full = AutoIAFGuide(regression_model, init_scale="full")
    full(x, y)
    state = full.state_dict()
    pyro.clear_param_store()
    diag = AutoIAFGuide(regression_model, init_scale="diag")
    diag(x, y)
    with pytest.raises(ValueError, match="AutoIAFGuide.*start 'full'.*this guide.*'diag'"):
        diag.load_state_dict(state)
    pyro.clear_param_store()
    unbuilt = AutoIAFGuide(regression_model, init_scale="full")
    with pytest.raises(RuntimeError, match="AutoIAFGuide.*call the guide once"):
        unbuilt.load_state_dict(state)


def test_init_to_value_is_the_start_whatever_init_scale():
    # An explicit init_to_value pins the starting location: "auto" and "full" take the
    # curvature at that point instead of moving the start to the mode.
    init = torch.tensor([3.0, -2.0, 0.5])
    x, y = _regression_data()
    for init_scale in ("auto", "full", "diag"):
        pyro.clear_param_store()
        guide = AutoIAFGuide(
            regression_model, init_loc_fn=init_to_value(values={"w": init}), init_scale=init_scale
        )
        guide(x, y)
        torch.testing.assert_close(guide.median(x, y)["w"], init, atol=0.05, rtol=0)
    # the curvature of a Gaussian log joint is the same everywhere: the exact covariance
    _, _, precision = _exact(x, y)
    assert guide.init_choice == "diag"
    pyro.clear_param_store()
    guide = AutoFlowGuide(regression_model, init_loc_fn=init_to_value(values={"w": init}))
    guide(x, y)
    assert guide.init_choice == "full"
    tril = guide.flow.layers[-1].scale_tril
    torch.testing.assert_close(tril @ tril.T, torch.linalg.inv(precision))
    torch.testing.assert_close(guide.flow.layers[-1].loc, init)


@pytest.mark.parametrize("name", list(GUIDES))
def test_every_parameter_trains_and_the_store_holds_the_module_tensors(name):
    x, y = _regression_data()
    guide = GUIDES[name](regression_model)
    guide(x, y)
    before = {key: p.detach().clone() for key, p in guide.named_parameters()}
    assert before, name

    def check_store_identity() -> None:
        own = list(guide.parameters())
        stored = [p for _, p in pyro.get_param_store().named_parameters()]
        assert len(stored) == len(own)
        for p in stored:
            assert any(p is q for q in own), name

    check_store_identity()
    svi = SVI(regression_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(x, y)
    check_store_identity()
    unchanged = [key for key, p in guide.named_parameters() if torch.equal(p, before[key])]
    assert not unchanged, (name, unchanged)
    guide.to(torch.float32)
    x32, y32 = x.float(), y.float()
    before = {key: p.detach().clone() for key, p in guide.named_parameters()}
    svi = SVI(regression_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(x32, y32)
    check_store_identity()
    unchanged = [key for key, p in guide.named_parameters() if torch.equal(p, before[key])]
    assert not unchanged, (name, unchanged)


ELBOS = {
    "trace": lambda: Trace_ELBO(),
    "trace-mean-field": lambda: TraceMeanField_ELBO(),
    "jit-trace": lambda: JitTrace_ELBO(),
    "jit-trace-mean-field": lambda: JitTraceMeanField_ELBO(),
    "trace-graph": lambda: TraceGraph_ELBO(),
    "renyi": lambda: RenyiELBO(alpha=0.5, num_particles=2),
}


@pytest.mark.parametrize("elbo", list(ELBOS))
@pytest.mark.parametrize("name", list(GUIDES))
def test_every_guide_with_every_elbo(name, elbo):
    x, y = _regression_data()
    guide = GUIDES[name](regression_model, init_scale=0.1)
    svi = SVI(regression_model, guide, pyro.optim.Adam({"lr": 0.01}), ELBOS[elbo]())
    with warnings.catch_warnings():
        # the JIT's tracer warnings are about Python control flow in Pyro's code too, and
        # torch 2.13 deprecates torch.jit.trace itself (Pyro's JitTrace_ELBO calls it)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "`torch.jit.trace` is deprecated", DeprecationWarning)
        losses = [svi.step(x, y) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert -max(losses) > _exact(x, y)[0] - 50  # a finite ELBO near log Z, not garbage


def _local_model(data: torch.Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z_local", dist.Normal(loc, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=data)


def test_data_of_another_size_is_refused_when_it_has_local_latents():
    guide = AutoIAFGuide(_local_model)
    guide(torch.randn(10))
    guide(torch.randn(10))  # same size: fine
    with pytest.raises(ValueError, match="AutoIAFGuide.*plate 'data'.*size 10.*size 1"):
        guide(torch.randn(1))
    with pytest.raises(ValueError, match="plate 'data'"):
        SVI(_local_model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO()).step(torch.randn(3))


def test_data_of_another_size_is_fine_with_global_latents_only():
    x, y = _regression_data()
    guide = AutoIAFGuide(regression_model)
    _train(guide, regression_model, x, y, steps=5)
    x_new = torch.randn(4, 3)
    state = torch.get_rng_state()
    draws = Predictive(regression_model, guide=guide, num_samples=7)(x_new)
    assert draws["y"].shape == (7, 4)
    # the size check runs the model once for new shapes, without using the global RNG
    x_other = torch.randn(6, 3)
    torch.set_rng_state(state)
    same_shapes = guide(x, y)["w"]
    torch.set_rng_state(state)
    new_shapes = guide(x_other)["w"]
    torch.testing.assert_close(same_shapes, new_shapes, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Sticking the landing

# Guides that start exactly at their base Gaussian (the gated IAF's gate is pushed to 1).
EXACT_START = {
    "planar": functools.partial(AutoPlanarGuide, num_transforms=2),
    "radial": functools.partial(AutoRadialGuide, num_transforms=2),
    "householder": AutoHouseholderGuide,
    "sylvester-orthogonal": functools.partial(AutoSylvesterGuide, num_transforms=2),
    "sylvester-triangular": functools.partial(
        AutoSylvesterGuide, variant="triangular", num_transforms=2
    ),
    "iaf-affine": functools.partial(AutoIAFGuide, update="affine", num_transforms=2),
    "iaf": functools.partial(AutoFlowGuide, flows="iaf", flow_options={"sigmoid_bias": 40.0}),
}
# A Student-t base equals a Gaussian only as df -> infinity: tested away from the optimum only.
NEAR_START = {
    **EXACT_START,
    "iaf-studentt": functools.partial(
        AutoFlowGuide, flows="iaf", flow_options={"sigmoid_bias": 40.0}, base="studentt"
    ),
}


def _exact_guide(name, stick_the_landing):
    # init_to_value at the posterior mean pins the Laplace start there; for this Gaussian
    # posterior that start is exact, and every layer above starts at the identity.
    x, y = _regression_data()
    _, mean, _ = _exact(x, y)
    guide = NEAR_START[name](
        regression_model,
        init_loc_fn=init_to_value(values={"w": mean}),
        init_scale="full",
        stick_the_landing=stick_the_landing,
    )
    guide(x, y)
    return guide, x, y


@pytest.mark.parametrize("name", list(EXACT_START))
def test_stick_the_landing_gradient_vanishes_at_the_exact_posterior(name):
    largest = {}
    for stl in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide, x, y = _exact_guide(name, stl)
        params = [p for p in guide.parameters() if p.requires_grad]
        log_z = _exact(x, y)[0]
        worst = 0.0
        for particles in (1, 4):
            elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True)
            for _ in range(3):
                loss = elbo.differentiable_loss(regression_model, guide, x, y)
                assert abs(-loss.item() - log_z) < 1e-6, name  # q = p: ELBO = log Z per draw
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                worst = max([worst] + [g.abs().max().item() for g in grads if g is not None])
        largest[stl] = worst
    assert largest[True] < 1e-7, (name, largest)
    assert largest[False] > 1e-3, (name, largest)


@pytest.mark.parametrize("name", ["planar", "sylvester-orthogonal", "iaf", "iaf-studentt"])
def test_stick_the_landing_is_unbiased_away_from_the_optimum(name):
    # On the same draws, plain - STL is the score term, whose mean is zero: a paired test with
    # a tolerance of 4 standard errors per coordinate.
    pyro.set_rng_seed(1)
    guides = {}
    for stl in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        guide, x, y = _exact_guide(name, stl)
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(0.3 * torch.randn_like(p))  # a trained-like, non-optimal guide
        guides[stl] = guide
    guides[False].load_state_dict(guides[True].state_dict())
    differences = []
    for draw in range(120):
        grads = {}
        for stl, guide in guides.items():
            pyro.set_rng_seed(100 + draw)  # the same draw for both
            loss = Trace_ELBO().differentiable_loss(regression_model, guide, x, y)
            params = [p for p in guide.parameters() if p.requires_grad]
            flat = torch.autograd.grad(loss, params, allow_unused=True)
            grads[stl] = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(flat, params, strict=True)
                ]
            )
        differences.append(grads[False] - grads[True])
    d = torch.stack(differences)
    se = d.std(0) / math.sqrt(d.shape[0])
    assert bool((d.mean(0).abs() <= 4 * se + 1e-10).all()), (name, (d.mean(0) / se).abs().max())
    assert bool((d.std(0) > 0).any())  # the score term is not zero away from the optimum


def test_stick_the_landing_needs_invertible_layers_and_a_bool():
    class Shift(Planar):
        has_inverse = False

    x, y = _regression_data()
    with pytest.raises(ValueError, match="stick_the_landing must be True or False, got 1"):
        AutoIAFGuide(regression_model, stick_the_landing=1)
    guide = AutoFlowGuide(regression_model, flows=Shift, stick_the_landing=True)
    with pytest.raises(ValueError, match=r"stick_the_landing needs the inverse.*\['Shift'\]"):
        guide(x, y)


def test_zuko_flow_as_the_guide_flow():
    zuko = pytest.importorskip("zuko")
    x, y = _regression_data()
    log_z, _, _ = _exact(x, y)
    guide = AutoFlowGuide(
        regression_model,
        flows=lambda dim: zuko.flows.NSF(dim, transforms=2, hidden_features=(16,)),
    )
    _train(guide, regression_model, x, y, steps=150)
    report = vi_diagnostics(to_arviz(guide, regression_model, x, y, num_draws=2000), warn=False)
    assert report.elbo <= log_z + 3 * report.elbo_mcse
    assert report.elbo > log_z - 0.5
    z = torch.randn(5, 3)
    log_q = guide.get_posterior().log_prob(z)  # zuko's inverse direction scores any point
    assert torch.isfinite(log_q).all()
    with pytest.raises(ValueError):  # Pyro's validation is on again after the zuko import
        dist.Normal(0.0, -1.0)


def test_stick_the_landing_option_equals_the_stl_estimator():
    from pyro_flowvi.estimators import TraceSTL_ELBO

    x, y = _regression_data()
    grads = []
    for option, loss in ((True, Trace_ELBO()), (False, TraceSTL_ELBO())):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        guide = AutoPlanarGuide(regression_model, num_transforms=2, stick_the_landing=option)
        guide(x, y)
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(0.2 * torch.randn_like(p))
        pyro.set_rng_seed(4)
        value = loss.differentiable_loss(regression_model, guide, x, y)
        grads.append((value, torch.autograd.grad(value, list(guide.parameters()))))
    (value_a, grads_a), (value_b, grads_b) = grads
    torch.testing.assert_close(value_a, value_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["realnvp", "naf"])
def test_first_adam_steps_keep_an_exact_start_close(name):
    # From the exact start of a 60-D Gaussian, Adam's first steps move every weight by ~lr
    # whatever its gradient. A conditioner's readout scaled by 1 / width keeps that from
    # moving its outputs by lr * width: without it, a 120-wide RealNVP reached KL 33 after
    # five steps at lr 1e-2 and NAF 1.8. (What is left is the plain estimator's noise, which
    # moves all coordinates together, and Adam's lr-sized steps near any optimum: the default
    # decaying learning rate of `fit` and sticking the landing deal with those.)
    from pyro_flowvi.benchmarks.synthetic import rotated_gaussian

    target = rotated_gaussian(60, decades=2.0)
    guide = {"realnvp": AutoRealNVPGuide, "naf": AutoNAFGuide}[name](target.model)
    guide()
    assert guide.init_choice == "full"
    svi = SVI(target.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(5):
        svi.step()
    with torch.no_grad():
        z, log_q = guide.get_posterior().rsample_and_log_prob((400,))
        log_density = guide._log_density()
        log_p = torch.stack([log_density(point) for point in z])
    kl = float((log_q - log_p).mean())
    assert kl < 1.5, (name, kl)


def test_neural_spline_guide_takes_the_banana_configuration():
    # AutoNeuralSplineGuide(hidden_dims, activation, bound) is the same guide as
    # AutoFlowGuide("spline-autoregressive", flow_options=...) with those options.
    x, y = _regression_data()
    options = {"hidden_dims": [8, 8], "activation": torch.nn.GELU, "bound": 8.0}
    guides = []
    for make in (
        lambda: AutoNeuralSplineGuide(regression_model, **options),
        lambda: AutoFlowGuide(regression_model, "spline-autoregressive", flow_options=options),
    ):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        guide = make()
        guide(x, y)
        guides.append(guide)
    ours, reference = guides
    assert ours.flow_options == reference.flow_options
    assert any(isinstance(m, torch.nn.GELU) for m in ours.flow.modules())
    assert not any(isinstance(m, torch.nn.ELU) for m in ours.flow.modules())
    state, expected = ours.flow.state_dict(), reference.flow.state_dict()
    assert state.keys() == expected.keys()
    for key in state:
        assert torch.equal(state[key], expected[key]), key
    # a factory of modules works as a class does
    factory = AutoNeuralSplineGuide(
        regression_model, activation=functools.partial(torch.nn.LeakyReLU, 0.1)
    )
    factory(x, y)
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in factory.flow.modules())
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['activation'\] of flow family 'spline-coupling'"
    ):
        AutoNeuralSplineGuide(regression_model, coupling=True, activation=torch.nn.GELU)
    with pytest.raises(ValueError, match="MADE: activation must be a class or factory.*'gelu'"):
        AutoNeuralSplineGuide(regression_model, activation="gelu")(x, y)
    with pytest.raises(ValueError, match="MADE: activation .* must make torch.nn.Module"):
        AutoNeuralSplineGuide(regression_model, activation=lambda: torch.tanh)(x, y)
