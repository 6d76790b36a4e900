"""Rough edges of pyro_flowvi.diagnostics a new user hit (issue 13): each test failed before.

Mini-batch guides, loops that used to be silent, LKJ-Cholesky sites, named coordinates,
unknown keywords, wrong argument types, too few draws and the noise of k-hat.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_flowvi.diagnostics import (
    VectorizationWarning,
    _arviz,
    compare_approximations,
    khat_verdict,
    plot_elbo,
    plot_marginals,
    plot_pair,
    to_arviz,
    vi_diagnostics,
    vi_loo,
)
from pyro_flowvi.fit import fit


def local_model(y, batch_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("data", y.shape[0], subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])


def test_to_arviz_after_minibatch_training_says_the_guide_froze_the_subsample():
    y = torch.randn(50)
    guide = AutoNormal(local_model)
    fit(local_model, guide, y, 10, num_steps=3, progress=False)
    # the user passes the full data set; the guide still subsamples to its first mini-batch
    with pytest.raises(ValueError, match="the guide subsamples plate 'data' to 10 of 50") as info:
        to_arviz(guide, local_model, y, num_draws=5)
    message = str(info.value)
    assert "create_plates" in message and "pass the full data set" not in message

    # the fix the message names: plates that follow the model's arguments
    def create_plates(y, batch_size=None):
        return pyro.plate("data", y.shape[0], subsample_size=batch_size)

    pyro.clear_param_store()
    guide = AutoNormal(local_model, create_plates=create_plates)
    fit(local_model, guide, y, 10, num_steps=3, progress=False)
    idata = to_arviz(guide, local_model, y, num_draws=5)
    assert _arviz.sample_values(idata, "posterior", "z").shape == (1, 5, 50)


def test_to_arviz_says_when_the_model_itself_subsamples():
    y = torch.randn(50)

    def guide(y, batch_size=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0], subsample_size=batch_size):
            pyro.sample("z", dist.Normal(mu, 1.0))

    with pytest.raises(ValueError, match="the model subsamples plate 'data' to 10 of 50"):
        to_arviz(guide, local_model, y, 10, num_draws=5)


def test_falling_back_to_a_loop_warns_with_the_reason():
    y = torch.tensor([1.0, 2.0])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu, 1.0).expand([2]).to_event(1), obs=y)

    def scalar_guide(y):
        loc = float(pyro.param("loc", torch.tensor(0.0)))  # a Python float: one draw at a time
        mu = pyro.sample("mu", dist.Normal(loc, 1.0))
        if mu.numel() > 1:
            raise RuntimeError("this guide draws one value at a time")

    with pytest.warns(VectorizationWarning, match="one at a time.*draws one value at a time"):
        idata = to_arviz(scalar_guide, model, y, num_draws=4)
    assert _arviz.sample_values(idata, "posterior", "mu").shape == (1, 4)


def lkj_model(y):
    corr = pyro.sample("L", dist.LKJCholesky(3, 2.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(3), scale_tril=corr), obs=y)


def test_compare_approximations_skips_structurally_constant_components():
    y = torch.randn(30, 3)
    guide = AutoNormal(lkj_model)
    guide(y)
    reference = {"L": dist.LKJCholesky(3, 2.0).sample((2, 500)).numpy()}
    table = compare_approximations(
        {"normal": guide}, lkj_model, y, reference=reference, num_draws=300, per_parameter=True
    )
    skipped = table.attrs["skipped"]
    assert skipped == {"L[0,0]": 1.0, "L[0,1]": 0.0, "L[0,2]": 0.0, "L[1,2]": 0.0}
    row = table.loc["normal"]
    assert np.isfinite(row["mean_err_max"]) and np.isfinite(row["wasserstein"])
    assert "mean_err[L[1,0]]" in table.columns and "mean_err[L[0,0]]" not in table.columns
    assert row["num_params"] == 5

    # an approximation that varies where the reference is constant is refused by name
    moved = {"L": reference["L"] + np.random.default_rng(0).normal(0, 0.1, (2, 500, 3, 3))}
    with pytest.raises(ValueError, match=r"'moved'.*L\[0,0\].*constant"):
        compare_approximations(
            {"moved": _arviz.from_groups({"posterior": moved, "sample_stats": _weights(1000)})},
            reference=reference,
        )


def _weights(num_draws):
    rng = np.random.default_rng(1)
    return {"log_weight": rng.normal(0.0, 0.1, (1, num_draws))}


@pytest.fixture
def named():
    """An approximation with school names as coordinates, a reference with integers."""
    rng = np.random.default_rng(2)
    schools = ["Choate", "Deerfield", "Exeter"]
    approx = _arviz.from_groups(
        {
            "posterior": {
                "tau": rng.gamma(2.0, size=(1, 400)),
                "theta": rng.normal(size=(1, 400, 3)),
            },
            "sample_stats": _weights(400),
        },
        dims={"theta": ["school"]},
        coords={"school": schools},
    )
    reference = {"tau": rng.gamma(2.0, size=(2, 300)), "theta": rng.normal(size=(2, 300, 3))}
    return approx, reference


def test_plots_align_named_coordinates_with_an_integer_reference(named):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    approx, reference = named
    try:
        fig = plot_marginals({"approx": approx}, reference, var_names=["theta"])
        titles = sorted(ax.get_title() for ax in fig.axes if ax.get_visible())
        assert titles == ["theta[Choate]", "theta[Deerfield]", "theta[Exeter]"]
        for ax in fig.axes:
            labels = [line.get_label() for line in ax.get_lines()]
            assert labels == ["approx", "reference"]
        fig = plot_pair(
            approx, reference, var_names=["tau", "theta"], coords={"school": ["Exeter"]}
        )
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert len(visible) == 3
        with pytest.raises(ValueError, match=r"'school'.*'Andover'.*Choate"):
            plot_pair(approx, reference, var_names=["theta"], coords={"school": ["Andover"]})
    finally:
        plt.close("all")


def test_plots_refuse_a_reference_with_other_names_for_the_same_coordinates(named):
    pytest.importorskip("matplotlib")
    approx, reference = named
    other = _arviz.from_groups(
        {"posterior": reference}, dims={"theta": ["school"]}, coords={"school": ["x", "y", "z"]}
    )
    with pytest.raises(ValueError, match="'school'.*'Choate'.*'x'"):
        plot_marginals({"approx": approx}, other, var_names=["theta"])


def test_unknown_keywords_are_refused_before_drawing():
    y = torch.randn(5)
    guide = AutoNormal(local_model)
    guide(y)
    with pytest.raises(TypeError, match="'num_samples'.*did you mean 'num_draws'"):
        to_arviz(guide, local_model, y, num_samples=500)
    with pytest.raises(TypeError, match="'num_samples'.*local_model\\(y, batch_size=None\\)"):
        compare_approximations({"normal": guide}, local_model, y, num_samples=500)


def test_reports_say_what_to_pass_instead_of_a_guide():
    y = torch.randn(5)
    guide = AutoNormal(local_model)
    guide(y)
    for function in (vi_diagnostics, vi_loo):
        with pytest.raises(TypeError, match="ArviZ object.*got AutoNormal.*to_arviz"):
            function(guide)
    with pytest.raises(TypeError, match="ArviZ object.*got dict"):
        plot_pair({"mu": np.zeros((1, 10))})


def test_fewer_than_ten_draws_are_too_few_draws():
    idata = _arviz.from_groups(
        {"sample_stats": {"log_weight": np.array([[0.0, 5.0, -3.0, 9.0, 1.0, 0.5]])}}
    )
    report = vi_diagnostics(idata, warn=False)
    assert report.verdict == "too few draws"
    assert "6 draws" in report.message
    assert khat_verdict(1.5, 9)[0] == "too few draws"


def test_khat_interval_is_honest_about_its_noise():
    """The reported interval's width matches the spread of k-hat across independent draws."""
    rng = np.random.default_rng(3)
    num_sets, num_draws, true_k = 40, 1000, 0.6
    khats, widths, covered = [], [], 0
    for _ in range(num_sets):
        log_weight = np.log(rng.pareto(1.0 / true_k, size=num_draws) + 1.0)
        idata = _arviz.from_groups({"sample_stats": {"log_weight": log_weight[None]}})
        report = vi_diagnostics(idata, warn=False)
        lo, hi = report.khat_interval
        assert lo <= report.khat <= hi
        khats.append(report.khat)
        widths.append(hi - lo)
        covered += lo <= true_k <= hi
    spread = np.std(khats, ddof=1)
    # a 90% interval of a roughly normal estimate is 3.29 sd wide
    assert 0.6 * 3.29 * spread < np.mean(widths) < 1.7 * 3.29 * spread
    # coverage of a 90% interval over 40 sets: binomial sd 1.9 sets
    assert covered >= 0.9 * num_sets - 3 * math.sqrt(num_sets * 0.09)


