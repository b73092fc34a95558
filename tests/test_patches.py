"""The client patches (Pd, Max, SuperCollider) open, talk to a real server, and agree with it.

- Pd: the shipped patch opens in a headless `pd` with every object created; its learn
  controls send `/learn <seconds>` and `/learn/stop`, and its step 4 shows what
  `/learn/progress` and `/learn/done` carry (against a fake server); it sends
  `/subscribe surprise <its port>` on load and with hello, and a `/surprise` moves its
  meter, its number box and the model voice's cutoff (against a fake server); the headless
  round-trip patch gets predictions back from a real server (`antiphon run`), and the
  headless learn patch gets a `/learn/done` from a real fine-tune. Its window fits a 1366 x 768
  screen: drawn by Pd's own GUI under Xvfb (tests/pdgui.py), nothing lies outside it and no
  two texts overlap; a `/status` moves its sliders and says mode and model in one line only
  when they change.
- SuperCollider: the client compiles; its GUI runs headless against a real server with the
  audio server failing to boot, and posts what it saw (including the learn buttons, and a
  `/learn/progress` and `/learn/done` sent to it, the `/surprise` its own `/subscribe`
  brings, and a `/surprise` sent to it on its surprise line and bar); the round-trip script gets predictions
  back.
- Lookahead and voices: the SuperCollider client, against a server with `--lookahead` in
  `generate` mode and a fake audio server, sees each bundle's timetag as its OSC `time`
  (about the lookahead after arrival) and schedules each pluck for exactly the server's
  time; `/prediction x y voice` plays panned by voice; its lookahead button turns it off.
  Both round trips run again with `--lookahead 0.05 --voices per-sender`, and antiphon.pd
  plays bundled and voiced predictions at once (Pd ignores timetags).
- Round trips and the GUI get predictions only through their own `/hello <port>`: the
  server's `--send` points at a port nobody listens on. Each client sends GESTURES
  gestures in `accompany` mode and at least 90 % of the answers must arrive, in [0, 1].
- Max: the patch is valid JSON whose cords join existing boxes and inlets/outlets; every
  OSC message box (the learn, stop and subscribe ones too) is cabled to udpsend, and every
  address routed from udpreceive (/prediction, /learn/progress, /learn/done, /surprise) goes
  somewhere.
- No drift: every OSC address a patch sends or expects exists in `server.osc`, every
  client has the learn controls, subscribes to surprise and listens for the learn results
  and `/surprise`, and every patch uses
  the server's default ports.

Tests that need `pd`, `sclang` or (for the layout) `Xvfb` and `pd-gui` skip with the reason when the program is missing, except
under CI (env CI set), where a missing client program fails: CI installs them from
.ci/apt-packages.txt.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "patches"
PD_PATCH = PATCHES / "pd" / "antiphon.pd"
PD_ROUNDTRIP = PATCHES / "pd" / "tests" / "roundtrip.pd"
PD_LEARN = PATCHES / "pd" / "tests" / "learn.pd"
MAX_PATCH = PATCHES / "max" / "antiphon.maxpat"
SC_CLIENT = PATCHES / "supercollider" / "antiphon.scd"
SC_ROUNDTRIP = PATCHES / "supercollider" / "tests" / "roundtrip.scd"

SERVER_READY_TIMEOUT = 60.0
CLIENT_TIMEOUT = 90.0  # the clients quit by themselves; this only stops a hung one
GESTURES = 30  # what roundtrip.pd, roundtrip.scd and the GUI harness send (one answer each)
MIN_PREDICTIONS = -(-GESTURES * 9 // 10)  # at least 90 % of the answers
LEARN_GESTURES = 120  # what learn.pd plays before /learn (the server needs 100 performer events)
LEARN_TIMEOUT = 260.0  # learn.pd gives up after 240 s by itself; a fine-tune takes ~10-25 s on 2 cores, 90+ s under load

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- helpers


def server_command(port: int, dummy_port: int, log_dir: Path, *extra: str) -> list[str]:
    """The command that starts a real Antiphon server for the round trips (adjust here only).

    `--send` goes to `dummy_port`, where nobody listens: a client gets predictions only if
    its own `/hello <port>` works.
    """
    return [
        sys.executable, "-m", "server", "run",
        "--port", str(port),
        "--send", f"127.0.0.1:{dummy_port}",
        "--mode", "accompany",
        "--timescale", "0.05",
        "--log-dir", str(log_dir),
        *extra,
    ]


def server_contract():
    """The server's OSC table and default ports (the single source of truth)."""
    from server.osc.namespace import ADDRESSES, DEFAULT_PORT, DEFAULT_SEND_PORT, OUTPUT_ADDRESSES

    return set(ADDRESSES), set(OUTPUT_ADDRESSES), DEFAULT_PORT, DEFAULT_SEND_PORT


def require_program(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install {package}; listed in .ci/apt-packages.txt)"
        if os.environ.get("CI"):
            pytest.fail(reason + " - CI must install it")
        pytest.skip(reason)
    return path


def free_udp_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RunningServer:
    """A running server on `port`; `client_port` is free for the client to listen on and
    announce with `/hello` (the server was not told about it)."""

    def __init__(self, proc: subprocess.Popen, port: int, client_port: int, lines: list[str]):
        self.proc, self.port, self.client_port, self.lines = proc, port, client_port, lines


