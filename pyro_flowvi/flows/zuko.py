r"""Use a `zuko <https://github.com/probabilists/zuko>`_ flow as a pyro-flowvi flow layer.

:func:`as_flow` wraps a ``zuko.flows.Flow`` (e.g. ``zuko.flows.NSF(features=D)``), a zuko
``LazyTransform`` or a built ``torch.distributions.Transform`` as a
:class:`~pyro_flowvi.flows.Flow`, so that it can sit between this library's learnable Gaussian
base and the model (``AutoFlowGuide(model, flows=zuko_flow)``,
``FlowEncoder(flow=zuko_flow)``):

- A ``zuko.flows.Flow`` is used in its **sampling direction**, ``flow.transform(c).inv``, the
  map zuko's own ``rsample`` applies to a base draw, so the guide's law is the zuko flow's law
  with this library's base in place of zuko's. Its own base distribution (``flow.base``) is
  **ignored**. For a zuko autoregressive flow (MAF, NSF, NAF, ...) that direction takes D
  sequential passes; invert the transform first (``flow.transform = flow.transform.inv``, as
  Pyro's tutorial does) for the one-pass inverse-autoregressive direction.
- A ``LazyTransform`` or a built ``Transform`` is used as given: forward = its
  ``call_and_ladj``, inverse = its ``.inv``. A built transform has no trainable parameters (its
  tensors are fixed); pass the lazy module to train it.
- A conditional zuko flow (``context=C``) gets the context; ``context_dim`` must be given.

zuko is imported only by these functions, never by ``import pyro_flowvi``. Importing zuko (1.6)
sets ``torch.distributions.Distribution._validate_args = False`` and
``Distribution.arg_constraints = {}`` on torch's base class: from then on
``pyro.distributions.Normal(0., -1.)`` no longer raises, even after
``pyro.enable_validation(True)`` had been called. :func:`as_flow` therefore sets torch's default
back to Pyro's own setting (``pyro.distributions.util.is_validation_enabled()``, True unless
Python runs with ``-O`` or you turned it off) every time it is called. It leaves
``arg_constraints = {}`` in place: zuko's own distributions do not define theirs and would
otherwise warn under validation; for distributions that define their own, Pyro's and torch's
included, it changes nothing. Between your ``import zuko`` and the first :func:`as_flow` call,
validation is off: call ``pyro.enable_validation(True)`` after ``import zuko`` if you build
Pyro distributions in between.
"""

from __future__ import annotations

__all__ = ["ZukoFlow", "as_flow"]

import sys
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from .base import Flow


def _sync_validation() -> None:
    """Set torch's default ``validate_args`` back to Pyro's distribution-validation flag."""
    from pyro.distributions.util import is_validation_enabled

    torch.distributions.Distribution.set_default_validate_args(is_validation_enabled())


def _import_zuko() -> ModuleType:
    """Import zuko (if needed) and undo its switch-off of Pyro's validation."""
    try:
        import zuko
    except ImportError as error:
        raise ImportError(
            "pyro_flowvi.flows.zuko needs zuko (pip install zuko); it is an optional extra"
        ) from error
    _sync_validation()
    return zuko


def _kind(obj: object, zuko: ModuleType) -> str:
    if isinstance(obj, zuko.lazy.Flow):
        return "flow"
    if isinstance(obj, zuko.lazy.LazyTransform):
        return "lazy"
    if isinstance(obj, torch.distributions.Transform):
        return "transform"
    return ""


