"""Where OSC output goes: configured destinations plus clients that said `/hello`, and the transport's counters.

Destination policy: the list holds at most `MAX_DESTINATIONS`. Configured ones
(`--send`) always keep their place. A `/hello` destination remembers the senders that
asked for it (itself, for a bare `/hello`; the sender that named it, for `/hello PORT`),
and the protocol notes in `last_heard` whenever any of them, or the destination, sends
anything. A destination is protected if it has sent within `PROTECTED_SECONDS`, or a
sender for which it is the first destination it asked for has: one busy socket keeps
one destination alive, not all it named.
When the list is full, a new `/hello` evicts the unprotected destination quiet longest;
if every one is protected, the new `/hello` is refused (`DestinationsFull`). So a flood
of `/hello` from many ports can never take the output away from a performer who is
still playing. Evictions are counted (`destinations_evicted`), not logged one by one.

Ownership and consent (`server.osc.consent`): only the destination itself, or a sender
that asked for it, can stop it (each its own request); a destination another port named
is sent only what that port's own traffic pays for until it sends something itself.
"""

from __future__ import annotations

import asyncio
import logging
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from server.osc.allow import is_loopback
from server.osc.consent import Consent, Endpoint, Entries
from server.osc.wire import encode_bundle, encode_message, encode_prediction

MAX_DESTINATIONS = 32
PROTECTED_SECONDS = 10.0  # a /hello destination whose sender sent within this long is never evicted

logger = logging.getLogger(__name__)


def _counter(doc: str) -> Any:
    """A counter field that starts at 0 and carries its meaning."""
    return field(default=0, metadata={"doc": doc})


@dataclass(slots=True)
class OscStats:
    """The transport's counters; `/status` reports them with an `osc_` prefix."""

    received: int = _counter("datagrams accepted from allowed senders")
    handled: int = _counter("messages applied")
    rejected: int = _counter("messages or datagrams refused (each answered by /error unless suppressed)")
    clamped: int = _counter("/gesture or /interface messages with a coordinate outside [0, 1]")
    ignored: int = _counter("/note messages with velocity 0 (note-offs)")
    coalesced: int = _counter("performer positions superseded by a newer one in the same batch (the flood policy)")
    rate_limited: int = _counter("requests refused by their address's per-sender rate (also counted as rejected)")
    batch_max: int = _counter("most datagrams read in one wake-up: how far behind the server has been")
    denied: int = _counter("datagrams dropped silently by the allow-list")
    internal_errors: int = _counter('unexpected exceptions from the engine (answered "internal error")')
    errors_suppressed: int = _counter("/error replies withheld by the per-sender rate limit")
    sent: int = _counter("datagrams handed to the socket")
    send_errors: int = _counter('sends that failed, including ICMP "port unreachable" reports')
    bundles_capped: int = _counter("bundles that carried more than the cap; the messages beyond it were refused")
    deferred: int = _counter("loop wake-ups that ran out of their work budget and left the rest of a batch for later")
    destinations_evicted: int = _counter("/hello destinations dropped to make room (their sender had gone quiet)")
    subscribers_dropped: int = _counter("stream subscriptions dropped because their port reported unreachable (the subscriber closed)")
    subscribers_evicted: int = _counter("stream subscriptions dropped to make room for a newcomer in a full stream (the idlest)")
    unproven_withheld: int = _counter("datagrams not sent to a port another sender named and that has not sent anything "
                                      "itself: what the namer's own traffic pays for was spent")

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def docs(cls) -> dict[str, str]:
        """Each counter's meaning (for the /status table in docs/osc.md)."""
        return {f.name: f.metadata["doc"] for f in fields(cls)}



def status_message(items: Mapping[str, Any]) -> bytes:
    """`/status k v k v ...` as a datagram."""
    args: list[int | float | str] = []
    for key, value in items.items():
        args.append(str(key))
        args.append(_status_value(value))
    return encode_message("/status", *args)


