"""Live MIDI transport: a keyboard or controller plays the engine, the model plays a synth.

Input messages arrive on the MIDI backend's own thread; only the few that can matter
are handed to the event loop (`call_soon_threadsafe`), so a 24-ppq clock never wakes
the loop. With voices `per-sender` each input channel c is its own performer (route
`midi channel c`, hence its own voice, with its own controller values for the `cc`
map); with voices `one` every channel plays the one voice, as before.

With `midi_cc` (a control change number per value) a bank of knobs is a performance
of any width: each CC plays one value in, and each model event sends one CC per value
out (at its time, on its voice's channel) instead of a note. Notes stay (pitch,
velocity), so they play a 2-value model; an event the mapping cannot carry (a model of
another width after a swap) is refused and counted (`midi_in_refused`,
`midi_out_unplayable`), never guessed at.

Output is an engine sink: every model event becomes a `note_on` whose `note_off` is
scheduled with `loop.call_at`. An event of voice n plays on channel n+1 (n mod 16:
voice 16 shares channel 1 with voice 0); an event with no voice (voices `one`) plays
on `midi_channel`. MIDI has no timetags, so an event handed over early (`lookahead`)
waits here and sounds exactly at its time, never before. Held notes are kept per
channel and pitch, and every note turned on is turned off exactly once: at its end,
when the engine abandons a voice's output (the silencer, which also cancels that
voice's notes still waiting for their time), and at close, which also sends All Notes
Off on every channel it played. A port that vanishes is reported once and reopened by
a loop timer; OSC never notices.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Literal

import mido

from server.event import Event
from server.live.controls import ControlError
from server.live.voices import VoicePolicy
from server.midi.mapping import InputMap, controls_for, make_input_map, note_duration, note_for
from server.midi.ports import (
    VIRTUAL_IN,
    VIRTUAL_OUT,
    MidiError,
    PortBackend,
    match_port,
    open_backend,
    virtual_supported,
)

if TYPE_CHECKING:
    from server.config import RunConfig

log = logging.getLogger(__name__)

RETRY_SECONDS = 2.0  # how often a missing port is looked for (and a present one checked)
ECHO_WINDOW = 0.02  # seconds: an incoming note equal to one sent this recently is an echo
ALL_NOTES_OFF = 123
CHANNELS = 16

# engine.perform: (*values, at=arrival time on the loop's clock), and route= when each channel is a voice
Perform = Callable[..., None]


class EchoGuard:
    """The last note sent on each channel and pitch, so a synth echoing its input is not heard as the performer.

    An echo keeps its channel, so a keyboard on another channel than the output is never
    mistaken for one, even when it plays exactly the note the model just played.
    """

    def __init__(self, window: float = ECHO_WINDOW) -> None:
        self.window = window
        self._sent: dict[tuple[int, int], tuple[int, float]] = {}  # (channel, pitch) -> (velocity, loop time)

    def sent(self, channel: int, note: int, velocity: int, at: float) -> None:
        self._sent[channel, note] = (velocity, at)

    def is_echo(self, channel: int, note: int, velocity: int, at: float) -> bool:
        last = self._sent.get((channel, note))
        return last is not None and last[0] == velocity and abs(at - last[1]) <= self.window


class KeptPort:
    """One port kept open by name: a vanished port is reported once and reopened when it returns.

    A loop timer (not a thread, not a busy loop) checks every ``retry`` seconds that the
    port is still listed, and while it is missing tries to open it again by its pattern,
    so an unplugged and replugged USB keyboard comes back on its own.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        kind: Literal["input", "output"],
        pattern: str,
        opener: Callable[[str], Any],
        names: Callable[[], list[str]],
        virtual: bool = False,
        retry: float = RETRY_SECONDS,
    ) -> None:
        self.kind, self.pattern, self.virtual = kind, pattern, virtual
        self.port: Any = None
        self._loop, self._opener, self._names, self._retry = loop, opener, names, retry
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def open(self) -> None:
        """The first opening: a failure raises MidiError, so a typo stops start-up with a clear message."""
        self.port = self._open_now()
        self._arm()

    def lost(self, why: str) -> None:
        """The port failed or vanished: close it, say so once, and start looking for it."""
        if self.port is None:
            return
        port, self.port = self.port, None
        log.warning("MIDI %s %r %s; OSC keeps working, retrying every %g s", self.kind, port.name, why, self._retry)
        _close_quietly(port)
        self._arm()

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.port is not None:
            _close_quietly(self.port)
            self.port = None

    def _open_now(self) -> Any:
        name = self.pattern if self.virtual else match_port(self.pattern, self._names(), self.kind)
        return self._opener(name)

    def _arm(self) -> None:
        # A virtual port cannot be unplugged: it needs watching only after a failure.
        if self._closed or self._timer is not None or (self.virtual and self.port is not None):
            return
        self._timer = self._loop.call_later(self._retry, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._closed:
            return
        if self.port is None:
            try:
                self.port = self._open_now()
            except MidiError as e:
                log.debug("MIDI %s %r still missing: %s", self.kind, self.pattern, e)
            else:
                log.warning("MIDI %s %r is back", self.kind, self.port.name)
        else:
            try:
                present = self.port.name in self._names()
            except MidiError:
                present = True  # cannot tell right now; keep the port
            if not present:
                self.lost("disappeared")
        self._arm()


def _close_quietly(port: Any) -> None:
    try:
        port.close()
    except Exception:  # a vanished device may fail to close; it is gone either way
        log.debug("closing MIDI port %r failed", getattr(port, "name", port), exc_info=True)


INBOX_SIZE = 64  # MIDI messages waiting for the loop; beyond this the oldest is dropped and counted


class MidiInput:
    """Plays the engine from a MIDI port through an `InputMap`.

    The hand-over to the loop is bounded: messages wait in a small inbox drained by one
    scheduled loop call, and a flood (a controller spewing CCs) drops the oldest — the
    newest position wins, as for OSC — instead of queueing loop callbacks without limit.
    """

    STATUS_KEYS = {  # in /status as midi_in_<key>
        "events": "MIDI messages that played a position",
        "echoes": "incoming notes ignored as echoes of what Antiphon just sent",
        "coalesced": "MIDI messages dropped by a flood (the newest win)",
        "refused": "MIDI events the engine refused (a model of another width than the mapping plays; no free "
                   "voice), the first reason logged",
    }

    def __init__(self, loop: asyncio.AbstractEventLoop, mapping: InputMap, perform: Perform, guard: EchoGuard,
                 per_voice: bool = False) -> None:
        """``per_voice``: each channel is its own performer (voices `per-sender`), with its own copy of ``mapping``."""
        self._loop, self._mapping, self._perform, self._guard = loop, mapping, perform, guard
        self.per_voice = per_voice
        self._maps: dict[int, InputMap] = {}  # per_voice: each channel's own mapper (a cc map's last values)
        self._closed = False
        self._lock = threading.Lock()
        self._inbox: deque[tuple[Any, float]] = deque(maxlen=INBOX_SIZE)
        self._drain_scheduled = False
        self.counts = dict.fromkeys(self.STATUS_KEYS, 0)

    def on_message(self, msg: Any) -> None:
        """Backend thread: filter cheaply, stamp the arrival, and hand over to the event loop."""
        if self._closed or not self._mapping.wants(msg):
            return  # clock, sysex, aftertouch, note-offs...: ignored quietly
        stamp = self._loop.time()
        with self._lock:
            if len(self._inbox) == INBOX_SIZE:
                self.counts["coalesced"] += 1  # the deque drops the oldest
            self._inbox.append((msg, stamp))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed during shutdown
            pass

    def _drain(self) -> None:
        with self._lock:
            batch = list(self._inbox)
            self._inbox.clear()
            self._drain_scheduled = False
        for msg, stamp in batch:
            self._handle(msg, stamp)

    def _handle(self, msg: Any, stamp: float) -> None:
        if self._closed:
            return
        if msg.type == "note_on" and self._guard.is_echo(msg.channel, msg.note, msg.velocity, stamp):
            self.counts["echoes"] += 1
            return
        if not self.per_voice:
            position = self._mapping(msg)
            if position is not None:
                self._play(position, stamp)
            return
        mapping = self._maps.get(msg.channel)
        if mapping is None:
            mapping = self._maps[msg.channel] = copy.deepcopy(self._mapping)
        position = mapping(msg)
        if position is not None:
            self._play(position, stamp, route=f"midi channel {msg.channel + 1}")

    def _play(self, values: tuple[float, ...], stamp: float, **route: str) -> None:
        try:
            self._perform(*values, at=stamp, **route)
        except ControlError as exc:
            self.counts["refused"] += 1
            if self.counts["refused"] == 1:
                log.warning("MIDI input refused: %s (further refusals are only counted)", exc)
        else:
            self.counts["events"] += 1

    def close(self) -> None:
        self._closed = True


class MidiOutput:
    """Engine sink and silencer: model events play notes on a port, each voice on its own channel.

    An event with no voice plays on ``channel``; voice n plays on channel n (0-based, mod 16).
    """

    STATUS_KEYS = {  # in /status as midi_out_<key>
        "notes": "model events played: notes, or with midi_cc a control change per value",
        "dropped": "model notes not sent because the port was missing or failed",
        "unplayable": "model events not sent because their width does not fit: notes play 2 values, `midi_cc` "
                      "one per controller",
    }

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        port: KeptPort,
        channel: int = 0,
        duration: float | None = None,
        guard: EchoGuard | None = None,
        per_voice: bool = False,
        ccs: tuple[int, ...] = (),
    ) -> None:
        """``channel`` is 0-15; ``duration`` in seconds, None for min(predicted dt, 0.5 s); ``ccs`` (`midi_cc`):
        send each event's values as these control changes instead of a note.

        ``per_voice`` (voices `per-sender`) only changes how `describe` names the channels:
        the channel always follows each event's voice.
        """
        self._loop, self._port, self.channel, self.duration = loop, port, channel, duration
        self.per_voice = per_voice
        self.ccs = ccs
        self._guard = guard or EchoGuard()
        # (channel, pitch) sounding -> (the voice that played it, its scheduled note_off)
        self._held: dict[tuple[int, int], tuple[int | None, asyncio.TimerHandle]] = {}
        # note_ons waiting for their event's time (lookahead): id -> (voice, handle)
        self._waiting: dict[int, tuple[int | None, asyncio.TimerHandle]] = {}
        self._next_wait = 0
        self._last_model: dict[int | None, float] = {}  # each voice's previous model event time
        self._used: set[int] = set()  # channels a note was played on, for All Notes Off at close
        self.counts = dict.fromkeys(self.STATUS_KEYS, 0)

    def channel_for(self, voice: int | None) -> int:
        """The channel (0-15) a voice's notes play on."""
        return self.channel if voice is None else voice % CHANNELS

    def describe(self) -> str:
        sends = f"CC {','.join(map(str, self.ccs))} " if self.ccs else ""
        if self.per_voice:
            return sends + "a channel per voice (voice n on channel n+1)"
        return f"{sends}channel {self.channel + 1}"

    def emit(self, event: Event) -> None:
        """As an engine output (`server.live.outputs.Sink`): a model event plays a note (or its CCs) at its time."""
        if event.source != "model":
            return
        if len(event.values) != (len(self.ccs) if self.ccs else 2):
            self.counts["unplayable"] += 1
            return
        if self.ccs:
            self._at(event.time, event.voice, self._send_controls, event.voice, controls_for(event.values))
            return
        # The engine's predicted wait for this event; else the time since the voice's previous model note.
        voice = event.voice
        if event.dt is not None:
            gap: float | None = event.dt
        else:
            last = self._last_model.get(voice)
            gap = None if last is None else event.time - last
        self._last_model[voice] = event.time
        pitch, velocity = note_for(event.x, event.y)
        self._at(event.time, voice, self._play, voice, pitch, velocity, note_duration(gap, self.duration))

    def _at(self, when: float, voice: int | None, play: Callable[..., None], *args: Any) -> None:
        """``play(*args)`` now, or at ``when`` if it was handed over early (lookahead): never before its time."""
        if when <= self._loop.time():
            play(*args)
            return
        self._next_wait += 1
        key = self._next_wait
        self._waiting[key] = (voice, self._loop.call_at(when, self._play_waiting, key, play, args))

    def silence(self, voice: int | None = None) -> None:
        """Turn a voice's sounding notes off now and forget its waiting ones (None: every voice's).

        The engine abandoned that voice's scheduled output. Notes with no voice (voices
        `one`) belong to the only voice there is, so any silence releases them.
        """
        for key, (owner, handle) in list(self._waiting.items()):
            if voice is None or owner is None or owner == voice:
                handle.cancel()
                del self._waiting[key]
        for note, (owner, _) in list(self._held.items()):
            if voice is None or owner is None or owner == voice:
                self._release(note)
        if voice is None:
            self._last_model.clear()
        else:
            self._last_model.pop(voice, None)
            self._last_model.pop(None, None)

    def close(self) -> None:
        """Silence, then All Notes Off on every channel played, for anything a synth still holds, then close."""
        self.silence()
        for channel in sorted(self._used or {self.channel}):
            self._send(mido.Message("control_change", channel=channel, control=ALL_NOTES_OFF, value=0))
        self._port.close()

    @property
    def sounding(self) -> list[int]:
        """The pitches sounding, on any channel."""
        return sorted(pitch for _, pitch in self._held)

    @property
    def held(self) -> list[tuple[int, int]]:
        """(channel, pitch) of every note sounding."""
        return sorted(self._held)

    @property
    def waiting(self) -> int:
        """Notes handed over early, waiting for their time."""
        return len(self._waiting)

    def _play_waiting(self, key: int, play: Callable[..., None], args: tuple[Any, ...]) -> None:
        if self._waiting.pop(key, None) is not None:
            play(*args)

    def _send_controls(self, voice: int | None, values: list[int]) -> None:
        """One control change per value, on the voice's channel."""
        channel = self.channel_for(voice)
        for control, value in zip(self.ccs, values):
            if not self._send(mido.Message("control_change", channel=channel, control=control, value=value)):
                self.counts["dropped"] += 1
                return
        self.counts["notes"] += 1
        self._used.add(channel)

    def _play(self, voice: int | None, pitch: int, velocity: int, length: float) -> None:
        if self._port.port is None:
            self.counts["dropped"] += 1
            return
        channel = self.channel_for(voice)
        if (channel, pitch) in self._held:
            self._release((channel, pitch))  # same note again: end the old one so each on has its own off
        now = self._loop.time()
        if not self._send(mido.Message("note_on", channel=channel, note=pitch, velocity=velocity)):
            self.counts["dropped"] += 1
            return
        self.counts["notes"] += 1
        self._used.add(channel)
        self._guard.sent(channel, pitch, velocity, now)
        self._held[channel, pitch] = (voice, self._loop.call_at(now + length, self._release, (channel, pitch)))

    def _release(self, note: tuple[int, int]) -> None:
        held = self._held.pop(note, None)
        if held is not None:
            held[1].cancel()  # harmless when it is the handle running now
            channel, pitch = note
            self._send(mido.Message("note_off", channel=channel, note=pitch, velocity=0))

    def _send(self, msg: mido.Message) -> bool:
        port = self._port.port
        if port is None:
            return False
        try:
            port.send(msg)
        except Exception as e:  # any backend failure: the music and OSC go on without this port
            self._port.lost(f"failed ({e})")
            return False
        return True


