"""The code's shape, checked on every run: no import circle in superd/, no function over 60
lines in superd/ or bench/, no module over 450 lines in superd/ (TEAM.md's style rules).

Read from the source with `ast`, nothing imported: an import counts wherever it is written,
at the top, inside a function, or under `if TYPE_CHECKING:` (a circle hidden there still ties
the modules together for whoever reads or changes them). An edge goes to the module named
(`from superd import fields` -> superd.fields; `from superd.config import Service` ->
superd.config), not to the packages above it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "superd"
MAX_FUNCTION, MAX_MODULE = 60, 450


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def imported(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The superd modules `name` imports, anywhere in it."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package the module is in
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            # `from P import x`: x is a module of its own when there is one, else a name in P
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(package)
    known = set(mods)
    return {name: imported(ast.parse(path.read_text(), str(path)), name,
                           path.name == "__init__.py", known)
            for name, path in mods.items()}


def circles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Each group of modules that import each other round in circles (a strongly connected
    component), as (a shortest circle in it, a -> b -> ... -> a; every module of the group)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few dozen modules deep at most
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
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_chain(graph, g), sorted(g)) for g in groups]


def _chain(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest way round the group, from its first module back to it (breadth first)."""
    start = min(group)
    came: dict[str, str] = {}
    todo = [start]
    for v in todo:
        for w in sorted(graph[v] & group):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came[path[-1]])
                return [*reversed(path), start]
            if w not in came:
                came[w] = v
                todo.append(w)
    raise AssertionError(f"no way round {sorted(group)}")


def functions(path: Path) -> Iterator[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function and method."""
    tree = ast.parse(path.read_text(), str(path))

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                yield name, child.lineno, child.end_lineno - child.lineno + 1
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def test_no_import_circle_in_superd():
    found = circles(import_graph())
    assert not found, "import circles in superd/:\n" + "\n".join(
        f"{' -> '.join(chain)} (the group: {', '.join(group)})" for chain, group in found)


def test_no_function_over_60_lines():
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    long = [f"{p.relative_to(ROOT)}:{line}: {name} is {n} lines"
            for p in files for name, line, n in functions(p) if n > MAX_FUNCTION]
    assert not long, f"functions over {MAX_FUNCTION} lines:\n" + "\n".join(long)


def test_no_module_over_450_lines():
    long = [f"{p.relative_to(ROOT)} is {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_MODULE]
    assert not long, f"modules over {MAX_MODULE} lines:\n" + "\n".join(long)


def test_the_circle_finder_sees_every_kind_of_import(tmp_path):
    """A circle made only of imports that are easy to overlook is still found, and named."""
    package = tmp_path / "superd"
    (package / "sub").mkdir(parents=True)
    for name, text in {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from superd.b import B\n",
        "b.py": "def later():\n    from superd import c\n",
        "c.py": "from .sub import d\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..a import anything\n",
        "e.py": "import superd.a\nimport os\n",
    }.items():
        (package / name).write_text(text)
    assert circles(import_graph(package)) == [
        (["superd.a", "superd.b", "superd.c", "superd.sub.d", "superd.a"],
         ["superd.a", "superd.b", "superd.c", "superd.sub.d"])]


def test_every_module_is_in_both_layout_tables():
    """README's layout and docs/architecture.md's table of files name every module, and
    are the same table: a newcomer finds a file from either."""
    def table(path: Path) -> str:
        text = path.read_text()
        start = text.index("| file | what it is |")
        return text[start:text.index("\n\n", start)]
    readme, arch = table(ROOT / "README.md"), table(ROOT / "docs" / "architecture.md")
    assert readme == arch, "README.md's layout table differs from docs/architecture.md's"
    named = set(re.findall(r"`(?:superd/)?([a-z_]+\.py)`", arch))
    modules = {p.name for p in (ROOT / "superd").glob("*.py")} - {"__init__.py", "__main__.py"}
    assert not modules - named, f"modules the layout table does not name: {sorted(modules - named)}"
    assert not named - modules, f"the layout table names what is gone: {sorted(named - modules)}"
