"""Message templates: Jinja2 in its sandbox, one file per part, reloaded when a file changes.

`templates/cart_abandon/email.subject`, `.text` and `.html` are the parts of template
`cart_abandon/email`; push and in-app messages use `.title` and `.body`. Only `.html` is autoescaped.
A template can read its params, the contact and the message, and nothing of Python's internals.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

PARTS = ("subject", "text", "html", "title", "body", "url")
FRESH_SECONDS = 1.0


class TemplateError(Exception):
    pass


class Missing(jinja2.ChainableUndefined):
    """A missing value may be tested, chained into and defaulted (`contact.attributes.x | default('')`),
    but printing it is an error: a message with a hole in it is worse than no message."""

    def __str__(self) -> str:
        self._fail_with_undefined_error()
        return ""  # not reached


class Templates:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.env = ImmutableSandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(directory)),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=Missing,
            auto_reload=True,  # an edited file is picked up at the next render
            keep_trailing_newline=False,
        )
        self._cache: dict[str, tuple[float, list[tuple[str, jinja2.Template]]]] = {}

    def parts(self, name: str) -> list[str]:
        base = self.directory / name
        return [p for p in PARTS if base.with_name(f"{base.name}.{p}").is_file()]

    def _compiled(self, name: str) -> list[tuple[str, jinja2.Template]]:
        """A template's parts, looked up on disk at most once a second: an edit still shows within a
        second, and a drain of thousands of messages does not stat every file for every message."""
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < FRESH_SECONDS:
            return hit[1]
        found = self.parts(name)
        if not found:
            raise TemplateError(f"template `{name}` not found in {self.directory}")
        compiled = []
        for part in found:
            try:
                compiled.append((part, self.env.get_template(f"{name}.{part}")))
            except jinja2.TemplateError as exc:
                raise TemplateError(f"template `{name}.{part}`: {exc}") from exc
        self._cache[name] = (now, compiled)
        return compiled

    def render(self, name: str, context: dict[str, Any]) -> dict[str, str]:
        rendered: dict[str, str] = {}
        for part, template in self._compiled(name):
            try:
                rendered[part] = template.render(context).strip()
            except jinja2.TemplateError as exc:
                raise TemplateError(f"template `{name}.{part}`: {exc}") from exc
            except Exception as exc:  # e.g. a division by zero in the template itself
                raise TemplateError(f"template `{name}.{part}`: {type(exc).__name__}: {exc}") from exc
        return rendered
