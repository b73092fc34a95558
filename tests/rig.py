"""The engine on a virtual clock, for tests: `VirtualLoop` and one way to build an engine and watch what it plays.

`VirtualLoop` is the part of an asyncio loop the engine uses (time, call_at, call_soon,
run_in_executor), driven by the test: callbacks run in time order, exactly at their
time, and a stall is time that passes with nothing run. So a test can play thousands of
events in milliseconds and check times to the last bit, on the loop's own clock.

Tests build engines with `build_engine` only, so the engine's constructor has one
caller in the tests to keep in step with it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from server.event import Event

REPO = Path(__file__).resolve().parents[1]


class Handle:
    def __init__(self, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args, self.cancelled = when, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Done:
    """A finished future, as `run_in_executor` returns (the work ran at once)."""

    def __init__(self, loop: "VirtualLoop", fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._loop, self._result, self._error = loop, None, None
        try:
            self._result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the engine like a real future would
            self._error = exc

    def add_done_callback(self, callback: Callable[["Done"], None]) -> None:
        self._loop.call_soon(callback, self)

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


class VirtualLoop:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._queue: list[tuple[float, int, Handle]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> Handle:
        handle = Handle(when, callback, args)
        heapq.heappush(self._queue, (when, next(self._order), handle))
        return handle

    def call_soon(self, callback: Callable[..., None], *args: Any) -> Handle:
        return self.call_at(self.now, callback, *args)

    def run_in_executor(self, executor: Any, fn: Callable[..., Any], *args: Any) -> Done:
        return Done(self, fn, args)

    def advance(self, seconds: float) -> None:
        """Run every callback due within `seconds`, each at its time, then stop at the end."""
        end = self.now + seconds
        while self._queue and self._queue[0][0] <= end:
            when, _, handle = heapq.heappop(self._queue)
            if handle.cancelled:
                continue
            self.now = max(self.now, when)
            handle.callback(*handle.args)
        self.now = end

    def stall(self, seconds: float) -> None:
        """Time passes and nothing runs (a SIGSTOP, a swap to disk)."""
        self.now += seconds


@dataclass
class Played:
    """What an engine handed its outputs: every event with the loop time it left at, and each silence."""

    loop: Any
    events: list[Event] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    silenced: list[tuple[float, int | None]] = field(default_factory=list)
    mixtures: list[tuple[list[float], int | None]] = field(default_factory=list)
    surprises: list[tuple[float, float, int | None]] = field(default_factory=list)

    def emit(self, event: Event) -> None:
        self.events.append(event)
        self.times.append(self.loop.time())

    def silence(self, voice: int | None) -> None:
        self.silenced.append((self.loop.time(), voice))

    def timed(self) -> list[tuple[float, Event]]:
        """(loop time handed over, event) for each event so far."""
        return list(zip(self.times, self.events))

    def model(self, voice: Any = "any") -> list[Event]:
        return [e for e in self.events if e.source == "model" and (voice == "any" or e.voice == voice)]


def build_engine(loop: Any, predictor: Any, settings: Any = None, *, seed: int | None = 1, voices: Any = None,
                 models_dir: Path = REPO / "models", model_name: str = "default", watch: bool = False,
                 stream_rate: float | None = None, sinks: tuple[Any, ...] = (),
                 learner: Any = None) -> tuple[Any, Played]:
    """An engine on ``loop`` whose every output lands in the returned `Played` (then in ``sinks``, if any).

    ``watch``: the mixture and surprise streams are on, collected in `Played.mixtures`
    and `Played.surprises`; ``stream_rate`` sets their rate and burst (default: the server's).
    """
    from server.live.engine import Engine

    played = Played(loop)
    rate = {} if stream_rate is None else {"stream_rate": stream_rate}
    engine = Engine(loop, predictor, models_dir, settings, sinks=(played, *sinks),
                    streams=Watching(played) if watch else None, seed=seed, model_name=model_name, voices=voices,
                    learner=learner, **rate)
    return engine, played


class Watching:
    """A `StreamSink` that always listens and keeps what it is given in a `Played`."""

    def __init__(self, played: Played) -> None:
        self.played = played

    def wants(self, stream: str) -> bool:
        return True

    def mixture(self, values: list[float], voice: int | None) -> None:
        self.played.mixtures.append((values, voice))

    def surprise(self, nll: float, smoothed: float, voice: int | None) -> None:
        self.played.surprises.append((nll, smoothed, voice))
