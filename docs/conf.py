"""Sphinx configuration of the pyro-flowvi documentation site.

Build (strict and offline, as ``scripts/test.sh`` does)::

    python -m sphinx -n -W --keep-going -b html docs docs/_build/html

The docstrings are reStructuredText with Google-style sections (napoleon); the pages in
``docs/*.md`` are Markdown (MyST). Nothing here reaches the network: no intersphinx, so names
from torch, Pyro, NumPy, ArviZ, zuko and the standard library are rendered without links and
listed in ``nitpick_ignore_regex``; every reference to a ``pyro_flowvi`` name must resolve.

The benchmark toctree of ``index.md`` names ``bnn_[bu]*``: ``bnn_benchmark`` always, and the
UCI page ``bnn_uci`` when it exists (a glob that matches nothing would be an error).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.ext.napoleon.docstring import GoogleDocstring
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS)]

from public_api import home, public_names  # noqa: E402

import pyro_flowvi  # noqa: E402

project = "pyro-flowvi"
author = "pyro-flowvi developers"
copyright = "pyro-flowvi developers, MIT licence"  # noqa: A001
release = version = pyro_flowvi.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
html_theme = "furo"
html_title = f"pyro-flowvi {release}"
html_static_path: list[str] = []
templates_path: list[str] = []

nitpicky = True
add_module_names = False
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False
napoleon_custom_sections = [("Subclass contract", "notes_style"), ("Pyro site", "notes_style")]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# Libraries we use but whose documentation is not built here (no intersphinx: the build is
# offline). Never list a pyro_flowvi name here: those must resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|nn|pyro|numpy|np|arviz|az|xarray|zuko|scipy|matplotlib|pandas)(\..*)?"),
    (r"py:.*", r"(lightning|pl)(\..*)?"),
    (r"py:.*", r"(typing|collections\.abc|collections|types|builtins|os|pathlib|argparse)\..*"),
    (r"py:.*", r"(dataclasses|enum|abc|functools|contextlib|logging|warnings|io)\..*"),
    (r"py:.*", r"(Tensor|Module|Distribution|Transform|Parameter|Figure|Axes|ndarray)"),
    (r"py:.*", r"(InferenceData|DataLoader|ProcessGroup|ELBO|Trace_ELBO|PyroOptim|Callable)"),
    (r"py:.*", r"(Any|Iterable|Iterator|Mapping|Sequence|Literal|Self|TypeVar|Generic)"),
    (r"py:.*", r"(int|float|str|bool|bytes|dict|list|tuple|set|object|type|None|slice)"),
    (r"py:.*", r"(Exception|ValueError|TypeError|RuntimeError|Warning|UserWarning|KeyError)"),
    (r"py:.*", r"(PathLike|Path|Generator|NamedTuple|MappingProxyType)"),
    # base classes and members that our classes inherit from torch and Pyro
    (r"py:.*", r"(TorchDistribution|ExpandedDistribution|_DependentProperty|PyroModule)"),
]


def _resolve_public(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.TextElement
) -> nodes.Element | None:
    """Resolve a re-export path (``pyro_flowvi.flows.Flow``) or a name relative to the current
    module (``Flow`` inside ``pyro_flowvi.guides.base``) to the one entry of that object.

    Only names that import to a documented public object resolve; anything else stays a
    missing reference, which the nitpicky build reports.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    candidates = [target]
    module = node.get("py:module")
    if module and not target.startswith("pyro_flowvi"):
        candidates.append(f"{module}.{target}")
        if node.get("py:class"):
            candidates.append(f"{module}.{node['py:class']}.{target}")
    documented = env.get_domain("py").objects
    for candidate in candidates:
        resolved = _documented_path(candidate, documented)
        if resolved is None:
            continue
        domain = env.get_domain("py")
        xref = domain.resolve_xref(
            env, node["refdoc"], app.builder, "obj", resolved, node, contnode
        )
        if xref is not None:
            return xref
    return None


_HOMES: dict[str, str] = {}


def _homes() -> dict[str, str]:
    """Every public path ``module.name`` -> the path of its entry (computed once)."""
    if not _HOMES:
        for module_name, name in public_names():
            _HOMES[f"{module_name}.{name}"] = home(module_name, name)
    return _HOMES


