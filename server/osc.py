"""The OSC transport: Antiphon's namespace (one handler per address), the UDP server and the sender.

Data flows one way: a datagram is decoded (python-osc), its arguments are checked
against the handler's signature (see `server.osctable`), and the handler calls
`Controls`; the transport never touches the model. Every refusal is answered with
`/error <address> <reason>` to its sender, rate-limited per sender, and nothing a
client sends can raise into the event loop.

Bundles, nested too, are unpacked and their messages applied at once, in order:
timetags are ignored, because the engine schedules on its own clock and a gesture
means "now". Addresses are literal: OSC patterns (`*`, `?`, `[...]`, `{...}`) are not
expanded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import numbers
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, NamedTuple, cast

from pythonosc.osc_message import OscMessage

from server.controls import ControlError, Controls
from server.modes import parse_mode
from server.names import check_model_name
from server.oscwire import (
    bundle_messages,
    encode_message,
    encode_prediction,
    is_bundle,
    message_problem,
    peek_address,
)
from server.osctable import AddressTable, address
from server.ratelimit import TokenBuckets

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5710
DEFAULT_SEND_PORT = 5711
MAX_DESTINATIONS = 32
OUTPUT_ADDRESSES: tuple[str, ...] = ("/prediction", "/status", "/error")

Endpoint = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class OscStats:
    """The transport's counters; `/status` reports them with an `osc_` prefix."""

    received: int = 0  # datagrams accepted from allowed senders
    handled: int = 0  # messages applied
    rejected: int = 0  # messages or datagrams refused (each answered by /error unless suppressed)
    clamped: int = 0  # /gesture or /interface messages with a coordinate outside [0, 1]
    ignored: int = 0  # /note messages with velocity 0 (note-offs)
    denied: int = 0  # datagrams dropped silently by the allow-list
    internal_errors: int = 0  # unexpected exceptions from the engine (answered "internal error")
    errors_suppressed: int = 0  # /error replies withheld by the per-sender rate limit
    sent: int = 0  # datagrams handed to the socket
    send_errors: int = 0  # sends that failed, including ICMP "port unreachable" reports

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Request(NamedTuple):
    """What a handler may use: the engine's controls, the output, the counters and the sender."""

    controls: Controls
    output: OscOutput
    stats: OscStats
    sender: Endpoint


# --- the namespace: each handler's signature is its argument spec, its docstring its doc ---


def _at_least(name: str, value: float, low: float, *, inclusive: bool = True) -> None:
    if not (value >= low if inclusive else value > low):
        raise ControlError(f"{name} must be {'>=' if inclusive else '>'} {low:g}, got {value:g}")


def _unit(value: float) -> float:
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


@address("/gesture")
def gesture(ctx: Request, x: float, y: float) -> None:
    """Performer position in [0, 1] (out-of-range values are clamped and counted)."""
    cx, cy = _unit(x), _unit(y)
    if cx != x or cy != y:
        ctx.stats.clamped += 1
    ctx.controls.perform(cx, cy)


@address("/interface")
def interface(ctx: Request, x: float, y: float) -> None:
    """Alias of /gesture (IMPSY-compatible)."""
    gesture(ctx, x, y)


@address("/note")
def note(ctx: Request, pitch: int, velocity: int) -> None:
    """A note (0-127 each) played at (pitch/127, velocity/127); velocity 0 is a note-off and ignored."""
    if not (0 <= pitch <= 127 and 0 <= velocity <= 127):
        raise ControlError(f"pitch and velocity must be 0-127, got {pitch} {velocity}")
    if velocity == 0:
        ctx.stats.ignored += 1
        return
    ctx.controls.perform(pitch / 127.0, velocity / 127.0)


@address("/temperature")
def temperature(ctx: Request, value: float) -> None:
    """Mixture-weight temperature (>= 0; 0 picks the most likely component)."""
    _at_least("temperature", value, 0.0)
    ctx.controls.set_temperature(value)


