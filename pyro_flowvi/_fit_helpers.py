"""Support of :func:`pyro_flowvi.fit`: argument checks, deferred Ctrl-C, the progress bar."""

from __future__ import annotations

__all__ = ["SigintGuard", "check_call", "closing", "in_notebook", "progress_bar"]

import contextlib
import difflib
import inspect
import re
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

# fit's own keywords, for suggestions when an unknown keyword reaches the model
_FIT_KEYWORDS = (
    "num_steps",
    "optim",
    "loss",
    "lr",
    "progress",
    "checkpoint",
    "checkpoint_every",
    "divergence",
)
_LR_LIKE = re.compile(r"learn|rate|step_?size|^eta$|^alpha$", re.IGNORECASE)


def _signature(fn: Callable) -> inspect.Signature | None:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # builtins and some C callables have none
        return None


def _suggestion(word: str) -> str:
    if _LR_LIKE.search(word):
        return "; did you mean fit's lr=...?"
    close = difflib.get_close_matches(word, _FIT_KEYWORDS, n=1, cutoff=0.75)
    return f"; did you mean fit's {close[0]}=...?" if close else ""


def check_call(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> None:
    """Raise ``TypeError`` before fitting if the model or guide cannot take these arguments."""
    for role, fn in (("model", model), ("guide", guide)):
        sig = _signature(fn)
        if sig is None:
            continue
        name = getattr(fn, "__name__", type(fn).__name__)
        params = sig.parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            named = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
            for word in kwargs:
                if word not in named:
                    raise TypeError(
                        f"fit: unknown keyword argument {word}={kwargs[word]!r}: fit passes "
                        f"keyword arguments it does not know to the model and the guide, and "
                        f"the {role} {name}{sig} does not take {word!r}{_suggestion(word)}"
                    )
        try:
            sig.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(
                f"fit: the {role} {name}{sig} cannot be called with the {len(args)} positional "
                f"and keyword arguments {sorted(kwargs)} given to fit: {error}"
            ) from None


class SigintGuard:
    """Defers SIGINT (Ctrl-C) inside :meth:`deferred` sections.

    Installed only in the main thread (the only one that receives signals) and only over a
    handler installed from Python, which it puts back on exit. Outside a section, a SIGINT
    goes to that previous handler (normally raising ``KeyboardInterrupt`` at once).
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self._deferring = False
        self._pending = False

    def __enter__(self) -> SigintGuard:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not None:
                signal.signal(signal.SIGINT, self._handle)
                self._previous, self._installed = previous, True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self._deferring:
            self._pending = True
        else:
            self._forward(signum, frame)

    def _forward(self, signum: int, frame: types.FrameType | None) -> None:
        if self._previous is signal.SIG_IGN:
            return
        if callable(self._previous):
            self._previous(signum, frame)
            return
        raise KeyboardInterrupt  # SIG_DFL: the interpreter's own default is this exception

    @contextlib.contextmanager
    def deferred(self, *, reraise: bool = True) -> Iterator[types.SimpleNamespace]:
        """Hold back SIGINT until the section ends; then deliver it (or just record it)."""
        section = types.SimpleNamespace(interrupted=False)
        if not self._installed:
            yield section
            return
        self._deferring = True
        try:
            yield section
        except BaseException:
            self._deferring = self._pending = False
            raise
        self._deferring = False
        if self._pending:
            self._pending = False
            section.interrupted = True
            if reraise:
                self._forward(signal.SIGINT, None)


def in_notebook() -> bool:
    """Whether this runs in a Jupyter/IPython kernel (where stderr is not a terminal)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # an IPython too old or too new to ask: behave as a plain process
        return False


def progress_bar(enabled: bool, total: int, initial: int) -> Any:
    if not enabled or not (sys.stderr.isatty() or in_notebook()):
        return None
    try:
        # tqdm.auto draws a notebook widget in a Jupyter kernel, text elsewhere
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="fit", unit="step", dynamic_ncols=True)


@contextlib.contextmanager
def closing(bar: Any) -> Iterator[Any]:
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


# the parameters, buffers and optimizer state of this fit ---------------------------------
