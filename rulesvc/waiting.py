"""Background loops: work while there is work, else wait for a wake-up, the next poll, or the stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta

import structlog
from pymongo.errors import PyMongoError

log = structlog.get_logger(__name__)


async def wait_any(*events: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def work_loop(
    name: str,
    step: Callable[[], Awaitable[float]],
    stop: asyncio.Event,
    wake: asyncio.Event,
    error_pause: float = 1.0,
) -> None:
    """Runs `step` until `stop`; `step` returns how long to wait before the next one (0: at once).
    A storage error or a bug pauses the loop; nothing ends it but `stop`, so no work is abandoned."""
    while not stop.is_set():
        wake.clear()  # before the step: a wake-up that comes during it is not lost
        try:
            pause = await step()
        except PyMongoError as exc:
            log.warning(f"{name}.storage_error", error=type(exc).__name__)
            pause = error_pause
        except Exception:
            log.exception(f"{name}.error")
            pause = error_pause
        if pause > 0:
            await wait_any(stop, wake, seconds=pause)


@contextlib.asynccontextmanager
async def renewing(name: str, renew: Callable[[], Awaitable[object]], every: float) -> AsyncIterator[None]:
    """Renews a lease while its work runs: slow work must not let another process take it over, while
    a process that dies stops renewing, so its lease runs out and the work is taken over."""

    async def keep() -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await renew()
            except PyMongoError as exc:
                log.warning(f"{name}.renew_failed", error=type(exc).__name__)

    task = asyncio.create_task(keep(), name=f"{name}-renew")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Every:
    """Says yes at most once per `interval` (and again if a virtual clock goes back): for looks that
    only matter after a crash, such as leases that ran out, which need not run on every batch."""

    def __init__(self, interval: timedelta) -> None:
        self.interval = interval
        self.last: datetime | None = None

    def due(self, now: datetime) -> bool:
        if self.last is not None and timedelta(0) <= now - self.last < self.interval:
            return False
        self.last = now
        return True
