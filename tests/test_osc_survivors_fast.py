"""Behaviours of server/osc that a mutation sample (2026-12-06) showed no test held.

All in this process: a recording socket (tests.oscfakes), a stand-in zeroconf, or loopback sockets with deadlines.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from pythonosc.osc_message import OscMessage

from server.live.controls import ControlError
from server.live.streams import STREAM_RATE
from server.osc.advertise import OSC_SERVICE, SERVICE, advertise
from server.osc.allow import exposure_warning
from server.osc.namespace import TABLE
from server.osc.oscquery import Namespace, host_info
from server.osc.oscquery_http import start_oscquery
from server.osc.output import OscOutput
from server.osc.protocol import OscServerProtocol
from server.osc.streams import Subscriptions
from server.osc.table import AddressTable, address
from server.osc.udp import BatchDatagramTransport
from server.osc.wire import encode_message, encode_prediction
from tests.oscfakes import FakeControls, StubTransport

PERFORMER = ("127.0.0.1", 40000)
VALUES = {"temperature": 0.7, "mode": "listen", "paused": 0, "model": "default"}


def errors(sock: StubTransport) -> list[tuple[Any, ...]]:
    """Every `/error` sent, as (to, address, reason)."""
    out = []
    for data, to in sock.sent:
        message = OscMessage(data)
        if message.address == "/error":
            out.append((to, *message.params))
    return out


def protocol_on(sock: StubTransport, controls: Any = None) -> OscServerProtocol:
    output = OscOutput()
    output.attach(sock)  # type: ignore[arg-type]
    return OscServerProtocol(controls or FakeControls(), output)


# --------------------------------------------------------------------------- protocol


def test_an_engine_refusal_without_a_reason_still_tells_the_performer_it_was_refused() -> None:
    """A ControlError with no text must not reach the performer as an empty reason."""

    class Mute(FakeControls):
        def perform(self, *values: float, at: float | None = None, voice: int | None = None, route: Any = None) -> None:
            raise ControlError()

    sock = StubTransport()
    protocol_on(sock, Mute()).datagrams_received([(encode_message("/gesture", 0.5, 0.5), PERFORMER, 0.0)])
    assert errors(sock) == [(PERFORMER, "/gesture", "refused")]


# --------------------------------------------------------------------------- wire (as the performer reads it)


def test_a_message_whose_address_padding_is_cut_short_is_truncated() -> None:
    """`/abcd` needs 8 bytes with its padding; 6 arrived. The performer is told why, not just 'bad'."""
    sock = StubTransport()
    protocol_on(sock).datagrams_received([(b"/abcd\0", PERFORMER, 0.0)])
    assert errors(sock) == [(PERFORMER, "/abcd", "malformed OSC message: truncated message")]


# --------------------------------------------------------------------------- output: is_own, _trim


class BoundTransport(StubTransport):
    """A StubTransport that says where its socket is bound, as asyncio transports do."""

    def __init__(self, sockname: tuple[Any, ...]) -> None:
        super().__init__()
        self.sockname = sockname

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sockname if name == "sockname" else default


@pytest.mark.parametrize("host", ["127.0.0.1", "192.0.2.5"])
def test_hello_naming_the_servers_own_port_is_refused(host: str) -> None:
    """A `/hello PORT` naming the server's own socket would make it send to itself, a loop; the sender hears why."""
    sock = BoundTransport((host, 5710))
    protocol = protocol_on(sock)
    sender = (host, 40000)
    protocol.datagrams_received([(encode_message("/hello", 5710), sender, 0.0)])
    assert errors(sock) == [(sender, "/hello", "port 5710 is this server's own: it would send to itself")]
    assert protocol.output.destinations == ()


