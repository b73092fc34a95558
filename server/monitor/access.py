"""Who may talk to the monitor: the Host names a browser may use, and the Origins a WebSocket may come from.

Comparing a WebSocket's Origin with its Host stops another site's page from steering
the monitor, but not DNS rebinding: a page at `http://evil.example:5712/` whose name
is then pointed at 127.0.0.1 is same-origin with itself, and its requests say
`Host: evil.example:5712`. So every request's Host must be on an allow-list — the
loopback names with the monitor's port, the address it was told to bind unless that
is a wildcard, and each `--allow-host` — and a WebSocket's Origin, when a browser
sends one, must be `http://` one of those. A client that is not a browser sends no
Origin and is judged by its Host alone.

The allow-list keeps other sites' pages out, not other machines: a monitor that
listens beyond loopback (`--host` not a loopback address) can be reached by anyone on
the network who types an allowed name. So it makes a token for the run
(`secrets.token_urlsafe`), prints it in the page's URL (`/?token=...`), and refuses the
page and the WebSocket without it (compared in constant time). On loopback no token is
needed: only this machine can connect, and the Host and Origin checks keep its browser's
other pages out.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from server.monitor import DEFAULT_HOST

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARDS = frozenset({"0.0.0.0", "[::]"})  # as `host_name` writes them
HTTP_PORT = 80  # a Host or Origin without a port means this one
TOKEN_BYTES = 32  # of randomness in a run's token (43 URL-safe characters)
TOKEN_PARAMETER = "token"  # the page's URL and the WebSocket's carry it as ?token=...

HostPort = tuple[str, int]

_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_HOST = re.compile(r"(?P<name>\[[^\]]*\]|[^:\[\]]+)(?::(?P<port>[0-9]{1,5}))?")


def host_name(text: str) -> str:
    """`text` as the allow-list compares it: lower case, an IPv6 address compressed in brackets; ValueError if not a host."""
    name = text.strip().lower()
    inner = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if ":" in inner:
        try:
            return f"[{ipaddress.IPv6Address(inner).compressed}]"
        except ValueError:
            raise ValueError(f"{text!r} is not a host name or address") from None
    if not _NAME.fullmatch(name):
        raise ValueError(f"{text!r} is not a host name or address")
    return name


def parse_host(value: str) -> HostPort | None:
    """A Host header's (or an Origin's) `name[:port]` as (host_name, port); None when malformed."""
    match = _HOST.fullmatch(value)
    if match is None:
        return None
    try:
        name = host_name(match["name"])
    except ValueError:
        return None
    port = int(match["port"]) if match["port"] else HTTP_PORT
    return (name, port) if 0 < port < 65536 else None


def allowed_hosts(port: int, binds: Iterable[str] = (DEFAULT_HOST,), extra: Iterable[str] = ()) -> frozenset[HostPort]:
    """The (host, port) pairs a request may name, all at `port`: loopback, each of `extra`, and each of
    `binds` (the host the monitor was told to bind and the address it got) but wildcards.
    """
    names = {host_name(n) for n in (*LOOPBACK_NAMES, *extra)}
    names.update(host_name(b) for b in binds if not is_wildcard(b))
    return frozenset((name, port) for name in names)


def host_allowed(header: str | None, allowed: frozenset[HostPort]) -> bool:
    """Whether a request's Host header names the monitor as it was told to be named (no header: refused)."""
    return header is not None and parse_host(header) in allowed


def origin_allowed(origin: str | None, allowed: frozenset[HostPort]) -> bool:
    """Whether a WebSocket's Origin is the monitor's own page; None (not a browser) passes, `null` does not."""
    if origin is None:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme != "http" or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        return False
    return parse_host(parts.netloc) in allowed


def is_wildcard(bind: str) -> bool:
    """Whether `bind` listens on every interface (so it names no host a browser could use)."""
    return not bind.strip("[] ") or host_name(bind) in WILDCARDS


def is_loopback(bind: str) -> bool:
    """Whether `bind` listens on this machine only: `localhost` or a loopback address (127.0.0.0/8, ::1)."""
    try:
        name = host_name(bind)
    except ValueError:
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:  # a name other than localhost: it may resolve anywhere
        return False


def run_token(binds: Iterable[str]) -> str | None:
    """A new token for a monitor bound to `binds`, or None when every one is loopback (no token needed)."""
    return None if all(is_loopback(b) for b in binds) else secrets.token_urlsafe(TOKEN_BYTES)


def token_allowed(given: str | None, token: str | None) -> bool:
    """Whether a request carries the run's token (any request does when there is none), in constant time."""
    if token is None:
        return True
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("ascii"))
