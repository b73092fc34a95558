"""Antiphon's OSC namespace: one handler per address; its signature is its argument spec, its docstring its doc.

Handlers check their arguments' ranges and call `Controls`; they never touch the
model. The table built here is the single source of truth for the addresses: the
start-up banner, the docs' tables (docs/osc.md), the patches' drift tests and the protocol all read it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import NamedTuple

from server.live.controls import ControlError, Controls, Shown
from server.live.learning import DEFAULT_SECONDS as DEFAULT_LEARN_SECONDS
from server.live.learning import MAX_SECONDS as MAX_LEARN_SECONDS
from server.live.learning import check_seconds
from server.live.modes import MODE_NAMES, parse_mode
from server.live.settings import MAX_LOOKAHEAD, at_least
from server.live.settings import lookahead as check_lookahead
from server.live.settings import timescale as check_timescale
from server.model.files import check_model_name
from server.osc.consent import Taken, TooMany
from server.osc.output import DestinationsFull, Endpoint, OscOutput, OscStats
from server.osc.streams import STREAM_RATE
from server.osc.allow import is_loopback
from server.osc.table import AddressTable, Range, VoiceNumber, address

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5710
DEFAULT_SEND_PORT = 5711
MODEL_LOADS_PER_SECOND = 5.0  # per sender: a load reads and hashes files (off the loop, but not free)
STATUS_PER_SECOND = 50.0  # per sender: a reply is ~50x its request, so cap what a spoofed sender reflects
HELLO_PER_SECOND = 5.0  # per sender: a client says /hello once, or as a slow keep-alive
LEARN_PER_SECOND = 1.0  # per sender: each starts a training process
SUBSCRIBE_PER_SECOND = 10.0  # per sender
STATUS_PUSH_HZ = 4.0  # the status stream's rate
# What the server sends, and when: docs/osc.md's table and the patches' drift test read this.
OUTPUTS: dict[str, str] = {
    "/prediction": "`v1 .. vN` (float32, the model's N values: `x y` at N = 2) when a model event is due, to every destination (on the model's grid where "
                   "its data had one: a note model's `x * 127` is a MIDI pitch); with voices per-sender "
                   "`v1 .. vN voice`, to the voice's performer (its `/hello` port, else its own) and the `--send` "
                   "destinations; with `lookahead` > 0 sent that much early, alone in a bundle timetagged with "
                   "its time",
    "/status": "`key value ...` in reply to `/status` (keys below)",
    "/error": "`address reason` to the sender of a refused message (rate limited), or to every destination "
              "when a fine-tune fails",
    "/learn/progress": "`fraction heldout_nll` to every destination: at once when a fine-tune starts (0, NaN), with the playing model's held-out figure once scored (0, nll), then after each epoch",
    "/learn/done": "`model nll_before nll_after swapped` to every destination when a fine-tune ends "
                   "(`swapped` 1: the new model now plays; 0: the old one stays)",
    "/mixture": "to `mixture` subscribers with each prediction: `K w_1 .. w_K`, then for each component "
                "`dt_median x_mean y_mean dt_log_sigma x_sigma y_sigma` at N = 2; for N values "
                "`dt_median v1_mean .. vN_mean dt_log_sigma v1_sigma .. vN_sigma`, 2 + 2N figures (weights after `/temperature`, sigmas times "
                "`/sigma_temperature`; dt log-normal: its median in seconds and the sigma of log(dt + offset); "
                "a constant dimension: its value and sigma 0; on a grid, each mean is the grid point of its cell); with voices per-sender, then the voice number",
    "/performer": "`v1 .. vN` to `performer` subscribers: each performer event as the model heard it (for a "
                  "display); then the voice number with voices per-sender",
    "/surprise": "`nll smoothed` to `surprise` subscribers for each performer event: nats, how unlikely it was "
                 "under the prediction just before it (dequantised where the model says a dimension is "
                 "quantised), and a running figure over about the last ten events (the voice's own); then the voice "
                 "number with voices per-sender",
    "/model/dims": "`N` to every destination when a `/model` swap brings a model of another "
                   "width, before anything of it plays: send N values from then on",
}
# What /subscribe takes: each stream and what it sends.
STREAMS: dict[str, str] = {
    "prediction": "`/prediction` (on already, uncapped, for `--send` and `/hello` destinations; "
                  f"subscribed, at most {STREAM_RATE:g} a second: what a display needs)",
    "mixture": f"`/mixture` with each prediction (at most {STREAM_RATE:g} a second: faster play skips some)",
    "surprise": f"`/surprise` with each performer event (at most {STREAM_RATE:g} a second: faster play skips some)",
    "status": f"`/status` pushed {STATUS_PUSH_HZ:g} times a second (no voice's keys: those answer `/status`)",
    "performer": f"`/performer` with each performer event, from any transport (at most {STREAM_RATE:g} a second)",
}
OUTPUT_ADDRESSES: tuple[str, ...] = tuple(OUTPUTS)

Position = tuple[tuple[float, ...], int | None]  # the event's values and the voice asked for (None: the sender's own)


class Request(NamedTuple):
    """What a handler may use: the engine's controls, the output, the counters, the sender and when it arrived."""

    controls: Controls
    output: OscOutput
    stats: OscStats
    sender: Endpoint
    counters: Callable[[], dict[str, int | None]]  # the osc_* values for /status
    at: float  # when the message arrived, on the loop's clock
    reply_error: Callable[[str, str, Endpoint], None]  # (address, reason, to): a rate-limited, sanitised /error