def test_configured_destinations_push_out_the_quietest_hello_not_the_oldest() -> None:
    """`--send` taking the last place drops the /hello client heard longest ago; one that still talks stays."""
    first, second = ("127.0.0.1", 9001), ("127.0.0.1", 9002)
    output = OscOutput(max_destinations=2)
    output.add_destination(first, now=1.0)
    output.add_destination(second, now=2.0)
    output.consent.hear(first, 5.0, 16)  # the first client is still playing
    output.set_destinations([("127.0.0.1", 9000)])
    assert output.destinations == (("127.0.0.1", 9000), first)


# --------------------------------------------------------------------------- consent and streams


def test_leaving_a_stream_keeps_a_clients_own_hello_destination_proven() -> None:
    """A client that said /hello and then /subscribe + /unsubscribe mixture keeps getting /prediction."""
    client = ("127.0.0.1", 9001)
    output = OscOutput()
    sock = StubTransport()
    output.attach(sock)  # type: ignore[arg-type]
    streams = Subscriptions(output, ("mixture",))
    output.add_destination(client, now=0.0)
    streams.add("mixture", client, now=0.0)
    assert streams.remove("mixture", client)
    output.send_prediction((0.25, 0.5))
    assert sock.sent == [(encode_prediction((0.25, 0.5), None), client)]
    assert output.stats.unproven_withheld == 0


def test_subscribing_again_reports_nothing_new() -> None:
    """`add` says False for a subscription already there (documented), so a keep-alive is not a new subscriber."""
    streams = Subscriptions(OscOutput(), ("mixture",))
    client = ("127.0.0.1", 9001)
    assert streams.add("mixture", client, now=0.0) is True
    assert streams.add("mixture", client, now=1.0) is False
    assert streams.subscribers("mixture") == (client,)


def test_the_stream_rate_memory_holds_four_destinations_a_place_then_forgets_the_oldest() -> None:
    """Rate state is bounded (4 x places x streams), so a churn of subscribers cannot grow it; the price is
    that the destination forgotten gets a fresh burst when it comes back."""
    output = OscOutput()
    sock = StubTransport()
    output.attach(sock)  # type: ignore[arg-type]
    streams = Subscriptions(output, ("mixture",), max_each=1, clock=lambda: 0.0)  # the clock never moves
    data = encode_message("/mixture", 1.0)
    first = ("127.0.0.1", 9000)
    streams.add("mixture", first)
    for _ in range(int(STREAM_RATE) + 1):
        streams.send_data("mixture", data)
    assert len(sock.sent) == int(STREAM_RATE)  # its burst spent
    streams.remove("mixture", first)
    for port in range(9001, 9005):  # four more destinations take a place in turn
        streams.add("mixture", ("127.0.0.1", port))
        streams.send_data("mixture", data)
        streams.remove("mixture", ("127.0.0.1", port))
    sock.sent.clear()
    streams.add("mixture", first)
    streams.send_data("mixture", data)
    assert sock.sent == [(data, first)]  # forgotten: a fresh burst


# --------------------------------------------------------------------------- udp


def test_a_batch_size_below_one_is_refused_with_its_reason() -> None:
    loop = asyncio.new_event_loop()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            with pytest.raises(ValueError) as raised:
                BatchDatagramTransport(loop, sock, SimpleNamespace(), max_batch=0)  # type: ignore[arg-type]
        assert str(raised.value) == "max_batch must be >= 1"
    finally:
        loop.close()


class BrokenUnreachable:
    """A batch protocol whose `unreachable` raises."""

    def connection_made(self, transport: Any) -> None: ...

    def datagrams_received(self, batch: Any) -> None: ...

    def error_received(self, exc: Exception) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def unreachable(self, endpoint: Any) -> None:
        raise RuntimeError("bug in unreachable")


