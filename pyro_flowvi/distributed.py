r"""Data-parallel SVI on ``torch.distributed``: many processes, one fit.

Each of :math:`P` processes holds the same model and guide and takes its own shard of every
mini-batch: process :math:`r` gets :math:`b_r` of the :math:`B = \sum_r b_r` points. Its loss is
the usual mini-batch estimate of the negative ELBO, the likelihood scaled to the :math:`N`
points of the full data set (as ``pyro.plate("data", size=N, subsample=...)`` does),

.. math::

    \hat L_r = \frac{N}{b_r} \sum_{i \in \text{shard}_r}
        \mathbb E_q\bigl[-\log p(y_i \mid \theta)\bigr] + \mathrm{KL}(q \,\|\, p),

and the gradients are averaged over the processes, :math:`\nabla \hat L = \frac1P \sum_r
\nabla \hat L_r`. With equal shards (:math:`b_r = B / P`, as ``DistributedSampler`` makes
them) this is exactly the gradient of the global mini-batch of :math:`B` points: the
likelihood terms add up to :math:`\frac{N}{B} \sum_{i=1}^{B}` and the global KL term is
counted once. Averaging, not summing, is what keeps the scale right.

Two entry points share the same collective step (one all-reduce of a flat buffer with every
gradient, the loss and a few flags):

- :func:`pyro_flowvi.fit` with ``distributed=True`` and ``batches=`` a ``DataLoader`` with a
  ``DistributedSampler``: the whole loop, with its NaN guard, divergence rule, checkpoints and
  Ctrl-C handling made collective;
- :class:`DistributedSVI`, a drop-in for :class:`pyro.infer.SVI` in a hand-written loop.

Launch one process per core or device with ``torchrun``; each calls
``torch.distributed.init_process_group()`` first (see ``docs/distributed.md``).

References:
    PyTorch Distributed: Experiences on Accelerating Data Parallel Training (Li et al., 2020,
    arXiv:2006.15704)
    Stochastic Variational Inference (Hoffman et al., 2013, arXiv:1206.7051)
"""

from __future__ import annotations

__all__ = ["DistributedSVI"]

from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads

from ._collective import Collective
from ._fit_helpers import build_params


class DistributedSVI(SVI):
    r"""Data-parallel :class:`pyro.infer.SVI`: one step per process, gradients averaged.

    Every process of a ``torch.distributed`` group builds the same model and guide and calls
    :meth:`step` with its own shard of the mini-batch. The first step runs the guide and the
    model once (as :func:`pyro_flowvi.fit` does) so that lazy guides create their parameters,
    checks that every process has the same parameters, and copies rank 0's parameter values
    and module buffers to every process. Then each step computes the local loss and
    gradients, averages both across the processes in one all-reduce, and applies the
    optimizer update, the same in every process:

    .. math::

        \theta \leftarrow \mathrm{update}\Bigl(\theta, \frac1P \sum_{r=1}^P \nabla \hat L_r
        \Bigr).

    The model should scale its likelihood by the full data size over the *local* batch size
    (``pyro.plate("data", size=N, subsample=...)`` with the local shard does); the average
    is then the gradient of the global mini-batch.

    It does not enter a guide's ``step_context()``: wrap the step as with ``SVI``
    (``with guide.step_context(): svi.step(x, y)``) or use :func:`pyro_flowvi.fit`, which
    also gives the NaN guard, the divergence rule and collective checkpoints.

    Arguments:
        model: the Pyro model.
        guide: the guide.
        optim: a Pyro optimizer (e.g. ``pyro.optim.Adam``).
        loss: an ELBO (e.g. ``Trace_ELBO()``) or a callable, as for ``SVI``.
        process_group: a ``torch.distributed.ProcessGroup``, or ``None`` for the default one
            (which must be initialized).
        **kwargs: passed to :class:`pyro.infer.SVI`.

    Raises:
        ValueError: when ``torch.distributed`` has no initialized default process group.
        RuntimeError: at the first step, when the processes built different parameters; at
            a later step, when a parameter is first created there.

    Example:
        >>> dist.init_process_group("gloo")                     # doctest: +SKIP
        >>> sampler = DistributedSampler(dataset, shuffle=True, drop_last=True)
        >>> loader = DataLoader(dataset, batch_size=64, sampler=sampler)
        >>> svi = DistributedSVI(model, guide, Adam({"lr": 1e-2}), TraceMeanField_ELBO())
        >>> for epoch in range(10):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader:
        ...         with guide.step_context():
        ...             loss = svi.step(x, y, num_data=len(dataset))  # the mean over processes
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: Any,
        loss: Any,
        *,
        process_group: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, guide, optim, loss, **kwargs)
        collective = Collective.from_option(
            True if process_group is None else process_group, "DistributedSVI"
        )
        assert collective is not None
        self.collective = collective
        self._synced: list[torch.Tensor] | None = None
        self._names: set[str] = set()

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self.collective.rank

    @property
    def world_size(self) -> int:
        """The number of processes in the group."""
        return self.collective.world_size

    def _start(self, args: tuple, kwargs: dict) -> None:
        names = build_params(self.model, self.guide, args, kwargs)
        store = dict(pyro.get_param_store().named_parameters())
        params = {name: store[name] for name in names}
        buffers = {
            role: dict(obj.named_buffers())
            for role, obj in (("model", self.model), ("guide", self.guide))
            if isinstance(obj, torch.nn.Module)
        }
        self.collective.start_together(params, buffers, "DistributedSVI")
        self._synced, self._names = list(params.values()), set(names)

    def step(self, *args: Any, **kwargs: Any) -> float:
        """One data-parallel step on this process's shard.

        Returns:
            The loss averaged over the processes (the same number in every process).
        """
        if self._synced is None:
            self._start(args, kwargs)
        assert self._synced is not None
        with poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        local = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        created = [name for name in capture.trace.nodes if name not in self._names]
        value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        reduced = self.collective.reduce_step(self._synced, value, [len(created)])
        if reduced.flags[0] > 0:
            zero_grads(local | set(self._synced))
            raise RuntimeError(
                f"DistributedSVI: a parameter was first created after the first step (in this "
                f"process: {created}); every process must average the same gradients, so "
                "every parameter must exist after one run of the guide and the model"
            )
        params = [p for p, used in zip(self._synced, reduced.used, strict=True) if used]
        self.optim(params)
        zero_grads(params)
        return reduced.loss

    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """The loss on this process's shard, averaged over the processes; no gradient step."""
        if self._synced is None:
            self._start(args, kwargs)
        local = super().evaluate_loss(*args, **kwargs)
        return self.collective.mean(float(local))
