"""Data-parallel SVI: two gloo processes against one process on the same global batch.

All the two-process work runs in one spawn of two workers (module fixture ``runs``), which
go through the scenarios below one after another and save what they saw; each test then
compares one scenario with a single-process computation here. Spawning costs seconds, the
scenarios together a few more.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import os
import shutil
import signal
import socket
import sys
import traceback
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pyro_flowvi import AutoAmortizedFlowGuide, NonFiniteLossError, fit
from pyro_flowvi.bnn import AutoMeanFieldGuide, AutoMNFGuide, BayesianMLP
from pyro_flowvi.distributed import DistributedSVI


def _gloo_unavailable() -> str | None:
    if not torch.distributed.is_available():
        return "torch.distributed is not available"
    if not torch.distributed.is_gloo_available():
        return "the gloo backend is not available"
    try:
        _free_port()
    except OSError as error:
        return f"cannot bind a local port: {error}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.skipif(_gloo_unavailable() is not None, reason=str(_gloo_unavailable()))

WORLD = 2
NUM_DATA = 40  # the data-set size N the likelihood is scaled to
GLOBAL_BATCH = 8  # B: each of the two processes takes 4 points


# --- frozen noise: the same draws for a data point, in one process or two ---------------------


@contextlib.contextmanager
def frozen_noise():
    """Replace standard-normal draws by fixed values that do not depend on the data point.

    The k-th draw inside the block is ``sin(0.7 j + 1.3 k)`` at entry ``j`` of its trailing
    dimensions, the same for every row (the data-point axis of local draws), so a data point
    gets the same noise whether its batch is split over processes or not. Covers
    ``torch.randn`` and ``torch.randn_like`` (weight and pre-activation draws) and
    ``Tensor.normal_`` (torch.distributions' ``rsample``).
    """
    calls = itertools.count()
    randn, randn_like, normal_ = torch.randn, torch.randn_like, torch.Tensor.normal_

    def pattern(shape: torch.Size, dtype, device) -> torch.Tensor:
        k = next(calls)
        shape = torch.Size(shape)
        trailing = shape[1:] if len(shape) > 1 else shape
        j = torch.arange(max(trailing.numel(), 1), dtype=torch.float64)
        values = torch.sin(0.7 * j + 1.3 * k)[: trailing.numel()].reshape(trailing)
        return values.expand(shape).to(dtype=dtype, device=device).clone()

    def fake_randn(*size, dtype=None, device=None, **_):
        size = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        return pattern(size, dtype or torch.get_default_dtype(), device)

    def fake_randn_like(t, *, dtype=None, device=None, **_):
        return pattern(t.shape, dtype or t.dtype, device or t.device)

    def fake_normal_(self, mean=0.0, std=1.0, *, generator=None):
        with torch.no_grad():
            return self.copy_(pattern(self.shape, self.dtype, self.device) * std + mean)

    torch.randn, torch.randn_like, torch.Tensor.normal_ = fake_randn, fake_randn_like, fake_normal_
    try:
        yield
    finally:
        torch.randn, torch.randn_like, torch.Tensor.normal_ = randn, randn_like, normal_


class Recorder(pyro.optim.PyroOptim):
    """SGD with lr 0 that records each parameter's value and gradient when called."""

    def __init__(self):
        super().__init__(torch.optim.SGD, {"lr": 0.0})
        self.grads, self.values = {}, {}

    def __call__(self, params, *args, **kwargs):
        store = pyro.get_param_store()
        for p in params:
            name = store.param_name(p)
            self.grads[name] = p.grad.detach().clone()
            self.values[name] = p.detach().clone()
        return super().__call__(params, *args, **kwargs)


# --- the models --------------------------------------------------------------------------


def global_batch():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64)
    y = x[:, 0] - 0.5 * x[:, 1] ** 2 + 0.3 * torch.randn(GLOBAL_BATCH, generator=g)
    return x, y


def bnn(kind):
    model = BayesianMLP(3, 1, hidden_dims=(5,), likelihood="normal", noise_scale=0.5)
    if kind == "mnf":
        return model, AutoMNFGuide(model, hidden_dims=(4,)), TraceMeanField_ELBO()
    return model, AutoMeanFieldGuide(model), TraceMeanField_ELBO()


