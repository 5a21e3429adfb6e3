"""The Segment mapping file, read once at start-up: the shipped one, or RULESVC_SEGMENT_MAPPING's."""

from __future__ import annotations

from pathlib import Path

from rulesvc.config import ConfigError, Settings
from rulesvc.core.ruleformat import RulesetError
from rulesvc.core.segment import InvalidMapping, SegmentMapping, parse_mapping

SHIPPED_MAPPING = Path(__file__).parent.parent / "sources" / "segment_mapping.json"


def mapping_path(settings: Settings) -> Path:
    return Path(settings.segment_mapping) if settings.segment_mapping else SHIPPED_MAPPING


def read_mapping(path: Path) -> SegmentMapping:
    """The mapping in `path`, or InvalidMapping with every problem (a file that cannot be read too)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidMapping([RulesetError(str(path), "$", f"cannot read: {exc.strerror}")]) from exc
    return parse_mapping(str(path), data)


def load_mapping(settings: Settings) -> SegmentMapping:
    """For start-up: a broken file stops the service with each problem on a line of its own."""
    try:
        return read_mapping(mapping_path(settings))
    except InvalidMapping as exc:
        lines = "\n".join(str(e) for e in exc.errors)
        raise ConfigError(f"RULESVC_SEGMENT_MAPPING: the mapping file is invalid:\n{lines}") from exc
