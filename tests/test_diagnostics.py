"""Tests of pyro_flowvi.diagnostics on a conjugate model with exact posterior and log evidence.

These run against the installed ArviZ (0.x in the main environment); ``tests/arviz1`` runs
the adapter against ArviZ 1.x.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.ops.stats import fit_generalized_pareto

import pyro_flowvi.diagnostics as diagnostics
from pyro_flowvi.diagnostics import (
    VectorizationWarning,
    VIDiagnosticWarning,
    _arviz,
    compare_approximations,
    khat_threshold,
    khat_verdict,
    marginal_wasserstein,
    to_arviz,
    vi_diagnostics,
    vi_loo,
    wasserstein_distance,
)
from pyro_flowvi.fit import fit

N, D, NOISE, PRIOR_SD = 20, 2, 1.0, 1.0


class Conjugate:
    """Bayesian linear regression with known noise: exact posterior, evidence and LOO."""

    def __init__(self):
        generator = torch.Generator().manual_seed(7)
        self.X = torch.randn(N, D, generator=generator)
        w = torch.tensor([0.5, -1.0])
        self.y = self.X @ w + NOISE * torch.randn(N, generator=generator)
        precision = torch.eye(D) / PRIOR_SD**2 + self.X.T @ self.X / NOISE**2
        self.cov = torch.linalg.inv(precision)
        self.mean = self.cov @ self.X.T @ self.y / NOISE**2
        marginal = dist.MultivariateNormal(
            torch.zeros(N), PRIOR_SD**2 * self.X @ self.X.T + NOISE**2 * torch.eye(N)
        )
        self.log_z = float(marginal.log_prob(self.y))

    @staticmethod
    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, PRIOR_SD).expand([D]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal((w * X).sum(-1), NOISE), obs=y)

    def log_joint(self, w):
        """log p(w, y) for draws w of shape (S, D), computed without Pyro."""
        w = torch.as_tensor(w)
        prior = dist.Normal(0.0, PRIOR_SD).log_prob(w).sum(-1)
        lik = dist.Normal(w @ self.X.T, NOISE).log_prob(self.y).sum(-1)
        return (prior + lik).numpy()

    def exact_loo(self):
        """Exact elpd_i = log p(y_i | y_-i) from the leave-one-out posteriors."""
        out = []
        for i in range(N):
            keep = torch.arange(N) != i
            X, y = self.X[keep], self.y[keep]
            cov = torch.linalg.inv(torch.eye(D) / PRIOR_SD**2 + X.T @ X / NOISE**2)
            mean = cov @ X.T @ y / NOISE**2
            x = self.X[i]
            var = NOISE**2 + x @ cov @ x
            out.append(float(dist.Normal(x @ mean, var.sqrt()).log_prob(self.y[i])))
        return np.array(out)

    def exact_guide(self, X, y):
        pyro.sample("w", dist.MultivariateNormal(self.mean, self.cov))

    def narrow_guide(self, X, y):
        sd = self.cov.diagonal().sqrt()
        pyro.sample("w", dist.Normal(self.mean + 1.5 * sd, 0.3 * sd).to_event(1))


@pytest.fixture
def conj():
    return Conjugate()


def _stats(idata, name):
    return _arviz.sample_values(idata, "sample_stats", name)


def test_well_fitted_exact_family_guide_has_small_khat_and_exact_evidence(conj):
    guide = AutoMultivariateNormal(conj.model)
    result = fit(
        conj.model,
        guide,
        conj.X,
        conj.y,
        num_steps=250,
        optim=pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.98}),
        loss=Trace_ELBO(num_particles=8, vectorize_particles=True),
        progress=False,
    )
    idata = to_arviz(guide, conj.model, conj.X, conj.y, num_draws=4000, fit_result=result)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VIDiagnosticWarning)
        report = vi_diagnostics(idata)
    assert report.khat < 0.5
    assert report.verdict == "good" and report.reliable
    assert abs(report.iw_elbo - conj.log_z) < 0.03
    # the ELBO is a lower bound: below log Z by more than its Monte Carlo error allows
    assert report.elbo < conj.log_z + 3 * report.elbo_mcse
    assert report.is_ess > 0.5 * report.num_draws
    assert report.fit_time == pytest.approx(result.wall_time)
    assert report.fit_elbo == pytest.approx(result.smoothed_elbo())
    text = str(report)
    assert "PSIS k-hat" in text and "IW-ELBO" in text and "good" in text


def test_narrow_off_centre_guide_has_large_khat_and_warns(conj):
    idata = to_arviz(conj.narrow_guide, conj.model, conj.X, conj.y, num_draws=2000)
    with pytest.warns(VIDiagnosticWarning, match="k-hat .* unreliable|no finite mean"):
        report = vi_diagnostics(idata)
    assert report.khat > 0.7
    assert report.verdict in ("bad", "very bad") and not report.reliable
    assert report.iw_elbo < conj.log_z - 0.5
    assert report.is_ess < 0.1 * report.num_draws


@pytest.mark.parametrize("parallel", [None, False])
def test_log_weight_is_lp_minus_log_q_and_both_are_exact(conj, parallel):
    num_draws = 300 if parallel is None else 20
    idata = to_arviz(
        conj.exact_guide, conj.model, conj.X, conj.y, num_draws=num_draws, parallel=parallel
    )
    lp, log_q, log_weight = (_stats(idata, k)[0] for k in ("lp", "log_q", "log_weight"))
    np.testing.assert_allclose(log_weight, lp - log_q, rtol=0, atol=1e-12)
    w = _arviz.sample_values(idata, "posterior", "w")[0]
    np.testing.assert_allclose(lp, conj.log_joint(w), rtol=1e-10)
    expected_q = dist.MultivariateNormal(conj.mean, conj.cov).log_prob(torch.as_tensor(w))
    np.testing.assert_allclose(log_q, expected_q.numpy(), rtol=1e-10)
    # the exact posterior: every importance weight is the evidence
    np.testing.assert_allclose(log_weight, conj.log_z, atol=1e-8)


def test_groups_shapes_names_and_fit_trace(conj):
    guide = AutoNormal(conj.model)
    result = fit(conj.model, guide, conj.X, conj.y, num_steps=3, progress=False)
    idata = to_arviz(guide, conj.model, conj.X, conj.y, num_draws=50, fit_result=result)
    groups = set(_arviz.group_names(idata))
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data", "vi_fit"} <= groups
    assert _arviz.var_names(idata, "posterior") == ["w"]
    assert _arviz.sample_values(idata, "posterior", "w").shape == (1, 50, D)
    for name in ("lp", "log_q", "log_weight"):
        assert _stats(idata, name).shape == (1, 50)
    assert _arviz.var_names(idata, "log_likelihood") == ["y"]
    assert _arviz.sample_values(idata, "log_likelihood", "y").shape == (1, 50, N)
    assert _arviz.var_dims(idata, "log_likelihood", "y") == ("data",)
    assert _arviz.var_dims(idata, "observed_data", "y") == ("data",)
    np.testing.assert_array_equal(
        _arviz.sample_values(idata, "observed_data", "y"), conj.y.numpy()
    )
    np.testing.assert_array_equal(_arviz.sample_values(idata, "vi_fit", "elbo"), result.elbo_trace)
    assert _arviz.group_attrs(idata, "vi_fit")["wall_time"] == pytest.approx(result.wall_time)
    assert _arviz.group_attrs(idata, "posterior")["approximation"] == "AutoNormal"
    # the pointwise log-likelihood sums to lp minus the prior
    loglik = _arviz.sample_values(idata, "log_likelihood", "y")[0].sum(-1)
    w = torch.as_tensor(_arviz.sample_values(idata, "posterior", "w")[0])
    prior = dist.Normal(0.0, PRIOR_SD).log_prob(w).sum(-1).numpy()
    np.testing.assert_allclose(loglik + prior, _stats(idata, "lp")[0], rtol=1e-10)


def plated_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.deterministic("shifted", theta - mu)
        pyro.sample("y", dist.Normal(theta, 10.0), obs=y)


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoMultivariateNormal, AutoIAFNormal])
def test_to_arviz_works_for_pyro_autoguides(guide_class):
    y = torch.tensor([28.0, 8.0, -3.0, 7.0])
    guide = guide_class(plated_model)
    fit(plated_model, guide, y, num_steps=2, progress=False)
    idata = to_arviz(guide, plated_model, y, num_draws=40)
    assert _arviz.var_names(idata, "posterior") == ["mu", "tau", "theta", "shifted"]
    assert _arviz.var_dims(idata, "posterior", "theta") == ("school",)
    theta = _arviz.sample_values(idata, "posterior", "theta")
    mu = _arviz.sample_values(idata, "posterior", "mu")
    assert theta.shape == (1, 40, 4) and mu.shape == (1, 40)
    np.testing.assert_allclose(
        _arviz.sample_values(idata, "posterior", "shifted"), theta - mu[..., None]
    )
    assert np.all(_arviz.sample_values(idata, "posterior", "tau") > 0)
    lp, log_q = _stats(idata, "lp")[0], _stats(idata, "log_q")[0]
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(log_q))
    # lp recomputed by hand from the posterior values
    t = torch.as_tensor(theta[0])
    m, s = (
        torch.as_tensor(mu[0]),
        torch.as_tensor(_arviz.sample_values(idata, "posterior", "tau")[0]),
    )
    expected = (
        dist.Normal(0.0, 5.0).log_prob(m)
        + dist.HalfCauchy(5.0).log_prob(s)
        + dist.Normal(m[:, None], s[:, None]).log_prob(t).sum(-1)
        + dist.Normal(t, 10.0).log_prob(y).sum(-1)
    )
    np.testing.assert_allclose(lp, expected.numpy(), rtol=1e-9)


def test_autonormal_log_q_includes_the_change_of_variables():
    y = torch.tensor([1.0, -2.0, 0.5])
    guide = AutoNormal(plated_model)
    fit(plated_model, guide, y, num_steps=2, progress=False)
    idata = to_arviz(guide, plated_model, y, num_draws=30)
    tau = torch.as_tensor(_arviz.sample_values(idata, "posterior", "tau")[0])
    mu = torch.as_tensor(_arviz.sample_values(idata, "posterior", "mu")[0])
    theta = torch.as_tensor(_arviz.sample_values(idata, "posterior", "theta")[0])
    locs, scales = guide.locs, guide.scales
    with torch.no_grad():
        expected = (
            dist.Normal(locs.mu, scales.mu).log_prob(mu)
            + dist.Normal(locs.tau, scales.tau).log_prob(tau.log())
            - tau.log()
            + dist.Normal(locs.theta, scales.theta).log_prob(theta).sum(-1)
        )
    np.testing.assert_allclose(_stats(idata, "log_q")[0], expected.numpy(), rtol=1e-9)


def test_non_vectorizable_guide_falls_back_to_a_loop():
    y = torch.tensor([1.0, 2.0])

    def scalar_guide(y):
        mu = pyro.sample("mu", dist.Normal(0.5, 1.0))
        scale = 1.0 + abs(float(mu))  # float() of a vector of draws fails: not vectorizable
        pyro.sample("tau", dist.LogNormal(0.0, scale))
        with pyro.plate("school", 2):
            pyro.sample("theta", dist.Normal(mu, 1.0))

    with pytest.warns(VectorizationWarning, match="only one element tensors"):
        idata = to_arviz(scalar_guide, plated_model, y, num_draws=6)
    assert _arviz.sample_values(idata, "posterior", "theta").shape == (1, 6, 2)
    with pytest.raises(Exception, match="a Tensor with 6 elements|only one element"):
        to_arviz(scalar_guide, plated_model, y, num_draws=6, parallel=True)


def test_to_arviz_rejects_unguided_latents_subsampling_and_bad_draws(conj):
    def partial_guide(X, y):
        pass

    with pytest.raises(ValueError, match=r"latent sites \['w'\] of the model"):
        to_arviz(partial_guide, conj.model, conj.X, conj.y, num_draws=5)
    with pytest.raises(ValueError, match="num_draws must be an int >= 2, got 1"):
        to_arviz(conj.exact_guide, conj.model, conj.X, conj.y, num_draws=1)

    def subsampled(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 10, subsample_size=3):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[:3])

    def guide(y):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="the model subsamples plate 'data' to 3 of 10"):
        to_arviz(guide, subsampled, torch.zeros(10), num_draws=5)


def test_vi_loo_matches_exact_leave_one_out(conj):
    idata = to_arviz(conj.exact_guide, conj.model, conj.X, conj.y, num_draws=4000)
    loo = vi_loo(idata)
    exact = conj.exact_loo()
    assert loo.pareto_k.shape == (N,) and loo.elpd_i.shape == (N,)
    assert np.all(loo.pareto_k < 0.7) and loo.num_bad == 0
    np.testing.assert_allclose(loo.elpd_i, exact, atol=0.03)
    assert loo.elpd == pytest.approx(exact.sum(), abs=0.1)
    assert loo.p_loo == pytest.approx(D, abs=1.0)
    assert "elpd_loo" in str(loo)


def test_vi_loo_corrects_for_the_approximation(conj):
    """With a biased proposal the correction pulls the estimate back towards exact LOO."""

    def wide_guide(X, y):
        pyro.sample("w", dist.MultivariateNormal(conj.mean + 0.2, 2.0 * conj.cov))

    idata = to_arviz(wide_guide, conj.model, conj.X, conj.y, num_draws=4000)
    exact = conj.exact_loo().sum()
    corrected = vi_loo(idata).elpd
    loglik = _arviz.sample_values(idata, "log_likelihood", "y")[0]
    # plain PSIS-LOO that treats the draws as posterior draws (no approximation correction)
    naive_ratios = -loglik.T
    lw, _ = _arviz.psislw(naive_ratios - naive_ratios.max(1, keepdims=True))
    naive = np.sum(np.log(np.sum(np.exp(lw + loglik.T), axis=1)))
    assert abs(corrected - exact) < 0.1
    assert abs(naive - exact) > 3 * abs(corrected - exact)


def _pyro_khat(log_ratios):
    """Pyro's psis_diagnostic procedure on given log weights."""
    lw = torch.as_tensor(log_ratios)
    lw = torch.sort(lw - lw.max())[0]
    n = lw.shape[0]
    cutoff = max(math.log(1e-15), float(lw[-int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))) - 1]))
    tail = lw[lw > cutoff]
    k, _ = fit_generalized_pareto(tail.exp() - math.exp(cutoff))
    return float(k)


