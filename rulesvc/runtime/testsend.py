"""A test send through a channel's own plugin: the fixed test message (rulesvc.core.testsend) to a made-up
contact, outside the engine, the send rules and the history: nothing is read or written in MongoDB. As
the dispatcher does, whatever the plugin raises or however long it takes ends as a `Delivery`."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime
from time import monotonic
from typing import Any

import structlog

from rulesvc.channels import Channel, Delivery, OutboundMessage
from rulesvc.core.testsend import TEST_CONTACT, TEST_TEMPLATE, message_content

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SentTest:
    message_id: str
    delivery: Delivery
    seconds: float


async def send_test(channel: Channel, profile: dict[str, Any], now: datetime, seconds: float) -> SentTest:
    """One send of the test message; its id (`test:<channel>:<random>`) is new each time, so a channel
    that deduplicates by message id never takes a second test for a repeat."""
    message_id = f"test:{channel.name}:{uuid.uuid4().hex[:16]}"
    outbound = OutboundMessage(
        message_id=message_id,
        contact_id=TEST_CONTACT,
        channel=channel.name,
        template=TEST_TEMPLATE,
        content=message_content(channel.name, now),
        params={},
        transactional=True,  # no unsubscribe footer, no quiet hours: a person asked for it now
        contact={"contact_id": TEST_CONTACT, **profile},
    )
    started = monotonic()
    try:
        async with asyncio.timeout(seconds):
            delivery = await channel.send(outbound)
    except TimeoutError:
        delivery = Delivery("retry", f"no answer within {seconds:.3g}s (the send timeout)")
    except OSError as exc:  # as the dispatcher takes it: a connection failure, worth a retry
        delivery = Delivery("retry", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # the plugin's failure is the answer to the test, not the service's
        log.warning("channel.test_send_error", channel=channel.name, error=f"{type(exc).__name__}: {exc}")
        delivery = Delivery("failed", f"{type(exc).__name__}: {exc}")
    if not isinstance(delivery, Delivery):
        delivery = Delivery(
            "failed", f"channel error: send returned {type(delivery).__name__}, not a Delivery"
        )
    log.info("channel.test_send", channel=channel.name, message_id=message_id, status=delivery.status)
    return SentTest(message_id, delivery, round(monotonic() - started, 3))
