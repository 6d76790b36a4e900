r"""Amortized normalizing flows: an encoder drives conditional flows, for VAEs and for local
latents in (subsampled) plates.

An encoder network maps a data point :math:`x` to a context :math:`h(x)`. A diagonal Gaussian
and :math:`K` conditional flow layers take their parameters from heads on :math:`h`:

.. math::

    z_0 = \mu(h) + \sigma(h) \odot \epsilon, \quad \epsilon \sim \mathcal N(0, I), \qquad
    z_K = f_K(\cdots f_1(z_0; h) \cdots; h),

    \log q(z_K \mid x) = \log \mathcal N(\epsilon; 0, I) - \sum_i \log \sigma_i(h)
        - \sum_{k=1}^{K} \log \left| \det \partial f_k / \partial z_{k-1} \right|.

The families follow van den Berg et al. (2018): planar and radial (Rezende & Mohamed, 2015),
Householder (Tomczak & Welling, 2016), Sylvester with an orthogonal, Householder or triangular
:math:`Q` (diagonals of :math:`R, \tilde R` through tanh, everything else from linear heads on
the context) and IAF with the context as an extra input of the MADE (Kingma et al., 2016). The
layers live in :mod:`pyro_flowvi.flows`; each becomes conditional when built with
``context_dim``. The sample and :math:`\log q` come from one forward pass.

For a model with local latents :math:`z_n` in a subsampled plate,
:class:`AutoAmortizedFlowGuide` draws the :math:`z_n` of each mini-batch from the flow
conditioned on :math:`h(x_n)`: the guide's size does not grow with the data set, and the same
encoder serves every mini-batch and new data. It is one part of an
:class:`~pyro.infer.autoguide.AutoGuideList`; the global latents come from any other guide.

References:
    Sylvester Normalizing Flows for Variational Inference (van den Berg et al., 2018,
    arXiv 1803.05649)
    Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015, arXiv 1505.05770)
    Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016,
    arXiv 1606.04934)
    Improving Variational Auto-Encoders using Householder Flow (Tomczak & Welling, 2016,
    arXiv 1611.09630)
    Auto-Encoding Variational Bayes (Kingma & Welling, 2014, arXiv 1312.6114)
"""

from __future__ import annotations

__all__ = [
    "AutoAmortizedFlowGuide",
    "FlowEncoder",
    "conditional_families",
    "conditional_flows",
]

import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from torch import Tensor, nn

from ._util import is_discrete, plate_batch_shape
from .distributions import FlowDistribution
from .flows import FLOWS, Compose, ElementwiseAffine, Flow, as_flow, build_flows


def conditional_families() -> tuple[str | None, ...]:
    """The values of ``flow`` that :class:`FlowEncoder`, :class:`AutoAmortizedFlowGuide` and
    :func:`conditional_flows` accept: ``None`` (a plain Gaussian encoder) and every family of
    :data:`pyro_flowvi.flows.FLOWS` that takes a context."""
    return (None, *sorted(name for name, family in FLOWS.items() if family.takes_context))


def _is_built(flow: object) -> bool:
    """A built conditional flow: our :class:`Flow`, a zuko flow or lazy transform."""
    return isinstance(flow, nn.Module) and not isinstance(flow, type)


def _check_family(site: str, family: object, built: bool = False) -> None:
    if built and _is_built(family):
        return
    families = conditional_families()
    if family not in families:
        extra = ", or a built conditional flow (zuko or pyro_flowvi)" if built else ""
        raise ValueError(f"{site}: flow must be one of {list(families)}{extra}, got {family!r}")


# median() / quantiles(): draws x rows x latent size held at once
_SUMMARY_ELEMENTS = 2**24


