"""Tests of pyro_flowvi.fit: trace, progress bar, NaN guard, Ctrl-C, checkpoints, step_context."""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import pickle
import signal
import sys
import threading
import types
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.nn import PyroModule, PyroParam
from pyro.optim.clipped_adam import ClippedAdam

from pyro_flowvi.fit import (
    CheckpointError,
    DivergenceRule,
    DivergenceWarning,
    FitResult,
    NonFiniteLossError,
    fit,
)

# the module (pyro_flowvi.fit is also the name of the function the package exports)
fit_module = importlib.import_module("pyro_flowvi.fit")


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
    full = fit(model, AutoNormal(model), data, num_steps=60, final_lr=1e-2, progress=False)
    full_params = _params()

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    path = tmp_path / "fit.pt"
    first = fit(
        model,
        AutoNormal(model),
        data,
        num_steps=25,
        final_lr=1e-2,
        checkpoint=path,
        checkpoint_every=10,
        progress=False,
    )
    assert first.num_steps == 25 and path.exists()

    # a constant rate (final_lr = lr): a longer second call is the same fit continued
    # a new session: fresh guide, empty store, another seed; the checkpoint restores all of it
    pyro.clear_param_store()
    pyro.set_rng_seed(12345)
    resumed = fit(
        model,
        AutoNormal(model),
        data,
        num_steps=60,
        final_lr=1e-2,
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
        # call 1 builds the guide's prototype, call 2 is fit's first run of the model, call
        # k + 3 runs step k: stop in step 16
        if calls["n"] == 19:
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
    # once for fit's first run of guide and model (it creates the parameters), once per step
    assert guide.entered == 8
    assert guide.calls == guide.calls_inside == 8


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


# --- fit does not depend on hidden state -------------------------------------------------


def test_trace_does_not_depend_on_whether_the_guide_was_built_before(data):
    pyro.set_rng_seed(4)
    fresh = fit(model, AutoNormal(model), data, num_steps=20, progress=False)

    pyro.clear_param_store()
    guide = AutoNormal(model)
    guide(data)  # builds the prototype and draws a sample: other random numbers consumed
    pyro.set_rng_seed(4)
    built = fit(model, guide, data, num_steps=20, progress=False)
    np.testing.assert_array_equal(built.elbo_trace, fresh.elbo_trace)


def test_fit_does_not_depend_on_the_callers_grad_mode(data):
    pyro.set_rng_seed(4)
    plain = fit(model, AutoNormal(model), data, num_steps=10, progress=False)
    pyro.clear_param_store()
    pyro.set_rng_seed(4)
    with torch.no_grad():
        under_no_grad = fit(model, AutoNormal(model), data, num_steps=10, progress=False)
        assert not torch.is_grad_enabled()
    np.testing.assert_array_equal(under_no_grad.elbo_trace, plain.elbo_trace)


def test_checkpoint_holds_only_this_fits_parameters(data, tmp_path):
    pyro.param("unrelated", torch.ones(3))  # another fit's parameter in the global store
    path = tmp_path / "fit.pt"
    fit(model, AutoNormal(model), data, num_steps=5, checkpoint=path, progress=False)
    saved = torch.load(path, weights_only=True)
    assert "unrelated" not in saved["params"]

    pyro.clear_param_store()
    resumed = fit(model, AutoNormal(model), data, num_steps=8, checkpoint=path, progress=False)
    assert resumed.resumed_from == 5 and "unrelated" not in pyro.get_param_store()


# --- resume rebuilds the same guide, or refuses ------------------------------------------


def regression(x, y):
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    with pyro.plate("n", x.shape[0]):
        # broadcasts over a leading particle dimension, unlike x @ w
        pyro.sample("y", dist.Normal((x * w.unsqueeze(-2)).sum(-1), 0.5), obs=y)


def test_resume_of_a_flow_guide_with_laplace_start_reproduces_the_fit(tmp_path):
    from pyro_flowvi import AutoIAFGuide

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen)
    y = x @ torch.linspace(-1.0, 1.0, 5) + 0.5 * torch.randn(40, generator=gen)
    pyro.set_rng_seed(2)
    full = fit(
        regression, AutoIAFGuide(regression), x, y, num_steps=30, final_lr=1e-2, progress=False
    )
    full_params = _params()

    pyro.clear_param_store()
    pyro.set_rng_seed(2)
    path = tmp_path / "fit.pt"
    fit(
        regression,
        AutoIAFGuide(regression),
        x,
        y,
        num_steps=15,
        final_lr=1e-2,
        checkpoint=path,
        progress=False,
    )
    pyro.clear_param_store()
    pyro.set_rng_seed(99)
    # the guide is built with gradients on, as in a fresh fit: the same start, same buffers
    resumed = fit(
        regression,
        AutoIAFGuide(regression),
        x,
        y,
        num_steps=30,
        final_lr=1e-2,
        checkpoint=path,
        progress=False,
    )
    np.testing.assert_array_equal(resumed.elbo_trace, full.elbo_trace)
    for name, value in _params().items():
        torch.testing.assert_close(value, full_params[name], rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_checkpoint_resumes_bit_for_bit(tmp_path):
    from pyro_flowvi import AutoIAFGuide

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen)
    y = x @ torch.linspace(-1.0, 1.0, 5) + 0.5 * torch.randn(40, generator=gen)
    x, y = x.cuda(), y.cuda()
    pyro.set_rng_seed(2)
    full = fit(regression, AutoIAFGuide(regression), x, y, num_steps=20, progress=False)
    full_params = _params()
    pyro.clear_param_store()
    pyro.set_rng_seed(2)
    path = tmp_path / "fit.pt"
    fit(regression, AutoIAFGuide(regression), x, y, num_steps=10, checkpoint=path, progress=False)
    assert torch.load(path, weights_only=True)["cuda_rng"] is not None
    pyro.clear_param_store()
    pyro.set_rng_seed(99)
    resumed = fit(
        regression, AutoIAFGuide(regression), x, y, num_steps=20, checkpoint=path, progress=False
    )
    np.testing.assert_array_equal(resumed.elbo_trace, full.elbo_trace)
    for name, value in _params().items():
        assert value.is_cuda
        torch.testing.assert_close(value, full_params[name], rtol=0, atol=0)


