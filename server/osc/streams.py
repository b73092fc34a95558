"""Subscribable streams of what the model thinks: who gets `/mixture`, `/surprise` and pushed `/status`.

A stream nobody subscribes to costs nothing: the engine asks (`active`, through
`server.osc.sink.OscSink.wants`) before it computes one, and `on_change` starts the
status push when `status` gains its first subscriber and stops it when it loses its last. Each destination's messages on a stream are rate-capped, so a
subscriber cannot turn the server into a flood source, and each stream holds at most
`MAX_DESTINATIONS` subscribers.

A subscriber that goes away seldom says so (a killed monitor, a closed patch), so one
whose port reports itself closed (ICMP port unreachable, see `server.osc.udp`) is
dropped from every stream (`drop`): otherwise the engine would go on computing for a
dead port for good. A live subscriber that was dropped by mistake (its port closed
for a moment) gets its streams back by subscribing again, as the monitor's keep-alive
does. `/hello` and `--send` destinations are not streams and are never dropped: a
performer's patch may come back on the same port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from server.live.streams import STREAM_RATE
from server.osc.output import MAX_DESTINATIONS, Endpoint, OscOutput
from server.osc.ratelimit import TokenBuckets
from server.osc.wire import encode_message



class StreamsFull(ValueError):
    """A stream already has as many subscribers as it may."""


class Subscriptions:
    """The subscribers of each stream (`prediction` here is the capped one; `/hello` destinations get every event)."""

    def __init__(
        self,
        output: OscOutput,
        names: tuple[str, ...],
        *,
        max_each: int = MAX_DESTINATIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._output = output
        self._subscribers: dict[str, dict[Endpoint, None]] = {name: {} for name in names}
        self._max = max_each
        self._limits = TokenBuckets(STREAM_RATE, STREAM_RATE, max_keys=4 * max_each * max(1, len(names)), clock=clock)
        self.on_change: Callable[[str, bool], None] = lambda stream, active: None

    def add(self, stream: str, endpoint: Endpoint) -> bool:
        """Subscribe `endpoint`; False if it already was. StreamsFull when the stream has no room."""
        subscribers = self._subscribers[stream]
        if endpoint in subscribers:
            return False
        if len(subscribers) >= self._max:
            raise StreamsFull(f"{stream} already has {self._max} subscribers")
        subscribers[endpoint] = None
        if len(subscribers) == 1:
            self.on_change(stream, True)
        return True

    def remove(self, stream: str, endpoint: Endpoint) -> bool:
        """Unsubscribe `endpoint`; False if it was not subscribed."""
        subscribers = self._subscribers[stream]
        if endpoint not in subscribers:
            return False
        del subscribers[endpoint]
        if not subscribers:
            self.on_change(stream, False)
        return True

    def drop(self, endpoint: Endpoint) -> list[str]:
        """Unsubscribe `endpoint` from every stream (its port is closed); the streams it was in."""
        left = [stream for stream, subscribers in self._subscribers.items() if endpoint in subscribers]
        for stream in left:
            self.remove(stream, endpoint)
        return left

    def active(self, stream: str) -> bool:
        return bool(self._subscribers[stream])

    def subscribers(self, stream: str) -> tuple[Endpoint, ...]:
        return tuple(self._subscribers[stream])

    def send(self, stream: str, address: str, *args: int | float | str) -> None:
        """Send one message to the stream's subscribers, each within its rate."""
        if self._subscribers[stream]:
            self.send_data(stream, encode_message(address, *args))

    def send_data(self, stream: str, data: bytes) -> None:
        """Send an encoded message to the stream's subscribers, each within its rate."""
        for endpoint in self._subscribers[stream]:
            if self._limits.allow((stream, endpoint)):
                self._output.send_to(endpoint, data)


class StatusPusher:
    """Calls `push` every `period` seconds on an absolute schedule while started; no timer otherwise."""

    def __init__(self, loop: asyncio.AbstractEventLoop, push: Callable[[], None], period: float) -> None:
        self._loop, self._push, self._period = loop, push, period
        self._timer: asyncio.TimerHandle | None = None
        self._next = 0.0

    def start(self) -> None:
        if self._timer is None:
            self._next = self._loop.time()
            self._tick()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._push()
        self._next = max(self._next + self._period, self._loop.time())  # after a stall: no burst of catch-up pushes
        self._timer = self._loop.call_at(self._next, self._tick)