@contextmanager
def running_server(tmp_path: Path, *extra: str):
    """Start a server on free ports (`extra`: more flags); after the block, SIGTERM it and expect exit 0."""
    port, dummy_port, client_port = free_udp_ports(3)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    stderr_path = tmp_path / "server.stderr"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            server_command(port, dummy_port, log_dir, *extra), cwd=REPO, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    lines: list[str] = []
    ready: queue.Queue[str] = queue.Queue()

    def pump():  # keep draining stdout so the server never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("ready"):
                ready.put(line)
        ready.put("")

    threading.Thread(target=pump, daemon=True).start()
    try:
        try:
            first = ready.get(timeout=SERVER_READY_TIMEOUT)
        except queue.Empty:
            first = None
        if not first:
            proc.kill()
            proc.wait()
            pytest.fail(
                f"server did not print 'ready' within {SERVER_READY_TIMEOUT:.0f} s "
                f"(exit {proc.returncode})\nstdout:\n" + "\n".join(lines)
                + "\nstderr:\n" + stderr_path.read_text()
            )
        yield RunningServer(proc, port, client_port, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("server did not exit within 15 s of SIGTERM")
    assert proc.returncode == 0, (
        f"server exited with {proc.returncode} after SIGTERM\nstderr:\n{stderr_path.read_text()}"
    )


def run_client(cmd: list[str], timeout: float = CLIENT_TIMEOUT, env: dict | None = None) -> str:
    """Run a client to completion, expect exit status 0; return stdout + stderr."""
    try:
        done = subprocess.run(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = "".join(
            (part.decode(errors="replace") if isinstance(part, bytes) else part)
            for part in (exc.stdout or "", exc.stderr or "")
        )
        pytest.fail(f"{Path(cmd[0]).name} did not quit by itself within {timeout} s; output:\n{out}")
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{Path(cmd[0]).name} exited with {done.returncode}; output:\n{out}"
    return out


def parse_predictions(output: str, pattern: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(pattern, output, flags=re.MULTILINE)]


def assert_predictions(points: list[tuple[float, float]], output: str):
    assert len(points) >= MIN_PREDICTIONS, (
        f"sent {GESTURES} gestures in accompany mode, expected at least {MIN_PREDICTIONS} "
        f"predictions back through the client's own /hello, got {len(points)}; output:\n{output}"
    )
    bad = [p for p in points if not (0.0 <= p[0] <= 1.0 and 0.0 <= p[1] <= 1.0)]
    assert not bad, f"predictions outside [0, 1]: {bad[:5]}"


def assert_line(pattern: str, output: str, what: str) -> re.Match:
    match = re.search(pattern, output, re.MULTILINE)
    assert match, f"{what}: no line matching {pattern!r} in the output:\n{output}"
    return match


def sc_string(text: str) -> str:
    """`text` as a SuperCollider string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sclang_env(**extra: str) -> dict:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", QTWEBENGINE_DISABLE_SANDBOX="1")
    env.update(extra)
    return env


# --------------------------------------------------------------------------- Pd patch parsing


class PdObject:
    def __init__(self, kind: str, atoms: list[str]):
        self.kind, self.atoms = kind, atoms  # kind: obj, msg, text, floatatom, ..., canvas

    @property
    def name(self) -> str:
        return self.atoms[0] if self.atoms else ""

    @property
    def args(self) -> list[str]:
        return self.atoms[1:]


def parse_pd(path: Path) -> list[tuple[list[PdObject], list[tuple[int, int, int, int]]]]:
    """Each canvas of a .pd file as (objects in creation order, connections)."""
    text = path.read_text()
    records = [r.strip() for r in re.split(r"(?<!\\);", text) if r.strip()]
    canvases, stack = [], []
    for rec in records:
        rec = re.sub(r",\s*f\s+\d+$", "", rec)  # drop the box width suffix
        atoms = rec.split()
        if atoms[:2] == ["#N", "canvas"]:
            stack.append(([], []))
        elif atoms[:2] == ["#X", "restore"]:
            canvases.append(stack.pop())
            stack[-1][0].append(PdObject("canvas", atoms[4:]))  # "pd name"
        elif atoms[:2] == ["#X", "connect"]:
            stack[-1][1].append(tuple(int(a) for a in atoms[2:6]))
        elif atoms[0] == "#X" and atoms[1] in ("obj", "msg", "text", "floatatom", "symbolatom", "listbox"):
            stack[-1][0].append(PdObject(atoms[1], atoms[4:]))
    canvases.append(stack.pop())
    assert not stack
    return canvases


def pd_io(path: Path) -> tuple[set[str], set[str], list[PdObject]]:
    """(addresses sent via oscformat, addresses routed after oscparse, all objects).

    oscparse splits an address at its slashes, so `/learn/done` is routed by `route learn`
    and then, from its `learn` outlet, by `route ... done`: nested routes make one address.
    """
    sent, received, everything = set(), set(), []
    for objects, conns in parse_pd(path):
        everything += objects
        outs, outlet_to = {}, {}
        for a, outlet, b, _ in conns:
            outs.setdefault(a, []).append(b)
            outlet_to.setdefault((a, outlet), []).append(b)

        def routed(k: int, prefix: str) -> set[str]:
            found = set()
            for n, selector in enumerate(objects[k].args):
                nested = [b for b in outlet_to.get((k, n), []) if objects[b].name == "route"]
                for b in nested:
                    found |= routed(b, f"{prefix}/{selector}")
                if not nested:
                    found.add(f"{prefix}/{selector}")
            return found

        for i, ob in enumerate(objects):
            if ob.kind == "obj" and ob.name == "oscformat":
                args = [a for a in ob.args]
                while args and args[0].startswith("-"):
                    args = args[2:]
                sent.add("/" + "/".join(args))
            if ob.kind == "obj" and ob.name == "oscparse":
                for j in outs.get(i, []):
                    nxt = objects[j]
                    if nxt.atoms[:2] == ["list", "trim"]:
                        for k in outs.get(j, []):
                            if objects[k].name == "route":
                                received |= routed(k, "")
    return sent, received, everything


# --------------------------------------------------------------------------- Pd


def test_pd_patch_opens_with_every_object_created():
    pd = require_program("pd", "puredata-core")
    assert PD_PATCH.is_file(), PD_PATCH  # pd would wait forever after "can't open"
    out = run_client([pd, "-nogui", "-nosound", "-nomidi", "-stderr", "-open", str(PD_PATCH),
                      "-send", "pd quit"])
    for problem in ("can't open", "couldn't create", "bad arguments", "no method", "no such object"):
        assert problem not in out, f"pd reported '{problem}' opening {PD_PATCH.name}:\n{out}"


@pytest.mark.parametrize("path", [PD_PATCH, PD_ROUNDTRIP, PD_LEARN], ids=["antiphon.pd", "roundtrip.pd", "learn.pd"])
def test_pd_patch_has_no_dead_objects(path):
    gui = {"hsl", "vsl", "tgl", "bng", "cnv", "nbx", "hradio", "vradio"}
    for objects, conns in parse_pd(path):
        wired = {a for a, _, _, _ in conns} | {b for _, _, b, _ in conns}
        dead = [" ".join(o.atoms) for i, o in enumerate(objects)
                if o.kind in ("obj", "msg") and o.name not in gui and i not in wired]
        assert not dead, f"{path.name}: objects with no cords: {dead}"


# The round trips again with the server's lookahead and voices on: each /prediction then
# comes in a timetagged bundle and carries a third argument, its voice number. Pd's
# oscparse unpacks the bundle (ignoring its timetag) and the voice rides along.
TIMING_FLAGS = {"plain": (), "bundles-and-voices": ("--lookahead", "0.05", "--voices", "per-sender")}


@pytest.mark.parametrize("flags", list(TIMING_FLAGS.values()), ids=list(TIMING_FLAGS))
def test_pd_round_trip_against_server(tmp_path, flags):
    """roundtrip.pd says /hello <its port> itself; the server's --send points elsewhere."""
    pd = require_program("pd", "puredata-core")
    assert PD_ROUNDTRIP.is_file(), PD_ROUNDTRIP  # pd would wait forever after "can't open"
    with running_server(tmp_path, *flags) as srv:
        out = run_client([pd, "-nogui", "-nosound", "-nomidi", "-stderr", "-open", str(PD_ROUNDTRIP),
                          "-send", f"roundtrip-ports {srv.port} {srv.client_port}"])
    for problem in ("can't open", "couldn't create"):
        assert problem not in out, f"pd reported '{problem}':\n{out}"
    assert_line(rf"^SENT: {GESTURES}$", out, "round trip did not finish sending")
    assert not re.search(r"^ERROR:", out, re.MULTILINE), f"server rejected a message:\n{out}"
    # the /status reply comes back through netsend, after the patch's /mode accompany
    assert_line(r"^STATUS: mode accompany\b", out, "no /status reply")
    voiced = "--voices" in flags
    points = parse_predictions(out, r"^PREDICTION: (\S+) (\S+) \d+$" if voiced else r"^PREDICTION: (\S+) (\S+)$")
    assert_predictions(points, out)
    received = int(assert_line(r"^RECEIVED: (\d+)$", out, "the patch did not report its count").group(1))
    assert received == len(points), out


# The musician's Pd patch with its `$0-` names made global and its ports moved to free ones,
# opened next to a helper that prints what reaches step 4's displays (their receive names).
PD_DISPLAYS = ("fraction", "nll", "model", "before", "after", "swapped")
PD_LEARN_HELPER = "#N canvas 0 0 400 400 12;\n" + "".join(
    f"#X obj 20 {20 + 60 * i} r antiphon-learn-{name};\n#X obj 20 {45 + 60 * i} print SHOWN-{name.upper()};\n"
    for i, name in enumerate(PD_DISPLAYS)
) + "".join(f"#X connect {2 * i} 0 {2 * i + 1} 0;\n" for i in range(len(PD_DISPLAYS)))


class Lines:
    """A process's output, read on a thread as it comes, so a test waits for what it expects (then stops
    the process) instead of sleeping a fixed time and hoping the process had got there."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc, self._lines, self._changed = proc, [], threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()

    def wait(self, pattern: str, count: int = 1, seconds: float = 15.0) -> bool:
        """Until ``count`` lines match ``pattern`` (a regex) or ``seconds`` pass; whether they did."""
        regex = re.compile(pattern)
        with self._changed:
            return self._changed.wait_for(lambda: sum(bool(regex.search(line)) for line in self._lines) >= count,
                                          seconds)

    def stop(self) -> str:
        """Terminate the process; everything it wrote."""
        self._proc.terminate()
        try:
            self._proc.wait(15)
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
        self._thread.join(15)
        return "".join(self._lines)


def osc_message(address: str, *args) -> bytes:
    from pythonosc.osc_message_builder import OscMessageBuilder

    builder = OscMessageBuilder(address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


def pd_patch_with_fake_server(tmp_path: Path, pd: str, helper: str, *extra: str,
                               edit=lambda source: source) -> tuple[socket.socket, int, list[str]]:
    """antiphon.pd with its `$0-` names made global (so `helper`, a patch opened after it, can listen
    to them and `-send` can reach them), sending to a fake server and listening on a free port:
    (the fake server's bound socket, the patch's port, the pd command with `extra` at its end)."""
    fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake.bind(("127.0.0.1", 0))
    listen_port = free_udp_ports(1)[0]
    return fake, listen_port, pd_patch_at(tmp_path, pd, helper, fake.getsockname()[1], listen_port, *extra, edit=edit)


def pd_patch_at(tmp_path: Path, pd: str, helper: str, server_port: int, listen_port: int, *extra: str,
                edit=lambda source: source) -> list[str]:
    """The pd command that opens antiphon.pd, its `$0-` names made global, sending to `server_port` and
    listening on `listen_port`, then `helper` (a patch that listens to those names); `extra` at its end."""
    _, _, port, send_port = server_contract()
    source = edit(PD_PATCH.read_text().replace(r"\$0-", "antiphon-"))
    source = re.sub(rf"\b{port}\b", str(server_port), source)
    source = re.sub(rf"\b{send_port}\b", str(listen_port), source)
    (tmp_path / "antiphon.pd").write_text(source)
    (tmp_path / "helper.pd").write_text(helper)
    return [pd, "-nogui", "-nosound", "-nomidi", "-stderr", "-path", str(tmp_path),
            "-open", str(tmp_path / "antiphon.pd"), "-open", str(tmp_path / "helper.pd"), *extra]


def fake_received(fake: socket.socket, done) -> list[tuple[str, list]]:
    """The (address, arguments) of each OSC message reaching `fake` until `done(them)` says so or its timeout."""
    from pythonosc.osc_message import OscMessage

    got: list[tuple[str, list]] = []
    try:
        while not done(got):
            message = OscMessage(fake.recvfrom(65536)[0])
            got.append((message.address, list(message.params)))
    except socket.timeout:
        pass
    return got


def test_pd_patch_learn_controls_send_and_show_the_result(tmp_path):
    """Step 4 of antiphon.pd against a fake server: learn/stop send, progress/result show."""
    from pythonosc.osc_message import OscMessage

    pd = require_program("pd", "puredata-core")
    # the displays of step 4 receive the names the helper listens to
    gui = " ".join(" ".join(o.atoms) for o in pd_io(PD_PATCH)[2] if o.kind != "text")
    for name in PD_DISPLAYS:
        assert rf"\$0-learn-{name} " in gui, f"no step 4 display receives $0-learn-{name}"
    fake, listen_port, cmd = pd_patch_with_fake_server(
        tmp_path, pd, PD_LEARN_HELPER,
        # what clicking the number box (5), learn and then stop does
        "-send", "antiphon-learn-seconds 5", "-send", "antiphon-learn bang", "-send", "antiphon-learn-stop bang")
    fake.settimeout(15)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc)
    got, sender = [], None
    try:
        try:
            while not any(address == "/learn/stop" for address, _ in got):
                data, sender = fake.recvfrom(65536)
                message = OscMessage(data)
                got.append((message.address, list(message.params)))
        except socket.timeout:
            pass
        if sender is not None:
            # as the server does: progress and result to every destination (our /hello port),
            # a refused /learn back to the port it came from (netsend's)
            fake.sendto(osc_message("/learn/progress", 0.5, -9.25), ("127.0.0.1", listen_port))
            fake.sendto(osc_message("/learn/done", "default-learn-x", -8.5, -9.75, 1), ("127.0.0.1", listen_port))
            fake.sendto(osc_message("/error", "/learn", "too few performer events"), sender)
            lines.wait(r"^(SHOWN-|antiphon-learn: |antiphon-error: )", count=len(PD_DISPLAYS) + 2)
    finally:
        out = lines.stop()
        fake.close()
    for problem in ("can't open", "couldn't create"):
        assert problem not in out, f"pd reported '{problem}':\n{out}"
    addresses = [address for address, _ in got]
    assert ("/learn", [5.0]) in got, f"the learn button should send /learn 5.0 (the number box); got {got}\n{out}"
    assert "/learn/stop" in addresses, f"the stop button should send /learn/stop; got {got}\n{out}"
    assert addresses.index("/learn") < addresses.index("/learn/stop")
    shown = dict(re.findall(r"^SHOWN-(\w+): (.+)$", out, re.MULTILINE))
    assert shown == {"FRACTION": "0.5", "NLL": "-9.25", "MODEL": "symbol default-learn-x",
                     "BEFORE": "-8.5", "AFTER": "-9.75", "SWAPPED": "1"}, f"step 4 shows {shown}:\n{out}"
    assert_line(r"^antiphon-learn: default-learn-x -8\.5 -9\.75 1$", out, "the result in the Pd window")
    assert_line(r"^antiphon-error: /learn too\\? few", out, "a refused /learn in the Pd window")


# What step "Surprise" shows: the number box and the meter (its send name: the value after
# clipping to -15..15) and the model voice's cutoff, which the meter shifts.
PD_SURPRISE_DISPLAYS = ("surprise", "surprise-meter", "model-cutoff")
PD_SURPRISE_HELPER = "#N canvas 0 0 400 400 12;\n" + "".join(
    f"#X obj 20 {20 + 60 * i} r antiphon-{name};\n#X obj 20 {45 + 60 * i} print SHOWN-{name.upper()};\n"
    for i, name in enumerate(PD_SURPRISE_DISPLAYS)
) + "".join(f"#X connect {2 * i} 0 {2 * i + 1} 0;\n" for i in range(len(PD_SURPRISE_DISPLAYS)))


def test_pd_patch_subscribes_to_surprise_and_shows_it(tmp_path):
    """antiphon.pd against a fake server: it sends /subscribe surprise <its port>, and a
    /surprise nll smoothed reaching it moves the meter and the number box to `smoothed`
    (clipped to -15..15 on the meter) and shifts the model voice's cutoff by that many semitones."""
    from pythonosc.osc_message import OscMessage

    pd = require_program("pd", "puredata-core")
    gui = " ".join(" ".join(o.atoms) for o in pd_io(PD_PATCH)[2] if o.kind != "text")
    assert r"hsl 250 18 -15 15 0 0 \$0-surprise-meter \$0-surprise-meter-in " in gui, "no surprise meter on -15..15"
    fake, listen_port, cmd = pd_patch_with_fake_server(
        tmp_path, pd, PD_SURPRISE_HELPER, "-send", "antiphon-hello bang")  # what clicking hello does: a second /subscribe
    fake.settimeout(15)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc)
    got = []
    try:
        try:
            while sum(address == "/subscribe" for address, _ in got) < 2:
                data, _ = fake.recvfrom(65536)
                message = OscMessage(data)
                got.append((message.address, list(message.params)))
        except socket.timeout:
            pass
        if got:
            to_patch = ("127.0.0.1", listen_port)
            for smoothed in (3.5, 30.0):  # in range, then beyond the meter's +15
                fake.sendto(osc_message("/surprise", -8.0, smoothed), to_patch)
                time.sleep(0.3)
                fake.sendto(osc_message("/prediction", 0.5, 0.5), to_patch)  # cutoff applies on the pluck
                time.sleep(0.3)
            lines.wait(r"^SHOWN-", count=2 * len(PD_SURPRISE_DISPLAYS))
    finally:
        out = lines.stop()
        fake.close()
    for problem in ("can't open", "couldn't create"):
        assert problem not in out, f"pd reported '{problem}':\n{out}"
    subscribes = [params for address, params in got if address == "/subscribe"]
    assert subscribes == [["surprise", listen_port]] * 2, (
        f"on load and with hello the patch should send /subscribe surprise {listen_port} (its port); got {got}\n{out}")
    shown = [(name, float(value)) for name, value in re.findall(r"^SHOWN-([A-Z-]+): (\S+)$", out, re.MULTILINE)]
    numbers = [v for name, v in shown if name == "SURPRISE"]
    meter = [v for name, v in shown if name == "SURPRISE-METER"]
    cutoff = [v for name, v in shown if name == "MODEL-CUTOFF"]
    assert numbers == [3.5, 30.0], f"the number box should show the smoothed surprise; shown {shown}\n{out}"
    assert len(meter) == 2 and abs(meter[0] - 3.5) < 0.01 and abs(meter[1] - 15.0) < 0.01, (
        f"the meter should follow the smoothed surprise, clipped to 15; shown {shown}\n{out}")
    midicps = lambda note: 440.0 * 2 ** ((note - 69) / 12)  # noqa: E731
    # y 0.5 alone gives MIDI 80; the meter adds its value in semitones
    assert len(cutoff) == 2 and all(abs(c - midicps(80 + m)) < 0.5 for c, m in zip(cutoff, (3.5, 15.0))), (
        f"the model voice's cutoff should rise with the surprise: {cutoff}\n{out}")


# What the model's pad and voice get from a /prediction: the x and y sliders and the cutoff.
PD_MODEL_DISPLAYS = ("model-x", "model-y", "model-cutoff")
PD_MODEL_HELPER = "#N canvas 0 0 400 400 12;\n" + "".join(
    f"#X obj 20 {20 + 60 * i} r antiphon-{name};\n#X obj 20 {45 + 60 * i} print SHOWN-{name.upper()};\n"
    for i, name in enumerate(PD_MODEL_DISPLAYS)
) + "".join(f"#X connect {2 * i} 0 {2 * i + 1} 0;\n" for i in range(len(PD_MODEL_DISPLAYS))) + (
    # opened after antiphon.pd: when it says so, both are loaded and listening
    f"#X obj 250 20 loadbang;\n#X obj 250 45 print HELPER-READY;\n"
    f"#X connect {2 * len(PD_MODEL_DISPLAYS)} 0 {2 * len(PD_MODEL_DISPLAYS) + 1} 0;\n")


def test_pd_patch_plays_bundled_and_voiced_predictions(tmp_path):
    """antiphon.pd gets /prediction in a timetagged bundle (the server's lookahead) and with a
    third voice argument (voices per-sender): each moves the model's pad and plucks its voice.
    Pd ignores the timetag: a bundle stamped 1 s ahead plays at once, before a plain message
    sent after it."""
    from server.osc.wire import encode_bundle, encode_prediction, ntp_timetag

    pd = require_program("pd", "puredata-core")
    fake, listen_port, cmd = pd_patch_with_fake_server(tmp_path, pd, PD_MODEL_HELPER)  # /hello and /status go to fake
    sent = [  # (packet, x, y) in the order sent
        (encode_prediction((0.5, 0.25)), 0.5, 0.25),  # plain, as with lookahead 0 and voices one
        (encode_bundle(ntp_timetag(time.time() + 60), encode_prediction((0.75, 0.125), 2)), 0.75, 0.125),
        (encode_prediction((0.375, 0.625), 1), 0.375, 0.625),  # plain, with a voice
        (encode_bundle(ntp_timetag(time.time() + 60), encode_prediction((0.625, 0.875))), 0.625, 0.875),
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc)
    try:
        lines.wait(r"^HELPER-READY")  # both patches are loaded (the patch said /hello already)
        for packet, _, _ in sent:
            fake.sendto(packet, ("127.0.0.1", listen_port))
            time.sleep(0.2)
        lines.wait(r"^SHOWN-", count=len(PD_MODEL_DISPLAYS) * len(sent))
    finally:
        out = lines.stop()
        fake.close()
    for problem in ("can't open", "couldn't create", "error", "mismatch"):
        assert problem not in out, f"pd reported '{problem}':\n{out}"
    shown = [(name, float(value)) for name, value in re.findall(r"^SHOWN-([A-Z-]+): (\S+)$", out, re.MULTILINE)]
    xs = [v for name, v in shown if name == "MODEL-X"]
    ys = [v for name, v in shown if name == "MODEL-Y"]
    cutoff = [v for name, v in shown if name == "MODEL-CUTOFF"]
    # bundles stamped a minute ahead show up at once, in the order they were sent
    assert xs == [x for _, x, _ in sent] and ys == [y for _, _, y in sent], (
        f"every /prediction (plain, bundled, with a voice) should move the model's pad at once; shown {shown}\n{out}")
    midicps = lambda note: 440.0 * 2 ** ((note - 69) / 12)  # noqa: E731
    expected = [midicps(50 + 60 * y) for _, _, y in sent]  # the meter is at 0: y alone sets the cutoff
    assert len(cutoff) == len(sent) and all(abs(c - e) < 0.5 for c, e in zip(cutoff, expected)), (
        f"each /prediction should pluck the model voice (cutoff {expected}): {cutoff}\n{out}")


# What step 5 shows and what reaches [noteout]: a stand-in abstraction that prints "note velocity".
PD_NOTE_HELPER = ("#N canvas 0 0 400 400 12;\n#X obj 20 20 r antiphon-midi-note;\n#X obj 20 45 print SHOWN-NOTE;\n"
                  "#X obj 200 20 r antiphon-midi-velocity;\n#X obj 200 45 print SHOWN-VELOCITY;\n"
                  "#X obj 20 100 loadbang;\n#X obj 20 125 print HELPER-READY;\n"
                  "#X connect 0 0 1 0;\n#X connect 2 0 3 0;\n#X connect 4 0 5 0;\n")
PD_NOTEOUT_SPY = ("#N canvas 0 0 300 200 12;\n#X obj 20 20 inlet;\n#X obj 100 20 inlet;\n#X obj 20 60 pack f f;\n"
                  "#X obj 20 90 print NOTEOUT;\n#X connect 0 0 2 0;\n#X connect 1 0 2 1;\n#X connect 2 0 3 0;\n")


def test_pd_patch_plays_a_note_models_predictions_as_midi_notes(tmp_path):
    """A note model's /prediction x y in antiphon.pd: note round(x * 127), velocity round(y * 127), shown in step 5
    and, with MIDI-out on, sent to [noteout 1] (here a stand-in that prints) with a note-off after it."""
    import numpy as np

    from server.osc.wire import encode_prediction

    pd = require_program("pd", "puredata-core")
    objects = [" ".join(o.atoms) for o in pd_io(PD_PATCH)[2]]
    assert "noteout 1" in objects and "makenote 90 250" in objects
    (tmp_path / "noteout-spy.pd").write_text(PD_NOTEOUT_SPY)
    fake, listen_port, cmd = pd_patch_with_fake_server(
        tmp_path, pd, PD_NOTE_HELPER, "-send", "antiphon-midi-on 1",  # what ticking MIDI-out does
        edit=lambda source: source.replace(" noteout 1;", " noteout-spy;"))
    f32 = lambda v: float(np.float32(v))  # noqa: E731  what the server sends
    sent = [(f32(60 / 127), f32(90 / 127)), (f32(60.3 / 127), f32(90 / 127)), (f32(60.7 / 127), f32(100 / 127))]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc)
    try:
        lines.wait(r"^HELPER-READY")
        for x, y in sent:
            fake.sendto(encode_prediction((x, y)), ("127.0.0.1", listen_port))
            time.sleep(0.4)  # each note's 250 ms is over before the next
        lines.wait(r"^NOTEOUT: \S+ 0$", count=len(sent))
    finally:
        out = lines.stop()
        fake.close()
    for problem in ("can't open", "couldn't create", "error", "mismatch"):
        assert problem not in out, f"pd reported '{problem}':\n{out}"
    assert [float(v) for v in re.findall(r"^SHOWN-NOTE: (\S+)$", out, re.MULTILINE)] == [60, 60, 61], out
    assert [float(v) for v in re.findall(r"^SHOWN-VELOCITY: (\S+)$", out, re.MULTILINE)] == [90, 90, 100], out
    played = [tuple(map(float, m)) for m in re.findall(r"^NOTEOUT: (\S+) (\S+)$", out, re.MULTILINE)]
    assert played == [(60, 90), (60, 0), (60, 90), (60, 0), (61, 100), (61, 0)], f"to noteout: {played}\n{out}"


