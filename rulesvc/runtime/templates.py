"""Message templates: Jinja2 in its sandbox, one file per part, reloaded when a file changes.

`templates/cart_abandon/email.subject`, `.text` and `.html` are the parts of template
`cart_abandon/email`; push and in-app messages use `.title` and `.body`. `.html` is autoescaped, and so
are `.title` and `.body` when they are rendered for a channel that shows them in a web page (the in-app
inbox): a product name like `<script>` arrives as text, not as markup.
A template can read its params, the contact and the message, and nothing of Python's internals. A value
it prints that is missing or null (an event attribute the event did not carry) fails the message with
`template_error` instead of going out as "None" or a hole; `| default(...)` and `{% if %}` handle an
optional value. `used_params` finds, for `rulesvc check`, the params a template prints unguarded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

PARTS = ("subject", "text", "html", "title", "body", "url")
FRESH_SECONDS = 1.0


HTML_PARTS = ("html", "title", "body")  # escaped for a channel that shows its content in web pages
GUARDING_FILTERS = frozenset({"default", "d"})


class TemplateError(Exception):
    """The message fails with reason `template_error`, this message as its detail."""


class Missing(jinja2.ChainableUndefined):
    """A missing value may be tested, chained into and defaulted (`contact.attributes.x | default('')`),
    but printing it is an error: a message with a hole in it is worse than no message."""

    def __str__(self) -> str:
        if self._undefined_hint is None and self._undefined_name is not None:
            raise jinja2.UndefinedError(f"`{self._undefined_name}` is missing")
        self._fail_with_undefined_error()
        return ""  # not reached


def _printable(value: Any) -> Any:
    """Every `{{ }}` output passes here: null is as much a hole as a missing value."""
    if value is None:
        raise jinja2.UndefinedError("a printed value is null")
    return value


def _holes(value: Any) -> Any:
    """Null entries become missing ones (a param from an attribute the event did not carry is null), so
    `| default(...)`, `is defined` and `{% if %}` see them as absent and printing one names it. The key
    stays: `params["items"]` must not fall through to the dict's `items` method."""
    if isinstance(value, dict):
        return {k: Missing(name=k) if v is None else _holes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_holes(v) for v in value]
    return value


def _is_none(value: Any) -> bool:
    """`is none` holds for a null that became missing (see `_holes`), as it did before."""
    return value is None or isinstance(value, jinja2.Undefined)


def _params_printed(node: jinja2.nodes.Node, guarded: frozenset[str], found: dict[str, None]) -> None:
    """Names of `params.X` / `params['X']` a template prints where a missing value would fail it: in a
    `{{ }}` and not under `| default`, a test, `x or y`, or an `if` that tests that param. (Loops over a
    missing value and `{% set %}` do not fail, so they do not count.)"""
    if isinstance(node, jinja2.nodes.Output):
        for expr in node.nodes:
            _param_exprs(expr, guarded, found)
    elif isinstance(node, jinja2.nodes.If):
        inner = guarded | _mentioned(node.test)
        for stmt in node.body:
            _params_printed(stmt, inner, found)
        for other in [*node.elif_, *node.else_]:
            _params_printed(other, guarded, found)
    else:
        for child in node.iter_child_nodes():
            if isinstance(child, jinja2.nodes.Stmt):
                _params_printed(child, guarded, found)


def _param_exprs(node: jinja2.nodes.Node, guarded: frozenset[str], found: dict[str, None]) -> None:
    if isinstance(node, jinja2.nodes.Filter) and node.name in GUARDING_FILTERS:
        return
    if isinstance(node, jinja2.nodes.Test):
        return
    if isinstance(node, jinja2.nodes.Or):
        _param_exprs(node.right, guarded, found)
        return
    if isinstance(node, jinja2.nodes.CondExpr):
        _param_exprs(node.expr1, guarded | _mentioned(node.test), found)
        if node.expr2 is not None:
            _param_exprs(node.expr2, guarded, found)
        return
    name = _param_name(node)
    if name is not None:
        if name not in guarded:
            found.setdefault(name, None)
        return
    for child in node.iter_child_nodes():
        _param_exprs(child, guarded, found)


