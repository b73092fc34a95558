"""The web monitor (`python -m server monitor`): its own process, a real server, a real browser.

- Validation: only the control addresses become OSC, checked by the server's own
  handlers and limits (the same reasons as the server's `/error`); no browser needed.
- HTTP and WebSocket on loopback (aiohttp's test server, the monitor's own app): a Host
  not on the allow-list is refused (DNS rebinding), a WebSocket from another Origin is
  refused, malformed JSON is answered with an error and the connection goes on, and
  controls are rate-limited per connection, at the limit's edge, on a frozen clock.
  Beyond loopback (bound to 0.0.0.0, or this machine's own address) the page and the
  WebSocket need the run's token, and only the right one opens them; on loopback none
  is needed. Hypothesis sends any JSON as a control: an error reply or valid OSC, never
  a traceback, and the connection goes on.
- In headless Chromium (Debian's, driven by Playwright): the page loads with no console
  errors and shows the server's status; gestures sent to the server change the canvas
  (the model's trail and the predicted density); the mode select and the temperature
  slider change the server (seen in its /status); killing the monitor leaves the server
  answering gestures.

Browser tests skip with the reason when Playwright or Chromium is missing, except under
CI (env CI set), where they fail: CI installs chromium from .ci/apt-packages.txt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pythonosc.osc_message import OscMessage

from live import REPO, OscPeer, start_server
from server.live.controls import ControlError
from server.live.learning import MAX_SECONDS
from server.live.modes import MODE_NAMES
from server.monitor.access import allowed_hosts, host_allowed, is_loopback, origin_allowed, run_token, token_allowed
from server.monitor.app import CONTROLS_PER_SECOND, MAX_MESSAGE, Monitor
from server.monitor.bridge import encode
from server.monitor.controls import CONTROLS, validate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--no-proxy-server"]
MODELS = REPO / "models"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("message, expected", [
    ({"address": "/mode", "args": ["generate"]}, ("/mode", ["generate"])),
    ({"address": "/temperature", "args": [0.5]}, ("/temperature", [0.5])),
    ({"address": "/temperature", "args": [50]}, ("/temperature", [50.0])),  # the server has no upper limit
    ({"address": "/temperature", "args": [0.5, 1]}, ("/temperature", [0.5, 1])),  # one voice's, as over OSC
    ({"address": "/sigma_temperature", "args": [0]}, ("/sigma_temperature", [0.0])),
    ({"address": "/timescale", "args": [0.01]}, ("/timescale", [0.01])),
    ({"address": "/timescale", "args": [1e9]}, ("/timescale", [1e9])),  # no cap the server does not have
    ({"address": "/timescale", "args": [1e-6]}, ("/timescale", [1e-6])),
    ({"address": "/pause", "args": [1]}, ("/pause", [1])),
    ({"address": "/pause", "args": [0.0]}, ("/pause", [0])),  # an integral float is an int, as from Pd
    ({"address": "/reset"}, ("/reset", [])),
    ({"address": "/model", "args": ["default"]}, ("/model", ["default"])),
    ({"address": "/learn", "args": []}, ("/learn", [])),
    ({"address": "/learn", "args": [30]}, ("/learn", [30.0])),
    ({"address": "/learn", "args": [MAX_SECONDS]}, ("/learn", [MAX_SECONDS])),
    ({"address": "/learn", "args": [0.5]}, ("/learn", [0.5])),
    ({"address": "/learn/stop", "args": []}, ("/learn/stop", [])),
])
def test_valid_controls_become_osc(message, expected):
    assert validate(message, MODELS) == expected


@pytest.mark.parametrize("message", [
    None, [], "x", {"address": "/gesture", "args": [0.5, 0.5]}, {"address": "/hello", "args": []},
    {"address": ["/mode"]}, {"address": "/mode", "args": ["dance"]}, {"address": "/mode", "args": []},
    {"address": "/temperature", "args": ["1"]}, {"address": "/temperature", "args": [-1]},
    {"address": "/temperature", "args": [float("nan")]}, {"address": "/temperature", "args": [float("inf")]},
    {"address": "/temperature", "args": [True]}, {"address": "/pause", "args": [False]},
    {"address": "/temperature", "args": [None]}, {"address": "/temperature", "args": [[1.0]]},
    {"address": "/temperature", "args": [10 ** 400]}, {"address": "/temperature", "args": [1 << 63]},
    {"address": "/timescale", "args": [0]}, {"address": "/timescale", "args": [-1e-9]},
    {"address": "/pause", "args": [2]}, {"address": "/pause", "args": [0.5]}, {"address": "/reset", "args": [0.5]},
    {"address": "/model", "args": ["../etc"]}, {"address": "/model", "args": ["no-such-model"]},
    {"address": "/learn", "args": [0]}, {"address": "/learn", "args": [MAX_SECONDS + 0.001]},
    {"address": "/temperature", "args": [1, 2, 3]}, {"address": "/reset", "args": "x"},
    {"address": "/sigma_temperature", "args": [0.0, 1e300]},  # a float the server makes an int too wide for OSC
])
def test_invalid_controls_are_refused(message):
    with pytest.raises(ControlError):
        validate(message, MODELS)


@pytest.mark.parametrize("address, args", [
    ("/temperature", [-1.0]), ("/timescale", [0.0]), ("/mode", ["dance"]), ("/pause", [2]),
    ("/learn", [MAX_SECONDS + 1]), ("/temperature", [1.0, 2.0, 3.0]), ("/model", ["../etc"]),
])
def test_the_monitor_refuses_with_the_servers_own_reason(server, peer, address, args):
    """One rule, one home: the monitor's reason is word for word the running server's `/error` for the same OSC."""
    with pytest.raises(ControlError) as refused:
        validate({"address": address, "args": args}, MODELS)
    peer.drain(0.05)
    peer.send(address, *args)
    errors = peer.receive(3.0, "/error", count=1)
    assert errors and errors[0][2] == [address, str(refused.value)]


def test_monitor_imports_no_tensorflow_nor_learn():
    code = ("import sys, server.monitor.app; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras', 'tf_keras') or m.startswith('server.learn')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- HTTP and WebSocket on loopback


def test_the_allow_list_is_loopback_and_the_bound_host_unless_a_wildcard():
    assert allowed_hosts(5712) == {("127.0.0.1", 5712), ("localhost", 5712), ("[::1]", 5712)}
    assert allowed_hosts(5712, ["0.0.0.0"]) == allowed_hosts(5712, ["::", ""]) == allowed_hosts(5712)
    assert {("studio.local", 5712), ("192.168.1.5", 5712)} < allowed_hosts(5712, ["studio.local", "192.168.1.5"])
    assert ("studio.local", 80) in allowed_hosts(80, ["0.0.0.0"], ["Studio.Local"])
    hosts = allowed_hosts(5712)
    assert host_allowed("LOCALHOST:5712", hosts) and host_allowed("[0:0::1]:5712", hosts)
    for bad in (None, "", "127.0.0.1", "127.0.0.1:5713", "evil.example:5712", "x@127.0.0.1:5712", "127.1:5712"):
        assert not host_allowed(bad, hosts), bad
    assert host_allowed("studio.local", allowed_hosts(80, ["0.0.0.0"], ["studio.local"]))  # port 80 goes unsaid
    assert origin_allowed(None, hosts) and origin_allowed("http://localhost:5712", hosts)
    for bad in ("null", "https://127.0.0.1:5712", "http://evil.example:5712", "http://127.0.0.1:5713", "file://"):
        assert not origin_allowed(bad, hosts), bad


class Clock:
    """A clock that moves only when told: the rate limit's edge, exactly."""

    def __init__(self) -> None:
        self.now = 0.0  # from 0, so 1/50 s later is exactly 0.02 (no rounding at the edge)

    def __call__(self) -> float:
        return self.now


