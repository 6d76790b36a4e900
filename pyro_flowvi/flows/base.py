r"""The flow-layer protocol shared by every family in :mod:`pyro_flowvi.flows`.

A flow layer is an :class:`torch.nn.Module` that maps a batch of points to their images and the
log-absolute-determinant of the Jacobian in **one pass**:

.. math::

    (y, \log |\det \partial y / \partial x|) = f(x; c)

where :math:`c` is an optional context vector (the output of an encoder for amortized flows).
Nothing is cached between calls: the density of any point is computed from the point itself.
"""

from __future__ import annotations

__all__ = ["Flow", "Compose", "Reverse", "Permute", "check_input_dim", "context_head"]

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


def check_input_dim(name: str, value: int, argument: str = "input_dim") -> int:
    """Validate a positive size argument of layer ``name`` and return it as an int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {argument} must be a positive int, got {value!r}")
    return value


def context_head(context_dim: int, init: Tensor) -> nn.Linear:
    """A linear head ``context -> parameters`` of a conditional layer.

    Its weight starts at zero and its bias at ``init`` (the flattened unconditional initial
    values), so a fresh conditional layer computes what the unconditional one does.
    """
    head = nn.Linear(context_dim, init.numel())
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(init.reshape(-1))
    return head


class Flow(nn.Module):
    r"""Base class of every flow layer.

    Subclass contract:

    - ``__init__(input_dim, ..., context_dim=None)``: every argument but the sizes has a
      default. With ``context_dim=None`` the parameters are tensors owned by the module; with
      an int, the layer is *conditional* and its parameters are produced from a context of
      shape ``(..., context_dim)`` by heads owned by the module.
    - ``forward(x, context=None) -> (y, ladj)`` with ``x`` and ``y`` of shape ``(..., D)``
      and ``ladj = log|det dy/dx|`` of shape ``(...)``. ``context`` (conditional layers only)
      has shape ``(..., context_dim)`` and broadcasts against the batch shape of ``x``.
    - ``inverse(y, context=None) -> (x, ladj)`` where ``ladj = log|det dx/dy|`` (the
      log-determinant of the inverse map, i.e. minus the forward one at ``x``). Layers with no
      closed-form or numerical inverse keep ``has_inverse = False`` and raise.
    - A freshly built layer is the identity or close to it, so that a guide starts where its
      diagonal-Gaussian base starts.

    Attributes:
        input_dim: D, the size of the event.
        context_dim: size of the context for conditional layers, ``None`` otherwise.
        has_inverse: whether :meth:`inverse` is implemented.
    """

    has_inverse: bool = False

    def __init__(self, input_dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.input_dim = check_input_dim(type(self).__name__, input_dim)
        if context_dim is not None:
            context_dim = check_input_dim(type(self).__name__, context_dim, "context_dim")
        self.context_dim = context_dim

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(y, ladj)``: the output and ``log|det dy/dx|``, of shapes ``(..., D)`` and
        ``(...)``, from one pass; ``context`` for conditional layers only."""
        raise NotImplementedError

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, ladj)``: the preimage of ``y`` and ``log|det dx/dy|`` (minus the forward
        log-determinant at ``x``); raises where the layer has no inverse."""
        raise NotImplementedError(
            f"{type(self).__name__} has no inverse, so the density of an arbitrary point is "
            "unavailable; score the samples it produced with rsample_and_log_prob instead"
        )

    def inverse_at(
        self, y: Tensor, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""The inverse at a point :math:`y = f(x)` whose preimage :math:`x` is known (the
        forward pass that produced :math:`y` computed it).

        Returns ``(x', ladj)``: ``x'`` has the value of ``x`` and the derivatives of the
        inverse map :math:`f^{-1}(y)` with respect to ``y``, the parameters and the context
        (by the implicit function theorem), and ``ladj = log|det dx/dy|`` has its
        derivatives too. This is what the score of :math:`\log q_\phi(z)` at a fixed draw
        :math:`z` needs ("sticking the landing", importance-weighted estimators): since the
        root is known, nothing is solved, and where a trained map is badly conditioned (an
        inverse autoregressive layer that contracts strongly) the value stays exact while a
        numerical inverse could lose it.

        The default runs :meth:`inverse` and keeps its derivatives, with the value replaced
        by ``x``; layers whose inverse is sequential or numerical override it.
        """
        x_inverse, ladj = self.inverse(y, context)
        return x.detach() + (x_inverse - x_inverse.detach()), ladj

    def _check_context(self, context: Tensor | None) -> None:
        if self.context_dim is None:
            if context is not None:
                raise ValueError(
                    f"{type(self).__name__} was built without context_dim but got a context "
                    f"of shape {tuple(context.shape)}"
                )
        elif context is None:
            raise ValueError(
                f"{type(self).__name__} is conditional (context_dim={self.context_dim}) "
                "and needs a context"
            )
        # While torch.jit.trace records, sizes are tensors (a comparison would leave the
        # graph); a trace is recorded for fixed shapes anyway.
        elif not torch.jit.is_tracing() and context.shape[-1] != self.context_dim:
            raise ValueError(
                f"{type(self).__name__} expects a context of last dim {self.context_dim}, got "
                f"shape {tuple(context.shape)}"
            )

    def extra_repr(self) -> str:
        extra = f"input_dim={self.input_dim}"
        if self.context_dim is not None:
            extra += f", context_dim={self.context_dim}"
        return extra


