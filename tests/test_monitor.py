"""The web monitor (`python -m server monitor`): its own process, a real server, a real browser.

- Validation: only the control addresses, typed and in range, become OSC (no browser needed).
- In headless Chromium (Debian's, driven by Playwright): the page loads with no console
  errors and shows the server's status; gestures sent to the server change the canvas
  (the model's trail and the predicted density); the mode select and the temperature
  slider change the server (seen in its /status); killing the monitor leaves the server
  answering gestures.

Browser tests skip with the reason when Playwright or Chromium is missing, except under
CI (env CI set), where they fail: CI installs chromium from .ci/apt-packages.txt.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest

from live import REPO, OscPeer, start_server
from server.monitor.controls import ControlError, validate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--no-proxy-server"]
MODELS = REPO / "models"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("message, expected", [
    ({"address": "/mode", "args": ["generate"]}, ("/mode", ["generate"])),
    ({"address": "/temperature", "args": [0.5]}, ("/temperature", [0.5])),
    ({"address": "/sigma_temperature", "args": [0]}, ("/sigma_temperature", [0.0])),
    ({"address": "/timescale", "args": [0.01]}, ("/timescale", [0.01])),
    ({"address": "/pause", "args": [1]}, ("/pause", [1])),
    ({"address": "/reset"}, ("/reset", [])),
    ({"address": "/model", "args": ["default"]}, ("/model", ["default"])),
    ({"address": "/learn", "args": []}, ("/learn", [])),
    ({"address": "/learn", "args": [30]}, ("/learn", [30.0])),
    ({"address": "/learn/stop", "args": []}, ("/learn/stop", [])),
])
def test_valid_controls_become_osc(message, expected):
    assert validate(message, MODELS) == expected


@pytest.mark.parametrize("message", [
    None, [], "x", {"address": "/gesture", "args": [0.5, 0.5]}, {"address": "/hello", "args": []},
    {"address": "/mode", "args": ["dance"]}, {"address": "/mode", "args": []},
    {"address": "/temperature", "args": ["1"]}, {"address": "/temperature", "args": [-1]},
    {"address": "/temperature", "args": [float("nan")]}, {"address": "/temperature", "args": [True]},
    {"address": "/timescale", "args": [0]}, {"address": "/timescale", "args": [1e9]},
    {"address": "/pause", "args": [2]}, {"address": "/pause", "args": [0.5]}, {"address": "/reset", "args": [1]},
    {"address": "/model", "args": ["../etc"]}, {"address": "/model", "args": ["no-such-model"]},
    {"address": "/learn", "args": [0]}, {"address": "/temperature", "args": [1, 2]}, {"address": "/reset", "args": "x"},
])
def test_invalid_controls_are_refused(message):
    with pytest.raises(ControlError):
        validate(message, MODELS)


def test_monitor_imports_no_tensorflow_nor_learn():
    code = ("import sys, server.monitor.app; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras', 'tf_keras') or m.startswith('server.learn')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- processes


def require_browser():
    """Playwright's sync API, or skip (fail under CI) with the reason."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install -r requirements-test.txt)"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (apt-get install chromium; listed in .ci/apt-packages.txt)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason + " - CI must install it")
        pytest.skip(reason)
    return sync_playwright


