"""MIDI in and out, MIDI files as datasets: through mido messages and in-memory ports (CI has no devices)."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mido
import mido.ports
import numpy as np
import pytest

from server.midi import mapping as midimap
from server.cli import main
from server.config import ConfigError, RunConfig, add_run_arguments, resolve_run_config
from server.learn.data import load_dataset
from server.live.engine import Engine, Settings
from server.event import Event
from server.midi.link import EchoGuard, open_midi
from server.learn.midifile import TempoMap, read_midi
from server.midi.ports import MidiError, match_port
from server.live.modes import Mode
from server.live.voices import VoiceOptions, VoicePolicy
from server.midi.mapping import note_for
from server.model.predictor import Predictor
from tests.rig import VirtualLoop, build_engine

REPO = Path(__file__).resolve().parent.parent
M = mido.Message


# --------------------------------------------------------------------------- in-memory ports


class MemoryInput(mido.ports.BaseInput):
    """An input port whose messages are played by the test, on whatever thread it likes."""

    def _open(self, callback: Callable[[mido.Message], None] | None = None, **_: object) -> None:
        self.callback = callback

    def play(self, msg: mido.Message) -> None:
        if not self.closed and self.callback is not None:
            self.callback(msg)


class MemoryOutput(mido.ports.BaseOutput):
    """An output port that keeps every message sent, with its monotonic time."""

    def _open(self, fail: bool = False, **_: object) -> None:
        self.sent: list[tuple[float, mido.Message]] = []
        self.fail = fail
        self.clock: Callable[[], float] = time.monotonic  # a test on a virtual loop sets its clock

    def _send(self, msg: mido.Message) -> None:
        if self.fail:
            raise OSError("device unplugged")
        self.sent.append((self.clock(), msg))

    @property
    def messages(self) -> list[mido.Message]:
        return [m for _, m in self.sent]


class MemoryBackend:
    """The `PortBackend` interface over in-memory ports; names can vanish and return."""

    def __init__(self, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()) -> None:
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.opened: dict[str, list[mido.ports.BasePort]] = {}
        self.ready = threading.Event()

    def input_names(self) -> list[str]:
        return list(self.inputs)

    def output_names(self) -> list[str]:
        return list(self.outputs)

    def _check(self, name: str, names: list[str], virtual: bool) -> None:
        if virtual:
            names.append(name)
        elif name not in names:
            raise MidiError(f"unknown port {name!r}")

    def open_input(self, name: str, callback: Callable[[mido.Message], None], virtual: bool = False) -> MemoryInput:
        self._check(name, self.inputs, virtual)
        port = MemoryInput(name, callback=callback)
        self.opened.setdefault(name, []).append(port)
        self.ready.set()
        return port

    def open_output(self, name: str, virtual: bool = False) -> MemoryOutput:
        self._check(name, self.outputs, virtual)
        port = MemoryOutput(name)
        self.opened.setdefault(name, []).append(port)
        return port

    def last(self, name: str) -> mido.ports.BasePort:
        return self.opened[name][-1]


def well_formed(messages: list[mido.Message], channel: int = 0) -> set[int]:
    """Check every note_on is followed by its own note_off before it sounds again; return notes left on."""
    on: set[int] = set()
    for msg in messages:
        if msg.type in ("note_on", "note_off"):
            assert msg.channel == channel
        if msg.type == "note_on":
            assert msg.velocity >= 1, "a note_on with velocity 0 is a disguised note_off"
            assert msg.note not in on, f"note {msg.note} turned on twice without a note_off"
            on.add(msg.note)
        elif msg.type == "note_off":
            assert msg.note in on, f"note_off for {msg.note}, which is not sounding"
            on.discard(msg.note)
    return on


def notes_on(messages: list[mido.Message]) -> int:
    return sum(m.type == "note_on" for m in messages)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def cfg(**kwargs: object) -> RunConfig:
    return RunConfig(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- mapping


def test_notes_map_pitch_and_velocity_and_ignore_everything_else():
    notes = midimap.make_input_map("notes")
    assert notes(M("note_on", note=60, velocity=100)) == (60 / 127, 100 / 127)
    assert notes(M("note_on", note=127, velocity=127, channel=9)) == (1.0, 1.0)
    ignored = [
        M("note_on", note=60, velocity=0),  # a note-off in disguise
        M("note_off", note=60, velocity=64),
        M("clock"), M("start"), M("sysex", data=[1, 2, 3]), M("aftertouch", value=50),
        M("polytouch", note=60, value=50), M("pitchwheel", pitch=100), M("control_change", control=1, value=3),
        M("program_change", program=4), M("active_sensing"),
    ]
    for msg in ignored:
        assert not notes.wants(msg) and notes(msg) is None, msg
    one = midimap.make_input_map("notes", channel=2)
    assert one(M("note_on", note=60, velocity=100, channel=2)) is not None
    assert one(M("note_on", note=60, velocity=100, channel=3)) is None


def test_two_controllers_keep_their_last_values():
    cc = midimap.make_input_map("cc", cc_x=12, cc_y=13)
    assert cc(M("control_change", control=12, value=64)) == (64 / 127, 0.0)
    assert cc(M("control_change", control=13, value=127)) == (64 / 127, 1.0)
    assert cc(M("control_change", control=13, value=127)) is None  # unchanged: no event
    assert cc(M("control_change", control=12, value=0)) == (0.0, 1.0)
    assert cc(M("control_change", control=7, value=5)) is None
    assert cc(M("note_on", note=60, velocity=100)) is None
    with pytest.raises(ValueError, match="differ"):
        midimap.make_input_map("cc", cc_x=3, cc_y=3)


def test_output_note_and_duration():
    assert midimap.note_for(0.0, 0.0) == (0, 1)  # velocity never 0
    assert midimap.note_for(1.0, 1.0) == (127, 127)
    assert midimap.note_for(60 / 127, 100 / 127) == (60, 100)
    assert midimap.note_for(1.5, -1.0) == (127, 1)
    assert midimap.note_duration(None) == 0.5
    assert midimap.note_duration(0.2) == pytest.approx(0.2)
    assert midimap.note_duration(3.0) == 0.5
    assert midimap.note_duration(0.0) == midimap.MIN_DURATION
    assert midimap.note_duration(0.2, fixed=1.5) == 1.5


def test_echo_guard_window():
    guard = EchoGuard()
    guard.sent(0, 60, 100, at=10.0)
    assert guard.is_echo(0, 60, 100, 10.015)
    assert not guard.is_echo(0, 60, 100, 10.025)  # older than 20 ms: a real note
    assert not guard.is_echo(0, 60, 99, 10.001) and not guard.is_echo(0, 61, 100, 10.001)
    assert not guard.is_echo(1, 60, 100, 10.001)  # another channel: the performer, not an echo


def test_port_names_match_by_substring():
    names = ["Midi Through:Midi Through Port-0 14:0", "nanoKEY2:nanoKEY2 MIDI 1 20:0", "nanoKEY2:nanoKEY2 CTRL 20:1"]
    assert match_port("midi through", names, "input") == names[0]
    assert match_port("MIDI 1", names, "input") == names[1]
    assert match_port(names[2], names, "input") == names[2]
    with pytest.raises(MidiError, match="no MIDI input port matches 'launchpad'.*nanoKEY2 CTRL"):
        match_port("launchpad", names, "input")
    with pytest.raises(MidiError, match="matches several"):
        match_port("nanokey2", names, "input")
    with pytest.raises(MidiError, match="available output ports: none"):
        match_port("x", [], "output")


# --------------------------------------------------------------------------- configuration


def resolve(*argv: str) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return resolve_run_config(parser.parse_args(list(argv)))


def test_midi_settings_from_flags_and_toml(tmp_path):
    c = resolve()
    assert (c.midi_in, c.midi_out, c.midi_virtual, c.midi_channel, c.midi_input_channel) == (None, None, False, 1, 0)
    assert (c.midi_input_map, c.midi_cc_x, c.midi_cc_y, c.midi_note_duration) == ("notes", 1, 2, None)
    c = resolve("--midi-in", "Keys", "--midi-virtual", "--midi-channel", "10", "--midi-input-map", "cc",
                "--midi-cc-x", "12", "--midi-cc-y", "13", "--midi-note-duration", "0.25", "--midi-input-channel", "3")
    assert (c.midi_in, c.midi_virtual, c.midi_channel, c.midi_input_map) == ("Keys", True, 10, "cc")
    assert (c.midi_cc_x, c.midi_cc_y, c.midi_note_duration, c.midi_input_channel) == (12, 13, 0.25, 3)
    toml = tmp_path / "a.toml"
    toml.write_text('midi-out = "FluidSynth"\nmidi_virtual = true\nmidi_note_duration = "auto"\nmidi_channel = 16\n')
    c = resolve("--config", str(toml))
    assert (c.midi_out, c.midi_virtual, c.midi_note_duration, c.midi_channel) == ("FluidSynth", True, None, 16)
    assert resolve("--config", str(toml), "--midi-virtual", "no").midi_virtual is False  # a flag can switch it off


@pytest.mark.parametrize(("argv", "message"), [
    (["--midi-channel", "17"], "--midi-channel: MIDI channel must be 1-16"),
    (["--midi-channel", "0"], "1-16"),
    (["--midi-cc-x", "128"], "--midi-cc-x: control change number must be 0-127"),
    (["--midi-input-map", "pads"], "--midi-input-map: expected one of notes, cc"),
    (["--midi-note-duration", "0"], "--midi-note-duration: expected seconds > 0 or 'auto'"),
    (["--midi-note-duration", "long"], "expected seconds > 0 or 'auto'"),
    (["--midi-virtual", "maybe"], "--midi-virtual: expected yes or no"),
    (["--midi-in", " "], "--midi-in: expected (part of) a MIDI port name"),
    (["--midi-cc-x", "2"], "must be different controllers"),
])
def test_invalid_midi_settings(argv, message):
    with pytest.raises(ConfigError) as caught:
        resolve(*argv)
    assert message in str(caught.value)


# --------------------------------------------------------------------------- live transport, no engine


def test_output_plays_each_model_event_and_releases_it():
    # on the virtual loop (defined below, called at run time): note lengths and start times are exact, not wall-clock
    loop = MidiLoop()
    backend = MemoryBackend(outputs=("Synth A",))
    link = open_midi(loop, cfg(midi_out="synth", midi_channel=3), lambda x, y, at=None: None, backend)  # type: ignore[arg-type]
    synth = backend.last("Synth A")
    synth.clock = loop.time
    out = link.output
    t0 = loop.now
    out.emit(Event(t0, (60 / 127, 100 / 127), "model"))  # first note: 0.5 s
    out.emit(Event(t0, (0.2, 0.2), "performer"))  # performer events are not played
    out.emit(Event(t0 + 0.05, (64 / 127, 0.0), "model"))  # 50 ms after the previous: 50 ms long
    out.emit(Event(t0 + 0.06, (64 / 127, 1.0), "model"))  # same pitch again: re-struck
    assert out.sounding == [60] and out.waiting == 2  # handed over early: each waits for its time
    loop.advance(0.055)
    assert out.sounding == [60, 64] and out.waiting == 1
    loop.advance(0.01)
    assert out.sounding == [60, 64] and not out.waiting
    loop.advance(1.0)
    assert not out.sounding
    msgs = synth.messages
    assert well_formed(msgs, channel=2) == set()
    assert [(m.type, m.note, m.velocity) for m in msgs[:4]] == [
        ("note_on", 60, 100), ("note_on", 64, 1), ("note_off", 64, 0), ("note_on", 64, 127)]
    times = {(m.type, m.note, m.velocity): t for t, m in synth.sent}
    assert times[("note_off", 60, 0)] - times[("note_on", 60, 100)] == pytest.approx(0.5, abs=1e-9)
    assert times[("note_on", 64, 1)] == pytest.approx(t0 + 0.05, abs=1e-9)  # at its time, not when handed over
    assert times[("note_on", 64, 127)] == pytest.approx(t0 + 0.06, abs=1e-9)
    link.close()
    assert synth.messages[-1] == M("control_change", channel=2, control=123, value=0)
    assert synth.closed


def test_silence_turns_every_note_off_at_once():
    async def scenario():
        loop = asyncio.get_running_loop()
        backend = MemoryBackend(outputs=("Synth",))
        link = open_midi(loop, cfg(midi_out="Synth", midi_note_duration=10.0), lambda x, y, at=None: None, backend)
        for i in range(5):
            link.output.emit(Event(loop.time(), (i / 10, 0.5), "model"))
        assert len(link.output.sounding) == 5
        link.output.silence()
        assert link.output.sounding == [] and well_formed(backend.last("Synth").messages) == set()
        link.output.silence()  # nothing twice
        assert notes_on(backend.last("Synth").messages) == 5 and len(backend.last("Synth").messages) == 10
        link.close()

    asyncio.run(scenario())


def test_input_runs_on_the_loop_and_ignores_echoes_of_what_was_sent():
    async def scenario():
        loop = asyncio.get_running_loop()
        played: list[tuple[float, float, str]] = []
        backend = MemoryBackend(inputs=("Keys",), outputs=("Synth",))
        link = open_midi(loop, cfg(midi_in="Keys", midi_out="Synth"),
                         lambda x, y, at=None: played.append((x, y, threading.current_thread().name)), backend)
        keys = backend.last("Keys")

        def rtmidi_thread() -> None:
            for msg in (M("clock"), M("note_on", note=60, velocity=90), M("sysex", data=[1]),
                        M("aftertouch", value=3), M("note_on", note=60, velocity=0), M("note_off", note=60)):
                keys.play(msg)

        worker = threading.Thread(target=rtmidi_thread, name="rtmidi")
        worker.start()
        await asyncio.to_thread(worker.join)
        await until(lambda: len(played) == 1)
        assert played == [(60 / 127, 90 / 127, threading.current_thread().name)]  # on the loop's thread
        link.output.emit(Event(loop.time(), (70 / 127, 80 / 127), "model"))
        keys.play(M("note_on", note=70, velocity=80))  # the synth echoes our note: ignored
        keys.play(M("note_on", note=70, velocity=81))  # not the same note: played
        await until(lambda: len(played) == 2)
        await asyncio.sleep(0.05)
        assert played[1][:2] == (70 / 127, 81 / 127) and link.input.counts["echoes"] == 1
        link.close()
        keys.play(M("note_on", note=1, velocity=1))  # after close: nothing
        await asyncio.sleep(0.02)
        assert len(played) == 2

    asyncio.run(scenario())


def test_a_midi_flood_is_bounded_and_the_newest_notes_win():
    from server.midi.link import INBOX_SIZE

    async def scenario():
        loop = asyncio.get_running_loop()
        played: list[tuple[float, float]] = []
        backend = MemoryBackend(inputs=("Keys",))
        link = open_midi(loop, cfg(midi_in="Keys"), lambda x, y, at=None: played.append((x, y)), backend)
        keys = backend.last("Keys")

        def flood() -> None:  # on another thread, while the loop is blocked in join below
            for i in range(1000):
                keys.play(M("note_on", note=i % 128, velocity=1 + i % 100))

        worker = threading.Thread(target=flood)
        worker.start()
        worker.join()  # the loop cannot drain while this blocks: everything piles up
        await until(lambda: len(played) == INBOX_SIZE)
        await asyncio.sleep(0.02)
        assert len(played) == INBOX_SIZE and link.input.counts["coalesced"] == 1000 - INBOX_SIZE
        last = 999
        assert played[-1] == ((last % 128) / 127, (1 + last % 100) / 127)
        assert link.counts()["midi_in_coalesced"] == 1000 - INBOX_SIZE
        link.close()

    asyncio.run(scenario())


def test_cc_input_map_end_to_end():
    async def scenario():
        loop = asyncio.get_running_loop()
        played: list[tuple[float, float]] = []
        backend = MemoryBackend(inputs=("XY pad",))
        link = open_midi(loop, cfg(midi_in="pad", midi_input_map="cc", midi_cc_x=12, midi_cc_y=13,
                                   midi_input_channel=2), lambda x, y, at=None: played.append((x, y)), backend)
        pad = backend.last("XY pad")
        for control, value, channel in ((12, 127, 1), (13, 127, 1), (13, 127, 1), (12, 127, 2), (1, 5, 1)):
            pad.play(M("control_change", control=control, value=value, channel=channel))
        await until(lambda: len(played) == 2)
        await asyncio.sleep(0.02)
        assert played == [(1.0, 0.0), (1.0, 1.0)]
        assert link.output is None
        link.close()

    asyncio.run(scenario())


def test_vanished_port_warns_keeps_going_and_is_reopened(caplog):
    async def scenario():
        loop = asyncio.get_running_loop()
        backend = MemoryBackend(inputs=("USB Keys",), outputs=("USB Synth",))
        played: list[tuple[float, float]] = []
        link = open_midi(loop, cfg(midi_in="usb keys", midi_out="usb synth"), lambda x, y, at=None: played.append((x, y)),
                         backend, retry=0.02)
        first_synth = backend.last("USB Synth")
        backend.inputs.clear()
        backend.outputs.clear()  # unplugged
        await until(lambda: link.inport.port is None and link.outport.port is None)
        assert first_synth.closed and backend.last("USB Keys").closed
        link.output.emit(Event(loop.time(), (0.5, 0.5), "model"))  # no port: dropped quietly
        assert link.output.counts["dropped"] == 1
        backend.inputs.append("USB Keys")
        backend.outputs.append("USB Synth")  # plugged back in
        await until(lambda: link.inport.port is not None and link.outport.port is not None)
        assert len(backend.opened["USB Synth"]) == 2
        backend.last("USB Keys").play(M("note_on", note=10, velocity=10))
        await until(lambda: played == [(10 / 127, 10 / 127)])
        link.output.emit(Event(loop.time(), (0.5, 0.5), "model"))
        assert notes_on(backend.last("USB Synth").messages) == 1
        backend.last("USB Synth").fail = True  # a send that fails: the port is dropped and looked for again
        link.output.emit(Event(loop.time(), (0.6, 0.5), "model"))
        assert link.outport.port is None
        await until(lambda: link.outport.port is not None)
        link.close()

    with caplog.at_level(logging.WARNING, logger="server.midi.link"):
        asyncio.run(scenario())
    text = caplog.text
    assert "MIDI input 'USB Keys' disappeared; OSC keeps working" in text
    assert "MIDI output 'USB Synth' disappeared" in text and "is back" in text and "failed (device unplugged)" in text


def test_missing_port_or_virtual_setup_is_a_start_error():
    async def scenario():
        loop = asyncio.get_running_loop()
        backend = MemoryBackend(inputs=("Keys",), outputs=("Synth",))
        with pytest.raises(MidiError, match="no MIDI input port matches 'piano'.*'Keys'"):
            open_midi(loop, cfg(midi_in="piano", midi_out="Synth"), lambda x, y, at=None: None, backend)
        assert backend.last("Synth").closed  # nothing left open
        link = open_midi(loop, cfg(midi_virtual=True), lambda x, y, at=None: None, backend)
        assert (link.inport.port.name, link.outport.port.name) == ("Antiphon in", "Antiphon out")
        assert "'Antiphon in' (virtual)" in link.describe() and "channel 1" in link.describe()
        link.close()
        link = open_midi(loop, cfg(midi_virtual=True, midi_in="Keys"), lambda x, y, at=None: None, backend)
        assert (link.inport.port.name, link.inport.virtual, link.outport.virtual) == ("Keys", False, True)
        link.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- end to end with the real engine


def test_midi_in_engine_midi_out_with_the_default_model():
    """Notes in -> accompany answers -> notes out; generate, mode changes, pause, swap and stop leave nothing on."""

    async def scenario():
        loop = asyncio.get_running_loop()
        backend = MemoryBackend(inputs=("Keys",), outputs=("Synth",))
        link = open_midi(loop, cfg(midi_in="Keys", midi_out="Synth", midi_channel=5), None, backend)
        engine = Engine(loop, Predictor.load(REPO / "models" / "default"), REPO / "models",
                        Settings(mode=Mode.ACCOMPANY, timescale=0.02), seed=5, sinks=[link.output])
        link.listen(engine.perform)
        engine.start()
        keys, synth = backend.last("Keys"), backend.last("Synth")

        def performer() -> None:
            for i in range(20):
                keys.play(M("clock"))
                keys.play(M("note_on", note=48 + i, velocity=40 + 3 * i))
                keys.play(M("note_on", note=48 + i, velocity=0))
                time.sleep(0.01)  # after each note, not an absolute schedule: a delayed thread never bursts past max_rate

        await asyncio.to_thread(performer)
        # Keys on channel 1, synth on 5: a key equal to the model's last note is not an echo.
        await until(lambda: engine.counts["outputs"] == 20 and not link.output.sounding)
        assert engine.counts["inputs"] == 20 and link.input.counts["echoes"] == 0
        assert notes_on(synth.messages) == 20 and well_formed(synth.messages, channel=4) == set()

        for stop in (lambda: engine.set_mode("listen"), lambda: engine.set_paused(True),
                     lambda: engine.load_model("default"), engine.stop):
            engine.set_paused(False)
            engine.set_mode("generate")
            before = notes_on(synth.messages)
            await until(lambda: notes_on(synth.messages) >= before + 5 and link.output.sounding)
            swaps = engine.counts["model_swaps"]
            stop()
            if engine.loading:  # a swap is read off the loop: the old model plays until it is ready
                await until(lambda: engine.counts["model_swaps"] == swaps + 1)
                engine.set_mode("listen")
            assert link.output.sounding == [] and well_formed(synth.messages, channel=4) == set()
            if engine.settings.mode is Mode.GENERATE and not engine.settings.paused:
                engine.set_mode("listen")  # after a model swap generate plays on: end it too
            count = len(synth.messages)
            await asyncio.sleep(0.1)
            assert len(synth.messages) == count, "nothing plays after the output was abandoned"
        link.close()
        assert well_formed(synth.messages, channel=4) == set()
        assert synth.messages[-1].is_cc(123) and synth.closed

    asyncio.run(scenario())


# --------------------------------------------------------------------------- voices and lookahead, on a virtual clock


class MidiLoop(VirtualLoop):
    """`tests.test_engine.VirtualLoop` plus what the MIDI link uses (retry timers, the input's hand-over)."""

    def call_later(self, delay: float, callback: Callable[..., None], *args: object):
        return self.call_at(self.now + delay, callback, *args)

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: object):
        return self.call_soon(callback, *args)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(REPO / "models" / "default")


