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
from server.live.learning import Learner
from server.live.outputs import Sink
from server.live.recorder import Recorder, RecorderError
from server.live.voices import VoiceOptions, VoicePolicy
from server.midi.link import MidiError, MidiLink, midi_requested, open_midi
from server.model.files import resolve_model_dir
from server.model.predictor import Predictor
from server.model.spec import ModelError
from server.monitor.access import is_wildcard
from server.osc.namespace import DEFAULT_HOST, namespace_text
from server.osc.output import OscOutput
from server.osc.protocol import start_osc
from server.osc.sink import OscSink


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
        predictor = Predictor.load(folder, prove=True)  # its step tested in a child first: never a segfault here
    except ModelError as e:
        raise StartupError(f"cannot load model {cfg.model!r}: {e}") from e
    if cfg.midi_cc and len(cfg.midi_cc) != predictor.values:
        raise StartupError(f"midi_cc lists {len(cfg.midi_cc)} controllers but model {folder.name!r} plays "
                           f"{predictor.values} values per event: give one control change number per value")
    try:
        recorder = Recorder(cfg.log_dir, voices=cfg.voices is VoicePolicy.PER_SENDER, values=predictor.values)
    except RecorderError as e:
        raise StartupError(str(e)) from e
    try:
        with asyncio.Runner(loop_factory=precise_event_loop) as runner:
            return runner.run(_serve(cfg, predictor, folder, recorder, started, out))
    finally:
        recorder.close()


async def _serve(cfg: RunConfig, predictor: Predictor, folder: Path, recorder: Recorder, started: float,
                 out: TextIO) -> int:
    """Outputs first (OSC, MIDI, the recorder), then the engine built with them, then the inputs that drive it."""
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
    output = OscOutput()
    osc = OscSink(loop, output)
    learner = Learner(loop, cfg.models_dir, session_log=lambda: recorder.path, notify=output.broadcast)
    midi: MidiLink | None = None
    if midi_requested(cfg):
        try:
            midi = open_midi(loop, cfg)
        except MidiError as e:
            raise StartupError(str(e)) from e
    sinks: list[Sink] = [osc, recorder]
    if midi is not None and midi.output is not None:
        sinks.append(midi.output)
    engine = Engine(loop, predictor, cfg.models_dir, settings, sinks=sinks, streams=osc,
                    status_sources=[recorder.counts, *([midi.counts] if midi is not None else [])],
                    learner=learner, seed=cfg.seed, model_name=folder.name, model_folder=folder,
                    voices=VoiceOptions(cfg.voices, cfg.max_voices, cfg.voice_timeout, cfg.max_voices_per_sender))
    try:
        transport, protocol, output = await start_osc(
            engine, host=cfg.host, port=cfg.port, destinations=cfg.send, allow=cfg.allow, output=output
        )
    except OSError as e:
        if midi is not None:
            midi.close()
        raise StartupError(str(e)) from e
    if midi is not None:
        midi.listen(engine.perform)
    stop = asyncio.Event()
    restore = install_stop_signals(loop, stop.set)
    host, port = transport.get_extra_info("sockname")[:2]
    say(namespace_text(), out)
    if midi is not None:
        say(f"midi: {midi.describe()}", out)
    sends = " ".join(f"{h}:{p}" for h, p in output.destinations) or "none (send /hello)"
    say(
        f"ready: listening on {host}:{port}, sending to {sends}, model {folder.name} ({predictor.backend}), "
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
        learner.close()
        if midi is not None:
            midi.close()  # every held note off, then All Notes Off
        transport.close()
        restore()
    say(f"stopped: {engine.counts['inputs']} inputs, {engine.counts['outputs']} outputs, log {recorder.path}", out)
    return 0


def start_monitor(cfg: RunConfig, host: str, port: int) -> subprocess.Popen:
    """`run --monitor`: the web monitor in its own process (a slow browser can never touch this loop)."""
    target = DEFAULT_HOST if is_wildcard(host) else host
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
