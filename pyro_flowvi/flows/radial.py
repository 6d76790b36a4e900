r"""Radial flow (Rezende & Mohamed, 2015).

.. math::

    y = x + \beta\, h(\alpha, r)\, (x - x_0), \qquad r = \|x - x_0\|, \qquad
    h(\alpha, r) = \frac{1}{\alpha + r}

.. math::

    \log|\det J| = (D - 1) \log(1 + \beta h) + \log(1 + \beta h + \beta h'(r)\, r)
                 = (D - 1) \log(1 + \beta h) + \log(1 + \alpha \beta h^2)

with :math:`\alpha = \mathrm{softplus}(\tilde\alpha) > 0` and
:math:`\beta = -\alpha + \mathrm{softplus}(\tilde\beta) > -\alpha`, which makes the map
invertible. The inverse is closed-form: :math:`r_y = \|y - x_0\| = r\,(1 + \beta / (\alpha + r))`
is the quadratic :math:`r^2 + r(\alpha + \beta - r_y) - \alpha r_y = 0` in :math:`r`, whose
positive root gives :math:`x = x_0 + (y - x_0) / (1 + \beta / (\alpha + r))`.
"""

from __future__ import annotations

__all__ = ["Radial"]

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Flow, context_head

_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


class Radial(Flow):
    r"""Radial layer: contracts or expands space around a learned centre :math:`x_0`.

    A fresh layer is the identity: :math:`x_0 = 0`, :math:`\alpha = 1` and :math:`\beta = 0`.

    Arguments:
        input_dim: D.
        context_dim: for a conditional layer, :math:`(x_0, \tilde\alpha, \tilde\beta)` come
            from a linear head on the context of shape ``(..., context_dim)``; its weight starts
            at zero and its bias at the unconditional initial values.

    Example:
        >>> layer = Radial(3)
        >>> y, ladj = layer(torch.randn(10, 3))  # y: (10, 3), ladj: (10,)
        >>> x, ladj_inv = layer.inverse(y)  # closed form, ladj_inv == -ladj

    References:
        Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015, arXiv 1505.05770)
    """

    has_inverse = True

    def __init__(self, input_dim: int, context_dim: int | None = None) -> None:
        super().__init__(input_dim, context_dim)
        x0 = torch.zeros(input_dim)
        raw = torch.full((2,), _SOFTPLUS_INV_ONE)  # alpha = 1, beta = -1 + softplus = 0
        if context_dim is None:
            self.x0 = nn.Parameter(x0)
            self.alpha_raw = nn.Parameter(raw[:1].clone())
            self.beta_raw = nn.Parameter(raw[1:].clone())
        else:
            self.head = context_head(context_dim, torch.cat([x0, raw]))

    def _params(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        r"""``(x0, alpha, beta)`` of shapes ``(..., D), (...), (...)``."""
        self._check_context(context)
        if self.context_dim is None:
            x0, alpha_raw, beta_raw = self.x0, self.alpha_raw, self.beta_raw
        else:
            x0, alpha_raw, beta_raw = self.head(context).split([self.input_dim, 1, 1], dim=-1)
        alpha = F.softplus(alpha_raw[..., 0])
        beta = F.softplus(beta_raw[..., 0]) - alpha
        return x0, alpha, beta

    def _ladj(self, r: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        h = 1 / (alpha + r)
        return (self.input_dim - 1) * torch.log1p(beta * h) + torch.log1p(alpha * beta * h * h)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x0, alpha, beta = self._params(context)
        diff = x - x0
        r = torch.linalg.vector_norm(diff, dim=-1)
        y = x + (beta / (alpha + r)).unsqueeze(-1) * diff
        return y, self._ladj(r, alpha, beta).expand(y.shape[:-1])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x0, alpha, beta = self._params(context)
        diff = y - x0
        r_y = torch.linalg.vector_norm(diff, dim=-1)
        # Positive root of r^2 + B r + C = 0 with C = -alpha r_y <= 0, in the form that avoids
        # cancellation for either sign of B (r_y = 0 forces B = alpha + beta > 0).
        half_b = 0.5 * (alpha + beta - r_y)
        sqrt_disc = torch.sqrt(half_b * half_b + alpha * r_y)
        positive = half_b >= 0
        denominator = torch.where(positive, half_b + sqrt_disc, 1)
        r = torch.where(positive, alpha * r_y / denominator, sqrt_disc - half_b)
        x = x0 + diff / (1 + beta / (alpha + r)).unsqueeze(-1)
        return x, -self._ladj(r, alpha, beta).expand(x.shape[:-1])