class Compose(Flow):
    """Apply several layers in order; the log-determinants add up.

    Arguments:
        layers: the layers, all with the same ``input_dim``; conditional layers receive the
            context given to :meth:`forward`, the others do not.
    """

    def __init__(self, layers: Iterable[Flow]) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("Compose needs at least one layer")
        dims = {layer.input_dim for layer in layers}
        if len(dims) != 1:
            raise ValueError(f"Compose: layers disagree on input_dim: {sorted(dims)}")
        context_dims = {layer.context_dim for layer in layers} - {None}
        if len(context_dims) > 1:
            raise ValueError(f"Compose: layers disagree on context_dim: {sorted(context_dims)}")
        super().__init__(dims.pop(), context_dims.pop() if context_dims else None)
        self.layers = nn.ModuleList(layers)
        self.has_inverse = all(layer.has_inverse for layer in layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ladj = None  # the first layer's term as it is (0 + a is a), one addition fewer
        for layer in self.layers:
            x, step = layer(x, context if layer.context_dim is not None else None)
            ladj = step if ladj is None else ladj + step
        return x, ladj.expand(x.shape[:-1]) if ladj.dim() == 0 else ladj

    def forward_with_inputs(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """:meth:`forward` that also returns the input of every layer (for :meth:`inverse_at`)."""
        inputs = []
        ladj = x.new_zeros(())
        for layer in self.layers:
            inputs.append(x)
            x, step = layer(x, context if layer.context_dim is not None else None)
            ladj = ladj + step
        return x, ladj.expand(x.shape[:-1]) if ladj.dim() == 0 else ladj, inputs

    def inverse_at(
        self, y: Tensor, x: Tensor | list[Tensor], context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`Flow.inverse_at` through every layer. ``x`` is the list of the layers'
        inputs (from :meth:`forward_with_inputs`); a single tensor (the stack's input) is
        mapped forward once to recover them."""
        if torch.is_tensor(x):
            with torch.no_grad():
                _, _, x = self.forward_with_inputs(x, context)
        ladj = y.new_zeros(())
        for layer, known in zip(reversed(self.layers), reversed(x), strict=True):
            y, step = layer.inverse_at(
                y, known, context if layer.context_dim is not None else None
            )
            ladj = ladj + step
        return y, ladj.expand(y.shape[:-1]) if ladj.dim() == 0 else ladj

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        for layer in self.layers:
            if not layer.has_inverse:
                return layer.inverse(y)  # raises the layer's own error
        ladj = y.new_zeros(())
        for layer in reversed(self.layers):
            y, step = layer.inverse(y, context if layer.context_dim is not None else None)
            ladj = ladj + step
        return y, ladj.expand(y.shape[:-1]) if ladj.dim() == 0 else ladj

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Flow]:
        return iter(self.layers)


class Permute(Flow):
    """A fixed permutation of the coordinates (log-determinant zero).

    Arguments:
        input_dim: D.
        permutation: a permutation of ``range(D)``; random (seeded by torch) when omitted.
    """

    has_inverse = True

    def __init__(self, input_dim: int, permutation: Tensor | None = None) -> None:
        super().__init__(input_dim)
        if permutation is None:
            permutation = torch.randperm(input_dim)
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        if sorted(permutation.tolist()) != list(range(input_dim)):
            raise ValueError(
                f"Permute: not a permutation of range({input_dim}): {permutation.tolist()}"
            )
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_context(context)
        return x[..., self.permutation], x.new_zeros(x.shape[:-1])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_context(context)
        return y[..., self.inverse_permutation], y.new_zeros(y.shape[:-1])


class Reverse(Permute):
    """Reverse the order of the coordinates (used between autoregressive layers)."""

    def __init__(self, input_dim: int) -> None:
        super().__init__(input_dim, torch.arange(input_dim - 1, -1, -1))
