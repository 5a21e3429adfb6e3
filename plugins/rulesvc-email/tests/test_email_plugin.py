"""The email channel against a real SMTP server (aiosmtpd) on 127.0.0.1: plain, and STARTTLS with AUTH,
judged by the raw bytes the server receives; DKIM judged by dkimpy's verifier against a stub DNS record."""

from __future__ import annotations

import base64
import datetime as dt
import email
import email.policy
import ipaddress
import re
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import dkim
import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from rulesvc_email import EmailChannel

from rulesvc.channels import ChannelSettingsError, OutboundMessage
from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.web.app import create_app
from tests.helpers import go, send, settled, setup
from tests.smtp_server import Mailbox, raw_header, smtp_server


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    with smtp_server() as running:
        yield running


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


def unfold(header: bytes) -> bytes:
    """RFC 5322 section 2.2.3: unfolding removes each CRLF that is followed by white space."""
    return re.sub(rb"\r\n(?=[ \t])", b"", header)


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
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    await go(client, code="E-1")
    marketing, transactional = await settled(client, count=2)
    after = dt.datetime.now(dt.UTC)
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
    for raw in box.raw:
        # Found: `Shop <news@shop.example>` gave Message-IDs ending in `@shop.example>>`.
        assert re.fullmatch(rb"Message-ID: <[0-9a-f]{32}@shop\.example>", raw_header(raw, b"Message-ID"))
        # Found: `-0000`, which RFC 5322 section 3.3 reserves for "the local time zone is unknown".
        date = raw_header(raw, b"Date")
        assert date.endswith(b" +0000"), date
        assert before <= parsedate_to_datetime(date[len(b"Date: ") :].decode()) <= after


async def test_a_long_list_unsubscribe_is_folded_between_items_and_never_encoded(
    make_client: Any, settings: Settings, smtp: tuple[Mailbox, int]
) -> None:
    """Found: over 76 characters the header went out RFC 2047-encoded (=?utf-8?q?=3Chttps...), which
    RFC 2047 section 5 forbids there and mail clients do not decode: no unsubscribe button, no one-click."""
    box, port = smtp
    url = "https://shop.example/newsletter/unsubscribe/one-click?contact={contact_id}&signature="
    url += "f" * (120 - len(url.format(contact_id="c1")))
    expected = url.format(contact_id="c1")
    assert len(expected) == 120
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
    assert f"<{expected}>".encode() in header  # the URL verbatim, on one line
    assert all(len(line) <= 998 for line in header.split(b"\r\n"))
    assert (
        unfold(header).decode()
        == f"List-Unsubscribe: <{expected}>, <mailto:unsubscribe@shop.example?subject=unsubscribe>"
    )
    assert raw_header(raw, b"List-Unsubscribe-Post") == b"List-Unsubscribe-Post: List-Unsubscribe=One-Click"
    parsed = email.message_from_bytes(raw, policy=email.policy.default)  # as a mail client reads it
    assert str(parsed["List-Unsubscribe"]).startswith(f"<{expected}>")


async def test_an_http_unsubscribe_url_gets_no_one_click(
    make_client: Any, settings: Settings, smtp: tuple[Mailbox, int]
) -> None:
    """RFC 8058 section 3.1: one-click is a POST to an https URI; an http one keeps only the link."""
    box, port = smtp
    url = "http://shop.example/unsubscribe?contact={contact_id}&token=" + "a" * 60
    config = {"host": "127.0.0.1", "port": port, "security": "none", "from": "news@shop.example",
              "unsubscribe_url": url}  # fmt: skip
    client = await make_client(channel_app(settings, config, [send("email")]))
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client)
    [msg] = await settled(client)
    assert msg["status"] == "sent", msg
    [raw] = box.raw
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert (
        unfold(raw_header(raw, b"List-Unsubscribe"))
        == f"List-Unsubscribe: <{url.format(contact_id='c1')}>".encode()
    )
    assert b"\r\nlist-unsubscribe-post:" not in head


def test_one_click_is_offered_only_for_https() -> None:
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