class Served:
    """A Monitor's own app on a real loopback HTTP port; what its bridge would send to the server is recorded."""

    def __init__(self, monitor: Monitor, http: TestServer, session: aiohttp.ClientSession, clock: Clock) -> None:
        self.monitor, self.http, self.session, self.clock = monitor, http, session, clock
        self.sent: list[tuple[str, list]] = []
        monitor.bridge.send = lambda address, args=None: self.sent.append((address, list(args or [])))
        self.port = http.port
        self.url = f"http://127.0.0.1:{http.port}"

    def headers(self, host: str | None = None, origin: str | None = None) -> dict[str, str]:
        out = {"Host": host or f"127.0.0.1:{self.port}"}
        if origin is not None:
            out["Origin"] = origin
        return out

    async def page(self, path: str = "/", token: str | None = None, **kw: str) -> int:
        params = {} if token is None else {"token": token}
        async with self.session.get(self.url + path, params=params, headers=self.headers(**kw)) as r:
            return r.status

    async def ws(self, token: str | None = None, **kw: str) -> aiohttp.ClientWebSocketResponse:
        params = {} if token is None else {"token": token}
        return await self.session.ws_connect(self.url + "/ws", params=params, headers=self.headers(**kw))


@contextlib.asynccontextmanager
async def served(bind: str = "127.0.0.1", extra: tuple[str, ...] = (), listen: bool = False) -> AsyncIterator[Served]:
    """The monitor's app on a free port of 127.0.0.1 (`listen`: really bound to `bind`, e.g. 0.0.0.0), told it
    was bound to `bind`; requests go to 127.0.0.1, a loopback name the allow-list always has."""
    clock = Clock()
    monitor = Monitor(("127.0.0.1", 9), MODELS, clock=clock)
    http = TestServer(monitor.app(), host=bind if listen else "127.0.0.1", port=0)
    await http.start_server()
    monitor.listen(http.port, [bind], extra)
    try:
        async with aiohttp.ClientSession() as session:
            yield Served(monitor, http, session, clock)
    finally:
        await http.close()


