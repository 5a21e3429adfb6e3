"""Schemathesis against /openapi.json with every check it has: no server error, and each response's
status, content type, headers and body as the document declares them; invalid requests refused, valid
ones accepted; authentication enforced where declared (a request without the key and one with a wrong
key are probed); resources just created are there. Then the stateful run follows the document's links
(PUT contact -> GET contact, its events and messages; POST events -> GET contact events; messages ->
one message -> retry or cancel; inbox token -> inbox). Every operation and every body type (JSON and
NDJSON). Junk that generation does not reach (deep nesting, bytes that are not UTF-8, broken compression)
is the kept list in tests/test_junk_bodies.py.

The service runs as a real process on a real mongod, with an admin key, so the fuzzed requests reach the
handlers (and the storage) rather than stopping at authentication. Derandomized (a fixed sequence of
examples, no example database) so a run is the same on every machine: it cannot flake."""

from __future__ import annotations

import os
import shutil
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import FlakyStrategyDefinition
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.stateful import OpenAPIStateMachine

from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.routes import openapi_document
from tests.service import ServiceProcess

pytestmark = pytest.mark.slow
# Per operation; about a minute in all on 2 cores. RULESVC_FUZZ_EXAMPLES=2000 for a long run (README).
EXAMPLES = int(os.environ.get("RULESVC_FUZZ_EXAMPLES", "60"))
DOCUMENT = msgspec.json.decode(openapi_document())
# A schema-valid body may still break a rule no JSON schema states (an IANA time zone, a contact id for a
# customer event type, a ttl over 30d, a ruleset's references, `ids` or `all`): those bodies get 422 with
# the field's path, which positive_data_acceptance is told to accept for these operations only. Query
# parameters and every other operation are held to the strict default.
# A backtest's window (not empty, not in the future, within the event retention) and its folders (on the
# server) are such rules too, and so is the window of GET /v1/stats (`from` before `to`, a series of at
# most 5000 points): two query parameters together, which no schema of one parameter states. So are the
# filters of GET /v1/messages: `from` before `to`, and `rule` only with its `ruleset`.
# A channel's test send takes an address only the channel can judge (`to` is an email address for one, a
# phone number for another; 404 no such channel, 409 not configured).
SEMANTIC_BODIES = ["postEvents", "putContact", "postInboxToken", "putRuleset", "simulate", "actOnQuarantine",
                   "postBacktest", "getStats", "testChannel", "getMessages"]  # fmt: skip
CONFIG = SchemathesisConfig.from_dict(
    {
        "operations": [
            {
                "include-operation-id": SEMANTIC_BODIES,
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "401", "403", "404", "409", "422", "429", "5xx"]
                    }
                },
            },
            {  # Segment's messages: a JSON object is not yet one (a track needs `event`, and a user id)
                "include-operation-id": [
                    "segmentBatch",
                    "segmentTrack",
                    "segmentIdentify",
                    "segmentPage",
                    "segmentScreen",
                    "segmentAlias",
                    "segmentGroup",
                ],
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "400", "401", "403", "413", "429", "5xx"]
                    }
                },
            },
            {  # the provider's own format (Twilio: a signed form): what schemathesis makes up is not it
                "include-operation-id": ["channelCallback"],
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "400", "401", "403", "404", "415", "429", "5xx"]
                    }
                },
            },
        ]
    }
)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
FIXED = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
)


KEY_TO_COME = "Bearer <the service's admin key>"  # some cases are made before the service starts


@schema.auth()
class AdminKey:
    """The service's admin key on every request, given as schemathesis' own auth rather than as headers
    of the call: so a case that leaves the key out on purpose (negative testing) goes without it, and
    `ignored_auth` knows which credentials to take away for its probes. `with_key` puts the real key in
    just before the call."""

    def get(self, case: Any, context: Any) -> str:
        return KEY_TO_COME

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": data}


def with_key(case: Any, service: ServiceProcess) -> Any:
    if case.headers and case.headers.get("Authorization") == KEY_TO_COME:
        case.headers["Authorization"] = f"Bearer {service.key}"
    return case


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
    seed(process)
    yield process
    process.stop()


def seed(process: ServiceProcess) -> None:
    """Messages for the links to follow: a scheduled cart reminder (to cancel) and a purchase confirmation
    that cannot go out (email is not configured here) as a message to read and to retry."""
    contact = {"email": "seed@example.com", "consent": {"email": True, "push": True}}
    assert process.request("PUT", "/v1/contacts/seed", contact)[0] in (200, 201)
    events = [
        {"id": "seed-cart", "type": "cart_updated", "contact_id": "seed", "attributes": {"value": 50}},
        {"id": "seed-order", "type": "purchased", "contact_id": "seed",
         "attributes": {"order_id": "o1", "value": 50, "currency": "EUR", "items": []}},
    ]  # fmt: skip
    assert process.request("POST", "/v1/events", events)[0] == 202
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, body = process.request("GET", "/v1/contacts/seed/messages")
        if len(body["messages"]) >= 2:
            return
        time.sleep(0.1)
    raise AssertionError(f"the seed events made no messages: {body}")