def test_an_uncertain_verdict_says_so():
    rng = np.random.default_rng(4)
    log_weight = np.log(rng.pareto(1.0 / 0.7, size=(1, 1000)) + 1.0)
    idata = _arviz.from_groups({"sample_stats": {"log_weight": log_weight}})
    report = vi_diagnostics(idata, warn=False)
    lo, hi = report.khat_interval
    assert lo < 0.7 < hi and report.uncertain
    assert "uncertain" in report.message and "uncertain" in str(report)
    certain = _arviz.from_groups(
        {"sample_stats": {"log_weight": rng.normal(0.0, 0.1, size=(1, 4000))}}
    )
    report = vi_diagnostics(certain, warn=False)
    assert report.verdict == "good" and not report.uncertain
    assert "uncertain" not in report.message


def _zorders(ax, label):
    artists = list(ax.get_lines()) + list(ax.collections)
    return [a.get_zorder() for a in artists if a.get_label() == label or a.get_gid() == label]


def test_plot_pair_draws_the_reference_over_many_draws_with_a_legend():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(5)
    approx = _arviz.from_groups(
        {"posterior": {"x": rng.normal(size=(1, 4000)), "y": rng.normal(size=(1, 4000))}}
    )
    reference = {"x": rng.normal(size=(1, 2000)), "y": rng.normal(size=(1, 2000))}
    try:
        fig = plot_pair(approx, reference)
        assert fig.legends, "no legend"
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert texts[0] == "approximation" and texts[1].startswith("reference")
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            over = _zorders(ax, "reference")
            under = _zorders(ax, "approximation")
            assert over and under and min(over) > max(under)
    finally:
        plt.close("all")