class ZukoFlow(Flow):
    r"""A zuko flow, lazy transform or transform as a :class:`~pyro_flowvi.flows.Flow`.

    Build it with :func:`as_flow`, which checks the sizes. The wrapped module (for a flow or
    lazy transform) is a submodule, so its parameters are this layer's parameters (Pyro's
    ``pyro.module``, ``state_dict`` and ``.to()`` see them).

    Arguments:
        obj: a ``zuko.flows.Flow``, a zuko ``LazyTransform`` or a ``Transform``.
        input_dim: D.
        context_dim: the context size of a conditional zuko flow, ``None`` otherwise.
    """

    has_inverse = True

    def __init__(self, obj: Any, input_dim: int, context_dim: int | None = None) -> None:
        super().__init__(input_dim, context_dim)
        zuko = _import_zuko()
        self.kind = _kind(obj, zuko)
        if not self.kind:
            raise ValueError(
                "ZukoFlow: expected a zuko.flows.Flow, a zuko LazyTransform or a "
                f"torch.distributions.Transform, got {type(obj).__name__}"
            )
        if self.kind == "transform":
            if context_dim is not None:
                raise ValueError(
                    "ZukoFlow: a built Transform takes no context; pass the lazy transform, "
                    f"got context_dim={context_dim}"
                )
            self._built = obj
        else:
            # A zuko Flow's transform maps data to its base; the sampling direction is .inv.
            # Its base is not kept (this library's base replaces it).
            self.lazy = obj.transform if self.kind == "flow" else obj

    def _transform(self, context: Tensor | None, inverse: bool) -> torch.distributions.Transform:
        if self.kind == "transform":
            transform = self._built
        else:
            transform = self.lazy(context)
        if self.kind == "flow":
            inverse = not inverse
        return transform.inv if inverse else transform

    def _run(self, value: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check_context(context)
        batch = value.shape[:-1]
        if context is not None:
            # zuko's conditional transforms need the context and the input on one batch shape.
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
            context = context.expand(batch + context.shape[-1:])
            value = value.expand(batch + value.shape[-1:])
        transform = self._transform(context, inverse)
        out, ladj = transform.call_and_ladj(value)
        if ladj.dim() == out.dim():  # an elementwise transform: log-derivatives per coordinate
            ladj = ladj.sum(-1)
        return out, ladj.expand(out.shape[:-1])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(x, context, inverse=False)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(y, context, inverse=True)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kind={self.kind!r}"


def as_flow(obj: Any, input_dim: int, context_dim: int | None = None) -> Flow:
    r"""Wrap a zuko object as a :class:`~pyro_flowvi.flows.Flow` (a ``Flow`` is returned as is).

    The sizes are checked by one forward and one inverse pass on zeros, so a mismatch raises
    here with the sizes named, before any fitting. Every call also sets torch's default
    distribution validation back to Pyro's setting (see the module docstring: ``import zuko``
    switches it off).

    Arguments:
        obj: a :class:`~pyro_flowvi.flows.Flow`, a ``zuko.flows.Flow``, a zuko
            ``LazyTransform`` or a ``torch.distributions.Transform``.
        input_dim: D, the size of the latent the flow must act on.
        context_dim: the context size for a conditional flow, ``None`` otherwise.

    Returns:
        A :class:`~pyro_flowvi.flows.Flow` with ``input_dim == D``.

    Example:
        >>> import zuko
        >>> layer = as_flow(zuko.flows.NSF(features=5, transforms=3), 5)
        >>> y, ladj = layer(torch.randn(10, 5))

    Raises:
        ValueError: for another kind of object, or sizes that do not fit.
        ImportError: when ``obj`` is not a :class:`~pyro_flowvi.flows.Flow` and zuko is
            missing.
    """
    if isinstance(obj, Flow):
        if obj.input_dim != input_dim or obj.context_dim != context_dim:
            raise ValueError(
                f"as_flow: {type(obj).__name__} has input_dim={obj.input_dim}, "
                f"context_dim={obj.context_dim}; expected input_dim={input_dim}, "
                f"context_dim={context_dim}"
            )
        if "zuko" in sys.modules:
            _sync_validation()
        return obj
    if isinstance(obj, nn.Module) or isinstance(obj, torch.distributions.Transform):
        layer = ZukoFlow(obj, input_dim, context_dim)
    else:
        raise ValueError(
            "as_flow: expected a pyro_flowvi Flow, a zuko.flows.Flow, a zuko LazyTransform or a "
            f"torch.distributions.Transform, got {type(obj).__name__}"
        )
    reference = next(layer.parameters(), torch.empty(0))  # the probe's dtype and device
    x = reference.new_zeros(2, input_dim)
    context = None if context_dim is None else reference.new_zeros(2, context_dim)
    try:
        with torch.no_grad():
            y, ladj = layer(x, context)
            x_back, _ = layer.inverse(y, context)
    except (RuntimeError, ValueError, IndexError) as error:
        raise ValueError(
            f"as_flow: the {type(obj).__name__} does not act on a latent of size {input_dim}"
            + ("" if context_dim is None else f" with a context of size {context_dim}")
            + f": {error}"
        ) from error
    if y.shape != (2, input_dim) or ladj.shape != (2,) or x_back.shape != (2, input_dim):
        raise ValueError(
            f"as_flow: the {type(obj).__name__} maps a ({input_dim},) latent to shape "
            f"{tuple(y.shape[1:])} with log-det shape {tuple(ladj.shape[1:])}; it must keep the "
            "size"
        )
    return layer
