"""Small helpers shared by the global and the amortized guides."""

from __future__ import annotations

__all__ = ["is_discrete", "plate_batch_shape"]

import pyro.distributions as dist
import torch
from pyro.poutine.runtime import get_plates


def plate_batch_shape() -> torch.Size:
    """Batch shape of the vectorized plates around the current call (particles, predictive)."""
    frames = [f for f in get_plates() if f.vectorized and f.dim is not None]
    if not frames:
        return torch.Size()
    shape = [1] * -min(f.dim for f in frames)
    for frame in frames:
        shape[frame.dim] = frame.size
    return torch.Size(shape)


def is_discrete(fn: dist.Distribution) -> bool:
    """Whether a site's distribution has a discrete support."""
    try:
        return bool(fn.support.is_discrete)
    except NotImplementedError:  # dependent constraints without the flag
        return False
