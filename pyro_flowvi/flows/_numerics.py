r"""Numerical kernels shared by the flow layers: orthonormalisation and monotone root finding.

Both are written so that a forward pass stays inside the autograd graph and can be traced by
``torch.jit.trace`` (Pyro's ``JitTrace_ELBO``): no Python ``float``/``bool`` of a tensor while
tracing, and, in eager mode, at most one host synchronisation every few iterations.
"""

from __future__ import annotations

__all__ = ["orthogonalize", "solve_monotone"]

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _qr_orthonormal(matrix: Tensor) -> Tensor:
    """The Q factor of ``matrix`` with the signs that make R's diagonal positive.

    For a matrix whose columns are already orthonormal this returns the matrix itself (to
    rounding), and its derivative there is the identity on tangent directions.
    """
    q, r = torch.linalg.qr(matrix)
    diagonal = r.diagonal(dim1=-2, dim2=-1)
    signs = torch.where(diagonal < 0, -torch.ones_like(diagonal), torch.ones_like(diagonal))
    return q * signs.unsqueeze(-2)


def _scaled(matrix: Tensor) -> Tensor:
    r"""``matrix / c`` with :math:`c \ge \sigma_{\max}(A)` (see :func:`orthogonalize`)."""
    gram = matrix.mT @ matrix
    bound = gram.abs().sum(-1).amax(-1).sqrt()
    return matrix / bound[..., None, None]


