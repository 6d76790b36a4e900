r"""Autoregressive layers: a MADE conditioner drives an elementwise transformer.

.. math::

    \theta = \mathrm{MADE}(x; c), \qquad y_i = \tau(x_i; \theta_i), \qquad
    \log|\det J| = \sum_i \log \tau'(x_i; \theta_i)

where :math:`\theta_i` depends on :math:`x_1, \ldots, x_{i-1}` (and the context :math:`c`) only,
so the Jacobian is lower-triangular with diagonal :math:`\tau'(x_i; \theta_i)`. This is the
*inverse autoregressive* direction (Kingma et al., 2016): a sample and its log-density come
from one pass, which is what variational inference needs. The inverse is exact and takes D
sequential steps: step :math:`k` computes :math:`\theta_k` from the already-correct
:math:`x_{<k}` and inverts coordinate :math:`k` alone. The MADE is evaluated incrementally
(:class:`~pyro_flowvi.flows.made.IncrementalMADE`): each step activates only the hidden units
that the newly fixed input has made final, so the D steps together cost one pass of the
network plus D scalar inversions, not D passes.

With the affine or gated affine transformer this is IAF (:class:`~pyro_flowvi.flows.IAF`);
with the rational-quadratic spline, an autoregressive neural spline flow; with the deep
sigmoidal transformer, a neural autoregressive flow.
"""

from __future__ import annotations

__all__ = ["Autoregressive", "default_hidden_width"]

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .base import Flow
from .made import MADE
from .transformers import AffineTransformer, Transformer


def default_hidden_width(input_dim: int, cap: int = 256) -> int:
    """The default hidden width ``min(max(2 * D, 8), cap)``: linear in D, then capped, so the
    conditioner's size grows at most linearly with the latent dimension."""
    return min(max(2 * input_dim, 8), cap)


class Autoregressive(Flow):
    r"""Autoregressive layer :math:`y_i = \tau(x_i; \mathrm{MADE}(x_{<i}, c)_i)`.

    The MADE's last layer (and its skip connection) starts at zero, so a fresh layer is the
    transformer's start (the identity for every transformer but the gated affine).

    Arguments:
        input_dim: D.
        transformer: a :class:`~pyro_flowvi.flows.transformers.Transformer` (default
            :class:`~pyro_flowvi.flows.transformers.AffineTransformer`).
        hidden_dims: MADE hidden widths, an int (one hidden layer) or a sequence; default two
            layers of width :func:`default_hidden_width` (``min(max(2 D, 8), 256)``).
        context_dim: for a conditional layer, the context enters the MADE's first hidden
            layer through an unmasked linear map.
        activation: the MADE's hidden nonlinearity (default ``nn.ELU``).
        skip_connections: add a masked linear map from the input straight to the parameters.

    Example:
        >>> from pyro_flowvi.flows.transformers import RationalQuadraticSpline
        >>> layer = Autoregressive(4, transformer=RationalQuadraticSpline(bins=8))
        >>> y, ladj = layer(torch.randn(10, 4))
        >>> x, ladj_inv = layer.inverse(y)  # exact, 4 sequential steps

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016,
        arXiv 1606.04934)

        MADE: Masked Autoencoder for Distribution Estimation (Germain et al., 2015,
        arXiv 1502.03509)
    """

    has_inverse = True

    def __init__(
        self,
        input_dim: int,
        transformer: Transformer | None = None,
        hidden_dims: int | Sequence[int] | None = None,
        context_dim: int | None = None,
        activation: Callable[[], nn.Module] = nn.ELU,
        skip_connections: bool = False,
    ) -> None:
        super().__init__(input_dim, context_dim)
        if transformer is None:
            transformer = AffineTransformer()
        if not isinstance(transformer, Transformer):
            raise ValueError(
                f"{type(self).__name__}: transformer must be a Transformer, got "
                f"{type(transformer).__name__}"
            )
        self.transformer = transformer
        if hidden_dims is None:
            width = default_hidden_width(input_dim)
            hidden_dims = [width, width]
        self.made = MADE(
            input_dim,
            hidden_dims,
            num_outputs=transformer.num_params,
            context_dim=context_dim,
            activation=activation,
            skip_connections=skip_connections,
        )
        nn.init.zeros_(self.made.output_layer.weight)
        nn.init.zeros_(self.made.output_layer.bias)
        if self.made.skip is not None:
            nn.init.zeros_(self.made.skip.weight)

    def _params(self, x: Tensor, context: Tensor | None) -> Tensor:
        """The transformer's parameters, shape ``(..., P, D)``."""
        self._check_context(context)
        return self.made(x, context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, log_derivative = self.transformer(x, self._params(x, context))
        return y, log_derivative.sum(-1)

    def inverse_at(
        self, y: Tensor, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`Flow.inverse_at`: the same sequence as :meth:`inverse`, each coordinate
        taken at its known value (:meth:`Transformer.inverse_at`: no root solve), so an
        ill-conditioned layer cannot spoil the values."""
        return self._invert(y, context, x.detach())

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._invert(y, context, None)

    def _invert(
        self, y: Tensor, context: Tensor | None, known: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        self._check_context(context)
        batch = y.shape[:-1]
        if context is not None:
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
        y = y.expand(batch + y.shape[-1:])
        if known is not None:
            known = known.expand(batch + known.shape[-1:])
        if self.input_dim == 1:  # the parameters depend on the context alone: one pass
            params = self.made(torch.zeros_like(y), context)
            if known is None:
                x, log_derivative = self.transformer.inverse(y, params)
            else:
                x, log_derivative = self.transformer.inverse_at(y, known, params)
            return x, log_derivative[..., 0]
        # theta_k depends on x_{<k} only, which the previous steps made exact; the MADE
        # evaluates the units coordinate k needs, from the inputs fixed so far.
        steps = self.made.incremental(context, batch)
        columns, log_derivatives = [], []
        for k in range(self.input_dim):
            params = steps.outputs(k).unsqueeze(-1)  # (..., P, 1)
            if known is None:
                x_k, log_derivative = self.transformer.inverse(y[..., k : k + 1], params)
            else:
                x_k, log_derivative = self.transformer.inverse_at(
                    y[..., k : k + 1], known[..., k : k + 1], params
                )
            columns.append(x_k)
            log_derivatives.append(log_derivative)
            if k + 1 < self.input_dim:
                steps.append(k, x_k[..., 0])
        return torch.cat(columns, dim=-1), torch.cat(log_derivatives, dim=-1).sum(-1)
