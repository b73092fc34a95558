"""The streams of what the model thinks, over loopback: /subscribe, /mixture, /surprise, pushed /status."""

from __future__ import annotations

import time

import numpy as np
import pytest

from server.osc.namespace import STATUS_PUSH_HZ
from tests.live import OscPeer, start_server


@pytest.fixture
def served(tmp_path):
    peer = OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{peer.port}", "--timescale", "0.01", "--seed", "2")
    peer.target = ("127.0.0.1", srv.port)
    yield srv, peer
    assert srv.stop() == 0
    peer.close()


def test_surprise_is_low_for_a_continuation_and_high_for_a_jump(served):
    srv, peer = served
    peer.send("/subscribe", "surprise")
    peer.status()
    start = time.monotonic()
    for i in range(40):  # a slow straight stroke, 40 ms apart
        time.sleep(max(0.0, start + i * 0.04 - time.monotonic()))
        peer.send("/gesture", 0.3 + 0.005 * i, 0.5)
    time.sleep(0.04)
    peer.send("/gesture", 0.98, 0.02)  # a jump across the pad
    got = [args for _, _, args in peer.receive(10.0, "/surprise", count=41)]
    assert len(got) == 41 and all(len(a) == 2 for a in got)
    stroke = [nll for nll, _ in got[10:40]]
    jump = got[40][0]
    assert jump > np.median(stroke) + 5.0, (jump, np.median(stroke))
    smoothed = [s for _, s in got]
    assert smoothed[40] > smoothed[39]  # the running figure moves towards the jump


def test_mixture_comes_with_each_prediction_and_describes_a_distribution(served):
    srv, peer = served
    peer.send("/subscribe", "mixture")
    peer.send("/temperature", 0.5)
    peer.status()
    for i in range(10):  # slower than the streams' STREAM_RATE (30 a second), so every prediction has its /mixture
        peer.send("/gesture", 0.2 + 0.05 * i, 0.6)
        time.sleep(0.04)
    got = peer.receive(10.0, "/mixture", count=10)
    assert len(got) == 10
    for _, _, args in got:
        k = args[0]
        assert isinstance(k, int) and len(args) == 1 + k + 6 * k
        weights = np.array(args[1 : 1 + k])
        assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-4
        comps = np.array(args[1 + k :]).reshape(k, 6)
        assert np.all(comps[:, 0] >= 0)  # dt medians in seconds
        assert np.all((comps[:, 1:3] >= 0) & (comps[:, 1:3] <= 1))
        assert np.all(comps[:, 3:] > 0)
    peer.send("/unsubscribe", "mixture")
    peer.status()
    peer.send("/gesture", 0.5, 0.5)
    assert peer.receive(10.0, "/prediction", count=1)
    assert peer.receive(0.2, "/mixture") == []  # and the prediction did come, so nothing was lost


def test_status_is_pushed_at_a_steady_rate_until_unsubscribed(served):
    """Over loopback: pushes come, no faster than 4 a second, and stop. Bounds a busy machine cannot break:
    the pusher's absolute schedule puts any two pushes but one at least a period apart, however late its
    timer runs; the exact rate is checked on the loop's clock below."""
    srv, peer = served
    peer.send("/subscribe", "status")
    got = peer.receive(10.0, "/status", count=7)
    assert len(got) == 7, len(got)
    times = [t for t, _, _ in got]  # kernel arrival stamps: a late reader does not squeeze them
    period = 1.0 / STATUS_PUSH_HZ
    assert all(b - a >= period - 0.01 for a, b in zip(times, times[2:])), np.diff(times)
    assert 5 * period - 0.01 <= times[-1] - times[0] <= 6 * period + 1.0, np.diff(times)
    assert dict(zip(got[-1][2][::2], got[-1][2][1::2]))["mode"] == "accompany"
    peer.send("/unsubscribe", "status")
    peer.drain(0.3)
    quiet = peer.receive(0.8, "/status")
    assert quiet == []
    assert peer.status()["mode"] == "accompany"  # polling still answers


def test_status_pushes_keep_their_rate_on_the_loop_clock():
    """`STATUS_PUSH_HZ` a second exactly, on an absolute schedule; after a stall the missed pushes are not sent
    in a burst; stopped, no timer is left."""
    from server.osc.streams import StatusPusher
    from tests.rig import VirtualLoop

    loop = VirtualLoop()
    times: list[float] = []
    period = 1.0 / STATUS_PUSH_HZ
    pusher = StatusPusher(loop, lambda: times.append(loop.time()), period)
    start = loop.time()
    pusher.start()
    loop.advance(10.0)
    assert len(times) == 10 * STATUS_PUSH_HZ + 1 and times[0] == start
    assert np.allclose(np.diff(times), period)
    loop.stall(10 * period)  # ten pushes missed
    stalled = len(times)
    loop.advance(1.0)
    assert len(times) - stalled <= STATUS_PUSH_HZ + 1, np.array(times[stalled:]) - start  # not 10 at once
    assert min(np.diff(times[stalled - 1:])) >= period - 1e-9  # not even two at once: one late push, then steady
    assert np.allclose(np.diff(times[-3:]), period)  # and steady again
    pusher.stop()
    stopped = len(times)
    loop.advance(5.0)
    assert len(times) == stopped


def test_unknown_streams_and_bad_ports_are_refused(served):
    srv, peer = served
    reply = peer.request("/subscribe", "gossip", reply="/error")
    assert reply[0] == "/subscribe" and "mixture" in reply[1] and "surprise" in reply[1]
    reply = peer.request("/subscribe", "status", 70000, reply="/error")
    assert "port" in reply[1]


def test_prediction_can_be_subscribed_on_another_port_and_unsubscribed(served):
    srv, peer = served
    other = OscPeer()
    try:
        peer.send("/subscribe", "prediction", other.port)
        peer.status()
        peer.send("/gesture", 0.4, 0.4)
        assert other.receive(10.0, "/prediction", count=1)
        peer.send("/unsubscribe", "prediction", other.port)
        peer.status()
        peer.send("/gesture", 0.4, 0.4)
        assert peer.receive(10.0, "/prediction", count=1)  # --send still gets it
        assert other.receive(0.3, "/prediction") == []
    finally:
        other.close()


def test_performer_events_are_streamed_for_displays(served):
    srv, peer = served
    peer.send("/subscribe", "performer")
    peer.status()
    peer.send("/gesture", 0.25, 0.75)
    got = peer.receive(10.0, "/performer", count=1)
    assert got and got[0][2] == pytest.approx([0.25, 0.75])


def test_run_monitor_starts_the_monitor_beside_the_server_and_stops_it(tmp_path):
    import re
    import subprocess
    import urllib.request

    srv = start_server(tmp_path, "--monitor", "--monitor-port", "0")
    try:
        end = time.monotonic() + 30
        url = None
        while url is None and time.monotonic() < end:
            found = [re.search(r"monitor: (http://127\.0\.0\.1:\d+/)", line) for line in srv.output]
            url = next((m.group(1) for m in found if m), None)
            time.sleep(0.1)
        assert url, "".join(srv.output)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
        page = opener.open(url, timeout=10).read().decode()
        assert "Antiphon" in page
    finally:
        assert srv.stop() == 0
    pattern = f"server monitor.*--server 127.0.0.1:{srv.port}"
    assert subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 1, "the monitor outlived run"