# --- the namespace: each handler's signature is its argument spec, its docstring its doc ---

# The values each argument takes, for tools that discover the namespace (OSCQuery); the handlers' checks
# are the rule, and tests/test_oscquery_fast.py holds each range to them at its edges.
UNIT = Range(0.0, 1.0, clipped=True)
AT_LEAST_0 = Range(low=0.0)
ABOVE_0 = Range(low=0.0, open_low=True)
PORT = Range(0, 65535)
MIDI = Range(0, 127)
VALUES = {"values": UNIT}  # each of a performer event's N values
STREAM_ARGS = {"stream": Range(values=tuple(STREAMS)), "port": PORT}


def _check_port(port: int) -> None:
    """A reply port: 1-65535, or 0 for the sender's own."""
    if not 0 <= port <= 65535:
        raise ControlError(f"port must be 1-65535 (or omitted for the sender's port), got {port}")


def _unit(value: float) -> float:
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


def model_width(ctx: Request) -> int:
    """How many values a performer event carries now: the playing model's N (`/status dims`)."""
    return ctx.controls.width


# Performer handlers only check and return the position: the protocol decides when it
# reaches the engine (see the flood policy above).


@address("/gesture", performer=True, count=model_width, ranges=VALUES)
def gesture(ctx: Request, *values: float, voice: VoiceNumber | None = None) -> Position:
    """Performer event: exactly the model's N values in [0, 1] (`x y` at N = 2; out-of-range values are clamped and counted); `voice` picks one (per-sender)."""
    if min(values) < 0.0 or max(values) > 1.0:
        ctx.stats.clamped += 1
        values = tuple(_unit(v) for v in values)
    return values, voice


@address("/interface", performer=True, count=model_width, ranges=VALUES)
def interface(ctx: Request, *values: float, voice: VoiceNumber | None = None) -> Position:
    """Alias of /gesture (IMPSY-compatible)."""
    return gesture(ctx, *values, voice=voice)


@address("/note", performer=True, ranges={"pitch": MIDI, "velocity": MIDI})
def note(ctx: Request, pitch: int, velocity: int, voice: VoiceNumber | None = None) -> Position | None:
    """A note (0-127 each) played at (pitch/127, velocity/127), for a 2-value model only; velocity 0 is a note-off and ignored."""
    if not (0 <= pitch <= 127 and 0 <= velocity <= 127):
        raise ControlError(f"pitch and velocity must be 0-127, got {pitch} {velocity}")
    width = ctx.controls.width
    if width != 2:
        raise ControlError(f"/note plays (pitch, velocity): the model takes {width} values per event; "
                           "send /gesture with them")
    if velocity == 0:
        ctx.stats.ignored += 1
        return None
    return (pitch / 127.0, velocity / 127.0), voice


@address("/temperature", ranges={"value": AT_LEAST_0}, state="temperature")
def temperature(ctx: Request, value: float, voice: VoiceNumber | None = None) -> None:
    """Mixture-weight temperature (>= 0; 0 picks the most likely component); of one voice if given."""
    at_least(value, "temperature", 0.0)
    ctx.controls.set_temperature(value, voice, ctx.sender)


