"""The inverses of the flow layers: Sylvester's vectorized Newton solve against the sequential
back-substitution it replaced, its fallback and its gradients; the autoregressive inverse.

(The shared round-trip and gradient checks of every layer are in tests/test_flows.py.)
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from pyro_flowvi.flows import (
    IAF,
    MADE,
    Autoregressive,
    DeepSigmoidTransformer,
    RationalQuadraticSpline,
    Sylvester,
)
from pyro_flowvi.flows import sylvester as sylvester_module
from pyro_flowvi.flows.planar import _solve_tanh_equation

C = 2  # context size of the conditional cases


def _sequential_inverse(
    layer: Sylvester, y: torch.Tensor, context: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse as the layer computed it before the vectorized solve: back-substitution on
    ``v = Q^T x``, one scalar bracketed solve per component (with its own implicit-function
    step), everything under autograd."""
    q, r, r_tilde, b, r_diag, r_tilde_diag = layer._params(context)
    w = layer._project(y, q)
    v_parts: list[torch.Tensor] = []
    act_parts: list[torch.Tensor] = []
    for i in range(layer.num_ortho_vectors - 1, -1, -1):
        target, shift = w[..., i], b[..., i]
        if v_parts:
            later_v = torch.stack(v_parts[::-1], dim=-1)
            later_act = torch.stack(act_parts[::-1], dim=-1)
            target = target - (r[..., i, i + 1 :] * later_act).sum(-1)
            shift = shift + (r_tilde[..., i, i + 1 :] * later_v).sum(-1)
        v_i = _solve_tanh_equation(target, r_diag[..., i], r_tilde_diag[..., i], shift)
        v_parts.append(v_i)
        act_parts.append(torch.tanh(r_tilde_diag[..., i] * v_i + shift))
    v = torch.stack(v_parts[::-1], dim=-1)
    activation = torch.stack(act_parts[::-1], dim=-1)
    x = layer._embed(v, q)
    if layer.num_ortho_vectors < layer.input_dim:
        x = x + (y - layer._embed(w, q))
    return x, -layer._ladj(activation, r_diag, r_tilde_diag).expand(x.shape[:-1])


def _set_raw(layer: Sylvester, name: str, value: torch.Tensor) -> None:
    """Set an unconstrained parameter (for a conditional layer: its head's bias, with the
    head's weight rows zeroed so that every context gets ``value``)."""
    with torch.no_grad():
        if layer.context_dim is None:
            getattr(layer, name).copy_(value)
            return
        start = 0
        for key, shape in layer._shapes.items():
            size = int(torch.tensor(shape).prod())
            if key == name:
                layer.head.bias[start : start + size] = value.reshape(-1)
                layer.head.weight[start : start + size] = 0
                return
            start += size
        raise KeyError(name)


def _sylvester(
    variant: str, dim: int, num_vectors: int | None, context_dim: int | None, regime: str
) -> Sylvester:
    """A Sylvester layer at trained-like parameters, in one of the regimes the inverse must
    survive: ``trained`` (every parameter moved by 0.5 standard deviations), ``near-singular``
    (also :math:`r_{ii} \\tilde r_{ii} = -\\tanh(3.8)^2 \\approx -0.998`, so that the
    derivative of a component can be 0.002) and ``large-b`` (also :math:`|b| \\sim 20`:
    saturated activations)."""
    layer = Sylvester(dim, variant, num_ortho_vectors=num_vectors, context_dim=context_dim)
    m = layer.num_ortho_vectors
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    if regime == "near-singular":
        signs = torch.where(torch.rand(m) < 0.5, -1.0, 1.0)
        _set_raw(layer, "r_diag_raw", 3.8 * signs)
        _set_raw(layer, "r_tilde_diag_raw", -3.8 * signs)
    elif regime == "large-b":
        _set_raw(layer, "b", 20 * torch.randn(m))
    return layer


SYLVESTER_CASES = {
    "orthogonal-d6": ("orthogonal", 6, None, None),
    "orthogonal-d7-m3": ("orthogonal", 7, 3, None),
    "orthogonal-d5-ctx": ("orthogonal", 5, None, C),
    "householder-d6": ("householder", 6, None, None),
    "householder-d6-m4-ctx": ("householder", 6, 4, C),
    "triangular-d6": ("triangular", 6, None, None),
    "triangular-d6-m4": ("triangular", 6, 4, None),
}
REGIMES = ["trained", "near-singular", "large-b"]


