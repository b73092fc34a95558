"""Subscribable streams of what the model thinks: who gets `/mixture`, `/surprise` and pushed `/status`.

A stream nobody subscribes to costs nothing: the engine asks (`active`, through
`server.osc.sink.OscSink.wants`) before it computes one, and `on_change` starts the
status push when `status` gains its first subscriber and stops it when it loses its last. Each destination's messages on a stream are rate-capped, so a
subscriber cannot turn the server into a flood source, and each stream holds at most
`MAX_DESTINATIONS` subscribers. Who may subscribe or unsubscribe whom, and what a port
named by another is sent before it speaks, is `server.osc.consent`'s.

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
from server.osc.consent import Endpoint, Entries
from server.osc.output import MAX_DESTINATIONS, OscOutput
from server.osc.ratelimit import TokenBuckets
from server.osc.wire import encode_message



class StreamsFull(ValueError):
    """A stream already has as many subscribers as it may, and the sender already has one of them."""


class Subscriptions:
    """The subscribers of each stream (`prediction` here is the capped one; `/hello` destinations get every event).

    Each subscriber is an entry of `server.osc.consent`: its destination and the senders
    that asked for it. Only the destination itself or one of them can unsubscribe it;
    what goes to a destination that has not sent anything itself is paid for by whoever
    named it. A full stream makes room for a sender that has no subscription in it yet:
    the idlest subscriber goes (`subscribers_evicted`), so a crowd that subscribed and
    went quiet cannot lock the monitor out; a sender that already has one there is refused.
    """

    def __init__(
        self,
        output: OscOutput,
        names: tuple[str, ...],
        *,
        max_each: int = MAX_DESTINATIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._output = output
        self._subscribers: dict[str, Entries] = {name: Entries(output.consent) for name in names}
        self._max = max_each
        self._clock = clock
        self._limits = TokenBuckets(STREAM_RATE, STREAM_RATE, max_keys=4 * max_each * max(1, len(names)), clock=clock)
        self.on_change: Callable[[str, bool], None] = lambda stream, active: None

    def add(self, stream: str, endpoint: Endpoint, requester: Endpoint | None = None, now: float | None = None) -> bool:
        """`requester` (the destination itself if None) subscribes `endpoint` at loop time `now`; False if it already
        had. StreamsFull when the stream has no room for it, TooMany when the requester has asked for its most,
        Taken when the destination subscribed itself and the requester is another."""
        entries = self._subscribers[stream]
        requester = endpoint if requester is None else requester
        now = self._clock() if now is None else now
        if entries.asked(endpoint, requester):
            entries.add(endpoint, requester, now)  # heard again
            return False
        entries.check(endpoint, requester)
        first = not entries
        if endpoint not in entries and len(entries) >= self._max:
            if any(requester in asked for asked in entries.requesters.values()):
                raise StreamsFull(f"{stream} already has {self._max} subscribers, one of them yours")
            self._evict(stream, entries.idlest())
        entries.add(endpoint, requester, now)
        if first:
            self.on_change(stream, True)
        return True

    def _evict(self, stream: str, endpoint: Endpoint | None) -> None:
        if endpoint is not None and self._subscribers[stream].remove(endpoint):
            self._output.stats.subscribers_evicted += 1

    def remove(self, stream: str, endpoint: Endpoint, requester: Endpoint | None = None) -> bool:
        """`/unsubscribe` from `requester` (the destination itself if None): the destination's own word ends the
        subscription, a sender that asked for it withdraws its request. False if there was nothing of its to stop."""
        entries = self._subscribers[stream]
        if not entries.withdraw_or_remove(endpoint, endpoint if requester is None else requester):
            return False
        if not entries:
            self.on_change(stream, False)
        return True

    def drop(self, endpoint: Endpoint) -> list[str]:
        """Unsubscribe `endpoint` from every stream (its port is closed); the streams it was in."""
        left = [stream for stream, entries in self._subscribers.items() if endpoint in entries]
        for stream in left:
            self.remove(stream, endpoint)
        return left

    def active(self, stream: str) -> bool:
        return bool(self._subscribers[stream])

    def subscribers(self, stream: str) -> tuple[Endpoint, ...]:
        return tuple(self._subscribers[stream].requesters)

    def send(self, stream: str, address: str, *args: int | float | str) -> None:
        """Send one message to the stream's subscribers, each within its rate."""
        if self._subscribers[stream]:
            self.send_data(stream, encode_message(address, *args))

    def send_data(self, stream: str, data: bytes) -> None:
        """Send an encoded message to the stream's subscribers, each within its rate (and paid for, if unproven)."""
        deliver = self._output.deliver
        for endpoint, requesters in self._subscribers[stream].requesters.items():
            if self._limits.allow((stream, endpoint)):
                deliver(endpoint, data, requesters)


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
        self._next += self._period
        now = self._loop.time()
        if self._next <= now:  # after a stall: no burst of catch-up pushes, and no second one at once
            self._next = now + self._period
        self._timer = self._loop.call_at(self._next, self._tick)
