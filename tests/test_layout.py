"""The layout holds: no import cycle among rulesvc's modules, and `rulesvc.core` is pure.

Imports are read with `ast`, function-level ones included; those under `if TYPE_CHECKING:` are left out
(they never run, which is what they are for: see `rulesvc.hookspecs`).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "rulesvc"
IMPURE = ("pymongo", "aiohttp", "asyncio", "bson")
OUTER_LAYERS = ("rulesvc.store", "rulesvc.runtime", "rulesvc.web", "rulesvc.replay")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str) -> set[str]:
    """Every module `name` imports at run time, at any depth (absolute names, relative ones resolved)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            # `from package import module` imports the module
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(name) if m in MODULES and m != name} for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
            connect(v)
    return found


def test_the_graph_sees_the_modules_and_their_imports() -> None:
    graph = _graph()
    assert "rulesvc.core.engine" in graph and "rulesvc.web.app" in graph
    assert "rulesvc.core.ruleformat" in graph["rulesvc.core.engine"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_rulesvc_modules() -> None:
    assert _cycles(_graph()) == []


def test_core_is_pure() -> None:
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("rulesvc.core"):
            continue
        for imported in sorted(_imports(name)):
            top = imported.split(".")[0]
            if top in IMPURE or any(imported == o or imported.startswith(o + ".") for o in OUTER_LAYERS):
                bad.append(f"{path.relative_to(ROOT.parent)} imports {imported}")
    assert bad == []


def test_channels_is_the_contract_only() -> None:
    imported = {m for m in _imports("rulesvc.channels") if m.split(".")[0] == "rulesvc"}
    assert imported == set()


def _collection_calls(tree: ast.AST) -> list[str]:
    """`<x>.store.<collection>` or `store.<collection>` attribute reads: a collection reached past store/."""
    collections = {"events", "contacts", "messages", "schedule", "leases", "contact_leases", "products",
                   "audience_changes", "api_keys", "interests", "secrets", "db"}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in collections:
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name == "store":
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_every_query_lives_in_store() -> None:
    """Outside `store/`, code asks named store methods; it never reaches a collection itself."""
    outside = {name: path for name, path in MODULES.items() if not name.startswith("rulesvc.store")}
    plugins = Path(__file__).resolve().parent.parent / "plugins"
    files = [*outside.values(), *plugins.glob("rulesvc-*/rulesvc_*/*.py")]
    offenders = {str(p): calls for p in files if (calls := _collection_calls(ast.parse(p.read_text())))}
    assert offenders == {}


def test_the_query_check_sees_a_collection_call() -> None:
    tree = ast.parse("async def f(self):\n    await self.store.messages.find_one({})\n")
    assert _collection_calls(tree) == ["self.store.messages (line 2)"]
