"""The live loop: performer events in, model events out at absolute monotonic times.

Runs on one asyncio event loop. Every model event is scheduled with `loop.call_at` at
an absolute time computed from when its cause happened (the performer event's
arrival, or the previous model event's *scheduled* time), never from when a callback
happened to wake, so timing does not drift and the loop sleeps whenever nothing is
due. Transports reach the engine only through the `Controls` methods; the engine hands
finished events to sinks (OSC out, MIDI out, recorder) and never touches a socket.

Guards that keep the music going whatever the input:

- `max_rate`: at most max_rate model events per second in every mode and at any
  timescale: a self-playing chain's events are at least 1/max_rate apart (it slows
  down); accompaniment answers draw from a token bucket (rate max_rate, burst
  `RATE_BURST`, so a chord survives) and an answer with no token is dropped and
  counted. CPU and log growth are bounded whatever the timescale or the model says.
- Lateness: an event whose time has passed by more than `LATE_TOLERANCE` (after a
  stall) is dropped and counted, never played in a burst; a chain resumes from now.
- Controls that change timing (`/timescale`) reschedule what is pending from now.
- `/reset` cancels everything scheduled from the old state before zeroing it.
- A model swap is read and built off the loop (an executor) and swapped in on it;
  the last request wins.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from server.event import Event
from server.live.controls import ControlError
from server.live.learning import Learner
from server.live.modes import Mode, parse_mode
from server.model.files import check_model_name, resolve_model_dir
from server.model.mdn import RandomBlocks
from server.model.predictor import Predictor
from server.model.spec import DIMS, ModelError

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]
MAX_PENDING = 256  # scheduled accompaniment answers; beyond this the oldest is dropped and counted
LATE_TOLERANCE = 0.05  # seconds: an event later than this is dropped rather than played late
DEFAULT_MAX_RATE = 200.0  # model events per second: faster than any playing, slow enough to cost little
RATE_BURST = 8.0  # answers that may come closer than 1/max_rate (a chord), before the rate holds


@dataclass
class Settings:
    """Live-controllable parameters (all changeable over OSC but `max_rate`)."""

    mode: Mode = Mode.ACCOMPANY
    temperature: float = 1.0
    sigma_temperature: float = 1.0
    timescale: float = 1.0
    threshold: float = 1.5
    paused: bool = False
    max_rate: float = DEFAULT_MAX_RATE


# Every key the engine puts in `/status`, with its meaning: the README's table is generated from it.
STATUS_KEYS: dict[str, str] = {
    "mode": "interaction mode",
    "paused": "1 while output is paused",
    "temperature": "mixture-weight temperature",
    "sigma_temperature": "scale temperature",
    "timescale": "factor on every predicted wait",
    "threshold": "seconds of silence before `respond` takes over",
    "max_rate": "most model events per second",
    "model": "the playing model's name",
    "loading": "the model being loaded off the loop, or empty",
    "backend": "`litert`, or `tensorflow` where LiteRT is missing",
    "inputs": "performer events received",
    "outputs": "model events played",
    "dropped": "answers dropped because 256 were already waiting",
    "late_dropped": f"model events dropped because their time had passed by more than {LATE_TOLERANCE * 1000:.0f} ms (a stall)",
    "rate_dropped": "answers dropped to hold `max_rate`",
    "clamped": "performer positions outside [0, 1], clamped",
    "sink_errors": "outputs (OSC, MIDI, log) that raised",
    "model_swaps": "models swapped in",
    "model_load_errors": "model loads that failed (the old model kept playing)",
    "pending": "model events scheduled and not yet played",
    "step_us_median": "observe + predict + sample, median over the last 2,048 steps (µs)",
    "step_us_p99": "the same, 99th percentile (µs)",
    "late_us_median": "how long after its scheduled time a model event left, median (µs)",
    "late_us_p99": "the same, 99th percentile (µs)",
    "uptime_s": "seconds since start",
}


class LatencyWindow:
    """The last N step latencies, for median and p99 in `/status` without unbounded growth."""

    def __init__(self, size: int = 2048) -> None:
        self._values = np.zeros(size)
        self._n = 0

    def add(self, seconds: float) -> None:
        self._values[self._n % len(self._values)] = seconds
        self._n += 1

    def percentile(self, q: float) -> float:
        n = min(self._n, len(self._values))
        return float(np.percentile(self._values[:n], q)) if n else 0.0


SURPRISE_SMOOTHING = 0.1  # weight of each new event in the running surprise (about the last ten events)


@dataclass
class Watchers:
    """Callbacks for what the model thinks, set while someone subscribes; None means nobody does."""

    mixture: Callable[[list[float]], None] | None = None  # the predictive distribution at each prediction
    surprise: Callable[[float, float], None] | None = None  # (nll, smoothed) for each performer event
    max_rate: float = 200.0  # each is computed at most this often a second (faster input skips some events)
    next_mixture: float = 0.0  # loop time before which the next one is not computed
    next_surprise: float = 0.0


class Scheduled:
    """One model event waiting for its time: what caused it (start), the model's wait (dt), where (x, y)."""

    __slots__ = ("start", "dt", "x", "y", "when", "handle")

    def __init__(self, start: float, dt: float, x: float, y: float) -> None:
        self.start, self.dt, self.x, self.y = start, dt, x, y
        self.when = start
        self.handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class Engine:
    """Implements `server.live.controls.Controls` on top of a `Predictor`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        predictor: Predictor,
        models_dir: Path,
        settings: Settings | None = None,
        sinks: list[Sink] | None = None,
        seed: int | None = None,
        model_name: str = "default",
    ) -> None:
        self._loop = loop
        self.predictor = predictor
        self.model_name = model_name
        self.models_dir = Path(models_dir)
        self.model_folder = self.models_dir / model_name  # where the playing model came from (run may give a path)
        self.learner: Learner | None = None  # fine-tunes on this session's playing, when the app provides one
        self.watch = Watchers()  # who wants to see inside the model (the OSC streams); None costs nothing
        self._surprise: float | None = None  # the smoothed running surprise
        self.settings = settings or Settings()
        self.sinks: list[Sink] = list(sinks or [])
        # Called whenever scheduled output is abandoned (mode change, pause, reset, model
        # swap, stop) so an output that holds notes can release them.
        self.silencers: list[Callable[[], None]] = []
        # Other parts' counters, merged into `/status` (MIDI, the recorder).
        self.status_sources: list[Callable[[], dict[str, Any]]] = []
        self._rng = RandomBlocks(np.random.default_rng(seed), DIMS)
        self._pending: dict[int, Scheduled] = {}  # accompaniment answers, insertion-ordered: oldest first
        self._next_id = 0
        self._takeover: asyncio.TimerHandle | None = None
        self._chain: Scheduled | None = None  # the one self-playing event (generate, respond)
        self._last_performer = loop.time()
        self._last_emit = -math.inf  # scheduled time of the last model event played
        self._tokens, self._tokens_at = RATE_BURST, -math.inf  # the answers' rate bucket, full at start
        self._heard_performer = False
        self._fresh = True
        self._loads: concurrent.futures.ThreadPoolExecutor | None = None
        self._load_serial = 0
        self.loading = ""  # the model being loaded, if any
        self.latency = LatencyWindow()
        self.lateness = LatencyWindow()  # how long after its scheduled time each output went out
        self.counts = {
            "inputs": 0, "outputs": 0, "dropped": 0, "late_dropped": 0, "rate_dropped": 0, "clamped": 0,
            "sink_errors": 0, "model_swaps": 0, "model_load_errors": 0,
        }
        self._started = loop.time()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Begin the current mode (generate starts playing at once)."""
        self._enter_mode()

    def stop(self) -> None:
        """Cancel everything scheduled and any model load; nothing more will be emitted."""
        self._load_serial += 1
        self._cancel_all()
        if self._loads is not None:
            self._loads.shutdown(wait=False, cancel_futures=True)
            self._loads = None

    # ------------------------------------------------------------------ Controls

    def perform(self, x: float, y: float, at: float | None = None) -> None:
        if not (math.isfinite(x) and math.isfinite(y)):  # transports check too; never poison the state
            raise ControlError("x and y must be finite numbers")
        now = self._loop.time()
        at = now if at is None or not math.isfinite(at) or at > now else at
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            self.counts["clamped"] += 1
            x, y = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
        # The first event after a start or /reset opens a performance: dt 0, as in training data.
        dt = 0.0 if self._fresh else max(0.0, at - self._last_performer)
        self._fresh = False
        self._last_performer = max(self._last_performer, at)
        self._heard_performer = True
        self.counts["inputs"] += 1
        self._emit_to_sinks(Event(at, x, y, "performer"))
        mode = self.settings.mode
        if mode is Mode.RESPOND:
            self._cancel_chain()  # the performer has the floor again
        watch = self.watch
        if watch.surprise is not None and now >= watch.next_surprise:  # only when someone listens, at most max_rate/s
            watch.next_surprise = now + 1.0 / watch.max_rate
            nll = self.predictor.surprise(dt, x, y)
            self._surprise = nll if self._surprise is None else self._surprise + SURPRISE_SMOOTHING * (nll - self._surprise)
            self.watch.surprise(nll, self._surprise)
        t0 = time.perf_counter()
        self.predictor.observe(dt, x, y)
        if mode is Mode.ACCOMPANY and not self.settings.paused:
            dt_next, nx, ny = self._sample()
            self.latency.add(time.perf_counter() - t0)
            self._schedule_answer(Scheduled(at, dt_next, nx, ny))
        else:
            self.latency.add(time.perf_counter() - t0)
        if mode is Mode.RESPOND:
            self._arm_takeover(self._last_performer)

    def set_temperature(self, value: float) -> None:
        self.settings.temperature = _check(value, "temperature", minimum=0.0)

    def set_sigma_temperature(self, value: float) -> None:
        self.settings.sigma_temperature = _check(value, "sigma_temperature", minimum=0.0)

    def set_timescale(self, value: float) -> None:
        value = _check(value, "timescale", minimum=0.0)
        if value <= 0.0:
            raise ControlError("timescale must be > 0")
        self.settings.timescale = value
        self._reschedule()

    def set_threshold(self, seconds: float) -> None:
        self.settings.threshold = _check(seconds, "threshold", minimum=0.0)
        if self.settings.mode is Mode.RESPOND and self._takeover is not None:
            self._arm_takeover(self._last_performer)

    def set_mode(self, name: str) -> None:
        try:
            mode = parse_mode(name)
        except ValueError as e:
            raise ControlError(str(e)) from None
        if mode is self.settings.mode:
            return
        self._cancel_all()
        self.settings.mode = mode
        self._enter_mode()

    def reset(self) -> None:
        """A fresh start: nothing scheduled from the old state plays, and the state is zero."""
        self._cancel_all()
        self.predictor.reset()
        self._fresh = True
        self._heard_performer = False
        self._enter_mode()

    def set_paused(self, paused: bool) -> None:
        if paused == self.settings.paused:
            return
        self.settings.paused = bool(paused)
        if paused:
            self._cancel_all()
        else:
            self._enter_mode()

    def load_model(self, name: str, on_error: Callable[[str], None] | None = None,
                   on_loaded: Callable[[], None] | None = None) -> None:
        """Read, check and build models/<name> in a worker thread; swap it in on the loop when ready."""
        try:
            check_model_name(name)
        except ValueError as e:
            raise ControlError(str(e)) from None
        if self._loads is None:
            self._loads = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self._load_serial += 1
        serial = self._load_serial
        self.loading = name
        future = self._loop.run_in_executor(self._loads, self._read_model, name)
        future.add_done_callback(lambda f: self._loaded(f, serial, name, on_error, on_loaded))

    def _read_model(self, name: str) -> Predictor:
        """Worker thread: files, checks and interpreter; errors name the model, never a path."""
        folder = resolve_model_dir(name, self.models_dir, allow_paths=False)
        return Predictor.load(folder, label=name)

    def _loaded(self, future: asyncio.Future[Predictor], serial: int, name: str,
                on_error: Callable[[str], None] | None, on_loaded: Callable[[], None] | None = None) -> None:
        if serial != self._load_serial or future.cancelled():
            return  # a later request (or stop) superseded this one
        self.loading = ""
        error = future.exception()
        if error is not None:
            self.counts["model_load_errors"] += 1
            if isinstance(error, (ModelError, OSError, ValueError)):
                reason = f"model {name!r} not loaded, keeping {self.model_name!r}: {error}"
            else:
                log.error("loading model %s failed", name, exc_info=error)
                reason = f"model {name!r} not loaded, keeping {self.model_name!r}: internal error"
            if on_error is not None:
                on_error(reason)
            return
        self._cancel_all()
        self.predictor, self.model_name = future.result(), name
        self.model_folder = self.models_dir / name
        self._fresh = True
        self.counts["model_swaps"] += 1
        log.info("model swapped to %s (%s)", name, self.predictor.backend)
        self._enter_mode()
        if on_loaded is not None:
            on_loaded()

    def learn(self, seconds: float) -> None:
        """Start a fine-tune on this session's playing (see `server.live.learning`)."""
        if self.learner is None:
            raise ControlError("learning is not available in this server")
        self.learner.start(seconds)

    def stop_learning(self) -> None:
        if self.learner is None:
            raise ControlError("learning is not available in this server")
        self.learner.stop()

    def status(self) -> dict[str, Any]:
        s = self.settings
        return {
            "mode": s.mode.value,
            "paused": int(s.paused),
            "temperature": s.temperature,
            "sigma_temperature": s.sigma_temperature,
            "timescale": s.timescale,
            "threshold": s.threshold,
            "max_rate": s.max_rate,
            "model": self.model_name,
            "loading": self.loading,
            "backend": self.predictor.backend,
            **self.counts,
            "pending": len(self._pending) + (self._chain is not None),
            "step_us_median": round(self.latency.percentile(50) * 1e6, 1),
            "step_us_p99": round(self.latency.percentile(99) * 1e6, 1),
            "late_us_median": round(self.lateness.percentile(50) * 1e6, 1),
            "late_us_p99": round(self.lateness.percentile(99) * 1e6, 1),
            "uptime_s": round(self._loop.time() - self._started, 1),
            **{k: v for source in self.status_sources for k, v in source().items()},
        }

    def _sample(self) -> tuple[float, float, float]:
        """The next model event; the predictive distribution goes to the `mixture` watcher first, if any."""
        s, watch = self.settings, self.watch
        if watch.mixture is not None:
            now = self._loop.time()
            if now >= watch.next_mixture:
                watch.next_mixture = now + 1.0 / watch.max_rate
                watch.mixture(self.predictor.mixture(s.temperature, s.sigma_temperature))
        return self.predictor.sample(self._rng, s.temperature, s.sigma_temperature)

    # ------------------------------------------------------------------ modes

    def _enter_mode(self) -> None:
        if self.settings.paused:
            return
        mode = self.settings.mode
        if mode is Mode.GENERATE:
            self._continue_from(self._loop.time())
        elif mode is Mode.RESPOND and self._heard_performer:
            self._arm_takeover(self._last_performer)

    def _arm_takeover(self, last: float) -> None:
        if self._takeover is not None:
            self._takeover.cancel()
        self._takeover = self._loop.call_at(last + self.settings.threshold, self._take_over)

    def _take_over(self) -> None:
        """The performer has been silent for `threshold` s: continue the phrase."""
        self._takeover = None
        if self.settings.mode is Mode.RESPOND and not self.settings.paused:
            self._continue_from(self._loop.time())

    # ------------------------------------------------------------------ the self-playing chain

    def _min_gap(self) -> float:
        return 1.0 / self.settings.max_rate

    def _continue_from(self, start: float, t0: float | None = None) -> None:
        """Sample the next model event and schedule it its predicted wait after ``start`` (an absolute time).

        ``t0`` is when the step began if the caller just observed an event, so the
        recorded step latency covers observe + sample as in the other modes.
        """
        self._cancel_chain()  # only ever one chain: a second could never be cancelled
        t0 = time.perf_counter() if t0 is None else t0
        dt, x, y = self._sample()
        self.latency.add(time.perf_counter() - t0)
        self._chain = item = Scheduled(start, dt, x, y)
        self._arm_chain(item, start + dt * self.settings.timescale)

    def _arm_chain(self, item: Scheduled, when: float) -> None:
        item.when = max(when, self._last_emit + self._min_gap())  # the max_rate floor
        item.handle = self._loop.call_at(item.when, self._chain_fire, item)

    def _chain_fire(self, item: Scheduled) -> None:
        """Play a self-generated event, feed it back, and schedule the next from its scheduled time."""
        self._chain = None
        now = self._loop.time()
        late = now - item.when > LATE_TOLERANCE
        if late:  # the loop stalled: not played, rather than rushed out with the ones after it
            self.counts["late_dropped"] += 1
        else:
            self._play(item, now)
        t0 = time.perf_counter()
        # Fed back either way, so a seeded performance is the same sequence however the machine stalls.
        self.predictor.observe(item.dt, item.x, item.y)
        self._continue_from(now if late else item.when, t0)

    # ------------------------------------------------------------------ accompaniment answers

    def _schedule_answer(self, item: Scheduled) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending))).cancel()
            self.counts["dropped"] += 1
        self._next_id += 1
        self._pending[self._next_id] = item
        self._arm_answer(self._next_id, item, item.start + item.dt * self.settings.timescale)

    def _arm_answer(self, key: int, item: Scheduled, when: float) -> None:
        item.when = when
        item.handle = self._loop.call_at(when, self._answer_fire, key, item)

    def _answer_fire(self, key: int, item: Scheduled) -> None:
        self._pending.pop(key, None)
        now = self._loop.time()
        if now - item.when > LATE_TOLERANCE:
            self.counts["late_dropped"] += 1
        elif not self._take_token(item.when):
            self.counts["rate_dropped"] += 1
        else:
            self._play(item, now)

    def _take_token(self, when: float) -> bool:
        """The max_rate bucket for answers, refilled on the schedule's clock (so a stall adds no tokens)."""
        self._tokens = min(RATE_BURST, self._tokens + max(0.0, when - self._tokens_at) * self.settings.max_rate)
        self._tokens_at = max(self._tokens_at, when)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    # ------------------------------------------------------------------ output

    def _play(self, item: Scheduled, now: float) -> None:
        self.lateness.add(now - item.when)
        self._last_emit = item.when
        self._emit_to_sinks(Event(item.when, item.x, item.y, "model", item.dt * self.settings.timescale))
        self.counts["outputs"] += 1

    def _emit_to_sinks(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:  # a broken sink must not stop the music or the other sinks
                self.counts["sink_errors"] += 1
                if self.counts["sink_errors"] <= 10:
                    log.exception("output sink failed")

    # ------------------------------------------------------------------ rescheduling and cancelling

    def _reschedule(self) -> None:
        """Timing changed: every pending event's time is its cause plus its wait at the new timescale, or now."""
        now, scale = self._loop.time(), self.settings.timescale
        for key, item in list(self._pending.items()):
            item.cancel()
            self._arm_answer(key, item, max(now, item.start + item.dt * scale))
        if self._chain is not None:
            item = self._chain
            item.cancel()
            self._arm_chain(item, max(now, item.start + item.dt * scale))

    def _cancel_chain(self) -> None:
        if self._chain is not None:
            self._chain.cancel()
            self._chain = None

    def _cancel_all(self) -> None:
        self._cancel_chain()
        if self._takeover is not None:
            self._takeover.cancel()
            self._takeover = None
        for item in self._pending.values():
            item.cancel()
        self._pending.clear()
        for silence in self.silencers:
            try:
                silence()
            except Exception:
                self.counts["sink_errors"] += 1
                log.exception("output silencer failed")


def _check(value: float, name: str, minimum: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ControlError(f"{name} must be a finite number >= {minimum:g}")
    return value
