"""OSCQuery in this process: the tree built from the address table, the proposal's answers, each declared
range held to its handler's checks at its edges, the HTTP app's refusals, and the `--oscquery` settings."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import types
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.config import ConfigError, add_run_arguments, resolve_run_config
from server.live.controls import ControlError
from server.live.modes import MODE_NAMES
from server.osc.namespace import TABLE, Request
from server.osc.oscquery import CACHE, DEFAULT_OSCQUERY_PORT, Namespace, NotFound, find, host_info, tree, with_values
from server.osc.oscquery_http import loopback_host, oscquery_app
from server.osc.table import AddressTable, Param, Range, address

VALUES = {"temperature": 0.7, "sigma_temperature": 1.0, "timescale": 2.0, "mode": "listen", "lookahead": 0.0,
          "threshold": 1.5, "paused": 1, "model": "default"}
INFO = host_info(5710)


def _tree(values: dict[str, object] = VALUES) -> dict[str, Any]:
    namespace = Namespace(TABLE, INFO)
    return with_values(tree(TABLE), namespace.values(values))


def _answer(path: str, query: str, values: dict[str, object] = VALUES,
            namespace: Namespace | None = None) -> tuple[int, Any]:
    code, body = (namespace or Namespace(TABLE, INFO)).answer(path, query, lambda: values)
    return code, None if body is None else json.loads(body)


def test_every_address_is_a_method_node_with_its_required_arguments_as_type_and_the_rest_as_overloads() -> None:
    root = _tree()
    tags = {"float": "f", "int": "i", "str": "s"}
    for a in TABLE:
        node = find(root, a.path)
        assert node["FULL_PATH"] == a.path and node["DESCRIPTION"] == a.summary
        params, required = a.signature(2)  # the tree of a 2-value model; /gesture's N values follow the model
        assert node["TYPE"] == "".join(tags[p.kind] for p in params[:required])
        overloads = [o["TYPE"] for o in node.get("OVERLOADS", [])]
        assert overloads == ["".join(tags[p.kind] for p in params[:n]) for n in range(required + 1, len(params) + 1)]
        assert node["ACCESS"] == (3 if a.state else 2)


def _has(node: dict[str, Any], expected: dict[str, Any]) -> bool:
    return all(node.get(key) == value for key, value in expected.items())


def test_gesture_takes_as_many_values_as_the_playing_model() -> None:
    """`/status dims` says N; /gesture's TYPE and RANGE follow it (a swap to a 9-d model makes it 8 floats)."""
    namespace = Namespace(TABLE, INFO)
    for width in (1, 2, 8, 16):
        code, body = namespace.answer("/gesture", "", lambda: {**VALUES, "dims": width})
        node = json.loads(body)
        assert code == 200 and node["TYPE"] == "f" * width and node["RANGE"] == [{"MIN": 0.0, "MAX": 1.0}] * width
        assert node["OVERLOADS"] == [{"TYPE": "f" * width + "i", "RANGE": [{"MIN": 0.0, "MAX": 1.0}] * width + [{"MIN": 0}],
                                      "CLIPMODE": ["both"] * width + ["none"]}]


def test_the_controls_show_their_ranges_and_current_values() -> None:
    root = _tree()
    assert _has(find(root, "/temperature"), {"TYPE": "f", "RANGE": [{"MIN": 0.0}], "VALUE": [0.7], "ACCESS": 3})
    assert find(root, "/temperature")["OVERLOADS"] == [{"TYPE": "fi", "RANGE": [{"MIN": 0.0}, {"MIN": 0}]}]
    assert find(root, "/mode")["RANGE"] == [{"VALS": list(MODE_NAMES)}] and find(root, "/mode")["VALUE"] == ["listen"]
    assert _has(find(root, "/gesture"), {"TYPE": "ff", "RANGE": [{"MIN": 0.0, "MAX": 1.0}] * 2,
                                         "CLIPMODE": ["both", "both"]})
    assert "VALUE" not in find(root, "/gesture")
    assert find(root, "/note")["RANGE"] == [{"MIN": 0, "MAX": 127}] * 2  # ints stay ints
    assert find(root, "/lookahead")["RANGE"] == [{"MIN": 0.0, "MAX": 2.0}]
    assert _has(find(root, "/pause"), {"TYPE": "i", "RANGE": [{"VALS": [0, 1]}], "VALUE": [1]})
    assert _has(find(root, "/model"), {"TYPE": "s", "VALUE": ["default"]}) and "RANGE" not in find(root, "/model")
    assert find(root, "/reset")["TYPE"] == ""  # a message with no arguments
    assert find(root, "/learn")["CONTENTS"]["stop"]["FULL_PATH"] == "/learn/stop"  # a method and a container
    assert _tree({})["CONTENTS"]["temperature"].get("VALUE") is None  # no value yet: none shown
    assert "VALUE" not in tree(TABLE)["CONTENTS"]["temperature"]  # the tree built once holds none


