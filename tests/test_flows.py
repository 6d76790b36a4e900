"""Contract tests for every flow layer, unconditional and conditional.

The log-determinants are checked against ``torch.autograd.functional.jacobian`` + ``slogdet``
after every parameter has been moved away from its initial value (trained-like parameters):
fresh layers sit at or near the identity, where a wrong log-determinant can still look right.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pytest
import torch
from pyro import poutine
from pyro.distributions.transforms import Sylvester as PyroSylvester
from torch import nn

from pyro_flowvi.flows import (
    IAF,
    MADE,
    Compose,
    ElementwiseAffine,
    Flow,
    Householder,
    MaskedCoupling,
    MaskedLinear,
    Permute,
    Planar,
    Radial,
    Reverse,
    Sylvester,
    TriangularAffine,
)

C = 2  # context size of the conditional cases


def _random_tril(dim: int) -> torch.Tensor:
    """A lower-triangular matrix with a positive diagonal far from the identity."""
    return torch.randn(dim, dim).tril(-1) + torch.diag(torch.rand(dim) * 3 + 0.2)


@dataclass
class Case:
    build: Callable[[], Flow]
    start: str | None = None  # "identity", "gated" (IAF: sigmoid(c) x), or None


CASES = {
    "affine": Case(lambda: ElementwiseAffine(3), "identity"),
    "affine-ctx": Case(lambda: ElementwiseAffine(3, context_dim=C), "identity"),
    "triangular-affine": Case(lambda: TriangularAffine(torch.randn(3), _random_tril(3))),
    "permute": Case(lambda: Permute(4)),
    "reverse": Case(lambda: Reverse(4)),
    "planar": Case(lambda: Planar(3), "identity"),
    "planar-ctx": Case(lambda: Planar(3, context_dim=C), "identity"),
    "planar-d1": Case(lambda: Planar(1), "identity"),
    "planar-d1-ctx": Case(lambda: Planar(1, context_dim=C), "identity"),
    "radial": Case(lambda: Radial(3), "identity"),
    "radial-ctx": Case(lambda: Radial(3, context_dim=C), "identity"),
    "radial-d1": Case(lambda: Radial(1), "identity"),
    "householder": Case(lambda: Householder(4)),
    "householder-k3": Case(lambda: Householder(4, num_reflections=3)),
    "householder-k3-ctx": Case(lambda: Householder(4, num_reflections=3, context_dim=C)),
    "sylvester-orth": Case(lambda: Sylvester(4), "identity"),
    "sylvester-orth-m2": Case(lambda: Sylvester(4, num_ortho_vectors=2), "identity"),
    "sylvester-orth-ctx": Case(lambda: Sylvester(4, context_dim=C), "identity"),
    "sylvester-orth-m2-ctx": Case(
        lambda: Sylvester(4, num_ortho_vectors=2, context_dim=C), "identity"
    ),
    "sylvester-hh": Case(lambda: Sylvester(4, "householder", num_householder=3), "identity"),
    "sylvester-hh-ctx": Case(lambda: Sylvester(4, "householder", context_dim=C), "identity"),
    "sylvester-tri": Case(lambda: Sylvester(4, "triangular"), "identity"),
    "sylvester-tri-flip": Case(lambda: Sylvester(4, "triangular", flip=True), "identity"),
    "sylvester-tri-flip-ctx": Case(
        lambda: Sylvester(4, "triangular", flip=True, context_dim=C), "identity"
    ),
    "sylvester-tri-d1": Case(lambda: Sylvester(1, "triangular"), "identity"),
    "iaf": Case(lambda: IAF(3), "gated"),
    "iaf-skip": Case(lambda: IAF(3, skip_connections=True), "gated"),
    "iaf-ctx": Case(lambda: IAF(3, hidden_dims=5, context_dim=C), "gated"),
    "iaf-skip-ctx": Case(lambda: IAF(3, skip_connections=True, context_dim=C), "gated"),
    "iaf-d1": Case(lambda: IAF(1), "gated"),
    "iaf-affine": Case(lambda: IAF(3, update="affine"), "identity"),
    "iaf-affine-ctx": Case(lambda: IAF(3, update="affine", context_dim=C), "identity"),
    "iaf-d1-ctx": Case(lambda: IAF(1, context_dim=C), "gated"),
    "coupling": Case(lambda: MaskedCoupling(4, hidden_dims=(6,)), "identity"),
    "coupling-ctx": Case(lambda: MaskedCoupling(4, hidden_dims=(6,), context_dim=C), "identity"),
    # A one-dimensional latent, for every layer (size-1 parameters must keep standard strides).
    "affine-d1": Case(lambda: ElementwiseAffine(1), "identity"),
    "affine-d1-ctx": Case(lambda: ElementwiseAffine(1, context_dim=C), "identity"),
    "affine-d1-scale-only": Case(lambda: ElementwiseAffine(1, learn_loc=False), "identity"),
    "radial-d1-ctx": Case(lambda: Radial(1, context_dim=C), "identity"),
    "householder-d1": Case(lambda: Householder(1)),
    "householder-d1-ctx": Case(lambda: Householder(1, context_dim=C)),
    "sylvester-orth-d1": Case(lambda: Sylvester(1), "identity"),
    "sylvester-orth-d1-ctx": Case(lambda: Sylvester(1, context_dim=C), "identity"),
    "sylvester-hh-d1": Case(lambda: Sylvester(1, "householder"), "identity"),
    "iaf-affine-d1": Case(lambda: IAF(1, update="affine"), "identity"),
    "coupling-d1": Case(lambda: MaskedCoupling(1, hidden_dims=(3,)), "identity"),
    "coupling-d1-ctx": Case(
        lambda: MaskedCoupling(1, hidden_dims=(3,), context_dim=C), "identity"
    ),
    "triangular-affine-d1": Case(lambda: TriangularAffine(torch.randn(1), _random_tril(1))),
    "compose": Case(
        lambda: Compose(
            [
                Planar(3),
                Sylvester(3, "householder"),
                Reverse(3),
                IAF(3, skip_connections=True),
                Radial(3),
                Householder(3),
                Sylvester(3, "triangular", flip=True),
                ElementwiseAffine(3),
                TriangularAffine(torch.randn(3), _random_tril(3)),
            ]
        )
    ),
    "compose-ctx": Case(
        lambda: Compose(
            [
                ElementwiseAffine(3, context_dim=C),
                Planar(3, context_dim=C),
                Reverse(3),
                IAF(3, context_dim=C),
                Sylvester(3, num_ortho_vectors=2, context_dim=C),
                Radial(3),
            ]
        )
    ),
}


def _inputs(layer: Flow, batch: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.randn(batch + (layer.input_dim,))
    context = None if layer.context_dim is None else torch.randn(batch + (layer.context_dim,))
    return x, context


def _perturb(layer: Flow) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))


def _check_start(layer: Flow, start: str) -> None:
    x, context = _inputs(layer, (7,))
    y, ladj = layer(x, context)
    if start == "identity":
        scale, log_scale = 1.0, 0.0
    else:
        scale = torch.sigmoid(torch.tensor(layer.sigmoid_bias)).item()
        log_scale = layer.input_dim * math.log(scale)
    torch.testing.assert_close(y, scale * x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, torch.full((7,), log_scale), atol=1e-12, rtol=0)


def _check_shapes(layer: Flow) -> None:
    d = layer.input_dim
    for batch in [(), (5,), (3, 4)]:
        x, context = _inputs(layer, batch)
        y, ladj = layer(x, context)
        assert y.shape == batch + (d,) and ladj.shape == batch, (batch, y.shape, ladj.shape)
        assert bool(y.isfinite().all() and ladj.isfinite().all())
        if layer.has_inverse:
            x2, ladj_inv = layer.inverse(y, context)
            assert x2.shape == batch + (d,) and ladj_inv.shape == batch
    if layer.context_dim is None:
        return
    with pytest.raises(ValueError, match="context"):
        layer(torch.randn(d))
    # A context that broadcasts against x, both ways round.
    for x, context in [
        (torch.randn(4, d), torch.randn(3, 1, layer.context_dim)),
        (torch.randn(3, 4, d), torch.randn(layer.context_dim)),
    ]:
        y, ladj = layer(x, context)
        assert y.shape == (3, 4, d) and ladj.shape == (3, 4)
        y_full, ladj_full = layer(x.expand(3, 4, d), context.expand(3, 4, layer.context_dim))
        torch.testing.assert_close(y, y_full)
        torch.testing.assert_close(ladj, ladj_full)
        if layer.has_inverse:
            x2, _ = layer.inverse(y, context)
            torch.testing.assert_close(x2, x.expand(3, 4, d))


def _check_log_det(layer: Flow) -> None:
    x, context = _inputs(layer, (3,))
    _, ladj = layer(x, context)
    for i in range(3):
        context_i = None if context is None else context[i]
        jacobian = torch.autograd.functional.jacobian(lambda v, c=context_i: layer(v, c)[0], x[i])
        expected = torch.linalg.slogdet(jacobian).logabsdet
        _, ladj_i = layer(x[i], context_i)
        assert ladj_i.shape == ()
        torch.testing.assert_close(ladj_i, expected, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(ladj[i], expected, atol=1e-8, rtol=1e-8)


def _check_inverse(layer: Flow) -> None:
    x, context = _inputs(layer, (6,))
    x = x * torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 5.0]).unsqueeze(-1)
    y, ladj = layer(x, context)
    x2, ladj_inv = layer.inverse(y, context)
    torch.testing.assert_close(x2, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-8, rtol=1e-8)
    # forward(inverse(y)) is y whatever the parameters, so its gradient must vanish: this
    # checks the gradients that flow through the (possibly numerical) inverse.
    params = list(layer.parameters())
    if params:
        x2, ladj_inv = layer.inverse(y.detach(), context)
        y3, ladj3 = layer(x2, context)
        weights = torch.randn_like(y3)
        loss = (weights * y3).sum() + (ladj_inv + ladj3).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for g in grads:
            if g is not None:
                assert float(g.abs().max()) < 1e-6


def _dead_parameters(layer: nn.Module) -> set[int]:
    """Parameters that never get a gradient, by construction.

    Masked weights whose mask is all zero (a MADE for D = 1); the direction vectors of a
    one-dimensional Householder reflection or Sylvester Q (both are -1 or +1 whatever the
    vector), and the head that produces them; the first weight of an unconditional coupling
    network whose mask keeps nothing (its input is always zero).
    """
    dead = set()
    for module in layer.modules():
        if isinstance(module, MaskedLinear) and not bool(module.mask.any()):
            dead.add(id(module.weight))
        if isinstance(module, (Householder, Sylvester)) and module.input_dim == 1:
            for name in ("vectors", "q_raw", "q_vectors"):
                if isinstance(getattr(module, name, None), nn.Parameter):
                    dead.add(id(getattr(module, name)))
            if isinstance(module, Householder) and module.context_dim is not None:
                dead |= {id(p) for p in module.head.parameters()}
        if (
            isinstance(module, MaskedCoupling)
            and module.context_dim is None
            and not bool(module.mask.any())
        ):
            dead.add(id(module.net[0].weight))
    return dead


def _check_gradients(layer: Flow) -> None:
    if not list(layer.parameters()):
        return
    x, context = _inputs(layer, (5,))
    y, ladj = layer(x, context)
    layer.zero_grad()
    (y.sum() + ladj.sum()).backward()
    dead = _dead_parameters(layer)
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert bool(p.grad.isfinite().all()), name
        if id(p) not in dead:
            assert float(p.grad.abs().max()) > 1e-8, name


def _check_state_dict(layer: Flow, build: Callable[[], Flow]) -> None:
    fresh = build()
    fresh.load_state_dict(layer.state_dict())
    x, context = _inputs(layer, (4,))
    for a, b in zip(layer(x, context), fresh(x, context), strict=True):
        assert torch.equal(a, b)
    if layer.has_inverse:
        for a, b in zip(layer.inverse(x, context), fresh.inverse(x, context), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(CASES))
def test_flow_contract(name):
    case = CASES[name]
    layer = case.build()
    if case.start is not None:
        _check_start(layer, case.start)
    _perturb(layer)
    _check_shapes(layer)
    _check_log_det(layer)
    if layer.has_inverse:
        _check_inverse(layer)
    else:
        with pytest.raises(NotImplementedError, match="no inverse"):
            layer.inverse(torch.randn(layer.input_dim))
    _check_gradients(layer)
    _check_state_dict(layer, case.build)


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
        (lambda: Sylvester(3, "householder", num_ortho_vectors=2), "only variant='orthogonal'"),
        (lambda: Sylvester(3, "triangular", num_householder=2), "num_householder=2"),
        (lambda: Sylvester(3, "householder", num_householder=0), "got 0"),
        (lambda: IAF(4, hidden_dims=[2]), r"at least 3 .*got \[2\]"),
        (lambda: IAF(4, hidden_dims=[3], context_dim=2), r"at least 4 .*got \[3\]"),
        (lambda: IAF(4, hidden_dims=[8, 0]), r"got \[8, 0\]"),
        (lambda: IAF(4, hidden_dims=[8.0]), r"got \[8.0\]"),
        (lambda: IAF(4, hidden_dims=[]), r"got \[\]"),
        (lambda: IAF(4, hidden_dims=True), "got True"),
        (lambda: IAF(1, hidden_dims=0), "at least 1 .*got 0"),
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


@pytest.mark.parametrize("name", list(CASES))
def test_parameters_have_standard_strides(name):
    # Pyro's param store keeps a contiguous copy of a non-contiguous parameter (the module's
    # own tensor then never trains), and a zero stride on a size-1 dimension breaks torch's
    # gradient layout contract (a warning on every accumulation).
    layer = CASES[name].build()
    for dtype in (torch.float64, torch.float32):
        layer = layer.to(dtype)
        for param_name, p in layer.named_parameters():
            assert p.is_contiguous(), (param_name, p.stride())
            assert p.stride() == torch.empty(p.shape).stride(), (param_name, p.stride())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_pyro_optimizer_trains_every_parameter(name, dtype):
    layer = CASES[name].build()
    _perturb(layer)  # a fresh IAF has a zero output layer, which blocks the hidden gradients
    pyro.module("flow", layer)
    layer = layer.to(dtype)  # same Parameter objects, new data
    params = dict(layer.named_parameters())
    if not params:
        return
    x, context = _inputs(layer, (5,))
    x = x.to(dtype)
    context = None if context is None else context.to(dtype)
    weights = torch.randn(x.shape, dtype=dtype)
    optim = pyro.optim.Adam({"lr": 0.01})
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(3):
        with poutine.trace(param_only=True) as tape:
            pyro.module("flow", layer)
            y, ladj = layer(x, context)
            loss = (weights * y).sum() - ladj.sum()
        loss.backward()
        store_params = {site["value"].unconstrained() for site in tape.trace.nodes.values()}
        assert {id(p) for p in store_params} == {id(p) for p in params.values()}
        optim(store_params)
        pyro.infer.util.zero_grads(store_params)
    for n, p in params.items():
        assert pyro.param(f"flow$$${n}").unconstrained() is p, n
        assert p.dtype == dtype, n
        if id(p) not in _dead_parameters(layer):
            assert not torch.equal(p.detach(), before[n].to(dtype)), f"{n} did not train"


@pytest.mark.parametrize("name", list(CASES))
def test_forward_traces_with_torch_jit(name):
    # JitTrace_ELBO traces the guide: the forward pass must not leave the graph (no Python
    # float or bool of a tensor), and the trace must follow later parameter values.
    layer = CASES[name].build()
    _perturb(layer)
    x, context = _inputs(layer, (5,))
    args = (x,) if context is None else (x, context)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch.jit.trace.* is deprecated", DeprecationWarning)
        traced = torch.jit.trace(layer, args, check_trace=False)
    _perturb(layer)
    x, context = _inputs(layer, (5,))
    args = (x,) if context is None else (x, context)
    for a, b in zip(traced(*args), layer(*args), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
