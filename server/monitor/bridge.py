"""The monitor's OSC side: one UDP socket that subscribes to a server's streams and
turns what comes back into JSON-ready dicts for the browser.

Keep-alive: `/subscribe` to every stream the server has (`server.osc.namespace.STREAMS`)
every few seconds (the server may restart); the subscribed streams are rate-capped, so
a busy stage costs the monitor little and the monitor costs the stage little. Where
`/subscribe` is refused (an older server), it says `/hello` for predictions and polls
`/status` as often as the status stream would push it.

Reading: the socket is drained once per display frame (`READ_PERIOD_S`), not on each
datagram, so the monitor wakes `STREAM_RATE` times a second (the frames a display
draws, and the most any stream sends) whatever the server sends, and the server's
sends to it wake nobody: on a two-core machine a process that wakes for every stream
message steals the core the server is about to answer on.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from typing import Any, Callable

from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import BuildError, OscMessageBuilder

from server.live.streams import STREAM_RATE
from server.model.dims import MAX_VALUES, MIN_VALUES
from server.osc.namespace import STATUS_PUSH_HZ
from server.osc.namespace import STREAMS as SERVER_STREAMS

STREAMS = tuple(SERVER_STREAMS)
KEEPALIVE_S = 5.0
POLL_S = 1 / STATUS_PUSH_HZ  # polled as often as the status stream would push
PUSH_STALE_S = 1.0
CONNECTED_S = 2.5
READ_PERIOD_S = 1 / STREAM_RATE  # one read of everything that came, per frame the page can draw
RECEIVE_BUFFER = 1 << 20  # a frame's worth of every stream, with room to spare
FLOAT32_RANGE = (1.1754943508222875e-38, 3.4028234663852886e38)  # normal magnitudes OSC `f` carries

Publish = Callable[[dict[str, Any]], None]


def parse_server(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def encode(address: str, args: list[Any]) -> bytes:
    """One OSC message as bytes: floats as float32 (float64 where float32 would overflow or lose them to
    zero; the server takes both), ints as int32 (int64 when wider), strings as strings."""
    b = OscMessageBuilder(address)
    for a in args:
        wide = type(a) is float and a != 0.0 and not FLOAT32_RANGE[0] <= abs(a) <= FLOAT32_RANGE[1]
        b.add_arg(a, OscMessageBuilder.ARG_TYPE_DOUBLE if wide else None)
    return b.build().dgram


def _finite(values: list[Any]) -> list[float] | None:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _values_and_voice(args: list[Any]) -> tuple[list[float], int | None] | None:
    """An event's N values (the leading floats, N from 1 to 16, all finite) and the voice number after them
    (with voices per-sender: the one int that ends the message), else None. The server sends values as float32 and
    a voice as int32, so the types tell them apart at any N; anything else after the values is not ours to read."""
    n = 0
    while n < len(args) and type(args[n]) is float:
        n += 1
    values = _finite(args[:n]) if MIN_VALUES <= n <= MAX_VALUES else None
    if values is None:
        return None
    rest = args[n:]
    voice = rest[0] if len(rest) == 1 and type(rest[0]) is int and 0 <= rest[0] < 1000 else None
    return values, voice


def _mixture(args: list[Any]) -> dict[str, Any] | None:
    """`K w_1 .. w_K`, then per component `dt_median v1_mean .. vN_mean dt_log_sigma v1_sigma .. vN_sigma`
    (2 + 2N figures: N follows from K and the length), then with voices per-sender the voice number: an int32
    where every figure is a float32, so a figure short never reads as a voice on a narrower mixture."""
    if len(args) > 1 and type(args[-1]) is int:
        args = args[:-1]
    values = _finite(args)
    if values is None or not values[0].is_integer() or values[0] < 1:
        return None
    k = int(values[0])
    figures = len(values) - 1 - k
    width = figures // k if figures > 0 and figures % k == 0 else 0
    n = (width - 2) // 2
    if width % 2 or not MIN_VALUES <= n <= MAX_VALUES:
        return None
    rows = [values[1 + k + width * i: 1 + k + width * (i + 1)] for i in range(k)]
    comps = [{"dt": c[0], "means": c[1:1 + n], "dt_sigma": c[1 + n], "sigmas": c[2 + n:]} for c in rows]
    return {"type": "mixture", "dims": n, "weights": values[1:1 + k], "components": comps}


def decode(address: str, args: list[Any]) -> dict[str, Any] | None:
    """A browser message for one OSC message from the server, or None when it is not one we show."""
    if address == "/prediction" or address == "/performer":
        event = _values_and_voice(args)
        return None if event is None else {"type": address[1:], "values": event[0], "voice": event[1]}
    if address == "/surprise" and len(args) >= 2:
        v = _finite(args[:2])
        return None if v is None else {"type": "surprise", "nll": v[0], "smoothed": v[1]}
    if address == "/mixture" and args:
        return _mixture(args)
    if address == "/model/dims" and len(args) == 1 and type(args[0]) is int and MIN_VALUES <= args[0] <= MAX_VALUES:
        return {"type": "dims", "dims": args[0]}
    if address == "/status":
        pairs = {str(k): v for k, v in zip(args[::2], args[1::2])}
        return {"type": "status", "values": pairs}
    if address == "/error":
        return {"type": "error", "address": str(args[0]) if args else "", "reason": " ".join(map(str, args[1:]))}
    if address == "/learn/progress" or address == "/learn/done":
        return {"type": "learn", "address": address, "args": [a if isinstance(a, (int, float, str)) else str(a) for a in args]}
    return None


class Bridge:
    """Talks to one Antiphon server; `publish` receives each decoded message."""

    def __init__(self, server: tuple[str, int], publish: Publish) -> None:
        self.server = server
        self.publish = publish
        self.sock: socket.socket | None = None
        self.server_ips: set[str] = set()
        self.last_heard = 0.0
        self.last_push = 0.0
        self.polls_outstanding = 0
        self.subscribe_refused = False

    async def start(self, bind_host: str = "0.0.0.0") -> None:
        """Resolve the server and bind the socket: on loopback for a server on this machine, else on `bind_host`
        (every interface by default: a socket bound to 127.0.0.1 cannot send beyond this machine)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.server[0], self.server[1], type=socket.SOCK_DGRAM, family=socket.AF_INET)
        if not infos:
            raise OSError(f"cannot resolve {self.server[0]}")
        self.server_ips = {info[4][0] for info in infos}
        self.server = (infos[0][4][0], self.server[1])
        local = bind_host if not self.server[0].startswith("127.") else "127.0.0.1"
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((local, 0))
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, address: str, args: list[Any] | None = None) -> None:
        """Send one message to the server; never blocks, never raises."""
        if self.sock is not None:
            try:
                self.sock.sendto(encode(address, args or []), self.server)
            except (OSError, ValueError, BuildError):  # BuildError: a value OSC cannot carry (validate refuses them)
                pass

    async def read(self) -> None:
        """Drain the socket once per frame (see the module doc)."""
        while True:
            await asyncio.sleep(READ_PERIOD_S)
            self.read_now()

    def read_now(self, most: int = 4096) -> int:
        """Handle every datagram waiting (up to `most`); returns how many."""
        count = 0
        while self.sock is not None and count < most:
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # an ICMP report (the server is down): the next read goes on
                continue
            count += 1
            self.datagram_received(data, addr)
        return count

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] not in self.server_ips or addr[1] != self.server[1]:
            return
        try:
            msg = OscMessage(data)
        except Exception:  # a bundle or garbage: the server sends plain messages to monitors
            return
        now = time.monotonic()
        self.last_heard = now
        if msg.address == "/status":
            if self.polls_outstanding > 0:
                self.polls_outstanding -= 1
            else:
                self.last_push = now
        params = list(msg.params)
        if msg.address == "/error" and params and params[0] == "/subscribe":
            self.subscribe_refused = True
        out = decode(msg.address, params)
        if out is not None:
            self.publish(out)

    def connected(self) -> bool:
        return time.monotonic() - self.last_heard < CONNECTED_S

    async def keepalive(self) -> None:
        """Subscribe now and every KEEPALIVE_S seconds (say hello instead to a server without streams)."""
        while True:
            for stream in STREAMS:
                self.send("/subscribe", [stream])
            if self.subscribe_refused:
                self.send("/hello")
            self.publish({"type": "server", "connected": self.connected(), "address": f"{self.server[0]}:{self.server[1]}"})
            await asyncio.sleep(KEEPALIVE_S)

    async def poll_status(self) -> None:
        """Poll `/status` every POLL_S while no pushed status arrives."""
        while True:
            await asyncio.sleep(POLL_S)
            if time.monotonic() - self.last_push > PUSH_STALE_S:
                if self.polls_outstanding > 8:  # replies lost (server down): start counting afresh
                    self.polls_outstanding = 0
                self.polls_outstanding += 1
                self.send("/status")
