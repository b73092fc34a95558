"""`/learn` judged against what plays: a fine-tune replaces only the very model it was trained from.

A fine-tune is judged against its parent, so swapping it in over any other model would
put on stage a model nobody compared with what was playing. Raced here with `/model`:

- on an engine with real model loads (each proven in its sandbox) and a stand-in training
  process that ends "better" when the test says so: `/model b` landing during the
  fine-tune, the parent reloaded under its own name, a load in flight when the fine-tune
  ends, a `/model` asked for while the fine-tune's model loads, and `/model` + `/learn`
  in one go;
- on a real server with a real training child, over UDP: `/model` during a real
  fine-tune, and `/model` and `/learn` in one bundle.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.live.controls import ControlError
from server.live.learning import Learner
from server.live.modes import Mode
from server.live.settings import Settings
from server.live.swap import ModelSwap
from server.model.predictor import Predictor
from tests.live import REPO, OscPeer, bundle, start_server
from tests.rig import build_engine

# A stand-in for `antiphon learn --json --background`: one progress line, then it waits for the test's
# go-ahead (a file) and ends "better", its model written where the real one writes it (a copy of the parent).
TRAINER = r"""
import json, shutil, sys, time
from pathlib import Path
go, argv = Path(sys.argv[1]), sys.argv[2:]
option = lambda flag: argv[argv.index(flag) + 1]
print(json.dumps({"progress": 0.1, "heldout_nll": -10.0}), flush=True)
end = time.monotonic() + 60
while not go.exists() and time.monotonic() < end:
    time.sleep(0.01)
name = option("--name")
shutil.copytree(option("--model"), Path(option("--models-dir")) / name)
print(json.dumps({"result": {"model": name, "nll_before": -10.0, "nll_after": -12.0, "better": True,
                             "seconds": 0.1}}), flush=True)
"""


class Stage:
    """An engine playing `a` (models `a` and `b`: copies of models/default) with a learner whose training
    process is the stand-in above; `notes` is what every destination was sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
        self.models = tmp_path / "models"
        self.models.mkdir()
        for name in ("a", "b"):
            shutil.copytree(REPO / "models" / "default", self.models / name)
        self.go = tmp_path / "go"
        self.notes: list[tuple[Any, ...]] = []
        log = tmp_path / "session.csv"
        self.learner = Learner(loop, self.models, lambda: log, lambda *m: self.notes.append(m),
                               command=(sys.executable, "-c", TRAINER, str(self.go)))
        self.engine, _ = build_engine(loop, Predictor.load(self.models / "a"), Settings(mode=Mode.LISTEN),
                                      models_dir=self.models, model_name="a")
        self.engine._learner = self.learner  # build_engine makes engines without one; /learn needs it
        for i in range(120):  # enough performer events to fine-tune on
            self.engine.perform(0.5, i / 120)

    def finish_training(self) -> None:
        self.go.touch()

    async def until(self, what: Callable[[], bool], seconds: float = 30.0) -> None:
        end = time.monotonic() + seconds
        while not what():
            assert time.monotonic() < end, f"timed out; notes {self.notes}, status {self.status()}"
            await asyncio.sleep(0.005)

    async def done(self) -> tuple[Any, ...]:
        await self.until(lambda: any(n[0] == "/learn/done" for n in self.notes))
        return next(n for n in self.notes if n[0] == "/learn/done")

    def errors(self) -> list[str]:
        return [n[2] for n in self.notes if n[0] == "/error" and n[1] == "/learn"]

    def status(self) -> dict[str, Any]:
        return {**self.engine.status()}

    async def close(self) -> None:
        self.finish_training()
        await self.until(lambda: not self.learner.running)
        await self.until(lambda: not self.engine.loading)
        self.engine.stop()


def on_stage(tmp_path: Path, scenario: Callable[[Stage], Any]) -> None:
    async def main() -> None:
        stage = Stage(asyncio.get_running_loop(), tmp_path)
        try:
            await asyncio.wait_for(scenario(stage), 60)
        finally:
            await stage.close()

    asyncio.run(main())


