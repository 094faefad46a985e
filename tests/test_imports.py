"""No import cycles inside ``src/gvpo`` (issue 10).

The graph is built from the source with :mod:`ast`, nothing is imported. Every module is a node, a
package's ``__init__.py`` included (as ``gvpo.x``). Every ``import`` and ``from ... import`` statement
adds an edge, wherever it sits: at the top, inside a function, under ``if TYPE_CHECKING:``. An import
deferred into a function still makes the two modules depend on each other, so it is still a cycle in
the design. How an import is resolved:

* ``import gvpo.x.y`` and ``from gvpo.x.y import name`` depend on ``gvpo.x.y``. Parent packages do
  not count: Python runs ``gvpo/x/__init__`` first, but counting that would make every module that
  a package's ``__init__`` imports look cyclic.
* ``from gvpo.x import y`` depends on ``gvpo.x.y`` when that is a module, else on ``gvpo.x``.
* Relative imports are resolved against the importing module's package (``from . import a`` in
  ``gvpo/p/m.py`` means ``gvpo.p.a`` if that is a module, else ``gvpo.p``).
* Imports of anything outside the package are ignored.

The cycle finder lists every elementary cycle (each once, starting at its smallest module). Its
self-tests run on a graph written below and on a small package written to ``tmp_path``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_CYCLES = 500
"""Stop listing after this many cycles (a guard against a pathological graph; none is near it)."""


# --------------------------------------------------------------------------------------------------
# Building the graph


def module_files(src: Path, package: str) -> dict[str, Path]:
    """``{"gvpo.x.y": path}`` for every ``.py`` file under ``src/package``; ``__init__.py`` -> ``gvpo.x``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _known(name: str, modules) -> str | None:
    """``name`` if it is a module, else its longest prefix that is one (``None`` if none is)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules) -> dict[str, int]:
    """``{imported module: line of its first import}`` for the package-internal imports of one file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_known(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import goes above the top package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                if node.module:
                    base = f"{base}.{node.module}"
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else _known(base, modules), node.lineno)
    return found


def import_graph(src: Path = SRC, package: str = "gvpo") -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """The module graph (``{module: modules it imports}``) and, per edge, where it is (``file:line``)."""
    modules = module_files(src, package)
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for module, path in modules.items():
        deps = imports_of(module, path, modules)
        graph[module] = set(deps)
        for dep, line in deps.items():
            where[(module, dep)] = f"{path.relative_to(src)}:{line}"
    return graph, where


# --------------------------------------------------------------------------------------------------
# Finding cycles


def find_cycles(graph: dict[str, set[str]], limit: int = MAX_CYCLES) -> list[list[str]]:
    """Every elementary cycle of ``graph``, each once: as a list of nodes starting at its smallest one.

    A cycle is found from its smallest node ``s`` by a depth-first search that only walks nodes
    greater than ``s``, so no cycle is reported twice. Self-loops count (``[a]``).
    """
    nodes = sorted(set(graph) | {d for deps in graph.values() for d in deps})
    cycles: list[list[str]] = []
    for start in nodes:
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path, on_path = [start], {start}
        while stack and len(cycles) < limit:
            node, children = stack[-1]
            for child in children:
                if child == start:
                    cycles.append(list(path))
                elif child > start and child not in on_path:
                    stack.append((child, iter(sorted(graph.get(child, ())))))
                    path.append(child)
                    on_path.add(child)
                    break
            else:
                stack.pop()
                on_path.discard(path.pop())
    return cycles


def describe(cycle: list[str], where: dict[tuple[str, str], str]) -> str:
    steps = [f"{a} -> {b} ({where.get((a, b), '?')})" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
    return " -> ".join(cycle + cycle[:1]) + "\n      " + "\n      ".join(steps)


# --------------------------------------------------------------------------------------------------
# The test


def test_no_import_cycles_in_gvpo():
    graph, where = import_graph()
    assert len(graph) > 20 and "gvpo" in graph and "gvpo.rewards.math" in graph  # the walk saw the package
    cycles = find_cycles(graph)
    listing = "\n".join(f"  {i + 1}. {describe(c, where)}" for i, c in enumerate(cycles))
    assert not cycles, f"{len(cycles)} import cycle(s) in src/gvpo:\n{listing}"


# --------------------------------------------------------------------------------------------------
# Self-tests of the finder and the resolver


def test_find_cycles_on_a_graph_written_here():
    """a -> b -> c -> a and a -> c -> a share a's edge; e <-> f hangs off it; g loops on itself;
    the diamond p -> {q, r} -> s and the edge c -> d -> (nothing) make no cycle."""
    graph = {
        "a": {"b", "c"},
        "b": {"c"},
        "c": {"a", "d"},
        "e": {"f", "a"},
        "f": {"e"},
        "g": {"g"},
        "p": {"q", "r"},
        "q": {"s"},
        "r": {"s"},
    }
    assert sorted(find_cycles(graph)) == [["a", "b", "c"], ["a", "c"], ["e", "f"], ["g"]]
    assert find_cycles({"p": {"q", "r"}, "q": {"s"}, "r": {"s"}, "s": set()}) == []
    assert find_cycles({}) == []
    # the complete graph on 4 nodes has 6 two-cycles, 8 three-cycles and 6 four-cycles, each found once
    k4 = {n: {m for m in "wxyz" if m != n} for n in "wxyz"}
    found = find_cycles(k4)
    assert len(found) == 20 and len({frozenset(zip(c, c[1:] + c[:1])) for c in found}) == 20
    assert len(find_cycles(k4, limit=5)) == 5


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_resolver_on_a_small_package(tmp_path):
    """Relative and absolute forms, an import inside a function, ``from pkg import submodule`` vs a
    name, and a package ``__init__`` as a node; outside imports are ignored.

    By hand, the edges below give four cycles: a <-> b (b's import is inside a function), a <-> deep,
    c <-> sub, and pkg -> sub -> c -> deep -> a -> pkg (``from pkg import VERSION`` is an edge to the
    package ``__init__``, which imports ``sub``)."""
    _write(tmp_path, {
        "pkg/__init__.py": "from .sub import thing\nimport os\n",
        "pkg/a.py": "from . import b\nimport pkg.sub.deep as d\nfrom pkg import VERSION\n",
        "pkg/b.py": "def f():\n    from .a import x\n    return x\n",
        "pkg/c.py": "from .sub import deep, thing\nfrom json import dumps\n",
        "pkg/sub/__init__.py": "from ..c import y\nthing = 1\n",
        "pkg/sub/deep.py": "from .. import a\n",
    })
    graph, where = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": {"pkg.sub"},
        "pkg.a": {"pkg.b", "pkg.sub.deep", "pkg"},
        "pkg.b": {"pkg.a"},  # inside a function: still an edge
        "pkg.c": {"pkg.sub.deep", "pkg.sub"},
        "pkg.sub": {"pkg.c"},
        "pkg.sub.deep": {"pkg.a"},
    }
    assert where[("pkg.b", "pkg.a")] == "pkg/b.py:2"
    assert sorted(find_cycles(graph)) == [["pkg", "pkg.sub", "pkg.c", "pkg.sub.deep", "pkg.a"], ["pkg.a", "pkg.b"],
                                          ["pkg.a", "pkg.sub.deep"], ["pkg.c", "pkg.sub"]]
