"""Tests of pyro_flowvi.fit: trace, progress bar, NaN guard, Ctrl-C, checkpoints, step_context."""

from __future__ import annotations

import contextlib
import io
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_flowvi.fit import FitResult, NonFiniteLossError, fit


@pytest.fixture
def data():
    return torch.randn(15) + 1.0


def model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def _params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def test_fit_returns_one_elbo_per_step_and_wall_time(data):
    guide = AutoNormal(model)
    result = fit(model, guide, data, num_steps=40, progress=False)
    assert isinstance(result, FitResult)
    assert result.elbo_trace.shape == (40,)
    assert np.all(np.isfinite(result.elbo_trace))
    assert result.num_steps == 40 and result.wall_time > 0
    assert not result.interrupted and result.resumed_from == 0
    assert result.smoothed_elbo(5) == pytest.approx(result.elbo_trace[-5:].mean())
    # the ELBO rises from its start value on this easy model
    assert result.elbo_trace[-10:].mean() > result.elbo_trace[:10].mean()


def test_fit_accepts_optim_loss_and_callable_loss(data):
    guide = AutoMultivariateNormal(model)
    result = fit(
        model,
        guide,
        data,
        num_steps=5,
        optim=pyro.optim.ClippedAdam({"lr": 0.01}),
        loss=Trace_ELBO(num_particles=2),
        progress=False,
    )
    assert result.elbo_trace.shape == (5,)
    pyro.clear_param_store()
    elbo = Trace_ELBO()
    result = fit(
        model,
        AutoNormal(model),
        data,
        num_steps=5,
        loss=lambda m, g, *a, **k: elbo.differentiable_loss(m, g, *a, **k),
        progress=False,
    )
    assert np.all(np.isfinite(result.elbo_trace))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": -1}, "num_steps must be an int >= 0, got -1"),
        ({"num_steps": 2.5}, "num_steps must be an int >= 0, got 2.5"),
        ({"num_steps": 3, "lr": 0.0}, "lr must be a positive number, got 0.0"),
        (
            {"num_steps": 3, "lr": 0.1, "optim": pyro.optim.Adam({"lr": 0.1})},
            "pass lr \\(got 0.1\\) or optim",
        ),
        ({"num_steps": 3, "checkpoint_every": 0}, "checkpoint_every must be an int >= 1, got 0"),
    ],
)
def test_fit_rejects_bad_arguments(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(model, AutoNormal(model), data, progress=False, **kwargs)


def test_checkpoint_resume_reproduces_uninterrupted_fit(data, tmp_path):
    pyro.set_rng_seed(1)
    full = fit(model, AutoNormal(model), data, num_steps=60, progress=False)
    full_params = _params()

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    path = tmp_path / "fit.pt"
    first = fit(
        model,
        AutoNormal(model),
        data,
        num_steps=25,
        checkpoint=path,
        checkpoint_every=10,
        progress=False,
    )
    assert first.num_steps == 25 and path.exists()

    # a new session: fresh guide, empty store, another seed; the checkpoint restores all of it
    pyro.clear_param_store()
    pyro.set_rng_seed(12345)
    resumed = fit(
        model,
        AutoNormal(model),
        data,
        num_steps=60,
        checkpoint=path,
        checkpoint_every=10,
        progress=False,
    )
    assert resumed.resumed_from == 25
    np.testing.assert_array_equal(resumed.elbo_trace, full.elbo_trace)
    for name, value in _params().items():
        torch.testing.assert_close(value, full_params[name], rtol=0, atol=0)
    assert resumed.wall_time >= first.wall_time


def test_checkpoint_from_another_model_is_rejected(data, tmp_path):
    path = tmp_path / "fit.pt"
    fit(model, AutoNormal(model), data, num_steps=3, checkpoint=path, progress=False)

    def other(y):
        nu = pyro.sample("nu", dist.Normal(0.0, 1.0))
        with pyro.plate("n", y.shape[0]):
            pyro.sample("y", dist.Normal(nu, 1.0), obs=y)

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="does not match this model and guide"):
        fit(other, AutoNormal(other), data, num_steps=5, checkpoint=path, progress=False)