def test_a_failing_unreachable_is_reported_to_the_loop_by_name() -> None:
    """What the log says when the protocol's `unreachable` breaks: a reader must see which callback it was."""
    loop = asyncio.new_event_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    protocol = BrokenUnreachable()
    transport = BatchDatagramTransport(loop, sock, protocol)  # type: ignore[arg-type]
    try:
        if not transport.reports_unreachable:
            pytest.skip("this system does not report closed ports")
        gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        gone.bind(("127.0.0.1", 0))
        closed = gone.getsockname()
        gone.close()

        async def until_reported() -> None:
            end = loop.time() + 5.0
            while not reported:
                assert loop.time() < end, "no report of the closed port"
                try:
                    transport.sendto(b"/x\0\0", closed)
                except OSError:
                    pass
                await asyncio.sleep(0.01)

        loop.run_until_complete(until_reported())
        assert reported[0]["message"] == "unreachable() failed"
        assert isinstance(reported[0]["exception"], RuntimeError)
        assert reported[0]["protocol"] is protocol  # asyncio's handler names it: which socket's callback broke
    finally:
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


# --------------------------------------------------------------------------- allow


def test_a_server_on_every_interface_is_warned_about_as_every_interface() -> None:
    for host in ("0.0.0.0", "::"):
        warning = str(exposure_warning((host, 5710)))
        assert warning.startswith("OSC is listening on every interface, not only this machine")


# --------------------------------------------------------------------------- oscquery


def answer(path: str, query: str = "") -> tuple[int, Any]:
    code, body = Namespace(TABLE, host_info(5710)).answer(path, query, lambda: VALUES)
    return code, None if body is None else json.loads(body)


def test_the_root_describes_the_server_and_is_not_a_control() -> None:
    """OSCQuery clients show the root's DESCRIPTION and read its ACCESS (0: neither read nor write)."""
    assert answer("/", "DESCRIPTION") == (200, {"DESCRIPTION": "Antiphon: a real-time predictive performance server"})
    assert answer("/", "ACCESS") == (200, {"ACCESS": 0})


def test_a_path_below_a_method_is_not_found() -> None:
    """`/gesture/x`: a method has no children, so it is a 404, not a server error."""
    assert answer("/gesture/x") == (404, None)
    assert answer("/temperature/x", "VALUE") == (404, None)