class LazyGuide(PyroModule):
    """Creates its parameters on the first call, as autoguides do; records the grad mode."""

    def __init__(self):
        super().__init__()
        self.built_with_grad = None

    def forward(self, y):
        if self.built_with_grad is None:
            # a guide whose start needs gradients (a Laplace start) would build another start
            self.built_with_grad = torch.is_grad_enabled()
            self.loc = PyroParam(torch.tensor(0.0))
        pyro.sample("mu", dist.Normal(self.loc, 1.0))
        pyro.sample("sigma", dist.LogNormal(0.0, 0.5))


def test_resume_builds_the_guide_with_gradients_on_as_a_fresh_fit_does(data, tmp_path):
    path = tmp_path / "fit.pt"
    fresh = LazyGuide()
    fit(model, fresh, data, num_steps=3, checkpoint=path, progress=False)
    pyro.clear_param_store()
    resumed = LazyGuide()
    fit(model, resumed, data, num_steps=6, checkpoint=path, progress=False)
    assert fresh.built_with_grad is True and resumed.built_with_grad is True


class BufferGuide(PyroModule):
    """A guide module with buffers (as a preconditioned flow guide has) and two parameters."""

    def __init__(self, buffers):
        super().__init__()
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self.loc = PyroParam(torch.tensor(0.0))
        self.scale = PyroParam(torch.tensor(1.0), constraint=dist.constraints.positive)

    def forward(self, y):
        shift = sum(float(b.sum()) for b in self.buffers())
        pyro.sample("mu", dist.Normal(self.loc + shift, self.scale))
        pyro.sample("sigma", dist.LogNormal(0.0, 0.5))


def test_resume_refuses_a_checkpoint_whose_buffers_differ(data, tmp_path):
    path = tmp_path / "fit.pt"
    fit(
        model,
        BufferGuide({"shift": torch.zeros(2)}),
        data,
        num_steps=3,
        checkpoint=path,
        progress=False,
    )
    for buffers, match in [
        (
            {},
            r"guide buffers in the checkpoint that this model and guide do not have: \['shift'\]",
        ),
        ({"shift": torch.zeros(3)}, r"guide buffer 'shift' with shape \(2,\).*shape \(3,\)"),
        (
            {"shift": torch.zeros(2), "other": torch.zeros(1)},
            r"guide buffers of this model and guide that the checkpoint lacks: \['other'\]",
        ),
    ]:
        pyro.clear_param_store()
        with pytest.raises(CheckpointError, match=match) as info:
            fit(model, BufferGuide(buffers), data, num_steps=6, checkpoint=path, progress=False)
        assert str(path) in str(info.value)


def test_resume_refuses_a_checkpoint_with_more_parameters(data, tmp_path):
    def bigger(y):
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0 * tau))
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
        with pyro.plate("n", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, sigma), obs=y)

    path = tmp_path / "fit.pt"
    fit(bigger, AutoNormal(bigger), data, num_steps=3, checkpoint=path, progress=False)
    pyro.clear_param_store()
    # model's parameters are a subset of bigger's: still another model, refused
    with pytest.raises(CheckpointError, match=r"do not have: \['AutoNormal.locs.tau'") as info:
        fit(model, AutoNormal(model), data, num_steps=6, checkpoint=path, progress=False)
    assert str(path) in str(info.value) and "AutoNormal.scales.tau" in str(info.value)


