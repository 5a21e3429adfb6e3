"""The `rulesvc` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO, get_args

from rulesvc import __version__
from rulesvc.config import (
    CONFIG_FILE_ENV,
    GIVEN_METRICS_DIR,
    SETTINGS_DOC,
    ConfigError,
    Settings,
    load_settings,
)
from rulesvc.core.messages import MessageStatus
from rulesvc.core.reasons import REASONS

if TYPE_CHECKING:
    from pathlib import Path

    from pymongo.asynchronous.database import AsyncDatabase


def _settings_epilog() -> str:
    defaults = Settings()
    rows = [f"  {d.env:<30} {d.help} (default: {getattr(defaults, d.field)!s})" for d in SETTINGS_DOC]
    return (
        "settings (environment variables; the same names in lower case, without the RULESVC_ prefix,\n"
        f"work as keys in the TOML file given by --config or {CONFIG_FILE_ENV}):\n" + "\n".join(rows)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rulesvc", description="Real-time trigger-marketing engine.")
    parser.add_argument("--version", action="version", version=f"rulesvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the HTTP service. Without MONGODB_URI it starts and stops its own mongod.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="address to listen on (RULESVC_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (RULESVC_PORT)")
    serve.add_argument("--config", metavar="FILE", help=f"TOML settings file ({CONFIG_FILE_ENV})")
    serve.add_argument(
        "--workers", type=int, metavar="N", help="worker processes sharing the port (RULESVC_WORKERS)"
    )
    # A worker of `--workers N`: binds with SO_REUSEPORT beside its siblings.
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    check = commands.add_parser(
        "check",
        help="validate rulesets and the Segment mapping",
        description="Validate and compile every ruleset in DIR, as the service would load them, and the "
        "Segment mapping file (RULESVC_SEGMENT_MAPPING, else the shipped one). "
        "Prints every error as file:line:column: json-path: message, and warnings (valid, but some "
        "messages would fail or be suppressed) as warning: ...; exits 1 if there is any error.",
    )
    check.add_argument("dir", nargs="?", default=None, help="rulesets folder (default: RULESVC_RULESETS_DIR)")
    check.add_argument(
        "--segment-mapping",
        metavar="FILE",
        help="Segment mapping file to validate too (default: RULESVC_SEGMENT_MAPPING, else the shipped one)",
    )

    sim = commands.add_parser(
        "simulate",
        help="replay events against rulesets on a virtual clock",
        description="Run the rulesets over EVENTS (NDJSON, one event per line, each with a time) on a "
        "virtual clock and print every message that would go out, and when. Sends and stores nothing.",
    )
    sim.add_argument("events", help="NDJSON file of events ('-' for standard input)")
    sim.add_argument("--contacts", metavar="FILE", help="NDJSON file of contacts (contact_id plus profile)")
    sim.add_argument(
        "--until", metavar="TIME", help="RFC 3339 end of the virtual clock (default: 90 days on)"
    )
    sim.add_argument("--rulesets", metavar="DIR", help="rulesets folder (default: RULESVC_RULESETS_DIR)")
    sim.add_argument("--json", action="store_true", help="print the actions as JSON instead of a table")

    bt = commands.add_parser(
        "backtest",
        help="replay stored events through the live rulesets and a candidate, side by side",
        description="Replay the stored events of a window through two ruleset versions (the live "
        "folder, or --baseline, and the candidate --rulesets) with the service's channels and send rules, "
        "and print per rule and channel what each would have sent, suppressed, cancelled or postponed, "
        "the contacts that gain or lose a message, and the baseline against what the service recorded. "
        "Sends and writes nothing. Uses MONGODB_URI, or the embedded data dir's mongod.",
    )
    window = bt.add_mutually_exclusive_group()
    window.add_argument("--since", metavar="DURATION", help="how far back, e.g. 14d, 36h (default 14d)")
    window.add_argument("--from", dest="start", metavar="TIME", help="RFC 3339 start of the window")
    bt.add_argument("--until", metavar="TIME", help="RFC 3339 end of the window (default now)")
    bt.add_argument("--rulesets", metavar="DIR",
                    help="the candidate folder (default: the live folder, RULESVC_RULESETS_DIR)")  # fmt: skip
    bt.add_argument("--baseline", metavar="DIR",
                    help="the baseline folder (default: the live folder, RULESVC_RULESETS_DIR)")  # fmt: skip
    bt.add_argument("--contacts", metavar="ID[,ID...]", help="only these contacts")
    bt.add_argument("--examples", type=int, default=5, metavar="N",
                    help="contacts shown each way (gain, lose) and mismatches, 0-50 (default 5)")  # fmt: skip
    bt.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")

    st = commands.add_parser(
        "stats",
        help="a ruleset's funnel, and its holdout or A/B uplift with 95 % intervals",
        description="Print RULESET's counts over a window (entered, scheduled, sent, suppressed by reason, "
        "held out, delivered... converted, revenue), per rule, group and channel, and for a ruleset with "
        "a holdout or variants each group's conversion rate and the uplift between groups; the same as "
        "GET /v1/stats. Counts are hourly: the window takes every hour it overlaps. Uses MONGODB_URI, "
        "or the embedded data dir's mongod; reads the ruleset's file for its holdout and arms.",
    )
    st.add_argument("ruleset", help="the ruleset's name")
    st_window = st.add_mutually_exclusive_group()
    st_window.add_argument("--since", metavar="DURATION",
                           help="how far back from --until, e.g. 7d, 36h (default 7d)")  # fmt: skip
    st_window.add_argument("--from", dest="start", metavar="TIME", help="RFC 3339 start of the window")
    st.add_argument("--until", metavar="TIME",
                    help="RFC 3339 end of the window, exclusive (default: the end of this hour)")  # fmt: skip
    st.add_argument("--rule", help="only this rule's counts")
    st.add_argument("--by", choices=["hour", "day"], help="also the funnel per UTC hour or day")
    st.add_argument("--json", action="store_true", help="print the report as JSON (as the API answers)")

    keys = commands.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="API keys for the HTTP API. Uses MONGODB_URI, or the embedded data dir's mongod.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser(
        "create", help="create a key; it is printed once, alone on the last line"
    )
    create.add_argument("--scope", choices=["ingest", "read", "admin"], required=True,
                        help="ingest: post events and use the in-app inbox; read: look at everything "
                        "(admin GETs, the console read-only), change nothing; admin: everything")  # fmt: skip
    create.add_argument("--name", default="", help="what the key is for")
    key_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")

    token = commands.add_parser(
        "inbox-token",
        help="mint a contact's in-app inbox token",
        description="Print a token that opens CONTACT's in-app inbox (GET /v1/contacts/CONTACT/inbox and "
        "its actions) until it expires; the same as POST /v1/contacts/CONTACT/inbox-token. Uses "
        "MONGODB_URI, or the embedded data dir's mongod.",
    )
    token.add_argument("contact", help="the contact id")
    token.add_argument("--ttl", default="1h", help="how long it works, e.g. 15m, 1h, 7d (at most 30d)")

    events = commands.add_parser(
        "events",
        help="list, retry and drop quarantined events",
        description="Events whose evaluation failed repeatedly are set aside (quarantined) with their error "
        "while every other event goes on. Uses MONGODB_URI, or the embedded data dir's mongod.",
    )
    event_commands = events.add_subparsers(dest="events_command", required=True, metavar="WHAT")
    quarantine = event_commands.add_parser("quarantine", help="the quarantined events")
    q_commands = quarantine.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")
    q_list = q_commands.add_parser("list", help="newest first, each with its error")
    q_list.add_argument("--limit", type=int, default=50, help="most events to list (default 50)")
    q_list.add_argument("--json", action="store_true", help="print JSON instead of text")
    for name, text in (
        ("retry", "evaluate again (after a fix)"),
        ("drop", "never evaluate; kept in history"),
    ):
        act = q_commands.add_parser(name, help=text)
        act.add_argument("ids", nargs="*", metavar="EVENT_ID")
        act.add_argument("--all", action="store_true", help="every quarantined event")

    messages = commands.add_parser(
        "messages",
        help="list, show, retry and cancel messages",
        description="Messages across contacts, each with its status and reason code; retry dead letters "
        "(or failed or uncertain messages), cancel scheduled, dead or uncertain ones. The same as "
        "GET /v1/messages and POST /v1/messages/ID/retry|cancel. Uses MONGODB_URI, or the embedded data "
        "dir's mongod.",
    )
    m_commands = messages.add_subparsers(dest="messages_command", required=True, metavar="ACTION")
    m_list = m_commands.add_parser("list", help="newest first, with filters")
    m_list.add_argument("--status", choices=get_args(MessageStatus), metavar="STATUS",
                        help="e.g. dead, failed, uncertain, suppressed, scheduled")  # fmt: skip
    m_list.add_argument("--channel", help="the channel the rule named or the one used")
    m_list.add_argument("--ruleset", help="the ruleset that sent it")
    m_list.add_argument("--reason", choices=sorted(REASONS), metavar="CODE",
                        help="a reason code, e.g. no_consent (docs/channels.md)")  # fmt: skip
    m_list.add_argument("--contact", help="one contact's messages")
    m_list.add_argument("--limit", type=int, default=50, help="most messages to list (default 50)")
    m_list.add_argument("--json", action="store_true", help="print JSON instead of text")
    m_show = m_commands.add_parser("show", help="one message, every field")
    m_show.add_argument("id", metavar="MESSAGE_ID")
    for name, text in (
        ("retry", "send again now: a dead, failed or uncertain message is scheduled, due now"),
        (
            "cancel",
            "never send: a scheduled, dead or uncertain message is cancelled (reason "
            "cancelled_by_operator); a dead or uncertain one is never retried",
        ),
    ):
        m_act = m_commands.add_parser(name, help=text)
        m_act.add_argument("ids", nargs="+", metavar="MESSAGE_ID")

    contacts = commands.add_parser(
        "contacts",
        help="show, export or erase a contact",
        description="Uses MONGODB_URI, or the embedded data dir's mongod.",
    )
    c_commands = contacts.add_subparsers(dest="contacts_command", required=True, metavar="ACTION")
    c_show = c_commands.add_parser(
        "show",
        help="profile, consent, suppressions, then events and messages oldest first, pending sends last",
    )
    c_show.add_argument("contact", help="the contact id")
    c_show.add_argument("--limit", type=int, default=50, help="most recent events and messages (default 50)")
    c_show.add_argument("--json", action="store_true", help="print JSON instead of text")
    # --- privacy requests (issue 18; docs/privacy.md) ---
    c_erase = c_commands.add_parser(
        "erase",
        help="erase a contact everywhere (as DELETE /v1/contacts/{id}); asks first unless --yes",
    )
    c_erase.add_argument("contact", help="the contact id")
    c_erase.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    c_export = c_commands.add_parser(
        "export", help="everything stored about a contact as one JSON document (as GET .../export)"
    )
    c_export.add_argument("contact", help="the contact id")
    c_export.add_argument("-o", "--output", help="write to this file instead of standard output")
    # --- end privacy requests ---

    commands.add_parser(
        "plugins",
        help="list plugins, their channels and jobs",
        description="List the plugins that load (built-in first, then installed entry points of group "
        "`rulesvc`), each channel and job with its kind, whether it is configured (or which setting is "
        "missing or wrong), and a job's last run and last error (from MONGODB_URI or the running "
        "service's mongod; none is started). Exits 1 on a broken plugin or a wrong setting.",
    )

    mig = commands.add_parser(
        "migrate",
        help="upgrade the database to this release's schema (`serve` does it at start)",
        description="Check the database's schema version (MONGODB_URI or the service's embedded mongod) and "
        "run the migrations it has not had, in order: idempotent and resumable, so an interrupted run is "
        "finished by the next one. Stop every instance of the older release first; if one ran on the "
        "database after its upgrade, this takes back the events it left undecided. Exits 1 on a database "
        "written by a newer release.",
    )
    mig.add_argument("--status", action="store_true", help="only print the versions, change nothing")
    mig.add_argument(
        "--force",
        action="store_true",
        help="take back an older release's undecided events even if it stored one in the last 5 minutes",
    )

    commands.add_parser(
        "schema",
        help="print the ruleset JSON Schema",
        description="Print the JSON Schema of ruleset files (rulesets/schema.json is this output).",
    )
    return parser


def migrate_command(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from rulesvc.store.db import Store
    from rulesvc.store.migrations import (
        MIGRATIONS,
        SCHEMA_VERSION,
        older_release_seen,
        prepare,
        refuse_newer,
        take_back,
    )

    settings = load_settings()

    async def act(db: AsyncDatabase[dict[str, Any]]) -> int:
        store = Store(db.client, db.name, timedelta(days=settings.event_retention_days))
        before = await refuse_newer(store)
        if args.status:
            todo = [m.name for m in MIGRATIONS if m.version > before]
            print(f"database {db.name}: schema {before}; this release: {SCHEMA_VERSION}")
            print(f"to run: {', '.join(todo)}" if todo else "up to date")
            older = await older_release_seen(store, before)
            if older:
                print(f"warning: {older}")
            return 0
        applied = await prepare(store)
        print(f"database {db.name}: schema {before} -> {SCHEMA_VERSION}")
        print(f"ran: {', '.join(applied)}" if applied else "nothing to run")
        taken = await take_back(store, force=args.force)
        if taken is not None:
            print(
                f"taken back from the older release: {taken['pending']} undecided event(s) queued for this "
                f"one, {taken['quarantined']} quarantined (see GET /v1/events/quarantine)"
            )
        return 0

    return _with_database(act)


def inbox_token_command(args: argparse.Namespace) -> int:
    from rulesvc.core.ids import id_problem
    from rulesvc.store.keys import TTL_RULE, InboxTokens, inbox_token_ttl

    problem = id_problem(args.contact, "contact_id")
    ttl = inbox_token_ttl(args.ttl)
    if problem or ttl is None:
        print(f"rulesvc: {problem or '--' + TTL_RULE}", file=sys.stderr)
        return 1

    async def act(db: AsyncDatabase[dict[str, Any]]) -> int:
        token, expires_at = await InboxTokens(db["secrets"]).mint(args.contact, ttl)
        print(
            f"inbox token for {args.contact}, valid until {expires_at:%Y-%m-%dT%H:%M:%SZ}:", file=sys.stderr
        )
        print(token)
        return 0

    return _with_database(act)


def _with_database(
    act: Callable[[AsyncDatabase[dict[str, Any]]], Awaitable[int]], settings: Settings | None = None
) -> int:
    """Runs `act` on the service's database: MONGODB_URI, the running service's embedded mongod, or,
    when no service runs on this data dir, its mongod started just for this."""
    import asyncio

    from pymongo import AsyncMongoClient

    from rulesvc.store.mongod import EmbeddedMongod

    settings = settings or load_settings()
    mongod: EmbeddedMongod | None = None
    uri = settings.mongodb_uri
    if not uri:
        embedded = EmbeddedMongod(settings.data_dir, settings.mongod_bin, cache_gb=settings.mongod_cache_gb)
        uri = embedded.running_uri()
        if uri is None:
            embedded.start()
            mongod, uri = embedded, embedded.uri

    async def run() -> int:
        # Fails fast when nothing answers; no overall deadline, as an index build may take its time.
        selection_ms = int(settings.mongodb_timeout_seconds * 1000)
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri, tz_aware=True, serverSelectionTimeoutMS=selection_ms
        )
        try:
            return await act(client[settings.database])
        finally:
            await client.close()

    try:
        return asyncio.run(run())
    finally:
        if mongod is not None:
            mongod.stop()


def keys_command(args: argparse.Namespace) -> int:
    from rulesvc.store.keys import Keys

    async def act(db: AsyncDatabase[dict[str, Any]]) -> int:
        keys = Keys(db["api_keys"])
        if args.keys_command == "create":
            key, record = await keys.create(args.scope, args.name)
            print(f"created {record.scope} key {record.key_id}; it is shown only now:")
            print(key)
            return 0
        if args.keys_command == "list":
            for doc in await keys.list():
                state = f"revoked {doc['revoked_at']:%Y-%m-%d}" if doc.get("revoked_at") else "active"
                created = f"{doc['created_at']:%Y-%m-%d}"
                print(f"{doc['_id']}  {doc['scope']:<7} {state:<18} {created}  {doc.get('name', '')}")
            return 0
        if await keys.revoke(args.key_id):
            print(f"revoked {args.key_id}")
            return 0
        print(f"rulesvc: no active key {args.key_id}", file=sys.stderr)
        return 1

    return _with_database(act)


def events_command(args: argparse.Namespace) -> int:
    """`events quarantine list|retry|drop`: the same queries as the HTTP API, from the operator's shell."""
    from datetime import UTC, timedelta

    from rulesvc.store.db import Store
    from rulesvc.store.migrations import prepare_for_command

    settings = load_settings()

    async def act(db: AsyncDatabase[dict[str, Any]]) -> int:
        store = Store(db.client, db.name, timedelta(days=settings.event_retention_days))
        # Its queries use the service's indexes, even on a fresh database; an existing TTL stays the
        # service's (this shell's RULESVC_EVENT_RETENTION_DAYS may differ).
        await prepare_for_command(store)
        if args.quarantine_command == "list":
            docs = await store.quarantined(args.limit)
            if args.json:
                print(json.dumps([_quarantine_row(d) for d in docs], indent=2))
                return 0
            if not docs:
                print("no quarantined events")
            for d in docs:
                contact = d.get("contact_id") or "-"
                at = f"{d['quarantined_at']:%Y-%m-%dT%H:%M:%SZ}"
                print(f"{d['_id']}  {d['type']}  contact={contact}  stage={d.get('stage')}  "
                      f"attempts={d.get('attempts')}  at={at}")  # fmt: skip
                print(f"    {d.get('error', '')}")
            return 0
        if not args.ids and not args.all:
            print("rulesvc: name the event ids, or --all", file=sys.stderr)
            return 2
        if args.ids and args.all:
            print("rulesvc: give event ids or --all, not both", file=sys.stderr)
            return 2
        count = await store.release_quarantined(args.ids or None, args.quarantine_command, datetime.now(UTC))
        print(f"{'retried' if args.quarantine_command == 'retry' else 'dropped'} {count} event(s)")
        return 0

    return _with_database(act, settings)


