"""The one route table: each route's method and path, its handler, who may call it, and its OpenAPI
operation with the msgspec types it refers to. The app registers these routes, `authenticate` checks
each request against its route's access, and the OpenAPI document is generated from the same table.

Access:
- `public`: anyone (the OpenAPI document).
- `ops`: health, readiness and metrics: open on loopback (everywhere with RULESVC_OPEN_OPS), else admin.
- `ingest`: an `ingest` or `admin` API key (what a shop's backend needs).
- `inbox`: that contact's inbox token (what a page holds), or an admin key.
- `signed-by-provider`: no API key; the channel checks the provider's own signature.
- `segment`: as `ingest`, and the key may also come as Segment's write key: HTTP Basic with the key as the
  user name and an empty password (what Segment's and RudderStack's client libraries send).
- `admin`: an `admin` API key (a `read` key may GET these: the console's read-only users).
- `personal-data`: an `admin` API key only, also for GET: a whole contact's export and the privacy request
  log are a data subject's data, not something to look at in passing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from aiohttp import web

from rulesvc.core.contacts import Contact, ContactIn, ContactRejected
from rulesvc.core.events import Event, EventsAccepted, EventsRejected
from rulesvc.core.messages import Message, MessageList
from rulesvc.core.ruleformat import RulesetFile
from rulesvc.core.segment import SegmentAccepted, SegmentRejected
from rulesvc.core.statsreport import StatsReport
from rulesvc.replay.simulate import SimulateRejected, SimulateRequest, SimulateResult
from rulesvc.runtime.rulesets import RULESET_NAME
from rulesvc.web import openapi
from rulesvc.web.backtest_schemas import (
    BacktestConflict,
    BacktestEnded,
    BacktestJob,
    BacktestList,
    BacktestRejected,
    BacktestRequest,
)
from rulesvc.web.contact_schemas import ContactSearchQuery, ContactSearchResult, ContactState
from rulesvc.web.keys import QUERY
from rulesvc.web.openapi import (
    INBOX_ACCESS,
    Schema,
    contact_id_param,
    error,
    json_body,
    links,
    ref,
)
from rulesvc.web.overview_schemas import ChannelTestFailed, ChannelTestRequest, ChannelTestResult, Overview
from rulesvc.web.privacy_schemas import Erased, PrivacyRequestList
from rulesvc.web.schemas import (
    CallbacksAccepted,
    ChannelList,
    ContactMessagesQuery,
    ErrorBody,
    EventList,
    Health,
    InboxAction,
    InboxActionQuery,
    InboxList,
    InboxQuery,
    InboxToken,
    InboxTokenRequest,
    MessageConflict,
    MessagesQuery,
    NoQuery,
    PagingQuery,
    QuarantineActed,
    QuarantineAction,
    QuarantineList,
    QuarantineQuery,
    RulesetChecked,
    RulesetDetail,
    RulesetInfo,
    RulesetList,
    RulesetPutQuery,
    RulesetRejected,
)
from rulesvc.web.stats_schemas import StatsQuery
from rulesvc.web.views import (
    backtests,
    channels,
    contacts,
    events,
    inbox,
    messages,
    ops,
    overview,
    privacy,
    quarantine,
    rulesets,
    segment,
    simulate,
    stats,
)
from rulesvc.web.views import shopify as shopify_source
from rulesvc.web.views.base import NDJSON_TYPES, QueryRejected, error_response, parse_query

Access = Literal[
    "public", "ops", "ingest", "segment", "inbox", "signed-by-provider", "admin", "personal-data"
]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # as aiohttp matches it: a placeholder may carry a pattern, `{action:retry|drop}`
    handler: Handler
    access: Access
    types: tuple[Any, ...] = ()  # the msgspec types the operation refers to: the document's components
    parameters: list[Schema] | None = None  # path parameters, shared by the operations on the path
    # The query parameters: checked before the handler runs (422 for an unknown name or a bad value) and
    # documented from the same struct. None: not checked (a provider's callback URL is the provider's).
    query: type[msgspec.Struct] | None = NoQuery
    operation: Schema = field(default_factory=dict)

    @property
    def documented_path(self) -> str:
        """The path as OpenAPI and aiohttp's `resource.canonical` spell it: placeholders without patterns."""
        return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", self.path)


MESSAGE_ID: Schema = {
    "name": "message_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "the message's id as the history shows it (it may contain `/`)",
}
JOB_ID: Schema = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "the backtest job's id (`id` of the job)",
}
EVENT_BATCH = {"oneOf": [ref("Event"), {"type": "array", "items": ref("Event")}]}
CONTACT_FROM_PATH = {"contact_id": "$request.path.contact_id"}
CONTACT_LINKS: dict[str, tuple[str, dict[str, str]]] = {
    "GetContact": ("getContact", CONTACT_FROM_PATH),
    "GetContactMessages": ("getContactMessages", CONTACT_FROM_PATH),
    "GetContactEvents": ("getContactEvents", CONTACT_FROM_PATH),
    "GetContactState": ("getContactState", CONTACT_FROM_PATH),
    "PostInboxToken": ("postInboxToken", CONTACT_FROM_PATH),
}
FIRST_MESSAGE = {"message_id": "$response.body#/messages/0/message_id"}
MESSAGE_LINKS: dict[str, tuple[str, dict[str, str]]] = {
    "GetMessage": ("getMessage", FIRST_MESSAGE),
    "RetryMessage": ("actOnMessage", {**FIRST_MESSAGE, "action": "retry"}),
    "CancelMessage": ("actOnMessage", {**FIRST_MESSAGE, "action": "cancel"}),
}


