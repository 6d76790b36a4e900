r"""Masked coupling layer: a fixed binary mask, an MLP conditioner and an elementwise
transformer (RealNVP with the affine transformer; a coupling neural spline flow with the
rational-quadratic spline).

With a fixed mask :math:`m \in \{0, 1\}^D`, the coordinates where :math:`m = 1` pass through
unchanged and condition an elementwise monotone map of the others:

.. math::

    \theta = \mathrm{MLP}(m \odot x, c), \qquad
    y_i = \begin{cases} x_i & m_i = 1 \\ \tau(x_i; \theta_i) & m_i = 0 \end{cases},
    \qquad \log|\det J| = \sum_i (1 - m_i) \log \tau'(x_i; \theta_i)

The MLP (tanh hidden units) has its output layer at zero at the start, so a fresh layer is the
transformer's start (the identity). With the default affine transformer,
:math:`y = m \odot x + (1 - m) \odot (x \odot e^{s} + t)` with a softly bounded log-scale
:math:`s = b \tanh(\hat s / b)`, which keeps long stacks numerically stable without the
straight-through clamps that hide divergence. The inverse is exact: :math:`m \odot y = m \odot
x`, so :math:`\theta` can be recomputed from :math:`y`.

This is the flow that multiplicative normalizing flows (Louizos & Welling, 2017) use for the
auxiliary noise of every weight matrix; the layer is generic and also conditional (the context
is concatenated to the masked input of the MLP).
"""

from __future__ import annotations

__all__ = ["MaskedCoupling", "alternating_mask"]

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Flow
from .made import readout_weight_scale
from .transformers import AffineTransformer, Transformer


def alternating_mask(input_dim: int, parity: int = 0) -> Tensor:
    """The alternating mask ``[0, 1, 0, 1, ...]`` (``parity=1`` flips it).

    Coordinate 0 is transformed under ``parity=0``, so a one-dimensional layer is a learned
    affine map rather than the identity.
    """
    return ((torch.arange(input_dim) + parity) % 2 == 1).to(torch.get_default_dtype())


class _Readout(nn.Linear):
    """The coupling network's last layer, its weight times a constant (see
    :func:`~pyro_flowvi.flows.made.readout_weight_scale`)."""

    def __init__(self, in_features: int, out_features: int, weight_scale: float) -> None:
        super().__init__(in_features, out_features)
        self.weight_scale = weight_scale

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight if self.weight_scale == 1.0 else self.weight * self.weight_scale
        return F.linear(x, weight, self.bias)


class MaskedCoupling(Flow):
    r"""Coupling :math:`y = m \odot x + (1 - m) \odot \tau(x; \mathrm{MLP}(m \odot x))`.

    Arguments:
        input_dim: D.
        mask: a tensor of shape ``(D,)`` with entries in {0, 1}; ones are kept (and condition
            the map), zeros are transformed. Default :func:`alternating_mask` (alternating,
            coordinate 0 transformed). Stack layers with complementary masks so that every
            coordinate gets transformed.
        hidden_dims: hidden widths of the MLP that outputs the transformer's parameters.
        context_dim: for a conditional layer, the size of a context concatenated to the
            masked input of the MLP.
        log_scale_bound: :math:`b > 0` of the default affine transformer,
            :math:`s = b \tanh(\hat s / b)`; unused when ``transformer`` is given.
        transformer: a :class:`~pyro_flowvi.flows.transformers.Transformer` (default
            ``AffineTransformer(log_scale_bound)``). The MLP outputs ``P`` values for each of
            the D coordinates (the kept ones are ignored), so the parameter names and shapes
            do not depend on the mask.
        readout_scale: the constant scale of the MLP's last weight: ``"fan_in"`` (default,
            ``1 / width``, so Adam's first steps move the outputs by about the learning rate)
            or a number (1 for an unscaled readout); see
            :func:`~pyro_flowvi.flows.made.readout_weight_scale`.

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
        transformer: Transformer | None = None,
        readout_scale: float | str = "fan_in",
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
        if transformer is None:
            transformer = AffineTransformer(log_scale_bound)
        if not isinstance(transformer, Transformer):
            raise ValueError(
                "MaskedCoupling: transformer must be a Transformer, got "
                f"{type(transformer).__name__}"
            )
        self.transformer = transformer
        self.register_buffer("mask", mask)
        self.log_scale_bound = float(log_scale_bound)
        sizes = (input_dim + (context_dim or 0), *hidden_dims)
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.Tanh()]
        scale = readout_weight_scale(readout_scale, sizes[-1], "MaskedCoupling")
        out = _Readout(sizes[-1], transformer.num_params * input_dim, scale)
        nn.init.zeros_(out.weight)  # the transformer's start (the identity) at the start
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)

    def _params(self, x_kept: Tensor, context: Tensor | None) -> Tensor:
        """The transformer's parameters, shape ``(..., P, D)``."""
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
        return self.net(inputs).unflatten(-1, (self.transformer.num_params, self.input_dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, log_derivative = self.transformer(x, self._params(x * self.mask, context))
        y = torch.where(self.mask.bool(), x, y)
        return y, (log_derivative * (1 - self.mask)).sum(-1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, log_derivative = self.transformer.inverse(y, self._params(y * self.mask, context))
        x = torch.where(self.mask.bool(), y, x)
        return x, (log_derivative * (1 - self.mask)).sum(-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mask={self.mask.to(torch.int64).tolist()}"