def test_a_container_met_before_its_method_keeps_its_children() -> None:
    def child(ctx) -> None:
        """Child."""

    def parent(ctx, x: float) -> None:
        """Parent."""

    root = tree(AddressTable([address("/a/b/c")(child), address("/a")(parent)]))
    assert find(root, "/a")["TYPE"] == "f"
    assert find(root, "/a/b") == {"FULL_PATH": "/a/b", "ACCESS": 0, "CONTENTS": {"c": find(root, "/a/b/c")}}
    with pytest.raises(NotFound):
        find(root, "/a/c")


@pytest.mark.parametrize(("path", "query", "status", "body"), [
    ("/temperature", "VALUE", 200, {"VALUE": [0.7]}),
    ("/temperature/", "RANGE", 200, {"RANGE": [{"MIN": 0.0}]}),  # a trailing slash is the same node
    ("/mode", "TYPE", 200, {"TYPE": "s"}),
    ("/", "TYPE", 200, {}),  # the root container has no type
    ("/gesture", "VALUE", 204, None),  # write-only
    ("/nowhere", "", 404, None),
    ("/nowhere", "VALUE", 404, None),
    ("/temperature", "UNIT", 400, None),  # an attribute this server does not fill
    ("/temperature", "HTML", 400, None),
    ("/temperature", "NONSENSE", 400, None),
    ("/nowhere", "HOST_INFO", 200, INFO),  # the path does not matter
])
def test_answers_follow_the_proposal(path: str, query: str, status: int, body: object) -> None:
    assert _answer(path, query) == (status, body)


def test_answers_show_the_values_of_the_moment_and_the_cache_stays_bounded() -> None:
    namespace = Namespace(TABLE, INFO)
    assert _answer("/temperature", "VALUE", namespace=namespace) == (200, {"VALUE": [0.7]})
    assert _answer("/temperature", "VALUE", VALUES | {"temperature": 0.5}, namespace) == (200, {"VALUE": [0.5]})
    assert _answer("/", "", VALUES | {"mode": "generate"}, namespace)[1]["CONTENTS"]["mode"]["VALUE"] == ["generate"]
    for n in range(CACHE * 2):
        assert _answer(f"/nowhere{n}", "", namespace=namespace)[0] == 404
    assert len(namespace._cache) <= CACHE


def test_host_info_names_the_osc_port_and_udp() -> None:
    assert INFO["OSC_PORT"] == 5710 and INFO["OSC_TRANSPORT"] == "UDP" and INFO["NAME"] == "Antiphon"
    assert INFO["EXTENSIONS"]["VALUE"] is True and INFO["EXTENSIONS"]["LISTEN"] is False


# --------------------------------------------------------------------------- each range is the handler's own


class _Anything:
    """Takes any call and answers nothing, so only a handler's own checks can refuse."""

    def __getattr__(self, name: str) -> _Anything:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return self

    def __iter__(self) -> Any:
        return iter(())

    def __bool__(self) -> bool:
        return False


class _Output(_Anything):
    """An output where the sender has a destination to stop at any port (so `/unsubscribe` is judged by its range)."""

    def remove_destination(self, *args: Any) -> bool:
        return True


class _Controls(_Anything):
    """Controls of a 2-value model (so `/gesture` takes x y, and `/note` plays)."""

    width = 2


REQUEST = Request(controls=_Controls(), output=_Output(),  # type: ignore[arg-type]
                  stats=SimpleNamespace(clamped=0, ignored=0), sender=("127.0.0.1", 9000), counters=dict, at=0.0, reply_error=lambda *args: None)


def _inside(p: Param) -> object:
    r = p.range
    assert r is not None
    if r.values:
        return r.values[0]
    if r.low is None:
        return r.high
    return _above(p, r.low) if r.open_low else r.low