def _segment_route(path: str, handler: Handler, summary: str, operation_id: str) -> Route:
    """One call of Segment's HTTP Tracking API: its body as Segment documents it (docs/segment.md)."""
    body: Schema = {"type": "object", "description": "a Segment message (or, for /v1/batch, `batch`: "
                    "an array of messages, with `context` and `sentAt` for all of them)"}  # fmt: skip
    return Route(
        "POST",
        path,
        handler,
        "segment",
        types=(SegmentAccepted, SegmentRejected, ErrorBody),
        operation={
            "summary": summary,
            "description": "Segment's (and RudderStack's) HTTP Tracking API. The write key is an `ingest` "
            "or `admin` API key, sent as the HTTP Basic user with an empty password (or as a Bearer token). "
            "`messageId` is the event id: a retry is counted in `duplicates` and decided once. A body may "
            "be gzip-compressed (`Content-Encoding: gzip`). Nothing of a request with an invalid message "
            "is stored.",
            "operationId": operation_id,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body}, "text/plain": {"schema": body}},
            },
            "responses": {
                "200": json_body(ref("SegmentAccepted"), "stored (`success`: true)"),
                "400": json_body(
                    ref("SegmentRejected"), "an invalid message: every problem with its JSON path"
                ),
                "413": json_body(
                    ref("SegmentRejected"), "a message over 32 KB, or a batch over 500 KB (Segment's limits)"
                ),
            },
        },
    )


SEGMENT_ROUTES = [
    _segment_route("/v1/batch", segment.post_batch, "Segment: several calls at once", "segmentBatch"),
    _segment_route("/v1/track", segment.post_track, "Segment: a track call (an event)", "segmentTrack"),
    _segment_route(
        "/v1/identify", segment.post_identify, "Segment: an identify call (the profile)", "segmentIdentify"
    ),
    _segment_route("/v1/page", segment.post_page, "Segment: a page call", "segmentPage"),
    _segment_route("/v1/screen", segment.post_screen, "Segment: a screen call", "segmentScreen"),
    _segment_route("/v1/alias", segment.post_alias, "Segment: an alias call (links two ids)", "segmentAlias"),
    _segment_route("/v1/group", segment.post_group, "Segment: a group call (ignored)", "segmentGroup"),
]


