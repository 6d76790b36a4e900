"""The API reference (docs/api/*.rst) has an entry for every public name.

Fast: parses the reStructuredText sources, builds nothing. The strict Sphinx build in
scripts/test.sh then checks that every entry renders and every cross-reference resolves.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS))

from public_api import entry_kind, home, public_modules, public_names  # noqa: E402

AUTODOC = re.compile(r"^\.\. auto(class|exception|function|data):: +(\S+)", re.MULTILINE)
SUMMARY = re.compile(r"^\.\. autosummary::\n\n((?: {3}\S+\n)+)", re.MULTILINE)
TOCTREE = re.compile(r"^\.\. toctree::\n(?: {3}:\S+:.*\n)*\n((?: {3}\S+\n)+)", re.MULTILINE)


def _page(module_name: str) -> str:
    path = DOCS / "api" / f"{module_name}.rst"
    assert path.exists(), f"no API page for the public module {module_name}: add {path}"
    return path.read_text()


def _entries(module_name: str) -> dict[str, str]:
    """Documented path -> directive kind, on the page of ``module_name``."""
    return {path: kind for kind, path in AUTODOC.findall(_page(module_name))}


PAIRS = public_names()


def test_every_public_module_has_a_page_reachable_from_the_index():
    reachable, pending = set(), ["index"]
    while pending:
        page = pending.pop()
        reachable.add(page)
        for block in TOCTREE.findall((DOCS / "api" / f"{page}.rst").read_text()):
            pending += [line.strip() for line in block.splitlines()]
    assert set(public_modules()) <= reachable


@pytest.mark.parametrize("module_name, name", PAIRS, ids=[f"{m}.{n}" for m, n in PAIRS])
def test_every_public_name_has_an_entry(module_name, name):
    documented = home(module_name, name)
    entries = _entries(documented.rpartition(".")[0])
    assert documented in entries, (
        f"{module_name}.{name} has no entry: add '.. auto"
        f"{entry_kind(importlib.import_module(module_name), name)}:: {documented}' to "
        f"docs/api/{documented.rpartition('.')[0]}.rst"
    )
    module = importlib.import_module(module_name)
    assert entries[documented] == entry_kind(module, name)
    if documented != f"{module_name}.{name}":
        # a re-export: its module's page lists it, linking to the entry
        listed = {
            line.strip().lstrip("~")
            for block in SUMMARY.findall(_page(module_name))
            for line in block.splitlines()
        }
        relative = documented.removeprefix(module_name + ".")
        assert {documented, relative} & listed, (
            f"docs/api/{module_name}.rst does not list the re-export {name} ({documented})"
        )


def test_no_entry_names_a_missing_object():
    for module_name in public_modules():
        for path in _entries(module_name):
            owner, _, attr = path.rpartition(".")
            assert hasattr(importlib.import_module(owner), attr), path


def test_home_is_the_defining_module_or_the_deepest_exporter():
    assert home("pyro_flowvi", "fit") == "pyro_flowvi.fit.fit"
    assert home("pyro_flowvi.flows", "Flow") == "pyro_flowvi.flows.base.Flow"
    assert home("pyro_flowvi.flows", "FLOWS") == "pyro_flowvi.flows.registry.FLOWS"
    # defined in a private module, exported by a public one
    assert home("pyro_flowvi.diagnostics", "flatten_draws") == (
        "pyro_flowvi.diagnostics.compare.flatten_draws"
    )