def _check_positive_int(site: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{site}: {name} must be an int >= 1, got {value!r}")
    return value


def conditional_flows(
    family: str | None,
    latent_dim: int,
    context_dim: int,
    num_transforms: int = 4,
    **options: Any,
) -> list[Flow]:
    """Build ``num_transforms`` conditional layers of one registered family.

    Arguments:
        family: one of :func:`conditional_families`; ``None`` gives no layer (a plain Gaussian
            encoder).
        latent_dim: D, the size of the latent.
        context_dim: size of the context that every layer reads its parameters from.
        num_transforms: K, the number of layers (for an encoder, 4 by default, whatever the
            family's global default).
        **options: the family's options (its ``defaults`` in :data:`~pyro_flowvi.flows.FLOWS`),
            e.g. ``hidden_dims`` for IAF or ``num_ortho_vectors`` for Sylvester.

    Returns:
        The list of layers, each with ``input_dim == latent_dim`` and ``context_dim`` set
        (the family's stack, e.g. reversals between IAF layers).

    Example:
        >>> layers = conditional_flows("sylvester-orthogonal", 8, context_dim=64)
        >>> flow = Compose([ElementwiseAffine(8, context_dim=64), *layers])
    """
    site = "conditional_flows"
    _check_family(site, family)
    _check_positive_int(site, "num_transforms", num_transforms)
    if family is None:
        if options:
            raise ValueError(f"{site}: flow=None takes no flow options, got {sorted(options)}")
        return []
    return build_flows(
        family, latent_dim, context_dim=context_dim, num_transforms=num_transforms, **options
    )


class FlowEncoder(nn.Module):
    r"""An encoder whose posterior family is a diagonal Gaussian pushed through a conditional flow.

    The network :math:`h = \mathrm{MLP}(x)` gives the context; a conditional
    :class:`~pyro_flowvi.flows.ElementwiseAffine` reads :math:`(\mu, \sigma)` from it, and the
    ``num_transforms`` layers of the ``flow`` family read their parameters from it too (see
    the module docstring for the density).

    Arguments:
        input_dim: size of one (flattened) data point.
        latent_dim: size of the latent :math:`z`.
        hidden_dims: widths of the MLP; the last one is the context size. Empty: the data
            point itself is the context.
        flow: one of :func:`conditional_families` (``None`` for a plain Gaussian, or a
            registered family such as ``"iaf"``, ``"sylvester-orthogonal"``,
            ``"spline-autoregressive"``), or a built conditional flow whose context size is the
            last hidden width: a zuko flow (``zuko.flows.NSF(latent_dim,
            context=hidden_dims[-1])``, wrapped by :func:`pyro_flowvi.flows.as_flow`) or a
            :class:`~pyro_flowvi.flows.Flow` built with that ``context_dim``.
        num_transforms: K, the number of flow layers of a family.
        activation: the MLP's nonlinearity (a module class), default ``nn.ELU``.
        init_loc: initial :math:`\mu` (float or ``(latent_dim,)``), the bias of its head.
        init_scale: initial :math:`\sigma > 0`.
        flow_options: keyword arguments for every flow layer (e.g. ``{"hidden_dims": [64]}``
            for IAF, ``{"num_ortho_vectors": 8}`` for orthogonal Sylvester).

    Calling the encoder on ``x`` of shape ``batch_shape + (input_dim,)`` returns a
    :class:`~pyro_flowvi.distributions.FlowDistribution` with that batch shape and event shape
    ``(latent_dim,)``: :meth:`~pyro_flowvi.distributions.FlowDistribution.rsample_and_log_prob`
    gives draws with their exact :math:`\log q(z \mid x)` from one forward pass, and
    ``log_prob`` scores any point through the inverse of the stack (nothing is cached). In a
    VAE guide, :meth:`sample` is the one-pass way to put the draw and its :math:`\log q` on a
    Pyro site:

    .. code-block:: python

        def guide(x):
            pyro.module("encoder", encoder)
            with pyro.plate("data", x.shape[0]):
                encoder.sample("z", x)        # one pass; vectorized particles too

        def guide(x):  # also exact, with every Pyro ELBO: log q through the inverse
            pyro.module("encoder", encoder)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", encoder(x))

    The second pattern runs the stack forward to draw and backward to score (for planar,
    radial and Sylvester layers a numerical inverse), so it costs more, and a layer without an
    inverse cannot use it.

    Example:
        >>> encoder = FlowEncoder(64, 8, hidden_dims=(128,), flow="sylvester-orthogonal")
        >>> q = encoder(torch.rand(32, 64))
        >>> z, log_q = q.rsample_and_log_prob()   # (32, 8), (32,)

    References:
        Sylvester Normalizing Flows for Variational Inference (van den Berg et al., 2018,
        arXiv 1803.05649)
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (128, 128),
        flow: str | None = None,
        num_transforms: int = 4,
        *,
        activation: type[nn.Module] = nn.ELU,
        init_loc: float | Tensor = 0.0,
        init_scale: float = 1.0,
        flow_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        site = "FlowEncoder"
        self.input_dim = _check_positive_int(site, "input_dim", input_dim)
        self.latent_dim = _check_positive_int(site, "latent_dim", latent_dim)
        if isinstance(hidden_dims, int):
            hidden_dims = (hidden_dims,)
        hidden_dims = tuple(hidden_dims)
        for width in hidden_dims:
            _check_positive_int(site, f"hidden_dims entry (in {hidden_dims})", width)
        _check_family(site, flow, built=True)
        if not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"{site}: init_scale must be a number > 0, got {init_scale!r}")
        if _is_built(flow) and flow_options:
            raise ValueError(f"{site}: flow_options apply to a family name, not to {flow!r}")
        self.hidden_dims = hidden_dims
        self.family = type(flow).__name__ if _is_built(flow) else flow
        self.num_transforms = _check_positive_int(site, "num_transforms", num_transforms)
        modules: list[nn.Module] = []
        width = input_dim
        for out in hidden_dims:
            modules += [nn.Linear(width, out), activation()]
            width = out
        self.net = nn.Sequential(*modules)
        self.context_dim = width
        gaussian = ElementwiseAffine(
            latent_dim, loc=init_loc, scale=float(init_scale), context_dim=width
        )
        if _is_built(flow):  # e.g. zuko.flows.NSF(latent_dim, context=context_dim)
            layers = [as_flow(flow, latent_dim, context_dim=width)]
        else:
            options = flow_options or {}
            layers = conditional_flows(flow, latent_dim, width, num_transforms, **options)
        self.flow = Compose([gaussian, *layers])

    def context(self, x: Tensor) -> Tensor:
        """The context :math:`h(x)`, shape ``batch_shape + (context_dim,)``."""
        if x.dim() < 1 or x.shape[-1] != self.input_dim:
            raise ValueError(
                f"FlowEncoder: expected data of shape (..., {self.input_dim}), got "
                f"{tuple(x.shape)}"
            )
        return self.net(x)

    def forward(self, x: Tensor) -> FlowDistribution:
        """The posterior family at ``x``: batch shape ``x.shape[:-1]``, event ``(latent_dim,)``."""
        h = self.context(x)
        zeros = h.new_zeros(self.latent_dim)
        base = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
        return FlowDistribution(base, self.flow, h)

    def sample(self, name: str, x: Tensor, *, stick_the_landing: bool = False) -> Tensor:
        r"""``pyro.sample`` site ``name`` from :math:`q(z \mid x)`, draw and :math:`\log q` from
        one forward pass.

        The site is a ``Delta`` at the draw whose ``log_density`` is its exact
        :math:`\log q(z \mid x)`, so no ELBO needs the inverse of the stack. Inside vectorized
        plates beyond the batch of ``x`` (the particles of
        ``Trace_ELBO(vectorize_particles=True)``, ``Predictive``), each plate element gets its
        own draw.

        Arguments:
            name: the site name (the model's latent site).
            x: data of shape ``batch_shape + (input_dim,)``, inside the plate(s) of
                ``batch_shape``.
            stick_the_landing: drop the score term from the gradient of :math:`\log q` (see
                :meth:`~pyro_flowvi.distributions.FlowDistribution.rsample_and_log_prob`).

        Returns:
            The draw, of shape ``outer_plates + batch_shape + (latent_dim,)``.
        """
        q = self(x)
        active = plate_batch_shape()
        outer = active[: max(len(active) - len(q.batch_shape), 0)]
        z, log_q = q.rsample_and_log_prob(outer, stick_the_landing=stick_the_landing)
        return pyro.sample(name, dist.Delta(z, log_density=log_q, event_dim=1))

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, latent_dim={self.latent_dim}, flow={self.family!r}, "
            f"num_transforms={self.num_transforms}"
        )


def _first_arg(*args: Any, **kwargs: Any) -> Tensor:
    if not args:
        raise ValueError(
            "AutoAmortizedFlowGuide: the model was called without positional arguments, so the "
            "default data_fn (the first argument) finds no data; pass data_fn"
        )
    return args[0]


class AutoAmortizedFlowGuide(AutoGuide):
    r"""An amortized flow guide for the local latents of one (possibly subsampled) plate.

    Every latent site in ``plate`` is guided jointly, per data point: the site values of row
    :math:`n` are packed (in unconstrained space) into one vector :math:`u_n` with

    .. math::

        u_n \sim q(u \mid x_n) = \text{the flow of a } :class:`FlowEncoder` \text{ at } x_n,

    then mapped to each site's support. :math:`x_n` is row :math:`n` of ``data_fn(*args,
    **kwargs)``, a tensor whose first dimension indexes the plate: either the full data (rows
    are picked with the plate's subsample indices) or the current mini-batch. The encoder
    parameters do not depend on the data-set size, unlike ``AutoNormal``'s per-point
    parameters, and ``AutoContinuous`` guides, which size their latent by the first
    mini-batch and reuse those slots for every mini-batch, mis-handle subsampled locals.

    The global latents (outside the plate) are guided by another part of an
    :class:`~pyro.infer.autoguide.AutoGuideList`; the two parts share the plate, hence the
    mini-batch:

    .. code-block:: python

        guide = AutoGuideList(model)
        guide.append(AutoNormal(poutine.block(model, hide=["z"])))
        guide.append(AutoAmortizedFlowGuide(poutine.block(model, expose=["z"]), plate="data"))

    Arguments:
        model: a Pyro model.
        plate: name of the plate that holds the local latents.
        data_fn: ``(*args, **kwargs) -> Tensor`` giving the data that drives the encoder, one
            row per plate element; default: the model's first positional argument.
        flow: the flow family, one of :func:`conditional_families`, or a built conditional
            flow (see :class:`FlowEncoder`).
        num_transforms: number of flow layers.
        hidden_dims: widths of the encoder MLP.
        flow_options: keyword arguments for every flow layer.
        init_loc_fn: initialisation of the unconstrained locations; the encoder's location
            head starts at the mean over the plate of these values.
        init_scale: initial scale of the Gaussian (> 0), default 0.1 as in ``AutoNormal``.
        create_plates: as in :class:`~pyro.infer.autoguide.AutoGuide`; needed when the model
            passes its own ``subsample`` indices or its plate size changes between calls.
        summary_samples: draws per data row behind :meth:`median` and :meth:`quantiles`.
        stick_the_landing: the "sticking the landing" gradient for :math:`\log q` (Roeder et
            al., 2017; see :class:`~pyro_flowvi.AutoFlowGuide`); one extra inverse pass.

    Raises:
        ValueError: at the first call, naming the plate or site, when the plate holds no
            latent site, a site is discrete or sits in a second plate, the guide alone leaves
            global latents unguided, or the data rows do not match the plate.
    """

    def __init__(
        self,
        model: Callable,
        *,
        plate: str,
        data_fn: Callable[..., Tensor] | None = None,
        flow: str | None = "iaf",
        num_transforms: int = 4,
        hidden_dims: Sequence[int] = (128, 128),
        flow_options: dict[str, Any] | None = None,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        create_plates: Callable | None = None,
        summary_samples: int = 1000,
        stick_the_landing: bool = False,
    ) -> None:
        site = type(self).__name__
        if not isinstance(stick_the_landing, bool):
            raise ValueError(
                f"{site}: stick_the_landing must be True or False, got {stick_the_landing!r}"
            )
        self.stick_the_landing = stick_the_landing
        if not isinstance(plate, str):
            raise ValueError(f"{site}: plate must be the name of a pyro.plate, got {plate!r}")
        _check_family(site, flow, built=True)
        if not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"{site}: init_scale must be a number > 0, got {init_scale!r}")
        if data_fn is not None and not callable(data_fn):
            raise ValueError(f"{site}: data_fn must be callable, got {data_fn!r}")
        self.summary_samples = _check_positive_int(site, "summary_samples", summary_samples)
        self.plate = plate
        self.data_fn = data_fn if data_fn is not None else _first_arg
        self.family = flow
        self.num_transforms = _check_positive_int(site, "num_transforms", num_transforms)
        self.hidden_dims = tuple(hidden_dims)
        self.flow_options = dict(flow_options or {})
        self.init_scale = float(init_scale)
        self.init_loc_fn = init_loc_fn
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)

    # ----------------------------------------------------------------------------------------
    # construction

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        name = type(self).__name__
        local, global_ = [], []
        for site_name, site in self.prototype_trace.iter_stochastic_nodes():
            frames = [f for f in site["cond_indep_stack"] if f.vectorized]
            (local if any(f.name == self.plate for f in frames) else global_).append(site_name)
        if not local:
            plates = sorted(self._prototype_frames)
            raise ValueError(
                f"{name}: plate '{self.plate}' holds no latent sample site of the model "
                f"(plates around latent sites: {plates})"
            )
        if global_ and self.master is None:
            raise ValueError(
                f"{name}: latent sites {global_} lie outside plate '{self.plate}' and would be "
                "left unguided. Guide them with another guide inside an AutoGuideList, with "
                "poutine.block(model, hide=[...]) for each part."
            )
        frame = self._prototype_frames[self.plate]
        self._frame = frame
        self._sites: list[tuple[str, torch.Size, int, int]] = []  # name, u-event, event_dim, size
        init_locs = []
        for site_name in local:
            site = self.prototype_trace.nodes[site_name]
            fn = site["fn"]
            others = [
                f.name for f in site["cond_indep_stack"] if f.vectorized and f.name != self.plate
            ]
            if others:
                raise ValueError(
                    f"{name}: site '{site_name}' is in plates {others} besides '{self.plate}'; "
                    "this guide handles sites whose only plate is the amortized one"
                )
            if is_discrete(fn):
                raise ValueError(
                    f"{name}: site '{site_name}' is discrete ({type(fn).__name__}); an "
                    "amortized flow covers continuous latents only"
                )
            batch_shape = fn.batch_shape
            expected = torch.Size([frame.size] + [1] * (-frame.dim - 1))
            if batch_shape[len(batch_shape) - len(expected) :] != expected or any(
                size != 1 for size in batch_shape[: len(batch_shape) - len(expected)]
            ):
                raise ValueError(
                    f"{name}: site '{site_name}' has batch shape {tuple(batch_shape)}; inside "
                    f"plate '{self.plate}' (dim {frame.dim}) it must be {tuple(expected)}"
                )
            value = site["value"].detach()
            unconstrained = biject_to(fn.support).inv(value)
            u_event_dim = fn.event_dim + unconstrained.dim() - value.dim()
            u_event = unconstrained.shape[unconstrained.dim() - u_event_dim :]
            size = max(math.prod(u_event), 1)
            self._sites.append((site_name, u_event, fn.event_dim, size))
            rows = unconstrained.reshape(frame.size, size)
            init_locs.append(rows.mean(0))
        self.local_sites = [entry[0] for entry in self._sites]
        init_loc = torch.cat(init_locs)
        data = self._rows(self.data_fn(*args, **kwargs), torch.arange(frame.size))
        self.encoder = FlowEncoder(
            data.shape[-1],
            init_loc.numel(),
            self.hidden_dims,
            self.family,
            self.num_transforms,
            init_loc=init_loc,
            init_scale=self.init_scale,
            flow_options=self.flow_options,
        ).to(dtype=init_loc.dtype, device=init_loc.device)

    def _rows(self, data: object, indices: Tensor) -> Tensor:
        """The data rows of the current plate elements, flattened to ``(B, input_dim)``."""
        name, plate = type(self).__name__, self.plate
        if not isinstance(data, Tensor) or data.dim() < 1:
            raise ValueError(
                f"{name}: data_fn must return a tensor with one row per element of plate "
                f"'{plate}', got {type(data).__name__}"
                + (f" of shape {tuple(data.shape)}" if isinstance(data, Tensor) else "")
            )
        full_size = self._frame.full_size or self._frame.size
        if data.shape[0] == full_size:
            data = data.index_select(0, indices.to(data.device))
        elif data.shape[0] != indices.numel():
            raise ValueError(
                f"{name}: data_fn returned {data.shape[0]} rows, but plate '{plate}' has size "
                f"{full_size} and the current (sub)sample has {indices.numel()} elements; pass "
                "the full data or the mini-batch (and create_plates if the plate size varies)"
            )
        return data.reshape(indices.numel(), -1)

    # ----------------------------------------------------------------------------------------
    # the guide

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Draw every local site of the (sub)sampled plate elements.

        Returns:
            A dict from site name to its value.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        encoder = self.encoder
        dim = self._frame.dim
        result: dict[str, Tensor] = {}
        with plates[self.plate] as indices:
            x = self._rows(self.data_fn(*args, **kwargs), indices)
            if x.shape[-1] != encoder.input_dim:
                raise ValueError(
                    f"{type(self).__name__}: data rows of plate '{self.plate}' have "
                    f"{x.shape[-1]} entries, but the encoder was built for {encoder.input_dim}"
                )
            x = x.to(dtype=next(encoder.parameters()).dtype)
            active = plate_batch_shape()
            outer = active[: len(active) + dim]  # plates around this one, e.g. particles
            z, log_q = encoder(x).rsample_and_log_prob(
                outer, stick_the_landing=self.stick_the_landing
            )
            shape = outer + torch.Size([x.shape[0]] + [1] * (-dim - 1))
            z = pyro.sample(
                f"_{self._pyro_name}_latent",
                dist.Delta(
                    z.reshape(shape + z.shape[-1:]), log_density=log_q.reshape(shape), event_dim=1
                ),
                infer={"is_auxiliary": True},
            )
            offset = 0
            for site_name, u_event, event_dim, size in self._sites:
                unconstrained = z[..., offset : offset + size].reshape(shape + u_event)
                offset += size
                transform = biject_to(self.prototype_trace.nodes[site_name]["fn"].support)
                value = transform(unconstrained)
                if poutine.get_mask() is False:
                    log_density: Tensor | float = 0.0
                else:
                    log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
                    log_density = sum_rightmost(
                        log_density, log_density.dim() - value.dim() + event_dim
                    )
                result[site_name] = pyro.sample(
                    site_name, dist.Delta(value, log_density=log_density, event_dim=event_dim)
                )
        return result

    def log_prob_at(self, trace: Any, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        r""":math:`\log q_\phi` of the packed locals recorded in ``trace``, with those values
        held fixed and the current parameters (the protocol of
        :mod:`pyro_flowvi.estimators`: its gradient is the score term). Goes through the flow's
        inverse.

        Arguments:
            trace: this guide's trace of the current step.
            *args: the model's positional arguments.
            **kwargs: the model's keyword arguments.

        Returns:
            A dict from the auxiliary latent site's name to the log-density of each recorded
            row, shaped as that site's batch shape.
        """
        name = f"_{self._pyro_name}_latent"
        z = trace.nodes[name]["value"].detach()
        rows = self._rows(self.data_fn(*args, **kwargs), trace.nodes[self.plate]["value"])
        rows = rows.to(dtype=next(self.encoder.parameters()).dtype)
        extra = -self._frame.dim - 1  # size-1 dims between the plate and the event
        batch = z.shape[: z.dim() - 2 - extra] + (z.shape[z.dim() - 2 - extra], z.shape[-1])
        return {name: self.encoder(rows).log_prob(z.reshape(batch)).reshape(z.shape[:-1])}

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Posterior quantiles of each local site, row by row of ``data_fn(*args, **kwargs)``.

        From ``summary_samples`` draws of the encoder's flow at each row (a fixed seed, so
        repeated calls agree): the empirical quantiles of each unconstrained coordinate, mapped
        to the site's support, as :meth:`pyro_flowvi.AutoFlowGuide.quantiles` does. Pass the
        full data to get every element of the plate (as ``AutoNormal`` does for a subsampled
        plate); a mini-batch gives its rows only.

        Returns:
            A dict from site name to a tensor of shape ``(len(quantiles), rows, ...)``: the
            site's shape with the plate dimension holding the rows.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        data = self.data_fn(*args, **kwargs)
        if not isinstance(data, Tensor) or data.dim() < 1:
            raise ValueError(
                f"{type(self).__name__}: data_fn must return a tensor with one row per element "
                f"of plate '{self.plate}', got {type(data).__name__}"
            )
        x = data.reshape(data.shape[0], -1)
        dtype = next(self.encoder.parameters()).dtype
        q = torch.as_tensor(quantiles, dtype=dtype, device=x.device)
        if q.dim() != 1 or not bool(torch.all((q >= 0) & (q <= 1))):
            raise ValueError(f"quantiles must be a list of numbers in [0, 1], got {quantiles!r}")
        # bounded memory: summary_samples x rows x latent per chunk of rows
        size = self.encoder.latent_dim
        chunk = max(1, _SUMMARY_ELEMENTS // (self.summary_samples * size))
        parts = []
        device = x.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            for start in range(0, x.shape[0], chunk):
                u = self.encode(x[start : start + chunk]).sample((self.summary_samples,))
                parts.append(torch.quantile(u, q, dim=0))
        values = torch.cat(parts, dim=1)  # (Q, rows, latent)
        shape = torch.Size([len(q), x.shape[0]] + [1] * (-self._frame.dim - 1))
        result = {}
        offset = 0
        for site_name, u_event, _, site_size in self._sites:
            unconstrained = values[..., offset : offset + site_size].reshape(shape + u_event)
            offset += site_size
            support = self.prototype_trace.nodes[site_name]["fn"].support
            result[site_name] = biject_to(support)(unconstrained)
        return result

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior median of each local site, row by row (see :meth:`quantiles`)."""
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}

    def encode(self, x: Tensor) -> FlowDistribution:
        """The guide's distribution of the packed unconstrained locals at data rows ``x``.

        Raises:
            RuntimeError: before the guide has been called once (the sizes come from the model).
        """
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__}: call the guide once (e.g. one SVI step) before encode()"
            )
        dtype = next(self.encoder.parameters()).dtype
        return self.encoder(x.reshape(x.shape[0], -1).to(dtype=dtype))
