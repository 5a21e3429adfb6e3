"""Background loops: work while there is work, else wait for a wake-up, the next poll, or the stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import TypeVar

import structlog
from pymongo.errors import PyMongoError

log = structlog.get_logger(__name__)

T = TypeVar("T")


async def wait_any(*events: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class Outage:
    """One warning when storage stops answering and one line when it answers again, not a line per
    attempt: a paused or restarting mongod must not flood the log. The pause before the next attempt
    doubles up to `max_pause`, so a loop never spins against a dead server yet resumes soon after."""

    def __init__(self, name: str, first_pause: float = 1.0, max_pause: float = 5.0) -> None:
        self.name = name
        self.first_pause = first_pause
        self.max_pause = max_pause
        self.failures = 0
        self.since = 0.0

    def failed(self, exc: PyMongoError) -> float:
        """Log the first failure of an outage; the pause before the next attempt."""
        self.failures += 1
        if self.failures == 1:
            self.since = time.monotonic()
            log.warning(f"{self.name}.storage_unavailable", error=type(exc).__name__, timeout=exc.timeout,
                        detail=str(exc)[:300])  # fmt: skip
        else:
            log.debug(f"{self.name}.storage_unavailable", error=type(exc).__name__, failures=self.failures)
        return min(self.first_pause * 2.0 ** (self.failures - 1), self.max_pause)

    def succeeded(self) -> None:
        if self.failures:
            log.info(f"{self.name}.storage_recovered", failures=self.failures,
                     seconds=round(time.monotonic() - self.since, 1))  # fmt: skip
            self.failures = 0


async def work_loop(
    name: str,
    step: Callable[[], Awaitable[float]],
    stop: asyncio.Event,
    wake: asyncio.Event,
    error_pause: float = 1.0,
    max_error_pause: float = 5.0,
) -> None:
    """Runs `step` until `stop`; `step` returns how long to wait before the next one (0: at once).
    A storage error (a lost server, a missed deadline) or a bug pauses the loop, longer after each
    storage error in a row; nothing ends it but `stop`, so no work is abandoned."""
    outage = Outage(name, error_pause, max_error_pause)
    while not stop.is_set():
        wake.clear()  # before the step: a wake-up that comes during it is not lost
        try:
            pause = await step()
        except PyMongoError as exc:
            pause = outage.failed(exc)
        except Exception:
            log.exception(f"{name}.error")
            pause = error_pause
        else:
            outage.succeeded()
        if pause > 0:
            await wait_any(stop, wake, seconds=pause)


@contextlib.asynccontextmanager
async def renewing(name: str, renew: Callable[[], Awaitable[object]], every: float) -> AsyncIterator[None]:
    """Renews a lease while its work runs: slow work must not let another process take it over, while
    a process that dies stops renewing, so its lease runs out and the work is taken over."""

    async def keep() -> None:
        outage = Outage(f"{name}.renew")
        while True:
            await asyncio.sleep(every)
            try:
                await renew()
            except PyMongoError as exc:
                outage.failed(exc)
            else:
                outage.succeeded()

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
