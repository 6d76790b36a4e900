"""Contract tests for the masked affine coupling layer."""

from __future__ import annotations

import io

import pytest
import torch

from pyro_flowvi.flows.base import Compose
from pyro_flowvi.flows.coupling import MaskedCoupling, alternating_mask


def randomize_(layer: torch.nn.Module, scale: float = 0.5) -> None:
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, scale)


def autograd_ladj(layer: MaskedCoupling, x: torch.Tensor, context=None) -> torch.Tensor:
    def f(v):
        return layer(v, context)[0]

    jac = torch.autograd.functional.jacobian(f, x)
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("dim", [1, 2, 5])
@pytest.mark.parametrize("parity", [0, 1])
def test_log_det_matches_autograd_at_random_parameters(dim, parity):
    layer = MaskedCoupling(dim, alternating_mask(dim, parity), hidden_dims=(7, 6))
    randomize_(layer)
    for x in torch.randn(4, dim):
        _, ladj = layer(x)
        assert torch.allclose(ladj, autograd_ladj(layer, x), atol=1e-10)


def test_conditional_log_det_and_inverse():
    layer = MaskedCoupling(4, hidden_dims=(8,), context_dim=3)
    randomize_(layer)
    context = torch.randn(3)
    for x in torch.randn(3, 4):
        y, ladj = layer(x, context)
        assert torch.allclose(ladj, autograd_ladj(layer, x, context), atol=1e-10)
        x_back, ladj_inv = layer.inverse(y, context)
        assert torch.allclose(x_back, x, atol=1e-10)
        assert torch.allclose(ladj_inv, -ladj, atol=1e-10)
    # the context broadcasts against a batch
    y, ladj = layer(torch.randn(5, 4), context)
    assert y.shape == (5, 4) and ladj.shape == (5,)
    with pytest.raises(ValueError, match="needs a context"):
        layer(torch.randn(4))


def test_batch_shapes_inverse_and_kept_coordinates():
    layer = MaskedCoupling(6, hidden_dims=(10,))
    randomize_(layer)
    x = torch.randn(2, 3, 6)
    y, ladj = layer(x)
    assert y.shape == x.shape and ladj.shape == (2, 3)
    kept = layer.mask.bool()
    assert torch.equal(y[..., kept], x[..., kept])
    x_back, ladj_inv = layer.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-12)
    assert torch.allclose(ladj_inv, -ladj, atol=1e-12)


def test_fresh_layer_is_identity_and_stack_transforms_every_coordinate():
    x = torch.randn(8, 5)
    y, ladj = MaskedCoupling(5)(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(8))
    stack = Compose([MaskedCoupling(5, alternating_mask(5, k), (8,)) for k in range(2)])
    randomize_(stack)
    y, _ = stack(x)
    assert bool(torch.all(y != x))


def test_gradient_reaches_every_parameter_and_state_dict_round_trip():
    layer = MaskedCoupling(4, hidden_dims=(6, 6))
    randomize_(layer)
    y, ladj = layer(torch.randn(10, 4))
    (y.pow(2).sum() + ladj.sum()).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = MaskedCoupling(4, hidden_dims=(6, 6))
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(3, 4)
    assert torch.equal(other(x)[0], layer(x)[0])


def test_log_scale_is_bounded():
    layer = MaskedCoupling(2, hidden_dims=(4,), log_scale_bound=1.5)
    randomize_(layer, scale=50.0)
    _, ladj = layer(10 * torch.randn(100, 2))
    assert bool(torch.all(ladj.abs() <= 1.5 + 1e-12))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask": torch.tensor([0.0, 2.0, 1.0])}, "mask must be a 0/1"),
        ({"mask": torch.ones(2)}, "mask must be a 0/1"),
        ({"hidden_dims": (0,)}, "hidden_dims"),
        ({"log_scale_bound": 0.0}, "log_scale_bound"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskedCoupling(3, **kwargs)