def test_pd_learn_against_server(tmp_path):
    """learn.pd plays 120 gestures, asks /learn 5 and prints the real server's /learn/done."""
    pd = require_program("pd", "puredata-core")
    assert PD_LEARN.is_file(), PD_LEARN
    models = tmp_path / "models"  # the fine-tuned model is written here, not into the repository
    models.mkdir()
    shutil.copytree(REPO / "models" / "default", models / "default")
    with running_server(tmp_path, "--models-dir", str(models)) as srv:
        out = run_client([pd, "-nogui", "-nosound", "-nomidi", "-stderr", "-open", str(PD_LEARN),
                          "-send", f"learn-ports {srv.port} {srv.client_port}"], timeout=LEARN_TIMEOUT)
    for problem in ("can't open", "couldn't create"):
        assert problem not in out, f"pd reported '{problem}':\n{out}"
    assert_line(rf"^SENT: {LEARN_GESTURES}$", out, "learn.pd did not finish sending")
    assert not re.search(r"^(ERROR|TIMEOUT):", out, re.MULTILINE), (
        f"no /learn/done:\n{out}\nserver stderr (end):\n{(tmp_path / 'server.stderr').read_text()[-3000:]}")
    progress = [(float(f), float(n)) for f, n in re.findall(r"^LEARN_PROGRESS: (\S+) (\S+)$", out, re.MULTILINE)]
    assert progress and all(0.0 <= f <= 1.0 for f, _ in progress), f"progress after each epoch:\n{out}"
    done = assert_line(r"^LEARN_DONE: (\S+) (\S+) (\S+) (\S+)$", out, "the /learn/done result")
    model, before, after, swapped = done.group(1), float(done.group(2)), float(done.group(3)), done.group(4)
    assert swapped in ("0", "1"), out
    assert math.isfinite(before) and math.isfinite(after), out
    if swapped == "1":  # the new model plays; it exists and is better on the held-out playing
        assert model.startswith("default-learn-") and (models / model / "model.json").is_file(), out
        assert after < before, out
    else:
        assert model == "default", out


