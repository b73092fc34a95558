"""What `bench` measures with: one step loop, and a round trip through a real server, at any width."""

from __future__ import annotations

import select
import socket
import time
from typing import Any

import numpy as np

from server.osc.wire import encode_message

ROUND_TRIP_MAX_RATE = 5000


def step_latency(predictor, steps: int, rng) -> dict[str, float]:
    """Median and p99 of one observe + sample (of the model's N values), after a warm-up."""
    times = np.empty(steps)
    event = (0.02, *(0.5,) * predictor.values)
    for i in range(-min(steps, 200), steps):
        t0 = time.perf_counter()
        predictor.observe(*event)
        event = predictor.sample(rng, 1.0, 1.0)
        if i >= 0:
            times[i] = time.perf_counter() - t0
    return {"median_us": float(np.median(times) * 1e6), "p99_us": float(np.percentile(times, 99) * 1e6), "steps": steps}


def gesture(i: int, values: int = 2) -> bytes:
    """The i-th `/gesture` of a round trip: ``values`` values tracing slow figures in [0.1, 0.9]."""
    return encode_message("/gesture", *(0.5 + 0.4 * float(np.sin(i / (20 + 11 * d) + d)) for d in range(values)))


def round_trip(sock: socket.socket, port: int, rate: float, seconds: float, keep: bool = False,
               values: int = 2) -> dict[str, Any]:
    """Send /gesture (of ``values`` values) at ``rate`` on an absolute schedule; pair the i-th /prediction with the
    i-th input."""
    while select.select([sock], [], [], 0.05)[0]:  # what an earlier phase left on the socket is not ours
        sock.recv(65536)
    n = int(rate * seconds)
    sent = np.zeros(n)
    got: list[float] = []
    target = ("127.0.0.1", port)
    messages = [gesture(i, values) for i in range(n)]
    start = time.monotonic() + 0.05
    i = 0
    end = start + seconds + 2.0
    while time.monotonic() < end and len(got) < n:
        now = time.monotonic()
        if i < n and now >= start + i / rate:
            sock.sendto(messages[i], target)
            sent[i] = time.monotonic()
            i += 1
            continue
        wait = (start + i / rate - now) if i < n else end - now
        readable, _, _ = select.select([sock], [], [], max(wait, 0.0))
        while readable:
            data = sock.recv(65536)
            if data.startswith(b"/prediction"):
                got.append(time.monotonic())
            readable, _, _ = select.select([sock], [], [], 0)
    received = len(got)
    rtt = np.array(got[: min(received, i)]) - sent[: min(received, i)]
    tenth = max(1, len(rtt) // 10)
    return {
        "rate": rate,
        "sent": int(i),
        "received": received,
        "median_us": float(np.median(rtt) * 1e6) if len(rtt) else None,
        "p99_us": float(np.percentile(rtt, 99) * 1e6) if len(rtt) else None,
        "first_tenth_median_us": float(np.median(rtt[:tenth]) * 1e6) if len(rtt) else None,
        "last_tenth_median_us": float(np.median(rtt[-tenth:]) * 1e6) if len(rtt) else None,
        "last_answer_after_last_input_us": float((got[-1] - sent[i - 1]) * 1e6) if received and i else None,
        **({"rtt": rtt} if keep else {}),
    }
