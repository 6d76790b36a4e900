r"""Sylvester flow (van den Berg et al., 2018), in the paper's order.

.. math::

    y = x + Q R\, h(\tilde R Q^\top x + b), \qquad
    \log|\det J| = \sum_{i=1}^{M} \log\left|1 + h'\big((\tilde R Q^\top x + b)_i\big)\,
    r_{ii} \tilde r_{ii}\right|

with :math:`h = \tanh`, :math:`Q \in \mathbb{R}^{D \times M}` with orthonormal columns and
:math:`R, \tilde R` upper-triangular :math:`M \times M`. Sylvester's determinant identity
:math:`\det(I_D + Q R H \tilde R Q^\top) = \det(I_M + H \tilde R R)` with
:math:`H = \mathrm{diag}(h')` makes the Jacobian's determinant a product over a triangular
matrix. The diagonals pass through :math:`\tanh`, so :math:`r_{ii} \tilde r_{ii} > -1` and the
map is invertible.

(Pyro's ``pyro.distributions.transforms.Sylvester`` computes
:math:`x + h(x \tilde R Q^\top + b)\, Q R` with row vectors, i.e. the transposed products, for
which the log-determinant above is wrong once :math:`R, \tilde R` have non-zero off-diagonals.)

The inverse is numerical. With :math:`v = Q^\top x` the map reads
:math:`Q^\top y = v + R h(\tilde R v + b)`, whose component :math:`i` depends on
:math:`v_i, \ldots, v_M` only: back-substitution from :math:`i = M` down to 1 solves one scalar
increasing equation :math:`v_i + r_{ii} \tanh(\tilde r_{ii} v_i + s_i) = t_i` per component.
The part of :math:`x` orthogonal to the columns of :math:`Q` is left unchanged.
"""

from __future__ import annotations

__all__ = ["Sylvester"]

import math

import torch
from torch import Tensor, nn

from ._numerics import orthogonalize
from .base import Flow, context_head
from .householder import reflect_rows
from .planar import _solve_tanh_equation

_VARIANTS = ("orthogonal", "householder", "triangular")

