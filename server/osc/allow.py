"""Who may send: the `--allow` networks, checked per datagram, and the warning when OSC is reachable from elsewhere."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from server.osc.udp import Address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_CACHE = 4096  # hosts whose verdict is remembered; beyond this the cache starts again


class AllowList:
    """Senders in any of the networks (none given: everyone); each host's verdict cached, so a check is one dict hit."""

    def __init__(self, networks: Sequence[Network] = ()) -> None:
        self.networks = tuple(networks)
        self._verdicts: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def allows(self, host: str) -> bool:
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = in_networks(host, self.networks)
            if len(self._verdicts) >= MAX_CACHE:
                self._verdicts.clear()
            self._verdicts[host] = verdict
        return verdict


def in_networks(host: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 senders as ::ffff:a.b.c.d
    return any(ip in net for net in networks)


def is_loopback(host: str) -> bool:
    """Whether a sender's address is this machine's loopback (127/8, ::1, or ::ffff:127.x on a dual-stack socket)."""
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def exposure_warning(sockname: Address, allow: Sequence[Network] = ()) -> str | None:
    """Why listening on `sockname` (the bound address) deserves a warning, or None for loopback.

    Judged from the address actually bound, so a host name or `0.0.0.0` is seen for
    what it is.
    """
    host = str(sockname[0]).split("%", 1)[0]
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip is not None and ip.is_loopback:
        return None
    where = "every interface" if ip is not None and ip.is_unspecified else host
    if allow:
        return (f"OSC is listening on {where}, not only this machine; "
                f"accepting senders in {', '.join(map(str, allow))} only")
    return (f"OSC is listening on {where}, not only this machine: anyone who can reach it can play "
            "and steer the server; limit senders with --allow CIDR")
