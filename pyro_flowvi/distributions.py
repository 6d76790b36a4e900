r"""A base distribution pushed through a stack of flow layers.

.. math::

    z = f(x; c), \quad x \sim p_0, \qquad
    \log q(z) = \log p_0(x) - \log |\det \partial f / \partial x|

The sample and its log-density come from the **same** forward pass
(:meth:`FlowDistribution.rsample_and_log_prob`); nothing is cached.
:meth:`FlowDistribution.log_prob` of an arbitrary point runs the stack's inverse, which exists
for every invertible layer.
"""

from __future__ import annotations

__all__ = ["FlowDistribution"]

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints

from .flows.base import Compose, Flow

_EMPTY = torch.Size()


class FlowDistribution(TorchDistribution):
    r"""The push-forward of ``base`` through ``flow`` (optionally conditioned on ``context``).

    Arguments:
        base: a distribution with event shape ``(D,)`` and ``has_rsample``, e.g.
            ``dist.Normal(torch.zeros(D), 1).to_event(1)``.
        flow: a :class:`~pyro_flowvi.flows.Flow` (use :class:`~pyro_flowvi.flows.Compose` for a
            stack) with ``input_dim == D``.
        context: for conditional flows, a tensor ``(..., context_dim)``; its leading dims join
            the batch shape.

    Example:
        >>> from pyro_flowvi.flows import Compose, ElementwiseAffine
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> q = FlowDistribution(base, Compose([ElementwiseAffine(2, loc=1.0)]))
        >>> z, log_q = q.rsample_and_log_prob((100,))
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        base: TorchDistribution,
        flow: Flow,
        context: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if len(base.event_shape) != 1:
            raise ValueError(
                f"FlowDistribution: base must have event shape (D,), got {tuple(base.event_shape)}"
            )
        if not base.has_rsample:
            raise ValueError(f"FlowDistribution: base {type(base).__name__} cannot rsample")
        if flow.input_dim != base.event_shape[0]:
            raise ValueError(
                f"FlowDistribution: flow.input_dim={flow.input_dim} does not match the base's "
                f"event size {base.event_shape[0]}"
            )
        if (context is None) != (flow.context_dim is None):
            raise ValueError(
                "FlowDistribution: a context is needed exactly when the flow is conditional "
                f"(flow.context_dim={flow.context_dim}, context given: {context is not None})"
            )
        batch_shape = base.batch_shape
        if context is not None:
            batch_shape = torch.broadcast_shapes(batch_shape, context.shape[:-1])
        if base.batch_shape != batch_shape:
            base = base.expand(batch_shape)
        self.base = base
        self.flow = flow
        self.context = context
        super().__init__(batch_shape, base.event_shape, validate_args=validate_args)

    def rsample_and_log_prob(
        self, sample_shape: torch.Size = _EMPTY, *, stick_the_landing: bool = False
    ) -> tuple[Tensor, Tensor]:
        r"""Draw reparameterized samples and their log-density in one pass.

        Arguments:
            sample_shape: the shape of independent draws.
            stick_the_landing: give ``log_q`` the "sticking the landing" gradient (Roeder et
                al., 2017): its value is :math:`\log q(z)`, but its gradient with respect to
                the parameters of the flow, the base and the context is the pathwise part
                :math:`\nabla_z \log q(z) \, \partial z / \partial \phi` only, without the
                score term :math:`\partial_\phi \log q_\phi(z)` (zero in expectation, and
                the only gradient left when :math:`q` equals the posterior). Computed as
                ``log_q - s + s.detach()`` with ``s`` the log-density at the detached draw as
                a function of the parameters, through
                :meth:`~pyro_flowvi.flows.Flow.inverse_at` at the preimages the forward pass
                just computed (no equation is solved, so the value is exact however the
                trained map is conditioned; every layer must have an inverse). Without
                gradients it changes nothing and costs nothing.

        Returns:
            ``(z, log_q)`` of shapes ``sample_shape + batch_shape + (D,)`` and
            ``sample_shape + batch_shape``.

        References:
            Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
            Inference (Roeder et al., 2017, arXiv:1703.09194)
        """
        x = self.base.rsample(sample_shape)
        log_q = self.base.log_prob(x)
        if not (stick_the_landing and torch.is_grad_enabled()):
            y, ladj = self.flow(x, self.context)
            return y, log_q - ladj
        flow = self.flow if isinstance(self.flow, Compose) else Compose([self.flow])
        y, ladj, inputs = flow.forward_with_inputs(x, self.context)
        # log q at the fixed draw, as a function of the parameters: the inverse at the known
        # preimages (exact values, derivatives by the implicit function theorem)
        known = [h.detach() for h in inputs]
        base_point, ladj_inverse = flow.inverse_at(y.detach(), known, self.context)
        score = self.base.log_prob(base_point) + ladj_inverse
        return y, (log_q - ladj) - score + score.detach()

    def rsample(self, sample_shape: torch.Size = _EMPTY) -> Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-density of any point, through the inverse of the stack.

        Raises:
            NotImplementedError: when a layer of the stack has no inverse; score the samples
                with :meth:`rsample_and_log_prob` instead.
        """
        if self._validate_args:
            self._validate_sample(value)
        x, ladj = self.flow.inverse(value, self.context)
        return self.base.log_prob(x) + ladj

    def expand(
        self, batch_shape: torch.Size, _instance: FlowDistribution | None = None
    ) -> FlowDistribution:
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(FlowDistribution, _instance)
        new.base = self.base.expand(batch_shape)
        new.flow = self.flow
        new.context = self.context
        if self.context is not None:
            new.context = self.context.expand(batch_shape + self.context.shape[-1:])
        super(FlowDistribution, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new
