r"""Planar flow (Rezende & Mohamed, 2015).

.. math::

    y = x + \hat u \tanh(w^\top x + b), \qquad
    \log|\det J| = \log\left|1 + \tanh'(w^\top x + b)\, \hat u^\top w\right|

with :math:`\hat u = u + \left(m(w^\top u) - w^\top u\right) w / \|w\|^2` and
:math:`m(a) = -1 + \mathrm{softplus}(a)`, so that :math:`w^\top \hat u = m(w^\top u) > -1` and the
map is invertible. The inverse is numerical: :math:`a = w^\top x` solves the scalar equation
:math:`w^\top y = a + (w^\top \hat u) \tanh(a + b)`, whose right side is increasing in :math:`a`;
then :math:`x = y - \hat u \tanh(a + b)`.
"""

from __future__ import annotations

__all__ = ["Planar"]

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Flow, context_head

# softplus(log(e - 1)) = 1, so m(log(e - 1)) = 0.
_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


def _solve_tanh_equation(
    target: Tensor, scale: Tensor, slope: Tensor, shift: Tensor, max_iter: int = 100
) -> Tensor:
    r"""Solve :math:`a + c \tanh(k a + s) = t` for :math:`a`, elementwise.

    The left side is strictly increasing when :math:`c k > -1`, and the root lies in
    :math:`[t - |c|, t + |c|]` because :math:`|\tanh| \le 1`. Newton steps that leave the
    current bracket are replaced by bisection, so the iteration always converges; it stops when
    every step is below ``eps ** 0.75`` (relative, ``eps`` of the dtype), about 2e-12 in
    float64. The loop runs without autograd; a last Newton step is taken with autograd on, which
    gives the root's gradient by the implicit function theorem.

    Arguments:
        target: :math:`t`, shape ``(...)``.
        scale: :math:`c`, broadcasting with ``target``.
        slope: :math:`k`, broadcasting with ``target``; :math:`c k > -1` is assumed.
        shift: :math:`s`, broadcasting with ``target``.
        max_iter: cap on the iterations (bisection alone needs about 60 in float64).

    Returns:
        The root :math:`a`, of the broadcast shape.
    """
    target, scale, slope, shift = torch.broadcast_tensors(target, scale, slope, shift)
    tol = torch.finfo(target.dtype).eps ** 0.75
    with torch.no_grad():
        t, c, k, s = target.detach(), scale.detach(), slope.detach(), shift.detach()
        lo, hi = t - c.abs(), t + c.abs()
        a = t.clone()
        for _ in range(max_iter):
            th = torch.tanh(k * a + s)
            f = a + c * th - t
            lo = torch.where(f < 0, a, lo)
            hi = torch.where(f > 0, a, hi)
            newton = a - f / (1 + c * k * (1 - th * th))
            # NaN (a zero derivative) fails both comparisons and falls back to bisection.
            inside = (newton >= lo) & (newton <= hi)
            new = torch.where(inside, newton, 0.5 * (lo + hi))
            step = (new - a).abs()
            a = new
            if bool(torch.all(step <= tol * (1 + a.abs()))):
                break
    th = torch.tanh(slope * a + shift)
    derivative = 1 + scale * slope * (1 - th * th)
    ok = derivative > 0
    step = torch.where(ok, (a + scale * th - target) / torch.where(ok, derivative, 1), 0)
    return a - step


class Planar(Flow):
    r"""Planar layer :math:`y = x + \hat u \tanh(w^\top x + b)`, invertible by construction.

    A fresh layer is the identity: :math:`w` is random with :math:`\|w\| \approx 1`, and
    :math:`u = \mathrm{softplus}^{-1}(1)\, w / \|w\|^2`, which makes :math:`\hat u = 0`.

    Arguments:
        input_dim: D.
        context_dim: for a conditional layer, :math:`(u, w, b)` come from a linear head on the
            context of shape ``(..., context_dim)``; its weight starts at zero and its bias at
            the unconditional initial values.

    Example:
        >>> layer = Planar(3)
        >>> y, ladj = layer(torch.randn(10, 3))  # y: (10, 3), ladj: (10,)
        >>> x, ladj_inv = layer.inverse(y)  # numerical inverse, ladj_inv == -ladj

    References:
        Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015, arXiv 1505.05770)
    """

    has_inverse = True

    def __init__(self, input_dim: int, context_dim: int | None = None) -> None:
        super().__init__(input_dim, context_dim)
        w = torch.randn(input_dim) / math.sqrt(input_dim)
        u = _SOFTPLUS_INV_ONE * w / w.dot(w)
        b = torch.zeros(1)
        if context_dim is None:
            self.u = nn.Parameter(u)
            self.w = nn.Parameter(w)
            self.b = nn.Parameter(b)
        else:
            self.head = context_head(context_dim, torch.cat([u, w, b]))

    def _params(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""``(u_hat, w, b, w^T u_hat)`` of shapes ``(..., D), (..., D), (...), (...)``."""
        self._check_context(context)
        if self.context_dim is None:
            u, w, b = self.u, self.w, self.b
        else:
            u, w, b = self.head(context).split([self.input_dim, self.input_dim, 1], dim=-1)
        b = b[..., 0]
        wu = (w * u).sum(-1)
        wu_hat = F.softplus(wu) - 1
        u_hat = u + ((wu_hat - wu) / (w * w).sum(-1)).unsqueeze(-1) * w
        return u_hat, w, b, wu_hat

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u_hat, w, b, wu_hat = self._params(context)
        activation = torch.tanh((w * x).sum(-1) + b)
        y = x + u_hat * activation.unsqueeze(-1)
        ladj = torch.log1p((1 - activation**2) * wu_hat)
        return y, ladj.expand(y.shape[:-1])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u_hat, w, b, wu_hat = self._params(context)
        a = _solve_tanh_equation((w * y).sum(-1), wu_hat, torch.ones_like(wu_hat), b)
        activation = torch.tanh(a + b)
        x = y - u_hat * activation.unsqueeze(-1)
        ladj = -torch.log1p((1 - activation**2) * wu_hat)
        return x, ladj.expand(x.shape[:-1])
