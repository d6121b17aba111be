"""The package's import graph: no cycles, arrows only down the layers, no library module importing a command.

The graph is read from the source with :mod:`ast`; nothing is imported. Every ``import``/``from ... import``
of a ``distill`` module is an arrow, wherever it stands: at the top, inside a function (a lazy import is
still an arrow), under ``try``; also ``importlib.import_module("distill....")`` with a literal name. Only
imports under ``if TYPE_CHECKING:`` are left out (they never run). ``from distill.x import name`` is an
arrow to ``distill.x.name`` when that is a module, else to ``distill.x``; relative imports are resolved;
a package's ``__init__.py`` is the package's module.

Package ``__init__`` re-exports: an ``__init__`` that imports its own submodules (its "re-export arrows")
forms no cycle with those submodules, so a submodule may import its parent package (an arrow to the
package). A cycle counts when it remains without the re-export arrows, or when it goes through a
re-export arrow of a package and out of that package (an outside module that imports the package while
the package, through what it re-exports, imports that module).

To place a new module, edit :data:`LAYERS` (the one table of this file).
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "distill"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

#: Layers, top to bottom: an import may go to its own layer or a lower one, never to a higher one.
#: A module belongs to the entry that is its longest dotted prefix (the entry itself or anything under
#: it); the entry "distill" itself matches only distill/__init__.py, not the whole package.
LAYERS: Sequence[tuple[str, Sequence[str]]] = [
    ("commands", ["distill.tools"]),
    ("entry points", ["distill.cli", "distill.run"]),
    ("methods", ["distill.methods"]),
    ("callbacks and optimisation", ["distill.callbacks", "distill.optim"]),
    ("components", ["distill.losses", "distill.teachers", "distill.teacher_cache", "distill.augment",
                    "distill.reliability"]),
    ("models and data", ["distill.models", "distill.data"]),
    # "distill": the package's own __init__ (its version string); nothing may make it import upward.
    ("foundations", ["distill.errors", "distill.lightning_private", "distill"]),
]
#: The modules that may import distill.tools (rule c): the tools themselves (the console script
#: distill.tools.main dispatches to them); everything else is the library.
MAY_IMPORT_TOOLS = ("distill.tools",)
TOOLS = "distill.tools"


# ------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    file: str  # path of the importing file, relative to the package's parent directory
    line: int
    text: str  # the import statement as written (first line)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}  {self.text}"


def find_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file under ``package_dir`` (``__init__`` = package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nearest_module(name: str, modules: Mapping[str, Path]) -> str:
    """``name`` if it is a module, else its longest prefix that is one (``name`` itself if none is)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return name


def _import_nodes(tree: ast.AST) -> Iterable[ast.stmt | ast.Call]:
    """Every import statement and ``import_module("...")`` call, except under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def collect_imports(package_dir: Path, package: str = PACKAGE) -> tuple[dict[str, Path], list[Import]]:
    """The package's modules and every arrow between them (imports of other packages are left out)."""
    modules = find_modules(package_dir)
    imports: list[Import] = []
    for source, path in modules.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        file = path.relative_to(package_dir.parent).as_posix()
        is_package = path.name == "__init__.py"
        targets: list[tuple[ast.stmt | ast.Call, str]] = []
        for node in _import_nodes(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.Import):
                targets += [(node, _nearest_module(alias.name, modules)) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    here = source.split(".") if is_package else source.split(".")[:-1]
                    anchor = here[: len(here) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append((node, full if full in modules else _nearest_module(base, modules)))
            else:  # importlib.import_module("distill.x")
                targets.append((node, _nearest_module(node.args[0].value, modules)))
        arrows = {(node.lineno, target) for node, target in targets}  # `from x import a, b`: one arrow
        for line, target in sorted(arrows):
            if (target == package or target.startswith(package + ".")) and target != source:
                imports.append(Import(source, target, file, line, lines[line - 1].strip()))
    return modules, imports


# ------------------------------------------------------------------------------------- the checks
def _inside(module: str, package: str) -> bool:
    return module.startswith(package + ".")


def is_reexport(imp: Import, packages: set[str]) -> bool:
    """A package's ``__init__`` importing one of its own submodules."""
    return imp.source in packages and _inside(imp.target, imp.source)


Graph = Mapping[str, Mapping[str, list[Import]]]  # module -> imported module -> the imports (the arrow)


def _path(graph: Graph, start: str, goal: str, allowed: set[str] | None = None
          ) -> list[str] | None:
    """Shortest path start → ... → goal (a cycle when start == goal), through ``allowed`` nodes only."""
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = set()
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, {})):
            if allowed is not None and nxt not in allowed:
                continue
            if nxt == goal:
                path = [goal, node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1]
            if nxt not in seen:
                seen.add(nxt)
                parent[nxt] = node
                queue.append(nxt)
    return None


