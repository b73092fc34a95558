"""Where played events go: the one small protocol every output implements, and the fan-out to them.

Outputs (OSC, MIDI, the recorder) are handed to the engine when it is built, so an
answer goes straight from its voice to the transports and nothing wires the engine
from outside.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from server.event import Event

log = logging.getLogger(__name__)
LOGGED_FAILURES = 10  # a broken output is logged this often, then only counted


class Sink(Protocol):
    """An output: takes every event (performer and model) and releases what a voice holds when told."""

    def emit(self, event: Event) -> None:
        """An event to send, sound or write; model events leave at their time (or `lookahead` before it)."""

    def silence(self, voice: int | None) -> None:
        """Scheduled output was abandoned (mode change, pause, reset, swap, stop): release a voice's notes (None: all)."""


class Retunable(Protocol):
    """An output that cares how many values an event carries (optional beside `Sink`)."""

    def retune(self, values: int) -> None:
        """A model of another width now plays: events carry ``values`` values from the next one on."""


class Outputs:
    """Every sink, in order; a sink that raises is counted in `sink_errors` and never stops the music or the others."""

    def __init__(self, sinks: Sequence[Sink], counts: dict[str, int]) -> None:
        self._sinks = tuple(sinks)
        self._counts = counts
        self._retuners = tuple(sink for sink in sinks if callable(getattr(sink, "retune", None)))

    def emit(self, event: Event) -> None:
        for sink in self._sinks:
            try:
                sink.emit(event)
            except Exception:
                self._failed("output sink failed")

    def silence(self, voice: int | None) -> None:
        for sink in self._sinks:
            try:
                sink.silence(voice)
            except Exception:
                self._failed("output silencer failed")

    def retune(self, values: int) -> None:
        """Tell the outputs that have a `retune` hook that events now carry ``values`` values."""
        for sink in self._retuners:
            try:
                sink.retune(values)  # type: ignore[attr-defined]
            except Exception:
                self._failed("output retune failed")

    def _failed(self, what: str) -> None:
        self._counts["sink_errors"] += 1
        if self._counts["sink_errors"] <= LOGGED_FAILURES:
            log.exception(what)
