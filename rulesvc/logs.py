"""structlog set-up: JSON lines in production, readable lines on a terminal, no personal data."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
_PHONE = re.compile(r"\+\d[\d \-()]{6,}(\d{2})")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_API_KEY = re.compile(r"rsk_[0-9a-f]{12}_[A-Za-z0-9_-]+")
_SECRET_KEYS = frozenset({"authorization", "api_key", "password", "secret", "token", "private_key"})


def mask(text: str) -> str:
    """j***@example.com, ***45, Bearer ***: enough to debug, not enough to identify or reuse."""
    text = _BEARER.sub(r"\1***", text)
    text = _API_KEY.sub("rsk_***", text)
    text = _EMAIL.sub(r"\1***@\2", text)
    return _PHONE.sub(r"***\1", text)


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: "***" if str(k).lower() in _SECRET_KEYS else _mask_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_value(v) for v in value]
    return value


def mask_personal_data(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The last processor before rendering: whatever a caller logged, emails, phones and keys leave masked."""
    for key, value in list(event_dict.items()):
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = "***"
        elif key != "timestamp":
            event_dict[key] = _mask_value(value)
    return event_dict


def configure(log_format: str = "auto", level: str = "info", file: TextIO | None = None) -> None:
    file = file or sys.stderr
    use_json = log_format == "json" or (log_format == "auto" and not file.isatty())
    # Tracebacks without the frames' locals, whichever formatter is installed: rich's and
    # better-exceptions' show them by default, and a frame holding the settings would print the channel
    # secrets and the MongoDB password (a failing backtest job did).
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=True, exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else structlog.dev.set_exc_info,
            mask_personal_data,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # One write per line: print() writes the line and its newline apart, and on an unbuffered stderr
        # a worker's line relayed by the supervisor landed between them (two JSON objects on one line).
        logger_factory=structlog.WriteLoggerFactory(file=file),
        cache_logger_on_first_use=True,
    )
    # aiohttp and pymongo log through the standard library: keep only their warnings.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
