"""A flood against a running server: 20,000 /gesture per second from each of two clients for 5 s.

Memory must stay bounded, every datagram must be accounted for (read, or dropped by a
full kernel buffer and counted), superseded positions must show in `/status`, and after
the flood every /gesture must be answered. How fast it recovers is printed, not judged:
on a shared 2-core machine a wall-clock bound is a flake; speed is `antiphon bench`'s and `soak`'s to measure.
"""

from __future__ import annotations

import socket
import statistics
import time
from pathlib import Path

from server.tools.soak import flood, rss_kib
from tests.live import OscPeer, start_server

RATE = 20_000  # per client
SECONDS = 5.0
CLIENTS = 2


def _drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65536)
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)


def test_flood_from_two_clients_is_bounded_counted_and_recovers(tmp_path: Path) -> None:
    peer = OscPeer()
    # the input flood policy is under test here, not the output limit: max_rate out of the way
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{peer.port}", "--timescale", "1e-6", "--seed", "1",
                       "--max-rate", "1e6")
    peer.target = ("127.0.0.1", srv.port)
    try:
        for i in range(50):  # warm up, so first-call allocations are not counted as growth
            peer.send("/gesture", i / 50, 0.5)
        before = peer.status()
        rss_before = rss_kib(srv.proc.pid)

        result = flood(srv.port, RATE, SECONDS, clients=CLIENTS)
        ended = time.monotonic()
        # The server reads the backlog the flood left in its socket: a /status answered means it is through (one
        # sent into a full buffer is dropped and counted, so ask again), then our gesture cannot be dropped.
        statuses = 0
        settled = time.monotonic() + 60
        while True:
            peer.send("/status")
            statuses += 1
            if peer.receive(2.0, "/status", count=1):
                break
            assert time.monotonic() < settled, "no /status reply within 60 s of the flood's end"
        _drain(peer.sock)  # answers to the flood, not to us
        peer.send("/gesture", 0.25, 0.75)
        peer.send("/status")  # a barrier: the server has read everything sent before it
        statuses += 1
        got: list = []
        while not got or got[-1][1] != "/status":
            more = peer.receive(10.0, count=1)
            assert more, "no /status reply after the flood"
            got += more
        after = dict(zip(got[-1][2][::2], got[-1][2][1::2]))
        answers = [m for m in got if m[1] == "/prediction"]  # ours is the last, answered before the barrier
        assert answers, "no answer to the /gesture sent after the flood"
        recovered = answers[-1][0] - ended
        rss_after = rss_kib(srv.proc.pid)

        rtts = []
        for i in range(10):
            peer.drain(0.01)
            t0 = time.monotonic()
            peer.send("/gesture", i / 10, 0.5)
            got = peer.receive(10.0, "/prediction", count=1)
            assert got, f"gesture {i} after the flood was not answered"
            rtts.append(got[0][0] - t0)

        sent = after["osc_received"] - before["osc_received"] + after["osc_kernel_drops"] - before["osc_kernel_drops"]
        print(
            f"\nflood: {result.sent} messages from {CLIENTS} clients in {result.seconds:.2f} s; "
            f"RSS {rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after; "
            f"read {after['osc_received'] - before['osc_received']}, kernel drops "
            f"{after['osc_kernel_drops'] - before['osc_kernel_drops']}, coalesced "
            f"{after['osc_coalesced'] - before['osc_coalesced']}, model steps {after['inputs'] - before['inputs']}, "
            f"largest batch {after['osc_batch_max']}; answered {recovered * 1e3:.1f} ms after the flood; "
            f"then round trip median {statistics.median(rtts) * 1e6:.0f} us, max {max(rtts) * 1e6:.0f} us"
        )
        assert result.sent == CLIENTS * int(RATE * SECONDS) and result.send_errors == 0
        assert sent == result.sent + 1 + statuses  # every datagram read or counted as dropped (+ our /gesture, /status)
        fates = sum(after[k] - before[k] for k in ("inputs", "osc_coalesced", "osc_kernel_drops"))
        assert fates == result.sent + 1  # each position reached the model, was superseded or was dropped: all counted
        assert after["osc_internal_errors"] == 0 and after["osc_rejected"] == 0
        assert rss_after - rss_before < 16 * 1024, "memory grew during the flood"
    finally:
        assert srv.stop() == 0
        peer.close()
