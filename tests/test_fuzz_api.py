"""Schemathesis against /openapi.json: every operation and every body type (JSON and NDJSON), valid and
invalid generated requests, no server error ever. Junk that generation does not reach (deep nesting,
bytes that are not UTF-8, broken compression) is the kept list in tests/test_junk_bodies.py.

The service runs as a real process on a real mongod, with an admin key, so the fuzzed requests reach the
handlers (and the storage) rather than stopping at authentication."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.routes import openapi_document
from tests.service import ServiceProcess

pytestmark = pytest.mark.slow
# Per operation; about 30 s in all. RULESVC_FUZZ_EXAMPLES=2000 for a long run (README, "Tests").
EXAMPLES = int(os.environ.get("RULESVC_FUZZ_EXAMPLES", "200"))
schema = schemathesis.openapi.from_dict(msgspec.json.decode(openapi_document()))


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: Any, value: Any) -> bytes:
    """One event per line, as shops post batches; a generated array is one line per item."""
    items = value if isinstance(value, list) else [value]
    return b"".join(msgspec.json.encode(item) + b"\n" for item in items)


@pytest.fixture(scope="module")
def service(mongod: EmbeddedMongod, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("fuzz")
    rulesets = workdir / "rulesets"  # a copy: PUT /v1/rulesets/{name} writes into it
    shutil.copytree(Path(__file__).parent.parent / "rulesets", rulesets)
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "fuzz", "RULESVC_RULESETS_DIR": str(rulesets),
           "RULESVC_RATE_LIMIT": "0"}  # fmt: skip
    process = ServiceProcess(workdir, env=env)
    process.start()
    created = process.cli("keys", "create", "--scope", "admin", "--name", "fuzz")
    process.key = created.stdout.splitlines()[-1]
    yield process
    process.stop()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, service: ServiceProcess) -> None:
    response = case.call(base_url=service.url, headers={"Authorization": f"Bearer {service.key}"}, timeout=30)
    case.validate_response(response, checks=(not_a_server_error,))
