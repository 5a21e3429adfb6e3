"""Privacy requests: `DELETE /v1/contacts/{id}` (erase), `GET /v1/contacts/{id}/export`, and the log of
both (`GET /v1/privacy/requests`). The work is rulesvc.runtime.privacy's; the CLI and Shopify's privacy
topics call the same functions."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from aiohttp import web

from rulesvc.runtime.privacy import ErasureBusy, erase_contact, export_chunks, record_request
from rulesvc.store.privacy import Privacy
from rulesvc.web.keys import API_KEY, STORE, TOMBSTONES
from rulesvc.web.privacy_schemas import Erased, PrivacyRequest, PrivacyRequestList
from rulesvc.web.schemas import PagingQuery
from rulesvc.web.views.base import contact_id_of, error_response, json_response, query_of


def source_of(request: web.Request) -> str:
    key = request.get(API_KEY)
    return "api" if key is None else f"api:{key.key_id}"


async def delete_contact(request: web.Request) -> web.Response:
    contact_id = contact_id_of(request)
    try:
        report = await erase_contact(request.app[STORE], contact_id, datetime.now(UTC), source_of(request))
        if TOMBSTONES in request.app:
            request.app[TOMBSTONES].stale()
    except ErasureBusy as exc:
        return error_response(503, str(exc), {"Retry-After": "5"})
    return json_response(
        Erased(True, report.contact_id_sha256, report.deleted, report.audience_removals, report.linked_ids,
               report.request_id)
    )  # fmt: skip


async def get_export(request: web.Request) -> web.StreamResponse:
    contact_id = contact_id_of(request)
    store = request.app[STORE]
    if not await Privacy(store).known(contact_id):
        return error_response(404, "no such contact: no profile, event, message or identity link of it")
    requested_at = datetime.now(UTC)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    size = 0
    async for chunk in export_chunks(store, contact_id, requested_at):
        size += len(chunk)
        await response.write(chunk)
    await response.write_eof()
    await record_request(store, "export", contact_id, source_of(request), {"bytes": size}, requested_at)
    return response


async def get_requests(request: web.Request) -> web.Response:
    query = query_of(request, PagingQuery)
    docs = await Privacy(request.app[STORE]).list_requests(query.limit + 1, query.before)
    rows = [msgspec.convert({"id": d.pop("_id"), **d}, PrivacyRequest) for d in docs[: query.limit]]
    next_before = rows[-1].requested_at if len(docs) > query.limit else None
    return json_response(PrivacyRequestList(rows, next_before))
