"""The flow registry: its API, its errors, and the stacks each built-in family builds."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from pyro_flowvi.flows import (
    FLOWS,
    IAF,
    Compose,
    ElementwiseAffine,
    Flow,
    FlowFamily,
    Householder,
    Planar,
    Reverse,
    Sylvester,
    build_flows,
    register_flow,
)
from pyro_flowvi.flows import registry as registry_module


def _types(layers: list[Flow]) -> list[str]:
    return [type(layer).__name__ for layer in layers]


def test_flows_is_read_only_and_defaults_are_read_only():
    with pytest.raises(TypeError):
        FLOWS["mine"] = FLOWS["planar"]  # type: ignore[index]
    with pytest.raises(TypeError):
        FLOWS["planar"].defaults["num_transforms"] = 3  # type: ignore[index]
    with pytest.raises(AttributeError):
        FLOWS["planar"].name = "other"  # type: ignore[misc]


def test_every_family_is_documented():
    for name, family in FLOWS.items():
        assert family.name == name
        assert family.summary and "\n" not in family.summary
        assert family.references and all("arXiv" in ref for ref in family.references), name
        assert "num_transforms" in family.defaults


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("planar", {}, ["Planar"] * 8),
        ("radial", {}, ["Radial"] * 8),
        ("householder", {}, ["ElementwiseAffine", "Householder"]),
        ("sylvester-orthogonal", {}, ["Sylvester"] * 4),
        ("sylvester-householder", {}, ["Sylvester"] * 4),
        ("sylvester-triangular", {"num_transforms": 3}, ["Sylvester"] * 3),
        ("iaf", {}, ["IAF", "Reverse", "IAF", "Reverse", "IAF"]),
        ("iaf-affine", {"num_transforms": 2}, ["IAF", "Reverse", "IAF"]),
    ],
)
def test_global_stacks(name, options, expected):
    assert _types(build_flows(name, 5, **options)) == expected


def test_householder_stacks():
    scale, reflections = build_flows("householder", 20)
    assert isinstance(scale, ElementwiseAffine) and not scale.learn_loc
    assert isinstance(reflections, Householder) and reflections.num_reflections == 16
    assert build_flows("householder", 5)[1].num_reflections == 5
    assert build_flows("householder", 5, num_transforms=3)[1].num_reflections == 3
    conditional = build_flows("householder", 5, context_dim=4, num_transforms=3)
    assert _types(conditional) == ["Householder"] * 3
    assert all(layer.num_reflections == 1 and layer.context_dim == 4 for layer in conditional)


def test_sylvester_options_pass_through_and_flip_alternates():
    layers = build_flows("sylvester-triangular", 4, context_dim=3)
    assert [layer.flip for layer in layers] == [False, True, False, True]
    assert all(layer.variant == "triangular" and layer.context_dim == 3 for layer in layers)
    layers = build_flows("sylvester-orthogonal", 5, num_ortho_vectors=2)
    assert all(layer.num_ortho_vectors == 2 for layer in layers)
    layers = build_flows("sylvester-householder", 5, num_householder=3)
    assert all(layer.num_householder == 3 for layer in layers)


def test_iaf_options_pass_through():
    layers = build_flows(
        "iaf", 4, context_dim=3, hidden_dims=[9], skip_connections=True, activation=nn.Tanh
    )
    iafs = [layer for layer in layers if isinstance(layer, IAF)]
    assert all(isinstance(layer, Reverse) for layer in layers if not isinstance(layer, IAF))
    for layer in iafs:
        assert layer.update == "gated" and layer.context_dim == 3
        assert layer.made.hidden_dims == [9] and layer.made.skip is not None
        assert all(isinstance(a, nn.Tanh) for a in layer.made.activations)
    (layer,) = build_flows("iaf-affine", 4, num_transforms=1, max_log_scale=2.0)
    assert layer.update == "affine" and layer.max_log_scale == 2.0


def test_same_seed_same_stack():
    torch.manual_seed(1)
    first = build_flows("sylvester-orthogonal", 4)
    torch.manual_seed(1)
    second = build_flows("sylvester-orthogonal", 4)
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: build_flows("nope", 3), r"unknown flow family 'nope'; valid: \['householder'"),
        (
            lambda: build_flows("planar", 3, hidden_dims=[4]),
            r"unknown option\(s\) \['hidden_dims'\]",
        ),
        (lambda: build_flows("iaf", 3, update="affine"), r"valid: \['activation', 'hidden_dims'"),
        (lambda: build_flows("planar", 3, num_transforms=0), "num_transforms must be an int >= 1"),
        (lambda: build_flows("radial", 3, num_transforms=True), "got True"),
        (lambda: build_flows("householder", 3, num_transforms=2.0), "got 2.0"),
        (lambda: register_flow(FLOWS["planar"]), "'planar' is already registered"),
        (lambda: register_flow("planar"), "expected a FlowFamily, got str"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _family(**changes: object) -> FlowFamily:
    def build(input_dim: int, *, context_dim: int | None = None, num_transforms: int = 2):
        return [Planar(input_dim) for _ in range(num_transforms)]

    fields = {
        "name": "test-planar",
        "build": build,
        "defaults": {"num_transforms": 2},
        "takes_context": False,
        "has_inverse": True,
        "layers": (Planar,),
        "summary": "planar layers, for the registry test",
        "references": (),
    }
    fields.update(changes)
    return FlowFamily(**fields)


def test_register_a_family_then_build_it():
    family = _family()
    try:
        assert register_flow(family) is family
        assert FLOWS["test-planar"] is family
        assert _types(build_flows("test-planar", 3)) == ["Planar", "Planar"]
        assert len(build_flows("test-planar", 3, num_transforms=5)) == 5
        with pytest.raises(ValueError, match="takes no context_dim"):
            build_flows("test-planar", 3, context_dim=2)
    finally:
        registry_module._REGISTRY.pop("test-planar", None)
    assert "test-planar" not in FLOWS


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"name": ""}, "name must be a non-empty string"),
        ({"defaults": {}}, "defaults must include num_transforms"),
        ({"defaults": {"num_transforms": 2, "width": 3}}, r"does not accept \['width'\]"),
        ({"build": lambda input_dim, num_transforms=1: []}, r"does not accept \['context_dim'\]"),
        ({"layers": (Planar, int)}, "layers must be Flow subclasses"),
        ({"layers": ()}, "layers must be Flow subclasses"),
        ({"build": None}, "build must be callable"),
    ],
)
def test_family_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        _family(**changes)


def test_sylvester_layers_keep_their_own_defaults():
    # None in the family defaults means "the layer's default", exactly as the guides did.
    (layer,) = build_flows("sylvester-householder", 10, num_transforms=1)
    assert isinstance(layer, Sylvester) and layer.num_householder == 8


#: Every family's default stack at D = 10,000 holds fewer parameters than this (5,000 per
#: latent dimension): the default widths are capped, so sizes grow linearly in D.
MAX_DEFAULT_PARAMETERS = 50_000_000


@pytest.mark.parametrize("name", list(FLOWS))
def test_default_stacks_stay_linear_in_the_dimension(name):
    torch.set_default_dtype(torch.float32)  # half the memory; the conftest restores float64
    d = 10_000
    start = time.perf_counter()
    layers = build_flows(name, d)
    seconds = time.perf_counter() - start
    count = sum(p.numel() for layer in layers for p in layer.parameters())
    assert count < MAX_DEFAULT_PARAMETERS, f"{name}: {count:,} parameters at D = {d}"
    assert seconds < 20, f"{name}: {seconds:.1f} s to build at D = {d}"
    # And one forward pass works at that size.
    y, ladj = Compose(layers)(torch.randn(2, d))
    assert y.shape == (2, d) and bool(ladj.isfinite().all())
