"""A stage with neither TensorFlow nor LiteRT: the numpy step plays, proven in its child, served over UDP.

Every Python process these tests start (the server, and the child that proves each model) runs a
`sitecustomize` that refuses to import TensorFlow, Keras, TensorFlow Probability and LiteRT, as on a
machine where they are not installed, and says on stderr whenever something tried.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live import REPO, OscPeer, start_server

REFUSED = ("tensorflow", "keras", "tensorflow_probability", "ai_edge_litert", "tflite_runtime")
BLOCKER = f'''
import sys

class Refuse:
    """Refuses {REFUSED}: an import of any of them fails as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {REFUSED!r}:
            print(f"refused import of {{name}}", file=sys.stderr, flush=True)
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused by the test)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
'''


@pytest.fixture
def no_tensorflow(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """An environment whose Python processes cannot import TensorFlow or LiteRT (children inherit it)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(site), str(REPO)])
    monkeypatch.setenv("PYTHONPATH", path)
    return {**os.environ, "PYTHONPATH": path}


def test_the_numpy_path_never_imports_tensorflow(no_tensorflow: dict[str, str]) -> None:
    """auto without LiteRT: the numpy step is chosen, proven in a child (which cannot import them either), played."""
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from server.model.files import DEFAULT_MODELS_DIR\n"
        "from server.model.mdn import RandomBlocks\n"
        "from server.model.predictor import Predictor\n"
        "for name in ('default', 'touch', 'chorale'):\n"
        "    p = Predictor.load(DEFAULT_MODELS_DIR / name, prove=True)\n"
        "    draws = RandomBlocks(np.random.default_rng(0), p.info.spec.dims)\n"
        "    event = (0.1,) + (0.5,) * p.values\n"
        "    for _ in range(20):\n"
        "        p.observe(*event)\n"
        "        event = p.sample(draws, 1.0, 1.0)\n"
        "    print(name, p.backend, all(np.isfinite(event)))\n"
        "print('loaded:', sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'ai_edge_litert')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=no_tensorflow, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["default numpy True", "touch numpy True", "chorale numpy True", "loaded: []"]
    tried = {line.split()[-1].split(".")[0] for line in done.stderr.splitlines() if line.startswith("refused import")}
    assert tried == {"ai_edge_litert"}, done.stderr  # looked for LiteRT (auto), never for TensorFlow


def test_the_server_plays_and_swaps_over_udp_on_the_numpy_step(tmp_path: Path, no_tensorflow) -> None:
    """`run --step-engine numpy` on a machine without TensorFlow or LiteRT: ready line, /status, answers, a swap."""
    peer = OscPeer()
    srv = start_server(tmp_path, "--step-engine", "numpy", "--send", f"127.0.0.1:{peer.port}", "--mode", "accompany",
                       "--timescale", "0.01")
    peer.target = ("127.0.0.1", srv.port)
    try:
        assert "model default (numpy)" in srv.ready_line
        assert peer.status()["backend"] == "numpy"
        for i in range(5):
            peer.send("/gesture", 0.2 + 0.1 * i, 0.5)
        got = peer.receive(10.0, "/prediction", count=5)
        assert len(got) == 5 and all(0.0 <= v <= 1.0 for _, _, args in got for v in args[:2])
        peer.send("/model", "touch")
        deadline = time.monotonic() + 30.0  # a swap takes ~0.2 s (its proof in a child); only a failure waits this
        while (st := peer.status())["model"] != "touch" and time.monotonic() < deadline:
            peer.receive(0.05)
        assert (st["model"], st["backend"]) == ("touch", "numpy")
        peer.send("/gesture", 0.5, 0.5)
        assert peer.receive(10.0, "/prediction", count=1)
    finally:
        assert srv.stop() == 0
        peer.close()
    refused = [line for line in srv.output if line.startswith("refused import")]
    assert refused == [], refused  # a forced numpy engine does not even look for LiteRT
