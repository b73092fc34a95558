"""`run`: wire model, engine, OSC and MIDI transports and recorder together and serve until a signal.

Start-up failures (a bad model folder, an unwritable log directory, a taken port) end
with a message naming the problem and a non-zero exit, before any music starts.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from server.config import RunConfig
from server.live.engine import Engine, Settings
from server.live.voices import VoiceOptions, VoicePolicy
from server.live.learning import Learner
from server.event import Event
from server.midi.link import MidiError, MidiLink, midi_requested, open_midi
from server.model.spec import ModelError
from server.model.files import resolve_model_dir
from server.osc.namespace import STATUS_PUSH_HZ, namespace_text, status_items
from server.osc.output import OscOutput, status_message
from server.osc.protocol import OscServerProtocol, start_osc
from server.osc.streams import STREAM_RATE
from server.osc.wire import ntp_timetag
from server.live.recorder import Recorder, RecorderError
from server.model.predictor import Predictor


class StartupError(RuntimeError):
    """The server cannot start; the message says why and what to do."""


def precise_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire within tens of microseconds, not a millisecond.

    asyncio's default selector (epoll) rounds every wait up to a whole millisecond, so
    a note scheduled with `call_at` would sound up to 1 ms (p99 ~2.5 ms) late. `select()`
    takes a microsecond timeout; with the handful of sockets this server watches, its
    cost is the same. Windows keeps its default loop.
    """
    if sys.platform == "win32":
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def serve(cfg: RunConfig, out: TextIO = sys.stdout) -> int:
    """Run the server in the current thread until SIGINT or SIGTERM; returns the exit code."""
    started = time.monotonic()
    try:
        folder = resolve_model_dir(cfg.model, cfg.models_dir, allow_paths=True)
        predictor = Predictor.load(folder)
    except ModelError as e:
        raise StartupError(f"cannot load model {cfg.model!r}: {e}") from e
    try:
        recorder = Recorder(cfg.log_dir, voices=cfg.voices is VoicePolicy.PER_SENDER)
    except RecorderError as e:
        raise StartupError(str(e)) from e
    try:
        with asyncio.Runner(loop_factory=precise_event_loop) as runner:
            return runner.run(_serve(cfg, predictor, folder, recorder, started, out))
    finally:
        recorder.close()