def test_ctrl_c_stops_cleanly_keeps_parameters_and_resumes(data, tmp_path):
    pyro.set_rng_seed(3)
    full = fit(model, AutoNormal(model), data, num_steps=30, progress=False)

    calls = {"n": 0}

    def interrupted_model(y):
        calls["n"] += 1
        # call 1 builds the guide's prototype, call k + 2 runs step k: stop in step 16
        if calls["n"] == 18:
            raise KeyboardInterrupt
        model(y)

    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    path = tmp_path / "fit.pt"
    guide = AutoNormal(interrupted_model)
    result = fit(
        interrupted_model,
        guide,
        data,
        num_steps=30,
        checkpoint=path,
        checkpoint_every=100,
        progress=False,
    )
    assert result.interrupted
    assert result.num_steps == 16
    np.testing.assert_array_equal(result.elbo_trace, full.elbo_trace[:16])
    kept = _params()
    assert kept and all(torch.isfinite(v).all() for v in kept.values())
    assert all(p.grad is None for _, p in pyro.get_param_store().named_parameters())

    resumed = fit(model, guide, data, num_steps=30, checkpoint=path, progress=False)
    assert resumed.resumed_from == 16
    np.testing.assert_array_equal(resumed.elbo_trace, full.elbo_trace)


def barrier_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    # log-density -inf beyond mu = 1 (valid for Pyro's validation, fatal for the ELBO)
    pyro.factor("barrier", torch.where(mu > 1.0, -torch.inf, 0.0))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_nan_guard_names_the_site_and_the_step():
    y = torch.randn(20) + 5.0
    guide = AutoNormal(barrier_model)
    with pytest.raises(NonFiniteLossError) as info:
        fit(barrier_model, guide, y, num_steps=500, lr=0.1, progress=False)
    error = info.value
    assert error.site == "barrier" and error.kind == "model site"
    assert error.step > 0 and error.loss == float("inf")
    assert f"step {error.step}" in str(error) and "'barrier'" in str(error)
    # no update was applied at the failing step: every parameter is still finite
    assert all(torch.isfinite(v).all() for v in _params().values())


def test_nan_guard_names_a_non_finite_parameter():
    def param_model(y):
        loc = pyro.param("loc", torch.tensor(0.0))
        mu = pyro.sample("mu", dist.Normal(loc, 1.0))
        with pyro.plate("n", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.randn(5)
    guide = AutoNormal(param_model)
    fit(param_model, guide, y, num_steps=2, progress=False)
    with torch.no_grad():
        pyro.param("loc").fill_(float("nan"))
    with pyro.validation_enabled(False), pytest.raises(NonFiniteLossError) as info:
        fit(param_model, guide, y, num_steps=5, progress=False)
    assert info.value.site == "loc" and info.value.kind == "parameter"
    assert info.value.step == 0


class CountingGuide:
    """A hand-written guide with a step_context hook that records how it is used."""

    def __init__(self):
        self.entered = 0
        self.active = False
        self.calls_inside = 0
        self.calls = 0

    @contextlib.contextmanager
    def step_context(self):
        self.entered += 1
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def __call__(self, y):
        self.calls += 1
        self.calls_inside += self.active
        loc = pyro.param("mu_loc", torch.tensor(0.0))
        scale = pyro.param("mu_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample("mu", dist.Normal(loc, scale))
        pyro.sample("sigma", dist.LogNormal(0.0, 0.5))


def test_step_context_is_entered_around_every_step(data):
    guide = CountingGuide()
    fit(model, guide, data, num_steps=7, progress=False)
    assert guide.entered == 7
    assert guide.calls == guide.calls_inside == 7


def test_progress_bar_quiet_off_terminal_and_shown_on_one(data, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    fit(model, AutoNormal(model), data, num_steps=12, progress=True)
    assert stream.getvalue() == ""

    pytest.importorskip("tqdm")
    pyro.clear_param_store()
    monkeypatch.setattr(stream, "isatty", lambda: True, raising=False)
    fit(model, AutoNormal(model), data, num_steps=12, progress=True)
    shown = stream.getvalue()
    assert "12/12" in shown and "elbo=" in shown and "step/s" in shown

    pyro.clear_param_store()
    stream.seek(0)
    stream.truncate()
    fit(model, AutoNormal(model), data, num_steps=12, progress=False)
    assert stream.getvalue() == ""