class MidiLink:
    """The open MIDI input and/or output of a running server."""

    def __init__(self, inport: KeptPort | None, input: MidiInput | None, outport: KeptPort | None, output: MidiOutput | None) -> None:
        self.inport, self.input, self.outport, self.output = inport, input, outport, output
        self._perform: Perform | None = None

    def listen(self, perform: Perform) -> None:
        """Send what the input hears to ``perform`` (the engine's): the output is opened first, to be built into it."""
        self._perform = perform

    def _heard(self, *args: Any, **kwargs: Any) -> None:
        if self._perform is not None:  # before `listen`, nobody plays yet
            self._perform(*args, **kwargs)

    def counts(self) -> dict[str, int]:
        """MIDI counters for `/status`, prefixed `midi_`."""
        out: dict[str, int] = {}
        if self.input is not None:
            out.update({f"midi_in_{k}": v for k, v in self.input.counts.items()})
        if self.output is not None:
            out.update({f"midi_out_{k}": v for k, v in self.output.counts.items()})
        return out

    def describe(self) -> str:
        parts = []
        if self.inport is not None and self.inport.port is not None:
            parts.append(f"in {self.inport.port.name!r}" + (" (virtual)" if self.inport.virtual else ""))
        if self.outport is not None and self.outport.port is not None and self.output is not None:
            parts.append(f"out {self.outport.port.name!r}" + (" (virtual)" if self.outport.virtual else "")
                         + f" {self.output.describe()}")
        return ", ".join(parts) or "no ports"

    def close(self) -> None:
        """Release every note, send All Notes Off, close both ports; safe to call twice."""
        if self.input is not None:
            self.input.close()
        if self.inport is not None:
            self.inport.close()
        if self.output is not None:
            self.output.close()