def test_a_parameter_created_after_the_first_step_is_saved_and_not_silently_lost(data, tmp_path):
    calls = {"n": 0}

    def late_guide(y):
        calls["n"] += 1
        loc = pyro.param("loc", torch.tensor(0.0))
        if calls["n"] > 5:  # from the fifth step on
            loc = loc + pyro.param("late", torch.tensor(0.0))
        pyro.sample("mu", dist.Normal(loc, 1.0))
        pyro.sample("sigma", dist.LogNormal(0.0, 0.5))

    path = tmp_path / "fit.pt"
    fit(model, late_guide, data, num_steps=10, checkpoint=path, progress=False)
    assert set(torch.load(path, weights_only=True)["params"]) == {"loc", "late"}
    pyro.clear_param_store()
    calls["n"] = 0
    with pytest.raises(CheckpointError, match=r"do not have: \['late'\]"):
        fit(model, late_guide, data, num_steps=20, checkpoint=path, progress=False)


def test_resume_refuses_a_checkpoint_with_another_constraint(data, tmp_path):
    def positive_guide(y):
        loc = pyro.param("loc", torch.tensor(0.5), constraint=dist.constraints.positive)
        pyro.sample("mu", dist.Normal(loc, 1.0))
        pyro.sample("sigma", dist.LogNormal(0.0, 0.5))

    def interval_guide(y):
        loc = pyro.param("loc", torch.tensor(0.5), constraint=dist.constraints.interval(0.0, 1.0))
        pyro.sample("mu", dist.Normal(loc, 1.0))
        pyro.sample("sigma", dist.LogNormal(0.0, 0.5))

    path = tmp_path / "fit.pt"
    fit(model, positive_guide, data, num_steps=3, checkpoint=path, progress=False)
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match="'loc' with constraint"):
        fit(model, interval_guide, data, num_steps=6, checkpoint=path, progress=False)


# --- Ctrl-C: deferred across the update and its bookkeeping -----------------------------


def _interrupt():
    signal.raise_signal(signal.SIGINT)  # what Ctrl-C does; handled at the next bytecode


class Once:
    """Call ``action`` at the ``at``-th call (1-based), counting calls of the wrapped function."""

    def __init__(self, fn, at, action, after=False):
        self.fn, self.at, self.action, self.after, self.calls = fn, at, action, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at and not self.after:
            self.action()
        out = self.fn(*args, **kwargs)
        if self.calls == self.at and self.after:
            self.action()
        return out


# AutoNormal of `model` has four parameters, so the default optimizer's step (ClippedAdam)
# runs four times per fit step;
# fit step k (0-based) writes checkpoint number k // 5 + 1 when k + 1 is a multiple of 5.
INJECTION_POINTS = {
    # inside the loss computation of step 12 (model call 1 builds, 2 is fit's run, k + 3 step k)
    "loss": lambda mp: mp.setattr(sys.modules[__name__], "model", Once(model, 15, _interrupt)),
    # inside the optimizer update of step 12, after two of its four parameters were updated
    "update": lambda mp: mp.setattr(
        ClippedAdam, "step", Once(ClippedAdam.step, 12 * 4 + 2, _interrupt, True)
    ),
    # right after the update of step 12 (fit zeroes the gradients next)
    "after update": lambda mp: mp.setattr(
        fit_module, "zero_grads", Once(fit_module.zero_grads, 13, _interrupt)
    ),
    # during the checkpoint write after step 9 (inside torch.save and inside os.replace)
    "checkpoint write": lambda mp: mp.setattr(
        torch, "save", Once(torch.save, 2, _interrupt, True)
    ),
    "checkpoint rename": lambda mp: mp.setattr(os, "replace", Once(os.replace, 2, _interrupt)),
}


@pytest.mark.parametrize("point", list(INJECTION_POINTS))
def test_ctrl_c_at_any_point_of_a_step_resumes_bit_for_bit(data, tmp_path, monkeypatch, point):
    pyro.set_rng_seed(5)
    full = fit(model, AutoNormal(model), data, num_steps=25, progress=False)
    full_params = _params()

    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    path = tmp_path / "fit.pt"
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as mp:
        INJECTION_POINTS[point](mp)
        stopped = fit(
            sys.modules[__name__].model,
            AutoNormal(model),
            data,
            num_steps=25,
            checkpoint=path,
            checkpoint_every=5,
            progress=False,
        )
    assert signal.getsignal(signal.SIGINT) is handler
    assert stopped.interrupted and 0 < stopped.num_steps < 25
    # a step interrupted in its loss is dropped; anywhere later it completes first
    assert stopped.num_steps == {"loss": 12, "checkpoint write": 10, "checkpoint rename": 10}.get(
        point, 13
    )
    np.testing.assert_array_equal(stopped.elbo_trace, full.elbo_trace[: stopped.num_steps])

    pyro.clear_param_store()
    pyro.set_rng_seed(123)
    resumed = fit(
        model,
        AutoNormal(model),
        data,
        num_steps=25,
        checkpoint=path,
        checkpoint_every=5,
        progress=False,
    )
    assert resumed.resumed_from == stopped.num_steps
    np.testing.assert_array_equal(resumed.elbo_trace, full.elbo_trace)
    for name, value in _params().items():
        torch.testing.assert_close(value, full_params[name], rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))