def in_a_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on a thread of its own, so it may run an event loop while Playwright's runs on this one."""
    out: list[Any] = []
    failed: list[BaseException] = []

    def body() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return out[0]


async def reply(ws: aiohttp.ClientWebSocketResponse, kind: str = "error", seconds: float = 3.0) -> dict:
    """The next message of type `kind` (others skipped); fails if the socket closes or none comes in time."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), seconds)
        assert msg.type == aiohttp.WSMsgType.TEXT, f"the WebSocket ended: {msg}"
        data = json.loads(msg.data)
        if data["type"] == kind:
            return data


def test_an_allowed_host_and_origin_get_the_page_and_a_working_websocket():
    async def go():
        async with served() as s:
            for host in (f"127.0.0.1:{s.port}", f"localhost:{s.port}", f"[::1]:{s.port}"):
                assert await s.page(host=host) == 200, host
                assert await s.page("/static/monitor.js", host=host) == 200, host
                ws = await s.ws(host=host, origin=f"http://{host}")
                assert (await reply(ws, "modes"))["names"] == list(MODE_NAMES)  # the server's list, for the menu
                await ws.send_str(json.dumps({"address": "/temperature", "args": [0.5]}))
                await ws.send_str("{")  # an error reply marks that the control before it was handled
                await reply(ws)
                await ws.close()
            assert s.sent == [("/temperature", [0.5])] * 3
            ws = await s.ws()  # no Origin: not a browser, judged by its Host
            await ws.send_str(json.dumps({"address": "/mode", "args": ["listen"]}))
            await ws.send_str("{")
            await reply(ws)
            assert s.sent[-2:] == [("/mode", ["listen"]), ("/status", [])]

    asyncio.run(go())


def test_a_websocket_from_another_origin_is_refused():
    async def go():
        async with served() as s:
            for origin in ("http://evil.example", f"http://evil.example:{s.port}", f"https://127.0.0.1:{s.port}",
                           f"http://127.0.0.1:{s.port + 1}", "null"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await s.ws(origin=origin)
                assert refused.value.status == 403, origin
            assert s.sent == []

    asyncio.run(go())


def test_a_host_not_on_the_list_gets_403_on_the_page_and_the_websocket_even_with_a_matching_origin():
    async def go():
        async with served() as s:
            for host in (f"evil.example:{s.port}", f"127.0.0.1:{s.port + 1}", "127.0.0.1", f"127.1:{s.port}"):
                assert await s.page(host=host, origin=f"http://{host}") == 403, host
                assert await s.page("/static/monitor.js", host=host) == 403, host
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await s.ws(host=host, origin=f"http://{host}")
                assert refused.value.status == 403, host
            assert s.sent == []

    asyncio.run(go())


def test_a_wildcard_bind_allows_loopback_and_the_allow_host_names_only():
    async def go():
        async with served(bind="0.0.0.0", extra=("studio.local",)) as s:
            token = s.monitor.token
            assert await s.page(host=f"studio.local:{s.port}", token=token) == 200
            assert await s.page(host=f"localhost:{s.port}", token=token) == 200
            assert await s.page(host=f"0.0.0.0:{s.port}", token=token) == 403
            assert await s.page(host=f"tablet.local:{s.port}", token=token) == 403

    asyncio.run(go())


def this_machines_address() -> str | None:
    """An address of this machine beyond loopback (the one its default route leaves from), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, the kernel only picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if is_loopback(address) or address == "0.0.0.0" else address


