"""The dependency direction of ../shared/DESIGN.md, checked on the source with `ast` (nothing is imported).

    router, encoder, gcache -> models, common        prefill, decode -> worker -> engine -> models -> common

What counts as an import of module A by module B: every `import` / `from ... import` statement in B's
file, wherever it stands -- at module level, inside a function (a lazy import is still a dependency),
and under `if TYPE_CHECKING:` (a type-only import still makes the reader hold both modules at once).
`from pkg import name` is an import of `pkg.name` when that is a module of services/, else of `pkg`.
Importing a module does not count as importing its parent packages' `__init__`.

The rules (each violation is printed as `importer -> imported (file:line)`):
  * services.router (and encoder, gcache) imports none of services.engine / worker / prefill / decode;
  * services.common imports none of services.engine / models / worker / router;
  * services.models imports no services.engine (nor worker);
  * services.engine.kv (bookkeeping) imports no torch, at any level;
  * no import cycle among the modules of services/ (a cycle is printed module by module).
Generated code (services/proto_gen) is left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services"
GENERATED = ("services.proto_gen",)


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.where})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(root: Path = SERVICES) -> dict[str, Path]:
    modules = {module_name(p): p for p in sorted(root.rglob("*.py"))}
    return {m: p for m, p in modules.items() if not m.startswith(GENERATED)}


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[Edge]:
    """Every module `name` imports (see the module docstring for what counts)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Edge(name, alias.name, f"{rel}:{node.lineno}")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(name, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Edge(name, sub if sub in known else base, f"{rel}:{node.lineno}")


def all_edges(modules: dict[str, Path]) -> list[Edge]:
    known = set(modules)
    return [edge for name, path in modules.items() for edge in imports_of(name, path, known)]


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# (importers, forbidden imports, why)
RULES: list[tuple[str, tuple[str, ...], str]] = [
    *[
        (
            service,
            ("services.engine", "services.worker", "services.prefill", "services.decode"),
            "router, encoder and gcache depend on models and common only, never on the engine",
        )
        for service in ("services.router", "services.encoder", "services.gcache")
    ],
    (
        "services.common",
        ("services.engine", "services.models", "services.worker", "services.router"),
        "common is shared by everyone and depends on no service",
    ),
    ("services.models", ("services.engine", "services.worker"), "models sits below the engine"),
    ("services.engine", ("services.worker",), "the engine does not know how it is hosted"),
    ("services.worker", ("services.prefill", "services.decode"), "prefill and decode use worker, not back"),
    ("services.engine.kv", ("torch",), "bookkeeping imports no torch (bench/ reuses it)"),
]


def direction_violations(edges: list[Edge]) -> list[str]:
    bad: dict[str, None] = {}  # ordered, one line per edge (`from m import a, b` is one edge)
    for importer, forbidden, why in RULES:
        for edge in edges:
            if _under(edge.importer, importer) and any(_under(edge.imported, f) for f in forbidden):
                bad[f"{edge}: {why}"] = None
    return list(bad)


def import_cycles(edges: list[Edge], modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for edge in edges:
        if edge.imported in modules:
            graph[edge.importer].add(edge.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def describe_cycle(component: list[str], edges: list[Edge]) -> str:
    inside = set(component)
    lines = dict.fromkeys(str(e) for e in edges if e.importer in inside and e.imported in inside)
    return "import cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(lines)


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Edge]]:
    modules = source_modules()
    return modules, all_edges(modules)


def test_the_scan_sees_the_tree(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    modules, edges = graph
    # guards against a scan that finds nothing and so passes trivially
    for package in ("services.router", "services.engine.kv", "services.models", "services.worker"):
        assert any(_under(m, package) for m in modules), package
    assert any(
        e.importer == "services.engine.kv.radix_cache" and e.imported == "services.engine.kv.page_pool"
        for e in edges
    )


def test_imports_follow_the_dependency_direction(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    _, edges = graph
    bad = direction_violations(edges)
    assert not bad, "imports against the dependency direction (../shared/DESIGN.md):\n" + "\n".join(bad)


def test_no_import_cycles(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    modules, edges = graph
    cycles = import_cycles(edges, set(modules))
    assert not cycles, "\n".join(describe_cycle(c, edges) for c in cycles)


@pytest.mark.parametrize(
    "importer, source, expected",
    [
        (
            "services.router.x",
            "from services.engine.engine import Engine\n",
            "services.router.x -> services.engine.engine",
        ),
        (
            "services.common.x",
            "if TYPE_CHECKING:\n    from services.models import y\n",
            "services.common.x -> services.models",
        ),
        (
            "services.models.x",
            "def f():\n    import services.engine.sampling\n",
            "services.models.x -> services.engine.sampling",
        ),
        ("services.engine.kv.x", "import torch.nn\n", "services.engine.kv.x -> torch.nn"),
        ("services.router.x", "from services.models import config\n", None),
        ("services.engine.x", "from services.models.config import ModelConfig\n", None),
    ],
)
def test_a_bad_import_is_caught(tmp_path: Path, importer: str, source: str, expected: str | None) -> None:
    """The rules on a planted module: the check is not vacuous, and allowed imports pass."""
    path = tmp_path / "x.py"
    path.write_text(source)
    bad = direction_violations(list(imports_of(importer, path, known=set())))
    if expected is None:
        assert bad == []
    else:
        assert len(bad) == 1 and bad[0].startswith(expected), bad


def test_a_planted_cycle_is_caught() -> None:
    edges = [
        Edge("a", "b", "a.py:1"),
        Edge("b", "c", "b.py:3"),
        Edge("c", "a", "c.py:2"),
        Edge("c", "d", "c.py:4"),
    ]
    cycles = import_cycles(edges, {"a", "b", "c", "d"})
    assert cycles == [["a", "b", "c"]]
    assert "c -> a (c.py:2)" in describe_cycle(cycles[0], edges)
