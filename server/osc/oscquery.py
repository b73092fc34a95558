"""The OSC namespace as an OSCQuery tree (the Vidvox OSCQuery proposal), built from the address table.

A tool that speaks OSCQuery (ossia score, Chataigne, TouchOSC's and Max's OSCQuery
clients) reads this JSON over HTTP and can list and bind every control without our
docs. Everything comes from the handler declarations in `server.osc.namespace`: each
address's required arguments are its `TYPE` (its optional ones are `OVERLOADS`, the
proposal's way to say a method takes other type tag strings too), each declared
`Range` its `RANGE` (and `CLIPMODE` where values are clamped), its docstring's first
line its `DESCRIPTION`, and a control with a `state` key is readable: its `VALUE` is
read from `/status` at request time, so it follows every live change.

The proposal has no open interval: an argument that must be above its minimum
(`/timescale` > 0) shows that minimum, and its description says the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from server.osc.table import Address, AddressTable, Param, Range

TAGS = {"float": "f", "int": "i", "str": "s"}  # a Param's kind -> its OSC type tag
NONE, READ, WRITE = 0, 1, 2  # ACCESS bits
NAME = "Antiphon"
DEFAULT_OSCQUERY_PORT = 5713  # the bare `--oscquery` flag's port (OSC is 5710-5711, the monitor 5712)
# The proposal's optional attributes this server fills in (HOST_INFO's EXTENSIONS says so to clients).
EXTENSIONS: dict[str, bool] = {"ACCESS": True, "VALUE": True, "RANGE": True, "DESCRIPTION": True, "CLIPMODE": True,
                               "OVERLOADS": True, "TAGS": False, "EXTENDED_TYPE": False, "UNIT": False,
                               "CRITICAL": False, "HTML": False, "LISTEN": False, "PATH_CHANGED": False}
ATTRIBUTES = frozenset({"FULL_PATH", "CONTENTS", "TYPE", *(k for k, on in EXTENSIONS.items() if on)})
HOST_INFO = "HOST_INFO"
CACHE = 64  # encoded answers kept (by path, query and the values they show); beyond this the cache starts again

Node = dict[str, Any]


class NotFound(LookupError):
    """No container or method at that OSC path (HTTP 404)."""


def _range(r: Range | None, kind: str) -> dict[str, Any] | None:
    if r is None:
        return None
    if r.values:
        return {"VALS": list(r.values)}
    cast = int if kind == "int" else float
    bounds = {"MIN": r.low, "MAX": r.high}
    return {key: cast(value) for key, value in bounds.items() if value is not None}


def _signature(params: Iterable[Param]) -> Node:
    """TYPE, RANGE and CLIPMODE for one type tag string; RANGE/CLIPMODE only where some argument has one."""
    params = tuple(params)
    out: Node = {"TYPE": "".join(TAGS[p.kind] for p in params)}
    ranges = [_range(p.range, p.kind) for p in params]
    if any(ranges):
        out["RANGE"] = ranges
    if any(p.range is not None and p.range.clipped for p in params):
        out["CLIPMODE"] = ["both" if p.range is not None and p.range.clipped else "none" for p in params]
    return out


def method(a: Address, width: int = 2) -> Node:
    """One address's node, without its VALUE (see `with_values`), for a model of ``width`` values per event."""
    params, required_count = a.signature(width)
    required = params[:required_count]
    node: Node = {"FULL_PATH": a.path, "DESCRIPTION": a.summary, "ACCESS": WRITE | (READ if a.state else NONE),
                  **_signature(required)}
    overloads = [_signature(params[:n]) for n in range(required_count + 1, len(params) + 1)]
    if overloads:
        node["OVERLOADS"] = overloads
    return node


def tree(table: AddressTable, width: int = 2) -> Node:
    """The whole namespace: the root container, each path segment a container node, each address a method node
    (`/gesture` takes the ``width`` values the playing model takes)."""
    root: Node = {"FULL_PATH": "/", "DESCRIPTION": f"{NAME}: a real-time predictive performance server",
                  "ACCESS": NONE, "CONTENTS": {}}
    for a in table:
        parent = root
        segments = a.path.strip("/").split("/")
        for depth, name in enumerate(segments[:-1], 1):
            contents = parent.setdefault("CONTENTS", {})
            parent = contents.setdefault(name, {"FULL_PATH": "/" + "/".join(segments[:depth]), "ACCESS": NONE})
        contents = parent.setdefault("CONTENTS", {})
        children = contents.get(segments[-1], {}).get("CONTENTS")  # a container met first keeps its children
        contents[segments[-1]] = method(a, width) | ({"CONTENTS": children} if children else {})
    return root


