"""What the README promises about `/learn`, each tested at its edge.

- The gate: a fine-tuned model is kept only if it does *better* on the held-out phrases
  than the model it started from: worse by 0.001 nats, or equal, is not kept.
- The learner swaps a fine-tuned model in only when the training process says it was
  better (`/learn/done ... 1`), and otherwise leaves the old one playing (`... 0`).
- At least 100 performer events; phrases cut at pauses over 1 s; the last phrases,
  about a fifth of the events, held out.

The gate is judged inside the real `fine_tune`, with the parts that cost time (training,
conversion, scoring, export) replaced by stand-ins that hand it exact figures. The
learner runs on a real event loop with a stand-in training process that prints the JSON
lines `antiphon learn --json` prints (a test below holds that format to the real command).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.learn import finetune
from server.learn.data import DatasetError
from server.live.controls import ControlError
from server.live.learning import Learner

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "models" / "default"


def performance(n: int, seed: int = 0) -> np.ndarray:
    """(dt, x, y) rows: one phrase of n events, 50 ms apart."""
    rng = np.random.default_rng(seed)
    events = np.column_stack([np.full(n, 0.05), rng.uniform(0.2, 0.8, (n, 2))]).astype(np.float32)
    events[0, 0] = 0.0
    return events


# --------------------------------------------------------------------------- the gate, inside fine_tune


@pytest.fixture
def judge(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., tuple[Any, list[Path]]]:
    """`judge(before, after)`: run `fine_tune` on models/default where the held-out NLL is `before` under the
    parent and `after` under the fine-tuned model; returns (result, the folders it exported)."""
    from server.learn import evaluate
    from server.learn.evaluate import Scores
    from server.learn.train import BestWeights
    from server.model import export as export_module

    exported: list[Path] = []

    def fit(model: Any, train_w: Any, held_w: Any, norm: Any, budget: float, cfg: Any, extra: Any) -> tuple:
        best = BestWeights()
        best.weights = model.get_weights()
        best.history = {"loss": [1.0], "val_loss": [1.0], "lr": [cfg.learning_rate]}
        return best, False

    monkeypatch.setattr(finetune, "fit_within", fit)
    monkeypatch.setattr(evaluate, "step_for", lambda *args, **kwargs: None)
    monkeypatch.setattr(export_module, "convert_to_tflite", lambda model, spec: b"")
    monkeypatch.setattr(export_module, "export", lambda model, info, folder, **kwargs: exported.append(Path(folder)))

    def run(before: float, after: float, events: np.ndarray | None = None) -> tuple[Any, list[Path]]:
        figures = iter([before, after])

        def score(step: Any, info: Any, ds: Any) -> Scores:
            value = next(figures)
            return Scores(value, value, 1, 1)

        monkeypatch.setattr(evaluate, "score", score)
        exported.clear()
        result = finetune.fine_tune(DEFAULT, [performance(120) if events is None else events], 10.0,
                                    tmp_path, "candidate")
        return result, list(exported)

    return run


def test_a_fine_tune_worse_by_a_thousandth_of_a_nat_is_not_kept(judge) -> None:
    result, exported = judge(-10.0, -9.999)
    assert not result.better and result.model == "default" and exported == []
    assert (result.nll_before, result.nll_after) == (-10.0, -9.999)


def test_a_fine_tune_no_better_than_its_parent_is_not_kept(judge) -> None:
    """README: "kept only if it does better": equal is not better."""
    result, exported = judge(-10.0, -10.0)
    assert not result.better and result.model == "default" and exported == []


def test_a_fine_tune_better_by_a_thousandth_of_a_nat_is_kept(judge, tmp_path: Path) -> None:
    result, exported = judge(-10.0, -10.001)
    assert result.better and result.model == "candidate" and exported == [tmp_path / "candidate"]
    assert (result.nll_before, result.nll_after) == (-10.0, -10.001)


def test_a_fine_tune_that_scores_nan_is_not_kept(judge) -> None:
    result, exported = judge(-10.0, math.nan)
    assert not result.better and exported == []


def test_a_fine_tune_needs_100_performer_events(judge) -> None:
    with pytest.raises(DatasetError, match="99"):
        judge(-10.0, -11.0, performance(99))
    result, _ = judge(-10.0, -11.0, performance(100))
    assert result.better and result.events_train + result.events_held_out <= 100


def test_phrases_are_cut_at_pauses_over_1_s() -> None:
    events = performance(6)
    events[2, 0] = 0.99  # a pause, but not over 1 s
    events[4, 0] = 1.01
    parts = finetune.phrases(events)
    assert [len(p) for p in parts] == [4, 2]
    assert parts[1][0, 0] == 0.0  # each phrase starts afresh


def test_the_last_phrases_with_a_fifth_of_the_events_are_held_out() -> None:
    perfs = [performance(5, seed=i) for i in range(20)]  # 100 events in phrases of 5
    rest, held = finetune.hold_out_last(perfs)
    assert len(held) == 4 and sum(len(p) for p in held) == 20  # 15 % would hold 3 phrases, 25 % 5
    assert all(np.array_equal(a, b) for a, b in zip(held, perfs[-4:]))
    assert len(rest) == 16


# --------------------------------------------------------------------------- what the training process prints


def test_learn_json_says_whether_the_model_was_better(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The lines `antiphon learn --json` prints, which the learner (and the stand-in below) speak."""
    from server.cli import main

    log = tmp_path / "session.csv"
    log.write_text("time,source,x,y\n" + "".join(f"{1000 + i * 0.05:.3f},performer,0.5,0.5\n" for i in range(5)))
    for better in (False, True):
        result = finetune.FineTuneResult("candidate" if better else "default", -10.0, -10.0 + (-0.001 if better else 0.001),
                                         better, 80, 20, 1.25, 3)
        monkeypatch.setattr(finetune, "fine_tune", lambda *args, **kwargs: result)
        assert main(["learn", "--model", str(DEFAULT), "--log", str(log), "--models-dir", str(tmp_path),
                     "--name", "candidate", "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert lines == [{"result": {"model": result.model, "nll_before": result.nll_before,
                                     "nll_after": result.nll_after, "better": better, "seconds": 1.2}}]