class MonitorProcess:
    """`python -m server monitor --port 0 --server 127.0.0.1:PORT`, with its URL parsed from the ready line."""

    def __init__(self, server_port: int, timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "server", "monitor", "--port", "0", "--server", f"127.0.0.1:{server_port}"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        found: list[str] = []

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("monitor: http://"):
                    found.append(line)

        threading.Thread(target=pump, daemon=True).start()
        end = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None or time.monotonic() > end:
                self.proc.kill()
                raise RuntimeError("monitor did not become ready:\n" + "".join(self.lines))
            time.sleep(0.02)
        self.url = re.match(r"monitor: (http://[^ ]+/)", found[0]).group(1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    dummy = OscPeer()  # --send goes to a port nobody reads
    srv = start_server(tmp_path_factory.mktemp("monitor-logs"), "--send", f"127.0.0.1:{dummy.port}",
                       "--mode", "accompany", "--timescale", "0.01")
    yield srv
    srv.stop()
    dummy.close()


@pytest.fixture(scope="module")
def peer(server):
    p = OscPeer()
    p.target = ("127.0.0.1", server.port)
    yield p
    p.close()


@pytest.fixture(scope="module")
def monitor(server):
    m = MonitorProcess(server.port)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def browser():
    sync_playwright = require_browser()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, monitor):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.goto(monitor.url)
    yield page


def plane_pixels(page) -> str:
    return page.evaluate("document.getElementById('plane').toDataURL()")


def wait_for(predicate, seconds: float = 5.0, every: float = 0.1):
    end = time.monotonic() + seconds
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(every)


# --------------------------------------------------------------------------- browser tests


def test_page_loads_without_console_errors_and_shows_status(page):
    assert wait_for(lambda: page.text_content("#f-mode").startswith("accompany"), 10.0), "no status shown"
    assert page.text_content("#f-model") == "default"
    assert wait_for(lambda: page.text_content("#link") == "live"), "the link badge is not live"
    assert page.eval_on_selector_all("#c-model option", "os => os.map(o => o.value)") == sorted(
        p.name for p in MODELS.iterdir() if (p / "model.json").is_file())
    assert page.errors == []


def test_gestures_change_the_canvas(page, peer):
    page.wait_for_timeout(4500)  # let any earlier trail fade
    before = plane_pixels(page)
    for i in range(30):
        peer.send("/gesture", 0.2 + 0.02 * i, 0.3 + 0.01 * i)
        time.sleep(0.02)
    assert wait_for(lambda: page.text_content("#f-surprise") != "–"), "no surprise shown"
    assert wait_for(lambda: plane_pixels(page) != before), "the plane did not change after gestures"
    assert page.errors == []


def test_controls_change_the_server(page, peer):
    page.select_option("#c-mode", "listen")
    assert wait_for(lambda: peer.status()["mode"] == "listen"), "mode select did not reach the server"
    page.select_option("#c-mode", "accompany")
    assert wait_for(lambda: peer.status()["mode"] == "accompany")
    page.fill("#c-temperature", "0.5")
    assert wait_for(lambda: abs(peer.status()["temperature"] - 0.5) < 1e-6), "temperature slider did not reach the server"
    assert wait_for(lambda: page.text_content("#f-temperature") == "0.50"), "the status figure did not follow"
    assert page.errors == []


def test_the_monitor_only_gets_cpu_the_server_does_not_want(monitor):
    assert os.sched_getscheduler(monitor.proc.pid) == os.SCHED_IDLE


def test_killing_the_monitor_leaves_the_server_playing(page, monitor, server, peer):
    page.close()
    monitor.proc.kill()
    monitor.proc.wait(10)
    peer.send("/hello")
    peer.drain(0.2)
    for i in range(10):
        peer.send("/gesture", 0.5, 0.1 * i)
        time.sleep(0.02)
    got = peer.receive(3.0, "/prediction", count=5)
    assert len(got) >= 5, "the server stopped answering once the monitor was gone"
    assert server.proc.poll() is None


def test_each_voice_gets_its_own_trail(tmp_path, browser):
    """With voices per-sender the page keeps one trail per voice (labelled), so two performers never join up."""
    dummy = OscPeer()
    srv = start_server(tmp_path, "--voices", "per-sender", "--send", f"127.0.0.1:{dummy.port}", "--timescale", "0.01")
    mon = MonitorProcess(srv.port)
    peers = [OscPeer(), OscPeer()]
    try:
        for p in peers:
            p.target = ("127.0.0.1", srv.port)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(mon.url)
        assert wait_for(lambda: page.text_content("#link") == "live", 10.0)
        for i in range(40):
            peers[0].send("/gesture", 0.2 + 0.01 * i, 0.2)
            peers[1].send("/gesture", 0.8 - 0.01 * i, 0.8)
            time.sleep(0.02)
        voices = wait_for(lambda: (v := page.evaluate("window.antiphonVoices()"))["performer"] == ["0", "1"] and v)
        page.close()
        assert voices and sorted(voices["model"]) == ["0", "1"], voices
        assert errors == []
    finally:
        mon.stop()
        srv.stop()
        for p in (*peers, dummy):
            p.close()