def _components(graph: Graph) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def _describe_cycle(cycle: list[str], graph: Graph, why: str = "") -> str:
    arrows = "\n".join(f"    {imp}" for a, b in zip(cycle, cycle[1:]) for imp in graph[a][b])
    return f"import cycle{why}: {' -> '.join(cycle)}\n{arrows}"


def find_cycles(imports: Iterable[Import], packages: set[str]) -> list[str]:
    """One message per import cycle, each naming the cycle as a path and every import (file:line) on it."""
    full: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    plain: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))  # no re-export arrows
    for imp in imports:
        full[imp.source][imp.target].append(imp)
        if not is_reexport(imp, packages):
            plain[imp.source][imp.target].append(imp)
    problems = []
    reported: list[set[str]] = []
    for component in _components(plain):
        start = min(component)
        cycle = _path(plain, start, start, component)
        assert cycle is not None
        problems.append(_describe_cycle(cycle, plain))
        reported.append(set(cycle))
    # A re-export arrow P -> P.x in a cycle that leaves P: P.x ... -> outside module -> ... -> P.
    for package in sorted(packages):
        for member in sorted(t for t in full.get(package, {}) if _inside(t, package)):
            for outside in sorted(full):
                if outside == package or _inside(outside, package):
                    continue
                there, back = _path(full, member, outside), _path(full, outside, package)
                if there is None or back is None:
                    continue
                cycle = [package] + there + back[1:]
                if not any(set(cycle) <= seen for seen in reported):
                    why = f" through the package {package} (its __init__ imports {member})"
                    problems.append(_describe_cycle(cycle, full, why))
                    reported.append(set(cycle))
    return problems


def layer_of(module: str, layers: Sequence[tuple[str, Sequence[str]]] = LAYERS, root: str = PACKAGE) -> int | None:
    """Index (0 = top) of the layer whose longest matching entry covers ``module``; None if none does."""
    best: tuple[int, int] | None = None  # (length of the entry, layer)
    for number, (_, entries) in enumerate(layers):
        for entry in entries:
            if module == entry or (entry != root and _inside(module, entry)):
                if best is None or len(entry) > best[0]:
                    best = (len(entry), number)
    return None if best is None else best[1]


def unplaced_modules(modules: Iterable[str], layers: Sequence[tuple[str, Sequence[str]]] = LAYERS,
                     root: str = PACKAGE, files: Mapping[str, Path] | None = None) -> list[str]:
    return [
        f"{files[m] if files else m}: module {m} matches no entry of LAYERS in tests/test_layers.py; "
        "add it (or a dotted prefix of it) to the layer it belongs to"
        for m in sorted(modules) if layer_of(m, layers, root) is None
    ]


