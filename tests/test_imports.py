"""The public API: every module's __all__ is complete, and importing is free of side effects."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest


def _public_modules() -> list[str]:
    """Every module of the package whose name has no private part."""
    package = importlib.import_module("pyro_flowvi")
    names = ["pyro_flowvi"]
    for info in pkgutil.walk_packages(package.__path__, prefix="pyro_flowvi."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


MODULES = _public_modules()


def test_the_module_list_is_found():
    for name in ("pyro_flowvi.flows", "pyro_flowvi.guides.initialization", "pyro_flowvi.fit"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_all_is_complete_and_importable(name):
    module = importlib.import_module(name)
    exported = set(module.__all__)
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr}"
    public = {
        key
        for key, value in vars(module).items()
        if not key.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", "").startswith(name)
    }
    assert public <= exported, (
        f"{name} defines public names missing from __all__: {public - exported}"
    )


def test_import_has_no_heavy_or_global_side_effects():
    code = (
        "import sys, torch, pyro; "
        "before = torch.distributions.Distribution._validate_args; "
        "loaded = set(sys.modules); "
        "import pyro_flowvi, pyro_flowvi.diagnostics, pyro_flowvi.bnn, pyro_flowvi.amortized; "
        "assert torch.distributions.Distribution._validate_args == before; "
        "heavy = {'arviz', 'matplotlib', 'pandas', 'sklearn', 'tqdm'}; "
        "heavy &= set(sys.modules) - loaded; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