@pytest.mark.parametrize("true_k", [0.3, 0.8])
def test_psis_khat_agrees_with_arviz_and_pyro(true_k):
    rng = np.random.default_rng(0)
    # importance ratios with a Pareto(1 / k) right tail
    log_ratios = np.log(rng.pareto(1.0 / true_k, size=4000) + 1.0)
    lw, khat = _arviz.psislw(log_ratios)
    assert abs(float(khat) - true_k) < 0.2  # a k-hat from ~190 tail draws has sd ~0.1
    assert abs(float(khat) - _pyro_khat(log_ratios)) < 0.05
    np.testing.assert_allclose(np.exp(lw).sum(), 1.0)
    if _arviz.arviz_major() == 0:
        # ArviZ 0.x and Pyro use the same tail size: the same k-hat up to rounding
        assert float(khat) == pytest.approx(_pyro_khat(log_ratios), abs=1e-9)
        az = _arviz.import_arviz()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected_lw, expected_k = az.psislw(log_ratios)
        np.testing.assert_allclose(lw, expected_lw)
        assert float(khat) == pytest.approx(float(expected_k))
    # light right tail (the ratios negated): a small k-hat, the sign trap of ArviZ 1.x
    _, khat_left = _arviz.psislw(-log_ratios)
    assert float(khat_left) < 0.2


