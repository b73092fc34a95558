"""The browser's controls, checked by the server's own OSC handlers before they become OSC.

A control is JSON `{"address": "/temperature", "args": [1.0]}`. Only the addresses
the page offers (`CONTROLS`) are taken. Each runs through its handler in the server's
address table (`server.osc.namespace.TABLE`), whose signature converts the arguments
as the OSC server does (a JSON `true` is a boolean, never a number), and whose checks
raise the server's `ControlError` with the server's reason (the learn budget is
`server.live.learning`'s, the modes `server.live.modes`'); the handler then calls a
`Controls` that only checks what the engine would refuse at once (a model that is not
there) and does nothing else. So a rule lives in one place, and the server checks
again whatever the monitor sends, answering `/error`, which the page shows.

The one check of the monitor's own is what OSC can carry: an integer beyond 64 bits
has no OSC type, whether the browser sent it as one or as a float the server's
conversion makes an integer (a voice number of 1e300).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from server.live.controls import ControlError
from server.model.files import all_models
from server.osc.namespace import TABLE, Request

CONTROLS = frozenset({"/mode", "/temperature", "/sigma_temperature", "/timescale", "/pause", "/reset", "/model",
                      "/learn", "/learn/stop"})
INT64 = (-(1 << 63), (1 << 63) - 1)  # OSC `h`, the widest integer OSC has

OscArgs = list[float | int | str]


class Checks:
    """The engine's side of the monitor's controls: what it would refuse at once, and nothing else."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir

    def set_temperature(self, value: float, voice: int | None = None, route: object = None) -> None:
        pass

    def set_sigma_temperature(self, value: float, voice: int | None = None, route: object = None) -> None:
        pass

    def set_timescale(self, value: float) -> None:
        pass

    def set_mode(self, name: str, voice: int | None = None, route: object = None) -> None:
        pass

    def reset(self, voice: int | None = None, route: object = None) -> None:
        pass

    def set_paused(self, paused: bool) -> None:
        pass

    def load_model(self, name: str, on_error: Callable[[str], None] | None = None) -> None:
        if name not in all_models(self.models_dir):
            raise ControlError(f"no model {name!r} in the models folder")

    def learn(self, seconds: float) -> None:
        pass

    def stop_learning(self) -> None:
        pass


def _request(checks: Checks) -> Request:
    """A request context for the handlers of `CONTROLS`, which use only its controls (and /model its sender)."""
    return Request(controls=cast(Any, checks), output=cast(Any, None), stats=cast(Any, None), sender=("monitor", 0),
                   counters=dict, at=0.0, reply_error=lambda path, reason, to: None)


def validate(message: Any, models_dir: Path) -> tuple[str, OscArgs]:
    """The (address, OSC args) to send for one decoded browser message, or the server's ControlError."""
    if not isinstance(message, dict):
        raise ControlError("a control is a JSON object")
    address, args = message.get("address"), message.get("args", [])
    if not isinstance(address, str) or address not in CONTROLS:
        raise ControlError(f"unknown control; expected one of {', '.join(sorted(CONTROLS))}")
    if not isinstance(args, list):
        raise ControlError("args must be a list")
    if any(type(a) is int and not INT64[0] <= a <= INT64[1] for a in args):
        raise ControlError("integers must fit in 64 bits (OSC has no wider number)")
    handler = TABLE.lookup[address]
    handler.invoke(_request(Checks(models_dir)), args)  # the server's conversion and checks; raises ControlError
    out = [param.convert(arg) for param, arg in zip(handler.params, args)]
    if any(type(a) is int and not INT64[0] <= a <= INT64[1] for a in out):  # 1e300 where an int goes is one
        raise ControlError("integers must fit in 64 bits (OSC has no wider number)")
    return address, out