def _mentioned(node: jinja2.nodes.Node) -> frozenset[str]:
    names = {_param_name(n) for n in node.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem))}
    name = _param_name(node)
    return frozenset(n for n in {*names, name} if n is not None)


def _param_name(node: jinja2.nodes.Node) -> str | None:
    if isinstance(node, jinja2.nodes.Getattr | jinja2.nodes.Getitem):
        inner = node.node
        if isinstance(inner, jinja2.nodes.Name) and inner.name == "params":
            if isinstance(node, jinja2.nodes.Getattr):
                return node.attr
            if isinstance(node.arg, jinja2.nodes.Const) and isinstance(node.arg.value, str):
                return node.arg.value
    return None


class Templates:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.env = self._environment(("html",))
        self.html_env = self._environment(HTML_PARTS)
        self._cache: dict[tuple[str, bool], tuple[float, list[tuple[str, jinja2.Template]]]] = {}

    def _environment(self, escaped: tuple[str, ...]) -> ImmutableSandboxedEnvironment:
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(self.directory)),
            autoescape=jinja2.select_autoescape(enabled_extensions=escaped, default_for_string=False),
            undefined=Missing,
            finalize=_printable,
            auto_reload=True,  # an edited file is picked up at the next render
            keep_trailing_newline=False,
        )
        env.tests["none"] = _is_none
        return env

    def parts(self, name: str) -> list[str]:
        base = self.directory / name
        return [p for p in PARTS if base.with_name(f"{base.name}.{p}").is_file()]

    def _compiled(self, name: str, html: bool = False) -> list[tuple[str, jinja2.Template]]:
        """A template's parts, looked up on disk at most once a second: an edit still shows within a
        second, and a drain of thousands of messages does not stat every file for every message."""
        now = time.monotonic()
        hit = self._cache.get((name, html))
        if hit is not None and now - hit[0] < FRESH_SECONDS:
            return hit[1]
        found = self.parts(name)
        if not found:
            raise TemplateError(f"template `{name}` not found in {self.directory}")
        env = self.html_env if html else self.env
        compiled = []
        for part in found:
            try:
                compiled.append((part, env.get_template(f"{name}.{part}")))
            except jinja2.TemplateError as exc:
                raise TemplateError(f"template `{name}.{part}`: {exc}") from exc
        self._cache[(name, html)] = (now, compiled)
        return compiled

    def used_params(self, name: str) -> dict[str, list[str]]:
        """Per part of template `name`, the params it needs (uses without a default or a guard); parts
        that do not parse are left to rendering to report."""
        used: dict[str, list[str]] = {}
        for part in self.parts(name):
            path = self.directory / f"{name}.{part}"
            try:
                tree = self.env.parse(path.read_text())
            except (OSError, UnicodeDecodeError, jinja2.TemplateSyntaxError):
                continue
            found: dict[str, None] = {}
            _params_printed(tree, frozenset(), found)
            if found:
                used[part] = list(found)
        return used

    def render(self, name: str, context: dict[str, Any], html: bool = False) -> dict[str, str]:
        """The template's parts; with `html`, `.title` and `.body` are escaped like `.html` (content a
        web page shows). Raises TemplateError for a missing template, part or value."""
        rendered: dict[str, str] = {}
        context = _holes(context)
        for part, template in self._compiled(name, html):
            try:
                rendered[part] = template.render(context).strip()
            except jinja2.TemplateError as exc:
                raise TemplateError(f"template `{name}.{part}`: {exc}") from exc
            except Exception as exc:  # e.g. a division by zero in the template itself
                raise TemplateError(f"template `{name}.{part}`: {type(exc).__name__}: {exc}") from exc
        return rendered
