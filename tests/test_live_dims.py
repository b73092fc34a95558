"""Any number of values per event, live: a real server on loopback plays models of N = 1, 2, 3, 8 and 16.

Through real UDP: N values in, N values out in [0, 1]; `/mixture` of the model's width;
a wrong count refused naming the count the model wants, and the music goes on; `/status
dims`; a `/model` swap to another width announced as `/model/dims N` on every
destination before anything of it plays, and a new log with a column per value. Fast
in-process tests (a virtual loop) cover the engine's side of the same promises.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from server.live.engine import Settings
from server.live.modes import Mode
from server.model.dims import value_names
from server.model.predictor import Predictor
from tests.live import OscPeer, ServerProcess, start_server
from tests.rig import VirtualLoop, build_engine
from tests.tinynet import MIXTURES

LOAD_SECONDS = 60.0  # a swap's load (files, the proof in a child, the interpreter): only a failing test waits this long


def values(n: int, phase: int = 0) -> list[float]:
    """N values in [0, 1] that move with ``phase``."""
    return [((i + 1) * 0.13 + phase * 0.07) % 1.0 for i in range(n)]


@pytest.fixture
def wide_server(wide_models_dir, tmp_path):
    """A server playing the 2-value model `n2` in accompany, sending to the peer; answers come at once."""
    peer = OscPeer()
    srv = start_server(tmp_path / "logs", "--models-dir", str(wide_models_dir), "--model", "n2",
                       "--send", f"127.0.0.1:{peer.port}", "--mode", "accompany", "--timescale", "0.001",
                       "--max-rate", "10000", "--seed", "1")
    peer.target = ("127.0.0.1", srv.port)
    yield srv, peer
    assert srv.stop() == 0
    peer.close()


def swap(peer: OscPeer, name: str) -> list[object]:
    """`/model name`, then wait until it plays; returns the `/model/dims` announcements met on the way."""
    peer.send("/model", name)
    announced: list[object] = []
    end = time.monotonic() + LOAD_SECONDS
    while time.monotonic() < end:
        announced += [args[0] for _, address, args in peer.receive(0.2) if address == "/model/dims"]
        status = peer.status()
        if status["model"] == name and not status["loading"]:
            announced += [args[0] for _, address, args in peer.receive(0.2) if address == "/model/dims"]
            return announced
    raise AssertionError(f"model {name} did not load in {LOAD_SECONDS:g} s")


def play(peer: OscPeer, n: int, count: int = 10) -> list[list[float]]:
    """Send ``count`` events of ``n`` values; the predictions that answer them."""
    peer.drain(0.1)
    for i in range(count):
        peer.send("/gesture", *values(n, i))
    return [args for _, _, args in peer.receive(10.0, "/prediction", count=count)]


def logs_by_header(srv: ServerProcess) -> dict[tuple[str, ...], list[list[str]]]:
    """Each log of the run by its header: its rows (read while it runs; a torn last row is skipped)."""
    out: dict[tuple[str, ...], list[list[str]]] = {}
    for log in srv.logs():
        rows = list(csv.reader(log.read_text().splitlines()))
        out[tuple(rows[0])] = [r for r in rows[1:] if len(r) == len(rows[0])]
    return out


def test_eight_values_in_eight_out_a_mixture_of_their_width_and_a_wrong_count_refused(wide_server):
    srv, peer = wide_server
    assert swap(peer, "n8") == [8]
    assert peer.status()["dims"] == 8
    answers = play(peer, 8)
    assert len(answers) == 10 and all(len(a) == 8 and all(0.0 <= v <= 1.0 for v in a) for a in answers)

    peer.send("/subscribe", "mixture")
    peer.drain(0.2)
    peer.send("/gesture", *values(8))
    (mixture,) = [args for _, _, args in peer.receive(10.0, "/mixture", count=1)]
    k = MIXTURES
    assert mixture[0] == k and len(mixture) == 1 + k + k * (2 + 2 * 8)  # K, weights, then (dt, 8 means, dt, 8 sigmas)
    peer.send("/unsubscribe", "mixture")

    errors = []
    for wrong in (values(2), values(9)[:7], []):
        errors.append(peer.request("/gesture", *wrong, reply="/error"))
    assert [e[0] for e in errors] == ["/gesture"] * 3
    assert errors[0][1].startswith("/gesture wants 8 values (the model's dims), got 2")
    assert "got 7" in errors[1][1] and "got 0" in errors[2][1]
    assert peer.request("/interface", 0.5, reply="/error")[1].startswith("/interface wants 8 values")
    assert "takes 8 values" in peer.request("/note", 60, 100, reply="/error")[1]
    assert len(play(peer, 8, 3)) == 3  # and it keeps playing
    assert logs_by_header(srv)[("time", "source", *value_names(8))]


def test_a_swap_to_another_width_is_announced_and_starts_a_log_of_its_width(wide_server):
    srv, peer = wide_server
    assert peer.status()["dims"] == 2
    assert len(play(peer, 2, 5)) == 5
    assert swap(peer, "n8") == [8]
    assert all(len(a) == 8 for a in play(peer, 8, 5))
    assert swap(peer, "n2") == [2]
    assert swap(peer, "n2") == []  # the same width again: nothing to announce
    assert all(len(a) == 2 for a in play(peer, 2, 5))
    logs = logs_by_header(srv)
    two, eight = ("time", "source", "x", "y"), ("time", "source", *(f"v{i}" for i in range(1, 9)))
    assert set(logs) == {two, eight} and len(srv.logs()) == 3  # x,y then v1..v8 then x,y again
    assert {r[1] for r in logs[eight]} == {"performer", "model"}
    assert all(0.0 <= float(v) <= 1.0 for r in logs[eight] for v in r[2:])


@pytest.mark.parametrize("n", [1, 16])
def test_the_edges_one_value_and_sixteen(wide_server, n):
    srv, peer = wide_server
    assert swap(peer, f"n{n}") == [n]
    assert peer.status()["dims"] == n
    answers = play(peer, n)
    assert len(answers) == 10 and all(len(a) == n and all(0.0 <= v <= 1.0 for v in a) for a in answers)
    assert peer.request("/gesture", *values(n + 1), 0, reply="/error")[1].startswith(
        f"/gesture wants {n} value{'s' if n > 1 else ''} (the model's dims), got {n + 2}")
    header = ("time", "source", *value_names(n))
    assert header[2:] == (("x",) if n == 1 else tuple(f"v{i}" for i in range(1, 17)))
    assert len(logs_by_header(srv)[header]) >= 20


# --------------------------------------------------------------------------- in this process


@pytest.fixture(scope="module")
def wide(wide_models_dir) -> dict[int, Predictor]:
    return {n: Predictor.load(wide_models_dir / f"n{n}") for n in (2, 8)}


class Retunes:
    """An output with the optional `retune` hook: records each width it is told."""

    def __init__(self) -> None:
        self.widths: list[int] = []

    def emit(self, event) -> None:
        pass

    def silence(self, voice) -> None:
        pass

    def retune(self, values: int) -> None:
        self.widths.append(values)


def test_the_engine_takes_exactly_the_models_values_and_answers_with_as_many(wide):
    loop = VirtualLoop()
    engine, played = build_engine(loop, wide[8], Settings(mode=Mode.ACCOMPANY, timescale=0.01))
    assert engine.width == 8 and engine.status()["dims"] == 8
    for i in range(5):
        engine.perform(*values(8, i))
        loop.advance(0.2)
    assert [len(e.values) for e in played.events] == [8] * 10
    from server.live.controls import ControlError

    with pytest.raises(ControlError, match="plays 8 values per event .*got 2"):
        engine.perform(0.5, 0.5)
    engine.perform(*[1.5] + [0.5] * 7)  # out of range: clamped and counted, as at N = 2
    assert engine.counts["clamped"] == 1 and played.events[-1].values[0] == 1.0


def test_a_swap_retunes_the_outputs_only_when_the_width_changes_and_voices_draw_at_the_new_width(wide,
                                                                                              wide_models_dir):
    loop = VirtualLoop()
    hook = Retunes()
    engine, played = build_engine(loop, wide[2], Settings(mode=Mode.GENERATE, timescale=0.01), sinks=(hook,),
                                  models_dir=wide_models_dir, model_name="n2")
    engine.start()
    loop.advance(0.5)
    for name, widths in (("n8", [8]), ("n8", [8]), ("n2", [8, 2])):
        engine.load_model(name)
        loop.advance(0.5)
        assert hook.widths == widths and engine.width == int(name[1:])
        assert len(played.model()[-1].values) == engine.width  # its voice samples (and draws) at the new width


class Learns:
    """A learner that records how many performer events each `/learn` was told the current log holds."""

    def __init__(self) -> None:
        self.heard: list[int] = []

    def start(self, seconds, parent, folder, performer_events, swap, playing=None) -> None:
        self.heard.append(performer_events)


def test_learn_counts_only_the_events_of_the_playing_width(wide, wide_models_dir):
    loop = VirtualLoop()
    learner = Learns()
    engine, _ = build_engine(loop, wide[2], Settings(mode=Mode.LISTEN), models_dir=wide_models_dir,
                             model_name="n2", learner=learner)
    for i in range(5):
        engine.perform(*values(2, i))
    engine.load_model("n8")
    loop.advance(0.5)
    for i in range(3):
        engine.perform(*values(8, i))
    engine.learn(10.0)
    engine.load_model("n8")  # the same width: its log goes on, and so does the count
    loop.advance(0.5)
    engine.perform(*values(8))
    engine.learn(10.0)
    assert learner.heard == [3, 4]


def test_bench_measures_the_step_and_round_trip_at_nine_values_beside_the_models_own(wide_models_dir):
    from server.tools.bench_dims import bench_widths, widths_table

    r = bench_widths(wide_models_dir / "n2", quick=True)
    assert (r["base"]["values"], r["wide"]["values"]) == (2, 9)
    for row in (r["base"], r["wide"]):
        assert row["step"]["steps"] == 2000 and row["step"]["median_us"] > 0
        assert row["round_trip"]["sent"] > 0 and row["round_trip"]["received"] > 0  # answered at its width
    assert all(q is not None and q > 0 for q in r["ratios"].values())
    table = "\n".join(widths_table(r))
    assert "goal: N = 9 under 1.5x" in table and "ratio: step" in table
