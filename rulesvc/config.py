"""Settings: defaults, then an optional TOML file, then environment variables, then CLI flags."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from rulesvc.core.privacy import TombstoneMode

LogFormat = Literal["auto", "json", "console"]


class ConfigError(Exception):
    """A setting has a value the service cannot use."""


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 0  # 0 = one per CPU core
    mongodb_uri: str | None = None
    embedded_mongod: bool = True
    database: str = "rulesvc"
    data_dir: str = ".rulesvc"
    mongod_bin: str | None = None
    mongod_cache_gb: float = 1.0
    rulesets_dir: str = "rulesets"
    event_retention_days: float = 90.0
    message_retention_days: float = 365.0
    max_body_bytes: int = 5 * 1024 * 1024
    max_batch_events: int = 10_000
    simulate_max_events: int = 20_000
    simulate_max_contacts: int = 20_000
    simulate_budget_seconds: float = 30.0
    lease_seconds: float = 15.0
    shutdown_grace_seconds: float = 30.0
    open_ops: bool = False
    rate_limit: float = 500.0  # requests per second per API key and process; bursts of twice that
    mongodb_timeout_seconds: float = 5.0
    degraded_lag_seconds: float = 60.0
    degraded_quarantine_hours: float = 1.0
    templates_dir: str | None = None  # default: <rulesets_dir>/templates
    plugins: list[str] | None = None
    channels: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    frequency_caps: dict[str, int] = msgspec.field(
        default_factory=lambda: {"email": 3, "sms": 2, "push": 4, "webpush": 4}
    )
    quiet_hours: str = "21:00-08:00"
    default_timezone: str = "UTC"
    max_attempts: int = 6
    retry_base_seconds: float = 30.0
    retry_max_seconds: float = 3600.0
    log_format: LogFormat = "auto"
    log_level: str = "info"
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    fanout_direct: bool = False
    stats: bool = True
    console: bool = True
    console_session_hours: float = 12.0
    console_secure_cookies: bool = False
    console_origin: str | None = None
    # --- Shopify webhooks (issue 18) ---
    shopify_secret: str | None = None  # comma-separated while a rotated secret still signs
    # --- Segment / RudderStack ingest (issue 18) ---
    segment_mapping: str | None = None  # default: the shipped rulesvc/sources/segment_mapping.json
    segment_traits: Literal["fill-empty", "overwrite"] = "fill-empty"
    # --- privacy requests (issue 18) ---
    erasure_tombstone: TombstoneMode = "old-events"

    def with_overrides(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class SettingDoc:
    field: str
    env: str
    help: str


# One row per setting: the variable that sets it and what it means. `rulesvc serve --help` prints these,
# and docs/configuration.md is generated from them with the types and defaults of `Settings`
# (`python -m rulesvc.configdoc > docs/configuration.md`; a test fails when it is stale).
SETTINGS_DOC: tuple[SettingDoc, ...] = (
    SettingDoc("host", "RULESVC_HOST", "address to listen on"),
    SettingDoc("port", "RULESVC_PORT", "TCP port to listen on"),
    SettingDoc("workers", "RULESVC_WORKERS", "worker processes sharing the port; 0 = one per CPU core"),
    SettingDoc(
        "mongodb_uri",
        "MONGODB_URI",
        "MongoDB to use (replica set or sharded cluster); unset = start an embedded mongod",
    ),
    SettingDoc(
        "embedded_mongod",
        "RULESVC_EMBEDDED_MONGOD",
        "start a mongod when MONGODB_URI is unset; false makes MONGODB_URI required (containers)",
    ),
    SettingDoc("database", "RULESVC_DATABASE", "MongoDB database name"),
    SettingDoc(
        "data_dir",
        "RULESVC_DATA_DIR",
        "the embedded mongod's data, log and pid file; relative to the folder the service starts in",
    ),
    SettingDoc(
        "mongod_bin",
        "MONGOD_BIN",
        "mongod binary for the embedded mode; unset = the [embedded] extra's, never one on PATH",
    ),
    SettingDoc(
        "mongod_cache_gb",
        "RULESVC_MONGOD_CACHE_GB",
        "the embedded mongod's WiredTiger cache; below the working set it thrashes; 0 = mongod's default",
    ),
    SettingDoc(
        "rulesets_dir",
        "RULESVC_RULESETS_DIR",
        "folder of JSON rulesets, watched for changes; relative to the folder the service starts in",
    ),
    SettingDoc(
        "event_retention_days",
        "RULESVC_EVENT_RETENTION_DAYS",
        "days raw events are kept (a TTL index; changing it updates the index)",
    ),
    SettingDoc(
        "message_retention_days",
        "RULESVC_MESSAGE_RETENTION_DAYS",
        "days a message's history is kept from its creation once it is final (sent, failed, cancelled, ...;"
        " never one still scheduled or sending), and a schedule entry from when it was done (TTL indexes;"
        " changing it updates them); docs/privacy.md",
    ),
    SettingDoc("max_body_bytes", "RULESVC_MAX_BODY_BYTES", "largest request body accepted (413 above)"),
    SettingDoc("max_batch_events", "RULESVC_MAX_BATCH_EVENTS", "most events in one POST (413 above)"),
    SettingDoc(
        "simulate_max_events", "RULESVC_SIMULATE_MAX_EVENTS", "most events in one simulation (413 above)"
    ),
    SettingDoc(
        "simulate_max_contacts",
        "RULESVC_SIMULATE_MAX_CONTACTS",
        "most contacts in one simulation (413 above)",
    ),
    SettingDoc(
        "simulate_budget_seconds",
        "RULESVC_SIMULATE_BUDGET_SECONDS",
        "time one POST /v1/simulate may run, in a process of its own, before it is stopped (422)",
    ),
    SettingDoc(
        "lease_seconds",
        "RULESVC_LEASE_SECONDS",
        "how long a process may hold a contact's events or a due send before another takes over (after a "
        "crash); a send is cut off at two thirds of it",
    ),
    SettingDoc(
        "rate_limit",
        "RULESVC_RATE_LIMIT",
        "requests per second per API key (per process), bursts up to twice that; 0 = no limit",
    ),
    SettingDoc(
        "open_ops",
        "RULESVC_OPEN_OPS",
        "serve /healthz, /readyz and /metrics without a key to any address (default: loopback only)",
    ),
    SettingDoc(
        "templates_dir", "RULESVC_TEMPLATES_DIR", "message templates; unset = <rulesets_dir>/templates"
    ),
    SettingDoc(
        "plugins",
        "RULESVC_PLUGINS",
        "comma-separated plugin names allowed to load from entry points; unset = all installed",
    ),
    SettingDoc(
        "degraded_lag_seconds",
        "RULESVC_DEGRADED_LAG_SECONDS",
        "/readyz says degraded when the oldest unprocessed event has waited longer than this",
    ),
    SettingDoc(
        "degraded_quarantine_hours",
        "RULESVC_DEGRADED_QUARANTINE_HOURS",
        "/readyz says degraded while an event was quarantined within this many hours",
    ),
    SettingDoc(
        "mongodb_timeout_seconds",
        "RULESVC_MONGODB_TIMEOUT_SECONDS",
        "deadline of each MongoDB operation: a request answers 503 with Retry-After after it, a background "
        "loop backs off (1 s, doubling up to 5 s); start-up index builds get 120 s",
    ),
    SettingDoc(
        "channels",
        "RULESVC_CHANNEL_<NAME>_<KEY>",
        "a channel's settings ([channels.NAME] in TOML; the variables override its keys); docs/channels.md",
    ),
    SettingDoc(
        "frequency_caps",
        "RULESVC_FREQUENCY_CAPS",
        "marketing messages per channel per day in the contact's time zone, e.g. email=3,sms=2",
    ),
    SettingDoc(
        "quiet_hours",
        "RULESVC_QUIET_HOURS",
        "HH:MM-HH:MM in the contact's time zone when marketing email, SMS, push and web push wait; empty = "
        "none; per channel RULESVC_CHANNEL_<NAME>_QUIET_HOURS=true|false",
    ),
    SettingDoc("default_timezone", "RULESVC_DEFAULT_TIMEZONE", "time zone for contacts without one"),
    SettingDoc("max_attempts", "RULESVC_MAX_ATTEMPTS", "delivery attempts before a message is dead-lettered"),
    SettingDoc("retry_base_seconds", "RULESVC_RETRY_BASE_SECONDS", "first retry delay; doubles per attempt"),
    SettingDoc("retry_max_seconds", "RULESVC_RETRY_MAX_SECONDS", "longest retry delay"),
    SettingDoc(
        "shutdown_grace_seconds",
        "RULESVC_SHUTDOWN_GRACE_SECONDS",
        "on SIGTERM, how long in-flight batches and sends may take before they are cut off",
    ),
    SettingDoc(
        "log_format", "RULESVC_LOG_FORMAT", "auto (console on a terminal, else JSON), json or console"
    ),
    SettingDoc("log_level", "RULESVC_LOG_LEVEL", "debug, info, warning or error"),
    SettingDoc(
        "fanout_direct",
        "RULESVC_FANOUT_DIRECT",
        "a catalog change is decided for each batch of interested contacts by the fan-out itself (every "
        "worker takes parts of it), under the inbox's leases, without a stored copy per contact (fewer "
        "writes); false: a stored, queued copy per contact, decided by every worker's inbox (faster on a "
        "small machine: BENCHMARKS.md)",
    ),
    SettingDoc(
        "event_loop",
        "RULESVC_EVENT_LOOP",
        "the workers' asyncio event loop: uvloop (libuv; less CPU per request and per MongoDB round trip) "
        "or asyncio (the standard library's)",
    ),
    SettingDoc(
        "stats",
        "RULESVC_STATS",
        "count every decision and outcome per hour, ruleset, rule, variant and channel in `stats` (the "
        "funnel), in the transaction of the decision; false = nothing written there",
    ),
    SettingDoc("console", "RULESVC_CONSOLE", "serve the web console under /console/; false = not at all"),
    SettingDoc(
        "console_session_hours",
        "RULESVC_CONSOLE_SESSION_HOURS",
        "how long a console login lasts; logging out or revoking its API key ends it sooner",
    ),
    SettingDoc(
        "console_secure_cookies",
        "RULESVC_CONSOLE_SECURE_COOKIES",
        "mark the console's cookies Secure even when the service itself sees plain HTTP (behind a proxy "
        "that terminates TLS); over TLS they always are. Forms posted from https:// are then this host's too",
    ),
    SettingDoc(
        "console_origin",
        "RULESVC_CONSOLE_ORIGIN",
        "the console's public origin (https://rules.shop.example) when a proxy changes the host: console "
        "forms are accepted only from it; unset = the host the request names",
    ),
    # --- Shopify webhooks (issue 18) ---
    SettingDoc(
        "shopify_secret",
        "RULESVC_SHOPIFY_SECRET",
        "the Shopify app's client secret (or the store's webhook signing key) that signs POST "
        "/v1/sources/shopify; several comma-separated while a rotation is under way; unset = that route "
        "answers 401 (docs/shopify.md)",
    ),
    # --- Segment / RudderStack ingest (issue 18) ---
    SettingDoc(
        "segment_traits",
        "RULESVC_SEGMENT_TRAITS",
        "what an identify from an `ingest` write key may change: fill-empty = email, phone and timezone only "
        "where the contact has none, consent only given where none was (a withdrawal always counts), as a "
        "write key in a browser is public; overwrite = replace them (a write key only servers hold); an "
        "admin key always overwrites; other traits always merge (docs/segment.md)",
    ),
    SettingDoc(
        "segment_mapping",
        "RULESVC_SEGMENT_MAPPING",
        "JSON file mapping Segment track/page/screen calls to event types and attributes (docs/segment.md); "
        "unset = the shipped Segment E-commerce v2 mapping; a broken file stops start-up",
    ),
    # --- privacy requests (issue 18) ---
    SettingDoc(
        "erasure_tombstone",
        "RULESVC_ERASURE_TOMBSTONE",
        "after DELETE /v1/contacts/{id}: old-events = drop a posted event of that contact older than the "
        "erasure (a late retry); all = drop every event of it until a PUT re-creates the contact; off = "
        "keep every event (docs/privacy.md)",
    ),
)

CONFIG_FILE_ENV = "RULESVC_CONFIG"
# PROMETHEUS_MULTIPROC_DIR as the user set it, moved aside by the CLI before prometheus_client is imported;
# only a supervisor uses it (for its workers).
GIVEN_METRICS_DIR = "RULESVC_GIVEN_METRICS_DIR"


def _validation_error(source: str, exc: msgspec.ValidationError) -> ConfigError:
    return ConfigError(f"{source}: {exc}")


def load_settings(config_file: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Merge the sources; every value is validated so a typo fails at start-up, not at the first request."""
    env = dict(os.environ if environ is None else environ)
    raw: dict[str, Any] = {}
    path = config_file or env.get(CONFIG_FILE_ENV)
    if path:
        try:
            with open(path, "rb") as fh:
                raw.update(tomllib.load(fh))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        try:
            msgspec.convert(raw, Settings)
        except msgspec.ValidationError as exc:
            raise _validation_error(str(path), exc) from exc
    for doc in SETTINGS_DOC:
        if doc.env in env and (env[doc.env] != "" or doc.field == "quiet_hours"):
            raw[doc.field] = _parse_env(doc.field, env[doc.env])
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise _validation_error("environment", exc) from exc
    check(settings)
    try:
        from rulesvc.runtime.dispatcher import quiet_channels

        quiet_channels(settings.channels, env)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return settings


