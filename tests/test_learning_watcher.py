"""The /learn watcher in this process: the training child is a fake, fed line by line by the test.

`Learner` starts `antiphon learn --json --background` with `asyncio.create_subprocess_exec`;
here that is replaced by one that hands back a `Child`, whose stdout, stderr, exit code
and signals the test controls. So everything the learner does with the child's output
(progress, the result, its errors, the exit), its verdict on the result (swap, refuse,
keep), its counters, state and messages can be checked exactly, without a process
(and so under `-p tests.fast`, where mutants of these functions are caught). The real
child is covered by tests/test_promises_learn.py and tests/test_learn_race.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from server.live import learning
from server.live.controls import ControlError
from server.live.learning import LearnState, Learner, _parse
from server.live.swap import Playing

COMMAND = ("python3", "-m", "server")


class Child:
    """The training process as the learner sees it (asyncio's Process): the test writes its output and ends it."""

    def __init__(self) -> None:
        self.stdout = asyncio.StreamReader()
        self.stderr = asyncio.StreamReader()
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.kills = 0
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def say(self, *lines: dict[str, Any] | bytes) -> None:
        for line in lines:
            self.stdout.feed_data(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())

    def exit(self, code: int = 0, stderr: bytes = b"") -> None:
        self.stderr.feed_data(stderr)
        self.stderr.feed_eof()
        self.stdout.feed_eof()
        self.returncode = code
        self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill(self) -> None:
        self.kills += 1


class Watch:
    """A Learner playing `parent` (from models/parent) whose training processes are `Child`ren.

    `notes`: what every destination was sent; `swaps`: each swap asked for as (name, on_error,
    on_loaded, keyword arguments); `spawned`: each process started as (argv, keyword arguments).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.loop = asyncio.get_running_loop()
        self.models = tmp_path / "models"
        self.log = tmp_path / "session.csv"
        self.notes: list[tuple[Any, ...]] = []
        self.swaps: list[tuple[str, Callable[[str], None], Callable[[], None], dict[str, Any]]] = []
        self.spawned: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self.children: list[Child] = []
        self.refuse_spawn: Exception | None = None

        async def spawn(*argv: str, **kwargs: Any) -> Child:
            self.spawned.append((argv, kwargs))
            if self.refuse_spawn is not None:
                raise self.refuse_spawn
            self.children.append(Child())
            return self.children[-1]

        monkeypatch.setattr(learning.asyncio, "create_subprocess_exec", spawn)
        self.learner = Learner(self.loop, self.models, lambda: self.log, lambda *m: self.notes.append(m),
                               command=COMMAND)

    def swap(self, name: str, on_error: Callable[[str], None], on_loaded: Callable[[], None], **kwargs: Any) -> None:
        self.swaps.append((name, on_error, on_loaded, kwargs))

    def start(self, seconds: float = 30.0, events: int = 100, playing: Callable[[], Playing] | None = None) -> None:
        before = len(self.notes)
        self.learner.start(seconds, "parent", self.models / "parent", events, self.swap, playing=playing)
        # a started fine-tune says so at once, before the child has even run: progress 0, no figure yet
        first = self.notes.pop(before)
        assert first[:2] == ("/learn/progress", 0.0) and math.isnan(first[2]) and len(self.notes) == before, first

    async def child(self) -> Child:
        """The running fine-tune's process, once the learner has started it."""
        await settle()
        return self.children[-1]

    async def ended(self) -> None:
        for _ in range(200):
            if not self.learner.running:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"the watcher did not end: {self.notes}")

    async def finished(self, result: dict[str, Any], playing: Callable[[], Playing] | None = None) -> Child:
        """Start a fine-tune whose child prints `result` and exits 0; return once the watcher has ended."""
        self.start(playing=playing)
        child = await self.child()
        child.say({"result": result})
        child.exit(0)
        await self.ended()
        return child


async def settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scenario: Callable[[Watch], Awaitable[None]]) -> None:
    async def main() -> None:
        watch = Watch(monkeypatch, tmp_path)
        await asyncio.wait_for(scenario(watch), 10.0)

    asyncio.run(main())


