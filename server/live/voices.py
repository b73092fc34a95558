"""The table of voices: which voice a performer event belongs to, how many may play, and forgetting silent ones.

`VoicePolicy` says how performer events find their voice: `one` (everyone shares
voice 0, outputs carry no voice number) or `per-sender` (each sender is a voice, or an
explicit voice number picks one). Each voice plays on its own fork of the model (the
LSTM state is an explicit tensor, the interpreter is shared) with its own random
stream from the seed, so a voice plays as it would alone. What a voice does is
`server.live.voice`'s.

Ownership (per-sender): a voice belongs to the sender that opened it (its route: an
OSC host:port, a MIDI channel), whether by its first event or by naming a free
number, and it answers to that sender only: anyone else naming it, to play it or to
set its mode, temperatures or reset, is refused (`voices_denied`) and nothing changes.
So one patch drives several voices from one port by numbering them (`/gesture x y 2`,
`/gesture x y 3`), up to `max_voices_per_sender` voices per sender, which keeps one
port from taking every voice. Voice numbers are integers in [0, max_voices). The check
on the answer's path is a comparison with the voice's route: no lookup beyond the one
that finds the voice, nothing allocated.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np

from server.live.controls import ControlError
from server.live.stage import Stage
from server.live.voice import Voice
from server.model.mdn import RandomBlocks
from server.model.predictor import Predictor

DEFAULT_MAX_VOICES = 16  # one per MIDI channel
DEFAULT_MAX_VOICES_PER_SENDER = 4  # voices one sender (host:port, MIDI channel) may open: a quarter of the default
DEFAULT_VOICE_TIMEOUT = 60.0  # seconds without a performer event before a voice is forgotten
MAX_VOICE_LIMIT = 128  # the most `max_voices` may be: each voice is a model state and timers, so bounded


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
    """How voices are found, how many may play (in all, and opened by one sender), and how soon a silent one is
    forgotten."""

    policy: VoicePolicy = VoicePolicy.ONE
    limit: int = DEFAULT_MAX_VOICES
    timeout: float = DEFAULT_VOICE_TIMEOUT
    per_sender_limit: int = DEFAULT_MAX_VOICES_PER_SENDER

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_VOICE_LIMIT:
            raise ValueError(f"max_voices must be 1-{MAX_VOICE_LIMIT}, got {self.limit}")
        if not 1 <= self.per_sender_limit <= MAX_VOICE_LIMIT:
            raise ValueError(f"max_voices_per_sender must be 1-{MAX_VOICE_LIMIT}, got {self.per_sender_limit}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"voice_timeout must be a finite number of seconds > 0, got {self.timeout}")

    @property
    def per_sender(self) -> bool:
        return self.policy is VoicePolicy.PER_SENDER


def check_voice(number: int, options: VoiceOptions) -> int:
    """A voice number asked for: an integer in [0, max_voices), with voices per-sender; ControlError otherwise."""
    if not options.per_sender:
        raise ControlError("voice numbers need voices = per-sender (this server plays one voice)")
    if type(number) is not int:
        raise ControlError(f"voice must be an integer 0-{options.limit - 1}, got {number!r}")
    if not 0 <= number < options.limit:
        raise ControlError(f"voice must be 0-{options.limit - 1}, got {number}")
    return number


class VoiceTable:
    """The playing voices by number, who owns which, and each one's idle timer (per-sender).

    A voice's owner is its `route`, set when it opens and never changed after (per-sender).
    """

    def __init__(self, stage: Stage, options: VoiceOptions, predictor: Predictor, seed: int | None) -> None:
        self._stage = stage
        self.options = options
        self.predictor = predictor  # the model; voice 0 plays on it when voices are off, others fork it
        self._seed = seed
        self._voices: dict[int, Voice] = {}
        self._keys: dict[Hashable, int] = {}  # per-sender: the sender's name -> the voice it plays without a number
        self._owned: dict[Hashable, int] = {}  # per-sender: the sender's name -> how many voices it opened
        self._expiry: dict[int, asyncio.TimerHandle] = {}
        if not options.per_sender:
            self._open(0)

    def __iter__(self) -> Iterator[Voice]:
        return iter(tuple(self._voices.values()))

    def __len__(self) -> int:
        return len(self._voices)

    def get(self, number: int) -> Voice | None:
        return self._voices.get(number)

    def numbered(self) -> list[tuple[int, Voice]]:
        return sorted(self._voices.items())

    def owned_by(self, route: Hashable | None) -> list[tuple[int, Voice]]:
        """The voices `route` owns, by number."""
        return sorted((n, v) for n, v in self._voices.items() if v.route == route)

    def find(self, voice: int | None, route: Hashable | None) -> Voice:
        """The voice a performer event belongs to, opened (and started) if new; ControlError if none may be,
        or if the voice named belongs to another route."""
        options = self.options
        if not options.per_sender:
            if voice is not None:
                check_voice(voice, options)  # says why not
            v = self._voices[0]
            if route is not None:
                v.route = route
            return v
        if voice is not None:
            named = self._voices.get(check_voice(voice, options))
            if named is None:
                return self._open_or_refuse(voice, route)
            if named.route != route:
                raise self._denied(voice)
            return named
        number = self._keys.get(route)
        if number is not None:
            return self._voices[number]
        free = next((n for n in range(options.limit) if n not in self._voices), None)
        v = self._open_or_refuse(free, route)
        v.key = route
        self._keys[route] = v.number
        return v

    def existing(self, number: int, route: Hashable | None) -> Voice:
        """A playing voice by number that `route` owns; ControlError if there is none, or it is another's."""
        v = self._voices.get(check_voice(number, self.options))
        if v is None:
            raise ControlError(f"voice {number} is not playing (a voice starts with its first performer event)")
        if self.options.per_sender and v.route != route:
            raise self._denied(number)
        return v

    def targets(self, number: int | None, route: Hashable | None) -> tuple[Voice, ...]:
        """The voice asked for (if `route` owns it), or every voice when none is."""
        return tuple(self._voices.values()) if number is None else (self.existing(number, route),)

    def _denied(self, number: int) -> ControlError:
        self._stage.counts["voices_denied"] += 1
        return ControlError(f"voice {number} belongs to another sender: a voice answers only to the sender that "
                            "opened it (name one of your own voices, or none for the global setting)")

    def play_on(self, predictor: Predictor) -> None:
        """A new model for every voice (each its own fork when voices are per-sender); at another width each voice's
        random stream is rebuilt at the new width, from the seed, as a voice opened on it would start."""
        retuned = predictor.values != self.predictor.values
        self.predictor = predictor
        per_sender = self.options.per_sender
        for v in self._voices.values():
            v.play_on(predictor.fork() if per_sender else predictor, self._draws() if retuned else None)

    def stop(self) -> None:
        for v in self._voices.values():
            v.cancel()
        for timer in self._expiry.values():
            timer.cancel()
        self._expiry.clear()

    def _open(self, number: int, route: Hashable | None = None) -> Voice:
        per_sender = self.options.per_sender
        predictor = self.predictor.fork() if per_sender else self.predictor
        v = Voice(number, number if per_sender else None, predictor, self._draws(), self._stage)
        self._voices[number] = v
        if per_sender:
            v.route = route  # its owner, for good
            self._owned[route] = self._owned.get(route, 0) + 1
            loop = self._stage.loop
            self._expiry[number] = loop.call_at(loop.time() + self.options.timeout, self._expire, v)
        return v

    def _draws(self) -> RandomBlocks:
        """A voice's random stream at the model's width, from the seed, so a voice plays as it would alone."""
        return RandomBlocks(np.random.default_rng(self._seed), self.predictor.info.spec.dims)

    def _open_or_refuse(self, number: int | None, route: Hashable | None) -> Voice:
        options = self.options
        if self._owned.get(route, 0) >= options.per_sender_limit:
            self._stage.counts["voices_refused"] += 1
            raise ControlError(f"a sender may open at most {options.per_sender_limit} voices "
                               f"(max_voices_per_sender) and this one has; one is free again after "
                               f"{options.timeout:g} s of its silence")
        if number is None or len(self._voices) >= options.limit:
            self._stage.counts["voices_refused"] += 1
            raise ControlError(f"all {options.limit} voices are playing; a voice is free again after "
                               f"{options.timeout:g} s of silence")
        v = self._open(number, route)
        v.start()
        return v

    def _expire(self, v: Voice) -> None:
        """Forget a voice whose performer has been silent for the timeout (checked lazily: one timer per voice)."""
        loop = self._stage.loop
        due = v.last_active + self.options.timeout
        if loop.time() < due:
            self._expiry[v.number] = loop.call_at(due, self._expire, v)
            return
        del self._expiry[v.number]
        v.silence()
        del self._voices[v.number]
        if self._keys.get(v.route) == v.number:
            del self._keys[v.route]
        left = self._owned.pop(v.route, 1) - 1
        if left > 0:
            self._owned[v.route] = left
        self._stage.streams.forget(v.number)
        self._stage.counts["voices_expired"] += 1