def test_sigint_handler_is_restored_after_an_error_and_not_touched_off_the_main_thread(data):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(NonFiniteLossError):
        fit(
            barrier_model,
            AutoNormal(barrier_model),
            torch.randn(20) + 5.0,
            num_steps=500,
            lr=0.1,
            progress=False,
        )
    assert signal.getsignal(signal.SIGINT) is handler

    outcome = {}

    def run():
        try:
            outcome["result"] = fit(model, AutoNormal(model), data, num_steps=3, progress=False)
        except BaseException as error:  # reported below
            outcome["error"] = error

    with pyro.validation_enabled(True):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    assert "error" not in outcome and outcome["result"].num_steps == 3
    assert signal.getsignal(signal.SIGINT) is handler


# --- divergence --------------------------------------------------------------------------


def normal_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


class JumpingLR:
    """Trace_ELBO whose optimizer's learning rate jumps to ``lr`` before step ``at``.

    Adam moves every parameter by about ``lr`` per step: at 0.05 it settles near the optimum
    of ``normal_model``; at 5 the location and the log-scale jump by ~5 at every step and the
    ELBO falls by hundreds of nats or more, without becoming infinite.
    """

    def __init__(self, optim, at, lr, first_step=0):
        self.optim, self.at, self.lr, self.step = optim, at, lr, first_step
        self.elbo = Trace_ELBO()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if self.step == self.at:
            for obj in self.optim.optim_objs.values():
                for group in obj.param_groups:
                    group["lr"] = self.lr
        self.step += 1
        return self.elbo.loss_and_grads(model, guide, *args, **kwargs)


def adam():
    return pyro.optim.Adam({"lr": 0.05})


def test_divergence_stops_and_puts_back_the_best_parameters_and_optimizer_state():
    y = torch.randn(20) + 0.5
    pyro.set_rng_seed(6)
    optim = adam()
    with pytest.warns(DivergenceWarning, match="diverged at step") as record:
        result = fit(
            normal_model,
            AutoNormal(normal_model),
            y,
            num_steps=400,
            optim=optim,
            loss=JumpingLR(optim, 80, 5.0),
            progress=False,
        )
    assert "put back" in str(record[0].message)
    assert result.restored_best and 80 < result.diverged_at < 80 + 50
    assert result.num_steps == result.diverged_at + 1
    assert result.best_step <= 80 and result.best_elbo > result.elbo_trace[-1]
    restored, restored_optim = _params(), optim.get_state()

    # the same fit stopped after best_step steps holds the parameters best_step was estimated at
    pyro.clear_param_store()
    pyro.set_rng_seed(6)
    optim = adam()
    fit(
        normal_model,
        AutoNormal(normal_model),
        y,
        num_steps=result.best_step,
        optim=optim,
        loss=JumpingLR(optim, 80, 5.0),
        progress=False,
    )
    for name, value in _params().items():
        torch.testing.assert_close(restored[name], value, rtol=0, atol=0)
    for name, state in optim.get_state().items():
        torch.testing.assert_close(restored_optim[name], state, rtol=0, atol=0)


def test_divergence_stop_resumes_bit_for_bit_from_a_checkpoint(tmp_path):
    y = torch.randn(20) + 0.5
    pyro.set_rng_seed(6)
    optim = adam()
    with pytest.warns(DivergenceWarning):
        full = fit(
            normal_model,
            AutoNormal(normal_model),
            y,
            num_steps=400,
            optim=optim,
            loss=JumpingLR(optim, 80, 5.0),
            progress=False,
        )
    full_params = _params()

    pyro.clear_param_store()
    pyro.set_rng_seed(6)
    path = tmp_path / "fit.pt"
    optim = adam()
    fit(
        normal_model,
        AutoNormal(normal_model),
        y,
        num_steps=90,
        optim=optim,
        loss=JumpingLR(optim, 80, 5.0),
        checkpoint=path,
        progress=False,
    )
    pyro.clear_param_store()
    optim = adam()
    with pytest.warns(DivergenceWarning):
        resumed = fit(
            normal_model,
            AutoNormal(normal_model),
            y,
            num_steps=400,
            optim=optim,
            loss=JumpingLR(optim, 80, 5.0, first_step=90),
            checkpoint=path,
            progress=False,
        )
    # the best window's parameters travel in the checkpoint
    assert (resumed.diverged_at, resumed.best_step, resumed.best_elbo, resumed.restored_best) == (
        full.diverged_at,
        full.best_step,
        full.best_elbo,
        True,
    )
    np.testing.assert_array_equal(resumed.elbo_trace, full.elbo_trace)
    for name, value in _params().items():
        torch.testing.assert_close(value, full_params[name], rtol=0, atol=0)

    # a resume after the stop starts afresh from the best parameters (here with a stable lr)
    pyro.clear_param_store()
    again = fit(
        normal_model,
        AutoNormal(normal_model),
        y,
        num_steps=full.num_steps + 100,
        optim=adam(),
        checkpoint=path,
        progress=False,
    )
    assert again.diverged_at is None and not again.restored_best
    assert again.best_elbo > full.best_elbo - 5.0


