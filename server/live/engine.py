"""The live loop: performer events in, model events out at absolute monotonic times.

Runs on one asyncio event loop. Every model event is scheduled with `loop.call_at` at
an absolute time computed from when its cause happened (the performer event's
arrival, or the previous model event's *scheduled* time), never from when a callback
happened to wake, so timing does not drift and the loop sleeps whenever nothing is
due. Transports reach the engine only through the `Controls` methods; the engine hands
finished events to sinks (OSC out, MIDI out, recorder) and never touches a socket.

Voices (`server.live.voices`): each has its own RNN state, random stream, clock,
schedule and mode timers, so a voice's answers depend on its own input only. Mode and
temperatures are global unless a voice overrides them.

Lookahead: with `lookahead` L > 0 an event leaves L before its time (never before it
was computed) and carries its time, so a client that schedules by timetag plays it
exactly; a self-playing chain runs L ahead of the clock.

Guards that keep the music going whatever the input:

- `max_rate`: at most max_rate model events per second per voice in every mode and at
  any timescale: a self-playing chain's events are at least 1/max_rate apart (it slows
  down); accompaniment answers draw from a token bucket (rate max_rate, burst
  `RATE_BURST`, so a chord survives) and an answer with no token is dropped and
  counted. CPU and log growth are bounded whatever the timescale or the model says.
- Lateness: an event that leaves more than `LATE_TOLERANCE` after it should have
  (after a stall) is dropped and counted, never played in a burst; a chain resumes
  from now.
- Controls that change timing (`/timescale`, `/lookahead`) reschedule what is pending.
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
from collections.abc import Hashable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from server.event import Event
from server.live.controls import ControlError
from server.live.learning import Learner
from server.live.modes import Mode, parse_mode
from server.live.voices import (RATE_BURST, Scheduled, Voice, VoiceOptions, check_voice, route_text)
from server.model.files import check_model_name, resolve_model_dir
from server.model.mdn import RandomBlocks
from server.model.predictor import Predictor
from server.model.spec import DIMS, ModelError

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]
Silencer = Callable[[int | None], None]  # release what a voice (None: every voice) holds
MAX_PENDING = 256  # scheduled accompaniment answers per voice; beyond this the oldest is dropped and counted
LATE_TOLERANCE = 0.05  # seconds: an event later than this is dropped rather than played late
DEFAULT_MAX_RATE = 200.0  # model events per second per voice: faster than any playing, slow enough to cost little
MAX_LOOKAHEAD = 2.0  # seconds


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
    lookahead: float = 0.0


# Every key the engine puts in `/status`, with its meaning: the README's table is generated from it.
STATUS_KEYS: dict[str, str] = {
    "mode": "interaction mode",
    "paused": "1 while output is paused",
    "temperature": "mixture-weight temperature",
    "sigma_temperature": "scale temperature",
    "timescale": "factor on every predicted wait",
    "threshold": "seconds of silence before `respond` takes over",
    "max_rate": "most model events per second, per voice",
    "lookahead": "seconds a model event is sent before its time, as a timetagged bundle (0: plain, on time)",
    "model": "the playing model's name",
    "loading": "the model being loaded off the loop, or empty",
    "backend": "`litert`, or `tensorflow` where LiteRT is missing",
    "inputs": "performer events received",
    "outputs": "model events played",
    "dropped": f"answers dropped because {MAX_PENDING} were already waiting in their voice",
    "late_dropped": f"model events dropped because they would have left more than {LATE_TOLERANCE * 1000:.0f} ms "
                    "late (a stall)",
    "rate_dropped": "answers dropped to hold `max_rate`",
    "clamped": "performer positions outside [0, 1], clamped",
    "sink_errors": "outputs (OSC, MIDI, log) that raised",
    "model_swaps": "models swapped in",
    "model_load_errors": "model loads that failed (the old model kept playing)",
    "voices_refused": "performer events refused because every voice was taken",
    "voices_expired": "voices forgotten after their performer's silence",
    "voices_policy": "`one` or `per-sender`",
    "voices": "voices playing now",
    "pending": "model events scheduled and not yet played",
    "step_us_median": "observe + predict + sample, median over the last 2,048 steps (µs)",
    "step_us_p99": "the same, 99th percentile (µs)",
    "late_us_median": "how long after it should have left a model event left, median (µs)",
    "late_us_p99": "the same, 99th percentile (µs)",
    "uptime_s": "seconds since start",
    "voice<n>_from": "per-sender only, for each voice n: who plays it (`host:port`, or `midi channel c`)",
    "voice<n>_mode": "its mode (its own, or the global one)",
    "voice<n>_temperature": "its temperature (its own, or the global one)",
    "voice<n>_inputs": "its performer events",
    "voice<n>_outputs": "its model events played",
    "voice<n>_idle_s": "seconds since its performer's last event",
}
VOICE_STATUS_KEYS = tuple(k.removeprefix("voice<n>_") for k in STATUS_KEYS if k.startswith("voice<n>_"))


class LatencyWindow:
    """The last N step latencies, for median and p99 in `/status` without unbounded growth."""

    def __init__(self, size: int = 2048) -> None:
        self._values = np.zeros(size)
        self._n = 0

    def add(self, seconds: float) -> None:
        self._values[self._n % len(self._values)] = seconds
        self._n += 1

    def percentile(self, q: float) -> float:
        return self.percentiles((q,))[0]

    def percentiles(self, qs: tuple[float, ...]) -> tuple[float, ...]:
        """Several at once: one sort for all (the status push reads two per window four times a second)."""
        n = min(self._n, len(self._values))
        return tuple(float(v) for v in np.percentile(self._values[:n], qs)) if n else tuple(0.0 for _ in qs)


SURPRISE_SMOOTHING = 0.1  # weight of each new event in the running surprise (about the last ten events)



@dataclass
class Watchers:
    """Callbacks for what the model thinks, set while someone subscribes; None means nobody does.

    Each gets the voice's number last (None when voices are off).
    """

    mixture: Callable[[list[float], int | None], None] | None = None  # the predictive distribution, per prediction
    surprise: Callable[[float, float, int | None], None] | None = None  # (nll, smoothed) per performer event
    max_rate: float = 200.0  # each is computed at most this often a second on average (faster input skips some)
    burst: float = 30.0  # ... after a burst of this many: a quick run of a few notes is seen whole
    _tokens: dict[str, tuple[float, float]] = field(default_factory=dict)  # stream -> (tokens, loop time)

    def allow(self, stream: str, now: float) -> bool:
        """Whether to compute `stream` now: a token bucket (rate `max_rate`, depth `burst`)."""
        tokens, then = self._tokens.get(stream, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.max_rate)
        if tokens < 1.0:
            self._tokens[stream] = (tokens, now)
            return False
        self._tokens[stream] = (tokens - 1.0, now)
        return True


class Engine:
    """Implements `server.live.controls.Controls` on top of a `Predictor`, one state per voice."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        predictor: Predictor,
        models_dir: Path,
        settings: Settings | None = None,
        sinks: list[Sink] | None = None,
        seed: int | None = None,
        model_name: str = "default",
        voices: VoiceOptions | None = None,
    ) -> None:
        self._loop = loop
        self.predictor = predictor  # the model; voice 0 plays on it when voices are off, others fork it
        self.model_name = model_name
        self.models_dir = Path(models_dir)
        self.model_folder = self.models_dir / model_name  # where the playing model came from (run may give a path)
        self.learner: Learner | None = None  # fine-tunes on this session's playing, when the app provides one
        self.watch = Watchers()  # who wants to see inside the model (the OSC streams); None costs nothing
        self._looks: list[Callable[[], None]] = []  # stream work waiting for the loop's next turn
        self._look_timer: asyncio.TimerHandle | None = None
        self.settings = settings or Settings()
        self.voice_options = voices or VoiceOptions()
        self.sinks: list[Sink] = list(sinks or [])
        # Called whenever scheduled output is abandoned (mode change, pause, reset, model
        # swap, a voice forgotten, stop) so an output that holds notes can release them.
        self.silencers: list[Silencer] = []
        # Other parts' counters, merged into `/status` (MIDI, the recorder).
        self.status_sources: list[Callable[[], dict[str, Any]]] = []
        self._seed = seed
        self._voices: dict[int, Voice] = {}
        self._keys: dict[Hashable, int] = {}  # per-sender: the sender's name -> its voice
        self._next_id = 0
        self._loads: concurrent.futures.ThreadPoolExecutor | None = None
        self._load_serial = 0
        self.loading = ""  # the model being loaded, if any
        self.latency = LatencyWindow()
        self.lateness = LatencyWindow()  # how long after it should have left each output left
        self.counts = {
            "inputs": 0, "outputs": 0, "dropped": 0, "late_dropped": 0, "rate_dropped": 0, "clamped": 0,
            "sink_errors": 0, "model_swaps": 0, "model_load_errors": 0,
            "voices_refused": 0, "voices_expired": 0,
        }
        self._started = loop.time()
        if not self.voice_options.per_sender:
            self._open_voice(0)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Begin the current mode (generate starts playing at once)."""
        for v in self._voices.values():
            self._enter_mode(v)

    def stop(self) -> None:
        """Cancel everything scheduled and any model load; nothing more will be emitted."""
        self._load_serial += 1
        for v in self._voices.values():
            self._cancel_voice(v)
            if v.expiry is not None:
                v.expiry.cancel()
                v.expiry = None
        self._silence(None)
        if self._look_timer is not None:
            self._look_timer.cancel()
            self._look_timer, self._looks = None, []
        if self._loads is not None:
            self._loads.shutdown(wait=False, cancel_futures=True)
            self._loads = None

    # ------------------------------------------------------------------ voices

    def voice(self, number: int) -> Voice | None:
        """The voice with this number, if it is playing."""
        return self._voices.get(number)

    @property
    def voices(self) -> tuple[Voice, ...]:
        return tuple(self._voices.values())

    def _open_voice(self, number: int) -> Voice:
        now = self._loop.time()
        per_sender = self.voice_options.per_sender
        predictor = self.predictor.fork() if per_sender else self.predictor
        # Each voice's random stream starts from the seed, so a voice plays as it would alone.
        v = Voice(number, predictor, RandomBlocks(np.random.default_rng(self._seed), DIMS), now)
        self._voices[number] = v
        if per_sender:
            v.expiry = self._loop.call_at(now + self.voice_options.timeout, self._expire, v)
        return v

    def _find_voice(self, voice: int | None, route: Hashable | None) -> Voice:
        """The voice a performer event belongs to, opened if new (ControlError if none may be)."""
        options = self.voice_options
        if not options.per_sender:
            if voice is not None:
                check_voice(voice, options)  # says why not
            return self._voices[0]
        if voice is not None:
            v = self._voices.get(check_voice(voice, options))
            if v is None:
                v = self._open_or_refuse(voice)
        else:
            number = self._keys.get(route)
            v = self._voices.get(number) if number is not None else None
            if v is None:
                free = next((n for n in range(options.limit) if n not in self._voices), None)
                v = self._open_or_refuse(free)
                v.key = route
                self._keys[route] = v.number
        if route is not None:
            v.route = route
        return v

    def _open_or_refuse(self, number: int | None) -> Voice:
        if number is None or len(self._voices) >= self.voice_options.limit:
            self.counts["voices_refused"] += 1
            raise ControlError(f"all {self.voice_options.limit} voices are playing; a voice is free again after "
                               f"{self.voice_options.timeout:g} s of silence")
        v = self._open_voice(number)
        self._enter_mode(v)
        return v

    def _existing(self, voice: int) -> Voice:
        v = self._voices.get(check_voice(voice, self.voice_options))
        if v is None:
            raise ControlError(f"voice {voice} is not playing (a voice starts with its first performer event)")
        return v

    def _expire(self, v: Voice) -> None:
        """Forget a voice whose performer has been silent for the timeout (checked lazily: one timer per voice)."""
        v.expiry = None
        due = v.last_active + self.voice_options.timeout
        now = self._loop.time()
        if now < due:
            v.expiry = self._loop.call_at(due, self._expire, v)
            return
        self._cancel_voice(v)
        self._silence(self._label(v))
        del self._voices[v.number]
        if v.key is not None and self._keys.get(v.key) == v.number:
            del self._keys[v.key]
        self.counts["voices_expired"] += 1

    def _label(self, v: Voice) -> int | None:
        """The voice number outputs carry: none when voices are off, so today's clients see no change."""
        return v.number if self.voice_options.per_sender else None

    def _mode(self, v: Voice) -> Mode:
        return self.settings.mode if v.mode is None else v.mode

    def _targets(self, voice: int | None) -> tuple[Voice, ...]:
        return tuple(self._voices.values()) if voice is None else (self._existing(voice),)

    # ------------------------------------------------------------------ Controls

    def perform(self, x: float, y: float, at: float | None = None, voice: int | None = None,
                route: Hashable | None = None) -> None:
        if not (math.isfinite(x) and math.isfinite(y)):  # transports check too; never poison the state
            raise ControlError("x and y must be finite numbers")
        v = self._find_voice(voice, route)
        now = self._loop.time()
        at = now if at is None or not math.isfinite(at) or at > now else at
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            self.counts["clamped"] += 1
            x, y = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
        # The first event after a start or /reset opens a performance: dt 0, as in training data.
        dt = 0.0 if v.fresh else max(0.0, at - v.last_performer)
        v.fresh = False
        v.last_performer = max(v.last_performer, at)
        v.last_active = now
        v.heard_performer = True
        v.inputs += 1
        self.counts["inputs"] += 1
        mode = self._mode(v)
        if mode is Mode.RESPOND:
            self._cancel_chain(v)  # the performer has the floor again
        watch = self.watch
        if watch.surprise is not None and watch.allow("surprise", now):  # only when someone listens, within its rate
            self._look(partial(self._tell_surprise, v, v.predictor, v.predictor.params, dt, x, y))
        t0 = time.perf_counter()
        v.predictor.observe(dt, x, y)
        if mode is Mode.ACCOMPANY and not self.settings.paused:
            dt_next, nx, ny = self._sample(v)
            self.latency.add(time.perf_counter() - t0)
            self._schedule_answer(v, Scheduled(at, dt_next, nx, ny))
        else:
            self.latency.add(time.perf_counter() - t0)
        if mode is Mode.RESPOND:
            self._arm_takeover(v)
        # Logged and shown after an answer that was due at once has left: the log and displays can wait.
        self._emit_to_sinks(Event(at, x, y, "performer", voice=self._label(v), route=v.route))

    def set_temperature(self, value: float, voice: int | None = None) -> None:
        value = _check(value, "temperature", minimum=0.0)
        if voice is None:
            self.settings.temperature = value
        else:
            self._existing(voice).temperature = value

    def set_sigma_temperature(self, value: float, voice: int | None = None) -> None:
        value = _check(value, "sigma_temperature", minimum=0.0)
        if voice is None:
            self.settings.sigma_temperature = value
        else:
            self._existing(voice).sigma_temperature = value

    def set_timescale(self, value: float) -> None:
        value = _check(value, "timescale", minimum=0.0)
        if value <= 0.0:
            raise ControlError("timescale must be > 0")
        self.settings.timescale = value
        self._reschedule()

    def set_lookahead(self, seconds: float) -> None:
        seconds = _check(seconds, "lookahead", minimum=0.0)
        if seconds > MAX_LOOKAHEAD:
            raise ControlError(f"lookahead must be at most {MAX_LOOKAHEAD:g} s")
        self.settings.lookahead = seconds
        self._reschedule()

    def set_threshold(self, seconds: float) -> None:
        self.settings.threshold = _check(seconds, "threshold", minimum=0.0)
        for v in self._voices.values():
            if self._mode(v) is Mode.RESPOND and v.takeover is not None:
                self._arm_takeover(v)

    def set_mode(self, name: str, voice: int | None = None) -> None:
        try:
            mode = parse_mode(name)
        except ValueError as e:
            raise ControlError(str(e)) from None
        if voice is not None:
            v = self._existing(voice)
            changed = mode is not self._mode(v)
            v.mode = mode  # its own from now on, whatever the global mode does
            if changed:
                self._cancel_voice(v)
                self._silence(self._label(v))
                self._enter_mode(v)
            return
        if mode is self.settings.mode:
            return
        self.settings.mode = mode
        for v in self._voices.values():
            if v.mode is None:
                self._cancel_voice(v)
                self._silence(self._label(v))
                self._enter_mode(v)

    def reset(self, voice: int | None = None) -> None:
        """A fresh start (of one voice, or all): nothing scheduled from the old state plays, and the state is zero."""
        for v in self._targets(voice):
            self._cancel_voice(v)
            self._silence(self._label(v))
            v.predictor.reset()
            v.fresh = True
            v.heard_performer = False
            v.surprise = None
            self._enter_mode(v)

    def set_paused(self, paused: bool) -> None:
        if paused == self.settings.paused:
            return
        self.settings.paused = bool(paused)
        for v in self._voices.values():
            if paused:
                self._cancel_voice(v)
            else:
                self._enter_mode(v)
        if paused:
            self._silence(None)

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
        for v in self._voices.values():
            self._cancel_voice(v)
        self._silence(None)
        self.predictor, self.model_name = future.result(), name
        self.model_folder = self.models_dir / name
        per_sender = self.voice_options.per_sender
        for v in self._voices.values():
            v.predictor = self.predictor.fork() if per_sender else self.predictor
            v.fresh = True
            v.surprise = None
        self.counts["model_swaps"] += 1
        log.info("model swapped to %s (%s)", name, self.predictor.backend)
        for v in self._voices.values():
            self._enter_mode(v)
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
        now = self._loop.time()
        items: dict[str, Any] = {
            "mode": s.mode.value,
            "paused": int(s.paused),
            "temperature": s.temperature,
            "sigma_temperature": s.sigma_temperature,
            "timescale": s.timescale,
            "threshold": s.threshold,
            "max_rate": s.max_rate,
            "lookahead": s.lookahead,
            "model": self.model_name,
            "loading": self.loading,
            "backend": self.predictor.backend,
            **self.counts,
            "voices_policy": self.voice_options.policy.value,
            "voices": len(self._voices),
            "pending": sum(v.pending_count() for v in self._voices.values()),
            **_micro("step_us", self.latency.percentiles((50, 99))),
            **_micro("late_us", self.lateness.percentiles((50, 99))),
            "uptime_s": round(now - self._started, 1),
        }
        if self.voice_options.per_sender:
            for n, v in sorted(self._voices.items()):
                values = (route_text(v.route), self._mode(v).value,
                          s.temperature if v.temperature is None else v.temperature,
                          v.inputs, v.outputs, round(now - v.last_active, 1))
                items.update((f"voice{n}_{key}", value) for key, value in zip(VOICE_STATUS_KEYS, values))
        for source in self.status_sources:
            items.update(source())
        return items

    def _sample(self, v: Voice) -> tuple[float, float, float]:
        """The voice's next model event; its predictive distribution goes to the `mixture` watcher first, if any."""
        s, watch = self.settings, self.watch
        temperature = s.temperature if v.temperature is None else v.temperature
        sigma = s.sigma_temperature if v.sigma_temperature is None else v.sigma_temperature
        if watch.mixture is not None:
            now = self._loop.time()
            if watch.allow("mixture", now):
                self._look(partial(self._tell_mixture, v, v.predictor, v.predictor.params, temperature, sigma))
        return v.predictor.sample(v.draws, temperature, sigma)

    # ------------------------------------------------------------------ the streams, off the critical path

    def _look(self, work: Callable[[], None]) -> None:
        """Queue stream work for the loop's next turn, behind what is already due.

        The parameters it needs are captured now (they are a fresh array each step), so
        the figures are the same as computed inline; but an answer due now, and the
        next performer event, never wait for a display's maths.
        """
        self._looks.append(work)
        if self._look_timer is None:
            self._look_timer = self._loop.call_at(self._loop.time(), self._run_looks)

    def _run_looks(self) -> None:
        self._look_timer = None
        looks, self._looks = self._looks, []
        for work in looks:
            try:
                work()
            except Exception:  # a display must never stop the music
                self.counts["sink_errors"] += 1
                log.exception("stream computation failed")

    def _tell_surprise(self, v: Voice, predictor: Predictor, params: np.ndarray, dt: float, x: float,
                       y: float) -> None:
        callback = self.watch.surprise
        if callback is None:
            return
        nll = predictor.surprise(dt, x, y, params)
        v.surprise = nll if v.surprise is None else v.surprise + SURPRISE_SMOOTHING * (nll - v.surprise)
        callback(nll, v.surprise, self._label(v))

    def _tell_mixture(self, v: Voice, predictor: Predictor, params: np.ndarray, temperature: float,
                      sigma_temperature: float) -> None:
        callback = self.watch.mixture
        if callback is not None:
            callback(predictor.mixture(temperature, sigma_temperature, params), self._label(v))

    # ------------------------------------------------------------------ modes

    def _enter_mode(self, v: Voice) -> None:
        if self.settings.paused:
            return
        mode = self._mode(v)
        if mode is Mode.GENERATE:
            self._continue_from(v, self._loop.time() + self.settings.lookahead)  # every event a full lookahead early
        elif mode is Mode.RESPOND and v.heard_performer:
            self._arm_takeover(v)

    def _arm_takeover(self, v: Voice) -> None:
        """Take over `threshold` after the performer's last event (`lookahead` sooner, so the first event is early)."""
        if v.takeover is not None:
            v.takeover.cancel()
        start = v.last_performer + self.settings.threshold
        v.takeover = self._loop.call_at(start - self.settings.lookahead, self._take_over, v, start)

    def _take_over(self, v: Voice, start: float) -> None:
        """The performer has been silent for `threshold` s: continue the phrase."""
        v.takeover = None
        if self._mode(v) is Mode.RESPOND and not self.settings.paused:
            self._continue_from(v, max(start, self._loop.time()))

    # ------------------------------------------------------------------ the self-playing chain

    def _min_gap(self) -> float:
        return 1.0 / self.settings.max_rate

    def _continue_from(self, v: Voice, start: float, t0: float | None = None, earliest: float | None = None) -> None:
        """Sample the voice's next model event and schedule it its predicted wait after ``start`` (absolute).

        ``t0`` is when the step began if the caller just observed an event, so the
        recorded step latency covers observe + sample as in the other modes. ``earliest``
        is when it could first leave (when its cause left; by default now).
        """
        self._cancel_chain(v)  # only ever one chain per voice: a second could never be cancelled
        t0 = time.perf_counter() if t0 is None else t0
        dt, x, y = self._sample(v)
        self.latency.add(time.perf_counter() - t0)
        v.chain = item = Scheduled(start, dt, x, y)
        self._arm_chain(v, item, start + dt * self.settings.timescale, self._loop.time() if earliest is None else earliest)

    def _arm_chain(self, v: Voice, item: Scheduled, when: float, earliest: float) -> None:
        item.when = max(when, v.last_emit + self._min_gap())  # the max_rate floor
        item.send_at = max(item.when - self.settings.lookahead, earliest)
        item.handle = self._loop.call_at(item.send_at, self._chain_fire, v, item)

    def _chain_fire(self, v: Voice, item: Scheduled) -> None:
        """Play a self-generated event, feed it back, and schedule the next from its scheduled time."""
        v.chain = None
        now = self._loop.time()
        late = now - item.send_at > LATE_TOLERANCE
        if late:  # the loop stalled: not played, rather than rushed out with the ones after it
            self.counts["late_dropped"] += 1
        else:
            self._play(v, item, now)
        t0 = time.perf_counter()
        # Fed back either way, so a seeded performance is the same sequence however the machine stalls.
        v.predictor.observe(item.dt, item.x, item.y)
        if late:
            self._continue_from(v, now + self.settings.lookahead, t0)
        else:
            self._continue_from(v, item.when, t0, item.send_at)

    # ------------------------------------------------------------------ accompaniment answers

    def _schedule_answer(self, v: Voice, item: Scheduled) -> None:
        if len(v.pending) >= MAX_PENDING:
            v.pending.pop(next(iter(v.pending))).cancel()
            self.counts["dropped"] += 1
        self._next_id += 1
        when = item.start + item.dt * self.settings.timescale
        send_at = max(when - self.settings.lookahead, item.start)
        if send_at <= self._loop.time():  # due already (a tiny timescale, a lookahead): now, not a loop turn later
            item.when, item.send_at = when, send_at
            self._answer_fire(v, self._next_id, item)
            return
        v.pending[self._next_id] = item
        self._arm_answer(v, self._next_id, item, when, item.start)

    def _arm_answer(self, v: Voice, key: int, item: Scheduled, when: float, earliest: float) -> None:
        item.when = when
        item.send_at = max(when - self.settings.lookahead, earliest)
        item.handle = self._loop.call_at(item.send_at, self._answer_fire, v, key, item)

    def _answer_fire(self, v: Voice, key: int, item: Scheduled) -> None:
        v.pending.pop(key, None)
        now = self._loop.time()
        if now - item.send_at > LATE_TOLERANCE:
            self.counts["late_dropped"] += 1
        elif not self._take_token(v, item.send_at):
            self.counts["rate_dropped"] += 1
        else:
            self._play(v, item, now)

    def _take_token(self, v: Voice, when: float) -> bool:
        """The voice's max_rate bucket for answers, refilled on the schedule's clock (a stall adds no tokens).

        ``when`` is when the answer should leave, which moves with the clock whatever the lookahead.
        """
        v.tokens = min(RATE_BURST, v.tokens + max(0.0, when - v.tokens_at) * self.settings.max_rate)
        v.tokens_at = max(v.tokens_at, when)
        if v.tokens < 1.0:
            return False
        v.tokens -= 1.0
        return True

    # ------------------------------------------------------------------ output

    def _play(self, v: Voice, item: Scheduled, now: float) -> None:
        self.lateness.add(now - item.send_at)
        v.last_emit = item.when
        self._emit_to_sinks(Event(item.when, item.x, item.y, "model", item.dt * self.settings.timescale,
                                  voice=self._label(v), route=v.route))
        self.counts["outputs"] += 1
        v.outputs += 1

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
        for v in self._voices.values():
            for key, item in list(v.pending.items()):
                item.cancel()
                self._arm_answer(v, key, item, max(now, item.start + item.dt * scale), now)
            if v.chain is not None:
                item = v.chain
                item.cancel()
                self._arm_chain(v, item, max(now, item.start + item.dt * scale), now)
            if v.takeover is not None:
                self._arm_takeover(v)

    def _cancel_chain(self, v: Voice) -> None:
        if v.chain is not None:
            v.chain.cancel()
            v.chain = None

    def _cancel_voice(self, v: Voice) -> None:
        """Nothing the voice scheduled will play (its held notes are the silencers' business)."""
        self._cancel_chain(v)
        if v.takeover is not None:
            v.takeover.cancel()
            v.takeover = None
        for item in v.pending.values():
            item.cancel()
        v.pending.clear()

    def _silence(self, voice: int | None) -> None:
        """Tell outputs that hold notes to release a voice's (None: all)."""
        for silence in self.silencers:
            try:
                silence(voice)
            except Exception:
                self.counts["sink_errors"] += 1
                log.exception("output silencer failed")


def _micro(name: str, seconds: tuple[float, ...]) -> dict[str, float]:
    """`<name>_median` and `<name>_p99` in microseconds, to 0.1."""
    return {f"{name}_median": round(seconds[0] * 1e6, 1), f"{name}_p99": round(seconds[1] * 1e6, 1)}


def _check(value: float, name: str, minimum: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ControlError(f"{name} must be a finite number >= {minimum:g}")
    return value
