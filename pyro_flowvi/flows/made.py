r"""Masked autoencoder for distribution estimation (MADE, Germain et al., 2015).

A MADE is a multilayer perceptron whose weight matrices are masked so that output :math:`k`
depends on the inputs :math:`x_1, \ldots, x_{k-1}` only:

.. math::

    \frac{\partial\, \mathrm{out}_k}{\partial x_j} = 0 \quad \text{for } j \ge k.

This module uses the identity ordering and deterministic degrees: input :math:`i` has degree
:math:`i`, the hidden units of a layer cycle over the degrees :math:`1, \ldots, D - 1` (then
:math:`0` for a conditional network: degree-0 units see the context alone), a hidden unit sees
the units of the layer below with degree at most its own, and output :math:`k` sees the last
hidden units with degree below :math:`k`. A layer narrower than the number of degrees takes
degrees evenly spaced over them, the smallest and the largest included (output :math:`k` then
sees the inputs up to the largest hidden degree below :math:`k`, a coarser but still exact
autoregressive structure), so the width can stay bounded as D grows. A reversal between
autoregressive layers changes the order, so no random orderings are needed.
"""

from __future__ import annotations

__all__ = ["MADE", "IncrementalMADE", "MaskedLinear", "readout_weight_scale"]

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import check_input_dim

