"""The interaction modes: the single list that the CLI, OSC handlers, docs and tests read."""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """How the model takes part in the performance."""

    RESPOND = "respond"
    ACCOMPANY = "accompany"
    GENERATE = "generate"
    LISTEN = "listen"

    @property
    def description(self) -> str:
        return MODE_DESCRIPTIONS[self]


MODE_DESCRIPTIONS: dict[Mode, str] = {
    Mode.RESPOND: "call and response: after `threshold` s of performer silence the model continues the phrase",
    Mode.ACCOMPANY: "every performer event is answered by one model event after the predicted dt",
    Mode.GENERATE: "the model plays on its own, fed its own output",
    Mode.LISTEN: "no output; performer events are logged and condition the model",
}

MODE_NAMES: tuple[str, ...] = tuple(m.value for m in Mode)


def parse_mode(name: str) -> Mode:
    """Return the Mode called `name`, or raise ValueError listing the valid names."""
    try:
        return Mode(name)
    except ValueError:
        raise ValueError(f"unknown mode {name!r}; expected one of {', '.join(MODE_NAMES)}") from None
