r"""The divergence guard of :func:`pyro_flowvi.fit`: an ELBO that falls far below its best.

The rule (justified in ``docs/fit.md``): with :math:`W` = ``window`` steps,

.. math::

    m_t = \operatorname{median}(e_{t-W+1}, \dots, e_t), \qquad
    \sigma_t = \frac{1.4826}{\sqrt 2}\,
        \operatorname{median}\bigl|\Delta e - \operatorname{median}(\Delta e)\bigr|

over the window's first differences :math:`\Delta e`. The best window is the first with the
largest :math:`m`; with :math:`b` its median and :math:`\sigma_b` its noise scale, step
:math:`t` has diverged when

.. math::

    m_t < b - \left(k \cdot 1.2533\,\sigma_b / \sqrt{W} + c\right)

with :math:`k` = ``noise_multiple`` (in standard errors of a median of :math:`W` normal
draws, :math:`1.2533\,\sigma/\sqrt W`) and :math:`c` = ``floor`` (nats).
"""

from __future__ import annotations

__all__ = ["DivergenceGuard", "DivergenceRule", "DivergenceWarning"]

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_ACTIONS = ("stop", "warn", "ignore")
# 1.4826 * MAD estimates a normal standard deviation; differences double the variance
_MAD_TO_SD = 1.4826 / math.sqrt(2.0)
# the median of n normal draws has standard deviation sqrt(pi / 2) sigma / sqrt(n)
_MEDIAN_SE = math.sqrt(math.pi / 2.0)


class DivergenceWarning(UserWarning):
    """:func:`~pyro_flowvi.fit` saw the ELBO fall far below its best (:class:`DivergenceRule`)."""


@dataclass(frozen=True)
class DivergenceRule:
    r"""When :func:`~pyro_flowvi.fit` calls a fit diverged, and what it does then.

    A step :math:`t` has diverged when the median ELBO of the last :math:`W` = ``window``
    steps falls below the best such median so far by more than ``noise_multiple`` standard
    errors of a median plus ``floor`` nats:

    .. math::

        m_t < b - \left(k \cdot 1.2533\,\sigma_b / \sqrt{W} + c\right).

    :math:`\sigma_b` is the noise scale of the best window, a robust standard deviation of one
    ELBO estimate: the median absolute deviation of the window's first differences, scaled to
    a normal standard deviation (differences cancel a slow trend). The rule and its defaults
    are justified in ``docs/fit.md``.

    Arguments:
        action: ``"stop"`` (default): stop, put back the parameters, module buffers and
            optimizer state of the best window's last step, and warn; ``"warn"``: warn once
            and keep going; ``"ignore"``: do not check.
        window: steps per median (no check before the first full window).
        noise_multiple: :math:`k`, in standard errors of the best window's median
            (20 standard errors are about 3.5 noise scales for :math:`W = 50`).
        floor: :math:`c`, in nats; it keeps a near-deterministic ELBO (noise scale ~0) from
            being called diverged by a small wobble.

    Raises:
        ValueError: for an unknown action or a non-positive window, or a negative or
            non-finite ``noise_multiple`` or ``floor``.
    """

    action: str = "stop"
    window: int = 50
    noise_multiple: float = 20.0
    floor: float = 10.0

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(
                f"fit: divergence must be one of {_ACTIONS} or a DivergenceRule, got "
                f"{self.action!r}"
            )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 3:
            raise ValueError(f"DivergenceRule: window must be an int >= 3, got {self.window!r}")
        for name in ("noise_multiple", "floor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"DivergenceRule: {name} must be a number >= 0, got {value!r}")


def median(values: Sequence[float]) -> float:
    """The median of a short list (a sort in Python: faster than NumPy for 50 numbers)."""
    ordered = sorted(values)
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2.0


def noise_scale(window: Sequence[float]) -> float:
    """Robust per-step standard deviation of an ELBO window (MAD of its differences)."""
    diffs = [b - a for a, b in zip(window[:-1], window[1:], strict=True)]
    center = median(diffs)
    return _MAD_TO_SD * median([abs(d - center) for d in diffs])


class DivergenceGuard:
    """The state of :class:`DivergenceRule` during one fit.

    :meth:`observe` is called with the trace up to and including step ``t``'s ELBO, *before*
    step ``t``'s update, so the parameters at that moment are the ones that ELBO was
    estimated at. The snapshot of the best window holds those parameters.
    """

    def __init__(self, rule: DivergenceRule) -> None:
        self.rule = rule
        self.best: float | None = None
        self.best_step: int | None = None
        self.noise: float | None = None
        self.window_start = 0
        self.diverged_at: int | None = None
        self.snapshot_step: int | None = None
        self.snapshot: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.rule.action != "ignore"

    @property
    def standard_error(self) -> float:
        """Standard error of the best window's median (normal approximation)."""
        assert self.noise is not None
        return _MEDIAN_SE * self.noise / math.sqrt(self.rule.window)

    @property
    def threshold(self) -> float:
        return self.rule.noise_multiple * self.standard_error + self.rule.floor

    def observe(self, trace: list[float]) -> str | None:
        """Update with the trace ending at the current step: ``"improved"``, ``"diverged"``.

        ``"diverged"`` is returned once, for the first step that diverged.
        """
        n, width = len(trace), self.rule.window
        if not self.active or n - self.window_start < width:
            return None
        window = trace[n - width :]
        current = median(window)
        if self.best is None or current > self.best:
            self.best, self.best_step, self.noise = current, n - 1, noise_scale(window)
            return "improved"
        if self.diverged_at is None and current < self.best - self.threshold:
            self.diverged_at = n - 1
            return "diverged"
        return None

    def restart(self, step: int) -> None:
        """Forget the best so far: windows start at ``step`` (after putting the best back)."""
        self.best = self.best_step = self.noise = None
        self.window_start = step
        self.snapshot_step = self.snapshot = None

    def state(self, stopped: bool) -> dict[str, Any]:
        """What a checkpoint keeps (the best median is recomputed from the trace)."""
        return {
            "window_start": self.window_start,
            "diverged_at": self.diverged_at,
            "stopped": stopped,
            "snapshot_step": self.snapshot_step,
            "snapshot": self.snapshot if self.snapshot is not None else {},
        }

    def resume(self, trace: list[float], saved: Mapping[str, Any]) -> None:
        """Rebuild the state of an uninterrupted fit from its trace and the checkpoint.

        After a fit stopped at a divergence, the resumed fit starts afresh: its windows start
        at the resumed step and no divergence is on record.
        """
        if saved.get("stopped"):
            self.restart(len(trace))
            return
        self.window_start = int(saved.get("window_start", 0))
        diverged_at = saved.get("diverged_at")
        self.diverged_at = None if diverged_at is None else int(diverged_at)
        if not self.active or len(trace) - self.window_start < self.rule.window:
            return
        # the same scan as observe(), without the divergence checks (those were made)
        for end in range(self.window_start + self.rule.window, len(trace) + 1):
            window = trace[end - self.rule.window : end]
            current = median(window)
            if self.best is None or current > self.best:
                self.best, self.best_step, self.noise = current, end - 1, noise_scale(window)
        if saved.get("snapshot_step") == self.best_step and saved.get("snapshot"):
            self.snapshot_step = self.best_step
            self.snapshot = dict(saved["snapshot"])

    def take_snapshot(self, snapshot: dict[str, Any]) -> None:
        self.snapshot_step = self.best_step
        self.snapshot = snapshot


def clone_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in tensors.items()}
