"""Importance-resampled posterior draws (issue 11): to_arviz, sample_posterior, the table.

The target is a conjugate Gaussian posterior; the guides are deliberately wrong but overlap
it, so the PSIS-resampled draws must move toward the exact posterior, within tolerances from
standard errors of the importance-sampling effective sample size.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_flowvi.diagnostics import (
    PSISResample,
    VIDiagnosticWarning,
    _arviz,
    compare_approximations,
    psis_resample,
    sample_posterior,
    to_arviz,
    vi_diagnostics,
    vi_loo,
)
from pyro_flowvi.diagnostics.resample import _gumbel_top

N, D = 20, 2


class Conjugate:
    """y ~ N(X w, 1), w ~ N(0, I): the posterior of w is Gaussian and known."""

    def __init__(self):
        generator = torch.Generator().manual_seed(11)
        self.X = torch.randn(N, D, generator=generator)
        self.y = self.X @ torch.tensor([0.5, -1.0]) + torch.randn(N, generator=generator)
        self.cov = torch.linalg.inv(torch.eye(D) + self.X.T @ self.X)
        self.mean = self.cov @ self.X.T @ self.y
        self.sd = self.cov.diagonal().sqrt()

    @staticmethod
    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal((w * X).sum(-1), 1.0), obs=y)

    def shifted_guide(self, X, y):
        """Shifted by 0.6 sd, 1.3 times too wide, and blind to the correlation."""
        pyro.sample("w", dist.Normal(self.mean + 0.6 * self.sd, 1.3 * self.sd).to_event(1))

    def bad_guide(self, X, y):
        """Shifted by 2 sd and 0.4 times too narrow: the weights have no finite variance."""
        pyro.sample("w", dist.Normal(self.mean + 2.0 * self.sd, 0.4 * self.sd).to_event(1))


@pytest.fixture
def conj():
    return Conjugate()


def _errors(draws, conj):
    """|mean - exact| and |sd - exact| per coordinate, in exact-sd units."""
    draws = np.asarray(draws).reshape(-1, D)
    mean_err = np.abs(draws.mean(0) - conj.mean.numpy()) / conj.sd.numpy()
    sd_err = np.abs(draws.std(0, ddof=1) - conj.sd.numpy()) / conj.sd.numpy()
    return mean_err, sd_err


def _check_toward_exact(resampled, plain, ess, conj):
    """Resampled draws agree with the exact posterior within standard errors, plain do not."""
    mean_err, sd_err = _errors(resampled, conj)
    plain_mean_err, plain_sd_err = _errors(plain, conj)
    # standard errors of a mean and an sd (in sd units): the importance-sampling error of
    # ess effective draws plus the resampling error of R draws
    n = 1.0 / (1.0 / ess + 1.0 / resampled.reshape(-1, D).shape[0])
    assert np.all(mean_err < 4.0 / math.sqrt(n)), (mean_err, n)
    assert np.all(sd_err < 4.0 / math.sqrt(2 * n)), (sd_err, n)
    assert np.all(mean_err < 0.5 * plain_mean_err) and np.all(plain_mean_err > 0.5)
    assert np.max(sd_err) < np.max(plain_sd_err)


def test_to_arviz_resample_moves_the_draws_to_the_exact_posterior(conj):
    plain = to_arviz(conj.shifted_guide, conj.model, conj.X, conj.y, num_draws=4000)
    idata = to_arviz(conj.shifted_guide, conj.model, conj.X, conj.y, num_draws=1000, resample=True)
    attrs = _arviz.group_attrs(idata, "posterior")
    assert attrs["resampled"] == "psis" and attrs["num_proposals"] == 10000
    assert attrs["replace"] == 0 and attrs["psis_khat"] < 0.7
    assert _arviz.group_attrs(idata, "sample_stats")["psis_khat"] == attrs["psis_khat"]
    w = _arviz.sample_values(idata, "posterior", "w")
    assert w.shape == (1, 1000, D)
    proposals = _arviz.sample_values(idata, "sample_stats", "proposal")[0]
    assert np.unique(proposals).size == 1000 and proposals.max() < 10000  # no replacement
    # sample_stats and log_likelihood follow the kept draws
    lp = _arviz.sample_values(idata, "sample_stats", "lp")[0]
    expected_lp = dist.Normal(0.0, 1.0).log_prob(torch.as_tensor(w[0])).sum(-1) + dist.Normal(
        torch.as_tensor(w[0]) @ conj.X.T, 1.0
    ).log_prob(conj.y).sum(-1)
    np.testing.assert_allclose(lp, expected_lp.numpy(), rtol=1e-10)
    assert _arviz.sample_values(idata, "log_likelihood", "y").shape == (1, 1000, N)
    _check_toward_exact(w, _arviz.sample_values(plain, "posterior", "w"), attrs["is_ess"], conj)

    # the diagnostics judge the proposals, not the resampled draws
    report = vi_diagnostics(idata)
    assert report.num_draws == 10000 and report.khat == pytest.approx(attrs["psis_khat"])
    with pytest.raises(ValueError, match="resampled draws.*resample=False"):
        vi_loo(idata)


def test_sample_posterior_resamples_and_predicts(conj):
    pyro.set_rng_seed(1)
    samples = sample_posterior(
        conj.shifted_guide, conj.model, conj.X, conj.y, num_samples=1000, resample=True
    )
    assert set(samples) == {"w", "y"}
    assert samples["w"].shape == (1000, D) and samples["y"].shape == (1000, N)
    assert samples.resampled and samples.num_proposals == 10000 and not samples.replace
    assert samples.khat < samples.khat_threshold
    plain = sample_posterior(conj.shifted_guide, conj.model, conj.X, conj.y, num_samples=4000)
    assert not plain.resampled and plain.num_proposals == 4000
    _check_toward_exact(samples["w"].numpy(), plain["w"].numpy(), samples.is_ess, conj)
    # y is drawn from the model given each kept w (posterior predictive, as Predictive does)
    residual = samples["y"] - samples["w"] @ conj.X.T
    assert abs(float(residual.std()) - 1.0) < 0.05
    only = sample_posterior(
        conj.shifted_guide, conj.model, conj.X, conj.y, num_samples=10, return_sites=["w"]
    )
    assert set(only) == {"w"}


def test_compare_approximations_reports_resampled_rows(conj):
    reference = {"w": dist.MultivariateNormal(conj.mean, conj.cov).sample((4, 2000)).numpy()}
    args = (conj.model, conj.X, conj.y)
    plain = compare_approximations({"shifted": conj.shifted_guide}, *args, reference=reference)
    table = compare_approximations(
        {"shifted": conj.shifted_guide}, *args, reference=reference, resample=True
    )
    row, plain_row = table.loc["shifted"], plain.loc["shifted"]
    assert bool(row["resampled"]) and not bool(plain_row["resampled"])
    assert row["khat"] < 0.7
    assert row["mean_err_max"] < 0.5 * plain_row["mean_err_max"]


def test_resampling_a_bad_guide_warns_that_it_cannot_be_trusted(conj):
    with pytest.warns(VIDiagnosticWarning, match="resampled draws cannot be trusted"):
        idata = to_arviz(conj.bad_guide, conj.model, conj.X, conj.y, num_draws=500, resample=True)
    assert _arviz.group_attrs(idata, "posterior")["psis_khat"] > 0.7
    with pytest.warns(VIDiagnosticWarning, match="cannot be trusted"):
        samples = sample_posterior(
            conj.bad_guide, conj.model, conj.X, conj.y, num_samples=500, resample=True
        )
    assert samples.khat > samples.khat_threshold


def test_sampling_without_replacement_follows_successive_sampling():
    """Gumbel top-k draws k of M as if one at a time, each proportional to what is left."""
    rng = np.random.default_rng(0)
    weights = np.array([0.5, 0.3, 0.2])
    reps = 20000
    first = np.array([_gumbel_top(np.log(weights), 1, rng)[0] for _ in range(reps)])
    counts = np.bincount(first, minlength=3)
    se = np.sqrt(reps * weights * (1 - weights))
    assert np.all(np.abs(counts - reps * weights) < 4 * se)
    # two of three: {0, 1} w.p. P(0 then 1) + P(1 then 0) = .5 * .3 / .5 + .3 * .5 / .7
    pairs = [frozenset(_gumbel_top(np.log(weights), 2, rng)) for _ in range(reps)]
    p01 = 0.5 * 0.3 / 0.5 + 0.3 * 0.5 / 0.7
    hits = sum(p == {0, 1} for p in pairs)
    assert abs(hits - reps * p01) < 4 * math.sqrt(reps * p01 * (1 - p01))
    # psis_resample uses it whenever R <= M
    picked = psis_resample(np.log(rng.random(100)), 40, rng=rng, warn=False)
    assert not picked.replace and np.unique(picked.indices).size == 40


def test_psis_resample_with_replacement_and_errors():
    rng = np.random.default_rng(1)
    log_ratios = rng.normal(size=50)
    result = psis_resample(log_ratios, 200, rng=rng, warn=False)
    assert isinstance(result, PSISResample)
    assert result.replace and result.indices.shape == (200,) and result.num_proposals == 50
    counts = np.bincount(result.indices, minlength=50)
    # stratified: a weight spanning R w strata is drawn R w times, give or take one at
    # either end of its span
    assert np.all(np.abs(counts - 200 * np.exp(result.log_weights)) < 2.0 + 1e-9)
    equal = psis_resample(np.zeros(10), 10, rng=rng, warn=False)
    assert sorted(equal.indices) == list(range(10)) and equal.is_ess == pytest.approx(10)
    with pytest.raises(ValueError, match="cannot draw 20 of 10 proposals without replacement"):
        psis_resample(np.zeros(10), 20, rng=rng, replace=False)
    with pytest.raises(ValueError, match="num_draws must be a positive int"):
        psis_resample(np.zeros(10), 0, rng=rng)


def test_resample_options_are_checked(conj):
    with pytest.raises(ValueError, match="num_proposals must be an int >= 2"):
        to_arviz(conj.shifted_guide, conj.model, conj.X, conj.y, resample=True, num_proposals=1)
    with pytest.raises(ValueError, match="resample must be False, True or 'psis'"):
        to_arviz(conj.shifted_guide, conj.model, conj.X, conj.y, resample="sir")
    with pytest.raises(ValueError, match="num_proposals.*only with resample"):
        to_arviz(conj.shifted_guide, conj.model, conj.X, conj.y, num_proposals=100)
