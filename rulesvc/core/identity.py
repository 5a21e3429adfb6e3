"""Contacts known only by another system's anonymous id."""

from __future__ import annotations


def anonymous_contact_id(anonymous_id: str) -> str:
    """The contact of a visitor known only by a Segment `anonymousId`, until it is linked to a known one."""
    return f"anon:{anonymous_id}"
