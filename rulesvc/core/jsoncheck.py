"""Every way a parsed JSON value misses a msgspec type, each in a plain sentence with its place.

msgspec stops at the first problem and words it for programmers ("Expected `str` matching regex ...").
This walks the same types (via `msgspec.inspect`, so the types stay the one definition of the format)
over a `jsontext` tree and collects them all: unknown keys (with the likely one meant), missing keys,
wrong types, values out of range, and strings not in their form, said by `sentences` (one per pattern).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec.inspect as mi

from rulesvc.core.jsontext import Node, key_path


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    pos: int  # where in the text: the value, or the key for an unknown key


def check(node: Node, type_: mi.Type, sentences: Mapping[str, str]) -> list[Problem]:
    """`sentences`: pattern -> what it allows, e.g. "a duration such as `20m` or `2h`"."""
    found: list[Problem] = []
    _Walker(sentences, found).visit(node, type_, "$")
    return found


def got(node: Node) -> str:
    if node.kind == "string":
        shown = json.dumps(node.value, ensure_ascii=False)
        return shown if len(shown) <= 60 else shown[:57] + '..."'
    if node.kind in ("int", "float"):
        return node.text
    if node.kind == "bool":
        return "true" if node.value else "false"
    return {"null": "null", "object": "an object", "array": "an array"}[node.kind]


def _accepts(type_: mi.Type, kind: str) -> bool:
    if isinstance(type_, mi.Metadata):
        return _accepts(type_.type, kind)
    if isinstance(type_, mi.StructType | mi.DictType):
        return kind == "object"
    if isinstance(type_, mi.ListType):
        return kind == "array"
    if isinstance(type_, mi.StrType):
        return kind == "string"
    if isinstance(type_, mi.LiteralType):
        return any(isinstance(v, str) for v in type_.values) and kind == "string"
    if isinstance(type_, mi.IntType):
        return kind == "int"
    if isinstance(type_, mi.FloatType):
        return kind in ("int", "float")
    if isinstance(type_, mi.BoolType):
        return kind == "bool"
    if isinstance(type_, mi.NoneType):
        return kind == "null"
    return isinstance(type_, mi.AnyType)


class _Walker:
    def __init__(self, sentences: Mapping[str, str], found: list[Problem]) -> None:
        self.sentences = sentences
        self.found = found

    def add(self, path: str, message: str, pos: int) -> None:
        self.found.append(Problem(path, message, pos))

    def describe(self, type_: mi.Type) -> str:
        """What a type allows, as a person says it."""
        if isinstance(type_, mi.Metadata):
            return self.describe(type_.type)
        if isinstance(type_, mi.UnionType):
            members = [t for t in type_.types if not isinstance(t, mi.NoneType)]
            if any(isinstance(t, mi.FloatType) for t in members):
                members = [t for t in members if not isinstance(t, mi.IntType)]
            said = list(dict.fromkeys(self.describe(t) for t in members))
            if len(said) <= 2:
                return " or ".join(said)
            return ", ".join(said[:-1]) + ", or " + said[-1]
        if isinstance(type_, mi.StructType | mi.DictType):
            return "an object"
        if isinstance(type_, mi.ListType):
            return "an array"
        if isinstance(type_, mi.StrType):
            return self.sentences.get(type_.pattern, "a string") if type_.pattern else "a string"
        if isinstance(type_, mi.LiteralType):
            return "one of " + ", ".join(f"`{v}`" for v in type_.values)
        if isinstance(type_, mi.IntType):
            return "a whole number"
        if isinstance(type_, mi.FloatType):
            return "a number"
        if isinstance(type_, mi.BoolType):
            return "true or false"
        if isinstance(type_, mi.NoneType):
            return "null"
        return "a value"

    def visit(self, node: Node, type_: mi.Type, path: str) -> None:
        if isinstance(type_, mi.Metadata):
            type_ = type_.type
        if isinstance(type_, mi.AnyType):
            return
        if isinstance(type_, mi.UnionType):
            fitting = [t for t in type_.types if _accepts(t, node.kind)]
            exact = [t for t in fitting if not (isinstance(t, mi.FloatType) and node.kind == "int")]
            if not fitting:
                self.add(path, f"expected {self.describe(type_)}, got {got(node)}", node.pos)
                return
            type_ = (exact or fitting)[0]
            if isinstance(type_, mi.Metadata):
                type_ = type_.type
        if not _accepts(type_, node.kind):
            self.add(path, f"expected {self.describe(type_)}, got {got(node)}", node.pos)
            return
        if isinstance(type_, mi.StructType):
            self.struct(node, type_, path)
        elif isinstance(type_, mi.DictType):
            self.dict(node, type_, path)
        elif isinstance(type_, mi.ListType):
            self.list(node, type_, path)
        elif isinstance(type_, mi.StrType):
            self.string(node, type_, path)
        elif isinstance(type_, mi.LiteralType):
            if node.value not in type_.values:
                allowed = [str(v) for v in type_.values]
                close = difflib.get_close_matches(str(node.value), allowed, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                self.add(path, f"expected {self.describe(type_)}, got {got(node)}{hint}", node.pos)
        elif isinstance(type_, mi.IntType | mi.FloatType):
            self.number(node, type_, path)

    def struct(self, node: Node, type_: mi.StructType, path: str) -> None:
        fields = {f.encode_name: f for f in type_.fields}
        given = {m.key for m in node.members}
        for member in node.members:
            field = fields.get(member.key)
            if field is None:
                close = difflib.get_close_matches(member.key, list(fields), n=1)
                if close:
                    hint = f"did you mean `{close[0]}`?"
                else:
                    hint = "allowed here: " + ", ".join(f"`{k}`" for k in fields)
                self.add(key_path(path, member.key), f"unknown key `{member.key}`; {hint}", member.pos)
                continue
            self.visit(member.value, field.type, key_path(path, member.key))
        for name, field in fields.items():
            if field.required and name not in given:
                self.add(key_path(path, name), f"missing required key `{name}`", node.pos)

    def dict(self, node: Node, type_: mi.DictType, path: str) -> None:
        for member in node.members:
            where = key_path(path, member.key)
            key_type = type_.key_type.type if isinstance(type_.key_type, mi.Metadata) else type_.key_type
            if isinstance(key_type, mi.StrType) and not _string_fits(member.key, key_type):
                shown = json.dumps(member.key, ensure_ascii=False)
                self.add(where, f"expected a key that is {self.describe(key_type)}, got {shown}", member.pos)
                continue
            self.visit(member.value, type_.value_type, where)
        self.length(node, len(node.members), type_.min_length, type_.max_length, path, "key")

    def list(self, node: Node, type_: mi.ListType, path: str) -> None:
        for i, item in enumerate(node.items):
            self.visit(item, type_.item_type, f"{path}[{i}]")
        self.length(node, len(node.items), type_.min_length, type_.max_length, path, "item")

    def length(self, node: Node, n: int, low: int | None, high: int | None, path: str, what: str) -> None:
        if low is not None and n < low:
            least = f"at least one {what}" if low == 1 else f"at least {low} {what}s"
            self.add(path, f"expected {least}, got {n or 'none'}", node.pos)
        if high is not None and n > high:
            self.add(path, f"expected at most {high} {what}s, got {n}", node.pos)

    def string(self, node: Node, type_: mi.StrType, path: str) -> None:
        if not _string_fits(node.value, type_):
            self.add(path, f"expected {self.describe(type_)}, got {got(node)}", node.pos)

    def number(self, node: Node, type_: mi.IntType | mi.FloatType, path: str) -> None:
        value = node.value
        low = type_.ge if type_.ge is not None else type_.gt
        high = type_.le if type_.le is not None else type_.lt
        if (
            (type_.ge is not None and value < type_.ge)
            or (type_.gt is not None and value <= type_.gt)
            or (type_.le is not None and value > type_.le)
            or (type_.lt is not None and value >= type_.lt)
        ):
            if low is not None and high is not None:
                allowed = f"from {low} to {high}"
            elif low is not None:
                allowed = f"{'more than' if type_.ge is None else 'at least'} {low}"
            else:
                allowed = f"{'less than' if type_.le is None else 'at most'} {high}"
            self.add(path, f"expected {self.describe(type_)} {allowed}, got {got(node)}", node.pos)


def _string_fits(value: str, type_: mi.StrType) -> bool:
    if type_.min_length is not None and len(value) < type_.min_length:
        return False
    if type_.max_length is not None and len(value) > type_.max_length:
        return False
    return type_.pattern is None or re.search(type_.pattern, value) is not None


def patterns(type_: mi.Type, seen: set[int] | None = None) -> set[str]:
    """Every string pattern in a type: each needs a sentence (a test holds that)."""
    seen = set() if seen is None else seen
    if id(type_) in seen:
        return set()
    seen.add(id(type_))
    if isinstance(type_, mi.Metadata):
        return patterns(type_.type, seen)
    if isinstance(type_, mi.StrType):
        return {type_.pattern} if type_.pattern else set()
    inner: list[Any] = []
    if isinstance(type_, mi.UnionType):
        inner = list(type_.types)
    elif isinstance(type_, mi.StructType):
        inner = [f.type for f in type_.fields]
    elif isinstance(type_, mi.ListType):
        inner = [type_.item_type]
    elif isinstance(type_, mi.DictType):
        inner = [type_.key_type, type_.value_type]
    return set().union(*(patterns(t, seen) for t in inner)) if inner else set()
