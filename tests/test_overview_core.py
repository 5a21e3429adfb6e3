"""The overview's arithmetic (rulesvc.core.overview) and the test send's recipient (rulesvc.core.testsend),
judged by numbers worked out here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rulesvc.core.contacts import WebPushKeys, WebPushSubscription
from rulesvc.core.masking import mask_credentials
from rulesvc.core.overview import bucket_start, by_channel, send_health, series
from rulesvc.core.testsend import message_content, recipient

NOW = datetime(2026, 11, 27, 14, 37, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("at", "start"),
    [
        (datetime(2026, 11, 27, 14, 37, 30, tzinfo=UTC), datetime(2026, 11, 27, 14, 30, tzinfo=UTC)),
        (datetime(2026, 11, 27, 14, 45, tzinfo=UTC), datetime(2026, 11, 27, 14, 45, tzinfo=UTC)),
        (datetime(2026, 11, 27, 0, 14, 59, 999999, tzinfo=UTC), datetime(2026, 11, 27, 0, 0, tzinfo=UTC)),
        # another offset: the same instant's UTC quarter hour (15:50+02:00 is 13:50 UTC)
        (datetime.fromisoformat("2026-11-27T15:50:00+02:00"), datetime(2026, 11, 27, 13, 45, tzinfo=UTC)),
        (datetime(2026, 11, 27, 14, 7), datetime(2026, 11, 27, 14, 0, tzinfo=UTC)),  # naive: UTC
    ],
)
def test_bucket_start_is_the_utc_quarter_hour(at: datetime, start: datetime) -> None:
    assert bucket_start(at) == start


def test_series_has_every_quarter_hour_of_the_day_and_rates_over_the_time_passed() -> None:
    current = datetime(2026, 11, 27, 14, 30, tzinfo=UTC)
    first = current - timedelta(hours=23, minutes=45)
    accepted = {current: 45, first: 900, current - timedelta(minutes=15): 9, first - timedelta(minutes=15): 7}
    decided = {current - timedelta(minutes=30): 1800}
    points = series(accepted, decided, NOW)
    assert len(points) == 96
    assert [p.at for p in points] == [first + timedelta(minutes=15 * i) for i in range(96)]
    assert (points[0].accepted, points[0].accepted_per_second) == (900, 1.0)  # 900 in 900 s
    assert (points[-2].accepted, points[-2].accepted_per_second) == (9, 0.01)
    assert (points[-3].decided, points[-3].decided_per_second) == (1800, 2.0)
    # The current quarter has run 7 min 30 s: 45 events in 450 s.
    assert (points[-1].accepted, points[-1].accepted_per_second) == (45, 0.1)
    assert sum(p.accepted for p in points) == 954  # the bucket before the first is not in the day
    assert sum(p.decided for p in points) == 1800
    quiet = [p for p in points[1:-3]]
    assert all(p.accepted == p.decided == 0 and p.accepted_per_second == 0.0 for p in quiet)


def test_messages_by_channel_and_send_health() -> None:
    rows = [
        {"channel": "email", "counts": {"sent": 10, "failed": 2, "delivered": 0}},
        {"channel": "email", "counts": {"sent": 5, "dead": 1}},
        {"channel": "", "counts": {"entered": 40}},  # an entry: no message
        {"channel": "sms", "counts": {"suppressed": 3, "weird": "x"}},  # a damaged count reads as none
        {"channel": "push", "counts": {}},
    ]
    totals = by_channel(rows)
    assert totals == {"email": {"dead": 1, "failed": 2, "sent": 15}, "sms": {"suppressed": 3}}
    email = send_health(totals["email"])
    assert (email.sent, email.failed, email.error_rate) == (15, 3, round(3 / 18, 4))
    assert send_health(totals["sms"]).error_rate is None  # nothing was sent nor failed
    assert send_health({"sent": 4}).error_rate == 0.0


def test_recipient_puts_the_address_where_the_channel_reads_it() -> None:
    assert recipient("email", " ops@example.com ", None) == ({"email": "ops@example.com"}, None, None)
    assert recipient("sms", "+4915112345678", None) == ({"phone": "+4915112345678"}, None, None)
    assert recipient("push", "tok-1", None) == ({"push_tokens": ["tok-1"]}, None, None)
    assert recipient("webhook", None, None) == ({}, None, None)
    assert recipient("fax", "+49 30 1234", None) == ({"address": "+49 30 1234"}, None, None)
    sub = WebPushSubscription("https://push.example/x", WebPushKeys("p", "a"))
    assert recipient("webpush", None, sub) == (
        {
            "webpush_subscriptions": [
                {"endpoint": "https://push.example/x", "keys": {"p256dh": "p", "auth": "a"}}
            ]
        },
        None,
        None,
    )


@pytest.mark.parametrize(
    ("channel", "to", "problem"),
    [
        ("email", None, "the `email` channel needs `to`: an email address such as ops@example.com"),
        ("email", "ops@", "`ops@` is not an email address"),
        ("email", "a@b.example" + "x" * 250, None),  # over 254 characters: said with the text cut
        ("sms", "015112345678", "`015112345678` is not a phone number in E.164 form (+ and 7 to 15 digits)"),
        ("push", "  ", "the `push` channel needs `to`: a device's push token"),
        ("webpush", "x", "a web push test needs the browser's subscription"),
    ],
)
def test_recipient_refuses_what_the_channel_cannot_use(
    channel: str, to: str | None, problem: str | None
) -> None:
    profile, field, said = recipient(channel, to, None)
    assert profile == {} and field in ("$.to", "$.webpush_subscription") and said
    if problem is not None:
        assert said == problem
    else:
        assert said.endswith("...` is not an email address") and len(said) < 120


def test_the_test_message_names_the_channel_in_every_block() -> None:
    content = message_content("sms", NOW)
    assert set(content) == {"subject", "text", "html", "title", "body"}
    assert "2026-11-27 14:37:30 UTC" in content["text"] and "`sms` channel" in content["body"]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("POST https://hook:s3cr3t@hooks.example/in", "POST https://***@hooks.example/in"),
        (
            "POST https://hooks.example/in?token=abc123&team=7",
            "POST https://hooks.example/in?token=***&team=7",
        ),
        ("GET http://x.example/?a=1&api_key=zz#f", "GET http://x.example/?a=1&api_key=***#f"),
        ("SMTP mail.example:587 (starttls)", "SMTP mail.example:587 (starttls)"),
        ("mailto:ops@example.com", "mailto:ops@example.com"),  # no `//`: an address, not a login
        # Chat tools' webhook URLs are secret past the first segment of their path.
        (
            "POST https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
            "POST https://hooks.slack.com/services/***",
        ),
        (
            "POST https://discord.com/api/webhooks/123/tok-en?wait=1",
            "POST https://discord.com/api/***?wait=1",
        ),
        ("POST http://***@127.0.0.1:41815/hook", "POST http://***@127.0.0.1:41815/hook"),
    ],
)
def test_credentials_in_urls_are_masked(text: str, shown: str) -> None:
    assert mask_credentials(text) == shown


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://fcm.googleapis.com/fcm/send/x",  # not https
        "https://127.0.0.1:8080/v1/overview",
        "https://169.254.169.254/latest/meta-data/",  # a cloud's metadata address
        "https://[::1]/x",
        "https://10.1.2.3/x",
        "https://localhost/x",
        "https://push.internal/x",
    ],
)
def test_a_web_push_test_goes_only_to_a_public_push_service(endpoint: str) -> None:
    sub = WebPushSubscription(endpoint=endpoint, keys=WebPushKeys(p256dh="k", auth="a"))
    profile, field, said = recipient("webpush", None, sub)
    assert profile == {} and field == "$.webpush_subscription.endpoint" and said is not None
    public = WebPushSubscription(
        endpoint="https://fcm.googleapis.com/fcm/send/x", keys=WebPushKeys(p256dh="k", auth="a")
    )
    assert recipient("webpush", None, public)[2] is None