def _bjorck(q: Tensor, max_iter: int, check_every: int) -> tuple[Tensor, bool]:
    """Björck's iteration from ``q`` (singular values in (0, 1]); returns the last iterate and
    whether it converged (see :func:`orthogonalize`)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    threshold = math.sqrt(torch.finfo(q.dtype).eps)
    shape = q.shape
    batched = q.dim() > 2
    if batched:
        q = q.reshape((-1,) + shape[-2:])  # one batch dimension, for baddbmm
    converged = False
    for _ in range(math.ceil(max_iter / check_every)):
        for _ in range(check_every):
            # Q (I + (I - G) / 2) = 1.5 Q - 0.5 Q G, G = Q^T Q, as one fused product.
            gram = q.mT @ q
            q = (torch.baddbmm if batched else torch.addmm)(q, q, gram, beta=1.5, alpha=-0.5)
        if float(torch.linalg.matrix_norm(gram.detach() - eye).max()) <= threshold:
            converged = True
            break
    return q.reshape(shape), converged


def _polar_tangent(q: Tensor, matrix: Tensor) -> Tensor:
    r"""A term whose value is zero and whose derivative with respect to ``matrix`` is that of
    its orthogonal polar factor ``q`` (orthonormal columns, computed without autograd).

    With :math:`A = Q H`, :math:`H = Q^\top A = V \Lambda V^\top` symmetric positive definite,
    differentiating :math:`Q^\top Q = I` and :math:`A = Q H` gives

    .. math::

        dQ = Q\Omega + (I - Q Q^\top)\, dA\, H^{-1}, \qquad
        H\Omega + \Omega H = Q^\top dA - dA^\top Q,

        dQ = \bigl[P\, ((B - B^\top) \oslash (\lambda_i + \lambda_j))
        + (E - P B)\, \Lambda^{-1}\bigr] V^\top, \qquad
        P = Q V, \; E = dA\, V, \; B = P^\top E,

    evaluated at :math:`dA = A - \mathrm{sg}(A)` (zero, with derivative the identity): a
    fixed handful of small matrix products, where differentiating through every iteration
    costs two products per iteration forward and four backward.
    """
    q = q.detach()
    fixed = matrix.detach()
    h = q.mT @ fixed
    eigenvalues, v = torch.linalg.eigh(0.5 * (h + h.mT))
    p = q @ v
    pairs = 1.0 / (eigenvalues.unsqueeze(-1) + eigenvalues.unsqueeze(-2))
    e = (matrix - fixed) @ v
    b = p.mT @ e
    inner = p @ ((b - b.mT) * pairs)
    if q.shape[-2] > q.shape[-1]:  # (I - Q Q^T) is zero for a square Q
        inner = inner + (e - p @ b) / eigenvalues.unsqueeze(-2)
    return inner @ v.mT


def orthogonalize(
    matrix: Tensor, max_iter: int = 64, check_every: int = 4, traced_iterations: int = 24
) -> Tensor:
    r"""Orthonormalise the columns of ``matrix`` (``(..., D, M)``, ``M <= D``) by Björck's
    iteration, whose limit is the orthogonal polar factor :math:`A (A^\top A)^{-1/2}`.

    .. math::

        Q_0 = A / c, \qquad Q_{k+1} = Q_k \bigl(I + \tfrac12 (I - Q_k^\top Q_k)\bigr)

    with :math:`c = (\max_i \sum_j |(A^\top A)_{ij}|)^{1/2} \ge \sigma_{\max}(A)`, so every
    singular value of :math:`Q_0` lies in :math:`(0, 1]`, where each step maps
    :math:`\sigma \mapsto \sigma (3 - \sigma^2) / 2`: small singular values grow by a factor
    1.5 per step, and near 1 the convergence is quadratic. Since
    :math:`\sigma_{\min}(Q_0) \ge 1 / (\sqrt{M} \kappa(A))`, about
    :math:`\log_{1.5}(\sqrt{M}\kappa) + 5` steps reach rounding level; a nearly orthonormal
    :math:`A` needs 3 or 4.

    Eager mode checks :math:`\|Q^\top Q - I\|_F \le \sqrt{\epsilon}` every ``check_every``
    steps (one host synchronisation per check, not per step); the step after the check then
    reaches rounding level. The iteration then runs without autograd, and the derivative is
    that of the polar factor itself, added in closed form (:func:`_polar_tangent`: one
    :math:`M \times M` symmetric eigendecomposition and a few products), the limit of the
    iterates' derivatives; the value is the iterate's, unchanged. That term is linear in
    ``matrix``, so it gives first derivatives only: second derivatives through ``Q``
    (``create_graph=True``) are not the polar factor's, and nothing in this package takes
    them. While ``torch.jit.trace``
    records, the count is fixed at ``traced_iterations`` (24 steps cover
    :math:`\sqrt{M}\kappa` up to about 4000) and autograd runs through the steps. Whenever
    the iteration may not have converged (tracing, or ``max_iter`` reached), a QR
    factorisation with R's diagonal made positive finishes the job (differentiated through
    the iterates): it returns its input when the columns are orthonormal already, and an
    exactly orthonormal matrix otherwise, so the flows' log-determinants, which assume
    orthonormal columns, stay exact.

    Arguments:
        matrix: shape ``(..., D, M)`` with ``M <= D`` and full column rank.
        max_iter: cap on the eager iterations.
        check_every: eager steps between convergence checks.
        traced_iterations: steps while tracing.

    Returns:
        A tensor of the shape of ``matrix`` with orthonormal columns.

    References:
        An Iterative Algorithm for Computing the Best Estimate of an Orthogonal Matrix
        (Björck & Bowie, 1971, SIAM J. Numer. Anal. 8(2))
    """
    if torch.jit.is_tracing():
        q = _scaled(matrix)
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        for _ in range(traced_iterations):
            q = q - 0.5 * q @ (q.mT @ q - eye)
        return _qr_orthonormal(q)
    if not (torch.is_grad_enabled() and matrix.requires_grad):
        q, converged = _bjorck(_scaled(matrix), max_iter, check_every)
        return q if converged else _qr_orthonormal(q)
    with torch.no_grad():
        q, converged = _bjorck(_scaled(matrix), max_iter, check_every)
    if converged:
        return q + _polar_tangent(q, matrix)
    q, _ = _bjorck(_scaled(matrix), max_iter, check_every)
    return _qr_orthonormal(q)


def solve_monotone(
    function: Callable[[Tensor], tuple[Tensor, Tensor]],
    lower: Tensor,
    upper: Tensor,
    start: Tensor | None = None,
    max_iter: int = 200,
    check_every: int = 4,
) -> Tensor:
    r"""Solve :math:`f(a) = 0` elementwise for a strictly increasing :math:`f`, without autograd.

    A Newton step that leaves the current bracket :math:`[\ell, u]` (or is not finite) is
    replaced by bisection, so the iteration converges whatever :math:`f`; the bracket shrinks
    at every step on the side of the sign of :math:`f`. It stops when every step is below
    ``eps ** 0.75`` (relative, ``eps`` of the dtype), checked every ``check_every`` steps, or
    after ``max_iter`` steps. The caller adds the gradient (one Newton step with autograd on
    gives the implicit-function-theorem gradient).

    Arguments:
        function: ``a -> (f(a), f'(a))``, elementwise.
        lower, upper: a bracket with :math:`f(\ell) \le 0 \le f(u)`, broadcastable.
        start: the first iterate (default the bracket's midpoint).
        max_iter: cap on the iterations.
        check_every: iterations between the (host-synchronising) convergence checks.

    Returns:
        The root, detached, of the broadcast shape of ``lower`` and ``upper``.
    """
    with torch.no_grad():
        lo, hi = torch.broadcast_tensors(lower.detach(), upper.detach())
        lo, hi = lo.clone(), hi.clone()
        a = 0.5 * (lo + hi) if start is None else start.detach().expand_as(lo).clone()
        tol = torch.finfo(a.dtype).eps ** 0.75
        for i in range(max_iter):
            value, slope = function(a)
            lo = torch.where(value < 0, a, lo)
            hi = torch.where(value > 0, a, hi)
            newton = a - value / slope
            # NaN or inf (a zero or overflowing slope) fails both comparisons: bisection.
            inside = (newton >= lo) & (newton <= hi)
            new = torch.where(inside, newton, 0.5 * (lo + hi))
            step = (new - a).abs()
            a = torch.where(value == 0, a, new)
            if (i + 1) % check_every == 0 and bool(torch.all(step <= tol * (1 + a.abs()))):
                break
    return a