# --------------------------------------------------------------------------- Pd: on a laptop screen

PD_MENUBAR = 32  # Pd's menu bar above a patch's canvas on Linux and Windows (the GUI test measures it)
TITLE_BAR = 30  # what a window manager adds above that (Xvfb has none)


def pd_canvas(path: Path) -> tuple[int, int, int, int]:
    """The main window's place and size from the patch's first `#N canvas x y width height font` line."""
    first = re.match(r"#N canvas (-?\d+) (-?\d+) (\d+) (\d+) 12;", path.read_text())
    assert first, f"{path.name} should start with a font-12 #N canvas line"
    return tuple(int(v) for v in first.groups())


def test_pd_patch_window_fits_a_1366x768_screen():
    from tests.pdgui import SCREEN

    x, y, width, height = pd_canvas(PD_PATCH)
    assert x >= 0 and y >= 0 and x + width <= SCREEN[0], f"{width} px wide at x {x}: wider than {SCREEN[0]}"
    assert y + PD_MENUBAR + height + TITLE_BAR <= SCREEN[1], (
        f"{height} px high at y {y}, with a {PD_MENUBAR}-px menu bar and a {TITLE_BAR}-px title bar: over {SCREEN[1]}")


def overlapping_texts(items) -> list[tuple[str, str]]:
    """Pairs of text items (comments, labels, box texts) whose boxes overlap; Tk's boxes have a 1-px margin."""
    texts = [(i.box, i.text) for i in items if i.kind == "text" and i.text.strip()]
    found = []
    for n, ((ax1, ay1, ax2, ay2), a) in enumerate(texts):
        for (bx1, by1, bx2, by2), b in texts[n + 1:]:
            if min(ax2, bx2) - max(ax1, bx1) > 2 and min(ay2, by2) - max(ay1, by1) > 2:
                found.append((a, b))
    return found


def test_pd_patch_as_pd_draws_it_fits_1366x768_with_no_overlaps(tmp_path):
    """antiphon.pd in Pd's GUI on a 1366 x 768 Xvfb screen: the window fits with a title bar,
    no scrollbars, every drawn item inside the canvas, no two texts (comments, labels, boxes)
    overlapping, something drawn; and the README's screenshot is of this layout (its size)."""
    require_program("Xvfb", "xvfb")
    require_program("pd-gui", "puredata-gui")
    from PIL import Image, features

    from tests.pdgui import SCREEN, draw, not_blank, virtual_screen

    assert features.check("xcb"), "Pillow without XCB cannot grab the screen"
    x, y, width, height = pd_canvas(PD_PATCH)
    with virtual_screen(SCREEN) as display:
        drawn = draw(PD_PATCH, display, tmp_path)
    image = drawn.window_image()
    image.save(tmp_path / "antiphon.png")
    left, top, shown_width, shown_height = drawn.canvas
    assert (shown_width, shown_height) == (width, height), drawn.canvas
    assert (left, top - y) == (x, PD_MENUBAR), f"window at {x} {y}, canvas drawn at {left} {top}"
    assert left + width <= SCREEN[0] and top + height + TITLE_BAR <= SCREEN[1], drawn.canvas
    assert drawn.scrollbars == (False, False), "Pd shows scrollbars: something lies outside the window"
    outside = [(i.kind, i.box, i.text) for i in drawn.items
               if i.box[0] < -1 or i.box[1] < -1 or i.box[2] > width + 1 or i.box[3] > height + 1]
    assert not outside, f"drawn outside the {width} x {height} canvas: {outside}"
    objects = parse_pd(PD_PATCH)[-1][0]  # the main window's (each draws a text: box, comment or label)
    assert sum(i.kind == "text" for i in drawn.items) >= len(objects), "Pd drew too few texts: is the patch all there?"
    assert not overlapping_texts(drawn.items), f"texts that overlap: {overlapping_texts(drawn.items)}"
    assert not_blank(image), "the screenshot is blank"
    shipped = Image.open(PD_PATCH.with_suffix(".png"))
    assert shipped.size == image.size, (
        f"patches/pd/antiphon.png is {shipped.size}, the window {image.size}: run make pd-screenshot")


# The Pd window's whole say about a /status: one short line, and only when mode or model changed.
PD_STATUS_HELPER = ("#N canvas 0 0 400 400 12;\n#X obj 20 20 r antiphon-temperature-set;\n#X obj 20 45 print SHOWN-TEMPERATURE;\n"
                    "#X obj 200 20 r antiphon-sigma-set;\n#X obj 200 45 print SHOWN-SIGMA;\n"
                    "#X obj 20 100 loadbang;\n#X obj 20 125 print HELPER-READY;\n"
                    "#X connect 0 0 1 0;\n#X connect 2 0 3 0;\n#X connect 4 0 5 0;\n")


def test_pd_patch_says_mode_and_model_in_one_line_when_they_change(tmp_path):
    """Four full /status replies (every key the server has) reach antiphon.pd: the sliders
    follow each, and the Pd window gets `antiphon: mode M model N` for the first and for those
    whose mode or model changed, nothing for the repeat, and no dump of the other keys."""
    from server.live.engine import STATUS_KEYS
    from server.osc.output import status_message

    pd = require_program("pd", "puredata-core")
    fake, listen_port, cmd = pd_patch_with_fake_server(tmp_path, pd, PD_STATUS_HELPER)
    base = {key: 0 for key in STATUS_KEYS}
    assert len(base) > 30 and {"mode", "model", "temperature", "sigma_temperature"} <= set(base)
    replies = [dict(base, mode="accompany", model="default", temperature=0.75, sigma_temperature=0.5),
               dict(base, mode="accompany", model="default", temperature=0.25, sigma_temperature=0.5),
               dict(base, mode="generate", model="default", temperature=1.5, sigma_temperature=0.125),
               dict(base, mode="generate", model="touch", temperature=1.0, sigma_temperature=0.125)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc)
    try:
        lines.wait(r"^HELPER-READY")
        for n, items in enumerate(replies, 1):
            fake.sendto(status_message(items), ("127.0.0.1", listen_port))
            lines.wait(r"^SHOWN-TEMPERATURE", count=n)  # each one handled before the next
    finally:
        out = lines.stop()
        fake.close()
    for problem in ("can't open", "couldn't create", "error", "mismatch"):
        assert problem not in out, f"pd reported '{problem}':\n{out}"
    said = re.findall(r"^antiphon\S*: .*$", out, re.MULTILINE)
    assert said == ["antiphon: mode accompany model default", "antiphon: mode generate model default",
                    "antiphon: mode generate model touch"], (
        f"the Pd window should get one line per change of mode or model; got {said}\n{out}")
    shown = [float(v) for v in re.findall(r"^SHOWN-TEMPERATURE: (\S+)$", out, re.MULTILINE)]
    assert shown == [0.75, 0.25, 1.5, 1.0], f"the temperature slider should follow /status: {shown}\n{out}"
    assert [float(v) for v in re.findall(r"^SHOWN-SIGMA: (\S+)$", out, re.MULTILINE)] == [0.5, 0.5, 0.125, 0.125], out


# --------------------------------------------------------------------------- SuperCollider