def _plain(value: Any) -> Any:
    """A stored document as JSON can carry it: times in RFC 3339."""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%dT%H:%M:%SZ}" if isinstance(value, datetime) else "-"


def _in(delta: Any) -> str:
    """` (in 2h 5m)`, or ` (overdue)`: how far a due time is, at a glance."""
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return " (overdue)"
    hours, minutes = divmod(seconds // 60, 60)
    return f" (in {hours}h {minutes}m)" if hours else f" (in {minutes}m {seconds % 60}s)"


def _message_line(m: Any) -> str:
    """One message in a line: id, time, contact, ruleset/rule, channel, status, reason code, detail."""
    channel = m.sent_channel or m.channel
    why = f" {m.reason}" if m.reason else ""
    detail = f"  ({m.detail})" if m.detail else ""
    return (f"{m.message_id}  {_when(m.created_at)}  contact={m.contact_id}  {m.ruleset}/{m.rule}  "
            f"{channel}  {m.status}{why}{detail}")  # fmt: skip


def messages_command(args: argparse.Namespace) -> int:
    """`messages list|show|retry|cancel`: the store's queries and the same retry and cancel as the API."""
    from datetime import UTC, timedelta

    import msgspec

    from rulesvc.runtime.fate import Refusal, cancel_message, retry_message
    from rulesvc.store.db import Store, message_from_doc
    from rulesvc.store.messages import Messages
    from rulesvc.store.migrations import prepare_for_command

    settings = load_settings()

    async def act(db: AsyncDatabase[dict[str, Any]]) -> int:
        retention = timedelta(days=settings.event_retention_days)
        store = Store(db.client, db.name, retention, count_stats=settings.stats)
        await prepare_for_command(store)  # never upgrades data; the service's TTL stays as it is
        messages = Messages(store)
        if args.messages_command == "list":
            docs = await messages.find(max(1, args.limit), status=args.status, channel=args.channel,
                                       ruleset=args.ruleset, reason=args.reason,
                                       contact_id=args.contact)  # fmt: skip
            found = [message_from_doc(d) for d in docs]
            if args.json:
                sys.stdout.buffer.write(msgspec.json.encode(found) + b"\n")
                return 0
            if not found:
                print("no messages")
            for m in found:
                print(_message_line(m))
            return 0
        if args.messages_command == "show":
            doc = await messages.get(args.id)
            if doc is None:
                print(f"rulesvc: no message {args.id}", file=sys.stderr)
                return 1
            sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(message_from_doc(doc))) + b"\n")
            return 0
        failed = 0
        for message_id in args.ids:
            if args.messages_command == "retry":
                result = await retry_message(store, message_id, datetime.now(UTC))
            else:
                result = await cancel_message(store, message_id, datetime.now(UTC))
            if result is None:
                print(f"rulesvc: no message {message_id}", file=sys.stderr)
                failed += 1
            elif isinstance(result, Refusal):
                allowed = ", ".join(result.allowed)
                print(f"rulesvc: {message_id} is {result.status}; {args.messages_command} applies to a "
                      f"message that is {allowed}", file=sys.stderr)  # fmt: skip
                failed += 1
            elif args.messages_command == "retry":
                print(f"{message_id}: scheduled again, due now (retry {result.get('retries')})")
            else:
                print(f"{message_id}: cancelled")
        return 1 if failed else 0

    return _with_database(act, settings)


