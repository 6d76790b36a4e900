r""":class:`AutoFlowGuide`, the flow autoguide that every named guide specializes.

Every guide packs the model's continuous latents into one unconstrained vector (Pyro's
:class:`~pyro.infer.autoguide.AutoContinuous`) and models it as

.. math::

    z = \mu + \sigma \odot f_K \circ \dots \circ f_1(\epsilon), \qquad
    \epsilon \sim \mathcal N(0, I),

so that a freshly built guide (every layer near the identity) starts as a Gaussian: by
default at ``init_loc_fn`` with scales from the model's curvature there, or at a Laplace
approximation (then :math:`z = \mu_0 + L(\mu + \sigma \odot f(\epsilon))` with a fixed
:math:`L`) where that starts with a higher ELBO; see ``init_scale``. The flow layers act in
standardized coordinates, which keeps their parameters of order one whatever the scale of the
posterior. The log-density of each draw comes from the same forward pass as the draw.
"""

from __future__ import annotations

__all__ = ["AutoFlowGuide"]

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor, nn
from torch.distributions import constraints

from .._util import is_discrete, plate_batch_shape
from ..distributions import FlowDistribution
from ..flows import FLOWS, Compose, ElementwiseAffine, Flow, TriangularAffine, build_flows
from ..flows.zuko import as_flow
from .initialization import initial_gaussian, model_log_density
from .transform import FlowTransform

#: A flow layer (or stack), or a callable that builds one from the latent dimension ``D``.
FlowSpec = Flow | Callable[[int], Flow]


def _is_built(spec: object) -> bool:
    """A built layer: our Flow, or a zuko flow / lazy transform (modules) or a transform."""
    if isinstance(spec, type):
        return False
    return isinstance(spec, (Flow, nn.Module, torch.distributions.Transform))


def _family_options(
    site: str, family: str, options: Mapping[str, Any] | None, num_transforms: int | None
) -> tuple[str, dict[str, Any]]:
    """Check a family name and its options; return them with the family's defaults filled in."""
    if family not in FLOWS:
        raise ValueError(f"{site}: unknown flow family {family!r}; valid: {sorted(FLOWS)}")
    options = dict(options or {})
    if num_transforms is not None:
        options["num_transforms"] = num_transforms
    defaults = FLOWS[family].defaults
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"{site}: unknown option(s) {unknown} of flow family {family!r}; valid: "
            f"{sorted(defaults)}"
        )
    return family, {**defaults, **options}


def _shape_key(args: tuple, kwargs: dict) -> tuple:
    """The shapes of the tensor arguments of a call (what a change of data size changes)."""
    items = [(i, value) for i, value in enumerate(args)] + sorted(kwargs.items())
    return tuple((key, tuple(value.shape)) for key, value in items if torch.is_tensor(value))


def _is_subsampled(frame: object) -> bool:
    """Whether a plate frame covers only part of its plate (a mini-batch)."""
    full = frame.full_size
    return bool(frame.vectorized and full is not None and frame.size < full)


# pyro.module's warning about a parameter with requires_grad=False (see AutoFlowGuide._flow).
_FROZEN_WARNING = r".* was not registered in the param store because requires_grad=False"

# base="studentt": starting degrees of freedom of every coordinate and their lower bound.
_INIT_DF = 10.0
_MIN_DF = 1.0


def _initial_gain(layers: Sequence[Flow], dim: int) -> Tensor:
    r"""The per-coordinate gain :math:`c` of a fresh stack when it is the map
    :math:`f(\epsilon) = c \odot \epsilon` (IAF's gated layers start as
    :math:`\mathrm{sigmoid}(2)\, \epsilon`; most other layers as the identity, :math:`c = 1`),
    else ones. Probed at a few fixed points with a private generator and no gradients, so the
    guide's start does not depend on the global random state or the grad mode."""
    dtype = torch.get_default_dtype()
    for layer in layers:
        for tensor in layer.parameters():
            dtype = tensor.dtype
            break
    ones = torch.ones(dim, dtype=dtype)
    if not layers:
        return ones
    generator = torch.Generator().manual_seed(0)
    eps = torch.randn(8, dim, generator=generator, dtype=dtype) + 0.5
    with torch.no_grad():
        stack = Compose(list(layers))
        y, ladj = stack(eps)
        zero, _ = stack(torch.zeros(1, dim, dtype=dtype))
    gain = (y / eps).mean(0)
    tol = 1e-5 if dtype == torch.float64 else 1e-3
    elementwise = torch.allclose(y, gain * eps, rtol=tol, atol=tol) and torch.allclose(
        zero, torch.zeros_like(zero), atol=tol
    )
    if not elementwise or not bool(torch.all(gain > 0)):
        return ones
    return gain


