"""Support of :func:`pyro_flowvi.fit`: argument checks, deferred Ctrl-C, the progress bar, the
first run that builds the parameters, and the stream of mini-batches."""

from __future__ import annotations

__all__ = [
    "BatchStream",
    "SigintGuard",
    "build_params",
    "check_call",
    "closing",
    "in_notebook",
    "progress_bar",
    "split_batch",
]

import contextlib
import difflib
import inspect
import re
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.util import get_rng_state, set_rng_state

from ._nonfinite import step_context

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
    "batches",
    "distributed",
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
        self._held = False

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
        if not self._installed or self._held:
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

    @contextlib.contextmanager
    def held(self, enabled: bool = True) -> Iterator[None]:
        """Hold back every SIGINT inside; the caller polls :meth:`take_pending`.

        A data-parallel fit uses this: an interrupt becomes a flag that travels with the next
        step's all-reduce, so every process stops after the same step (an exception raised in
        one process while the others wait in a collective would leave them waiting).
        """
        if not (enabled and self._installed):
            yield
            return
        self._held = self._deferring = True
        try:
            yield
        finally:
            self._held = self._deferring = False

    @property
    def installed(self) -> bool:
        """Whether the handler is installed (the main thread, over a Python handler)."""
        return self._installed

    def take_pending(self) -> bool:
        """Whether a SIGINT arrived since the last call (and forget it)."""
        pending, self._pending = self._pending, False
        return pending


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


def build_params(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> list[str]:
    """Run the guide and the model once, as a step would; return their parameter names.

    Lazy guides create their parameters here, with gradients enabled as in a step. The
    random-number state is put back afterwards, so the first step draws what it would draw
    with a guide built beforehand: the trace does not depend on whether it was.
    """
    rng = get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        with poutine.trace(param_only=True) as capture, step_context(guide):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    finally:
        set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return list(capture.trace.nodes)


# mini-batches ---------------------------------------------------------------------------


def split_batch(batch: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments of one step: ``args`` then the batch's (a tuple or list is unpacked, a
    dict gives keyword arguments, anything else is one more positional argument)."""
    if isinstance(batch, (tuple, list)):
        return (*args, *batch), kwargs
    if isinstance(batch, Mapping):
        clash = sorted(set(batch) & set(kwargs))
        if clash:
            raise ValueError(
                f"fit: the batch gives keyword arguments {clash} that fit's **kwargs give too"
            )
        return args, {**kwargs, **batch}
    return (*args, batch), kwargs


class BatchStream:
    """The mini-batches of :func:`~pyro_flowvi.fit`, epoch after epoch.

    At the start of each epoch the random-number state is recorded, ``set_epoch(epoch)`` is
    called on the iterable and on its sampler when they have one (``DistributedSampler``
    shuffles by epoch), and a fresh iterator is made. A position (epoch, batches taken in it,
    random-number state at its start) is what a checkpoint stores; :meth:`seek` goes back to
    one by replaying that epoch's start and skipping the batches already taken, so a loader
    whose order is drawn from torch's global generator (``DataLoader(shuffle=True)``) or set
    by the epoch (``DistributedSampler``) gives the same batches again.

    Raises:
        ValueError: for an iterator (an epoch would exhaust it) or something not iterable,
            and later for an epoch with no batch.
    """

    def __init__(self, batches: Iterable) -> None:
        if isinstance(batches, Iterator) or not isinstance(batches, Iterable):
            raise ValueError(
                "fit: batches must be an iterable that can be iterated again every epoch (a "
                f"DataLoader, a list of batches), got {type(batches).__name__} {batches!r}"
            )
        if isinstance(batches, (str, bytes, Mapping, torch.Tensor)):
            raise ValueError(
                "fit: batches must be an iterable of mini-batches (a DataLoader, a list of "
                f"tuples), got a {type(batches).__name__}; pass a fixed data set as *args"
            )
        self.batches = batches
        self.epoch = 0
        self.index = 0
        self.epoch_rng: dict | None = None
        self._iterator: Iterator | None = None
        self._skip: int | None = None

    def _set_epoch(self) -> None:
        seen = set()
        sampler = getattr(self.batches, "sampler", None)
        batch_sampler = getattr(self.batches, "batch_sampler", None)
        for obj in (self.batches, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
            setter = getattr(obj, "set_epoch", None)
            if obj is not None and callable(setter) and id(obj) not in seen:
                seen.add(id(obj))
                setter(self.epoch)

    def _start_epoch(self) -> None:
        self.epoch_rng = get_rng_state()
        self._set_epoch()
        self._iterator = iter(self.batches)
        self.index = 0

    def _replay(self, skip: int) -> None:
        """Go back to batch ``skip`` of the current epoch, the draws of its start replayed."""
        now = get_rng_state()
        if self.epoch_rng is not None:
            set_rng_state(self.epoch_rng)
        try:
            self._set_epoch()
            iterator = iter(self.batches)
            for taken in range(skip):
                try:
                    next(iterator)
                except StopIteration:
                    raise ValueError(
                        f"fit: cannot resume at batch {skip} of epoch {self.epoch}: batches "
                        f"gives {taken} batches per epoch now; resume with the same batches"
                    ) from None
        finally:
            set_rng_state(now)
        self._iterator, self.index = iterator, skip
        if self.epoch_rng is None:
            self.epoch_rng = now

    def next(self) -> Any:
        """The next mini-batch (a new epoch starts when the last one is exhausted)."""
        if self._iterator is None:
            if self._skip:
                self._replay(self._skip)
            else:
                self._start_epoch()
            self._skip = None
        assert self._iterator is not None
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.index == 0:
                raise ValueError(f"fit: batches gave no batch in epoch {self.epoch}") from None
            self.epoch += 1
            self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(f"fit: batches gave no batch in epoch {self.epoch}") from None
        self.index += 1
        return batch

    def peek(self) -> Any:
        """The first batch of an epoch, for the first run of the guide and the model; the
        random-number state and the position are left as they were."""
        now = get_rng_state()
        try:
            self._set_epoch()
            for batch in self.batches:
                return batch
        finally:
            set_rng_state(now)
        raise ValueError("fit: batches gave no batch")

    def mark(self) -> tuple[int, int, dict | None]:
        """The position now: (epoch, batches taken in it, random-number state at its start)."""
        return self.epoch, self.index, self.epoch_rng

    def seek(self, epoch: int, index: int, epoch_rng: dict | None) -> None:
        """Continue from a position given by :meth:`mark` (at the next :meth:`next`)."""
        self.epoch, self.index, self.epoch_rng = epoch, index, epoch_rng
        self._iterator = None
        self._skip = index
