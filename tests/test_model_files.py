"""Model folders on stage: a model is read once, checked, and held in memory; the folder cannot change what plays.

Every test drives a real `python -m server run` over loopback with greedy sampling
(temperature and sigma temperature 0), so a model's answer to a given first gesture is
exact and tells which model is playing. The models are a copy of models/default and
the two tiny region models of conftest (`a` plays near (0.2, 0.2), `b` near (0.8, 0.8)).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.live import REPO, OscPeer, ServerProcess, start_server

DEFAULT = REPO / "models" / "default"
PROBES = ((0.2, 0.3), (0.8, 0.6), (0.5, 0.5))
LOAD_SECONDS = 20.0  # a load is ~10 ms; this only bounds a hang on a busy machine
MODEL_GAP = 0.2  # seconds between one sender's /model requests: within the per-sender /model rate (5/s)
_last_model: dict[int, float] = {}  # peer port -> when it last asked for /model


def greedy_server(log_dir: Path, models: Path, peer: OscPeer, *flags: str) -> ServerProcess:
    srv = start_server(log_dir, "--models-dir", str(models), "--send", f"127.0.0.1:{peer.port}", "--seed", "1",
                       "--temperature", "0", "--sigma-temperature", "0", "--timescale", "1e-6", *flags)
    peer.target = ("127.0.0.1", srv.port)
    return srv


def first_answer(peer: OscPeer, x: float, y: float) -> tuple[float, float]:
    """The model's answer to the first gesture of a performance (after /reset, or a fresh model)."""
    peer.drain(0.05)
    peer.send("/gesture", x, y)
    got = peer.receive(5.0, "/prediction", count=1)
    assert got, "no answer to a gesture"
    return tuple(got[0][2][:2])  # type: ignore[return-value]


def answers(peer: OscPeer) -> list[tuple[float, float]]:
    out = []
    for x, y in PROBES:
        peer.send("/reset")
        out.append(first_answer(peer, x, y))
    return out


def await_load(peer: OscPeer, name: str, swaps_before: int) -> tuple[str, str | dict]:
    """Ask for /model `name`; ("error", reason) or ("loaded", status), whichever the server gives first.

    Requests from one peer are spaced `MODEL_GAP` apart (counted from the last, so the time spent
    meanwhile counts), and /status is asked again as soon as each reply is read.
    """
    time.sleep(max(0.0, _last_model.get(peer.port, 0.0) + MODEL_GAP - time.monotonic()))
    _last_model[peer.port] = time.monotonic()
    peer.send("/model", name)
    end = time.monotonic() + LOAD_SECONDS
    while time.monotonic() < end:
        peer.send("/status")
        for _, address, args in peer.receive(1.0, count=1):
            if address == "/error" and args[0] == "/model":
                return "error", args[1]
            if address == "/status":
                status = dict(zip(args[::2], args[1::2]))
                if status["model_swaps"] > swaps_before and not status.get("loading"):
                    return "loaded", status
        time.sleep(0.02)  # within the per-sender /status rate
    raise AssertionError(f"/model {name}: neither loaded nor refused in {LOAD_SECONDS} s")


@pytest.fixture
def models(tmp_path: Path, region_models) -> Path:
    """A models folder of our own to damage: default, a and b."""
    root = tmp_path / "models"
    shutil.copytree(DEFAULT, root / "default")
    for name in ("a", "b"):
        shutil.copytree(region_models.folder / name, root / name)
    return root