def with_values(node: Node, values: Mapping[str, object]) -> Node:
    """A copy of `node` and its children with each readable method's VALUE from `values` (OSC path -> value)."""
    out = dict(node)
    if node.get("FULL_PATH") in values:
        out["VALUE"] = [values[node["FULL_PATH"]]]
    if "CONTENTS" in node:
        out["CONTENTS"] = {name: with_values(child, values) for name, child in node["CONTENTS"].items()}
    return out


def find(root: Node, path: str) -> Node:
    """The node at OSC `path` ("/" or "" is the root; a trailing slash is ignored), or NotFound."""
    node = root
    for name in (s for s in path.split("/") if s):
        node = node.get("CONTENTS", {}).get(name)
        if node is None:
            raise NotFound(path)
    return node


def host_info(osc_port: int, osc_ip: str | None = None) -> Node:
    """`?HOST_INFO`: where the OSC server listens, over what, and which optional attributes this server fills."""
    info: Node = {"NAME": NAME, "OSC_PORT": osc_port, "OSC_TRANSPORT": "UDP", "EXTENSIONS": dict(EXTENSIONS)}
    if osc_ip is not None:
        info["OSC_IP"] = osc_ip
    return info


def answer(root: Node, path: str, query: str, info: Node) -> tuple[int, Node | None]:
    """The HTTP status and JSON body for `GET path?query`, as the proposal says.

    No query: the node and everything under it. `?HOST_INFO`: the host's description,
    whatever the path. `?ATTRIBUTE`: `{ATTRIBUTE: ...}`, or `{}` when the node has none;
    VALUE of a write-only method is 204 (no content). An attribute this server does not
    fill is 400; a path with no node is 404.
    """
    attribute = query.split("&", 1)[0].split("=", 1)[0]
    if attribute == HOST_INFO:
        return 200, info
    try:
        node = find(root, path)
    except NotFound:
        return 404, None
    if not attribute:
        return 200, node
    if attribute not in ATTRIBUTES:
        return 400, None
    if attribute == "VALUE" and not node.get("ACCESS", NONE) & READ:
        return 204, None
    return 200, ({attribute: node[attribute]} if attribute in node else {})


class Namespace:
    """The table's tree, built once; each answer shows the values read at request time, encoded once per change.

    A full tree is ~10 kB of JSON (~0.2 ms to encode): a client that polls it costs the
    loop one `/status` read and a dict lookup until a value changes.
    """

    def __init__(self, table: AddressTable, info: Node) -> None:
        self._table = table
        self._roots: dict[int, Node] = {2: tree(table)}  # by the playing model's width: a swap changes /gesture's TYPE
        self.info = info
        self._states = tuple((a.path, a.state) for a in table if a.state is not None and a.required == 1)
        self._cache: dict[tuple[str, str, int, tuple[object, ...]], tuple[int, bytes | None]] = {}

    def values(self, status: Mapping[str, object]) -> dict[str, object]:
        """OSC path -> current value, from the `/status` items."""
        return {path: status[key] for path, key in self._states if key in status}

    def answer(self, path: str, query: str, status: Callable[[], Mapping[str, object]]) -> tuple[int, bytes | None]:
        """(HTTP status, JSON body or None) for `GET path?query`; `status` reads the `/status` items now."""
        now = status()
        values = self.values(now)
        width = int(now.get("dims", 2))
        key = (path, query, width, tuple(values.items()))
        found = self._cache.get(key)
        if found is None:
            if width not in self._roots:
                self._roots[width] = tree(self._table, width)
            code, body = answer(with_values(self._roots[width], values), path, query, self.info)
            found = code, None if body is None else json.dumps(body).encode()
            if len(self._cache) >= CACHE:
                self._cache.clear()
            self._cache[key] = found
        return found
