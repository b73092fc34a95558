"""What the transports may ask of the engine: the narrow interface between OSC/MIDI and the model loop.

Transports call these methods; they never touch the model. The engine implements them.
Methods raise `ControlError` with a human-readable reason when a request is refused
(e.g. an unknown mode or a model that fails to load); the transport turns that into
an `/error` reply and the engine keeps its previous state.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol


class ControlError(ValueError):
    """A control request was refused; the message says why and is safe to send to a client."""


class Controls(Protocol):
    def perform(self, x: float, y: float, at: float | None = None, voice: int | None = None,
                route: Hashable | None = None) -> None:
        """A performer event at position (x, y) in [0, 1]^2.

        `at` is when it arrived, on the loop's clock (`time.monotonic`): the kernel's
        receive stamp or the MIDI callback's, so a stalled loop still sees the true
        spacing of queued events. None means now. `voice` is a voice number the
        performer asked for; `route` names the performer to the transport that brought
        it (an OSC sender `(host, port)`, a MIDI channel as text): with voices
        per-sender it finds the voice when no number is given, and the voice's output
        goes back there.
        """

    def set_temperature(self, value: float, voice: int | None = None) -> None: ...

    def set_sigma_temperature(self, value: float, voice: int | None = None) -> None: ...

    def set_timescale(self, value: float) -> None: ...

    def set_lookahead(self, seconds: float) -> None: ...

    def set_threshold(self, seconds: float) -> None: ...

    def set_mode(self, name: str, voice: int | None = None) -> None: ...

    def reset(self, voice: int | None = None) -> None:
        """Zero the RNN state (of one voice, or of all) and cancel what it scheduled."""

    def set_paused(self, paused: bool) -> None: ...

    def load_model(self, name: str, on_error: Callable[[str], None] | None = None) -> None:
        """Start swapping in models/<name>; the old model plays until the new one is ready.

        A bad name raises ControlError at once. The load itself runs off the loop; if
        it fails, the old model stays and `on_error(reason)` is called on the loop
        (the reason names the model, never a path). Of two loads racing, the one
        asked for last wins.
        """

    def learn(self, seconds: float) -> None:
        """Start fine-tuning the playing model on this session's performer events (ControlError if it cannot)."""

    def stop_learning(self) -> None:
        """End a running fine-tune early, keeping the best so far (ControlError if none runs)."""

    def status(self) -> dict[str, Any]:
        """Key/value pairs for `/status` (str, int or float values)."""
