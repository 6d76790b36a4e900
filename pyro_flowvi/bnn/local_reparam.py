r"""Local reparameterization: sample pre-activations instead of weights.

For a dense layer with a Gaussian weight posterior :math:`W_{kj} \sim \mathcal N(\mu_{kj},
\sigma^2_{kj})` and an input row :math:`x`, the pre-activation :math:`b = x W^\top` is Gaussian
for each data point:

.. math::

    b_k \sim \mathcal N\Bigl(\sum_j x_j \mu_{kj},\; \sum_j x_j^2 \sigma^2_{kj}\Bigr),

and for a convolution :math:`b \sim \mathcal N(x \star \mu, x^2 \star \sigma^2)`. Drawing
:math:`b` with independent noise per data point (instead of one weight sample per mini-batch)
leaves the expected log-likelihood unchanged and removes the covariance between the data
points' gradient terms, which lowers the variance of the ELBO gradient (Kingma et al., 2015).

:func:`local_reparameterization` is the Pyro effect handler that does this around
``svi.step``. A guide opts a weight site in by sampling it from
:class:`~pyro_flowvi.bnn.GaussianWeight`. Every fresh draw from such a site becomes a thin
tensor subclass that still *is* the sampled weight (its log-densities, KL terms and any other
use are unchanged) and also carries ``(loc, scale)`` keyed by the site name; when the model
passes it as the ``weight`` of ``F.linear`` or ``F.conv2d``, the call returns a pre-activation
draw instead. Nothing is patched: the behaviour lives in the tensor that the handler hands out,
so it ends with the handler's context.

ELBO terms: the likelihood term uses the pre-activation draws; the weight sample itself is
scored by the prior and the guide (``Trace_ELBO``) or replaced by the analytic
:math:`\mathrm{KL}(q(W) \| p(W))` (``TraceMeanField_ELBO``). The two draws are independent, and
each term is unbiased, so the sum is an unbiased estimate of the same ELBO.
"""

from __future__ import annotations

__all__ = ["LocalReparameterizationMessenger", "local_reparameterization"]

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pyro.distributions import Unit
from pyro.poutine.messenger import Messenger
from torch import Tensor

from ._pyro_internals import innermost_trace
from .weight import GaussianWeight

_ARG_NAMES: dict[Callable[..., Tensor], tuple[str, ...]] = {
    F.linear: ("input", "weight", "bias"),
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
}
_KIND = {F.linear: "linear", F.conv2d: "conv2d"}


def _plain(value: Any) -> Any:
    """``value`` with every :class:`_SampledWeight` in it (also inside lists, tuples and
    dicts) viewed as a plain tensor (same storage and autograd graph)."""
    if isinstance(value, _SampledWeight):
        return value.as_subclass(Tensor)  # as_subclass does not dispatch to __torch_function__
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _SampledWeight(Tensor):
    """A sampled weight that remembers its Gaussian, or a probe that records its uses.

    Every torch operation treats it as the plain tensor it wraps, except ``F.linear`` and
    ``F.conv2d`` with it as the ``weight``: those report the use (probe) or draw the
    pre-activations from their Gaussian (local reparameterization).
    """

    _site: str
    _loc: Tensor | None
    _scale: Tensor | None
    _on_use: Callable[[str, str], None] | None
    _noise: tuple[Tensor, Callable[[int], Tensor]] | None
    _uses: int

    @staticmethod
    def wrap(
        value: Tensor,
        site: str,
        loc: Tensor | None = None,
        scale: Tensor | None = None,
        on_use: Callable[[str, str], None] | None = None,
        noise: tuple[Tensor, Callable[[int], Tensor]] | None = None,
    ) -> _SampledWeight:
        out = value.as_subclass(_SampledWeight)  # shares storage and the autograd graph
        out._site, out._loc, out._scale, out._on_use = site, loc, scale, on_use
        out._noise, out._uses = noise, 0
        return out

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = {} if kwargs is None else kwargs
        names = _ARG_NAMES.get(func)
        if names is not None:
            bound = dict(zip(names, args, strict=False)) | kwargs
            weight = bound.get("weight")
            if isinstance(weight, _SampledWeight) and not isinstance(
                bound.get("input"), _SampledWeight
            ):
                return weight._layer_call(func, bound)
        # every other operation sees plain tensors, so its results are plain tensors too
        return func(*_plain(args), **_plain(kwargs))

    def _layer_call(self, func: Callable[..., Tensor], bound: dict[str, Any]) -> Tensor:
        if self._on_use is not None:
            self._on_use(self._site, _KIND[func])
        plain = _plain(bound)
        if self._loc is None:
            return func(**plain)
        self._uses += 1
        if self._uses > 1:
            raise ValueError(
                f"local_reparameterization: the weight of site {self._site!r} is used in two "
                f"{_KIND[func]} calls in one model run; independent pre-activation draws would "
                "not share the weight, so run this model without local_reparameterization()"
            )
        loc, scale = self._loc, self._scale
        assert scale is not None
        if loc.shape != self.shape or loc.dim() != (2 if func is F.linear else 4):
            raise ValueError(
                f"local_reparameterization: site {self._site!r} has a weight of shape "
                f"{tuple(self.shape)} with Gaussian loc of shape {tuple(loc.shape)}; it needs a "
                "single (unbatched) weight draw, so vectorized particles or vectorized "
                "Predictive must run without local_reparameterization()"
            )
        x = plain.pop("input")
        plain.pop("weight")
        bias = plain.pop("bias", None)
        if self._noise is None:
            mean = func(x, loc, bias, **plain)
        else:  # MNF: a multiplicative noise z per data point, mean = (x * z) mu or (x * mu) z
            mu, sample_z = self._noise
            rows = x.shape[0] if x.dim() > (1 if func is F.linear else 3) else 1
            z = sample_z(rows)
            if func is F.linear:
                z = z.reshape(rows, *(1,) * (x.dim() - 2), -1) if x.dim() > 1 else z[0]
                mean = func(x * z, mu, bias, **plain)
            else:
                mean = func(x, mu, None, **plain)
                z = z.reshape(rows, -1, 1, 1) if x.dim() == 4 else z.reshape(-1, 1, 1)
                mean = mean * z
                if bias is not None:
                    mean = mean + bias[:, None, None]
        var = func(x * x, scale * scale, None, **plain)
        # clamp before sqrt: an all-zero input patch gives var = 0 and an infinite gradient
        tiny = torch.finfo(var.dtype).tiny ** 0.5
        return mean + var.clamp_min(tiny).sqrt() * torch.randn_like(mean)