class HeldLoads:
    """ModelSwap's loads of the named models wait (in their worker thread) until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gates: dict[str, threading.Event] = {}
        read = ModelSwap._read

        def held(swap: ModelSwap, name: str) -> Predictor:
            gate = next((g for prefix, g in self.gates.items() if name.startswith(prefix)), None)
            if gate is not None:
                assert gate.wait(30), f"load of {name} never released"
            return read(swap, name)

        monkeypatch.setattr(ModelSwap, "_read", held)

    def hold(self, prefix: str) -> threading.Event:
        self.gates[prefix] = threading.Event()
        return self.gates[prefix]


# ------------------------------------------------------------------------------------------ the engine


def test_a_model_swapped_in_during_the_fine_tune_keeps_playing(tmp_path: Path) -> None:
    """/learn on a, /model b lands, the fine-tune of a ends better: b keeps playing, swapped 0, and why."""

    async def scenario(stage: Stage) -> None:
        stage.engine.learn(30)
        stage.engine.load_model("b")
        await stage.until(lambda: stage.engine.model_name == "b")
        stage.finish_training()
        done = await stage.done()
        assert done == ("/learn/done", "a", -10.0, -12.0, 0)
        assert len(stage.errors()) == 1 and "'b' plays now" in stage.errors()[0], stage.notes
        await asyncio.sleep(0.5)  # a swap asked for anyway would land by now
        status = stage.status()
        assert status["model"] == "b" and status["model_swaps"] == 1 and status["learn_swaps"] == 0
        assert status["learn"] == "done" and "not swapped in" in status["learn_last"]
        assert "'b' plays now" in status["learn_last"]

    on_stage(tmp_path, scenario)


def test_the_parent_reloaded_under_its_own_name_is_not_the_parent(tmp_path: Path) -> None:
    """A name can be loaded again (perhaps re-exported meanwhile): the fine-tune was judged against the install
    it started from, so a reload of `a` counts as another model."""

    async def scenario(stage: Stage) -> None:
        stage.engine.learn(30)
        stage.engine.load_model("a")
        await stage.until(lambda: stage.status()["model_swaps"] == 1)
        stage.finish_training()
        assert (await stage.done())[4] == 0
        assert stage.status()["model"] == "a" and stage.status()["learn_swaps"] == 0
        assert "'a' plays now" in stage.errors()[0]

    on_stage(tmp_path, scenario)


def test_a_fine_tune_over_an_unchanged_parent_is_swapped_in(tmp_path: Path) -> None:
    async def scenario(stage: Stage) -> None:
        stage.engine.learn(30)
        stage.finish_training()
        name, before, after, swapped = (await stage.done())[1:]
        assert swapped == 1 and name.startswith("a-learn-") and (before, after) == (-10.0, -12.0)
        assert stage.status()["model"] == name and stage.errors() == []

    on_stage(tmp_path, scenario)


def test_learn_while_a_model_is_loading_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`/model b` then `/learn` in one bundle: b is still loading, about to replace a, so a fine-tune of a would
    be judged against a model no longer playing. Refused at once, saying why; b then plays."""
    loads = HeldLoads(monkeypatch)
    gate = loads.hold("b")

    async def scenario(stage: Stage) -> None:
        stage.engine.load_model("b")
        with pytest.raises(ControlError, match="'b' is loading"):
            stage.engine.learn(30)
        assert not stage.learner.running and stage.status()["learn_runs"] == 0
        gate.set()
        await stage.until(lambda: stage.engine.model_name == "b")

    on_stage(tmp_path, scenario)


