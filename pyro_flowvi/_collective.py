"""The collective operations behind data-parallel :func:`~pyro_flowvi.fit` and
:class:`~pyro_flowvi.distributed.DistributedSVI`.

One :class:`Collective` wraps a ``torch.distributed`` process group and does what a
data-parallel SVI step needs:

- at the start, check that every process built the same parameters (names, shapes, dtypes)
  and broadcast their values, and the module buffers, from the group's rank 0;
- at every step, one ``all_reduce`` of a flat buffer holding the gradients of all the
  parameters, the local loss and a few flags (a non-finite local loss, a parameter created
  in the step, a pending Ctrl-C). Every process gets the same sums, so every process takes
  the same decisions (the NaN guard, the divergence rule, an interrupt) and applies the same
  update;
- at a checkpoint, gather every process's random-number state to rank 0, which writes the
  file; the outcome of the write is broadcast so that a failed write stops every process.

Gradients are averaged, not summed: each process's loss is an unbiased estimate of the whole
negative ELBO (its likelihood term is scaled by ``N / b`` for its local mini-batch of ``b``
points, as ``pyro.plate(size=N, subsample=...)`` does), so their mean is the estimate of the
global mini-batch.
"""

from __future__ import annotations

__all__ = ["Collective", "Reduced"]

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _checkpoint
from ._checkpoint import CheckpointError
from ._nonfinite import NonFiniteLossError


@dataclass
class Reduced:
    """The outcome of :meth:`Collective.reduce_step`.

    Attributes:
        loss: the mean of the processes' losses (NaN if one of them is not finite).
        used: per parameter, whether any process has a gradient for it.
        flags: per flag, the sum over the processes.
    """

    loss: float
    used: list[bool]
    flags: list[float]


