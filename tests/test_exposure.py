"""Network exposure: loopback by default, a warning for anything else, `--allow` and `/model` names enforced."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import OscPeer, ServerProcess, start_server


class PeerAt(OscPeer):
    """An OscPeer whose socket is bound to a chosen loopback address (Linux routes all of 127/8 to lo)."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.sock.close()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server on every interface that accepts only 127.0.0.2."""
    srv = start_server(tmp_path_factory.mktemp("logs"), "--host", "0.0.0.0", "--allow", "127.0.0.2/32",
                       "--send", "127.0.0.1:9")
    yield srv
    assert srv.stop() == 0


def test_loopback_is_the_default_and_quiet(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    try:
        assert "listening on 127.0.0.1:" in srv.ready_line
        assert not any("WARNING" in line for line in srv.output)
    finally:
        assert srv.stop() == 0


def test_any_other_host_prints_a_warning(exposed: ServerProcess) -> None:
    warnings = [line for line in exposed.output if "WARNING" in line]
    assert len(warnings) == 1
    assert "every interface" in warnings[0] and "127.0.0.2/32" in warnings[0]


def test_allow_list_drops_other_senders_and_counts_them(exposed: ServerProcess) -> None:
    stranger, friend = PeerAt("127.0.0.1"), PeerAt("127.0.0.2")
    stranger.target = friend.target = ("127.0.0.1", exposed.port)
    try:
        before = friend.status()
        stranger.send("/status")
        stranger.send("/mode", "generate")
        stranger.send("/nope")
        assert stranger.receive(0.3) == []  # not even an /error: silence tells a scanner nothing
        after = friend.status()
        assert after["osc_denied"] - before["osc_denied"] == 3
        assert after["osc_received"] - before["osc_received"] == 1  # only the friend's /status
        assert after["mode"] == before["mode"]
    finally:
        stranger.close()
        friend.close()


@pytest.mark.parametrize("name", ["../default", "..", "/etc", "default/../default", "./default", "a\\b", ".git",
                                  "C:default"])
def test_model_accepts_only_folder_names(exposed: ServerProcess, name: str) -> None:
    friend = PeerAt("127.0.0.2")
    friend.target = ("127.0.0.1", exposed.port)
    try:
        address, reason = friend.request("/model", name, reply="/error")
        assert address == "/model" and "invalid model name" in reason
        status = friend.status()
        assert status["model"] == "default" and status["model_swaps"] == 0
    finally:
        friend.close()
