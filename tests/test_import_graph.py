"""The import graph of our packages, read from their source with ``ast``: no cycles, the SDK never
imports the server, the gateway or the exporter, and the SDK's users in this repository (the
examples, the gateway) come in through its public door only.

Why our own walk rather than importing: a cycle that happens to work today (because a name is
looked up late) breaks as soon as someone moves an import, and an import inside a function is
still a dependency. So every ``import`` statement counts wherever it sits in a module (functions
included), except under ``if TYPE_CHECKING:``, which never runs. Relative imports are resolved
against the importing module's package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = (REPO / "sdk", REPO / "exporter", REPO / "server_stub")
OURS = ("splitllm", "splitllm_export", "splitllm_server", "splitllm_gateway")


def module_files(roots: Iterable[Path]) -> dict[str, Path]:
    """Every module under each root's top-level packages, by dotted name (``pkg/__init__.py`` is ``pkg``)."""
    found: dict[str, Path] = {}
    for root in roots:
        for init in sorted(root.glob("*/__init__.py")):
            for path in sorted(init.parent.rglob("*.py")):
                parts = list(path.relative_to(root).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement below ``node``, skipping the body (not the ``else``) of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _import_nodes_of(other)
            continue
        yield from _import_nodes_of(child)


def _import_nodes_of(node: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _import_nodes(node)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (at ``path``) imports.

    ``import a.b.c`` and ``from a.b import c`` name ``a.b.c`` if it is a module, else the
    nearest enclosing known module (``from a.b import some_function`` names ``a.b``).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                if node.level > 1:
                    anchor = anchor[: -(node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # A name that is not a submodule is an attribute of ``base``: the edge goes to ``base``.
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                          for alias in node.names]
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def import_graph(roots: Iterable[Path]) -> dict[str, set[str]]:
    files = module_files(roots)
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_walk_sees_imports_everywhere_but_type_checking_and_resolves_relative_ones(tmp_path):
    """The walker on a made-up package, so the cycle test below can be trusted to fail."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import thing\n",
        "a.py": "def f():\n    from .sub import b\n    return b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from ..a import f\nimport pkg.sub.c as c\n",
        "sub/c.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from pkg import d\nelse:\n    import json\n"
        ),
        "d.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.sub import c\nfrom . import e\n",
        "e.py": "from .d import x\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph([tmp_path])
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},  # inside a function, relative
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.a", "pkg.sub.c"},  # two levels up; `import x.y as z`
        "pkg.sub.c": set(),  # only TYPE_CHECKING imports of ours
        "pkg.d": {"pkg.e"},  # `from . import e` is the module e
        "pkg.e": {"pkg.d"},
    }
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"], ["pkg.d", "pkg.e"]]


def test_the_walk_finds_our_packages_and_their_imports():
    graph = import_graph(ROOTS)
    assert {"splitllm", "splitllm.client", "splitllm_export.export", "splitllm_server.app"} <= set(graph)
    assert "splitllm.errors" in graph["splitllm.client"]
    assert "splitllm.model.bundle" in graph["splitllm_export.export"]  # across packages


def test_dependencies_point_from_the_exporter_and_the_server_to_the_sdk_only():
    """splitllm_export -> splitllm and splitllm_server -> splitllm (docs/architecture.md): the SDK
    imports neither, and the server never imports the exporter (torch) nor the exporter the server."""
    graph = import_graph(ROOTS)
    wrong = sorted(f"{src} -> {dst}" for src, targets in graph.items() for dst in targets
                   if src.split(".")[0] != dst.split(".")[0] and dst.split(".")[0] != "splitllm")
    assert wrong == []


def test_no_import_cycles_among_sdk_exporter_and_server():
    found = cycles(import_graph(ROOTS))
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def imported(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every import of ``path`` (functions included, not TYPE_CHECKING):
    ``import a.b`` is ``("a.b", None)``, ``from a import b, c`` is ``("a", "b"), ("a", "c")``, and
    a relative import keeps its dots (``from .x import y`` is ``(".x", "y")``)."""
    found: list[tuple[str, str | None]] = []
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        else:
            module = "." * node.level + (node.module or "")
            found += [(module, alias.name) for alias in node.names]
    return found


def door_breaches(paths: Iterable[Path], public_modules: tuple[str, ...], own: str | None = None) -> list[str]:
    """Imports of our packages that do not go through ``splitllm``'s public names.

    Allowed: ``import splitllm``, ``from splitllm import NAME`` with NAME in ``splitllm.__all__``,
    the modules ``public_modules`` and below, and the importer's ``own`` package (relative imports
    included). Anything else of ours (a private ``splitllm.<module>``, the server, the exporter)
    is a breach, named as ``file: import statement``.
    """
    import splitllm

    public_names = set(splitllm.__all__)
    breaches = []
    for path in paths:
        for module, name in imported(path):
            full = module if name is None else f"{module}.{name}"
            if module.startswith(".") or module.partition(".")[0] not in OURS:
                continue
            if own is not None and (module == own or module.startswith(f"{own}.")):
                continue
            if module == "splitllm" and (name is None or name in public_names):
                continue
            if any(target == door or target.startswith(f"{door}.") for target in (module, full)
                   for door in public_modules):
                continue
            breaches.append(f"{path.name}: " + (f"import {module}" if name is None else f"from {module} import {name}"))
    return breaches


EXAMPLE_DOORS = ("splitllm.testing",)
GATEWAY_DOORS = ("splitllm.errors",)


def test_the_door_check_finds_private_imports_wherever_they_are(tmp_path):
    """The checker on a made-up file, so the two tests below can be trusted to fail."""
    script = tmp_path / "app.py"
    script.write_text(
        "import json\n"
        "import splitllm\n"
        "import splitllm.testing.netem\n"
        "from splitllm import SplitClient, errors, testing\n"
        "from splitllm import codec\n"  # a submodule, not a public name
        "from splitllm.client import SplitClient as C\n"
        "from splitllm.errors import ConfigError\n"
        "from splitllm_server.metrics import Counter\n"
        "from .util import helper\n"
        "def later():\n    import splitllm.stream\n"
    )
    assert door_breaches([script], EXAMPLE_DOORS) == [
        "app.py: from splitllm import codec",
        "app.py: from splitllm.client import SplitClient",
        "app.py: from splitllm.errors import ConfigError",
        "app.py: from splitllm_server.metrics import Counter",
        "app.py: import splitllm.stream",
    ]
    assert door_breaches([script], GATEWAY_DOORS) == [
        "app.py: import splitllm.testing.netem",
        "app.py: from splitllm import testing",
        "app.py: from splitllm import codec",
        "app.py: from splitllm.client import SplitClient",
        "app.py: from splitllm_server.metrics import Counter",
        "app.py: import splitllm.stream",
    ]


def test_examples_import_only_the_public_sdk_and_its_test_tools():
    """What a user copies from examples/ must keep working across releases: ``splitllm``'s public
    names and ``splitllm.testing`` (the emulated link and device, a server subprocess) only."""
    examples = sorted((REPO / "examples").glob("*.py"))
    assert len(examples) >= 2
    assert door_breaches(examples, EXAMPLE_DOORS) == []


def test_the_gateway_is_an_sdk_app_on_public_names_only():
    """splitllm_gateway imports ``splitllm``'s public names and ``splitllm.errors``, never the
    server, the exporter or an SDK internal (plus aiohttp and prometheus_client)."""
    modules = sorted((REPO / "server_stub" / "splitllm_gateway").rglob("*.py"))
    assert len(modules) >= 5
    assert door_breaches(modules, GATEWAY_DOORS, own="splitllm_gateway") == []
    graph = import_graph(ROOTS)
    assert {dst.partition(".")[0] for src, targets in graph.items() if src.startswith("splitllm_gateway")
            for dst in targets} == {"splitllm", "splitllm_gateway"}