def contacts_command(args: argparse.Namespace) -> int:
    """`contacts show`: what the service knows of one contact, and what it did and will do for them."""
    if args.contacts_command in ("erase", "export"):
        return privacy_command(args)
    from datetime import UTC, timedelta

    from rulesvc.core.ids import id_problem
    from rulesvc.store.db import Store, contact_from_doc, message_from_doc
    from rulesvc.store.messages import Messages
    from rulesvc.store.migrations import prepare_for_command

    problem = id_problem(args.contact, "contact_id")
    if problem:
        print(f"rulesvc: {problem}", file=sys.stderr)
        return 1
    settings = load_settings()

    async def act(db: AsyncDatabase[dict[str, Any]]) -> int:
        import msgspec

        store = Store(db.client, db.name, timedelta(days=settings.event_retention_days))
        await prepare_for_command(store)  # never upgrades data; the service's TTL stays as it is
        limit = max(1, args.limit)
        doc = await store.get_contact(args.contact)
        events = await store.contact_events(args.contact, limit)
        messages = [message_from_doc(d) for d in await store.contact_messages(args.contact, limit)]
        pending = [message_from_doc(d) for d in await Messages(store).scheduled_of(args.contact, limit)]
        if doc is None and not events and not messages:
            print(f"rulesvc: no contact {args.contact}", file=sys.stderr)
            return 1
        profile = msgspec.to_builtins(contact_from_doc(doc)) if doc is not None else None
        suppressed = ((doc or {}).get("state") or {}).get("suppressed") or {}
        # (when, line, JSON): what happened, oldest first; the sends still to go come after, as pending.
        timeline: list[tuple[datetime, str, dict[str, Any]]] = []
        for e in events:
            row = {"kind": "event", "id": e["_id"], "type": e["type"], "time": e["time"]}
            timeline.append((e["time"], f"event    {e['type']}  id={e['_id']}", row))
        for m in messages:
            if m.status in ("scheduled", "sending"):
                continue
            why = "".join(f" {part}" for part in (m.reason, m.detail and f"({m.detail})") if part)
            what = f"{m.ruleset}/{m.rule}  {m.sent_channel or m.channel}:{m.template}"
            line = f"message  {what}  {m.status}{why}  id={m.message_id}"
            timeline.append((m.created_at, line, {"kind": "message", **msgspec.to_builtins(m)}))
        timeline.sort(key=lambda item: item[0])
        if args.json:
            body = {
                "contact": profile,
                "suppressions": suppressed,
                "timeline": [row for _, _, row in timeline],
                "pending": [msgspec.to_builtins(m) for m in pending],
            }
            print(json.dumps(_plain(body), indent=2))
            return 0
        _print_contact(args.contact, profile, suppressed)
        print(f"\ntimeline (oldest first, the last {limit} events and messages):")
        if not timeline:
            print("  nothing yet")
        for at, line, _ in timeline:
            print(f"  {_when(at)}  {line}")
        print("\npending sends (soonest first):")
        if not pending:
            print("  none")
        now = datetime.now(UTC)
        for m in pending:
            left = _in(m.due_at - now) if m.due_at is not None else ""
            print(f"  due {_when(m.due_at)}{left}  {m.ruleset}/{m.rule}  {m.channel}:{m.template}  {m.status}"
                  f"  id={m.message_id}")  # fmt: skip
        return 0

    return _with_database(act, settings)