def _above(p: Param, value: float) -> float | int:
    return value + 1 if p.kind == "int" else math.nextafter(value, math.inf)


def _below(p: Param, value: float) -> float | int:
    return value - 1 if p.kind == "int" else math.nextafter(value, -math.inf)


def _edges(p: Param) -> list[tuple[object, bool]]:
    """(value, accepted) at each edge of `p`'s declared range."""
    r = p.range
    assert r is not None
    if r.values:
        outside = "not-one-of-them" if p.kind == "str" else max(r.values) + 1  # type: ignore[operator]
        return [(v, True) for v in r.values] + [(outside, False)]
    edges: list[tuple[object, bool]] = []
    if r.low is not None:
        edges += [(r.low, not r.open_low), (_above(p, r.low), True), (_below(p, r.low), r.clipped)]
    if r.high is not None:
        edges += [(r.high, True), (_above(p, r.high), r.clipped)]
    return edges


CASES = [(a.path, i, value, accepted) for a in TABLE for i, p in enumerate(a.signature(2)[0]) if p.range is not None
         for value, accepted in _edges(p)]


@pytest.mark.parametrize(("path", "index", "value", "accepted"), CASES)
def test_each_declared_range_is_what_the_handler_accepts_at_its_edges(path: str, index: int, value: object,
                                                                       accepted: bool) -> None:
    a = TABLE.lookup[path]
    params, required = a.signature(2)
    args = [value if i == index else _inside(p) for i, p in enumerate(params[:max(index + 1, required)])]
    try:
        a.invoke(REQUEST, args)
    except ControlError as exc:
        assert not accepted, f"{path} {args} refused: {exc}"
    else:
        assert accepted, f"{path} {args} accepted, outside its declared range"


def test_every_handler_argument_with_limits_declares_them() -> None:
    """Only a free string (a model's name) goes without a range: a number always has one."""
    bare = [(a.path, p.name) for a in TABLE for p in a.signature(2)[0] if p.range is None]
    assert bare == [("/model", "name")]


def test_a_range_must_name_a_parameter_and_a_voice_gets_its_own() -> None:
    def handler(ctx, x: float) -> None:
        """Move."""

    with pytest.raises(TypeError, match="ranges name no parameter: y"):
        address("/x", ranges={"y": Range(0, 1)})(handler)
    real = TABLE.lookup["/temperature"].func
    copy = types.FunctionType(real.__code__, real.__globals__, real.__name__, real.__defaults__, real.__closure__)
    copy.__doc__, copy.__annotations__ = real.__doc__, real.__annotations__  # marking the real one would rename it
    spec = address("/t", state="temperature")(copy).osc_address
    assert spec.state == "temperature" and spec.params[1].range == Range(low=0)
    assert real.osc_address.path == "/temperature"


# --------------------------------------------------------------------------- over HTTP, in this process


@pytest.mark.parametrize(("header", "loopback"), [
    ("127.0.0.1:5713", True), ("localhost", True), ("LOCALHOST:80", True), ("[::1]:5713", True),
    ("127.9.9.9", True), ("evil.example:5713", False), ("192.168.1.2:5713", False), ("", False), (None, False),
    ("[::1", False),
])
def test_loopback_host_headers(header: str | None, loopback: bool) -> None:
    assert loopback_host(header) is loopback


