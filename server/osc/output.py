"""Where OSC output goes: configured destinations plus clients that said `/hello`, and the transport's counters."""

from __future__ import annotations

import asyncio
import logging
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from server.osc.wire import encode_message, encode_prediction

MAX_DESTINATIONS = 32
Endpoint = tuple[str, int]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class OscStats:
    """The transport's counters; `/status` reports them with an `osc_` prefix."""

    received: int = 0  # datagrams accepted from allowed senders
    handled: int = 0  # messages applied
    rejected: int = 0  # messages or datagrams refused (each answered by /error unless suppressed)
    clamped: int = 0  # /gesture or /interface messages with a coordinate outside [0, 1]
    ignored: int = 0  # /note messages with velocity 0 (note-offs)
    coalesced: int = 0  # performer positions superseded by a newer one in the same batch (the flood policy)
    rate_limited: int = 0  # requests refused by their address's per-sender rate (also counted as rejected)
    batch_max: int = 0  # most datagrams read in one wake-up: how far behind the server has been
    denied: int = 0  # datagrams dropped silently by the allow-list
    internal_errors: int = 0  # unexpected exceptions from the engine (answered "internal error")
    errors_suppressed: int = 0  # /error replies withheld by the per-sender rate limit
    sent: int = 0  # datagrams handed to the socket
    send_errors: int = 0  # sends that failed, including ICMP "port unreachable" reports

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}



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


class OscOutput:
    """Where messages go: configured destinations plus clients that said `/hello`.

    Sends through the server's own socket, so replies come from the port clients
    already talk to. Sending never raises: a failure is counted (`send_errors`) and
    logged once per output, and the performance goes on.
    """

    def __init__(
        self,
        destinations: Iterable[Endpoint] = (),
        *,
        stats: OscStats | None = None,
        max_destinations: int = MAX_DESTINATIONS,
    ) -> None:
        self.stats = stats if stats is not None else OscStats()
        self._max = max_destinations
        self._configured: tuple[Endpoint, ...] = ()
        self._hello: dict[Endpoint, None] = {}  # an insertion-ordered set: oldest first
        self._all: tuple[Endpoint, ...] = ()
        self._transport: asyncio.DatagramTransport | None = None
        self._warned = False
        self.set_destinations(destinations)

    def attach(self, transport: asyncio.DatagramTransport) -> None:
        """Use `transport` (the server's socket) for sending; until then sends are dropped."""
        self._transport = transport

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
        for endpoint in configured:
            self._hello.pop(endpoint, None)
        self._trim()

    def add_destination(self, host: str, port: int) -> bool:
        """Add a `/hello` destination; when full, the oldest `/hello` one makes room.

        Returns False if it was already there. Clients that reopen get a new port each
        time, so dropping the oldest beats refusing the newest.
        """
        endpoint = (host, port)
        if endpoint in self._configured or endpoint in self._hello:
            return False
        self._hello[endpoint] = None
        self._trim()
        return True

    def _trim(self) -> None:
        while self._hello and len(self._configured) + len(self._hello) > self._max:
            dropped = next(iter(self._hello))
            del self._hello[dropped]
            logger.info("destination list full: dropped %s:%d", *dropped)
        self._all = self._configured + tuple(self._hello)

    def send_prediction(self, x: float, y: float) -> None:
        """Send `/prediction x y` (float32) to every destination."""
        data = encode_prediction(x, y)
        for endpoint in self._all:
            self.send_to(endpoint, data)

    def send_status(self, to: Endpoint, items: Mapping[str, Any]) -> None:
        """Send `/status k v k v ...` to one address (enums as their value, other types as text)."""
        args: list[int | float | str] = []
        for key, value in items.items():
            args.append(str(key))
            args.append(_status_value(value))
        self.send_to(to, encode_message("/status", *args))

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