def test_divergence_warn_goes_on_and_ignore_is_silent():
    y = torch.randn(20) + 0.5
    pyro.set_rng_seed(6)
    optim = adam()
    with pytest.warns(DivergenceWarning, match="continuing"):
        warned = fit(
            normal_model,
            AutoNormal(normal_model),
            y,
            num_steps=150,
            optim=optim,
            loss=JumpingLR(optim, 80, 5.0),
            divergence="warn",
            progress=False,
        )
    assert warned.num_steps == 150 and warned.diverged_at is not None
    assert not warned.restored_best
    assert "diverged_at=" in repr(warned)

    pyro.clear_param_store()
    pyro.set_rng_seed(6)
    optim = adam()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ignored = fit(
            normal_model,
            AutoNormal(normal_model),
            y,
            num_steps=150,
            optim=optim,
            loss=JumpingLR(optim, 80, 5.0),
            divergence="ignore",
            progress=False,
        )
    assert ignored.diverged_at is None and ignored.best_step is None
    np.testing.assert_array_equal(ignored.elbo_trace, warned.elbo_trace)


@pytest.mark.parametrize(
    "make_guide, target, steps",
    [
        (AutoNormal, "conjugate", 300),
        (AutoMultivariateNormal, "conjugate", 200),
        ("iaf", "banana", 200),
    ],
)
def test_healthy_noisy_fits_are_not_called_diverged(make_guide, target, steps):
    from pyro_flowvi import AutoIAFGuide
    from pyro_flowvi.benchmarks.synthetic import banana

    if target == "conjugate":
        m, args = model, (torch.randn(15) + 1.0,)
    else:
        m, args = banana(4).model, ()
    guide = AutoIAFGuide(m) if make_guide == "iaf" else make_guide(m)
    # lr 0.05 keeps Adam jittering around the optimum: a noisy plateau, never a divergence
    result = fit(m, guide, *args, num_steps=steps, lr=0.05, progress=False)  # warnings = errors
    assert result.diverged_at is None and not result.restored_best
    assert result.best_step is not None and result.best_step >= 49


def test_divergence_rule_on_synthetic_traces():
    from pyro_flowvi._divergence import DivergenceGuard

    def first_divergence(trace, rule=None):
        guard, seen = DivergenceGuard(rule or DivergenceRule()), []
        for value in trace:
            seen.append(float(value))
            if guard.observe(seen) == "diverged":
                return len(seen) - 1, guard
        return None, guard

    rng = np.random.default_rng(0)
    no_floor = DivergenceRule(floor=0.0)
    # stationary noise, normal or heavy-tailed (Student-t, 2 degrees of freedom), for 20000
    # steps: the best median of ~400 windows sits a few standard errors above the rest, far
    # from 20, even without the floor
    for noise in (rng.normal(size=20000), rng.standard_t(2, size=20000)):
        assert first_divergence(noise, no_floor)[0] is None
    # the same on a rising curve (the differences cancel its trend)
    rising = -100.0 * np.exp(-np.arange(3000) / 300.0) + rng.standard_t(2, size=3000)
    assert first_divergence(rising, no_floor)[0] is None
    # noise 1: 20 standard errors (20 * 1.2533 / sqrt(50) = 3.5) + 10 nats = 13.5 nats; a drop
    # of 16 is found within half a window, one of 11 is not
    noise = rng.normal(size=400)
    step, guard = first_divergence(np.concatenate([noise[:200], noise[200:] - 16.0]))
    assert 200 <= step < 200 + 26 and guard.best_step < 200
    assert guard.noise == pytest.approx(1.0, rel=0.3)
    assert guard.threshold == pytest.approx(10.0 + 20 * (np.pi / 2) ** 0.5 * guard.noise / 50**0.5)
    assert first_divergence(np.concatenate([noise[:200], noise[200:] - 11.0]))[0] is None
    # without noise the floor decides
    flat = np.zeros(300)
    assert first_divergence(np.concatenate([flat, flat - 9.0]))[0] is None
    assert first_divergence(np.concatenate([flat, flat - 11.0]))[0] == 300 + 25
    looser = DivergenceRule(floor=20.0)
    assert first_divergence(np.concatenate([flat, flat - 11.0]), looser)[0] is None