ROUTES: list[Route] = [
    Route(
        "POST",
        "/v1/events",
        events.post_events,
        "ingest",
        types=(Event, EventsAccepted, EventsRejected, ErrorBody),
        operation={
            "summary": "Post one event, an array of events, or NDJSON (one event per line)",
            "operationId": "postEvents",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": EVENT_BATCH},
                    "application/x-ndjson": {"schema": ref("Event")},
                },
            },
            "responses": {
                "202": links(
                    json_body(ref("EventsAccepted"), "stored durably; duplicates (same id) changed nothing"),
                    GetContactEvents=("getContactEvents", {"contact_id": "$request.body#/contact_id"}),
                    GetContact=("getContact", {"contact_id": "$request.body#/contact_id"}),
                ),
                "413": error("more events than RULESVC_MAX_BATCH_EVENTS in one batch"),
                "422": json_body(
                    ref("EventsRejected"), "at least one invalid event; nothing of the batch stored"
                ),
            },
        },
    ),
    # --- Shopify webhooks (issue 18: shop integrations) ---
    Route(
        "POST",
        "/v1/sources/shopify",
        shopify_source.post_shopify,
        "signed-by-provider",
        types=(shopify_source.ShopifyReceived, ErrorBody),
        operation={
            "summary": "Shopify's webhooks (orders, checkouts, fulfillments, products, inventory, customers, "
            "privacy), verified by X-Shopify-Hmac-Sha256 with RULESVC_SHOPIFY_SECRET",
            "description": "Point the app's webhook subscriptions (JSON format) here. The topic comes from "
            "X-Shopify-Topic; each X-Shopify-Webhook-Id is handled once (a retry answers 200 `duplicate`). "
            "docs/shopify.md has what each topic becomes.",
            "operationId": "shopifyWebhook",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "parameters": [
                {"name": h, "in": "header", "required": True, "schema": {"type": "string"}}
                for h in ("X-Shopify-Hmac-Sha256", "X-Shopify-Topic", "X-Shopify-Webhook-Id")
            ],
            "responses": {
                "200": json_body(ref("ShopifyReceived"), "handled, a duplicate, or nothing to store"),
                "400": error("a topic not handled, a missing webhook id, or a body not the topic's JSON"),
                "401": error("the signature is missing or wrong, or RULESVC_SHOPIFY_SECRET is not set"),
                "413": error("the body is over RULESVC_MAX_BODY_BYTES"),
            },
        },
    ),
    # --- end Shopify webhooks ---
    # --- Segment / RudderStack HTTP Tracking API (issue 18) ---
    *SEGMENT_ROUTES,
    # --- contact search and state (issue 17: the console's contact page) ---
    Route(
        "GET",
        "/v1/contacts",
        contacts.get_contacts,
        "admin",
        query=ContactSearchQuery,
        types=(ContactSearchResult, ErrorBody),
        operation={
            "summary": "Find contacts by id (exact), email (any letter case) or phone (E.164)",
            "description": "An exact id match comes first; `matched` says what the term was taken as. "
            "A term with `@` is also looked up as an email, one like `+4915112345678` as a phone.",
            "operationId": "searchContacts",
            "responses": {
                "200": links(
                    json_body(ref("ContactSearchResult"), "the contacts found (none: an empty list)"),
                    GetContact=("getContact", {"contact_id": "$response.body#/contacts/0/contact_id"}),
                    GetContactState=(
                        "getContactState",
                        {"contact_id": "$response.body#/contacts/0/contact_id"},
                    ),
                ),
            },
        },
    ),
    Route(
        "GET",
        "/v1/contacts/{contact_id}/state",
        contacts.get_contact_state,
        "admin",
        types=(ContactState, ErrorBody),
        parameters=[contact_id_param()],
        operation={
            "summary": "What the service keeps about a contact: flags, counters, remembered values, "
            "suppressions, each channel's verdict for a marketing message now, the contact in each ruleset",
            "description": "`channels`: per channel the consent, suppression, reachability and today's "
            "count against the frequency cap, and `blocked_by` (a reason code) with `why` when a "
            "marketing message would not go out now. `rulesets`: per loaded ruleset the contact's group "
            "(holdout or A/B arm), an open entry, the `once` marks of its rules, and the event types its "
            "rules listen to with how often the contact did each (within the event retention).",
            "operationId": "getContactState",
            "responses": {
                "200": json_body(ref("ContactState"), "the state, judged at `at`"),
                "404": error("no such contact: no stored contact and no event of it"),
            },
        },
    ),
    # --- end contact search and state ---
    Route(
        "PUT",
        "/v1/contacts/{contact_id}",
        contacts.put_contact,
        "admin",
        types=(ContactIn, Contact, ContactRejected, ErrorBody),
        parameters=[contact_id_param()],
        operation={
            "summary": "Create or replace a contact's profile",
            "operationId": "putContact",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("ContactIn")}},
            },
            "responses": {
                "200": links(json_body(ref("Contact"), "replaced"), **CONTACT_LINKS),
                "201": links(json_body(ref("Contact"), "created"), **CONTACT_LINKS),
                "422": json_body(ref("ContactRejected"), "invalid field values; nothing changed"),
            },
        },
    ),
    Route(
        "GET",
        "/v1/contacts/{contact_id}",
        contacts.get_contact,
        "admin",
        types=(Contact, ErrorBody),
        parameters=[contact_id_param()],
        operation={
            "summary": "Read a contact",
            "operationId": "getContact",
            "responses": {"200": json_body(ref("Contact"), "the contact"), "404": error("no such contact")},
        },
    ),
    # --- privacy requests (issue 18: erase, export, the request log; docs/privacy.md) ---
    Route(
        "DELETE",
        "/v1/contacts/{contact_id}",
        privacy.delete_contact,
        "admin",
        types=(Erased, ErrorBody),
        parameters=[contact_id_param()],
        operation={
            "summary": "Erase a contact everywhere (GDPR erasure): profile, state, events, messages, "
            "sends to come, in-app inbox, interests, identity links; queue its removal from ad audiences",
            "description": "Leaves a tombstone (the SHA-256 of the id) that drops a late retry of an older "
            "event (RULESVC_ERASURE_TOMBSTONE) and an entry in the request log. An id nothing is stored "
            "of is erased with zero counts: a request may be repeated.",
            "operationId": "eraseContact",
            "responses": {
                "200": json_body(ref("Erased"), "erased; what was deleted per collection"),
                "503": error(
                    "the contact's events or sends stayed in work; nothing but the tombstone "
                    "was done yet; repeat the request (Retry-After)"
                ),
            },
        },
    ),
    Route(
        "GET",
        "/v1/contacts/{contact_id}/export",
        privacy.get_export,
        "personal-data",
        types=(ErrorBody,),
        parameters=[contact_id_param()],
        operation={
            "summary": "Everything stored about a contact as one JSON document (data subject access)",
            "description": "Keys: format, contact_id, exported_at, profile, state, identities, audiences "
            "(member_of, changes), interests, carts (Segment's kept carts), scheduled, messages (with "
            "outcomes), events, inbox (ids of the in-app messages shown now). Complete, whatever the "
            "history's length: streamed.",
            "operationId": "exportContact",
            "responses": {
                "200": json_body({"type": "object"}, "the export (docs/privacy.md)"),
                "404": error("no such contact: no profile, event, message or identity link of it"),
            },
        },
    ),
    Route(
        "GET",
        "/v1/privacy/requests",
        privacy.get_requests,
        "personal-data",
        query=PagingQuery,
        types=(PrivacyRequestList, ErrorBody),
        operation={
            "summary": "The privacy request log, newest first: each erasure and export, who asked, when, "
            "when done, what it found",
            "operationId": "listPrivacyRequests",
            "responses": {"200": json_body(ref("PrivacyRequestList"), "requests")},
        },
    ),
    # --- end privacy requests ---
    Route(
        "GET",
        "/v1/contacts/{contact_id}/messages",
        contacts.get_contact_messages,
        "admin",
        query=ContactMessagesQuery,
        types=(MessageList, ErrorBody),
        parameters=[contact_id_param()],
        operation={
            "summary": "The contact's message history, newest first",
            "operationId": "getContactMessages",
            "responses": {
                "200": links(json_body(ref("MessageList"), "messages"), **MESSAGE_LINKS),
            },
        },
    ),
    Route(
        "GET",
        "/v1/contacts/{contact_id}/events",
        contacts.get_contact_events,
        "admin",
        query=PagingQuery,
        types=(EventList, ErrorBody),
        parameters=[contact_id_param()],
        operation={
            "summary": "The contact's recent events, newest first",
            "operationId": "getContactEvents",
            "responses": {"200": json_body(ref("EventList"), "events")},
        },
    ),
    Route(
        "POST",
        "/v1/contacts/{contact_id}/inbox-token",
        inbox.post_inbox_token,
        "ingest",
        types=(InboxTokenRequest, InboxToken, SimulateRejected, ErrorBody),
        parameters=[contact_id_param()],
        operation={
            "summary": "Mint the token a page presents to open this contact's in-app inbox "
            "(ingest or admin key: the shop's backend does this for its signed-in customer)",
            "operationId": "postInboxToken",
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": ref("InboxTokenRequest")}},
            },
            "responses": {
                "200": links(
                    json_body(ref("InboxToken"), "the token and when it expires"),
                    GetInbox=("getInbox", {"contact_id": "$response.body#/contact_id"}),
                ),
                "422": json_body(ref("SimulateRejected"), "invalid ttl"),
            },
        },
    ),
    Route(
        "GET",
        "/v1/contacts/{contact_id}/inbox",
        inbox.get_inbox,
        "inbox",
        query=InboxQuery,
        types=(InboxList, ErrorBody),
        parameters=[contact_id_param()],
        operation={
            "summary": "In-app messages to show now (delivered, not dismissed), newest first",
            "description": "Title and body are HTML (parameters escaped)." + INBOX_ACCESS,
            "operationId": "getInbox",
            "responses": {
                "200": links(
                    json_body(ref("InboxList"), "messages"),
                    MarkInboxMessage=(
                        "markInboxMessage",
                        {
                            "contact_id": "$request.path.contact_id",
                            "message_id": "$response.body#/messages/0/message_id",
                        },
                    ),
                ),
            },
        },
    ),
    Route(
        "POST",
        "/v1/contacts/{contact_id}/inbox/{message_id:.+}",
        inbox.post_inbox_action,
        "inbox",
        query=InboxActionQuery,
        types=(InboxAction, SimulateRejected, ErrorBody),
        parameters=[
            contact_id_param(),
            {"name": "message_id", "in": "path", "required": True, "schema": {"type": "string"}},
        ],
        operation={
            "summary": "Mark an in-app message shown, clicked or dismissed (rules see shown, clicked)",
            "description": INBOX_ACCESS.strip(),
            "operationId": "markInboxMessage",
            # text/plain too: what `navigator.sendBeacon` and a `fetch` without headers send from a page
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": ref("InboxAction")},
                    "text/plain": {"schema": ref("InboxAction")},
                },
            },
            "responses": {
                "204": {"description": "recorded"},
                "404": error("no such in-app message for this contact"),
                "422": json_body(ref("SimulateRejected"), "invalid action"),
            },
        },
    ),
    Route(
        "GET",
        "/v1/messages",
        messages.get_messages,
        "admin",
        query=MessagesQuery,
        types=(MessageList, ErrorBody),
        operation={
            "summary": "Messages across contacts, newest first, filtered (e.g. status=dead)",
            "description": "`reason` is a code (docs/channels.md lists them); `detail` says it in words. "
            "`from` and `to` bound when a message was decided (`created_at`); `rule` needs `ruleset`. "
            "Fast filters (an index each): `status`, `contact_id`, `ruleset`; `channel` and `reason` "
            "narrow what those (or the time order) give.",
            "operationId": "getMessages",
            "responses": {
                "200": links(json_body(ref("MessageList"), "messages"), **MESSAGE_LINKS),
            },
        },
    ),
    Route(
        "GET",
        "/v1/messages/{message_id:.+}",
        messages.get_message,
        "admin",
        types=(Message, ErrorBody),
        parameters=[MESSAGE_ID],
        operation={
            "summary": "One message: its status, reason code and detail, attempts and retries",
            "operationId": "getMessage",
            "responses": {
                "200": links(
                    json_body(ref("Message"), "the message"),
                    RetryMessage=(
                        "actOnMessage",
                        {"message_id": "$response.body#/message_id", "action": "retry"},
                    ),
                    CancelMessage=(
                        "actOnMessage",
                        {"message_id": "$response.body#/message_id", "action": "cancel"},
                    ),
                ),
                "404": error("no such message"),
            },
        },
    ),
    Route(
        "POST",
        "/v1/messages/{message_id:.+}/{action:retry|cancel}",
        messages.post_message_action,
        "admin",
        types=(Message, MessageConflict, ErrorBody),
        parameters=[
            MESSAGE_ID,
            {
                "name": "action",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": ["retry", "cancel"]},
                "description": "retry: a `dead`, `failed` or `uncertain` message is `scheduled` again, due "
                "now, its attempts counted afresh (`retries` and `retried_at` record it); cancel: a "
                "`scheduled` message is `cancelled` with reason `cancelled_by_operator` and never sent; a "
                "`dead` or `uncertain` one is given up on the same way (never retried), its `detail` "
                "keeping what it was (`dismissed by an operator; it was dead: ...`)",
            },
        ],
        operation={
            "summary": "Retry a dead letter (or a failed or uncertain message), or cancel a scheduled, "
            "dead or uncertain one",
            "operationId": "actOnMessage",
            "responses": {
                "200": json_body(ref("Message"), "the message after the action"),
                "404": error("no such message"),
                "405": {
                    **error(
                        "an action other than retry or cancel: the path is then a message id's (GET only), "
                        "as `Allow` says"
                    ),
                    "headers": {"Allow": {"required": True, "schema": {"type": "string"}}},
                },
                "409": json_body(
                    ref("MessageConflict"), "its status does not allow it (the status, and those allowed)"
                ),
            },
        },
    ),
    Route(
        "GET",
        "/v1/events/quarantine",
        quarantine.get_quarantine,
        "admin",
        query=QuarantineQuery,
        types=(QuarantineList, ErrorBody),
        operation={
            "summary": "Events set aside after their evaluation failed repeatedly, newest first",
            "description": "Every other event went on meanwhile. Each has its error, the stage that "
            "failed (`inbox`: the contact's rules; `fanout`: copying a catalog event) and its attempts.",
            "operationId": "getQuarantine",
            "responses": {"200": json_body(ref("QuarantineList"), "quarantined events")},
        },
    ),
    Route(
        "POST",
        "/v1/events/quarantine/{action:retry|drop}",
        quarantine.post_quarantine_action,
        "admin",
        types=(QuarantineAction, QuarantineActed, ErrorBody),
        parameters=[
            {
                "name": "action",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": ["retry", "drop"]},
                "description": "retry: evaluate again (after a fix); drop: never evaluated, kept",
            }
        ],
        operation={
            "summary": "Retry or drop quarantined events, named by id or all",
            "operationId": "actOnQuarantine",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("QuarantineAction")}},
            },
            "responses": {
                "200": json_body(ref("QuarantineActed"), "how many events were retried or dropped"),
                "422": error("neither or both of `ids` and `all`"),
            },
        },
    ),
    Route(
        "GET",
        "/v1/channels",
        channels.get_channels,
        "admin",
        types=(ChannelList,),
        operation={
            "summary": "Loaded plugins and their channels, and whether each channel is configured",
            "operationId": "getChannels",
            "responses": {"200": json_body(ref("ChannelList"), "channels and plugins")},
        },
    ),
    Route(
        "POST",
        "/v1/channels/{name}/callbacks",
        channels.channel_callback,
        "signed-by-provider",
        query=None,
        types=(CallbacksAccepted, ErrorBody),
        parameters=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        operation={
            "summary": "A provider's delivery reports, authenticated as that provider signs them",
            "operationId": "channelCallback",
            "responses": {
                "200": json_body(ref("CallbacksAccepted"), "outcomes queued as message_* events"),
                "400": error("the report lacks what the provider always sends (e.g. MessageSid)"),
                "401": error("the provider's signature did not verify"),
                "404": error("no such channel, or it takes no callbacks"),
                "415": error("the body is not in the provider's format (SMS: form-encoded)"),
            },
        },
    ),
    # --- the overview and channel test sends (issue 17: the console's Overview and Channels pages) ---
    Route(
        "GET",
        "/v1/overview",
        overview.get_overview,
        "admin",
        types=(Overview, ErrorBody),
        operation={
            "summary": "What an on-call person looks at first: readiness, throughput now and over 24 h, "
            "backlogs, messages by channel and status, quarantine, dead letters, channels and plugins",
            "description": "`health` is what `/readyz` says. `now`: events accepted (stored) and decided "
            "(evaluated by the rules) in the last minute; `series`: the same per UTC quarter hour "
            "(`bucket_seconds` 900) over the last 24 h, 96 points, the last the current quarter so far, "
            "rates over the part that has passed. `inbox`: events waiting for the rules and the oldest "
            "one's wait; `due`: scheduled sends due and not yet sent, and due within the hour. "
            "`messages`: per channel and status since `messages_since` (24 h ago), from the funnel's "
            "hourly counters (every hour overlapping the window; empty with RULESVC_STATS off). "
            "`channels` and `plugins` as `GET /v1/channels` gives them. When MongoDB does not answer, "
            "the parts read from it are null or empty and `health` says so.",
            "operationId": "getOverview",
            "responses": {"200": json_body(ref("Overview"), "the overview")},
        },
    ),
    Route(
        "POST",
        "/v1/channels/{name}/test",
        channels.post_channel_test,
        "admin",
        types=(ChannelTestRequest, ChannelTestResult, ChannelTestFailed, ErrorBody),
        parameters=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        operation={
            "summary": "Send the built-in test message through a channel's plugin to an address",
            "description": "The real plugin sends a fixed test message (subject `rulesvc test message`) "
            "to `to`: an email address for `email`, an E.164 number for `sms`, a device token for "
            "`push`; `webpush_subscription` for `webpush`; a webhook goes to its configured URL. "
            "No contact, rule, message history or counter is read or written. At most 10 test sends "
            "a minute per channel and process: above that, 429 with the seconds to wait.",
            "operationId": "testChannel",
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": ref("ChannelTestRequest")}},
            },
            "responses": {
                "200": json_body(ref("ChannelTestResult"), "the provider took it"),
                "404": error("no such channel"),
                "409": error("the channel is not configured: what is missing"),
                "422": error("an address the channel cannot use, with its path (`$.to`)"),
                "502": json_body(ref("ChannelTestFailed"), "the provider did not take it, in its words"),
            },
        },
    ),
    # --- end of the overview block ---
    Route(
        "GET",
        "/v1/rulesets",
        rulesets.get_rulesets,
        "admin",
        types=(RulesetList,),
        operation={
            "summary": "The rulesets: live version, events they listen to, and errors of refused edits",
            "operationId": "getRulesets",
            "responses": {
                "200": links(
                    json_body(ref("RulesetList"), "rulesets"),
                    PutRuleset=("putRuleset", {"name": "$response.body#/rulesets/0/name"}),
                )
            },
        },
    ),
    Route(
        "POST",
        "/v1/rulesets/reload",
        rulesets.reload_rulesets,
        "admin",
        types=(RulesetList,),
        operation={
            "summary": "Reload the rulesets folder now (it is also watched)",
            "operationId": "reloadRulesets",
            "responses": {"200": json_body(ref("RulesetList"), "rulesets after the reload")},
        },
    ),
    Route(
        "PUT",
        "/v1/rulesets/{name}",
        rulesets.put_ruleset,
        "admin",
        query=RulesetPutQuery,
        types=(RulesetFile, RulesetInfo, RulesetChecked, RulesetRejected, ErrorBody),
        parameters=[
            {
                "name": "name",
                "in": "path",
                "required": True,
                "schema": {
                    "type": "string",
                    "pattern": f"^{RULESET_NAME.pattern}$",
                    "not": {"const": "schema"},
                },
                "description": "the ruleset's name; its file is `<rulesets_dir>/<name>.json`",
            }
        ],
        operation={
            "summary": "Write a ruleset: validated as the loader validates, then saved and loaded at once",
            "description": "The body is the ruleset file, kept as sent. It is checked with the live "
            "loader's channels and templates; an invalid one changes nothing and every error comes back "
            "with its line, column and JSON path. With `dry_run=true` it is only checked.",
            "operationId": "putRuleset",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("RulesetFile")}},
            },
            "responses": {
                "200": json_body(
                    {"oneOf": [ref("RulesetInfo"), ref("RulesetChecked")]},
                    "written and live (RulesetInfo), or with `dry_run=true` valid (RulesetChecked)",
                ),
                "400": error("a name not of lower case letters, digits and _"),
                "422": json_body(ref("RulesetRejected"), "invalid ruleset, every error; nothing changed"),
                "503": error("the rulesets folder cannot be written"),
            },
        },
    ),
    # -- console-rulesets: one ruleset in detail (the console's ruleset page) --
    Route(
        "GET",
        "/v1/rulesets/{name:(?!reload$)[^/]+}",  # `GET /v1/rulesets/reload` stays a 405 (it is a POST)
        rulesets.get_ruleset,
        "admin",
        types=(RulesetDetail, ErrorBody),
        operation={
            "summary": "One ruleset: its status and load errors, each rule in words, its holdout, A/B "
            "arms and goal, and the current text of its file",
            "description": "`rules`, `holdout`, `variants` and `goal` describe the live version; `source` "
            "is the file as it is now, which after a refused edit is not the live version (`status` "
            "`error`, `errors` say why). Each rule has the events that trigger it, its conditions and a "
            "sentence per action (a send's channel, template and delay are also given as fields).",
            "operationId": "getRuleset",
            "responses": {
                "200": json_body(ref("RulesetDetail"), "the ruleset"),
                "404": error("no such ruleset file in the rulesets folder"),
            },
        },
    ),
    # -- end console-rulesets --
    Route(
        "POST",
        "/v1/simulate",
        simulate.post_simulate,
        "admin",
        types=(SimulateRequest, SimulateResult, SimulateRejected, ErrorBody),
        operation={
            "summary": "Run the live rulesets over events on a virtual clock; sends and stores nothing",
            "operationId": "simulate",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("SimulateRequest")}},
            },
            "responses": {
                "200": json_body(ref("SimulateResult"), "every action in time order"),
                "413": error(
                    "more events or contacts than RULESVC_SIMULATE_MAX_EVENTS or "
                    "RULESVC_SIMULATE_MAX_CONTACTS"
                ),
                "422": json_body(
                    ref("SimulateRejected"),
                    "invalid request, with the field path; or an event the engine could not evaluate; "
                    "or over the time budget (RULESVC_SIMULATE_BUDGET_SECONDS)",
                ),
                "429": error("a simulation runs and another waits in this process; retry after Retry-After"),
            },
        },
    ),
    Route(
        "POST",
        "/v1/backtests",
        backtests.post_backtest,
        "admin",
        types=(BacktestRequest, RulesetFile, BacktestJob, BacktestRejected, BacktestConflict, ErrorBody),
        operation={
            "summary": "Start a backtest: the window's stored events replayed through the baseline and a "
            "candidate; sends and writes nothing",
            "description": "The baseline is the live rulesets (or `baseline_dir`); the candidate is the "
            "baseline with `rulesets` replacing or adding rulesets by name and `remove` dropping some, or "
            "the folder `rulesets_dir`. Every ruleset is checked as `PUT /v1/rulesets/{name}` checks it. "
            "The job runs in a process of its own; follow it with `GET /v1/backtests/{job_id}` (the "
            "`Location`). One backtest runs at a time per service, whichever worker a request reaches: "
            "another request meanwhile gets 409 with the running job and its progress. A job lives only "
            "as long as the process that runs it: a restart of the service drops a running backtest (it "
            "shows as `cancelled`, or `lost` if its worker died).",
            "operationId": "postBacktest",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("BacktestRequest")}},
            },
            "responses": {
                "202": {
                    **links(
                        json_body(ref("BacktestJob"), "started: the job (queued), to follow at `Location`"),
                        GetBacktest=("getBacktest", {"job_id": "$response.body#/id"}),
                        CancelBacktest=("cancelBacktest", {"job_id": "$response.body#/id"}),
                    ),
                    "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
                },
                "409": json_body(
                    ref("BacktestConflict"), "a backtest runs already: the running job, with its progress"
                ),
                "422": json_body(
                    ref("BacktestRejected"),
                    "every problem with its path: a bad window (empty, in the future, beyond the event "
                    "retention), a folder that is not one, every error of every ruleset "
                    "(`$.rulesets.<name>...`)",
                ),
                "503": error("the backtest process could not be started"),
            },
        },
    ),
    Route(
        "GET",
        "/v1/backtests",
        backtests.get_backtests,
        "admin",
        types=(BacktestList, ErrorBody),
        operation={
            "summary": "The recent backtest jobs (the last 50), newest first, without their reports",
            "operationId": "getBacktests",
            "responses": {
                "200": links(
                    json_body(ref("BacktestList"), "jobs"),
                    GetBacktest=("getBacktest", {"job_id": "$response.body#/backtests/0/id"}),
                )
            },
        },
    ),
    Route(
        "GET",
        "/v1/backtests/{job_id}",
        backtests.get_backtest,
        "admin",
        types=(BacktestJob, ErrorBody),
        parameters=[JOB_ID],
        operation={
            "summary": "A backtest job: its status, progress (events replayed of the total, ETA), the "
            "report when done, the error when failed",
            "description": "`lost`: the job's process stopped answering (its worker died); it no longer "
            "blocks a new backtest.",
            "operationId": "getBacktest",
            "responses": {
                "200": json_body(ref("BacktestJob"), "the job"),
                "404": error("no such backtest (the last 50 are kept)"),
            },
        },
    ),
    Route(
        "POST",
        "/v1/backtests/{job_id}/cancel",
        backtests.cancel_backtest,
        "admin",
        types=(BacktestJob, BacktestEnded, ErrorBody),
        parameters=[JOB_ID],
        operation={
            "summary": "Cancel a queued or running backtest",
            "description": "A running job stops at its next progress write (within about a second): "
            "`cancel_requested` is true until its status is `cancelled`.",
            "operationId": "cancelBacktest",
            "responses": {
                "200": json_body(ref("BacktestJob"), "the job, cancelled or to be cancelled"),
                "404": error("no such backtest"),
                "409": json_body(ref("BacktestEnded"), "the job has ended (done, failed or lost)"),
            },
        },
    ),
    Route(
        "GET",
        "/v1/stats",
        stats.get_stats,
        "admin",
        query=StatsQuery,
        types=(StatsReport, ErrorBody),
        operation={
            "summary": "A ruleset's funnel, and for a holdout or an A/B test each group's conversion rate "
            "and the uplift between groups, with 95 % intervals",
            "description": "Counts are hourly: the window [`from`, `to`) takes every hour it overlaps "
            "(default: the 7 days up to the end of the current hour). `funnel` adds up every rule, group "
            "and channel; `rows` has each; `series` each UTC hour or day with counts (with `by`). For a "
            "ruleset with a holdout or variants, `groups` has `treatment` (every contact not held out), "
            "each arm and `holdout`, with conversions per entry, and `comparisons` the treatment and each "
            "arm against the holdout, and each arm against the first: absolute uplift (Newcombe), relative "
            "uplift (Katz log), revenue per entry (Welch), `enough_data` false with a note below the "
            "minimum sample; `method` says how. A conversion is credited to the last message of the "
            'ruleset the contact got after entering, else to the entry\'s rule (channel "").',
            "operationId": "getStats",
            "responses": {
                "200": json_body(ref("StatsReport"), "the counts and, for a test, the comparisons"),
                "404": error(
                    "no such ruleset: none is loaded under this name and none was ever counted (a "
                    "removed ruleset with counts answers)"
                ),
            },
        },
    ),
    Route(
        "GET",
        "/healthz",
        ops.healthz,
        "ops",
        types=(Health,),
        operation={
            "summary": "The process is up",
            "operationId": "healthz",
            "responses": {"200": json_body(ref("Health"), "up")},
        },
    ),
    Route(
        "GET",
        "/readyz",
        ops.readyz,
        "ops",
        types=(Health,),
        operation={
            "summary": "Ready to serve: MongoDB reachable and rulesets loaded",
            "description": "200 with status `degraded` when it serves but needs a look: no rulesets "
            "loaded, a refused ruleset, a ruleset sending on a channel that is not configured, the oldest "
            "unprocessed event waited too long, or events were quarantined recently. `checks` has a line "
            "per part, `reasons` a sentence per problem.",
            "operationId": "readyz",
            "responses": {
                "200": json_body(ref("Health"), "ready (`ok` or `degraded`)"),
                "503": json_body(ref("Health"), "not ready; `checks` says why"),
            },
        },
    ),
    Route(
        "GET",
        "/metrics",
        ops.metrics,
        "ops",
        operation={
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {}}}},
        },
    ),
    Route(
        "GET",
        "/openapi.json",
        ops.openapi_json,
        "public",
        operation={
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
        },
    ),
]

