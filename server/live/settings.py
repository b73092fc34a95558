"""The live controls' values and what each accepts: the one home of each rule the OSC handlers, monitor and engine apply."""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.live.controls import ControlError
from server.live.modes import Mode
from server.model.spec import ModelInfo

DEFAULT_MAX_RATE = 200.0  # model events per second per voice: faster than any playing, slow enough to cost little
MAX_LOOKAHEAD = 2.0  # seconds


@dataclass
class Settings:
    """Live-controllable parameters (all changeable over OSC but `max_rate`); a voice may override some."""

    mode: Mode = Mode.ACCOMPANY
    temperature: float = 1.0
    sigma_temperature: float | None = None  # None: the playing model's own (`ModelInfo.sigma_temperature`)
    timescale: float = 1.0
    threshold: float = 1.5
    paused: bool = False
    max_rate: float = DEFAULT_MAX_RATE
    lookahead: float = 0.0


def sigma_temperature(settings: Settings, info: ModelInfo) -> float:
    """The global scale temperature: the one set (flag, config, `/sigma_temperature`), else the model's own."""
    return info.sigma_temperature if settings.sigma_temperature is None else settings.sigma_temperature


def at_least(value: float, name: str, minimum: float) -> float:
    """``value`` as a float if it is finite and >= ``minimum``; else ControlError saying so."""
    value = _finite(value, name)
    if not value >= minimum:
        raise ControlError(f"{name} must be >= {minimum:g}, got {value:g}")
    return value


def timescale(value: float) -> float:
    """A factor on every predicted wait: > 0, or time would stop."""
    value = _finite(value, "timescale")
    if not value > 0.0:
        raise ControlError(f"timescale must be > 0, got {value:g}")
    return value


def lookahead(seconds: float) -> float:
    """How early a model event may leave: 0 to `MAX_LOOKAHEAD` seconds."""
    seconds = at_least(seconds, "lookahead", 0.0)
    if seconds > MAX_LOOKAHEAD:
        raise ControlError(f"lookahead must be at most {MAX_LOOKAHEAD:g} s, got {seconds:g}")
    return seconds


def _finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ControlError(f"{name} must be a finite number, got {value:g}")
    return value