def virtual_rig(predictor: Predictor, policy: VoicePolicy, mode: Mode = Mode.ACCOMPANY, **settings: object):
    """An engine on a virtual loop, wired to in-memory MIDI ports as `serve` wires it; synth times are loop times."""
    loop = MidiLoop()
    predictor.reset()
    backend = MemoryBackend(inputs=("Keys",), outputs=("Synth",))
    link = open_midi(loop, cfg(midi_in="Keys", midi_out="Synth", voices=policy), None, backend)  # type: ignore[arg-type]
    engine, played = build_engine(loop, predictor, Settings(mode=mode, **settings), seed=3,  # type: ignore[arg-type]
                                  voices=VoiceOptions(policy), sinks=(link.output,))
    link.listen(engine.perform)
    events = played.timed  # (loop time handed over, event), as they come
    synth = backend.last("Synth")
    synth.clock = loop.time
    return loop, engine, link, backend.last("Keys"), synth, events


def on_channel(messages: list[mido.Message], channel: int) -> list[mido.Message]:
    return [m for m in messages if m.type in ("note_on", "note_off") and m.channel == channel]


def test_each_voice_plays_on_its_own_channel(predictor):
    loop, engine, link, _, synth, events = virtual_rig(predictor, VoicePolicy.PER_SENDER)
    engine.start()
    for i in range(20):
        engine.perform(0.3 + i / 100, 0.5, route=("10.0.0.1", 9000))  # voice 0
        engine.perform(0.8 - i / 100, 0.7, route="midi channel 9")  # voice 1
        loop.advance(0.1)
    loop.advance(2.0)
    for voice in (0, 1):
        model = [note_for(e.x, e.y) for _, e in events() if e.source == "model" and e.voice == voice]
        played = [(m.note, m.velocity) for m in on_channel(synth.messages, voice) if m.type == "note_on"]
        assert len(model) >= 15 and played == model  # every note of voice n, on channel n+1, and only those
        assert well_formed(on_channel(synth.messages, voice), channel=voice) == set()
    assert {m.channel for m in synth.messages if m.type == "note_on"} == {0, 1}
    assert "out 'Synth' a channel per voice (voice n on channel n+1)" in link.describe()
    link.close()
    assert [m.channel for m in synth.messages if m.is_cc(123)] == [0, 1]  # All Notes Off on each channel used


