r"""Masked affine coupling layer (RealNVP with a fixed binary mask).

With a fixed mask :math:`m \in \{0, 1\}^D`, the coordinates where :math:`m = 1` pass through
unchanged and condition an affine map of the others:

.. math::

    y = m \odot x + (1 - m) \odot \bigl(x \odot e^{s(m \odot x)} + t(m \odot x)\bigr),
    \qquad \log|\det J| = \sum_i (1 - m_i)\, s_i(m \odot x)

where :math:`(s, t)` come from one small MLP (tanh hidden units) whose output layer starts at
zero, so a fresh layer is exactly the identity. The log-scale is softly bounded,
:math:`s = b \tanh(\hat s / b)`, which keeps long stacks numerically stable without the
straight-through clamps that hide divergence. The inverse is exact: :math:`m \odot y = m \odot
x`, so :math:`(s, t)` can be recomputed from :math:`y`.

This is the flow that multiplicative normalizing flows (Louizos & Welling, 2017) use for the
auxiliary noise of every weight matrix; the layer is generic and also conditional (the context
is concatenated to the masked input of the MLP).
"""

from __future__ import annotations

__all__ = ["MaskedCoupling", "alternating_mask"]

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Flow


def alternating_mask(input_dim: int, parity: int = 0) -> Tensor:
    """The alternating mask ``[0, 1, 0, 1, ...]`` (``parity=1`` flips it).

    Coordinate 0 is transformed under ``parity=0``, so a one-dimensional layer is a learned
    affine map rather than the identity.
    """
    return ((torch.arange(input_dim) + parity) % 2 == 1).to(torch.get_default_dtype())


class MaskedCoupling(Flow):
    r"""Affine coupling :math:`y = m \odot x + (1 - m) \odot (x \odot e^{s} + t)`.

    Arguments:
        input_dim: D.
        mask: a tensor of shape ``(D,)`` with entries in {0, 1}; ones are kept (and condition
            the map), zeros are transformed. Default :func:`alternating_mask` (alternating,
            coordinate 0 transformed). Stack layers with complementary masks so that every
            coordinate gets transformed.
        hidden_dims: hidden widths of the MLP that outputs :math:`(s, t)`.
        context_dim: for a conditional layer, the size of a context concatenated to the
            masked input of the MLP.
        log_scale_bound: :math:`b > 0` in :math:`s = b \tanh(\hat s / b)`.

    Example:
        >>> layer = MaskedCoupling(6, hidden_dims=(32,))
        >>> y, ladj = layer(torch.randn(10, 6))
        >>> x, _ = layer.inverse(y)

    References:
        Density estimation using Real NVP (Dinh et al., 2017, arXiv:1605.08803).
        Multiplicative Normalizing Flows for Variational Bayesian Neural Networks
        (Louizos & Welling, 2017, arXiv:1703.01961).
    """

    has_inverse = True

    def __init__(
        self,
        input_dim: int,
        mask: Tensor | None = None,
        hidden_dims: Sequence[int] = (50,),
        context_dim: int | None = None,
        log_scale_bound: float = 5.0,
    ) -> None:
        super().__init__(input_dim, context_dim)
        if mask is None:
            mask = alternating_mask(input_dim)
        mask = torch.as_tensor(mask, dtype=torch.get_default_dtype())
        if mask.shape != (input_dim,) or not bool(torch.all((mask == 0) | (mask == 1))):
            raise ValueError(
                f"MaskedCoupling: mask must be a 0/1 tensor of shape ({input_dim},), "
                f"got {mask.tolist() if mask.dim() <= 1 else tuple(mask.shape)}"
            )
        hidden_dims = tuple(hidden_dims)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_dims):
            raise ValueError(
                f"MaskedCoupling: hidden_dims must be positive ints, got {hidden_dims}"
            )
        if not log_scale_bound > 0:
            raise ValueError(f"MaskedCoupling: log_scale_bound must be > 0, got {log_scale_bound}")
        self.register_buffer("mask", mask)
        self.log_scale_bound = float(log_scale_bound)
        sizes = (input_dim + (context_dim or 0), *hidden_dims)
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.Tanh()]
        out = nn.Linear(sizes[-1], 2 * input_dim)
        nn.init.zeros_(out.weight)  # exact identity at the start
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)

    def _shift_log_scale(self, x_kept: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        self._check_context(context)
        inputs = x_kept
        if context is not None:
            shape = torch.broadcast_shapes(x_kept.shape[:-1], context.shape[:-1])
            inputs = torch.cat(
                [
                    x_kept.expand(shape + x_kept.shape[-1:]),
                    context.expand(shape + context.shape[-1:]),
                ],
                dim=-1,
            )
        shift, raw = self.net(inputs).chunk(2, dim=-1)
        bound = self.log_scale_bound
        log_scale = bound * torch.tanh(raw / bound)
        free = 1 - self.mask
        return shift * free, log_scale * free

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(x * self.mask, context)
        y = x * torch.exp(log_scale) + shift  # kept coordinates: log_scale = shift = 0
        return y, log_scale.sum(-1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(y * self.mask, context)
        x = (y - shift) * torch.exp(-log_scale)
        return x, -log_scale.sum(-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mask={self.mask.to(torch.int64).tolist()}"
