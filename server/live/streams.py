"""What the model thinks, for displays: the `mixture` and `surprise` maths, off the answer's path and within a rate.

A stream is computed only while its `StreamSink` wants it (someone subscribes), at
most `STREAM_RATE` times a second on average after a burst of as many (a token bucket
per stream: a quick run of notes is seen whole, a flood is thinned). The maths runs at
the loop's next turn, from parameters captured at the step, so an answer due now and
the next performer event never wait for a display; the figures are the same as if
computed inline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol

import numpy as np

from server.model.predictor import Predictor

log = logging.getLogger(__name__)

STREAM_RATE = 30.0  # per second, per stream (and per destination): what a display drawing 30 frames a second shows
SURPRISE_SMOOTHING = 0.1  # weight of each new event in the running surprise (about the last ten events)


class StreamSink(Protocol):
    """Where the streams go (the OSC subscriptions): says whether anyone listens, and takes each value."""

    def wants(self, stream: str) -> bool: ...

    def mixture(self, values: list[float], voice: int | None) -> None: ...

    def surprise(self, nll: float, smoothed: float, voice: int | None) -> None: ...


class NoStreams:
    """Nobody listens: the streams cost one call each."""

    def wants(self, stream: str) -> bool:
        return False

    def mixture(self, values: list[float], voice: int | None) -> None:
        pass

    def surprise(self, nll: float, smoothed: float, voice: int | None) -> None:
        pass


class StreamMaths:
    """Computes the streams for the voices: a rate bucket per stream, a queue for the loop's next turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: StreamSink, counts: dict[str, int],
                 rate: float = STREAM_RATE, burst: float = STREAM_RATE) -> None:
        self._loop, self._sink, self._counts = loop, sink, counts
        self._rate, self._burst = rate, burst
        self._tokens: dict[str, tuple[float, float]] = {}  # stream -> (tokens, loop time)
        self._smoothed: dict[int, float] = {}  # voice number -> its running surprise
        self._queue: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None

    def mixture(self, number: int, label: int | None, predictor: Predictor, temperature: float,
                sigma_temperature: float) -> None:
        """A voice is about to sample: its predictive distribution, after the temperatures, to `mixture`."""
        if self._sink.wants("mixture") and self._allow("mixture"):
            self._later(partial(self._tell_mixture, label, predictor, predictor.params, temperature, sigma_temperature))

    def surprise(self, number: int, label: int | None, predictor: Predictor, dt: float,
                 values: tuple[float, ...]) -> None:
        """A voice is about to observe a performer event: how unlikely it was, and the voice's running figure."""
        if self._sink.wants("surprise") and self._allow("surprise"):
            self._later(partial(self._tell_surprise, number, label, predictor, predictor.params, dt, values))

    def forget(self, number: int) -> None:
        """A voice starts afresh (reset, a new model, forgotten): its running surprise starts again."""
        self._smoothed.pop(number, None)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._queue = None, []

    def _allow(self, stream: str) -> bool:
        """A token bucket per stream (rate `rate`, depth `burst`) on the loop's clock."""
        now = self._loop.time()
        tokens, then = self._tokens.get(stream, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        if tokens < 1.0:
            self._tokens[stream] = (tokens, now)
            return False
        self._tokens[stream] = (tokens - 1.0, now)
        return True

    def _later(self, work: Callable[[], None]) -> None:
        """Queue work for the loop's next turn, behind what is already due."""
        self._queue.append(work)
        if self._timer is None:
            self._timer = self._loop.call_at(self._loop.time(), self._run)

    def _run(self) -> None:
        self._timer = None
        queue, self._queue = self._queue, []
        for work in queue:
            try:
                work()
            except Exception:  # a display must never stop the music
                self._counts["sink_errors"] += 1
                log.exception("stream computation failed")

    def _tell_surprise(self, number: int, label: int | None, predictor: Predictor, params: np.ndarray, dt: float,
                       values: tuple[float, ...]) -> None:
        nll = predictor.surprise(dt, *values, params=params)
        last = self._smoothed.get(number)
        smoothed = nll if last is None else last + SURPRISE_SMOOTHING * (nll - last)
        self._smoothed[number] = smoothed
        self._sink.surprise(nll, smoothed, label)

    def _tell_mixture(self, label: int | None, predictor: Predictor, params: np.ndarray, temperature: float,
                      sigma_temperature: float) -> None:
        self._sink.mixture(predictor.mixture(temperature, sigma_temperature, params), label)