def test_the_same_pitch_on_two_voices_is_two_notes_and_silence_releases_one_voice(predictor):
    loop, engine, link, keys, synth, _ = virtual_rig(predictor, VoicePolicy.PER_SENDER)
    out = link.output
    out.duration = 10.0
    now = loop.now
    for voice in (0, 1):
        out.emit(Event(now, (60 / 127, 0.5), "model", 0.1, voice=voice))
        out.emit(Event(now, (70 / 127, 0.5), "model", 0.1, voice=voice))
        out.emit(Event(now + 0.5, (80 / 127, 0.5), "model", 0.1, voice=voice))  # handed over early: waits
    assert out.held == [(0, 60), (0, 70), (1, 60), (1, 70)] and out.waiting == 2
    assert [m.type for m in synth.messages] == ["note_on"] * 4  # pitch 60 on voice 1 did not end voice 0's
    out.silence(0)
    assert out.held == [(1, 60), (1, 70)] and out.waiting == 1
    assert sorted((m.channel, m.note) for m in synth.messages if m.type == "note_off") == [(0, 60), (0, 70)]
    loop.advance(0.5)
    assert out.held == [(1, 60), (1, 70), (1, 80)]  # voice 1's waiting note played; voice 0's never will
    assert not [m for m in on_channel(synth.messages, 0) if m.type == "note_on" and m.note == 80]
    # the echo guard keeps each channel apart: voice 1's note echoed on channel 2 is not a performer
    keys.play(M("note_on", channel=1, note=80, velocity=64))
    keys.play(M("note_on", channel=0, note=80, velocity=64))
    loop.advance(0.0)
    assert link.input.counts["echoes"] == 1 and engine.status()["voice0_from"] == "midi channel 1"
    out.silence(None)
    assert out.held == [] and not out.waiting
    for channel in (0, 1):
        assert well_formed(on_channel(synth.messages, channel), channel=channel) == set()
    link.close()


