"""
The import structure of mailfw: values at the bottom, the interfaces above
them, and no module importing (even for type checking) one that imports it
back.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import mailfw

PACKAGE = Path(mailfw.__file__).parent

#: The values layer: plain data that every other part exchanges.  These
#: import nothing from mailfw but each other.
VALUES = frozenset(
    {
        "mailfw.address",
        "mailfw.config",
        "mailfw.envelope",
        "mailfw.hosting._values",
        "mailfw.queued",
        "mailfw.reply",
        "mailfw.verdict",
    }
)


def _moduleName(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST, package: str) -> Iterator[str]:
    """
    Every module named by an import anywhere in C{tree}, also inside
    functions and C{if TYPE_CHECKING:} blocks.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield f"{module}.{alias.name}"


def importGraph() -> dict[str, set[str]]:
    """
    mailfw's modules and, for each, the mailfw modules it imports.
    """
    paths = {_moduleName(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for imported in _imports(ast.parse(path.read_text()), package):
            while imported and imported not in paths:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """
    The strongly connected components of more than one module (Tarjan).
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


class LayerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.graph = importGraph()

    def test_noCycles(self) -> None:
        """
        No two mailfw modules import each other, directly or through
        others, not even lazily inside a function or for type checking.
        """
        self.assertEqual(cycles(self.graph), [])

    def test_interfacesImportOnlyValues(self) -> None:
        """
        L{mailfw.interfaces} depends on the values layer and nothing else
        in mailfw, so implementing an interface never loads another
        implementation.
        """
        self.assertEqual(self.graph["mailfw.interfaces"] - VALUES, set())

    def test_valuesImportOnlyValues(self) -> None:
        """
        The values layer is the bottom: it imports nothing above it.
        """
        for name in sorted(VALUES):
            self.assertEqual(self.graph[name] - VALUES, set(), name)

    def test_cyclesAreFound(self) -> None:
        """
        The cycle finder itself finds a circle of three and ignores a chain.
        """
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        self.assertEqual(cycles(graph), [["a", "b", "c"]])
        self.assertEqual(cycles({"a": {"b"}, "b": set()}), [])
