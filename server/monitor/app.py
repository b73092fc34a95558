"""The monitor's web side: an aiohttp app serving the page and a WebSocket per browser.

Every request must name an allowed Host, and a WebSocket's Origin must be the page's
own (`access`: the defence against DNS rebinding and other sites' pages). Beyond
loopback the page and the WebSocket also need the run's token (`?token=...`, printed
at start; the page hands it on to its WebSocket): other machines can reach the port,
and only the one who started the monitor has the URL. Each
WebSocket has a bounded send queue: when a browser is slow or gone, messages to it
are dropped, never waited for. What a browser sends is taken at most
`CONTROLS_PER_SECOND` times a second per connection, then checked by the server's own
rules (`controls.validate`) before it becomes OSC; anything refused, malformed JSON
included, is answered with an error message, and the connection goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from server.live.controls import ControlError
from server.live.modes import MODE_NAMES
from server.model.files import all_models
from server.monitor import DEFAULT_HOST
from server.monitor.access import (TOKEN_PARAMETER, HostPort, allowed_hosts, host_allowed, is_wildcard, origin_allowed,
                                   run_token, token_allowed)
from server.monitor.bridge import Bridge
from server.monitor.controls import CONTROLS, validate
from server.osc.ratelimit import TokenBuckets

STATIC = Path(__file__).resolve().parent / "static"
QUEUE_SIZE = 256
MODELS_REFRESH_S = 5.0
CONTROLS_PER_SECOND = 50.0  # per WebSocket, after a burst of as many: a slider sends 10 a second
MAX_MESSAGE = 4096  # bytes in one browser message; a control is tens
CLOSE_S = 1.0  # at shutdown, how long the pages may take to take the close (a frozen one never does); the stop takes ~3x this
CSP = "default-src 'self'; img-src 'self' data:; connect-src 'self'; style-src 'self'; script-src 'self'"


class Client:
    """One browser WebSocket and its bounded outgoing queue."""

    def __init__(self, ws: web.WebSocketResponse, clock: Callable[[], float] = time.monotonic) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        self.dropped = 0
        self.controls = TokenBuckets(CONTROLS_PER_SECOND, CONTROLS_PER_SECOND, max_keys=1, clock=clock)

    def offer(self, text: str) -> None:
        """Queue a message, or drop it when the queue is full."""
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.dropped += 1

    async def pump(self) -> None:
        """Send queued messages until the socket closes."""
        while not self.ws.closed:
            text = await self.queue.get()
            try:
                await asyncio.wait_for(self.ws.send_str(text), 5.0)
            except (ConnectionError, asyncio.TimeoutError, RuntimeError):
                await self.ws.close()
                return


class Monitor:
    """The bridge, the connected browsers and the HTTP routes."""

    def __init__(self, server: tuple[str, int], models_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.models_dir = models_dir
        self.clock = clock
        self.clients: set[Client] = set()
        self.bridge = Bridge(server, self.publish)
        self.latest: dict[str, str] = {}  # last message of each kind, replayed to a new browser
        self.hosts: frozenset[HostPort] = frozenset()  # what a request's Host may say; none until `listen`
        self.token: str | None = None  # the run's token, needed beyond loopback (see `listen`)
        self.publish({"type": "modes", "names": list(MODE_NAMES)})

    def listen(self, port: int, binds: Iterable[str], extra_hosts: Iterable[str] = ()) -> None:
        """Allow requests that name the monitor at `port` (see `access.allowed_hosts`), with this run's token
        when any of `binds` is beyond loopback (`access.run_token`)."""
        binds = tuple(binds)
        self.hosts = allowed_hosts(port, binds, extra_hosts)
        self.token = run_token(binds)

    def url(self, host: str, port: int) -> str:
        """The page's address at `host:port`, with the token when one is needed."""
        return f"http://{host}:{port}/" + ("" if self.token is None else f"?{TOKEN_PARAMETER}={self.token}")

    def publish(self, message: dict[str, Any]) -> None:
        text = json.dumps(message, separators=(",", ":"), allow_nan=False)
        if message["type"] in ("status", "mixture", "server", "models", "modes"):
            self.latest[message["type"]] = text
        for client in self.clients:
            client.offer(text)

    def publish_models(self) -> None:
        self.publish({"type": "models", "names": all_models(self.models_dir)})

    async def refresh_models(self) -> None:
        while True:
            self.publish_models()
            await asyncio.sleep(MODELS_REFRESH_S)

    async def index(self, request: web.Request) -> web.StreamResponse:
        self._check_token(request)
        return web.FileResponse(STATIC / "index.html", headers=_headers())

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if not origin_allowed(request.headers.get("Origin"), self.hosts):
            raise web.HTTPForbidden(text="cross-origin WebSocket refused")
        self._check_token(request)
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_MESSAGE, timeout=CLOSE_S)
        await ws.prepare(request)
        client = Client(ws, self.clock)
        for text in self.latest.values():
            client.offer(text)
        self.clients.add(client)
        pump = asyncio.create_task(client.pump())
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                self._control(client, msg.data)
        finally:
            self.clients.discard(client)
            pump.cancel()
        return ws

    def _check_token(self, request: web.Request) -> None:
        if not token_allowed(request.query.get(TOKEN_PARAMETER), self.token):
            raise web.HTTPForbidden(text="this monitor listens beyond loopback: open the address it printed at start, "
                                         "with its ?token=", headers=_headers())

    def _control(self, client: Client, data: str) -> None:
        if not client.controls.allow(None):
            _refuse(client, "monitor", f"too many controls: at most {CONTROLS_PER_SECOND:g} a second")
            return
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):  # not JSON, a number of too many digits, or nested too deep
            _refuse(client, "monitor", "a control is a JSON object")
            return
        try:
            address, args = validate(message, self.models_dir)
        except ControlError as e:
            said = message.get("address") if isinstance(message, dict) else None
            _refuse(client, said if isinstance(said, str) and said in CONTROLS else "monitor", str(e))
            return
        self.bridge.send(address, args)
        if address == "/mode" or address == "/pause" or address == "/model":
            self.bridge.send("/status")  # see the change at once
            self.bridge.polls_outstanding += 1

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        """Refuse every request, WebSocket upgrades included, whose Host is not the monitor's (DNS rebinding)."""
        if not host_allowed(request.headers.get("Host"), self.hosts):
            raise web.HTTPForbidden(text="unknown Host; run the monitor with --allow-host NAME to be reached by NAME")
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self.index)
        app.router.add_get("/ws", self.websocket)
        app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        app.on_response_prepare.append(_security_headers)
        return app


