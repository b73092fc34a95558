"""Voices: one musical memory per performer, so an ensemble on one server never scrambles its partners.

A voice is everything the engine keeps about one conversation: the RNN state (its own
`Predictor`, sharing the model's one interpreter: the LSTM state is an explicit
tensor), its random stream, its dt clock, what it has scheduled, its mode timers and
its overrides of the global controls. `VoicePolicy` says how performer events find
their voice: `one` (everyone shares voice 0, today's behaviour) or `per-sender` (each
sender is a voice, or an explicit voice number picks one). The table of voices and
who maps to which lives here; what a voice *does* is the engine's.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum

from server.live.controls import ControlError
from server.live.modes import Mode
from server.model.mdn import RandomBlocks
from server.model.predictor import Predictor

DEFAULT_MAX_VOICES = 16  # one per MIDI channel
DEFAULT_VOICE_TIMEOUT = 60.0  # seconds without a performer event before a voice is forgotten
RATE_BURST = 8.0  # answers that may come closer than 1/max_rate (a chord), before the rate holds


class VoicePolicy(str, Enum):
    ONE = "one"
    PER_SENDER = "per-sender"


VOICE_POLICIES: dict[str, str] = {
    VoicePolicy.ONE.value: "every performer shares one voice: today's behaviour, outputs carry no voice number",
    VoicePolicy.PER_SENDER.value: "each sender (OSC host:port, MIDI channel) is a voice, or a voice argument picks "
                                  "one; outputs carry the voice number",
}


def parse_voice_policy(name: str) -> VoicePolicy:
    try:
        return VoicePolicy(str(name).strip().lower())
    except ValueError:
        raise ValueError(f"unknown voices setting {name!r}; expected one of {', '.join(VOICE_POLICIES)}") from None


@dataclass(frozen=True)
class VoiceOptions:
    """How voices are found, how many may play, and how soon a silent one is forgotten."""

    policy: VoicePolicy = VoicePolicy.ONE
    limit: int = DEFAULT_MAX_VOICES
    timeout: float = DEFAULT_VOICE_TIMEOUT

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= 128:
            raise ValueError(f"max_voices must be 1-128, got {self.limit}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"voice_timeout must be a finite number of seconds > 0, got {self.timeout}")

    @property
    def per_sender(self) -> bool:
        return self.policy is VoicePolicy.PER_SENDER


class Scheduled:
    """One model event waiting: its cause's time (start), the model's wait (dt), where (x, y).

    `when` is the event's time (what it is timetagged with); `send_at` is when it may
    leave: `lookahead` earlier, but never before it was computed.
    """

    __slots__ = ("start", "dt", "x", "y", "when", "send_at", "handle")

    def __init__(self, start: float, dt: float, x: float, y: float) -> None:
        self.start, self.dt, self.x, self.y = start, dt, x, y
        self.when = self.send_at = start
        self.handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class Voice:
    """One conversation's state (see the module doc); the engine drives it."""

    def __init__(self, number: int, predictor: Predictor, draws: RandomBlocks, now: float) -> None:
        self.number = number
        self.predictor = predictor
        self.draws = draws
        self.pending: dict[int, Scheduled] = {}  # accompaniment answers, insertion-ordered: oldest first
        self.chain: Scheduled | None = None  # the one self-playing event (generate, respond)
        self.takeover: asyncio.TimerHandle | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.last_performer = now  # loop time of its performer's last event
        self.last_active = now  # loop time it last heard its performer (for the idle timeout)
        self.last_emit = -math.inf  # scheduled time of its last model event
        self.tokens, self.tokens_at = RATE_BURST, -math.inf  # its answers' rate bucket, full at start
        self.heard_performer = False
        self.fresh = True  # the next performer event opens a performance (dt 0)
        self.surprise: float | None = None  # the smoothed running surprise
        self.key: Hashable | None = None  # the sender that found it (per-sender), None for a numbered voice
        self.route: Hashable | None = None  # where its output goes: the transport's name for its performer
        # Overrides of the global controls; None follows the global value.
        self.mode: Mode | None = None
        self.temperature: float | None = None
        self.sigma_temperature: float | None = None
        self.inputs = 0
        self.outputs = 0

    def pending_count(self) -> int:
        return len(self.pending) + (self.chain is not None)


def route_text(route: Hashable | None) -> str:
    """A voice's route as `/status` shows it: `host:port` for an OSC sender, else its text."""
    if isinstance(route, tuple) and len(route) == 2 and isinstance(route[1], int):
        return f"{route[0]}:{route[1]}"
    return "" if route is None else str(route)


def voice_number(value: int) -> int | None:
    """An OSC voice argument: a negative number (the default) means none given."""
    return None if value < 0 else value


def check_voice(number: int, options: VoiceOptions) -> int:
    if not options.per_sender:
        raise ControlError("voice numbers need voices = per-sender (this server plays one voice)")
    if not 0 <= number < options.limit:
        raise ControlError(f"voice must be 0-{options.limit - 1}, got {number}")
    return number
