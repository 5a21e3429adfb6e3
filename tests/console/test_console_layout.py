"""The console has no data path of its own: its pages call the API's operations (rulesvc.web.views), never
the store, the runtime or MongoDB. Only its sessions (store.console_sessions) and the key scopes are
its own."""

from __future__ import annotations

import ast
import re
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


def test_the_docs_pictures_are_the_tests_screenshots() -> None:
    """docs/console.md shows pictures the browser tests take (`make screenshots` copies them)."""
    root = CONSOLE.parent.parent.parent
    doc = (root / "docs" / "console.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(console/([\w-]+)\.png\)", doc)
    assert len(pictures) >= 12
    taken = set()
    for test in (root / "tests" / "console").glob("test_*.py"):
        taken.update(re.findall(r"""\.shot\(\s*["']([\w-]+)["']""", test.read_text()))
    makefile = (root / "Makefile").read_text()
    listed = re.search(r"^DOC_SCREENSHOTS := (.*)$", makefile, re.M)
    assert listed is not None
    for name in pictures:
        assert name in taken, f"no browser test takes the screenshot {name}"
        assert (root / "docs" / "console" / f"{name}.png").is_file(), name
        assert name in listed.group(1).split(), f"make screenshots does not copy {name}"
