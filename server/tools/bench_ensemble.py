"""Bench phases for the ensemble: many voices at once, and how early timetagged bundles arrive.

Both start their own `run` subprocess (`server.tools.under_test.ServerUnderTest`): one with
`voices = per-sender` played by several sockets at once, one generating with `lookahead`
whose bundles are checked against the server's own log of when each event was due.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.osc.wire import bundle_messages, encode_message, is_bundle, timetag_seconds
from server.tools.under_test import ServerUnderTest
from server.tools.under_test import status as query_status


def voices_round_trip(model: str, log_dir: Path, voices: int = 8, rate: float = 100.0,
                      seconds: float = 5.0) -> dict[str, Any]:
    """`voices` sockets each send /gesture at `rate` (interleaved, on an absolute schedule); each answer is paired
    with the oldest unanswered input of the socket it came back to."""
    socks = []
    for _ in range(voices):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the --send copy of every voice: never read
    sink.bind(("127.0.0.1", 0))
    srv = ServerUnderTest(model, sink.getsockname()[1], log_dir, "accompany", 1e-6, "--voices", "per-sender")
    target = ("127.0.0.1", srv.port)
    try:
        n = int(rate * seconds)
        total = n * voices
        waiting: list[list[float]] = [[] for _ in socks]
        rtts: list[float] = []
        received = 0
        index = {s.fileno(): k for k, s in enumerate(socks)}
        messages = [encode_message("/gesture", 0.5 + 0.4 * float(np.sin(j // voices / 15 + j % voices * 0.7)),
                                   0.5 + 0.4 * float(np.cos(j // voices / 23 + j % voices * 0.7))) for j in range(total)]
        time.sleep(0.3)
        start = time.monotonic() + 0.05
        period = 1.0 / (rate * voices)
        i = 0
        end = start + seconds + 2.0
        while time.monotonic() < end and received < total:
            now = time.monotonic()
            if i < total and now >= start + i * period:
                k = i % voices
                socks[k].sendto(messages[i], target)
                waiting[k].append(time.monotonic())
                i += 1
                continue
            wait = (start + i * period - now) if i < total else end - now
            readable, _, _ = select.select(socks, [], [], max(wait, 0.0))
            for s in readable:
                k = index[s.fileno()]
                while True:
                    try:
                        data = s.recv(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    if data.startswith(b"/prediction") and waiting[k]:
                        rtts.append(time.monotonic() - waiting[k].pop(0))
                        received += 1
        status = query_status(socks[1], srv.port)
    finally:
        srv.stop()
        for s in (*socks, sink):
            s.close()
    rtt = np.array(rtts)
    return {
        "voices": voices, "rate_each": rate, "sent": i, "received": received,
        "median_us": float(np.median(rtt) * 1e6) if len(rtt) else None,
        "p99_us": float(np.percentile(rtt, 99) * 1e6) if len(rtt) else None,
        "server_voices": status.get("voices"), "step_us_median": status.get("step_us_median"),
    }


def lookahead_timing(model: str, sock: socket.socket, log_dir: Path, lookahead: float = 0.05,
                     seconds: float = 10.0) -> dict[str, Any]:
    """Generate at timescale 1 with `lookahead`: how early each bundle arrives before its timetag, and how far the
    timetag is from the time the server scheduled (its log, on one fixed wall-minus-monotonic offset)."""
    srv = ServerUnderTest(model, sock.getsockname()[1], log_dir, "generate", 1.0, "--lookahead", str(lookahead))
    tags: list[float] = []
    early: list[float] = []
    plain = 0
    try:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                continue
            data = sock.recv(65536)
            arrived = time.time()
            if not is_bundle(data):
                plain += data.startswith(b"/prediction")
                continue
            if any(m.startswith(b"/prediction") for m in bundle_messages(data)):
                tag = timetag_seconds(int.from_bytes(data[8:16], "big"))
                tags.append(tag)
                early.append(tag - arrived)
    finally:
        srv.stop()
    logs = sorted(log_dir.glob("*.csv"))
    logged = [float(line.split(",")[0]) for line in logs[-1].read_text().splitlines()[1:] if ",model," in line] if logs else []
    n = min(len(tags), len(logged))
    offset = np.array(tags[:n]) - np.array(logged[:n])
    e = np.array(early)
    return {
        "lookahead_s": lookahead, "seconds": seconds, "bundles": len(tags), "plain_messages": plain,
        "early_ms_median": float(np.median(e) * 1e3) if len(e) else None,
        "early_ms_p1": float(np.percentile(e, 1) * 1e3) if len(e) else None,
        "timetag_minus_scheduled_us_median": float(np.median(offset) * 1e6) if n else None,
        "timetag_minus_scheduled_us_spread_p1_p99": float((np.percentile(offset, 99) - np.percentile(offset, 1)) * 1e6)
        if n else None,
    }
