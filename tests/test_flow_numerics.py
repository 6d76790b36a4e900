"""The numerical kernels of the flow layers: Björck orthonormalisation and monotone roots."""

from __future__ import annotations

import warnings

import pytest
import torch

from pyro_flowvi.flows._numerics import orthogonalize, solve_monotone


def _polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def _with_condition_number(d: int, m: int, kappa: float) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(d, m))
    v, _ = torch.linalg.qr(torch.randn(m, m))
    return 3.0 * u @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(kappa)), m)) @ v.T


@pytest.mark.parametrize(("d", "m", "kappa"), [(5, 5, 1.0), (6, 3, 30.0), (8, 8, 1e4)])
def test_orthogonalize_is_the_polar_factor(d, m, kappa):
    matrix = _with_condition_number(d, m, kappa)
    q = orthogonalize(matrix)
    torch.testing.assert_close(q.mT @ q, torch.eye(m), atol=1e-13, rtol=0)
    torch.testing.assert_close(q, _polar_factor(matrix), atol=1e-10, rtol=0)


def test_orthogonalize_batched():
    matrix = torch.stack([_with_condition_number(5, 3, k) for k in (1.0, 10.0, 100.0)])
    q = orthogonalize(matrix)
    for i in range(3):
        torch.testing.assert_close(q[i], _polar_factor(matrix[i]), atol=1e-10, rtol=0)


def test_orthogonalize_stays_orthonormal_when_the_iteration_is_cut_short():
    # Beyond max_iter the QR finish returns an exactly orthonormal matrix (the flows'
    # log-determinants assume one), not a half-converged iterate.
    matrix = _with_condition_number(6, 4, 1e8)
    q = orthogonalize(matrix, max_iter=4)
    torch.testing.assert_close(q.mT @ q, torch.eye(4), atol=1e-13, rtol=0)


@pytest.mark.parametrize("kappa", [1.0, 1e10])
def test_orthogonalize_traces_and_agrees_with_eager(kappa):
    matrix = _with_condition_number(6, 4, 3.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch.jit.trace.* is deprecated", DeprecationWarning)
        traced = torch.jit.trace(orthogonalize, (matrix,), check_trace=False)
    other = _with_condition_number(6, 4, kappa)  # a new input, far harder when kappa = 1e10
    q = traced(other)
    torch.testing.assert_close(q.mT @ q, torch.eye(4), atol=1e-13, rtol=0)
    if kappa == 1.0:
        torch.testing.assert_close(q, orthogonalize(other), atol=1e-12, rtol=0)


def test_orthogonalize_gradient_is_that_of_the_polar_factor():
    matrix = _with_condition_number(5, 3, 5.0).requires_grad_()
    weights = torch.randn(5, 3)
    (grad,) = torch.autograd.grad((weights * orthogonalize(matrix)).sum(), matrix)
    (expected,) = torch.autograd.grad((weights * _polar_factor(matrix)).sum(), matrix)
    torch.testing.assert_close(grad, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize(("shape", "kappa"), [((6, 6), 30.0), ((7, 3), 5.0), ((2, 5, 4), 10.0)])
def test_orthogonalize_jacobian_is_that_of_the_polar_factor(shape, kappa):
    # The derivative is added in closed form at the converged iterate; it must be the exact
    # derivative of the polar factor (square, tall and batched matrices), which the SVD's
    # derivative gives where the singular values are distinct.
    batch = shape[:-2]
    matrix = torch.stack(
        [_with_condition_number(*shape[-2:], kappa) for _ in range(max(1, *batch, 1))]
    ).reshape(shape)
    jacobian = torch.autograd.functional.jacobian(orthogonalize, matrix)
    expected = torch.autograd.functional.jacobian(_polar_factor, matrix)
    torch.testing.assert_close(jacobian, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthogonalize_value_does_not_depend_on_the_grad_mode(dtype):
    matrix = _with_condition_number(8, 5, 100.0).to(dtype)
    with torch.no_grad():
        plain = orthogonalize(matrix)
    tracked = orthogonalize(matrix.clone().requires_grad_())
    assert tracked.requires_grad
    assert torch.equal(tracked.detach(), plain)
    torch.testing.assert_close(
        tracked.detach().mT @ tracked.detach(),
        torch.eye(5, dtype=dtype),
        atol=10 * torch.finfo(dtype).eps,
        rtol=0,
    )


def test_orthogonalize_gradient_float32_matches_float64():
    matrix = _with_condition_number(6, 6, 20.0).requires_grad_()
    weights = torch.randn(6, 6)
    (grad64,) = torch.autograd.grad((weights * orthogonalize(matrix)).sum(), matrix)
    single = matrix.detach().float().requires_grad_()
    (grad32,) = torch.autograd.grad((weights.float() * orthogonalize(single)).sum(), single)
    torch.testing.assert_close(grad32.double(), grad64, atol=1e-4, rtol=1e-4)


def test_solve_monotone_finds_roots_of_a_nasty_increasing_function():
    # f(a) = a^3 + a - t: Newton from far away overshoots; the bracket keeps it safe.
    target = torch.tensor([-1e6, -3.0, 0.0, 1e-9, 2.5, 1e6])

    def function(a):
        return a**3 + a - target, 3 * a**2 + 1

    root = solve_monotone(function, torch.full_like(target, -1e3), torch.full_like(target, 1e3))
    torch.testing.assert_close(root**3 + root, target, atol=1e-9, rtol=1e-12)


def test_solve_monotone_zero_slope_falls_back_to_bisection():
    # f(a) = a^3 - t has slope 0 at the root a = 0, where Newton divides by zero.
    target = torch.tensor([0.0, 8.0])

    def function(a):
        return a**3 - target, 3 * a**2

    root = solve_monotone(function, torch.full((2,), -5.0), torch.full((2,), 5.0))
    torch.testing.assert_close(root, torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
