"""Contract tests for every registered flow family and every flow layer.

The cases are every family of :data:`pyro_flowvi.flows.FLOWS` (global and, where it takes a
context, conditional; D = 1 and D = 3, default options) plus layer-level cases for the options
and the helper layers. Each is checked at trained-like parameters (every parameter moved away
from its initial value: fresh layers sit at or near the identity, where a wrong log-determinant
can still look right): log-determinant against ``torch.autograd.functional.jacobian`` +
``slogdet``, inverse round trip (and the gradient through it), batch and context shapes,
gradients reaching every parameter, ``state_dict`` round trip, float32 against float64, Pyro's
param store and optimizer, and ``torch.jit.trace``. A layer class exported by
:mod:`pyro_flowvi.flows` that no family builds and no helper case covers fails the suite.
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
from torch import nn

import pyro_flowvi.flows as flows
from pyro_flowvi.flows import (
    FLOWS,
    IAF,
    Autoregressive,
    Compose,
    DeepSigmoidTransformer,
    ElementwiseAffine,
    Flow,
    GatedAffineTransformer,
    Householder,
    MaskedCoupling,
    MaskedLinear,
    Permute,
    Planar,
    Radial,
    RationalQuadraticSpline,
    Reverse,
    Sylvester,
    TriangularAffine,
    ZukoFlow,
    build_flows,
)

C = 2  # context size of the conditional cases


def _random_tril(dim: int) -> torch.Tensor:
    """A lower-triangular matrix with a positive diagonal far from the identity."""
    return torch.randn(dim, dim).tril(-1) + torch.diag(torch.rand(dim) * 3 + 0.2)


@dataclass
class Case:
    build: Callable[[], Flow]
    # "identity"; "gated" (one IAF layer: sigmoid(c) x); a float c (y = c x exactly);
    # "orthogonal" (norm-preserving, log-det 0); or None (not checked)
    start: str | float | None = None


#: How each registered family's default stack starts; a new family must add its line here.
FAMILY_START: dict[str, str | float] = {
    "planar": "identity",
    "radial": "identity",
    "householder": "orthogonal",
    "sylvester-orthogonal": "identity",
    "sylvester-householder": "identity",
    "sylvester-triangular": "identity",
    "iaf": 1 / (1 + math.exp(-2.0)) ** 3,  # three gates sigmoid(2), two reversals
    "iaf-affine": "identity",
    "spline-autoregressive": "identity",
    "spline-coupling": "identity",
    "realnvp": "identity",
    "naf": "near-identity",  # the deep sigmoid's spread offsets, see DeepSigmoidTransformer
}

#: Flow classes exported by pyro_flowvi.flows that no family builds: each has its own cases.
HELPER_LAYERS: dict[type, str] = {
    Compose: "compose, compose-ctx",
    Permute: "permute",
    Reverse: "reverse (and every IAF stack)",
    TriangularAffine: "triangular-affine (the Laplace preconditioner of the guides)",
    ZukoFlow: "tests/test_flow_zuko.py (the adapter; zuko is optional)",
}


def _family_cases() -> dict[str, Case]:
    cases = {}
    for name, family in FLOWS.items():
        for context_dim in (None, C) if family.takes_context else (None,):
            for d in (1, 3):
                key = f"family:{name}{'' if context_dim is None else '-ctx'}-d{d}"
                cases[key] = Case(
                    lambda name=name, d=d, context_dim=context_dim: Compose(
                        build_flows(name, d, context_dim=context_dim)
                    ),
                    FAMILY_START.get(name),
                )
    return cases


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
    "sylvester-hh-m2": Case(lambda: Sylvester(5, "householder", num_ortho_vectors=2), "identity"),
    "sylvester-hh-m2-ctx": Case(
        lambda: Sylvester(5, "householder", num_ortho_vectors=2, context_dim=C), "identity"
    ),
    "sylvester-tri-m2": Case(lambda: Sylvester(5, "triangular", num_ortho_vectors=2), "identity"),
    "sylvester-tri-flip-m2": Case(
        lambda: Sylvester(5, "triangular", num_ortho_vectors=2, flip=True), "identity"
    ),
    "autoregressive-affine": Case(lambda: Autoregressive(3), "identity"),
    "autoregressive-spline": Case(
        lambda: Autoregressive(3, RationalQuadraticSpline(bins=4, bound=2.0), [8]), "identity"
    ),
    "autoregressive-spline-skip-ctx": Case(
        lambda: Autoregressive(
            3, RationalQuadraticSpline(bins=3), [8], context_dim=C, skip_connections=True
        ),
        "identity",
    ),
    "autoregressive-dsf": Case(lambda: Autoregressive(3, DeepSigmoidTransformer(3), [8])),
    "autoregressive-dsf-ctx": Case(
        lambda: Autoregressive(3, DeepSigmoidTransformer(2), [8], context_dim=C)
    ),
    "autoregressive-dsf-exact": Case(
        lambda: Autoregressive(3, DeepSigmoidTransformer(4, offset_spread=0.0), [8]), "identity"
    ),
    "coupling-spline": Case(
        lambda: MaskedCoupling(4, hidden_dims=(6,), transformer=RationalQuadraticSpline(bins=3)),
        "identity",
    ),
    "coupling-spline-ctx": Case(
        lambda: MaskedCoupling(
            4, hidden_dims=(6,), context_dim=C, transformer=RationalQuadraticSpline(bins=3)
        ),
        "identity",
    ),
    "coupling-gated": Case(
        lambda: MaskedCoupling(3, hidden_dims=(5,), transformer=GatedAffineTransformer())
    ),
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
CASES.update(_family_cases())


def _inputs(layer: Flow, batch: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.randn(batch + (layer.input_dim,))
    context = None if layer.context_dim is None else torch.randn(batch + (layer.context_dim,))
    return x, context


def _perturb(layer: Flow, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))


def _check_start(layer: Flow, start: str | float) -> None:
    x, context = _inputs(layer, (7,))
    y, ladj = layer(x, context)
    if start == "orthogonal":
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)
        torch.testing.assert_close(ladj, torch.zeros(7), atol=1e-12, rtol=0)
        return
    if start == "near-identity":  # 3 deep sigmoid layers: each within 0.053 and 0.027
        torch.testing.assert_close(y, x, atol=0.2, rtol=0)
        torch.testing.assert_close(ladj, torch.zeros(7), atol=0.1 * layer.input_dim, rtol=0)
        return
    if start == "identity":
        scale, log_scale = 1.0, 0.0
    elif start == "gated":
        scale = torch.sigmoid(torch.tensor(layer.sigmoid_bias)).item()
        log_scale = layer.input_dim * math.log(scale)
    else:
        scale, log_scale = start, layer.input_dim * math.log(start)
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
    # Backward stability: the recovered point maps onto y, with the log-det of that point.
    y3, ladj3 = layer(x2, context)
    torch.testing.assert_close(y3, y, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ladj_inv, -ladj3, atol=1e-9, rtol=1e-9)
    # Forward error: at most the rounding of y amplified by the condition number of the map
    # (a spline with near-minimal bins can have dx/dy ~ 1e6 somewhere).
    well_conditioned = torch.ones(6, dtype=torch.bool)
    for i in range(6):
        context_i = None if context is None else context[i]
        jacobian = torch.autograd.functional.jacobian(lambda v, c=context_i: layer(v, c)[0], x[i])
        condition = float(torch.linalg.inv(jacobian.detach()).abs().sum(-1).max())
        slack = 1e-13 * condition * (1 + float(y[i].detach().abs().max()))
        torch.testing.assert_close(x2[i], x[i], atol=1e-8 + slack, rtol=1e-8)
        torch.testing.assert_close(ladj_inv[i], -ladj[i], atol=1e-8 + 1e3 * slack, rtol=1e-8)
        well_conditioned[i] = slack < 1e-6
    # forward(inverse(y)) is y whatever the parameters, so its gradient must vanish: this
    # checks the gradients that flow through the (possibly numerical) inverse. At a point where
    # rounding alone can move x by more than 1e-6 (a perturbed spline stack reaches
    # dx/dy ~ 1e10), the computed gradient is rounding amplified as much; such points are left
    # out (their values were checked above).
    params = list(layer.parameters())
    if params:
        x2, ladj_inv = layer.inverse(y.detach(), context)
        y3, ladj3 = layer(x2, context)
        weights = torch.randn_like(y3) * well_conditioned.unsqueeze(-1)
        loss = (weights * y3).sum() + ((ladj_inv + ladj3) * well_conditioned).sum()
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
        if isinstance(module, MaskedCoupling) and bool(module.mask.all()):
            dead |= {id(p) for p in module.parameters()}  # every coordinate kept: identity
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
    y, ladj = layer(x, context)
    for a, b in zip((y, ladj), fresh(x, context), strict=True):
        assert torch.equal(a, b)
    if layer.has_inverse:
        for a, b in zip(layer.inverse(y, context), fresh.inverse(y, context), strict=True):
            assert torch.equal(a, b)


def _check_inverse_at(layer: Flow) -> None:
    """inverse_at: the known value exactly, the inverse's log-det, and the derivatives of the
    inverse map (against :meth:`inverse` at well-conditioned points)."""
    x, context = _inputs(layer, (5,))
    x = x * torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0]).unsqueeze(-1)
    y, ladj = layer(x, context)
    y = y.detach().requires_grad_(True)
    ctx = None if context is None else context.clone().requires_grad_(True)
    x_at, ladj_at = layer.inverse_at(y, x, ctx)
    assert torch.equal(x_at, x.detach())  # the value is the known preimage, bit for bit
    torch.testing.assert_close(ladj_at, -ladj.detach(), atol=1e-9, rtol=1e-9)
    x_inv, ladj_inv = layer.inverse(y, ctx)
    weights = torch.randn_like(x_at)
    inputs = [y, *([] if ctx is None else [ctx]), *layer.parameters()]
    grads_at = torch.autograd.grad(
        (weights * x_at).sum() + ladj_at.sum(), inputs, allow_unused=True
    )
    grads_inv = torch.autograd.grad(
        (weights * x_inv).sum() + ladj_inv.sum(), inputs, allow_unused=True
    )
    for a, b in zip(grads_at, grads_inv, strict=True):
        if a is None or b is None:
            assert (a is None or not a.abs().max() > 0) and (b is None or not b.abs().max() > 0)
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


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
        _check_inverse_at(layer)
    else:
        with pytest.raises(NotImplementedError, match="no inverse"):
            layer.inverse(torch.randn(layer.input_dim))
    _check_gradients(layer)
    _check_state_dict(layer, case.build)


def test_every_family_declares_its_start():
    assert set(FAMILY_START) == set(FLOWS)


def test_every_exported_layer_is_covered():
    exported = {
        value
        for key in flows.__all__
        if isinstance(value := getattr(flows, key), type)
        and issubclass(value, Flow)
        and value is not Flow
    }
    by_family = {cls for family in FLOWS.values() for cls in family.layers}
    missing = exported - by_family - set(HELPER_LAYERS)
    assert not missing, f"no family builds and no helper case covers {missing}"
    built = {type(m) for case in CASES.values() for m in case.build().modules()}
    assert set(HELPER_LAYERS) - {ZukoFlow} <= built


@pytest.mark.parametrize("name", list(FLOWS))
def test_family_layers_are_what_it_builds(name):
    family = FLOWS[name]
    built = set()
    for context_dim in (None, C) if family.takes_context else (None,):
        layers = build_flows(name, 3, context_dim=context_dim)
        assert layers and all(layer.input_dim == 3 for layer in layers)
        assert all(layer.context_dim in (None, context_dim) for layer in layers)
        assert all(layer.has_inverse for layer in layers) == family.has_inverse
        built |= {type(layer) for layer in layers}
    assert built == set(family.layers)


@pytest.mark.parametrize("name", [key for key in CASES if key.startswith("family:")])
def test_float32_agrees_with_float64(name):
    # Milder parameters than the contract's: a strongly perturbed stack of splines can be so
    # ill-conditioned that float32 rounding alone moves its output (the float64 contract
    # covers those parameters).
    layer = CASES[name].build()
    _perturb(layer, 0.2)
    x, context = _inputs(layer, (6,))
    y, ladj = layer(x, context)
    layer32 = layer.to(torch.float32)  # in place: compare with the float64 results above
    context32 = None if context is None else context.float()
    y32, ladj32 = layer32(x.float(), context32)
    assert y32.dtype == ladj32.dtype == torch.float32
    torch.testing.assert_close(y32, y.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ladj32, ladj.float(), atol=1e-4, rtol=1e-4)
    if layer32.has_inverse:
        x32, ladj_inv32 = layer32.inverse(y32, context32)
        torch.testing.assert_close(x32, x.float(), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(ladj_inv32, -ladj32, atol=1e-3, rtol=1e-3)


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


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(name, torch.float64) for name in CASES]
    + [(name, torch.float32) for name in CASES if name.startswith("family:")],
)
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


# The D = 3 family stacks build every layer class (test_every_exported_layer_is_covered), and
# the compose cases hold the helper layers.
JIT_CASES = [key for key in CASES if key.startswith("family:") and key.endswith("-d3")]


@pytest.mark.parametrize("name", [*JIT_CASES, "compose", "compose-ctx"])
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


@pytest.mark.cuda
@pytest.mark.parametrize("name", JIT_CASES)
def test_families_run_on_cuda(name):
    layer = CASES[name].build()
    _perturb(layer, 0.2)
    x, context = _inputs(layer, (6,))
    y, ladj = layer(x, context)
    device = torch.device("cuda")
    gpu = layer.to(device=device, dtype=torch.float32)
    context32 = None if context is None else context.to(device, torch.float32)
    y32, ladj32 = gpu(x.to(device, torch.float32), context32)
    assert y32.device.type == ladj32.device.type == "cuda"
    torch.testing.assert_close(y32.cpu(), y.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ladj32.cpu(), ladj.float(), atol=1e-4, rtol=1e-4)
    x32, _ = gpu.inverse(y32, context32)
    torch.testing.assert_close(x32.cpu(), x.float(), atol=1e-3, rtol=1e-3)
