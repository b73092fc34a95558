"""Test doubles for the OSC layer: a recording engine and a recording socket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.live.controls import ControlError, Shown
from server.live.modes import Mode


def _voice(voice: int | None) -> tuple[int, ...]:
    """A call records its voice only when one was given, so calls without look as they always did."""
    return () if voice is None else (voice,)


class FakeControls:
    """A test double of the engine: records every call; can refuse or break on demand."""

    width = 2  # the values a performer event carries: a 2-value model's (x, y)

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.times: list[float | None] = []  # each perform's `at`, in call order
        self.routes: list[Any] = []  # each perform's `route` (the OSC sender), in call order
        self.control_routes: list[Any] = []  # each voice-taking control's `route` (the OSC sender), in call order
        self.askers: list[Any] = []  # each status call's `asker`, in call order
        self.on_error: dict[str, Callable[[str], None] | None] = {}  # load_model's callback, by model name
        self.broken = False

    def _call(self, *call: Any) -> None:
        if self.broken:
            raise RuntimeError("engine bug")
        self.calls.append(call)

    def perform(self, x: float, y: float, at: float | None = None, voice: int | None = None,
                route: Any = None) -> None:
        self._call("perform", x, y, *_voice(voice))
        self.times.append(at)
        self.routes.append(route)

    def set_temperature(self, value: float, voice: int | None = None, route: Any = None) -> None:
        self._call("set_temperature", value, *_voice(voice))
        self.control_routes.append(route)

    def set_sigma_temperature(self, value: float, voice: int | None = None, route: Any = None) -> None:
        self._call("set_sigma_temperature", value, *_voice(voice))
        self.control_routes.append(route)

    def set_lookahead(self, seconds: float) -> None:
        self._call("set_lookahead", seconds)

    def set_timescale(self, value: float) -> None:
        self._call("set_timescale", value)

    def set_threshold(self, seconds: float) -> None:
        self._call("set_threshold", seconds)

    def set_mode(self, name: str, voice: int | None = None, route: Any = None) -> None:
        self._call("set_mode", name, *_voice(voice))
        self.control_routes.append(route)

    def reset(self, voice: int | None = None, route: Any = None) -> None:
        self._call("reset", *_voice(voice))
        self.control_routes.append(route)

    def set_paused(self, paused: bool) -> None:
        self._call("set_paused", paused)

    def load_model(self, name: str, on_error: Callable[[str], None] | None = None) -> None:
        if name == "missing":
            raise ControlError("no model named 'missing'")
        if name == "leaky":  # an engine whose error text gives away where the models live
            raise ControlError("model 'leaky' not loaded: cannot read /srv/antiphon/models/leaky/model.json")
        self._call("load_model", name)
        self.on_error[name] = on_error

    def learn(self, seconds: float) -> None:
        self._call("learn", seconds)

    def stop_learning(self) -> None:
        self._call("stop_learning")

    def status(self, asker: Any = Shown.ALL) -> dict[str, Any]:
        self.askers.append(asker)
        return {"mode": Mode.ACCOMPANY, "temperature": 0.5, "paused": False, "model": "default"}


class StubTransport:
    """Stands in for the server's socket: records what is sent, or raises `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.sent: list[tuple[bytes, Any]] = []

    def is_closing(self) -> bool:
        return False

    def sendto(self, data: bytes, addr: Any) -> None:
        if self.error:
            raise self.error
        self.sent.append((data, addr))
