"""The live loop: performer events in, model events out at absolute monotonic times.

Runs on one asyncio event loop. Outputs are scheduled with `loop.call_at` on the loop's
monotonic clock, each at an absolute time computed from the previous *scheduled* time
(never from when a callback happened to wake), so timing does not drift and the loop
sleeps whenever nothing is due. Transports reach the engine only through the
`Controls` methods; the engine hands finished events to sinks (OSC out, MIDI out,
recorder) and never touches a socket.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from server.live.controls import ControlError
from server.event import Event
from server.model.mdn import RandomBlocks
from server.model.spec import DIMS, ModelError
from server.model.files import resolve_model_dir
from server.live.modes import Mode, parse_mode
from server.model.predictor import Predictor

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]
MAX_PENDING = 256  # scheduled model events; beyond this the oldest is dropped and counted


@dataclass
class Settings:
    """Live-controllable parameters (all changeable over OSC)."""

    mode: Mode = Mode.ACCOMPANY
    temperature: float = 1.0
    sigma_temperature: float = 1.0
    timescale: float = 1.0
    threshold: float = 1.5
    paused: bool = False


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


class Engine:
    """Implements `server.controls.Controls` on top of a `Predictor`."""

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
        self.settings = settings or Settings()
        self.sinks: list[Sink] = list(sinks or [])
        # Called whenever scheduled output is abandoned (mode change, pause, model swap,
        # stop) so an output that holds notes can release them.
        self.silencers: list[Callable[[], None]] = []
        # Other transports' counters, merged into `/status` (e.g. MIDI).
        self.status_sources: list[Callable[[], dict[str, Any]]] = []
        self._rng = RandomBlocks(np.random.default_rng(seed), DIMS)
        self._pending: dict[int, asyncio.TimerHandle] = {}  # insertion-ordered: oldest first
        self._next_id = 0
        self._takeover: asyncio.TimerHandle | None = None
        self._chain: asyncio.TimerHandle | None = None
        self._last_performer = loop.time()
        self._heard_performer = False
        self._fresh = True
        self.latency = LatencyWindow()
        self.lateness = LatencyWindow()  # how long after its scheduled time each output went out
        self.counts = {"inputs": 0, "outputs": 0, "dropped": 0, "clamped": 0, "sink_errors": 0, "model_swaps": 0}
        self._started = loop.time()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Begin the current mode (generate starts playing at once)."""
        self._enter_mode()

    def stop(self) -> None:
        """Cancel everything scheduled; nothing more will be emitted."""
        self._cancel_all()

    # ------------------------------------------------------------------ Controls

    def perform(self, x: float, y: float) -> None:
        if not (math.isfinite(x) and math.isfinite(y)):  # transports check too; never poison the state
            raise ControlError("x and y must be finite numbers")
        now = self._loop.time()
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            self.counts["clamped"] += 1
            x, y = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
        # The first event after a start or /reset opens a performance: dt 0, as in training data.
        dt = 0.0 if self._fresh else now - self._last_performer
        self._fresh = False
        self._last_performer = now
        self._heard_performer = True
        self.counts["inputs"] += 1
        self._emit_to_sinks(Event(now, x, y, "performer"))
        mode = self.settings.mode
        if mode is Mode.RESPOND:
            self._cancel_chain()  # the performer has the floor again
        t0 = time.perf_counter()
        self.predictor.observe(dt, x, y)
        if mode is Mode.ACCOMPANY and not self.settings.paused:
            dt_next, nx, ny = self.predictor.sample(self._rng, self.settings.temperature, self.settings.sigma_temperature)
            self.latency.add(time.perf_counter() - t0)
            self._schedule_answer(now, dt_next * self.settings.timescale, nx, ny)
        else:
            self.latency.add(time.perf_counter() - t0)
        if mode is Mode.RESPOND:
            self._arm_takeover(now)

    def set_temperature(self, value: float) -> None:
        self.settings.temperature = _check(value, "temperature", minimum=0.0)

    def set_sigma_temperature(self, value: float) -> None:
        self.settings.sigma_temperature = _check(value, "sigma_temperature", minimum=0.0)

    def set_timescale(self, value: float) -> None:
        value = _check(value, "timescale", minimum=0.0)
        if value <= 0.0:
            raise ControlError("timescale must be > 0")
        self.settings.timescale = value

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
        self.predictor.reset()
        self._fresh = True

    def set_paused(self, paused: bool) -> None:
        if paused == self.settings.paused:
            return
        self.settings.paused = bool(paused)
        if paused:
            self._cancel_all()
        else:
            self._enter_mode()

    def load_model(self, name: str) -> None:
        try:
            folder = resolve_model_dir(name, self.models_dir, allow_paths=False)
            predictor = Predictor.load(folder, label=name)
        except (ModelError, OSError, ValueError) as e:
            raise ControlError(f"model {name!r} not loaded, keeping {self.model_name!r}: {e}") from None
        self._cancel_all()
        self.predictor, self.model_name = predictor, name
        self._fresh = True
        self.counts["model_swaps"] += 1
        log.info("model swapped to %s (%s)", folder, predictor.backend)
        self._enter_mode()

    def status(self) -> dict[str, Any]:
        s = self.settings
        return {
            "mode": s.mode.value,
            "paused": int(s.paused),
            "temperature": s.temperature,
            "sigma_temperature": s.sigma_temperature,
            "timescale": s.timescale,
            "threshold": s.threshold,
            "model": self.model_name,
            "backend": self.predictor.backend,
            **self.counts,
            "pending": len(self._pending),
            "step_us_median": round(self.latency.percentile(50) * 1e6, 1),
            "step_us_p99": round(self.latency.percentile(99) * 1e6, 1),
            "late_us_median": round(self.lateness.percentile(50) * 1e6, 1),
            "late_us_p99": round(self.lateness.percentile(99) * 1e6, 1),
            "uptime_s": round(self._loop.time() - self._started, 1),
            **{k: v for source in self.status_sources for k, v in source().items()},
        }

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

    def _continue_from(self, at: float, t0: float | None = None) -> None:
        """Sample the next model event and schedule it `dt` after ``at`` (an absolute time).

        ``t0`` is when the step began if the caller just observed an event, so the
        recorded step latency covers observe + sample as in the other modes.
        """
        self._cancel_chain()  # only ever one chain: a second could never be cancelled
        t0 = time.perf_counter() if t0 is None else t0
        dt, x, y = self.predictor.sample(self._rng, self.settings.temperature, self.settings.sigma_temperature)
        self.latency.add(time.perf_counter() - t0)
        when = at + dt * self.settings.timescale
        self._chain = self._loop.call_at(when, self._chain_fire, when, dt, x, y)

    def _chain_fire(self, when: float, dt: float, x: float, y: float) -> None:
        """Emit a self-generated event, feed it back, and schedule the next from its scheduled time."""
        self.lateness.add(self._loop.time() - when)
        self._chain = None
        self._emit_to_sinks(Event(when, x, y, "model", dt * self.settings.timescale))
        self.counts["outputs"] += 1
        t0 = time.perf_counter()
        self.predictor.observe(dt, x, y)
        # Don't let a stalled loop make the chain race to catch up: never schedule in the past.
        self._continue_from(max(when, self._loop.time() - 0.05), t0)

    def _schedule_answer(self, now: float, wait: float, x: float, y: float) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending))).cancel()
            self.counts["dropped"] += 1
        self._next_id += 1
        when = now + wait
        self._pending[self._next_id] = self._loop.call_at(when, self._answer_fire, self._next_id, when, wait, x, y)

    def _answer_fire(self, key: int, when: float, wait: float, x: float, y: float) -> None:
        self.lateness.add(self._loop.time() - when)
        self._pending.pop(key, None)
        self._emit_to_sinks(Event(when, x, y, "model", wait))
        self.counts["outputs"] += 1

    def _emit_to_sinks(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:  # a broken sink must not stop the music or the other sinks
                self.counts["sink_errors"] += 1
                if self.counts["sink_errors"] <= 10:
                    log.exception("output sink failed")

    # ------------------------------------------------------------------ cancelling

    def _cancel_chain(self) -> None:
        if self._chain is not None:
            self._chain.cancel()
            self._chain = None

    def _cancel_all(self) -> None:
        self._cancel_chain()
        if self._takeover is not None:
            self._takeover.cancel()
            self._takeover = None
        for handle in self._pending.values():
            handle.cancel()
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