def test_psislw_is_vectorized_over_leading_axes():
    rng = np.random.default_rng(1)
    log_ratios = rng.standard_normal((3, 2, 500))
    lw, khat = _arviz.psislw(log_ratios)
    assert lw.shape == (3, 2, 500) and khat.shape == (3, 2)
    _, k01 = _arviz.psislw(log_ratios[0, 1])
    assert float(khat[0, 1]) == pytest.approx(float(k01))
    with pytest.raises(ValueError, match="must be finite"):
        _arviz.psislw(np.array([0.0, np.nan, 1.0]))


def test_vi_diagnostics_formulas_on_given_weights():
    rng = np.random.default_rng(2)
    log_weight = rng.normal(-3.0, 0.5, size=(1, 1000))
    idata = _arviz.from_groups(
        {
            "posterior": {"x": rng.normal(size=(1, 1000))},
            "sample_stats": {"log_weight": log_weight},
        }
    )
    report = vi_diagnostics(idata)
    lw = log_weight[0]
    assert report.elbo == pytest.approx(lw.mean())
    assert report.elbo_mcse == pytest.approx(lw.std(ddof=1) / math.sqrt(1000))
    assert report.iw_elbo == pytest.approx(np.log(np.mean(np.exp(lw))))
    assert report.khat_threshold == pytest.approx(min(1 - 1 / math.log10(1000), 0.7))
    assert report.fit_time is None and report.fit_elbo is None
    assert report.to_dict()["num_draws"] == 1000
    equal = _arviz.from_groups({"sample_stats": {"log_weight": np.full((1, 200), -2.0)}})
    report = vi_diagnostics(equal)
    assert report.is_ess == pytest.approx(200)
    assert report.khat == -np.inf and report.verdict == "good"
    assert report.iw_elbo == pytest.approx(-2.0) and report.elbo_mcse == 0.0
    missing = _arviz.from_groups({"posterior": {"x": np.zeros((1, 5))}})
    with pytest.raises(ValueError, match="needs sample_stats.log_weight"):
        vi_diagnostics(missing)