# ----------------------------------------------------------------------------- held in memory


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """What `rsync --inplace` does: the same file (inode), new bytes."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate(len(data))


DAMAGE: tuple[tuple[str, Callable[[Path, Path], None]], ...] = (
    ("rewritten in place", lambda mine, other: _rewrite_in_place(mine, other.read_bytes())),
    ("copied over", lambda mine, other: shutil.copy(other, mine)),
    ("truncated", lambda mine, other: open(mine, "r+b").truncate(0)),
)


def test_the_playing_model_is_not_changed_by_its_files(models: Path, tmp_path: Path) -> None:
    peer, flow = OscPeer(), OscPeer()
    srv = greedy_server(tmp_path / "logs", models, peer)
    flow.target = peer.target
    playing = answers(peer)
    stop = threading.Event()

    def perform() -> None:  # a performer who keeps playing through it all
        i = 0
        while not stop.is_set():
            flow.send("/gesture", (i % 50) / 50, 0.5)
            i += 1
            time.sleep(0.01)

    player = threading.Thread(target=perform, daemon=True)
    player.start()
    try:
        for what, damage in DAMAGE:
            outputs = peer.status()["outputs"]
            damage(models / "default" / "step.tflite", models / "b" / "step.tflite")
            end = time.monotonic() + 10
            while srv.proc.poll() is None and peer.status()["outputs"] <= outputs + 5 and time.monotonic() < end:
                time.sleep(0.05)
            assert srv.proc.poll() is None, f"the server died when its step.tflite was {what}"
            assert peer.status()["outputs"] > outputs + 5, f"no answers after step.tflite was {what}"
        stop.set()
        player.join()
        peer.status()  # a barrier: the performer's answers (sent before its reply) are read and dropped
        assert answers(peer) == playing, "the playing model changed with its files"
        status = peer.status()
        assert status["model"] == "default" and status["model_swaps"] == 0
        kind, reason = await_load(peer, "default", 0)  # what is on disk now is refused, the old model plays on
        assert kind == "error" and "default/step.tflite does not match" in reason and "keeping 'default'" in reason
        assert answers(peer) == playing
    finally:
        stop.set()
        assert srv.stop() == 0
        peer.close()
        flow.close()


# ----------------------------------------------------------------------------- checked before it plays


def _fifo_model_json(folder: Path) -> None:
    (folder / "model.json").unlink()
    os.mkfifo(folder / "model.json")  # reading it would wait for a writer forever


def _tflite_folder(folder: Path) -> None:
    (folder / "step.tflite").unlink()
    (folder / "step.tflite").mkdir()


def _no_hashes(folder: Path) -> None:
    doc = json.loads((folder / "model.json").read_text())
    del doc["files"]
    (folder / "model.json").write_text(json.dumps(doc))


@pytest.fixture
def checked(tmp_path: Path) -> Path:
    """default, plus folders that must never play: an export without hashes, a link out, odd files."""
    root = tmp_path / "models"
    shutil.copytree(DEFAULT, root / "default")
    for name, spoil in (("old-export", _no_hashes), ("fifo-json", _fifo_model_json), ("tflite-folder", _tflite_folder)):
        shutil.copytree(DEFAULT, root / name)
        spoil(root / name)
    shutil.copytree(DEFAULT, tmp_path / "elsewhere" / "outside")
    (root / "linked").symlink_to(tmp_path / "elsewhere" / "outside", target_is_directory=True)
    return root


REFUSED = {  # model -> what the refusal must say
    "old-export": ("old-export/model.json", "no SHA-256", "antiphon train --data"),
    "linked": ("'linked'", "links outside the models folder"),
    "fifo-json": ("fifo-json/model.json", "not a regular file"),
    "tflite-folder": ("tflite-folder/step.tflite", "not a regular file"),
    "missing": ("'missing'", "available: default"),
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", ["old-export", "linked"])
def test_a_model_that_cannot_be_checked_does_not_start(checked: Path, tmp_path: Path, name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "run", "--port", "0", "--models-dir", str(checked), "--model", name,
         "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, capture_output=True, text=True, timeout=60,  # were it accepted, it would serve until killed
    )
    assert result.returncode == 1 and "ready:" not in result.stdout
    err = result.stderr
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in REFUSED[name]:
        assert fragment in err, (fragment, err)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_model_refuses_what_cannot_be_checked_and_names_no_path(checked: Path, tmp_path: Path) -> None:
    peer = OscPeer()
    srv = greedy_server(tmp_path / "logs", checked, peer)
    try:
        for name, fragments in REFUSED.items():
            kind, reason = await_load(peer, name, 0)
            assert kind == "error", f"{name} was loaded"
            assert f"model {name!r} not loaded, keeping 'default'" in reason, reason
            for fragment in fragments:
                assert fragment in reason, (fragment, reason)
            assert str(checked) not in reason and str(tmp_path) not in reason and "/tmp" not in reason, reason
        status = peer.status()
        assert status["model"] == "default" and status["model_swaps"] == 0
        first_answer(peer, 0.5, 0.5)
    finally:
        assert srv.stop() == 0
        peer.close()


# ----------------------------------------------------------------------------- never a mixed model


def test_loading_a_folder_while_it_is_replaced_never_mixes_two_models(models: Path, tmp_path: Path) -> None:
    """`live` is replaced over and over, as `antiphon train` replaces a model (rename away, rename in).

    Each /model live either fails with a clean reason or plays exactly model a or b:
    a model.json of one with the step.tflite of the other would answer differently.
    """
    shutil.copytree(models / "a", models / "live")
    shutil.copytree(models / "b", models / ".staged")
    peer = OscPeer()
    srv = greedy_server(tmp_path / "logs", models, peer)
    stop = threading.Event()
    swaps = [0]

    def replace_forever() -> None:
        while not stop.is_set():
            os.rename(models / "live", models / ".old")
            os.rename(models / ".staged", models / "live")
            os.rename(models / ".old", models / ".staged")
            swaps[0] += 1
            time.sleep(0.0005)

    try:
        reference = {}
        for n, name in enumerate(("a", "b")):
            kind, _ = await_load(peer, name, n)
            assert kind == "loaded"
            reference[name] = first_answer(peer, 0.5, 0.5)
        assert reference["a"] != reference["b"]
        loaded_count = 2
        outcomes = {"a": 0, "b": 0, "error": 0}
        replacer = threading.Thread(target=replace_forever, daemon=True)
        replacer.start()
        attempts = 0
        # at least 20 loads, and on until 5 saw a whole folder: a busy machine makes a load span more renames
        while attempts < 20 or (outcomes["a"] + outcomes["b"] < 5 and attempts < 200):
            attempts += 1
            kind, result = await_load(peer, "live", loaded_count)
            if kind == "error":
                assert isinstance(result, str) and "'live'" in result and "/tmp" not in result, result
                outcomes["error"] += 1
            else:
                loaded_count += 1
                assert isinstance(result, dict) and result["model"] == "live"
                answer = first_answer(peer, 0.5, 0.5)
                matches = [name for name, ref in reference.items() if answer == pytest.approx(ref, abs=1e-6)]
                assert matches, f"a mixed model: {answer} is neither a {reference['a']} nor b {reference['b']}"
                outcomes[matches[0]] += 1
        stop.set()
        replacer.join()
        assert swaps[0] > 100, "the folder was hardly replaced"
        assert outcomes["a"] + outcomes["b"] >= 5, outcomes  # most loads see a whole folder
        assert srv.proc.poll() is None
    finally:
        stop.set()
        assert srv.stop() == 0
        peer.close()
