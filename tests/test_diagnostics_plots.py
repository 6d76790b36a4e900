"""The structure of every figure pyro_flowvi.diagnostics draws, without comparing images.

One test per plot function: a legend that names every source, the reference drawn after
(and above) the approximations, axis limits inside the robust quantiles of the draws (one
outlier or a diverged run does not set them), named coordinates against integer ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyro_flowvi.diagnostics import _arviz, plot_elbo, plot_marginals, plot_pair

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCHOOLS = ["Choate", "Deerfield", "Exeter"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _approximation(rng, shift=0.0, outliers=False, label="approximation"):
    mu = rng.normal(shift, 1.0, size=(1, 3000))
    if outliers:
        mu[0, :15] = 1e3  # 0.5% of the draws, far out
    theta = rng.normal(shift, 2.0, size=(1, 3000, 3))
    corr = np.zeros((1, 3000, 2, 2))
    corr[..., 0, 0] = corr[..., 1, 1] = 1.0  # an identity: constant components
    return _arviz.from_groups(
        {"posterior": {"mu": mu, "theta": theta, "corr": corr}},
        dims={"theta": ["school"]},
        coords={"school": SCHOOLS},
        attrs={"approximation": label},
    )


def _reference(rng):
    corr = np.zeros((2, 1000, 2, 2))
    corr[..., 0, 0] = corr[..., 1, 1] = 1.0
    return {
        "mu": rng.normal(0.3, 1.2, size=(2, 1000)),
        "theta": rng.normal(0.0, 2.5, size=(2, 1000, 3)),
        "corr": corr,
    }


def _robust_range(*samples):
    lows = [np.quantile(x, 0.005, method="higher") for x in samples]
    highs = [np.quantile(x, 0.995, method="lower") for x in samples]
    return min(lows), max(highs)


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_plot_marginals_structure():
    rng = np.random.default_rng(0)
    first = _approximation(rng, outliers=True)
    second = _approximation(rng, shift=1.0)
    reference = _reference(rng)
    fig = plot_marginals({"first": first, "second": second}, reference)
    # the legend names every source, the reference last
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["first", "second", "reference"]
    # constant components are not drawn, and the figure says so
    titles = [ax.get_title() for ax in _visible(fig)]
    assert titles == ["mu", "theta[Choate]", "theta[Deerfield]", "theta[Exeter]"]
    assert "corr[0,0] = 1" in fig._supxlabel.get_text()
    for ax in _visible(fig):
        lines = ax.get_lines()
        # the reference is drawn after the approximations, and above them
        assert [line.get_label() for line in lines] == ["first", "second", "reference"]
        assert lines[-1].get_zorder() > max(line.get_zorder() for line in lines[:-1])
    # x-limits: the robust range of all sources (5% padding), not the outliers at 1000
    mu_ax = _visible(fig)[0]
    lo, hi = _robust_range(
        _arviz.sample_values(first, "posterior", "mu").ravel(),
        _arviz.sample_values(second, "posterior", "mu").ravel(),
        reference["mu"].ravel(),
    )
    pad = 0.05 * (hi - lo)
    assert mu_ax.get_xlim() == pytest.approx((lo - pad, hi + pad))
    assert mu_ax.get_xlim()[1] < 10
    # named coordinates select panels; the integer reference is matched by position
    fig = plot_marginals(
        {"first": first}, reference, var_names=["theta"], coords={"school": ["Exeter"]}
    )
    (ax,) = _visible(fig)
    assert ax.get_title() == "theta[Exeter]"
    reference_curve = ax.get_lines()[-1].get_ydata()
    assert np.all(np.isfinite(reference_curve)) and reference_curve.max() > 0
    with pytest.raises(ValueError, match="more than max_panels=2"):
        plot_marginals({"first": first}, reference, max_panels=2)


def test_plot_pair_structure():
    rng = np.random.default_rng(1)
    approx = _approximation(rng, outliers=True, label="AutoIAFGuide")
    reference = _reference(rng)
    fig = plot_pair(approx, reference, var_names=["mu", "theta"], coords={"school": ["Deerfield"]})
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[0] == "AutoIAFGuide" and texts[1].startswith("reference")
    axes = np.array(fig.axes).reshape(2, 2)
    assert not axes[0, 1].get_visible()
    scatter_ax = axes[1, 0]
    assert scatter_ax.get_xlabel() == "mu" and scatter_ax.get_ylabel() == "theta[Deerfield]"
    (points,) = [c for c in scatter_ax.collections if c.get_label() == "AutoIAFGuide"]
    contours = [c for c in scatter_ax.collections if c.get_gid() == "reference"]
    assert contours and min(c.get_zorder() for c in contours) > points.get_zorder()
    # contours come after the points in drawing order too
    order = scatter_ax.collections
    assert order.index(contours[0]) > order.index(points)
    for ax in (axes[0, 0], axes[1, 1]):
        lines = ax.get_lines()
        assert lines[-1].get_label() == "reference"
        assert lines[-1].get_zorder() > lines[0].get_zorder()
    lo, hi = _robust_range(
        _arviz.sample_values(approx, "posterior", "mu").ravel(), reference["mu"].ravel()
    )
    pad = 0.05 * (hi - lo)
    assert scatter_ax.get_xlim() == pytest.approx((lo - pad, hi + pad))
    assert scatter_ax.get_xlim()[1] < 10
    with pytest.raises(ValueError, match="needs 2 to max_components=10 scalar components, got 1"):
        plot_pair(approx, var_names=["mu"])
    with pytest.raises(ValueError, match="got 4"):
        plot_pair(approx, var_names=["mu", "theta"], max_components=3)


def test_plot_elbo_structure():
    rng = np.random.default_rng(2)
    steps = np.arange(1000)
    early = -100.0 - 5e4 * np.exp(-steps / 10.0) + rng.normal(0, 0.5, 1000)
    late = -104.0 + rng.normal(0, 0.5, 1000)
    late[::97] = -1e5  # rare very low estimates
    fig = plot_elbo({"early": early, "late": late}, window=20)
    ax = fig.axes[0]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["early", "late"]
    lo, hi = ax.get_ylim()
    assert -110 < lo < -104 and -100 < hi < -96
    # each run: a faint line of the steps, then its running median on top
    lines = ax.get_lines()
    assert len(lines) == 4
    assert lines[1].get_zorder() > lines[0].get_zorder() and lines[1].get_alpha() is None
    median = lines[3].get_ydata()
    assert np.all(median > -106)  # the spikes do not pull the running median down
    # one unnamed run: no legend; user axes: the legend goes on them
    fig = plot_elbo(late)
    assert not fig.legends and fig.axes[0].get_legend() is None
    _, user_ax = plt.subplots()
    assert plot_elbo({"a": late, "b": early}, ax=user_ax) is user_ax.get_figure()
    assert user_ax.get_legend() is not None
    fig = plot_elbo({"early": early}, ylim=(-200.0, 0.0))
    assert fig.axes[0].get_ylim() == (-200.0, 0.0)
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        plot_elbo(early, window=0)
