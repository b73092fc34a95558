"""`/learn` on a running server over loopback: it picks up a figure, keeps playing, and only ever gets better.

One distinctive figure, played into `run` as a performer would: a fast square path with
regular taps, nothing like the synthetic gestures `models/default` learnt.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.live import REPO, OscPeer, start_server

CORNERS = [(0.1, 0.1), (0.9, 0.1), (0.9, 0.9), (0.1, 0.9)]


def figure(repeats: int, seed: int = 0) -> np.ndarray:
    """(dt, x, y): the square, 20 taps a phrase, 30 ms apart, a pause between phrases."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(repeats):
        for i in range(20):
            x, y = CORNERS[i % 4]
            rows.append((0.03 if i else 0.65, x + rng.normal(0, 0.01), y + rng.normal(0, 0.01)))
    return np.clip(np.array(rows, np.float32), 0.0, 5.0)


def play(peer: OscPeer, events: np.ndarray) -> None:
    """Send the figure on an absolute schedule (its own dts), so the server logs it with its timing."""
    start = time.monotonic()
    t = 0.0
    for dt, x, y in events:
        t += float(dt)
        while (left := start + t - time.monotonic()) > 0:
            peer.receive(left, "/prediction")
        peer.send("/gesture", float(x), float(y))
    peer.drain(0.1)


def play_enough(peer: OscPeer, gap: float = 0.006) -> None:
    """The figure's 160 positions 6 ms apart: enough events to fine-tune on, in a second rather than ten, for
    tests where what is learnt does not matter. A pause after each send (not an absolute schedule), so however
    the sender is delayed no burst is coalesced or over max_rate."""
    for _, x, y in figure(8):
        peer.send("/gesture", float(x), float(y))
        time.sleep(gap)
    peer.drain(0.1)


def settle(peer: OscPeer, sent: int, answered: int, seconds: float = 5.0) -> int:
    """``answered`` plus the answers still in flight: wait until every one of ``sent`` gestures is answered
    or ``seconds`` pass (an answer late-dropped by a stall never comes, so this is a deadline, not a count)."""
    missing = sent - answered
    if missing <= 0:
        return answered
    return answered + len(peer.receive(seconds, "/prediction", count=missing))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(REPO / "models" / "default", folder / "default")
    return folder


@pytest.fixture
def served(tmp_path: Path, models: Path):
    """A running server on a copy of models/ answering to a loopback peer; stopped cleanly after the test."""
    peer = OscPeer()
    srv = start_server(tmp_path / "logs", "--models-dir", str(models), "--send", f"127.0.0.1:{peer.port}",
                       "--timescale", "0.01", "--seed", "3")
    peer.target = ("127.0.0.1", srv.port)
    yield srv, peer
    assert srv.stop() == 0
    peer.close()


def score_on(folder: Path, events: np.ndarray) -> float:
    from server.learn.data import Dataset
    from server.learn.evaluate import score
    from server.model.engines import open_step, read_for

    model = read_for(folder)
    step, _ = open_step(model)
    return score(step, model.info, Dataset.from_performances([events])).dequantised


def play_on(peer: OscPeer, gestures: int) -> tuple[int, int]:
    """Play ``gestures`` gestures, 20 a second, counting the answers that come meanwhile: (sent, answered)."""
    answered = 0
    for i in range(gestures):
        peer.send("/gesture", 0.5 + 0.3 * np.sin(i / 7), 0.5)
        answered += len(peer.receive(0.05, "/prediction"))
    return gestures, answered


def wait_for(peer: OscPeer, address: str, seconds: float, keep_playing: bool = False) -> tuple[list, int, int]:
    """Wait for one `address` message; meanwhile (optionally) play gestures and count what is answered."""
    end = time.monotonic() + seconds
    sent = answered = 0
    while time.monotonic() < end:
        if keep_playing:
            peer.send("/gesture", 0.5 + 0.3 * np.sin(sent / 7), 0.5)
            sent += 1
        for _, got, args in peer.receive(0.05):
            if got == "/prediction":
                answered += 1
            elif got == address:
                return args, sent, answered
    raise AssertionError(f"no {address} within {seconds} s")


def wait_for_training(peer: OscPeer, seconds: float) -> list:
    """The first /learn/progress from the training process itself: it carries a figure (the one the server
    sends at once, before the process exists, carries NaN)."""
    end = time.monotonic() + seconds
    while True:
        args, _, _ = wait_for(peer, "/learn/progress", max(0.1, end - time.monotonic()))
        if math.isfinite(args[1]):
            return args


