"""A contact's state written as what changed since it was read, not the whole document again.

The inbox reads a contact, lets the engine change its state, and writes it back version-checked. Rewriting
the whole `state` made mongod parse, compare and log every byte of it for each contact of each batch.
`state_delta` makes an update that sets only the paths that changed (`$set`) and removes the keys that
went (`$unset`), so that applied to the state as read it gives exactly the new one: the same values, of
the same types, with the keys in the same order (the rules see the state as stored; some, such as a
capped counter dropping its oldest keys, depend on that order).

Where a path cannot say it, the nearest dict that can is written whole: a key with a `.` or a leading
`$` (a counter's key or a `once` key is a value from an event, anything at all), an empty key, or keys
whose new order mongod would not reproduce (it appends the fields one update adds in its own order:
names in lexicographic order, numbers in numeric order, so more than one key added at a place is taken
only when they are sorted and none starts with a digit).

Values are compared as MessagePack bytes: the state holds what events and rules put there (JSON values,
times as numbers), and MessagePack keeps apart what Python's `==` does not (1, 1.0 and True; -0.0; key
order). An int read back as the driver's Int64 compares equal to the same int: the value stored is the same.

Pure: no I/O. The inbox takes a `snapshot` of each state before the engine changes it in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

# How far below `state` paths go: `state.<key>.<key>`, set whole below that. Deeper paths would say little
# less (a counter's `times`, a remembered value's `v` are most of what changes) for more work here.
DEPTH = 2

Snapshot = dict[str, bytes]  # the state as read, each top-level key's value as MessagePack


@dataclass(frozen=True)
class Delta:
    """`$set` and `$unset` paths; both empty when nothing changed."""

    set: dict[str, Any] = field(default_factory=dict)
    unset: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.set or self.unset)


_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode
_UNPACKABLE = (TypeError, ValueError, OverflowError)


def snapshot(state: Any) -> Snapshot | None:
    """The state as read, kept apart from the dicts the engine changes in place: each top-level value as
    MessagePack (quicker than a deep copy, and compared as bytes). None if the state is not a dict or holds
    a value MessagePack cannot take (its write is then the whole state, as before)."""
    if type(state) is not dict:
        return None
    try:
        return {key: _pack(value) for key, value in state.items()}
    except _UNPACKABLE:
        return None


def state_delta(read: Snapshot | None, new: Mapping[str, Any], path: str = "state") -> Delta:
    """The update taking the state as read (its `snapshot`; None: write it whole) to `new`."""
    delta = Delta()
    if read is None:
        delta.set[path] = new
        return delta
    changed: list[str] = []
    for key, value in new.items():
        before = read.get(key)
        try:
            if before is None or _pack(value) != before:
                changed.append(key)
        except _UNPACKABLE:
            changed.append(key)
    keys = list(new)
    if keys == list(read):
        removed: list[str] = []
    else:
        removed = [k for k in read if k not in new]
        if not _in_order(list(read), keys):
            delta.set[path] = new
            return delta
    if not (all(map(_plain, changed)) and all(map(_plain, removed))):
        delta.set[path] = new
        return delta
    for key in removed:
        delta.unset[f"{path}.{key}"] = ""
    for key in changed:
        value = new[key]
        if key in read and type(value) is dict:
            before = _unpack(read[key])
            if type(before) is dict:
                _diff(before, value, f"{path}.{key}", delta, DEPTH - 1)
                continue
        delta.set[f"{path}.{key}"] = value
    return delta


def same(a: Any, b: Any) -> bool:
    """Equal as stored: same types (1, 1.0 and True differ), same key order, -0.0 is not 0.0. Python's `==`
    first (it is quick and settles most cases), then, for containers, their MessagePack bytes: those keep
    order and types. A value MessagePack cannot take counts as changed."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b) or a != b:
        return False
    if kind is float:
        return a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b)
    if kind is dict or kind is list:
        try:
            return bool(_pack(a) == _pack(b))
        except _UNPACKABLE:
            return False
    return True


_MISSING: Any = object()


def _diff(old: dict[str, Any], new: Mapping[str, Any], path: str, delta: Delta, depth: int) -> None:
    changed = [key for key, value in new.items() if not same(old.get(key, _MISSING), value)]
    keys = list(new)
    if keys == list(old):
        if not changed:
            return
        removed: list[str] = []
    else:
        removed = [k for k in old if k not in new]
        if not _in_order(list(old), keys):
            delta.set[path] = new
            return
    if not (all(map(_plain, changed)) and all(map(_plain, removed))):
        delta.set[path] = new
        return
    for key in removed:
        delta.unset[f"{path}.{key}"] = ""
    for key in changed:
        before, after = old.get(key, _MISSING), new[key]
        if depth > 1 and type(before) is dict and type(after) is dict:
            _diff(before, after, f"{path}.{key}", delta, depth - 1)
        else:
            delta.set[f"{path}.{key}"] = after


def _plain(key: Any) -> bool:
    """A key a path can name: `a.b` is a path of two, `$x` an operator, `` nothing."""
    return type(key) is str and key != "" and "." not in key and not key.startswith("$")


def _in_order(old: list[Any], keys: list[Any]) -> bool:
    """Whether mongod, updating a dict with the keys `old` in place, ends with the key order `keys`: the
    keys kept stay where they were, and those added go after them in the order mongod adds them."""
    present = set(keys)
    kept = [k for k in old if k in present]
    if keys[: len(kept)] != kept:
        return False
    added = keys[len(kept) :]
    if len(added) < 2:
        return True
    return all(type(k) is str and k[:1] not in _DIGITS for k in added) and added == sorted(added)


_DIGITS = frozenset("0123456789")
