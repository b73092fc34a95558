"""The client patches (Pd, Max, SuperCollider) open, talk to a real server, and agree with it.

- Pd: the shipped patch opens in a headless `pd` with every object created; the headless
  round-trip patch gets predictions back from a running `python -m server run`.
- SuperCollider: the client compiles, its GUI runs headless against a running server,
  and the headless round-trip script gets predictions back.
- Max: the patch is valid JSON whose cords join existing boxes and inlets/outlets.
- No drift: every OSC address a patch sends or expects exists in `server.osc`, and every
  patch uses the server's default ports.

Tests that need `pd` or `sclang` skip with the reason when the program is missing, except
under CI (env CI set), where a missing client program fails: CI installs them from
.ci/apt-packages.txt.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "patches"
PD_PATCH = PATCHES / "pd" / "antiphon.pd"
PD_ROUNDTRIP = PATCHES / "pd" / "tests" / "roundtrip.pd"
MAX_PATCH = PATCHES / "max" / "antiphon.maxpat"
SC_CLIENT = PATCHES / "supercollider" / "antiphon.scd"
SC_ROUNDTRIP = PATCHES / "supercollider" / "tests" / "roundtrip.scd"

SERVER_READY_TIMEOUT = 60.0
MIN_PREDICTIONS = 10

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- helpers


def server_command(port: int, send_port: int, log_dir: Path) -> list[str]:
    """The command that starts a real Antiphon server for the round trips (adjust here only)."""
    return [
        sys.executable, "-m", "server", "run",
        "--port", str(port),
        "--send", f"127.0.0.1:{send_port}",
        "--mode", "accompany",
        "--timescale", "0.05",
        "--log-dir", str(log_dir),
    ]


def server_contract():
    """The server's OSC table and default ports (the single source of truth)."""
    from server.osc import ADDRESSES, DEFAULT_PORT, DEFAULT_SEND_PORT, OUTPUT_ADDRESSES

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
    def __init__(self, proc: subprocess.Popen, port: int, send_port: int, lines: list[str]):
        self.proc, self.port, self.send_port, self.lines = proc, port, send_port, lines


@contextmanager
def running_server(tmp_path: Path):
    """Start `python -m server run` on free ports; after the block, SIGTERM it and expect exit 0."""
    port, send_port = free_udp_ports(2)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    stderr_path = tmp_path / "server.stderr"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            server_command(port, send_port, log_dir), cwd=REPO, env=env,
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
        yield RunningServer(proc, port, send_port, lines)
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


def run_client(cmd: list[str], timeout: float, env: dict | None = None) -> str:
    """Run a client to completion; return stdout + stderr (the clients print to either)."""
    try:
        done = subprocess.run(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"{cmd[0]} did not quit by itself within {timeout} s; output:\n{out}")
    return done.stdout + done.stderr


def parse_predictions(output: str, pattern: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(pattern, output, flags=re.MULTILINE)]


def assert_predictions(points: list[tuple[float, float]], output: str):
    assert len(points) >= MIN_PREDICTIONS, (
        f"expected at least {MIN_PREDICTIONS} predictions, got {len(points)}; output:\n{output}"
    )
    bad = [p for p in points if not (0.0 <= p[0] <= 1.0 and 0.0 <= p[1] <= 1.0)]
    assert not bad, f"predictions outside [0, 1]: {bad[:5]}"


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
    """(addresses sent via oscformat, addresses routed after oscparse, all objects)."""
    sent, received, everything = set(), set(), []
    for objects, conns in parse_pd(path):
        everything += objects
        outs = {}
        for a, _, b, _ in conns:
            outs.setdefault(a, []).append(b)
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
                                received |= {"/" + a for a in objects[k].args}
    return sent, received, everything


# --------------------------------------------------------------------------- Pd


def test_pd_patch_opens_with_every_object_created():
    pd = require_program("pd", "puredata-core")
    out = run_client([pd, "-nogui", "-nosound", "-nomidi", "-stderr", "-open", str(PD_PATCH),
                      "-send", "pd quit"], timeout=30)
    for problem in ("couldn't create", "bad arguments", "no method", "no such object"):
        assert problem not in out, f"pd reported '{problem}' opening {PD_PATCH.name}:\n{out}"


@pytest.mark.parametrize("path", [PD_PATCH, PD_ROUNDTRIP], ids=["antiphon.pd", "roundtrip.pd"])
def test_pd_patch_has_no_dead_objects(path):
    gui = {"hsl", "vsl", "tgl", "bng", "cnv", "nbx", "hradio", "vradio"}
    for objects, conns in parse_pd(path):
        wired = {a for a, _, _, _ in conns} | {b for _, _, b, _ in conns}
        dead = [" ".join(o.atoms) for i, o in enumerate(objects)
                if o.kind in ("obj", "msg") and o.name not in gui and i not in wired]
        assert not dead, f"{path.name}: objects with no cords: {dead}"


def test_pd_round_trip_against_server(tmp_path):
    pd = require_program("pd", "puredata-core")
    with running_server(tmp_path) as srv:
        out = run_client([pd, "-nogui", "-nosound", "-nomidi", "-stderr", "-open", str(PD_ROUNDTRIP),
                          "-send", f"roundtrip-ports {srv.port} {srv.send_port}"], timeout=30)
    assert "couldn't create" not in out, out
    assert re.search(r"^SENT: 40$", out, re.MULTILINE), f"round trip did not finish sending:\n{out}"
    assert not re.search(r"^ERROR:", out, re.MULTILINE), f"server rejected a message:\n{out}"
    assert_predictions(parse_predictions(out, r"^PREDICTION: (\S+) (\S+)$"), out)


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


