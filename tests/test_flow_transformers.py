"""The elementwise transformers: exact derivatives, inverses, starts, tails and stability."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_flowvi.flows import (
    AffineTransformer,
    DeepSigmoidTransformer,
    GatedAffineTransformer,
    RationalQuadraticSpline,
    Transformer,
)

TRANSFORMERS = {
    "affine": lambda: AffineTransformer(),
    "gated": lambda: GatedAffineTransformer(),
    "spline": lambda: RationalQuadraticSpline(bins=5, bound=3.0),
    "spline-1bin": lambda: RationalQuadraticSpline(bins=1, bound=2.0),
    "dsf": lambda: DeepSigmoidTransformer(4),
    "dsf-1unit": lambda: DeepSigmoidTransformer(1),
}


def _params(
    transformer: Transformer, batch: tuple[int, ...], d: int, scale: float
) -> torch.Tensor:
    return scale * torch.randn(batch + (transformer.num_params, d))


def _derivative(transformer: Transformer, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    y, _ = transformer(x, params)
    (grad,) = torch.autograd.grad(y.sum(), x)
    return grad


@pytest.mark.parametrize("name", list(TRANSFORMERS))
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_log_derivative_inverse_and_monotonicity(name, scale):
    transformer = TRANSFORMERS[name]()
    params = _params(transformer, (50,), 3, scale)
    x = 2.5 * torch.randn(50, 3)
    y, log_derivative = transformer(x, params)
    assert y.shape == log_derivative.shape == (50, 3)
    # Elementwise map: the Jacobian is diagonal, its entries the derivative.
    torch.testing.assert_close(log_derivative, _derivative(transformer, x, params).log())
    x2, log_derivative_inv = transformer.inverse(y, params)
    torch.testing.assert_close(x2, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(log_derivative_inv, -log_derivative, atol=1e-8, rtol=1e-8)
    # Strictly increasing along a fine grid.
    grid = torch.linspace(-6, 6, 2001).unsqueeze(-1).expand(2001, 3)
    values, _ = transformer(grid, params[:1])
    assert bool((values.diff(dim=0) > 0).all())


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_zero_parameters_give_the_start(name):
    transformer = TRANSFORMERS[name]()
    x = 3 * torch.randn(20, 4)
    y, log_derivative = transformer(x, torch.zeros(transformer.num_params, 4))
    if name == "gated":
        gate = 1 / (1 + math.exp(-2.0))
        torch.testing.assert_close(y, gate * x, atol=1e-14, rtol=0)
        torch.testing.assert_close(log_derivative, torch.full_like(x, math.log(gate)))
    elif name == "dsf":  # spread offsets: near the identity (bounds in the docstring)
        assert float((y - x).abs().max()) <= 0.053 * 2  # H = 4 spreads its offsets wider
        assert float(log_derivative.abs().max()) <= 0.06
    else:
        torch.testing.assert_close(y, x, atol=1e-13, rtol=0)
        torch.testing.assert_close(log_derivative, torch.zeros_like(x), atol=1e-13, rtol=0)


def test_deep_sigmoid_default_start_bounds():
    transformer = DeepSigmoidTransformer()  # H = 8, spread 0.5: the documented bounds
    x = torch.linspace(-40, 40, 4001).unsqueeze(-1)
    y, log_derivative = transformer(x, torch.zeros(transformer.num_params, 1))
    assert float((y - x).abs().max()) <= 0.053
    assert float(log_derivative.abs().max()) <= 0.027
    torch.testing.assert_close(y[2000], x[2000])  # odd map: 0 -> 0
    exact = DeepSigmoidTransformer(offset_spread=0.0)
    y, log_derivative = exact(x, torch.zeros(exact.num_params, 1))
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)


def test_spline_tails_are_the_identity_and_the_derivative_is_continuous():
    spline = RationalQuadraticSpline(bins=6, bound=2.0)
    params = _params(spline, (), 5, 2.0)
    x = torch.tensor([-50.0, -2.5, 2.5, 7.0, 1e6])
    y, log_derivative = spline(x, params)
    assert torch.equal(y, x) and torch.equal(log_derivative, torch.zeros(5))
    # Just inside the bound the derivative is close to the tails' 1 (d_0 = d_K = 1).
    inside = torch.tensor([-2.0 + 1e-12, 2.0 - 1e-12]).expand(5, 2).T.contiguous()
    _, log_derivative = spline(inside, params)
    torch.testing.assert_close(log_derivative, torch.zeros_like(log_derivative), atol=1e-6, rtol=0)
    # The knots map onto themselves at the ends: y(+-B) = +-B.
    ends, _ = spline(torch.tensor([[-2.0] * 5, [2.0] * 5]), params)
    torch.testing.assert_close(ends, torch.tensor([[-2.0] * 5, [2.0] * 5]))


def test_spline_inverse_at_the_knots():
    spline = RationalQuadraticSpline(bins=4, bound=3.0)
    params = _params(spline, (), 1, 1.5)
    _, x_knots, _, y_knots, _ = spline._spline(params, torch.Size([]))
    x = x_knots[0].unsqueeze(-1)  # (K + 1, 1): every knot, both ends included
    y, _ = spline(x, params)
    torch.testing.assert_close(y[:, 0], y_knots[0])
    x2, _ = spline.inverse(y, params)
    torch.testing.assert_close(x2, x, atol=1e-12, rtol=0)


def test_spline_gradient_flows_to_every_parameter():
    spline = RationalQuadraticSpline(bins=3, bound=4.0)
    params = _params(spline, (), 2, 0.5).requires_grad_()
    x = torch.linspace(-3.9, 3.9, 200).unsqueeze(-1).expand(200, 2)
    y, log_derivative = spline(x, params)
    (grad,) = torch.autograd.grad((y * torch.randn_like(y)).sum() + log_derivative.sum(), params)
    assert bool((grad != 0).all())


def test_deep_sigmoid_is_stable_far_out():
    transformer = DeepSigmoidTransformer(3)
    params = _params(transformer, (), 2, 1.0)
    x = torch.tensor([[-300.0, 300.0], [-1e4, 1e4]])
    y, log_derivative = transformer(x, params)
    assert bool(y.isfinite().all() and log_derivative.isfinite().all())
    torch.testing.assert_close(log_derivative, _derivative(transformer, x, params).log())
    x2, _ = transformer.inverse(y, params)
    torch.testing.assert_close(x2, x, atol=1e-8, rtol=1e-10)


def test_deep_sigmoid_inverse_gradient_is_the_implicit_one():
    transformer = DeepSigmoidTransformer(3)
    params = _params(transformer, (), 2, 1.0).requires_grad_()
    y = torch.randn(6, 2)
    x, _ = transformer.inverse(y, params)
    y_again, _ = transformer(x, params)
    # y_again = y whatever the parameters, so its gradient must vanish.
    (grad,) = torch.autograd.grad((y_again * torch.randn_like(y_again)).sum(), params)
    assert float(grad.abs().max()) < 1e-8


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_broadcasting_and_float32(name):
    transformer = TRANSFORMERS[name]()
    params = _params(transformer, (4, 1), 3, 1.0)
    x = torch.randn(5, 3)
    y, log_derivative = transformer(x, params)
    assert y.shape == log_derivative.shape == (4, 5, 3)
    y32, log_derivative32 = transformer.to(torch.float32)(x.float(), params.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, y.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(log_derivative32, log_derivative.float(), atol=1e-4, rtol=1e-4)
    x32, _ = transformer.inverse(y32, params.float())
    torch.testing.assert_close(x32, x.expand(4, 5, 3).float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: AffineTransformer(0.0), "max_log_scale must be > 0, got 0.0"),
        (lambda: RationalQuadraticSpline(bins=0), "bins must be an int >= 1, got 0"),
        (lambda: RationalQuadraticSpline(bound=-1.0), "bound must be > 0, got -1.0"),
        (lambda: RationalQuadraticSpline(bins=4, min_bin_width=0.3), r"min_bin_width.*0\.3"),
        (lambda: RationalQuadraticSpline(min_derivative=1.0), "min_derivative.*got 1.0"),
        (lambda: DeepSigmoidTransformer(0), "hidden_units must be an int >= 1, got 0"),
        (lambda: DeepSigmoidTransformer(offset_spread=-1.0), "offset_spread must be >= 0"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_wrong_parameter_shape_is_named():
    with pytest.raises(
        ValueError, match=r"params must have shape \(\.\.\., 14, D\), got \(3, 4\)"
    ):
        RationalQuadraticSpline(bins=5)(torch.randn(4), torch.randn(3, 4))
