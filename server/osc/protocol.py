"""The OSC transport's receiving side: `OscServerProtocol`, `start_osc` (which binds it) and `push_status`.

Elsewhere in `server.osc`: the namespace (one handler per address) in `namespace`, the
sending side in `output` (the engine's answers reach it through `sink`), the socket
reads in `udp`, who may send in `allow`. Data flows one way: a datagram is decoded
(python-osc), its arguments are checked against the handler's signature (see
`server.osc.table`), and the handler calls `Controls`; the transport never touches the
model. Every refusal is answered with `/error <address> <reason>` to its sender
(`server.osc.refusals`: rate-limited per sender, with anything that looks like an
absolute server path cut to its last component), and nothing a client sends can raise
into the event loop.

Bundles, nested too, are unpacked and their messages applied at once, in order:
timetags are ignored, because the engine schedules on its own clock and a gesture
means "now". A bundle carries at most `MAX_BUNDLE` messages; the rest are refused
with one `/error` (counted in `osc_bundles_capped`) and not even read. Addresses are
literal: OSC patterns (`*`, `?`, `[...]`, `{...}`) are not expanded.

Time: a performer event's time is when its datagram arrived (the kernel's receive
stamp where there is one, see `server.osc.udp`), passed on as `perform(..., at=...)`, so
a stall of the loop does not squash the spacing of what queued meanwhile.

Flood policy: no datagram buys more than its share, and the newest performer position
wins. The socket is drained in batches (`server.osc.udp`); each batch is decoded
whole, then applied in arrival order. When a batch holds more than `MAX_RUN`
performer positions (`/gesture`, `/interface`, `/note`), the server has fallen behind,
and every position superseded by a newer one from the same sender in the same batch
(and voice) is skipped (counted in `osc_coalesced`) while control messages, interleaved or not,
are all applied in their order. A kept position is never moved across a control, so
nothing from before a `/reset` reaches the model after it. Under a steady flood a
wake-up finds ever more waiting, so batches grow and collapse: the policy regulates
itself. Work is sliced: once a wake-up has spent `WORK_BUDGET` seconds, the rest of
the batch waits for the next turn of the loop (a zero-delay timer, counted in
`osc_deferred`) so due timers, output included, run first; meanwhile reading is
paused, so the only queue is the kernel's receive buffer, of fixed size: if even
reading cannot keep up, the kernel drops new datagrams and `/status` reports them as
`osc_kernel_drops`. Costly requests (`/model`, `/learn`), replies bigger than their
request (`/status`), `/hello`, `/subscribe` and `/unsubscribe` are limited per sender,
each at the `max_rate` its handler declares in `server.osc.namespace`.
"""


from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, cast

from pythonosc.osc_message import OscMessage

from server.live.controls import ControlError, Controls, Shown
from server.osc.namespace import (DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SEND_PORT, STATUS_PUSH_HZ, STREAMS, TABLE,
                                  Request, status_items)
from server.osc.streams import StatusPusher, Subscriptions
from server.osc.output import Endpoint, OscOutput, status_message
from server.osc.ratelimit import TokenBuckets
from server.osc.table import Address as Handler
from server.osc.table import AddressTable
from server.osc.allow import AllowList, Network, exposure_warning
from server.osc.refusals import Refusals
from server.osc.udp import Address, BatchDatagramTransport, Datagram, bind_udp
from server.osc.wire import BundleTooLarge, bundle_messages, is_bundle, message_problem, peek_address

MAX_RUN = 32  # positions in one batch applied one by one (~1 ms of model work); more means we are behind
MAX_BUNDLE = 64  # messages applied from one bundle; the rest are refused
WORK_BUDGET = 0.002  # seconds of decoding and applying per loop wake-up before due timers get their turn

logger = logging.getLogger(__name__)




class _Position(NamedTuple):
    """A checked performer event waiting to reach the engine."""

    values: tuple[float, ...]
    at: float  # arrival time on the loop's clock
    path: str
    sender: Endpoint
    voice: int | None  # the voice asked for, or None for the sender's own


class _Control(NamedTuple):
    """A control message waiting to be applied; its arguments are checked when it is."""

    handler: Handler
    params: list[Any]
    sender: Endpoint
    at: float


_Action = _Position | _Control | None  # None: a position superseded by a newer one from its sender


