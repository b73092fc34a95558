"""`run`: wire model, engine, OSC and MIDI transports and recorder together and serve until a signal.

Start-up failures (a bad model folder, an unwritable log directory, a taken port) end
with a message naming the problem and a non-zero exit, before any music starts.
"""

from __future__ import annotations

import asyncio
import selectors
import signal
import sys
import time
from typing import TextIO

from server.config import RunConfig
from server.live.engine import Engine, Settings
from server.event import Event
from server.midi.link import MidiError, MidiLink, midi_requested, open_midi
from server.model.spec import ModelError
from server.model.files import resolve_model_dir
from server.osc.namespace import namespace_text
from server.osc.protocol import start_osc
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
        recorder = Recorder(cfg.log_dir)
    except RecorderError as e:
        raise StartupError(str(e)) from e
    try:
        with asyncio.Runner(loop_factory=precise_event_loop) as runner:
            return runner.run(_serve(cfg, predictor, folder.name, recorder, started, out))
    finally:
        recorder.close()


async def _serve(cfg: RunConfig, predictor: Predictor, model_name: str, recorder: Recorder, started: float, out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    settings = Settings(
        mode=cfg.mode,
        temperature=cfg.temperature,
        sigma_temperature=cfg.sigma_temperature,
        timescale=cfg.timescale,
        threshold=cfg.threshold,
    )
    engine = Engine(loop, predictor, cfg.models_dir, settings, seed=cfg.seed, model_name=model_name)
    try:
        transport, protocol, output = await start_osc(
            engine, host=cfg.host, port=cfg.port, destinations=cfg.send, allow=cfg.allow
        )
    except OSError as e:
        raise StartupError(str(e)) from e

    def send_model_events(event: Event) -> None:
        if event.source == "model":
            output.send_prediction(event.x, event.y)

    engine.sinks[:] = [send_model_events, recorder.record]
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
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host, port = transport.get_extra_info("sockname")[:2]
    print(namespace_text(), file=out)
    if midi is not None:
        print(f"midi: {midi.describe()}", file=out)
    sends = " ".join(f"{h}:{p}" for h, p in output.destinations) or "none (send /hello)"
    print(
        f"ready: listening on {host}:{port}, sending to {sends}, model {model_name} ({predictor.backend}), "
        f"mode {settings.mode.value}, log {recorder.path} ({time.monotonic() - started:.2f} s)",
        file=out,
        flush=True,
    )
    engine.start()
    try:
        await stop.wait()
    finally:
        engine.stop()
        if midi is not None:
            midi.close()  # every held note off, then All Notes Off
        transport.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print(f"stopped: {engine.counts['inputs']} inputs, {engine.counts['outputs']} outputs, log {recorder.path}", file=out, flush=True)
    return 0