def _get(app_args: dict[str, Any], path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async def run() -> tuple[int, Any]:
        app = oscquery_app(TABLE, lambda: VALUES, 5710, **app_args)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.get(path, headers=headers)
            body = await response.json() if response.content_type == "application/json" else None
            return response.status, body

    return asyncio.run(run())


def test_http_serves_the_tree_and_refuses_strangers() -> None:
    status, body = _get({}, "/temperature?VALUE")
    assert (status, body) == (200, {"VALUE": [0.7]})
    assert _get({}, "/")[1]["CONTENTS"]["mode"]["VALUE"] == ["listen"]
    assert _get({}, "/nowhere")[0] == 404
    assert _get({}, "/", {"Host": "evil.example"})[0] == 403  # a rebound name on loopback
    assert _get({"loopback_only": False}, "/", {"Host": "evil.example"})[0] == 200  # beyond loopback: any name
    from ipaddress import ip_network
    assert _get({"allow": [ip_network("10.0.0.0/8")]}, "/")[0] == 403  # --allow applies too
    assert _get({"allow": [ip_network("127.0.0.0/8")]}, "/")[0] == 200


# --------------------------------------------------------------------------- settings


def _config(*flags: str) -> Any:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return resolve_run_config(parser.parse_args(list(flags)))


def test_oscquery_is_off_unless_asked_and_the_bare_flag_takes_its_default_port(tmp_path: Any) -> None:
    assert (_config().oscquery, _config().advertise) == (None, False)
    assert _config("--oscquery").oscquery == DEFAULT_OSCQUERY_PORT == 5713
    assert _config("--oscquery", "0").oscquery == 0
    assert (_config("--oscquery", "--advertise").advertise, _config("--oscquery", "--advertise", "no").advertise) == (
        True, False)
    toml = tmp_path / "run.toml"
    toml.write_text("oscquery = 6000\nadvertise = true\n")
    cfg = _config("--config", str(toml))
    assert (cfg.oscquery, cfg.advertise) == (6000, True)


@pytest.mark.parametrize(("flags", "reason"), [
    (["--advertise"], "give --oscquery"),
    (["--oscquery", "65536"], "--oscquery: port must be 0-65535"),
    (["--oscquery", "x"], "--oscquery: expected an integer"),
])
def test_oscquery_settings_refused(flags: list[str], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        _config(*flags)


# --------------------------------------------------------------------------- mDNS, with a stand-in for zeroconf


def test_advertise_registers_both_services_off_the_loop_and_withdraws_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in `zeroconf` module: nothing here multicasts."""
    import sys

    from server.osc.advertise import OSC_SERVICE, SERVICE, advertise

    calls: list[tuple[str, object]] = []

    class Zeroconf:
        def __init__(self, ip_version: object) -> None:
            calls.append(("open", ip_version))

        def register_service(self, info: dict[str, Any], allow_name_change: bool) -> None:
            calls.append(("register", (info["kind"], info["name"], info["port"], tuple(info["parsed_addresses"]))))

        def unregister_all_services(self) -> None:
            calls.append(("unregister", None))

        def close(self) -> None:
            calls.append(("close", None))

    def service_info(kind: str, name: str, **fields: Any) -> dict[str, Any]:
        return {"kind": kind, "name": name, **fields}

    fake = SimpleNamespace(IPVersion=SimpleNamespace(V4Only="v4"), ServiceInfo=service_info, Zeroconf=Zeroconf,
                           get_all_addresses=lambda: ["192.0.2.7"])
    monkeypatch.setitem(sys.modules, "zeroconf", fake)
    advertise(5713, 5710, "0.0.0.0").close()
    assert calls == [("open", "v4"),
                     ("register", (SERVICE, f"Antiphon.{SERVICE}", 5713, ("192.0.2.7",))),
                     ("register", (OSC_SERVICE, f"Antiphon.{OSC_SERVICE}", 5710, ("192.0.2.7",))),
                     ("unregister", None), ("close", None)]


def test_advertise_without_zeroconf_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from server.osc.advertise import AdvertiseError, advertise

    monkeypatch.setitem(sys.modules, "zeroconf", None)  # import zeroconf now raises ImportError
    with pytest.raises(AdvertiseError, match="pip install zeroconf"):
        advertise(5713, 5710, "127.0.0.1")


def test_a_taken_port_stops_the_start_with_a_hint_and_a_free_one_serves(tmp_path: Any) -> None:
    import socket

    from server.app import StartupError, start_discovery

    engine: Any = SimpleNamespace(status=lambda asker: VALUES)

    async def start(port: int) -> str:
        discovery = await start_discovery(_config("--oscquery", str(port)), engine, 5710)
        assert discovery is not None
        try:
            return discovery.describe()
        finally:
            await discovery.close()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(StartupError, match="another server may be using that port: pick another with --oscquery"):
            asyncio.run(start(taken.getsockname()[1]))
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", asyncio.run(start(0)))
    assert asyncio.run(start_discovery(_config(), engine, 5710)) is None  # off unless asked


def test_host_info_names_the_osc_port_and_udp() -> None:
    from server.osc.oscquery import host_info

    info = host_info(5710)
    assert (info["OSC_PORT"], info["OSC_TRANSPORT"]) == (5710, "UDP")
