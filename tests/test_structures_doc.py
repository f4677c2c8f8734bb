"""docs/structures.md names every module and package of services/ (so the map cannot silently go stale)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "structures.md"


def documented() -> set[str]:
    """Paths the doc names: `## services/x/` and `### services/x/y/` headings, and `- `name.py`` /
    `- `pkg/`` items under the nearest heading (items indented two more spaces are inside `pkg/`)."""
    names: set[str] = set()
    section = ""
    sub = ""
    for line in DOC.read_text().splitlines():
        if heading := re.match(r"^#{2,3} (services/\S*/)", line):
            section, sub = heading.group(1), ""
            names.add(section)
        elif item := re.match(r"^( *)- `([\w./]+)`", line):
            if not section:
                continue
            indent, name = len(item.group(1)), item.group(2)
            if indent == 0:
                sub = name if name.endswith("/") else ""
                names.add(section + name)
            elif sub:
                names.add(section + sub + name)
    return names


def source_paths() -> set[str]:
    paths = set()
    for path in (ROOT / "services").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("services/proto_gen/") or rel == "services/__init__.py":
            continue
        if path.name == "__init__.py":
            paths.add(rel.removesuffix("__init__.py"))  # the package itself
            body = ast.parse(path.read_text()).body
            if any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body):
                paths.add(rel)  # an __init__ with code (re-exports, a registry) is a module worth a line
        else:
            paths.add(rel)
    return paths


def test_every_module_is_in_the_map() -> None:
    missing = sorted(source_paths() - documented())
    assert not missing, f"docs/structures.md does not name: {missing}"


def test_the_map_names_no_module_that_is_gone() -> None:
    gone = sorted(p for p in documented() if not (ROOT / p).exists())
    assert not gone, f"docs/structures.md names paths that do not exist: {gone}"
