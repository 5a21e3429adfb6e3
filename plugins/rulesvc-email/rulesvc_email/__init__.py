"""The `email` channel: SMTP with aiosmtplib, multipart text + HTML.

Settings ([channels.email] or RULESVC_CHANNEL_EMAIL_*): see `EmailSettings`.

SMTP has no idempotency key, so a send a crash may have interrupted is not repeated: the message is
marked `uncertain` (see rulesvc.runtime.dispatcher).

The mail goes out as the exact bytes this module renders (7-bit, CRLF), so an optional DKIM signature
(`dkim_selector` and a key) covers what the relay receives, the unsubscribe headers included (RFC 8058).
"""

from __future__ import annotations

import asyncio
import email.policy
import hashlib
import re
import ssl
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.headerregistry import BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage
from email.policy import Policy
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import quote

import aiosmtplib
import dkim
import dkim.crypto
from msgspec import Meta, field

from rulesvc import hookimpl
from rulesvc.channels import (
    Channel,
    ChannelSettings,
    ChannelSettingsError,
    Delivery,
    OutboundMessage,
    read_settings,
)


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
    dkim_selector: Annotated[
        str | None,
        Meta(
            description="DKIM-sign every mail (for a relay that does not sign): the selector whose public "
            "key is published at `{selector}._domainkey.{domain}`; needs `dkim_private_key_file` or "
            "`dkim_private_key`"
        ),
    ] = None
    dkim_domain: Annotated[
        str | None, Meta(description="the DKIM signing domain (`d=`); default: the domain of `from`")
    ] = None
    dkim_private_key_file: Annotated[
        str | None, Meta(description="a PEM file of the DKIM RSA private key (1024 bits or more)")
    ] = None
    dkim_private_key: Annotated[
        str | None,
        Meta(
            description="the DKIM RSA private key itself, PEM (`\\n` for line breaks is fine), instead "
            "of a file; best as an environment variable"
        ),
    ] = None


# The `security` setting as the channel's status says it (a person reads it on the Channels page).
SECURITY_WORDS = {"none": "no TLS", "starttls": "STARTTLS", "tls": "TLS"}
DKIM_SETTINGS = ("dkim_selector", "dkim_domain", "dkim_private_key_file", "dkim_private_key")
# What a DKIM signature covers when present: the RFC 6376 5.4.1 recommendations this mail has, and both
# unsubscribe headers, which RFC 8058 section 4 requires to be signed. `from` twice: no second From may
# be added without breaking the signature.
SIGNED_HEADERS = (
    "from", "to", "subject", "date", "message-id", "reply-to", "mime-version", "content-type",
    "content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post",
)  # fmt: skip


class DkimKey:
    """A checked DKIM signing key: what a receiver needs to find its public half, and the PEM itself."""

    def __init__(self, selector: str, domain: str, pem: bytes) -> None:
        self.selector = selector
        self.domain = domain
        self.pem = pem

    def sign(self, raw: bytes, headers: list[str]) -> bytes:
        """The `DKIM-Signature:` header to put in front of `raw`; relaxed/relaxed, so a relay that
        re-folds headers or trims trailing spaces does not break it."""
        return bytes(
            dkim.sign(
                raw,
                self.selector.encode(),
                self.domain.encode(),
                self.pem,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[h.encode() for h in headers],
                linesep=b"\r\n",
            )
        )