def test_with_lookahead_a_note_sounds_at_its_time_not_when_handed_over(predictor):
    loop, engine, link, _, synth, events = virtual_rig(predictor, VoicePolicy.ONE, Mode.GENERATE,
                                                        lookahead=0.05, timescale=0.5)
    engine.start()
    loop.advance(10.0)
    model = [(t, e) for t, e in events() if e.source == "model"]
    ons = [t for t, m in synth.sent if m.type == "note_on"]
    assert len(model) > 20 and len(ons) == len(model)
    for (handed, event), on in zip(model, ons):
        assert handed == pytest.approx(event.time - 0.05, abs=1e-9)  # the engine hands it over 50 ms early
        assert on == event.time  # and it sounds exactly at its time, on the loop's clock
    sent = synth.sent
    for i, (t, m) in enumerate(sent):
        if m.type == "note_off":
            start = max(u for u, n in sent[:i] if n.type == "note_on" and n.note == m.note)
            assert t > start  # every note-off after its own note-on
    while not link.output.waiting:  # stop while a note handed over early waits for its time
        loop.advance(0.001)
    engine.set_mode("listen")  # abandoned: nothing waits, nothing sounds, nothing plays later
    assert not link.output.waiting and not link.output.sounding
    count = len(synth.sent)
    loop.advance(1.0)
    assert len(synth.sent) == count and well_formed(synth.messages) == set()
    link.close()