def test_supercollider_client_compiles(tmp_path):
    sclang = require_program("sclang", "supercollider-language")
    check = tmp_path / "compile.scd"
    check.write_text(
        f'var f = thisProcess.interpreter.compileFile("{SC_CLIENT}");\n'
        'if(f.isNil) { "COMPILE FAILED".postln; 1.exit } { "COMPILE OK".postln; 0.exit };\n'
    )
    out = run_client([sclang, str(check)], timeout=60, env=sclang_env())
    assert "COMPILE OK" in out, out


@pytest.mark.parametrize("flags", list(TIMING_FLAGS.values()), ids=list(TIMING_FLAGS))
def test_supercollider_round_trip_against_server(tmp_path, flags):
    """roundtrip.scd says /hello <its port> itself; the server's --send points elsewhere."""
    sclang = require_program("sclang", "supercollider-language")
    with running_server(tmp_path, *flags) as srv:
        env = sclang_env(ANTIPHON_HOST="127.0.0.1", ANTIPHON_PORT=str(srv.port),
                         ANTIPHON_SEND_PORT=str(srv.client_port))
        out = run_client([sclang, str(SC_ROUNDTRIP)], env=env)
    assert_line(rf"^SENT {GESTURES}$", out, "round trip did not finish sending")
    assert not re.search(r"^ERROR", out, re.MULTILINE), f"error during the round trip:\n{out}"
    assert_line(r"^STATUS mode accompany\b", out, "no /status reply")
    points = parse_predictions(out, r"^PREDICTION (\S+) (\S+)$")
    assert_predictions(points, out)
    received = int(assert_line(r"^RECEIVED (\d+)$", out, "the script did not report its count").group(1))
    assert received == len(points), out


# Runs the musician's client (antiphon.scd) headless. The audio server is made to fail
# the way it does without scsynth or without JACK (its program does not exist), so the
# window must come up without sound. Then: move the blue pad GESTURES times, wait for the
# answers, have ANOTHER client (a separate Python process) switch the server to `listen`,
# and wait for the window's status line to show it. Then the learn controls: press learn
# (the real server refuses: 30 moves are too few) and stop (nothing runs), and have a fake
# server send /learn/progress and then /learn/done to the window's port. Waits are
# generous and end early.
SC_GUI_HARNESS = r"""
var count = 0, last, surprises = 0;
var wait = { |seconds, condition|  // poll until condition or timeout; never a proof of absence
	var waited = 0;
	while { condition.value.not and: { waited < seconds } } { 0.1.wait; waited = waited + 0.1 };
};
Server.program = "exec %NO_SCSYNTH%";
OSCdef(\testCount, { |msg| count = count + 1; last = msg[1..2] }, '/prediction');
OSCdef(\testSurprise, { |msg| surprises = surprises + 1 }, '/surprise');
thisProcess.interpreter.executeFile("%CLIENT%");
Routine {
	var window, pads, texts, line, buttons, bar, surpriseBar;
	wait.(20, { (Window.allWindows ? []).any { |w| w.name == "Antiphon" } });
	window = (Window.allWindows ? []).detect { |w| w.name == "Antiphon" };
	if(window.isNil) { "HARNESS NO WINDOW".postln; 1.exit; nil.alwaysYield };
	pads = window.view.children.select { |v| v.isKindOf(Slider2D) };
	texts = window.view.children.select { |v| v.isKindOf(StaticText) };
	line = { |prefix| var view = texts.detect { |t| t.string.beginsWith(prefix) }; if(view.isNil) { "" } { view.string } };
	("HARNESS PADS " ++ pads.size).postln;
	wait.(30, { line.("server: mode").size > 0 });
	("HARNESS STATUSLINE " ++ line.("server:")).postln;
	%GESTURES%.do { |i| pads[0].setXYActive(i / %GESTURES%, 1 - (i / %GESTURES%)); 0.1.wait };
	wait.(30, { count >= %GESTURES% });
	("HARNESS PREDICTIONS " ++ count).postln;
	wait.(5, { surprises > 0 });
	("HARNESS SURPRISES " ++ surprises).postln;
	wait.(5, { last.notNil and: { (pads[1].x - last[0]).abs < 0.001 } });
	("HARNESS MODELPAD % % LAST %".format(pads[1].x, pads[1].y, last)).postln;
	("HARNESS MIDILINE " ++ line.("MIDI:")).postln;
	%OTHER_CLIENT%.unixCmd({ |code| ("HARNESS OTHER CLIENT EXIT " ++ code).postln });
	wait.(30, { line.("server:").contains("mode listen") });
	("HARNESS STATUSLINE " ++ line.("server:")).postln;
	("HARNESS MODEMENU " ++ window.view.children.detect { |v| v.isKindOf(PopUpMenu) }.item).postln;
	wait.(30, { line.("sound:").beginsWith("sound: off") });
	("HARNESS SOUNDLINE " ++ line.("sound:")).postln;
	buttons = window.view.children.select { |v| v.isKindOf(Button) };
	("HARNESS BUTTONS " ++ buttons.collect { |b| b.states[0][0] }.join(" ")).postln;
	bar = window.view.children.detect { |v| v.isKindOf(Slider) };
	surpriseBar = window.view.children.select { |v| v.isKindOf(Slider) }[1];
	("HARNESS LEARNLINE " ++ line.("learn:")).postln;
	buttons.detect { |b| b.states[0][0] == "learn" }.doAction;
	wait.(10, { line.("learn:").contains("failed") });
	("HARNESS LEARNLINE " ++ line.("learn:")).postln;
	buttons.detect { |b| b.states[0][0] == "stop" }.doAction;
	wait.(10, { line.("learn:").contains("/learn/stop") });
	("HARNESS LEARNLINE " ++ line.("learn:")).postln;
	%FAKE_LEARN%.unixCmd({ |code| ("HARNESS FAKE LEARN EXIT " ++ code).postln });
	wait.(10, { line.("learn:").contains("% done") });
	("HARNESS LEARNLINE " ++ line.("learn:")).postln;
	("HARNESS LEARNBAR " ++ bar.value).postln;
	wait.(10, { line.("learn:").beginsWith("learn: done") });
	("HARNESS LEARNLINE " ++ line.("learn:")).postln;
	("HARNESS LEARNBAR " ++ bar.value).postln;
	wait.(10, { line.("surprise:").contains("3.5 nats") });
	("HARNESS SURPRISELINE " ++ line.("surprise:")).postln;
	("HARNESS SURPRISEBAR " ++ surpriseBar.value).postln;
	window.close;
	0.5.wait;
	0.exit;
}.play(AppClock);
"""


def test_supercollider_client_gui_against_server(tmp_path):
    """The musician's client itself, headless, with no audio server: what does it post?"""
    sclang = require_program("sclang", "supercollider-language")
    with running_server(tmp_path) as srv:
        source = SC_CLIENT.read_text()
        for old, new in (("var serverPort = 5710;", f"var serverPort = {srv.port};"),
                         ("var listenPort = 5711;", f"var listenPort = {srv.client_port};")):
            assert old in source, f"{SC_CLIENT.name} no longer has {old!r}"
            source = source.replace(old, new)
        client = tmp_path / "antiphon.scd"
        client.write_text(source)
        other = shlex.join([sys.executable, "-c", (
            "from pythonosc.udp_client import SimpleUDPClient; "
            f"SimpleUDPClient('127.0.0.1', {srv.port}).send_message('/mode', 'listen')")])
        fake_learn = shlex.join([sys.executable, "-c", (
            "import time; from pythonosc.udp_client import SimpleUDPClient; "
            f"c = SimpleUDPClient('127.0.0.1', {srv.client_port}); "
            "c.send_message('/learn/progress', [0.5, -9.25]); time.sleep(1.5); "
            "c.send_message('/learn/done', ['default-learn-x', -8.5, -9.75, 1]); time.sleep(0.5); "
            "c.send_message('/surprise', [-8.0, 3.5])")])
        harness = tmp_path / "harness.scd"
        harness.write_text(
            SC_GUI_HARNESS.replace("%CLIENT%", str(client))
            .replace("%NO_SCSYNTH%", str(tmp_path / "no-such-scsynth"))
            .replace("%GESTURES%", str(GESTURES))
            .replace("%OTHER_CLIENT%", sc_string(other))
            .replace("%FAKE_LEARN%", sc_string(fake_learn))
        )
        out = run_client([sclang, str(harness)], env=sclang_env())
    assert "ERROR" not in out, out
    assert_line(r"^HARNESS PADS 2$", out, "the window should have the two pads")
    # what the client posts, in the order it happens
    assert_line(rf"^Antiphon: talking to the server at 127\.0\.0\.1:{srv.port}, "
                rf"listening for /prediction on UDP {srv.client_port}$", out, "start line")
    assert_line(r"^Antiphon: window open$", out, "window line")
    assert_line(r"^Antiphon: no sound: the audio server \(scsynth\) did not start\..*"
                r"supercollider-server.*JACK", out, "the patch should explain why there is no sound")
    assert_line(rf"^Antiphon: connected to the server at 127\.0\.0\.1:{srv.port} \(mode accompany\)$",
                out, "first /status reply")
    assert_line(r"^Antiphon: first /prediction received: \S+ \S+$", out, "first prediction")
    # the same /prediction as a MIDI note: round(x * 127), round(y * 127)
    note, velocity, x, y = assert_line(r"^Antiphon: first /prediction as MIDI: note (\d+) velocity (\d+) from x (\S+) "
                                       r"y (\S+)$", out, "first prediction as MIDI").groups()
    assert (int(note), int(velocity)) == (round(float(x) * 127), round(float(y) * 127)), out
    assert_line(r"^HARNESS MIDILINE MIDI: note \d+ velocity \d+ \(MIDI out off\)$", out, "the MIDI line")
    assert_line(r"^Antiphon: server mode is now listen$", out, "mode change made by another client")
    assert_line(r"^Antiphon: window closed$", out, "close line")
    # what the window shows
    assert_line(r"^HARNESS STATUSLINE server: mode accompany\b", out, "status line before")
    assert_line(r"^HARNESS OTHER CLIENT EXIT 0$", out, "the other client")
    assert_line(r"^HARNESS STATUSLINE server: mode listen\b", out, "status line after /mode listen")
    assert_line(r"^HARNESS MODEMENU listen$", out, "mode menu after /mode listen")
    assert_line(r"^HARNESS SOUNDLINE sound: off - needs scsynth and a running JACK server", out, "sound line")
    # the learn controls: the buttons, the real server's refusals, then a fake fine-tune
    assert_line(r"^HARNESS BUTTONS reset hello learn stop lookahead: off MIDI out: off$", out, "the buttons")
    assert_line(r"^HARNESS LEARNLINE learn: play 100 moves or more, then press learn", out, "learn line at first")
    assert_line(r"^Antiphon: learn: asked the server to learn from your playing for 60 s$", out, "learn pressed")
    assert_line(r"^HARNESS LEARNLINE learn: /learn failed - too few performer events.* 30 played", out,
                "the server's /error /learn (30 moves are too few) on the learn line")
    assert_line(r"^HARNESS LEARNLINE learn: /learn/stop failed - ", out, "the server's /error /learn/stop")
    assert_line(r"^HARNESS FAKE LEARN EXIT 0$", out, "the fake fine-tune")
    assert_line(r"^HARNESS LEARNLINE learn: 50 % done, held-out NLL -9\.25 nats/event", out, "/learn/progress")
    assert_line(r"^HARNESS LEARNBAR 0\.5$", out, "the progress bar at /learn/progress 0.5")
    assert_line(r"^Antiphon: learn done: swapped in: default-learn-x \(held-out NLL -8\.5 -> -9\.75 nats/event\)$",
                out, "/learn/done in the post window")
    assert_line(r"^HARNESS LEARNLINE learn: done - swapped in: default-learn-x \(held-out NLL -8\.5 -> -9\.75 "
                r"nats/event\), the new model plays now$", out, "/learn/done on the learn line")
    assert_line(r"^HARNESS LEARNBAR 1(\.0)?$", out, "the progress bar full at /learn/done")
    # surprise: its own /subscribe made the real server send /surprise for the pad moves,
    # and a /surprise -8.0 3.5 sent to the window's port shows on its line and bar (-15..15)
    surprises = int(assert_line(r"^HARNESS SURPRISES (\d+)$", out, "surprise count").group(1))
    assert surprises > 0, f"the window's /subscribe surprise should bring /surprise from the server:\n{out}"
    assert_line(r"^HARNESS SURPRISELINE surprise: 3\.5 nats \(smoothed; last move -8(\.0)?\)", out,
                "the smoothed surprise on the surprise line")
    bar_value = float(assert_line(r"^HARNESS SURPRISEBAR (\S+)$", out, "the surprise bar").group(1))
    assert abs(bar_value - 18.5 / 30) < 1e-3, f"the surprise bar should sit at 3.5 on -15..15:\n{out}"
    count = int(assert_line(r"^HARNESS PREDICTIONS (\d+)$", out, "prediction count").group(1))
    assert count >= MIN_PREDICTIONS, f"moved the pad {GESTURES} times, got {count} predictions:\n{out}"
    pad = assert_line(r"^HARNESS MODELPAD (\S+) (\S+) LAST \[ (\S+), (\S+) \]$", out, "model pad")
    px, py, lx, ly = (float(v) for v in pad.groups())
    assert abs(px - lx) < 1e-3 and abs(py - ly) < 1e-3, f"the orange pad should show the last prediction:\n{out}"
    assert 0.0 <= lx <= 1.0 and 0.0 <= ly <= 1.0