def test_a_token_is_made_only_beyond_loopback():
    for bind in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(bind) and run_token([bind, "127.0.0.1"]) is None, bind
    for bind in ("0.0.0.0", "::", "", "192.168.1.5", "10.0.0.1", "studio.local", "fe80::1", "not a host"):
        assert not is_loopback(bind), bind
    tokens = {run_token(["127.0.0.1", "0.0.0.0"]) for _ in range(3)}  # one bind beyond loopback is enough
    assert len(tokens) == 3 and all(t and len(t) >= 43 and re.fullmatch(r"[A-Za-z0-9_-]+", t) for t in tokens)
    token = tokens.pop()
    assert token_allowed(token, token) and token_allowed(None, None) and token_allowed("anything", None)
    for wrong in (None, "", token[:-1], token + "x", token.upper() if token.upper() != token else token.lower(),
                  "\udcff" + token[1:], "é" * 43):
        assert not token_allowed(wrong, token), wrong


async def token_checks(s: Served) -> None:
    """Beyond loopback: the page and the WebSocket open with the run's token only; static files need none."""
    token = s.monitor.token
    assert token is not None and s.monitor.url("127.0.0.1", s.port).endswith(f"/?token={token}")
    for wrong in (None, "", token[:-1], token + "A", "x" * len(token)):
        assert await s.page(token=wrong) == 403, wrong
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws(token=wrong, origin=s.url)
        assert refused.value.status == 403, wrong
    assert s.sent == []
    assert await s.page("/static/monitor.js") == 200  # the page's code is no secret
    assert await s.page(token=token) == 200
    ws = await s.ws(token=token, origin=s.url)
    await ws.send_str(json.dumps({"address": "/temperature", "args": [0.5]}))
    await ws.send_str("{")
    await reply(ws)
    assert s.sent == [("/temperature", [0.5])]
    await ws.close()


def test_bound_to_every_interface_the_page_and_websocket_need_the_runs_token():
    async def go():
        async with served(bind="0.0.0.0", listen=True) as s:
            await token_checks(s)

    asyncio.run(go())


def test_bound_to_this_machines_own_address_the_token_is_needed_there():
    address = this_machines_address()
    if address is None:
        pytest.skip("this machine has no address beyond loopback")

    async def go():
        async with served(bind=address, listen=True) as s:
            s.url = f"http://{address}:{s.port}"
            s.headers = lambda host=None, origin=None: {"Host": host or f"{address}:{s.port}",
                                                        **({} if origin is None else {"Origin": origin})}
            await token_checks(s)

    asyncio.run(go())


def test_on_loopback_no_token_is_needed():
    async def go():
        async with served() as s:
            assert s.monitor.token is None and s.monitor.url("127.0.0.1", s.port) == f"http://127.0.0.1:{s.port}/"
            for token in (None, "whatever"):  # a token in the address is ignored
                assert await s.page(token=token) == 200
                ws = await s.ws(token=token, origin=s.url)
                await ws.send_str("{")
                await reply(ws)
                await ws.close()

    asyncio.run(go())


DEEP = 2000  # brackets: past Python's recursion limit, inside the 4 KB message limit
BAD_JSON = {
    "a huge integer": '{"address": "/temperature", "args": [1' + "0" * 400 + "]}",
    "a huge integer for an int": '{"address": "/pause", "args": [-1' + "0" * 400 + "]}",
    "deep nesting": '{"address": "/temperature", "args": ' + "[" * DEEP + "]" * DEEP + "}",
    "deep nesting at the top": "[" * DEEP + "]" * DEEP,
    "true for a number": '{"address": "/temperature", "args": [true]}',
    "false for an int": '{"address": "/pause", "args": [false]}',
    "not JSON": "{address: /temperature}",
    "not a control": '"hello"',
}


@pytest.mark.parametrize("name", list(BAD_JSON))
def test_bad_json_is_an_error_reply_and_the_connection_and_server_go_on(name, caplog):
    async def go():
        async with served() as s:
            ws = await s.ws(origin=s.url)
            await ws.send_str(BAD_JSON[name])
            assert (await reply(ws))["reason"]
            await ws.send_str(json.dumps({"address": "/temperature", "args": [0.25]}))
            await ws.send_str("{")
            await reply(ws)  # the same connection goes on...
            assert s.sent == [("/temperature", [0.25])]
            assert await s.page() == 200  # ...and so does the server
            await ws.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(go())
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_controls_are_rate_limited_per_connection_at_the_limits_edge():
    burst = int(CONTROLS_PER_SECOND)
    control = json.dumps({"address": "/temperature", "args": [0.5]})

    async def go():
        async with served() as s:
            ws = await s.ws(origin=s.url)
            for _ in range(burst):
                await ws.send_str(control)
            await ws.send_str(control)  # one past the burst, at the same instant
            assert "too many controls" in (await reply(ws))["reason"]
            assert len(s.sent) == burst
            s.clock.now += 1 / CONTROLS_PER_SECOND  # time for exactly one more
            await ws.send_str(control)
            await ws.send_str(control)
            assert "too many controls" in (await reply(ws))["reason"]
            assert len(s.sent) == burst + 1
            other = await s.ws(origin=s.url)  # another connection has its own budget
            await other.send_str(control)
            await other.send_str("{")
            assert "JSON" in (await reply(other))["reason"]
            assert len(s.sent) == burst + 2

    asyncio.run(go())


