"""`bench`: the speed budgets of DESIGN.md, measured in one run on one model.

Step latency (observe + predict + sample) for each step engine this machine has
(LiteRT, numpy, TensorFlow) side by side, and the naive per-event `model.predict`; then a real server process over
loopback: ready time, idle CPU, and the `accompany` round trip at 100 and 1,000
messages/s. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.model.mdn import RandomBlocks
from server.osc.wire import encode_message
from server.tools.bench_dims import bench_widths, widths_table
from server.tools.bench_ensemble import lookahead_timing, voices_round_trip
from server.tools.timing import ROUND_TRIP_MAX_RATE, round_trip, step_latency
from server.tools.under_test import REPO, ServerUnderTest, status


STEP_ENGINES = {"litert": (2000, 20000), "numpy": (2000, 20000), "tensorflow": (200, 2000)}  # steps: quick, full


def bench_steps(folder: Path, quick: bool, engines: tuple[str, ...] = tuple(STEP_ENGINES),
                naive: bool = True) -> dict[str, Any]:
    """Step latency of each engine this machine has, side by side (one missing says why), then `model.predict`."""
    from server.model.files import read_model
    from server.model.predictor import Predictor
    from server.model.spec import ModelError

    model = read_model(folder, ("step.tflite", "model.keras"), first_of=("step.npz",))
    rng = RandomBlocks(np.random.default_rng(0), model.info.spec.dims)  # random numbers drawn as the live loop draws them
    out: dict[str, Any] = {}
    for engine in engines:
        try:
            predictor = Predictor(model, backend=engine)
        except (ModelError, ImportError) as e:  # no LiteRT wheel here, no step.npz, no TensorFlow (the stage install)
            out[engine] = {"unavailable": str(e)}
            continue
        out[engine] = step_latency(predictor, STEP_ENGINES[engine][0 if quick else 1], rng)
    if naive and "median_us" in out.get("tensorflow", {}):
        from server.model.network import KerasPredictStep, keras_model_from_bytes

        keras_model = keras_model_from_bytes(model.file("model.keras"))
        slow = Predictor(model, step=(KerasPredictStep(keras_model, model.info.spec), "keras-predict"))
        out["keras_predict"] = step_latency(slow, 20 if quick else 200, rng)
    if "median_us" in out.get("litert", {}):
        base = out["litert"]["median_us"]
        for name in ("numpy", "tensorflow", "keras_predict"):
            if "median_us" in out.get(name, {}):
                out[f"ratio_{name}_vs_litert"] = out[name]["median_us"] / base
    return out


def step_lines(s: dict[str, Any]) -> list[str]:
    """The step table: one row per engine (or why it is missing), then the ratios to LiteRT."""
    lines = ["step (observe + predict + sample)   median us    p99 us"]
    for name in (*STEP_ENGINES, "keras_predict"):
        if name in s:
            row = s[name]
            lines.append(f"  {name:<32} {row['median_us']:>9.1f} {row['p99_us']:>9.1f}" if "median_us" in row
                         else f"  {name:<32} unavailable: {row['unavailable']}")
    ratios = [f"{k[len('ratio_'):-len('_vs_litert')]} / litert: {v:.1f}x" for k, v in s.items() if k.startswith("ratio_")]
    if ratios:
        lines.append("  " + "   ".join(ratios))
    return lines


def bench_server(model: str, quick: bool) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    with tempfile.TemporaryDirectory() as logs:
        # 1,000 answers/s is above the default max_rate (200/s): raise it to measure the loop itself.
        srv = ServerUnderTest(model, sock.getsockname()[1], Path(logs), "accompany", 1e-6, "--max-rate", str(ROUND_TRIP_MAX_RATE))
        try:
            time.sleep(1.0)  # let start-up work settle before measuring idle
            idle_s = 2.0 if quick else 5.0
            c0, t0 = srv.cpu_seconds(), time.monotonic()
            time.sleep(idle_s)
            idle = 100 * (srv.cpu_seconds() - c0) / (time.monotonic() - t0)
            runs = [round_trip(sock, srv.port, rate, 2.0 if quick else secs) for rate, secs in ((100, 5.0), (1000, 5.0))]
            st = status(sock, srv.port)
            watched = watched_round_trip(sock, srv.port, 2.0 if quick else 4.0, 2 if quick else 3)
        finally:
            code = srv.stop()
        timing = generate_timing(model, sock, Path(logs), 2.0 if quick else 10.0)
    with tempfile.TemporaryDirectory() as logs:
        runaway = runaway_guard(model, sock, Path(logs), 2.0 if quick else 5.0)
    with tempfile.TemporaryDirectory() as scratch:
        learning = learning_phase(model, sock, Path(scratch), 10.0 if quick else 30.0)
    with tempfile.TemporaryDirectory() as logs:
        ensemble = voices_round_trip(model, Path(logs), 8, 100.0, 2.0 if quick else 5.0)
    with tempfile.TemporaryDirectory() as logs:
        timetags = lookahead_timing(model, sock, Path(logs), 0.05, 3.0 if quick else 10.0)
    return {
        "ready_s": srv.ready_s,
        "idle_cpu_percent": idle,
        "round_trip": runs,
        "round_trip_watched": watched,
        "generate_timing": timing,
        "runaway": runaway,
        "learning": learning,
        "voices": ensemble,
        "lookahead": timetags,
        "server_status": {k: st.get(k) for k in ("inputs", "outputs", "dropped", "osc_rejected", "osc_coalesced",
                                                 "step_us_median", "step_us_p99", "late_us_median", "late_us_p99")},
        "exit_code": code,
    }


def generate_timing(model: str, sock: socket.socket, log_dir: Path, seconds: float) -> dict[str, Any]:
    """How late, after its scheduled time, each event went out while the model played alone at timescale 1."""
    srv = ServerUnderTest(model, sock.getsockname()[1], log_dir, mode="generate", timescale=1.0)
    try:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:  # drain predictions so the socket never fills
            if select.select([sock], [], [], left)[0]:
                sock.recv(65536)
        st = status(sock, srv.port)
    finally:
        srv.stop()
    return {"seconds": seconds, "outputs": st.get("outputs"), "late_us_median": st.get("late_us_median"),
            "late_us_p99": st.get("late_us_p99")}


def runaway_guard(model: str, sock: socket.socket, log_dir: Path, seconds: float) -> dict[str, Any]:
    """CPU and log growth in `generate` at `/timescale 1e-4` with the default max_rate: the output floor at work."""
    srv = ServerUnderTest(model, sock.getsockname()[1], log_dir, mode="generate", timescale=1e-4)
    try:
        time.sleep(0.5)
        while select.select([sock], [], [], 0)[0]:  # what came during start-up is not part of the figure
            sock.recv(65536)
        c0, t0 = srv.cpu_seconds(), time.monotonic()
        b0 = sum(p.stat().st_size for p in log_dir.glob("*.csv"))
        received = 0
        end = t0 + seconds
        while (left := end - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                received += sock.recv(65536).startswith(b"/prediction")
        elapsed = time.monotonic() - t0
        cpu = 100 * (srv.cpu_seconds() - c0) / elapsed
        growth = (sum(p.stat().st_size for p in log_dir.glob("*.csv")) - b0) / elapsed
        st = status(sock, srv.port)
    finally:
        srv.stop()
    return {"seconds": seconds, "cpu_percent": cpu, "log_bytes_per_s": growth, "events_per_s": received / elapsed,
            "max_rate": st.get("max_rate")}


def watched_round_trip(sock: socket.socket, port: int, seconds: float, rounds: int = 3) -> dict[str, Any]:
    """The 1,000 msg/s round trip with the web monitor running (it subscribes to every stream) beside the same
    without it, alternating `rounds` times so both see the same machine; each figure pools its rounds."""
    plain: list[np.ndarray] = []
    watched: list[np.ndarray] = []
    sent = {"plain": 0, "watched": 0}
    received = {"plain": 0, "watched": 0}
    streams: dict[str, Any] = {}
    for _ in range(rounds):
        r = round_trip(sock, port, 1000, seconds, keep=True)
        plain.append(r.pop("rtt"))
        sent["plain"] += r["sent"]
        received["plain"] += r["received"]
        monitor = subprocess.Popen([sys.executable, "-m", "server", "monitor", "--port", "0", "--server",
                                    f"127.0.0.1:{port}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True)
        try:
            assert monitor.stdout is not None
            monitor.stdout.readline()  # its ready line
            time.sleep(1.0)  # subscribed, and its first status polls are over
            r = round_trip(sock, port, 1000, seconds, keep=True)
            watched.append(r.pop("rtt"))
            sent["watched"] += r["sent"]
            received["watched"] += r["received"]
            streams = {k: status(sock, port).get(k) for k in ("osc_sent", "inputs", "osc_subscribers_dropped")}
        finally:
            monitor.terminate()
            monitor.wait(10)
        time.sleep(0.5)  # its subscriptions are dropped when its port closes
    browser = browser_round_trip(sock, port, seconds)
    p, w = np.concatenate(plain), np.concatenate(watched)
    return {
        "rate": 1000, "rounds": rounds, "seconds_each": seconds,
        "sent": sent["watched"], "received": received["watched"],
        "median_us": float(np.median(w) * 1e6), "p99_us": float(np.percentile(w, 99) * 1e6),
        "without_median_us": float(np.median(p) * 1e6), "without_p99_us": float(np.percentile(p, 99) * 1e6),
        "without_sent": sent["plain"], "without_received": received["plain"],
        "p99_ratio": float(np.percentile(w, 99) / np.percentile(p, 99)),
        "streams": streams,
        "browser": browser,
    }


BROWSER = "/usr/bin/chromium"
_OPEN_PAGE = """
import sys, time
from playwright.sync_api import sync_playwright
with sync_playwright() as pw:
    page = pw.chromium.launch(executable_path=sys.argv[1], args=["--no-proxy-server"], headless=True).new_page(
        viewport={"width": 1280, "height": 800})
    page.goto(sys.argv[2])
    print("open", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def browser_round_trip(sock: socket.socket, port: int, seconds: float) -> dict[str, Any] | None:
    """The 1,000 msg/s round trip while headless Chromium draws the monitor's page on the same machine
    (None when Chromium or Playwright is missing): what a browser on the stage laptop costs."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return None
    if not os.access(BROWSER, os.X_OK):
        return None
    monitor = subprocess.Popen([sys.executable, "-m", "server", "monitor", "--port", "0", "--server",
                                f"127.0.0.1:{port}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    page = None
    try:
        assert monitor.stdout is not None
        url = re.match(r"monitor: (http://[^ ]+/)", monitor.stdout.readline())
        if url is None:
            return None
        page = subprocess.Popen([sys.executable, "-c", _OPEN_PAGE, BROWSER, url.group(1), str(seconds + 30)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert page.stdout is not None
        if page.stdout.readline().strip() != "open":
            return None
        time.sleep(2.0)
        r = round_trip(sock, port, 1000, seconds)
        return {"median_us": r["median_us"], "p99_us": r["p99_us"], "sent": r["sent"], "received": r["received"]}
    finally:
        if page is not None:
            page.kill()
            page.wait(10)
        monitor.terminate()
        monitor.wait(10)
        time.sleep(0.5)


def learning_phase(model: str, sock: socket.socket, scratch: Path, seconds: float) -> dict[str, Any]:
    """The round trip at 100 msg/s with no fine-tune, then while `/learn` runs: the music must not notice.

    The model is copied into a scratch models folder, so the fine-tuned one lands there.
    """
    import shutil

    models = scratch / "models"
    shutil.copytree(Path(model), models / Path(model).name)
    srv = ServerUnderTest(Path(model).name, sock.getsockname()[1], scratch / "logs", "accompany", 1e-6,
                          "--models-dir", str(models))
    try:
        quiet = round_trip(sock, srv.port, 100, 5.0)  # also the performer events the fine-tune learns from
        sock.sendto(encode_message("/learn", float(seconds)), ("127.0.0.1", srv.port))
        started = time.monotonic()
        during = round_trip(sock, srv.port, 100, seconds * 0.8)
        done: list[Any] = []
        while not done and time.monotonic() < started + seconds + 120:
            if select.select([sock], [], [], 1.0)[0]:
                data = sock.recv(65536)
                if data.startswith(b"/learn/done"):
                    from pythonosc.osc_message import OscMessage

                    done = list(OscMessage(data).params)
        took = time.monotonic() - started
    finally:
        srv.stop()
    return {"seconds_asked": seconds, "seconds_end_to_end": took if done else None, "done": done,
            "quiet": quiet, "during": during}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def run_bench(model: str, models_dir: Path, out: Path, quick: bool = False) -> dict[str, Any]:
    from server.model.files import resolve_model_dir

    folder = resolve_model_dir(model, models_dir, allow_paths=True)
    step = bench_steps(folder, quick)  # first: the in-process figures on a quiet interpreter
    result = {"model": str(folder), "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "step": step, "widths": bench_widths(folder, quick), "server": bench_server(str(folder), quick)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {out}")
    return result


def format_table(r: dict[str, Any]) -> str:
    s, v = r["step"], r["server"]
    lines = [
        f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, Python {r['machine']['python']}",
        f"model:   {r['model']}",
        "",
        *step_lines(s),
        "",
        f"OSC round trip, accompany, timescale 1e-6 (max_rate raised to {ROUND_TRIP_MAX_RATE})",
        "  rate/s   sent  recv   median us   p99 us   first/last tenth median us   last answer after last input us",
    ]
    for t in v["round_trip"]:
        lines.append(
            f"  {t['rate']:>6.0f} {t['sent']:>6} {t['received']:>5} {t['median_us'] or 0:>11.0f} {t['p99_us'] or 0:>8.0f}"
            f"   {t['first_tenth_median_us'] or 0:>10.0f} / {t['last_tenth_median_us'] or 0:<10.0f}   {t['last_answer_after_last_input_us'] or 0:>10.0f}"
        )
    w = v["round_trip_watched"]
    lines.append(
        f"  {w['rate']:>6.0f} {w['sent']:>6} {w['received']:>5} {w['median_us'] or 0:>11.0f} {w['p99_us'] or 0:>8.0f}"
        "   with the web monitor running (mixture, surprise, status and performer subscribed)"
    )
    lines.append(
        f"  {w['rate']:>6.0f} {w['without_sent']:>6} {w['without_received']:>5} {w['without_median_us']:>11.0f} "
        f"{w['without_p99_us']:>8.0f}   the same without it, alternating {w['rounds']} x {w['seconds_each']:.0f} s: "
        f"p99 {w['p99_ratio']:.2f}x"
    )
    if w.get("browser"):
        b = w["browser"]
        lines.append(
            f"  {w['rate']:>6.0f} {b['sent']:>6} {b['received']:>5} {b['median_us'] or 0:>11.0f} {b['p99_us'] or 0:>8.0f}"
            f"   with headless Chromium drawing the monitor's page on the same machine: p99 "
            f"{(b['p99_us'] or 0) / w['without_p99_us']:.1f}x"
        )
    lines += [
        "",
        f"ready in {v['ready_s']:.2f} s (process start to ready line); idle CPU {v['idle_cpu_percent']:.2f} %",
        f"generate at timescale 1 for {v['generate_timing']['seconds']:.0f} s: {v['generate_timing']['outputs']} events, "
        f"sent {v['generate_timing']['late_us_median']} us (median) / {v['generate_timing']['late_us_p99']} us (p99) "
        "after their scheduled time",
        f"generate at timescale 1e-4 for {v['runaway']['seconds']:.0f} s (max_rate {v['runaway']['max_rate']}): "
        f"{v['runaway']['events_per_s']:.0f} events/s, CPU {v['runaway']['cpu_percent']:.1f} %, "
        f"log {v['runaway']['log_bytes_per_s'] / 1000:.1f} KB/s",
        f"round trip at 100 msg/s: median {v['learning']['quiet']['median_us'] or 0:.0f} us, "
        f"p99 {v['learning']['quiet']['p99_us'] or 0:.0f} us; while a /learn {v['learning']['seconds_asked']:.0f} runs: "
        f"median {v['learning']['during']['median_us'] or 0:.0f} us, p99 {v['learning']['during']['p99_us'] or 0:.0f} us "
        f"({v['learning']['during']['received']}/{v['learning']['during']['sent']} answered); "
        f"/learn/done after {v['learning']['seconds_end_to_end'] or 0:.1f} s: {v['learning']['done']}",
        f"{v['voices']['voices']} voices x {v['voices']['rate_each']:.0f} msg/s each, accompany (voices per-sender): "
        f"{v['voices']['received']}/{v['voices']['sent']} answered, round trip median {v['voices']['median_us'] or 0:.0f} us, "
        f"p99 {v['voices']['p99_us'] or 0:.0f} us",
        f"generate with lookahead {v['lookahead']['lookahead_s'] * 1000:.0f} ms for {v['lookahead']['seconds']:.0f} s: "
        f"{v['lookahead']['bundles']} bundles ({v['lookahead']['plain_messages']} plain), arriving "
        f"{v['lookahead']['early_ms_median'] or 0:.1f} ms (median) / {v['lookahead']['early_ms_p1'] or 0:.1f} ms (p1) "
        f"before their timetag; timetag minus scheduled time median {v['lookahead']['timetag_minus_scheduled_us_median'] or 0:.0f} us, "
        f"spread (p1-p99) {v['lookahead']['timetag_minus_scheduled_us_spread_p1_p99'] or 0:.0f} us",
        f"server counters: {v['server_status']}",
    ]
    if "widths" in r:
        lines += ["", *widths_table(r["widths"])]
    return "\n".join(lines)
