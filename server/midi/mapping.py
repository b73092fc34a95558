"""How MIDI messages become performer positions and model positions become notes.

Pure functions and one small stateful mapper, with no port or clock, so every mapping
decision is testable with plain `mido.Message` objects (anything with mido's message
attributes works: nothing here imports mido).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

INPUT_MAPS = ("notes", "cc")
DEFAULT_CC_X = 1  # modulation wheel: present on nearly every keyboard
DEFAULT_CC_Y = 2  # breath controller; any free CC works, see --midi-cc-y
MAX_AUTO_DURATION = 0.5  # seconds; the automatic note length never exceeds this
MIN_DURATION = 0.01  # seconds; shorter notes are inaudible on most synths

Position = tuple[float, float]


class InputMap(Protocol):
    """Turns incoming messages into performer positions."""

    def wants(self, msg: Any) -> bool:
        """Stateless and cheap: may this message matter? Called on the MIDI thread."""

    def __call__(self, msg: Any) -> Position | None:
        """The position this message plays, or None. Called on the event loop only."""


def _on_channel(msg: Any, channel: int | None) -> bool:
    return channel is None or msg.channel == channel


class NoteInput:
    """note_on -> (pitch/127, velocity/127); velocity 0 means note-off and is ignored."""

    def __init__(self, channel: int | None = None) -> None:
        self.channel = channel

    def wants(self, msg: Any) -> bool:
        return msg.type == "note_on" and msg.velocity > 0 and _on_channel(msg, self.channel)

    def __call__(self, msg: Any) -> Position | None:
        if not self.wants(msg):
            return None
        return msg.note / 127.0, msg.velocity / 127.0


class ControlInput:
    """Two control changes -> (x, y).

    Keeps the last value of each controller (a controller not yet moved counts as 0)
    and plays a position whenever either value changes; a controller that resends
    the value it already had does not play.
    """

    def __init__(self, cc_x: int = DEFAULT_CC_X, cc_y: int = DEFAULT_CC_Y, channel: int | None = None) -> None:
        if cc_x == cc_y:
            raise ValueError(f"the x and y controllers must differ, both are CC {cc_x}")
        self.cc_x, self.cc_y, self.channel = cc_x, cc_y, channel
        self._values: dict[int, int | None] = {cc_x: None, cc_y: None}

    def wants(self, msg: Any) -> bool:
        return msg.type == "control_change" and msg.control in self._values and _on_channel(msg, self.channel)

    def __call__(self, msg: Any) -> Position | None:
        if not self.wants(msg) or self._values[msg.control] == msg.value:
            return None
        self._values[msg.control] = msg.value
        x, y = self._values[self.cc_x], self._values[self.cc_y]
        return (x or 0) / 127.0, (y or 0) / 127.0


def make_input_map(kind: str, cc_x: int = DEFAULT_CC_X, cc_y: int = DEFAULT_CC_Y, channel: int | None = None) -> InputMap:
    """The input mapping named by `midi_input_map`; ``channel`` is 0-15, None for any."""
    if kind == "notes":
        return NoteInput(channel)
    if kind == "cc":
        return ControlInput(cc_x, cc_y, channel)
    raise ValueError(f"unknown MIDI input map {kind!r}; use one of {', '.join(INPUT_MAPS)}")


def note_for(x: float, y: float) -> tuple[int, int]:
    """A model position -> (pitch, velocity); velocity is at least 1 so it is never a note-off."""
    pitch = min(max(round(x * 127), 0), 127)
    velocity = min(max(round(y * 127), 1), 127)
    return pitch, velocity


def note_duration(gap: float | None, fixed: float | None = None) -> float:
    """How long an output note sounds.

    ``fixed`` (the `midi_note_duration` setting) wins when set; otherwise the smaller of
    the predicted dt (``gap``: time since the previous model note, None for the first)
    and `MAX_AUTO_DURATION`, never below `MIN_DURATION`.
    """
    if fixed is not None:
        return fixed
    if gap is None or not math.isfinite(gap):
        return MAX_AUTO_DURATION
    return min(max(gap, MIN_DURATION), MAX_AUTO_DURATION)