@address("/sigma_temperature", ranges={"value": AT_LEAST_0}, state="sigma_temperature")
def sigma_temperature(ctx: Request, value: float, voice: VoiceNumber | None = None) -> None:
    """Scale temperature: multiplies each component's scale (>= 0; 0 samples its mean); of one voice if given."""
    at_least(value, "sigma_temperature", 0.0)
    ctx.controls.set_sigma_temperature(value, voice, ctx.sender)


@address("/timescale", ranges={"value": ABOVE_0}, state="timescale")
def timescale(ctx: Request, value: float) -> None:
    """Multiplies the predicted dt before scheduling (> 0)."""
    check_timescale(value)
    ctx.controls.set_timescale(value)


@address("/mode", ranges={"name": Range(values=MODE_NAMES)}, state="mode")
def mode(ctx: Request, name: str, voice: VoiceNumber | None = None) -> None:
    """Interaction mode: respond, accompany, generate or listen; of one voice if given."""
    try:
        parse_mode(name)
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    ctx.controls.set_mode(name, voice, ctx.sender)


@address("/lookahead", ranges={"seconds": Range(0.0, MAX_LOOKAHEAD)}, state="lookahead")
def lookahead(ctx: Request, seconds: float) -> None:
    """Send model events this early (0-2 s) as bundles timetagged with their time; 0: plain messages when due."""
    check_lookahead(seconds)
    ctx.controls.set_lookahead(seconds)


@address("/threshold", ranges={"seconds": AT_LEAST_0}, state="threshold")
def threshold(ctx: Request, seconds: float) -> None:
    """Seconds of performer silence before respond mode takes over (>= 0)."""
    at_least(seconds, "threshold", 0.0)
    ctx.controls.set_threshold(seconds)


@address("/reset")
def reset(ctx: Request, voice: VoiceNumber | None = None) -> None:
    """A fresh start: cancel the output scheduled from the old state, then zero the RNN state (of one voice if given)."""
    ctx.controls.reset(voice, ctx.sender)


@address("/pause", ranges={"paused": Range(values=(0, 1))}, state="paused")
def pause(ctx: Request, paused: int) -> None:
    """1 pauses output, 0 resumes."""
    if paused not in (0, 1):
        raise ControlError(f"expected 1 (pause) or 0 (resume), got {paused}")
    ctx.controls.set_paused(paused == 1)


@address("/model", max_rate=MODEL_LOADS_PER_SECOND, state="model")
def model(ctx: Request, name: str) -> None:
    """Load a model by name (yours, else a shipped one) without stopping the loop; the old model stays if it fails."""
    try:
        check_model_name(name)
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    ctx.controls.load_model(name, _late_error(ctx, "/model"))


def _late_error(ctx: Request, path: str) -> Callable[[str], None]:
    """A callback that answers `ctx`'s sender with `/error <path> <reason>` when a started request fails later."""
    reply, sender = ctx.reply_error, ctx.sender

    def on_error(reason: str) -> None:
        reply(path, reason, sender)

    return on_error


@address("/hello", max_rate=HELLO_PER_SECOND, ranges={"port": PORT})
def hello(ctx: Request, port: int = 0) -> None:
    """Send output to the sender, or to `port` on its host (sent only what the sender's traffic pays for until that port sends itself).

    Only that destination, or a sender that asked for it, can stop it (`/unsubscribe
    prediction`); a port another sender names is sent at most `AMPLIFICATION` times what
    that sender sent, until it sends something itself (`server.osc.consent`). A full
    list makes room by dropping the destination quiet longest, never one whose sender is
    still sending (see `server.osc.output`).
    """
    _check_port(port)
    try:
        ctx.output.add_destination(_target(ctx, port), ctx.sender, ctx.at)
    except (DestinationsFull, TooMany, Taken) as exc:
        raise ControlError(str(exc)) from None


