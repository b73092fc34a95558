"""`run`: wire model, engine, OSC and MIDI transports and recorder together and serve until a signal.

Start-up failures (a bad model folder, an unwritable log directory, a taken port) end
with a message naming the problem and a non-zero exit, before any music starts.
"""

from __future__ import annotations

import asyncio
import errno
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from server.config import RunConfig
from server.live.controls import Shown
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
from server.osc.namespace import DEFAULT_HOST, TABLE, namespace_text
from server.osc.output import OscOutput
from server.osc.protocol import start_osc
from server.osc.sink import OscSink

if TYPE_CHECKING:  # loaded only with --oscquery / --advertise
    from server.osc.advertise import Advertisement
    from server.osc.oscquery_http import OscQueryServer


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
        predictor = Predictor.load(folder, cfg.step_engine, prove=True)  # proven in a child first: no segfault here
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


def bind_failure(e: OSError, host: str, port: int) -> str:
    """Why the OSC port could not be opened, with what to do when another program holds it."""
    if e.errno == errno.EADDRINUSE:
        return (f"OSC port {host}:{port} is already in use: another Antiphon server (or another OSC program) may be "
                f"running; stop it, or pick another port with --port (e.g. --port {port + 10})")
    return f"cannot open OSC port {host}:{port}: {e.strerror or e}"


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
        raise StartupError(bind_failure(e, cfg.host, cfg.port)) from e
    host, port = transport.get_extra_info("sockname")[:2]
    try:
        discovery = await start_discovery(cfg, engine, port)
    except StartupError:
        if midi is not None:
            midi.close()
        transport.close()
        raise
    if midi is not None:
        midi.listen(engine.perform)
    stop = asyncio.Event()
    restore = install_stop_signals(loop, stop.set)
    say(namespace_text(), out)
    if midi is not None:
        say(f"midi: {midi.describe()}", out)
    if discovery is not None:
        say(f"oscquery: {discovery.describe()}", out)
    sends = " ".join(f"{h}:{p}" for h, p in output.destinations) or "none (send /hello)"
    say(
        f"ready: listening on {host}:{port}, sending to {sends}, model {folder.name} ({predictor.backend}), "
        f"mode {settings.mode.value}, log {recorder.path}, your models {cfg.models_dir} "
        f"({time.monotonic() - started:.2f} s)",
        out,
    )
    engine.start()
    monitor = start_monitor(cfg, host, port) if cfg.monitor else None
    try:
        await stop.wait()
    finally:
        if monitor is not None:
            stop_monitor(monitor)
        if discovery is not None:
            await discovery.close()
        engine.stop()
        learner.close()
        if midi is not None:
            midi.close()  # every held note off, then All Notes Off
        transport.close()
        restore()
    say(f"stopped: {engine.counts['inputs']} inputs, {engine.counts['outputs']} outputs, log {recorder.path}", out)
    return 0


async def start_discovery(cfg: RunConfig, engine: Engine, osc_port: int) -> Discovery | None:
    """`--oscquery` (and `--advertise`): the namespace over HTTP on this loop, announced over mDNS if asked."""
    if cfg.oscquery is None:
        return None
    from server.osc.oscquery_http import start_oscquery  # aiohttp loads only when asked for

    try:
        http = await start_oscquery(cfg.host, cfg.oscquery, TABLE, lambda: engine.status(Shown.NONE), osc_port,
                                    cfg.allow)
    except OSError as e:
        raise StartupError(f"cannot serve OSCQuery on {cfg.host}:{cfg.oscquery}: {e.strerror or e}; another server "
                           "may be using that port: pick another with --oscquery PORT (0: any free port)") from e
    if not cfg.advertise:
        return Discovery(http, None)
    from server.osc.advertise import AdvertiseError, advertise

    try:
        return Discovery(http, advertise(http.port, osc_port, cfg.host))
    except (AdvertiseError, OSError) as e:
        await http.close()
        raise StartupError(f"cannot advertise OSCQuery: {e}") from e


class Discovery:
    """The OSCQuery server and its mDNS announcement, if any: what `start_discovery` started."""

    def __init__(self, http: OscQueryServer, advertisement: Advertisement | None) -> None:
        self.http = http
        self.advertisement = advertisement

    def describe(self) -> str:
        announced = f", advertised as {self.advertisement.service}" if self.advertisement is not None else ""
        return f"http://{self.http.host}:{self.http.port}/{announced}"

    async def close(self) -> None:
        if self.advertisement is not None:
            self.advertisement.close()
        await self.http.close()


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
