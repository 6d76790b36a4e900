r"""The flow registry: one entry per flow family, read by the guides, the amortized encoders,
the benchmarks and the contract tests.

A *family* is a recipe for a stack of layers :math:`[f_1, \ldots, f_K]` for a latent of size
``input_dim``, global or (when it takes a context) conditional:

.. code-block:: python

    from pyro_flowvi.flows import FLOWS, Compose, build_flows

    layers = build_flows("iaf", 10)  # the stack AutoIAFGuide uses, K = 3
    layers = build_flows("iaf", 10, context_dim=64, num_transforms=4, hidden_dims=[32])
    FLOWS["iaf"].defaults  # {'num_transforms': 3, 'hidden_dims': None, ...}

Adding a family is one module with its layer(s) and one :func:`register_flow` entry (a
:class:`FlowFamily`); the contract test then covers it, global and conditional.
"""

from __future__ import annotations

__all__ = ["FLOWS", "FlowFamily", "build_flows", "register_flow"]

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .affine import ElementwiseAffine
from .autoregressive import Autoregressive, default_hidden_width
from .base import Flow, Reverse
from .coupling import MaskedCoupling, alternating_mask
from .householder import Householder
from .iaf import IAF
from .planar import Planar
from .radial import Radial
from .sylvester import Sylvester
from .transformers import DeepSigmoidTransformer, RationalQuadraticSpline


@dataclass(frozen=True)
class FlowFamily:
    """One registered flow family.

    Attributes:
        name: the key in :data:`FLOWS`, e.g. ``"iaf"``.
        build: ``build(input_dim, *, context_dim=None, **options) -> [f_1, ..., f_K]``; every
            option is a keyword-only parameter with its value in ``defaults`` (call it through
            :func:`build_flows`, which merges the defaults, or pass every option).
        defaults: the options of the family's global guide, ``num_transforms`` included
            (read-only).
        takes_context: whether ``build(..., context_dim=int)`` gives conditional layers.
        has_inverse: whether every layer of the stack has an inverse (so the density of any
            point is available).
        layers: the layer classes the family builds.
        summary: one line for the docs.
        references: ``"Title (Author et al., year, arXiv id)"`` entries.
    """

    name: str
    build: Callable[..., list[Flow]]
    defaults: Mapping[str, Any]
    takes_context: bool
    has_inverse: bool
    layers: tuple[type[Flow], ...]
    summary: str
    references: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        site = f"FlowFamily({self.name!r})"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"FlowFamily: name must be a non-empty string, got {self.name!r}")
        if not callable(self.build):
            raise ValueError(f"{site}: build must be callable, got {self.build!r}")
        if "num_transforms" not in self.defaults:
            raise ValueError(
                f"{site}: defaults must include num_transforms, got {sorted(self.defaults)}"
            )
        parameters = inspect.signature(self.build).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        missing = [key for key in self.defaults if key not in parameters and not takes_any]
        if missing or "context_dim" not in parameters:
            raise ValueError(
                f"{site}: build must accept context_dim and every option in defaults as "
                f"keywords; it does not accept {missing or ['context_dim']}"
            )
        if not self.layers or not all(
            isinstance(cls, type) and issubclass(cls, Flow) for cls in self.layers
        ):
            raise ValueError(f"{site}: layers must be Flow subclasses, got {self.layers!r}")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "references", tuple(self.references))


_REGISTRY: dict[str, FlowFamily] = {}

#: Every registered family by name (a read-only view; add families with :func:`register_flow`).
FLOWS: Mapping[str, FlowFamily] = MappingProxyType(_REGISTRY)


def register_flow(family: FlowFamily) -> FlowFamily:
    """Add ``family`` to :data:`FLOWS` and return it.

    Raises:
        ValueError: if ``family`` is not a :class:`FlowFamily` or its name is taken.
    """
    if not isinstance(family, FlowFamily):
        raise ValueError(f"register_flow: expected a FlowFamily, got {type(family).__name__}")
    if family.name in _REGISTRY:
        raise ValueError(
            f"register_flow: a flow family named {family.name!r} is already registered "
            f"({_REGISTRY[family.name].summary}); pick another name"
        )
    _REGISTRY[family.name] = family
    return family