def midi_requested(cfg: RunConfig) -> bool:
    return bool(cfg.midi_in or cfg.midi_out or cfg.midi_virtual)


def open_midi(
    loop: asyncio.AbstractEventLoop,
    cfg: RunConfig,
    perform: Perform | None = None,
    backend: PortBackend | None = None,
    retry: float = RETRY_SECONDS,
) -> MidiLink:
    """Open the ports `cfg` asks for (an explicit name wins over `midi_virtual` per direction).

    With `cfg.voices` per-sender each input channel plays its own voice and each voice
    is heard on its own output channel. Raises MidiError, with nothing left open, when
    a port is missing or MIDI is unavailable. The input reaches ``perform``, or whatever
    `MidiLink.listen` names later (so the output can be handed to the engine first).
    """
    want_virtual_in = cfg.midi_virtual and not cfg.midi_in
    want_virtual_out = cfg.midi_virtual and not cfg.midi_out
    if (want_virtual_in or want_virtual_out) and not virtual_supported():
        raise MidiError("virtual MIDI ports are not supported on Windows: create ports with loopMIDI "
                        "and pass their names with --midi-in / --midi-out")
    try:
        mapping = make_input_map(cfg.midi_input_map, cfg.midi_cc_x, cfg.midi_cc_y,
                                 cfg.midi_input_channel - 1 if cfg.midi_input_channel else None, cfg.midi_cc)
    except ValueError as e:
        raise MidiError(str(e)) from None
    per_voice = VoicePolicy(cfg.voices) is VoicePolicy.PER_SENDER
    backend = backend or open_backend()
    guard = EchoGuard()
    link = MidiLink(None, None, None, None)
    try:
        out_pattern = VIRTUAL_OUT if want_virtual_out else cfg.midi_out
        if out_pattern:
            link.outport = KeptPort(loop, "output", out_pattern, lambda name: backend.open_output(name, want_virtual_out),
                                    backend.output_names, virtual=want_virtual_out, retry=retry)
            link.outport.open()
            link.output = MidiOutput(loop, link.outport, cfg.midi_channel - 1, cfg.midi_note_duration, guard, per_voice,
                                     cfg.midi_cc)
        in_pattern = VIRTUAL_IN if want_virtual_in else cfg.midi_in
        if in_pattern:
            link.input = MidiInput(loop, mapping, link._heard, guard, per_voice)
            on_message = link.input.on_message
            link.inport = KeptPort(loop, "input", in_pattern, lambda name: backend.open_input(name, on_message, want_virtual_in),
                                   backend.input_names, virtual=want_virtual_in, retry=retry)
            link.inport.open()
    except BaseException:
        link.close()
        raise
    if perform is not None:
        link.listen(perform)
    return link