# --------------------------------------------------------------------------- SuperCollider: lookahead

# What arrives at the fake audio server: OSC as scsynth gets it (commands may be numbers).
SCSYNTH_COMMANDS = {1: "/notify", 2: "/status", 3: "/quit", 9: "/s_new", 52: "/sync", 64: "/version"}
NTP_IMMEDIATE = 1  # the timetag that means "now"


def _osc_string(data: bytes, i: int) -> tuple[str, int]:
    end = data.index(b"\0", i)
    return data[i:end].decode(errors="replace"), (end + 4) & ~3


def decode_osc(data: bytes, timetag: int | None = None):
    """Yield (timetag or None, address, args) for each message of a packet, bundles unpacked.

    Enough OSC for what sclang sends scsynth: int, float, string, blob, double, int64, and
    numbered commands (`9` for /s_new) as well as named ones.
    """
    if data.startswith(b"#bundle\0"):
        tag, i = int.from_bytes(data[8:16], "big"), 16
        while i + 4 <= len(data):
            size = int.from_bytes(data[i:i + 4], "big", signed=True)
            yield from decode_osc(data[i + 4:i + 4 + size], tag)
            i += 4 + size
        return
    if data[:1] == b"/":
        address, i = _osc_string(data, 0)
    else:
        number, i = int.from_bytes(data[:4], "big", signed=True), 4
        address = SCSYNTH_COMMANDS.get(number, number)
    tags, i = _osc_string(data, i) if i < len(data) else (",", i)
    args: list = []
    for t in tags[1:]:
        if t == "i":
            args.append(int.from_bytes(data[i:i + 4], "big", signed=True))
            i += 4
        elif t == "f":
            args.append(struct.unpack(">f", data[i:i + 4])[0])
            i += 4
        elif t in "sS":
            text, i = _osc_string(data, i)
            args.append(text)
        elif t == "b":
            size = int.from_bytes(data[i:i + 4], "big")
            args.append(data[i + 4:i + 4 + size])
            i += 4 + ((size + 3) & ~3)
        elif t == "d":
            args.append(struct.unpack(">d", data[i:i + 8])[0])
            i += 8
        elif t == "h":
            args.append(int.from_bytes(data[i:i + 8], "big", signed=True))
            i += 8
        else:
            break
    yield timetag, address, args


def ntp_seconds(timetag: int) -> float:
    from server.osc.wire import timetag_seconds

    return timetag_seconds(timetag)


class UdpThread:
    """A loopback UDP socket served by a thread until the `with` block ends; subclasses handle each datagram."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            arrived = time.time()
            try:
                messages = list(decode_osc(data))
            except (ValueError, IndexError, struct.error):
                self.undecodable()
                continue
            for timetag, address, args in messages:
                self.handle(timetag, address, args, sender, arrived)

    def undecodable(self) -> None:
        pass

    def handle(self, timetag, address: str, args: list, sender, arrived: float) -> None:
        raise NotImplementedError


class FakeScsynth(UdpThread):
    """A stand-in for the audio server on a free UDP port, in a thread: it answers what sclang
    needs to think it runs (/status, /notify, /sync) and records every `/s_new` with its
    bundle's timetag and the wall-clock time it arrived."""

    REPLIES = {
        "/status": lambda args: osc_message("/status.reply", 1, 0, 0, 2, 1, 0.5, 0.6, 48000.0, 48000.0),
        "/notify": lambda args: osc_message("/done", "/notify", 0, 1),  # client id 0, one login
        "/sync": lambda args: osc_message("/synced", *args[:1]),
        "/quit": lambda args: osc_message("/done", "/quit"),
    }

    def __init__(self):
        super().__init__()
        self.synths: list[tuple[float, int | None, list]] = []  # (arrived, timetag, s_new args)
        self.addresses: set = set()

    def undecodable(self) -> None:
        self.addresses.add("(undecodable)")

    def handle(self, timetag, address, args, sender, arrived):
        self.addresses.add(address)
        if address == "/s_new":
            self.synths.append((arrived, timetag, args))
        elif address in self.REPLIES:
            self.sock.sendto(self.REPLIES[address](args), sender)

    def plucks(self) -> list[tuple[float, int | None, dict]]:
        """The model voice's plucks: (arrived, timetag, controls by name)."""
        return [(arrived, timetag, dict(zip(args[4::2], args[5::2])))
                for arrived, timetag, args in list(self.synths) if args and args[0] == "antiphonModel"]


class BundleListener(UdpThread):
    """A second client of the server, in a thread: says /hello from its own port and keeps the
    timetag of every `/prediction x y` bundle, by (x, y) as float32: the reference the
    SuperCollider client's plucks are compared with."""

    def __init__(self, server_port: int):
        super().__init__()
        self.server_port = server_port
        self.timetags: dict[tuple[float, float], list[int]] = {}
        self.bundles = 0

    def __enter__(self):
        self.sock.sendto(osc_message("/hello"), ("127.0.0.1", self.server_port))
        return super().__enter__()

    def handle(self, timetag, address, args, sender, arrived):
        if address == "/prediction" and timetag is not None:
            self.bundles += 1
            self.timetags.setdefault((args[0], args[1]), []).append(timetag)


def sc_client_for(srv: RunningServer, tmp_path: Path, poll_seconds: float | None = None) -> Path:
    """A copy of antiphon.scd talking to `srv` and listening on its free client port.

    ``poll_seconds``: how often the copy says /hello (2 s in the patch). Its listening port never
    speaks, so the server sends it only what the client's own messages pay for (4x their bytes): a
    client that says /hello more often gets its predictions sooner rather than in a clump every 2 s."""
    source = SC_CLIENT.read_text()
    poll = () if poll_seconds is None else (("var pollSeconds = 2,", f"var pollSeconds = {poll_seconds},"),)
    for old, new in (("var serverPort = 5710;", f"var serverPort = {srv.port};"),
                     ("var listenPort = 5711;", f"var listenPort = {srv.client_port};"), *poll):
        assert old in source, f"{SC_CLIENT.name} no longer has {old!r}"
        source = source.replace(old, new)
    client = tmp_path / "antiphon.scd"
    client.write_text(source)
    return client


LOOKAHEAD = 0.05  # seconds: what the server is started with
LOOKAHEAD_PREDICTIONS = 40  # predictions the harness waits for with the sound on
# The voice test: a plain /prediction with a voice, then a bundle with a voice, 0.3 s early.
VOICE_PLAIN = (0.25, 0.75, 3)
VOICE_BUNDLE = (0.125, 0.625, 4)
VOICE_BUNDLE_EARLY = 0.3

