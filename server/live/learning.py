"""`/learn` on stage: a fine-tune in its own process, watched from the loop, swapped in only if better.

The training runs as `antiphon learn --json --background` in a child process: one
thread, at SCHED_IDLE (CPU the server does not want), and a crash there cannot
touch the music. The loop only reads the child's JSON lines (progress, result) from a
pipe as they come, never waits on it, and on a better model asks the engine to swap
it in (the swap itself is read off the loop too). No TensorFlow is imported here.

Judged against what plays: the fine-tune beat its parent, so it may replace only its
parent. `/learn` is refused while a model is loading (the playing model is about to
change); at the end the candidate is swapped in only if the very model it was trained
from (the same install, by generation: a name can be loaded again) still plays, with no
other load in flight, and the swap itself is conditional on that until it lands. Else
nothing changes: `/error /learn <why>` to every destination, `/learn/done <parent>
nll_before nll_after 0`, and `learn_last` in /status says why; the new model stays on
disk, loadable by name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.live.controls import ControlError

if TYPE_CHECKING:
    from server.live.swap import Playing

log = logging.getLogger(__name__)

MIN_EVENTS = 100  # performer events a fine-tune needs: fewer say too little to learn from or judge by
DEFAULT_SECONDS = 60.0  # a fine-tune's time budget when /learn (or `antiphon learn`) names none
MAX_SECONDS = 3600.0
NAME_BUDGET = 40  # characters of the parent's name kept in the new model's name

Notify = Callable[..., None]  # (address, *args): an OSC message to every destination
Swap = Callable[..., None]  # (model name, on_error, on_loaded[, only_over=generation]): ModelSwap.load


@dataclass
class LearnState:
    state: str = "idle"  # idle, starting, running, stopping, done, failed
    fraction: float = 0.0
    heldout_nll: float = math.nan
    last: str = ""  # the last result, for /status


class Learner:
    """Starts, watches and stops one fine-tune at a time."""

    STATUS_KEYS = {
        "learn": "fine-tune state: idle, starting, running, stopping, done or failed",
        "learn_progress": "fraction of the running fine-tune's time budget spent",
        "learn_last": "the last fine-tune's result, in words",
        "learn_runs": "fine-tunes started",
        "learn_swaps": "fine-tuned models swapped in",
        "learn_failures": "fine-tunes whose process failed",
    }

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        models_dir: Path,
        session_log: Callable[[], Path],
        notify: Notify,
        command: tuple[str, ...] = (sys.executable, "-m", "server"),
    ) -> None:
        self._loop = loop
        self._models_dir = Path(models_dir)
        self._session_log = session_log
        self._notify = notify
        self._command = command
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self.state = LearnState()
        self.counts = {"learn_runs": 0, "learn_swaps": 0, "learn_failures": 0}
        self._seconds = self._started = 0.0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, seconds: float, parent: str, folder: Path, performer_events: int, swap: Swap,
              playing: Callable[[], Playing] | None = None) -> None:
        """Fine-tune ``parent`` (the playing model, from ``folder``) on this session's performer events.

        ``swap(name, on_error, on_loaded)`` loads the result if it is better. ``playing()``
        says which model plays now (`ModelSwap.playing`): given, the result is swapped in
        only over the same install of ``parent`` (``swap`` then takes ``only_over``), and
        /learn is refused while a model loads; None (a Learner on its own) trusts that
        ``parent`` plays throughout. ControlError if it cannot start.
        """
        check_seconds(seconds)
        if self.running:
            raise ControlError("a fine-tune is already running; /learn/stop ends it")
        events = performer_events
        if events < MIN_EVENTS:
            raise ControlError(f"too few performer events to learn from: {events} played, at least {MIN_EVENTS} needed")
        generation: int | None = None
        if playing is not None:
            now = playing()
            if now.loading:
                raise ControlError(f"model {now.loading!r} is loading: send /learn once it plays, "
                                   f"so the fine-tune starts from the model you hear")
            generation = now.generation
        name = learned_name(parent)
        argv = [*self._command, "learn", "--model", str(folder), "--log", str(self._session_log()),
                "--seconds", f"{seconds:g}", "--name", name, "--models-dir", str(self._models_dir),
                "--until", f"{time.time():.6f}", "--json", "--background"]
        self.state = LearnState("starting", last=self.state.last)
        self.counts["learn_runs"] += 1
        self._seconds, self._started = seconds, time.monotonic()
        log.info("learn: fine-tuning %s on %d performer events for at most %g s, as %s", parent, events, seconds, name)
        # at once, so a patch shows the fine-tune has begun; the child's first figure comes once it has scored
        # the parent (NaN until then)
        self._notify("/learn/progress", 0.0, math.nan)
        self._task = self._loop.create_task(self._run(argv, parent, swap, playing, generation))

    def stop(self) -> None:
        """End a running fine-tune early; it keeps (and judges) the best model so far."""
        if not self.running:
            raise ControlError("no fine-tune is running")
        self.state.state = "stopping"
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGINT)

    def close(self) -> None:
        """At shutdown: a fine-tune in flight is abandoned (its process killed)."""
        if self._proc is not None and self._proc.returncode is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
        if self._task is not None:
            self._task.cancel()

    def status(self) -> dict[str, Any]:
        s = self.state
        return {"learn": s.state, "learn_progress": round(s.fraction, 3), "learn_last": s.last, **self.counts}

    # ------------------------------------------------------------------ the child

    async def _run(self, argv: list[str], parent: str, swap: Swap, playing: Callable[[], Playing] | None,
                   generation: int | None) -> None:
        result: dict[str, Any] | None = None
        error = ""
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            self.state.state = "running" if self.state.state == "starting" else self.state.state
            assert self._proc.stdout is not None and self._proc.stderr is not None
            stderr_tail = self._loop.create_task(self._proc.stderr.read())
            async for line in self._proc.stdout:
                message = _parse(line)
                if "progress" in message:
                    self.state.fraction = float(message["progress"])
                    self.state.heldout_nll = float(message.get("heldout_nll", math.nan))
                    self._notify("/learn/progress", self.state.fraction, self.state.heldout_nll)
                    self._say_progress()
                elif "result" in message:
                    result = message["result"]
                elif "error" in message:
                    error = str(message["error"])
            code = await self._proc.wait()
            tail = (await stderr_tail).decode("utf-8", "replace").strip().splitlines()
            if result is None and not error:
                error = f"the training process ended without a result (exit {code}" + (
                    f": {tail[-1][:200]}" if tail else "") + ")"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # could not start the process at all
            error = f"could not start the training process: {exc}"
        finally:
            self._proc = None
        if result is None:
            self._failed(error or "unknown failure", parent)
            return
        self._finish(result, parent, swap, playing, generation)

    def _say_progress(self) -> None:
        """One terminal line per epoch: how far, the held-out figure, and about how long is left."""
        spent = time.monotonic() - self._started
        left = max(0.0, self._seconds - spent)
        log.info("learn: %3.0f %% after %.0f s, held-out %.3f nats/event, at most %.0f s left",
                 100 * self.state.fraction, spent, self.state.heldout_nll, left)

    def _failed(self, reason: str, parent: str) -> None:
        self.counts["learn_failures"] += 1
        self.state = LearnState("failed", last=f"failed: {reason}")
        log.warning("fine-tune failed: %s; still playing %s", reason, parent)
        self._notify("/error", "/learn", f"{reason}; still playing {parent}")

    def _finish(self, result: dict[str, Any], parent: str, swap: Swap, playing: Callable[[], Playing] | None,
                generation: int | None) -> None:
        name = str(result.get("model", parent))
        before, after = float(result.get("nll_before", math.nan)), float(result.get("nll_after", math.nan))
        self.state.fraction = 1.0

        def done(swapped: bool, why: str = "") -> None:
            verdict = "swapped in" if swapped else f"not swapped in: {why}" if why else "kept " + parent
            self.state = LearnState("done", 1.0, after, f"{name}: {before:.3f} -> {after:.3f} nats/event, {verdict}")
            log.info("learn: done in %.0f s: %s", time.monotonic() - self._started, self.state.last)
            self.counts["learn_swaps"] += int(swapped)
            self._notify("/learn/done", name if swapped else parent, before, after, int(swapped))

        if not result.get("better"):
            done(False)
            return

        def refused(reason: str) -> None:
            self._notify("/error", "/learn", reason)
            done(False, reason)

        if playing is None or generation is None:
            swap(name, refused, lambda: done(True))
            return
        now = playing()
        if now.generation != generation or now.loading:
            change = (f"{now.name!r} plays now" if now.generation != generation
                      else f"{now.loading!r} is loading")
            refused(f"{name!r} beat {parent!r}, but {change} (a /model since /learn), so it is not swapped in; "
                    f"/model {name} plays it")
            return
        swap(name, refused, lambda: done(True), only_over=generation)


def check_seconds(seconds: float) -> float:
    """``seconds`` if a fine-tune may have that budget, else ControlError: the one rule the server and monitor apply."""
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise ControlError(f"seconds must be in (0, {MAX_SECONDS:g}], got {seconds:g}")
    return seconds


def learned_name(parent: str, at: float | None = None) -> str:
    """The folder name of a model fine-tuned from ``parent`` at ``at`` (Unix time; None: now), short enough to load."""
    return f"{parent[:NAME_BUDGET]}-learn-{time.strftime('%Y%m%d-%H%M%S', time.localtime(at))}"


def _parse(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
