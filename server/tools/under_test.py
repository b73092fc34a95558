"""A `python -m server run` subprocess for the measuring tools (`bench`, `soak`), and asking it for `/status`."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from server.osc.wire import encode_message

REPO = Path(__file__).resolve().parents[2]


class ServerUnderTest:
    """A `python -m server run` subprocess on a free port, answering to our socket."""

    def __init__(self, model: str, reply_port: int, log_dir: Path, mode: str = "accompany", timescale: float = 1e-6,
                 *flags: str) -> None:
        cmd = [sys.executable, "-m", "server", "run", "--port", "0", "--model", model, "--mode", mode,
               "--timescale", str(timescale), "--send", f"127.0.0.1:{reply_port}", "--log-dir", str(log_dir), *flags]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ready:"):
                self.ready_s = time.monotonic() - t0
                self.port = int(re.search(r"listening on [^ ]+:(\d+)", line).group(1))
                break
        else:
            raise RuntimeError("server exited before it was ready")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(20)


def status(sock: socket.socket, port: int) -> dict[str, Any]:
    """The server's `/status` as a dict, asked on `sock` (other datagrams skipped); {} after 2 s of silence."""
    from pythonosc.osc_message import OscMessage

    sock.sendto(encode_message("/status"), ("127.0.0.1", port))
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        readable, _, _ = select.select([sock], [], [], end - time.monotonic())
        if readable:
            data = sock.recv(65536)
            if data.startswith(b"/status"):
                args = OscMessage(data).params
                return dict(zip(args[::2], args[1::2]))
    return {}