@pytest.mark.parametrize(("policy", "voices"), [(VoicePolicy.PER_SENDER, 2), (VoicePolicy.ONE, 1)])
def test_midi_input_channels_are_voices_with_per_sender(predictor, policy, voices):
    loop, engine, link, keys, synth, events = virtual_rig(predictor, policy)
    for i in range(5):
        keys.play(M("note_on", channel=0, note=60 + i, velocity=80))
        keys.play(M("note_on", channel=4, note=40 + i, velocity=50))
        loop.advance(0.1)
    loop.advance(2.0)
    status = engine.status()
    assert status["voices"] == voices and status["inputs"] == 10
    if policy is VoicePolicy.PER_SENDER:
        assert (status["voice0_from"], status["voice1_from"]) == ("midi channel 1", "midi channel 5")
        assert (status["voice0_inputs"], status["voice1_inputs"]) == (5, 5)
        # and each voice answers on its own channel: channel 5's performer is voice 1, heard on channel 2
        assert {m.channel for m in synth.messages if m.type == "note_on"} == {0, 1}
    else:
        assert {m.channel for m in synth.messages if m.type == "note_on"} == {0}
    link.close()


def test_cc_values_are_kept_per_channel_when_channels_are_voices():
    async def scenario():
        loop = asyncio.get_running_loop()
        played: list[tuple[float, float, object]] = []
        backend = MemoryBackend(inputs=("XY pad",))
        link = open_midi(loop, cfg(midi_in="pad", midi_input_map="cc", voices=VoicePolicy.PER_SENDER),
                         lambda x, y, at=None, route=None: played.append((x, y, route)), backend)
        pad = backend.last("XY pad")
        for control, value, channel in ((1, 127, 0), (2, 127, 1), (2, 127, 0)):
            pad.play(M("control_change", control=control, value=value, channel=channel))
        await until(lambda: len(played) == 3)
        assert played == [(1.0, 0.0, "midi channel 1"), (0.0, 1.0, "midi channel 2"), (1.0, 1.0, "midi channel 1")]
        link.close()

    asyncio.run(scenario())


