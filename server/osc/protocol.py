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

Flood policy: the newest performer position wins. The socket is drained in batches
(`server.udpbatch`) and every message is checked and applied in arrival order, except
that when one wake-up finds more than `MAX_RUN` performer positions (`/gesture`,
`/interface`, `/note`) in a row, the server has fallen behind and only the newest of
that run reaches the model; the rest are counted in `osc_coalesced`. A position is
never reordered with the control messages around it, and a run costs at most
`MAX_RUN` model steps however long it is, so no backlog builds up behind the model
(under a steady flood a wake-up finds ever more waiting, so runs grow long and
collapse: the policy regulates itself). The only queue is
the kernel's receive buffer, of fixed size: if even reading cannot keep up, the kernel
drops new datagrams and `/status` reports them as `osc_kernel_drops`. Costly requests
(`/model`) and replies bigger than their request (`/status`) are limited per sender.
"""


from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence
from typing import cast

from pythonosc.osc_message import OscMessage

from server.live.controls import ControlError, Controls
from server.osc.namespace import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SEND_PORT, TABLE, Position, Request
from server.osc.output import Endpoint, OscOutput
from server.osc.ratelimit import TokenBuckets
from server.osc.table import AddressTable
from server.osc.udp import Address, BatchDatagramTransport, bind_udp
from server.osc.wire import bundle_messages, is_bundle, message_problem, peek_address

MAX_RUN = 32  # positions in a row applied one by one (~2 ms of model work); more means we are behind
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

logger = logging.getLogger(__name__)

_MAX_ALLOW_CACHE = 4096
_LOGGED_ERRORS = 10  # internal errors logged in full before only every 1000th is


class OscServerProtocol(asyncio.DatagramProtocol):
    """Turns datagrams into `Controls` calls through the address table; never lets an error escape.

    Reads batches from `server.udpbatch` (`datagrams_received`) and applies the flood
    policy described in the module docstring; a single datagram, as asyncio's own
    transport delivers it, is a batch of one.
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
    ) -> None:
        if max_run < 1:
            raise ValueError("max_run must be >= 1")
        self.controls = controls
        self.output = output
        self.stats = output.stats
        self.transport: asyncio.DatagramTransport | None = None
        self._lookup = table.lookup
        self._unknown = f"unknown address; expected one of {' '.join(table.paths)}"
        self._allow = tuple(allow)
        self._allowed: dict[str, bool] = {}  # host -> verdict, so the check is one dict hit
        self._error_limit = TokenBuckets(error_rate, error_burst)
        self._limits = {a.path: TokenBuckets(a.max_rate, a.max_rate) for a in table if a.max_rate is not None}
        self._max_run = max_run
        self._run: list[tuple[Position, str, Endpoint]] = []  # checked positions not yet applied
        self._counters = self.counters

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.output.attach(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.warning("OSC socket closed: %s", exc)

    def error_received(self, exc: Exception) -> None:
        # On an unconnected UDP socket this is an ICMP report about an earlier send.
        self.output.send_failed(exc)

    def counters(self) -> dict[str, int | None]:
        """The transport's part of `/status`: counters, kernel drops (None if unknown) and destinations."""
        items: dict[str, int | None] = dict(self.stats.as_dict())
        transport = self.transport
        items["kernel_drops"] = transport.kernel_drops() if isinstance(transport, BatchDatagramTransport) else None
        items["destinations"] = len(self.output.destinations)
        return items

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.datagrams_received([(data, addr)])

    def datagrams_received(self, batch: Sequence[tuple[bytes, Address]]) -> None:
        """Apply a batch in arrival order; a long run of performer positions collapses to its newest."""
        if len(batch) > self.stats.batch_max:
            self.stats.batch_max = len(batch)
        for data, addr in batch:
            try:
                self._datagram(data, addr)
            except Exception:  # last line of defence: the loop must keep serving
                self._internal_error("?", (addr[0], addr[1]))
        self._flush()

    def _datagram(self, data: bytes, addr: Address) -> None:
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
        if not spec.performer:
            self._flush()  # positions that came first reach the engine first
            limit = self._limits.get(path)
            if limit is not None and not limit.allow(sender):
                self.stats.rate_limited += 1
                self._reject(path, f"too many requests: at most {spec.max_rate:g} per second", sender)
                return
        try:
            position = spec.invoke(Request(self.controls, self.output, self.stats, sender, self._counters), message.params)
        except ControlError as exc:
            self._reject(path, str(exc) or "refused", sender)
        except Exception:
            self._internal_error(path, sender)
        else:
            if position is None:
                self.stats.handled += 1
            else:
                self._run.append((position, path, sender))

    def _flush(self) -> None:
        """Hand the pending run of positions to the engine: all of it, or only the newest if too long."""
        run = self._run
        if not run:
            return
        stats = self.stats
        if len(run) > self._max_run:
            skipped = len(run) - 1
            stats.coalesced += skipped
            stats.handled += skipped
            del run[:-1]
        try:
            for (x, y), path, sender in run:
                try:
                    self.controls.perform(x, y)
                except ControlError as exc:
                    self._reject(path, str(exc) or "refused", sender)
                except Exception:
                    self._internal_error(path, sender)
                else:
                    stats.handled += 1
        finally:
            run.clear()

    def _internal_error(self, path: str, sender: Endpoint) -> None:
        self.stats.internal_errors += 1
        count = self.stats.internal_errors
        if count <= _LOGGED_ERRORS or count % 1000 == 0:  # a broken engine must not flood the log
            logger.exception("internal error handling %s from %s (#%d)", path, sender, count)
        self._reply_error(path, "internal error", sender)

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
    taken or a destination cannot be resolved. Logs a warning if the socket is reachable
    from other machines (see `exposure_warning`). Close with `transport.close()`.

    Event loops without `add_reader` (Windows' default) get asyncio's own transport:
    one datagram per batch, so input is never coalesced there.
    """
    loop = asyncio.get_running_loop()
    output = OscOutput()
    protocol = OscServerProtocol(controls, output, allow=allow)
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


def exposure_warning(sockname: Address, allow: Sequence[Network] = ()) -> str | None:
    """Why listening on `sockname` (the bound address) deserves a warning, or None for loopback.

    Judged from the address actually bound, so a host name or `0.0.0.0` is seen for
    what it is.
    """
    host = str(sockname[0]).split("%", 1)[0]
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip is not None and ip.is_loopback:
        return None
    where = "every interface" if ip is not None and ip.is_unspecified else host
    if allow:
        return (f"OSC is listening on {where}, not only this machine; "
                f"accepting senders in {', '.join(map(str, allow))} only")
    return (f"OSC is listening on {where}, not only this machine: anyone who can reach it can play "
            "and steer the server; limit senders with --allow CIDR")


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
