"""The email channel against a real SMTP server (aiosmtpd) on 127.0.0.1: plain, and STARTTLS with AUTH."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rulesvc_email import EmailChannel

from rulesvc.channels import ChannelSettingsError
from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.store.mongod import free_port
from rulesvc.web.app import create_app
from tests.helpers import go, send, settled, setup


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], Message]] = []
        self.raw: list[bytes] = []  # as received, to check what a parser would be handed

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, _: Any) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.raw.append(envelope.content)
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 Message accepted"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


PROFILE = {"email": "ann@example.com", "consent": {"email": True}, "attributes": {"first_name": "Ann"}}


def channel_app(settings: Settings, config: dict[str, Any], sends: list[dict[str, Any]]) -> Any:
    channels = builtin_channels()
    channels.register(EmailChannel(config))
    return create_app(setup(settings, sends), channels)


async def test_marketing_and_transactional_mail(
    make_client: Any, settings: Settings, smtp: tuple[Mailbox, int]
) -> None:
    box, port = smtp
    config = {"host": "127.0.0.1", "port": port, "security": "none", "from": "Shop <news@shop.example>",
              "unsubscribe_url": "https://shop.example/u?c={contact_id}&m={message_id}"}  # fmt: skip
    client = await make_client(
        channel_app(settings, config, [send("email"), send("email", transactional=True)])
    )
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client, code="E-1")
    marketing, transactional = await settled(client, count=2)
    assert marketing["status"] == transactional["status"] == "sent"
    assert len(box.messages) == 2
    by_list_header = {bool(m["List-Unsubscribe"]): (sender, rcpts, m) for sender, rcpts, m in box.messages}
    sender, rcpts, mail = by_list_header[True]
    assert sender == "news@shop.example" and rcpts == ["ann@example.com"]
    assert mail["Subject"] == "Hello Ann"
    assert str(mail["List-Unsubscribe"]).strip().startswith("<https://shop.example/u?c=c1&m=")
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "%2Fflow%2Fgo%2F0>" in mail["List-Unsubscribe"]  # ids are URL-encoded
    assert mail.get_content_type() == "text/plain"  # the test templates have no .html part
    assert mail.get_content().strip() == "Your code is E-1."
    assert by_list_header[False][2]["Subject"] == "Hello Ann"  # transactional: no unsubscribe header


def raw_header(raw: bytes, name: bytes) -> bytes:
    """A header's lines exactly as they came over SMTP, continuation lines included."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    start = next(i for i, line in enumerate(head) if line.lower().startswith(name.lower() + b":"))
    end = next((i for i in range(start + 1, len(head)) if head[i][:1] not in (b" ", b"\t")), len(head))
    return b"\r\n".join(head[start:end])


async def test_a_long_list_unsubscribe_is_folded_between_items_and_never_encoded(
    make_client: Any, settings: Settings, smtp: tuple[Mailbox, int]
) -> None:
    """Found: over 78 characters the header went out RFC 2047-encoded (=?utf-8?q?=3Chttps...), which
    mail clients do not decode for List-Unsubscribe: no unsubscribe button, no one-click."""
    box, port = smtp
    url = "https://shop.example/newsletter/unsubscribe/one-click?contact={contact_id}&message={message_id}"
    url += "&signature=" + "f" * 64
    config = {"host": "127.0.0.1", "port": port, "security": "none", "from": "news@shop.example",
              "unsubscribe_url": url, "unsubscribe_mailto": "unsubscribe@shop.example"}  # fmt: skip
    client = await make_client(channel_app(settings, config, [send("email")]))
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client)
    [msg] = await settled(client)
    assert msg["status"] == "sent", msg
    [raw] = box.raw
    header = raw_header(raw, b"List-Unsubscribe")
    assert b"=?" not in header  # no encoded word anywhere in it
    assert all(len(line) <= 998 for line in header.split(b"\r\n"))
    expected = url.format(contact_id="c1", message_id=msg["message_id"].replace("/", "%2F"))
    parsed = email.message_from_bytes(raw, policy=email.policy.default)  # as a mail client reads it
    assert (
        str(parsed["List-Unsubscribe"])
        == f"<{expected}>, <mailto:unsubscribe@shop.example?subject=unsubscribe>"
    )
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_one_click_is_offered_only_for_https() -> None:
    from rulesvc.channels import OutboundMessage

    content = {"subject": "Hi", "text": "words"}
    message = OutboundMessage("m/1", "c1", "email", "t", content, {}, False, {"email": "a@b.c"})
    for url, one_click in [("https://shop.example/u/{contact_id}", True), ("http://shop.example/u", False)]:
        mail = EmailChannel({"host": "h", "from": "n@shop.example", "unsubscribe_url": url}).build(message)
        assert mail["List-Unsubscribe"] is not None
        assert (mail["List-Unsubscribe-Post"] is not None) is one_click, url
    mailto_only = EmailChannel(
        {"host": "h", "from": "n@shop.example", "unsubscribe_mailto": "u@shop.example"}
    )
    mail = mailto_only.build(message)
    assert mail["List-Unsubscribe"] == "<mailto:u@shop.example?subject=unsubscribe>"
    assert mail["List-Unsubscribe-Post"] is None