def _parse_env(name: str, value: str) -> Any:
    """Lists and maps come as `a,b` and `k=v,k=v` in the environment."""
    if name == "plugins":
        return [p.strip() for p in value.split(",") if p.strip()]
    if name == "frequency_caps":
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(f"frequency_caps: expected channel=number pairs, got {value!r}")
        return {k.strip(): v.strip() for k, v in pairs}
    return value


def check(settings: Settings) -> None:
    if not 0 < settings.port < 65536:
        raise ConfigError(f"port must be 1-65535, got {settings.port}")
    if settings.mongod_cache_gb != 0 and settings.mongod_cache_gb < 0.25:
        raise ConfigError(
            f"mongod_cache_gb must be 0 (mongod's default) or at least 0.25, got {settings.mongod_cache_gb}"
        )
    if settings.workers < 0:
        raise ConfigError(f"workers must be 0 (one per core) or more, got {settings.workers}")
    if settings.event_retention_days <= 0:
        raise ConfigError("event_retention_days must be positive")
    if settings.message_retention_days <= 0:
        raise ConfigError("message_retention_days must be positive")
    if settings.max_body_bytes < 1024:
        raise ConfigError("max_body_bytes must be at least 1024")
    if settings.max_batch_events < 1:
        raise ConfigError("max_batch_events must be at least 1")
    if settings.simulate_max_events < 1 or settings.simulate_max_contacts < 0:
        raise ConfigError("simulate_max_events must be at least 1, simulate_max_contacts at least 0")
    if not 0 < settings.simulate_budget_seconds <= 3600:
        raise ConfigError(
            f"simulate_budget_seconds must be in (0, 3600], got {settings.simulate_budget_seconds}"
        )
    if not settings.mongodb_uri and not settings.embedded_mongod:
        raise ConfigError("MONGODB_URI is required when RULESVC_EMBEDDED_MONGOD is false")
    try:
        from rulesvc.runtime.dispatcher import parse_quiet_hours

        parse_quiet_hours(settings.quiet_hours)
    except ValueError as exc:
        raise ConfigError(f"quiet_hours must look like 21:00-08:00, got {settings.quiet_hours!r}") from exc
    if not 0 < settings.mongodb_timeout_seconds <= 3600:
        raise ConfigError(
            f"mongodb_timeout_seconds must be in (0, 3600], got {settings.mongodb_timeout_seconds}"
        )
    if settings.max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1")
    if settings.console_origin is not None and not re.fullmatch(
        r"https?://[^/\s]+/?", settings.console_origin
    ):
        raise ConfigError(
            f"console_origin must look like https://host[:port], got {settings.console_origin!r}"
        )
    if not 0 < settings.console_session_hours <= 24 * 30:
        raise ConfigError(f"console_session_hours must be in (0, 720], got {settings.console_session_hours}")
    if settings.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"log_level must be debug, info, warning or error, got {settings.log_level!r}")
