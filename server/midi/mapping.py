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
MAX_CCS = 16  # `midi_cc`: a controller per value, and a model has at most 16 (server.model.dims)

Position = tuple[float, ...]  # a performer event's values (notes: pitch and velocity over 127)


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


def check_ccs(ccs: tuple[int, ...]) -> tuple[int, ...]:
    """A list of control change numbers, one per value: 1 to `MAX_CCS` distinct numbers 0-127, else ValueError."""
    if not 1 <= len(ccs) <= MAX_CCS:
        raise ValueError(f"give 1 to {MAX_CCS} control change numbers (one per value), got {len(ccs)}")
    bad = [cc for cc in ccs if type(cc) is not int or not 0 <= cc <= 127]
    if bad:
        raise ValueError(f"control change numbers are 0-127, got {bad[0]!r}")
    if len(set(ccs)) != len(ccs):
        raise ValueError(f"each value needs its own controller; {ccs} repeats one")
    return ccs


class ControlInput:
    """Control changes, one per value -> the event (cc_1/127, .., cc_N/127): a bank of knobs or faders.

    Keeps the last value of each controller (a controller not yet moved counts as 0)
    and plays an event whenever one value changes; a controller that resends the value
    it already had does not play.
    """

    def __init__(self, ccs: tuple[int, ...] = (DEFAULT_CC_X, DEFAULT_CC_Y), channel: int | None = None) -> None:
        if len(ccs) == 2 and ccs[0] == ccs[1]:
            raise ValueError(f"the x and y controllers must differ, both are CC {ccs[0]}")
        self.ccs, self.channel = check_ccs(tuple(ccs)), channel
        self._index = {cc: i for i, cc in enumerate(self.ccs)}
        self._values = [0] * len(self.ccs)
        self._moved = [False] * len(self.ccs)

    def wants(self, msg: Any) -> bool:
        return msg.type == "control_change" and msg.control in self._index and _on_channel(msg, self.channel)

    def __call__(self, msg: Any) -> Position | None:
        if not self.wants(msg):
            return None
        i = self._index[msg.control]
        if self._moved[i] and self._values[i] == msg.value:
            return None
        self._values[i], self._moved[i] = msg.value, True
        return tuple(v / 127.0 for v in self._values)


def make_input_map(kind: str, cc_x: int = DEFAULT_CC_X, cc_y: int = DEFAULT_CC_Y, channel: int | None = None,
                   ccs: tuple[int, ...] = ()) -> InputMap:
    """The input mapping named by `midi_input_map` (``ccs``, `midi_cc`, wins: a controller per value);
    ``channel`` is 0-15, None for any."""
    if ccs:
        return ControlInput(ccs, channel)
    if kind == "notes":
        return NoteInput(channel)
    if kind == "cc":
        return ControlInput((cc_x, cc_y), channel)
    raise ValueError(f"unknown MIDI input map {kind!r}; use one of {', '.join(INPUT_MAPS)}")


def controls_for(values: tuple[float, ...]) -> list[int]:
    """A model event's values -> control change values 0-127 (`midi_cc` output), one per value."""
    return [min(max(round(v * 127), 0), 127) for v in values]


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
