"""`soak`: play a real server over loopback for a long time and watch latency and memory window by window.

A steady `/gesture` stream in `accompany` with a near-zero timescale, cut into windows;
each window reports messages sent and answered, round-trip percentiles and the
server's resident memory. A leak shows as RSS climbing window after window, a backlog
as latency climbing. Also the flood driver (several clients at a fixed rate) that the
flood tests use, and a reader of a process's RSS.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.tools.bench import ServerUnderTest, round_trip, status
from server.osc.wire import encode_message

STATUS_KEYS = ("inputs", "outputs", "dropped", "osc_received", "osc_coalesced", "osc_kernel_drops",
               "osc_rejected", "osc_internal_errors", "osc_batch_max", "step_us_median", "step_us_p99")


def rss_kib(pid: int) -> int:
    """Resident set size of process `pid` in KiB (Linux `/proc/<pid>/status` VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass(frozen=True)
class FloodResult:
    sent: int
    send_errors: int
    seconds: float


def flood(port: int, rate: float, seconds: float, clients: int = 2, host: str = "127.0.0.1") -> FloodResult:
    """Send `/gesture` from `clients` sockets (one thread each) at `rate` messages/s each for `seconds`.

    Each client keeps an absolute schedule, sending in small bursts to catch up after
    every sleep, so the average rate holds even though a sleep lasts longer than one
    message's share of a second.
    """
    total = int(rate * seconds)
    messages = [encode_message("/gesture", (i % 97) / 96, (i % 89) / 88) for i in range(997)]
    counts = [(0, 0)] * clients
    start = time.monotonic() + 0.01

    def client(k: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sent = errors = 0
        burst = max(1, int(rate / 1000))  # about one burst per millisecond
        try:
            while sent < total:
                due = min(total, int((time.monotonic() - start) * rate) + 1)
                while sent < due:
                    try:
                        sock.sendto(messages[(sent + k * 331) % len(messages)], (host, port))
                    except OSError:
                        errors += 1
                    sent += 1
                time.sleep(max(0.0, start + (sent + burst) / rate - time.monotonic()))
        finally:
            sock.close()
        counts[k] = (sent, errors)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return FloodResult(sum(c[0] for c in counts), sum(c[1] for c in counts), time.monotonic() - start)


def run_soak(model: str, seconds: float, rate: float = 1000.0, window: float = 10.0) -> dict[str, Any]:
    """Start `python -m server run`, drive it for `seconds` in windows of `window` s, stop it; the results."""
    if seconds <= 0 or rate <= 0 or window <= 0:
        raise ValueError("seconds, rate and window must be > 0")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    windows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as logs:
        srv = ServerUnderTest(model, sock.getsockname()[1], Path(logs))
        try:
            round_trip(sock, srv.port, 200.0, 0.5)  # warm up: first-call costs are not what a soak measures
            st = status(sock, srv.port)  # also warms up the /status path
            rss_start = rss_kib(srv.proc.pid)
            played = 0.0  # seconds of stream so far; windows run back to back
            while played < seconds:
                length = min(window, seconds - played)
                cpu0, t0 = srv.cpu_seconds(), time.monotonic()
                stats = round_trip(sock, srv.port, rate, length)
                cpu = 100 * (srv.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                previous, st = st, status(sock, srv.port)
                windows.append({"start_s": played, "seconds": length, **stats, "cpu_percent": cpu,
                                "rss_kib": rss_kib(srv.proc.pid), **_lost(previous, st)})
                played += length
        finally:
            code = srv.stop()
            sock.close()
    return {
        "model": model,
        "rate": rate,
        "seconds": seconds,
        "rss_start_kib": rss_start,
        "windows": windows,
        "server_status": {k: st.get(k) for k in STATUS_KEYS},
        "exit_code": code,
    }


def _lost(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Inputs the server superseded (flood policy) or the kernel dropped during one window."""
    return {key: int(after.get(f"osc_{key}") or 0) - int(before.get(f"osc_{key}") or 0)
            for key in ("coalesced", "kernel_drops")}


def format_soak(r: dict[str, Any]) -> str:
    """The soak result as a plain-text table."""
    lines = [
        f"soak: {r['seconds']:g} s of /gesture at {r['rate']:g}/s, accompany, timescale 1e-6, model {r['model']}",
        "",
        "  window s    sent   recv  coalesced   median us   p99 us   last-tenth median us   CPU %   RSS MiB",
    ]
    for w in r["windows"]:
        end = w["start_s"] + w["seconds"]
        skipped = w["sent"] > w["received"]
        lines.append(
            f"  {w['start_s']:>3.0f}-{end:<4.0f} {w['sent']:>7} {w['received']:>6} {w['coalesced']:>10}"
            f" {w['median_us'] or 0:>11.0f}{'*' if skipped else ' '}{w['p99_us'] or 0:>8.0f}"
            f" {w['last_tenth_median_us'] or 0:>22.0f} {w['cpu_percent']:>7.1f} {w['rss_kib'] / 1024:>9.1f}"
        )
    if any(w["sent"] > w["received"] for w in r["windows"]):
        lines.append("  * answers missing: the i-th answer is paired with the i-th message, so these latencies are"
                     " upper bounds")
    last = r["windows"][-1]["rss_kib"] if r["windows"] else r["rss_start_kib"]
    sent = sum(w["sent"] for w in r["windows"])
    received = sum(w["received"] for w in r["windows"])
    lines += [
        "",
        f"RSS {r['rss_start_kib'] / 1024:.1f} MiB at start, {last / 1024:.1f} MiB at the end "
        f"({(last - r['rss_start_kib']) / 1024:+.1f} MiB); {received} of {sent} answered; server exit code {r['exit_code']}",
        f"server counters: {r['server_status']}",
    ]
    return "\n".join(lines)


def soak_ok(r: dict[str, Any]) -> bool:
    """True if the server answered every message and exited cleanly."""
    sent = sum(w["sent"] for w in r["windows"])
    return r["exit_code"] == 0 and sent > 0 and sum(w["received"] for w in r["windows"]) == sent