def privacy_command(args: argparse.Namespace) -> int:
    """`contacts erase` and `contacts export`: the API's privacy requests, logged with source `cli`."""
    from datetime import UTC, timedelta

    from rulesvc.core.ids import id_problem
    from rulesvc.runtime.privacy import ErasureBusy, erase_contact, export_chunks, record_request
    from rulesvc.store.db import Store
    from rulesvc.store.migrations import prepare_for_command
    from rulesvc.store.privacy import Privacy

    problem = id_problem(args.contact, "contact_id")
    if problem:
        print(f"rulesvc: {problem}", file=sys.stderr)
        return 1
    if args.contacts_command == "erase" and not args.yes:
        if not sys.stdin.isatty():
            print("rulesvc: erasing cannot be undone; confirm with --yes", file=sys.stderr)
            return 1
        answer = input(f"erase contact {args.contact} and everything stored about it? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("rulesvc: nothing erased", file=sys.stderr)
            return 1
    settings = load_settings()

    async def act(db: AsyncDatabase[dict[str, Any]]) -> int:
        store = Store(db.client, db.name, timedelta(days=settings.event_retention_days))
        await prepare_for_command(store)  # never upgrades data; the service's TTL stays as it is
        if args.contacts_command == "erase":
            try:
                report = await erase_contact(store, args.contact, datetime.now(UTC), "cli")
            except ErasureBusy as exc:
                print(f"rulesvc: {exc}", file=sys.stderr)
                return 1
            total = sum(report.deleted.values())
            detail = ", ".join(f"{k}={v}" for k, v in sorted(report.deleted.items()) if v) or "nothing stored"
            queued = f"{report.audience_removals} ad audience removal(s) queued"
            print(f"erased contact {args.contact}: {total} document(s) ({detail}); {queued}; "
                  f"request {report.request_id}")  # fmt: skip
            return 0
        if not await Privacy(store).known(args.contact):
            print(f"rulesvc: no contact {args.contact}", file=sys.stderr)
            return 1
        requested_at = datetime.now(UTC)
        size = 0
        out = _output(args.output)
        try:
            async for chunk in export_chunks(store, args.contact, requested_at):
                out.write(chunk)
                size += len(chunk)
            out.write(b"\n")
        finally:
            if args.output:
                out.close()
            else:
                out.flush()
        await record_request(store, "export", args.contact, "cli", {"bytes": size}, requested_at)
        if args.output:
            print(f"exported contact {args.contact} to {args.output} ({size} bytes)", file=sys.stderr)
        return 0

    return _with_database(act, settings)


def _output(path: str | None) -> BinaryIO:
    """The export's destination: the file (created only once the contact is known), or stdout."""
    return open(path, "wb") if path else sys.stdout.buffer


def _print_contact(contact_id: str, profile: dict[str, Any] | None, suppressed: dict[str, Any]) -> None:
    print(f"contact {contact_id}")
    if profile is None:
        print("  no profile (only events)")
    else:
        for key in ("email", "phone", "timezone"):
            if profile.get(key):
                print(f"  {key}: {profile[key]}")
        if profile.get("push_tokens"):
            print(f"  push tokens: {len(profile['push_tokens'])}")
        if profile.get("attributes"):
            print(f"  attributes: {json.dumps(profile['attributes'], default=str)}")
        consent = profile.get("consent") or {}
        given = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in sorted(consent.items())) or "none given"
        print(f"  consent: {given}")
    if suppressed:
        for channel, entry in sorted(suppressed.items()):
            until = entry.get("until")
            end = "for good" if until is None else f"until {datetime.fromtimestamp(until):%Y-%m-%d %H:%M}"
            print(f"  suppressed on {channel}: {entry.get('reason', '')} {end}")
    else:
        print("  suppressions: none")


