"""Layer-specific behaviour of the flow layers (the shared contract is tests/test_flows.py)."""

from __future__ import annotations

import pytest
import torch
from pyro.distributions.transforms import Sylvester as PyroSylvester
from torch import nn

from pyro_flowvi.flows import (
    IAF,
    MADE,
    Householder,
    Planar,
    Radial,
    Sylvester,
    TriangularAffine,
)

C = 2


def _perturb(layer: nn.Module) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))


def test_unconditional_layers_reject_a_context():
    for layer in [Planar(3), Radial(3), Householder(3), Sylvester(3), IAF(3)]:
        with pytest.raises(ValueError, match="without context_dim"):
            layer(torch.randn(3), torch.randn(2))


def test_sylvester_off_diagonals_matter():
    # The contract test perturbs R and R~; make sure it perturbs them away from diagonal.
    layer = Sylvester(4, context_dim=None)
    _perturb(layer)
    with torch.no_grad():
        _, r, r_tilde, *_ = layer._params(None)
    assert float(r.triu(1).norm()) > 0.5
    assert float(r_tilde.triu(1).norm()) > 0.5


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Planar(0), "input_dim must be a positive int, got 0"),
        (lambda: Radial(0), "got 0"),
        (lambda: Householder(0), "got 0"),
        (lambda: Sylvester(0), "got 0"),
        (lambda: IAF(0), "got 0"),
        (lambda: Planar(3, context_dim=0), "context_dim.*got 0"),
        (lambda: Householder(3, num_reflections=0), "num_reflections.*got 0"),
        (lambda: Sylvester(3, variant="qr"), "variant.*got 'qr'"),
        (lambda: Sylvester(3, num_ortho_vectors=4), "num_ortho_vectors.*got 4"),
        (lambda: Sylvester(3, num_ortho_vectors=0), "num_ortho_vectors.*got 0"),
        (lambda: Sylvester(3, "triangular", num_householder=2), "num_householder=2"),
        (lambda: Sylvester(3, "householder", num_householder=0), "got 0"),
        (lambda: IAF(4, hidden_dims=[0]), r"positive ints, got \[0\]"),
        (lambda: IAF(4, hidden_dims=[8, 0]), r"got \[8, 0\]"),
        (lambda: IAF(4, hidden_dims=[8.0]), r"got \[8.0\]"),
        (lambda: IAF(4, hidden_dims=[]), r"got \[\]"),
        (lambda: IAF(4, hidden_dims=True), "got True"),
        (lambda: IAF(1, hidden_dims=0), "positive ints, got 0"),
        (lambda: MADE(3, [4], num_outputs=0), "num_outputs must be a positive int, got 0"),
        (lambda: IAF(3, update="clamped"), "update must be 'gated' or 'affine', got 'clamped'"),
        (lambda: IAF(3, update="affine", max_log_scale=0.0), "max_log_scale must be > 0, got 0.0"),
        (lambda: TriangularAffine(torch.zeros(2), torch.ones(2, 2)), "lower-triangular"),
        (lambda: TriangularAffine(torch.zeros(2), -torch.eye(2)), "positive diagonal"),
        (lambda: TriangularAffine(torch.zeros(2), torch.eye(3)), r"got \(2,\) and \(3, 3\)"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_made_is_autoregressive():
    made = MADE(4, hidden_dims=[6, 5], num_outputs=3, context_dim=2, skip_connections=True)
    _perturb(made)
    x, context = torch.randn(4), torch.randn(2)
    jacobian = torch.autograd.functional.jacobian(lambda v: made(v, context), x)  # (3, 4, 4)
    mask = torch.ones(4, 4).tril(-1).bool()  # output k may depend on inputs j < k only
    assert bool((jacobian[:, ~mask] == 0).all())
    assert bool((jacobian[:, mask] != 0).all())
    # Every output, the first included, depends on the context.
    wrt_context = torch.autograd.functional.jacobian(lambda c: made(x, c), context)
    assert bool((wrt_context.abs().sum(-1) > 0).all())


@pytest.mark.parametrize("context_dim", [None, 2])
def test_narrow_made_is_autoregressive_and_keeps_the_extreme_degrees(context_dim):
    # Widths below the number of degrees (bounded defaults at large D) spread the degrees.
    d = 9
    made = MADE(d, hidden_dims=[3, 2], num_outputs=2, context_dim=context_dim)
    _perturb(made)
    first = made.hidden_layers[0].mask.sum(-1).tolist()  # a unit of degree k sees k inputs
    assert first == ([0, 4, 8] if context_dim else [1, 5, 8])
    x = torch.randn(d)
    context = None if context_dim is None else torch.randn(context_dim)
    jacobian = torch.autograd.functional.jacobian(lambda v: made(v, context), x)
    assert bool((jacobian[:, torch.ones(d, d).triu().bool()] == 0).all())
    assert bool((jacobian[:, -1, :-1] != 0).any())  # the last output sees earlier inputs
    if context_dim:
        wrt_context = torch.autograd.functional.jacobian(lambda c: made(x, c), context)
        assert bool((wrt_context.abs().sum(-1) > 0).all())


def test_made_mask_is_boolean_and_loads_float_masks():
    made = MADE(4, hidden_dims=[5])
    assert made.output_layer.mask.dtype == torch.bool
    state = {k: (v.double() if k.endswith("mask") else v) for k, v in made.state_dict().items()}
    other = MADE(4, hidden_dims=[5])
    other.load_state_dict(state)  # a state_dict saved when the masks were floats
    x = torch.randn(3, 4)
    assert torch.equal(other(x), made(x))


def test_iaf_int_hidden_dims_is_one_layer():
    assert IAF(5, hidden_dims=7).made.hidden_dims == [7]
    assert IAF(5).made.hidden_dims == [10, 10]
    assert IAF(2).made.hidden_dims == [8, 8]


def test_pyro_sylvester_log_det_is_wrong_and_ours_is_right():
    """Pyro's Sylvester multiplies in the transposed order; its log-det is then wrong."""
    d, k = 4, 2
    pyro_layer = PyroSylvester(d, count_transforms=k)
    _perturb(pyro_layer)
    ours = Sylvester(d, "householder", num_householder=k)
    upper = torch.triu_indices(d, d, 1)
    with torch.no_grad():
        ours.q_vectors.copy_(pyro_layer.u_unnormed)
        ours.r_diag_raw.copy_(pyro_layer.R_diag)
        ours.r_tilde_diag_raw.copy_(pyro_layer.S_diag)
        ours.r_upper.copy_(pyro_layer.R_dense[upper[0], upper[1]])
        ours.r_tilde_upper.copy_(pyro_layer.S_dense[upper[0], upper[1]])
        ours.b.copy_(pyro_layer.b)
    errors = []
    for x in torch.randn(5, d):
        jacobian = torch.autograd.functional.jacobian(pyro_layer._call, x)
        pyro_truth = torch.linalg.slogdet(jacobian).logabsdet
        pyro_claim = pyro_layer.log_abs_det_jacobian(x, pyro_layer(x))
        errors.append(float((pyro_claim - pyro_truth).abs().detach()))

        jacobian = torch.autograd.functional.jacobian(lambda v: ours(v)[0], x)
        torch.testing.assert_close(ours(x)[1], torch.linalg.slogdet(jacobian).logabsdet)
    assert max(errors) > 2e-2, errors


def test_planar_inverse_near_the_invertibility_boundary():
    layer = Planar(3)
    with torch.no_grad():
        layer.w.copy_(torch.tensor([1.0, -0.5, 0.3]))
        layer.u.copy_(-20.0 * layer.w)  # w^T u_hat = -1 + softplus(-27) ~ -1 + 2e-12
        layer.b.fill_(0.7)
    x = torch.randn(50, 3) * 3
    y, ladj = layer(x)
    x2, ladj_inv = layer.inverse(y)
    torch.testing.assert_close(layer(x2)[0], y, atol=1e-9, rtol=0)
    assert bool(ladj_inv.isfinite().all())


def test_householder_preserves_norms():
    layer = Householder(4, num_reflections=3)
    x = torch.randn(10, 4)
    y, ladj = layer(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert bool((ladj == 0).all())


@pytest.mark.parametrize("context", [False, True])
def test_householder_equals_the_explicit_product_of_reflections(context):
    # The layer uses the compact WY form; any orthogonal map would pass the log-det and
    # norm tests, so compare with H_K ... H_1 built one reflection at a time.
    layer = Householder(5, num_reflections=4, context_dim=C if context else None)
    _perturb(layer)
    ctx = torch.randn(7, C) if context else None
    vectors = layer._vectors(ctx).detach()
    if not context:
        vectors = vectors.expand(7, 4, 5)
    x = torch.randn(7, 5)
    expected = x.clone()
    for k in range(4):
        v = vectors[:, k]
        matrix = (
            torch.eye(5) - 2 * v.unsqueeze(-1) * v.unsqueeze(-2) / (v * v).sum(-1)[:, None, None]
        )
        expected = (matrix @ expected.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(layer(x, ctx)[0], expected)
    torch.testing.assert_close(layer.inverse(expected, ctx)[0], x)


def test_sylvester_orthogonal_q_is_orthonormal_at_trained_like_parameters():
    layer = Sylvester(5, num_ortho_vectors=3, context_dim=C)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(2.0 * torch.randn_like(p))
    q, *_ = layer._params(torch.randn(8, C))
    assert q.shape == (8, 5, 3)
    torch.testing.assert_close(q.mT @ q, torch.eye(3).expand(8, 3, 3), atol=1e-12, rtol=0)


def test_float32_inverse_converges():
    layer = Sylvester(3, "triangular").to(torch.float32)
    _perturb(layer)
    x = torch.randn(20, 3, dtype=torch.float32)
    y, _ = layer(x)
    x2, _ = layer.inverse(y)
    torch.testing.assert_close(x2, x, atol=1e-4, rtol=1e-4)


def test_affine_iaf_log_scale_is_smoothly_bounded():
    # A huge MADE output saturates tanh instead of overflowing exp: no straight-through clamp,
    # and the gradient shrinks smoothly rather than being passed through unchanged.
    layer = IAF(2, update="affine", max_log_scale=3.0)
    with torch.no_grad():
        layer.made.output_layer.bias.fill_(1e4)
    x = torch.randn(5, 2, requires_grad=True)
    y, ladj = layer(x)
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(ladj, torch.full((5,), 6.0))  # 2 coordinates x 3.0


def test_activation_option_is_used():
    layer = IAF(3, activation=nn.Tanh)
    assert all(isinstance(a, nn.Tanh) for a in layer.made.activations)


def test_sylvester_default_vectors_are_capped():
    for variant in ("orthogonal", "householder", "triangular"):
        assert Sylvester(10, variant).num_ortho_vectors == 10
        assert Sylvester(100, variant).num_ortho_vectors == 64
    assert Sylvester(100, num_ortho_vectors=100).num_ortho_vectors == 100


@pytest.mark.parametrize("context", [False, True])
def test_sylvester_householder_q_with_fewer_columns_is_the_leading_block(context):
    full = Sylvester(6, "householder", num_householder=3, context_dim=C if context else None)
    part = Sylvester(
        6,
        "householder",
        num_householder=3,
        num_ortho_vectors=2,
        context_dim=C if context else None,
    )
    _perturb(full)
    ctx = torch.randn(4, C) if context else None
    with torch.no_grad():
        if context:  # copy the reflection vectors' rows of the head
            n = 3 * 6
            full_sizes = [6, 6, 6, 15, 15]  # r_diag, r_tilde_diag, b, r_upper, r_tilde_upper
            offset = sum(full_sizes)
            part.head.weight[-n:].copy_(full.head.weight[offset : offset + n])
            part.head.bias[-n:].copy_(full.head.bias[offset : offset + n])
        else:
            part.q_vectors.copy_(full.q_vectors)
    q_full = full._params(ctx)[0]
    q_part = part._params(ctx)[0]
    torch.testing.assert_close(q_part, q_full[..., :2])


@pytest.mark.parametrize("flip", [False, True])
def test_sylvester_triangular_with_fewer_columns_moves_only_those_coordinates(flip):
    layer = Sylvester(5, "triangular", num_ortho_vectors=2, flip=flip)
    _perturb(layer)
    x = torch.randn(8, 5)
    y, _ = layer(x)
    moved = [3, 4] if flip else [0, 1]
    still = [i for i in range(5) if i not in moved]
    assert torch.equal(y[:, still], x[:, still])
    assert bool((y[:, moved] != x[:, moved]).all())
