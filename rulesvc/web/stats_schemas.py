"""The query of `GET /v1/stats` (its response is `core.statsreport.StatsReport`, which the `rulesvc stats`
command prints too)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

# Checked by the view (a plain sentence rather than a pattern in the 422); the document declares the
# pattern, so that a client (and a schema-driven fuzzer) knows what the view accepts.
NAME = {"pattern": "^[a-z][a-z0-9_]{0,63}$"}
RulesetParam = Annotated[
    str,
    msgspec.Meta(
        description="the ruleset (required): lower case letters, digits and _", extra_json_schema=NAME
    ),
]
RuleParam = Annotated[str, msgspec.Meta(description="only this rule's counts", extra_json_schema=NAME)]
FromParam = Annotated[
    datetime,
    msgspec.Meta(tz=True, description="the window's start, RFC 3339 with offset (default: `to` less 7 days)"),
]
ToParam = Annotated[
    datetime,
    msgspec.Meta(
        tz=True,
        description="the window's end, exclusive, RFC 3339 with offset (default: the end of this hour)",
    ),
]
ByParam = Annotated[
    Literal["hour", "day"], msgspec.Meta(description="also a series: the funnel per UTC hour or day")
]


class StatsQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ruleset: RulesetParam
    rule: RuleParam | None = None
    from_: FromParam | None = msgspec.field(default=None, name="from")
    to: ToParam | None = None
    by: ByParam | None = None
