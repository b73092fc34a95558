"""The live server end to end: a real `python -m server run` process, real UDP sockets on loopback."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from tests.live import REPO, OscPeer, ServerProcess, start_server
from tests.test_swap import check_swap, swap_while_playing


# These tests send up to 100 gestures/s and count every answer; a sender thread delayed by a
# loaded machine can bunch them past max_rate's burst, so the limit (tested elsewhere) is lifted.
NO_RATE_LIMIT = ("--max-rate", "10000")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    peer = OscPeer()
    srv = start_server(tmp_path_factory.mktemp("logs"), "--send", f"127.0.0.1:{peer.port}", "--timescale", "0.01", "--seed", "1", *NO_RATE_LIMIT)
    peer.target = ("127.0.0.1", srv.port)
    yield srv, peer
    assert srv.stop() == 0
    peer.close()


@pytest.fixture
def peer(server):
    """The shared peer, with the server back in accompany mode and nothing in flight."""
    srv, p = server
    for msg in (("/pause", 0), ("/mode", "accompany"), ("/timescale", 0.01), ("/temperature", 1.0), ("/sigma_temperature", 1.0)):
        p.send(*msg)
    p.status()
    p.drain(0.2)
    return p


def gestures(peer: OscPeer, n: int, gap: float) -> float:
    """Send ``n`` gestures ``gap`` apart; returns when the last one was sent (monotonic)."""
    start = time.monotonic()
    for i in range(n):
        last = time.monotonic()
        peer.send("/gesture", 0.5 + 0.3 * np.cos(i / 5), 0.5 + 0.3 * np.sin(i / 5))
        # absolute schedule, not a chain of relative sleeps
        time.sleep(max(0.0, start + (i + 1) * gap - time.monotonic()))
    return last


def log_sources(srv: ServerProcess) -> Counter:
    """Rows per source in the run's performance log, read while it runs (a torn last row is skipped)."""
    (log,) = srv.logs()
    rows = list(csv.reader(log.read_text().splitlines()))
    assert rows[0] == ["time", "source", "x", "y"]
    return Counter(r[1] for r in rows[1:] if len(r) == 4)


def changed(before: dict, after: dict, *keys: str) -> dict:
    return {k: after[k] - before[k] for k in keys}


def test_ready_line_and_namespace_printed(server):
    srv, _ = server
    text = "".join(srv.output)
    from server.osc.namespace import ADDRESSES

    for address in ADDRESSES:
        assert address in text
    assert "model default (litert)" in srv.ready_line


def test_accompany_answers_each_input(peer):
    before = peer.status()
    gestures(peer, 30, 0.02)
    got = peer.receive(10.0, "/prediction", count=30)
    got += peer.receive(0.3, "/prediction")  # and no more: exactly one answer per input
    after = peer.status()
    # The server agrees: 30 in, each played (or, on a machine that stalled the server over 50 ms, dropped as
    # late and counted: the late-drop promise, pinned on the virtual clock), nothing else dropped or waiting.
    delta = changed(before, after, "inputs", "outputs", "dropped", "late_dropped", "rate_dropped")
    assert delta["inputs"] == 30 and delta["outputs"] + delta["late_dropped"] == 30, delta
    assert delta["late_dropped"] <= 3 and delta["dropped"] == delta["rate_dropped"] == 0, delta
    assert len(got) == delta["outputs"]
    xy = np.array([args for _, _, args in got])
    assert xy.shape == (len(got), 2) and np.all((xy >= 0) & (xy <= 1))
    assert after["pending"] == 0


def test_listen_is_silent_but_counts_and_logs_inputs(server, peer):
    srv, _ = server
    peer.send("/mode", "listen")
    before, logged = peer.status(), log_sources(srv)
    gestures(peer, 10, 0.02)
    assert peer.receive(0.5, "/prediction") == []
    after = peer.status()
    # Silent because listen plays nothing (not because answers were lost): none played, none waiting.
    assert changed(before, after, "inputs", "outputs") == {"inputs": 10, "outputs": 0} and after["pending"] == 0
    assert log_sources(srv) - logged == Counter(performer=10)


def test_generate_plays_with_no_input(server, peer):
    srv, _ = server
    before, logged = peer.status(), log_sources(srv)
    peer.send("/timescale", 0.2)
    peer.send("/mode", "generate")
    got = peer.receive(10.0, "/prediction", count=8)
    peer.send("/mode", "listen")
    assert len(got) >= 8
    after = peer.status()
    assert after["inputs"] == before["inputs"] and after["outputs"] - before["outputs"] >= 8
    assert log_sources(srv)["model"] - logged["model"] == after["outputs"] - before["outputs"]