@address("/sigma_temperature")
def sigma_temperature(ctx: Request, value: float) -> None:
    """Scale temperature: multiplies each component's scale (>= 0; 0 samples its mean)."""
    _at_least("sigma_temperature", value, 0.0)
    ctx.controls.set_sigma_temperature(value)


@address("/timescale")
def timescale(ctx: Request, value: float) -> None:
    """Multiplies the predicted dt before scheduling (> 0)."""
    _at_least("timescale", value, 0.0, inclusive=False)
    ctx.controls.set_timescale(value)


@address("/mode")
def mode(ctx: Request, name: str) -> None:
    """Interaction mode: respond, accompany, generate or listen."""
    try:
        parse_mode(name)
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    ctx.controls.set_mode(name)


@address("/threshold")
def threshold(ctx: Request, seconds: float) -> None:
    """Seconds of performer silence before respond mode takes over (>= 0)."""
    _at_least("threshold", seconds, 0.0)
    ctx.controls.set_threshold(seconds)


@address("/reset")
def reset(ctx: Request) -> None:
    """Zero the RNN state."""
    ctx.controls.reset()


@address("/pause")
def pause(ctx: Request, paused: int) -> None:
    """1 pauses output, 0 resumes."""
    if paused not in (0, 1):
        raise ControlError(f"expected 1 (pause) or 0 (resume), got {paused}")
    ctx.controls.set_paused(paused == 1)


@address("/model")
def model(ctx: Request, name: str) -> None:
    """Load models/<name> (a bare folder name) without stopping the loop."""
    try:
        check_model_name(name)
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    ctx.controls.load_model(name)


@address("/hello")
def hello(ctx: Request, port: int = 0) -> None:
    """Send output to the sender's host, at `port` or else the sender's own port."""
    if not 0 <= port <= 65535:
        raise ControlError(f"port must be 1-65535 (or omitted for the sender's port), got {port}")
    ctx.output.add_destination(ctx.sender[0], port or ctx.sender[1])


@address("/status")
def status(ctx: Request) -> None:
    """Reply /status key value ... (engine state and osc_* counters) to the sender."""
    items = dict(ctx.controls.status())
    items.update((f"osc_{key}", value) for key, value in ctx.stats.as_dict().items())
    items["osc_destinations"] = len(ctx.output.destinations)
    ctx.output.send_status(ctx.sender, items)


TABLE = AddressTable(
    (gesture, interface, note, temperature, sigma_temperature, timescale, mode, threshold,
     reset, pause, model, hello, status)
)
ADDRESSES: tuple[str, ...] = TABLE.paths


def namespace_text() -> str:
    """The input namespace as aligned plain text (address, arguments, meaning) for the start-up print."""
    return TABLE.text()


def namespace_markdown() -> str:
    """The input namespace as a Markdown table for the README."""
    return TABLE.markdown()


# --- output ---


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


# --- input ---

_MAX_ALLOW_CACHE = 4096


