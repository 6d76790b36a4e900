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

__all__ = ["MADE", "MaskedLinear"]

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import check_input_dim


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask.

    Arguments:
        mask: shape ``(out_features, in_features)``.
        bias: whether the layer has a bias (default ``True``).
    """

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        super().__init__(mask.shape[1], mask.shape[0], bias=bias)
        # Boolean: an eighth of a float64 mask, which matters for wide layers at large D.
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


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
        for width in widths:
            hidden = _hidden_degrees(degrees, width)
            layers.append(MaskedLinear(hidden[:, None] >= previous[None, :]))
            previous = hidden
        self.hidden_layers = nn.ModuleList(layers)
        self.activations = nn.ModuleList(activation() for _ in widths)
        output_degrees = input_degrees.repeat(num_outputs)
        self.output_layer = MaskedLinear(output_degrees[:, None] > previous[None, :])
        self.skip = (
            MaskedLinear(output_degrees[:, None] > input_degrees[None, :], bias=False)
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
