"""The six posteriordb models: loading, shapes, and log densities against independent code."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from scipy import stats

import pyro_flowvi.benchmarks as benchmarks
from pyro_flowvi.benchmarks import NAMES, load, reference_draws, reference_to_arviz
from pyro_flowvi.benchmarks.models import garch11_variance, rowdot
from pyro_flowvi.diagnostics import _arviz, to_arviz

SHAPES = {
    "eight_schools_centered": {"theta": (8,), "mu": (), "tau": ()},
    "kilpisjarvi": {"alpha": (), "beta": (), "sigma": ()},
    "diamonds": {"b": (24,), "Intercept": (), "sigma": ()},
    "gp_pois_regr": {"rho": (), "alpha": (), "f": (11,)},
    "garch11": {"mu": (), "alpha0": (), "alpha1": (), "beta1": ()},
    "arK": {"alpha": (), "beta": (5,), "sigma": ()},
}
POSTERIORDB = {
    "eight_schools_centered": "eight_schools-eight_schools_centered",
    "kilpisjarvi": "kilpisjarvi_mod-kilpisjarvi",
    "diamonds": "diamonds-diamonds",
    "gp_pois_regr": "gp_pois_regr-gp_pois_regr",
    "garch11": "garch-garch11",
    "arK": "arK-arK",
}


@pytest.fixture(scope="module")
def loaded():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield {name: load(name) for name in NAMES}
    finally:
        torch.set_default_dtype(dtype)


def _draw(bench, chain, index):
    return {k: v[chain, index] for k, v in bench.reference.items()}


def _gp_cholesky(x, rho, alpha):
    d2 = (x[:, None] - x[None, :]) ** 2
    return np.linalg.cholesky(alpha**2 * np.exp(-d2 / (2 * rho**2)) + 1e-10 * np.eye(x.size))


def _latents(bench, draw):
    """Map a reference draw (Stan's parameters) to the Pyro model's latent sites."""
    values = dict(draw)
    if bench.name == "gp_pois_regr":
        x = np.asarray(bench.data["x"], dtype=float)
        L = _gp_cholesky(x, draw["rho"], draw["alpha"])
        values["f_tilde"] = np.linalg.solve(L, draw["f"])
        del values["f"]
    if bench.name == "garch11":
        values["beta1_unit"] = draw["beta1"] / (1.0 - draw["alpha1"])
        del values["beta1"]
    return {k: torch.as_tensor(np.asarray(v, dtype=float)) for k, v in values.items()}


def _independent_log_joint(bench, draw):
    """log p(latents, data) of the Pyro parameterization, written with scipy and loops."""
    data, p = bench.data, draw
    if bench.name == "eight_schools_centered":
        y, sigma = np.array(data["y"], float), np.array(data["sigma"], float)
        return (
            stats.norm.logpdf(p["mu"], 0, 5)
            + stats.halfcauchy.logpdf(p["tau"], scale=5)
            + stats.norm.logpdf(p["theta"], p["mu"], p["tau"]).sum()
            + stats.norm.logpdf(y, p["theta"], sigma).sum()
        )
    if bench.name == "kilpisjarvi":
        x, y = np.array(data["x"], float), np.array(data["y"], float)
        return (
            stats.norm.logpdf(p["alpha"], data["pmualpha"], data["psalpha"])
            + stats.norm.logpdf(p["beta"], data["pmubeta"], data["psbeta"])
            + stats.norm.logpdf(y, p["alpha"] + p["beta"] * x, p["sigma"]).sum()
        )
    if bench.name == "diamonds":
        X = np.array(data["X"], float)[:, 1:]
        Xc = X - X.mean(0)
        Y = np.array(data["Y"], float)
        return (
            stats.norm.logpdf(p["b"], 0, 1).sum()
            + stats.t.logpdf(p["Intercept"], 3, 8, 10)
            + math.log(2)
            + stats.t.logpdf(p["sigma"], 3, 0, 10)
            + stats.norm.logpdf(Y, p["Intercept"] + Xc @ p["b"], p["sigma"]).sum()
        )
    if bench.name == "gp_pois_regr":
        x, k = np.array(data["x"], float), np.array(data["k"], float)
        f_tilde = np.linalg.solve(_gp_cholesky(x, p["rho"], p["alpha"]), p["f"])
        return (
            stats.gamma.logpdf(p["rho"], 25, scale=1 / 4)
            + stats.halfnorm.logpdf(p["alpha"], scale=2)
            + stats.norm.logpdf(f_tilde).sum()
            + stats.poisson.logpmf(k, np.exp(p["f"])).sum()
        )
    if bench.name == "garch11":
        y = np.array(data["y"], float)
        sigma = [data["sigma1"]]
        for t in range(1, y.size):
            s2 = p["alpha0"] + p["alpha1"] * (y[t - 1] - p["mu"]) ** 2
            sigma.append(math.sqrt(s2 + p["beta1"] * sigma[-1] ** 2))
        # flat priors; beta1 = (1 - alpha1) * beta1_unit adds log(1 - alpha1)
        return math.log1p(-p["alpha1"]) + stats.norm.logpdf(y, p["mu"], sigma).sum()
    if bench.name == "arK":
        y, K = np.array(data["y"], float), int(data["K"])
        total = (
            stats.norm.logpdf(p["alpha"], 0, 10)
            + stats.norm.logpdf(p["beta"], 0, 10).sum()
            + stats.halfcauchy.logpdf(p["sigma"], scale=2.5)
        )
        for t in range(K, y.size):
            mean = p["alpha"] + sum(p["beta"][k] * y[t - k - 1] for k in range(K))
            total += stats.norm.logpdf(y[t], mean, p["sigma"])
        return total
    raise AssertionError(bench.name)


def _pyro_log_joint(bench, latents):
    model = poutine.condition(bench.model, data=latents)
    trace = poutine.trace(model).get_trace(*bench.args)
    return trace, float(trace.log_prob_sum())


@pytest.mark.parametrize("name", NAMES)
def test_reference_draws_have_the_documented_structure(loaded, name):
    bench = loaded[name]
    assert bench.name == name and bench.posterior_name == POSTERIORDB[name]
    assert {k: v.shape for k, v in bench.reference.items()} == {
        k: (10, 1000, *shape) for k, shape in SHAPES[name].items()
    }
    assert bench.dim == sum(int(np.prod(s)) for s in SHAPES[name].values())
    assert all(np.all(np.isfinite(v)) for v in bench.reference.values())


@pytest.mark.parametrize("name", NAMES)
def test_log_joint_matches_independent_code_at_reference_draws(loaded, name):
    bench = loaded[name]
    mean = {k: v.mean(axis=(0, 1)) for k, v in bench.reference.items()}
    for draw in (mean, _draw(bench, 0, 0), _draw(bench, 7, 500)):
        trace, log_joint = _pyro_log_joint(bench, _latents(bench, draw))
        assert math.isfinite(log_joint)
        assert log_joint == pytest.approx(_independent_log_joint(bench, draw), rel=1e-9)
    # every reference variable is a site of the model with the reference's shape
    for var, shape in SHAPES[name].items():
        assert tuple(trace.nodes[var]["value"].shape) == shape


@pytest.mark.parametrize("name", NAMES)
def test_models_vectorize_over_draws(loaded, name):
    bench = loaded[name]
    guide = AutoNormal(bench.model, init_loc_fn=bench.init_loc_fn, init_scale=0.01)
    idata = to_arviz(guide, bench.model, *bench.args, num_draws=8, parallel=True)
    lp = _arviz.sample_values(idata, "sample_stats", "lp")[0]
    posterior = {n: _arviz.sample_values(idata, "posterior", n)[0] for n in SHAPES[name]}
    for var, shape in SHAPES[name].items():
        assert posterior[var].shape == (8, *shape)
    for s in range(8):
        draw = {k: v[s] for k, v in posterior.items()}
        _, expected = _pyro_log_joint(bench, _latents(bench, draw))
        assert lp[s] == pytest.approx(expected, rel=1e-9)


def test_garch_variance_matches_the_recursion():
    torch.manual_seed(0)
    y = torch.randn(50) + 5.0
    mu, alpha0, alpha1, beta1 = (torch.rand(3, 1) for _ in range(4))
    batched = garch11_variance(y, 0.5, mu, alpha0, alpha1, beta1)
    assert batched.shape == (3, 50)
    for i in range(3):
        s2 = [torch.tensor(0.25)]
        for t in range(1, 50):
            s2.append(
                alpha0[i, 0] + alpha1[i, 0] * (y[t - 1] - mu[i, 0]) ** 2 + beta1[i, 0] * s2[-1]
            )
        torch.testing.assert_close(batched[i], torch.stack(s2))
    single = garch11_variance(y, 0.5, mu[0, 0], alpha0[0, 0], alpha1[0, 0], beta1[0, 0])
    torch.testing.assert_close(single, batched[0])


def test_rowdot_keeps_the_data_plate_last():
    X = torch.randn(6, 3)
    b = torch.randn(3)
    torch.testing.assert_close(rowdot(X, b), X @ b)
    batched = torch.randn(4, 1, 3)
    out = rowdot(X, batched)
    assert out.shape == (4, 6)
    torch.testing.assert_close(out[2], X @ batched[2, 0])


@pytest.mark.parametrize("name", ["garch11", "kilpisjarvi"])
def test_flat_priors_initialize_with_the_provided_strategy(loaded, name):
    bench = loaded[name]
    guide = AutoNormal(bench.model, init_loc_fn=bench.init_loc_fn)
    values = guide(*bench.args)
    assert all(torch.isfinite(v).all() for v in values.values())
    with pytest.raises(NotImplementedError, match="does not support sampling"):
        AutoNormal(bench.model)(*bench.args)


def test_load_accepts_posteriordb_names_and_a_data_dir(loaded):
    data_dir = Path(benchmarks.__file__).parent / "data"
    bench = load("garch-garch11", data_dir=data_dir)
    assert bench.name == "garch11"
    np.testing.assert_array_equal(bench.reference["mu"], loaded["garch11"].reference["mu"])
    assert (data_dir / "LICENCE.md").is_file()
    with pytest.raises(ValueError, match="unknown reference posterior 'nope'"):
        load("nope")
    with pytest.raises(FileNotFoundError, match="data-garch.json.zip"):
        load("garch11", data_dir=data_dir / "missing")


def test_reference_draws_parses_stan_indices():
    chains = [
        {
            "a": [1.0, 2.0],
            "L[1,1]": [1.0, 1.0],
            "L[2,1]": [2.0, 2.0],
            "L[1,2]": [3.0, 3.0],
            "L[2,2]": [4.0, 4.0],
        },
    ] * 3
    draws = reference_draws(chains)
    assert draws["a"].shape == (3, 2) and draws["L"].shape == (3, 2, 2, 2)
    np.testing.assert_array_equal(draws["L"][0, 0], [[1.0, 3.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="'v' has missing indices"):
        reference_draws([{"v[1]": [0.0], "v[3]": [0.0]}])


def test_reference_to_arviz(loaded):
    idata = reference_to_arviz(loaded["arK"])
    assert _arviz.var_names(idata, "posterior") == ["alpha", "beta", "sigma"]
    assert _arviz.sample_values(idata, "posterior", "beta").shape == (10, 1000, 5)
    plain = reference_to_arviz({"x": np.zeros((2, 3))})
    assert _arviz.sample_values(plain, "posterior", "x").shape == (2, 3)


def test_all_names_are_exported():
    for name in benchmarks.__all__:
        assert hasattr(benchmarks, name), name
    pyro.clear_param_store()