class OscServerProtocol(asyncio.DatagramProtocol):
    """Turns datagrams into `Controls` calls through the address table; never lets an error escape."""

    def __init__(
        self,
        controls: Controls,
        output: OscOutput,
        *,
        allow: Sequence[Network] = (),
        table: AddressTable = TABLE,
        error_rate: float = 10.0,
        error_burst: int = 10,
    ) -> None:
        self.controls = controls
        self.output = output
        self.stats = output.stats
        self.transport: asyncio.DatagramTransport | None = None
        self._lookup = table.lookup
        self._unknown = f"unknown address; expected one of {' '.join(table.paths)}"
        self._allow = tuple(allow)
        self._allowed: dict[str, bool] = {}  # host -> verdict, so the check is one dict hit
        self._error_limit = TokenBuckets(error_rate, error_burst)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.output.attach(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.warning("OSC socket closed: %s", exc)

    def error_received(self, exc: Exception) -> None:
        # On an unconnected UDP socket this is an ICMP report about an earlier send.
        self.output.send_failed(exc)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            if self._allow and not self._is_allowed(addr[0]):
                self.stats.denied += 1
                return
            self.stats.received += 1
            sender: Endpoint = (addr[0], addr[1])
            if data[:1] == b"/":
                self._message(data, sender)
            elif is_bundle(data):
                try:
                    packets = bundle_messages(data)
                except ValueError as exc:
                    self._reject("#bundle", f"malformed OSC bundle: {exc}", sender)
                    return
                for packet in packets:
                    self._message(packet, sender)
            else:
                self._reject(peek_address(data), "not an OSC message or bundle", sender)
        except Exception:  # last line of defence: the loop must keep serving
            self.stats.internal_errors += 1
            logger.exception("unexpected error handling a datagram from %s", addr)

    def _message(self, packet: bytes, sender: Endpoint) -> None:
        problem = message_problem(packet)
        if problem is None:
            try:
                message = OscMessage(packet)
            except Exception as exc:  # python-osc raises ParseError, but also UnicodeDecodeError
                logger.debug("undecodable OSC message from %s: %r", sender, exc)
                problem = "undecodable message"
        if problem is not None:
            self._reject(peek_address(packet), f"malformed OSC message: {problem}", sender)
            return
        path = message.address
        spec = self._lookup.get(path)
        if spec is None:
            self._reject(path, self._unknown, sender)
            return
        try:
            spec.invoke(Request(self.controls, self.output, self.stats, sender), message.params)
        except ControlError as exc:
            self._reject(path, str(exc) or "refused", sender)
        except Exception:
            self.stats.internal_errors += 1
            count = self.stats.internal_errors
            if count <= 10 or count % 1000 == 0:  # a broken engine must not flood the log
                logger.exception("internal error handling %s from %s (#%d)", path, sender, count)
            self._reply_error(path, "internal error", sender)
        else:
            self.stats.handled += 1

    def _reject(self, path: str, reason: str, sender: Endpoint) -> None:
        self.stats.rejected += 1
        logger.debug("rejected %s from %s: %s", path, sender, reason)
        self._reply_error(path, reason, sender)

    def _reply_error(self, path: str, reason: str, sender: Endpoint) -> None:
        if self._error_limit.allow(sender):
            self.output.send_error(sender, path, reason)
        else:
            self.stats.errors_suppressed += 1

    def _is_allowed(self, host: str) -> bool:
        verdict = self._allowed.get(host)
        if verdict is None:
            verdict = _in_networks(host, self._allow)
            if len(self._allowed) >= _MAX_ALLOW_CACHE:
                self._allowed.clear()
            self._allowed[host] = verdict
        return verdict


def _in_networks(host: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 senders as ::ffff:a.b.c.d
    return any(ip in net for net in networks)


async def start_osc(
    controls: Controls,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    destinations: Iterable[Endpoint] = ((DEFAULT_HOST, DEFAULT_SEND_PORT),),
    allow: Sequence[Network] = (),
) -> tuple[asyncio.DatagramTransport, OscServerProtocol, OscOutput]:
    """Listen on host:port (0 = any free port) and return (transport, protocol, output).

    Destination host names are resolved once here, for the socket's address family, so
    sending never blocks on DNS. Raises OSError with a readable message if the port is
    taken or a destination cannot be resolved. Close with `transport.close()`.
    """
    loop = asyncio.get_running_loop()
    output = OscOutput()
    protocol = OscServerProtocol(controls, output, allow=allow)
    try:
        transport, _ = await loop.create_datagram_endpoint(lambda: protocol, local_addr=(host, port))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for OSC on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        family = transport.get_extra_info("socket").family
        output.set_destinations([await _resolve(loop, h, p, family) for h, p in destinations])
    except BaseException:
        transport.close()
        raise
    return transport, protocol, output


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