# Runs antiphon.scd headless against a fake audio server (so its sound is "on") and a real
# Antiphon server started with --lookahead and --mode generate. The harness's own
# /prediction responder prints, for each prediction, how far its time (the bundle's
# timetag) is ahead of now; the client schedules each pluck on the fake audio server,
# which records the timetags. Then another program sends it a plain and a bundled
# /prediction with a voice, and the harness turns the lookahead button off.
SC_LOOKAHEAD_HARNESS = r"""
var counting = false, count = 0;
var wait = { |seconds, condition|
	var waited = 0;
	while { condition.value.not and: { waited < seconds } } { 0.1.wait; waited = waited + 0.1 };
};
Server.default = Server(\antiphonTest, NetAddr("127.0.0.1", %SCSYNTH_PORT%));
s = Server.default;
OSCdef(\testEarly, { |msg, time|
	if(counting and: { count < %PREDICTIONS% }) {
		count = count + 1;
		("HARNESS EARLY " ++ (time - Main.elapsedTime)).postln;  // the timetag minus now
	};
}, '/prediction');
Routine {
	var window, texts, line, button;
	s.startAliveThread;  // the fake audio server answers /status: it "runs", nothing to boot
	wait.(10, { s.serverRunning });
	("HARNESS SCSYNTH RUNNING " ++ s.serverRunning).postln;
	thisProcess.interpreter.executeFile("%CLIENT%");
	wait.(20, { (Window.allWindows ? []).any { |w| w.name == "Antiphon" } });
	window = (Window.allWindows ? []).detect { |w| w.name == "Antiphon" };
	if(window.isNil) { "HARNESS NO WINDOW".postln; 1.exit; nil.alwaysYield };
	texts = window.view.children.select { |v| v.isKindOf(StaticText) };
	line = { |prefix| var view = texts.detect { |t| t.string.beginsWith(prefix) }; if(view.isNil) { "" } { view.string } };
	button = window.view.children.detect { |v| v.isKindOf(Button) and: { v.states[0][0].beginsWith("lookahead") } };
	wait.(20, { line.("sound:").beginsWith("sound: on") });
	("HARNESS SOUNDLINE " ++ line.("sound:")).postln;
	counting = true;
	wait.(30, { count >= %PREDICTIONS% });
	("HARNESS PREDICTIONS " ++ count).postln;
	wait.(5, { line.("timing:").contains("before its time") });
	("HARNESS TIMINGLINE " ++ line.("timing:")).postln;
	wait.(5, { line.("server:").contains("lookahead") });
	("HARNESS STATUSLINE " ++ line.("server:")).postln;
	("HARNESS LOOKAHEAD BUTTON " ++ button.value).postln;
	%VOICES%.unixCmd({ |code| ("HARNESS VOICES EXIT " ++ code).postln });
	(%VOICE_EARLY% + 1).wait;
	button.valueAction = 0;  // lookahead off: the server sends plain messages, played on arrival
	wait.(10, { line.("timing:").contains("lookahead off") });
	("HARNESS TIMINGLINE " ++ line.("timing:")).postln;
	wait.(10, { line.("server:").contains("lookahead 0.0") });
	("HARNESS STATUSLINE " ++ line.("server:")).postln;
	window.close;
	0.5.wait;
	0.exit;
}.play(AppClock);
"""


def test_supercollider_client_schedules_lookahead_bundles(tmp_path):
    """With --lookahead the server sends each /prediction early in a bundle timetagged with its
    time: sclang's OSC `time` is that timetag (about LOOKAHEAD ahead of arrival), and the
    client schedules each pluck on the audio server for exactly the server's time (the
    fake audio server sees the same timetag). A third `voice` argument pans the pluck; the
    lookahead button turns it off on the server."""
    sclang = require_program("sclang", "supercollider-language")
    with FakeScsynth() as scsynth, running_server(
            tmp_path, "--lookahead", str(LOOKAHEAD), "--mode", "generate", "--timescale", "0.25") as srv, \
            BundleListener(srv.port) as reference:
        voices = shlex.join([sys.executable, "-c", (
            f"import sys, time, socket; sys.path.insert(0, {str(REPO)!r}); "
            "from server.osc.wire import encode_bundle, encode_prediction, ntp_timetag; "
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"to = ('127.0.0.1', {srv.client_port}); "
            f"s.sendto(encode_prediction({VOICE_PLAIN[:2]!r}, {VOICE_PLAIN[2]!r}), to); time.sleep(0.1); "
            f"tag = ntp_timetag(time.time() + {VOICE_BUNDLE_EARLY}); "
            f"s.sendto(encode_bundle(tag, encode_prediction({VOICE_BUNDLE[:2]!r}, {VOICE_BUNDLE[2]!r})), to)")])
        harness = tmp_path / "harness.scd"
        harness.write_text(
            SC_LOOKAHEAD_HARNESS.replace("%CLIENT%", str(sc_client_for(srv, tmp_path, poll_seconds=0.2)))
            .replace("%SCSYNTH_PORT%", str(scsynth.port))
            .replace("%PREDICTIONS%", str(LOOKAHEAD_PREDICTIONS))
            .replace("%VOICES%", sc_string(voices))
            .replace("%VOICE_EARLY%", str(VOICE_BUNDLE_EARLY))
        )
        out = run_client([sclang, str(harness)], env=sclang_env())
        plucks = scsynth.plucks()
    assert "ERROR" not in out, out
    assert_line(r"^HARNESS SCSYNTH RUNNING true$", out, "the fake audio server should answer sclang")
    assert_line(r"^HARNESS SOUNDLINE sound: on\b", out, "the client should start its voices on the fake audio server")
    count = int(assert_line(r"^HARNESS PREDICTIONS (\d+)$", out, "prediction count").group(1))
    assert count >= LOOKAHEAD_PREDICTIONS, out
    # sclang sees the timetag: `time` is about LOOKAHEAD ahead of the moment the bundle arrived
    early = sorted(float(v) for v in re.findall(r"^HARNESS EARLY (\S+)$", out, re.MULTILINE))
    assert len(early) >= LOOKAHEAD_PREDICTIONS, out
    median = early[len(early) // 2]
    assert 0.6 * LOOKAHEAD <= median <= 1.4 * LOOKAHEAD, (
        f"sclang's OSC time should be the bundle's timetag, ~{LOOKAHEAD} s after arrival; median {median}:\n{out}")
    # the client says what it does, in the window and the post window
    shown = int(assert_line(r"^HARNESS TIMINGLINE timing: /prediction arrives (\d+) ms before its time: "
                            r"each pluck is scheduled for it on the audio server$", out, "the timing line").group(1))
    assert 0.6 * LOOKAHEAD * 1000 <= shown <= 1.4 * LOOKAHEAD * 1000, out
    assert_line(r"^Antiphon: timing: /prediction arrives \d+ ms before its time: each pluck is scheduled for it "
                r"on the audio server$", out, "the post window says predictions arrive early")
    assert_line(rf"^HARNESS STATUSLINE server: .*\blookahead {LOOKAHEAD}\b", out, "the lookahead on the status line")
    assert_line(r"^HARNESS LOOKAHEAD BUTTON 1$", out, "the lookahead button follows the server's /status")
    # each pluck is scheduled for the server's time: the fake audio server gets the very
    # timetag the server put on the bundle (matched by x and y), well ahead of when it arrives
    ours = [(arrived, timetag, c) for arrived, timetag, c in plucks
            if (c.get("x"), c.get("y")) in reference.timetags]
    assert len(ours) >= LOOKAHEAD_PREDICTIONS // 2, (
        f"{len(plucks)} plucks reached the audio server, {len(ours)} of them from the server's "
        f"{reference.bundles} bundles; it was sent {sorted(map(str, scsynth.addresses))}:\n{out}")
    on_time = [(arrived, timetag) for arrived, timetag, c in ours
               if timetag not in (None, NTP_IMMEDIATE)
               and any(abs(ntp_seconds(timetag) - ntp_seconds(theirs)) < 0.001
                       for theirs in reference.timetags[c["x"], c["y"]])]
    assert len(on_time) >= 0.9 * len(ours), (
        f"only {len(on_time)} of {len(ours)} plucks were timetagged with the server's time "
        f"(the rest played at once: {[t for _, t, _ in ours][:5]}):\n{out}")
    ahead = sorted(ntp_seconds(timetag) - arrived for arrived, timetag in on_time)
    assert 0.6 * LOOKAHEAD <= ahead[len(ahead) // 2] <= 1.4 * LOOKAHEAD, (
        f"plucks should reach the audio server ~{LOOKAHEAD} s before their time; median {ahead[len(ahead) // 2]}")
    # the optional voice: a plain message plays at once, a bundle at its time, each panned by voice
    pans = {3: 0.8, 4: 1.0}  # antiphon.scd's voicePan: 0.2 + 0.2 * (voice % 5)
    by_xy = {(c["x"], c["y"]): (arrived, timetag, c) for arrived, timetag, c in plucks}
    assert_line(r"^HARNESS VOICES EXIT 0$", out, "the program sending /prediction with a voice")
    x, y, voice = VOICE_PLAIN
    assert (x, y) in by_xy, f"/prediction {x} {y} {voice} (plain) should play a pluck; plucks {len(plucks)}:\n{out}"
    _, timetag, controls = by_xy[x, y]
    assert timetag in (None, NTP_IMMEDIATE), f"a plain /prediction plays at once, got timetag {timetag}"
    assert abs(controls["pan"] - pans[voice]) < 1e-6, f"voice {voice} should pan to {pans[voice]}: {controls}"
    x, y, voice = VOICE_BUNDLE
    assert (x, y) in by_xy, f"/prediction {x} {y} {voice} (a bundle) should play a pluck:\n{out}"
    arrived, timetag, controls = by_xy[x, y]
    assert timetag not in (None, NTP_IMMEDIATE), "a bundle's pluck should be scheduled"
    assert abs(ntp_seconds(timetag) - arrived - VOICE_BUNDLE_EARLY) < 0.1, (
        f"the pluck should be scheduled {VOICE_BUNDLE_EARLY} s ahead, got {ntp_seconds(timetag) - arrived}")
    assert abs(controls["pan"] - pans[voice]) < 1e-6, f"voice {voice} should pan to {pans[voice]}: {controls}"
    # the lookahead button turns it off on the server: then plain messages, played as they arrive
    assert_line(r"^HARNESS TIMINGLINE timing: each /prediction plays as it arrives \(lookahead off\)$", out,
                "the timing line after the lookahead button is turned off")
    assert_line(r"^HARNESS STATUSLINE server: .*\blookahead 0\.0\b", out, "the server's lookahead after the button")


# --------------------------------------------------------------------------- Max


def max_boxes_and_lines():
    patch = json.loads(MAX_PATCH.read_text())
    patcher = patch["patcher"]
    boxes = {b["box"]["id"]: b["box"] for b in patcher["boxes"]}
    assert len(boxes) == len(patcher["boxes"]), "duplicate box ids"
    return boxes, [ln["patchline"] for ln in patcher["lines"]]


