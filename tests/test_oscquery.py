"""OSCQuery as a tool meets it: a real `run --oscquery 0`, its JSON read over HTTP on loopback.

Every address of the namespace table (the README's) is in the tree with the type tags
its arguments show there and its declared ranges; HOST_INFO names the UDP port the
server plays on; a VALUE follows a change sent over OSC. The server runs with a
`zeroconf` that records being imported and refuses to load: without `--advertise`
it is never imported, and with it the server stops with one line saying what to
install (so nothing here ever multicasts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from live import REPO, OscPeer, start_server
from server.osc.namespace import TABLE

DEADLINE = 10.0  # seconds a live change may take to show: only a failing test waits this long
TAGS = {"float": "f", "int": "i", "str": "s"}


def _poison(folder: Path) -> Path:
    """A `zeroconf` package on PYTHONPATH that leaves a mark when imported, then refuses; returns the mark's path."""
    mark = folder / "zeroconf-imported"
    package = folder / "poison" / "zeroconf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"open({str(mark)!r}, 'w').close()\nraise ImportError('zeroconf is refused in the tests')\n")
    return mark


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None
    except urllib.error.HTTPError as error:
        return error.code, None


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    mark = _poison(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "poison"))
    server = start_server(tmp_path / "logs", "--oscquery", "0")
    try:
        found = re.search(r"^oscquery: (http://\S+/)$", "".join(server.output), re.M)
        assert found, "".join(server.output)
        yield server, found[1]
    finally:
        code = server.stop()
    assert code == 0, "".join(server.output)  # the HTTP server closes with the rest
    assert not mark.exists(), "zeroconf was imported without --advertise"


def test_every_address_is_listed_with_its_type_tags_ranges_and_values_that_follow_live_changes(served: Any) -> None:
    server, url = served
    status, root = _get(url)
    assert status == 200 and root["FULL_PATH"] == "/"
    for a in TABLE:
        node = root
        for name in a.path.strip("/").split("/"):
            node = node["CONTENTS"][name]
        assert node["FULL_PATH"] == a.path and node["DESCRIPTION"] == a.summary
        params, count = a.signature(2)  # the default model takes 2 values
        required, every = "".join(TAGS[p.kind] for p in params[:count]), "".join(TAGS[p.kind] for p in params)
        assert node["TYPE"] == required
        longest = node["OVERLOADS"][-1] if every != required else node
        assert longest["TYPE"] == every
        for i, p in enumerate(params):
            if p.range is not None:
                shown = longest["RANGE"][i]
                assert shown == ({"VALS": list(p.range.values)} if p.range.values else
                                 {k: v for k, v in (("MIN", p.range.low), ("MAX", p.range.high)) if v is not None})
    assert root["CONTENTS"]["gesture"]["TYPE"] == "ff"
    assert root["CONTENTS"]["gesture"]["RANGE"] == [{"MIN": 0.0, "MAX": 1.0}] * 2
    assert root["CONTENTS"]["temperature"]["VALUE"] == [1.0]  # the default
    assert root["CONTENTS"]["mode"]["VALUE"] == ["accompany"]

    assert _get(url + "gesture?HOST_INFO") == _get(url + "?HOST_INFO")  # whatever the path
    info = _get(url + "?HOST_INFO")[1]
    assert (info["OSC_PORT"], info["OSC_TRANSPORT"]) == (server.port, "UDP")
    assert _get(url + "nowhere")[0] == 404
    assert _get(url + "gesture?VALUE")[0] == 204

    peer = OscPeer()
    peer.target = ("127.0.0.1", server.port)
    try:
        peer.send("/temperature", 0.5)
        peer.send("/mode", "listen")
        end = time.monotonic() + DEADLINE
        while (_get(url + "temperature?VALUE")[1], _get(url + "mode?VALUE")[1]) != (
                {"VALUE": [0.5]}, {"VALUE": ["listen"]}):
            assert time.monotonic() < end, "VALUE did not follow /temperature 0.5 and /mode listen"
            time.sleep(0.05)
    finally:
        peer.close()


def test_advertise_imports_zeroconf_and_says_what_to_install_when_it_is_missing(tmp_path: Path) -> None:
    """The poisoned zeroconf is met here, so its absence above means something: `--advertise` alone imports it."""
    mark = _poison(tmp_path)
    cmd = [sys.executable, "-m", "server", "run", "--port", "0", "--log-dir", str(tmp_path / "logs"),
           "--oscquery", "0", "--advertise"]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(tmp_path / "poison")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert '--advertise needs the zeroconf package: pip install "antiphon[advertise]"' in done.stderr
    assert mark.exists()
