"""The zuko adapter: exact log-densities through zuko flows, and no global side effects.

zuko is optional: without it these tests skip. Importing zuko switches off torch's
distribution validation globally, so the in-process tests import it through a module-scoped
fixture that puts torch's class attributes back afterwards, and the validation tests run in
fresh interpreters.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
from test_flows import (
    _check_gradients,
    _check_inverse,
    _check_log_det,
    _check_shapes,
    _check_state_dict,
    _perturb,
)
from torch.distributions import Distribution

from pyro_flowvi.flows import Compose, Planar, ZukoFlow, as_flow

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("zuko") is None, reason="zuko is an optional extra"
)


@pytest.fixture(scope="module")
def zuko():
    saved = {name: Distribution.__dict__[name] for name in ("arg_constraints", "_validate_args")}
    try:
        import zuko

        yield zuko
    finally:
        for name, value in saved.items():
            setattr(Distribution, name, value)


def _cases(zuko):
    # name -> (build, input_dim, context_dim); small networks, float64 (the conftest default)
    return {
        "nsf": (lambda: zuko.flows.NSF(3, transforms=2, hidden_features=(8,)), 3, None),
        "maf-ctx": (
            lambda: zuko.flows.MAF(3, context=2, transforms=2, hidden_features=(8,)),
            3,
            2,
        ),
        "lazy-transform": (
            lambda: zuko.flows.MaskedAutoregressiveTransform(3, hidden_features=(8,)),
            3,
            None,
        ),
        "built-transform": (
            lambda: zuko.transforms.MonotonicAffineTransform(
                torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, -0.2, 1.0])
            ),
            3,
            None,
        ),
    }


@pytest.mark.parametrize("name", ["nsf", "maf-ctx", "lazy-transform", "built-transform"])
def test_zuko_flows_pass_the_flow_contract(zuko, name):
    build, input_dim, context_dim = _cases(zuko)[name]

    def make():
        return as_flow(build(), input_dim, context_dim)

    layer = make()
    assert isinstance(layer, ZukoFlow)
    _perturb(layer, 0.2)
    _check_shapes(layer)
    _check_log_det(layer)
    _check_inverse(layer)
    _check_gradients(layer)
    _check_state_dict(layer, make)


def test_a_zuko_flow_keeps_its_law_with_our_base(zuko):
    # The layer applies the zuko flow's sampling map to a base draw, and its log-density is
    # the zuko flow's: log q(x) = log N(z) - ladj = zuko's log_prob(x) (same N(0, I) base).
    flow = zuko.flows.NSF(3, transforms=2, hidden_features=(8,))
    layer = as_flow(flow, 3)
    z = torch.randn(6, 3)
    x, ladj = layer(z)
    torch.testing.assert_close(x, flow.transform().inv(z))
    base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(base - ladj, flow().log_prob(x))


def test_context_reaches_a_conditional_zuko_flow(zuko):
    flow = zuko.flows.MAF(2, context=3, transforms=1, hidden_features=(8,))
    layer = as_flow(flow, 2, context_dim=3)
    z = torch.randn(2)
    y1, _ = layer(z, torch.zeros(3))
    y2, _ = layer(z, torch.ones(3))
    assert not torch.allclose(y1, y2)
    y, ladj = layer(torch.randn(4, 2), torch.randn(5, 1, 3))  # broadcast both ways
    assert y.shape == (5, 4, 2) and ladj.shape == (5, 4)


def test_zuko_flow_composes_and_trains_with_our_layers(zuko):
    flow = Compose([as_flow(zuko.flows.NSF(3, transforms=1, hidden_features=(8,)), 3), Planar(3)])
    names = [name for name, _ in flow.named_parameters()]
    assert any(name.startswith("layers.0.lazy.") for name in names)
    y, ladj = flow(torch.randn(5, 3))
    (y.sum() + ladj.sum()).backward()
    assert all(p.grad is not None for p in flow.parameters())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda zuko: as_flow(zuko.flows.NSF(4), 3), "does not act on a latent of size 3"),
        (lambda zuko: as_flow(zuko.flows.MAF(3, context=2), 3), "does not act on a latent"),
        (lambda zuko: as_flow(torch.nn.Linear(3, 3), 3), "got Linear"),
        (lambda zuko: as_flow("nsf", 3), "got str"),
        (lambda zuko: as_flow(Planar(3), 4), "input_dim=3.*expected input_dim=4"),
        (
            lambda zuko: as_flow(torch.distributions.transforms.ExpTransform(), 3, context_dim=2),
            "takes no context",
        ),
    ],
)
def test_errors(zuko, call, match):
    with pytest.raises(ValueError, match=match):
        call(zuko)


def test_our_flows_pass_through():
    layer = Planar(3)
    assert as_flow(layer, 3) is layer


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True)


def test_import_does_not_import_zuko_and_the_adapter_keeps_pyro_validation():
    _run(
        """
        import sys
        import pyro, torch
        import pyro.distributions as dist
        import pyro_flowvi, pyro_flowvi.flows, pyro_flowvi.flows.zuko, pyro_flowvi.guides
        import pyro_flowvi.amortized, pyro_flowvi.bnn, pyro_flowvi.diagnostics
        from pyro_flowvi.flows import as_flow
        assert "zuko" not in sys.modules, "importing pyro_flowvi imported zuko"
        pyro.enable_validation(True)
        layer = as_flow(torch.distributions.transforms.ExpTransform(), 3)  # imports zuko
        assert "zuko" in sys.modules
        try:
            dist.Normal(0.0, -1.0)
        except ValueError:
            pass
        else:
            raise AssertionError("validation is off after the adapter imported zuko")
        # The adapter follows Pyro's setting, also when the user turned validation off.
        pyro.enable_validation(False)
        as_flow(torch.distributions.transforms.ExpTransform(), 3)
        dist.Normal(0.0, -1.0)
        """
    )


def test_validation_works_after_a_user_imported_zuko_and_used_the_adapter():
    _run(
        """
        import warnings
        warnings.simplefilter("error")
        import pyro, torch
        import pyro.distributions as dist
        from pyro_flowvi.flows import as_flow
        pyro.enable_validation(True)
        import zuko  # the user's import switches torch's validation off
        layer = as_flow(zuko.flows.NSF(3, transforms=1), 3)
        y, ladj = layer(torch.randn(4, 3))
        try:
            dist.Normal(0.0, -1.0)
        except ValueError:
            pass
        else:
            raise AssertionError("validation is still off after as_flow")
        # zuko's own distributions still work, without warnings, under validation.
        d = zuko.flows.NSF(3, transforms=1)()
        d.log_prob(d.sample((2,)))
        """
    )