def _quarantine_row(doc: dict[str, Any]) -> dict[str, Any]:
    fields = ("type", "contact_id", "time", "stage", "attempts", "error", "quarantined_at")
    return {"id": doc["_id"], **{k: doc.get(k) for k in fields}} | {
        k: doc[k].isoformat() for k in ("time", "quarantined_at") if doc.get(k) is not None
    }


def plugins() -> int:
    """Every plugin with what it provides, each with its kind, state and (a job's) last run or error;
    then the settings no plugin reads. Exits 1 on a broken plugin or a wrong setting."""
    from rulesvc.channels import Misconfigured, status_of
    from rulesvc.plugins import current_parts
    from rulesvc.web.lifecycle import load_channels

    settings = load_settings()
    registry, reports = load_channels(settings)
    runs, unknown = _job_runs(settings) if registry.jobs else ({}, "")
    for report in reports:
        print(f"{report.name:<24} {report.source}" + (f"  error: {report.error}" if report.error else ""))
        for part in current_parts(report, registry):
            configured, detail = status_of(part.thing)
            state = "configured" if configured else "NOT CONFIGURED"
            if isinstance(part.thing, Misconfigured):
                detail = "settings:"
            print(f"  {part.name:<22} {part.kind:<16} {state:<15} {detail}")
            for problem in (
                getattr(part.thing, "problems", []) if isinstance(part.thing, Misconfigured) else []
            ):
                print(f"      {problem}")
            if part.job:
                for line in _job_run_lines(runs.get(part.name) if runs is not None else None, unknown):
                    print(f"      {line}")
    for _, warning in registry.settings_warnings:
        print(f"warning: {warning}")
    return 1 if any(r.error for r in reports) or registry.settings_errors else 0


def _job_runs(settings: Settings) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """The jobs' last runs from the service's database, if one answers without being started; else
    None and why not."""
    import asyncio

    from pymongo import AsyncMongoClient
    from pymongo.errors import PyMongoError

    from rulesvc.store.jobs import JobRuns
    from rulesvc.store.mongod import EmbeddedMongod, MongodError

    uri = settings.mongodb_uri
    try:
        if not uri:
            embedded = EmbeddedMongod(settings.data_dir, settings.mongod_bin)
            uri = embedded.running_uri()
    except MongodError as exc:
        return None, str(exc)
    if not uri:
        return None, f"MONGODB_URI is not set and no service runs on {settings.data_dir}"

    async def read() -> dict[str, dict[str, Any]]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri, tz_aware=True, serverSelectionTimeoutMS=int(min(settings.mongodb_timeout_seconds, 3) * 1000)
        )
        try:
            return await JobRuns(client[settings.database]["job_runs"]).all()
        finally:
            await client.close()

    try:
        return asyncio.run(read()), ""
    except PyMongoError as exc:
        return None, f"the database did not answer ({type(exc).__name__})"


