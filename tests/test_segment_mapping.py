"""The Segment mapping file: one validator for start-up and `rulesvc check`, a user's own copy in use, and
random bodies on the Segment routes of a running service never getting a server error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulesvc.config import Settings
from rulesvc.core.segment import parse_mapping
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.app import create_app
from tests.service import ServiceProcess
from tests.test_segment import basic, post

ROOT = Path(__file__).parent.parent
SHIPPED = ROOT / "rulesvc" / "sources" / "segment_mapping.json"


def rulesvc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rulesvc", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


BROKEN = """{
  "track": {
    "Product Viewed": {"type": "product viewed"},
    "Order Completed": {"type": "purchased", "attributes": {"value": "properties..total"}},
    "order completed": {"type": "purchased"},
    "Price Changed": {"type": "price_changed", "items": {"fields": {}}}
  },
  "page": {"type": "page_viewed", "keep_properties": "yes"}
}
"""


def test_check_validates_the_mapping_file_with_every_problem_and_its_place(tmp_path: Path) -> None:
    broken = tmp_path / "mapping.json"
    broken.write_text(BROKEN)
    result = rulesvc("check", str(ROOT / "rulesets"), "--segment-mapping", str(broken))
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith(str(broken))]
    assert problems == [
        f"{broken}:1:1: $.screen: missing required key `screen`",
        f'{broken}:3:32: $.track["Product Viewed"].type: expected an event type such as `cart_updated`: '
        'letters, digits, `_`, `.`, `:` and `-`, starting with a letter, got "product viewed"',
        f'{broken}:6:57: $.track["Price Changed"].items.from: missing required key `from`',
        f'{broken}:8:54: $.page.keep_properties: expected true or false, got "yes"',
    ]
    assert f"segment mapping {broken}: invalid" in result.stderr
    # the shipped one (RULESVC_SEGMENT_MAPPING unset) passes
    result = rulesvc("check", str(ROOT / "rulesets"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"segment mapping {SHIPPED}: valid" in result.stderr


def test_problems_only_the_whole_file_shows_are_found_once_it_decodes(tmp_path: Path) -> None:
    mapping = json.loads(SHIPPED.read_text())
    mapping["track"]["product viewed"] = {"type": "product_viewed"}  # the same name in another case
    mapping["track"]["Price Changed"] = {"type": "price_changed"}  # a catalog type has no contact
    mapping["page"]["attributes"]["url"] = ["properties.url", "page.url"]  # no such place in a message
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(mapping, indent=2))
    result = rulesvc("check", str(ROOT / "rulesets"), "--segment-mapping", str(path))
    assert result.returncode == 1
    said = {line.split(": ", 2)[1]: line.split(": ", 2)[2] for line in result.stdout.splitlines()
            if line.startswith(str(path))}  # fmt: skip
    assert said['$.track["product viewed"]'].startswith("the same event as `Product Viewed`")
    assert said['$.track["Price Changed"].type'].startswith("`price_changed` is a catalog event")
    assert said["$.page.attributes.url[1]"].startswith("expected a place in the Segment message")


def test_the_documented_example_is_a_valid_mapping() -> None:
    (example,) = re.findall(r"```json\n(.*?)```", (ROOT / "docs" / "segment.md").read_text(), re.S)
    mapping = parse_mapping("segment.md", example.encode())
    assert mapping.for_track("product added") is mapping.track["Product Added"]


def test_a_broken_mapping_stops_start_up(tmp_path: Path) -> None:
    broken = tmp_path / "mapping.json"
    broken.write_text('{"track": {}, "page": {"type": "page_viewed"}, "screen": {"type": 3}}')
    result = rulesvc("serve", "--port", "1", env={"RULESVC_SEGMENT_MAPPING": str(broken)})
    assert result.returncode == 2
    assert f"{broken}:1:67: $.screen.type: expected an event type" in result.stderr
    missing = tmp_path / "nowhere.json"
    result = rulesvc("serve", "--port", "1", env={"RULESVC_SEGMENT_MAPPING": str(missing)})
    assert result.returncode == 2
    assert f"{missing}: $: cannot read: No such file or directory" in result.stderr


async def test_a_users_own_mapping_is_used(
    make_client: Any, settings: Settings, db: Any, tmp_path: Path
) -> None:
    attributes = {"plan": "properties.plan", "via": "context.campaign.source"}
    own = {"track": {"Signed Up": {"type": "subscribed", "keep_properties": False, "attributes": attributes}},
           "page": {"type": "visited"}, "screen": {"type": "visited"}, "identify": {"event": None},
           "unmapped_track": "ignore"}  # fmt: skip
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(own))
    app = create_app(msgspec.structs.replace(settings, segment_mapping=str(path)))
    client = await make_client(app, "ingest")
    batch = {"context": {"campaign": {"source": "newsletter"}}, "batch": [
        {"type": "track", "event": "signed up", "userId": "u", "properties": {"plan": "pro", "x": 1}},
        {"type": "track", "event": "Product Viewed", "userId": "u"},
        {"type": "screen", "name": "Home", "userId": "u"},
        {"type": "identify", "userId": "u", "traits": {"first_name": "Una"}},
    ]}  # fmt: skip
    assert await post(client, "/v1/batch", batch) == (
        200, {"success": True, "accepted": 2, "duplicates": 0, "ignored": 1}
    )  # fmt: skip
    events = {e["type"]: e["attributes"] async for e in db.events.find({})}
    assert events == {"subscribed": {"plan": "pro", "via": "newsletter"}, "visited": {}}
    assert (await db.contacts.find_one({"_id": "u"}))["attributes"] == {"first_name": "Una"}


@pytest.mark.parametrize(
    ("name", "type_"),
    [
        ("Order Refunded", "order_refunded"),
        ("signedUp", "signed_up"),
        ("  Video -- Played!  ", "video_played"),
        ("Über uns", "uber_uns"),
        ("3D View", "event_3d_view"),
        ("!!!", "event"),
        ("x" * 80, "x" * 64),
    ],
)
async def test_an_unmapped_track_event_is_a_custom_event_of_its_name_in_snake_case(
    make_client: Any, settings: Settings, db: Any, name: str, type_: str
) -> None:
    client = await make_client(create_app(settings), "ingest")
    body = {"event": name, "userId": "u", "messageId": "m-1", "properties": {"n": 1}}
    assert (await post(client, "/v1/track", body))[0] == 200
    assert await db.events.find_one({}, {"_id": 0, "type": 1, "attributes": 1}) == {
        "type": type_,
        "attributes": {"n": 1},
    }


# --- random bodies against a running service ----------------------------------------------------------


@pytest.fixture(scope="module")
def service(mongod: EmbeddedMongod, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("segment")
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "segment_fuzz", "RULESVC_RATE_LIMIT": "0"}
    process = ServiceProcess(workdir, env=env)
    process.start()
    process.key = process.cli("keys", "create", "--scope", "ingest", "--name", "s").stdout.splitlines()[-1]
    yield process
    process.stop()


SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
TIME = st.none() | st.sampled_from(
    ["2026-11-27T08:00:00.123Z", "2026-11-27T08:00:00", "0001-01-01T00:00:00+01:00",
     "9999-12-31T23:59:59-23:59", "1969-12-31T23:59:59Z", "yesterday", ""]
) | st.integers()  # fmt: skip
ID = st.none() | st.integers() | st.booleans() | st.text(max_size=10) | st.sampled_from(["a/b", "x" * 200])
NAMES = json.loads(SHIPPED.read_text())["track"]
PRODUCTS = st.lists(
    st.fixed_dictionaries({}, optional={"product_id": ID, "price": SCALAR, "quantity": SCALAR, "name": JSON}),
    max_size=3,
)
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["track", "identify", "page", "screen", "alias", "group"]) | JSON,
        "messageId": ID, "userId": ID, "anonymousId": ID, "previousId": ID, "groupId": ID,
        "event": st.sampled_from(sorted(NAMES)) | JSON, "name": JSON,
        "timestamp": TIME, "sentAt": TIME, "originalTimestamp": TIME,
        "properties": st.fixed_dictionaries({}, optional={"products": PRODUCTS | JSON, "total": SCALAR,
                                                          "price": SCALAR, "product_id": ID}) | JSON,
        "traits": st.dictionaries(st.sampled_from(["email", "phone", "email_opt_in", "consent", "timezone",
                                                   "firstName", "a.b", "$x"]) | st.text(max_size=6), JSON,
                                  max_size=4),
        "context": JSON,
    },
)  # fmt: skip
# Mostly valid messages, with a random part, so that the storing and identify paths are reached too.
NEAR_VALID = st.fixed_dictionaries(
    {"type": st.sampled_from(["track", "identify", "page"]), "userId": st.sampled_from(["ann", "v-1", 42]),
     "event": st.sampled_from(sorted(NAMES))},
    optional={"properties": st.fixed_dictionaries({"products": PRODUCTS}, optional={"total": SCALAR}),
              "traits": st.dictionaries(st.sampled_from(["email", "phone", "sms_opt_in", "age"]), SCALAR),
              "timestamp": TIME, "anonymousId": ID},
)  # fmt: skip
BODY = (
    NEAR_VALID
    | st.fixed_dictionaries({"batch": st.lists(NEAR_VALID, min_size=1, max_size=4)})
    | MESSAGE
    | st.fixed_dictionaries({"batch": st.lists(MESSAGE | JSON, max_size=4)}, optional={"sentAt": TIME})
    | JSON
)
CALLS = ["batch", "track", "identify", "page", "screen", "alias", "group"]


@given(call=st.sampled_from(CALLS), body=BODY)
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
def test_random_bodies_never_get_a_server_error(service: ServiceProcess, call: str, body: Any) -> None:
    assert service.key is not None
    request = urllib.request.Request(
        f"{service.url}/v1/{call}", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    for name, value in basic(service.key).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status, answer = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, exc.read()
    assert status in (200, 400, 413), (call, body, status, answer)
    decoded = msgspec.json.decode(answer)
    assert decoded["success"] is (status == 200), decoded
    if status == 400:
        assert decoded["error"] and decoded["message"], decoded