def _import_path(dotted: str) -> tuple[object, object] | None:
    """``(owner, value)`` for a dotted path: the longest importable module prefix, then
    attributes; ``owner`` is the object the last attribute was read from."""
    parts = dotted.split(".")
    for stop in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:stop]))
        except ImportError:
            continue
        owner = value
        try:
            for attr in parts[stop:]:
                owner, value = value, getattr(value, attr)
        except AttributeError:
            return None
        return owner, value
    return None


def _documented_path(dotted: str, documented: dict) -> str | None:
    """The documented path of the public object written as ``dotted``, or None."""
    if not dotted.startswith("pyro_flowvi"):
        return None
    _homes()
    if dotted in _HOMES:
        return _HOMES[dotted]
    found = _import_path(dotted)
    if found is None:
        return None
    owner, value = found
    member = dotted.rpartition(".")[2]
    # a class or function documented under its defining module
    defining = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if isinstance(defining, str) and qualname and f"{defining}.{qualname}" in documented:
        return f"{defining}.{qualname}"
    # a member documented on a base class (an inherited method or attribute)
    if isinstance(owner, type):
        for base in owner.__mro__:
            path = f"{base.__module__}.{base.__qualname__}.{member}"
            if path in documented:
                return path
    # a module-level object (a constant, a type alias) imported into another module
    for path in documented:
        if path.rpartition(".")[2] == member and path.startswith("pyro_flowvi"):
            other = _import_path(path)
            if other is not None and other[1] is value:
                return path
    return None


class _ReexportTargets(SphinxPostTransform):
    """Point a reference written with a re-export path at the object's one entry, before
    Sphinx resolves it.

    Needed where a re-export path is also a module name: ``pyro_flowvi.fit`` is, at run time,
    the function ``pyro_flowvi.fit.fit`` (the package attribute shadows the submodule), but
    Sphinx would match the module page ``pyro_flowvi.fit`` for ``:func:`pyro_flowvi.fit```.
    Only ``:mod:`` references keep naming modules.
    """

    default_priority = 5  # before ReferencesResolver (10)

    def run(self, **kwargs: object) -> None:
        _homes()
        for node in self.document.findall(pending_xref):
            if node.get("refdomain") != "py" or node.get("reftype") == "mod":
                continue
            target = node["reftarget"]
            module = node.get("py:module")
            written = [target]
            if module and not target.startswith("pyro_flowvi"):
                written.append(f"{module}.{target}")
            for path in written:
                if path in _HOMES and _HOMES[path] != path:
                    node["reftarget"] = _HOMES[path]
                    break


def _public_bases(app: Sphinx, name: str, obj: object, options: dict, bases: list) -> None:
    """Show a class's public ancestors in place of a private base such as ``_ReparamELBO``."""
    resolved: list = []
    for base in bases:
        resolved += _public_ancestors(base)
    bases[:] = list(dict.fromkeys(resolved))


def _public_ancestors(base: type) -> list[type]:
    if not getattr(base, "__name__", "").startswith("_"):
        return [base]
    ancestors: list[type] = []
    for parent in base.__bases__:
        ancestors += _public_ancestors(parent)
    return ancestors


class ExampleDocstring(SphinxDirective):
    """``.. example-docstring:: examples/NAME.py``: the example's module docstring, less its
    first paragraph (the page title), read from the file: the example is neither imported
    nor run."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        path = DOCS.parent / self.arguments[0]
        self.env.note_dependency(str(path))
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if not docstring:
            raise self.error(f"example-docstring: {path} has no module docstring")
        body = docstring.split("\n\n", 1)[1] if "\n\n" in docstring else ""
        lines = GoogleDocstring(body, self.config, what="module").lines()
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source=str(path)), container)
        return list(container.children)


def setup(app: Sphinx) -> None:
    app.add_directive("example-docstring", ExampleDocstring)
    app.connect("missing-reference", _resolve_public)
    app.connect("autodoc-process-bases", _public_bases)
    app.add_post_transform(_ReexportTargets)