def oscquery_get(host: str, allow: list[Any], headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Start the OSCQuery server on `host` (any free port), GET / from loopback, stop it."""

    async def run() -> tuple[int, str]:
        server = await start_oscquery(host, 0, TABLE, lambda: VALUES, 5710, allow)
        try:
            where = f"[{server.host}]" if ":" in server.host else server.host
            timeout = aiohttp.ClientTimeout(total=5.0)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(f"http://{where}:{server.port}/", headers=headers) as response:
                    return response.status, await response.text()
        finally:
            await server.close()

    return asyncio.run(run())


def test_the_oscquery_server_answers_only_senders_in_allow() -> None:
    """`--allow` limits who may read the namespace over HTTP as it limits who may play."""
    status, text = oscquery_get("127.0.0.1", [ipaddress.ip_network("10.0.0.0/8")])
    assert (status, text) == (403, "not in --allow\n")
    assert oscquery_get("127.0.0.1", [ipaddress.ip_network("127.0.0.0/8")])[0] == 200


def test_an_oscquery_server_on_localhost_refuses_a_rebound_host_name() -> None:
    """Bound by the name `localhost`, it is on loopback: a page whose name points at it (DNS rebinding) is refused."""
    status, text = oscquery_get("localhost", [], {"Host": "evil.example"})
    assert status == 403 and "loopback name" in text
    assert oscquery_get("localhost", [], {"Host": "localhost"})[0] == 200


# --------------------------------------------------------------------------- advertise (a stand-in zeroconf)


@pytest.fixture
def zeroconf(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """A stand-in `zeroconf` module: nothing multicasts; each ServiceInfo's fields are recorded."""
    infos: list[dict[str, Any]] = []

    class Zeroconf:
        def __init__(self, ip_version: object) -> None: ...

        def register_service(self, info: dict[str, Any], allow_name_change: bool) -> None: ...

        def unregister_all_services(self) -> None: ...

        def close(self) -> None: ...

    def service_info(kind: str, name: str, **fields: Any) -> dict[str, Any]:
        infos.append({"kind": kind, "name": name, **fields})
        return infos[-1]

    fake = SimpleNamespace(IPVersion=SimpleNamespace(V4Only="v4"), ServiceInfo=service_info, Zeroconf=Zeroconf,
                           get_all_addresses=lambda: ["192.0.2.7"])
    monkeypatch.setitem(sys.modules, "zeroconf", fake)
    monkeypatch.setattr(socket, "gethostname", lambda: "stage-pc.example.org")
    yield infos


def test_advertise_on_one_address_announces_that_address_under_the_short_host_name(
        zeroconf: list[dict[str, Any]]) -> None:
    """Clients resolve `stage-pc.local.` to the address OSC listens on; a domain in the host name is dropped."""
    advertise(5713, 5710, "192.0.2.9").close()
    assert [(i["kind"], i["port"], i["parsed_addresses"], i["server"]) for i in zeroconf] == [
        (SERVICE, 5713, ["192.0.2.9"], "stage-pc.local."),
        (OSC_SERVICE, 5710, ["192.0.2.9"], "stage-pc.local."),
    ]


# --------------------------------------------------------------------------- table


def test_a_bar_in_a_summary_is_escaped_in_the_markdown_table() -> None:
    """docs/osc.md's table: an unescaped `|` would split the meaning into a fourth column."""

    @address("/either")
    def either(ctx: Any, n: int) -> None:
        """Play this | that."""

    assert AddressTable([either]).markdown().splitlines()[-1] == "| `/either` | `n:int` | Play this \\| that. |"


def test_a_machine_without_a_host_name_is_advertised_as_antiphon(zeroconf: list[dict[str, Any]],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    advertise(5713, 5710, "192.0.2.9").close()
    assert {i["server"] for i in zeroconf} == {"antiphon.local."}


def test_a_refused_registration_is_a_warning_and_the_server_plays_on(zeroconf: list[dict[str, Any]],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    def refuse(self: Any, info: dict[str, Any], allow_name_change: bool) -> None:
        raise OSError("no multicast route")

    monkeypatch.setattr(sys.modules["zeroconf"].Zeroconf, "register_service", refuse)
    with caplog.at_level("WARNING", logger="server.osc.advertise"):
        advertise(5713, 5710, "192.0.2.9").close()  # returns: the failure stays in the registering thread
    assert [r.getMessage() for r in caplog.records] == [
        "mDNS registration failed (not advertised; the server plays on): no multicast route"]


def test_a_destination_is_resolved_for_the_sockets_family() -> None:
    """An IPv6 socket sends to an IPv4 name through its mapped address; an IPv4 socket cannot send to ::1."""
    from server.osc.protocol import _resolve

    async def resolve(host: str, family: int) -> Any:
        return await _resolve(asyncio.get_running_loop(), host, 9000, family)

    assert asyncio.run(resolve("127.0.0.1", socket.AF_INET)) == ("127.0.0.1", 9000)
    assert asyncio.run(resolve("127.0.0.1", socket.AF_INET6)) == ("::ffff:127.0.0.1", 9000)
    with pytest.raises(OSError, match=r"^cannot send OSC to ::1:9000: "):
        asyncio.run(resolve("::1", socket.AF_INET))


def test_a_values_address_requires_each_of_its_values_and_keeps_its_voice_optional() -> None:
    """`/gesture` on a 3-value model: v1 v2 v3 required, the voice not (what OSCQuery and the docs show)."""
    params, required = TABLE.lookup["/gesture"].signature(3)
    assert [p.usage for p in params] == ["v1:float", "v2:float", "v3:float", "[voice:int]"]
    assert [p.optional for p in params] == [False, False, False, True] and required == 3


@pytest.mark.parametrize("args", [dict(rate=0.0), dict(burst=0.5), dict(max_keys=0)])
def test_a_token_bucket_that_could_never_pass_anything_is_refused_saying_what_each_needs(args: dict) -> None:
    from server.osc.ratelimit import TokenBuckets

    with pytest.raises(ValueError, match=r"^rate must be > 0, burst >= 1 and max_keys >= 1$"):
        TokenBuckets(**args)


def test_status_figures_are_microseconds_to_a_tenth() -> None:
    from server.live.status import micro

    assert micro("step_us", (0.25, 2.0)) == {"step_us_median": 250000.0, "step_us_p99": 2000000.0}
    assert micro("late_us", (1.23456e-5, 3e-7)) == {"late_us_median": 12.3, "late_us_p99": 0.3}


# --------------------------------------------------------------------------- seed 4's survivors (2026-12-06)


def test_a_name_that_resolves_to_no_address_is_an_error_naming_it(monkeypatch) -> None:
    from server.osc.protocol import _resolve

    async def resolve() -> Any:
        loop = asyncio.get_running_loop()

        async def nothing(*args: Any, **kwargs: Any) -> list:
            return []
        monkeypatch.setattr(loop, "getaddrinfo", nothing)
        return await _resolve(loop, "synth.local", 9000, socket.AF_INET)

    with pytest.raises(OSError, match=r"^cannot send OSC to synth.local:9000: no address$"):
        asyncio.run(resolve())


def test_a_busy_port_keeps_its_errno_so_run_can_say_it_is_in_use() -> None:
    """`run` tells "port in use" from other failures by errno (server/app.py): start_osc must keep it."""
    import errno

    from server.osc.protocol import start_osc

    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]

    async def start() -> None:
        await start_osc(FakeControls(), host="127.0.0.1", port=port, destinations=())

    try:
        with pytest.raises(OSError) as caught:
            asyncio.run(start())
    finally:
        busy.close()
    assert caught.value.errno == errno.EADDRINUSE
    assert str(caught.value).endswith(f"cannot listen for OSC on 127.0.0.1:{port}: Address already in use")


def test_a_bundle_shorter_than_its_header_is_called_truncated() -> None:
    from server.osc.wire import bundle_messages

    with pytest.raises(ValueError, match=r"^truncated bundle$"):  # what /error says after "malformed OSC bundle: "
        bundle_messages(b"#bundle\0" + bytes(4))


def test_an_empty_address_is_terminated_and_left_to_the_table_to_refuse() -> None:
    """b"\\0\\0\\0\\0" is an empty address, terminated and padded: not "unterminated"; no handler has that name."""
    from server.osc.wire import message_problem

    assert message_problem(b"\0\0\0\0") is None
    assert message_problem(b"/a") == "unterminated address"


# --------------------------------------------------------------------------- seed 5's survivors (2026-12-06)


def test_an_unknown_address_is_answered_with_every_address_there_is_space_separated() -> None:
    sock = StubTransport()
    protocol_on(sock).datagrams_received([(encode_message("/nope", 1.0), PERFORMER, 0.0)])
    [(to, address, reason)] = errors(sock)
    assert (to, address) == (PERFORMER, "/nope")
    assert reason == "unknown address; expected one of " + " ".join(TABLE.paths)


def test_a_wrong_number_of_values_says_how_many_the_model_wants_in_the_plural() -> None:
    sock = StubTransport()
    protocol_on(sock).datagrams_received([(encode_message("/gesture", 0.5), PERFORMER, 0.0)])
    [(_, address, reason)] = errors(sock)
    assert address == "/gesture" and reason.startswith("/gesture wants 2 values (the model's dims), got 1")


def test_host_info_names_the_osc_address_when_it_is_given() -> None:
    assert host_info(5710, "192.0.2.7")["OSC_IP"] == "192.0.2.7"
    assert "OSC_IP" not in host_info(5710)


def test_type_tags_without_their_terminator_are_a_truncated_message() -> None:
    from server.osc.wire import message_problem

    assert message_problem(b"/a\0\0,ff") == "truncated message"
