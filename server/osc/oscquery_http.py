"""`run --oscquery PORT`: the OSCQuery tree over HTTP, served on the server's own event loop.

On the loop, not in a thread: a request costs the loop a `/status` read and, only when
a value changed, encoding the answer (`Namespace`; a whole tree ~0.13 ms, one VALUE
~20 us), where a thread doing the same would hold the GIL for up to its 5 ms switch
interval while a note waits to leave. OSCQuery clients read the tree once and then a
value now and then, so there is no stream to bound.

It listens where OSC does (`--host`, loopback by default) and answers only the senders
`--allow` lets play. On loopback it also refuses a request whose Host is not a loopback
name: a web page whose name was pointed at 127.0.0.1 (DNS rebinding) cannot read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from aiohttp import web

from server.osc.allow import AllowList, Network, is_loopback
from server.osc.oscquery import Namespace, host_info
from server.osc.table import AddressTable

_HOST_HEADER = re.compile(r"\[(?P<v6>[^\]]+)\](?::\d+)?|(?P<name>[^:]+)(?::\d+)?")


def loopback_host(header: str | None) -> bool:
    """Whether a Host header names this machine (localhost or a loopback address, any port)."""
    match = _HOST_HEADER.fullmatch(header or "")
    if match is None:
        return False
    name = (match["v6"] or match["name"]).lower()
    return name == "localhost" or is_loopback(name)


class OscQueryServer:
    """The running HTTP server: where it listens, and how to stop it."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    async def close(self) -> None:
        await self._runner.cleanup()


def oscquery_app(table: AddressTable, values: Callable[[], Mapping[str, object]], osc_port: int,
                 allow: Sequence[Network] = (), loopback_only: bool = True) -> web.Application:
    """The aiohttp app: every GET is an OSC path (and an optional attribute query), answered per the proposal."""
    allowed = AllowList(allow)
    namespace = Namespace(table, host_info(osc_port))

    async def handle(request: web.Request) -> web.StreamResponse:
        if allowed and not allowed.allows(request.remote or ""):
            return web.Response(status=403, text="not in --allow\n")
        if loopback_only and not loopback_host(request.host):
            return web.Response(status=403, text="ask for this server by a loopback name (localhost, 127.0.0.1)\n")
        status, body = namespace.answer(request.path, request.query_string, values)
        return web.Response(status=status, body=body, content_type="application/json" if body is not None else None)

    app = web.Application()
    app.router.add_get("/{path:.*}", handle)
    return app


async def start_oscquery(host: str, port: int, table: AddressTable, values: Callable[[], Mapping[str, object]],
                         osc_port: int, allow: Sequence[Network] = ()) -> OscQueryServer:
    """Listen on host:port (0: any free port) on the running loop; OSError when the port is taken."""
    app = oscquery_app(table, values, osc_port, allow, loopback_only=is_loopback(host) or host == "localhost")
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    return OscQueryServer(runner, str(bound[0]), int(bound[1]))
