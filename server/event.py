"""The one value that flows out of the engine: a timed event of N values from a performer or the model, for every output."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal, NamedTuple

Source = Literal["performer", "model"]


class Event(NamedTuple):
    """N values in [0, 1] (the playing model's N, 1 to 16) at a monotonic time (seconds, `time.monotonic()` clock).

    Monotonic so scheduling never jumps with the wall clock; the recorder converts to
    Unix time when it writes a log. Immutable, and a named tuple rather than a frozen
    dataclass because one is built per event on the answer's path (0.4 µs, not 1.1 µs).
    """

    time: float
    values: tuple[float, ...]
    source: Source
    dt: float | None = None  # for model events: the predicted wait before it (seconds, after /timescale)
    voice: int | None = None  # its voice's number when voices are on (`per-sender`), else None
    route: Hashable | None = None  # the transport's name for the voice's performer (an OSC sender, a MIDI channel)
    timetagged: bool = False  # a model event handed over `lookahead` early: send it timetagged with its time

    @property
    def x(self) -> float:
        """The first value (a touch's x, a note's pitch / 127)."""
        return self.values[0]

    @property
    def y(self) -> float:
        """The second value (N >= 2: a touch's y, a note's velocity / 127)."""
        return self.values[1]