def _status_value(value: object) -> int | float | str:
    """An OSC-friendly form of a status value (numpy numbers included, via the numbers ABCs)."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):  # bool too: sent as 0/1
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return "none" if value is None else str(value)


class DestinationsFull(Exception):
    """A `/hello` cannot be added: every destination is configured or protected; the message says so."""


class OscOutput:
    """Where messages go: configured destinations plus clients that said `/hello` (policy: module doc).

    Sends through the server's own socket, so replies come from the port clients
    already talk to. Sending never raises: a failure is counted (`send_errors`) and
    logged once per output, and the performance goes on. What goes to a destination
    that has not proven it wants it is paid for by whoever named it (`server.osc.consent`).
    """

    def __init__(
        self,
        destinations: Iterable[Endpoint] = (),
        *,
        stats: OscStats | None = None,
        max_destinations: int = MAX_DESTINATIONS,
        consent: Consent | None = None,
    ) -> None:
        self.stats = stats if stats is not None else OscStats()
        self._max = max_destinations
        self.consent = consent if consent is not None else Consent()
        self._configured: tuple[Endpoint, ...] = ()
        self._hello = Entries(self.consent)  # /hello destination -> the senders that asked; oldest first
        # Every endpoint of a /hello destination or a subscription (the destination and who asked) -> when it last
        # sent anything (loop clock), so its size is bounded by the lists'. The protocol updates it per datagram.
        self.last_heard: dict[Endpoint, float] = self.consent.heard
        self._all: tuple[Endpoint, ...] = ()
        self._full_logged = False
        self._transport: asyncio.DatagramTransport | None = None
        self._warned = False
        self.streams: Any = None  # the Subscriptions of the other streams (server.osc.streams), set by start_osc
        self.set_destinations(destinations)

    def attach(self, transport: asyncio.DatagramTransport) -> None:
        """Use `transport` (the server's socket) for sending; until then sends are dropped."""
        self._transport = transport

    def is_own(self, endpoint: Endpoint) -> bool:
        """Whether `endpoint` may be this server's own socket (named as a destination, it would feed itself)."""
        extra = getattr(self._transport, "get_extra_info", None)
        sockname = extra("sockname") if extra is not None else None
        if not isinstance(sockname, tuple) or len(sockname) < 2 or int(endpoint[1]) != int(sockname[1]):
            return False
        host = str(sockname[0])
        return host in (str(endpoint[0]), "0.0.0.0", "::") or (is_loopback(host) and is_loopback(str(endpoint[0])))

    @property
    def destinations(self) -> tuple[Endpoint, ...]:
        """Configured destinations first, then `/hello` ones, oldest first."""
        return self._all

    def set_destinations(self, destinations: Iterable[Endpoint]) -> None:
        """Replace the configured destinations (numeric host, port); `/hello` ones are kept."""
        configured = tuple(dict.fromkeys((str(h), int(p)) for h, p in destinations))
        if len(configured) > self._max:
            raise ValueError(f"at most {self._max} destinations, got {len(configured)}")
        self._configured = configured
        self.consent.configured = frozenset(configured)
        for endpoint in configured:
            self._hello.remove(endpoint)
        self._trim()

    def add_destination(self, destination: Endpoint, sender: Endpoint | None = None, now: float = 0.0) -> bool:
        """Add a `/hello` destination asked for by `sender` (the destination itself if None) at loop time `now`.

        Returns False if it was already there (the request is recorded, and its sender
        counts as heard). When the list is full, the unprotected destination whose
        endpoints have been quiet longest makes room; raises DestinationsFull if there
        is none, TooMany if `sender` has asked for as many destinations as it may, Taken
        if the destination asked for itself and `sender` is another.
        """
        endpoint = (str(destination[0]), int(destination[1]))
        requester = endpoint if sender is None else sender
        if endpoint in self._configured:
            return False
        hello = self._hello
        hello.check(endpoint, requester)
        if endpoint not in hello and len(self._configured) + len(hello) >= self._max:
            victim = hello.idlest(before=now - PROTECTED_SECONDS, one_each=True)
            if victim is None:
                raise DestinationsFull(
                    f"destination list is full ({self._max}): every /hello client has sent within the last "
                    f"{PROTECTED_SECONDS:g} s"
                )
            self._evict(victim)
        if not hello.add(endpoint, requester, now):
            return False
        self._all = self._configured + tuple(hello.requesters)
        return True

    def remove_destination(self, endpoint: Endpoint, sender: Endpoint | None = None) -> bool:
        """`/unsubscribe prediction` from `sender` (the destination itself if None): the destination's own word
        drops it, a sender that asked for it withdraws its request (it goes with the last). --send ones stay.
        False if there was nothing of `sender`'s to stop."""
        endpoint = (str(endpoint[0]), int(endpoint[1]))
        if not self._hello.withdraw_or_remove(endpoint, endpoint if sender is None else sender):
            return False
        self._all = self._configured + tuple(self._hello.requesters)
        return True

    def _evict(self, endpoint: Endpoint) -> None:
        self._hello.remove(endpoint)
        self.stats.destinations_evicted += 1
        if not self._full_logged:  # one line per run; the count is in /status
            self._full_logged = True
            logger.info("destination list full: dropping the /hello destinations of senders gone quiet "
                        "(counted as osc_destinations_evicted)")

    def _trim(self) -> None:
        """Make room for the configured destinations, evicting the quietest `/hello` ones, protected or not."""
        hello = self._hello
        while len(hello) and len(self._configured) + len(hello) > self._max:
            victim = hello.idlest()
            self._evict(victim if victim is not None else next(iter(hello.requesters)))
        self._all = self._configured + tuple(hello.requesters)

    def deliver(self, to: Endpoint, data: bytes, requesters: Iterable[Endpoint]) -> None:
        """Send to a destination `requesters` asked for: at once if it is proven, else if one of them pays."""
        if self.consent.allows(to, requesters, len(data)):
            self.send_to(to, data)
        else:
            self.stats.unproven_withheld += 1

    def send_prediction(self, values: tuple[float, ...], voice: int | None = None, route: object = None,
                        timetag: int | None = None) -> None:
        """Send `/prediction v1 .. vN` (float32; then the voice, for a voice), as a bundle when given a timetag.

        Without a voice it goes to every destination. A voice's goes to the `--send`
        destinations and to its own performer (`route`, an OSC sender): at the port
        that sender said `/hello` for, else back to the sender's own port.
        """
        data = encode_prediction(values, voice)
        if timetag is not None:
            data = encode_bundle(timetag, data)
        for endpoint in self._configured:
            self.send_to(endpoint, data)
        if voice is None:
            for endpoint, requesters in self._hello.requesters.items():
                self.deliver(endpoint, data, requesters)
            return
        if type(route) is tuple and len(route) == 2:
            own = self.reply_to(route)  # type: ignore[arg-type]
            if own == route:  # the performer's own port: it sent from there
                if own not in self._configured:
                    self.send_to(own, data)
            elif own not in self._configured:
                self.deliver(own, data, self._hello.requesters[own])

    def reply_to(self, sender: Endpoint) -> Endpoint:
        """Where a performer wants its voice's output: the destination it said `/hello` for, else its own address."""
        for endpoint, requesters in self._hello.requesters.items():
            if sender in requesters:
                return endpoint
        return sender

    def send_status(self, to: Endpoint, items: Mapping[str, Any]) -> None:
        """Send `/status k v k v ...` to one address (enums as their value, other types as text)."""
        self.send_to(to, status_message(items))

    def broadcast(self, address: str, *args: int | float | str) -> None:
        """Send one message to every destination (fine-tune progress and results)."""
        data = encode_message(address, *args)
        for endpoint in self._configured:
            self.send_to(endpoint, data)
        for endpoint, requesters in self._hello.requesters.items():
            self.deliver(endpoint, data, requesters)

    def send_error(self, to: Endpoint, address: str, reason: str) -> None:
        """Send `/error <address> <reason>` to one address (both truncated to stay small)."""
        self.send_to(to, encode_message("/error", address[:128], reason[:256]))

    def send_to(self, to: Endpoint, data: bytes) -> None:
        """Send one datagram; never raises."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            transport.sendto(data, to)
        except Exception as exc:  # a send must never stop the performance
            self.send_failed(exc)
        else:
            self.stats.sent += 1

    def send_failed(self, exc: BaseException) -> None:
        """Count a failed send (or an ICMP error the socket reported later); log only the first."""
        self.stats.send_errors += 1
        if not self._warned:
            self._warned = True
            logger.warning("OSC send failed (%s); further failures are only counted", exc)
        else:
            logger.debug("OSC send failed: %s", exc)