def test_supercollider_round_trip_against_server(tmp_path):
    sclang = require_program("sclang", "supercollider-language")
    with running_server(tmp_path) as srv:
        env = sclang_env(ANTIPHON_HOST="127.0.0.1", ANTIPHON_PORT=str(srv.port),
                         ANTIPHON_SEND_PORT=str(srv.send_port))
        out = run_client([sclang, str(SC_ROUNDTRIP)], timeout=60, env=env)
    assert re.search(r"^SENT 40$", out, re.MULTILINE), f"round trip did not finish sending:\n{out}"
    assert not re.search(r"^ERROR", out, re.MULTILINE), f"error during the round trip:\n{out}"
    assert_predictions(parse_predictions(out, r"^PREDICTION (\S+) (\S+)$"), out)


SC_GUI_HARNESS = r"""
var count = 0;
// Stand in for the audio server: run the client's boot function at once, on the GUI clock.
s = (waitForBoot: { |self, func| func.fork(AppClock) }, sync: { 0.2.wait });
OSCdef(\testCount, { count = count + 1 }, '/prediction');
thisProcess.interpreter.executeFile("%CLIENT%");
Routine {
	var window, pads;
	1.5.wait;
	window = Window.allWindows.detect { |w| w.name == "Antiphon" };
	if(window.isNil) { "NO WINDOW".postln; 1.exit };
	pads = window.view.children.select { |v| v.isKindOf(Slider2D) };
	("PADS " ++ pads.size).postln;
	30.do { |i| pads[0].activex_(i / 30); pads[0].activey_(1 - (i / 30)); 0.05.wait };
	1.0.wait;
	("PREDICTIONS " ++ count).postln;
	("MODELPAD % %".format(pads[1].x, pads[1].y)).postln;
	window.close;
	0.exit;
}.play(AppClock);
"""


def test_supercollider_client_gui_against_server(tmp_path):
    """The musician's client itself: its window runs headless and its pad gets answers."""
    sclang = require_program("sclang", "supercollider-language")
    with running_server(tmp_path) as srv:
        source = SC_CLIENT.read_text()
        source = source.replace("var serverPort = 5710;", f"var serverPort = {srv.port};")
        source = source.replace("var listenPort = 5711;", f"var listenPort = {srv.send_port};")
        client = tmp_path / "antiphon.scd"
        client.write_text(source)
        harness = tmp_path / "harness.scd"
        harness.write_text(SC_GUI_HARNESS.replace("%CLIENT%", str(client)))
        out = run_client([sclang, str(harness)], timeout=60, env=sclang_env())
    assert "PADS 2" in out, out
    assert "ERROR" not in out, out
    match = re.search(r"^PREDICTIONS (\d+)$", out, re.MULTILINE)
    assert match and int(match.group(1)) >= MIN_PREDICTIONS, out


# --------------------------------------------------------------------------- Max


def max_boxes_and_lines():
    patch = json.loads(MAX_PATCH.read_text())
    patcher = patch["patcher"]
    boxes = {b["box"]["id"]: b["box"] for b in patcher["boxes"]}
    assert len(boxes) == len(patcher["boxes"]), "duplicate box ids"
    return boxes, [ln["patchline"] for ln in patcher["lines"]]


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


# --------------------------------------------------------------------------- no drift

ADDRESS = r"/[A-Za-z_][A-Za-z0-9_]*"


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


CLIENT_MUST_SEND = {"/gesture", "/hello", "/temperature", "/sigma_temperature", "/mode", "/reset"}


@pytest.mark.parametrize("client", ["pd", "max", "supercollider"])
def test_patch_addresses_exist_in_server(client):
    inputs, outputs, _, _ = server_contract()
    if client == "pd":
        sent, received, _ = pd_io(PD_PATCH)
        rt_sent, rt_received, _ = pd_io(PD_ROUNDTRIP)
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
    assert "/prediction" in received


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
    rt = " ".join(" ".join(o.atoms) for o in pd_io(PD_ROUNDTRIP)[2])
    assert f"list append {port} {send_port}" in rt, "roundtrip.pd defaults should be the server defaults"
    # Max
    boxes, _ = max_boxes_and_lines()
    max_texts = [b.get("text", "") for b in boxes.values() if b["maxclass"] in ("newobj", "message")]
    assert f"udpsend 127.0.0.1 {port}" in max_texts
    assert f"udpreceive {send_port}" in max_texts
    assert any(t.startswith(f"/hello {send_port}") for t in max_texts)
    # SuperCollider
    sc = SC_CLIENT.read_text()
    assert f"var serverPort = {port};" in sc
    assert f"var listenPort = {send_port};" in sc
    rt_sc = SC_ROUNDTRIP.read_text()
    assert f'"ANTIPHON_PORT".getenv ? "{port}"' in rt_sc
    assert f'"ANTIPHON_SEND_PORT".getenv ? "{send_port}"' in rt_sc
    # Every port number written in a patch is one of the defaults (catches a stray old port).
    for path in (PD_PATCH, MAX_PATCH, SC_CLIENT, SC_ROUNDTRIP, PD_ROUNDTRIP):
        numbers = set(re.findall(r"\b57\d\d\b", path.read_text()))
        assert numbers <= {str(port), str(send_port)}, f"{path.name} mentions ports {numbers}"
