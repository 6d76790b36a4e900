r"""Gated inverse autoregressive flow (Kingma et al., 2016).

.. math::

    (m, s) = \mathrm{MADE}(x), \qquad \sigma = \mathrm{sigmoid}(s + c), \qquad
    y = \sigma \odot x + (1 - \sigma) \odot m, \qquad
    \log|\det J| = \sum_i \log \sigma_i

where :math:`m_i, s_i` depend on :math:`x_1, \ldots, x_{i-1}` only (a
:class:`~pyro_flowvi.flows.made.MADE` with the identity ordering), so the Jacobian is
lower-triangular with diagonal :math:`\sigma`. The layer is an :class:`Autoregressive` layer
with the gated affine transformer. The gate bias :math:`c`
(default 2) keeps :math:`\sigma` near 1 at the start; the log-scale is never clamped, so a
diverging fit shows up in the loss rather than being hidden. The inverse is exact and takes D
sequential steps: step :math:`k` fixes :math:`x_k` from the correct :math:`x_{<k}` (one MADE
pass in total, see :class:`~pyro_flowvi.flows.Autoregressive`).
"""

from __future__ import annotations

__all__ = ["IAF"]

from collections.abc import Callable, Sequence

from torch import nn

from .autoregressive import Autoregressive
from .transformers import AffineTransformer, GatedAffineTransformer


class IAF(Autoregressive):
    r"""Gated IAF layer :math:`y = \sigma \odot x + (1 - \sigma) \odot m`.

    An :class:`~pyro_flowvi.flows.autoregressive.Autoregressive` layer with the
    :class:`~pyro_flowvi.flows.transformers.GatedAffineTransformer` (or, with
    ``update="affine"``, the :class:`~pyro_flowvi.flows.transformers.AffineTransformer`).
    The last layer of the MADE (and its skip connection) starts at zero, so a fresh layer is
    :math:`y = \mathrm{sigmoid}(c)\, x`: the identity up to a scale of 0.88 for the default
    :math:`c = 2`, with :math:`\log|\det J| = D \log \mathrm{sigmoid}(c)`.

    Arguments:
        input_dim: D.
        hidden_dims: MADE hidden widths, an int (one hidden layer) or a sequence; default two
            layers of width ``min(max(2 * D, 8), 256)``: linear in D up to D = 128, then
            capped, so the network grows linearly with D (a MADE narrower than D - 1 spreads
            its hidden degrees evenly).
        skip_connections: add a masked linear map from the input straight to :math:`(m, s)`.
        sigmoid_bias: the gate bias :math:`c` (default 2.0).
        activation: the MADE's hidden nonlinearity, a class or factory of modules
            (default ``nn.ELU``).
        context_dim: for a conditional layer, the context (shape ``(..., context_dim)``)
            enters the MADE's first hidden layer through an unmasked linear map.
        update: ``"gated"`` (default, above) or ``"affine"``: :math:`y = m + e^{\ell} \odot x`
            with :math:`\ell = b \tanh(s / b)`, a smoothly bounded log-scale that can stretch
            as well as shrink (a fresh layer is the identity; ``sigmoid_bias`` is unused).
        max_log_scale: :math:`b` of the affine update (default 3.0).

    Example:
        >>> layer = IAF(4)
        >>> y, ladj = layer(torch.randn(10, 4))  # y: (10, 4), ladj: (10,)
        >>> x, ladj_inv = layer.inverse(y)  # exact, 4 sequential steps

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016,
        arXiv 1606.04934)

        MADE: Masked Autoencoder for Distribution Estimation (Germain et al., 2015,
        arXiv 1502.03509)
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: int | Sequence[int] | None = None,
        skip_connections: bool = False,
        sigmoid_bias: float = 2.0,
        activation: Callable[[], nn.Module] = nn.ELU,
        context_dim: int | None = None,
        update: str = "gated",
        max_log_scale: float = 3.0,
    ) -> None:
        if update not in ("gated", "affine"):
            raise ValueError(f"IAF: update must be 'gated' or 'affine', got {update!r}")
        if not max_log_scale > 0:
            raise ValueError(f"IAF: max_log_scale must be > 0, got {max_log_scale!r}")
        transformer = (
            GatedAffineTransformer(sigmoid_bias)
            if update == "gated"
            else AffineTransformer(max_log_scale)
        )
        super().__init__(
            input_dim,
            transformer=transformer,
            hidden_dims=hidden_dims,
            context_dim=context_dim,
            activation=activation,
            skip_connections=skip_connections,
        )
        self.update = update
        self.max_log_scale = float(max_log_scale)
        self.sigmoid_bias = float(sigmoid_bias)

    def extra_repr(self) -> str:
        if self.update == "affine":
            return super().extra_repr() + f", update='affine', max_log_scale={self.max_log_scale}"
        return super().extra_repr() + f", sigmoid_bias={self.sigmoid_bias}"