def test_learn_picks_up_the_figure_and_the_music_goes_on(served, models):
    srv, peer = served
    play(peer, figure(8))  # 160 events: the fine-tuned model is ~16 nats/event better on a fresh take
    # 8 s leaves the shortest training budget (1 s: always one whole epoch); the first epoch alone takes a
    # fresh take from 31 to 15 nats/event (measured), against the 1.0 asked below; 15 s was 7 s more for
    # nothing this test asserts
    peer.send("/learn", 8.0)
    progress = []
    done = None
    end = time.monotonic() + 120
    sent = answered = 0
    while done is None and time.monotonic() < end:
        peer.send("/gesture", 0.5 + 0.3 * np.sin(sent / 7), 0.5)  # the music goes on, 20 gestures a second
        sent += 1
        for _, address, args in peer.receive(0.05):
            if address == "/prediction":
                answered += 1
            elif address == "/learn/progress":
                progress.append(args)
            elif address == "/learn/done":
                done = args
            elif address == "/error":
                raise AssertionError(f"error: {args}")
    assert done is not None, "no /learn/done"
    name, before, after, swapped = done
    assert swapped == 1 and name.startswith("default-learn-") and after < before, done
    assert progress and all(0 <= f <= 1 for f, _ in progress)
    answered = settle(peer, sent, answered)
    assert answered >= 0.95 * sent, (answered, sent)  # every gesture during the fine-tune was answered
    status = peer.status()
    assert status["model"] == name and status["learn"] == "done" and status["learn_swaps"] == 1
    # the new model knows the figure: a fresh take of it is clearly more likely than under default
    fresh = figure(4, seed=9)
    assert score_on(models / name, fresh) < score_on(models / "default", fresh) - 1.0
    assert (models / name / "model.json").read_text().count('"parent": "default"') == 1


def test_too_few_events_is_an_error_that_says_how_many(served, models):
    srv, peer = served
    for i in range(10):
        peer.send("/gesture", i / 10, 0.5)
    reply = peer.request("/learn", 5.0, reply="/error")
    assert reply[0] == "/learn" and "10 played" in reply[1] and "at least 100" in reply[1]
    stop = peer.request("/learn/stop", reply="/error")
    assert "no fine-tune is running" in stop[1]
    assert peer.status()["learn"] == "idle"


def test_learn_stop_ends_early_and_a_second_learn_is_refused_while_one_runs(served, models):
    srv, peer = served
    play_enough(peer)
    peer.send("/learn", 300.0)
    wait_for_training(peer, 180)  # a deadline: ~5 s on a quiet machine, 50 s seen under load
    children = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()
    assert children and all(os.sched_getscheduler(int(c)) == os.SCHED_IDLE for c in children), \
        "the fine-tune must only get CPU the server does not want"
    reply = peer.request("/learn", 10.0, reply="/error")
    assert "already running" in reply[1]
    stopped = time.monotonic()
    peer.send("/learn/stop")
    args, sent, answered = wait_for(peer, "/learn/done", 180, keep_playing=True)
    assert time.monotonic() - stopped < 150  # not the 300 s asked for (a loaded machine's export can take a minute)
    assert args[3] in (0, 1)


def test_a_crashed_training_process_leaves_the_old_model_playing_and_says_so(served, models):
    srv, peer = served
    play_enough(peer)
    peer.send("/learn", 120.0)
    # killed as soon as it runs: a crash is a crash however far it got (the server reads the same end of
    # its output either way), and its start-up (TensorFlow, the first epoch: ~5 s of CPU) is not waited for
    end = time.monotonic() + 60
    while not (children := Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()):
        assert time.monotonic() < end, "the fine-tune runs in a child process"
        time.sleep(0.01)
    for child in children:
        os.kill(int(child), signal.SIGKILL)
    args, sent, answered = wait_for(peer, "/error", 30, keep_playing=True)
    assert args[0] == "/learn" and "still playing default" in args[1]
    # The old model plays on: the gestures around the crash and 40 more are answered (90 %: a stall may
    # drop one late). Counted once the answers in flight have come, not at the /error, which may overtake them.
    more, more_answered = play_on(peer, 40)
    sent, answered = sent + more, settle(peer, sent + more, answered + more_answered)
    assert answered >= 0.9 * sent, (answered, sent)
    status = peer.status()
    assert status["model"] == "default" and status["learn"] == "failed" and status["learn_failures"] == 1


def test_a_fine_tune_that_makes_things_worse_is_not_kept(tmp_path):
    """Trained on one figure, judged on a different one held out: worse, so nothing is written."""
    from server.learn.finetune import fine_tune
    from server.learn.synth import synthetic_performance

    rng = np.random.default_rng(1)
    stuck = np.column_stack([np.full(400, 0.02), np.full(400, 0.05), np.full(400, 0.05)]).astype(np.float32)
    stuck[:, 1:] += rng.normal(0, 0.002, (400, 2)).astype(np.float32)
    lively = synthetic_performance(rng, 3)[:110]  # what models/default knows well, held out at the end
    lively[0, 0] = 2.0
    result = fine_tune(REPO / "models" / "default", [np.concatenate([stuck, lively])], 8, tmp_path, "worse")
    assert result.events_held_out >= 100
    assert not result.better and result.nll_after > result.nll_before
    assert result.model == "default" and not (tmp_path / "worse").exists()