def build_flows(
    name: str, input_dim: int, *, context_dim: int | None = None, **options: Any
) -> list[Flow]:
    """Build the layers of family ``name`` for a latent of size ``input_dim``.

    Arguments:
        name: a key of :data:`FLOWS`.
        input_dim: D, the size of the (unconstrained) latent.
        context_dim: the context size for conditional layers; ``None`` for a global stack.
        **options: overrides of the family's ``defaults`` (e.g. ``num_transforms``).

    Returns:
        The list of layers ``[f_1, ..., f_K]``, each with ``input_dim == D``.

    Raises:
        ValueError: on an unknown family or option (the message lists the valid ones), or a
            context for a family that takes none.
    """
    if name not in _REGISTRY:
        raise ValueError(f"build_flows: unknown flow family {name!r}; valid: {sorted(_REGISTRY)}")
    family = _REGISTRY[name]
    unknown = sorted(set(options) - set(family.defaults))
    if unknown:
        raise ValueError(
            f"build_flows({name!r}): unknown option(s) {unknown}; valid: {sorted(family.defaults)}"
        )
    if context_dim is not None and not family.takes_context:
        raise ValueError(f"build_flows({name!r}): this family takes no context_dim")
    return family.build(input_dim, context_dim=context_dim, **{**family.defaults, **options})


