"""Test helpers: a real `python -m server run` subprocess and an OSC peer on a loopback UDP socket."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

REPO = Path(__file__).resolve().parent.parent
REPLY_SECONDS = 10.0  # how long a request waits for its reply: only a failing test ever waits this long
_SO_TIMESTAMPNS = 35  # Linux: the kernel stamps each datagram as it arrives (wall clock, struct timespec)
_TIMESPEC = struct.Struct("@ll")


def decode_datagram(data: bytes) -> list[tuple[float | None, OscMessage]]:
    """The messages of a datagram with the timetag (Unix seconds) of the bundle they came in, or None."""
    from server.osc.wire import bundle_messages, is_bundle, timetag_seconds

    if not is_bundle(data):
        return [(None, OscMessage(data))]
    tag = timetag_seconds(int.from_bytes(data[8:16], "big"))
    return [(tag, OscMessage(m)) for m in bundle_messages(data)]


def bundle(*messages: tuple[object, ...]) -> bytes:
    """One OSC bundle (timetag: immediately) of messages given as (address, *args)."""
    from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder

    builder = OscBundleBuilder(IMMEDIATELY)
    for address, *args in messages:
        message = OscMessageBuilder(str(address))
        for arg in args:
            message.add_arg(arg)
        builder.add_content(message.build())
    return builder.build().dgram


class OscPeer:
    """One UDP socket that sends OSC to the server and collects what comes back (predictions, errors)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.target: tuple[str, int] | None = None
        try:  # arrival times from the kernel, so a test process the machine delays still sees true arrivals
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        except OSError:
            pass

    def send(self, address: str, *args: object) -> None:
        b = OscMessageBuilder(address)
        for a in args:
            b.add_arg(a)
        self.send_raw(b.build().dgram)

    def send_raw(self, data: bytes) -> None:
        assert self.target is not None
        self.sock.sendto(data, self.target)

    def _read(self) -> tuple[bytes, float, float]:
        """One datagram with its arrival as (monotonic, Unix) time: the kernel's stamp where there is one
        (Linux), not when this process got round to reading it (on a busy machine the reader is late)."""
        data, ancdata, _, _ = self.sock.recvmsg(65536, 64)
        wall, mono = time.time(), time.monotonic()
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(cdata) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(cdata)
                stamp = sec + nsec * 1e-9
                if 0 <= wall - stamp < 60:  # else the wall clock was stepped meanwhile: the read time will do
                    return data, mono - (wall - stamp), stamp
        return data, mono, wall

    def receive(self, seconds: float, address: str | None = None, count: int | None = None) -> list[tuple[float, str, list]]:
        """Messages (arrival time, address, args) for up to ``seconds`` or until ``count`` matched."""
        out: list[tuple[float, str, list]] = []
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0 or (count is not None and len(out) >= count):
                return out
            self.sock.settimeout(left)
            try:
                data, arrived, _ = self._read()
            except socket.timeout:
                return out
            for _, msg in decode_datagram(data):  # a bundle's messages too (lookahead)
                if address is None or msg.address == address:
                    out.append((arrived, msg.address, list(msg.params)))

    def receive_timetagged(self, seconds: float, count: int) -> list[tuple[float, float | None, str, list]]:
        """(arrival as Unix time, the bundle's timetag as Unix time or None, address, args), up to `count`."""
        out: list[tuple[float, float | None, str, list]] = []
        end = time.monotonic() + seconds
        while len(out) < count and (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, _, arrived = self._read()
            except socket.timeout:
                break
            out.extend((arrived, tag, msg.address, list(msg.params)) for tag, msg in decode_datagram(data))
        return out

    def drain(self, seconds: float = 0.05) -> None:
        self.receive(seconds)

    def request(self, address: str, *args: object, reply: str, seconds: float = REPLY_SECONDS) -> list:
        self.send(address, *args)
        got = self.receive(seconds, reply, count=1)
        assert got, f"no {reply} reply to {address}"
        return got[0][2]

    def status(self, *which: str) -> dict:
        """The server's `/status` as a dict (`status("all")`: every voice's keys, as loopback may ask)."""
        args = self.request("/status", *which, reply="/status")
        return dict(zip(args[::2], args[1::2]))

    def close(self) -> None:
        self.sock.close()


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_dir: Path
    ready_line: str
    output: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def logs(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.csv"))


def start_server(log_dir: Path, *flags: str, timeout: float = 60.0) -> ServerProcess:
    """Start `python -m server run --port 0 ...` and wait for its `ready` line."""
    cmd = [sys.executable, "-m", "server", "run", "--port", "0", "--log-dir", str(log_dir), *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                found.append(line)

    threading.Thread(target=pump, daemon=True).start()
    end = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError("server did not become ready:\n" + "".join(lines))
        time.sleep(0.02)
    port = int(re.search(r"listening on [^ ]+:(\d+)", found[0]).group(1))
    return ServerProcess(proc, port, Path(log_dir), found[0], lines)
