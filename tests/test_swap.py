"""Hot swap between two models whose answers can be told apart, on the real server.

`region_models` (conftest) trains `a`, which answers near (0.2, 0.2), and `b`, which
answers near (0.8, 0.8). With greedy temperatures every answer is the most likely
component's mean, so which model is playing shows in every /prediction.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from tests.live import OscPeer, ServerProcess, start_server


class GestureStream:
    """A steady stream of /gesture from a thread, on an absolute schedule, circling the pad."""

    def __init__(self, peer: OscPeer, gap: float = 0.02) -> None:
        self.peer, self.gap, self.sent = peer, gap, 0
        self.times: list[float] = []  # when each gesture left: a starved test process sends late, not the server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            i = self.sent
            self.peer.send("/gesture", 0.5 + 0.45 * math.cos(i / 5), 0.5 + 0.45 * math.sin(i / 5))
            self.times.append(time.monotonic())
            self.sent += 1
            self._stop.wait(max(0.0, start + self.sent * self.gap - time.monotonic()))

    def __enter__(self) -> "GestureStream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class SwapRecord:
    """Predictions (arrival time, x, y) around a swap sent at `sent` and seen done in /status at `done`."""

    answers: list[tuple[float, float, float]]
    sent: float
    done: float
    status: dict
    sends: list[float]

    def between(self, start: float, end: float) -> list[tuple[float, float]]:
        return [(x, y) for t, x, y in self.answers if start <= t < end]

    def longest_gap(self, start: float, end: float) -> float:
        times = [start] + [t for t, _, _ in self.answers if start <= t < end] + [end]
        return max(np.diff(times))

    def longest_send_gap(self, start: float, end: float) -> float:
        times = [start] + [t for t in self.sends if start <= t < end] + [end]
        return max(np.diff(times))


def swap_while_playing(listener: OscPeer, control: OscPeer, to: str, gap: float = 0.02,
                       before: float = 1.0, after: float = 1.5, timeout: float = 90.0) -> SwapRecord:
    """Stream gestures through ``control``; `/model <to>` after ``before`` s; keep playing ``after`` s past the swap.

    Predictions are read on ``listener`` (a `--send` destination) and /status on
    ``control``, so asking for status never swallows a prediction.
    """
    answers: list[tuple[float, float, float]] = []

    def listen(seconds: float) -> None:
        answers.extend((t, *args[:2]) for t, _, args in listener.receive(seconds, "/prediction"))

    with GestureStream(control, gap) as stream:
        listen(before)
        sent = time.monotonic()
        control.send("/model", to)
        while True:
            listen(0.2)
            control.send("/status")
            reply = control.receive(0.5, "/status", count=1)  # none while a blocked loop stalls: ask again
            status = dict(zip(reply[0][2][::2], reply[0][2][1::2])) if reply else {}
            if status.get("model") == to and not status.get("loading"):
                done = time.monotonic()
                break
            assert time.monotonic() - sent < timeout, f"/model {to} not done after {timeout} s: {status}"
        listen(after)
    listen(0.2)
    return SwapRecord(answers, sent, done, control.status(), stream.times)


def start_on(models, peer: OscPeer, tmp_path, model: str = "a") -> ServerProcess:
    srv = start_server(tmp_path, "--models-dir", str(models.folder), "--model", model, "--mode", "accompany",
                       "--temperature", "0", "--sigma-temperature", "0", "--timescale", "0.01",
                       "--max-rate", "10000", "--send", f"127.0.0.1:{peer.port}")
    peer.target = ("127.0.0.1", srv.port)
    return srv


def play(peer: OscPeer, listener: OscPeer, n: int = 40, gap: float = 0.02) -> list[tuple[float, float]]:
    """Send ``n`` gestures around the pad; the answers' positions."""
    start = time.monotonic()
    for i in range(n):
        peer.send("/gesture", 0.5 + 0.45 * math.cos(i / 5), 0.5 + 0.45 * math.sin(i / 5))
        time.sleep(max(0.0, start + (i + 1) * gap - time.monotonic()))
    return [tuple(args[:2]) for _, _, args in listener.receive(5.0, "/prediction", count=n)]


