"""`run --advertise`: announce the OSCQuery server (`_oscjson._tcp`) and the OSC port (`_osc._udp`) over mDNS.

OSCQuery clients (ossia score, Chataigne, VDMX) browse for the first; tools that find
plain OSC services over Zeroconf (TouchOSC's connection browser) for the second. Only when asked, because it multicasts to the whole network. zeroconf is imported here
when `advertise` is called, never before, so a server without `--advertise` never loads
it. It runs in zeroconf's own thread (registering probes the network for seconds),
never on the live loop.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

log = logging.getLogger(__name__)

SERVICE = "_oscjson._tcp.local."
OSC_SERVICE = "_osc._udp.local."
INSTANCE = "Antiphon"  # zeroconf renames it ("Antiphon (2)") when another is on the network


class AdvertiseError(RuntimeError):
    """mDNS is unavailable (zeroconf missing); the message says what to install."""


class Advertisement:
    """The registered services; `close` withdraws them."""

    service = f"{SERVICE} and {OSC_SERVICE}"

    def __init__(self, zeroconf: Any, infos: list[Any]) -> None:
        self._zeroconf = zeroconf
        self._infos = infos
        self._registered = threading.Thread(target=self._register, name="mdns", daemon=True)
        self._registered.start()

    def _register(self) -> None:
        try:
            for info in self._infos:
                self._zeroconf.register_service(info, allow_name_change=True)
        except Exception as exc:  # noqa: BLE001  # the network refused; the server plays on without it
            log.warning("mDNS registration failed (not advertised; the server plays on): %s", exc)

    def close(self) -> None:
        self._registered.join(timeout=10.0)
        self._zeroconf.unregister_all_services()
        self._zeroconf.close()


def advertise(http_port: int, osc_port: int, host: str) -> Advertisement:
    """Announce OSCQuery at `http_port` and OSC at `osc_port` on `host`'s address (every IPv4 one for a wildcard)."""
    try:
        from zeroconf import IPVersion, ServiceInfo, Zeroconf, get_all_addresses
    except ImportError:
        raise AdvertiseError('--advertise needs the zeroconf package: pip install "antiphon[advertise]" (or pip install zeroconf)') from None
    wildcard = host in ("", "0.0.0.0", "::")
    addresses = get_all_addresses() if wildcard else [socket.gethostbyname(host)]
    name = socket.gethostname().split(".")[0] or "antiphon"
    infos = [ServiceInfo(kind, f"{INSTANCE}.{kind}", port=port, parsed_addresses=addresses, server=f"{name}.local.",
                         properties={}) for kind, port in ((SERVICE, http_port), (OSC_SERVICE, osc_port))]
    return Advertisement(Zeroconf(ip_version=IPVersion.V4Only), infos)
