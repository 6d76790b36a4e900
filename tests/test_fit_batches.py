"""fit(..., batches=...): mini-batches epoch after epoch, resumed at the same batch."""

from __future__ import annotations

import signal

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pyro_flowvi import CheckpointError, fit

NUM_DATA = 12


def model(x, y, num_data=NUM_DATA):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", num_data, subsample=torch.arange(len(x))):
        pyro.sample("y", dist.Normal(w * x + b, 0.5), obs=y)


def dataset():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(NUM_DATA, generator=g)
    return TensorDataset(x, 2.0 * x - 1.0 + 0.5 * torch.randn(NUM_DATA, generator=g))


def loader(**options):
    return DataLoader(dataset(), batch_size=4, shuffle=True, **options)


def adam():
    """A constant learning rate: fit's default decays over num_steps, so a fit stopped early
    and resumed would not be the uninterrupted one."""
    return pyro.optim.Adam({"lr": 1e-2})


def store():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def test_fit_with_batches_is_the_hand_written_loop_over_the_same_batches():
    pyro.set_rng_seed(1)
    result = fit(
        model,
        AutoNormal(model, init_loc_fn=init_to_feasible),
        batches=loader(),
        num_steps=10,
        optim=adam(),
        progress=False,
    )
    fitted = store()
    assert result.num_steps == 10 and result.epoch == 3  # 3 batches per epoch: epoch 3, batch 1

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = AutoNormal(model, init_loc_fn=init_to_feasible)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    data, trace = loader(), []
    with torch.random.fork_rng():
        guide(*next(iter(data)))  # build, as fit does, without touching the draws
    while len(trace) < 10:
        for x, y in data:
            trace.append(-svi.step(x, y))
            if len(trace) == 10:
                break
    np.testing.assert_array_equal(result.elbo_trace, trace)
    for name, value in store().items():
        torch.testing.assert_close(value, fitted[name], rtol=0, atol=0)


def test_batches_may_be_tuples_dicts_or_single_tensors():
    seen = []

    def single(x):
        seen.append(x.shape)
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    fit(
        single,
        AutoNormal(single),
        batches=[torch.zeros(2), torch.zeros(3)],
        num_steps=3,
        progress=False,
    )
    assert seen[-3:] == [(2,), (3,), (2,)]
    fit(
        model,
        AutoNormal(model),
        batches=[{"x": torch.zeros(2), "y": torch.ones(2)}],
        num_steps=2,
        progress=False,
    )
    with pytest.raises(ValueError, match=r"keyword arguments \['y'\] that fit's \*\*kwargs give"):
        fit(
            model,
            AutoNormal(model),
            batches=[{"x": torch.zeros(2), "y": torch.ones(2)}],
            y=torch.ones(2),
            num_steps=2,
            progress=False,
        )


@pytest.mark.parametrize(
    "batches, match",
    [
        ((b for b in [(torch.zeros(2), torch.zeros(2))]), "iterated again every epoch"),
        (torch.zeros(3, 2), "pass a fixed data set as \\*args"),
        ([], "gave no batch"),
        (5, "iterated again every epoch"),
    ],
)
def test_bad_batches_are_refused_before_fitting(batches, match):
    with pytest.raises(ValueError, match=match):
        fit(model, AutoNormal(model), batches=batches, num_steps=2, progress=False)


def test_the_sampler_is_told_the_epoch():
    seen = []

    def recording(x, y, num_data=NUM_DATA):
        seen.append(x.clone())
        model(x, y, num_data)

    data = dataset()
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=5)
    fit(
        recording,
        AutoNormal(model),
        batches=DataLoader(data, batch_size=4, sampler=sampler),
        num_steps=6,
        progress=False,
    )
    steps = seen[-6:]  # the first run of the guide and the model comes before
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected = data.tensors[0][list(sampler)]
        torch.testing.assert_close(torch.cat(steps[3 * epoch : 3 * epoch + 3]), expected)
    assert not torch.equal(torch.cat(steps[:3]), torch.cat(steps[3:]))


@pytest.mark.parametrize("stop", [6, 7, 8])  # at an epoch's end, after its first, its second
def test_resume_continues_at_the_same_batch_bit_for_bit(tmp_path, stop):
    pyro.set_rng_seed(2)
    full = fit(
        model, AutoNormal(model), batches=loader(), num_steps=15, optim=adam(), progress=False
    )
    full_params = store()

    pyro.clear_param_store()
    pyro.set_rng_seed(2)
    path = tmp_path / "fit.pt"
    fit(
        model,
        AutoNormal(model),
        batches=loader(),
        num_steps=stop,
        checkpoint=path,
        optim=adam(),
        progress=False,
    )
    pyro.clear_param_store()
    pyro.set_rng_seed(99)
    resumed = fit(
        model,
        AutoNormal(model),
        batches=loader(),
        num_steps=15,
        checkpoint=path,
        optim=adam(),
        progress=False,
    )
    assert resumed.resumed_from == stop
    np.testing.assert_array_equal(resumed.elbo_trace, full.elbo_trace)
    for name, value in store().items():
        torch.testing.assert_close(value, full_params[name], rtol=0, atol=0)


def test_ctrl_c_in_a_step_gives_its_batch_back(tmp_path):
    pyro.set_rng_seed(4)
    full = fit(
        model, AutoNormal(model), batches=loader(), num_steps=12, optim=adam(), progress=False
    )

    calls = {"n": 0}

    def interrupting(x, y, num_data=NUM_DATA):
        calls["n"] += 1
        if calls["n"] == 9:  # the first run, then the model of step 7 (0-based) in its loss
            signal.raise_signal(signal.SIGINT)
        model(x, y, num_data)

    pyro.clear_param_store()
    pyro.set_rng_seed(4)
    path = tmp_path / "fit.pt"
    stopped = fit(
        interrupting,
        AutoNormal(model),
        batches=loader(),
        num_steps=12,
        checkpoint=path,
        optim=adam(),
        progress=False,
    )
    assert stopped.interrupted and stopped.num_steps == 7
    pyro.clear_param_store()
    resumed = fit(
        model,
        AutoNormal(model),
        batches=loader(),
        num_steps=12,
        checkpoint=path,
        optim=adam(),
        progress=False,
    )
    np.testing.assert_array_equal(resumed.elbo_trace, full.elbo_trace)


def test_resume_with_fewer_batches_per_epoch_is_refused(tmp_path):
    path = tmp_path / "fit.pt"
    fit(model, AutoNormal(model), batches=loader(), num_steps=5, checkpoint=path, progress=False)
    pyro.clear_param_store()
    fewer = DataLoader(dataset(), batch_size=12)
    with pytest.raises(ValueError, match="cannot resume at batch 2 of epoch 1"):
        fit(model, AutoNormal(model), batches=fewer, num_steps=8, checkpoint=path, progress=False)


def test_a_damaged_batch_position_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "fit.pt"
    fit(model, AutoNormal(model), batches=loader(), num_steps=2, checkpoint=path, progress=False)
    state = torch.load(path, weights_only=True)
    del state["batches"]["index"]
    torch.save(state, path)
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match="entry 'batches.index' is missing"):
        fit(
            model,
            AutoNormal(model),
            batches=loader(),
            num_steps=4,
            checkpoint=path,
            progress=False,
        )