# --------------------------------------------------------------------------- the learner: swap only if better

# A stand-in for `antiphon learn --json --background`: prints what the real one prints, with the
# verdict it is given (its first argument), and writes the arguments it got to the file named second.
FAKE_TRAINER = r"""
import json, sys
from pathlib import Path
verdict, argv_file, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
Path(argv_file).write_text(json.dumps(argv))
option = lambda flag: argv[argv.index(flag) + 1]
print(json.dumps({"progress": 0.5, "heldout_nll": -10.0}), flush=True)
if verdict == "crash":
    sys.exit(3)
better = verdict == "better"
after = {"better": -10.001, "worse": -9.999, "equal": -10.0}[verdict]
model = option("--name") if better else Path(option("--model")).name
print(json.dumps({"result": {"model": model, "nll_before": -10.0, "nll_after": after, "better": better,
                             "seconds": 0.1}}), flush=True)
"""


@dataclass
class Session:
    """A learner playing `default`, and what it did: notifications to every destination and swaps asked for."""

    learner: Learner
    start: Callable[..., None]  # start(seconds)
    argv_file: Path
    notes: list[tuple[Any, ...]] = field(default_factory=list)
    swaps: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        return json.loads(self.argv_file.read_text())

    async def finished(self, seconds: float = 20.0) -> tuple[Any, ...]:
        """Wait (with a deadline) for `/learn/done`, or for the `/error` of a failed run; return it."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            for note in self.notes:
                if note[0] == "/learn/done" or (note[0] == "/error" and self.learner.state.state == "failed"):
                    return note
            await asyncio.sleep(0.01)
        raise AssertionError(f"the fine-tune did not end within {seconds} s: {self.notes}")


def learner_session(loop: asyncio.AbstractEventLoop, tmp_path: Path, verdict: str, *, events: int = 100,
                    swap_refused: str | None = None) -> Session:
    """The one place that knows how a Learner is wired (adapt here when its wiring changes).

    The playing model is `default` in tmp_path/models; `swap` succeeds on the loop's next
    turn, as an engine's off-loop load does, unless `swap_refused` gives a reason.
    """
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    log = tmp_path / "session.csv"
    argv_file = tmp_path / f"argv-{verdict}.json"
    command = (sys.executable, "-c", FAKE_TRAINER, verdict, str(argv_file))
    session: Session

    def swap(name: str, refused: Callable[[str], None], done: Callable[[], None]) -> None:
        session.swaps.append(name)
        if swap_refused is not None:
            loop.call_soon(refused, swap_refused)
        else:
            loop.call_soon(done)

    def notify(*message: Any) -> None:
        session.notes.append(message)

    learner = Learner(loop, models, lambda: log, notify, command=command)
    session = Session(learner, lambda seconds: learner.start(seconds, "default", models / "default", events, swap),
                      argv_file)
    return session


def run(tmp_path: Path, scenario: Callable[[Callable[..., Session]], Any]) -> Any:
    """Run ``scenario(make)`` on a real event loop with a deadline; ``make(verdict, ...)`` is `learner_session`.

    However the scenario ends, a fine-tune it started is left to end on its own before the
    loop closes: cancelling one while its process is being started hangs asyncio (3.11).
    """

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        sessions: list[Session] = []

        def make(verdict: str, **kwargs: Any) -> Session:
            sessions.append(learner_session(loop, tmp_path, verdict, **kwargs))
            return sessions[-1]

        try:
            return await asyncio.wait_for(scenario(make), 30.0)
        finally:
            end = loop.time() + 20.0
            while any(s.learner.running for s in sessions) and loop.time() < end:
                await asyncio.sleep(0.01)

    return asyncio.run(main())


@pytest.mark.parametrize("verdict", ["worse", "equal"])
def test_a_fine_tune_that_was_not_better_is_not_swapped_in(tmp_path: Path, verdict: str) -> None:
    async def scenario(make: Callable[..., Session]) -> None:
        session = make(verdict)
        session.start(30.0)
        done = await session.finished()
        await asyncio.sleep(0.05)  # a swap asked for late would show now
        assert session.swaps == []
        assert done == ("/learn/done", "default", -10.0, {"worse": -9.999, "equal": -10.0}[verdict], 0)
        assert ("/learn/progress", 0.5, -10.0) in session.notes
        status = session.learner.status()
        assert status["learn"] == "done" and status["learn_swaps"] == 0 and status["learn_runs"] == 1
        assert "kept default" in status["learn_last"]

    run(tmp_path, scenario)


def test_a_better_fine_tune_is_swapped_in_and_says_so(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Session]) -> None:
        session = make("better")
        session.start(30.0)
        done = await session.finished()
        argv = session.argv()
        name = argv[argv.index("--name") + 1]
        assert name.startswith("default-learn-")
        assert session.swaps == [name]
        assert done == ("/learn/done", name, -10.0, -10.001, 1)
        status = session.learner.status()
        assert status["learn"] == "done" and status["learn_swaps"] == 1 and "swapped in" in status["learn_last"]
        assert argv[argv.index("--seconds") + 1] == "30" and "--json" in argv and "--background" in argv

    run(tmp_path, scenario)


def test_a_better_model_that_fails_to_load_leaves_the_old_one_and_says_so(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Session]) -> None:
        session = make("better", swap_refused="model.json unreadable")
        session.start(30.0)
        done = await session.finished()
        assert done[0] == "/learn/done" and done[1] == "default" and done[4] == 0
        assert ("/error", "/learn", "model.json unreadable") in session.notes
        assert session.learner.status()["learn_swaps"] == 0

    run(tmp_path, scenario)


def test_a_training_process_that_ends_without_a_result_is_a_failure(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Session]) -> None:
        session = make("crash")
        session.start(30.0)
        address, where, reason = await session.finished()
        assert (address, where) == ("/error", "/learn") and "exit 3" in reason and "still playing default" in reason
        assert session.swaps == [] and not [n for n in session.notes if n[0] == "/learn/done"]
        assert session.learner.status()["learn_failures"] == 1

    run(tmp_path, scenario)


def test_the_learner_needs_100_performer_events_and_says_how_many(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Session]) -> None:
        few = make("worse", events=99)
        with pytest.raises(ControlError, match=r"99 played, at least 100 needed"):
            few.start(30.0)
        assert not few.learner.running and few.learner.status()["learn_runs"] == 0
        enough = make("worse", events=100)
        enough.start(30.0)
        assert (await enough.finished())[0] == "/learn/done"

    run(tmp_path, scenario)


def test_the_learner_takes_seconds_above_0_and_up_to_an_hour(tmp_path: Path) -> None:
    """More than 0 (the README's `/learn [seconds]`); at most 3600 is the code's own bound."""

    async def scenario(make: Callable[..., Session]) -> None:
        session = make("worse")
        for seconds in (0.0, -1.0, 3600.5, math.nan, math.inf):
            with pytest.raises(ControlError, match="seconds"):
                session.start(seconds)
        session.start(3600.0)
        await session.finished()
        argv = session.argv()
        assert argv[argv.index("--seconds") + 1] == "3600"

    run(tmp_path, scenario)