def test_run_command_wires_midi_and_releases_everything_at_shutdown(monkeypatch, tmp_path):
    """The real `serve`: MIDI ports opened after the engine, notes answered, all off at SIGTERM."""
    import server.midi.link
    from server.app import serve

    backend = MemoryBackend(inputs=("Keys",), outputs=("Synth",))
    monkeypatch.setattr(server.midi.link, "open_backend", lambda: backend)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    config = resolve("--port", "0", "--log-dir", str(tmp_path), "--send", f"127.0.0.1:{peer.getsockname()[1]}",
                     "--timescale", "0.02", "--midi-in", "keys", "--midi-out", "synth", "--midi-note-duration", "5", "--midi-channel", "2")
    failures: list[BaseException] = []
    done = threading.Event()

    def musician() -> None:
        try:
            assert backend.ready.wait(20), "MIDI ports never opened"
            # a note at a time until 10 are answered: on a busy machine an answer may come late and be
            # dropped (the late-drop promise), so the test waits for answers, not for a count at an instant
            end = time.monotonic() + 60
            played = 0
            while notes_on(backend.last("Synth").messages) < 10:
                assert time.monotonic() < end, f"10 answers never came: {played} notes played"
                heard = notes_on(backend.last("Synth").messages)
                backend.last("Keys").play(M("note_on", note=60 + played % 12, velocity=100))
                played += 1
                wait = time.monotonic() + 1.0
                while notes_on(backend.last("Synth").messages) == heard and time.monotonic() < wait:
                    time.sleep(0.005)
        except BaseException as e:  # reported by the main thread
            failures.append(e)
        finally:
            if not done.is_set():  # serve is waiting for exactly this signal
                os.kill(os.getpid(), signal.SIGTERM)

    player = threading.Thread(target=musician, daemon=True)
    player.start()
    out = io.StringIO()
    try:
        assert serve(config, out) == 0
    finally:
        done.set()
        player.join(30)
        peer.close()
    assert not failures, failures
    synth = backend.last("Synth")
    assert "midi: in 'Keys', out 'Synth' channel 2" in out.getvalue()
    assert notes_on(synth.messages) >= 10
    assert well_formed(synth.messages, channel=1) == set()  # 5 s notes, released by the shutdown
    assert synth.messages[-1].is_cc(123) and synth.closed and backend.last("Keys").closed