def _job_run_lines(doc: dict[str, Any] | None, unknown: str) -> list[str]:
    if doc is None and unknown:
        return [f"last run: unknown ({unknown})"]
    doc = doc or {}
    if "last_run" in doc:
        run = doc["last_run"]
        lines = [f"last run: {run['at']:%Y-%m-%dT%H:%M:%SZ}, took {run['duration_seconds']:g} s"]
    else:
        lines = ["last run: never"]
    if "last_error" in doc:
        error = doc["last_error"]
        lines.append(f"last error: {error['at']:%Y-%m-%dT%H:%M:%SZ}: {error['message']}")
    return lines


def schema() -> int:
    import json

    from rulesvc.core.ruleformat import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rulesvc.channels import status_of
    from rulesvc.core.ruleformat import RulesetError
    from rulesvc.plugins import settings_problems
    from rulesvc.runtime.rulesets import check_file, ruleset_files
    from rulesvc.runtime.segment import mapping_path
    from rulesvc.web.lifecycle import load_channels, templates_of

    settings = load_settings()
    registry = load_channels(settings)[0]
    channel_problems = settings_problems(registry)  # wrong channel settings fail the check too
    for problem in channel_problems:
        print(problem)
    settings_failed = any(not p.startswith("warning: ") for p in channel_problems)
    settings_failed |= not check_segment_mapping(Path(args.segment_mapping or mapping_path(settings)))
    directory = Path(args.dir or settings.rulesets_dir)
    if not directory.is_dir():
        print(f"rulesvc: {directory} is not a folder", file=sys.stderr)
        return 1
    channels = registry.names()
    # A send on a channel without its settings is suppressed, silently in the service: said here.
    states = {c.name: status_of(c) for c in registry.all()}
    unconfigured = {name: detail for name, (configured, detail) in states.items() if not configured}
    templates = templates_of(settings, args.dir)
    files = ruleset_files(directory)
    failed = 0
    for path in files.values():
        warnings: list[RulesetError] = []
        errors = check_file(path, channels, templates, warnings, unconfigured)
        failed += bool(errors)
        for error in errors:
            print(error)
        for warning in warnings:  # valid, but some messages would fail: printed, not counted
            print(f"warning: {warning}")
    print(f"{len(files) - failed} of {len(files)} rulesets valid", file=sys.stderr)
    return 1 if failed or settings_failed else 0


def check_segment_mapping(path: Path) -> bool:
    """The Segment mapping file, checked by the validator the service loads it with: every problem as
    file:line:column: json-path: message."""
    from rulesvc.core.segment import InvalidMapping
    from rulesvc.runtime.segment import read_mapping

    try:
        mapping = read_mapping(path)
    except InvalidMapping as exc:
        for error in exc.errors:
            print(error)
        print(f"segment mapping {path}: invalid", file=sys.stderr)
        return False
    print(f"segment mapping {path}: valid ({len(mapping.track)} track events mapped)", file=sys.stderr)
    return True


