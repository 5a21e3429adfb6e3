"""A shop's webhook endpoint and a one-rule ruleset that sends to it: for process-level tests that count
what arrives (crashes, several processes, workers). `verified` is the one signature check every webhook
test uses: the Standard Webhooks library a receiver would use, not our own computation."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

from tests.helpers import order_flow
from tests.service import ServiceProcess

# A Standard Webhooks secret: `whsec_` and 24 random bytes in base64, as the libraries make them.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def verified(body: bytes, headers: Mapping[str, str], secret: str = SECRET) -> Any:
    """The JSON payload if `standardwebhooks` accepts the request's signature and timestamp, else None."""
    try:
        return Webhook(secret).verify(body, {k.lower(): v for k, v in headers.items()})
    except WebhookVerificationError:
        return None


class Receiver:
    """A shop's webhook endpoint: checks the signature, answers `status` after `delay` seconds, and
    counts every delivery it is handed (per message, with the status it answered, in `got`)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.status = 204
        self.got: list[tuple[str, int]] = []  # (message id, status answered), in order
        self.raw: Counter[str] = Counter()  # deliveries per Idempotency-Key, repeats included
        # Per Idempotency-Key, each request's (arrived, answered) on the monotonic clock.
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.open: dict[int, str] = {}  # requests being answered now: the sender's port -> key
        self.lock = threading.Lock()
        self.delay = delay
        self.started = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if verified(body, self.headers) is None:
                    self.send_response(401)
                    self.end_headers()
                    return
                key, port, arrived = self.headers["Idempotency-Key"], self.client_address[1], time.monotonic()
                with receiver.lock:
                    receiver.open[port] = key
                receiver.started.set()
                time.sleep(receiver.delay)  # a slow provider
                status = receiver.status
                with receiver.lock:
                    receiver.raw[key] += 1
                    receiver.spans[key].append((arrived, time.monotonic()))
                    receiver.got.append((json.loads(body)["message_id"], status))
                    del receiver.open[port]
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self, message_id: str) -> list[int]:
        """The statuses answered to each delivery of this message, in order."""
        with self.lock:
            return [status for mid, status in self.got if mid == message_id]


def flow(folder: Path) -> Path:
    return order_flow(folder, "webhook", {"order.body": "order {{ params.n }}"}, count=True)


def env_for(rulesets: Path, receiver: Receiver, **extra: str) -> dict[str, str]:
    return {"RULESVC_RULESETS_DIR": str(rulesets), "RULESVC_CHANNEL_WEBHOOK_URL": receiver.url,
            "RULESVC_CHANNEL_WEBHOOK_SECRET": SECRET, "RULESVC_LEASE_SECONDS": "2",
            "RULESVC_RETRY_BASE_SECONDS": "0.2", "RULESVC_RATE_LIMIT": "0", "RULESVC_QUIET_HOURS": "",
            **extra}  # fmt: skip


def post_orders(service: ServiceProcess, start: int, count: int) -> list[dict[str, Any]]:
    """Posts one at a time; returns the events the service acknowledged (202)."""
    acked = []
    for n in range(start, start + count):
        event = {"id": f"o{n}", "type": "order", "contact_id": f"c{n % 7}", "attributes": {"n": n}}
        try:
            if service.request("POST", "/v1/events", event)[0] == 202:
                acked.append(event)
        except OSError:
            break  # the process is being killed
    return acked


def settle(db: Any, expected: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = db.messages.count_documents({"status": {"$in": ["sent", "failed", "dead", "uncertain"]}})
        if done >= expected and db.inbox.count_documents({"state": "pending"}) == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{done} of {expected} messages settled")
