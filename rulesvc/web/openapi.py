"""The OpenAPI 3.1 document, with schemas generated from the same msgspec types that validate requests."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from rulesvc.core.contacts import Contact, ContactIn, ContactRejected
from rulesvc.core.events import Event, EventsAccepted, EventsRejected
from rulesvc.core.ids import ID_PATTERN, ID_RULE, MAX_ID_LENGTH
from rulesvc.core.messages import MessageList
from rulesvc.replay.simulate import SimulateRejected, SimulateRequest, SimulateResult
from rulesvc.web.schemas import (
    CallbacksAccepted,
    ChannelList,
    ErrorBody,
    EventList,
    Health,
    InboxAction,
    InboxList,
    InboxToken,
    InboxTokenRequest,
    QuarantineActed,
    QuarantineAction,
    QuarantineList,
    RulesetList,
)

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Schema:
    return _json(_ref("ErrorBody"), description)


def _contact_id() -> Schema:
    return {
        "name": "contact_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": ID_PATTERN},
        "description": ID_RULE,
    }


_INBOX_ACCESS = (
    " Open with that contact's inbox token (`Authorization: Bearer <token>` or `?token=`), or an admin key."
)
_INBOX_REFUSED = {
    "401": _error("no credentials, or an inbox token that is invalid or expired"),
    "403": _error("an inbox token for another contact, or an ingest key without the contact's token"),
}


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_PAGING = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "most items to return"),
    _query("before", {"type": "string", "format": "date-time"}, "only items older than this (paging)"),
]


def _paths() -> Schema:
    event_batch = {"oneOf": [_ref("Event"), {"type": "array", "items": _ref("Event")}]}
    bad_request = _error("malformed JSON (with the byte position) or a bad query parameter")
    return {
        "/v1/events": {
            "post": {
                "summary": "Post one event, an array of events, or NDJSON (one event per line)",
                "operationId": "postEvents",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": event_batch},
                        "application/x-ndjson": {"schema": _ref("Event")},
                    },
                },
                "responses": {
                    "202": _json(
                        _ref("EventsAccepted"), "stored durably; duplicates (same id) changed nothing"
                    ),
                    "400": bad_request,
                    "413": _error("body or batch over the limit"),
                    "415": _error("content type is not JSON or NDJSON"),
                    "422": _json(
                        _ref("EventsRejected"), "at least one invalid event; nothing of the batch stored"
                    ),
                    "503": _error("storage unavailable; retry after Retry-After seconds"),
                },
            }
        },
        "/v1/contacts/{contact_id}": {
            "parameters": [_contact_id()],
            "put": {
                "summary": "Create or replace a contact's profile",
                "operationId": "putContact",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ContactIn")}},
                },
                "responses": {
                    "200": _json(_ref("Contact"), "replaced"),
                    "201": _json(_ref("Contact"), "created"),
                    "400": bad_request,
                    "413": _error("body over the limit"),
                    "415": _error("content type is not JSON"),
                    "422": _json(_ref("ContactRejected"), "invalid field values; nothing changed"),
                },
            },
            "get": {
                "summary": "Read a contact",
                "operationId": "getContact",
                "responses": {"200": _json(_ref("Contact"), "the contact"), "404": _error("no such contact")},
            },
        },
        "/v1/contacts/{contact_id}/messages": {
            "parameters": [_contact_id()],
            "get": {
                "summary": "The contact's message history, newest first",
                "operationId": "getContactMessages",
                "parameters": [
                    *_PAGING,
                    _query("status", {"type": "string"}, "only messages in this status"),
                ],
                "responses": {"200": _json(_ref("MessageList"), "messages"), "400": bad_request},
            },
        },
        "/v1/contacts/{contact_id}/events": {
            "parameters": [_contact_id()],
            "get": {
                "summary": "The contact's recent events, newest first",
                "operationId": "getContactEvents",
                "parameters": _PAGING,
                "responses": {"200": _json(_ref("EventList"), "events"), "400": bad_request},
            },
        },
        "/v1/contacts/{contact_id}/inbox-token": {
            "parameters": [_contact_id()],
            "post": {
                "summary": "Mint the token a page presents to open this contact's in-app inbox "
                "(ingest or admin key: the shop's backend does this for its signed-in customer)",
                "operationId": "postInboxToken",
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("InboxTokenRequest")}},
                },
                "responses": {
                    "200": _json(_ref("InboxToken"), "the token and when it expires"),
                    "400": bad_request,
                    "422": _json(_ref("SimulateRejected"), "invalid ttl"),
                },
            },
        },
        "/v1/contacts/{contact_id}/inbox": {
            "parameters": [_contact_id()],
            "get": {
                "summary": "In-app messages to show now (delivered, not dismissed), newest first",
                "description": "Title and body are HTML (parameters escaped)." + _INBOX_ACCESS,
                "operationId": "getInbox",
                "parameters": [
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "most items"),
                    _query("token", {"type": "string"}, "the contact's inbox token, if not in the header"),
                ],
                "responses": {
                    "200": _json(_ref("InboxList"), "messages"),
                    "400": bad_request,
                    **_INBOX_REFUSED,
                },
            },
        },
        "/v1/contacts/{contact_id}/inbox/{message_id}": {
            "parameters": [
                _contact_id(),
                {"name": "message_id", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "post": {
                "summary": "Mark an in-app message shown, clicked or dismissed (rules see shown, clicked)",
                "description": _INBOX_ACCESS.strip(),
                "operationId": "markInboxMessage",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("InboxAction")}},
                },
                "responses": {
                    "204": {"description": "recorded"},
                    "400": bad_request,
                    "404": _error("no such in-app message for this contact"),
                    "422": _json(_ref("SimulateRejected"), "invalid action"),
                    **_INBOX_REFUSED,
                },
            },
        },
        "/v1/messages": {
            "get": {
                "summary": "Messages in one status across contacts, newest first (e.g. status=dead)",
                "operationId": "getMessages",
                "parameters": [
                    {"name": "status", "in": "query", "required": True, "schema": {"type": "string"}},
                    *_PAGING,
                ],
                "responses": {"200": _json(_ref("MessageList"), "messages"), "400": bad_request},
            }
        },
        "/v1/events/quarantine": {
            "get": {
                "summary": "Events set aside after their evaluation failed repeatedly, newest first",
                "description": "Every other event went on meanwhile. Each has its error, the stage that "
                "failed (`inbox`: the contact's rules; `fanout`: copying a catalog event) and its attempts.",
                "operationId": "getQuarantine",
                "parameters": [
                    _PAGING[0],
                    _query("before", {"type": "string", "format": "date-time"}, "quarantined before this"),
                ],
                "responses": {"200": _json(_ref("QuarantineList"), "quarantined events"), "400": bad_request},
            }
        },
        "/v1/events/quarantine/{action}": {
            "parameters": [
                {
                    "name": "action",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": ["retry", "drop"]},
                    "description": "retry: evaluate again (after a fix); drop: never evaluated, kept",
                }
            ],
            "post": {
                "summary": "Retry or drop quarantined events, named by id or all",
                "operationId": "actOnQuarantine",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("QuarantineAction")}},
                },
                "responses": {
                    "200": _json(_ref("QuarantineActed"), "how many events were retried or dropped"),
                    "400": bad_request,
                    "422": _error("neither or both of `ids` and `all`"),
                },
            },
        },
        "/v1/channels": {
            "get": {
                "summary": "Loaded plugins and their channels, and whether each channel is configured",
                "operationId": "getChannels",
                "responses": {"200": _json(_ref("ChannelList"), "channels and plugins")},
            }
        },
        "/v1/channels/{name}/callbacks": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": {
                "summary": "A provider's delivery reports, authenticated as that provider signs them",
                "operationId": "channelCallback",
                "responses": {
                    "200": _json(_ref("CallbacksAccepted"), "outcomes queued as message_* events"),
                    "401": _error("the provider's signature did not verify"),
                    "404": _error("no such channel, or it takes no callbacks"),
                },
            },
        },
        "/v1/rulesets": {
            "get": {
                "summary": "The rulesets: live version, events they listen to, and errors of refused edits",
                "operationId": "getRulesets",
                "responses": {"200": _json(_ref("RulesetList"), "rulesets")},
            }
        },
        "/v1/rulesets/reload": {
            "post": {
                "summary": "Reload the rulesets folder now (it is also watched)",
                "operationId": "reloadRulesets",
                "responses": {"200": _json(_ref("RulesetList"), "rulesets after the reload")},
            }
        },
        "/v1/simulate": {
            "post": {
                "summary": "Run the live rulesets over events on a virtual clock; sends and stores nothing",
                "operationId": "simulate",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SimulateRequest")}},
                },
                "responses": {
                    "200": _json(_ref("SimulateResult"), "every action in time order"),
                    "400": bad_request,
                    "413": _error(
                        "body over the limit, or more events or contacts than RULESVC_SIMULATE_MAX_EVENTS "
                        "or RULESVC_SIMULATE_MAX_CONTACTS"
                    ),
                    "415": _error("content type is not JSON"),
                    "422": _json(
                        _ref("SimulateRejected"),
                        "invalid request, with the field path; or an event the engine could not evaluate; "
                        "or over the time budget (RULESVC_SIMULATE_BUDGET_SECONDS)",
                    ),
                    "429": _error(
                        "a simulation runs and another waits in this process; retry after Retry-After"
                    ),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process is up",
                "operationId": "healthz",
                "responses": {"200": _json(_ref("Health"), "up")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Ready to serve: MongoDB reachable and rulesets loaded",
                "description": "200 with status `degraded` when it serves but needs a look: the oldest "
                "unprocessed event waited too long, or events were quarantined recently (`checks` says).",
                "operationId": "readyz",
                "responses": {
                    "200": _json(_ref("Health"), "ready (`ok` or `degraded`)"),
                    "503": _json(_ref("Health"), "not ready; `checks` says why"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": {
                    "200": {"description": "Prometheus text format", "content": {"text/plain": {}}}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
            }
        },
    }


@functools.cache
def document() -> bytes:
    types = [Event, EventsAccepted, EventsRejected, ContactIn, Contact, ContactRejected, MessageList]
    types += [EventList, Health, ErrorBody, RulesetList, SimulateRequest, SimulateResult, SimulateRejected]
    types += [ChannelList, CallbacksAccepted, InboxList, InboxAction, InboxToken, InboxTokenRequest]
    types += [QuarantineList, QuarantineAction, QuarantineActed]
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "rulesvc",
            "version": "0.1.0",
            "description": "Real-time trigger marketing: post events, manage contacts, read what was sent.",
        },
        "servers": [{"url": "/"}],
        "paths": _paths(),
        "components": {"schemas": components},
    }
    return msgspec.json.encode(doc)