def test_respond_waits_for_silence_then_continues(peer):
    peer.send("/threshold", 1.0)
    peer.send("/timescale", 0.3)
    peer.send("/mode", "respond")
    before = peer.status()
    last_input = gestures(peer, 20, 0.05)  # one second of playing: the model must stay quiet
    during = peer.receive(0.4, "/prediction")
    assert during == [], "respond must not play while the performer plays"
    quiet = peer.status()
    assert changed(before, quiet, "inputs", "outputs") == {"inputs": 20, "outputs": 0}, "silent, not lost"
    after = peer.receive(10.0, "/prediction", count=3)
    assert len(after) >= 3
    assert after[0][0] - last_input >= 0.95, "took over before the threshold"
    gestures(peer, 3, 0.02)  # the performer plays again: the model yields
    peer.drain(0.05)
    yielded = peer.status()
    assert peer.receive(0.4, "/prediction") == []
    still = peer.status()
    assert changed(yielded, still, "inputs", "outputs") == {"inputs": 0, "outputs": 0}, "yielded, not lost"
    assert still["outputs"] - quiet["outputs"] >= 3
    peer.send("/mode", "listen")


def test_pause_stops_and_resumes_output(server, peer):
    srv, _ = server
    before, logged = peer.status(), log_sources(srv)
    peer.send("/pause", 1)
    gestures(peer, 5, 0.02)
    assert peer.receive(0.4, "/prediction") == []
    paused = peer.status()
    assert paused["paused"] == 1 and paused["pending"] == 0
    assert changed(before, paused, "inputs", "outputs") == {"inputs": 5, "outputs": 0}, "paused, not lost"
    assert log_sources(srv) - logged == Counter(performer=5)
    peer.send("/pause", 0)
    gestures(peer, 5, 0.02)
    assert len(peer.receive(10.0, "/prediction", count=5)) == 5
    assert changed(paused, peer.status(), "inputs", "outputs") == {"inputs": 5, "outputs": 5}


def test_controls_change_status_and_behaviour(peer):
    peer.send("/temperature", 0.0)
    peer.send("/sigma_temperature", 0.0)
    peer.send("/threshold", 2.5)
    st = peer.status()
    assert (st["temperature"], st["sigma_temperature"], st["threshold"]) == (0.0, 0.0, 2.5)
    # Greedy sampling: a reset model given the same input gives the same answer every time,
    # the one the same model gives in this process.
    from server.model.files import DEFAULT_MODELS_DIR
    from server.model.mdn import RandomBlocks
    from server.model.predictor import Predictor

    local = Predictor.load(DEFAULT_MODELS_DIR / "default")
    local.observe(0.0, 0.2, 0.8)  # the first event after a reset has dt 0
    dt, x, y = local.sample(RandomBlocks(np.random.default_rng(0), 3), 0.0, 0.0)
    answers = []
    for _ in range(3):
        peer.send("/reset")
        peer.send("/gesture", 0.2, 0.8)
        answers.append(peer.receive(10.0, "/prediction", count=1)[0][2])
    np.testing.assert_allclose(answers, [[x, y]] * 3, atol=1e-5)
    # /timescale stretches the wait before an answer: due 2 s after the gesture, so it waits.
    assert dt > 1e-3
    peer.send("/timescale", 2.0 / dt)
    before = peer.status()
    peer.send("/reset")
    peer.send("/gesture", 0.2, 0.8)
    assert peer.receive(0.3, "/prediction") == []
    waiting = peer.status()
    assert waiting["pending"] == 1 and changed(before, waiting, "inputs", "outputs") == {"inputs": 1, "outputs": 0}
    peer.send("/mode", "listen")  # cancels the far-away answer
    gone = peer.status()
    assert gone["pending"] == 0 and gone["outputs"] == before["outputs"]


def test_status_reports_counts_and_latency(peer):
    gestures(peer, 5, 0.01)
    peer.receive(10.0, "/prediction", count=5)
    st = peer.status()
    for key in ("mode", "inputs", "outputs", "osc_rejected", "dropped", "step_us_median", "step_us_p99", "backend"):
        assert key in st, key
    assert st["mode"] == "accompany" and st["outputs"] >= 5
    assert 0 < st["step_us_median"] <= st["step_us_p99"]


