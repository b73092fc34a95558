"""The live engine: the controls a transport may use, applied to the table of voices.

Data flows one way: a transport calls a control (`server.live.controls.Controls`),
the engine finds the voice, the voice does the work (`server.live.voice`) and hands
what it plays to the outputs it was built with (`server.live.outputs`). The engine
never touches a socket and nothing assigns to it from outside: outputs, the streams'
sink, status sources and the learner are handed in at construction.

Mode and temperatures are global unless a voice overrides them; a control naming a
voice applies only if the route asking owns it (`server.live.voices`), while a control
without one is global and anyone's. Controls that change
timing (`/timescale`, `/lookahead`) reschedule what is pending; `/reset` cancels what
was scheduled from the old state before zeroing it; a model swap is read and built
off the loop (`server.live.swap`) and every voice starts afresh on it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from server.live import settings as limits
from server.live.controls import ControlError, Shown
from server.live.learning import Learner
from server.live.modes import parse_mode
from server.live.outputs import Outputs, Sink
from server.live.schedule import LATE_TOLERANCE, MAX_PENDING, RATE_BURST
from server.live.settings import DEFAULT_MAX_RATE, MAX_LOOKAHEAD, Settings
from server.live.stage import Stage
from server.live.status import STATUS_KEYS, VOICE_STATUS_KEYS, LatencyWindow, micro, new_counts
from server.live.swap import ModelSwap
from server.live.streams import STREAM_RATE, SURPRISE_SMOOTHING, NoStreams, StreamMaths, StreamSink
from server.live.voice import Voice
from server.live.voices import VoiceOptions, VoiceTable
from server.model.predictor import Predictor

__all__ = ["Engine", "Settings", "STATUS_KEYS", "RATE_BURST", "LATE_TOLERANCE", "MAX_PENDING", "MAX_LOOKAHEAD",
           "DEFAULT_MAX_RATE", "SURPRISE_SMOOTHING"]

StatusSource = Callable[[], dict[str, Any]]


class Engine:
    """Implements `Controls` on top of a `Predictor`, one state per voice."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        predictor: Predictor,
        models_dir: Path,
        settings: Settings | None = None,
        *,
        sinks: Sequence[Sink] = (),
        streams: StreamSink | None = None,
        status_sources: Sequence[StatusSource] = (),
        learner: Learner | None = None,
        seed: int | None = None,
        model_name: str = "default",
        model_folder: Path | None = None,
        voices: VoiceOptions | None = None,
        stream_rate: float = STREAM_RATE,
    ) -> None:
        """``sinks`` take every event; ``streams`` the displays' maths while someone listens; ``status_sources``
        add their keys to `/status`; ``learner`` fine-tunes on this session (None: `/learn` is refused);
        ``stream_rate`` is how often a second (and how many in a burst) the streams are computed."""
        self._loop = loop
        self.settings = settings or Settings()
        self.counts = new_counts()
        self.latency = LatencyWindow()
        self.lateness = LatencyWindow()
        self._outputs = Outputs(sinks, self.counts)
        self._streams = StreamMaths(loop, streams or NoStreams(), self.counts, stream_rate, stream_rate)
        stage = Stage(loop, self.settings, self._outputs, self._streams, self.counts, self.latency, self.lateness)
        self._voices = VoiceTable(stage, voices or VoiceOptions(), predictor, seed)
        self._swap = ModelSwap(loop, models_dir, model_name, model_folder, self._install, self.counts,
                               step_engine=predictor.requested)
        self._learner = learner
        self._status_sources = tuple(status_sources)
        self._started = loop.time()
        self._inputs_before_width = 0  # performer events heard before the playing width began (not in its log)

    # ------------------------------------------------------------------ what it plays

    @property
    def predictor(self) -> Predictor:
        """The playing model (voices fork it when per-sender)."""
        return self._voices.predictor

    @property
    def model_name(self) -> str:
        return self._swap.name

    @property
    def model_folder(self) -> Path:
        return self._swap.folder

    @property
    def loading(self) -> str:
        return self._swap.loading

    def voice(self, number: int) -> Voice | None:
        """The voice with this number, if it is playing."""
        return self._voices.get(number)

    @property
    def voices(self) -> tuple[Voice, ...]:
        return tuple(self._voices)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Begin the current mode (generate starts playing at once)."""
        for v in self._voices:
            v.start()

    def stop(self) -> None:
        """Cancel everything scheduled and any model load; nothing more will be emitted."""
        self._swap.stop()
        self._voices.stop()
        self._outputs.silence(None)
        self._streams.stop()

    # ------------------------------------------------------------------ Controls

    @property
    def width(self) -> int:
        """N, the values a performer event carries: the playing model's (`Controls.width`)."""
        return self._voices.predictor.values

    def perform(self, *values: float, at: float | None = None, voice: int | None = None,
                route: Hashable | None = None) -> None:
        width = self._voices.predictor.values
        if len(values) != width:
            raise ControlError(f"the model plays {width} values per event (its dims), got {len(values)}")
        if not all(math.isfinite(v) for v in values):  # transports check too; never poison the state
            raise ControlError("values must be finite numbers")
        v = self._voices.find(voice, route)
        now = self._loop.time()
        at = now if at is None or not math.isfinite(at) or at > now else at
        if min(values) < 0.0 or max(values) > 1.0:
            self.counts["clamped"] += 1
            values = tuple(min(max(x, 0.0), 1.0) for x in values)
        self.counts["inputs"] += 1
        v.hear(values, at, now)

    def set_temperature(self, value: float, voice: int | None = None, route: Hashable | None = None) -> None:
        value = limits.at_least(value, "temperature", 0.0)
        if voice is None:
            self.settings.temperature = value
        else:
            self._voices.existing(voice, route).temperature = value

    def set_sigma_temperature(self, value: float, voice: int | None = None, route: Hashable | None = None) -> None:
        value = limits.at_least(value, "sigma_temperature", 0.0)
        if voice is None:
            self.settings.sigma_temperature = value
        else:
            self._voices.existing(voice, route).sigma_temperature = value

    def set_timescale(self, value: float) -> None:
        self.settings.timescale = limits.timescale(value)
        for v in self._voices:
            v.reschedule()

    def set_lookahead(self, seconds: float) -> None:
        self.settings.lookahead = limits.lookahead(seconds)
        for v in self._voices:
            v.reschedule()

    def set_threshold(self, seconds: float) -> None:
        self.settings.threshold = limits.at_least(seconds, "threshold", 0.0)
        for v in self._voices:
            v.rearm_takeover()

    def set_mode(self, name: str, voice: int | None = None, route: Hashable | None = None) -> None:
        try:
            mode = parse_mode(name)
        except ValueError as e:
            raise ControlError(str(e)) from None
        if voice is not None:
            self._voices.existing(voice, route).set_mode(mode)
            return
        if mode is self.settings.mode:
            return
        self.settings.mode = mode
        for v in self._voices:
            if v.own_mode is None:
                v.restart()

    def reset(self, voice: int | None = None, route: Hashable | None = None) -> None:
        """A fresh start (of one voice `route` owns, or all): nothing scheduled from the old state plays, and the
        state is zero."""
        for v in self._voices.targets(voice, route):
            v.reset()

    def set_paused(self, paused: bool) -> None:
        if paused == self.settings.paused:
            return
        self.settings.paused = bool(paused)
        for v in self._voices:
            v.cancel() if paused else v.start()
        if paused:
            self._outputs.silence(None)

    def load_model(self, name: str, on_error: Callable[[str], None] | None = None,
                   on_loaded: Callable[[], None] | None = None) -> None:
        """Read, check and build models/<name> in a worker thread; swap it in on the loop when ready."""
        self._swap.load(name, on_error, on_loaded)

    def learn(self, seconds: float) -> None:
        """Start a fine-tune of the playing model on this session's playing (see `server.live.learning`)."""
        if self._learner is None:
            raise ControlError("learning is not available in this server")
        heard = self.counts["inputs"] - self._inputs_before_width  # what the current log holds: its width's
        self._learner.start(seconds, self.model_name, self.model_folder, heard, self._swap.load,
                            playing=self._swap.playing)

    def stop_learning(self) -> None:
        if self._learner is None:
            raise ControlError("learning is not available in this server")
        self._learner.stop()

    def status(self, asker: Hashable | None = Shown.ALL) -> dict[str, Any]:
        """`/status`: the same for all, then the per-voice keys of the voices `asker` owns (see `Controls.status`)."""
        s = self.settings
        now = self._loop.time()
        voices = self._voices
        items: dict[str, Any] = {
            "mode": s.mode.value,
            "paused": int(s.paused),
            "temperature": s.temperature,
            "sigma_temperature": limits.sigma_temperature(s, self.predictor.info),
            "timescale": s.timescale,
            "threshold": s.threshold,
            "max_rate": s.max_rate,
            "lookahead": s.lookahead,
            "model": self.model_name,
            "loading": self.loading,
            "backend": self.predictor.backend,
            "dims": self.predictor.values,
            **self.counts,
            "voices_policy": voices.options.policy.value,
            "voices": len(voices),
            "pending": sum(v.pending_count() for v in voices),
            **micro("step_us", self.latency.percentiles((50, 99))),
            **micro("late_us", self.lateness.percentiles((50, 99))),
            "uptime_s": round(now - self._started, 1),
        }
        if voices.options.per_sender and asker is not Shown.NONE:
            for n, v in voices.numbered() if asker is Shown.ALL else voices.owned_by(asker):
                items.update((f"voice{n}_{key}", value) for key, value in zip(VOICE_STATUS_KEYS, v.status(now)))
        if self._learner is not None:
            items.update(self._learner.status())
        for source in self._status_sources:
            items.update(source())
        return items

    # ------------------------------------------------------------------ a new model

    def _install(self, predictor: Predictor) -> None:
        """On the loop: nothing from the old model plays, every voice starts afresh on the new one; a model of
        another width retunes the outputs (`/model/dims`, a new log) before anything of it plays."""
        for v in self._voices:
            v.cancel()
        self._outputs.silence(None)
        retuned = predictor.values != self._voices.predictor.values
        self._voices.play_on(predictor)
        if retuned:
            self._inputs_before_width = self.counts["inputs"]
            self._outputs.retune(predictor.values)
        for v in self._voices:
            v.start()