async def _serve(cfg: RunConfig, predictor: Predictor, folder: Path, recorder: Recorder, started: float,
                 out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    settings = Settings(
        mode=cfg.mode,
        temperature=cfg.temperature,
        sigma_temperature=cfg.sigma_temperature,
        timescale=cfg.timescale,
        threshold=cfg.threshold,
        max_rate=cfg.max_rate,
        lookahead=cfg.lookahead,
    )
    model_name = folder.name
    voices = VoiceOptions(cfg.voices, cfg.max_voices, cfg.voice_timeout)
    engine = Engine(loop, predictor, cfg.models_dir, settings, seed=cfg.seed, model_name=model_name, voices=voices)
    engine.model_folder = folder
    try:
        transport, protocol, output = await start_osc(
            engine, host=cfg.host, port=cfg.port, destinations=cfg.send, allow=cfg.allow
        )
    except OSError as e:
        raise StartupError(str(e)) from e

    streams = output.streams

    def send_events(event: Event) -> None:
        voice = () if event.voice is None else (event.voice,)
        if event.source == "model":
            timetag = None
            if settings.lookahead > 0.0:  # the event's time, from the loop's monotonic schedule to the wall clock
                timetag = ntp_timetag(time.time() + (event.time - loop.time()))
            output.send_prediction(event.x, event.y, event.voice, event.route, timetag)
            if streams.active("prediction"):  # displays get plain messages as they leave
                streams.send("prediction", "/prediction", event.x, event.y, *voice)
        elif streams.active("performer"):
            streams.send("performer", "/performer", event.x, event.y, *voice)

    engine.sinks[:] = [send_events, recorder.record]
    engine.status_sources.append(recorder.counts)
    engine.learner = Learner(
        loop, cfg.models_dir,
        session_log=lambda: recorder.path,
        playing=lambda: (engine.model_name, engine.model_folder),
        performer_events=lambda: engine.counts["inputs"],
        swap=lambda name, on_error, on_loaded: engine.load_model(name, on_error, on_loaded),
        notify=output.broadcast,
    )
    engine.status_sources.append(engine.learner.status)
    watch_streams(loop, engine, output, protocol)
    midi: MidiLink | None = None
    if midi_requested(cfg):
        try:
            midi = open_midi(loop, cfg, engine.perform)
        except MidiError as e:
            transport.close()
            raise StartupError(str(e)) from e
        engine.status_sources.append(midi.counts)
        if midi.output is not None:
            engine.sinks.append(midi.output)
            engine.silencers.append(midi.output.silence)
    stop = asyncio.Event()
    restore = install_stop_signals(loop, stop.set)
    host, port = transport.get_extra_info("sockname")[:2]
    say(namespace_text(), out)
    if midi is not None:
        say(f"midi: {midi.describe()}", out)
    sends = " ".join(f"{h}:{p}" for h, p in output.destinations) or "none (send /hello)"
    say(
        f"ready: listening on {host}:{port}, sending to {sends}, model {model_name} ({predictor.backend}), "
        f"mode {settings.mode.value}, log {recorder.path} ({time.monotonic() - started:.2f} s)",
        out,
    )
    engine.start()
    monitor = start_monitor(cfg, host, port) if cfg.monitor else None
    try:
        await stop.wait()
    finally:
        if monitor is not None:
            stop_monitor(monitor)
        engine.stop()
        engine.learner.close()
        if midi is not None:
            midi.close()  # every held note off, then All Notes Off
        transport.close()
        restore()
    say(f"stopped: {engine.counts['inputs']} inputs, {engine.counts['outputs']} outputs, log {recorder.path}", out)
    return 0


def watch_streams(loop: asyncio.AbstractEventLoop, engine: Engine, output: OscOutput,
                  protocol: OscServerProtocol) -> None:
    """Connect the OSC streams to the engine while someone subscribes, and only then (they cost nothing idle)."""
    streams = output.streams
    engine.watch.max_rate, engine.watch.burst = STREAM_RATE, STREAM_RATE
    pusher = StatusPusher(loop, lambda: streams.send_data("status", status_message(
        status_items(engine, protocol.counters))), 1.0 / STATUS_PUSH_HZ)

    def mixture(values: list[float], voice: int | None) -> None:
        streams.send("mixture", "/mixture", int(values[0]), *values[1:], *(() if voice is None else (voice,)))

    def surprise(nll: float, smoothed: float, voice: int | None) -> None:
        streams.send("surprise", "/surprise", nll, smoothed, *(() if voice is None else (voice,)))

    def changed(stream: str, active: bool) -> None:
        if stream == "mixture":
            engine.watch.mixture = mixture if active else None
        elif stream == "surprise":
            engine.watch.surprise = surprise if active else None
        elif stream == "status":
            pusher.start() if active else pusher.stop()

    streams.on_change = changed


class StatusPusher:
    """Calls `push` every `period` seconds on an absolute schedule while started; no timer otherwise."""

    def __init__(self, loop: asyncio.AbstractEventLoop, push: Callable[[], None], period: float) -> None:
        self._loop, self._push, self._period = loop, push, period
        self._timer: asyncio.TimerHandle | None = None
        self._next = 0.0

    def start(self) -> None:
        if self._timer is None:
            self._next = self._loop.time()
            self._tick()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._push()
        self._next = max(self._next + self._period, self._loop.time())  # after a stall: no burst of catch-up pushes
        self._timer = self._loop.call_at(self._next, self._tick)


def start_monitor(cfg: RunConfig, host: str, port: int) -> subprocess.Popen:
    """`run --monitor`: the web monitor in its own process (a slow browser can never touch this loop)."""
    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    argv = [sys.executable, "-m", "server", "monitor", "--port", str(cfg.monitor_port),
            "--server", f"{target}:{port}", "--models-dir", str(cfg.models_dir)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def stop_monitor(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that end a run cleanly: Ctrl-C, `kill`, and a closed terminal (SIGHUP) where it exists."""
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


def install_stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> Callable[[], None]:
    """Call `stop` on the loop when a stop signal arrives; returns a function that undoes it.

    `loop.add_signal_handler` is missing on Windows (NotImplementedError): there a plain
    `signal.signal` handler wakes the loop with `call_soon_threadsafe` instead.
    """
    installed: list[signal.Signals] = []
    previous: dict[signal.Signals, Any] = {}
    for sig in stop_signals():
        try:
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            previous[sig] = signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop))

    def restore() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def say(text: str, out: TextIO) -> None:
    """Print a line for the person running the server; a closed or broken stdout must not end the run."""
    try:
        print(text, file=out, flush=True)
    except (OSError, ValueError):  # BrokenPipeError is an OSError; ValueError: the file was closed
        _silence(out)


def _silence(out: TextIO) -> None:
    """Point a broken stream at the null device, so the flush at interpreter exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
