"""Faults around the server: broken model folders, an unwritable log directory, destinations nobody hears.

At start a fault must end the run with a message naming the file and what to do, and a
non-zero exit; while playing, the same faults must leave the music going.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.cli import main
from tests.live import REPO, OscPeer, start_server

DEFAULT = REPO / "models" / "default"


def _edit_json(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        doc = json.loads((folder / "model.json").read_text())
        change(doc)
        (folder / "model.json").write_text(json.dumps(doc))

    return edit


def _flip_a_weight(folder: Path) -> None:
    """A step.tflite that still loads but is not the one exported with this model.json."""
    data = bytearray((folder / "step.tflite").read_bytes())
    data[len(data) // 2] ^= 1
    (folder / "step.tflite").write_bytes(bytes(data))


def _garbage_with_its_checksum(folder: Path) -> None:
    """Garbage that model.json vouches for: only the interpreter can catch it."""
    garbage = b"TFL3" * 64
    (folder / "step.tflite").write_bytes(garbage)
    _edit_json(lambda doc: doc["files"].update({"step.tflite": hashlib.sha256(garbage).hexdigest()}))(folder)


# name -> (how to break a copy of models/default, what the error must say)
BROKEN: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "no-json": (lambda f: (f / "model.json").unlink(), ("no-json/model.json", "missing", "train")),
    "corrupt-json": (lambda f: (f / "model.json").write_text("{not json"), ("corrupt-json/model.json", "re-export")),
    "no-tflite": (lambda f: (f / "step.tflite").unlink(), ("no-tflite/step.tflite", "missing", "re-export")),
    "foreign-tflite": (_flip_a_weight, ("foreign-tflite/step.tflite", "does not match", "re-export")),
    "garbage-tflite": (_garbage_with_its_checksum, ("garbage-tflite/step.tflite", "not a valid LiteRT model")),
    "no-checksums": (_edit_json(lambda doc: doc.pop("files")), ("no-checksums/model.json", "no SHA-256", "re-export")),
    "wrong-dims": (_edit_json(lambda d: d["spec"].update(dims=2)), ("wrong-dims/model.json", "re-export")),
    "wrong-units": (_edit_json(lambda d: d["spec"].update(units=32)), ("step.tflite", "model.json", "re-export")),
    "bad-normalisation": (_edit_json(lambda d: d["normalisation"].update(scale=[0.0, 1.0, 1.0])),
                          ("bad-normalisation/model.json", "re-export")),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder: a copy of models/default plus one broken copy per fault in BROKEN."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(DEFAULT, root / "default")
    for name, (breaks, _) in BROKEN.items():
        shutil.copytree(DEFAULT, root / name)
        breaks(root / name)
    return root


def _run(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str]:
    code = main(["run", "--port", "0", *flags])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_model_at_start_names_the_file_and_the_fix(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    code, err = _run(capsys, "--models-dir", str(models), "--model", name, "--log-dir", str(tmp_path))
    assert code == 1
    assert err.startswith("error: ")
    for fragment in BROKEN[name][1]:
        assert fragment in err, (fragment, err)


def test_missing_model_folder_at_start(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "--models-dir", str(models), "--model", "nowhere", "--log-dir", str(tmp_path))
    assert code == 1 and "no model folder 'nowhere'" in err and str(models) in err


def test_unwritable_log_directory_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log folder should be")
    code, err = _run(capsys, "--log-dir", str(blocker / "logs"))
    assert code == 1
    assert "cannot create a performance log in" in err and str(blocker / "logs") in err and "--log-dir" in err


def test_a_start_up_fault_is_a_non_zero_process_exit(models: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "run", "--port", "0", "--models-dir", str(models), "--model",
         "foreign-tflite", "--log-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "step.tflite does not match" in result.stderr and "ready:" not in result.stdout


def test_hot_swap_to_a_broken_model_keeps_the_old_one_playing(models: Path, tmp_path: Path) -> None:
    peer = OscPeer()
    srv = start_server(tmp_path, "--models-dir", str(models), "--send", f"127.0.0.1:{peer.port}",
                       "--timescale", "1e-6")
    peer.target = ("127.0.0.1", srv.port)
    try:
        for name, (_, fragments) in sorted(BROKEN.items()):
            address, reason = peer.request("/model", name, reply="/error")
            assert address == "/model" and "keeping 'default'" in reason
            assert fragments[0] in reason, reason
            time.sleep(0.2)  # stay within the per-sender /model rate
            peer.send("/gesture", 0.5, 0.5)
            assert peer.receive(10.0, "/prediction", count=1), f"no answer after a failed swap to {name}"
        status = peer.status()
        assert status["model"] == "default" and status["model_swaps"] == 0 and status["osc_internal_errors"] == 0
        peer.send("/model", "default")  # a good model still swaps in (loaded off the loop: wait for it)
        end = time.monotonic() + 20.0
        while peer.status()["model_swaps"] != 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert peer.status()["model_swaps"] == 1
    finally:
        assert srv.stop() == 0
        peer.close()


def _closed_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_unreachable_destinations_do_not_stop_the_music(tmp_path: Path) -> None:
    peer = OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{_closed_port()}", "--send", "192.0.2.1:9",  # TEST-NET-1
                       "--timescale", "1e-6")
    peer.target = ("127.0.0.1", srv.port)
    try:
        peer.send("/hello")
        got: list = []
        for i in range(50):  # one at a time, each answered before the next: a burst would be coalesced
            sent = time.monotonic()
            peer.send("/gesture", i / 50, 0.5)
            got += peer.receive(10.0, "/prediction", count=1)
            time.sleep(max(0.0, sent + 0.008 - time.monotonic()))  # under max_rate (200/s): never a burst
            assert len(got) == i + 1, f"gesture {i} not answered while two destinations fail"
        status = peer.status()
        assert status["osc_destinations"] == 3 and status["osc_internal_errors"] == 0
        assert status["outputs"] == 50
        assert srv.proc.poll() is None
    finally:
        assert srv.stop() == 0
        peer.close()


def test_a_second_server_on_a_port_in_use_says_another_may_run_and_how_to_pick_another(tmp_path: Path, capsys) -> None:
    first = start_server(tmp_path / "first")
    try:
        code = main(["run", "--port", str(first.port), "--log-dir", str(tmp_path / "second")])
        err = capsys.readouterr().err
        assert first.proc.poll() is None  # the first plays on
    finally:
        assert first.stop() == 0
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"port 127.0.0.1:{first.port} is already in use" in lines[0], err
    assert "another Antiphon server" in lines[0] and f"--port {first.port + 10}" in lines[0], err
    assert "Traceback" not in err
