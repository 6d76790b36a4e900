"""Every test runs in float64, seeded, with a clean parameter store."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pyro
import pytest
import torch

# Tiny tensors run faster on one thread, and some CPU kernels (F.logsigmoid's backward) cost
# milliseconds per call with more; fixed here so no test depends on what ran before it.
torch.set_num_threads(1)


def pytest_runtest_setup(item):
    if "cuda" in item.keywords and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def _float64_seeded_clean():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def _pyro_handler_stack_left_empty(request):
    # Pyro's effect-handler stack is one global list: a handler left on it (a trace, a plate)
    # records or changes every later test's sample sites. Fail the test that leaves one, name
    # what it left, and empty the stack so that no later test runs on top of it.
    from pyro_flowvi.bnn._pyro_internals import _handler_stack

    stack = _handler_stack()
    if stack is None:  # the internal changed; tests/test_bnn_internals.py says so
        yield
        return
    before = [type(h).__name__ for h in stack]
    stack.clear()
    if before:
        pytest.fail(f"Pyro's handler stack held {before} before {request.node.nodeid}")
    yield
    after = [type(h).__name__ for h in stack]
    stack.clear()
    if after:
        pytest.fail(f"{request.node.nodeid} left {after} on Pyro's handler stack")


@pytest.fixture(autouse=True, scope="session")
def _sigint_raises():
    # A suite started in the background of a non-interactive shell (`cmd &`) inherits SIGINT
    # ignored, and fit rightly leaves an ignored SIGINT ignored; the Ctrl-C tests need Python's
    # own handler whatever the suite was started from. Session scope: set before any module
    # fixture spawns worker processes (which inherit an ignored SIGINT, not a handler).
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _import_script(path: Path, module_name: str, *, register: bool = False) -> ModuleType:
    """Run the script at ``path`` as module ``module_name`` (with ``register``, entered in
    ``sys.modules`` before its code runs)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the examples are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    return _import_script(path, f"example_{name}")


@contextlib.contextmanager
def benchmark_script(name: str, module_name: str | None = None) -> Iterator[ModuleType]:
    """Import ``benchmarks/<name>.py`` (a script, not a package) as ``module_name`` (default
    ``name``), registered in ``sys.modules`` while in use: dataclasses and worker processes
    look their module up there."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    try:
        yield _import_script(path, module_name or name, register=True)
    finally:
        sys.modules.pop(module_name or name, None)
