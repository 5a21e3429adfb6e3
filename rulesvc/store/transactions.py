"""Transactions that end: retried on transient errors within the client's deadline, and sessions the
server may still hold aborted on the next call, so that a lost answer never pins documents for long."""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import pymongo
import structlog
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import ConnectionFailure, PyMongoError

log = structlog.get_logger(__name__)

T = TypeVar("T")


async def in_transaction(
    client: AsyncMongoClient[Any], write: Callable[[AsyncClientSession], Awaitable[T]]
) -> T:
    """`write` in one transaction, retried on transient errors, all within the client's deadline
    (RULESVC_MONGODB_TIMEOUT_SECONDS): PyMongo alone retries a transaction against a paused or lost
    server for 120 s, a loop stuck that long in one batch."""
    await _end_abandoned(client)
    async with client.start_session() as session:
        try:
            with pymongo.timeout(client.options.timeout):
                return await session.with_transaction(write)
        except PyMongoError as exc:
            if exc.timeout or isinstance(exc, ConnectionFailure):
                # Its abort may not have reached the server, where the transaction then holds its
                # documents for mongod's transaction lifetime (60 s): every later batch of the same
                # contacts would wait that long. Killing the session aborts it; the next call does
                # that once the server answers again.
                _abandoned.setdefault(client, []).append(session.session_id)
            raise


# Sessions whose transaction may still be open on the server, per client.
_abandoned: weakref.WeakKeyDictionary[AsyncMongoClient[Any], list[Mapping[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


async def _end_abandoned(client: AsyncMongoClient[Any]) -> None:
    sessions = _abandoned.get(client)
    if not sessions:
        return
    try:
        await client.admin.command("killSessions", list(sessions))
    except PyMongoError as exc:
        if exc.timeout or isinstance(exc, ConnectionFailure):
            raise  # still unreachable: kept for the next call
        # Refused (a deployment without the privilege): mongod ends them at their lifetime instead.
        log.warning("mongodb.abandoned_transactions_kept", sessions=len(sessions), error=str(exc)[:300])
    else:
        log.info("mongodb.abandoned_transactions_ended", sessions=len(sessions))
    sessions.clear()
