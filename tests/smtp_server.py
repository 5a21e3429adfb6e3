"""A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it is handed: for judging the email channel
by what arrives, raw bytes included."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

from rulesvc.store.mongod import free_port


class Mailbox:
    """Accepts every recipient but `nobody@...` (550), and keeps each mail as received."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], EmailMessage]] = []
        self.raw: list[bytes] = []  # as received, to check what a parser would be handed

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, _: Any) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.raw.append(envelope.content)
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 Message accepted"


@contextmanager
def smtp_server(**options: Any) -> Iterator[tuple[Mailbox, int]]:
    """A running server and its port; `options` go to aiosmtpd's Controller (TLS, AUTH)."""
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def raw_header(raw: bytes, name: bytes) -> bytes:
    """A header's lines exactly as they came over SMTP, continuation lines included."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    start = next(i for i, line in enumerate(head) if line.lower().startswith(name.lower() + b":"))
    end = next((i for i in range(start + 1, len(head)) if head[i][:1] not in (b" ", b"\t")), len(head))
    return b"\r\n".join(head[start:end])