def test_document_declares_security_and_responses_for_every_operation() -> None:
    """Each operation names how it is authenticated and the answers the middleware gives before its
    handler runs; judged here from the route's access as the README states it, not from the generator."""
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "http", "scheme": "bearer"}
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            security, responses = operation["security"], operation["responses"]
            if path == "/openapi.json" or path.endswith("/callbacks"):
                assert security == [], path
                continue
            if path.startswith("/v1/sources/"):  # a provider's webhooks: its own signature, no API key
                assert security == [] and "401" in responses, path
                continue
            assert "503" in responses and "Retry-After" in responses["503"]["headers"], (method, path)
            if path in ("/healthz", "/readyz", "/metrics"):
                assert {} in security and {"apiKey": ["admin"]} in security, path
                continue
            assert {"401", "429"} <= responses.keys(), (method, path)
            assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
            assert responses["429"]["headers"]["Retry-After"]["required"] is True
            assert {"apiKey": ["admin"]} in security, (method, path)
            if "requestBody" in operation:
                assert {"413", "415"} <= responses.keys(), (method, path)
    assert DOCUMENT["paths"]["/v1/events"]["post"]["security"] == [
        {"apiKey": ["ingest"]},
        {"apiKey": ["admin"]},
    ]
    # Both writing scopes may post; a `read` key may not.
    assert "a `read` key" in DOCUMENT["paths"]["/v1/events"]["post"]["responses"]["403"]["description"]
    assert {"inboxToken": []} in DOCUMENT["paths"]["/v1/contacts/{contact_id}/inbox"]["get"]["security"]
    until = DOCUMENT["components"]["schemas"]["SimulateRequest"]["properties"]["until"]["anyOf"][0]
    assert until["format"] == "date-time"
    message = DOCUMENT["components"]["schemas"]["Message"]["properties"]
    assert message["created_at"]["format"] == "date-time"
    assert message["outcomes"]["additionalProperties"]["format"] == "date-time"


@schema.parametrize()
@settings(FIXED, max_examples=EXAMPLES)
def test_every_check(case: Any, service: ServiceProcess) -> None:
    with_key(case, service).call_and_validate(base_url=service.url, timeout=30)


# Their answers depend on time, not only on the requests before: a POST is 202, or 409 while the backtest
# an earlier step started still runs. A derandomized state machine replays a sequence expecting the same
# answers (else hypothesis reports a flaky strategy), so they are left to the stateless run above and to
# tests/test_backtest_api.py.
TIMED = ["postBacktest", "getBacktests", "getBacktest", "cancelBacktest"]


def test_stateful_links(service: ServiceProcess) -> None:
    """Sequences along the document's links, every check on every step."""

    class Workflow(schema.exclude(operation_id=TIMED).as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": service.url, "timeout": 30}

        def before_call(self, case: Any) -> None:
            with_key(case, service)

    assert issubclass(Workflow, OpenAPIStateMachine)
    # Every link of the document became a transition of the state machine (none dropped as unresolvable).
    transitions = [name for name in dir(Workflow) if "___" in name]
    for item in DOCUMENT["paths"].values():
        for method, operation in item.items():
            if method != "parameters" and operation["operationId"] in TIMED:
                continue
            for status, response in operation.get("responses", {}).items() if method != "parameters" else ():
                for link in response.get("links", {}):
                    assert any(f"___{status}_{link}__" in t for t in transitions), (method, status, link)
    # Hypothesis replays the sequences' prefixes and expects the same draws; a draw that depends on an
    # answer that changed meanwhile (a message the scheduler sent between two runs of the same prefix is
    # no longer cancellable, so another link applies) makes it report the strategy as flaky. That is the
    # service moving on, not a failed check: the run is made again, at most twice. A failed check (any
    # other error) fails the test at once.
    for attempt in range(3):
        try:
            Workflow.run(settings=settings(FIXED, max_examples=max(10, EXAMPLES // 2), stateful_step_count=6))
            return
        except FlakyStrategyDefinition:
            if attempt == 2:
                raise


def test_the_generated_requests_reached_the_handlers(service: ServiceProcess) -> None:
    """Runs last (pytest keeps the module's order): the service's own request counts show that the
    requests got past authentication (the admin key was on them) on every operation; the 401s are the
    cases generated without a key and the probes of `ignored_auth` (two per 2xx)."""
    with urllib.request.urlopen(service.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    by_status: Counter[str] = Counter()
    past_authentication: set[tuple[str, str]] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rulesvc_http_requests_total":
                by_status[sample.labels["status"]] += int(sample.value)
                if sample.labels["status"] != "401":
                    past_authentication.add((sample.labels["method"], sample.labels["route"]))
    assert by_status["401"] < sum(by_status.values()) / 2, by_status
    operations = {(m.upper(), p) for p, item in DOCUMENT["paths"].items() for m in item if m != "parameters"}
    assert operations <= past_authentication, operations - past_authentication
