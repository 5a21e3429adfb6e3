"""The one id rule: what a contact id or an event id may be, wherever it arrives (body, path, CLI).

Ids end up in URL paths, log lines, MongoDB keys and e-mail headers, so they may not hold whitespace,
`/` or control characters (NUL, CR, LF). The service's own ids (fan-out copies, timer and outcome events,
message ids) always contain a `/`: a client id can never take one of them first.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

MAX_ID_LENGTH = 128
# `(?!\n)` before `$`: Python's `$` also matches before a trailing newline, which must not pass.
ID_PATTERN = r"^[^\s/\x00-\x1f\x7f-\x9f]+(?!\n)$"
ID_RULE = f"1-{MAX_ID_LENGTH} characters without whitespace, `/` or control characters"
GENERATED_SEPARATOR = "/"  # in every id the service makes; refused in client ids

Id = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN, description=ID_RULE)
]

_ID = re.compile(ID_PATTERN)


def id_problem(value: str, what: str = "id") -> str | None:
    """Why `value` is not a valid id, in words a user can act on; None when it is valid."""
    if not value:
        return f"{what} is empty; ids are {ID_RULE}"
    if len(value) > MAX_ID_LENGTH:
        return f"{what} is longer than {MAX_ID_LENGTH} characters"
    if not _ID.match(value):
        return f"{what} may not contain whitespace, `/` or control characters"
    return None


def fanout_copy_id(event_id: str, contact_id: str) -> str:
    """A catalog event's copy for one contact: fixed (a resumed fan-out cannot double it) and in the
    service's own namespace (a client cannot post an event under this id beforehand)."""
    return f"{event_id}{GENERATED_SEPARATOR}{contact_id}"
