"""The `email` channel: SMTP with aiosmtplib, multipart text + HTML.

Settings ([channels.email] or RULESVC_CHANNEL_EMAIL_*): see `EmailSettings`.

SMTP has no idempotency key, so a send a crash may have interrupted is not repeated: the message is
marked `uncertain` (see rulesvc.runtime.dispatcher).
"""

from __future__ import annotations

import email.policy
import hashlib
import re
import ssl
from collections.abc import Callable, Mapping
from email.headerregistry import BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage
from email.policy import Policy
from email.utils import formatdate
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import quote

import aiosmtplib
from msgspec import Meta, field

from rulesvc import hookimpl
from rulesvc.channels import Channel, ChannelSettings, Delivery, OutboundMessage, read_settings


class EmailSettings(ChannelSettings):
    """SMTP with STARTTLS, implicit TLS or none, and AUTH when a username is given."""

    required: ClassVar[tuple[str | tuple[str, ...], ...]] = ("host", "from")

    host: Annotated[str, Meta(description="the SMTP server to send through")] = ""
    sender: Annotated[str, Meta(description="the sender: an address, or `Name <address>`")] = field(
        default="", name="from"
    )
    port: Annotated[int, Meta(ge=1, le=65535, description="the SMTP server's port")] = 587
    security: Annotated[
        Literal["starttls", "tls", "none"],
        Meta(description="`starttls`, `tls` (implicit TLS, port 465) or `none` (a local relay)"),
    ] = "starttls"
    username: Annotated[str | None, Meta(description="SMTP AUTH user; no AUTH without it")] = None
    password: Annotated[
        str | None, Meta(description="SMTP AUTH password (best as an environment variable)")
    ] = None
    reply_to: Annotated[str | None, Meta(description="the Reply-To header")] = None
    timeout: Annotated[float, Meta(gt=0, description="seconds a send may take")] = 10.0
    unsubscribe_url: Annotated[
        str | None,
        Meta(
            description="List-Unsubscribe URL of marketing mail, with `{contact_id}` and `{message_id}`; "
            "an https URL also gets one-click List-Unsubscribe-Post (RFC 8058)"
        ),
    ] = None
    unsubscribe_mailto: Annotated[str | None, Meta(description="List-Unsubscribe address")] = None
    ca_file: Annotated[str | None, Meta(description="a PEM file of CAs to trust (a private CA)")] = None


class ListUnsubscribeHeader(UnstructuredHeader, BaseHeader):
    """`List-Unsubscribe` folded only between its `<...>` items, never RFC 2047-encoded: the default
    policy encodes a long header with no spaces (as a one-click URL with signed ids is), and mail
    clients then find no URL and show no unsubscribe button. An item longer than a line stays whole."""

    def fold(self, *, policy: Policy) -> str:
        items = re.findall(r"<[^<>]*>", str(self))
        return f"{self.name}: " + f",{policy.linesep} ".join(items) + policy.linesep


_HEADERS = HeaderRegistry()
_HEADERS.map_to_type("list-unsubscribe", ListUnsubscribeHeader)
MAIL_POLICY = email.policy.default.clone(header_factory=_HEADERS)


class EmailChannel:
    name = "email"
    deduplicates = False  # SMTP has no idempotency key
    settings_type = EmailSettings

    def __init__(self, config: Mapping[str, Any] | EmailSettings) -> None:
        settings = read_settings("email", config, EmailSettings, type(self))
        self.host = settings.host
        self.port = settings.port
        self.security = settings.security
        self.username = settings.username
        self.password = settings.password
        self.sender = settings.sender
        self.reply_to = settings.reply_to
        self.timeout = settings.timeout
        self.unsubscribe_url = settings.unsubscribe_url
        self.unsubscribe_mailto = settings.unsubscribe_mailto
        self.tls_context = ssl.create_default_context(cafile=settings.ca_file)
        self.domain = self.sender.rpartition("@")[2] or "rulesvc.local"

    def status(self) -> tuple[bool, str]:
        missing = [k for k, v in (("host", self.host), ("from", self.sender)) if not v]
        if missing:
            return False, f"missing setting(s): {', '.join(missing)}"
        return True, f"SMTP {self.host}:{self.port} ({self.security})"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        if not contact.get("email"):
            return "no email address"
        if contact.get("email_invalid"):
            return "email address marked invalid (bounced)"
        return None

    def build(self, message: OutboundMessage) -> EmailMessage:
        content = message.content
        if "subject" not in content or not ("text" in content or "html" in content):
            raise ValueError("an email template needs a .subject and a .text or .html part")
        mail = EmailMessage(policy=MAIL_POLICY)
        mail["From"] = self.sender
        mail["To"] = message.contact["email"]
        mail["Subject"] = content["subject"]
        mail["Date"] = formatdate(localtime=False)
        # Stable per message: a receiving system sees a repeat as the same message.
        mail["Message-ID"] = f"<{hashlib.sha256(message.message_id.encode()).hexdigest()[:32]}@{self.domain}>"
        if self.reply_to:
            mail["Reply-To"] = self.reply_to
        if not message.transactional:
            targets = []
            if self.unsubscribe_url:
                url = self.unsubscribe_url.format(
                    contact_id=quote(message.contact_id, safe=""),
                    message_id=quote(message.message_id, safe=""),
                )
                targets.append(f"<{url}>")
                if url.lower().startswith("https://"):  # RFC 8058: one-click is a POST to an https URL
                    mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
            if self.unsubscribe_mailto:
                targets.append(f"<mailto:{self.unsubscribe_mailto}?subject=unsubscribe>")
            if targets:
                mail["List-Unsubscribe"] = ", ".join(targets)
        mail.set_content(content.get("text") or "This message is best viewed as HTML.")
        if "html" in content:
            mail.add_alternative(content["html"], subtype="html")
        return mail

    async def send(self, message: OutboundMessage) -> Delivery:
        try:
            mail = self.build(message)
        except ValueError as exc:
            return Delivery("failed", str(exc))
        try:
            await aiosmtplib.send(
                mail,
                hostname=self.host,
                port=self.port,
                username=self.username,
                password=self.password,
                use_tls=self.security == "tls",
                start_tls=True if self.security == "starttls" else False,
                tls_context=self.tls_context,
                timeout=self.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            reason = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            if all(500 <= c < 600 for c in codes):
                return Delivery("failed", f"recipient refused: {reason}")
            return Delivery("retry", f"recipient deferred: {reason}")
        except aiosmtplib.SMTPResponseException as exc:
            if 500 <= exc.code < 600:
                return Delivery("failed", f"SMTP {exc.code}: {exc.message}")
            return Delivery("retry", f"SMTP {exc.code}: {exc.message}")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return Delivery("retry", f"{type(exc).__name__}: {exc}")
        return Delivery("sent", provider_id=mail["Message-ID"])


@hookimpl
def register_channels(register: Callable[[Channel], None], config: Callable[[str], dict[str, Any]]) -> None:
    """The email channel, configured from [channels.email]."""
    register(EmailChannel(config("email")))
