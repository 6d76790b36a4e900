r""":class:`FlowTransform`: a flow stack seen as a :class:`torch.distributions.Transform`.

Pyro's :class:`~pyro.infer.autoguide.AutoContinuous` guides describe their posterior as
``TransformedDistribution(guide.get_base_dist(), guide.get_transform())``, and Pyro code that
warps a model with a trained guide (:class:`~pyro.infer.reparam.NeuTraReparam` for NeuTra HMC)
reads exactly those two methods. A flow guide returns its stack wrapped in this class.
"""

from __future__ import annotations

__all__ = ["FlowTransform"]

from torch import Tensor
from torch.distributions import Transform, constraints

from ..flows import Flow


class FlowTransform(Transform):
    r"""The map :math:`x \mapsto f(x)` of an unconditional flow stack, with its Jacobian.

    .. math::

        y = f(x), \qquad \log |\det \partial y / \partial x| = \texttt{flow}(x)[1]

    Nothing is cached (``cache_size=0``): :meth:`log_abs_det_jacobian` runs the forward pass
    again from ``x``, and the inverse runs the stack's inverse, so every value is computed from
    the point itself, never looked up by tensor identity.

    Arguments:
        flow: a :class:`~pyro_flowvi.flows.Flow` without context (e.g. a guide's ``flow``).

    Example:
        >>> transform = guide.get_transform()
        >>> y = transform(x)                                  # the guide's map of base draws
        >>> log_det = transform.log_abs_det_jacobian(x, y)
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, flow: Flow) -> None:
        if not isinstance(flow, Flow):
            raise ValueError(
                f"FlowTransform: expected a pyro_flowvi.flows.Flow, got {type(flow).__name__}"
            )
        if flow.context_dim is not None:
            raise ValueError(
                f"FlowTransform: the flow is conditional (context_dim={flow.context_dim}); "
                "only an unconditional flow is a fixed transform"
            )
        super().__init__(cache_size=0)
        self.flow = flow

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowTransform) and other.flow is self.flow

    def __hash__(self) -> int:
        return id(self.flow)

    def _call(self, x: Tensor) -> Tensor:
        return self.flow(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.flow.inverse(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.flow(x)[1]

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        """No cache, whatever is asked: values are never looked up by tensor identity."""
        return self