# Any JSON value: what a page, a script or a fuzzer may send. NaN and the infinities too (Python's json reads them).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
# Arguments near what the controls take (so some are valid), or anything.
PLAUSIBLE = (st.floats(0.0, 3.0) | st.floats(-1.0, 1e3) | st.integers(-2, 20)
             | st.sampled_from([0.5, 1e-300, 1e300, (1 << 63) - 1, 1 << 63, 1 << 64, -(1 << 63) - 1])
             | st.sampled_from([*MODE_NAMES, "default", "../default", "DEFAULT", "default\x00"]))
# Controls the page offers with arguments near right, or with any address or arguments, or any JSON at all.
CONTROL = st.one_of(
    st.fixed_dictionaries({"address": st.sampled_from(sorted(CONTROLS)), "args": st.lists(PLAUSIBLE, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"address": st.sampled_from(sorted(CONTROLS)) | JSON},
                          optional={"args": st.lists(PLAUSIBLE | JSON, max_size=3) | JSON}),
    JSON)


def osc_round_trip(address: str, args: list[Any]) -> tuple[str, list[Any]]:
    """What the server would read from the bytes the bridge sends."""
    msg = OscMessage(encode(address, args))
    return msg.address, list(msg.params)


def test_any_json_control_is_an_error_reply_or_valid_osc_and_the_connection_goes_on(caplog):
    async def start() -> tuple[contextlib.AbstractAsyncContextManager, Served, aiohttp.ClientWebSocketResponse]:
        manager = served()
        s = await manager.__aenter__()
        return manager, s, await s.ws(origin=s.url)

    async def one(s: Served, ws: aiohttp.ClientWebSocketResponse, control: Any) -> None:
        s.clock.now += 1.0  # a fresh rate budget for every example
        before = len(s.sent)
        marker = f"sentinel-{uuid.uuid4().hex}"
        await ws.send_str(json.dumps(control, allow_nan=True))
        await ws.send_str(json.dumps({"address": "/mode", "args": [marker]}))  # refused, with its name in the reason
        errors = []
        while True:
            data = await reply(ws)
            if marker in data["reason"]:
                break
            errors.append(data)
        sent = s.sent[before:]
        event("refused" if errors else f"sent {sent[0][0] if sent else None}")
        if errors:
            assert len(errors) == 1 and sent == [], (errors, sent)
            assert errors[0]["reason"] and errors[0]["address"] in CONTROLS | {"monitor"}
            return
        assert sent, "neither sent nor refused"
        address, args = sent[0]
        assert address in CONTROLS and sent[1:] in ([], [("/status", [])])
        assert all(type(a) in (int, float, str) and (type(a) is not float or math.isfinite(a)) for a in args)
        got_address, got_args = osc_round_trip(address, args)
        assert got_address == address and len(got_args) == len(args)
        validate({"address": got_address, "args": got_args}, MODELS)  # what the server reads, it accepts

    def fuzz() -> None:
        loop = asyncio.new_event_loop()
        manager, s, ws = loop.run_until_complete(start())

        @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(control=CONTROL)
        @example(control={"address": "/reset", "args": [1e300]})  # found by it: an int OSC cannot carry
        def check(control: Any) -> None:
            if len(json.dumps(control, allow_nan=True)) >= MAX_MESSAGE:
                return  # a message over the limit closes the socket by design (aiohttp's max_msg_size)
            loop.run_until_complete(one(s, ws, control))

        try:
            check()
            assert not ws.closed
        finally:
            loop.run_until_complete(ws.close())
            loop.run_until_complete(manager.__aexit__(None, None, None))
            loop.close()

    with caplog.at_level(logging.DEBUG):
        in_a_thread(fuzz)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# --------------------------------------------------------------------------- processes


def require_browser():
    """Playwright's sync API, or skip (fail under CI) with the reason."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install -r requirements-test.txt)"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (apt-get install chromium; listed in .ci/apt-packages.txt)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason + " - CI must install it")
        pytest.skip(reason)
    return sync_playwright


class MonitorProcess:
    """`python -m server monitor --port 0 --server 127.0.0.1:PORT [args]`, with its URL parsed from the ready line."""

    def __init__(self, server_port: int, *args: str, timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "server", "monitor", "--port", "0", "--server", f"127.0.0.1:{server_port}", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        found: list[str] = []

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("monitor: http://"):
                    found.append(line)

        threading.Thread(target=pump, daemon=True).start()
        end = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None or time.monotonic() > end:
                self.proc.kill()
                raise RuntimeError("monitor did not become ready:\n" + "".join(self.lines))
            time.sleep(0.02)
        self.url = re.match(r"monitor: (http://\S+)", found[0]).group(1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    dummy = OscPeer()  # --send goes to a port nobody reads
    srv = start_server(tmp_path_factory.mktemp("monitor-logs"), "--send", f"127.0.0.1:{dummy.port}",
                       "--mode", "accompany", "--timescale", "0.01")
    yield srv
    srv.stop()
    dummy.close()


@pytest.fixture(scope="module")
def peer(server):
    p = OscPeer()
    p.target = ("127.0.0.1", server.port)
    yield p
    p.close()


@pytest.fixture(scope="module")
def monitor(server):
    m = MonitorProcess(server.port)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def browser():
    sync_playwright = require_browser()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, monitor):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.goto(monitor.url)
    yield page


def plane_pixels(page) -> str:
    return page.evaluate("document.getElementById('plane').toDataURL()")


def wait_for(predicate, seconds: float = 5.0, every: float = 0.1):
    end = time.monotonic() + seconds
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(every)


# --------------------------------------------------------------------------- browser tests


def test_page_loads_without_console_errors_and_shows_status(page):
    assert wait_for(lambda: page.text_content("#f-mode").startswith("accompany"), 10.0), "no status shown"
    assert page.text_content("#f-model") == "default"
    assert wait_for(lambda: page.text_content("#link") == "live"), "the link badge is not live"
    assert page.eval_on_selector_all("#c-model option", "os => os.map(o => o.value)") == sorted(
        p.name for p in MODELS.iterdir() if (p / "model.json").is_file())
    assert page.eval_on_selector_all("#c-mode option", "os => os.map(o => o.value)") == list(MODE_NAMES)
    assert page.errors == []


def still_plane(page, seconds: float = 10.0) -> str:
    """The plane once it has stopped changing: no trail left on it (each fades within 4 s) and two looks
    0.2 s apart the same. Waited for, not slept: with nothing drawn before, that is at once."""
    def still() -> str | None:
        trails = page.evaluate("window.antiphonVoices()")
        if trails["model"] or trails["performer"]:
            return None
        first = plane_pixels(page)
        page.wait_for_timeout(200)
        return first if plane_pixels(page) == first else None

    plane = wait_for(still, seconds)
    assert plane, f"the plane did not settle within {seconds} s"
    return plane


def test_gestures_change_the_canvas(page, peer):
    before = still_plane(page)  # any earlier trail faded, so a change below is the gestures'
    for i in range(30):
        peer.send("/gesture", 0.2 + 0.02 * i, 0.3 + 0.01 * i)
        time.sleep(0.02)
    assert wait_for(lambda: page.text_content("#f-surprise") != "–"), "no surprise shown"
    assert wait_for(lambda: plane_pixels(page) != before), "the plane did not change after gestures"
    assert page.errors == []


def test_controls_change_the_server(page, peer):
    page.select_option("#c-mode", "listen")
    assert wait_for(lambda: peer.status()["mode"] == "listen"), "mode select did not reach the server"
    page.select_option("#c-mode", "accompany")
    assert wait_for(lambda: peer.status()["mode"] == "accompany")
    page.fill("#c-temperature", "0.5")
    assert wait_for(lambda: abs(peer.status()["temperature"] - 0.5) < 1e-6), "temperature slider did not reach the server"
    assert wait_for(lambda: page.text_content("#f-temperature") == "0.50"), "the status figure did not follow"
    assert page.errors == []


def test_the_monitor_only_gets_cpu_the_server_does_not_want(monitor):
    assert os.sched_getscheduler(monitor.proc.pid) == os.SCHED_IDLE


def test_killing_the_monitor_leaves_the_server_playing(page, monitor, server, peer):
    page.close()
    monitor.proc.kill()
    monitor.proc.wait(10)
    peer.send("/hello")
    peer.drain(0.2)
    for i in range(10):
        peer.send("/gesture", 0.5, 0.1 * i)
        time.sleep(0.02)
    got = peer.receive(3.0, "/prediction", count=5)
    assert len(got) >= 5, "the server stopped answering once the monitor was gone"
    assert server.proc.poll() is None


def test_each_voice_gets_its_own_trail(tmp_path, browser):
    """With voices per-sender the page keeps one trail per voice (labelled), so two performers never join up."""
    dummy = OscPeer()
    srv = start_server(tmp_path, "--voices", "per-sender", "--send", f"127.0.0.1:{dummy.port}", "--timescale", "0.01")
    mon = MonitorProcess(srv.port)
    peers = [OscPeer(), OscPeer()]
    try:
        for p in peers:
            p.target = ("127.0.0.1", srv.port)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(mon.url)
        assert wait_for(lambda: page.text_content("#link") == "live", 10.0)
        for i in range(40):
            peers[0].send("/gesture", 0.2 + 0.01 * i, 0.2)
            peers[1].send("/gesture", 0.8 - 0.01 * i, 0.8)
            time.sleep(0.02)
        voices = wait_for(lambda: (v := page.evaluate("window.antiphonVoices()"))["performer"] == ["0", "1"] and v)
        page.close()
        assert voices and sorted(voices["model"]) == ["0", "1"], voices
        assert errors == []
    finally:
        mon.stop()
        srv.stop()
        for p in (*peers, dummy):
            p.close()


def test_an_empty_plane_says_why_it_is_empty_and_what_to_do(tmp_path, browser):
    """Opened with no server, or before anything is played, the page says so on the plane, not only dashes."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as nobody:
        nobody.bind(("127.0.0.1", 0))
        silent = nobody.getsockname()[1]
    mon = MonitorProcess(silent)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(mon.url)
        hint = lambda: page.evaluate("document.getElementById('plane').dataset.hint")  # noqa: E731
        assert wait_for(lambda: hint() == f"waiting for the server at 127.0.0.1:{silent}", 10.0), hint()
    finally:
        page.close()
        mon.stop()
    dummy, player = OscPeer(), OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{dummy.port}", "--timescale", "0.01")
    mon = MonitorProcess(srv.port)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(mon.url)
        assert wait_for(lambda: hint() == "the server is live: nothing played yet", 10.0), hint()
        player.target = ("127.0.0.1", srv.port)
        for i in range(10):
            player.send("/gesture", 0.1 * i, 0.5)
        assert wait_for(lambda: hint() is None, 10.0), "the hint stayed on a plane with a trail"
    finally:
        page.close()
        mon.stop()
        srv.stop()
        dummy.close()
        player.close()


def test_a_browser_that_goes_away_mid_stream_leaves_no_traceback(tmp_path, browser):
    """Pages closed while the monitor streams to them: at most a one-line note, never a traceback."""
    dummy, player = OscPeer(), OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{dummy.port}", "--timescale", "0.001")
    mon = MonitorProcess(srv.port)
    player.target = ("127.0.0.1", srv.port)
    try:
        for round_ in range(3):
            page = browser.new_page()
            page.goto(mon.url)
            assert wait_for(lambda: page.text_content("#link") == "live", 10.0)
            for i in range(100):  # the stream is busy when the page goes
                player.send("/gesture", (i % 10) / 10, 0.5)
                time.sleep(0.002)
            page.close(run_before_unload=False)
        for i in range(50):
            player.send("/gesture", 0.5, 0.5)
            time.sleep(0.002)
        assert mon.proc.poll() is None
    finally:
        mon.stop()
        srv.stop()
        dummy.close()
        player.close()
    out = "".join(mon.lines)
    assert "Traceback" not in out and "ClientConnectionResetError" not in out, out


def test_beyond_loopback_the_ready_line_carries_the_token_and_only_it_opens_the_monitor(server, monitor):
    """`monitor --host 0.0.0.0`: the printed address has the run's token; without it, 403."""
    assert "?" not in monitor.url  # on loopback: no token, as before
    mon = MonitorProcess(server.port, "--host", "0.0.0.0", "--allow-host", "studio.local")
    try:
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]{43,})", mon.url)
        assert match, mon.url
        port, token = match.groups()
        assert wait_for(lambda: any("beyond loopback" in line and f"http://studio.local:{port}/?token={token}" in line
                                    for line in mon.lines), 5.0), mon.lines

        async def go() -> None:
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                for query in ("", "?token=", f"?token={token[:-1]}"):
                    async with session.get(base + "/" + query) as r:
                        assert r.status == 403, query
                    with pytest.raises(aiohttp.WSServerHandshakeError):
                        await session.ws_connect(base + "/ws" + query)
                async with session.get(mon.url) as r:
                    assert r.status == 200
                ws = await session.ws_connect(f"{base}/ws?token={token}", headers={"Origin": base})
                assert (await reply(ws, "modes"))["names"] == list(MODE_NAMES)
                await ws.close()

        in_a_thread(asyncio.run, go())
    finally:
        mon.stop()


