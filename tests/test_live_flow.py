"""One shipped flow end to end: the service as a real process, the shipped checkout ruleset with its
delays shortened in the file, a real SMTP server receiving the email, and a purchase cancelling for
another contact."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from rulesvc.store.mongod import free_port
from tests.helpers import wait_for
from tests.service import ServiceProcess

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


class Inbox:
    def __init__(self) -> None:
        self.mail: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mail.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"


def test_checkout_abandonment_through_a_real_smtp_server(tmp_path: Path) -> None:
    rulesets = tmp_path / "rulesets"
    shutil.copytree(ROOT / "rulesets", rulesets)  # every shipped ruleset, as a user installs them
    flow = json.loads((rulesets / "checkout_abandon.json").read_text())
    sends = flow["rules"][0]["then"]
    # Every number is a setting; an hour, so that the purchase surely comes first on a slow machine. The
    # reminders that are left are brought due below.
    sends[0]["send"]["after"], sends[1]["send"]["after"] = "1h", "2h"
    (rulesets / "checkout_abandon.json").write_text(json.dumps(flow))

    box = Inbox()
    smtp_port = free_port()
    smtp = Controller(box, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    service = ServiceProcess(tmp_path, env={
        "RULESVC_RULESETS_DIR": str(rulesets), "RULESVC_QUIET_HOURS": "",
        "RULESVC_CHANNEL_EMAIL_HOST": "127.0.0.1", "RULESVC_CHANNEL_EMAIL_PORT": str(smtp_port),
        "RULESVC_CHANNEL_EMAIL_SECURITY": "none", "RULESVC_CHANNEL_EMAIL_FROM": "Shop <shop@example.com>",
    })  # fmt: skip
    try:
        service.start()
        for contact in ("ann", "bob"):
            profile = {"email": f"{contact}@example.com", "consent": {"email": True, "push": True}}
            assert service.request("PUT", f"/v1/contacts/{contact}", profile)[0] == 201
        assert service.request("PUT", "/v1/contacts/cy", {"email": "cy@example.com"})[0] == 201  # no consent
        checkout = {"type": "checkout_started", "attributes": {"value": 42.5, "currency": "EUR"}}
        assert service.request("POST", "/v1/events", [
            {"id": "k-ann", "contact_id": "ann", **checkout},
            {"id": "k-bob", "contact_id": "bob", **checkout},
            {"id": "k-cy", "contact_id": "cy", **checkout},
        ])[0] == 202  # fmt: skip
        purchase = {"id": "buy", "type": "purchased", "contact_id": "bob", "attributes": {"order_id": "o-1"}}
        assert service.request("POST", "/v1/events", purchase)[0] == 202
        with service.db() as db:
            wait_for(lambda: db.inbox.count_documents({"state": "pending"}) == 0, what="all events decided")
            db.schedule.update_many({"status": "pending"}, {"$set": {"due_at": datetime.now(UTC)}})
            busy = {"status": {"$in": ["pending", "running"]}}
            wait_for(lambda: db.schedule.count_documents(busy) == 0, what="every due send made")
        wait_for(lambda: len(box.mail) == 2, what="two mails")
        by_recipient = {str(m["To"]): m for m in box.mail}
        assert set(by_recipient) == {"ann@example.com", "bob@example.com"}
        assert by_recipient["ann@example.com"]["Subject"] == "Your order is not finished yet"
        assert "42.50 EUR" in by_recipient["ann@example.com"].get_body(("plain",)).get_content()
        assert by_recipient["bob@example.com"]["Subject"] == "Thank you for your order o-1"  # not a reminder
        _, history = service.request("GET", "/v1/contacts/ann/messages")
        statuses = {(m["channel"], m["status"]) for m in history["messages"]}
        # push has no provider set up here: recorded as suppressed, with the reason
        assert statuses == {("email", "sent"), ("push", "suppressed")}
        _, cy = service.request("GET", "/v1/contacts/cy/messages")
        assert {(m["template"], m["status"], m["reason"], m["detail"]) for m in cy["messages"]} == {
            (
                "checkout_abandon/push",
                "suppressed",
                "channel_not_configured",
                "push: not configured: missing setting: service_account_file or service_account_json",
            ),
            ("checkout_abandon/email", "suppressed", "no_consent", "email: no marketing consent"),
        }
        assert "cy@example.com" not in {str(m["To"]) for m in box.mail}
        _, bob = service.request("GET", "/v1/contacts/bob/messages")
        assert {(m["template"], m["status"]) for m in bob["messages"]} == {
            ("checkout_abandon/push", "cancelled"),
            ("checkout_abandon/email", "cancelled"),
            ("confirmations/order", "sent"),
        }
    finally:
        service.stop()
        smtp.stop()