def _refuse(client: Client, address: str, reason: str) -> None:
    client.offer(json.dumps({"type": "error", "address": address, "reason": reason}))


def _headers() -> dict[str, str]:
    return {"Cache-Control": "no-store"}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"


async def close_pages(clients: Iterable[Client]) -> None:
    """Tell every page we are going, all at once and for at most CLOSE_S in all.

    A page that stopped reading (a frozen tab, a laptop shut) fills its socket, and writing
    the close frame to it waits for room that never comes: unbounded, it held the stop forever.
    """
    closing = [asyncio.ensure_future(client.ws.close()) for client in list(clients)]
    if not closing:
        return
    _, stuck = await asyncio.wait(closing, timeout=CLOSE_S)
    for task in stuck:
        task.cancel()  # the runner's cleanup drops its connection
    await asyncio.gather(*stuck, return_exceptions=True)


async def serve(host: str, port: int, server: tuple[str, int], models_dir: Path,
                allow_hosts: Iterable[str] = ()) -> None:
    """Run the monitor until SIGINT or SIGTERM; prints `monitor: http://HOST:PORT/` when ready.

    Requests must name the monitor by a loopback name, by `host` unless it is a
    wildcard, or by one of `allow_hosts` (with the port bound). Beyond loopback the
    printed address carries the run's token, which the page and the WebSocket need.
    """
    allow_hosts = tuple(allow_hosts)
    monitor = Monitor(server, models_dir)
    await monitor.bridge.start()
    runner = web.AppRunner(monitor.app(), access_log=None, handle_signals=False, shutdown_timeout=CLOSE_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    monitor.listen(bound[1], (host, bound[0]), allow_hosts)
    shown = DEFAULT_HOST if is_wildcard(host) else f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"monitor: {monitor.url(shown, bound[1])} (server {server[0]}:{server[1]})", flush=True)
    if monitor.token is not None:
        others = " ".join(monitor.url(name, bound[1]) for name in allow_hosts)
        print("monitor: listening beyond loopback, so a browser needs this run's token, in the address above"
              + (f"; from another device: {others}" if others else ""), flush=True)
    if is_wildcard(host) and not allow_hosts:
        print("monitor: listening on every interface, but only loopback names are allowed; "
              "name this machine with --allow-host NAME (or its address) for other devices", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    bridge = monitor.bridge
    tasks = [asyncio.create_task(t) for t in (bridge.read(), bridge.keepalive(), bridge.poll_status(),
                                              monitor.refresh_models())]
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await close_pages(monitor.clients)
        await runner.cleanup()
        bridge.close()
