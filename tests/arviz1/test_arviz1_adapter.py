"""The ArviZ adapter (and the reports built on it) with NumPy fixtures only: no torch, no Pyro.

``scripts/test_arviz1.sh`` runs this file in a Python 3.12 environment with ArviZ 1.x; the
main test suite runs it against ArviZ 0.x. Expected values were computed with ArviZ 0.23.4
(and agree with Pyro's ``psis_diagnostic`` procedure); ArviZ 1.x chooses a slightly different
number of tail draws, hence the tolerances. The inputs are deterministic quantile grids, not
random draws, so they are the same under every NumPy version.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.special import ndtri

DIAGNOSTICS = Path(__file__).resolve().parents[2] / "pyro_flowvi" / "diagnostics"

# computed with ArviZ 0.23.4 from the inputs below
EXPECTED = {
    "pareto_0.3": 0.3171292423101269,
    "pareto_0.8": 0.769033442241731,
    "elbo": -0.03653813484945044,
    "iw_elbo": 1.7308790235759375e-05,
    "khat": -1.6395805288486662,
    "is_ess": 1898.7029167655132,
    "elpd": -15.035971323502382,
    "p_loo": 0.04620216227584262,
    "pareto_k": [-0.405, -0.783, -1.270, -1.577, -1.631, -1.641, -1.638],
}


def _load():
    """Import the torch-free modules without pyro_flowvi/__init__ (which needs torch)."""
    if "_fvd_isolated" not in sys.modules:
        package = types.ModuleType("_fvd_isolated")
        package.__path__ = [str(DIAGNOSTICS)]
        sys.modules["_fvd_isolated"] = package
    adapter = importlib.import_module("_fvd_isolated._arviz")
    report = importlib.import_module("_fvd_isolated.report")
    plots = importlib.import_module("_fvd_isolated.plots")
    resample = importlib.import_module("_fvd_isolated.resample")
    return adapter, report, plots, resample


adapter, report, plots, resample = _load()
S = 2000
U = (np.arange(S) + 0.5) / S  # a deterministic quantile grid


def _vi_fixture():
    """q = N(0, 1) approximating p = N(0.2, 0.9), seven observations y_i ~ N(theta, 3)."""
    theta = ndtri(U)
    log_p = stats.norm.logpdf(theta, 0.2, 0.9)
    log_q = stats.norm.logpdf(theta, 0.0, 1.0)
    y = np.linspace(-1.5, 2.0, 7)
    loglik = stats.norm.logpdf(y[None, :], theta[:, None], 3.0)
    idata = adapter.from_groups(
        {
            "posterior": {"theta": theta[None]},
            "sample_stats": {
                "lp": log_p[None],
                "log_q": log_q[None],
                "log_weight": (log_p - log_q)[None],
            },
            "log_likelihood": {"y": loglik[None]},
            "observed_data": {"y": y},
        },
        dims={"y": ["obs"]},
        attrs={"approximation": "fixture"},
        extra_groups={
            "vi_fit": ({"elbo": (["step"], np.linspace(-5.0, -1.0, 30))}, {"wall_time": 2.5})
        },
    )
    return idata, log_p, log_q, loglik


def test_from_groups_builds_every_group():
    idata, _, _, loglik = _vi_fixture()
    expected_type = "DataTree" if adapter.arviz_major() >= 1 else "InferenceData"
    assert type(idata).__name__ == expected_type
    assert set(adapter.group_names(idata)) == {
        "posterior",
        "sample_stats",
        "log_likelihood",
        "observed_data",
        "vi_fit",
    }
    assert adapter.sample_values(idata, "posterior", "theta").shape == (1, S)
    np.testing.assert_allclose(adapter.sample_values(idata, "log_likelihood", "y")[0], loglik)
    assert adapter.var_dims(idata, "log_likelihood", "y") == ("obs",)
    assert adapter.var_dims(idata, "observed_data", "y") == ("obs",)
    assert adapter.sample_values(idata, "observed_data", "y").shape == (7,)
    assert adapter.group_attrs(idata, "posterior")["approximation"] == "fixture"
    assert adapter.group_attrs(idata, "vi_fit")["wall_time"] == 2.5
    assert adapter.sample_values(idata, "vi_fit", "elbo").shape == (30,)
    assert adapter.has_group(idata, "vi_fit") and not adapter.has_group(idata, "prior")
    with pytest.raises(KeyError, match="no 'prior' group"):
        adapter.dataset(idata, "prior")
    with pytest.raises(KeyError, match="has no variable 'nope'"):
        adapter.sample_values(idata, "posterior", "nope")


@pytest.mark.parametrize("true_k", [0.3, 0.8])
def test_psislw_fits_the_right_tail(true_k):
    log_ratios = -true_k * np.log1p(-U)  # exact Pareto(1 / k) quantiles
    lw, khat = adapter.psislw(log_ratios)
    assert float(khat) == pytest.approx(EXPECTED[f"pareto_{true_k}"], abs=0.01)
    assert abs(float(khat) - true_k) < 0.05
    np.testing.assert_allclose(np.exp(lw).sum(), 1.0)
    assert np.all(np.diff(lw) >= -1e-12)  # smoothing keeps the order of the ratios
    # the negated ratios have a bounded right tail: ArviZ 1.x's psislw negates its input,
    # so passing the ratios unchanged there would report this k-hat instead
    _, khat_left = adapter.psislw(-log_ratios)
    assert float(khat_left) < 0.2


def test_psislw_of_equal_ratios_is_uniform():
    lw, khat = adapter.psislw(np.full((2, 50), 3.0))
    assert np.all(khat == -np.inf)
    np.testing.assert_allclose(lw, -math.log(50))


def test_vi_diagnostics_agree_across_arviz_versions():
    idata, log_p, log_q, _ = _vi_fixture()
    result = report.vi_diagnostics(idata)
    assert result.elbo == pytest.approx(EXPECTED["elbo"], rel=1e-12)
    assert result.iw_elbo == pytest.approx(EXPECTED["iw_elbo"], abs=1e-12)
    assert result.khat == pytest.approx(EXPECTED["khat"], abs=0.02)
    assert result.is_ess == pytest.approx(EXPECTED["is_ess"], rel=1e-4)
    assert result.verdict == "good"
    assert result.fit_time == 2.5 and result.fit_elbo == pytest.approx(-1.0 - 4 / 29 * 1)


def test_vi_loo_agrees_with_arviz():
    idata, log_p, log_q, loglik = _vi_fixture()
    loo = report.vi_loo(idata)
    assert loo.elpd == pytest.approx(EXPECTED["elpd"], abs=1e-4)
    assert loo.p_loo == pytest.approx(EXPECTED["p_loo"], abs=1e-4)
    np.testing.assert_allclose(loo.pareto_k, EXPECTED["pareto_k"], atol=0.03)
    if adapter.arviz_major() >= 1:
        az = adapter.import_arviz()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = az.loo_approximate_posterior(
                idata, log_p[None], log_q[None], pointwise=True
            )
        assert loo.elpd == pytest.approx(expected.elpd, rel=1e-10)
        assert loo.p_loo == pytest.approx(expected.p, rel=1e-8)
        np.testing.assert_allclose(loo.pareto_k, expected.pareto_k.values, rtol=1e-10)


def test_plots_of_arviz_objects(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idata, _, _, _ = _vi_fixture()
    other = adapter.from_groups({"posterior": {"theta": ndtri(U)[None] * 0.5 + 0.1}})
    named = adapter.from_groups(
        {"posterior": {"x": ndtri(U)[None], "z": ndtri(U[::-1])[None, :, None] + [[0.0, 1.0]]}},
        dims={"z": ["school"]},
        coords={"school": ["a", "b"]},
    )
    reference = {"x": ndtri(U)[None], "z": ndtri(U)[None, :, None] + np.zeros((1, 1, 2))}
    try:
        fig = plots.plot_marginals({"a": idata, "b": other}, {"theta": ndtri(U)[None]})
        fig.savefig(tmp_path / "marginals.png")
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b", "reference"]
        fig = plots.plot_pair(named, reference, coords={"school": ["b"]})
        fig.savefig(tmp_path / "pair.png")
        assert sum(ax.get_visible() for ax in fig.axes) == 3
        assert fig.axes[2].get_xlabel() == "x" and fig.axes[3].get_xlabel() == "z[b]"
        fig = plots.plot_elbo(idata)
        fig.savefig(tmp_path / "elbo.png")
        assert len(fig.axes[0].get_lines()) == 2
    finally:
        plt.close("all")


def test_psis_resample_on_either_arviz():
    _, log_p, log_q, _ = _vi_fixture()
    rng = np.random.default_rng(0)
    picked = resample.psis_resample(log_p - log_q, 500, rng=rng)
    assert picked.khat == pytest.approx(EXPECTED["khat"], abs=0.02)
    assert np.unique(picked.indices).size == 500 and not picked.replace
    np.testing.assert_allclose(np.exp(picked.log_weights).sum(), 1.0)
    assert picked.is_ess == pytest.approx(EXPECTED["is_ess"], rel=1e-4)