def test_a_model_still_loading_when_the_fine_tune_ends_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/learn on a, then /model b, whose load is still in flight when the fine-tune ends better: the performer's
    /model stands (the fine-tune does not override it), b plays."""
    loads = HeldLoads(monkeypatch)
    gate = loads.hold("b")

    async def scenario(stage: Stage) -> None:
        stage.engine.learn(30)
        stage.engine.load_model("b")
        stage.finish_training()
        done = await stage.done()
        assert done[1] == "a" and done[4] == 0
        assert "'b' is loading" in stage.errors()[0]
        gate.set()
        await stage.until(lambda: stage.engine.model_name == "b")
        await asyncio.sleep(0.5)
        assert stage.status()["model"] == "b" and stage.status()["learn_swaps"] == 0

    on_stage(tmp_path, scenario)


def test_a_model_asked_for_while_the_fine_tune_loads_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fine-tune ended better and its model is loading when /model b comes: b wins (the last request), and
    the learner says its model was not swapped in, rather than never ending."""
    loads = HeldLoads(monkeypatch)
    gate = loads.hold("a-learn-")

    async def scenario(stage: Stage) -> None:
        stage.engine.learn(30)
        stage.finish_training()
        await stage.until(lambda: stage.engine.loading.startswith("a-learn-"))
        stage.engine.load_model("b")
        gate.set()
        done = await stage.done()
        assert done[1] == "a" and done[4] == 0
        assert "'b' was asked for while it loaded" in stage.errors()[0]
        await stage.until(lambda: stage.engine.model_name == "b")
        status = stage.status()
        assert status["learn"] == "done" and status["learn_swaps"] == 0 and status["model_swaps"] == 1

    on_stage(tmp_path, scenario)


# ------------------------------------------------------------------------------------------ a real server


@pytest.fixture
def served(tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("default", "touch"):
        shutil.copytree(REPO / "models" / "default", models / name)
    peer = OscPeer()
    srv = start_server(tmp_path / "logs", "--models-dir", str(models), "--send", f"127.0.0.1:{peer.port}",
                       "--timescale", "0.01", "--seed", "3")
    peer.target = ("127.0.0.1", srv.port)
    yield srv, peer, models
    assert srv.stop() == 0
    peer.close()


def test_model_and_learn_in_one_bundle_refuses_the_learn(served) -> None:
    srv, peer, models = served
    for i in range(120):  # enough performer events for /learn, a pause after each so none is coalesced
        peer.send("/gesture", 0.5, i / 120)
        time.sleep(0.006)
    assert peer.status()["inputs"] >= 100
    peer.send_raw(bundle(("/model", "touch"), ("/learn", 5.0)))
    reply = peer.receive(10.0, "/error", count=1)
    assert reply and reply[0][2][0] == "/learn" and "'touch' is loading" in reply[0][2][1], reply
    end = time.monotonic() + 30
    while (status := peer.status())["model"] != "touch":
        assert time.monotonic() < end, status
        time.sleep(0.05)
    assert status["learn_runs"] == 0 and status["learn"] == "idle"


def test_a_real_fine_tune_does_not_replace_the_model_swapped_in_meanwhile(served) -> None:
    """/learn on default over UDP, /model touch while the real training child runs: when it ends, better, touch
    keeps playing, /learn/done says 0 and /error /learn and /status say why."""
    from tests.test_learn_live import play_enough, wait_for_training

    srv, peer, models = served
    # the figure's 160 positions in a second: one epoch on them ends ~30 nats/event better than default
    # on the held-out end (measured: 44 -> 15), so the premise below holds by far, without the 10 s of
    # playing the figure in its own time
    play_enough(peer)
    peer.send("/learn", 8.0)
    wait_for_training(peer, 180)
    peer.send("/model", "touch")
    errors, done = [], None
    end = time.monotonic() + 120
    while done is None and time.monotonic() < end:
        for _, address, args in peer.receive(0.1):
            if address == "/error":
                errors.append(args)
            elif address == "/learn/done":
                done = args
    assert done is not None, "no /learn/done"
    name, before, after, swapped = done
    assert after < before, f"the premise: the fine-tune ended better ({before} -> {after})"
    assert (name, swapped) == ("default", 0), done
    assert any(e[0] == "/learn" and "'touch' plays now" in e[1] for e in errors), errors
    time.sleep(0.5)
    status = peer.status()
    assert status["model"] == "touch" and status["model_swaps"] == 1 and status["learn_swaps"] == 0
    assert "not swapped in" in status["learn_last"] and "'touch' plays now" in status["learn_last"]
    learned = [p.name for p in models.iterdir() if p.name.startswith("default-learn-")]
    assert len(learned) == 1  # kept on disk: `/model <name>` plays it