@address("/status", max_rate=STATUS_PER_SECOND, ranges={"voices": Range(values=("", "all"))})
def status(ctx: Request, voices: str = "") -> None:
    """Reply /status key value ... to the sender: state, counters, its own voices (`all`: every voice, to loopback).

    `voices` `all`: every voice's keys, answered only to a sender on loopback (a monitor
    or tool on this machine); others see only the voices they opened, and the count.
    """
    if voices not in ("", "all"):
        raise ControlError(f"expected `all` or nothing, got {voices[:32]!r}")
    if voices and not is_loopback(ctx.sender[0]):
        raise ControlError("`/status all` answers only a sender on this machine (loopback); "
                           "`/status` lists your own voices")
    ctx.output.send_status(ctx.sender, status_items(ctx.controls, ctx.counters, Shown.ALL if voices else ctx.sender))


@address("/learn", max_rate=LEARN_PER_SECOND, ranges={"seconds": Range(0.0, MAX_LEARN_SECONDS, open_low=True)})
def learn(ctx: Request, seconds: float = DEFAULT_LEARN_SECONDS) -> None:
    """Fine-tune the playing model on this session's performer events for at most `seconds` (over 0, at most 3600; 60 unless given); swapped in only if better."""
    ctx.controls.learn(check_seconds(seconds))


@address("/learn/stop")
def learn_stop(ctx: Request) -> None:
    """End a fine-tune early, keeping (and judging) the best model so far."""
    ctx.controls.stop_learning()


def _target(ctx: Request, port: int) -> Endpoint:
    """The sender's host at `port`, or the sender itself for 0; never this server's own socket."""
    if not port:
        return ctx.sender
    if ctx.output.is_own((ctx.sender[0], port)):
        raise ControlError(f"port {port} is this server's own: it would send to itself")
    return ctx.sender[0], port


def _stream_target(ctx: Request, stream: str, port: int) -> tuple[str, Endpoint]:
    if stream not in STREAMS:
        raise ControlError(f"unknown stream {stream!r}; expected one of {', '.join(STREAMS)}")
    _check_port(port)
    return stream, _target(ctx, port)


@address("/subscribe", max_rate=SUBSCRIBE_PER_SECOND, ranges=STREAM_ARGS)
def subscribe(ctx: Request, stream: str, port: int = 0) -> None:
    """Send a stream (prediction, mixture, surprise, status, performer) to the sender, or to `port` on its host (paid for as /hello's).

    A sender may ask for at most `MAX_PER_SENDER` streams and `/hello` destinations; a
    full stream makes room for a sender that has none there by dropping its idlest
    subscriber (see `server.osc.streams`).
    """
    stream, target = _stream_target(ctx, stream, port)
    try:
        ctx.output.streams.add(stream, target, ctx.sender, ctx.at)
    except ValueError as exc:  # StreamsFull, TooMany, Taken
        raise ControlError(str(exc)) from None


@address("/unsubscribe", max_rate=SUBSCRIBE_PER_SECOND, ranges=STREAM_ARGS)
def unsubscribe(ctx: Request, stream: str, port: int = 0) -> None:
    """Stop a stream to the sender (every subscription there) or to `port` on its host (only what the sender asked for there)."""
    stream, target = _stream_target(ctx, stream, port)
    stopped = ctx.output.streams.remove(stream, target, ctx.sender)
    if stream == "prediction":  # a /hello destination there stops too
        stopped = ctx.output.remove_destination(target, ctx.sender) or stopped
    if not stopped and target != ctx.sender:
        raise ControlError(f"nothing you asked for goes to {target[0]}:{target[1]} on {stream}; only that port itself, "
                           "or the sender that asked for it, can stop it")


def status_items(controls: Controls, counters: Callable[[], dict[str, int | None]],
                 asker: Hashable | None = Shown.NONE) -> dict[str, object]:
    """Everything `/status` says: the engine's (and its parts') keys, with the per-voice keys of the voices
    `asker` owns (`Controls.status`), then the transport's `osc_` counters."""
    items: dict[str, object] = dict(controls.status(asker))
    items.update((f"osc_{key}", value) for key, value in counters().items())
    return items


TABLE = AddressTable(
    (gesture, interface, note, temperature, sigma_temperature, timescale, mode, lookahead, threshold,
     reset, pause, model, hello, status, learn, learn_stop, subscribe, unsubscribe)
)
ADDRESSES: tuple[str, ...] = TABLE.paths


def namespace_text() -> str:
    """The input namespace as aligned plain text (address, arguments, meaning) for the start-up print."""
    return TABLE.text()


def namespace_markdown() -> str:
    """The input namespace as a Markdown table for docs/osc.md."""
    return TABLE.markdown()
