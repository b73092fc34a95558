"""Per-sender token buckets, so a misbehaving client cannot turn our replies into a flood."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class TokenBuckets:
    """One token bucket per key: `burst` replies at once, then `rate` per second.

    Memory is bounded by `max_keys`: when full, the oldest key is forgotten, which at
    worst hands that sender a fresh burst (spoofed source addresses cannot grow the map).
    """

    def __init__(
        self,
        rate: float = 10.0,
        burst: float = 10.0,
        *,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_keys >= 1")
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: dict[Hashable, list[float]] = {}  # key -> [tokens, last refill time]

    def allow(self, key: Hashable) -> bool:
        """Take one token for `key`; False means the caller should stay quiet."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                del self._buckets[next(iter(self._buckets))]
            self._buckets[key] = [self._burst - 1.0, now]
            return True
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def __len__(self) -> int:
        return len(self._buckets)
