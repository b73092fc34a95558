"""One voice's waiting model events and the limits on them: the pending cap, the late limit, the rate bucket."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable

MAX_PENDING = 256  # scheduled accompaniment answers per voice; beyond this the oldest is dropped and counted
LATE_TOLERANCE = 0.05  # seconds: an event later than this is dropped rather than played late
RATE_BURST = 8.0  # answers that may come closer than 1/max_rate (a chord), before the rate holds


class Scheduled:
    """One model event waiting: its cause's time (start), the model's wait (dt), its N values.

    `when` is the event's time (what it is timetagged with); `send_at` is when it may
    leave: `lookahead` earlier, but never before it was computed.
    """

    __slots__ = ("start", "dt", "values", "when", "send_at", "handle")

    def __init__(self, start: float, dt: float, values: tuple[float, ...]) -> None:
        self.start, self.dt, self.values = start, dt, values
        self.when = self.send_at = start
        self.handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def late(self, now: float) -> bool:
        """It would leave more than `LATE_TOLERANCE` after its time (a stall): drop it, never rush it out."""
        return now - self.send_at > LATE_TOLERANCE


class RateBucket:
    """A voice's answers' `max_rate` bucket (burst `RATE_BURST`), refilled on the schedule's clock.

    Refilled by when answers *should* leave, so a stall adds no tokens and a chord of
    up to `RATE_BURST` answers survives.
    """

    __slots__ = ("tokens", "at")

    def __init__(self) -> None:
        self.tokens, self.at = RATE_BURST, -math.inf

    def take(self, when: float, rate: float) -> bool:
        """Take a token for an answer due to leave at ``when``; False if none is left."""
        self.tokens = min(RATE_BURST, self.tokens + max(0.0, when - self.at) * rate)
        self.at = max(self.at, when)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def pace(items: Iterable[Scheduled], now: float, lookahead: float, rate: float) -> None:
    """Set the send times of waiting answers whose times (`when`) just changed (a new timescale or lookahead).

    Each leaves `lookahead` before its time, not before now, and (in order of their
    times) not sooner than 1/`rate` after the one before; one that would then leave
    after its time leaves at its time instead (plain, and the bucket decides). So a
    raised lookahead sends the answers it makes due at once at the rate limit, rather
    than all now, where the bucket would drop all but a chord's worth.
    """
    gap = 1.0 / rate
    previous = -math.inf
    for item in sorted(items, key=_time):
        item.send_at = previous = min(item.when, max(item.when - lookahead, now, previous + gap))


def _time(item: Scheduled) -> float:
    return item.when