def same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN."""
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def same_notes(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> bool:
    return len(got) == len(want) and all(len(g) == len(w) and all(map(same, g, w)) for g, w in zip(got, want))


BETTER = {"model": "cand", "nll_before": -10.0, "nll_after": -10.5, "better": True, "seconds": 1.0}
WORSE = {"model": "parent", "nll_before": -10.0, "nll_after": -9.75, "better": False, "seconds": 1.0}


# --------------------------------------------------------------------------- the child's lines


def test_a_line_of_a_json_object_is_that_object() -> None:
    assert _parse(b'{"progress": 0.5, "heldout_nll": -3.25}\n') == {"progress": 0.5, "heldout_nll": -3.25}


@pytest.mark.parametrize("line", [b"[1, 2]\n", b"3\n", b'"text"\n', b"null\n", b"Epoch 1/3\n", b"\n", b"",
                                  b'{"progress": \n'])
def test_a_line_that_is_not_a_json_object_is_nothing(line: bytes) -> None:
    assert _parse(line) == {}


def test_bytes_that_are_not_utf8_are_replaced_not_fatal() -> None:
    assert _parse(b'{"error": "bad \xff byte"}\n') == {"error": "bad \ufffd byte"}
    assert _parse(b"\xff\xfe\n") == {}


# --------------------------------------------------------------------------- starting and watching


def test_the_child_is_antiphon_learn_on_this_session_with_json_lines_in_the_background(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start(seconds=12.5)
        assert w.learner.running and w.learner.state.state == "starting"
        assert w.learner.status() == {"learn": "starting", "learn_progress": 0.0, "learn_last": "",
                                      "learn_runs": 1, "learn_swaps": 0, "learn_failures": 0}
        child = await w.child()
        (argv, kwargs), = w.spawned
        name = argv[argv.index("--name") + 1]
        assert name.startswith("parent-learn-")
        until = argv[argv.index("--until") + 1]
        assert abs(float(until) - time.time()) < 60 and len(until.split(".")[1]) == 6  # now, to the microsecond
        assert list(argv) == [*COMMAND, "learn", "--model", str(w.models / "parent"), "--log", str(w.log),
                              "--seconds", "12.5", "--name", name, "--models-dir", str(w.models),
                              "--until", until, "--json", "--background"]
        assert kwargs == {"stdin": asyncio.subprocess.DEVNULL, "stdout": asyncio.subprocess.PIPE,
                          "stderr": asyncio.subprocess.PIPE}
        assert w.learner.state.state == "running"
        child.exit(1)
        await w.ended()

    run(monkeypatch, tmp_path, scenario)


def test_progress_lines_are_sent_to_every_destination_and_shown_in_status(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        child = await w.child()
        child.say({"progress": 0.12345, "heldout_nll": -3.5}, b"some stray text\n", b"[1, 2]\n")
        await settle()
        assert w.notes == [("/learn/progress", 0.12345, -3.5)]
        assert w.learner.state.fraction == 0.12345 and w.learner.state.heldout_nll == -3.5
        assert w.learner.status()["learn_progress"] == 0.123
        child.say({"progress": 1})  # no figure yet: NaN
        await settle()
        assert same_notes(w.notes[1:], [("/learn/progress", 1.0, math.nan)])
        assert isinstance(w.notes[1][1], float) and math.isnan(w.learner.state.heldout_nll)
        assert w.learner.status()["learn"] == "running" and w.learner.running
        child.exit(1)
        await w.ended()

    run(monkeypatch, tmp_path, scenario)


def test_a_second_learn_while_one_runs_is_refused_and_not_counted(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        child = await w.child()
        with pytest.raises(ControlError) as refused:
            w.start()
        assert str(refused.value) == "a fine-tune is already running; /learn/stop ends it"
        assert w.learner.counts["learn_runs"] == 1 and len(w.spawned) == 1
        child.exit(1)
        await w.ended()
        assert not w.learner.running

    run(monkeypatch, tmp_path, scenario)


def test_learn_needs_100_performer_events_exactly(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        with pytest.raises(ControlError) as refused:
            w.start(events=99)
        assert str(refused.value) == "too few performer events to learn from: 99 played, at least 100 needed"
        assert not w.learner.running and w.learner.counts["learn_runs"] == 0
        w.start(events=100)
        (await w.child()).exit(1)
        await w.ended()

    run(monkeypatch, tmp_path, scenario)


def test_learn_while_a_model_loads_is_refused(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        with pytest.raises(ControlError) as refused:
            w.start(playing=lambda: Playing("parent", 3, loading="other"))
        assert str(refused.value) == ("model 'other' is loading: send /learn once it plays, "
                                      "so the fine-tune starts from the model you hear")
        assert not w.learner.running and w.learner.status()["learn_runs"] == 0 and w.spawned == []

    run(monkeypatch, tmp_path, scenario)


# --------------------------------------------------------------------------- the verdict


def test_a_result_that_is_not_better_is_kept_out_and_said_so(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        await w.finished(WORSE)
        assert w.swaps == []
        assert w.notes == [("/learn/done", "parent", -10.0, -9.75, 0)]
        assert w.learner.state == LearnState("done", 1.0, -9.75,
                                             "parent: -10.000 -> -9.750 nats/event, kept parent")
        assert w.learner.status() == {"learn": "done", "learn_progress": 1.0,
                                      "learn_last": "parent: -10.000 -> -9.750 nats/event, kept parent",
                                      "learn_runs": 1, "learn_swaps": 0, "learn_failures": 0}

    run(monkeypatch, tmp_path, scenario)


@pytest.mark.parametrize("better", [False, None, 0, "missing"])
def test_only_a_result_that_says_better_is_swapped_in(monkeypatch, tmp_path, better: Any) -> None:
    result = {**BETTER}
    if better == "missing":
        del result["better"]
    else:
        result["better"] = better

    async def scenario(w: Watch) -> None:
        await w.finished(result)
        assert w.swaps == []
        assert w.notes == [("/learn/done", "parent", -10.0, -10.5, 0)]
        assert w.learner.state.last == "cand: -10.000 -> -10.500 nats/event, kept parent"

    run(monkeypatch, tmp_path, scenario)


def test_a_better_result_is_swapped_in_once_it_has_loaded(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        child = await w.child()
        child.say({"progress": 0.5, "heldout_nll": -10.25})
        child.say({"result": BETTER})
        child.exit(0)
        await w.ended()
        (name, on_error, on_loaded, kwargs), = w.swaps
        assert name == "cand" and kwargs == {}  # a learner on its own trusts that its parent plays
        # loading: the run is over, the verdict not yet in
        assert w.learner.state == LearnState("running", 1.0, -10.25, "")
        assert w.notes == [("/learn/progress", 0.5, -10.25)]
        on_loaded()
        assert w.notes[1:] == [("/learn/done", "cand", -10.0, -10.5, 1)]
        assert w.learner.state == LearnState("done", 1.0, -10.5, "cand: -10.000 -> -10.500 nats/event, swapped in")
        assert w.learner.status()["learn_swaps"] == 1 and w.learner.status()["learn_failures"] == 0

    run(monkeypatch, tmp_path, scenario)


def test_a_better_model_that_fails_to_load_leaves_the_parent_and_says_why(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        await w.finished(BETTER)
        (_, on_error, _, _), = w.swaps
        on_error("model.json unreadable")
        assert w.notes == [("/error", "/learn", "model.json unreadable"), ("/learn/done", "parent", -10.0, -10.5, 0)]
        assert w.learner.state == LearnState(
            "done", 1.0, -10.5, "cand: -10.000 -> -10.500 nats/event, not swapped in: model.json unreadable")
        assert w.learner.counts == {"learn_runs": 1, "learn_swaps": 0, "learn_failures": 0}

    run(monkeypatch, tmp_path, scenario)


def test_two_fine_tunes_count_their_swaps(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        for _ in range(2):
            await w.finished(BETTER)
            w.swaps[-1][2]()
        assert w.learner.counts == {"learn_runs": 2, "learn_swaps": 2, "learn_failures": 0}

    run(monkeypatch, tmp_path, scenario)


def test_a_result_without_figures_or_name_is_the_parents_with_nan(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        await w.finished({"better": False})
        assert same_notes(w.notes, [("/learn/done", "parent", math.nan, math.nan, 0)])
        assert w.learner.state.last == "parent: nan -> nan nats/event, kept parent"
        assert w.learner.state.state == "done"

    run(monkeypatch, tmp_path, scenario)


def test_a_better_result_over_the_parent_still_playing_is_swapped_only_over_it(monkeypatch, tmp_path) -> None:
    now = {"playing": Playing("parent", 7)}

    async def scenario(w: Watch) -> None:
        await w.finished(BETTER, playing=lambda: now["playing"])
        (name, _, on_loaded, kwargs), = w.swaps
        assert name == "cand" and kwargs == {"only_over": 7}
        on_loaded()
        assert w.notes == [("/learn/done", "cand", -10.0, -10.5, 1)]

    run(monkeypatch, tmp_path, scenario)


def test_a_better_result_that_loses_the_race_to_another_load_says_so(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        await w.finished(BETTER, playing=lambda: Playing("parent", 7))
        (_, on_error, _, kwargs), = w.swaps
        assert kwargs == {"only_over": 7}
        on_error("'other' came in first")  # ModelSwap: another model was installed while this one loaded
        assert w.notes == [("/error", "/learn", "'other' came in first"), ("/learn/done", "parent", -10.0, -10.5, 0)]
        assert w.learner.state.last == "cand: -10.000 -> -10.500 nats/event, not swapped in: 'other' came in first"
        assert w.learner.counts["learn_swaps"] == 0

    run(monkeypatch, tmp_path, scenario)


def test_a_better_result_after_another_model_came_in_is_not_swapped(monkeypatch, tmp_path) -> None:
    now = {"playing": Playing("parent", 7)}

    async def scenario(w: Watch) -> None:
        w.start(playing=lambda: now["playing"])
        child = await w.child()
        now["playing"] = Playing("other", 8)
        child.say({"result": BETTER})
        child.exit(0)
        await w.ended()
        why = ("'cand' beat 'parent', but 'other' plays now (a /model since /learn), so it is not swapped in; "
               "/model cand plays it")
        assert w.swaps == []
        assert w.notes == [("/error", "/learn", why), ("/learn/done", "parent", -10.0, -10.5, 0)]
        assert w.learner.state.last == f"cand: -10.000 -> -10.500 nats/event, not swapped in: {why}"
        assert w.learner.counts["learn_swaps"] == 0

    run(monkeypatch, tmp_path, scenario)


def test_a_model_loaded_again_under_the_parents_name_is_not_the_parent(monkeypatch, tmp_path) -> None:
    now = {"playing": Playing("parent", 7)}

    async def scenario(w: Watch) -> None:
        w.start(playing=lambda: now["playing"])
        child = await w.child()
        now["playing"] = Playing("parent", 9, loading="b")  # both: a new install, and a load since
        child.say({"result": BETTER})
        child.exit(0)
        await w.ended()
        assert w.swaps == []
        assert w.notes[0] == ("/error", "/learn", "'cand' beat 'parent', but 'parent' plays now (a /model since "
                                                  "/learn), so it is not swapped in; /model cand plays it")

    run(monkeypatch, tmp_path, scenario)


def test_a_better_result_while_a_model_loads_is_not_swapped(monkeypatch, tmp_path) -> None:
    now = {"playing": Playing("parent", 7)}

    async def scenario(w: Watch) -> None:
        w.start(playing=lambda: now["playing"])
        child = await w.child()
        now["playing"] = Playing("parent", 7, loading="b")
        child.say({"result": BETTER})
        child.exit(0)
        await w.ended()
        assert w.swaps == []
        why = ("'cand' beat 'parent', but 'b' is loading (a /model since /learn), so it is not swapped in; "
               "/model cand plays it")
        assert w.notes == [("/error", "/learn", why), ("/learn/done", "parent", -10.0, -10.5, 0)]
        assert w.learner.state == LearnState("done", 1.0, -10.5,
                                             f"cand: -10.000 -> -10.500 nats/event, not swapped in: {why}")

    run(monkeypatch, tmp_path, scenario)


# --------------------------------------------------------------------------- failures


def test_a_child_that_ends_without_a_result_fails_with_its_exit_and_last_stderr_line(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        child = await w.child()
        child.say({"progress": 0.5, "heldout_nll": -1.0})
        child.exit(3, b"Traceback (most recent call last):\n  ...\nMemoryError: out of memory\n\n")
        await w.ended()
        why = "the training process ended without a result (exit 3: MemoryError: out of memory)"
        assert w.notes[1:] == [("/error", "/learn", f"{why}; still playing parent")]
        assert w.learner.state == LearnState("failed", last=f"failed: {why}")
        assert w.learner.status() == {"learn": "failed", "learn_progress": 0.0, "learn_last": f"failed: {why}",
                                      "learn_runs": 1, "learn_swaps": 0, "learn_failures": 1}
        assert w.swaps == []

    run(monkeypatch, tmp_path, scenario)


def test_a_silent_child_fails_with_its_exit_alone_and_a_long_line_is_cut(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        (await w.child()).exit(-9)
        await w.ended()
        assert w.notes == [("/error", "/learn",
                            "the training process ended without a result (exit -9); still playing parent")]
        w.start()
        (await w.child()).exit(0, b"x" * 199 + b"yz\xff")
        await w.ended()
        assert w.notes[1] == ("/error", "/learn", "the training process ended without a result (exit 0: "
                              + "x" * 199 + "y); still playing parent")
        assert w.learner.counts == {"learn_runs": 2, "learn_swaps": 0, "learn_failures": 2}

    run(monkeypatch, tmp_path, scenario)


def test_a_child_that_says_what_went_wrong_fails_with_that(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        child = await w.child()
        child.say({"error": "too few events in the session log"})
        child.exit(2, b"ignored\n")
        await w.ended()
        assert w.notes == [("/error", "/learn", "too few events in the session log; still playing parent")]
        assert w.learner.state.last == "failed: too few events in the session log"
        assert w.learner.counts["learn_failures"] == 1

    run(monkeypatch, tmp_path, scenario)


def test_a_result_wins_over_an_error_line(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        child = await w.child()
        child.say({"error": "a warning"}, {"result": WORSE})
        child.exit(0)
        await w.ended()
        assert w.notes == [("/learn/done", "parent", -10.0, -9.75, 0)]
        assert w.learner.counts["learn_failures"] == 0

    run(monkeypatch, tmp_path, scenario)


def test_a_child_that_cannot_start_is_a_failure(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.refuse_spawn = FileNotFoundError("no such interpreter")
        w.start()
        await w.ended()
        why = "could not start the training process: no such interpreter"
        assert w.notes == [("/error", "/learn", f"{why}; still playing parent")]
        assert w.learner.state == LearnState("failed", last=f"failed: {why}")
        assert w.learner.counts == {"learn_runs": 1, "learn_swaps": 0, "learn_failures": 1}

    run(monkeypatch, tmp_path, scenario)


def test_a_failure_keeps_nothing_of_the_last_result_but_a_new_run_keeps_its_words(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        await w.finished(WORSE)
        last = w.learner.state.last
        w.start()
        assert w.learner.state == LearnState("starting", last=last)
        (await w.child()).exit(1)
        await w.ended()
        assert w.learner.state.last == "failed: the training process ended without a result (exit 1)"

    run(monkeypatch, tmp_path, scenario)


# --------------------------------------------------------------------------- stopping and closing


def test_stop_without_a_fine_tune_is_refused(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        with pytest.raises(ControlError) as refused:
            w.learner.stop()
        assert str(refused.value) == "no fine-tune is running"
        await w.finished(WORSE)
        with pytest.raises(ControlError, match="^no fine-tune is running$"):
            w.learner.stop()
        assert w.learner.state.state == "done"

    run(monkeypatch, tmp_path, scenario)


def test_stop_interrupts_the_child_once_and_it_judges_what_it_has(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        child = await w.child()
        w.learner.stop()
        assert child.signals == [signal.SIGINT] and child.kills == 0
        assert w.learner.state.state == "stopping" and w.learner.status()["learn"] == "stopping"
        child.say({"progress": 0.75, "heldout_nll": -2.0})
        await settle()
        assert w.learner.state.state == "stopping"  # progress does not undo it
        child.say({"result": WORSE})
        child.exit(0)
        await w.ended()
        assert w.notes[-1] == ("/learn/done", "parent", -10.0, -9.75, 0)

    run(monkeypatch, tmp_path, scenario)


def test_stop_before_the_child_has_started_is_remembered(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        w.learner.stop()  # no process yet: nothing to signal
        assert w.learner.state.state == "stopping"
        child = await w.child()
        assert w.learner.state.state == "stopping" and child.signals == []
        child.exit(1)
        await w.ended()

    run(monkeypatch, tmp_path, scenario)


def test_stop_does_not_signal_a_child_that_has_exited(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        child = await w.child()
        child.returncode = 0  # it has exited; the watcher has not read that yet
        w.learner.stop()
        assert child.signals == [] and w.learner.state.state == "stopping"
        child.returncode = None
        child.exit(0)
        await w.ended()

    run(monkeypatch, tmp_path, scenario)


def test_close_kills_a_running_child_and_abandons_the_watch(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.learner.close()  # nothing to close
        w.start()
        child = await w.child()
        w.learner.close()
        assert child.kills == 1 and child.signals == []
        await settle()
        assert not w.learner.running and w.notes == []

    run(monkeypatch, tmp_path, scenario)


def test_close_leaves_an_exited_child_alone_and_one_that_just_went_is_no_error(monkeypatch, tmp_path) -> None:
    async def scenario(w: Watch) -> None:
        w.start()
        child = await w.child()
        child.returncode = 0  # exited; not yet read
        w.learner.close()
        assert child.kills == 0
        await settle()
        assert not w.learner.running
        w.start()
        child = await w.child()

        def gone() -> None:
            raise ProcessLookupError

        child.kill = gone  # type: ignore[method-assign]
        w.learner.close()  # it went between the check and the kill
        await settle()
        assert not w.learner.running

    run(monkeypatch, tmp_path, scenario)
