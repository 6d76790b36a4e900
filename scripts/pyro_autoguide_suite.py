"""Prepare and tally Pyro's own autoguide tests with the pyro-flowvi guides added.

Used by ``scripts/pyro_autoguide_suite.sh`` (not part of CI). ``prepare`` copies Pyro's
``tests/infer/test_autoguide.py``, ``tests/infer/test_predictive.py`` and
``tests/infer/autoguide/test_inference.py`` (with the conftest files and helpers they import)
from a Pyro checkout into a scratch folder and adds our guides:

- every test parametrized over guide classes (``auto_class``, ``Guide``,
  ``continuous_class``) gets the eight flow guides appended to its list, as
  ``pytest.param(..., id="flowvi-<name>")``;
- in ``test_predictive.py``, which has no such parameter, every test that builds an
  ``AutoDiagonalNormal`` is parametrized over ``[AutoDiagonalNormal, *flow guides]``.

Nothing else changes: Pyro's assertions, its conftest (float64, seeded, validation on, clean
param store) and its ``setup.cfg`` (warnings are errors) stay as they are. ``tally`` reads the
JUnit XML of a run and prints passed / failed / expected failures per file, for our guides
and for Pyro's own. Pyro's test code is Apache-2.0 and is never copied into this repository.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

# The Pyro files the three test modules need (conftest files, helpers they import).
PYRO_FILES = (
    "setup.cfg",
    "tests/__init__.py",
    "tests/common.py",
    "tests/conftest.py",
    "tests/infer/__init__.py",
    "tests/infer/conftest.py",
    "tests/infer/test_autoguide.py",
    "tests/infer/test_predictive.py",
    "tests/infer/autoguide/__init__.py",
    "tests/infer/autoguide/conftest.py",
    "tests/infer/autoguide/test_inference.py",
    "tests/integration_tests/__init__.py",
    "tests/integration_tests/test_conjugate_gaussian_models.py",
)
TEST_FILES = (
    "tests/infer/test_autoguide.py",
    "tests/infer/test_predictive.py",
    "tests/infer/autoguide/test_inference.py",
)
CLASS_PARAMETERS = ("auto_class", "Guide", "continuous_class")

# The guides under test, written into the scratch copy as tests/infer/flowvi_guides.py.
FLOWVI_GUIDES = '''"""pyro-flowvi's guides, added to Pyro's class-parametrized autoguide tests."""

import functools

import pytest

from pyro_flowvi import (
    AutoFlowGuide,
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoSylvesterGuide,
)
from pyro_flowvi.flows import IAF, Planar, Radial, Reverse


class AutoSylvesterGuideHouseholder(AutoSylvesterGuide):
    def __init__(self, model, **kwargs):
        super().__init__(model, variant="householder", **kwargs)


class AutoSylvesterGuideTriangular(AutoSylvesterGuide):
    def __init__(self, model, **kwargs):
        super().__init__(model, variant="triangular", **kwargs)


class AutoFlowGuideStack(AutoFlowGuide):
    """A small mixed stack: one IAF layer, a reversal, one planar and one radial layer."""

    def __init__(self, model, **kwargs):
        stack = [functools.partial(IAF, hidden_dims=[16]), Reverse, Planar, Radial]
        super().__init__(model, stack, **kwargs)


FLOW_GUIDE_CLASSES = (
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoHouseholderGuide,
    AutoSylvesterGuide,
    AutoSylvesterGuideHouseholder,
    AutoSylvesterGuideTriangular,
    AutoIAFGuide,
    AutoFlowGuideStack,
)
FLOW_GUIDES = [pytest.param(cls, id="flowvi-" + cls.__name__) for cls in FLOW_GUIDE_CLASSES]
'''

_IMPORT = "from tests.infer.flowvi_guides import FLOW_GUIDES\n"


def _matching_bracket(text: str, start: int) -> int:
    """Index of the ``]`` that closes the ``[`` at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced bracket at offset {start}")


def add_to_class_parametrizations(text: str) -> tuple[str, int]:
    """Append ``*FLOW_GUIDES`` to every parametrize list over guide classes."""
    pattern = re.compile(
        r'@pytest\.mark\.parametrize\(\s*"(' + "|".join(CLASS_PARAMETERS) + r')",\s*\['
    )
    count = 0
    position = 0
    while match := pattern.search(text, position):
        close = _matching_bracket(text, match.end() - 1)
        body = text[match.end() : close].rstrip()
        separator = "" if body.endswith(",") or not body else ","
        insertion = f"{separator} *FLOW_GUIDES"
        text = text[: match.end() + len(body)] + insertion + text[match.end() + len(body) :]
        position = close + len(insertion)
        count += 1
    return text, count


def _top_level_units(text: str) -> list[str]:
    """Split a module into top-level statements, each decorator stack kept with its def."""
    units: list[str] = []
    current: list[str] = []
    in_decorators = False
    for line in text.splitlines(keepends=True):
        if line.startswith(("@", "def ", "class ")) and not in_decorators:
            units.append("".join(current))
            current = []
        if line.startswith("@"):
            in_decorators = True
        elif line.startswith(("def ", "class ")):
            in_decorators = False
        current.append(line)
    units.append("".join(current))
    return units


def parametrize_diagonal_normal_tests(text: str) -> tuple[str, int]:
    """In each test function that builds ``AutoDiagonalNormal(``, build ``auto_class(``
    instead, with ``auto_class`` parametrized over AutoDiagonalNormal and our guides."""
    decorator = (
        '@pytest.mark.parametrize(\n    "auto_class",\n    '
        '[pytest.param(AutoDiagonalNormal, id="AutoDiagonalNormal"), *FLOW_GUIDES],\n)\n'
    )
    count = 0
    units = []
    for unit in _top_level_units(text):
        head = re.search(r"(?m)^def (test_\w+)\(([^)]*)\)", unit)
        if head and "AutoDiagonalNormal(" in unit:
            unit = unit.replace("AutoDiagonalNormal(", "auto_class(")
            params = f"auto_class, {head.group(2)}" if head.group(2) else "auto_class"
            unit = unit.replace(head.group(0), f"def {head.group(1)}({params})", 1)
            unit = decorator + unit
            count += 1
        units.append(unit)
    return "".join(units), count


def _add_import(text: str) -> str:
    anchor = re.search(r"(?m)^from tests\.common import", text)
    if anchor is None:
        raise ValueError("no 'from tests.common import' line to put the import after")
    return text[: anchor.start()] + _IMPORT + text[anchor.start() :]


def prepare(pyro_src: Path, out: Path) -> None:
    """Copy Pyro's files from ``pyro_src`` into ``out`` and add our guides to the tests."""
    if out.exists():
        shutil.rmtree(out)
    for name in PYRO_FILES:
        source = pyro_src / name
        if not source.is_file():
            raise FileNotFoundError(f"prepare: {source} is missing from the Pyro checkout")
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (out / "tests/infer/flowvi_guides.py").write_text(FLOWVI_GUIDES)
    for name in TEST_FILES:
        path = out / name
        text, count = add_to_class_parametrizations(path.read_text())
        if name.endswith("test_predictive.py"):
            text, extra = parametrize_diagonal_normal_tests(text)
            count += extra
        if count == 0:
            raise ValueError(f"prepare: no guide parametrization found in {name}")
        path.write_text(_add_import(text))
        print(f"{name}: flow guides added to {count} parametrizations")


def tally(junit: Path) -> None:
    """Print passed / failed / xfailed / skipped per file, for our guides and Pyro's own."""
    counts: dict[tuple[str, str], Counter] = {}
    failures: list[str] = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "")
        name = case.get("name", "")
        who = "flowvi" if "flowvi-" in name else "pyro"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
            if who == "flowvi":
                node = case.find("failure")
                node = node if node is not None else case.find("error")
                message = (node.get("message") or "").splitlines()
                failures.append(f"{module}::{name}: {message[0][:160] if message else ''}")
        elif (skipped := case.find("skipped")) is not None:
            kind = skipped.get("type", "")
            outcome = (
                "xfailed"
                if "xfail" in kind or "xfail" in (skipped.get("message") or "")
                else ("skipped")
            )
        else:
            outcome = "passed"
        counts.setdefault((module, who), Counter())[outcome] += 1
    print(f"{'file':45s} {'guides':7s} passed failed xfailed skipped")
    for (module, who), c in sorted(counts.items()):
        print(
            f"{module:45s} {who:7s} {c['passed']:6d} {c['failed']:6d} {c['xfailed']:7d} "
            f"{c['skipped']:7d}"
        )
    if failures:
        print("\nfailures of the flow guides:")
        print("\n".join(failures))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="copy Pyro's tests and add the flow guides")
    prep.add_argument("--pyro-src", type=Path, required=True, help="a Pyro source checkout")
    prep.add_argument("--out", type=Path, required=True, help="scratch folder (replaced)")
    count = sub.add_parser("tally", help="summarize a run's JUnit XML")
    count.add_argument("junit", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.pyro_src, args.out)
    else:
        tally(args.junit)


if __name__ == "__main__":
    main(sys.argv[1:])