@pytest.mark.parametrize(
    "divergence, match",
    [
        ("halt", "divergence must be one of"),
        (3, "divergence must be 'stop', 'warn', 'ignore' or a DivergenceRule, got 3"),
    ],
)
def test_fit_rejects_a_bad_divergence_option(data, divergence, match):
    with pytest.raises(ValueError, match=match):
        fit(model, AutoNormal(model), data, num_steps=3, divergence=divergence, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 2}, "window must be an int >= 3, got 2"),
        ({"noise_multiple": -1.0}, "noise_multiple must be a number >= 0, got -1.0"),
        ({"floor": float("nan")}, "floor must be a number >= 0, got nan"),
    ],
)
def test_divergence_rule_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DivergenceRule(**kwargs)


# --- checkpoints that cannot run code ----------------------------------------------------

RAN = {"code": False}


def _ran_code():
    RAN["code"] = True


class Crafted:
    """Unpickling this calls ``_ran_code``: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_ran_code, ())


def test_a_checkpoint_loads_with_weights_only_and_holds_plain_data(data, tmp_path):
    path = tmp_path / "fit.pt"
    guide = BufferGuide({"shift": torch.zeros(2)})
    fit(
        model,
        guide,
        data,
        num_steps=60,
        optim=pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.99}),
        checkpoint=path,
        progress=False,
    )
    state = torch.load(path, weights_only=True)
    assert state["format"] == "pyro-flowvi fit checkpoint" and state["version"] == 2
    assert set(state["params"]) == {"loc", "scale"} and set(state["guide_buffers"]) == {"shift"}
    assert state["constraints"]["scale"]["class"].endswith("_GreaterThan")
    assert state["constraints"]["scale"]["lower_bound"] == 0.0
    assert state["divergence"]["snapshot"]["params"].keys() == {"loc", "scale"}


@pytest.mark.parametrize("how", ["torch.save", "pickle", "pickle protocol 5"])
def test_a_crafted_checkpoint_is_refused_without_running_its_code(data, tmp_path, how):
    path = tmp_path / "fit.pt"
    if how == "torch.save":
        torch.save({"format": "pyro-flowvi fit checkpoint", "payload": Crafted()}, path)
    else:
        path.write_bytes(pickle.dumps(Crafted(), protocol=2 if how == "pickle" else 5))
    with pytest.raises(CheckpointError, match="refused without being unpickled") as info:
        fit(model, AutoNormal(model), data, num_steps=5, checkpoint=path, progress=False)
    assert not RAN["code"]
    assert str(path) in str(info.value)
    # the unpickler names the global it refused, when it got that far
    assert ("_ran_code" in str(info.value)) == (how != "pickle protocol 5")
    assert not pyro.get_param_store().keys()  # refused before building anything


def _without_numpy_rng(path, data):
    fit(model, AutoNormal(model), data, num_steps=3, checkpoint=path, progress=False)
    pyro.clear_param_store()
    state = torch.load(path, weights_only=True)
    del state["rng"]["numpy"]
    torch.save(state, path)


def _truncated(path, data):
    fit(model, AutoNormal(model), data, num_steps=3, checkpoint=path, progress=False)
    pyro.clear_param_store()
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda path, data: path.write_bytes(b""), "is empty"),
        (_truncated, "cannot be read: it is truncated"),
        (lambda path, data: path.write_text("hello, world\n"), "not a file written by torch.save"),
        (lambda path, data: torch.save({"weights": torch.ones(2)}, path), "is not a pyro-flowvi"),
        (
            lambda path, data: torch.save(
                {"format": "pyro-flowvi fit checkpoint", "version": 3}, path
            ),
            "has format version 3; this version of pyro-flowvi reads version 2",
        ),
        (
            lambda path, data: torch.save(
                {"format": "pyro-flowvi fit checkpoint", "version": 2, "step": 1}, path
            ),
            "is damaged: entry 'elbo_trace' is missing",
        ),
        (_without_numpy_rng, "is damaged: entry 'rng.numpy.kind' is missing"),
        (
            # what pyro-flowvi 0.1 wrote: a pickle with constraint objects and numpy arrays
            lambda path, data: torch.save(
                {
                    "version": 1,
                    "constraints": {"x": dist.constraints.positive},
                    "rng": np.random.get_state(),
                },
                path,
            ),
            "is a version-1 checkpoint",
        ),
    ],
)
def test_a_bad_checkpoint_file_gives_one_clear_error_naming_it(data, tmp_path, make, match):
    path = tmp_path / "fit.pt"
    make(path, data)
    with pytest.raises(CheckpointError, match=match) as info:
        fit(model, AutoNormal(model), data, num_steps=5, checkpoint=path, progress=False)
    assert isinstance(info.value, ValueError) and info.value.path == str(path)
    assert f"checkpoint {str(path)!r}" in str(info.value)


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    path = tmp_path / "fit.pt"

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", Once(torch.save, 2, lambda: disk_full(), after=False))
    with pytest.raises(OSError, match="No space left"):
        fit(
            model,
            AutoNormal(model),
            data,
            num_steps=12,
            checkpoint=path,
            checkpoint_every=5,
            progress=False,
        )
    assert torch.load(path, weights_only=True)["step"] == 5
    assert not list(tmp_path.glob("*.tmp"))


# --- a resume with another optimizer -----------------------------------------------------


def test_resume_with_a_new_learning_rate_uses_it_and_keeps_the_optimizer_state(data, tmp_path):
    # the reference: 20 steps at lr 0.05, then the same optimizer objects at lr 0.005
    pyro.set_rng_seed(7)
    optim = pyro.optim.Adam({"lr": 0.05})
    guide = AutoNormal(model)
    first = fit(model, guide, data, num_steps=20, optim=optim, progress=False)
    for obj in optim.optim_objs.values():
        obj.param_groups[0]["lr"] = 0.005
    second = fit(model, guide, data, num_steps=20, optim=optim, progress=False)
    expected = np.concatenate([first.elbo_trace, second.elbo_trace])
    expected_params = _params()

    pyro.clear_param_store()
    pyro.set_rng_seed(7)
    path = tmp_path / "fit.pt"
    fit(
        model,
        AutoNormal(model),
        data,
        num_steps=20,
        optim=pyro.optim.Adam({"lr": 0.05}),
        checkpoint=path,
        progress=False,
    )
    pyro.clear_param_store()
    optim = pyro.optim.Adam({"lr": 0.005})
    resumed = fit(
        model, AutoNormal(model), data, num_steps=40, optim=optim, checkpoint=path, progress=False
    )
    np.testing.assert_array_equal(resumed.elbo_trace, expected)
    for name, value in _params().items():
        torch.testing.assert_close(value, expected_params[name], rtol=0, atol=0)
    assert {obj.param_groups[0]["lr"] for obj in optim.optim_objs.values()} == {0.005}


def _learning_rates(result):
    return {group["lr"] for obj in result.optim.optim_objs.values() for group in obj.param_groups}


def test_default_learning_rate_decays_from_lr_to_final_lr(data):
    result = fit(model, AutoNormal(model), data, num_steps=40, progress=False)
    assert isinstance(result.optim, pyro.optim.PyroOptim)
    (last,) = _learning_rates(result)
    assert math.isclose(last, 1e-4, rel_tol=1e-9)  # lr / 100 after the last step
    pyro.clear_param_store()
    result = fit(model, AutoNormal(model), data, num_steps=40, lr=0.05, final_lr=0.05)
    assert _learning_rates(result) == {0.05}  # a constant rate on request
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="final_lr .* applies to the default optimizer only"):
        fit(model, AutoNormal(model), data, num_steps=4, optim=pyro.optim.Adam({}), final_lr=0.1)
    with pytest.raises(ValueError, match="final_lr must be a positive number, got -1"):
        fit(model, AutoNormal(model), data, num_steps=4, final_lr=-1)


def test_resume_with_more_steps_follows_the_new_schedule(data, tmp_path):
    path = tmp_path / "fit.pt"
    first = fit(
        model, AutoNormal(model), data, num_steps=15, lr=0.05, checkpoint=path, progress=False
    )
    (rate,) = _learning_rates(first)
    assert math.isclose(rate, 0.05 / 100, rel_tol=1e-9)
    pyro.clear_param_store()
    # more steps: the rest of the run follows this call's schedule, from its value at step 15
    # (the rate jumps from the first schedule's end to the second's step 15, then decays to
    # final_lr at step 30), and the optimizer state (Adam's moments) carries over
    resumed = fit(
        model, AutoNormal(model), data, num_steps=30, lr=0.05, checkpoint=path, progress=False
    )
    assert resumed.resumed_from == 15
    (rate,) = _learning_rates(resumed)
    assert math.isclose(rate, 0.05 / 100, rel_tol=1e-9)


def test_resume_with_the_same_decaying_optimizer_continues_its_schedule(data, tmp_path):
    def optim():
        return pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.95})

    pyro.set_rng_seed(8)
    full = fit(model, AutoNormal(model), data, num_steps=30, optim=optim(), progress=False)
    pyro.clear_param_store()
    pyro.set_rng_seed(8)
    path = tmp_path / "fit.pt"
    fit(
        model,
        AutoNormal(model),
        data,
        num_steps=15,
        optim=optim(),
        checkpoint=path,
        progress=False,
    )
    pyro.clear_param_store()
    resumed = fit(
        model,
        AutoNormal(model),
        data,
        num_steps=30,
        optim=optim(),
        checkpoint=path,
        progress=False,
    )
    np.testing.assert_array_equal(resumed.elbo_trace, full.elbo_trace)


def test_resume_with_another_optimizer_class_is_refused(data, tmp_path):
    path = tmp_path / "fit.pt"
    fit(model, AutoNormal(model), data, num_steps=3, checkpoint=path, progress=False)
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match="ClippedAdam, this fit uses .*SGD"):
        fit(
            model,
            AutoNormal(model),
            data,
            num_steps=6,
            optim=pyro.optim.SGD({"lr": 0.01}),
            checkpoint=path,
            progress=False,
        )


# --- rough edges -------------------------------------------------------------------------


def test_an_unknown_keyword_is_refused_before_fitting_with_a_suggestion(data):
    with pytest.raises(
        TypeError,
        match=r"learning_rate=0.05.*does not take 'learning_rate'; "
        r"did you mean fit's lr=",
    ) as info:
        fit(model, AutoNormal(model), data, num_steps=5, learning_rate=0.05, progress=False)
    assert "model(y)" in str(info.value)
    assert not pyro.get_param_store().keys()
    with pytest.raises(TypeError, match="did you mean fit's checkpoint_every="):
        fit(model, AutoNormal(model), data, num_steps=5, checkpoint_evry=5, progress=False)
    with pytest.raises(TypeError, match="the model model\\(y\\) cannot be called"):
        fit(model, AutoNormal(model), num_steps=5, progress=False)


def test_keywords_reach_a_model_and_guide_that_take_them(data):
    def scaled(y, scale=1.0):
        mu = pyro.sample("mu", dist.Normal(0.0, scale))
        with pyro.plate("n", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def anything(y, **kwargs):
        scaled(y, **kwargs)

    for m in (scaled, anything):
        pyro.clear_param_store()
        result = fit(m, AutoNormal(m), data, num_steps=3, scale=3.0, progress=False)
        assert result.num_steps == 3


def test_progress_bar_shows_in_a_jupyter_kernel_off_a_terminal(data, monkeypatch):
    pytest.importorskip("tqdm.auto")
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    shell = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    fit(model, AutoNormal(model), data, num_steps=12, progress=True)
    assert "12/12" in stream.getvalue()

    # a terminal IPython (no kernel) off a terminal stays quiet, as any plain process
    pyro.clear_param_store()
    stream.seek(0)
    stream.truncate()
    shell.config = {"TerminalIPythonApp": {}}
    fit(model, AutoNormal(model), data, num_steps=12, progress=True)
    assert stream.getvalue() == ""


def test_fit_result_repr_shows_enough_digits():
    result = FitResult(elbo_trace=np.array([-1234.56789]), wall_time=1.0, num_steps=1)
    assert "smoothed_elbo=-1234.57" in repr(result)
    result = FitResult(elbo_trace=np.array([-0.00123456]), wall_time=1.0, num_steps=1)
    assert "smoothed_elbo=-0.00123456" in repr(result)


def test_losses_by_name(data):
    from pyro_flowvi.estimators import TraceIW_ELBO, TraceSTL_ELBO

    result = fit(model, AutoNormal(model), data, num_steps=3, loss="stl", num_particles=4)
    assert isinstance(result.loss, TraceSTL_ELBO) and result.loss.num_particles == 4
    assert result.loss.vectorize_particles
    pyro.clear_param_store()
    result = fit(model, AutoNormal(model), data, num_steps=3, loss="iw")
    assert isinstance(result.loss, TraceIW_ELBO) and result.loss.num_particles == 8
    pyro.clear_param_store()
    result = fit(model, AutoNormal(model), data, num_steps=3)
    assert type(result.loss) is Trace_ELBO and result.loss.num_particles == 1
    with pytest.raises(ValueError, match=r"loss must be one of \['elbo', 'stl', 'iw'\].*'dreg'"):
        fit(model, AutoNormal(model), data, num_steps=3, loss="dreg")
    with pytest.raises(ValueError, match="num_particles applies to a loss given by name"):
        fit(model, AutoNormal(model), data, num_steps=3, loss=Trace_ELBO(), num_particles=2)
    with pytest.raises(ValueError, match="num_particles must be an int >= 1, got 0"):
        fit(model, AutoNormal(model), data, num_steps=3, num_particles=0)