class LocalReparameterizationMessenger(Messenger):
    """Effect handler behind :func:`local_reparameterization` (see the module docstring).

    It also guards the auxiliary-variable bounds built on it: a ``pyro.factor`` in a guide
    (a trace that already holds a :class:`~pyro_flowvi.bnn.GaussianWeight` draw) must say
    ``has_rsample``; without it ``Trace_ELBO`` would differentiate the factor as a
    score-function term, a silently wrong gradient.
    """

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        fn = msg["fn"]
        if isinstance(fn, Unit):
            self._check_guide_factor(msg)
            return
        if msg["is_observed"] or msg["value"] is not None or msg["done"]:
            return  # observed, replayed into the model, or conditioned: not a fresh draw
        if not isinstance(fn, GaussianWeight):
            return
        value = fn(*msg["args"], **msg["kwargs"])
        msg["value"] = _SampledWeight.wrap(value, msg["name"], fn.loc, fn.scale, noise=fn.noise)

    @staticmethod
    def _check_guide_factor(msg: dict[str, Any]) -> None:
        if "has_rsample" in msg["fn"].__dict__:
            return
        trace = innermost_trace()  # None (check skipped) if Pyro's internals change
        if trace is None:
            return
        in_guide = any(
            site["type"] == "sample" and isinstance(site["fn"], GaussianWeight)
            for site in trace.nodes.values()
        )
        if in_guide:
            name = msg["name"]
            raise ValueError(
                f"guide factor site {name!r} was made without has_rsample: Trace_ELBO would "
                "differentiate it as a score-function term (a wrong gradient) and "
                "TraceMeanField_ELBO rejects it; write pyro.factor("
                f"{name!r}, log_factor, has_rsample=True) for a factor computed from "
                "reparameterized samples, such as the log r(z | W) term of an auxiliary bound"
            )


def local_reparameterization() -> LocalReparameterizationMessenger:
    r"""Effect handler: draw pre-activations, not weights, for Gaussian weight sites.

    Use it around ``svi.step`` (``pyro_flowvi.fit`` enters it by itself for guides whose
    ``step_context()`` returns it). Inside, each fresh guide draw from a
    :class:`~pyro_flowvi.bnn.GaussianWeight` site, passed by the model as the weight of
    ``F.linear`` (``nn.Linear``) or ``F.conv2d`` (``nn.Conv2d``), yields a pre-activation draw
    from :math:`\mathcal N(x\mu^\top + b, x^2 (\sigma^2)^\top)` (or the convolution analogue)
    with independent noise per data point. Outside the handler the same guide and model sample
    explicit weights, as ``Predictive`` and MCMC expect.

    Each weight may feed one layer call per model run (a shared weight would get independent
    noise in each call, which changes the likelihood); a second call raises.

    Example:
        >>> with local_reparameterization():  # doctest: +SKIP
        ...     loss = svi.step(x, y)

    References:
        Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015,
        arXiv:1506.02557).
    """
    return LocalReparameterizationMessenger()


class _WeightProbe(Messenger):
    """Wraps every latent value so that its uses as a layer weight are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[str, set[str]] = {}

    def _record(self, site: str, kind: str) -> None:
        self.uses.setdefault(site, set()).add(kind)

    def _pyro_post_sample(self, msg: dict[str, Any]) -> None:
        if msg["is_observed"] or not isinstance(msg["value"], Tensor):
            return
        msg["value"] = _SampledWeight.wrap(msg["value"], msg["name"], on_use=self._record)
