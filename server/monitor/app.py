"""The monitor's web side: an aiohttp app serving the page and a WebSocket per browser.

Each WebSocket has a bounded send queue: when a browser is slow or gone, messages to
it are dropped, never waited for. Browser messages are validated (`controls.validate`)
before they become OSC to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from server.model.files import available_models
from server.monitor.bridge import Bridge
from server.monitor.controls import ControlError, validate

STATIC = Path(__file__).resolve().parent / "static"
QUEUE_SIZE = 256
MODELS_REFRESH_S = 5.0
CSP = "default-src 'self'; img-src 'self' data:; connect-src 'self'; style-src 'self'; script-src 'self'"


class Client:
    """One browser WebSocket and its bounded outgoing queue."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        self.dropped = 0

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

    def __init__(self, server: tuple[str, int], models_dir: Path) -> None:
        self.models_dir = models_dir
        self.clients: set[Client] = set()
        self.bridge = Bridge(server, self.publish)
        self.latest: dict[str, str] = {}  # last message of each kind, replayed to a new browser

    def publish(self, message: dict[str, Any]) -> None:
        text = json.dumps(message, separators=(",", ":"), allow_nan=False)
        if message["type"] in ("status", "mixture", "server", "models"):
            self.latest[message["type"]] = text
        for client in self.clients:
            client.offer(text)

    def publish_models(self) -> None:
        self.publish({"type": "models", "names": available_models(self.models_dir)})

    async def refresh_models(self) -> None:
        while True:
            self.publish_models()
            await asyncio.sleep(MODELS_REFRESH_S)

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers=_headers())

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            raise web.HTTPForbidden(text="cross-origin WebSocket refused")
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4096)
        await ws.prepare(request)
        client = Client(ws)
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

    def _control(self, client: Client, data: str) -> None:
        try:
            address, args = validate(json.loads(data), self.models_dir)
        except (ControlError, ValueError) as e:
            client.offer(json.dumps({"type": "error", "address": "monitor", "reason": str(e)}))
            return
        self.bridge.send(address, args)
        if address == "/mode" or address == "/pause" or address == "/model":
            self.bridge.send("/status")  # see the change at once
            self.bridge.polls_outstanding += 1

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/ws", self.websocket)
        app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        app.on_response_prepare.append(_security_headers)
        return app


def _headers() -> dict[str, str]:
    return {"Cache-Control": "no-store"}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"


async def serve(host: str, port: int, server: tuple[str, int], models_dir: Path) -> None:
    """Run the monitor until SIGINT or SIGTERM; prints `monitor: http://HOST:PORT/` when ready."""
    monitor = Monitor(server, models_dir)
    await monitor.bridge.start()
    runner = web.AppRunner(monitor.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"monitor: http://{shown}:{bound[1]}/ (server {server[0]}:{server[1]})", flush=True)
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
        for client in list(monitor.clients):
            await client.ws.close()
        await runner.cleanup()
        bridge.close()
