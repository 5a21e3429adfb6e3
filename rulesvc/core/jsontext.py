"""JSON parsed with the place of every value and key, so an error can say `line:column`, not a byte.

Only for files a person wrote and a decoder refused (msgspec stops at the first problem and says where
in bytes): slower than msgspec, and said in plain words, e.g. "expected `,` or `}` after an object
member". Columns count characters from 1, as editors show them.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_DEPTH = 256

Kind = Literal["object", "array", "string", "int", "float", "bool", "null"]

_NUMBER_CHARS = re.compile(r"[-+0-9.eE]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SPACE = re.compile(r"[ \t\r\n]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SIMPLE_KEY = re.compile(r"^[A-Za-z0-9_$][A-Za-z0-9_.$-]*$")


@dataclass(slots=True)
class Member:
    key: str
    pos: int  # of the key's opening quote
    value: Node


@dataclass(slots=True)
class Node:
    kind: Kind
    pos: int  # of the value's first character
    value: Any = None  # scalars: the value; strings: the decoded text
    text: str = ""  # numbers: as written
    members: list[Member] = field(default_factory=list)
    items: list[Node] = field(default_factory=list)

    def member(self, key: str) -> Node | None:
        """The last member of that key, as decoders keep it."""
        found = None
        for m in self.members:
            if m.key == key:
                found = m.value
        return found

    def plain(self) -> Any:
        """The Python value, as json.loads would give it."""
        if self.kind == "object":
            return {m.key: m.value.plain() for m in self.members}
        if self.kind == "array":
            return [item.plain() for item in self.items]
        return self.value


class JsonSyntaxError(Exception):
    def __init__(self, message: str, pos: int, path: str) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos
        self.path = path


@dataclass
class Document:
    text: str
    root: Node
    _newlines: list[int] | None = None

    def position(self, pos: int) -> tuple[int, int]:
        if self._newlines is None:
            self._newlines = _newlines(self.text)
        return _position(self._newlines, pos)


def _newlines(text: str) -> list[int]:
    return [i for i, c in enumerate(text) if c == "\n"]


def _position(newlines: list[int], pos: int) -> tuple[int, int]:
    line = bisect.bisect_left(newlines, pos)
    start = newlines[line - 1] + 1 if line else 0
    return line + 1, pos - start + 1


def position(text: str, pos: int) -> tuple[int, int]:
    """(line, column), both from 1, of the character at `pos`."""
    return _position(_newlines(text), pos)


def key_path(path: str, key: str) -> str:
    """`$.a.b` for plain keys (dotted condition paths included), `$.a["odd key"]` for the others."""
    return f"{path}.{key}" if _SIMPLE_KEY.match(key) else f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def parse(data: bytes) -> Document:
    """Raises JsonSyntaxError (with the character position) for text that is not one JSON value."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = data[: exc.start].decode("utf-8")
        raise JsonSyntaxError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8", len(good), "$"
        ) from None
    if text.startswith("\ufeff"):
        raise JsonSyntaxError("the file starts with a byte order mark; save it as UTF-8 without BOM", 0, "$")
    parser = _Parser(text)
    pos = parser.space(0)
    if pos == len(text):
        raise JsonSyntaxError("the file is empty: expected a JSON object", pos, "$")
    root, pos = parser.value(pos, "$", 0)
    pos = parser.space(pos)
    if pos < len(text):
        raise JsonSyntaxError(
            "unexpected text after the end of the JSON value (one object per file)", pos, "$"
        )
    return Document(text, root)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text

    def space(self, pos: int) -> int:
        end = _SPACE.match(self.text, pos)
        pos = end.end() if end else pos
        if self.text.startswith(("//", "/*"), pos):
            raise JsonSyntaxError("comments are not allowed in JSON", pos, "$")
        return pos

    def fail(self, pos: int, path: str, expected: str) -> JsonSyntaxError:
        if pos >= len(self.text):
            return JsonSyntaxError(f"the file ends early: {expected}", pos, path)
        found = self.text[pos]
        if expected.startswith("expected `,`") and (found in '"{[-0123456789' or found.isalpha()):
            return JsonSyntaxError(f"{expected}: is a comma missing before this?", pos, path)
        if found == "'":
            return JsonSyntaxError(f"{expected}; JSON strings take double quotes, not single", pos, path)
        return JsonSyntaxError(f"{expected}, found `{found}`", pos, path)

    def value(self, pos: int, path: str, depth: int) -> tuple[Node, int]:
        text = self.text
        char = text[pos] if pos < len(text) else ""
        if char == "{":
            return self.obj(pos, path, depth + 1)
        if char == "[":
            return self.array(pos, path, depth + 1)
        if char == '"':
            string, end = self.string(pos, path)
            return Node("string", pos, string), end
        if char and char in "-0123456789":
            return self.number(pos, path)
        word = _WORD.match(text, pos)
        if word:
            literal = {"true": True, "false": False, "null": None}
            if word.group() in literal:
                value = literal[word.group()]
                return Node("null" if value is None else "bool", pos, value), word.end()
            hint = {"True": "true", "False": "false", "None": "null", "undefined": "null"}.get(word.group())
            said = f"; write `{hint}`" if hint else " (text takes double quotes)"
            raise JsonSyntaxError(f"expected a value, found `{word.group()}`{said}", pos, path)
        raise self.fail(pos, path, "expected a value (a string, number, object, array, true, false or null)")

    def obj(self, start: int, path: str, depth: int) -> tuple[Node, int]:
        if depth > MAX_DEPTH:
            raise JsonSyntaxError(f"nested deeper than {MAX_DEPTH} levels", start, "$")
        node = Node("object", start)
        pos = self.space(start + 1)
        if self.text.startswith("}", pos):
            return node, pos + 1
        while True:
            if self.text.startswith("}", pos) and node.members:
                raise JsonSyntaxError("a comma before `}` is not allowed in JSON", pos, path)
            if not self.text.startswith('"', pos):
                raise self.fail(pos, path, "expected a key in double quotes")
            key_pos = pos
            key, pos = self.string(pos, path)
            pos = self.space(pos)
            if not self.text.startswith(":", pos):
                raise self.fail(pos, key_path(path, key), f"expected `:` after the key `{key}`")
            pos = self.space(pos + 1)
            member_path = key_path(path, key)
            value, pos = self.value(pos, member_path, depth)
            node.members.append(Member(key, key_pos, value))
            pos = self.space(pos)
            if self.text.startswith(",", pos):
                pos = self.space(pos + 1)
                continue
            if self.text.startswith("}", pos):
                return node, pos + 1
            raise self.fail(pos, path, "expected `,` or `}` after an object member")

    def array(self, start: int, path: str, depth: int) -> tuple[Node, int]:
        if depth > MAX_DEPTH:
            raise JsonSyntaxError(f"nested deeper than {MAX_DEPTH} levels", start, "$")
        node = Node("array", start)
        pos = self.space(start + 1)
        if self.text.startswith("]", pos):
            return node, pos + 1
        while True:
            item_path = f"{path}[{len(node.items)}]"
            if self.text.startswith("]", pos):
                raise JsonSyntaxError("a comma before `]` is not allowed in JSON", pos, path)
            item, pos = self.value(pos, item_path, depth)
            node.items.append(item)
            pos = self.space(pos)
            if self.text.startswith(",", pos):
                pos = self.space(pos + 1)
                continue
            if self.text.startswith("]", pos):
                return node, pos + 1
            raise self.fail(pos, path, "expected `,` or `]` after an array item")

    def string(self, start: int, path: str) -> tuple[str, int]:
        match = _STRING.match(self.text, start)
        if match:
            value = str(json.loads(match.group()))
            if "\\u" in match.group() and _SURROGATE.search(value):
                raise JsonSyntaxError("a `\\u` escape that is half of a surrogate pair, alone", start, path)
            return value, match.end()
        pos = start + 1  # find what is wrong, to point at it
        while pos < len(self.text):
            char = self.text[pos]
            if char == '"':
                break
            if char == "\n":
                raise JsonSyntaxError("the string is not closed before the end of the line", start, path)
            if char < " ":
                raise JsonSyntaxError("a control character in a string; write it as an escape", pos, path)
            if char == "\\":
                escape = self.text[pos : pos + 2]
                raise JsonSyntaxError(
                    f'invalid escape `{escape}` (allowed: \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)',
                    pos,
                    path,
                )
            pos += 1
        raise JsonSyntaxError('the string is not closed (a `"` is missing)', start, path)

    def number(self, start: int, path: str) -> tuple[Node, int]:
        broad = _NUMBER_CHARS.match(self.text, start)
        assert broad is not None
        written = broad.group()
        if not _NUMBER.fullmatch(written):
            raise JsonSyntaxError(f"invalid number `{written}`", start, path)
        if any(c in written for c in ".eE"):
            return Node("float", start, float(written), written), broad.end()
        try:
            value = int(written)
        except ValueError:  # Python refuses to convert integers of more than 4,300 digits
            raise JsonSyntaxError(f"a number of {len(written)} digits is too large", start, path) from None
        return Node("int", start, value, written), broad.end()


def locate(root: Node, path: str) -> int:
    """The position of the value at a JSON path (`$.rules[2].then[0].send.after`); when part of the path
    is not in the file (a key left out), the innermost value that is."""
    node, rest = root, path[1:] if path.startswith("$") else path
    while rest:
        if rest.startswith("[") and node.kind == "array":
            close = rest.find("]")
            try:
                index = int(rest[1:close])
            except ValueError:
                break
            if not 0 <= index < len(node.items):
                break
            node, rest = node.items[index], rest[close + 1 :]
            continue
        if node.kind != "object":
            break
        found: Member | None = None
        for m in node.members:  # the longest key that the path goes on with: keys may hold dots
            for spelled in (f".{m.key}", f"[{json.dumps(m.key, ensure_ascii=False)}]"):
                if rest.startswith(spelled) and rest[len(spelled) : len(spelled) + 1] in ("", ".", "["):
                    if found is None or len(m.key) >= len(found.key):
                        found, taken = m, len(spelled)
        if found is None:
            break
        node, rest = found.value, rest[taken:]
    return node.pos
