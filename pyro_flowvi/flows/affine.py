r"""Learnable elementwise affine layer, the base of every guide.

.. math::

    y = \mu + \sigma \odot x, \qquad \log|\det J| = \sum_i \log \sigma_i

with :math:`\sigma = \mathrm{softplus}(\rho)` kept positive. A conditional layer takes
:math:`(\mu, \rho)` from a linear head on the context, which makes it the diagonal Gaussian of
a VAE encoder.
"""

from __future__ import annotations

__all__ = ["ElementwiseAffine", "TriangularAffine"]

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Flow, context_head


class ElementwiseAffine(Flow):
    r"""Elementwise :math:`y = \mu + \sigma \odot x` with a positive, learnable scale.

    Arguments:
        input_dim: D.
        loc: initial :math:`\mu`, a float or a tensor of shape ``(D,)`` (default 0).
        scale: initial :math:`\sigma > 0`, a float or a tensor of shape ``(D,)`` (default 1).
        learn_loc: whether :math:`\mu` is learned; ``False`` keeps it at 0 (a pure scaling).
        context_dim: for a conditional layer, :math:`(\mu, \rho)` come from a linear head on
            the context whose bias starts at ``(loc, softplus^{-1}(scale))``.

    Attributes:
        loc_raw_scale: with a learned location and no context, the one parameter, shape
            ``(2, D)``: rows :math:`\mu` and :math:`\rho` (``loc`` and ``raw_scale`` read
            them as views; a state dict with the two as separate entries still loads).

    Example:
        >>> layer = ElementwiseAffine(3, loc=torch.zeros(3), scale=0.1)
        >>> y, ladj = layer(torch.randn(10, 3))
    """

    has_inverse = True

    def __init__(
        self,
        input_dim: int,
        loc: float | Tensor = 0.0,
        scale: float | Tensor = 1.0,
        learn_loc: bool = True,
        context_dim: int | None = None,
    ) -> None:
        super().__init__(input_dim, context_dim)
        scale_t = torch.as_tensor(scale, dtype=torch.get_default_dtype())
        if not bool(torch.all(scale_t > 0)):
            raise ValueError(f"ElementwiseAffine: scale must be > 0, got {scale!r}")
        loc_t = torch.as_tensor(loc, dtype=torch.get_default_dtype())
        # A fresh tensor with standard strides: broadcast_to(...).clone() keeps stride 0 for
        # D = 1, which breaks the gradient layout contract of the parameter.
        loc_t = torch.empty(input_dim, dtype=loc_t.dtype).copy_(loc_t.expand(input_dim))
        raw = torch.empty(input_dim, dtype=scale_t.dtype).copy_(scale_t.expand(input_dim))
        raw = raw + torch.log(-torch.expm1(-raw))  # inverse softplus
        self.learn_loc = learn_loc
        if context_dim is None:
            if learn_loc:
                # One parameter, rows (loc, raw scale): each parameter tensor costs a
                # registration with Pyro and an optimizer update per step. Every elementwise
                # optimizer (Adam, ClippedAdam, SGD) updates it exactly as the two halves.
                self.loc_raw_scale = nn.Parameter(torch.stack([loc_t, raw]))
            else:
                self.raw_scale = nn.Parameter(raw)
                self.register_buffer("loc", torch.zeros(input_dim))
        else:
            self.head = context_head(context_dim, torch.cat([loc_t, raw]) if learn_loc else raw)

    def __getattr__(self, name: str) -> Tensor | nn.Module:
        # ``loc`` and ``raw_scale`` of a learned location: views of the joint parameter.
        if name in ("loc", "raw_scale"):
            joint = self.__dict__["_parameters"].get("loc_raw_scale")
            if joint is not None:
                return joint[0 if name == "loc" else 1]
        return super().__getattr__(name)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        # A state saved when the location and raw scale were two parameters.
        loc, raw = prefix + "loc", prefix + "raw_scale"
        if "loc_raw_scale" in self._parameters and loc in state_dict and raw in state_dict:
            state_dict[prefix + "loc_raw_scale"] = torch.stack(
                [state_dict.pop(loc), state_dict.pop(raw)]
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def loc_scale(self, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The current ``(loc, scale)``, of shape ``(D,)`` or ``(..., D)`` with a context."""
        self._check_context(context)
        if self.context_dim is None:
            joint = self._parameters.get("loc_raw_scale")
            if joint is not None:
                loc, raw = joint.unbind(0)
                return loc, F.softplus(raw)
            return self.loc, F.softplus(self.raw_scale)
        out = self.head(context)
        if self.learn_loc:
            loc, raw = out.split(self.input_dim, dim=-1)
        else:
            loc, raw = torch.zeros_like(out), out
        return loc, F.softplus(raw)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        loc, scale = self.loc_scale(context)
        y = loc + scale * x
        ladj = scale.log().sum(-1).expand(y.shape[:-1])
        return y, ladj

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        loc, scale = self.loc_scale(context)
        x = (y - loc) / scale
        ladj = -scale.log().sum(-1).expand(x.shape[:-1])
        return x, ladj


class TriangularAffine(Flow):
    r"""Fixed :math:`y = \mu + L x` with a lower-triangular :math:`L` of positive diagonal.

    Nothing here is learned (:math:`\mu` and :math:`L` are buffers): it is a preconditioner.
    A guide built with ``init_scale="full"`` ends with one, :math:`L` the Cholesky factor of the
    inverse curvature at the initial location, so every learned layer before it works in
    coordinates where the posterior is roughly isotropic and Adam's per-coordinate steps suit
    it, however correlated or badly scaled the posterior.

    .. math::

        \log|\det J| = \sum_i \log L_{ii}

    Arguments:
        loc: :math:`\mu`, shape ``(D,)``.
        scale_tril: :math:`L`, shape ``(D, D)``, lower-triangular with a positive diagonal.
    """

    has_inverse = True

    def __init__(self, loc: Tensor, scale_tril: Tensor) -> None:
        loc = torch.as_tensor(loc)
        dim = loc.shape[-1]
        super().__init__(dim)
        if loc.shape != (dim,) or scale_tril.shape != (dim, dim):
            raise ValueError(
                f"TriangularAffine: loc must be (D,) and scale_tril (D, D), got "
                f"{tuple(loc.shape)} and {tuple(scale_tril.shape)}"
            )
        diag = scale_tril.diagonal()
        if not bool(torch.all(diag > 0)) or not bool(torch.equal(scale_tril, scale_tril.tril())):
            raise ValueError(
                "TriangularAffine: scale_tril must be lower-triangular with a positive diagonal"
            )
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale_tril", scale_tril.detach().clone())

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_context(context)
        y = self.loc + x @ self.scale_tril.T
        ladj = self.scale_tril.diagonal().log().sum().expand(y.shape[:-1])
        return y, ladj

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_context(context)
        centred = (y - self.loc).unsqueeze(-1)
        tril = self.scale_tril.expand(centred.shape[:-2] + self.scale_tril.shape)
        x = torch.linalg.solve_triangular(tril, centred, upper=False).squeeze(-1)
        ladj = -self.scale_tril.diagonal().log().sum().expand(x.shape[:-1])
        return x, ladj