def _read_ndjson(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as fh:
        return fh.read()


def simulate_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    import msgspec

    from rulesvc.core.events import MalformedBody, decode_ndjson_body, split_validation_error
    from rulesvc.replay.simulate import Refused, SimContact, SimulateRequest, Until, send_rules, simulate
    from rulesvc.runtime.rulesets import Rulesets
    from rulesvc.web.lifecycle import load_channels, send_policy, templates_of

    settings = load_settings()
    channels = load_channels(settings)[0]  # the send rules apply as in the service, with its channels
    rulesets = Rulesets(
        Path(args.rulesets or settings.rulesets_dir), channels.names(), templates_of(settings, args.rulesets)
    )
    from rulesvc import logs

    logs.configure("console", "critical")  # the refusals are printed below as `check` prints them, once
    rulesets.reload()
    logs.configure("console", "warning")
    for error in rulesets.errors():  # the lines `rulesvc check` prints
        print(error, file=sys.stderr)
    if rulesets.errors():
        return 1
    try:
        events, errors = decode_ndjson_body(_read_ndjson(args.events), max_events=10_000_000)
    except (OSError, MalformedBody) as exc:
        print(f"rulesvc: {args.events}: {exc}", file=sys.stderr)
        return 1
    for e in errors:
        print(f"rulesvc: {args.events}: event {e.index}: {e.path}: {e.message}", file=sys.stderr)
    if errors:
        return 1
    contacts: list[SimContact] = []
    if args.contacts:
        decoder = msgspec.json.Decoder(SimContact)
        for number, line in enumerate(_read_ndjson(args.contacts).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                contacts.append(decoder.decode(line))
            except msgspec.ValidationError as exc:
                path, message = split_validation_error(exc)
                print(f"rulesvc: {args.contacts}:{number}: {path}: {message}", file=sys.stderr)
                return 1
            except msgspec.DecodeError as exc:
                print(f"rulesvc: {args.contacts}:{number}: {exc}", file=sys.stderr)
                return 1
    try:
        until = msgspec.convert(args.until, Until | None)
    except msgspec.ValidationError:
        print(f"rulesvc: --until {args.until!r} is not an RFC 3339 time with an offset", file=sys.stderr)
        return 1
    try:
        rules = send_rules(channels, send_policy(settings), contacts)
        result = simulate(rulesets.engine(), SimulateRequest(events, contacts, until), rules)
    except Refused as exc:  # an event the engine could not evaluate: which one, and why
        print(f"rulesvc: {args.events}: {exc.path}: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(result) + b"\n")
        return 0
    for a in result.actions:
        when = a.at.isoformat().replace("+00:00", "Z")
        what = f"{a.channel}:{a.template}" if a.channel else "-"
        reason = (f"  {a.reason}" if a.reason else "") + (f" ({a.detail})" if a.detail else "")
        print(f"{when}  {a.contact_id:<16} {a.ruleset}/{a.rule:<24} {what:<36} {a.status}{reason}")
    print(f"{sum(a.status == 'sent' for a in result.actions)} message(s) would be sent", file=sys.stderr)
    return 0


class _ProgressLine:
    """`rulesvc backtest`'s progress on stderr: a line rewritten in place on a terminal, else a plain line
    every few seconds (and the last one)."""

    def __init__(self, every: float = 5.0) -> None:
        self.tty = sys.stderr.isatty()
        self.every = every
        self.last = float("-inf")
        self.shown: Any = None

    def __call__(self, p: Any) -> None:
        import time

        now = time.monotonic()
        if not self.tty and now - self.last < self.every:
            self.shown = p
            return
        self.last = now
        self._show(p)

    def _show(self, p: Any) -> None:
        percent = 100.0 if p.total == 0 else min(p.replayed / p.total, 1.0) * 100
        rate = p.replayed / p.elapsed_seconds if p.elapsed_seconds > 0 else 0.0
        eta = f", {p.eta_seconds:.0f} s left" if p.eta_seconds is not None and p.replayed < p.total else ""
        line = (f"replayed {p.replayed} of {p.total} events ({percent:.0f}%), {p.contacts} contacts, "
                f"{rate:.0f} events/s{eta}")  # fmt: skip
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.shown = None

    def end(self, p: Any) -> None:
        if p is not None and (self.shown is not None or self.last == float("-inf")):
            self._show(p)
        if self.tty:
            sys.stderr.write("\n")


# The indexes the backtest's reads name as hints (store/backtests.py); the service builds them as it starts.
BACKTEST_INDEXES = {"events": "events_by_contact", "messages": "messages_by_contact"}


def _print_report(report: Any, table: Callable[[Any], str], as_json: bool) -> int:
    """A report as JSON (what the API answers) or as its table (made only when asked for)."""
    import msgspec

    if as_json:
        sys.stdout.buffer.write(msgspec.json.encode(report) + b"\n")
    else:
        sys.stdout.write(table(report))
    return 0


def _window_times(args: argparse.Namespace) -> dict[str, datetime | None] | None:
    """`--from` and `--until` as times with an offset (None: given but not one; the error is printed)."""
    from datetime import UTC

    import msgspec

    from rulesvc.replay.simulate import Until

    times: dict[str, datetime | None] = {}  # in UTC, as the API reads them
    for option, value in (("--from", args.start), ("--until", args.until)):
        try:
            moment = msgspec.convert(value, Until | None)
            times[option] = None if moment is None else moment.astimezone(UTC)
        except msgspec.ValidationError:
            print(f"rulesvc: {option} {value!r} is not an RFC 3339 time with an offset", file=sys.stderr)
            return None
        except OverflowError:
            print(f"rulesvc: {option} {value!r} is out of range", file=sys.stderr)
            return None
    return times


def backtest_command(args: argparse.Namespace) -> int:
    """The backtest in this process, on the service's database: nothing is sent or written."""
    from datetime import UTC, timedelta
    from pathlib import Path

    from rulesvc.core.engine import CompiledRuleset
    from rulesvc.replay.backtest import Options, Progress, Version, report_text, run_backtest
    from rulesvc.runtime.backtests import WindowProblem, backtest_window, compile_folder, usable_folder
    from rulesvc.store.db import Store
    from rulesvc.web.lifecycle import load_channels, send_policy, templates_of

    settings = load_settings()
    times = _window_times(args)
    if times is None:
        return 1
    if not 0 <= args.examples <= 50:
        print("rulesvc: --examples must be between 0 and 50", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    retention = timedelta(days=settings.event_retention_days)
    window = backtest_window(args.since, times["--from"], times["--until"], now, retention)
    if isinstance(window, WindowProblem):
        print(f"rulesvc: --{window.field}: {window.message}", file=sys.stderr)
        return 1
    contacts = [c for c in (args.contacts or "").split(",") if c] or None
    channels = load_channels(settings)[0]  # the send rules apply as in the service, with its channels
    compiled: list[CompiledRuleset] = []

    def version(given: str | None) -> Version | None:
        directory = Path(given or settings.rulesets_dir)
        problem = usable_folder(directory)
        if problem is not None:
            print(f"rulesvc: {problem}", file=sys.stderr)
            return None
        found, errors = compile_folder(directory, channels.names(), templates_of(settings, given))
        compiled.extend(found)
        for error in errors:  # the lines `rulesvc check` prints
            print(error, file=sys.stderr)
        if errors:
            return None
        where = directory.absolute()
        return Version(str(where) if given else f"live rulesets ({where})", found)

    try:
        baseline = version(args.baseline)
        candidate = version(args.rulesets) if baseline is not None else None
        if baseline is None or candidate is None:
            return 1
        options = Options(window, contacts, args.examples)
        shown = _ProgressLine()
        latest: list[Progress] = []

        def progress(p: Progress) -> None:
            latest[:] = [p]
            shown(p)

        async def act(db: AsyncDatabase[dict[str, Any]]) -> int:
            store = Store(db.client, db.name, retention)
            # Read-only: it builds no index (a build on a live database is a load, and it is not the
            # CLI's to set the retention). Its reads need the service's indexes: no service, no history.
            missing = await store.missing_indexes(BACKTEST_INDEXES)
            if missing:
                print(f"rulesvc: no service has run on the database {db.name} (no index "
                      f"{', '.join(missing)}): there is no history to replay", file=sys.stderr)  # fmt: skip
                return 1
            report = await run_backtest(
                store, baseline, candidate, channels, send_policy(settings), options, progress
            )
            shown.end(latest[0] if latest else None)
            return _print_report(report, report_text, args.json)

        return _with_database(act, settings)
    finally:
        for c in compiled:
            c.free()


def stats_command(args: argparse.Namespace) -> int:
    """The report of GET /v1/stats, read in this process from the service's database."""
    from datetime import UTC, timedelta
    from pathlib import Path

    import msgspec

    from rulesvc.core.durations import parse_duration
    from rulesvc.core.ruleformat import RulesetFile
    from rulesvc.core.statsreport import (
        WindowProblem,
        design_of_source,
        name_problem,
        report_text,
        stats_window,
    )
    from rulesvc.store.db import Store
    from rulesvc.store.stats import Stats
    from rulesvc.web.views.stats import read_report

    settings = load_settings()
    for value, what in ((args.ruleset, "ruleset"), (args.rule, "rule")):
        problem = name_problem(value, what) if value is not None else None
        if problem is not None:
            print(f"rulesvc: {'RULESET' if what == 'ruleset' else '--rule'} {problem}", file=sys.stderr)
            return 1
    times = _window_times(args)
    if times is None:
        return 1
    now = datetime.now(UTC)
    start, end = times["--from"], times["--until"]
    if args.since is not None:
        try:
            length = parse_duration(args.since)
            end = end or now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
            start = end - length
        except (ValueError, OverflowError) as exc:
            problem = str(exc) if isinstance(exc, ValueError) else "reaches back before the year 1"
            print(f"rulesvc: --since: {problem}", file=sys.stderr)
            return 1
    window = stats_window(start, end, args.by, now)
    if isinstance(window, WindowProblem):
        option = {"from": "--since" if args.since else "--from", "to": "--until"}.get(window.field, "--by")
        print(f"rulesvc: {option}: {window.message}", file=sys.stderr)
        return 1
    rulesets_dir = Path(settings.rulesets_dir).absolute()
    try:  # the holdout and arms as the file declares them (the service loads it the same way)
        source = msgspec.json.decode((rulesets_dir / f"{args.ruleset}.json").read_bytes(), type=RulesetFile)
    except (OSError, msgspec.MsgspecError):
        source = None

    async def act(db: AsyncDatabase[dict[str, Any]]) -> int:
        reads = Stats(Store(db.client, db.name, timedelta(days=settings.event_retention_days)))
        if source is None and not await reads.exists(args.ruleset):
            print(f"rulesvc: no ruleset {args.ruleset}: no usable file {args.ruleset}.json in "
                  f"{rulesets_dir} and none was ever counted", file=sys.stderr)  # fmt: skip
            return 1
        configured = design_of_source(source) if source is not None else None
        report = await read_report(reads, args.ruleset, args.rule, window, args.by, configured)
        return _print_report(report, report_text, args.json)

    return _with_database(act, settings)


def start_up_warnings(settings: Settings, embedded: bool) -> list[tuple[str, str]]:
    """What an operator should hear before the service runs (event name, sentence): no rulesets (it will
    accept events and send nothing), a new data directory (a fresh, empty database). Said once by the
    process the operator started, not by each worker."""
    from pathlib import Path

    from rulesvc.runtime.rulesets import folder_problem
    from rulesvc.store.mongod import has_data

    warnings: list[tuple[str, str]] = []
    problem = folder_problem(Path(settings.rulesets_dir))
    if problem is not None:
        warnings.append((
            "rulesets.none",
            f"{problem}: the service will accept events but send nothing; "
            "set RULESVC_RULESETS_DIR or start from the project folder",
        ))  # fmt: skip
    if embedded and not has_data(settings.data_dir):
        where = Path(settings.data_dir).absolute()
        warnings.append((
            "data_dir.new",
            f"new data directory {where}: a fresh database; if you expected existing data, "
            "start from the folder that holds it or set RULESVC_DATA_DIR",
        ))  # fmt: skip
    return warnings


def new_event_loop(settings: Settings) -> asyncio.AbstractEventLoop:
    """uvloop unless told otherwise: the same asyncio API on libuv, which spends less CPU per request
    and per MongoDB round trip (BENCHMARKS.md)."""
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def serve(args: argparse.Namespace) -> int:
    import errno

    from aiohttp import web

    from rulesvc import logs
    from rulesvc.runtime.workers import PortInUse, reserve_port
    from rulesvc.store.migrations import SchemaError
    from rulesvc.store.mongod import MongodError, lock_data_dir, unlock_data_dir
    from rulesvc.web.app import create_app

    settings = load_settings(args.config).with_overrides(host=args.host, port=args.port, workers=args.workers)
    from rulesvc.runtime.segment import load_mapping

    load_mapping(settings)  # a broken Segment mapping stops start-up here, before any worker starts
    logs.configure(settings.log_format, settings.log_level)
    workers = settings.workers or os.cpu_count() or 1
    embedded = not settings.mongodb_uri
    if not args.reuse_port:  # a worker of a supervisor: the supervisor said it
        import structlog

        for event, message in start_up_warnings(settings, embedded):
            structlog.get_logger("rulesvc.serve").warning(event, message=message)
    try:
        if embedded:  # before anything else: a second instance must not touch the first one's mongod
            lock_data_dir(settings.data_dir, settings.port)
        try:
            if workers > 1:
                from rulesvc.runtime.workers import Supervisor

                reserved = reserve_port(settings.host, settings.port, keep=True)
                try:
                    return Supervisor(settings, workers, args.config).run()
                finally:
                    if reserved is not None:
                        reserved.close()
            if args.reuse_port:  # a worker of a supervisor, which checked the port
                import structlog

                index = int(os.environ.get("RULESVC_WORKER_INDEX", "0"))
                structlog.contextvars.bind_contextvars(worker=index)
            else:
                reserve_port(settings.host, settings.port, keep=False)  # before the mongod starts
            web.run_app(
                create_app(settings),
                loop=new_event_loop(settings),
                host=settings.host,
                port=settings.port,
                reuse_port=args.reuse_port or None,
                print=None,
                access_log=None,
                shutdown_timeout=30,
            )
        finally:
            if embedded:
                unlock_data_dir(settings.data_dir)
    except (MongodError, PortInUse, SchemaError) as exc:
        print(f"rulesvc: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        taken = f"port {settings.port} on {settings.host} is in use by another program"
        print(f"rulesvc: {taken}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.command == "serve" and args.reuse_port):
        # Only a supervisor's workers share metric files (it sets the variable for them); anywhere else
        # prometheus_client, once imported, would keep values in a directory another run or app adds its
        # counts to. Moved aside before that import: a supervisor still gives its workers the directory.
        given = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if given:
            os.environ[GIVEN_METRICS_DIR] = given
    if args.command != "serve":
        from rulesvc import logs

        logs.configure("console", "warning")  # a command's output is its result, not the load log
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "check":
            return check(args)
        if args.command == "simulate":
            return simulate_command(args)
        if args.command == "backtest":
            return backtest_command(args)
        if args.command == "stats":
            return stats_command(args)
        if args.command == "migrate":
            return migrate_command(args)
        if args.command == "schema":
            return schema()
        if args.command == "plugins":
            return plugins()
        if args.command == "keys":
            return keys_command(args)
        if args.command == "events":
            return events_command(args)
        if args.command == "inbox-token":
            return inbox_token_command(args)
        if args.command == "messages":
            return messages_command(args)
        if args.command == "contacts":
            return contacts_command(args)
    except ConfigError as exc:
        print(f"rulesvc: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # MongoDB away (e.g. restarting) or refusing, or a schema this release can't use
        from rulesvc.store.migrations import SchemaError

        if isinstance(exc, SchemaError):
            print(f"rulesvc: {exc}", file=sys.stderr)
            return 1
        from pymongo.errors import ConnectionFailure, PyMongoError

        if not isinstance(exc, PyMongoError):
            raise
        name = type(exc).__name__
        if isinstance(exc, ConnectionFailure) or exc.timeout:
            print(f"rulesvc: MongoDB unavailable ({name}); try again in a moment", file=sys.stderr)
        else:
            print(f"rulesvc: MongoDB refused: {name}: {exc}"[:2000], file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
