"""Validation of the browser's control messages before they become OSC to the server.

A message is JSON `{"address": "/temperature", "args": [1.0]}`; only the addresses below
are accepted, with typed arguments in range. Anything else raises `ControlError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from server.model.files import available_models

MODES = ("respond", "accompany", "generate", "listen")
TEMPERATURE_MAX = 10.0
TIMESCALE_RANGE = (0.001, 100.0)
LEARN_SECONDS_RANGE = (1.0, 3600.0)

OscArgs = list[float | int | str]


class ControlError(ValueError):
    """A browser message that must not reach the server."""


def _number(value: Any, low: float, high: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ControlError(f"{name} must be a number")
    v = float(value)
    if not math.isfinite(v) or not low <= v <= high:
        raise ControlError(f"{name} must be in [{low}, {high}]")
    return v


def _no_args(args: list[Any], _models: Path) -> OscArgs:
    if args:
        raise ControlError("takes no arguments")
    return []


def _one(args: list[Any]) -> Any:
    if len(args) != 1:
        raise ControlError("takes exactly one argument")
    return args[0]


def _mode(args: list[Any], _models: Path) -> OscArgs:
    value = _one(args)
    if value not in MODES:
        raise ControlError(f"mode must be one of {', '.join(MODES)}")
    return [value]


def _temperature(args: list[Any], _models: Path) -> OscArgs:
    return [_number(_one(args), 0.0, TEMPERATURE_MAX, "temperature")]


def _timescale(args: list[Any], _models: Path) -> OscArgs:
    return [_number(_one(args), *TIMESCALE_RANGE, "timescale")]


def _pause(args: list[Any], _models: Path) -> OscArgs:
    value = _one(args)
    if value not in (0, 1) or isinstance(value, float) and not value.is_integer():
        raise ControlError("pause must be 0 or 1")
    return [int(value)]


def _model(args: list[Any], models: Path) -> OscArgs:
    value = _one(args)
    if not isinstance(value, str) or value not in available_models(models):
        raise ControlError("unknown model")
    return [value]


def _learn(args: list[Any], _models: Path) -> OscArgs:
    if not args:
        return []
    return [_number(_one(args), *LEARN_SECONDS_RANGE, "seconds")]


RULES: dict[str, Callable[[list[Any], Path], OscArgs]] = {
    "/mode": _mode,
    "/temperature": _temperature,
    "/sigma_temperature": _temperature,
    "/timescale": _timescale,
    "/pause": _pause,
    "/reset": _no_args,
    "/model": _model,
    "/learn": _learn,
    "/learn/stop": _no_args,
}


def validate(message: Any, models_dir: Path) -> tuple[str, OscArgs]:
    """The (address, args) to send for one decoded browser message, or ControlError."""
    if not isinstance(message, dict):
        raise ControlError("a control is a JSON object")
    address, args = message.get("address"), message.get("args", [])
    if not isinstance(address, str) or address not in RULES:
        raise ControlError("unknown address")
    if not isinstance(args, list) or len(args) > 1:
        raise ControlError("args must be a list of at most one value")
    return address, RULES[address](args, models_dir)
