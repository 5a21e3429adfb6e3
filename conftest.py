"""Test fixtures: one throw-away real mongod (replica set) per test session, a fresh database per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pymongo import AsyncMongoClient

from rulesvc.config import Settings
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.app import create_app
from rulesvc.web.keys import KEYS
from tests.webhook_flow import Receiver

Doc = dict[str, Any]


@pytest.fixture(scope="session")
def mongod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMongod]:
    # The embedded binary, or MONGOD_BIN's: never a mongod that happens to be on PATH (see find_mongod).
    server = EmbeddedMongod(tmp_path_factory.mktemp("mongod"), os.environ.get("MONGOD_BIN") or None)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(mongod: EmbeddedMongod, tmp_path: Path) -> Settings:
    return Settings(
        mongodb_uri=mongod.uri,
        database=f"test_{uuid.uuid4().hex[:12]}",
        data_dir=str(tmp_path / "data"),
        rulesets_dir=str(tmp_path / "rulesets"),
        log_format="console",
        quiet_hours="",  # tests run at any hour; quiet hours have tests of their own
    )


@pytest.fixture
def make_client(aiohttp_client: Any) -> Any:
    """A test client that presents an API key of the given scope, created in the app's own database."""

    async def make(app: web.Application, scope: str = "admin") -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(app)
        key, _ = await app[KEYS].create(scope, "tests")  # type: ignore[arg-type]
        client.session.headers["Authorization"] = f"Bearer {key}"
        return client

    return make


@pytest.fixture
async def client(make_client: Any, settings: Settings) -> TestClient[Any, Any]:
    return await make_client(create_app(settings))  # type: ignore[no-any-return]


@pytest.fixture
async def db(mongod: EmbeddedMongod, settings: Settings) -> AsyncIterator[Any]:
    """Direct access to the test's database, to check what the service stored."""
    mongo: AsyncMongoClient[Doc] = AsyncMongoClient(mongod.uri, tz_aware=True)
    yield mongo[settings.database]
    await mongo.drop_database(settings.database)
    await mongo.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A shop's webhook endpoint that counts every delivery (tests/webhook_flow.py)."""
    r = Receiver()
    yield r
    r.server.shutdown()
