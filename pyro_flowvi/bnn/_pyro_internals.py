"""The one place where ``pyro_flowvi.bnn`` reads a private name of Pyro.

Everything else in the package uses public API: Pyro messengers and ``poutine``, autoguide
hooks, and ``torch.func.functional_call``. What remains is one read-only look at Pyro's
effect-handler stack (``pyro.poutine.runtime._PYRO_STACK``), which
:class:`~pyro_flowvi.bnn.LocalReparameterizationMessenger` needs for one safety check: is the
``pyro.factor`` it sees being recorded into a *guide* trace that holds a
:class:`~pyro_flowvi.bnn.GaussianWeight` draw? Pyro has no public way to ask which trace a
message goes to.

If a Pyro release renames or removes the stack, the library keeps importing and fitting, the
check is skipped (:func:`innermost_trace` returns ``None``), and
``tests/test_bnn_internals.py`` fails with a message that names the missing internal.
"""

from __future__ import annotations

__all__ = ["check_internals", "innermost_trace"]

import importlib

from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.trace_struct import Trace

_STACK_MODULE, _STACK_NAME = "pyro.poutine.runtime", "_PYRO_STACK"


def _handler_stack() -> list | None:
    stack = getattr(importlib.import_module(_STACK_MODULE), _STACK_NAME, None)
    return stack if isinstance(stack, list) else None


def check_internals() -> None:
    """Raise ``RuntimeError`` naming the internal if this Pyro lacks what the adapter reads."""
    if _handler_stack() is None:
        raise RuntimeError(
            f"pyro_flowvi.bnn: {_STACK_MODULE}.{_STACK_NAME} (Pyro's effect-handler stack, a "
            "list) is missing in this Pyro release; the guard against guide factors without "
            "has_rsample under local_reparameterization() is off until "
            "pyro_flowvi/bnn/_pyro_internals.py is adapted"
        )


def innermost_trace() -> Trace | None:
    """The trace being recorded by the innermost active ``poutine.trace``, else ``None``."""
    stack = _handler_stack()
    if stack is None:
        return None
    for frame in reversed(stack):
        if isinstance(frame, TraceMessenger):
            return frame.trace
    return None
