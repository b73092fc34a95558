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

from collections.abc import Iterable, Mapping
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


def method(a: Address, values: Mapping[str, object]) -> Node:
    """One address's node; `values` are the `/status` items (its VALUE is `values[a.state]`)."""
    required = a.params[:a.required]
    node: Node = {"FULL_PATH": a.path, "DESCRIPTION": a.summary, "ACCESS": WRITE | (READ if a.state else NONE),
                  **_signature(required)}
    overloads = [_signature(a.params[:n]) for n in range(a.required + 1, len(a.params) + 1)]
    if overloads:
        node["OVERLOADS"] = overloads
    if a.state is not None and a.state in values and len(required) == 1:
        node["VALUE"] = [values[a.state]]
    return node


def tree(table: AddressTable, values: Mapping[str, object]) -> Node:
    """The whole namespace: the root container, each path segment a container node, each address a method node."""
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
        contents[segments[-1]] = method(a, values) | ({"CONTENTS": children} if children else {})
    return root


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
