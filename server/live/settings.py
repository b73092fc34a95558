"""The live controls' values and what each accepts: one place for the limits the OSC docs, config and engine quote."""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.live.controls import ControlError
from server.live.modes import Mode

DEFAULT_MAX_RATE = 200.0  # model events per second per voice: faster than any playing, slow enough to cost little
MAX_LOOKAHEAD = 2.0  # seconds


@dataclass
class Settings:
    """Live-controllable parameters (all changeable over OSC but `max_rate`); a voice may override some."""

    mode: Mode = Mode.ACCOMPANY
    temperature: float = 1.0
    sigma_temperature: float = 1.0
    timescale: float = 1.0
    threshold: float = 1.5
    paused: bool = False
    max_rate: float = DEFAULT_MAX_RATE
    lookahead: float = 0.0


def at_least(value: float, name: str, minimum: float) -> float:
    """``value`` as a float if it is finite and >= ``minimum``; else ControlError saying so."""
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ControlError(f"{name} must be a finite number >= {minimum:g}")
    return value


def timescale(value: float) -> float:
    value = at_least(value, "timescale", 0.0)
    if value <= 0.0:
        raise ControlError("timescale must be > 0")
    return value


def lookahead(seconds: float) -> float:
    seconds = at_least(seconds, "lookahead", 0.0)
    if seconds > MAX_LOOKAHEAD:
        raise ControlError(f"lookahead must be at most {MAX_LOOKAHEAD:g} s")
    return seconds
