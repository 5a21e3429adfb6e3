"""Rate limits per API key or inbox token, in this process's memory."""

from __future__ import annotations

import time
from collections import OrderedDict


class RateLimiter:
    """A token bucket per key (an API key's id, or `inbox:<contact>` for a page with an inbox token):
    `rate` requests a second, bursts of twice that. At most `max_buckets` are kept, least recently used
    dropped first (a dropped bucket starts full again): there are as many contacts as customers."""

    def __init__(self, rate: float, max_buckets: int = 10_000, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = max(1.0, 2 * rate) if burst is None else burst
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, key_id: str) -> float | None:
        """None if the request may go on, else the seconds to wait (for Retry-After)."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        tokens, last = self._buckets.get(key_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = None if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[key_id] = (tokens if wait is not None else tokens - 1, now)
        self._buckets.move_to_end(key_id)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return wait
