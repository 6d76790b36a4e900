"""The public names of ``pyro_flowvi`` and the one place each is documented.

Shared by ``docs/conf.py`` (to resolve a reference written with a re-export path, such as
``pyro_flowvi.flows.Flow``, to the entry at the defining module,
``pyro_flowvi.flows.base.Flow``) and by ``tests/test_docs_api.py`` (which checks that every
public name has an entry in ``docs/api/*.rst``).

A public module is one whose dotted name has no part starting with ``_`` (as in
``tests/test_imports.py``); its public names are its ``__all__``. Each object is documented
once, at its *home*: the module that defines it when that module is public and exports it,
otherwise the deepest public module whose ``__all__`` names it (constants, and functions
defined in a private module).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

__all__ = ["entry_kind", "home", "public_modules", "public_names"]

PACKAGE = "pyro_flowvi"


def public_modules() -> list[str]:
    """Every module of the package whose name has no private part, sorted."""
    package = importlib.import_module(PACKAGE)
    names = [PACKAGE]
    for info in pkgutil.walk_packages(package.__path__, prefix=PACKAGE + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def public_names() -> list[tuple[str, str]]:
    """Every ``(module, name)`` pair with ``name`` in the public ``module.__all__``."""
    pairs = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        pairs += [(module_name, name) for name in module.__all__]
    return pairs


def _defining_module(value: object) -> str | None:
    if inspect.isclass(value) or inspect.isfunction(value):
        return value.__module__
    return None


def home(module_name: str, name: str) -> str:
    """The documented dotted path of ``module_name.name`` (module + name at its home)."""
    value = getattr(importlib.import_module(module_name), name)
    defining = _defining_module(value)
    if defining is not None and defining.startswith(PACKAGE + "."):
        module = importlib.import_module(defining)
        private = any(part.startswith("_") for part in defining.split("."))
        if not private and name in getattr(module, "__all__", ()):
            return f"{defining}.{name}"
    exporters = [
        candidate
        for candidate in public_modules()
        if name in importlib.import_module(candidate).__all__
        and getattr(importlib.import_module(candidate), name) is value
    ]
    deepest = max(exporters, key=lambda candidate: (candidate.count("."), candidate))
    return f"{deepest}.{name}"


def entry_kind(module: ModuleType, name: str) -> str:
    """The autodoc directive that documents ``module.name``: class, exception, function, data."""
    value = getattr(module, name)
    if inspect.isclass(value):
        return "exception" if issubclass(value, BaseException) else "class"
    if inspect.isfunction(value):
        return "function"
    return "data"