class Collective:
    """A process group and the collectives of a data-parallel step.

    Arguments:
        group: a ``torch.distributed.ProcessGroup``, or ``None`` for the default group.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # broadcasts name their source by its global rank
        self.source = 0 if group is None else dist.get_global_rank(group, 0)
        backend = dist.get_backend(group)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )

    @classmethod
    def from_option(cls, distributed: Any, site: str) -> Collective | None:
        """``None`` for ``distributed=False``; the group's :class:`Collective` otherwise.

        Raises:
            ValueError: for a value other than a bool or a process group, or when
                ``torch.distributed`` has no initialized default process group.
        """
        if distributed is False:
            return None
        try:
            import torch.distributed as dist

            available = dist.is_available()
        except ImportError:  # a torch built without distributed support
            available = False
        if distributed is not True and not (
            available and isinstance(distributed, dist.ProcessGroup)
        ):
            raise ValueError(
                f"{site}: distributed must be True, False or a torch.distributed.ProcessGroup, "
                f"got {distributed!r}"
            )
        if not available:
            raise ValueError(f"{site}: distributed=True, but this torch has no torch.distributed")
        if not dist.is_initialized():
            raise ValueError(
                f"{site}: distributed=True needs an initialized default process group: call "
                "torch.distributed.init_process_group() first (torchrun sets the environment "
                "it reads), or pass distributed=False"
            )
        return cls(None if distributed is True else distributed)

    # -- set-up ------------------------------------------------------------------------------

    def check_same(self, signature: list[Any], what: str) -> None:
        """Raise ``RuntimeError`` on every process if ``signature`` differs between them."""
        gathered: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(gathered, signature, group=self.group)
        for rank, other in enumerate(gathered):
            if other != gathered[0]:
                ours, theirs = set(map(repr, gathered[0])), set(map(repr, other))
                raise RuntimeError(
                    f"{what} differ between processes: rank 0 has {sorted(ours - theirs)} "
                    f"that rank {rank} lacks, rank {rank} has {sorted(theirs - ours)} that "
                    "rank 0 lacks; every process must build the same model and guide"
                )

    def start_together(
        self,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, Mapping[str, torch.Tensor]],
        site: str,
    ) -> None:
        """Check that every process built the same parameters and module buffers (names,
        shapes, dtypes), then give every process rank 0's values.

        Arguments:
            params: name -> the tensor the optimizer steps.
            buffers: owner (e.g. ``"guide_buffers"``) -> name -> buffer.
            site: who asks, for the error message.
        """
        signature = [(name, tuple(t.shape), str(t.dtype)) for name, t in params.items()]
        tensors = list(params.values())
        for owner, own in buffers.items():
            signature += [(f"{owner}:{n}", tuple(t.shape), str(t.dtype)) for n, t in own.items()]
            tensors += list(own.values())
        self.check_same(signature, f"{site}: the parameters and buffers (name, shape, dtype)")
        self.broadcast_tensors(tensors)

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values (one broadcast per dtype)."""
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        with torch.no_grad():
            for (device, dtype), members in groups.items():
                flat = torch.cat([t.detach().reshape(-1) for t in members])
                # gloo has no bool collectives: masks travel as bytes
                on = flat.to(self.device, torch.uint8 if dtype == torch.bool else dtype)
                self.dist.broadcast(on, src=self.source, group=self.group)
                flat = on.to(device, dtype)
                offset = 0
                for t in members:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    # -- every step --------------------------------------------------------------------------

    def reduce_step(
        self, params: Sequence[torch.Tensor], loss: float, flags: Sequence[float]
    ) -> Reduced:
        """Average the gradients of ``params`` and ``loss`` over the processes; sum ``flags``.

        ``params`` must be the same list, in the same order, on every process. A parameter
        without a gradient here counts as a zero gradient; it gets the average gradient when
        another process has one, and keeps ``grad=None`` when none has.
        """
        world = self.world_size
        scalars = [float(loss), *map(float, flags), *(float(p.grad is not None) for p in params)]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        # the scalars ride with the float64 gradients when there are some, else on their own
        carrier = (self.device, torch.float64)
        buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        with torch.no_grad():
            for key, members in groups.items():
                parts = [
                    params[i].grad.reshape(-1)
                    if params[i].grad is not None
                    else params[i].new_zeros(params[i].numel())
                    for i in members
                ]
                if key == carrier:
                    parts.append(torch.tensor(scalars, dtype=torch.float64, device=self.device))
                flat = torch.cat(parts)
                on = flat.to(self.device) if key[0] != self.device else flat
                self.dist.all_reduce(on, group=self.group)
                buffers[key] = on
            if carrier not in buffers:
                on = torch.tensor(scalars, dtype=torch.float64, device=self.device)
                self.dist.all_reduce(on, group=self.group)
                summed = on
            else:
                summed = buffers[carrier][-len(scalars) :]
            summed_scalars = summed.tolist()
            count = len(flags)
            used = [s > 0 for s in summed_scalars[1 + count :]]
            for key, members in groups.items():
                device = key[0]
                flat = buffers[key]
                flat = flat.to(device) if device != self.device else flat
                offset = 0
                for i in members:
                    p = params[i]
                    if used[i]:
                        mean = flat[offset : offset + p.numel()].view_as(p) / world
                        if p.grad is None:
                            p.grad = mean.clone()
                        else:
                            p.grad.copy_(mean)
                    else:
                        p.grad = None
                    offset += p.numel()
        total = summed_scalars[0]
        return Reduced(
            loss=total / world if math.isfinite(total) else total,
            used=used,
            flags=summed_scalars[1 : 1 + count],
        )

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, group=self.group)
        return float(t.item()) / self.world_size

    # -- checkpoints -------------------------------------------------------------------------

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        gathered: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=self.source, group=self.group)
        return box[0]

    def read_checkpoint(self, path: Path | None) -> dict | None:
        """The checkpoint to resume from (``None`` if there is none), read by rank 0 and sent
        to every process, so that the other processes need not see the file; an unreadable
        file raises the same :class:`CheckpointError` in every process."""
        if path is None:
            return None
        outcome: tuple[str, Any] = ("none", None)
        if self.rank == 0:
            try:
                outcome = ("ok", _checkpoint.read_checkpoint(path) if path.exists() else None)
            except CheckpointError as error:
                outcome = ("error", error.problem)
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise CheckpointError(path, value)
        return value

    def write_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        """Rank 0 writes ``state``; every process learns whether it could, and fails alike."""
        failure: Exception | None = None
        if self.rank == 0:
            try:
                _checkpoint.write_checkpoint(path, state)
            except Exception as error:
                failure = error
        message = self.broadcast(
            None if failure is None else f"{type(failure).__name__}: {failure}"
        )
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"fit: rank 0 could not write checkpoint {str(path)!r}: {message}")

    def annotate(
        self, error: NonFiniteLossError, non_finite: float, local_loss: float
    ) -> NonFiniteLossError:
        """The NaN guard's error in a data-parallel step: which processes saw a non-finite
        loss, and which process this is."""
        note = (
            f" [data-parallel fit: the local loss was not finite in {int(non_finite)} of "
            f"{self.world_size} processes; this is rank {self.rank}, whose local loss was "
            f"{local_loss}; the site named is the one this process found]"
        )
        return NonFiniteLossError(
            str(error) + note, step=error.step, site=error.site, kind=error.kind, loss=error.loss
        )