_ACCESS = {(r.method, r.documented_path): r.access for r in ROUTES}


def _pattern(path: str) -> re.Pattern[str]:
    """The route's path as aiohttp matches it: `{name}` one segment, `{name:regex}` the regex."""
    parts = re.split(r"(\{\w+(?::[^}]*)?\})", path)
    regex = "".join(
        ("(?:" + (p[1:-1].split(":", 1)[1] if ":" in p else "[^{}/]+") + ")")
        if p.startswith("{")
        else re.escape(p)
        for p in parts
    )
    return re.compile(regex + "$")


# Most specific first: more segments, then fewer placeholders (`/v1/rulesets/reload` before `/{name}`).
_SPECIFIC = sorted(
    {r.documented_path: r.path for r in ROUTES}.items(),
    key=lambda item: (-item[0].count("/"), item[0].count("{")),
)
_PATTERNS = [(documented, _pattern(path)) for documented, path in _SPECIFIC]
_METHODS: dict[str, list[str]] = {}
for _route in ROUTES:
    _METHODS.setdefault(_route.documented_path, []).extend(
        ["GET", "HEAD"] if _route.method == "GET" else [_route.method]
    )


def allowed_methods(path: str) -> str | None:
    """The `Allow` of a 405: the methods of the most specific route the path matches, as the document
    lists them. (aiohttp would add those of every matching route: `POST /v1/messages/x/retry` is also the
    path of a message `x/retry`.)"""
    for documented, pattern in _PATTERNS:
        if pattern.match(path):
            return ",".join(sorted(_METHODS[documented]))
    return None