@pytest.mark.parametrize(
    "khat, draws, verdict",
    [
        (0.2, 1000, "good"),
        (0.6, 1000, "ok"),
        (0.55, 100, "too few draws"),
        (0.8, 1000, "bad"),
        (1.3, 1000, "very bad"),
    ],
)
def test_khat_verdicts(khat, draws, verdict):
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(10**6) == pytest.approx(0.7)
    assert khat_verdict(khat, draws)[0] == verdict


def test_compare_approximations_against_reference(conj):
    reference = {"w": dist.MultivariateNormal(conj.mean, conj.cov).sample((4, 1000)).numpy()}
    narrow = to_arviz(conj.narrow_guide, conj.model, conj.X, conj.y, num_draws=1000)
    table = compare_approximations(
        {"exact": conj.exact_guide, "narrow": narrow},
        conj.model,
        conj.X,
        conj.y,
        reference=reference,
        num_draws=1000,
        per_parameter=True,
        wasserstein_draws=300,
    )
    assert list(table.index) == ["exact", "narrow"]
    for column in ("elbo", "iw_elbo", "khat", "is_ess", "fit_time", "mean_err_max", "sd_err_max"):
        assert column in table.columns
    assert {"mean_err[w[0]]", "mean_err[w[1]]", "sd_err[w[1]]"} <= set(table.columns)
    exact, bad = table.loc["exact"], table.loc["narrow"]
    assert exact["mean_err_max"] < 0.15 and exact["sd_err_max"] < 0.15
    assert bad["mean_err_max"] == pytest.approx(1.5, abs=0.2)
    assert bad["sd_err_max"] == pytest.approx(0.7, abs=0.1)
    assert exact["w1_marginal"] < 0.1 < bad["w1_marginal"]
    assert exact["wasserstein"] < bad["wasserstein"]
    assert exact["khat"] < exact["khat_threshold"] < bad["khat"]
    assert math.isnan(exact["fit_time"])

    with pytest.raises(ValueError, match=r"no posterior variables \['v'\]"):
        compare_approximations({"narrow": narrow}, reference={"v": np.zeros((1, 5))})
    with pytest.raises(ValueError, match="'exact' is a guide; pass the model"):
        compare_approximations({"exact": conj.exact_guide})