def _check_num_transforms(name: str, value: object) -> int:
    """Validate the ``num_transforms`` option of family ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"build_flows({name!r}): num_transforms must be an int >= 1, got {value!r}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Built-in families


def _planar(input_dim: int, *, context_dim: int | None = None, num_transforms: int) -> list[Flow]:
    count = _check_num_transforms("planar", num_transforms)
    return [Planar(input_dim, context_dim=context_dim) for _ in range(count)]


def _radial(input_dim: int, *, context_dim: int | None = None, num_transforms: int) -> list[Flow]:
    count = _check_num_transforms("radial", num_transforms)
    return [Radial(input_dim, context_dim=context_dim) for _ in range(count)]


def _householder(
    input_dim: int, *, context_dim: int | None = None, num_transforms: int | None
) -> list[Flow]:
    count = min(input_dim, 16) if num_transforms is None else num_transforms
    count = _check_num_transforms("householder", count)
    if context_dim is None:
        # A learnable scale first (reflections of an isotropic base change nothing), then one
        # layer with all K reflections: Pyro's optimizer runs one Adam per parameter tensor,
        # so K one-reflection layers cost ~1.6x more per step.
        return [
            ElementwiseAffine(input_dim, learn_loc=False),
            Householder(input_dim, num_reflections=count),
        ]
    # Conditional (van den Berg et al., 2018): the encoder's Gaussian is not isotropic, and
    # each reflection reads its vector from the context.
    return [Householder(input_dim, context_dim=context_dim) for _ in range(count)]


def _sylvester(variant: str) -> Callable[..., list[Flow]]:
    def build(
        input_dim: int, *, context_dim: int | None = None, num_transforms: int, **options: Any
    ) -> list[Flow]:
        count = _check_num_transforms(f"sylvester-{variant}", num_transforms)
        given = {key: value for key, value in options.items() if value is not None}
        return [
            Sylvester(
                input_dim, variant=variant, flip=bool(i % 2), context_dim=context_dim, **given
            )
            for i in range(count)
        ]

    return build


def _iaf(update: str) -> Callable[..., list[Flow]]:
    def build(
        input_dim: int, *, context_dim: int | None = None, num_transforms: int, **options: Any
    ) -> list[Flow]:
        count = _check_num_transforms("iaf" if update == "gated" else "iaf-affine", num_transforms)
        layers: list[Flow] = []
        for i in range(count):
            if i:
                layers.append(Reverse(input_dim))
            layers.append(IAF(input_dim, context_dim=context_dim, update=update, **options))
        return layers

    return build


#: Width caps of the default conditioners (the default width is min(max(2 D, 8), cap)): a
#: conditioner holds about (P + 1) D W parameters (P transformer parameters per dimension,
#: W hidden units), so these keep every default stack under 5,000 parameters per latent
#: dimension (IAF's cap, 256, lives in autoregressive.default_hidden_width).
SPLINE_WIDTH_CAP = 64
SPLINE_COUPLING_WIDTH_CAP = 48
NAF_WIDTH_CAP = 64
COUPLING_WIDTH_CAP = 256


def _widths(hidden_dims: int | list[int] | None, input_dim: int, cap: int) -> object:
    if hidden_dims is not None:
        return hidden_dims
    width = default_hidden_width(input_dim, cap)
    return [width, width]


def _autoregressive_stack(
    name: str,
    input_dim: int,
    context_dim: int | None,
    num_transforms: int,
    make_transformer: Callable[[], Any],
    **options: Any,
) -> list[Flow]:
    count = _check_num_transforms(name, num_transforms)
    layers: list[Flow] = []
    for i in range(count):
        if i:
            layers.append(Reverse(input_dim))
        layers.append(
            Autoregressive(
                input_dim, transformer=make_transformer(), context_dim=context_dim, **options
            )
        )
    return layers


def _spline_autoregressive(
    input_dim: int,
    *,
    context_dim: int | None = None,
    num_transforms: int,
    bins: int,
    bound: float,
    hidden_dims: int | list[int] | None,
    skip_connections: bool,
    activation: Callable[[], nn.Module],
) -> list[Flow]:
    return _autoregressive_stack(
        "spline-autoregressive",
        input_dim,
        context_dim,
        num_transforms,
        lambda: RationalQuadraticSpline(bins=bins, bound=bound),
        hidden_dims=_widths(hidden_dims, input_dim, SPLINE_WIDTH_CAP),
        skip_connections=skip_connections,
        activation=activation,
    )


def _naf(
    input_dim: int,
    *,
    context_dim: int | None = None,
    num_transforms: int,
    hidden_units: int,
    offset_spread: float,
    hidden_dims: int | list[int] | None,
    skip_connections: bool,
    activation: Callable[[], nn.Module],
) -> list[Flow]:
    return _autoregressive_stack(
        "naf",
        input_dim,
        context_dim,
        num_transforms,
        lambda: DeepSigmoidTransformer(hidden_units, offset_spread),
        hidden_dims=_widths(hidden_dims, input_dim, NAF_WIDTH_CAP),
        skip_connections=skip_connections,
        activation=activation,
    )


def _coupling_stack(
    name: str,
    input_dim: int,
    context_dim: int | None,
    num_transforms: int,
    hidden_dims: int | list[int] | None,
    cap: int,
    **options: Any,
) -> list[Flow]:
    count = _check_num_transforms(name, num_transforms)
    widths = _widths(hidden_dims, input_dim, cap)
    widths = [widths] if isinstance(widths, int) else widths
    # With D = 1 an alternating mask would keep the only coordinate every other layer (an
    # identity layer); there every layer transforms it, from its context if it has one.
    return [
        MaskedCoupling(
            input_dim,
            mask=alternating_mask(input_dim, i % 2) if input_dim > 1 else torch.zeros(1),
            hidden_dims=widths,
            context_dim=context_dim,
            **options,
        )
        for i in range(count)
    ]


def _realnvp(
    input_dim: int,
    *,
    context_dim: int | None = None,
    num_transforms: int,
    hidden_dims: int | list[int] | None,
    log_scale_bound: float,
) -> list[Flow]:
    return _coupling_stack(
        "realnvp",
        input_dim,
        context_dim,
        num_transforms,
        hidden_dims,
        COUPLING_WIDTH_CAP,
        log_scale_bound=log_scale_bound,
    )


def _spline_coupling(
    input_dim: int,
    *,
    context_dim: int | None = None,
    num_transforms: int,
    bins: int,
    bound: float,
    hidden_dims: int | list[int] | None,
) -> list[Flow]:
    return _coupling_stack(
        "spline-coupling",
        input_dim,
        context_dim,
        num_transforms,
        hidden_dims,
        SPLINE_COUPLING_WIDTH_CAP,
        transformer=RationalQuadraticSpline(bins=bins, bound=bound),
    )


_RM = "Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015, arXiv 1505.05770)"
_SNF = (
    "Sylvester Normalizing Flows for Variational Inference (van den Berg et al., 2018, "
    "arXiv 1803.05649)"
)
_NSF = "Neural Spline Flows (Durkan, Bekasov, Murray & Papamakarios, 2019, arXiv 1906.04032)"
_REALNVP = (
    "Density estimation using Real NVP (Dinh, Sohl-Dickstein & Bengio, 2017, arXiv 1605.08803)"
)
_IAF_REFS = (
    "Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016, "
    "arXiv 1606.04934)",
    "MADE: Masked Autoencoder for Distribution Estimation (Germain et al., 2015, "
    "arXiv 1502.03509)",
)

for _family in (
    FlowFamily(
        name="planar",
        build=_planar,
        defaults={"num_transforms": 8},
        takes_context=True,
        has_inverse=True,
        layers=(Planar,),
        summary="K planar layers x + u tanh(w^T x + b), each a rank-one update",
        references=(_RM,),
    ),
    FlowFamily(
        name="radial",
        build=_radial,
        defaults={"num_transforms": 8},
        takes_context=True,
        has_inverse=True,
        layers=(Radial,),
        summary="K radial contractions/expansions around learned centres",
        references=(_RM,),
    ),
    FlowFamily(
        name="householder",
        build=_householder,
        defaults={"num_transforms": None},
        takes_context=True,
        has_inverse=True,
        layers=(ElementwiseAffine, Householder),
        summary=(
            "a learned scale then K = min(D, 16) Householder reflections (a full-covariance "
            "Gaussian); conditional: K one-reflection layers"
        ),
        references=(
            "Improving Variational Auto-Encoders using Householder Flow (Tomczak & Welling, "
            "2016, arXiv 1611.09630)",
        ),
    ),
    FlowFamily(
        name="sylvester-orthogonal",
        build=_sylvester("orthogonal"),
        defaults={"num_transforms": 4, "num_ortho_vectors": None},
        takes_context=True,
        has_inverse=True,
        layers=(Sylvester,),
        summary="K Sylvester layers x + Q R tanh(R~ Q^T x + b), Q by Björck orthogonalisation",
        references=(_SNF,),
    ),
    FlowFamily(
        name="sylvester-householder",
        build=_sylvester("householder"),
        defaults={"num_transforms": 4, "num_householder": None},
        takes_context=True,
        has_inverse=True,
        layers=(Sylvester,),
        summary="K Sylvester layers, Q a product of Householder reflections",
        references=(_SNF,),
    ),
    FlowFamily(
        name="sylvester-triangular",
        build=_sylvester("triangular"),
        defaults={"num_transforms": 4},
        takes_context=True,
        has_inverse=True,
        layers=(Sylvester,),
        summary="K Sylvester layers, Q the identity or the reversal (alternating)",
        references=(_SNF,),
    ),
    FlowFamily(
        name="iaf",
        build=_iaf("gated"),
        defaults={
            "num_transforms": 3,
            "hidden_dims": None,
            "skip_connections": False,
            "sigmoid_bias": 2.0,
            "activation": nn.ELU,
        },
        takes_context=True,
        has_inverse=True,
        layers=(IAF, Reverse),
        summary="K gated IAF layers (MADE conditioner) with a reversal between them",
        references=_IAF_REFS,
    ),
    FlowFamily(
        name="iaf-affine",
        build=_iaf("affine"),
        defaults={
            "num_transforms": 3,
            "hidden_dims": None,
            "skip_connections": False,
            "max_log_scale": 3.0,
            "activation": nn.ELU,
        },
        takes_context=True,
        has_inverse=True,
        layers=(IAF, Reverse),
        summary="K affine IAF layers (softly bounded log-scale) with a reversal between them",
        references=_IAF_REFS,
    ),
    FlowFamily(
        name="spline-autoregressive",
        build=_spline_autoregressive,
        defaults={
            "num_transforms": 3,
            "bins": 8,
            "bound": 5.0,
            "hidden_dims": None,
            "skip_connections": False,
            "activation": nn.ELU,
        },
        takes_context=True,
        has_inverse=True,
        layers=(Autoregressive, Reverse),
        summary=(
            "K autoregressive rational-quadratic spline layers (IAF direction, identity tails "
            "outside [-B, B]) with a reversal between them"
        ),
        references=(_NSF, _IAF_REFS[1]),
    ),
    FlowFamily(
        name="spline-coupling",
        build=_spline_coupling,
        defaults={"num_transforms": 4, "bins": 8, "bound": 5.0, "hidden_dims": None},
        takes_context=True,
        has_inverse=True,
        layers=(MaskedCoupling,),
        summary="K rational-quadratic spline coupling layers with alternating masks",
        references=(_NSF, _REALNVP),
    ),
    FlowFamily(
        name="realnvp",
        build=_realnvp,
        defaults={"num_transforms": 4, "hidden_dims": None, "log_scale_bound": 5.0},
        takes_context=True,
        has_inverse=True,
        layers=(MaskedCoupling,),
        summary="K affine coupling layers (softly bounded log-scale) with alternating masks",
        references=(_REALNVP,),
    ),
    FlowFamily(
        name="naf",
        build=_naf,
        defaults={
            "num_transforms": 3,
            "hidden_units": 8,
            "offset_spread": 0.5,
            "hidden_dims": None,
            "skip_connections": False,
            "activation": nn.ELU,
        },
        takes_context=True,
        has_inverse=True,
        layers=(Autoregressive, Reverse),
        summary=(
            "K neural autoregressive layers with a deep sigmoidal transformer (IAF direction, "
            "inverse by safeguarded Newton) and a reversal between them"
        ),
        references=(
            "Neural Autoregressive Flows (Huang, Krueger, Lacoste & Courville, 2018, "
            "arXiv 1804.00779)",
            _IAF_REFS[1],
        ),
    ),
):
    register_flow(_family)
del _family
