"""The console has no data path of its own: its pages call the API's operations (rulesvc.web.views), never
the store, the runtime or MongoDB. Only its sessions (store.console_sessions) and the key scopes are
its own."""

from __future__ import annotations

import ast
from pathlib import Path

CONSOLE = Path(__file__).resolve().parent.parent.parent / "rulesvc" / "web" / "console"
OWN = {"rulesvc.store.console_sessions", "rulesvc.store.keys"}
FORBIDDEN = ("rulesvc.store", "rulesvc.runtime", "pymongo", "rulesvc.replay")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_console_pages_use_the_api_operations_only() -> None:
    modules = sorted(CONSOLE.glob("*.py"))
    assert len(modules) >= 5
    for module in modules:
        wrong = {m for m in _imports(module) - OWN if m.startswith(FORBIDDEN)}
        if module.name == "setup.py":
            wrong -= {"pymongo"}  # the start-up deadline of the sessions' index
        assert not wrong, (
            f"{module.name} imports {sorted(wrong)}: call an operation of rulesvc.web.views instead"
        )


def test_templates_have_no_inline_styles_or_scripts() -> None:
    """The CSP allows only the console's own stylesheet and script: an inline one would silently not work."""
    for template in (CONSOLE / "templates").glob("*.html"):
        text = template.read_text()
        assert "style=" not in text, template.name
        assert "<script>" not in text and "onclick=" not in text.lower(), template.name
        assert "| safe" not in text or template.name == "login.html", template.name