def access(method: str, canonical: str) -> Access:
    """Who may call a route (`HEAD` as its `GET`); a route missing from the table is admin's."""
    return _ACCESS.get(("GET" if method == "HEAD" else method, canonical), "admin")


def media_types(route: Route) -> frozenset[str] | None:
    """The Content-Types the route's body may have (None: it takes no body, or the provider's own):
    those its `requestBody` declares, and the other names of NDJSON."""
    body = route.operation.get("requestBody")
    if body is None:
        return None
    declared = frozenset(body["content"])
    return declared | NDJSON_TYPES if declared & NDJSON_TYPES else declared


def checking_query(route: Route) -> Handler:
    """The route's handler behind its query check (the view reads the parsed struct: `query_of`) and,
    for a route with a body, the body's Content-Type check (415): as the document declares them."""
    spec = route.query
    accepted = media_types(route)
    listed = " or ".join(sorted(accepted)) if accepted else ""
    if spec is None and accepted is None:
        return route.handler

    async def handler(request: web.Request) -> web.StreamResponse:
        if accepted is not None and request.body_exists and request.content_type not in accepted:
            return error_response(415, f"unsupported content type `{request.content_type}`; use {listed}")
        try:
            if spec is not None:
                request[QUERY] = parse_query(request, spec)
            return await route.handler(request)
        except QueryRejected as exc:  # the view may refuse a combination the struct cannot express
            return exc.response()

    return handler


def setup_routes(app: web.Application) -> None:
    for route in ROUTES:
        if route.method == "GET":
            app.router.add_get(route.path, checking_query(route))  # and HEAD
        else:
            app.router.add_route(route.method, route.path, checking_query(route))


@functools.cache
def openapi_document() -> bytes:
    return openapi.document(ROUTES)
