"""Stage probes against a real `run` over loopback: what a stressed stage or a careless client does to timing.

Each probe is something measured to stop the music before: a runaway timescale, a
timescale that wedges the clock, a stalled process answering in a burst, a closed
terminal (SIGHUP), a platform without `add_signal_handler`, a closed stdout.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live import REPO, OscPeer, start_server


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.csv"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_generate_at_a_tiny_timescale_cannot_run_away(tmp_path):
    peer = OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{peer.port}", "--mode", "generate", "--timescale", "1e-4")
    peer.target = ("127.0.0.1", srv.port)
    try:
        time.sleep(0.5)
        peer.drain(0.1)  # what queued up during start-up
        cpu0, log0, t0 = cpu_seconds(srv.proc.pid), log_bytes(tmp_path), time.monotonic()
        got = peer.receive(3.0)
        elapsed = time.monotonic() - t0
        cpu = (cpu_seconds(srv.proc.pid) - cpu0) / elapsed
        growth = (log_bytes(tmp_path) - log0) / elapsed
        predictions = sum(1 for _, address, _ in got if address == "/prediction")
        # It plays (max_rate, 200/s by default) and no faster: ~40,000/s and ~100 % CPU before.
        # no faster than max_rate (+ its burst), however the test process is scheduled; and it does play
        # (a quarter of the rate at least: a starved 2-core machine may slow it, never speed it up)
        assert 50 <= predictions / elapsed <= 220
        assert cpu < 0.30 and growth < 100_000, (cpu, growth)
    finally:
        assert srv.stop() == 0
        peer.close()


def test_a_huge_timescale_then_a_normal_one_resumes_at_once(tmp_path):
    peer = OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{peer.port}", "--mode", "generate", "--timescale", "0.05")
    peer.target = ("127.0.0.1", srv.port)
    try:
        assert peer.receive(10.0, "/prediction", count=3)
        peer.send("/timescale", 1e6)
        peer.status()
        peer.drain(0.3)
        peer.send("/timescale", 0.05)
        sent = time.monotonic()
        got = peer.receive(5.0, "/prediction", count=1)
        # within the model's next wait at timescale 0.05 (dt <= 5 s, so <= 0.25 s); 12 s and more before
        assert got and got[0][0] - sent < 1.0
    finally:
        assert srv.stop() == 0
        peer.close()


def test_after_a_stall_queued_gestures_keep_their_spacing_and_are_not_answered_in_a_burst(tmp_path):
    peer = OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{peer.port}", "--timescale", "0.01")
    peer.target = ("127.0.0.1", srv.port)
    sent: list[tuple[float, float]] = []  # (just before, just after) each send, Unix time: the log's clock
    try:
        peer.status()
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            for i in range(25):  # 25 gestures, 20 ms apart, while the server is stopped
                time.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
                before = time.time()
                peer.send("/gesture", 0.2 + 0.02 * i, 0.5)
                sent.append((before, time.time()))
            time.sleep(0.5)
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        # Wait until every gesture is in and nothing is pending (not a fixed wait): then each answer is
        # accounted for, played or dropped.
        end = time.monotonic() + 10
        while (status := peer.status())["inputs"] < 25 or status["pending"]:
            assert time.monotonic() < end, status
            time.sleep(0.05)
        assert status["inputs"] == 25
        # their answers fell due during the stall: dropped and counted, not played as a burst of 25
        assert status["outputs"] + status["late_dropped"] + status["rate_dropped"] == 25
        assert status["outputs"] <= 3 and status["late_dropped"] >= 22
    finally:
        assert srv.stop() == 0
        peer.close()
    (log,) = srv.logs()
    rows = [r for r in csv.reader(log.read_text().splitlines()[1:]) if r[1] == "performer"]
    times = [float(r[0]) for r in rows]
    # logged at arrival (the kernel's stamp), so the 20 ms spacing survives the stall: each is logged at
    # its send, give or take the server's clock conversions (a time taken when the server woke would be
    # 0.5 s or more after it)
    assert len(times) == 25
    for logged, (before, after) in zip(times, sent):
        assert before - 0.02 <= logged <= after + 0.02, (logged, before, after)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_stop_signals_end_the_run_cleanly(tmp_path, sig):
    peer = OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{peer.port}", "--timescale", "0.01")
    peer.target = ("127.0.0.1", srv.port)
    for i in range(10):
        peer.send("/gesture", i / 10, 0.5)
        time.sleep(0.01)
    assert len(peer.receive(10.0, "/prediction", count=10)) == 10
    assert srv.stop(sig) == 0
    peer.close()
    assert any(line.startswith("stopped: 10 inputs") for line in srv.output)
    assert not any("Traceback" in line for line in srv.output)
    (log,) = srv.logs()
    assert log.read_text().endswith("\n") and len(log.read_text().splitlines()) == 21


WITHOUT_SIGNAL_HANDLERS = """
import asyncio, sys
def missing(self, *args):
    raise NotImplementedError("no add_signal_handler here (as on Windows)")
asyncio.AbstractEventLoop.add_signal_handler = missing
asyncio.SelectorEventLoop.add_signal_handler = missing
from server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_then_sigterm(argv: list[str], stderr: int, before_stop=lambda proc: None) -> tuple[int, str, str]:
    """Start `argv`, wait for its `ready:` line, (optionally act,) SIGTERM it: (exit code, stdout rest, stderr)."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready:"):
                break
        before_stop(proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out or "", err or ""


def test_run_stops_cleanly_where_add_signal_handler_is_missing(tmp_path):
    argv = [sys.executable, "-c", WITHOUT_SIGNAL_HANDLERS, "run", "--port", "0", "--log-dir", str(tmp_path)]
    code, rest, _ = run_then_sigterm(argv, subprocess.STDOUT)
    assert code == 0, rest
    assert "stopped:" in rest and "Traceback" not in rest


def test_a_closed_stdout_at_exit_is_not_a_traceback(tmp_path):
    argv = [sys.executable, "-m", "server", "run", "--port", "0", "--log-dir", str(tmp_path)]
    # the reader goes away (e.g. `antiphon run | head`)
    code, _, err = run_then_sigterm(argv, subprocess.PIPE, before_stop=lambda proc: proc.stdout.close())
    assert code == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err
