"""What the transports may ask of the engine: the narrow interface between OSC/MIDI and the model loop.

Transports call these methods; they never touch the model. The engine implements them.
Methods raise `ControlError` with a human-readable reason when a request is refused
(e.g. an unknown mode or a model that fails to load); the transport turns that into
an `/error` reply and the engine keeps its previous state.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from enum import Enum
from typing import Any, Protocol


class ControlError(ValueError):
    """A control request was refused; the message says why and is safe to send to a client."""


class Shown(Enum):
    """Whose voices `Controls.status` lists, when not an asker's own: every voice's, or none."""

    ALL = "all"  # in-process callers, and `/status all` asked from loopback
    NONE = "none"  # the pushed status stream: its subscribers may be anywhere


class Controls(Protocol):
    @property
    def width(self) -> int:
        """N, how many values a performer event carries: the playing model's (1 to 16; 2 is (x, y))."""

    def perform(self, *values: float, at: float | None = None, voice: int | None = None,
                route: Hashable | None = None) -> None:
        """A performer event of `width` values in [0, 1] (a position (x, y) at N = 2); another count raises
        ControlError naming the count the model wants (a `/model` swap may change it).

        `at` is when it arrived, on the loop's clock (`time.monotonic`): the kernel's
        receive stamp or the MIDI callback's, so a stalled loop still sees the true
        spacing of queued events. None means now. `voice` is a voice number the
        performer asked for; `route` names the performer to the transport that brought
        it (an OSC sender `(host, port)`, a MIDI channel as text): with voices
        per-sender it finds the voice when no number is given, and the voice's output
        goes back there.

        Ownership (voices per-sender): a voice belongs to the route that opened it, by
        its first event or by number, and answers to nobody else; naming another
        route's voice raises ControlError and changes nothing. A route opens at most
        `max_voices_per_sender` voices. `route` None is an identity too (an in-process
        caller), never a pass.
        """

    def set_temperature(self, value: float, voice: int | None = None, route: Hashable | None = None) -> None:
        """The global temperature, or (with a voice) that voice's own, if `route` owns it."""

    def set_sigma_temperature(self, value: float, voice: int | None = None, route: Hashable | None = None) -> None: ...

    def set_timescale(self, value: float) -> None: ...

    def set_lookahead(self, seconds: float) -> None: ...

    def set_threshold(self, seconds: float) -> None: ...

    def set_mode(self, name: str, voice: int | None = None, route: Hashable | None = None) -> None: ...

    def reset(self, voice: int | None = None, route: Hashable | None = None) -> None:
        """Zero the RNN state (of one voice `route` owns, or of all) and cancel what it scheduled."""

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

    def status(self, asker: Hashable | None = Shown.ALL) -> dict[str, Any]:
        """Key/value pairs for `/status` (str, int or float values).

        With voices per-sender, the per-voice keys (`voice<n>_*`) are those of the
        voices `asker` (a route, as `perform` takes) owns; `Shown.ALL` lists every
        voice's, `Shown.NONE` none. The rest, with the count of voices, is the same for all.
        """