def test_model_hot_swap(peer):
    assert peer.request("/model", "nope", reply="/error")[0] == "/model"
    assert peer.request("/model", "../default", reply="/error")[0] == "/model"
    st = peer.status()
    assert st["model"] == "default" and st["model_swaps"] == 0
    peer.send("/model", "default")
    end = time.monotonic() + 30
    while (st := peer.status())["model_swaps"] != 1 or st.get("loading"):  # loaded off the loop
        assert time.monotonic() < end, st
        time.sleep(0.05)
    assert st["model"] == "default"
    peer.drain(0.1)
    gestures(peer, 3, 0.02)
    assert len(peer.receive(10.0, "/prediction", count=3)) == 3


def test_hello_adds_a_destination(server, peer):
    srv, _ = server
    other = OscPeer()
    other.target = ("127.0.0.1", srv.port)
    try:
        other.send("/hello")
        other.status()
        gestures(peer, 3, 0.02)
        assert len(other.receive(10.0, "/prediction", count=3)) == 3
    finally:
        other.close()


@pytest.mark.parametrize(
    "message",
    [
        ("/gesture", 0.5),
        ("/gesture", "a", 0.5),
        ("/gesture", float("nan"), 0.5),
        ("/gesture", float("inf"), 0.5),
        ("/temperature", -1.0),
        ("/timescale", 0.0),
        ("/mode", "dance"),
        ("/nowhere", 1.0),
    ],
)
def test_bad_input_gets_error_and_server_keeps_serving(peer, message):
    before = peer.status()["osc_rejected"]
    err = peer.request(*message, reply="/error")
    assert err[0] == message[0] and isinstance(err[1], str) and err[1]
    peer.send_raw(b"\x00garbage")
    assert peer.receive(10.0, "/error", count=1)
    assert peer.status()["osc_rejected"] == before + 2
    gestures(peer, 1, 0.0)
    assert len(peer.receive(10.0, "/prediction", count=1)) == 1


def test_sigterm_leaves_a_complete_log(tmp_path):
    peer = OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{peer.port}", "--timescale", "0.001", *NO_RATE_LIMIT)
    peer.target = ("127.0.0.1", srv.port)
    gestures(peer, 60, 0.01)  # 100/s: under max_rate, so every input is answered
    answers = peer.receive(10.0, "/prediction", count=60)
    assert srv.stop(signal.SIGTERM) == 0
    peer.close()
    (log,) = srv.logs()
    text = log.read_text()
    assert text.endswith("\n")
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == ["time", "source", "x", "y"]
    sources = [r[1] for r in rows[1:]]
    assert sources.count("performer") == 60 and sources.count("model") == len(answers) == 60
    times = [float(r[0]) for r in rows[1:]]
    assert abs(times[0] - time.time()) < 60


def test_logs_to_dataset_to_training(tmp_path):
    from server.cli import main

    peer = OscPeer()
    srv = start_server(tmp_path / "logs", "--send", f"127.0.0.1:{peer.port}", "--timescale", "0.001", *NO_RATE_LIMIT)
    peer.target = ("127.0.0.1", srv.port)
    try:
        gestures(peer, 80, 0.01)
        # every gesture heard (answered, or its answer dropped late by a stall on a busy machine: not the subject)
        status = peer.status()
        end = time.monotonic() + 10
        while status["inputs"] < 80 or status["pending"]:
            assert time.monotonic() < end, status
            time.sleep(0.05)
            status = peer.status()
    finally:
        assert srv.stop(signal.SIGINT) == 0
        peer.close()
    assert status["inputs"] == 80 and status["outputs"] + status["late_dropped"] == 80
    (log,) = srv.logs()
    rows = list(csv.reader(log.read_text().splitlines()))[1:]
    ds_path = tmp_path / "played.npz"
    assert main(["dataset", str(tmp_path / "logs"), "--out", str(ds_path)]) == 0
    from server.learn.data import load_dataset

    ds = load_dataset(ds_path)
    # The performer's stream is a performance: its positions as logged, dt from the logged times.
    played = np.array([[float(r[0]), float(r[2]), float(r[3])] for r in rows if r[1] == "performer"])
    assert len(played) == 80
    expected = np.column_stack([np.r_[0.0, np.diff(played[:, 0])], played[:, 1:]])
    matches = [p for p in ds.performances if len(p) == 80 and np.allclose(p, expected, atol=1e-5)]
    assert len(matches) >= 1, "the performer's events are not a performance of the dataset"
    args = ["train", "--data", str(ds_path), "--size", "xs", "--name", "played", "--models-dir", str(tmp_path / "m"),
            "--epochs", "1", "--sequence-length", "20", "--no-report"]
    assert main(args) == 0
    assert (tmp_path / "m" / "played" / "step.tflite").is_file()