class AutoFlowGuide(AutoContinuous):
    r"""A normalizing-flow guide over all continuous latents, with a learnable Gaussian base.

    .. math::

        q(z) = \text{push-forward of } \mathcal N(0, I) \text{ through }
        \epsilon \mapsto \mu + \sigma \odot f_K \circ \dots \circ f_1(\epsilon)

    Arguments:
        model: a Pyro model.
        flows: the layers :math:`f_1, \dots`: the name of a registered flow family (a key of
            :data:`pyro_flowvi.flows.FLOWS`, e.g. ``"spline-autoregressive"``), a flow class or
            factory ``input_dim -> Flow`` (e.g. ``IAF``, ``functools.partial(IAF,
            hidden_dims=[32])``), a built :class:`~pyro_flowvi.flows.Flow` of the right size,
            or a sequence of classes, factories and layers. A zuko flow
            (``zuko.flows.NSF(features=D)``), zuko lazy transform or torch ``Transform`` (or a
            factory returning one) is wrapped by :func:`pyro_flowvi.flows.as_flow`; zuko's own
            base distribution is then replaced by this guide's. The latent size is only known
            once the model has run, hence names and factories.
        flow_options: options of the named family (see its ``defaults`` in
            :data:`~pyro_flowvi.flows.FLOWS`); only with a family name.
        init_loc_fn: per-site initialisation of :math:`\mu` (see
            :mod:`pyro.infer.autoguide.initialization`); default ``init_to_median``.
        init_scale: how the base Gaussian starts. A number > 0: :math:`\mu` at
            ``init_loc_fn``, every :math:`\sigma_i` equal to it (``AutoNormal``'s way; it uses
            0.1). ``"diag"``: :math:`\mu` at ``init_loc_fn`` and :math:`\sigma_i = 1 /
            \sqrt{-\partial_i^2 \log p}`, the diagonal curvature of the unconstrained log
            joint there (:func:`~pyro_flowvi.guides.initialization.curvature_scale`).
            ``"full"``: a Laplace approximation preconditions the guide, :math:`z = \mu_0 +
            L\,(\mu + \sigma \odot f_K \circ \dots \circ f_1(\epsilon))`, with
            :math:`\mu_0` the mode found by L-BFGS from the ``init_loc_fn`` location
            (:func:`~pyro_flowvi.guides.initialization.find_mode`), :math:`L L^\top` the
            inverse curvature there (fixed), and :math:`\mu = 0`,
            :math:`\sigma = 1` learned from there; it suits strongly correlated or badly
            conditioned posteriors, where Adam's per-coordinate steps crawl along a ridge, and
            misleads where the mode is unrepresentative (a funnel). ``"auto"`` (default):
            ``"full"`` if L-BFGS finds a maximum and that start has the higher ELBO, estimated
            from 64 fixed draws of each starting Gaussian, else ``"diag"``; ``"diag"`` alone
            above 256 latent dimensions (the full Hessian takes one backward pass per
            dimension) or when the model subsamples a plate (a noisy log joint). With Pyro's
            ``init_to_value`` giving a latent site's value, the start stays centred there
            (``"full"`` and ``"auto"`` take the curvature at that point, no mode search).
            :attr:`init_choice` records which was used; it is saved in
            :meth:`~torch.nn.Module.state_dict`.
        base: the distribution of :math:`\epsilon`. ``"normal"`` (default): :math:`\mathcal
            N(0, I)`. ``"studentt"``: independent Student-t coordinates with learned degrees
            of freedom :math:`\nu_i > 1` (:attr:`base_df`, starting at 10), a tail-adaptive
            flow (Jaini et al., 2020). Every layer here grows at most linearly far out, so a
            Gaussian base gives light (Gaussian) tails whatever the flow. Where the
            posterior's tails are heavier (a positive or bounded parameter near its boundary
            has an exponential tail in unconstrained space), the importance ratios p/q are
            unbounded there and PSIS k-hat grows with the number of draws; a heavier-tailed
            base keeps them bounded.
        num_transforms: with a family name, its number of layers (default: the family's);
            otherwise how many times the ``flows`` sequence is repeated (fresh layers each
            time; default 1, and 1 when ``flows`` holds built layers).
        summary_samples: number of draws behind :meth:`median` and :meth:`quantiles`.
        stick_the_landing: give the ELBO the "sticking the landing" gradient (Roeder et al.,
            2017): each draw's :math:`\log q` keeps its value but loses its score-function
            gradient, which is zero in expectation and, when :math:`q` equals the posterior,
            the only part of the gradient left (so the plain estimator keeps moving a perfect
            guide, and this one does not). Works with every Pyro ELBO and with vectorized
            particles; costs one pass through the inverse of the flow per step. See
            docs/training.md.

    Attributes:
        init_choice: ``"diag"`` or ``"full"``, the start the flow was built from (``None``
            until the guide first runs).
        base_df: with ``base="studentt"``, the learned degrees of freedom of the base, shape
            ``(D,)``.

    Example:
        >>> guide = AutoFlowGuide(model, flows=[IAF, Reverse], num_transforms=3)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    """

    def __init__(
        self,
        model: Callable,
        flows: str | FlowSpec | Sequence[FlowSpec] = (),
        *,
        flow_options: Mapping[str, Any] | None = None,
        init_loc_fn: Callable = init_to_median,
        init_scale: float | str = "auto",
        base: str = "normal",
        num_transforms: int | None = None,
        summary_samples: int = 4000,
        stick_the_landing: bool = False,
    ) -> None:
        name = type(self).__name__
        if base not in ("normal", "studentt"):
            raise ValueError(f"{name}: base must be 'normal' or 'studentt', got {base!r}")
        if init_scale not in ("auto", "diag", "full") and (
            isinstance(init_scale, bool)
            or not isinstance(init_scale, (int, float))
            or not init_scale > 0
        ):
            raise ValueError(
                f"{name}: init_scale must be a number > 0, 'auto', 'diag' or 'full', "
                f"got {init_scale!r}"
            )
        if num_transforms is not None and (
            isinstance(num_transforms, bool) or not isinstance(num_transforms, int)
        ):
            raise ValueError(f"{name}: num_transforms must be an int >= 1, got {num_transforms!r}")
        if num_transforms is not None and num_transforms < 1:
            raise ValueError(f"{name}: num_transforms must be >= 1, got {num_transforms}")
        if not isinstance(summary_samples, int) or summary_samples < 2:
            raise ValueError(
                f"{name}: summary_samples must be an int >= 2, got {summary_samples!r}"
            )
        if not isinstance(stick_the_landing, bool):
            raise ValueError(
                f"{name}: stick_the_landing must be True or False, got {stick_the_landing!r}"
            )
        self.stick_the_landing = stick_the_landing
        self.flow_family: str | None = None
        self.flow_options: dict[str, Any] = {}
        if isinstance(flows, str):
            self.flow_family, self.flow_options = _family_options(
                name, flows, flow_options, num_transforms
            )
            specs: list[FlowSpec] = []
            num_transforms = self.flow_options["num_transforms"]
        else:
            if flow_options:
                raise ValueError(
                    f"{name}: flow_options apply to a flow family given by name, but flows is "
                    f"{flows!r}"
                )
            single = _is_built(flows) or callable(flows)
            specs = [flows] if single else list(flows)
            for spec in specs:
                if not (_is_built(spec) or callable(spec)):
                    raise ValueError(
                        f"{name}: each entry of flows must be a flow family name, a Flow, a zuko "
                        f"flow or transform, or a callable input_dim -> Flow, got {spec!r}"
                    )
            num_transforms = 1 if num_transforms is None else num_transforms
            if num_transforms > 1 and any(_is_built(spec) for spec in specs):
                raise ValueError(
                    f"{name}: flows holds built layers, which cannot be repeated "
                    f"num_transforms={num_transforms} times; pass classes or factories instead"
                )
        self._flow_specs = specs
        self.init_scale = init_scale if isinstance(init_scale, str) else float(init_scale)
        self.base = base
        self.num_transforms = num_transforms
        self.summary_samples = summary_samples
        self.init_choice: str | None = None  # "diag" or "full", set when the guide is built
        # AutoContinuous wraps the model in InitMessenger, which draws init_loc_fn's values
        # (init_to_median: 15 prior draws per site) at every call, even for sites that are
        # then conditioned. The start's log-joint evaluations use the model as given, in a
        # tuple so that a PyroModule model is not registered as a submodule twice.
        self._given_model = (model,)
        self._init_loc_fn = init_loc_fn
        self._validated_shapes: set[tuple] = set()
        super().__init__(model, init_loc_fn=init_loc_fn)

    # ----------------------------------------------------------------------------------------
    # construction

    def _build_flows(self, input_dim: int) -> list[Flow]:
        """The layers f_1..f_K for a latent of size ``input_dim``."""
        if self.flow_family is not None:
            return build_flows(self.flow_family, input_dim, **self.flow_options)
        layers = []
        for _ in range(self.num_transforms):
            for spec in self._flow_specs:
                layer = spec if _is_built(spec) else spec(input_dim)
                if not isinstance(layer, Flow):
                    if not _is_built(layer):
                        raise ValueError(
                            f"{type(self).__name__}: flows factory {spec!r} returned "
                            f"{type(layer).__name__}, not a pyro_flowvi.flows.Flow or a zuko "
                            "flow or transform"
                        )
                    layer = as_flow(layer, input_dim)  # a zuko flow, lazy transform or transform
                if layer.context_dim is not None:
                    raise ValueError(
                        f"{type(self).__name__}: layer {type(layer).__name__} is conditional "
                        f"(context_dim={layer.context_dim}); a global guide has no context"
                    )
                if layer.input_dim != input_dim:
                    raise ValueError(
                        f"{type(self).__name__}: layer {type(layer).__name__} has "
                        f"input_dim={layer.input_dim}, but the model has {input_dim} "
                        "unconstrained latent dimensions"
                    )
                layers.append(layer)
        return layers

    def _check_sites(self) -> None:
        name = type(self).__name__
        for site_name, site in self.prototype_trace.iter_stochastic_nodes():
            if is_discrete(site["fn"]):
                raise ValueError(
                    f"{name}: latent site '{site_name}' is discrete "
                    f"({type(site['fn']).__name__}); flow guides cover continuous latents only. "
                    "Enumerate it out (config_enumerate + TraceEnum_ELBO, see "
                    "https://pyro.ai/examples/enumeration.html) or guide it separately inside "
                    "an AutoGuideList."
                )
            for frame in site["cond_indep_stack"]:
                if _is_subsampled(frame):
                    raise ValueError(
                        f"{name}: latent site '{site_name}' is local to plate '{frame.name}', "
                        f"which is subsampled ({frame.size} of {frame.full_size}); a global "
                        "guide would reuse the same latent slots for every mini-batch. Hide it "
                        f"from this guide (poutine.block(model, hide=['{site_name}'])) and guide "
                        "it with pyro_flowvi.amortized (an encoder-driven flow) inside an "
                        "AutoGuideList."
                    )

    def _setup_prototype(self, *args: object, **kwargs: object) -> None:
        try:
            super()._setup_prototype(*args, **kwargs)
        except (NotImplementedError, ValueError, RuntimeError):
            if self.prototype_trace is not None:
                self._check_sites()  # a clearer error than Pyro's, when one applies
            raise
        self._check_sites()
        init_loc = self._init_loc().detach()
        layers = self._build_flows(self.latent_dim)
        # initial_gaussian runs with gradients (L-BFGS, Hessians) even when the guide is first
        # called under torch.no_grad(), as median() and fit's resume do: the same guide.
        start = initial_gaussian(
            self._log_density(*args, **kwargs),
            init_loc,
            self.init_scale,
            pinned=self._pins_location(),
            noisy=self._subsampled_log_joint(),
        )
        self.init_choice, loc, scale = start.kind, start.loc, start.scale
        self._validated_shapes = {_shape_key(args, kwargs)}
        # a fresh stack that scales each coordinate (IAF's gated update: sigmoid(2)^K) would
        # move the start away from the Gaussian chosen above; the affine layer undoes that
        gain = _initial_gain(layers, self.latent_dim)
        if self.init_choice == "full":
            # Learned layers work in the coordinates whitened by the Laplace covariance at the
            # mode: z = mode + L (mu + sigma * f(eps)), mu = 0 and sigma = 1 / gain at first.
            layers.append(ElementwiseAffine(self.latent_dim, scale=1 / gain))
            layers.append(TriangularAffine(loc, scale))
        else:
            layers.append(ElementwiseAffine(self.latent_dim, loc=loc, scale=scale / gain))
        self.flow = Compose(layers).to(dtype=init_loc.dtype, device=init_loc.device)
        if self.stick_the_landing and not self.flow.has_inverse:
            missing = sorted({type(layer).__name__ for layer in layers if not layer.has_inverse})
            raise ValueError(
                f"{type(self).__name__}: stick_the_landing needs the inverse of every layer, "
                f"and {missing} have none"
            )
        if self.base == "studentt":
            self.base_df = PyroParam(
                torch.full_like(init_loc, _INIT_DF), constraint=constraints.greater_than(_MIN_DF)
            )

    def _log_density(self, *args: object, **kwargs: object) -> Callable[[Tensor], Tensor]:
        """The model's unconstrained log joint as a function of one packed point."""
        return model_log_density(self._given_model[0], self._unpack_latent, args, kwargs)

    def _pins_location(self) -> bool:
        """Whether ``init_loc_fn`` gave some latent site a value of the user's choosing: then
        the start stays centred there (no mode search).

        Pyro's own convention (its ``ReparamMessenger`` reads it too): the generic strategies
        (``init_to_median``, ``init_to_mean``, ``init_to_feasible``, ``init_to_sample``,
        ``init_to_uniform``) mark their values with ``_pyro_custom_init = False``; a value
        without that mark came from ``init_to_value`` or from a function of the user's.
        """
        return any(
            getattr(site["value"], "_pyro_custom_init", True)
            for _, site in self.prototype_trace.iter_stochastic_nodes()
        )

    def _subsampled_log_joint(self) -> bool:
        """Whether any site of the model sits in a subsampled plate (a noisy log joint)."""
        for site in self.prototype_trace.nodes.values():
            if site["type"] != "sample":
                continue
            if any(_is_subsampled(frame) for frame in site["cond_indep_stack"]):
                return True
        return False

    # ----------------------------------------------------------------------------------------
    # the saved state and the data the guide was built for

    def get_extra_state(self) -> dict[str, object]:
        """The non-tensor part of :meth:`~torch.nn.Module.state_dict`: the start the flow was
        built from."""
        return {"init_choice": self.init_choice}

    def set_extra_state(self, state: dict[str, object]) -> None:
        """Refuse a state saved from a guide whose flow was built from another start.

        ``init_scale="auto"`` picks the start from the model and data, and the Laplace start
        adds a fixed preconditioner to the flow: loading such a state into a guide built
        otherwise would silently mix two guides.
        """
        name = type(self).__name__
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{name}: call the guide once with the model's arguments (guide(*args)) before "
                "load_state_dict; the flow's layers are only built then"
            )
        saved = state.get("init_choice") if isinstance(state, dict) else None
        if saved != self.init_choice:
            raise ValueError(
                f"{name}: the state was saved from a guide built with start {saved!r}, but this "
                f"guide was built with start {self.init_choice!r} (init_scale="
                f"{self.init_scale!r}); build it with init_scale={saved!r} to load this state"
            )

    def _check_data_shapes(self, args: tuple, kwargs: dict) -> None:
        """Refuse data whose plates around latent sites differ in size from the prototype's.

        A global guide holds one latent slot per element of such a plate; data of another size
        would broadcast against those slots silently. Only a change of the arguments' tensor
        shapes triggers the check (one model run with the global RNG state preserved).
        """
        key = _shape_key(args, kwargs)
        if key in self._validated_shapes:
            return
        sizes = {}
        for _, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    sizes[frame.name] = frame.size
        if sizes:
            tensors = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
            devices = sorted({v.device.index or 0 for v in tensors if v.device.type == "cuda"})
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                model = self._given_model[0]
                trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
            for site in trace.nodes.values():
                if site["type"] != "sample":
                    continue
                for frame in site["cond_indep_stack"]:
                    expected = sizes.get(frame.name)
                    if expected is not None and frame.size != expected:
                        raise ValueError(
                            f"{type(self).__name__}: plate '{frame.name}' holds latent sites and "
                            f"had size {expected} when the guide was built, but has size "
                            f"{frame.size} with these arguments. A global guide keeps one latent "
                            "slot per plate element: build a new guide for this data, or guide "
                            "the local latents with pyro_flowvi.AutoAmortizedFlowGuide."
                        )
        self._validated_shapes.add(key)

    # ----------------------------------------------------------------------------------------
    # the posterior

    def _flow(self) -> Compose:
        """The flow stack. Inside a guide call, each access registers its parameters with
        Pyro's param store (``PyroModule`` calls ``pyro.module``), which leaves out frozen
        parameters (``requires_grad=False``) and warns about each one unless the stack is in
        eval mode. Freezing a trained guide (``guide.requires_grad_(False)``, as before
        prediction or NeuTra) is deliberate, and Pyro's own autoguides stay silent then."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FROZEN_WARNING, category=UserWarning)
            return self.flow

    def _built(self, method: str) -> None:
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__}.{method}: call the guide once with the model's arguments "
                "(guide(*args)) first; the flow's layers are only built then"
            )

    def get_base_dist(self) -> dist.TorchDistribution:
        r"""The distribution of :math:`\epsilon`, event shape ``(D,)``: standard normal (or
        Student-t with :attr:`base_df` for ``base="studentt"``).

        As for Pyro's ``AutoContinuous``, the posterior is ``TransformedDistribution(
        guide.get_base_dist(), guide.get_transform())``; Pyro's
        :class:`~pyro.infer.reparam.NeuTraReparam` reads these two methods.
        """
        self._built("get_base_dist")
        return self._base_dist(self._flow())

    def _base_dist(self, flow: Compose) -> dist.TorchDistribution:
        """:meth:`get_base_dist` for the stack ``flow`` already fetched (each access of
        ``self.flow`` inside a guide call registers every parameter with Pyro again)."""
        loc = flow.layers[-1].loc
        zero, one = torch.zeros_like(loc), torch.ones_like(loc)
        if self.base == "studentt":
            return dist.StudentT(self.base_df, zero, one).to_event(1)
        return dist.Normal(zero, one).to_event(1)

    def get_transform(self, *args: object, **kwargs: object) -> FlowTransform:
        r"""The whole map from :math:`\epsilon` to the packed unconstrained latent (the flow
        layers, the base location and scale, and the Laplace preconditioner if any), as a
        :class:`~torch.distributions.Transform` (see :meth:`get_base_dist`)."""
        if self.prototype_trace is None and (args or kwargs):
            self._setup_prototype(*args, **kwargs)
        self._built("get_transform")
        return FlowTransform(self._flow())

    def get_posterior(self, *args: object, **kwargs: object) -> FlowDistribution:
        """The flow distribution over the packed unconstrained latent (event shape ``(D,)``).

        Its ``rsample_and_log_prob`` returns draws with their exact log-density; its
        ``log_prob`` scores any point when every layer is invertible.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        flow = self._flow()
        return FlowDistribution(self._base_dist(flow), flow)

    def sample_latent(self, *args: object, **kwargs: object) -> Tensor:
        """Draw the packed latent and score it in the same pass.

        The auxiliary site carries the draw as a ``Delta`` whose ``log_density`` is
        :math:`\\log q(z)`, so the ELBO never needs to invert the flow.
        """
        posterior = self.get_posterior(*args, **kwargs)
        self._check_data_shapes(args, kwargs)
        z, log_q = posterior.rsample_and_log_prob(
            plate_batch_shape(), stick_the_landing=self.stick_the_landing
        )
        return pyro.sample(
            f"_{self._pyro_name}_latent",
            dist.Delta(z, log_density=log_q, event_dim=1),
            infer={"is_auxiliary": True},
        )

    # ----------------------------------------------------------------------------------------
    # summaries

    @torch.no_grad()
    def _summary_draws(self, *args: object, **kwargs: object) -> Tensor:
        r"""``summary_samples`` draws (rounded up to even) from a fixed seed, in antithetic pairs
        :math:`f(\epsilon), f(-\epsilon)`: the base is symmetric, so each half is a sample
        of the guide, and wherever the guide is point-symmetric (every Gaussian, so every
        guide at its start) the median comes out exactly at the centre."""
        posterior = self.get_posterior(*args, **kwargs)
        device = posterior.base.mean.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            eps = posterior.base.sample(((self.summary_samples + 1) // 2,))
        return self._flow()(torch.cat([eps, -eps]))[0]

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: object, **kwargs: object
    ) -> dict[str, Tensor]:
        """Posterior quantiles of each latent site.

        Computed from ``summary_samples`` draws (a fixed seed, so repeated calls agree): the
        empirical quantiles of each unconstrained coordinate, mapped to the site's support. For
        elementwise monotone supports (real, positive, interval) these are the exact marginal
        quantiles up to Monte Carlo error; for simplex or Cholesky factors they are a point in
        the support built from coordinatewise quantiles.

        Returns:
            A dict from site name to a tensor of shape ``(len(quantiles),) + site_shape``.
        """
        latents = self._summary_draws(*args, **kwargs)
        q = torch.as_tensor(quantiles, dtype=latents.dtype, device=latents.device)
        if q.dim() != 1 or not bool(torch.all((q >= 0) & (q <= 1))):
            raise ValueError(f"quantiles must be a list of numbers in [0, 1], got {quantiles!r}")
        values = torch.quantile(latents, q, dim=0)
        result: dict[str, list[Tensor]] = {}
        for row in values:
            for site, unconstrained in self._unpack_latent(row):
                result.setdefault(site["name"], []).append(
                    biject_to(site["fn"].support)(unconstrained)
                )
        return {name: torch.stack(parts) for name, parts in result.items()}

    @property
    def default_loss(self) -> str:
        """The objective :func:`~pyro_flowvi.fit` trains this guide with when given none.

        ``"stl"`` (the ELBO with the "sticking the landing" gradient, through this guide's
        ``stick_the_landing`` option) when every layer has an inverse and none is
        autoregressive: planar, radial, Householder, Sylvester, RealNVP and spline-coupling
        stacks, whose STL step costs 1.1-2x a plain one. From an exact start (a 100-D
        correlated Gaussian, 1,000 steps) the plain ELBO drifted 0.12-1.7 nats away with these
        families, STL at most 0.16 (docs/guides.md, "Default training"). ``"elbo"`` for IAF,
        NAF, autoregressive splines and zuko flows, whose STL step costs 3-9x a plain one
        (pass ``loss="stl"`` to :func:`~pyro_flowvi.fit` to choose it anyway), and before the
        guide is built.
        """
        from ..flows.autoregressive import Autoregressive
        from ..flows.zuko import ZukoFlow

        flow = getattr(self, "flow", None)
        if not isinstance(flow, Flow) or not flow.has_inverse:
            return "elbo"
        layers = flow.layers if isinstance(flow, Compose) else [flow]
        if any(isinstance(layer, (Autoregressive, ZukoFlow)) for layer in layers):
            return "elbo"
        return "stl"

    @property
    def default_num_particles(self) -> int:
        """The particles per step :func:`~pyro_flowvi.fit` draws (vectorized) when given no
        ``loss`` and no ``num_particles``: 8 with :attr:`default_loss` ``"stl"``, 16 with
        ``"elbo"``.

        Adam divides each step by the gradient's running scale, so near the optimum it moves
        by about ``lr`` whatever the gradient's size, and a noisy gradient makes the fit
        wander off an exact start. More particles make the gradient point back more often:
        from an exact start (a 100-D correlated Gaussian, 1,000 steps of the default
        schedule) the plain ELBO's drift fell from 0.10 to 0.034 and 0.015 nats with 4 and
        16 particles for the IAF, from 0.63 to 0.12 and 0.07 with 8 and 16 for the
        autoregressive spline, from 0.14 to 0.05 with 8 for NAF; STL's fell from 0.16 to
        0.001 with 8 for the Householder Sylvester guide (docs/guides.md, "Default
        training"). Vectorized particles cost 1.0-2.5x a one-particle step on these models;
        pass ``num_particles`` to :func:`~pyro_flowvi.fit` to choose otherwise (1 for a
        model that cannot take a batch dimension of particles).
        """
        return 8 if self.default_loss == "stl" else 16

    @torch.no_grad()
    def median(self, *args: object, **kwargs: object) -> dict[str, Tensor]:
        """Posterior median of each latent site (see :meth:`quantiles` for how it is computed)."""
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}