def _inputs(layer: Sylvester, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = 2 * torch.randn(batch, layer.input_dim)
    context = None if layer.context_dim is None else torch.randn(batch, layer.context_dim)
    return x, context


def _inverse_condition(layer: Sylvester, x: torch.Tensor, context: torch.Tensor | None) -> float:
    """Largest infinity-norm of dx/dy over the points (how much rounding of y can move x)."""
    worst = 0.0
    for i in range(x.shape[0]):
        context_i = None if context is None else context[i]
        jacobian = torch.autograd.functional.jacobian(lambda v, c=context_i: layer(v, c)[0], x[i])
        worst = max(worst, float(torch.linalg.inv(jacobian).abs().sum(-1).max()))
    return worst


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("case", list(SYLVESTER_CASES))
def test_sylvester_inverse_matches_back_substitution(case, regime):
    layer = _sylvester(*SYLVESTER_CASES[case], regime)
    x, context = _inputs(layer, 16)
    with torch.no_grad():
        y, ladj = layer(x, context)
        x_new, ladj_new = layer.inverse(y, context)
        x_ref, ladj_ref = _sequential_inverse(layer, y, context)
        y_new, ladj_fwd = layer(x_new, context)
    # Backward stable: the recovered point maps onto y with the log-det of that point.
    torch.testing.assert_close(y_new, y, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ladj_new, -ladj_fwd, atol=1e-10, rtol=1e-10)
    # The same root as the sequential solve, to the rounding of y amplified by dx/dy.
    slack = 1e-13 * _inverse_condition(layer, x, context) * (1 + float(y.abs().max()))
    torch.testing.assert_close(x_new, x_ref, atol=1e-10 + slack, rtol=1e-10)
    torch.testing.assert_close(x_new, x, atol=1e-10 + slack, rtol=1e-10)
    torch.testing.assert_close(ladj_new, ladj_ref, atol=1e-10 + 1e3 * slack, rtol=1e-10)


def _log_prob_gradients(
    inverse, layer: Sylvester, y: torch.Tensor, context: torch.Tensor | None
) -> list[torch.Tensor]:
    """Gradients of a weighted sum of log q(y) (standard normal base) with respect to the
    layer's parameters, the point and the context."""
    y = y.detach().requires_grad_()
    inputs = [y, *layer.parameters()]
    if context is not None:
        context = context.detach().requires_grad_()
        inputs.append(context)
    x, ladj = inverse(layer, y, context)
    log_q = -0.5 * (x * x).sum(-1) + ladj
    weights = torch.linspace(0.5, 1.5, log_q.shape[0])
    return list(torch.autograd.grad((weights * log_q).sum(), inputs, allow_unused=True))


def _vectorized_inverse(
    layer: Sylvester, y: torch.Tensor, context: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.inverse(y, context)


def _assert_gradients_close(layer, y, context) -> None:
    new = _log_prob_gradients(_vectorized_inverse, layer, y, context)
    ref = _log_prob_gradients(_sequential_inverse, layer, y, context)
    for g_new, g_ref in zip(new, ref, strict=True):
        if g_ref is None:
            assert g_new is None or float(g_new.abs().max()) == 0
            continue
        scale = 1 + float(g_ref.abs().max())
        torch.testing.assert_close(g_new, g_ref, atol=1e-8 * scale, rtol=1e-7)


@pytest.mark.parametrize("regime", ["trained", "large-b"])
@pytest.mark.parametrize("case", list(SYLVESTER_CASES))
def test_sylvester_log_prob_gradient_matches_the_sequential_solve(case, regime):
    layer = _sylvester(*SYLVESTER_CASES[case], regime)
    x, context = _inputs(layer, 5)
    with torch.no_grad():
        y, _ = layer(x, context)
    _assert_gradients_close(layer, y, context)


def test_sylvester_inverse_jacobian_is_the_inverse_of_the_forward_jacobian():
    layer = _sylvester("orthogonal", 6, None, None, "near-singular")
    x = 2 * torch.randn(6)
    with torch.no_grad():
        y, _ = layer(x)
    forward = torch.autograd.functional.jacobian(lambda v: layer(v)[0], x)
    inverse = torch.autograd.functional.jacobian(lambda v: layer.inverse(v)[0], y)
    torch.testing.assert_close(inverse @ forward, torch.eye(6), atol=1e-8, rtol=0)


class _CountFallback:
    """Wraps ``_back_substitute`` and counts the points it solves."""

    def __init__(self) -> None:
        self.points = 0
        self.original = sylvester_module._back_substitute

    def __call__(self, a: torch.Tensor, a_matrix: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        assert a.dim() == 2 and a_matrix.shape == a.shape + a.shape[-1:] == c.shape + (
            a.shape[-1],
        )
        self.points += a.shape[0]
        return self.original(a, a_matrix, c)


@pytest.fixture
def fallback(monkeypatch):
    counter = _CountFallback()
    monkeypatch.setattr(sylvester_module, "_back_substitute", counter)
    return counter


@pytest.mark.parametrize("case", ["orthogonal-d6", "orthogonal-d5-ctx", "triangular-d6-m4"])
def test_sylvester_newton_needs_no_fallback_at_trained_parameters(case, fallback):
    layer = _sylvester(*SYLVESTER_CASES[case], "trained")
    x, context = _inputs(layer, 64)
    with torch.no_grad():
        y, _ = layer(x, context)
        layer.inverse(y, context)
    assert fallback.points == 0


def _easy_points(layer: Sylvester, count: int) -> torch.Tensor:
    """Points whose pre-activation c = R~ Q^T y + b is zero: Newton's start a = c is the root
    (G(0) = A tanh(0) = 0), so they converge at the first step."""
    with torch.no_grad():
        q, _, r_tilde, b, _, _ = layer._params(None)
        w = torch.linalg.solve_triangular(r_tilde, -b.unsqueeze(-1), upper=True).squeeze(-1)
        y = layer._embed(w.expand(count, -1), q)
    return y


@pytest.mark.parametrize("newton_steps", [0, 1])
def test_sylvester_fallback_solves_the_points_newton_leaves(newton_steps, fallback, monkeypatch):
    monkeypatch.setattr(sylvester_module, "NEWTON_STEPS", newton_steps)
    layer = _sylvester("orthogonal", 6, None, None, "trained")
    x, _ = _inputs(layer, 6)
    with torch.no_grad():
        y_hard, _ = layer(x)
    y = torch.cat([y_hard[:3], _easy_points(layer, 2), y_hard[3:]])
    with torch.no_grad():
        x_new, ladj_new = layer.inverse(y)
        x_ref, ladj_ref = _sequential_inverse(layer, y)
    # One step converges exactly the points that start at their root; no step, none.
    assert fallback.points == (6 if newton_steps else 8)
    torch.testing.assert_close(x_new, x_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ladj_new, ladj_ref, atol=1e-10, rtol=1e-10)
    _assert_gradients_close(layer, y, None)


def test_sylvester_fallback_with_a_matrix_per_point(fallback, monkeypatch):
    # A conditional layer has one A per context: the fallback must pick each point's own.
    monkeypatch.setattr(sylvester_module, "NEWTON_STEPS", 2)
    layer = _sylvester("householder", 6, 4, C, "near-singular")
    x, context = _inputs(layer, 12)
    with torch.no_grad():
        y, _ = layer(x, context)
        x_new, ladj_new = layer.inverse(y, context)
        x_ref, ladj_ref = _sequential_inverse(layer, y, context)
    assert 0 < fallback.points <= 12
    slack = 1e-13 * _inverse_condition(layer, x, context) * (1 + float(y.abs().max()))
    torch.testing.assert_close(x_new, x_ref, atol=1e-10 + slack, rtol=1e-10)
    torch.testing.assert_close(ladj_new, ladj_ref, atol=1e-10 + 1e3 * slack, rtol=1e-10)


def test_sylvester_inverse_broadcasts_a_context_against_the_points():
    layer = _sylvester("orthogonal", 5, None, C, "trained")
    x = torch.randn(4, 5)
    context = torch.randn(3, 1, C)
    with torch.no_grad():
        y, _ = layer(x, context)
        x_new, ladj_new = layer.inverse(y, context)
        _, ladj = layer(x_new, context)
    assert x_new.shape == (3, 4, 5) and ladj_new.shape == (3, 4)
    torch.testing.assert_close(x_new, x.expand(3, 4, 5), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ladj_new, -ladj, atol=1e-10, rtol=1e-10)


def test_sylvester_inverse_survives_a_diagonal_that_rounds_to_minus_one():
    # tanh(+-40) is +-1 in float64: r_ii r~_ii = -1, the edge of invertibility (the component
    # map a - tanh(a) has a zero derivative at a = 0 only). The inverse must stay finite and
    # backward stable, and its gradient finite.
    layer = _sylvester("orthogonal", 4, None, None, "trained")
    _set_raw(layer, "r_diag_raw", torch.full((4,), 40.0))
    _set_raw(layer, "r_tilde_diag_raw", torch.full((4,), -40.0))
    x = 2 * torch.randn(8, 4)
    with torch.no_grad():
        y, _ = layer(x)
        x_new, ladj_new = layer.inverse(y)
        y_new, _ = layer(x_new)
    assert bool(x_new.isfinite().all() and ladj_new.isfinite().all())
    torch.testing.assert_close(y_new, y, atol=1e-10, rtol=1e-10)
    grads = _log_prob_gradients(_vectorized_inverse, layer, y, None)
    assert all(bool(g.isfinite().all()) for g in grads if g is not None)


def test_sylvester_inverse_value_does_not_depend_on_grad_mode():
    layer = _sylvester("orthogonal", 6, None, None, "trained")
    x, _ = _inputs(layer, 5)
    with torch.no_grad():
        y, _ = layer(x)
        without = layer.inverse(y)
    with_grad = layer.inverse(y)
    for a, b in zip(without, with_grad, strict=True):
        assert torch.equal(a, b.detach())


# ---------------------------------------------------------------------------------------------
# autoregressive layers


@pytest.mark.parametrize(
    ("dim", "hidden_dims", "context_dim", "skip"),
    [
        (5, [12, 12], None, False),
        (5, [3, 4], None, True),  # narrower than the degrees: spread degrees
        (6, [7], C, True),
        (1, [4, 4], None, False),
        (1, [3], C, True),
    ],
)
def test_incremental_made_matches_the_full_pass(dim, hidden_dims, context_dim, skip):
    made = MADE(dim, hidden_dims, num_outputs=3, context_dim=context_dim, skip_connections=skip)
    with torch.no_grad():
        for p in made.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(4, dim)
    context = None if context_dim is None else torch.randn(4, context_dim)
    full = made(x, context)
    steps = made.incremental(context, x.shape[:-1])
    for k in range(dim):
        torch.testing.assert_close(steps.outputs(k), full[..., k], atol=1e-13, rtol=1e-13)
        steps.append(k, x[..., k])
    with pytest.raises(ValueError, match="context"):
        made.incremental(None if context_dim else torch.randn(4, 2))


def _full_pass_inverse(
    layer: Autoregressive, y: torch.Tensor, context: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse as the layer computed it before the incremental MADE: D full passes."""
    batch = (
        y.shape[:-1]
        if context is None
        else torch.broadcast_shapes(y.shape[:-1], context.shape[:-1])
    )
    y = y.expand(batch + y.shape[-1:])
    x = torch.zeros_like(y)
    ladj = y.new_zeros(batch)
    for k in range(layer.input_dim):
        params = layer.made(x, context)[..., k : k + 1]
        x_k, log_derivative = layer.transformer.inverse(y[..., k : k + 1], params)
        x = torch.cat([x[..., :k], x_k, x[..., k + 1 :]], dim=-1)
        ladj = ladj + log_derivative[..., 0]
    return x, ladj


@pytest.mark.parametrize(
    "build",
    [
        lambda: IAF(5),
        lambda: IAF(5, update="affine", context_dim=C),
        lambda: IAF(5, hidden_dims=[3, 3], skip_connections=True),
        lambda: Autoregressive(5, transformer=RationalQuadraticSpline(bins=4)),
        lambda: Autoregressive(4, transformer=DeepSigmoidTransformer(3), context_dim=C),
        lambda: IAF(1),
        lambda: Autoregressive(1, transformer=DeepSigmoidTransformer(3), context_dim=C),
    ],
    ids=["iaf", "iaf-affine-ctx", "iaf-narrow-skip", "spline", "naf-ctx", "iaf-d1", "naf-d1-ctx"],
)
def test_autoregressive_inverse_matches_the_full_passes(build):
    layer = build()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    d = layer.input_dim
    x = torch.randn(7, d)
    context = None if layer.context_dim is None else torch.randn(7, C)
    with torch.no_grad():
        y, ladj = layer(x, context)
        x_new, ladj_new = layer.inverse(y, context)
        x_ref, ladj_ref = _full_pass_inverse(layer, y, context)
    torch.testing.assert_close(x_new, x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(x_new, x_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ladj_new, -ladj, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ladj_new, ladj_ref, atol=1e-10, rtol=1e-10)
    # Gradients of log q(y) with respect to the parameters, the point and the context.
    grads = [
        _log_prob_gradients(inverse, layer, y, context)
        for inverse in (type(layer).inverse, _full_pass_inverse)
    ]
    for g_new, g_ref in zip(*grads, strict=True):
        # None: a parameter the computation never reaches (a fully masked weight at D = 1).
        if g_new is None or g_ref is None:
            assert all(g is None or float(g.abs().max()) == 0 for g in (g_new, g_ref))
            continue
        scale = 1 + float(g_ref.abs().max())
        torch.testing.assert_close(g_new, g_ref, atol=1e-9 * scale, rtol=1e-8)
    # dx/dy of the inverse is the inverse of the forward Jacobian.
    context_0 = None if context is None else context[0]
    forward = torch.autograd.functional.jacobian(lambda v: layer(v, context_0)[0], x[0])
    inverse = torch.autograd.functional.jacobian(
        lambda v: layer.inverse(v, context_0)[0], y[0].detach()
    )
    torch.testing.assert_close(inverse @ forward, torch.eye(d), atol=1e-9, rtol=0)


def test_autoregressive_inverse_broadcasts_a_context_against_the_points():
    layer = IAF(4, context_dim=C)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, context = torch.randn(5, 4), torch.randn(3, 1, C)
    with torch.no_grad():
        y, ladj = layer(x, context)
        x_new, ladj_new = layer.inverse(y, context)
    assert x_new.shape == (3, 5, 4) and ladj_new.shape == (3, 5)
    torch.testing.assert_close(x_new, x.expand(3, 5, 4), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ladj_new, -ladj, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# the timing script


def test_inverse_cost_benchmark_runs(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "inverse_cost.py"
    spec = importlib.util.spec_from_file_location("inverse_cost_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    guides = ["sylvester-triangular", "iaf"]
    args = ["--dims", "2", "--train", "1", "--rounds", "1", "--min-time", "0", "--points", "3"]
    module.main(module.parse_args([*args, "--guides", *guides]))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [f"| {name}" for name in guides]
    for row in rows[1:]:
        cells = [float(cell) for cell in row.strip("| ").split(" | ")[2:]]
        assert all(math.isfinite(r) and r > 0 for r in cells[:-1])  # times and ratios
        assert cells[-1] == 0  # no non-finite loss or log-density


def test_sylvester_newton_does_not_stop_where_its_jacobian_is_singular():
    # With r_ii r~_ii = -1 in floating point the Jacobian's diagonal 1 - (1 - tanh^2 a_i) is
    # exactly zero where a_i = 0. Newton's start a = c is put there for the first component
    # while the others are off their root: such a point must not pass for converged.
    layer = _sylvester("orthogonal", 4, None, None, "trained")
    _set_raw(layer, "r_diag_raw", torch.full((4,), 40.0))
    _set_raw(layer, "r_tilde_diag_raw", torch.full((4,), -40.0))
    with torch.no_grad():
        q, r, r_tilde, b, _, _ = layer._params(None)
        c = torch.tensor([[0.0, 1.5, -0.7, 2.0], [0.0, -2.0, 0.3, 0.0]])
        w = torch.linalg.solve_triangular(r_tilde, (c - b).unsqueeze(-1), upper=True)
        y = layer._embed(w.squeeze(-1), q)
        x_new, _ = layer.inverse(y)
        y_new, _ = layer(x_new)
    torch.testing.assert_close(y_new, y, atol=1e-10, rtol=1e-10)


def test_inverse_at_keeps_exact_values_where_the_inverse_overflows():
    # A strongly contracting IAF (gates far below zero, large shifts): the sequential inverse
    # amplifies rounding by 1/sigma per coordinate and overflows, while the inverse at the
    # known preimage solves nothing and keeps exact values and finite log-determinants.
    torch.manual_seed(0)
    layer = IAF(40, sigmoid_bias=-4.0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))
        readout = layer.made.output_layer
        readout.weight.mul_(1 / readout.weight_scale)  # large shifts and gates
    x = torch.randn(50, 40)
    y, ladj = layer(x)
    assert bool(torch.isfinite(y).all() and torch.isfinite(ladj).all())
    x_inverse, _ = layer.inverse(y)
    assert not bool(torch.isfinite(x_inverse).all())  # the numerical inverse breaks down
    x_at, ladj_at = layer.inverse_at(y, x)
    assert torch.equal(x_at, x)
    torch.testing.assert_close(ladj_at, -ladj)
    (grad,) = torch.autograd.grad(ladj_at.sum(), layer.made.output_layer.weight)
    assert bool(torch.isfinite(grad).all())
