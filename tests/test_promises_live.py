"""The per-voice temperatures and the `/mixture` stream's temperatures, through a real server over loopback UDP.

What the virtual-clock tests in `tests/test_promises_engine.py` show of the engine, shown
here through the OSC namespace: `/temperature 0 <voice>` and `/sigma_temperature 0 <voice>`
make that voice answer a phrase the same way every time (and nobody else), and `/mixture`
follows `/temperature` and `/sigma_temperature`.

A phrase is one OSC bundle after `/reset <voice>`: its gestures share one arrival time, so
every dt the model hears is exactly 0 and no timing jitter reaches the answers. Every wait
is for what it means, with a deadline; a take in which the server dropped an answer for a
stall (`late_dropped`, `rate_dropped`: a busy machine) is played again rather than judged.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.live import OscPeer, bundle, start_server

PHRASE = [(0.1, 0.9), (0.9, 0.1), (0.1, 0.1), (0.9, 0.9), (0.5, 0.5), (0.2, 0.7)]  # fewer than a chord of 8
DEADLINE = 10.0  # seconds: what a wait may take on a busy machine before the test says why it failed


def peer_for(port: int) -> OscPeer:
    peer = OscPeer()
    peer.target = ("127.0.0.1", port)
    return peer



def wait_for(peer: OscPeer, condition: Callable[[dict], bool], what: str) -> dict:
    end = time.monotonic() + DEADLINE
    while True:
        status = peer.status()
        if condition(status):
            return status
        assert time.monotonic() < end, f"gave up waiting for {what}: {status}"
        time.sleep(0.02)


def drops(status: dict) -> tuple[int, int]:
    return status["late_dropped"], status["rate_dropped"]


def take(peer: OscPeer, voice: int | None, address: str, count: int) -> list[list]:
    """`/reset <voice>` (`/reset` if None), then PHRASE in one bundle: the `count` messages at ``address``
    it brings, as received.

    Played again (up to 3 times) if the server dropped an answer meanwhile (a stall on a busy machine).
    """
    for _ in range(3):
        peer.drain(0.05)
        before = drops(peer.status())
        peer.send("/reset", *(() if voice is None else (voice,)))
        peer.send_raw(bundle(*(("/gesture", x, y) for x, y in PHRASE)))
        got = [args for _, _, args in peer.receive(DEADLINE, address, count=count)]
        peer.drain(0.05)
        if drops(peer.status()) == before:
            assert len(got) == count, f"{len(got)} of {count} {address} arrived and none was dropped"
            return got
    raise AssertionError("every take lost an answer to a stall")


def test_a_voices_own_temperature_0_answers_a_phrase_the_same_way_every_time(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--voices", "per-sender", "--send", "127.0.0.1:9", "--timescale", "0.01",
                       "--seed", "1")
    a, b = peer_for(srv.port), peer_for(srv.port)
    try:
        a.send("/gesture", 0.5, 0.5)
        wait_for(a, lambda s: s.get("voice0_from") == f"127.0.0.1:{a.port}", "a's voice 0")
        b.send("/gesture", 0.5, 0.5)
        wait_for(b, lambda s: s.get("voice1_from") == f"127.0.0.1:{b.port}", "b's voice 1")
        a.send("/temperature", 0.0, 0)
        a.send("/sigma_temperature", 0.0, 0)
        b.send("/sigma_temperature", 0.0, 1)  # voice 1: the components' means, picked at the global temperature 1
        wait_for(a, lambda s: s["voice0_temperature"] == 0.0, "voice 0's temperature")
        takes_a = [take(a, 0, "/prediction", len(PHRASE)) for _ in range(3)]
        takes_b = [take(b, 1, "/prediction", len(PHRASE)) for _ in range(3)]
        before = a.status("all")  # both voices' keys: asked from loopback
        # voice 1 follows the global temperature; set it to 0 and voice 1 answers as voice 0 does
        b.send("/temperature", 0.0)
        wait_for(b, lambda s: s["temperature"] == 0.0, "the global temperature")
        greedy_b = take(b, 1, "/prediction", len(PHRASE))
    finally:
        srv.stop()
        a.close()
        b.close()
    assert all(p[2] == 0 for t in takes_a for p in t) and all(p[2] == 1 for t in takes_b for p in t)
    assert sorted(takes_a[0]) == sorted(takes_a[1]) == sorted(takes_a[2])  # the same phrase, the same answers
    assert len({tuple(map(tuple, sorted(t))) for t in takes_b}) >= 2  # voice 1, at temperature 1, picks afresh
    assert sorted(p[:2] for p in greedy_b) == sorted(p[:2] for p in takes_a[0])
    assert (before["temperature"], before["voice0_temperature"], before["voice1_temperature"]) == (1.0, 0.0, 1.0)


def test_mixture_weights_and_sigmas_follow_the_temperatures_over_osc(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--send", "127.0.0.1:9", "--timescale", "0.01")
    peer = peer_for(srv.port)
    try:
        peer.send("/subscribe", "mixture")
        peer.status()
        at_one = take(peer, None, "/mixture", len(PHRASE))
        peer.send("/sigma_temperature", 0.5)
        at_half = take(peer, None, "/mixture", len(PHRASE))
        peer.send("/temperature", 0.5)
        sharper = take(peer, None, "/mixture", len(PHRASE))
        peer.send("/temperature", 0.0)
        greedy = take(peer, None, "/mixture", len(PHRASE))
    finally:
        srv.stop()
        peer.close()
    for one, half, sharp, zero in zip(at_one, at_half, sharper, greedy):
        k = one[0]
        assert k == half[0] == sharp[0] == zero[0] and len(one) == 1 + k + 6 * k
        rows_one, rows_half, rows_sharp, rows_zero = (np.asarray(m[1 + k:]).reshape(k, 6)
                                                      for m in (one, half, sharp, zero))
        assert one[1:1 + k] == half[1:1 + k]  # the same state: the same weights ...
        assert (rows_one[:, :3] == rows_half[:, :3]).all()  # ... and places
        assert (rows_half[:, 3:] == rows_one[:, 3:] * np.float32(0.5)).all() and (rows_one[:, 3:] > 0).all()
        w = np.asarray(one[1:1 + k], np.float64)
        # temperature 0.5: softmax(logits / 0.5), the weights at 1 squared and renormalised
        assert np.asarray(sharp[1:1 + k]) == pytest.approx(w ** 2 / (w ** 2).sum(), rel=1e-4, abs=1e-6)
        weights = np.asarray(zero[1:1 + k])
        assert sorted(weights) == [0.0] * (k - 1) + [1.0]  # temperature 0: the likeliest component only
        assert int(np.argmax(weights)) == int(np.argmax(w))
        assert (rows_sharp == rows_half).all() and (rows_zero == rows_half).all()  # temperature moves weights only