class OscServerProtocol(asyncio.DatagramProtocol):
    """Turns datagrams into `Controls` calls through the address table; never lets an error escape.

    Reads batches from `server.osc.udp` (`datagrams_received`) and applies the flood
    policy described in the module docstring; a single datagram, as asyncio's own
    transport delivers it, is a batch of one. With a `loop`, work is sliced by
    `budget` (seconds per wake-up); without one (as in unit tests), each batch is
    worked through at once and arrival times default to `time.monotonic()`.
    """

    def __init__(
        self,
        controls: Controls,
        output: OscOutput,
        *,
        allow: Sequence[Network] = (),
        table: AddressTable = TABLE,
        error_rate: float = 10.0,
        error_burst: int = 10,
        max_run: int = MAX_RUN,
        max_bundle: int = MAX_BUNDLE,
        budget: float = WORK_BUDGET,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if max_run < 1 or max_bundle < 1 or not budget > 0:
            raise ValueError("max_run and max_bundle must be >= 1 and budget > 0")
        if output.streams is None:
            output.streams = Subscriptions(output, tuple(STREAMS))
        self.controls = controls
        self.output = output
        self.stats = output.stats
        self.transport: asyncio.DatagramTransport | None = None
        self._lookup = table.lookup
        self._unknown = f"unknown address; expected one of {' '.join(table.paths)}"
        self._allow = AllowList(allow)
        self._refusals = Refusals(output, self.stats, frozenset(table.paths), error_rate, error_burst)
        self._limits = {a.path: TokenBuckets(a.max_rate, a.max_rate) for a in table if a.max_rate is not None}
        self._max_run = max_run
        self._max_bundle = max_bundle
        self._loop = loop
        self._clock = loop.time if loop is not None else time.monotonic
        self._budget = budget if loop is not None else math.inf
        self._heard = output.last_heard  # endpoints of /hello destinations and subscriptions -> last arrival
        self._hear = output.consent.hear  # notes the arrival (and what it pays for: server.osc.consent)
        self._counters = self.counters
        # The batch in progress: decoded into actions first, then applied, both resumable.
        self._batch: Sequence[Datagram] = ()
        self._read = 0  # datagrams of the batch decoded so far
        self._decoded = False
        self._actions: list[_Action] = []
        self._applied = 0  # actions applied so far
        self._positions = 0  # performer positions among the actions
        self._waiting: deque[Sequence[Datagram]] = deque()  # batches that came while one was in progress
        self._busy = False  # a continuation is scheduled
        self._paused = False  # we paused the transport's reading

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.output.attach(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.warning("OSC socket closed: %s", exc)

    def error_received(self, exc: Exception) -> None:
        # On an unconnected UDP socket this is an ICMP report about an earlier send.
        self.output.send_failed(exc)

    def unreachable(self, endpoint: Endpoint) -> None:
        """`endpoint`'s port reported itself closed (`server.osc.udp`): drop its stream subscriptions.

        `--send` and `/hello` destinations stay: a performer's patch may come back on the
        same port, and sending to it costs no model work.
        """
        streams = self.output.streams
        if streams is not None:
            dropped = streams.drop((str(endpoint[0]), int(endpoint[1])))
            if dropped:
                self.stats.subscribers_dropped += len(dropped)
                logger.debug("%s:%s closed its port: dropped from %s", endpoint[0], endpoint[1], ", ".join(dropped))

    # The transport's keys in /status beyond OscStats (documented in docs/osc.md's table).
    EXTRA_COUNTERS = {
        "kernel_drops": "datagrams the kernel dropped because the receive buffer was full (Linux; `none` elsewhere)",
        "destinations": "where `/prediction` goes now: `--send` ones and `/hello` ones",
    }

    def counters(self) -> dict[str, int | None]:
        """The transport's part of `/status`: counters, kernel drops (None if unknown) and destinations."""
        items: dict[str, int | None] = dict(self.stats.as_dict())
        transport = self.transport
        items["kernel_drops"] = transport.kernel_drops() if isinstance(transport, BatchDatagramTransport) else None
        items["destinations"] = len(self.output.destinations)
        return items

    # --- batches: decode whole, then apply in order, in slices of at most `budget` seconds ---

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.datagrams_received([(data, addr, self._clock())])

    def datagrams_received(self, batch: Sequence[Datagram]) -> None:
        """Take a batch of (data, sender, arrival time); it is applied after any batch still in progress."""
        if len(batch) > self.stats.batch_max:
            self.stats.batch_max = len(batch)
        if self._busy:
            self._waiting.append(batch)
            return
        self._begin(batch)
        self._work()

    def _begin(self, batch: Sequence[Datagram]) -> None:
        self._batch = batch
        self._read = 0
        self._decoded = False
        self._actions = []
        self._applied = 0
        self._positions = 0

    def _work(self) -> None:
        """Work through the current batch, then any waiting ones, until done or the budget is spent."""
        self._busy = False
        deadline = time.perf_counter() + self._budget
        while self._decode(deadline) and self._apply(deadline):
            if not self._waiting:
                self._batch = ()
                self._actions = []
                self._resume()
                return
            self._begin(self._waiting.popleft())
        self._defer()

    def _defer(self) -> None:
        """Out of budget: pause reading and carry on at the loop's next turn, after the timers already due.

        The continuation is a zero-delay timer rather than `call_soon`, so an output due
        now runs before the next slice, not after it.
        """
        self._busy = True
        self.stats.deferred += 1
        if not self._paused and self.transport is not None:
            try:
                self.transport.pause_reading()  # type: ignore[attr-defined]
            except (AttributeError, NotImplementedError, RuntimeError):
                pass  # a transport that cannot pause hands its datagrams over to wait in `_waiting`
            else:
                self._paused = True
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        loop.call_at(loop.time(), self._work)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()  # type: ignore[attr-defined]

    def _decode(self, deadline: float) -> bool:
        """Decode the batch's datagrams into actions; False if the budget ran out first."""
        batch = self._batch
        count = len(batch)
        i = self._read
        while i < count:
            data, addr, at = batch[i]
            i += 1
            try:
                self._datagram(data, addr, at)
            except Exception:  # last line of defence: the loop must keep serving
                self._refusals.internal_error("?", (addr[0], addr[1]))
            if i < count and time.perf_counter() > deadline:
                self._read = i
                return False
        self._read = i
        if not self._decoded:
            self._decoded = True
            if self._positions > self._max_run:
                skip_superseded(self._actions)
        return True

    def _apply(self, deadline: float) -> bool:
        """Apply the decoded actions in order; False if the budget ran out first."""
        actions = self._actions
        count = len(actions)
        stats = self.stats
        i = self._applied
        while i < count:
            action = actions[i]
            i += 1
            if action is None:
                stats.coalesced += 1
                stats.handled += 1
                continue
            if type(action) is _Position:
                self._perform(action)
            else:
                self._control(action)
            if i < count and time.perf_counter() > deadline:
                self._applied = i
                return False
        self._applied = i
        return True

    # --- one datagram, one message ---

    def _datagram(self, data: bytes, addr: Address, at: float) -> None:
        if self._allow and not self._allow.allows(addr[0]):
            self.stats.denied += 1
            return
        self.stats.received += 1
        sender: Endpoint = (addr[0], addr[1])
        if sender in self._heard:
            self._hear(sender, at, len(data))
        if data[:1] == b"/":
            self._message(data, sender, at)
        elif is_bundle(data):
            self._bundle(data, sender, at)
        else:
            self._refusals.reject(peek_address(data), "not an OSC message or bundle", sender)

    def _bundle(self, data: bytes, sender: Endpoint, at: float) -> None:
        capped = False
        try:
            packets = bundle_messages(data, self._max_bundle)
        except BundleTooLarge as exc:
            packets, capped = exc.messages, True
        except ValueError as exc:
            self._refusals.reject("#bundle", f"malformed OSC bundle: {exc}", sender)
            return
        for packet in packets:
            self._message(packet, sender, at)
        if capped:
            self.stats.bundles_capped += 1
            self._refusals.reject("#bundle", f"a bundle may carry at most {self._max_bundle} messages; the rest were refused",
                         sender)

    def _message(self, packet: bytes, sender: Endpoint, at: float) -> None:
        problem = message_problem(packet)
        if problem is None:
            try:
                message = OscMessage(packet)
            except Exception as exc:  # python-osc raises ParseError, but also UnicodeDecodeError
                logger.debug("undecodable OSC message from %s: %r", sender, exc)
                problem = "undecodable message"
        if problem is not None:
            self._refusals.reject(peek_address(packet), f"malformed OSC message: {problem}", sender)
            return
        path = message.address
        handler = self._lookup.get(path)
        if handler is None:
            self._refusals.reject(path, self._unknown, sender)
            return
        if handler.performer:
            self._position(handler, message.params, sender, at)
            return
        limit = self._limits.get(path)
        if limit is not None and not limit.allow(sender):
            self.stats.rate_limited += 1
            self._refusals.reject(path, f"too many requests: at most {handler.max_rate:g} per second", sender)
            return
        self._actions.append(_Control(handler, message.params, sender, at))

    def _position(self, handler: Handler, params: list[Any], sender: Endpoint, at: float) -> None:
        """Check a performer message now (its handler only returns a position) and queue the position."""
        path = handler.path
        try:
            position = handler.invoke(self._request(sender, at), params)
        except ControlError as exc:
            self._refusals.reject(path, str(exc) or "refused", sender)
        except Exception:
            self._refusals.internal_error(path, sender)
        else:
            if position is None:
                self.stats.handled += 1
            else:
                self._actions.append(_Position(position[0], at, path, sender, position[1]))
                self._positions += 1

    def _request(self, sender: Endpoint, at: float) -> Request:
        return Request(self.controls, self.output, self.stats, sender, self._counters, at, self._refusals.reply)

    def _perform(self, p: _Position) -> None:
        try:
            self.controls.perform(*p.values, at=p.at, voice=p.voice, route=p.sender)
        except ControlError as exc:
            self._refusals.reject(p.path, str(exc) or "refused", p.sender)
        except Exception:
            self._refusals.internal_error(p.path, p.sender)
        else:
            self.stats.handled += 1

    def _control(self, c: _Control) -> None:
        path = c.handler.path
        try:
            c.handler.invoke(self._request(c.sender, c.at), c.params)
        except ControlError as exc:
            self._refusals.reject(path, str(exc) or "refused", c.sender)
        except Exception:
            self._refusals.internal_error(path, c.sender)
        else:
            self.stats.handled += 1



def skip_superseded(actions: list[_Action]) -> None:
    """Behind: blank out every position that a newer one from the same sender and voice in this batch supersedes."""
    seen: set[tuple[Endpoint, int | None]] = set()
    for i in range(len(actions) - 1, -1, -1):
        action = actions[i]
        if type(action) is _Position:
            key = (action.sender, action.voice)
            if key in seen:
                actions[i] = None
            else:
                seen.add(key)


async def start_osc(
    controls: Controls,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    destinations: Iterable[Endpoint] = ((DEFAULT_HOST, DEFAULT_SEND_PORT),),
    allow: Sequence[Network] = (),
    output: OscOutput | None = None,
) -> tuple[asyncio.DatagramTransport, OscServerProtocol, OscOutput]:
    """Listen on host:port (0 = any free port) and return (transport, protocol, output).

    ``output`` is the one the engine's `OscSink` sends through, if it was made first.
    The `status` stream is pushed `STATUS_PUSH_HZ` times a second while anyone subscribes.

    Destination host names are resolved once here, for the socket's address family, so
    sending never blocks on DNS. Raises OSError with a readable message if the port is
    taken or a destination cannot be resolved. Logs a warning if the socket is reachable
    from other machines (see `exposure_warning`). Close with `transport.close()`.

    Event loops without `add_reader` (Windows' default) get asyncio's own transport:
    one datagram per batch, so input is never coalesced there, and arrival times are
    read times.
    """
    loop = asyncio.get_running_loop()
    output = OscOutput() if output is None else output
    protocol = OscServerProtocol(controls, output, allow=allow, loop=loop)
    push_status(loop, controls, protocol)
    try:
        sock = await bind_udp(loop, host, port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for OSC on {host}:{port}: {exc.strerror or exc}") from exc
    transport: asyncio.DatagramTransport
    try:
        transport = BatchDatagramTransport(loop, sock, protocol)
    except NotImplementedError:
        transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    try:
        output.set_destinations([await _resolve(loop, h, p, sock.family) for h, p in destinations])
    except BaseException:
        transport.close()
        raise
    warning = exposure_warning(transport.get_extra_info("sockname"), allow)
    if warning:
        logger.warning(warning)
    logger.debug("OSC receive buffer: %d bytes", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    return transport, protocol, output


def push_status(loop: asyncio.AbstractEventLoop, controls: Controls, protocol: OscServerProtocol) -> None:
    """Push `/status` to the `status` stream's subscribers while there are any (no timer otherwise).

    The push is one message for every subscriber, who may be anywhere: it carries no
    voice's keys (who plays which voice from where), only what `/status` tells anyone.
    """
    streams = protocol.output.streams

    def push() -> None:
        streams.send_data("status", status_message(status_items(controls, protocol.counters, Shown.NONE)))

    pusher = StatusPusher(loop, push, 1.0 / STATUS_PUSH_HZ)

    def changed(stream: str, active: bool) -> None:
        if stream == "status":
            pusher.start() if active else pusher.stop()

    streams.on_change = changed


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int, family: int) -> Endpoint:
    flags = socket.AI_V4MAPPED if family == socket.AF_INET6 and hasattr(socket, "AI_V4MAPPED") else 0
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM, flags=flags)
    except OSError as exc:
        raise OSError(f"cannot send OSC to {host}:{port}: {exc}") from exc
    if not infos:
        raise OSError(f"cannot send OSC to {host}:{port}: no address")
    sockaddr = infos[0][4]
    return (str(sockaddr[0]), int(sockaddr[1]))