def test_wasserstein_distances():
    rng = np.random.default_rng(3)
    x = rng.normal(size=500)
    scipy_stats = pytest.importorskip("scipy.stats")
    for y in (rng.normal(1.0, 2.0, size=300), x + 0.7):
        expected = scipy_stats.wasserstein_distance(x, y)
        assert marginal_wasserstein(x, y) == pytest.approx(expected)
    points = rng.normal(size=(200, 3))
    assert wasserstein_distance(points, points, num_draws=200) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([3.0, 4.0, 0.0])
    assert wasserstein_distance(points, points + shift, num_draws=200) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="need \\(N, P\\) and \\(M, P\\)"):
        wasserstein_distance(points, points[:, :2])


def test_plots_return_figures(conj):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guide = AutoNormal(conj.model)
    result = fit(conj.model, guide, conj.X, conj.y, num_steps=30, progress=False)
    idata = to_arviz(guide, conj.model, conj.X, conj.y, num_draws=200, fit_result=result)
    exact = to_arviz(conj.exact_guide, conj.model, conj.X, conj.y, num_draws=200)
    reference = {"w": dist.MultivariateNormal(conj.mean, conj.cov).sample((2, 200)).numpy()}
    try:
        fig = diagnostics.plot_elbo({"normal": result, "from idata": idata}, window=5, skip=2)
        assert len(fig.axes[0].lines) == 4
        fig = diagnostics.plot_marginals({"normal": idata, "exact": exact}, reference)
        assert fig.axes
        fig = diagnostics.plot_pair(idata, reference)
        assert fig.axes
    finally:
        plt.close("all")


def test_all_names_are_exported():
    for module in (diagnostics,):
        for name in module.__all__:
            assert hasattr(module, name), name


def test_importing_diagnostics_is_light():
    code = (
        "import sys, pyro_flowvi.diagnostics, pyro_flowvi.benchmarks, pyro_flowvi.fit; "
        "heavy = [m for m in ('arviz', 'pandas', 'matplotlib', 'sklearn') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_trace_elbo_and_to_arviz_agree_on_the_elbo(conj):
    guide = AutoNormal(conj.model)
    fit(conj.model, guide, conj.X, conj.y, num_steps=20, progress=False)
    idata = to_arviz(guide, conj.model, conj.X, conj.y, num_draws=2000)
    report = vi_diagnostics(idata, warn=False)
    elbo = -Trace_ELBO(num_particles=2000, vectorize_particles=True).loss(
        conj.model, guide, conj.X, conj.y
    )
    assert report.elbo == pytest.approx(elbo, abs=5 * report.elbo_mcse)