def test_plot_elbo_scales_to_the_settled_runs_not_the_worst():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(6)
    steps = np.arange(2000)
    good = -100.0 - 1e5 * np.exp(-steps / 20.0) + rng.normal(0, 1.0, 2000)
    spiky = -110.0 + rng.normal(0, 1.0, 2000)
    spiky[rng.choice(2000, 20, replace=False)] = -1e6
    diverged = np.where(steps < 1000, -120.0, -1e7) + rng.normal(0, 1.0, 2000)
    try:
        fig = plot_elbo({"good": good, "spiky": spiky, "diverged": diverged})
        lo, hi = fig.axes[0].get_ylim()
        assert -160 < lo < -110 and -100 < hi < -90
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels[:2] == ["good", "spiky"]
        assert labels[2].startswith("diverged") and "below" in labels[2]
    finally:
        plt.close("all")


def test_plot_elbo_does_not_hide_most_runs_below_one_run_far_above():
    # the quickstart's funnel: seven guides settle near -2; Pyro's Sylvester guide reports an
    # impossible ELBO near +14 (above log Z = 0). The axis must show the seven, not only it.
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(7)
    runs = {f"guide {i}": -2.0 + 0.1 * i + rng.normal(0, 0.5, 1500) for i in range(7)}
    runs["impossible"] = 14.0 + rng.normal(0, 1.0, 1500)
    try:
        fig = plot_elbo(runs)
        lo, hi = fig.axes[0].get_ylim()
        assert lo < -2.0 and hi > 14.0
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels == list(runs)
    finally:
        plt.close("all")
