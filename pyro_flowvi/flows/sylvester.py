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
:math:`Q^\top y = v + R h(\tilde R v + b)`; the pre-activation :math:`a = \tilde R v + b` solves
the upper-triangular system :math:`a + \tilde R R\, h(a) = \tilde R Q^\top y + b`, whose
component :math:`i` depends on :math:`a_i, \ldots, a_M` only and increases in :math:`a_i`.
:func:`solve_preactivation` runs Newton's method on the whole vector (one batched triangular
solve per step) and falls back to back-substitution, M scalar bracketed solves, for the points
where Newton has not converged, so the root is found whatever the parameters; then
:math:`x = y - Q R h(a)` (the part of :math:`x` orthogonal to the columns of :math:`Q` is left
unchanged).
"""

from __future__ import annotations

__all__ = ["Sylvester", "solve_preactivation"]

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


#: Newton steps on the whole vector before :func:`solve_preactivation` falls back to
#: back-substitution for the points that have not converged (trained layers need 3 to 6).
NEWTON_STEPS = 12


def _back_substitute(a: Tensor, a_matrix: Tensor, c: Tensor) -> Tensor:
    r"""Solve :math:`a + A \tanh(a) = c` by back-substitution, without autograd.

    Component :math:`i` (from M down to 1) is the scalar equation
    :math:`a_i + A_{ii} \tanh(a_i) = c_i - \sum_{j > i} A_{ij} \tanh(a_j)`, solved by the
    bracketed Newton-bisection iteration of :func:`~pyro_flowvi.flows.planar._solve_tanh_equation`,
    which converges whatever its inputs when :math:`A_{ii} > -1`.

    Arguments:
        a: a tensor of shape ``(N, M)`` to write the root into (its values are ignored).
        a_matrix: :math:`A`, upper-triangular, shape ``(N, M, M)``.
        c: shape ``(N, M)``.

    Returns:
        ``a``, filled in.
    """
    activation = torch.zeros_like(a)
    zero = a.new_zeros(())
    for i in range(a.shape[-1] - 1, -1, -1):
        target = c[:, i] - (a_matrix[:, i, i + 1 :] * activation[:, i + 1 :]).sum(-1)
        a[:, i] = _solve_tanh_equation(target, a_matrix[:, i, i], zero + 1, zero)
        activation[:, i] = torch.tanh(a[:, i])
    return a


def solve_preactivation(w: Tensor, r: Tensor, r_tilde: Tensor, b: Tensor) -> Tensor:
    r"""The pre-activation :math:`a = \tilde R v + b` of the point :math:`v` that solves
    :math:`v + R \tanh(\tilde R v + b) = w`.

    Substituting :math:`v = w - R \tanh(a)` into :math:`a = \tilde R v + b` gives

    .. math::

        G(a) = a + A \tanh(a) - c = 0, \qquad A = \tilde R R, \quad c = \tilde R w + b,

        G'(a) = I + A\, \mathrm{diag}(1 - \tanh^2 a).

    :math:`A` is upper-triangular with :math:`A_{ii} = r_{ii} \tilde r_{ii} \in (-1, 1)`, so
    component :math:`i` of :math:`G` depends on :math:`a_i, \ldots, a_M` only and is strictly
    increasing in :math:`a_i`: :math:`G` has exactly one root, found by back-substitution,
    and :math:`v = w - R \tanh(a)` is then the one solution of the layer's equation (it
    satisfies :math:`\tilde R v + b = c - A \tanh(a) = a`). :math:`G'` is upper-triangular
    with diagonal :math:`1 + A_{ii} (1 - \tanh^2 a_i) > 0`, and it scales the columns of the
    fixed matrix :math:`A`: a Newton step costs :math:`O(M^2)` per point (one batched
    triangular solve), where the Jacobian :math:`I + R H \tilde R` of the equation in
    :math:`v` would need a matrix product, :math:`O(M^3)`.

    The solve runs in three stages.

    1. Newton on the whole vector, without autograd, from :math:`a = c` (the identity's
       pre-activation), each iterate projected onto the box
       :math:`|a - c| \le |A| \mathbf{1}` that holds the root (because
       :math:`|\tanh| \le 1`). A point has converged when every component of its full
       Newton step is below ``eps ** 0.75`` (relative, ``eps`` of the dtype): near the simple
       root the step is the error, and the next iterate's error its square.
    2. The points that have not converged after ``NEWTON_STEPS`` steps (or whose step is
       not finite, or whose Jacobian has a diagonal entry that rounded to zero) are solved
       again by back-substitution (``_back_substitute``), M scalar bracketed solves that
       converge whatever the parameters. The result is therefore the
       root in every case; Newton only makes the usual case fast.
    3. One more Newton step with autograd on and the Jacobian detached, for its gradient
       only: at the root its derivative is :math:`-G'(a)^{-1} \partial G`, the gradient of
       the implicit function theorem with respect to :math:`w`, :math:`R`, :math:`\tilde R`
       and :math:`b`. Its value (zero up to rounding) is subtracted back out: where
       :math:`G'` is nearly singular (:math:`r_{ii} \tilde r_{ii}` near -1 in several
       components) the triangular solve would amplify the rounding of :math:`G(a)` and
       spoil a root that back-substitution found to full backward accuracy. Without
       gradients the step is skipped (the value is the same).

    Arguments:
        w: :math:`Q^\top y`, shape ``(..., M)``.
        r, r_tilde: :math:`R, \tilde R`, upper-triangular, shape ``(..., M, M)``, with
            :math:`r_{ii} \tilde r_{ii} > -1`.
        b: shape ``(..., M)``.

    Returns:
        :math:`a` of the broadcast batch shape and ``(M,)``.
    """
    a_matrix = r_tilde @ r
    c = _matvec(r_tilde, w) + b
    size = c.shape[-1]
    batch = c.shape[:-1]
    # Work on a flat batch; A stays (M, M) when every point shares it (unconditional layers).
    c = c.reshape(-1, size)
    if a_matrix.dim() > 2:
        a_matrix = a_matrix.expand(batch + (size, size)).reshape(-1, size, size)
    eye = torch.eye(size, dtype=c.dtype, device=c.device)
    tol = torch.finfo(c.dtype).eps ** 0.75
    with torch.no_grad():
        a_fixed, c_fixed = a_matrix.detach(), c.detach()
        shared = a_fixed.dim() == 2
        radius = a_fixed.abs().sum(-1)
        lower, upper = c_fixed - radius, c_fixed + radius
        a = c_fixed.clone()
        # The points still iterating: a converged point leaves the set with its last iterate.
        active = torch.arange(a.shape[0], device=a.device)
        for _ in range(NEWTON_STEPS):
            a_active = a[active]
            step = _newton_step(
                a_active, a_fixed if shared else a_fixed[active], c_fixed[active], eye, math.nan
            )
            a_active = torch.clamp(a_active - step, lower[active], upper[active])
            a[active] = a_active
            # NaN fails the comparison: a point with a non-finite step (or a singular
            # Jacobian) has not converged.
            converged = (step.abs() <= tol * (1 + a_active.abs())).all(-1)
            active = active[~converged]
            if active.numel() == 0:
                break
        if active.numel():
            matrices = a_fixed.expand(a.shape[:1] + (size, size))[active]
            a[active] = _back_substitute(a[active], matrices, c_fixed[active])
    if torch.is_grad_enabled() and (a_matrix.requires_grad or c.requires_grad):
        step = _newton_step(a, a_matrix, c, eye, 0.0)
        a = a - (step - step.detach())  # the same value, with the implicit-function gradient
    return a.reshape(batch + (size,))


#: Entries of the Jacobians formed at once (512 KiB in float64): a larger block falls out of
#: the cache, and a fresh multi-megabyte allocation costs page faults at every Newton step.
_JACOBIAN_BLOCK = 2**16


def _matvec(matrix: Tensor, vector: Tensor) -> Tensor:
    """``matrix @ vector`` over batches: a single matrix product when ``matrix`` is 2-D."""
    return (vector.unsqueeze(-2) @ matrix.mT).squeeze(-2)


def _newton_step(
    a: Tensor, a_matrix: Tensor, c: Tensor, eye: Tensor, singular_step: float
) -> Tensor:
    r"""The Newton step :math:`G'(a)^{-1} G(a)` of :func:`solve_preactivation`.

    ``a, c`` have shape ``(N, M)``, ``a_matrix`` ``(M, M)`` or ``(N, M, M)``. The Jacobian is
    detached: at the root the step's derivative is then :math:`-G'(a)^{-1} \partial G`, the
    implicit-function gradient. A diagonal entry :math:`1 + A_{ii} (1 - \tanh^2 a_i)` that
    rounded to zero or below (possible only when :math:`r_{ii} \tilde r_{ii}` rounds to -1)
    would make the step infinite: such a point gets ``singular_step`` in every component
    instead (NaN in the iteration, so that the point goes to back-substitution; zero in the
    final step, so that the root is kept, without the gradient step, as in the scalar solver).
    """
    activation = torch.tanh(a)
    residual = a + _matvec(a_matrix, activation) - c
    slope = (1 - activation * activation).detach().unsqueeze(-2)
    matrix = a_matrix.detach()
    size = a.shape[-1]
    block = max(1, _JACOBIAN_BLOCK // (size * size))
    steps = []
    for start in range(0, a.shape[0], block):
        part = slice(start, start + block)
        jacobian = torch.addcmul(eye, matrix if matrix.dim() == 2 else matrix[part], slope[part])
        diagonal = jacobian.diagonal(dim1=-2, dim2=-1)
        singular = diagonal <= 0
        diagonal.masked_fill_(singular, 1.0)
        singular = singular.any(-1, keepdim=True)
        rhs = torch.where(singular, 0.0, residual[part])
        step = torch.linalg.solve_triangular(jacobian, rhs.unsqueeze(-1), upper=True)
        steps.append(torch.where(singular, singular_step, step.squeeze(-1)))
    return steps[0] if len(steps) == 1 else torch.cat(steps)


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
        activation = torch.tanh(solve_preactivation(w, r, r_tilde, b))
        # y - Q R h(a) is x exactly: x - Q v is the part orthogonal to Q's columns, unchanged.
        shift = _matvec(r, activation)
        # One matrix product for the batch (``_embed``'s form expands Q to every point).
        x = y - (self._embed(shift, q) if q is None else _matvec(q, shift))
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