def upward_imports(imports: Iterable[Import], layers: Sequence[tuple[str, Sequence[str]]] = LAYERS,
                   root: str = PACKAGE) -> list[str]:
    """One message per import that goes to a higher layer (or to a module no layer covers)."""
    problems = []
    for imp in imports:
        source, target = layer_of(imp.source, layers, root), layer_of(imp.target, layers, root)
        if source is None:
            continue  # reported by unplaced_modules
        if target is None:
            problems.append(f"{imp}: {imp.target} matches no entry of LAYERS in tests/test_layers.py")
        elif target < source:
            problems.append(
                f"{imp}: upward import: {imp.source} (layer {layers[source][0]!r}) imports {imp.target} "
                f"(layer {layers[target][0]!r}, higher); move the shared code down, or the importer up"
            )
    return problems


def library_imports_of_tools(imports: Iterable[Import], tools: str = TOOLS,
                             allowed: Sequence[str] = MAY_IMPORT_TOOLS) -> list[str]:
    return [
        f"{imp}: library module {imp.source} imports the command module {imp.target}; only "
        f"{', '.join(allowed)} may import {tools}"
        for imp in imports
        if (imp.target == tools or _inside(imp.target, tools))
        and not any(imp.source == a or _inside(imp.source, a) for a in allowed)
    ]


# ------------------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Import]]:
    modules, imports = collect_imports(PACKAGE_DIR)
    # The scan found the package (a wrong path would pass every check vacuously).
    assert {"distill", "distill.models", "distill.models.registry", "distill.tools.report"} <= set(modules)
    assert any(i.source == "distill.teachers" and i.target == "distill.models" for i in imports)
    return modules, imports


def _packages(modules: Mapping[str, Path]) -> set[str]:
    return {m for m, path in modules.items() if path.name == "__init__.py"}


def _failure(title: str, problems: list[str]) -> str:
    return f"{title} ({len(problems)}):\n" + "\n".join(problems)


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    files = {m: p.relative_to(PACKAGE_DIR.parent) for m, p in modules.items()}
    problems = unplaced_modules(modules, files=files)
    assert not problems, _failure("modules without a layer", problems)


def test_no_import_cycles(graph):
    modules, imports = graph
    problems = find_cycles(imports, _packages(modules))
    assert not problems, _failure("import cycles", problems)


def test_imports_point_down_the_layers(graph):
    _, imports = graph
    problems = upward_imports(imports)
    assert not problems, _failure("imports against the layers (top to bottom: "
                                  + " > ".join(name for name, _ in LAYERS) + ")", problems)


def test_library_does_not_import_the_commands(graph):
    _, imports = graph
    problems = library_imports_of_tools(imports)
    assert not problems, _failure("library modules importing distill.tools", problems)


# ------------------------------------------------------------------------------------- the checker
def _write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / name.split("/")[0]


def test_collector_sees_every_kind_of_import(tmp_path):
    package_dir = _write(tmp_path, {
        "distill/__init__.py": "",
        "distill/errors.py": "",
        "distill/models/__init__.py": "from distill.models.registry import create\nfrom . import external\n",
        "distill/models/registry.py": (
            "from typing import TYPE_CHECKING\nimport torch\n"
            "if TYPE_CHECKING:\n    from distill.models import external\nelse:\n    import distill.errors\n"
            "def f():\n    from distill.models.external import names\n"
        ),
        "distill/models/external.py": ("from .registry import create\nfrom .. import errors\n"
                                       "from . import helpers_name\n"),
        "distill/cli.py": ("import importlib\nfrom distill.models import create, list_all\n"
                           "def g():\n    return importlib.import_module('distill.models.registry')\n"),
    })
    modules, imports = collect_imports(package_dir)
    assert set(modules) == {"distill", "distill.errors", "distill.models", "distill.models.registry",
                            "distill.models.external", "distill.cli"}
    arrows = {(i.source, i.target, i.line) for i in imports}
    assert arrows == {
        ("distill.models", "distill.models.registry", 1),
        ("distill.models", "distill.models.external", 2),
        # TYPE_CHECKING import left out, its else branch kept, the lazy import counted:
        ("distill.models.registry", "distill.errors", 6),
        ("distill.models.registry", "distill.models.external", 8),
        ("distill.models.external", "distill.models.registry", 1),  # relative
        ("distill.models.external", "distill.errors", 2),  # from .. import <module>
        ("distill.models.external", "distill.models", 3),  # from . import <not a module>: the package
        ("distill.cli", "distill.models", 2),  # two names, one arrow
        ("distill.cli", "distill.models.registry", 4),  # importlib.import_module("...")
    }
    assert len(imports) == len(arrows)
    assert next(i for i in imports if i.line == 8).where == "distill/models/registry.py:8"


