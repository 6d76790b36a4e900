"""pyro_flowvi.bnn leans on public API only, except for the one adapter module whose internal
is checked here, so that a Pyro or torch release that changes it fails this file loudly."""

from __future__ import annotations

import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

import pyro_flowvi.bnn as bnn
from pyro_flowvi.bnn import (
    AutoMNFGuide,
    BayesianMLP,
    GaussianWeight,
    fit_epochs,
    local_reparameterization,
)
from pyro_flowvi.bnn._pyro_internals import check_internals, innermost_trace
from pyro_flowvi.flows.base import Compose
from pyro_flowvi.flows.coupling import MaskedCoupling, alternating_mask

PACKAGE = Path(bnn.__file__).parent
ADAPTER = "_pyro_internals.py"
# private names that broke other BNN libraries (or could): only the adapter may use them
PRIVATE = (
    r"_PYRO_STACK",
    r"torch\._C\b",
    r"\._parameters\b",
    r"prototype_hide_fn",
    r"_check_prototype",
    r"\.__dict__\[",
    r"DisableTorchFunction",
    r"from pyro[\w.]* import _",
)


def test_the_internal_the_adapter_reads_still_exists():
    check_internals()  # raises RuntimeError naming the internal when Pyro changes it
    assert innermost_trace() is None
    with poutine.trace() as outer:
        assert innermost_trace() is outer.trace
        with poutine.trace() as inner:
            assert innermost_trace() is inner.trace
        assert innermost_trace() is outer.trace


def test_only_the_adapter_touches_private_names():
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == ADAPTER:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(pattern, line) for pattern in PRIVATE):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "private internals outside the adapter:\n" + "\n".join(offenders)


def test_guide_factor_guard_sees_the_guide_trace():
    # the guard that the adapter serves: a factor after a GaussianWeight draw, in one trace
    def guide():
        pyro.sample("w", GaussianWeight(torch.zeros(2, 2), torch.ones(2, 2)))
        pyro.factor("aux", torch.tensor(0.0))

    with local_reparameterization(), pytest.raises(ValueError, match="has_rsample"):
        poutine.trace(guide).get_trace()


def test_reparameterized_weight_behaves_as_a_plain_tensor_elsewhere():
    loc = torch.randn(3, 4, requires_grad=True)

    def guide():
        return pyro.sample("w", GaussianWeight(loc, torch.ones(3, 4)))

    with local_reparameterization():
        w = guide()
    assert type(w) is not torch.Tensor
    results = [
        w * 2,
        torch.cat([w, w]),
        torch.stack((w, w), dim=0),
        w.t(),
        w[0],
        torch.nn.functional.linear(torch.randn(2, 4), w.t().t().contiguous()),
        dist.Normal(0.0, 1.0).log_prob(w),
    ]
    assert all(type(r) is torch.Tensor for r in results)
    assert w.shape == (3, 4) and w.dim() == 2
    sum(r.sum() for r in results).backward()
    assert loc.grad is not None and torch.isfinite(loc.grad).all()


def test_mnf_couplings_are_masked_coupling_layers_on_views_of_the_packed_parameter():
    model = BayesianMLP(5, 1, (4,), likelihood="normal", noise_precision_prior=(6.0, 6.0))
    guide = AutoMNFGuide(model, num_transforms=2, num_r_transforms=3, hidden_dims=(6, 3))
    x, y = torch.randn(8, 5), torch.randn(8)
    fit_epochs(model, guide, x, y, num_epochs=3, batch_size=4, loss=TraceMeanField_ELBO())
    layer = guide.weights.get_submodule("layers.0.weight")
    # no parameter outside the PyroParams: Pyro's optimizer sees everything that is learned
    names = [name for name, _ in guide.named_parameters()]
    assert all(name.endswith("_unconstrained") for name in names), names
    _, flows = layer.unpack()
    sizes = 0
    for which, num in (("flow_q", 2), ("flow_r", 3)):
        # the same stack of flow layers (unscaled readouts: MNF's functional map), loaded
        # with the views, is the same map
        reference = Compose(
            [
                MaskedCoupling(5, alternating_mask(5, k), (6, 3), readout_scale=1.0)
                for k in range(num)
            ]
        )
        state = {}
        for k, (mask, linears) in enumerate(flows[which]):
            assert torch.equal(mask, alternating_mask(5, k))
            for i, (weight, bias) in enumerate(linears):
                state[f"layers.{k}.net.{2 * i}.weight"] = weight
                state[f"layers.{k}.net.{2 * i}.bias"] = bias
            state[f"layers.{k}.mask"] = mask
        reference.load_state_dict(state)
        z = torch.randn(7, 5)
        mine = layer._run(which, flows, z)
        theirs = reference(z)
        assert torch.allclose(mine[0], theirs[0]) and torch.allclose(mine[1], theirs[1])
        assert not torch.allclose(mine[0], z)  # trained away from the identity start
        sizes += sum(p.numel() for p in reference.parameters())
    # one flat parameter: the 7 vectors of q(z0) and r, then both stacks
    assert layer.aux_unconstrained.numel() == 7 * 5 + sizes


def test_mnf_state_dict_holds_parameters_only():
    model = BayesianMLP(3, 2, (4,))
    guide = AutoMNFGuide(model, hidden_dims=(5,))
    guide(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    keys = list(guide.state_dict())
    assert all(k.endswith("_unconstrained") for k in keys), keys
    assert sum(k.endswith("aux_unconstrained") for k in keys) == 2