def test_run_with_tflite_never_imports_tensorflow(tmp_path):
    """Stopped once it is ready (not after a fixed time a slow start could outlast), it says what it imported."""
    script = (
        "import sys\n"
        "from server.cli import main\n"
        f"rc = main(['run', '--port', '0', '--log-dir', {str(tmp_path)!r}])\n"
        "print('RC', rc, 'TF', 'tensorflow' in sys.modules, 'KERAS', 'keras' in sys.modules)\n"
    )
    proc = subprocess.Popen([sys.executable, "-u", "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                break
        proc.send_signal(signal.SIGTERM)
        out = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "ready:" in out
    assert "RC 0 TF False KERAS False" in out


def test_bad_model_fails_at_start_with_a_clear_message(tmp_path):
    (tmp_path / "models" / "broken").mkdir(parents=True)
    res = subprocess.run(
        [sys.executable, "-m", "server", "run", "--models-dir", str(tmp_path / "models"), "--model", "broken", "--log-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 1
    assert "model.json is missing" in res.stderr


def test_toml_config_sets_the_run(tmp_path):
    peer = OscPeer()
    cfg = tmp_path / "antiphon.toml"
    cfg.write_text(f'mode = "listen"\ntemperature = 0.5\nthreshold = 3.0\nsend = ["127.0.0.1:{peer.port}"]\n')
    srv = start_server(tmp_path, "--config", str(cfg), "--threshold", "2.0")
    peer.target = ("127.0.0.1", srv.port)
    try:
        st = peer.status()
        assert (st["mode"], st["temperature"], st["threshold"]) == ("listen", 0.5, 2.0)  # the flag wins
    finally:
        assert srv.stop() == 0
        peer.close()


def test_tensorflow_fallback_serves_and_swaps_when_litert_is_missing(tmp_path, region_models):
    """LiteRT made unimportable and the TensorFlow step forced (`--step-engine tensorflow`; auto would take
    step.npz): it serves, and a swap, on the same engine, happens while gestures keep arriving, the old
    model answering until the new one is in.

    A tiny model loads in a fraction of a second, so every load after the first (the one at start-up)
    takes at least 3 s (as a big model on a slow disk would): the swap must not silence the old model
    meanwhile. The wait is topped up after the real load (its proof imports TensorFlow, seconds of its
    own), not added before it.
    """
    listener, control = OscPeer(), OscPeer()
    script = (
        "import os, signal, sys, threading, time\n"
        "sys.modules['ai_edge_litert'] = None  # as on a platform without a LiteRT wheel\n"
        "from server.model.predictor import Predictor\n"
        "load, loads = Predictor.load, []\n"
        "def slow_load(*a, **k):\n"
        "    loads.append(time.monotonic())\n"
        "    predictor = load(*a, **k)\n"
        "    if len(loads) > 1:\n"
        "        time.sleep(max(0.0, loads[-1] + 3.0 - time.monotonic()))\n"
        "    return predictor\n"
        "Predictor.load = slow_load\n"
        "from server.cli import main\n"
        "t = threading.Timer(150.0, lambda: os.kill(os.getpid(), signal.SIGTERM)); t.daemon = True; t.start()\n"
        f"sys.exit(main(['run', '--port', '0', '--log-dir', {str(tmp_path)!r}, '--send', '127.0.0.1:{listener.port}',"
        f" '--models-dir', {str(region_models.folder)!r}, '--model', 'a', '--timescale', '0.01', '--max-rate', '10000',"
        " '--temperature', '0', '--sigma-temperature', '0',"
        " '--step-engine', 'tensorflow']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-u", "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        for line in proc.stdout:
            if line.startswith("ready:"):
                break
        assert line.startswith("ready:") and "(tensorflow)" in line, line
        control.target = ("127.0.0.1", int(line.split("listening on ")[1].split(",")[0].rsplit(":", 1)[1]))
        gestures(control, 5, 0.02)
        assert len(listener.receive(10.0, "/prediction", count=5)) == 5
        listener.drain(0.1)
        rec = swap_while_playing(listener, control, "b")
        assert rec.status["backend"] == "tensorflow"
        assert rec.done - rec.sent >= 3.0, "the load was not slow, so this proves nothing"
        check_swap(region_models, rec, "a", "b")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        listener.close(), control.close()