def read_dkim(settings: EmailSettings, sender_domain: str) -> tuple[DkimKey | None, list[str]]:
    """The DKIM key, or every problem with the dkim_* settings: all of them or none."""
    given = [name for name in DKIM_SETTINGS if getattr(settings, name)]
    if not given:
        return None, []
    prefix = "channels.email"
    problems = []
    if not settings.dkim_selector:
        problems.append(
            f"{prefix}.dkim_selector: required with {', '.join(given)} (the selector of the published key)"
        )
    pem = b""
    if settings.dkim_private_key and settings.dkim_private_key_file:
        problems.append(f"{prefix}.dkim_private_key: give it or dkim_private_key_file, not both")
    elif settings.dkim_private_key:
        text = settings.dkim_private_key
        pem = (text if "\n" in text else text.replace("\\n", "\n")).encode()
    elif settings.dkim_private_key_file:
        try:
            pem = Path(settings.dkim_private_key_file).read_bytes()
        except OSError as exc:
            problems.append(f"{prefix}.dkim_private_key_file: cannot be read ({exc.strerror or exc})")
    else:
        problems.append(
            f"{prefix}.dkim_private_key_file: required with {', '.join(given)}, or dkim_private_key"
        )
    if pem:
        where = "dkim_private_key" if settings.dkim_private_key else "dkim_private_key_file"
        try:
            key = dkim.crypto.parse_pem_private_key(pem)
        except (dkim.crypto.UnparsableKeyError, ValueError, IndexError, TypeError):
            problems.append(f"{prefix}.{where}: not a PEM RSA private key (PKCS#1 or PKCS#8, unencrypted)")
        else:
            bits = int(key["modulus"]).bit_length()
            if bits < 1024:  # RFC 8301 section 3.2: verifiers ignore signatures by smaller keys
                problems.append(f"{prefix}.{where}: a {bits}-bit key; receivers need 1024 bits or more")
    domain = settings.dkim_domain or sender_domain
    if not domain and settings.sender:
        problems.append(f"{prefix}.dkim_domain: required, as `from` has no domain to sign for")
    if problems or not settings.dkim_selector or not domain:
        return None, problems
    return DkimKey(settings.dkim_selector, domain, pem), []


class ListUnsubscribeHeader(UnstructuredHeader, BaseHeader):
    """`List-Unsubscribe` folded only between its `<...>` items, never RFC 2047-encoded: the default
    policy encodes a long header with no spaces (as a one-click URL with signed ids is), and mail
    clients then find no URL and show no unsubscribe button. An item longer than a line stays whole."""

    def fold(self, *, policy: Policy) -> str:
        items = re.findall(r"<[^<>]*>", str(self))
        return f"{self.name}: " + f",{policy.linesep} ".join(items) + policy.linesep


_HEADERS = HeaderRegistry()
_HEADERS.map_to_type("list-unsubscribe", ListUnsubscribeHeader)
# 7-bit bodies (quoted-printable or base64 when needed): the bytes are final when they are signed.
MAIL_POLICY = email.policy.default.clone(header_factory=_HEADERS, cte_type="7bit")


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
        self.address = parseaddr(self.sender)[1]  # `Shop <news@shop.example>` -> news@shop.example
        at, domain = self.address.rpartition("@")[1:]
        self.domain = (at and domain) or "rulesvc.local"
        self.dkim, problems = read_dkim(settings, at and domain)
        if problems:
            raise ChannelSettingsError("email", problems, type(self))

    def status(self) -> tuple[bool, str]:
        missing = [k for k, v in (("host", self.host), ("from", self.sender)) if not v]
        if missing:
            return False, f"missing setting(s): {', '.join(missing)}"
        signed = f", DKIM d={self.dkim.domain} s={self.dkim.selector}" if self.dkim else ""
        return True, f"SMTP {self.host}:{self.port} ({SECURITY_WORDS[self.security]}){signed}"

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
        mail["Date"] = datetime.now(UTC)  # `+0000`: `-0000` would say the time zone is unknown
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

    def render(self, mail: EmailMessage) -> tuple[bytes, bool]:
        """The bytes that go over SMTP, signed when DKIM is set up, and whether they need SMTPUTF8 (an
        address that is not ASCII). Always 7-bit: no relay has to re-encode, which would break DKIM."""
        utf8 = not (self.address + str(mail["To"])).isascii()
        raw = mail.as_bytes(policy=MAIL_POLICY.clone(linesep="\r\n", utf8=utf8))
        if self.dkim:
            raw = self.dkim.sign(raw, [h for h in SIGNED_HEADERS if h in mail] + ["from"]) + raw
        return raw, utf8

    async def send(self, message: OutboundMessage) -> Delivery:
        try:
            mail = self.build(message)
            # Signing takes ~10 ms of pure-Python RSA: off the event loop, which other sends share.
            raw, utf8 = await asyncio.to_thread(self.render, mail) if self.dkim else self.render(mail)
        except dkim.DKIMException as exc:  # our signing, not the provider: said as the channel's error
            return Delivery("failed", f"channel_error: DKIM signing failed: {exc}")
        except ValueError as exc:
            return Delivery("failed", str(exc))
        try:
            await aiosmtplib.send(
                raw,
                sender=self.address,
                recipients=[message.contact["email"]],
                mail_options=["SMTPUTF8"] if utf8 else None,
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
