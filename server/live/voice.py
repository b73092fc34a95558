"""A voice: one conversation with one performer, and everything it does on its own.

It hears its performer (observe, then answer or wait, as its mode says), samples with
its own temperatures, keeps its own schedule at absolute times on the loop's clock,
holds its own `max_rate` bucket, and takes over in `respond`. Every model event is
timed from its cause (the performer event's arrival, or the previous model event's
*scheduled* time), never from when a callback happened to wake, so timing does not
drift and the loop sleeps whenever nothing is due.

Guards that keep the music going whatever the input:

- `max_rate`: a self-playing chain's events are at least 1/max_rate apart (it slows
  down), and so are their sends: raising the lookahead makes the chain catch up at the
  rate limit, never in a burst. Answers draw from a token bucket
  (`server.live.schedule.RateBucket`) and one with no token is dropped and counted;
  answers already waiting when the lookahead rises are paced (`schedule.pace`).
- Lateness: an event that would leave more than `LATE_TOLERANCE` late (a stall) is
  dropped and counted, never played in a burst; a chain resumes from now.
- At most `MAX_PENDING` answers wait; beyond that the oldest is dropped and counted.

With `lookahead` L > 0 an event leaves L before its time (never before it was
computed) and carries its time, so a client that schedules by timetag plays it
exactly; a self-playing chain runs L ahead of the clock. An event that cannot leave
before its time (heard late, or fired late by a stall) goes plain and is counted
(`untagged`): never a timetag in the past.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Hashable

from server.event import Event
from server.live import settings as limits
from server.live.modes import Mode
from server.live.schedule import MAX_PENDING, RateBucket, Scheduled, pace
from server.live.stage import Stage
from server.model.mdn import RandomBlocks
from server.model.predictor import Predictor


class Voice:
    """One performer's RNN state, random stream, clock, schedule, timers and overrides of the global controls."""

    def __init__(self, number: int, label: int | None, predictor: Predictor, draws: RandomBlocks,
                 stage: Stage) -> None:
        now = stage.loop.time()
        self.number = number
        self.label = label  # the number its outputs carry: None when voices are off, so clients see no change
        self.predictor = predictor
        self.draws = draws
        self._stage = stage
        self.pending: dict[int, Scheduled] = {}  # accompaniment answers, insertion-ordered: oldest first
        self._next_key = 0
        self.chain: Scheduled | None = None  # the one self-playing event (generate, respond)
        self.takeover: asyncio.TimerHandle | None = None
        self.last_performer = now  # loop time of its performer's last event
        self.last_active = now  # loop time it last heard its performer (for the idle timeout)
        self.last_emit = -math.inf  # scheduled time of its last model event
        self.last_sent = -math.inf  # when its last model event was due to leave (its send_at)
        self.bucket = RateBucket()
        self.heard_performer = False
        self.fresh = True  # the next performer event opens a performance (dt 0)
        self.key: Hashable | None = None  # the sender that found it (per-sender), None for a numbered voice
        self.route: Hashable | None = None  # where its output goes: the transport's name for its performer
        # Overrides of the global controls; None follows the global value.
        self.own_mode: Mode | None = None
        self.temperature: float | None = None
        self.sigma_temperature: float | None = None
        self.inputs = 0
        self.outputs = 0

    @property
    def mode(self) -> Mode:
        """Its mode: its own, or the global one."""
        return self._stage.settings.mode if self.own_mode is None else self.own_mode

    def pending_count(self) -> int:
        return len(self.pending) + (self.chain is not None)

    # ------------------------------------------------------------------ its performer

    def hear(self, values: tuple[float, ...], at: float, now: float) -> None:
        """Its performer played ``values`` at ``at``: observe them, then answer or wait as the mode says, then log it."""
        stage = self._stage
        # The first event after a start or /reset opens a performance: dt 0, as in training data.
        dt = 0.0 if self.fresh else max(0.0, at - self.last_performer)
        self.fresh = False
        self.last_performer = max(self.last_performer, at)
        self.last_active = now
        self.heard_performer = True
        self.inputs += 1
        mode = self.mode
        if mode is Mode.RESPOND:
            self._cancel_chain()  # the performer has the floor again
        stage.streams.surprise(self.number, self.label, self.predictor, dt, values)
        t0 = time.perf_counter()
        self.predictor.observe(dt, *values)
        if mode is Mode.ACCOMPANY and not stage.settings.paused:
            dt_next, *answer = self._sample()
            stage.latency.add(time.perf_counter() - t0)
            self._answer(Scheduled(at, dt_next, tuple(answer)))
        else:
            stage.latency.add(time.perf_counter() - t0)
        if mode is Mode.RESPOND:
            self._arm_takeover()
        # Logged and shown after an answer that was due at once has left: the log and displays can wait.
        stage.outputs.emit(Event(at, values, "performer", voice=self.label, route=self.route))

    def _sample(self) -> tuple[float, ...]:
        """Its next model event, at its own temperatures (or the global ones); shown to the `mixture` stream first."""
        settings = self._stage.settings
        temperature = settings.temperature if self.temperature is None else self.temperature
        sigma = limits.sigma_temperature(settings, self.predictor.info) if self.sigma_temperature is None \
            else self.sigma_temperature
        self._stage.streams.mixture(self.number, self.label, self.predictor, temperature, sigma)
        return self.predictor.sample(self.draws, temperature, sigma)

    # ------------------------------------------------------------------ modes

    def start(self) -> None:
        """Begin its mode: generate plays at once, respond waits for silence after its performer."""
        settings = self._stage.settings
        if settings.paused:
            return
        mode = self.mode
        if mode is Mode.GENERATE:
            self._continue_from(self._stage.loop.time() + settings.lookahead)  # every event a full lookahead early
        elif mode is Mode.RESPOND and self.heard_performer:
            self._arm_takeover()

    def restart(self) -> None:
        """Its mode changed: nothing from the old one plays, its notes are released, the new one begins."""
        self.silence()
        self.start()

    def set_mode(self, mode: Mode) -> None:
        """Its own mode from now on, whatever the global mode does; restarts only if that changes anything."""
        changed = mode is not self.mode
        self.own_mode = mode
        if changed:
            self.restart()

    def reset(self) -> None:
        """A fresh start: nothing scheduled from the old state plays, and the state is zero."""
        self.silence()
        self.predictor.reset()
        self.fresh = True
        self.heard_performer = False
        self._stage.streams.forget(self.number)
        self.start()

    def play_on(self, predictor: Predictor, draws: RandomBlocks | None = None) -> None:
        """A new model: its state starts afresh on it (what was scheduled is already cancelled); ``draws``
        replace its random stream when the model's width changed."""
        self.predictor = predictor
        if draws is not None:
            self.draws = draws
        self.fresh = True
        self._stage.streams.forget(self.number)

    def _arm_takeover(self) -> None:
        """Take over `threshold` after the performer's last event (`lookahead` sooner, so the first event is early)."""
        if self.takeover is not None:
            self.takeover.cancel()
        settings = self._stage.settings
        start = self.last_performer + settings.threshold
        self.takeover = self._stage.loop.call_at(start - settings.lookahead, self._take_over, start)

    def _take_over(self, start: float) -> None:
        """The performer has been silent for `threshold` s: continue the phrase."""
        self.takeover = None
        if self.mode is Mode.RESPOND and not self._stage.settings.paused:
            self._continue_from(max(start, self._stage.loop.time()))

    # ------------------------------------------------------------------ the self-playing chain

    def _continue_from(self, start: float, t0: float | None = None, earliest: float | None = None) -> None:
        """Sample the next model event and schedule it its predicted wait after ``start`` (absolute).

        ``t0`` is when the step began if the caller just observed an event, so the
        recorded step latency covers observe + sample as in the other modes. ``earliest``
        is when it could first leave (when its cause left; by default now).
        """
        self._cancel_chain()  # only ever one chain: a second could never be cancelled
        stage = self._stage
        t0 = time.perf_counter() if t0 is None else t0
        dt, *values = self._sample()
        stage.latency.add(time.perf_counter() - t0)
        self.chain = item = Scheduled(start, dt, tuple(values))
        self._arm_chain(item, start + dt * stage.settings.timescale,
                        stage.loop.time() if earliest is None else earliest)

    def _arm_chain(self, item: Scheduled, when: float, earliest: float) -> None:
        settings = self._stage.settings
        gap = 1.0 / settings.max_rate
        item.when = max(when, self.last_emit + gap)  # the max_rate floor, on the events' times
        item.send_at = max(item.when - settings.lookahead, earliest, self.last_sent + gap)  # and on their sends
        item.handle = self._stage.loop.call_at(item.send_at, self._chain_fire, item)

    def _chain_fire(self, item: Scheduled) -> None:
        """Play a self-generated event, feed it back, and schedule the next from its scheduled time."""
        self.chain = None
        stage = self._stage
        now = stage.loop.time()
        late = item.late(now)
        if late:  # the loop stalled: not played, rather than rushed out with the ones after it
            stage.counts["late_dropped"] += 1
        else:
            self._play(item, now)
        t0 = time.perf_counter()
        # Fed back either way, so a seeded performance is the same sequence however the machine stalls.
        self.predictor.observe(item.dt, *item.values)
        if late:
            self._continue_from(now + stage.settings.lookahead, t0)
        else:
            self._continue_from(item.when, t0, item.send_at)

    # ------------------------------------------------------------------ accompaniment answers

    def _answer(self, item: Scheduled) -> None:
        stage = self._stage
        if len(self.pending) >= MAX_PENDING:
            self.pending.pop(next(iter(self.pending))).cancel()
            stage.counts["dropped"] += 1
        self._next_key += 1
        when = item.start + item.dt * stage.settings.timescale
        send_at = max(when - stage.settings.lookahead, item.start)
        if send_at <= stage.loop.time():  # due already (a tiny timescale, a lookahead): now, not a loop turn later
            item.when, item.send_at = when, send_at
            self._answer_fire(self._next_key, item)
            return
        self.pending[self._next_key] = item
        self._arm_answer(self._next_key, item, when, item.start)

    def _arm_answer(self, key: int, item: Scheduled, when: float, earliest: float) -> None:
        item.when = when
        item.send_at = max(when - self._stage.settings.lookahead, earliest)
        item.handle = self._stage.loop.call_at(item.send_at, self._answer_fire, key, item)

    def _answer_fire(self, key: int, item: Scheduled) -> None:
        self.pending.pop(key, None)
        stage = self._stage
        now = stage.loop.time()
        if item.late(now):
            stage.counts["late_dropped"] += 1
        elif not self.bucket.take(item.send_at, stage.settings.max_rate):
            stage.counts["rate_dropped"] += 1
        else:
            self._play(item, now)

    # ------------------------------------------------------------------ output

    def _play(self, item: Scheduled, now: float) -> None:
        stage = self._stage
        stage.lateness.add(now - item.send_at)
        self.last_emit = item.when
        self.last_sent = item.send_at
        tagged = stage.settings.lookahead > 0.0
        if tagged and now >= item.when:  # it cannot leave before its time: plain, never a timetag in the past
            tagged = False
            stage.counts["untagged"] += 1
        stage.outputs.emit(Event(item.when, item.values, "model", item.dt * stage.settings.timescale,
                                 voice=self.label, route=self.route, timetagged=tagged))
        stage.counts["outputs"] += 1
        self.outputs += 1

    # ------------------------------------------------------------------ rescheduling and cancelling

    def reschedule(self) -> None:
        """Timing changed: every pending event's time is its cause plus its wait at the new timescale, or now;
        what a longer lookahead makes due at once leaves at `max_rate`, not in a burst."""
        stage = self._stage
        now, scale = stage.loop.time(), stage.settings.timescale
        for item in self.pending.values():
            item.cancel()
            item.when = max(now, item.start + item.dt * scale)
        pace(self.pending.values(), now, stage.settings.lookahead, stage.settings.max_rate)
        for key, item in self.pending.items():
            item.handle = stage.loop.call_at(item.send_at, self._answer_fire, key, item)
        if self.chain is not None:
            item = self.chain
            item.cancel()
            self._arm_chain(item, max(now, item.start + item.dt * scale), now)
        if self.takeover is not None:
            self._arm_takeover()

    def rearm_takeover(self) -> None:
        """The threshold changed: a takeover that is waiting waits the new time from the performer's last event."""
        if self.mode is Mode.RESPOND and self.takeover is not None:
            self._arm_takeover()

    def cancel(self) -> None:
        """Nothing it scheduled will play (its held notes: see `silence`)."""
        self._cancel_chain()
        if self.takeover is not None:
            self.takeover.cancel()
            self.takeover = None
        for item in self.pending.values():
            item.cancel()
        self.pending.clear()

    def silence(self) -> None:
        """Cancel what it scheduled and have the outputs release its notes."""
        self.cancel()
        self._stage.outputs.silence(self.label)

    def _cancel_chain(self) -> None:
        if self.chain is not None:
            self.chain.cancel()
            self.chain = None

    # ------------------------------------------------------------------ status

    def status(self, now: float) -> tuple[object, ...]:
        """Its `/status` values, in `VOICE_STATUS_KEYS` order (from, mode, temperature, inputs, outputs, idle_s)."""
        settings = self._stage.settings
        return (route_text(self.route), self.mode.value,
                settings.temperature if self.temperature is None else self.temperature,
                self.inputs, self.outputs, round(now - self.last_active, 1))


def route_text(route: Hashable | None) -> str:
    """A voice's route as `/status` shows it: `host:port` for an OSC sender, else its text."""
    if isinstance(route, tuple) and len(route) == 2 and isinstance(route[1], int):
        return f"{route[0]}:{route[1]}"
    return "" if route is None else str(route)