def test_max_patch_plays_a_note_models_prediction_as_midi_notes():
    """From /prediction's unpack to [noteout]: x * 127 rounded as the note (through the MIDI-out toggle's gate),
    y * 127 rounded as the velocity, each through [makenote 90 250]."""
    boxes, lines = max_boxes_and_lines()

    def upstream(box: str, inlet: int) -> list[str]:
        """The texts met walking up the cords into ``inlet`` of ``box`` (a gate's data inlet, 1, after it), to the
        route of the server's addresses."""
        path = []
        while True:
            cords = [ln["source"] for ln in lines if ln["destination"] == [box, inlet]]
            assert len(cords) == 1, f"inlet {inlet} of {boxes[box].get('text')} is fed by {cords}"
            box = cords[0][0]
            path.append(boxes[box].get("text", boxes[box]["maxclass"]))
            inlet = 1 if path[-1] == "gate" else 0
            if path[-1].startswith("route /prediction"):
                return path

    noteout = next(bid for bid, b in boxes.items() if b.get("text") == "noteout")
    assert upstream(noteout, 0) == ["makenote 90 250", "gate", "round", "* 127.", "unpack 0. 0.", "t b l", "t l l b",
                                    "route /prediction /learn/progress /learn/done /surprise /model/dims /status"]
    assert upstream(noteout, 1)[0] == "makenote 90 250"
    makenote = next(bid for bid, b in boxes.items() if b.get("text") == "makenote 90 250")
    assert upstream(makenote, 1)[:3] == ["round", "* 127.", "unpack 0. 0."]
    gate = next(bid for bid, b in boxes.items() if b.get("text") == "gate")
    opener = [ln["source"][0] for ln in lines if ln["destination"] == [gate, 0]]
    assert [boxes[bid]["maxclass"] for bid in opener] == ["toggle"], "the MIDI-out toggle opens the gate"


def test_max_patch_is_valid_and_fully_wired():
    boxes, lines = max_boxes_and_lines()
    for bid, box in boxes.items():
        for key in ("id", "maxclass", "numinlets", "numoutlets", "patching_rect"):
            assert key in box, f"{bid} has no {key}"
        assert len(box["patching_rect"]) == 4, bid
        if box["maxclass"] in ("newobj", "message", "comment"):
            assert "text" in box, f"{bid} ({box['maxclass']}) has no text"
        if box["numoutlets"]:
            assert len(box.get("outlettype", [])) == box["numoutlets"], f"{bid} outlettype"
    connected = set()
    for ln in lines:
        (src, outlet), (dst, inlet) = ln["source"], ln["destination"]
        assert src in boxes and dst in boxes, f"cord joins a missing box: {ln}"
        assert 0 <= outlet < boxes[src]["numoutlets"], f"{src} has no outlet {outlet}"
        assert 0 <= inlet < boxes[dst]["numinlets"], f"{dst} has no inlet {inlet}"
        connected |= {src, dst}
    dead = [b["text"] for bid, b in boxes.items() if b["maxclass"] == "newobj" and bid not in connected]
    assert not dead, f"objects with no cords: {dead}"
    # inlet/outlet counts of the objects whose shape is easy to get wrong by hand
    for box in boxes.values():
        if box["maxclass"] != "newobj":
            continue
        name, *args = box["text"].split()
        if name == "route":
            assert (box["numinlets"], box["numoutlets"]) == (len(args) + 1, len(args) + 1), box["text"]
        if name in ("t", "trigger", "unpack"):
            assert box["numoutlets"] == len(args), box["text"]
        if name == "pack":
            assert box["numinlets"] == len(args), box["text"]
        if name == "udpsend":
            assert (box["numinlets"], box["numoutlets"]) == (1, 0)
        if name == "udpreceive":
            assert (box["numinlets"], box["numoutlets"]) == (1, 1)
    # every OSC message box (/mode ..., /learn 60, /learn/stop, ...) is cabled to udpsend, and
    # every address routed from udpreceive goes somewhere
    udpsend = [bid for bid, b in boxes.items() if b["maxclass"] == "newobj" and b["text"].startswith("udpsend ")]
    cords = {(ln["source"][0], ln["destination"][0]) for ln in lines}
    unsent = [b["text"] for bid, b in boxes.items()
              if b["maxclass"] == "message" and b.get("text", "").startswith("/") and (bid, udpsend[0]) not in cords]
    assert len(udpsend) == 1 and not unsent, f"message boxes not cabled to udpsend: {unsent}"
    udpreceive = [bid for bid, b in boxes.items() if b["maxclass"] == "newobj" and b["text"].startswith("udpreceive ")]
    routes = [bid for bid in boxes if (udpreceive[0], bid) in cords and boxes[bid]["text"].startswith("route ")]
    assert len(routes) == 1, "udpreceive should feed one route"
    used = {ln["source"][1] for ln in lines if ln["source"][0] == routes[0]}
    selectors = boxes[routes[0]]["text"].split()[1:]
    assert used >= set(range(len(selectors))), (
        f"route outlets with no cord: {[selectors[i] for i in set(range(len(selectors))) - used]}")


# --------------------------------------------------------------------------- no drift

ADDRESS = r"/[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*"  # /status, /learn/done


def max_io() -> tuple[set[str], set[str]]:
    boxes, _ = max_boxes_and_lines()
    sent, received = set(), set()
    for box in boxes.values():
        if box["maxclass"] not in ("newobj", "message"):
            continue
        text = box["text"]
        found = set(re.findall(rf"(?:^|[\s,]){ADDRESS}", text))
        found = {f.strip(" ,") for f in found}
        if text.startswith("route "):
            received |= found
        else:
            sent |= found
    return sent, received


def scd_io(path: Path) -> tuple[set[str], set[str]]:
    code = re.sub(r"//[^\n]*", "", path.read_text())
    sent = set(re.findall(rf"sendMsg\(\s*['\"]({ADDRESS})['\"]", code))
    received = set(re.findall(rf"\}},\s*['\"]({ADDRESS})['\"]", code))  # OSCdef(key, { ... }, '/address')
    everything = set(re.findall(rf"['\"]({ADDRESS})['\"]", code))
    assert everything == sent | received, f"{path.name}: unclassified addresses {everything - sent - received}"
    return sent, received


CLIENT_MUST_SEND = {"/gesture", "/hello", "/temperature", "/sigma_temperature", "/mode", "/reset",
                    "/learn", "/learn/stop", "/subscribe"}  # /subscribe surprise <port>
CLIENT_MUST_HEAR = {"/prediction", "/learn/progress", "/learn/done", "/surprise"}  # Max too: they come to udpreceive


@pytest.mark.parametrize("client", ["pd", "max", "supercollider"])
def test_patch_addresses_exist_in_server(client):
    inputs, outputs, _, _ = server_contract()
    if client == "pd":
        sent, received, _ = pd_io(PD_PATCH)
        rt_sent, rt_received, _ = pd_io(PD_ROUNDTRIP)
        learn_sent, learn_received, _ = pd_io(PD_LEARN)
        assert {"/learn"} <= learn_sent and {"/learn/progress", "/learn/done"} <= learn_received
        rt_sent, rt_received = rt_sent | learn_sent, rt_received | learn_received
    elif client == "max":
        sent, received = max_io()
        rt_sent, rt_received = set(), set()
    else:
        sent, received = scd_io(SC_CLIENT)
        rt_sent, rt_received = scd_io(SC_ROUNDTRIP)
    assert sent | rt_sent <= inputs, f"{client} sends addresses the server does not handle: {(sent | rt_sent) - inputs}"
    assert received | rt_received <= outputs, (
        f"{client} expects addresses the server never sends: {(received | rt_received) - outputs}"
    )
    assert CLIENT_MUST_SEND <= sent, f"{client} client lacks controls for {CLIENT_MUST_SEND - sent}"
    assert CLIENT_MUST_HEAR <= received, f"{client} client does not listen for {CLIENT_MUST_HEAR - received}"


def test_patch_ports_match_server_defaults():
    _, _, port, send_port = server_contract()
    # Pd: netsend connects to the server, netreceive listens, /hello names our port.
    pd_objects = pd_io(PD_PATCH)[2]
    texts = [" ".join(o.atoms) for o in pd_objects]
    assert f"connect 127.0.0.1 {port}" in texts
    assert f"netreceive -u -b {send_port}" in texts
    pd_source = PD_PATCH.read_text()
    assert re.search(rf"#X msg \d+ \d+ {send_port};\s*#X obj \d+ \d+ oscformat -f i hello;", pd_source), (
        "the Pd /hello should name the listening port"
    )
    assert re.search(rf"#X msg \d+ \d+ list surprise {send_port};\s*#X obj \d+ \d+ oscformat -f si subscribe;", pd_source), (
        "the Pd /subscribe surprise should name the listening port"
    )
    for path in (PD_ROUNDTRIP, PD_LEARN):
        rt = " ".join(" ".join(o.atoms) for o in pd_io(path)[2])
        assert f"list append {port} {send_port}" in rt, f"{path.name} defaults should be the server defaults"
    # Max
    boxes, _ = max_boxes_and_lines()
    max_texts = [b.get("text", "") for b in boxes.values() if b["maxclass"] in ("newobj", "message")]
    assert f"udpsend 127.0.0.1 {port}" in max_texts
    assert f"udpreceive {send_port}" in max_texts
    assert any(t.startswith(f"/hello {send_port}") for t in max_texts)
    assert f"/subscribe surprise {send_port}" in max_texts
    # SuperCollider
    sc = SC_CLIENT.read_text()
    assert f"var serverPort = {port};" in sc
    assert f"var listenPort = {send_port};" in sc
    assert """antiphon.sendMsg('/subscribe', "surprise", listenPort)""" in sc
    rt_sc = SC_ROUNDTRIP.read_text()
    assert f'"ANTIPHON_PORT".getenv ? "{port}"' in rt_sc
    assert f'"ANTIPHON_SEND_PORT".getenv ? "{send_port}"' in rt_sc
    # Every port number written in a patch is one of the defaults (catches a stray old port).
    for path in (PD_PATCH, MAX_PATCH, SC_CLIENT, SC_ROUNDTRIP, PD_ROUNDTRIP, PD_LEARN):
        numbers = set(re.findall(r"\b57\d\d\b", path.read_text()))
        assert numbers <= {str(port), str(send_port)}, f"{path.name} mentions ports {numbers}"