def _imports(*arrows: tuple[str, str]) -> list[Import]:
    return [Import(s, t, s.replace(".", "/") + ".py", n, f"import {t}") for n, (s, t) in enumerate(arrows, 1)]


def test_cycle_check_catches_cycles_and_spares_reexports():
    packages = {"p", "p.models"}
    fine = _imports(
        ("p.models", "p.models.registry"),  # __init__ re-exports its submodules ...
        ("p.models", "p.models.external"),
        ("p.models.external", "p.models.registry"),  # ... which import each other one way
        ("p.models.budget", "p.models"),  # a submodule imports its parent package
        ("p.models", "p.models.budget"),
        ("p.teachers", "p.models"),  # an outside module imports the package
        ("p.models.registry", "p.errors"),
    )
    assert find_cycles(fine, packages) == []

    lazy_cycle = fine + _imports(("p.models.registry", "p.models.external"))
    (message,) = find_cycles(lazy_cycle, packages)
    assert "p.models.external -> p.models.registry -> p.models.external" in message
    assert "p/models/external.py:3  import p.models.registry" in message
    assert "p/models/registry.py:1  import p.models.external" in message

    through_package = fine + _imports(("p.models.external", "p.teachers"))  # p.teachers -> p.models -> external
    (message,) = find_cycles(through_package, packages)
    assert "p.models -> p.models.external -> p.teachers -> p.models" in message
    assert "through the package p.models" in message


LAYERS_FOR_TEST = [("top", ["p.tools"]), ("middle", ["p.methods", "p.cli"]), ("bottom", ["p.errors", "p"])]


def test_layer_checks_catch_upward_arrows_unplaced_modules_and_tools_imports():
    assert layer_of("p", LAYERS_FOR_TEST, "p") == 2
    assert layer_of("p.methods.base", LAYERS_FOR_TEST, "p") == 1
    assert layer_of("p.losses", LAYERS_FOR_TEST, "p") is None  # the root entry does not cover its package
    assert unplaced_modules(["p", "p.losses", "p.tools.x"], LAYERS_FOR_TEST, "p") == [
        "p.losses: module p.losses matches no entry of LAYERS in tests/test_layers.py; "
        "add it (or a dotted prefix of it) to the layer it belongs to"
    ]

    down = _imports(("p.tools.x", "p.methods"), ("p.methods", "p.cli"), ("p.cli", "p.errors"), ("p.tools.x", "p"))
    assert upward_imports(down, LAYERS_FOR_TEST, "p") == []
    up = _imports(("p.errors", "p.methods"), ("p.methods.base", "p.tools.report"), ("p.methods", "p.nowhere"))
    problems = upward_imports(up, LAYERS_FOR_TEST, "p")
    assert len(problems) == 3
    assert problems[0].startswith("p/errors.py:1  import p.methods: upward import: p.errors (layer 'bottom') "
                                  "imports p.methods (layer 'middle', higher)")
    assert problems[1].startswith("p/methods/base.py:2")
    assert "p.nowhere matches no entry" in problems[2]

    tools = _imports(("p.methods.base", "p.tools.report"), ("p.cli", "p.tools.report"), ("p.tools.a", "p.tools"))
    (problem,) = library_imports_of_tools(tools, "p.tools", ("p.tools", "p.cli"))
    assert problem.startswith("p/methods/base.py:1  import p.tools.report: library module p.methods.base")
