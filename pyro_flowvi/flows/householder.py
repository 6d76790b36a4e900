r"""Householder flow (Tomczak & Welling, 2016).

.. math::

    y = H_K \cdots H_1 x, \qquad H_k = I - 2\, \frac{v_k v_k^\top}{\|v_k\|^2}, \qquad
    \log|\det J| = 0

Each :math:`H_k` is a reflection (orthogonal and symmetric), so the inverse applies the same
reflections in the reverse order. A Householder stack only rotates and reflects; on an isotropic
base it is a no-op in distribution, so use it after a learnable scale.
"""

from __future__ import annotations

__all__ = ["Householder", "reflect_rows"]

import functools

import torch
from torch import Tensor, nn

from .base import Flow, context_head


@functools.lru_cache(maxsize=64)
def _wy_weights(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The constant ``(size, size)`` matrix with 1/2 on the diagonal, 1 above, 0 below."""
    # (a normal tensor even when first made in inference mode, so that autograd can save it)
    with torch.inference_mode(False), torch.no_grad():
        ones = torch.ones(size, size, dtype=dtype, device=device)
        return ones.triu(1) + 0.5 * torch.eye(size, dtype=dtype, device=device)


def reflect_rows(x: Tensor, vectors: Tensor, reverse: bool = False) -> Tensor:
    r"""Apply :math:`H_K \cdots H_1` (or :math:`H_1 \cdots H_K` with ``reverse``) to each row of
    ``x``, in the compact WY form of the product (Joffrain et al., 2006):

    .. math::

        H_1 \cdots H_K = I - V^\top S^{-1} V, \qquad
        S = \tfrac12 \operatorname{diag}(V V^\top) + \operatorname{striu}(V V^\top),

    where the rows of :math:`V` are the :math:`v_k`. For row vectors, :math:`x (H_K \cdots
    H_1)^\top = x H_1 \cdots H_K = x - (x V^\top) S^{-1} V`. This is a fixed handful of
    tensor operations whatever K, instead of a loop of K reflections.

    Arguments:
        x: rows, shape ``(..., N, D)``.
        vectors: the :math:`v_k` (any nonzero norm), shape ``(..., K, D)``.
        reverse: apply :math:`H_1` last instead of first (the inverse map).
    """
    gram = vectors @ vectors.transpose(-1, -2)
    # S = gram * W with W = 1/2 on the diagonal, 1 above and 0 below: the same values as
    # triu(gram, 1) + diag(gram) / 2 (products by 1, 1/2 and 0 are exact), in one product.
    s = gram * _wy_weights(gram.shape[-1], gram.dtype, gram.device)
    coefficients = x @ vectors.transpose(-1, -2)  # (..., N, K)
    # S^{-1} for the forward map, S^{-T} for the inverse (the transposed product).
    if reverse:
        solved = torch.linalg.solve_triangular(
            s.transpose(-1, -2), coefficients, upper=False, left=False
        )
    else:
        solved = torch.linalg.solve_triangular(s, coefficients, upper=True, left=False)
    return x - solved @ vectors


def _apply_reflections(x: Tensor, vectors: Tensor, reverse: bool = False) -> Tensor:
    """:func:`reflect_rows` for ``x`` of shape ``(..., D)`` and ``vectors`` ``(..., K, D)``."""
    return reflect_rows(x.unsqueeze(-2), vectors, reverse).squeeze(-2)


class Householder(Flow):
    r"""Householder layer: ``num_reflections`` reflections, volume-preserving.

    The reflection vectors start standard normal, so a fresh layer is a random orthogonal map
    (never the identity for a single reflection).

    Arguments:
        input_dim: D.
        num_reflections: K, the number of reflections (default 1).
        context_dim: for a conditional layer, the :math:`v_k` come from a linear head on the
            context of shape ``(..., context_dim)``; its weight starts at zero and its bias at
            the unconditional initial vectors.

    Example:
        >>> layer = Householder(4, num_reflections=2)
        >>> y, ladj = layer(torch.randn(10, 4))  # ladj == 0
        >>> x, _ = layer.inverse(y)

    References:
        Improving Variational Auto-Encoders using Householder Flow (Tomczak & Welling, 2016,
        arXiv 1611.09630)
    """

    has_inverse = True

    def __init__(
        self, input_dim: int, num_reflections: int = 1, context_dim: int | None = None
    ) -> None:
        super().__init__(input_dim, context_dim)
        if (
            isinstance(num_reflections, bool)
            or not isinstance(num_reflections, int)
            or num_reflections < 1
        ):
            raise ValueError(
                f"Householder: num_reflections must be a positive int, got {num_reflections!r}"
            )
        self.num_reflections = num_reflections
        vectors = torch.randn(num_reflections, input_dim)
        if context_dim is None:
            self.vectors = nn.Parameter(vectors)
        else:
            self.head = context_head(context_dim, vectors)

    def _vectors(self, context: Tensor | None) -> Tensor:
        """The reflection vectors, shape ``(..., K, D)``."""
        self._check_context(context)
        if self.context_dim is None:
            return self.vectors
        out = self.head(context)
        return out.unflatten(-1, (self.num_reflections, self.input_dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = _apply_reflections(x, self._vectors(context))
        return y, y.new_zeros(y.shape[:-1])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = _apply_reflections(y, self._vectors(context), reverse=True)
        return x, x.new_zeros(x.shape[:-1])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_reflections={self.num_reflections}"