_EMPTY = torch.Size()


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (and a fixed scale).

    Arguments:
        mask: shape ``(out_features, in_features)``.
        bias: whether the layer has a bias (default ``True``).
        weight_scale: a constant the masked weight is multiplied by (default 1). A readout
            layer uses ``1 / in_features`` (see :func:`readout_weight_scale`).
    """

    def __init__(self, mask: Tensor, bias: bool = True, weight_scale: float = 1.0) -> None:
        super().__init__(mask.shape[1], mask.shape[0], bias=bias)
        # Boolean: an eighth of a float64 mask, which matters for wide layers at large D.
        self.register_buffer("mask", mask.to(torch.bool))
        if not weight_scale > 0:
            raise ValueError(f"MaskedLinear: weight_scale must be > 0, got {weight_scale!r}")
        self.weight_scale = float(weight_scale)
        self._scaled_mask: Tensor | None = None
        self._scaled_mask_key: tuple | None = None

    def effective_weight(self) -> Tensor:
        """The weight the layer applies: ``weight * mask * weight_scale``."""
        weight = self.weight
        scaled = self._scaled_mask
        key = (self.mask.data_ptr(), self.mask._version, weight.dtype, weight.device)
        if scaled is None or self._scaled_mask_key != key:
            # mask * weight_scale in the weight's dtype, made from the boolean mask (so the
            # same whatever dtypes the layer went through): the effective weight is then one
            # product, the same values as (weight * mask) * weight_scale, without converting
            # the mask at every call.
            # (a normal tensor even when first made in inference mode, so that it can be saved
            # for a backward pass later)
            with torch.inference_mode(False), torch.no_grad():
                scaled = self.mask.to(weight.dtype) * self.weight_scale
            self._scaled_mask, self._scaled_mask_key = scaled, key
        return weight * scaled

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return (
            extra if self.weight_scale == 1.0 else extra + f", weight_scale={self.weight_scale:g}"
        )


def readout_weight_scale(scale: float | str, fan_in: int, site: str) -> float:
    r"""The weight scale of a conditioner's readout layer: ``"fan_in"`` gives ``1 / fan_in``.

    A conditioner's readout starts at zero (so a fresh flow is the identity), and Adam's first
    steps move every weight by about the learning rate whatever its gradient's size, all in the
    direction of the gradient's sign. Without a scale, the readout's outputs (shifts,
    log-scales, spline knots) then move by about ``lr * fan_in * E|h|`` per step: a 200-wide
    RealNVP at ``lr = 1e-2`` took a 100-D Gaussian guide from its exact start to a KL of 2.7
    in one step and 14,000 in five. With ``1 / fan_in`` they move by about ``lr`` per step,
    as the guide's own location and scale do. The function class is unchanged.
    """
    if scale == "fan_in":
        return 1.0 / fan_in
    if isinstance(scale, str) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"{site}: readout_scale must be 'fan_in' or a number > 0, got {scale!r}")
    return float(scale)


def _hidden_widths(hidden_dims: object) -> list[int]:
    widths = [hidden_dims] if isinstance(hidden_dims, int) else hidden_dims
    ok = isinstance(widths, Sequence) and len(widths) > 0
    ok = ok and all(
        isinstance(width, int) and not isinstance(width, bool) and width >= 1 for width in widths
    )
    if isinstance(hidden_dims, bool) or not ok:
        raise ValueError(
            "MADE: hidden_dims must be an int or a non-empty sequence of positive ints, "
            f"got {hidden_dims!r}"
        )
    return list(widths)


def _hidden_degrees(degrees: list[int], width: int) -> Tensor:
    """Degrees of ``width`` hidden units: cycling over ``degrees`` when there are enough units,
    else evenly spaced over the sorted degrees (both ends included)."""
    if width >= len(degrees):
        return torch.tensor([degrees[j % len(degrees)] for j in range(width)])
    ordered = torch.tensor(sorted(degrees))
    if width == 1:
        return ordered[:1]
    index = torch.round(torch.linspace(0, len(degrees) - 1, width, dtype=torch.float64))
    return ordered[index.long()]


class MADE(nn.Module):
    r"""Autoregressive network: ``num_outputs`` values per input dimension.

    Arguments:
        input_dim: D.
        hidden_dims: widths of the hidden layers, an int (one layer) or a sequence. A width
            below the number of hidden degrees (``D - 1``, ``D`` for a conditional network, 1
            when ``D = 1``) spreads the degrees evenly (see the module docstring).
        num_outputs: how many values per dimension (default 2, e.g. a shift and a log-scale).
        context_dim: the context enters the first hidden layer through an unmasked linear map
            (every hidden unit may see it); ``None`` for an unconditional network.
        activation: the hidden nonlinearity, a class or factory of modules (default ELU).
        skip_connections: add a masked linear map from the inputs straight to the outputs.
        readout_scale: the constant scale of the output layer's (and skip map's) weight:
            ``"fan_in"`` (default, ``1 / fan_in``) or a number; see
            :func:`readout_weight_scale`.

    Returns (of :meth:`forward`):
        A tensor of shape ``(..., num_outputs, D)``; entry ``[..., j, k]`` depends on
        ``x[..., :k]`` and the context only. With ``D = 1`` the outputs are constants (or
        functions of the context alone).

    Example:
        >>> made = MADE(4, hidden_dims=[16, 16])
        >>> out = made(torch.randn(10, 4))  # (10, 2, 4)

    References:
        MADE: Masked Autoencoder for Distribution Estimation (Germain et al., 2015,
        arXiv 1502.03509)
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: int | Sequence[int],
        num_outputs: int = 2,
        context_dim: int | None = None,
        activation: Callable[[], nn.Module] = nn.ELU,
        skip_connections: bool = False,
        readout_scale: float | str = "fan_in",
    ) -> None:
        super().__init__()
        self.input_dim = check_input_dim("MADE", input_dim)
        for arg, value in [("num_outputs", num_outputs), ("context_dim", context_dim)]:
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"MADE: {arg} must be a positive int, got {value!r}")
        self.num_outputs = num_outputs
        self.context_dim = context_dim
        degrees = list(range(1, input_dim))
        if context_dim is not None or not degrees:
            degrees.append(0)
        widths = _hidden_widths(hidden_dims)
        self.hidden_dims = widths

        input_degrees = torch.arange(1, input_dim + 1)
        previous = input_degrees
        layers = []
        self._hidden_degrees: list[list[int]] = []
        for width in widths:
            hidden = _hidden_degrees(degrees, width)
            layers.append(MaskedLinear(hidden[:, None] >= previous[None, :]))
            self._hidden_degrees.append(hidden.tolist())
            previous = hidden
        self.hidden_layers = nn.ModuleList(layers)
        if not callable(activation):
            raise ValueError(
                "MADE: activation must be a class or factory of torch.nn.Module (e.g. "
                f"torch.nn.GELU), got {activation!r}"
            )
        activations = [activation() for _ in widths]
        if not all(isinstance(module, nn.Module) for module in activations):
            raise ValueError(
                f"MADE: activation {activation!r} must make torch.nn.Module instances, made "
                f"{type(activations[0]).__name__}"
            )
        self.activations = nn.ModuleList(activations)
        output_degrees = input_degrees.repeat(num_outputs)
        self.output_layer = MaskedLinear(
            output_degrees[:, None] > previous[None, :],
            weight_scale=readout_weight_scale(readout_scale, widths[-1], "MADE"),
        )
        self.skip = (
            MaskedLinear(
                output_degrees[:, None] > input_degrees[None, :],
                bias=False,
                weight_scale=readout_weight_scale(readout_scale, input_dim, "MADE"),
            )
            if skip_connections
            else None
        )
        self.context_layer = (
            nn.Linear(context_dim, widths[0], bias=False) if context_dim is not None else None
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Outputs of shape ``(..., num_outputs, D)`` for ``x`` of shape ``(..., D)``."""
        if (context is None) != (self.context_layer is None):
            raise ValueError(
                f"MADE: context_dim={self.context_dim} but got "
                f"{'no context' if context is None else f'a context of shape {context.shape}'}"
            )
        hidden = x
        for i, (layer, activation) in enumerate(
            zip(self.hidden_layers, self.activations, strict=True)
        ):
            hidden = layer(hidden)
            if i == 0 and self.context_layer is not None:
                hidden = hidden + self.context_layer(context)
            hidden = activation(hidden)
        out = self.output_layer(hidden)
        if self.skip is not None:
            out = out + self.skip(x)
        return out.unflatten(-1, (self.num_outputs, self.input_dim))

    def incremental(
        self, context: Tensor | None = None, batch_shape: torch.Size = _EMPTY
    ) -> IncrementalMADE:
        """An :class:`IncrementalMADE` of this network for one context (see there)."""
        return IncrementalMADE(self, context, batch_shape)


class IncrementalMADE:
    r"""A MADE evaluated one coordinate at a time, as the inputs are fixed one by one: what the
    exact inverse of an autoregressive layer needs, without D full passes.

    A hidden unit of degree :math:`d` sees the inputs :math:`x_{<d}` only (through the units
    below, of degree at most :math:`d`), and output :math:`k` (1-based) the last hidden units
    of degree below :math:`k`. So once :math:`x_1, \ldots, x_{k-1}` are fixed, the units of
    degree :math:`k - 1` are final, and so is output :math:`k`. This class keeps the
    pre-activations of every layer and of the outputs, and at coordinate :math:`k` activates
    the units of each layer that have just become final and adds their contributions to the
    layer above (the hidden units are sorted by degree, so those units are a contiguous group,
    and the weights are split into the matching column blocks once). Every weight entry is used
    once over the D coordinates: the whole sequence costs one pass of the network plus
    :math:`O(D)` small operations, where D independent passes cost D times as much, and the
    backward pass gathers each weight's gradient in one operation instead of one per
    coordinate. Values agree with :meth:`MADE.forward` to rounding (the sums run in another
    order); gradients flow through everything.

    Arguments:
        made: the network.
        context: its context, shape ``(..., context_dim)``, or ``None``.
        batch_shape: the batch shape of the inputs to come (broadcast with the context's).

    Example:
        >>> made = MADE(3, [8, 8])
        >>> x = torch.randn(5, 3)
        >>> steps = made.incremental(batch_shape=x.shape[:-1])
        >>> for k in range(3):
        ...     out_k = steps.outputs(k)  # made(x)[..., k], up to rounding
        ...     steps.append(k, x[..., k])
    """

    def __init__(
        self, made: MADE, context: Tensor | None = None, batch_shape: torch.Size = _EMPTY
    ) -> None:
        if (context is None) != (made.context_layer is None):
            raise ValueError(
                f"IncrementalMADE: context_dim={made.context_dim} but got "
                f"{'no context' if context is None else f'a context of shape {context.shape}'}"
            )
        self.made = made
        dim, outputs = made.input_dim, made.num_outputs
        if context is not None:
            batch_shape = torch.broadcast_shapes(batch_shape, context.shape[:-1])
        degrees = made._hidden_degrees
        orders = [sorted(range(len(d)), key=d.__getitem__) for d in degrees]
        # Layer l's units of degree k are, once sorted, bounds[l][k]:bounds[l][k + 1]; degrees
        # run from 0 (context-only units, or every unit when D = 1) to D - 1.
        self.bounds = [[sum(deg < k for deg in d) for k in range(dim + 1)] for d in degrees]
        sizes = [[b[k + 1] - b[k] for k in range(dim)] for b in self.bounds]
        weights = []
        for i, (layer, order) in enumerate(zip(made.hidden_layers, orders, strict=True)):
            weight = layer.effective_weight()[order]
            weights.append(weight if i == 0 else weight[:, orders[i - 1]])
        # What input k adds to the first layer, and each group of units to the layer above.
        self.input_columns = weights[0].unbind(-1)
        output = made.output_layer
        top = output.effective_weight()[:, orders[-1]]
        self.blocks = [
            upper.split(size, dim=-1)
            for upper, size in zip([*weights[1:], top], sizes, strict=True)
        ]
        first = made.hidden_layers[0].bias[orders[0]]
        if context is not None:
            first = first + made.context_layer(context)[..., orders[0]]
        self.pre_activations = [first.expand(batch_shape + first.shape[-1:])] + [
            layer.bias[order].expand(batch_shape + (len(order),))
            for layer, order in zip(made.hidden_layers[1:], orders[1:], strict=True)
        ]
        self.out = output.bias.expand(batch_shape + output.bias.shape)  # (..., P * D)
        self.skip_columns = None
        if made.skip is not None:
            self.skip_columns = made.skip.effective_weight().unbind(-1)
        self.shape = (outputs, dim)

    def outputs(self, k: int) -> Tensor:
        """The outputs of coordinate ``k`` (0-based), shape ``(..., num_outputs)``; inputs
        ``0, ..., k - 1`` must have been appended, in order."""
        for i, activation in enumerate(self.made.activations):
            start, stop = self.bounds[i][k], self.bounds[i][k + 1]
            if start == stop:
                continue
            hidden = activation(self.pre_activations[i][..., start:stop])
            contribution = F.linear(hidden, self.blocks[i][k])
            if i + 1 < len(self.pre_activations):
                self.pre_activations[i + 1] = self.pre_activations[i + 1] + contribution
            else:
                self.out = self.out + contribution
        return self.out.unflatten(-1, self.shape)[..., k]

    def append(self, k: int, value: Tensor) -> None:
        """Fix input ``k`` to ``value`` (shape ``(...)``, the batch shape)."""
        value = value.unsqueeze(-1)
        self.pre_activations[0] = self.pre_activations[0] + value * self.input_columns[k]
        if self.skip_columns is not None:
            self.out = self.out + value * self.skip_columns[k]