def wait_for_model(peer: OscPeer, name: str, swaps: int, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        st = peer.status()
        if st["model"] == name and st["model_swaps"] == swaps and not st.get("loading"):
            return st
        assert time.monotonic() < end, f"model {name} not swapped in: {st}"
        time.sleep(0.1)


def test_the_models_can_be_told_apart(region_models):
    """The premise: greedy answers of `a` and `b` to the same gestures lie in their own regions."""
    from server.model.mdn import RandomBlocks
    from server.model.predictor import Predictor

    for name in ("a", "b"):
        p = Predictor.load(region_models.folder / name)
        draws = RandomBlocks(np.random.default_rng(0), 3)
        answers = []
        for i in range(100):
            p.observe(0.02 if i else 0.0, 0.5 + 0.45 * math.cos(i / 5), 0.5 + 0.45 * math.sin(i / 5))
            answers.append(p.sample(draws, 0.0, 0.0)[1:])
        assert region_models.share(answers, name) == 1.0, (name, answers[:5])


def test_hot_swap_changes_whose_answers_play(region_models, tmp_path):
    listener, control = OscPeer(), OscPeer()
    srv = start_on(region_models, listener, tmp_path)
    control.target = listener.target
    try:
        first = play(control, listener)
        assert len(first) >= 36 and region_models.share(first, "a") >= 0.9, first[:5]
        control.send("/model", "b")
        st = wait_for_model(control, "b", 1)
        listener.drain(0.2)
        second = play(control, listener)
        assert len(second) >= 36 and region_models.share(second[3:], "b") >= 0.9, second[:5]
        # A refused swap keeps the playing model.
        assert control.request("/model", "nope", reply="/error")[0] == "/model"
        third = play(control, listener)
        assert region_models.share(third, "b") >= 0.9 and control.status()["model"] == "b"
        control.send("/model", "a")
        wait_for_model(control, "a", 2)
        listener.drain(0.2)
        back = play(control, listener)
        assert region_models.share(back[3:], "a") >= 0.9, back[:5]
        assert st["backend"] == "litert"
    finally:
        assert srv.stop() == 0
        listener.close(), control.close()


def test_swap_while_input_flows_keeps_answering(region_models, tmp_path):
    listener, control = OscPeer(), OscPeer()
    srv = start_on(region_models, listener, tmp_path)
    control.target = listener.target
    try:
        rec = swap_while_playing(listener, control, "b")
    finally:
        assert srv.stop() == 0
        listener.close(), control.close()
    check_swap(region_models, rec, "a", "b")


def check_swap(models, rec: SwapRecord, old: str, new: str, gap: float = 0.02) -> None:
    """Old model's answers before, new model's after, and no silence (no gap over 1 s) while the new one loads."""
    before = rec.between(0, rec.sent)
    after = rec.between(rec.done + 0.2, math.inf)
    assert len(before) >= 20 and models.share(before, old) >= 0.9, before[:5]
    assert len(after) >= 20 and models.share(after, new) >= 0.9, after[:5]
    assert rec.status["model"] == new and rec.status["model_swaps"] == 1
    loading = rec.done - rec.sent
    longest = rec.longest_gap(rec.sent - 0.2, rec.done + 0.2)
    during = len(rec.between(rec.sent, rec.done))
    # A loop blocked by the load would fall silent for the whole load. Judged against the gestures' own
    # gaps (a busy machine may hold the sending thread back too) and the load's length, not a fixed second.
    silence = rec.longest_send_gap(rec.sent - 0.2, rec.done + 0.2)
    assert longest <= silence + max(0.3, loading / 2), (
        f"no answers for {longest:.2f} s during a {loading:.2f} s load ({during} answers; longest gap between "
        f"gestures sent {silence:.2f} s; late_dropped {rec.status.get('late_dropped')})")