class AmortizedModel:
    """A global offset (AutoNormal) and a local latent per point (an amortized flow)."""

    def __init__(self):
        self.decoder = nn.Linear(2, 3)

    def __call__(self, x, num_data):
        pyro.module("decoder", self.decoder)
        offset = pyro.sample("offset", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", num_data, subsample=torch.arange(x.shape[0])):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z) + offset, 0.5).to_event(1), obs=x)


def amortized():
    model = AmortizedModel()
    guide = AutoGuideList(model)
    guide.append(AutoNormal(poutine.block(model, hide=["z"])))
    guide.append(
        AutoAmortizedFlowGuide(
            poutine.block(model, expose=["z"]), plate="data", hidden_dims=(6,), num_transforms=2
        )
    )
    return model, guide, Trace_ELBO()


def regression_data(n=64):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.2 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


def regression_fit_setup():
    model = BayesianMLP(2, 1, hidden_dims=(8,), likelihood="normal", noise_scale=0.2)
    return model, AutoMeanFieldGuide(model)


FIT_STEPS = 300
FIT_BATCH = 16  # global; 8 per process
LR = 0.02


def adam():
    """A constant learning rate: fit's default decays over num_steps, so a fit of 30 steps
    resumed to 50 would not be the fit of 50 steps."""
    return pyro.optim.Adam({"lr": LR})


def shard_loader(dataset, seed=0):
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=FIT_BATCH // WORLD, sampler=sampler)


# --- the scenarios, run by each of the two workers ------------------------------------------


def scenario_gradients(rank, outdir):
    """One step of fit(distributed=True) per BNN guide, one of DistributedSVI for the
    amortized guide; the averaged gradients and the parameters they were taken at."""
    x, y = global_batch()
    shard = list(DistributedSampler(range(GLOBAL_BATCH), shuffle=False))  # rank::2
    out = {}
    for kind in ("mnf", "mean-field", "amortized"):
        pyro.clear_param_store()
        pyro.set_rng_seed(100 + rank)  # different starts: rank 0's must reach every process
        recorder = Recorder()
        model, guide, elbo = amortized() if kind == "amortized" else bnn(kind)

        def loss_fn(model, guide, *args, elbo=elbo, **kwargs):
            with frozen_noise():
                return elbo.differentiable_loss(model, guide, *args, **kwargs)

        if kind == "amortized":
            svi = DistributedSVI(model, guide, recorder, loss_fn)
            loss = svi.step(x[shard], NUM_DATA)
            scale = None
        else:
            result = fit(
                model,
                guide,
                batches=[(x[shard], y[shard])],
                num_steps=1,
                optim=recorder,
                loss=loss_fn,
                num_data=NUM_DATA,
                distributed=True,
                divergence="ignore",
                progress=False,
            )
            loss = -float(result.elbo_trace[0])
            trace = poutine.trace(model).get_trace(x[shard], y[shard], num_data=NUM_DATA)
            scale = float(trace.nodes["obs"]["scale"])
        out[kind] = {"grads": recorder.grads, "values": recorder.values, "loss": loss}
        out[kind]["scale"] = scale
    return out


def _regression_fit(rank, outdir, num_steps, checkpoint=None, loss=None, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(1000 * seed + rank)
    model, guide = regression_fit_setup()
    result = fit(
        model,
        guide,
        batches=shard_loader(regression_data()),
        num_steps=num_steps,
        optim=adam(),
        loss=loss or TraceMeanField_ELBO(),
        num_data=64,
        distributed=True,
        progress=False,
        checkpoint=checkpoint,
        checkpoint_every=10,
    )
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
    return result, params


def scenario_fit(rank, outdir):
    result, params = _regression_fit(rank, outdir, FIT_STEPS)
    return {"trace": result.elbo_trace, "params": params, "world_size": result.world_size}


def scenario_checkpoint(rank, outdir):
    path = os.path.join(outdir, "fit.pt")
    full, full_params = _regression_fit(rank, outdir, 50, seed=1)
    first, first_params = _regression_fit(rank, outdir, 30, checkpoint=path, seed=1)
    if rank == 0:
        shutil.copy(path, os.path.join(outdir, "fit-30.pt"))
    torch.distributed.barrier()
    # every process resumes (its own random-number state, its place in the batches)
    resumed, resumed_params = _regression_fit(rank, outdir, 50, checkpoint=path, seed=2)
    return {
        "full": full.elbo_trace,
        "full_params": full_params,
        "first": first.elbo_trace,
        "first_params": first_params,
        "resumed": resumed.elbo_trace,
        "resumed_from": resumed.resumed_from,
        "resumed_params": resumed_params,
    }


class InterruptAt:
    """A loss that raises SIGINT (what Ctrl-C does) in one process at its n-th call."""

    def __init__(self, rank, at_rank, at_call):
        self.elbo = TraceMeanField_ELBO()
        self.fire = rank == at_rank
        self.at, self.calls = at_call, 0

    def loss_and_grads(self, model, guide, *args, **kwargs):
        self.calls += 1
        if self.fire and self.calls == self.at:
            signal.raise_signal(signal.SIGINT)
        return self.elbo.loss_and_grads(model, guide, *args, **kwargs)


def scenario_interrupt(rank, outdir):
    path = os.path.join(outdir, "interrupted.pt")
    stopped, _ = _regression_fit(
        rank, outdir, 50, checkpoint=path, loss=InterruptAt(rank, 1, 23), seed=1
    )
    resumed, resumed_params = _regression_fit(rank, outdir, 50, checkpoint=path, seed=3)
    return {
        "stopped": stopped.elbo_trace,
        "interrupted": stopped.interrupted,
        "resumed": resumed.elbo_trace,
        "resumed_params": resumed_params,
        "handler_restored": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    }


def scenario_nan(rank, outdir):
    """Rank 1's shard holds an infinite target: every process stops at the same step."""
    pyro.clear_param_store()
    x, y = global_batch()
    shard = list(DistributedSampler(range(GLOBAL_BATCH), shuffle=False))
    y_local = y[shard].clone()
    if rank == 1:
        y_local[0] = math.inf
    model, guide, elbo = bnn("mean-field")
    with pyro.validation_enabled(False):
        try:
            fit(
                model,
                guide,
                x[shard],
                y_local,
                num_steps=5,
                num_data=NUM_DATA,
                loss=elbo,
                distributed=True,
                progress=False,
            )
        except NonFiniteLossError as error:
            return {"step": error.step, "site": error.site, "message": str(error)}
    return {"step": None}


SCENARIOS = {
    "gradients": scenario_gradients,
    "fit": scenario_fit,
    "checkpoint": scenario_checkpoint,
    "interrupt": scenario_interrupt,
    "nan": scenario_nan,
}


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    warnings.simplefilter("error")
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for name, scenario in SCENARIOS.items():
            try:
                outcome = {"result": scenario(rank, outdir)}
            except Exception:
                outcome = {"error": traceback.format_exc()}
            torch.save(outcome, os.path.join(outdir, f"{name}-{rank}.pt"))
    finally:
        # both processes reach the end before either tears gloo down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # Every outcome is saved and the process group is gone: leave without the interpreter's
    # shutdown. A worker aborted there now and then ("terminate called without an active
    # exception", SIGABRT, after all its outcomes were saved), which is teardown of torch's
    # C++ state, not behaviour under test; the marker tells the fixture how far each got.
    with open(os.path.join(outdir, f"done-{rank}"), "w"):
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("distributed")
    context = torch.multiprocessing.start_processes(
        _worker,
        args=(WORLD, _free_port(), str(outdir)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = 300  # seconds; a hang fails the tests instead of blocking the suite
    waited = 0
    try:
        while not context.join(timeout=5):
            waited += 5
            if waited >= deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the two worker processes did not finish in {deadline} s")
    except torch.multiprocessing.ProcessExitedException as error:
        done = [rank for rank in range(WORLD) if (outdir / f"done-{rank}").exists()]
        pytest.fail(f"a worker process died ({error}); ranks that reached the end: {done}")

    def load(name):
        outcomes = [
            torch.load(outdir / f"{name}-{rank}.pt", weights_only=False) for rank in range(WORLD)
        ]
        for rank, outcome in enumerate(outcomes):
            assert "error" not in outcome, f"rank {rank}, scenario {name}:\n{outcome['error']}"
        return [outcome["result"] for outcome in outcomes]

    load.outdir = outdir
    return load


# --- the tests -----------------------------------------------------------------------------


def _single_process_gradients(kind, values):
    """Loss and gradients of one process on the whole global batch, at ``values``."""
    x, y = global_batch()
    if kind == "amortized":
        model, guide, elbo = amortized()
        args, kwargs = (x, NUM_DATA), {}
    else:
        model, guide, elbo = bnn(kind)
        args, kwargs = (x, y), {"num_data": NUM_DATA}
    guide(*args, **kwargs)
    model(*args, **kwargs)
    store = dict(pyro.get_param_store().named_parameters())
    assert set(store) == set(values)
    with torch.no_grad():
        for name, value in values.items():
            store[name].copy_(value)
    context = guide.step_context() if hasattr(guide, "step_context") else contextlib.nullcontext()
    with frozen_noise(), context:
        loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
    loss.backward()
    return float(loss.detach()), {name: p.grad for name, p in store.items()}


@pytest.mark.parametrize("kind", ["mnf", "mean-field", "amortized"])
def test_averaged_gradient_equals_the_single_process_gradient(runs, kind):
    rank0, rank1 = (outcome[kind] for outcome in runs("gradients"))
    # every process started from rank 0's parameters (they were seeded differently)
    for name, value in rank0["values"].items():
        torch.testing.assert_close(rank1["values"][name], value, rtol=0, atol=0)
    # the same averaged gradient and loss in both processes
    for name, grad in rank0["grads"].items():
        torch.testing.assert_close(rank1["grads"][name], grad, rtol=0, atol=0)
    assert rank0["loss"] == rank1["loss"]

    loss, grads = _single_process_gradients(kind, rank0["values"])
    assert rank0["loss"] == pytest.approx(loss, rel=1e-12)
    assert set(grads) == set(rank0["grads"])
    for name, grad in grads.items():
        torch.testing.assert_close(rank0["grads"][name], grad, rtol=1e-10, atol=1e-12)


def test_each_process_scales_its_likelihood_by_n_over_its_own_batch(runs):
    # 4 of the 8 points per process: N / 4, twice the N / B of the global batch, so that
    # the mean over the two processes is the global batch's estimate
    for outcome in runs("gradients"):
        for kind in ("mnf", "mean-field"):
            assert outcome[kind]["scale"] == NUM_DATA / (GLOBAL_BATCH / WORLD)


def test_two_process_fit_reaches_the_single_process_elbo(runs):
    rank0, rank1 = runs("fit")
    np.testing.assert_array_equal(rank0["trace"], rank1["trace"])  # one trace, every process
    for name, value in rank0["params"].items():
        torch.testing.assert_close(rank1["params"][name], value, rtol=0, atol=0)
    assert rank0["world_size"] == WORLD

    pyro.set_rng_seed(0)
    model, guide = regression_fit_setup()
    loader = DataLoader(regression_data(), batch_size=FIT_BATCH, shuffle=True, drop_last=True)
    single = fit(
        model,
        guide,
        batches=loader,
        num_steps=FIT_STEPS,
        optim=adam(),
        loss=TraceMeanField_ELBO(),
        num_data=64,
        progress=False,
    ).elbo_trace
    two = rank0["trace"]
    # both learned: the last 50 steps are far above the first 10
    for trace in (single, two):
        assert trace[-50:].mean() > trace[:10].mean() + 100
    # the last 100 steps' mean ELBO agrees within Monte Carlo error: each estimate is a global
    # batch of 16 points either way; the standard error of each mean is sd / sqrt(100)
    window = 100
    se = math.hypot(single[-window:].std(ddof=1), two[-window:].std(ddof=1)) / math.sqrt(window)
    assert abs(single[-window:].mean() - two[-window:].mean()) < 4 * se


def test_distributed_checkpoint_resumes_in_every_process_and_in_one(runs):
    rank0, rank1 = runs("checkpoint")
    # the two processes resumed from rank 0's file reproduce the uninterrupted two-process fit
    for outcome in (rank0, rank1):
        assert outcome["resumed_from"] == 30
        np.testing.assert_array_equal(outcome["resumed"], outcome["full"])
        for name, value in outcome["full_params"].items():
            torch.testing.assert_close(outcome["resumed_params"][name], value, rtol=0, atol=0)

    # one process resumes the same checkpoint: the parameters of step 30, then it goes on
    path = runs.outdir / "fit-30.pt"
    pyro.set_rng_seed(0)
    model, guide = regression_fit_setup()
    loader = DataLoader(regression_data(), batch_size=FIT_BATCH, shuffle=True, drop_last=True)
    options = dict(loss=TraceMeanField_ELBO(), num_data=64, progress=False)
    same = fit(
        model, guide, batches=loader, num_steps=30, checkpoint=path, optim=adam(), **options
    )
    assert same.resumed_from == 30 and same.num_steps == 30 and same.world_size == 1
    np.testing.assert_array_equal(same.elbo_trace, rank0["first"])
    store = dict(pyro.get_param_store().named_parameters())
    for name, value in rank0["first_params"].items():
        torch.testing.assert_close(store[name], value, rtol=0, atol=0)
    more = fit(
        model, guide, batches=loader, num_steps=40, checkpoint=path, optim=adam(), **options
    )
    assert more.resumed_from == 30 and more.num_steps == 40
    assert np.isfinite(more.elbo_trace).all()
    # the single process continues the fit where it was (not from a fresh start)
    assert more.elbo_trace[30:].mean() > rank0["full"][:10].mean() + 100


def test_ctrl_c_in_one_process_stops_both_after_the_same_step_and_resumes_exactly(runs):
    rank0, rank1 = runs("interrupt")
    full = runs("checkpoint")[0]["full"]
    for outcome in (rank0, rank1):
        assert outcome["interrupted"]
        assert outcome["handler_restored"]
        # rank 1 got SIGINT in its 23rd loss call, that is step 23 (the first run of the
        # guide and the model is no loss call): the flag goes with that step's all-reduce,
        # every process completes the step and stops
        assert len(outcome["stopped"]) == 23
        np.testing.assert_array_equal(outcome["stopped"], full[:23])
        np.testing.assert_array_equal(outcome["resumed"], full)
    for name, value in rank0["resumed_params"].items():
        torch.testing.assert_close(rank1["resumed_params"][name], value, rtol=0, atol=0)


def test_a_non_finite_loss_in_one_process_stops_every_process_at_that_step(runs):
    rank0, rank1 = runs("nan")
    assert rank0["step"] == rank1["step"] == 0
    assert rank1["site"] == "obs"  # the process with the bad point names the site
    assert "not finite in 1 of 2 processes" in rank0["message"]
    assert "this is rank 0" in rank0["message"]


def test_distributed_needs_an_initialized_process_group():
    model, guide = regression_fit_setup()
    x, y = global_batch()
    with pytest.raises(ValueError, match="initialized default process group"):
        fit(model, guide, x, y, num_steps=1, distributed=True, progress=False)
    with pytest.raises(ValueError, match="distributed must be True, False or a"):
        fit(model, guide, x, y, num_steps=1, distributed="yes", progress=False)
    with pytest.raises(ValueError, match="initialized default process group"):
        DistributedSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())


@contextlib.contextmanager
def one_process_group(backend):
    torch.distributed.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _one_process_fits(device, tmp_path):
    """A plain fit, and a data-parallel fit of one process stopped and resumed, on device."""
    data = regression_data()
    x, y = (t.to(device) for t in data.tensors)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    options = dict(batches=batches, loss=TraceMeanField_ELBO(), num_data=64)
    traces = []
    for distributed, stops in ((False, [30]), (True, [12, 30])):
        pyro.clear_param_store()
        pyro.set_rng_seed(8)
        path = tmp_path / f"{distributed}.pt"
        for stop in stops:
            model, guide = regression_fit_setup()
            model.to(device)
            result = fit(
                model,
                guide,
                num_steps=stop,
                optim=adam(),
                checkpoint=path,
                distributed=distributed,
                progress=False,
                **options,
            )
        assert result.world_size == 1 and result.resumed_from == stops[0] * distributed
        traces.append((result.elbo_trace, store_params()))
    return traces


def store_params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def test_a_one_process_group_fits_exactly_like_a_plain_fit(tmp_path):
    with one_process_group("gloo"):
        (plain, plain_params), (group, group_params) = _one_process_fits("cpu", tmp_path)
    np.testing.assert_array_equal(group, plain)
    for name, value in plain_params.items():
        torch.testing.assert_close(group_params[name], value, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_one_process_nccl_group_fits_exactly_like_a_plain_fit(tmp_path):
    if not torch.distributed.is_nccl_available():
        pytest.skip("needs NCCL")
    torch.cuda.set_device(0)
    with one_process_group("nccl"):
        (plain, plain_params), (group, group_params) = _one_process_fits("cuda", tmp_path)
    np.testing.assert_array_equal(group, plain)
    for name, value in plain_params.items():
        assert value.is_cuda
        torch.testing.assert_close(group_params[name], value, rtol=0, atol=0)