# --------------------------------------------------------------------------- real backend on this machine


def test_midi_virtual_works_or_fails_clearly(tmp_path):
    cmd = [sys.executable, "-m", "server", "run", "--port", "0", "--log-dir", str(tmp_path), "--midi-virtual"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.stdout is not None
    guard = threading.Timer(60, proc.kill)  # never hang the suite on a stuck start
    guard.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ready:"):
            break
    text = "".join(lines)
    if proc.poll() is None and text.rstrip().splitlines()[-1].startswith("ready:"):
        assert "midi: in 'Antiphon in' (virtual), out 'Antiphon out' (virtual)" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    else:
        assert proc.wait(15) == 1
        assert "Traceback" not in text
        assert "error: MIDI is not available on this machine" in text or "virtual MIDI ports are not supported" in text
    guard.cancel()


def test_midi_ports_exits_0_without_devices():
    res = subprocess.run([sys.executable, "-m", "server", "midi-ports"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "MIDI" in res.stdout and "Traceback" not in res.stderr


def test_midi_ports_lists_names(monkeypatch, capsys):
    import server.midi.ports

    backend = MemoryBackend(inputs=("Keys 1", "Pads"), outputs=())
    monkeypatch.setattr(server.midi.ports, "open_backend", lambda: backend)
    assert main(["midi-ports"]) == 0
    out = capsys.readouterr().out
    assert "MIDI inputs (--midi-in):\n  Keys 1\n  Pads\n" in out and "MIDI outputs (--midi-out):\n  none" in out


# --------------------------------------------------------------------------- MIDI files as datasets


def write_song(path: Path, tracks: list[list[mido.Message | mido.MetaMessage]], type: int = 1) -> Path:
    mid = mido.MidiFile(type=type, ticks_per_beat=480)
    for messages in tracks:
        mid.tracks.append(mido.MidiTrack(messages))
    path.parent.mkdir(parents=True, exist_ok=True)
    mid.save(path)
    return path


def song_tracks() -> list[list]:
    """120 bpm for two beats (1 s), then 60 bpm; tempo in the first track only, as in most files."""
    tempo = [mido.MetaMessage("set_tempo", tempo=500_000, time=0), mido.MetaMessage("set_tempo", tempo=1_000_000, time=960)]
    melody = []  # onsets at ticks 0, 480, 960, 1440, 1920 -> 0, 0.5, 1, 2, 3 s
    for i, note in enumerate((60, 62, 64, 65, 67)):
        melody.append(M("note_on", note=note, velocity=20 * (i + 1), time=0 if i == 0 else 240))
        melody.append(M("note_off", note=note, velocity=0, time=240))
    melody.insert(3, M("note_on", note=61, velocity=0, time=0))  # a note-off in disguise: not an onset
    bass = [M("note_on", note=36, velocity=127, time=0), M("note_on", note=36, velocity=0, time=10),
            M("note_on", note=38, velocity=64, time=4310)]  # at tick 4320: 1 + 7 s = 8 s -> dt 8 clipped to 5
    return [tempo, melody, bass]


def test_midi_files_become_a_dataset_through_the_cli(tmp_path, caplog):
    write_song(tmp_path / "songs" / "a.mid", song_tracks())
    write_song(tmp_path / "songs" / "deeper" / "B.MIDI", [[M("note_on", note=1, velocity=1), M("note_on", note=2, velocity=2, time=960)]])
    (tmp_path / "songs" / "broken.mid").write_bytes(b"not a midi file")
    (tmp_path / "songs" / "notes.txt").write_text("ignored")
    out = tmp_path / "midi.npz"
    with caplog.at_level(logging.WARNING):
        assert main(["dataset", "--midi", str(tmp_path / "songs"), "--out", str(out)]) == 0
    assert "broken.mid" in caplog.text
    ds = load_dataset(out)
    melody, bass, other = ds.performances
    np.testing.assert_allclose(melody[:, 0], [0, 0.5, 0.5, 1.0, 1.0], atol=1e-6)  # seconds through the tempo map
    np.testing.assert_allclose(melody[:, 1], np.array([60, 62, 64, 65, 67]) / 127, atol=1e-6)
    np.testing.assert_allclose(melody[:, 2], np.array([20, 40, 60, 80, 100]) / 127, atol=1e-6)
    np.testing.assert_allclose(bass, [[0, 36 / 127, 1], [5.0, 38 / 127, 64 / 127]], atol=1e-6)
    np.testing.assert_allclose(other[:, 0], [0, 1.0], atol=1e-6)  # no tempo: 120 bpm, 960 ticks = 1 s

    merged = tmp_path / "merged.npz"
    assert main(["dataset", "--midi", str(tmp_path / "songs" / "a.mid"), "--merge-tracks", "--dt-max", "3", "--out", str(merged)]) == 0
    (one,) = load_dataset(merged).performances
    # onsets 0 (60 and 36), 0.5, 1, 2, 3, 8 s
    np.testing.assert_allclose(one[:, 0], [0, 0, 0.5, 0.5, 1, 1, 3.0], atol=1e-6)
    assert sorted(one[:2, 1] * 127) == pytest.approx([36, 60])


def test_dataset_command_keeps_logs_and_mixes_them_with_midi(tmp_path, capsys):
    log = tmp_path / "logs" / "20240101-120000.csv"
    log.parent.mkdir()
    log.write_text("time,source,x,y\n100.0,performer,0.1,0.2\n100.5,performer,0.3,0.4\n101.0,model,0.5,0.5\n")
    write_song(tmp_path / "a.mid", song_tracks())
    out = tmp_path / "both.npz"
    assert main(["dataset", str(tmp_path / "logs"), "--out", str(out)]) == 0
    assert len(load_dataset(out).starts) == 1
    assert main(["dataset", str(tmp_path / "logs"), "--midi", str(tmp_path / "a.mid"), "--out", str(out)]) == 0
    assert len(load_dataset(out).starts) == 3
    assert main(["dataset", "--out", str(out)]) == 1
    assert main(["dataset", "--midi", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "missing: no such file or folder" in capsys.readouterr().err


def test_tempo_maps_smpte_and_type_2(tmp_path):
    tm = TempoMap([(960, 1_000_000), (480, 250_000)], 480)  # given out of order
    np.testing.assert_allclose(tm.seconds(np.array([0, 480, 720, 960, 1440])), [0, 0.5, 0.625, 0.75, 1.75])
    division = struct.unpack(">h", bytes([256 - 25, 40]))[0]  # 25 fps x 40 ticks per frame
    np.testing.assert_allclose(TempoMap([(0, 1)], division).seconds(np.array([0, 1000, 2500])), [0, 1.0, 2.5])
    path = write_song(tmp_path / "t2.mid", [
        [mido.MetaMessage("set_tempo", tempo=1_000_000), M("note_on", note=1, velocity=1), M("note_on", note=2, velocity=2, time=480)],
        [M("note_on", note=3, velocity=3), M("note_on", note=4, velocity=4, time=480)],
    ], type=2)
    first, second = read_midi(path)
    assert first[1, 0] == pytest.approx(1.0) and second[1, 0] == pytest.approx(0.5)  # each track its own tempo