def test_the_page_hands_its_token_on_to_its_websocket(browser, server):
    mon = MonitorProcess(server.port, "--host", "0.0.0.0")
    try:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        assert page.goto(mon.url.split("?")[0]).status == 403
        assert page.goto(mon.url).status == 200
        assert wait_for(lambda: page.text_content("#link") == "live", 10.0), "the page's WebSocket did not open"
        page.close()
        assert errors == []
    finally:
        mon.stop()


def bars_pixels(page) -> str:
    return page.evaluate("document.getElementById('bars').toDataURL()")


BAR_COLOURS = """() => {
  const c = document.getElementById('bars'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let performer = 0, model = 0;  // cyan (56, 208, 255) and amber (255, 176, 32); the density is violet, green < 100
  for (let i = 0; i < d.length; i += 4) {
    if (d[i] < 120 && d[i + 1] > 150 && d[i + 2] > 200) performer++;
    if (d[i] > 200 && d[i + 1] > 120 && d[i + 2] < 100) model++;
  }
  return { performer, model };
}"""


def test_a_model_of_nine_values_shows_its_dims_a_trail_and_bars_that_follow_the_gestures(tmp_path, browser):
    """At N = 9 the page says dims 9, draws the first two values on the plane and values 3..9 as seven bars that
    change with gestures of nine values; a swap to a one-value model hides the bars and the plane still draws."""
    from tests.tinynet import export_wide

    models = tmp_path / "models"
    for n in (9, 1):
        export_wide(models / f"n{n}", n, seed=n)
    with contextlib.ExitStack() as stack:  # closed in reverse: the page, the monitor, the server, the peers
        dummy, player = (stack.enter_context(contextlib.closing(OscPeer())) for _ in range(2))
        srv = start_server(tmp_path / "logs", "--models-dir", str(models), "--model", "n9", "--mode", "accompany",
                           "--send", f"127.0.0.1:{dummy.port}", "--timescale", "0.01")
        stack.callback(srv.stop)
        mon = MonitorProcess(srv.port, "--models-dir", str(models))
        stack.callback(mon.stop)
        player.target = ("127.0.0.1", srv.port)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        stack.callback(page.close)
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(mon.url)
        assert wait_for(lambda: page.text_content("#f-dims") == "9", 10.0), page.text_content("#f-dims")
        assert page.evaluate("window.antiphonDims()") == {"dims": 9, "bars": 7}
        assert page.is_visible("#bars")
        box = page.locator("#bars").bounding_box()
        assert box["width"] > 100 and box["height"] > 300, box  # beside the plane, as tall as it
        plane, bars = still_plane(page), bars_pixels(page)
        assert page.evaluate(BAR_COLOURS) == {"performer": 0, "model": 0}  # no bar before anything is played
        for i in range(30):
            player.send("/gesture", *[(0.1 * j + 0.02 * i) % 1.0 for j in range(9)])
            time.sleep(0.02)
        assert wait_for(lambda: page.evaluate("window.antiphonVoices()")["model"] == [""]), "no model trail"
        assert wait_for(lambda: plane_pixels(page) != plane), "the plane did not change after gestures"
        assert wait_for(lambda: bars_pixels(page) != bars), "the bars did not change after gestures"
        colours = wait_for(lambda: (c := page.evaluate(BAR_COLOURS))["performer"] > 100 and c["model"] > 100 and c)
        assert colours, page.evaluate(BAR_COLOURS)
        assert wait_for(lambda: page.text_content("#f-surprise") != "–"), "no surprise shown"

        player.send("/model", "n1")
        assert wait_for(lambda: page.text_content("#f-dims") == "1", 10.0), "the swap to one value was not shown"
        assert page.evaluate("window.antiphonDims()") == {"dims": 1, "bars": 0}
        assert not page.is_visible("#bars")
        plane = still_plane(page)
        for i in range(20):
            player.send("/gesture", 0.05 * i)
            time.sleep(0.02)
        assert wait_for(lambda: plane_pixels(page) != plane), "the plane did not draw one value against time"
        assert errors == []