async def test_starttls_and_auth(make_client: Any, settings: Settings, tmp_path: Path) -> None:
    import ssl

    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    box = Mailbox()
    logins: list[str] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"shop", b"pw-123")
        logins.append(f"{mechanism}:{ok}:{session.ssl is not None}")
        return AuthResult(success=ok)

    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True,
                            authenticator=authenticator, auth_require_tls=True)  # fmt: skip
    controller.start()
    try:
        config = {"host": "127.0.0.1", "port": port, "security": "starttls", "from": "news@shop.example",
                  "username": "shop", "password": "pw-123", "ca_file": str(cert)}  # fmt: skip
        client = await make_client(channel_app(settings, config, [send("email", transactional=True)]))
        await client.put("/v1/contacts/c1", json=PROFILE)
        await go(client)
        [msg] = await settled(client)
        assert msg["status"] == "sent", msg
        assert len(box.messages) == 1
        assert logins and all(entry.endswith(":True:True") for entry in logins)  # authenticated, over TLS
    finally:
        controller.stop()


async def test_refused_recipient_fails_permanently(
    make_client: Any, settings: Settings, smtp: tuple[Mailbox, int]
) -> None:
    box, port = smtp
    config = {"host": "127.0.0.1", "port": port, "security": "none", "from": "news@shop.example"}
    client = await make_client(channel_app(settings, config, [send("email", transactional=True)]))
    await client.put("/v1/contacts/c1", json={**PROFILE, "email": "nobody@example.com"})
    await go(client)
    [msg] = await settled(client)
    assert (msg["status"], msg["reason"]) == ("failed", "provider_rejected")
    assert msg["detail"].startswith("recipient refused: 550")
    assert box.messages == []


def test_settings_are_checked() -> None:
    assert EmailChannel({}).status() == (False, "missing setting(s): host, from")
    with pytest.raises(ChannelSettingsError) as wrong:  # a wrong value is a settings error, with its path
        EmailChannel({"host": "h", "from": "a@b.c", "security": "ssl", "prot": 25})
    assert wrong.value.problems == [
        'channels.email.security: expected one of `starttls`, `tls`, `none`, got "ssl"',
        "channels.email.prot: unknown setting; did you mean `port`? (known: ca_file, from, host, password, "
        "port, quiet_hours, reply_to, security, timeout, unsubscribe_mailto, unsubscribe_url, username)",
    ]
    channel = EmailChannel({"host": "h", "from": "a@b.c"})
    assert (
        channel.reachable({"email": "x@y.z", "email_invalid": True})
        == "email address marked invalid (bounced)"
    )


def test_text_and_html_make_multipart_alternative() -> None:
    from rulesvc.channels import OutboundMessage

    channel = EmailChannel({"host": "h", "from": "news@shop.example"})
    content = {"subject": "Hi", "text": "plain words", "html": "<p>rich &amp; words</p>"}
    mail = channel.build(OutboundMessage("m/1", "c1", "email", "t", content, {}, True, {"email": "a@b.c"}))
    assert mail.get_content_type() == "multipart/alternative"
    parts = {p.get_content_type(): p.get_content() for p in mail.iter_parts()}
    assert parts["text/plain"].strip() == "plain words"
    assert parts["text/html"].strip() == "<p>rich &amp; words</p>"
    assert mail["Message-ID"].endswith("@shop.example>")