#: The default M is min(D, this): R and R~ hold M^2 parameters and Q (orthogonal variant) D M,
#: so an uncapped default would be quadratic in D (10^8 parameters per layer at D = 10^4).
MAX_DEFAULT_VECTORS = 64


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class Sylvester(Flow):
    r"""Sylvester layer :math:`y = x + Q R \tanh(\tilde R Q^\top x + b)`.

    A fresh layer is the identity: :math:`R = 0`, :math:`b = 0`, and
    :math:`\tilde R = \tanh(1) I` so that gradients reach :math:`R` from the first step.

    Arguments:
        input_dim: D.
        variant: how :math:`Q` is built. ``"orthogonal"``: Björck orthogonalisation of a learned
            ``D x M`` matrix (started at a random orthonormal one). ``"householder"``: the first
            M columns of a product of ``num_householder`` reflections. ``"triangular"``: the
            first M columns of the identity, or of the reversal permutation when ``flip`` (for
            ``M < D`` the layer then moves the first, respectively last, M coordinates only).
        num_ortho_vectors: M, the number of columns of :math:`Q` (default ``min(D, 64)``, so
            the layer's size stays linear in D).
        num_householder: reflections in :math:`Q` for the Householder variant
            (default ``min(D, 8)``).
        flip: use the reversal permutation as :math:`Q` in the triangular variant (a stack
            alternates it between layers). It has no effect on the other variants, whose learned
            :math:`Q` can represent the reversal.
        context_dim: for a conditional layer (the amortized form of the paper), the
            diagonals, off-diagonals, :math:`b` and the source of :math:`Q` (the ``D x M``
            matrix or the reflection vectors) come from a linear head on the context of shape
            ``(..., context_dim)``; its weight starts at zero and its bias at the unconditional
            initial values, and :math:`Q` is orthogonalised per batch element.

    Example:
        >>> layer = Sylvester(4, variant="orthogonal", num_ortho_vectors=2)
        >>> y, ladj = layer(torch.randn(10, 4))  # y: (10, 4), ladj: (10,)
        >>> x, ladj_inv = layer.inverse(y)  # numerical inverse, ladj_inv == -ladj

    References:
        Sylvester Normalizing Flows for Variational Inference (van den Berg et al., 2018,
        arXiv 1803.05649)
    """

    has_inverse = True

    def __init__(
        self,
        input_dim: int,
        variant: str = "orthogonal",
        num_ortho_vectors: int | None = None,
        num_householder: int | None = None,
        flip: bool = False,
        context_dim: int | None = None,
    ) -> None:
        super().__init__(input_dim, context_dim)
        if variant not in _VARIANTS:
            raise ValueError(f"Sylvester: variant must be one of {_VARIANTS}, got {variant!r}")
        num_vectors = min(input_dim, MAX_DEFAULT_VECTORS)
        if num_ortho_vectors is not None:
            if not _is_positive_int(num_ortho_vectors) or num_ortho_vectors > input_dim:
                raise ValueError(
                    f"Sylvester: num_ortho_vectors must be an int in [1, input_dim={input_dim}], "
                    f"got {num_ortho_vectors!r}"
                )
            num_vectors = num_ortho_vectors
        if num_householder is not None:
            if variant != "householder":
                raise ValueError(
                    f"Sylvester: num_householder applies to variant='householder' only, got "
                    f"num_householder={num_householder!r} with variant={variant!r}"
                )
            if not _is_positive_int(num_householder):
                raise ValueError(
                    f"Sylvester: num_householder must be a positive int, got {num_householder!r}"
                )
        else:
            num_householder = min(input_dim, 8)
        self.variant = variant
        self.num_ortho_vectors = num_vectors
        self.num_householder = num_householder if variant == "householder" else None
        self.flip = bool(flip)

        size = num_vectors
        num_upper = size * (size - 1) // 2
        inits: dict[str, Tensor] = {
            "r_diag_raw": torch.zeros(size),
            "r_tilde_diag_raw": torch.ones(size),
            "b": torch.zeros(size),
        }
        if num_upper:
            inits["r_upper"] = torch.zeros(num_upper)
            inits["r_tilde_upper"] = torch.zeros(num_upper)
        if variant == "orthogonal":
            # QR's Q factor is column-major: without .contiguous() Pyro's param store would
            # keep a contiguous copy and train it instead of this tensor.
            inits["q_raw"] = torch.linalg.qr(torch.randn(input_dim, size)).Q.contiguous()
        elif variant == "householder":
            inits["q_vectors"] = torch.randn(num_householder, input_dim)
        self._shapes = {name: tuple(value.shape) for name, value in inits.items()}
        if context_dim is None:
            for name, value in inits.items():
                self.register_parameter(name, nn.Parameter(value))
        else:
            bias = torch.cat([value.flatten() for value in inits.values()])
            self.head = context_head(context_dim, bias)
        self.register_buffer("upper_index", torch.triu_indices(size, size, 1), persistent=False)

    def _raw(self, context: Tensor | None) -> dict[str, Tensor]:
        self._check_context(context)
        if self.context_dim is None:
            return {name: getattr(self, name) for name in self._shapes}
        out = self.head(context)
        sizes = [math.prod(shape) for shape in self._shapes.values()]
        chunks = out.split(sizes, dim=-1)
        return {
            name: chunk.unflatten(-1, shape) if len(shape) > 1 else chunk
            for (name, shape), chunk in zip(self._shapes.items(), chunks, strict=True)
        }

    def _triangular(self, diag: Tensor, upper: Tensor | None) -> Tensor:
        matrix = torch.diag_embed(diag)
        if upper is None:
            return matrix
        batch = torch.broadcast_shapes(diag.shape[:-1], upper.shape[:-1])
        matrix = matrix.expand(batch + matrix.shape[-2:]).clone()
        matrix[..., self.upper_index[0], self.upper_index[1]] = upper.expand(
            batch + upper.shape[-1:]
        )
        return matrix

    def _params(
        self, context: Tensor | None
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor, Tensor]:
        r"""``(Q, R, R~, b, diag R, diag R~)``; ``Q`` is ``None`` in the triangular variant.

        Shapes: ``Q (..., D, M)``, ``R, R~ (..., M, M)``, the others ``(..., M)``.
        """
        raw = self._raw(context)
        r_diag = torch.tanh(raw["r_diag_raw"])
        r_tilde_diag = torch.tanh(raw["r_tilde_diag_raw"])
        r = self._triangular(r_diag, raw.get("r_upper"))
        r_tilde = self._triangular(r_tilde_diag, raw.get("r_tilde_upper"))
        if self.variant == "orthogonal":
            q = orthogonalize(raw["q_raw"])
        elif self.variant == "householder":
            eye = torch.eye(self.num_ortho_vectors, self.input_dim, dtype=r.dtype, device=r.device)
            if self.num_ortho_vectors == self.input_dim:
                # Row j of H_1 ... H_K is H_K ... H_1 e_j (each H_k is symmetric).
                q = reflect_rows(eye, raw["q_vectors"])
            else:
                # Column j of H_1 ... H_K is the transposed row j of H_K ... H_1.
                q = reflect_rows(eye, raw["q_vectors"], reverse=True).mT
        else:
            q = None
        return q, r, r_tilde, raw["b"], r_diag, r_tilde_diag

    def _project(self, x: Tensor, q: Tensor | None) -> Tensor:
        """:math:`Q^T x`, shape ``(..., M)``."""
        if q is None:
            return (x.flip(-1) if self.flip else x)[..., : self.num_ortho_vectors]
        return (x.unsqueeze(-2) @ q).squeeze(-2)

    def _embed(self, v: Tensor, q: Tensor | None) -> Tensor:
        """:math:`Q v`, shape ``(..., D)``."""
        if q is None:
            v = torch.nn.functional.pad(v, (0, self.input_dim - self.num_ortho_vectors))
            return v.flip(-1) if self.flip else v
        return (q @ v.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def _ladj(activation: Tensor, r_diag: Tensor, r_tilde_diag: Tensor) -> Tensor:
        return torch.log1p((1 - activation**2) * r_diag * r_tilde_diag).sum(-1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q, r, r_tilde, b, r_diag, r_tilde_diag = self._params(context)
        v = self._project(x, q)
        activation = torch.tanh((r_tilde @ v.unsqueeze(-1)).squeeze(-1) + b)
        y = x + self._embed((r @ activation.unsqueeze(-1)).squeeze(-1), q)
        return y, self._ladj(activation, r_diag, r_tilde_diag).expand(y.shape[:-1])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q, r, r_tilde, b, r_diag, r_tilde_diag = self._params(context)
        w = self._project(y, q)  # = v + R tanh(R~ v + b)
        v_parts: list[Tensor] = []  # v_M, v_{M-1}, ... as they are solved
        act_parts: list[Tensor] = []
        for i in range(self.num_ortho_vectors - 1, -1, -1):
            target, shift = w[..., i], b[..., i]
            if v_parts:
                later_v = torch.stack(v_parts[::-1], dim=-1)  # v_{i+1}, ..., v_M
                later_act = torch.stack(act_parts[::-1], dim=-1)
                target = target - (r[..., i, i + 1 :] * later_act).sum(-1)
                shift = shift + (r_tilde[..., i, i + 1 :] * later_v).sum(-1)
            v_i = _solve_tanh_equation(target, r_diag[..., i], r_tilde_diag[..., i], shift)
            v_parts.append(v_i)
            act_parts.append(torch.tanh(r_tilde_diag[..., i] * v_i + shift))
        v = torch.stack(v_parts[::-1], dim=-1)
        activation = torch.stack(act_parts[::-1], dim=-1)
        x = self._embed(v, q)
        if self.num_ortho_vectors < self.input_dim:
            x = x + (y - self._embed(w, q))  # the part orthogonal to Q's columns
        return x, -self._ladj(activation, r_diag, r_tilde_diag).expand(x.shape[:-1])

    def extra_repr(self) -> str:
        extra = super().extra_repr() + f", variant={self.variant!r}"
        if self.variant == "orthogonal" or self.num_ortho_vectors < self.input_dim:
            extra += f", num_ortho_vectors={self.num_ortho_vectors}"
        if self.variant == "householder":
            extra += f", num_householder={self.num_householder}"
        else:
            extra += f", flip={self.flip}"
        return extra