def rsa_key(tmp: Path) -> tuple[Path, bytes]:
    """A fresh RSA key as a PEM file, and the DNS TXT record that publishes its public half."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp / "dkim.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def tags(header: bytes) -> dict[str, str]:
    """The tag=value list of a DKIM-Signature header (RFC 6376 section 3.2), white space removed."""
    text = re.sub(r"\s+", "", unfold(header).decode().split(":", 1)[1])
    return dict(item.split("=", 1) for item in text.split(";") if item)


async def test_dkim_signature_verifies_and_covers_the_unsubscribe_headers(
    make_client: Any, settings: Settings, smtp: tuple[Mailbox, int], tmp_path: Path
) -> None:
    box, port = smtp
    key_file, record = rsa_key(tmp_path)
    url = "https://shop.example/newsletter/unsubscribe/one-click?contact={contact_id}&sig=" + "e" * 64
    config = {"host": "127.0.0.1", "port": port, "security": "none", "from": "Shop <news@shop.example>",
              "unsubscribe_url": url, "unsubscribe_mailto": "unsubscribe@shop.example",
              "dkim_selector": "mail2026", "dkim_private_key_file": str(key_file)}  # fmt: skip
    channel = EmailChannel(config)
    assert channel.status() == (True, f"SMTP 127.0.0.1:{port} (no TLS), DKIM d=shop.example s=mail2026")
    channels = builtin_channels()
    channels.register(channel)
    client = await make_client(create_app(setup(settings, [send("email")]), channels))
    await client.put("/v1/contacts/c1", json={**PROFILE, "attributes": {"first_name": "Zoë"}})
    await go(client, code="Größe-7")
    [msg] = await settled(client)
    assert msg["status"] == "sent", msg
    [raw] = box.raw
    assert raw.isascii()  # 7-bit: no relay re-encodes it and breaks the signature on the way

    asked: list[bytes] = []

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        asked.append(name)
        return record if name == b"mail2026._domainkey.shop.example." else None

    assert dkim.verify(raw, dnsfunc=dns)
    assert asked == [b"mail2026._domainkey.shop.example."]
    signature = tags(raw_header(raw, b"DKIM-Signature"))
    assert (signature["d"], signature["s"], signature["a"]) == ("shop.example", "mail2026", "rsa-sha256")
    signed = signature["h"].lower().split(":")
    # RFC 8058 section 4: both unsubscribe headers must be covered by the signature.
    assert {
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
    } <= set(signed)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "Hello Zoë"
    assert parsed.get_content().strip() == "Your code is Größe-7."

    # What a verifier must refuse: the body changed, the unsubscribe target swapped, a second From.
    body_start = raw.index(b"\r\n\r\n")
    tampered_body = raw[:body_start] + raw[body_start:].replace(b"Gr", b"Kr", 1)
    assert tampered_body != raw and not dkim.verify(tampered_body, dnsfunc=dns)
    swapped = raw.replace(b"https://shop.example/", b"https://evil.example/", 1)
    assert swapped != raw and not dkim.verify(swapped, dnsfunc=dns)
    second_from = raw.replace(b"\r\n\r\n", b"\r\nFrom: boss@shop.example\r\n\r\n", 1)
    assert not dkim.verify(second_from, dnsfunc=dns)


def test_dkim_settings_are_all_or_nothing(tmp_path: Path) -> None:
    base = {"host": "h", "from": "Shop <news@shop.example>"}
    problems: dict[str, list[str]] = {}
    cases: dict[str, dict[str, Any]] = {
        "selector only": {"dkim_selector": "s1"},
        "key only": {"dkim_private_key_file": str(tmp_path / "missing.pem")},
        "both keys": {"dkim_selector": "s1", "dkim_private_key": "x", "dkim_private_key_file": "y"},
        "not a key": {"dkim_selector": "s1", "dkim_private_key": "-----BEGIN PRIVATE KEY-----\nnope\n"},
    }
    for case, extra in cases.items():
        with pytest.raises(ChannelSettingsError) as wrong:
            EmailChannel({**base, **extra})
        problems[case] = wrong.value.problems
    assert problems == {
        "selector only": [
            "channels.email.dkim_private_key_file: required with dkim_selector, or dkim_private_key"
        ],
        "key only": [
            "channels.email.dkim_selector: required with dkim_private_key_file (the selector of the "
            "published key)",
            "channels.email.dkim_private_key_file: cannot be read (No such file or directory)",
        ],
        "both keys": ["channels.email.dkim_private_key: give it or dkim_private_key_file, not both"],
        "not a key": [
            "channels.email.dkim_private_key: not a PEM RSA private key (PKCS#1 or PKCS#8, unencrypted)"
        ],
    }
    for problem in problems["not a key"] + problems["both keys"]:
        assert "nope" not in problem  # a key is never echoed
    # A key given as an environment variable with `\n` for its line breaks, and its own domain.
    key_file, _ = rsa_key(tmp_path)
    escaped = key_file.read_text().replace("\n", "\\n")
    channel = EmailChannel({**base, "dkim_selector": "s1", "dkim_domain": "mail.shop.example",
                            "dkim_private_key": escaped})  # fmt: skip
    assert channel.status()[1].endswith("DKIM d=mail.shop.example s=s1")
    assert EmailChannel(base).status() == (True, "SMTP h:587 (STARTTLS)")  # no DKIM unless asked
    # The transport's security in words, as the Channels page shows it.
    implicit = EmailChannel({**base, "security": "tls", "port": 465}).status()
    assert implicit == (True, "SMTP h:465 (TLS)")
    with pytest.raises(ChannelSettingsError) as wrong:
        EmailChannel({"host": "h", "from": "news", "dkim_selector": "s1", "dkim_private_key": escaped})
    assert wrong.value.problems == [
        "channels.email.dkim_domain: required, as `from` has no domain to sign for"
    ]


async def test_starttls_and_auth(make_client: Any, settings: Settings, tmp_path: Path) -> None:
    import ssl

    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    logins: list[str] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"shop", b"pw-123")
        logins.append(f"{mechanism}:{ok}:{session.ssl is not None}")
        return AuthResult(success=ok)

    with smtp_server(tls_context=context, require_starttls=True, authenticator=authenticator,
                     auth_require_tls=True) as (box, port):  # fmt: skip
        config = {"host": "127.0.0.1", "port": port, "security": "starttls", "from": "news@shop.example",
                  "username": "shop", "password": "pw-123", "ca_file": str(cert)}  # fmt: skip
        client = await make_client(channel_app(settings, config, [send("email", transactional=True)]))
        await client.put("/v1/contacts/c1", json=PROFILE)
        await go(client)
        [msg] = await settled(client)
        assert msg["status"] == "sent", msg
        assert len(box.messages) == 1
        assert logins and all(entry.endswith(":True:True") for entry in logins)  # authenticated, over TLS


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
        "channels.email.prot: unknown setting; did you mean `port`? (known: ca_file, dkim_domain, "
        "dkim_private_key, dkim_private_key_file, dkim_selector, from, host, password, port, quiet_hours, "
        "reply_to, security, timeout, unsubscribe_mailto, unsubscribe_url, username)",
    ]
    channel = EmailChannel({"host": "h", "from": "a@b.c"})
    assert (
        channel.reachable({"email": "x@y.z", "email_invalid": True})
        == "email address marked invalid (bounced)"
    )


def test_text_and_html_make_multipart_alternative() -> None:
    channel = EmailChannel({"host": "h", "from": "news@shop.example"})
    content = {"subject": "Hi", "text": "plain words", "html": "<p>rich &amp; words</p>"}
    mail = channel.build(OutboundMessage("m/1", "c1", "email", "t", content, {}, True, {"email": "a@b.c"}))
    assert mail.get_content_type() == "multipart/alternative"
    parts = {p.get_content_type(): p.get_content() for p in mail.iter_parts()}
    assert parts["text/plain"].strip() == "plain words"
    assert parts["text/html"].strip() == "<p>rich &amp; words</p>"
    assert mail["Message-ID"].endswith("@shop.example>")


def test_message_id_takes_the_domain_of_the_sender_address() -> None:
    """Found: the domain was whatever followed the last `@` of `from`, display name parts included."""
    content = {"subject": "Hi", "text": "words"}
    message = OutboundMessage("m/1", "c1", "email", "t", content, {}, True, {"email": "a@b.c"})
    for sender in [
        "Shop <news@shop.example>",
        "news@shop.example (Shop News)",
        '"Shop, Inc." <n@shop.example>',
    ]:
        channel = EmailChannel({"host": "h", "from": sender})
        raw, _ = channel.render(channel.build(message))
        assert re.fullmatch(rb"Message-ID: <[0-9a-f]{32}@shop\.example>", raw_header(raw, b"Message-ID")), (
            sender
        )
