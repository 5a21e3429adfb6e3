"""Durations as rulesets write them: `30s`, `20m`, `12h`, `2d`, `1w`, or combined like `1h30m`."""

from __future__ import annotations

import functools
import re
from datetime import timedelta

DURATION_PATTERN = r"^([0-9]+[smhdw])+$"
_PART = re.compile(r"([0-9]+)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Longer than any flow waits, and far inside what dates can hold once added to an event's time (year 9999).
MAX_DURATION = timedelta(days=36525)


@functools.lru_cache(maxsize=1024)  # rulesets name few durations, and evaluate them per event
def parse_duration(text: str) -> timedelta:
    if not re.match(DURATION_PATTERN, text):
        raise ValueError(f"invalid duration {text!r}: use e.g. 30s, 20m, 12h, 2d, 1w or 1h30m")
    seconds = sum(int(n) * _SECONDS[unit] for n, unit in _PART.findall(text))
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f'expected a duration of at most 100 years, got "{text}"')
    return timedelta(seconds=seconds)
